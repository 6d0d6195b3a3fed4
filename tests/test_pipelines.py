"""Acceptance: dcfx in diffusers pipelines built from tiny random components.

StableDiffusionPipeline and StableDiffusionImg2ImgPipeline without text encoder or tokenizer
(prompt_embeds are passed in), classifier-free guidance (U-Net batch 2), latent output.
Consecutive generations with other step counts and strengths must each follow the schedule
from their own step 0, in automatic mode (`pipe.unet = dcfx.optimize(...)`, boundaries from
the timesteps) and with `dcfx.enable(pipe, ...)` (boundaries from the scheduler, no timestep
read back). Every generation's latents are also compared with the same pipeline run on the
plain U-Net with DeepCache done by hand (`ManualDeepCache.replay`) on the expected steps, run
in float32 and in float64 (float64 copies of the components, the same noise): dcfx's float32
latents against that float64 run, as tests/_tolerance.py says.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2DiscreteScheduler,
    PNDMScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
)

import dcfx
from dcfx import DeepCacheUNet
from _tiny_unet import (
    LATENT, ManualDeepCache, float32_noise, pattern_of, prompt_embeds, tiny_pipe, tiny_unet, tiny_vae, uniform,
)
from _tolerance import as_float64, assert_float32_close, assert_float32_far, float64_copy

SCHEDULERS = {
    "ddim": lambda: DDIMScheduler(steps_offset=1, clip_sample=False),
    # PRK warm-up: after the first, timesteps come in pairs (901, 851, 851, 801, 801, ...)
    "pndm": lambda: PNDMScheduler(steps_offset=1, skip_prk_steps=False),
    "heun": lambda: HeunDiscreteScheduler(steps_offset=1),  # 2 U-Net calls per step
    "kdpm2": lambda: KDPM2DiscreteScheduler(steps_offset=1),  # 2 U-Net calls per step
    "euler": lambda: EulerDiscreteScheduler(steps_offset=1),
}
MODES = ["auto", "enable"]
GUIDANCE = 3.0
# Caching moves a pipeline's latents by more than FAR float32 bounds from the plain pipeline's.
FAR = 100


@pytest.fixture(scope="module")
def components():
    return dict(unet=tiny_unet(seed=0), vae=tiny_vae(seed=1))


@pytest.fixture(scope="module")
def components64(components):
    return {name: float64_copy(module) for name, module in components.items()}


@pytest.fixture(scope="module")
def embeds():
    return prompt_embeds(seed=0)


@pytest.fixture(scope="module")
def image():
    g = torch.Generator().manual_seed(1)
    return torch.rand(1, 3, LATENT, LATENT, generator=g) * 2 - 1  # RGB in [-1, 1]; vae_scale_factor is 1


def make_pipe(components, scheduler: str, cls=StableDiffusionPipeline):
    return tiny_pipe(components["unet"], SCHEDULERS[scheduler](), vae=components["vae"], cls=cls)


def img2img_of(pipe):
    i2i = StableDiffusionImg2ImgPipeline(**pipe.components)  # same U-Net and scheduler objects
    i2i.set_progress_bar_config(disable=True)
    return i2i


def generate(pipe, embeds, steps, image=None, strength=None, seed=0):
    prompt, negative = embeds
    kwargs = dict(
        prompt_embeds=prompt,
        negative_prompt_embeds=negative,
        num_inference_steps=steps,
        guidance_scale=GUIDANCE,
        output_type="latent",
        generator=torch.Generator().manual_seed(seed),
    )
    if image is None:
        kwargs.update(height=LATENT, width=LATENT)
    else:
        kwargs.update(image=image, strength=strength)
    with torch.no_grad():
        return pipe(**kwargs).images


def generate64(pipe, embeds, steps, image=None, strength=None, seed=0):
    """`generate` on a pipeline of float64 components: float64 embeddings and image, and the
    float32 run's noise."""
    with float32_noise():
        return generate(pipe, as_float64(embeds), steps, None if image is None else image.double(), strength, seed)


def by_hand(components, components64, pattern, make, embeds, *args, **kwargs):
    """The latents of `make(parts)`'s pipeline with DeepCache done by hand on `pattern`
    (`ManualDeepCache.replay`), run on float32 and on float64 components."""
    out = []
    for parts, run in ((components, generate), (components64, generate64)):
        with ManualDeepCache(parts["unet"], 0).replay(pattern):
            out.append(run(make(parts), embeds, *args, **kwargs))
    return out


def calls_txt2img(scheduler: str, steps: int) -> int:
    """U-Net calls of a txt2img generation: one per scheduler timestep."""
    s = SCHEDULERS[scheduler]()
    s.set_timesteps(steps)
    return len(s.timesteps)


