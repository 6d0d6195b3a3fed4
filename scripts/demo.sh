#!/usr/bin/env bash
# The main job, set-up included: DeepCache on the embedded trained digits model (`dcfx demo`):
# plain DDIM, dcfx settings and FLOP-matched fewer-step DDIM, one table and a PNG grid.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
[ "${DCFX_DEPS:-locked}" = latest ] && venv=.venv-latest || venv=.venv
exec "$venv/bin/dcfx" demo "$@"
