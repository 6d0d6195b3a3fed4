"""The embedded digits model: it loads, it draws the asked digits, and dcfx on it equals the
reference DeepCache step by step. The `dcfx demo` command: test_cli.py.
"""

from __future__ import annotations

import contextlib
import shutil
import types

import pytest
import torch
from DeepCache.extension.deepcache import DeepCacheSDHelper  # the reference (DeepCache==0.1.1)
from _tolerance import assert_float32_close, assert_float32_far, float64_copy
from diffusers import DDIMScheduler, EulerDiscreteScheduler

import dcfx
from dcfx.models import digits, load_pipeline
from dcfx.models.digits import WEIGHTS_DIR, training_record
from dcfx.models.quality import psnr

LABELS = torch.arange(20) % 10
GUIDANCE = 1.5
MIN_ACCURACY = 0.6  # chance is 0.1
# N=3, b=0 against plain sampling from the same noise, 10 DDIM steps (see docs/digits-model.md for
# 50 steps: higher); a randomly initialised model lands near 10 dB.
MIN_PSNR_N3 = 20.0


@pytest.fixture(scope="module")
def pipe():
    p = digits()
    p.set_progress_bar_config(disable=True)
    return p


def _noise(seed: int = 0) -> torch.Tensor:
    return torch.randn(len(LABELS), 1, 16, 16, generator=torch.Generator().manual_seed(seed))


def _images(pipe, steps: int = 10, **kwargs) -> torch.Tensor:
    return pipe(LABELS, num_inference_steps=steps, guidance_scale=GUIDANCE, latents=_noise(), output_type="pt", **kwargs).images


def test_weights_ship_in_the_package_and_are_small():
    files = list(WEIGHTS_DIR.rglob("*.safetensors"))
    assert files and sum(f.stat().st_size for f in files) <= 20 * 2**20
    record = training_record()
    assert record["steps"] > 0 and record["seed"] == 0


@pytest.mark.trained
def test_ten_step_samples_are_the_asked_digits(pipe, digits_judge):
    images = _images(pipe)
    assert images.shape == (20, 1, 16, 16) and 0 <= images.min() and images.max() <= 1
    assert digits_judge.test_accuracy > 0.9  # the judge itself is trustworthy
    assert digits_judge.accuracy(images, LABELS) >= MIN_ACCURACY


@pytest.mark.trained
def test_pipeline_is_deterministic_and_takes_other_schedulers(pipe):
    a = pipe([1, 2], num_inference_steps=4, generator=torch.Generator().manual_seed(3), output_type="pt").images
    b = pipe([1, 2], num_inference_steps=4, generator=torch.Generator().manual_seed(3), output_type="pt").images
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    euler = load_pipeline(WEIGHTS_DIR, scheduler=EulerDiscreteScheduler.from_config(pipe.scheduler.config))
    euler.set_progress_bar_config(disable=True)
    pil = euler(3, num_inference_steps=4).images
    assert len(pil) == 1 and pil[0].size == (16, 16)


@pytest.mark.trained
def test_dcfx_enable_keeps_quality(pipe, digits_judge):
    plain = _images(pipe)
    dcfx.enable(pipe, interval=3, branch=0)
    try:
        cached = _images(pipe)
        history = pipe.unet.history
    finally:
        dcfx.disable(pipe)
    assert history[-1] == "FSSFSSFSSF"
    assert (cached - plain).abs().max() > 1e-3  # caching did something: a quarter of an 8-bit level
    assert psnr(cached, plain) >= MIN_PSNR_N3
    assert digits_judge.accuracy(cached, LABELS) >= MIN_ACCURACY


def _cfg_steps(unet, scheduler, latents, cond, scale) -> list[torch.Tensor]:
    """SD's sampling loop (CFG batch 2, timestep positional as the reference needs)."""
    x, out = latents, []
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps_u, eps_c = unet(torch.cat([x] * 2), t, encoder_hidden_states=cond).sample.chunk(2)
            x = scheduler.step(eps_u + scale * (eps_c - eps_u), t, x).prev_sample
            out.append(x.clone())
    return out


@contextlib.contextmanager
def _reference(unet, scheduler, interval, branch):
    helper = DeepCacheSDHelper(types.SimpleNamespace(unet=unet, scheduler=scheduler))
    helper.set_params(cache_interval=interval, cache_branch_id=branch)
    helper.enable()
    try:
        yield
    finally:
        helper.disable()
        for module in unet.modules():
            module.__dict__.pop("forward", None)


