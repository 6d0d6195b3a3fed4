"""dcfx serve with an AOT package: `build_package` writes the package and its record, and a
`Service` that loads it in a fresh interpreter, where torch.export and torch.compile fail,
starts, pads batches to the package's size and draws what the eager dcfx graphs draw (within
compile tolerance); a deployment of another batch size or branch is refused by name.

The served model is a digits model folder with random weights on the tiny U-Net (the digits
model's signature, a quick build): building the package is one AOTInductor build of each
graph, hence one package per test run (`_shared.built_once`), the aot marker and a file of
its own (tests/test_serve.py stays under a minute).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("ray.serve", reason='Ray Serve is not installed (pip install "dcfx[serve]"; the test extra has it)')

from _shared import built_once  # noqa: E402
from _tiny_unet import tiny_digits_folder  # noqa: E402

from dcfx.serve import BadRequest, Service, build_package  # noqa: E402

pytestmark = [pytest.mark.aot, pytest.mark.inductor]

ROOT = Path(__file__).resolve().parent.parent
BATCH = 2
STEPS = 7
# AOT-compiled graphs against eager ones over 7 steps, images in [0, 1].
TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return built_once(tmp_path_factory, "digits-folder", "tiny_digits_folder(seed=0)", tiny_digits_folder)


@pytest.fixture(scope="module")
def packaged(model, tmp_path_factory) -> Path:
    def build(folder):
        path = folder / "digits-b2.pt2"
        assert build_package(path, model, setting="3:0", max_batch_size=BATCH) == path

    key = f"{model}: setting 3:0, max_batch_size {BATCH}"
    return built_once(tmp_path_factory, "serve-package", key, build) / "digits-b2.pt2"


@pytest.fixture(scope="module")
def eager(model) -> Service:
    return Service(model, settings=["3:0"], max_batch_size=BATCH, warm_up=False)


FRESH_PROCESS = """
import sys
import torch

def forbidden(*args, **kwargs):
    raise AssertionError("a replica loading a package exported or compiled")

torch.export.export = torch.compile = torch._inductor.aot_compile = forbidden
torch.set_num_threads(1)
from dcfx.serve import Service

model, path, out = sys.argv[1:]
service = Service(model, package=path, settings=["3:0", "5:0"], max_batch_size=2)  # warm-up included
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
        [sys.executable, "-P", "-c", FRESH_PROCESS, str(model), str(packaged), str(out)], cwd=ROOT,
        env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    got = torch.load(out)
    result = got["result"]
    # One image, padded to the package's batch for dcfx; plain runs as it is.
    assert result["3:0"]["history"] == "FSSFSSF" and result["3:0"]["batch_size"] == BATCH
    assert result["5:0"]["history"] == "FSSSSFS"  # another interval on the same graphs
    assert result["off"]["history"] == "F" * STEPS and result["off"]["batch_size"] == 1
    # FLOPs from the package's record are the eager graphs' count.
    [reference] = eager.run([eager.parse({"label": 6, "seed": 4, "steps": STEPS})])
    assert result["3:0"]["flops"] == reference["flops"]
    images, _ = eager._generate("3:0", [6, 2], [4, 9], STEPS, 1.5, output_type="pt")
    torch.testing.assert_close(got["images"], images, **TOL)


def test_the_record_names_what_the_package_was_built_for(packaged):
    record = json.loads(packaged.with_name(packaged.name + ".json").read_text())
    assert record["max_batch_size"] == BATCH and record["branch"] == 0 and record["setting"] == "3:0"
    assert "float32[4, 1, 16, 16]" in record["signature"]  # two images, guided: four U-Net rows
    assert 0 < record["row_flops"]["shallow"] < record["row_flops"]["full"]


def test_a_deployment_the_package_does_not_fit_is_refused(model, packaged, tmp_path):
    with pytest.raises(ValueError, match=rf"built for max_batch_size={BATCH}.*this deployment has max_batch_size=3"):
        Service(model, package=packaged, settings=["3:0"], max_batch_size=3)
    with pytest.raises(ValueError, match="holds the graphs of branch 0; dcfx settings with branch 1 need another package"):
        Service(model, package=packaged, settings=["3:1"], max_batch_size=BATCH)
    with pytest.raises(ValueError, match="compiled already"):
        Service(model, package=packaged, compile=True, max_batch_size=BATCH)
    alone = tmp_path / packaged.name
    alone.write_bytes(packaged.read_bytes())
    with pytest.raises(FileNotFoundError, match="record that dcfx.serve.build_package"):
        Service(model, package=alone, max_batch_size=BATCH)
    with pytest.raises(FileExistsError, match="not written by dcfx serve"):
        build_package(alone, model, max_batch_size=BATCH)  # refuses before any compile


def test_unguided_requests_are_refused_with_a_package(model, packaged):
    service = Service(model, package=packaged, settings=["3:0"], max_batch_size=BATCH, warm_up=False)
    with pytest.raises(BadRequest, match="guidance 1 turns classifier-free guidance off"):
        service.parse({"label": 1, "guidance": 1})
    assert service.parse({"label": 1, "guidance": 1, "dcfx": "off"}).guidance == 1.0
