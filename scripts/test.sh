#!/usr/bin/env bash
# Sets everything up on a fresh machine, then runs the test suite (CPU; GPU tests skip).
# DCFX_DEPS=latest: in .venv-latest with the newest versions pyproject.toml allows (see
# scripts/setup.sh). Extra arguments go to pytest (after ours: `-n 0` runs in one process).
# The tests run one torch thread each, so two pytest-xdist workers use both cores of a 2-core
# machine; a worker takes whole files, so module-scoped fixtures (the AOT package, the reference
# runs) are built once. DCFX_TEST_WORKERS sets another count.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
[ "${DCFX_DEPS:-locked}" = latest ] && venv=.venv-latest || venv=.venv
echo "test.sh: environment $venv ready after ${SECONDS} s"
exec "$venv/bin/python" -m pytest -q -n "${DCFX_TEST_WORKERS:-2}" --dist loadfile "$@"
