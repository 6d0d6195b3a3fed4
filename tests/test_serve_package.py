"""dcfx serve with an AOT package: `build_package` writes the package (its manifest is the one
record: batch, FLOPs), and a `Service` that loads it in a fresh interpreter, where
torch.export and torch.compile fail, starts, pads batches to the package's size and draws what
the eager dcfx graphs draw (within float32 rounding: tests/_tolerance.py); a deployment of another batch size or
branch is refused by name.

Building the package is one AOTInductor build of each graph (about a minute here), hence the
module-scoped fixture, the compile marker and a file of its own (tests/test_serve.py stays
under a minute).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("ray.serve", reason='Ray Serve is not installed (pip install "dcfx[serve]"; the test extra has it)')

from dcfx.aot import read_manifest  # noqa: E402
from _shared import built_once  # noqa: E402
from _tiny_unet import tiny_digits_folder  # noqa: E402
from _tolerance import assert_float32_close  # noqa: E402
from dcfx.serve import BadRequest, Service, build_package  # noqa: E402
from test_serve import float64_images  # noqa: E402

pytestmark = [pytest.mark.aot, pytest.mark.inductor]

ROOT = Path(__file__).resolve().parent.parent
BATCH = 2
STEPS = 7


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return str(built_once(tmp_path_factory, "digits-folder", "tiny_digits_folder(seed=0)", tiny_digits_folder))


@pytest.fixture(scope="module")
def packaged(model, tmp_path_factory) -> Path:
    def build(folder):
        path = folder / "digits-b2.pt2"
        assert build_package(path, model=model, settings=["3:0"], max_batch_size=BATCH) == path

    key = f"{model}: settings 3:0, max_batch_size {BATCH}"
    return built_once(tmp_path_factory, "serve-package", key, build) / "digits-b2.pt2"


@pytest.fixture(scope="module")
def eager(model) -> Service:
    return Service(model=model, settings=["3:0"], max_batch_size=BATCH, warm_up=False)


FRESH_PROCESS = """
import os
import sys
import torch

def forbidden(*args, **kwargs):
    raise AssertionError("a replica loading a package exported or compiled")

torch.export.export = torch.compile = torch._inductor.aot_compile = forbidden
torch.set_num_threads(int(os.environ.get("DCFX_TEST_THREADS", "1")))  # as tests/conftest.py
from dcfx.serve import Service

model, path, out = sys.argv[1:]
service = Service(model=model, package=path, settings=["3:0", "5:0"], max_batch_size=2)  # warm-up included
result = {}
for setting in ("3:0", "5:0", "off"):
    [r] = service.run([service.parse({"label": 6, "seed": 4, "steps": 7, "dcfx": setting})])
    result[setting] = {k: r[k] for k in ("history", "flops", "batch_size")}
images, _ = service._generate("3:0", [6, 2], [4, 9], 7, 1.5, output_type="pt")
torch.save(dict(result=result, images=images), out)
"""


@pytest.mark.subprocess
def test_a_replica_starts_from_the_package_without_exporting_or_compiling(model, packaged, eager, tmp_path):
    out = tmp_path / "out.pt"
    done = subprocess.run(
        [sys.executable, "-P", "-c", FRESH_PROCESS, model, str(packaged), str(out)], cwd=ROOT,
        env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    got = torch.load(out)
    result = got["result"]
    # One image, padded to the package's batch for dcfx; plain runs as it is.
    assert result["3:0"]["history"] == "FSSFSSF" and result["3:0"]["batch_size"] == BATCH
    assert result["5:0"]["history"] == "FSSSSFS"  # another interval on the same graphs
    assert result["off"]["history"] == "F" * STEPS and result["off"]["batch_size"] == 1
    # FLOPs from the package's manifest are the eager graphs' count.
    [reference] = eager.run([eager.parse({"label": 6, "seed": 4, "steps": STEPS})])
    assert result["3:0"]["flops"] == reference["flops"]
    # AOT-compiled graphs against the eager ones, and those in float64 (tests/_tolerance.py).
    images, _ = eager._generate("3:0", [6, 2], [4, 9], STEPS, 1.5, output_type="pt")
    assert_float32_close(got["images"], images, float64_images("3:0", [6, 2], [4, 9], STEPS, 1.5, model))


def test_the_manifest_names_what_the_package_was_built_for(packaged):
    manifest = read_manifest(packaged)
    assert manifest["batch"] == 2 * BATCH and manifest["layout"]["cut"]["branch"] == 0
    assert manifest["config"]["interval"] == 3
    assert "float32[4, 1, 16, 16]" in manifest["signature"]  # two images, guided: four U-Net rows
    assert 0 < manifest["flops"]["shallow"] < manifest["flops"]["full"]


def test_a_deployment_the_package_does_not_fit_is_refused(model, packaged, tmp_path):
    with pytest.raises(ValueError, match=rf"built for max_batch_size={BATCH}.*this deployment has max_batch_size=3"):
        Service(model=model, package=packaged, settings=["3:0"], max_batch_size=3)
    with pytest.raises(ValueError, match="holds the graphs of branch 0; dcfx settings with branch 1 need another package"):
        Service(model=model, package=packaged, settings=["3:1"], max_batch_size=BATCH)
    with pytest.raises(ValueError, match="compiled already"):
        Service(model=model, package=packaged, compile=True, max_batch_size=BATCH)
    with pytest.raises(FileNotFoundError, match="no dcfx package at"):
        Service(model=model, package=tmp_path / packaged.name, max_batch_size=BATCH)
    foreign = tmp_path / "notes.pt2"
    foreign.write_text("not a package")
    with pytest.raises(FileExistsError, match="not written by dcfx serve"):
        build_package(foreign, model=model, max_batch_size=BATCH)  # refuses before any compile


def test_unguided_requests_are_refused_with_a_package(model, packaged):
    service = Service(model=model, package=packaged, settings=["3:0"], max_batch_size=BATCH, warm_up=False)
    with pytest.raises(BadRequest, match="guidance 1 turns classifier-free guidance off"):
        service.parse({"label": 1, "guidance": 1})
    assert service.parse({"label": 1, "guidance": 1, "dcfx": "off"}).guidance == 1.0
