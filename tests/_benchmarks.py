"""Shared by the tests of benchmarks/: a script loaded as a module (once per process, so that
every test file sees the same classes), a package of shared benchmark code, and a tiny fidelity
study of two samples.

Not a test module (no `test_` prefix); the test files import it as `_benchmarks`.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def script(name: str) -> ModuleType:
    """benchmarks/NAME.py as the module NAME. benchmarks/ is not a package; the module is
    registered because dataclasses look theirs up in sys.modules."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def package(name: str) -> ModuleType:
    """benchmarks/NAME/ as the package NAME, from benchmarks/ on sys.path (where the entry
    scripts put it too, so that both see the same modules)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    return importlib.import_module(name)


def tiny_study(**changes):
    """A fidelity study of two samples of the embedded digits model, one torch thread."""
    study = package("study")
    fields = dict(samples=2, guidance=1.5, spacing="trailing", threads=1, model=None, model_digest=study.model_digest(None))
    return study.Study(**{**fields, **changes})
