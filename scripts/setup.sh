#!/usr/bin/env bash
# Creates the environment and installs dcfx with its test dependencies (the `test` extra,
# which takes in `demo`, `serve` and `bench`).
#
#   bash scripts/setup.sh                    .venv: exactly the versions in constraints.txt,
#                                            the ones the suite last passed with
#   DCFX_DEPS=latest bash scripts/setup.sh   .venv-latest: the newest versions pyproject.toml
#                                            allows, upgraded on every run (finds breakage by
#                                            new releases); scripts/lock.sh writes the lock from it
#
# torch is pinned in both modes, to the lock's version unless DCFX_TORCH_VERSION names another
# (2.11-2.13): any looser spec lets pip resolve a multi-GB CUDA build instead of the CPU wheel
# this kind of machine carries on its disk.
# .venv keeps a stamp of what it was installed from (the lock, pyproject.toml, the torch
# version, the Python); while that matches, nothing is installed. Otherwise pip brings it to the
# lock in place (`rm -rf .venv` for a clean one).
set -euo pipefail
cd "$(dirname "$0")/.."

LOCK=constraints.txt
MODE=${DCFX_DEPS:-locked}
case "$MODE" in
    locked) VENV=.venv ;;
    latest) VENV=.venv-latest ;;
    *) echo "setup.sh: DCFX_DEPS=$MODE is not a mode: use locked (the default) or latest" >&2; exit 2 ;;
esac
[ -f "$LOCK" ] || { echo "setup.sh: $LOCK is missing (bash scripts/lock.sh writes it)" >&2; exit 2; }
LOCKED_TORCH=$(sed -n 's/^torch==//p' "$LOCK")
TORCH=${DCFX_TORCH_VERSION:-$LOCKED_TORCH}
[ -n "$TORCH" ] || { echo "setup.sh: $LOCK pins no torch version; set DCFX_TORCH_VERSION" >&2; exit 2; }

PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
fi
python_version=$("$VENV/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
locked_python=$(sed -n 's/^# python \([0-9.]*\).*/\1/p' "$LOCK")
if [ "$MODE" = locked ] && [ -n "$locked_python" ] && [ "$python_version" != "$locked_python" ]; then
    echo "setup.sh: warning: $LOCK was written with Python $locked_python, $VENV has $python_version; some pins may not install" >&2
fi

# No byte-compiling at install: pip would compile all ~18,000 modules (torch, ray, ...); Python
# compiles the ones it imports, once, when it first imports them.
PIP_INSTALL=("$VENV/bin/python" -m pip install -q --no-compile)
STAMP="$VENV/.dcfx-installed"
stamp=$( { echo "$MODE torch==$TORCH python $python_version"; cat "$LOCK" pyproject.toml; } | sha256sum | cut -d' ' -f1)

if [ "$MODE" = latest ]; then
    "${PIP_INSTALL[@]}" --upgrade --upgrade-strategy eager "torch==$TORCH" -e ".[test]"
elif [ "$(cat "$STAMP" 2>/dev/null)" != "$stamp" ]; then
    rm -f "$STAMP"
    # torch comes from DCFX_TORCH_VERSION or the lock: leave it out of the constraints, so an
    # override does not conflict with the locked pin.
    constraints=$(mktemp)
    trap 'rm -f "$constraints"' EXIT
    grep -v '^torch==' "$LOCK" > "$constraints"
    "${PIP_INSTALL[@]}" -c "$constraints" "torch==$TORCH" -e ".[test]"
fi
echo "$stamp" > "$STAMP"
