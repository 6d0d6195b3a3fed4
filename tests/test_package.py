"""AOT packages (dcfx.package): the tiny U-Net's graphs packaged once per session with
AOTInductor for the call a StableDiffusionPipeline makes, then loaded in a fresh process that
may neither export nor compile, and run like uncompiled dcfx.

Packaging is one AOTInductor build of each graph (about a minute of C++ compilation here,
cached nowhere), hence one package per test run (`_shared.built_once`) and the aot marker.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler

import dcfx
from dcfx.aot import load_package, package, read_manifest
from _shared import built_once
from _tiny_unet import LATENT, float32_noise, prompt_embeds, tiny_pipe, tiny_unet
from _tolerance import as_float64, assert_float32_close, float64_copy

pytestmark = [pytest.mark.aot, pytest.mark.inductor]

INTERVAL = 3
# Compiled graphs against the uncompiled ones: float32 against their float64 run
# (tests/_tolerance.py), over up to 7 denoising steps.


def make_pipe(unet):
    return tiny_pipe(unet, DDIMScheduler(steps_offset=1, clip_sample=False))


def generate(pipe, steps, dtype=torch.float32):
    """The pipeline's latents; a pipeline of float64 components gets float64 embeddings and the
    float32 run's noise."""
    prompt, negative = (e.to(dtype) for e in prompt_embeds())
    with torch.no_grad(), float32_noise() if dtype == torch.float64 else contextlib.nullcontext():
        return pipe(
            prompt_embeds=prompt, negative_prompt_embeds=negative, num_inference_steps=steps,
            guidance_scale=3.0, height=LATENT, width=LATENT, output_type="latent",
            generator=torch.Generator().manual_seed(0),
        ).images


def make_pipe64(unet64):
    pipe = make_pipe(unet64)
    pipe.vae.double()
    return pipe


def loop(unet, call, steps):
    """A DDIM loop calling `unet` as the pipeline does (`call`: its recorded arguments)."""
    args, kwargs = call
    scheduler = DDIMScheduler(steps_offset=1, clip_sample=False)
    scheduler.set_timesteps(steps)
    x = args[0].clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps = unet(x, t, *args[2:], **kwargs)[0]
            x = scheduler.step(eps, t, x).prev_sample
    return x


@pytest.fixture(scope="module")
def unet():
    return tiny_unet(seed=0)


@pytest.fixture(scope="module")
def unet64(unet):
    return float64_copy(unet)


@pytest.fixture(scope="module")
def pipeline_call(unet):
    """The arguments StableDiffusionPipeline passes the U-Net (guidance: batch 2)."""
    calls = []

    def record(module, args, kwargs):
        calls.append((args, kwargs))

    handle = unet.register_forward_pre_hook(record, with_kwargs=True)
    try:
        generate(make_pipe(unet), 1)
    finally:
        handle.remove()
    return calls[0]


@pytest.fixture(scope="module")
def packaged(unet, pipeline_call, tmp_path_factory) -> Path:
    args, kwargs = pipeline_call

    def build(folder):
        path = folder / "tiny.pt2"
        assert package(dcfx.optimize(unet, interval=INTERVAL), path, *args, **kwargs) == path

    key = f"tiny_unet(seed=0), interval {INTERVAL}, the call of a guided StableDiffusionPipeline"
    return built_once(tmp_path_factory, "package", key, build) / "tiny.pt2"


@pytest.fixture(scope="module")
def loaded(packaged):
    return load_package(packaged)


# Runs in a fresh interpreter: load the package, run a loop with begin(n) and two pipeline
# generations (automatic boundaries), with torch.export and torch.compile made to fail.
FRESH_PROCESS = """
import os
import sys
import torch

def forbidden(*args, **kwargs):
    raise AssertionError("a loaded package exported or compiled")

torch.export.export = torch.compile = forbidden
torch.set_num_threads(int(os.environ.get("DCFX_TEST_THREADS", "1")))  # as tests/conftest.py
from test_package import generate, loop, make_pipe
from dcfx.aot import load_package

path, call, out = sys.argv[1:]
fast = load_package(path)
x = loop(fast, torch.load(call), 7)
loop_history = fast.history
pipe = make_pipe(fast)
first, second = generate(pipe, 7), generate(pipe, 5)
torch.save(dict(
    loop=x, loop_history=loop_history, pipe=(first, second), pipe_history=fast.history[-2:],
    in_channels=fast.config.in_channels, dtype=fast.dtype, device=fast.device,
    parameters=list(__import__("inspect").signature(fast.unet.forward).parameters),
), out)
"""


@pytest.mark.subprocess
def test_fresh_process_runs_the_package_like_uncompiled_dcfx(unet, unet64, pipeline_call, packaged, tmp_path):
    torch.save(pipeline_call, tmp_path / "call.pt")
    tests = Path(__file__).parent
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(tests), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, str(packaged), str(tmp_path / "call.pt"), str(tmp_path / "out.pt")],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt")

    references = {}
    for u, call in ((unet, pipeline_call), (unet64, as_float64(pipeline_call))):
        reference = dcfx.optimize(u, interval=INTERVAL)
        reference.begin(7)
        references[u.dtype] = loop(reference, call, 7)
    assert_float32_close(got["loop"], references[torch.float32], references[torch.float64], what="loop")
    assert got["loop_history"] == ("FSSFSSF",)
    pipe = make_pipe(dcfx.optimize(unet, interval=INTERVAL))
    pipe64 = make_pipe64(dcfx.optimize(unet64, interval=INTERVAL))
    for got_pipe, steps in zip(got["pipe"], (7, 5)):
        assert_float32_close(got_pipe, generate(pipe, steps), generate(pipe64, steps, torch.float64), what=f"pipeline, {steps} steps")
    assert got["pipe_history"] == ("FSSFSSF", "FSSFS")
    assert got["in_channels"] == 4 and got["dtype"] == torch.float32 and got["device"] == torch.device("cpu")
    assert got["parameters"] == list(inspect.signature(unet.forward).parameters)


