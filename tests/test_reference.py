"""Acceptance against the reference package: dcfx == `DeepCacheSDHelper` (DeepCache==0.1.1).

Tiny random-weight U-Nets shaped like Stable Diffusion 1.5 (cross-attention blocks) and SDXL
(`text_time` added conditioning, several transformer layers per block, linear projections),
both with 2 layers per block so that the reference's branch id (block * 3 + layer) is dcfx's
skip index. Each test runs its own sampling loop twice from the same initial latents, once
through `dcfx.optimize(...)` (uncompiled, fp32) and once through the plain U-Net patched by
`DeepCacheSDHelper`, each with a fresh scheduler, and compares the latents after every step.

The reference also runs in float64 (a float64 copy of the U-Net, the same latents), and dcfx's
float32 latents may be at most a few times as far from that run as the reference's own float32
run is (tests/_tolerance.py): what is left to absorb is summation order (dcfx's fused cut
splits the ResNet's 1x1 shortcut conv over the concatenation), which the samplers carry
forward like any other rounding. Euler and DPM-Solver step in float32 whatever the input
(diffusers upcasts and casts back), so their float64 runs are rounded to float32 once per
step: far below the U-Net's own float32 error. The schedulers use Stable Diffusion's settings
(scaled-linear betas, no clipping); DDIM's x0 prediction amplifies earlier steps' differences,
so T stays small.

So that the comparison can fail, every cached configuration is also checked to move the
trajectory away from the plain U-Net's by far more than the bound.
"""

from __future__ import annotations

import contextlib
import types

import pytest
import torch

from _tiny_unet import sample_steps
from _tolerance import as_float64, assert_float32_close, assert_float32_far, bounds_away, float64_copy
from DeepCache.extension.deepcache import DeepCacheSDHelper  # the reference (DeepCache==0.1.1)
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    UNet2DConditionModel,
)

import dcfx

# A cached run is more than FAR float32 bounds (tests/_tolerance.py) from the plain U-Net's.
FAR = 100
T = 8  # denoising steps per generation
BATCH = 2  # as with classifier-free guidance
NUM_SKIPS = 6  # conv_in + 2 levels x 2 layers + 1 downsampler
BRANCHES = range(NUM_SKIPS)
# Interval 1 (every step full) is test_caching_off_equals_plain's: any branch runs the plain U-Net.
INTERVALS = (2, 3, 5)

_SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
SCHEDULERS = {
    "ddim": lambda: DDIMScheduler(**_SD_BETAS, clip_sample=False, set_alpha_to_one=False),
    "euler": lambda: EulerDiscreteScheduler(**_SD_BETAS),
    "dpm": lambda: DPMSolverMultistepScheduler(**_SD_BETAS),
}


# Two levels of 2 layers each, as SD's blocks (3 skips per level but the last).
_COMMON = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=2,
               block_out_channels=(32, 64), cross_attention_dim=32, norm_num_groups=8)


def _sd_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        **_COMMON,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=8,
    )


def _sdxl_unet() -> UNet2DConditionModel:
    # SDXL's shape: added text/time conditioning, linear projections, deeper transformers.
    return UNet2DConditionModel(
        **_COMMON,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(4, 8),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8,
    )


@pytest.fixture(scope="module")
def models():
    """name -> (unet, conditioning kwargs, initial latents); weights and inputs seeded."""
    out = {}
    for seed, (name, build) in enumerate((("sd", _sd_unet), ("sdxl", _sdxl_unet))):
        gen = torch.Generator().manual_seed(1234 + seed)
        with torch.random.fork_rng():
            torch.manual_seed(1234 + seed)
            unet = build().eval()
        cond = {"encoder_hidden_states": torch.randn(BATCH, 7, 32, generator=gen)}
        if name == "sdxl":
            cond["added_cond_kwargs"] = {
                "text_embeds": torch.randn(BATCH, 32, generator=gen),
                "time_ids": torch.randn(BATCH, 6, generator=gen),
            }
        latents = torch.randn(BATCH, 4, 16, 16, generator=gen)
        out[name] = (unet, cond, latents)
    return out


sample = sample_steps