def calls_img2img(scheduler: str, steps: int, strength: float) -> int:
    """U-Net calls of an img2img generation (diffusers' get_timesteps)."""
    s = SCHEDULERS[scheduler]()
    s.set_timesteps(steps)
    t_start = max(steps - min(int(steps * strength), steps), 0)
    return len(s.timesteps) - t_start * s.order


def install(pipe, mode, monkeypatch, **options):
    """DeepCache on `pipe` in automatic or scheduler-driven mode."""
    if mode == "auto":
        pipe.unet = dcfx.optimize(pipe.unet, **options)
        return pipe.unet

    # dcfx.enable must never read a timestep back from the device
    def no_reads(call):
        raise AssertionError("dcfx.enable read a timestep")

    monkeypatch.setattr(dcfx.runtime.steps, "host_timestep", no_reads)
    return dcfx.enable(pipe, **options)


def test_expected_call_counts():
    # The step counts the schedules below are built on (two calls per step for Heun/KDPM2).
    assert [calls_txt2img(s, 5) for s in ("ddim", "pndm", "heun", "kdpm2")] == [5, 14, 9, 9]
    assert [calls_img2img(s, 10, 0.6) for s in ("ddim", "pndm", "heun", "kdpm2")] == [6, 15, 11, 11]


# (kind, steps, strength) of consecutive generations on one pipeline's U-Net; img2img starts at
# steps 4 and 2 of the scheduler's timesteps, so its first call is not the schedule's first
GENERATIONS = [("txt2img", 5, None), ("txt2img", 4, None), ("img2img", 10, 0.6), ("img2img", 10, 0.8)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("scheduler", ["ddim", "pndm", "heun", "kdpm2"])
@pytest.mark.slow
def test_consecutive_generations_follow_the_schedule(components, components64, embeds, image, scheduler, mode, monkeypatch):
    interval = 3
    pipe = make_pipe(components, scheduler)
    fast = install(pipe, mode, monkeypatch, interval=interval, branch=0)
    i2i = img2img_of(pipe)
    expected = []
    for kind, steps, strength in GENERATIONS:
        if kind == "txt2img":
            pattern = uniform(calls_txt2img(scheduler, steps), interval)
            args = (steps,)
            out = generate(pipe, embeds, *args)
            make = lambda parts: make_pipe(parts, scheduler)  # noqa: E731 - plain U-Net, own scheduler
        else:
            pattern = uniform(calls_img2img(scheduler, steps, strength), interval)
            args = (steps, image, strength)
            out = generate(i2i, embeds, *args)
            make = lambda parts: img2img_of(make_pipe(parts, scheduler))  # noqa: E731
        ref, ref64 = by_hand(components, components64, pattern, make, embeds, *args)
        expected.append(pattern)
        assert fast.history == tuple(expected)
        assert_float32_close(out, ref, ref64, what=f"{kind} {steps} steps")
    assert pipe.unet is fast and i2i.unet is fast


@pytest.mark.parametrize("mode", MODES)
def test_pndm_img2img_starting_on_a_repeated_timestep(components, embeds, image, mode, monkeypatch):
    # strength 0.5 and 0.7 of 10 steps start at index 5 and 3 of the timesteps, i.e. on the first
    # of a repeated pair: (751, 751, 701, ...) and (801, 801, 751, ...)
    pipe = make_pipe(components, "pndm", StableDiffusionImg2ImgPipeline)
    fast = install(pipe, mode, monkeypatch, interval=3)
    expected = []
    for strength in (0.5, 0.7):
        generate(pipe, embeds, 10, image, strength)
        expected.append(uniform(calls_img2img("pndm", 10, strength), 3))
    assert expected == ["FSSFSSFSSFSSFS", "FSSFSSFSSFSSFSSF"]
    if mode == "auto":
        # Without the scheduler, a repeat of step 0's timestep at step 1 may be a new one-step
        # generation: it runs full (right either way) and the schedule goes on from step 2.
        expected = ["FF" + pattern[2:] for pattern in expected]
    assert fast.history == tuple(expected)


@pytest.mark.parametrize("scheduler, steps", [("ddim", (20, 14)), ("heun", (8, 6))])
def test_nonuniform_schedule_with_enable(components, components64, embeds, scheduler, steps, monkeypatch):
    pipe = make_pipe(components, scheduler)
    fast = install(pipe, "enable", monkeypatch, interval=3, schedule="nonuniform", center=8)
    expected = []
    for n in steps:
        calls = calls_txt2img(scheduler, n)
        pattern = pattern_of(dcfx.nonuniform_full_steps(calls, 3, center=8), calls)
        assert pattern == pattern_of(fast.full_steps(calls), calls)
        expected.append(pattern)
        out = generate(pipe, embeds, n)
        ref, ref64 = by_hand(components, components64, pattern, lambda parts: make_pipe(parts, scheduler), embeds, n)
        assert_float32_close(out, ref, ref64, what=f"{n} steps")
    assert fast.history == tuple(expected)
    assert expected[0] == {"ddim": "FSSFSSFSFSFSSFSSFSSS", "heun": "FSSSFSSFSFSFSSS"}[scheduler]


@pytest.mark.parametrize(
    "scheduler",
    [
        "heun",
        "euler",
        "ddim",
    ],
)
def test_nonuniform_img2img_with_enable(components, embeds, image, scheduler, monkeypatch):
    pipe = make_pipe(components, scheduler, StableDiffusionImg2ImgPipeline)
    fast = install(pipe, "enable", monkeypatch, interval=3, schedule="nonuniform", center=8)
    generate(pipe, embeds, 20, image, 0.6)
    calls = calls_img2img(scheduler, 20, 0.6)
    assert fast.history == (pattern_of(dcfx.nonuniform_full_steps(calls, 3, center=8), calls),)


def test_img2img_after_an_interrupted_generation_with_enable(components, components64, embeds, image):
    # An aborted txt2img stops at a high timestep; the img2img that follows starts lower, which
    # automatic mode would take for the same generation going on. The scheduler knows better.
    pipe = make_pipe(components, "ddim")
    fast = dcfx.enable(pipe, interval=3)
    i2i = img2img_of(pipe)

    def stop_after_3(p, i, t, kwargs):
        if i == 2:
            p._interrupt = True
        return kwargs

    prompt, negative = embeds
    with torch.no_grad():
        pipe(prompt_embeds=prompt, negative_prompt_embeds=negative, num_inference_steps=10,
             guidance_scale=3.0, output_type="latent", height=LATENT, width=LATENT,
             generator=torch.Generator().manual_seed(0), callback_on_step_end=stop_after_3)
    out = generate(i2i, embeds, 10, image, 0.3)
    expected = by_hand(components, components64, "FSS", lambda parts: img2img_of(make_pipe(parts, "ddim")), embeds, 10, image, 0.3)
    assert_float32_close(out, *expected)
    assert fast.history == ("FSS", "FSS")
    dcfx.disable(pipe)


def test_enable_leftover_plan_never_reuses_a_stale_cache(components, components64, embeds, image):
    pipe = make_pipe(components, "ddim", StableDiffusionImg2ImgPipeline)
    dcfx.enable(pipe, interval=3)
    generate(pipe, embeds, 10, image, 0.5)  # 5 calls
    pipe.scheduler = SCHEDULERS["ddim"]()  # e.g. a scheduler swapped in after enable
    out = generate(pipe, embeds, 10, image, 0.5, seed=1)
    expected = by_hand(components, components64, "FSSFS", lambda parts: make_pipe(parts, "ddim", StableDiffusionImg2ImgPipeline),
                       embeds, 10, image, 0.5, seed=1)
    assert_float32_close(out, *expected)
    assert pipe.unet.history == ("FSSFS", "FSSFS")


@pytest.mark.parametrize("kind", ["txt2img", "img2img"])
def test_outputs_against_the_plain_pipeline(components, components64, embeds, image, kind):
    cls = StableDiffusionPipeline if kind == "txt2img" else StableDiffusionImg2ImgPipeline
    args = (6,) if kind == "txt2img" else (10, image, 0.7)
    pipe = make_pipe(components, "ddim", cls)
    plain = generate(pipe, embeds, *args)
    pipe.unet = dcfx.optimize(components["unet"], interval=1)
    # Every step full: the exported U-Net runs its own ops in their order, bit for bit.
    torch.testing.assert_close(generate(pipe, embeds, *args), plain, rtol=0, atol=0)
    calls = 6 if kind == "txt2img" else 7  # img2img: 10 steps from step 3
    assert pipe.unet.history == ("F" * calls,)
    pipe.unet = dcfx.optimize(components["unet"], interval=3, branch=1)
    cached = generate(pipe, embeds, *args)
    assert pipe.unet.history == (uniform(calls, 3),)
    plain64 = generate64(make_pipe(components64, "ddim", cls), embeds, *args)
    assert_float32_far(cached, plain, plain64, times=FAR, what="caching changes the result (the test can fail)")
    dcfx.disable(pipe)
    torch.testing.assert_close(generate(pipe, embeds, *args), plain, rtol=0, atol=0)


def test_enable_without_caching_equals_plain(components, embeds):
    pipe = make_pipe(components, "heun")
    plain = generate(pipe, embeds, 4)
    dcfx.enable(pipe, interval=1)
    torch.testing.assert_close(generate(pipe, embeds, 4), plain, rtol=0, atol=0)  # every step full: bit for bit
    assert pipe.unet.history == ("F" * 7,)


def test_unet_attributes_fall_through(components):
    unet = components["unet"]
    pipe = make_pipe(components, "ddim")
    pipe.unet = dcfx.optimize(unet, interval=2)
    assert isinstance(pipe.unet, DeepCacheUNet) and pipe.unet.unet is unet
    assert pipe.unet.config is unet.config
    assert pipe.unet.config.in_channels == 4 and pipe.unet.config.sample_size == LATENT
    assert pipe.unet.dtype == torch.float32 and pipe.unet.device == torch.device("cpu")
    assert pipe.unet.conv_in is unet.conv_in and pipe.unet.encoder_hid_proj is None
    assert pipe.unet.attn_processors.keys() == unet.attn_processors.keys()
    assert pipe.unet.deepcache_config.interval == 2
    assert pipe._execution_device == torch.device("cpu")
    with pytest.raises(AttributeError):
        pipe.unet.no_such_attribute


def test_disable_restores_unet_and_scheduler(components, embeds):
    unet = components["unet"]
    pipe = make_pipe(components, "heun")
    scheduler = pipe.scheduler
    cls = type(scheduler)
    plain = generate(pipe, embeds, 3)

    fast = dcfx.enable(pipe, interval=2)
    assert pipe.unet is fast and fast.unet is unet
    assert isinstance(scheduler, cls) and type(scheduler) is not cls
    assert type(scheduler).__name__ == cls.__name__  # what configs and reprs show
    fast2 = dcfx.enable(pipe, interval=3)  # again: replaces, does not stack
    assert fast2.unet is unet and pipe.unet is fast2
    assert type(scheduler).__bases__ == (cls,)
    generate(pipe, embeds, 3)
    assert fast2.history == (uniform(5, 3),)

    assert dcfx.disable(pipe) is unet
    assert pipe.unet is unet
    assert type(scheduler) is cls
    assert "set_timesteps" not in vars(scheduler) and "set_begin_index" not in vars(scheduler)
    torch.testing.assert_close(generate(pipe, embeds, 3), plain, rtol=0, atol=0)
    assert fast2.history == (uniform(5, 3),)  # no longer called
    assert dcfx.disable(pipe) is unet  # a second disable is a no-op

    pipe.unet = dcfx.optimize(unet, interval=2)  # optimize without enable: disable undoes it too
    assert dcfx.disable(pipe) is unet and pipe.unet is unet


def test_two_pipelines_sharing_a_scheduler_each_keep_their_boundaries(components, embeds):
    pipe = make_pipe(components, "ddim")
    i2i = img2img_of(pipe)  # shares the U-Net and the scheduler object
    fast = dcfx.enable(pipe, interval=3)
    generate(pipe, embeds, 5)
    dcfx.enable(i2i, interval=3)  # must not unhook the scheduler for `pipe`
    generate(pipe, embeds, 4, seed=1)
    generate(pipe, embeds, 5, seed=2)
    assert fast.history == ("FSSFS", "FSSF", "FSSFS")
    dcfx.disable(i2i)  # nor must this
    generate(pipe, embeds, 4, seed=3)
    assert fast.history[-1] == "FSSF"


def test_calls_past_the_announced_generation_start_a_new_one(components, embeds):
    pipe = make_pipe(components, "ddim")
    fast = dcfx.enable(pipe, interval=3)
    generate(pipe, embeds, 5)
    # The user's own loop after the pipeline: its first call must not reuse the cache.
    unet = components["unet"]
    x = torch.randn(2, 4, 8, 8)
    e = torch.cat([embeds[0], embeds[0]])
    with torch.no_grad():
        out = fast(x, 500, encoder_hidden_states=e).sample
        expected = unet(x, 500, encoder_hidden_states=e).sample
    torch.testing.assert_close(out, expected, rtol=0, atol=0)  # a full step: the U-Net's own ops
    assert fast.history[-2:] == ("FSSFS", "F")


def test_hooked_scheduler_copies_and_pickles_as_a_plain_one(components):
    import copy
    import pickle

    pipe = make_pipe(components, "ddim")
    cls = type(pipe.scheduler)
    dcfx.enable(pipe, interval=3)
    pipe.scheduler.set_timesteps(5)
    for clone in (copy.deepcopy(pipe.scheduler), pickle.loads(pickle.dumps(pipe.scheduler))):
        assert type(clone) is cls
        clone.set_timesteps(7)
        assert len(clone.timesteps) == 7 and len(pipe.scheduler.timesteps) == 5