@pytest.mark.trained
@pytest.mark.parametrize("interval,branch", [(3, 0), (5, 2)])
def test_dcfx_equals_reference_step_by_step_on_the_trained_model(pipe, interval, branch):
    labels = torch.tensor([0, 4, 7, 9])
    emb = pipe.label_embedding
    with torch.no_grad():
        cond = torch.cat([emb(torch.full_like(labels, emb.null_label)), emb(labels)])
    latents = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(1))

    def scheduler():
        s = DDIMScheduler.from_config(pipe.scheduler.config)
        s.set_timesteps(12)
        return s

    plain = _cfg_steps(pipe.unet, scheduler(), latents, cond, GUIDANCE)

    def reference(unet, latents, cond):
        ref_sched = scheduler()
        with _reference(unet, ref_sched, interval, branch):
            return _cfg_steps(unet, ref_sched, latents, cond, GUIDANCE)

    ref, ref64 = reference(pipe.unet, latents, cond), reference(float64_copy(pipe.unet), latents.double(), cond.double())
    ours = _cfg_steps(dcfx.optimize(pipe.unet, interval=interval, branch=branch), scheduler(), latents, cond, GUIDANCE)
    assert_float32_close(ours, ref, ref64, what="dcfx vs the reference")
    assert_float32_far(plain, ref, ref64, times=100, what="the reference did cache")


# -- bad input --------------------------------------------------------------------------------


def test_unknown_labels_name_the_valid_classes(pipe):
    for bad in (10, [3, -1], 2.5, []):
        with pytest.raises(ValueError, match=r"0\.\.9"):
            pipe(bad, num_inference_steps=2)


def test_missing_or_corrupt_weights_say_what_was_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="unet/diffusion_pytorch_model.safetensors"):
        load_pipeline(tmp_path)
    shutil.copytree(WEIGHTS_DIR, tmp_path / "m")
    (tmp_path / "m" / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="could not be loaded"):
        load_pipeline(tmp_path / "m")


# -- the one loader and the one example call ---------------------------------------------------


def test_one_loader_takes_the_digits_model_and_pipeline_or_unet_folders(tmp_path):
    from diffusers import UNet2DConditionModel

    from dcfx.models import DigitsPipeline, describe, load, model_kind

    assert model_kind(None) == model_kind("digits") == "digits" and describe(None) == "the digits model"
    assert isinstance(load(), DigitsPipeline)
    unet = load(None, unet=True, dtype=torch.float64)
    assert isinstance(unet, UNet2DConditionModel) and not unet.training and unet.dtype == torch.float64
    assert load("digits", meta=True).device.type == "meta"
    folder = tmp_path / "pipe"
    shutil.copytree(WEIGHTS_DIR, folder)  # a digits model folder, as train_digits writes it
    assert model_kind(folder) == "digits" and describe(folder) == f"the digits model in {folder}"
    unet.save_pretrained(tmp_path / "only")
    assert model_kind(tmp_path / "only") == "unet" and describe(tmp_path / "only") == f"UNet2DConditionModel from {tmp_path / 'only'}"
    assert isinstance(load(tmp_path / "only"), UNet2DConditionModel)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="is not a diffusers U-Net or pipeline folder"):
        model_kind(tmp_path / "empty")


def test_the_loader_takes_the_flux_digits_model(tmp_path):
    from diffusers import FluxTransformer2DModel

    from dcfx.models import describe, load, model_kind
    from dcfx.models.flux_digits import WEIGHTS_DIR as FLUX_WEIGHTS_DIR
    from dcfx.models.flux_digits import FluxDigitsPipeline
    from dcfx.models.loader import conditioning_tokens

    assert model_kind("flux-digits") == "flux-digits" and describe("flux-digits") == "the Flux digits model"
    assert isinstance(load("flux-digits"), FluxDigitsPipeline) and conditioning_tokens("flux-digits") == 4
    assert isinstance(load("flux-digits", unet=True), FluxTransformer2DModel)
    assert load("flux-digits", meta=True).device.type == "meta"
    folder = tmp_path / "flux"
    shutil.copytree(FLUX_WEIGHTS_DIR, folder)
    assert model_kind(folder) == "flux-digits" and describe(folder) == f"the Flux digits model in {folder}"
    assert isinstance(load(folder, unet=True), FluxTransformer2DModel)


def test_example_call_of_a_flux_transformer_is_fluxpipelines():
    from dcfx.models import example_call, load

    model = load("flux-digits", meta=True)
    call = example_call(model, 2, tokens=4)
    assert not call.guided and len(call.args) == 1 and call.args[0].shape == (2, 64, 4)  # 8x8 tokens of 2x2 patches
    assert call.kwargs["timestep"].shape == (2,) and call.kwargs["img_ids"].shape == (64, 3)
    assert model(*call.args, **call.kwargs).sample.shape == (2, 64, 4)
    with pytest.raises(ValueError, match="resolution must be even"):
        example_call(model, 1, 15)


def test_example_call_is_a_valid_call_of_the_unet():
    from dcfx.models import example_call, load

    unet = load(meta=True)
    call = example_call(unet, 3)
    assert call.guided and call.args[0].shape == (6, 1, 16, 16) and call.args[0].device.type == "meta"
    assert call.kwargs["encoder_hidden_states"].shape == (6, 77, unet.config.cross_attention_dim)
    assert unet(*call.args, **call.kwargs).sample.shape == (6, 1, 16, 16)
    unguided = example_call(unet, 2, 8, guided=False, tokens=4, device="cpu")
    assert unguided.args[0].shape == (2, 1, 8, 8) and unguided.kwargs["encoder_hidden_states"].shape[1] == 4