def fresh_scheduler(kind: str):
    sched = SCHEDULERS[kind]()
    sched.set_timesteps(T)
    return sched


def uniform_history(interval: int, steps: int = T) -> str:
    return "".join("F" if i % interval == 0 else "S" for i in range(steps))


@contextlib.contextmanager
def reference_helper(unet, scheduler, interval, branch):
    """DeepCacheSDHelper enabled on `unet` for one generation with `scheduler`."""
    pipe = types.SimpleNamespace(unet=unet, scheduler=scheduler)
    helper = DeepCacheSDHelper(pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=branch)
    helper.enable()
    try:
        yield helper
    finally:
        helper.disable()
        # disable() puts the original bound methods back as instance attributes; drop them
        # so the modules are exactly as built (the class forwards) for everything after.
        for module in unet.modules():
            module.__dict__.pop("forward", None)


_memo: dict = {}


def in_float64(models, name):
    """models[name] as a float64 copy of the U-Net with the same conditioning and latents."""
    key = ("float64", name)
    if key not in _memo:
        unet, cond, latents = models[name]
        _memo[key] = (float64_copy(unet), as_float64(cond), latents.double())
    return _memo[key]


def plain_run(models, name, kind, dtype=torch.float32):
    """The plain U-Net's latents per step, in float32 or float64."""
    key = ("plain", name, kind, dtype)
    if key not in _memo:
        unet, cond, latents = models[name] if dtype == torch.float32 else in_float64(models, name)
        _memo[key] = sample(unet, fresh_scheduler(kind), latents, cond)
    return _memo[key]


def reference_run(models, name, kind, interval, branch, dtype=torch.float32):
    """The reference helper's latents per step, in float32 or float64."""
    key = ("ref", name, kind, interval, branch, dtype)
    if key not in _memo:
        unet, cond, latents = models[name] if dtype == torch.float32 else in_float64(models, name)
        sched = fresh_scheduler(kind)
        with reference_helper(unet, sched, interval, branch):
            _memo[key] = sample(unet, sched, latents, cond)
    return _memo[key]


def check_against_reference(models, name, kind, interval, branch, generations=1, explicit=False):
    unet, cond, latents = models[name]
    ref = reference_run(models, name, kind, interval, branch)
    ref64 = reference_run(models, name, kind, interval, branch, torch.float64)
    fast = dcfx.optimize(unet, interval=interval, branch=branch)
    for g in range(generations):
        sched = fresh_scheduler(kind)
        if explicit:
            fast.begin(len(sched.timesteps))
        run = sample(fast, sched, latents, cond)
        assert_float32_close(run, ref, ref64, what=f"{name}/{kind} N={interval} b={branch} generation {g}: dcfx vs DeepCacheSDHelper")
    assert fast.history == (uniform_history(interval),) * generations
    if interval > 1:
        # The comparison means something only if caching changes the result.
        plain, plain64 = plain_run(models, name, kind), plain_run(models, name, kind, torch.float64)
        assert_float32_far(plain, ref, ref64, times=FAR, what="the reference helper did not cache anything")
        assert_float32_far(run, plain, plain64, times=FAR, what="dcfx did not cache anything")
    return fast


# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("branch", BRANCHES)
@pytest.mark.parametrize("interval", INTERVALS)
@pytest.mark.parametrize("name", ["sd", "sdxl"])
@pytest.mark.slow
def test_matches_reference_ddim_every_branch_and_interval(models, name, interval, branch):
    check_against_reference(models, name, "ddim", interval, branch)


# Every scheduler on a subset of (N, b) that puts the cut in each up block at every layer
# position: inside block 0 (b = 1, 2: after SD's cross-attention layers), at the downsampler
# (b = 3), inside block 1 (b = 4: after SDXL's 2-layer transformers) and at the mid block's
# output (b = 5). Two generations back to back; the second must not see the first one's cache
# (automatic mode for Euler: found from the timestep going up; begin(T) for DPM-Solver).
SUBSET = [(2, 0), (3, 1), (5, 2), (3, 3), (2, 4), (5, 5)]


