"""Expensive test artifacts (AOT packages, model folders, a fresh interpreter's findings) built
once per test run, however many files and pytest-xdist workers ask for them.

A session fixture runs once per xdist worker; `built_once` keeps the artifact in the folder
that all workers of one run share (the parent of each worker's base temp folder), behind a
file lock: the first worker to ask builds it, the others wait and reuse it.

Not a test module (no `test_` prefix); the test files import it as `_shared`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Callable

import pytest
from filelock import FileLock


def built_once(factory: pytest.TempPathFactory, name: str, key: str, build: Callable[[Path], object]) -> Path:
    """The folder that `build(folder)` filled for `name` and `key` (everything the artifact
    depends on, in words), built at most once per test run."""
    root = factory.getbasetemp()
    # With xdist each worker's base temp is <run>/popen-gwN; without it, the run's own folder.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    folder = root / f"shared-{name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    with FileLock(f"{folder}.lock"):
        done = folder / ".built"
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)  # a build that failed part-way
            folder.mkdir()
            build(folder)
            done.write_text(key)
    return folder
