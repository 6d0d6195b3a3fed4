#!/usr/bin/env bash
# Refreshes constraints.txt, the lock `bash scripts/setup.sh` installs from: installs the newest
# versions pyproject.toml allows into .venv-latest (DCFX_DEPS=latest; torch stays pinned),
# runs the test suite there, and only if it passes writes every installed distribution's exact
# version (`pip freeze`, less dcfx itself and pip's own tools) to constraints.txt. Extra
# arguments go to pytest. Commit the new lock with the change that needed it.
set -euo pipefail
cd "$(dirname "$0")/.."

DCFX_DEPS=latest bash scripts/test.sh "$@"

py=.venv-latest/bin/python
version=$("$py" -c 'import platform, sys; print("%d.%d" % sys.version_info[:2], platform.system().lower(), platform.machine())')
{
    echo "# python $version: the versions the test suite last passed with ($(date -u +%Y-%m-%d))."
    echo "# Written by scripts/lock.sh (do not edit); scripts/setup.sh installs with these as constraints."
    # Local version labels (torch's +cpu) would refuse the CUDA build of the same version.
    "$py" -m pip freeze --exclude-editable --exclude pip --exclude setuptools --exclude wheel \
        | grep -v '^#' | sed -E 's/^([^=]+==[^+]+)\+.*$/\1/' | LC_ALL=C sort -f
} > constraints.txt.new
mv constraints.txt.new constraints.txt
echo "lock.sh: wrote constraints.txt ($(grep -vc '^#' constraints.txt) pins)"
