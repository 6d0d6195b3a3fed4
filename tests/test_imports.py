"""`import dcfx` loads the runtime only: not the CLI's heavy parts, not Ray (ARCHITECTURE.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.subprocess
def test_import_dcfx_and_its_cli_do_not_import_ray(modules_after):
    # A fresh interpreter's (tests/conftest.py): this one may have imported Ray already.
    loaded = [m for m in ("ray", "dcfx.serve") if m in modules_after["import dcfx.cli"]]
    assert loaded == []


def test_every_subpackage_ships_in_the_wheel():
    # setuptools installs only the packages pyproject.toml lists: a new subpackage left out works
    # from the checkout (editable install) and is missing from a wheel.
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "dcfx").rglob("__init__.py")}
    found.add("dcfx.kernels")  # the link to kernels/, a folder without __init__.py (no shadowing)
    assert found == listed, f"pyproject.toml's packages {sorted(listed)} differ from the folders {sorted(found)}"
