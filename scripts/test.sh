#!/usr/bin/env bash
# Sets everything up on a fresh machine, then runs the test suite (CPU; GPU tests skip).
# --fast (first argument): the fast tier, no test that starts an interpreter or Ray, compiles
# with inductor, builds an AOT package, samples the trained model or runs for seconds
# (pyproject.toml's markers).
# DCFX_DEPS=latest: in .venv-latest with the newest versions pyproject.toml allows (see
# scripts/setup.sh). Extra arguments go to pytest (after ours: `-n 0` runs in one process).
# The tests run one torch thread each, so two pytest-xdist workers use both cores of a 2-core
# machine; a worker takes whole files, in the order tests/conftest.py collects them (slowest
# kinds first: --no-loadscope-reorder keeps it), so module-scoped fixtures (the reference runs)
# are built once. DCFX_TEST_WORKERS sets another count.
set -euo pipefail
cd "$(dirname "$0")/.."
tier=()
if [ "${1:-}" = --fast ]; then
    shift
    tier=(-m "not (subprocess or ray or inductor or aot or trained or slow)")
fi
bash scripts/setup.sh
[ "${DCFX_DEPS:-locked}" = latest ] && venv=.venv-latest || venv=.venv
echo "test.sh: environment $venv ready after ${SECONDS} s"
exec "$venv/bin/python" -m pytest -q -n "${DCFX_TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder ${tier[@]+"${tier[@]}"} "$@"
