"""From the checkout root (first on `sys.path` for `python -m`, `-c` and `-`), the project's
top-level `kernels/` folder must not hide the PyPI package `kernels` that transformers needs:
the folder has no `__init__.py`, so it is only a namespace portion and loses to any regular
package of that name later on the path. dcfx reaches it as `dcfx.kernels` (a link in `dcfx/`).
"""

import importlib.metadata
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, input=stdin, capture_output=True, text=True, timeout=300
    )


def _ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def test_the_kernels_folder_is_no_regular_package():
    assert (ROOT / "kernels" / "ops.py").is_file()
    assert not (ROOT / "kernels" / "__init__.py").exists(), "an __init__.py makes kernels/ shadow PyPI's kernels"


@pytest.mark.subprocess
def test_dcfx_diffusers_and_kernels_import_from_the_checkout_root():
    # One interpreter for both `python -c` checks (each start costs seconds):
    # dcfx, diffusers' pipelines and transformers' kernels import, and `import kernels` finds
    # the installed package.
    code = (
        "import dcfx, diffusers\n"
        "from diffusers import StableDiffusionPipeline\n"
        "import dcfx.kernels.ops, torch\n"
        "print(torch.ops.dcfx.cat_group_norm_silu.default)\n"
        "import kernels\n"
        "print(kernels.__file__)\n"
    )
    lines = _ok(_run("-c", code)).strip().splitlines()
    assert "dcfx.cat_group_norm_silu" in lines[0]
    if _installed("kernels"):
        path = lines[-1]
        assert path != "None" and pathlib.Path(path).resolve().parent != (ROOT / "kernels").resolve(), path
        assert "site-packages" in path


@pytest.mark.subprocess
def test_dcfx_console_module_runs_from_the_checkout_root():
    out = _ok(_run("-m", "dcfx", "--help"))
    assert "demo" in out and "graphs" in out


@pytest.mark.subprocess
def test_pytest_collects_from_the_checkout_root():
    out = _ok(_run("-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests/test_no_shadowing.py"))
    assert "error" not in out.lower() and "test_the_kernels_folder_is_no_regular_package" in out


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True