@pytest.mark.parametrize(("interval", "branch"), SUBSET)
@pytest.mark.parametrize("kind", ["euler", "dpm"])
@pytest.mark.parametrize("name", ["sd", "sdxl"])
@pytest.mark.slow
def test_matches_reference_schedulers(models, name, kind, interval, branch):
    check_against_reference(models, name, kind, interval, branch, generations=2, explicit=(kind == "dpm"))


@pytest.mark.parametrize("kind", ["ddim", "euler", "dpm"])
@pytest.mark.parametrize("mode", ["interval1", "explicit_all_full"])
@pytest.mark.parametrize("name", ["sd", "sdxl"])
@pytest.mark.slow
def test_caching_off_equals_plain(models, name, mode, kind):
    unet, cond, latents = models[name]
    if mode == "interval1":
        fast = dcfx.optimize(unet, interval=1, branch=2)
    else:
        fast = dcfx.optimize(unet, interval=3, branch=2, schedule=tuple(range(T)))
    run = sample(fast, fresh_scheduler(kind), latents, cond)
    plain = plain_run(models, name, kind)
    # Every step is full: the exported U-Net, its own ops in their order.
    for i, (a, b) in enumerate(zip(run, plain, strict=True)):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m: f"caching off, step {i}: {m}")
    assert fast.history == ("F" * T,)


@pytest.mark.parametrize("name", ["sd", "sdxl"])
def test_reference_helper_leaves_unet_plain(models, name):
    """The reference is run on the same U-Net objects as dcfx: after disable() they must be
    plain again, or later comparisons (and dcfx's captures) would see a patched U-Net."""
    unet, cond, latents = models[name]
    before = sample(unet, fresh_scheduler("ddim"), latents, cond)
    sched = fresh_scheduler("ddim")
    pipe = types.SimpleNamespace(unet=unet, scheduler=sched)
    helper = DeepCacheSDHelper(pipe)
    helper.set_params(cache_interval=3, cache_branch_id=1)
    helper.enable()
    try:
        cached = sample(unet, sched, latents, cond)
    finally:
        helper.disable()
    after = sample(unet, fresh_scheduler("ddim"), latents, cond)
    for module in unet.modules():
        module.__dict__.pop("forward", None)
    assert_float32_far(cached, before, plain_run(models, name, "ddim", torch.float64), times=FAR, what="the helper cached")
    assert all(torch.equal(a, b) for a, b in zip(after, before))
    # And bit-identical with the class forwards restored.
    again = sample(unet, fresh_scheduler("ddim"), latents, cond)
    assert all(torch.equal(a, b) for a, b in zip(again, before))


@pytest.mark.parametrize("name", ["sd", "sdxl"])
def test_branch_range_matches_reference_numbering(models, name):
    """Both models have exactly NUM_SKIPS skips: dcfx rejects branch NUM_SKIPS."""
    unet, cond, latents = models[name]
    fast = dcfx.optimize(unet, interval=2, branch=NUM_SKIPS)
    t = fresh_scheduler("ddim").timesteps[0]
    with pytest.raises(ValueError, match="out of range"):
        with torch.no_grad():
            fast(latents, t, **cond)


def test_dcfx_tracks_reference_not_plain_on_every_shallow_step(models):
    """Shallow steps diverge from the plain U-Net right away, and dcfx follows the reference
    there, not the plain U-Net: per step, its distance to the reference is far below its
    distance to the plain trajectory."""
    unet, cond, latents = models["sd"]
    interval, branch = 3, 1
    ref = reference_run(models, "sd", "ddim", interval, branch)
    ref64 = reference_run(models, "sd", "ddim", interval, branch, torch.float64)
    plain, plain64 = plain_run(models, "sd", "ddim"), plain_run(models, "sd", "ddim", torch.float64)
    run = sample(dcfx.optimize(unet, interval=interval, branch=branch), fresh_scheduler("ddim"), latents, cond)
    torch.testing.assert_close(run[0], plain[0], rtol=0, atol=0)  # step 0 is full: the U-Net's own ops
    assert_float32_close(run, ref, ref64, what="dcfx vs the reference")
    away = bounds_away(run, plain, plain64)
    for i in range(1, T):
        assert away[i] > FAR, f"step {i} looks uncached: {away[i]:.3g} float32 bounds from the plain U-Net"
