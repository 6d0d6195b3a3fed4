#!/usr/bin/env bash
# Creates .venv (if missing) and installs dcfx with its test dependencies.
# torch is pinned first so pip takes the CPU wheel this kind of machine carries instead of
# resolving a multi-GB CUDA build from the open range in pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==${DCFX_TORCH_VERSION:-2.13.0}"
.venv/bin/python -m pip install -q -e ".[test]"
