"""`import dcfx` loads the runtime only: not the CLI's heavy parts, not Ray (ARCHITECTURE.md)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_import_dcfx_and_its_cli_do_not_import_ray():
    # A fresh interpreter: this one may have imported Ray already.
    code = "import sys, dcfx, dcfx.cli; print([m for m in ('ray', 'dcfx.serve') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-P", "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr[-2000:]


def test_every_subpackage_ships_in_the_wheel():
    # setuptools installs only the packages pyproject.toml lists: a new subpackage left out works
    # from the checkout (editable install) and is missing from a wheel.
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "dcfx").rglob("__init__.py")}
    found.add("dcfx.kernels")  # the link to kernels/, a folder without __init__.py (no shadowing)
    assert found == listed, f"pyproject.toml's packages {sorted(listed)} differ from the folders {sorted(found)}"