def test_another_signature_is_refused(loaded, packaged, pipeline_call):
    args, kwargs = pipeline_call
    loaded.begin(3)
    with pytest.raises(ValueError, match=r"built for one input signature: sample float32\[2, 4, 8, 8\].*"
                                         r"this call has sample float32\[1, 4, 8, 8\]"):
        loaded(args[0][:1], *args[1:], **{**kwargs, "encoder_hidden_states": kwargs["encoder_hidden_states"][:1]})
    with pytest.raises(ValueError, match="this call has .*cross_attention_kwargs"):
        loaded(*args, **{**kwargs, "cross_attention_kwargs": {"strength": 0.5}})
    with pytest.raises(ValueError, match="compiled for cpu and runs only there"):
        load_package(packaged, device="meta")


def test_one_file_with_each_weight_once(packaged, unet):
    manifest = read_manifest(packaged)
    assert manifest["config"]["interval"] == INTERVAL and manifest["layout"]["cut"]["branch"] == 0
    assert manifest["layout"]["num_cached"] == 2  # the cut feature and its group statistics (fused cut)
    assert manifest["unet"] == "UNet2DConditionModel" and manifest["unet_config"]["block_out_channels"] == [32, 64]
    assert manifest["torch"] == torch.__version__ and manifest["device"] == "cpu"
    with zipfile.ZipFile(packaged) as archive:
        infos = archive.infolist()
    models = {i.filename.split("/")[3] for i in infos if "/data/aotinductor/" in i.filename}
    assert models == {"full", "shallow"}
    weights = sum(i.file_size for i in infos if "/data/weights/" in i.filename)
    params = sum(t.numel() * t.element_size() for t in (*unet.parameters(), *unet.buffers()))
    # Once plus torch.save's per-tensor overhead; twice would be about 1.3x params (the
    # shallow graph's share of the weights).
    assert params <= weights < 1.15 * params


def test_damaged_or_foreign_files_are_refused(packaged, tmp_path):
    with pytest.raises(FileNotFoundError, match="no dcfx package"):
        load_package(tmp_path / "missing.pt2")
    text = tmp_path / "text.pt2"
    text.write_text("not a package")
    with pytest.raises(ValueError, match="not a dcfx package"):
        load_package(text)
    truncated = tmp_path / "truncated.pt2"
    data = packaged.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a dcfx package .*damaged"):
        load_package(truncated)
    with pytest.raises(ValueError, match="damaged dcfx package: .*wrapper.so fails its checksum"):
        load_package(_with_flipped_byte(packaged, tmp_path / "flipped.pt2", "wrapper.so"))
    foreign = tmp_path / "foreign.pt2"
    with zipfile.ZipFile(foreign, "w") as archive:
        archive.writestr("foreign/archive_format", "pt2")
    with pytest.raises(ValueError, match="without a dcfx manifest"):
        load_package(foreign)
    with pytest.raises(ValueError, match="format 99"):
        load_package(_with_manifest(packaged, tmp_path / "future.pt2", format=99))


def test_another_torch_version_warns(packaged, tmp_path, pipeline_call):
    other = _with_manifest(packaged, tmp_path / "other.pt2", torch="2.99.0")
    with pytest.warns(UserWarning, match="built with torch 2.99.0"):
        fast = load_package(other)
    fast.begin(1)
    args, kwargs = pipeline_call
    fast(*args, **kwargs)
    assert fast.history == ("F",)


def test_package_checks_its_arguments(unet, pipeline_call, tmp_path):
    args, kwargs = pipeline_call
    with pytest.raises(TypeError, match="expects a DeepCacheUNet"):
        package(unet, tmp_path / "x.pt2", *args, **kwargs)
    with pytest.raises(ValueError, match="must end in .pt2"):
        package(dcfx.optimize(unet), tmp_path / "x.zip", *args, **kwargs)


def test_enable_and_optimize_keep_the_packaged_graphs(packaged, unet, unet64):
    fast = load_package(packaged)
    pipe = make_pipe(fast)
    dcfx.enable(pipe, interval=2)
    reference, reference64 = make_pipe(unet), make_pipe64(unet64)
    dcfx.enable(reference, interval=2)
    dcfx.enable(reference64, interval=2)
    assert_float32_close(generate(pipe, 5), generate(reference, 5), generate(reference64, 5, torch.float64))
    assert pipe.unet.history == ("FSFSF",)
    with pytest.raises(ValueError, match="holds the graphs of branch 0"):
        dcfx.optimize(fast, branch=1)


def _with_manifest(packaged: Path, path: Path, **changes) -> Path:
    """A copy of `packaged` whose manifest has `changes`."""
    with zipfile.ZipFile(packaged) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("/extra/dcfx.json"):
                data = json.dumps({**json.loads(data), **changes}).encode()
            dst.writestr(info, data)
    return path


def _with_flipped_byte(packaged: Path, path: Path, member: str) -> Path:
    """A copy of `packaged` with one byte inverted in the middle of the first member whose name
    ends with `member` (in its data, not its zip header)."""
    data = bytearray(packaged.read_bytes())
    with zipfile.ZipFile(packaged) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(member))
    # Local header: 30 bytes, then the name and the extra field (lengths at offsets 26, 28).
    name_length, extra_length = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
    start = info.header_offset + 30 + name_length + extra_length
    data[start + info.file_size // 2] ^= 0xFF
    path.write_bytes(data)
    return path
