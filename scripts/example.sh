#!/usr/bin/env bash
# Sets everything up on a fresh machine, then runs `dcfx example`:
# DeepCache on a random-weight SD-shaped U-Net, printing each step's graph, FLOPs and times.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
[ "${DCFX_DEPS:-locked}" = latest ] && venv=.venv-latest || venv=.venv
exec "$venv/bin/dcfx" example "$@"
