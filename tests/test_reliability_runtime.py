"""Around the happy path (issue 7): separate guidance calls per step, threads, moving the
model away and back, interrupted generations, pickling.

Split guidance is checked against the reference helper (DeepCache==0.1.1) run on the batched
form of the same loop: a batched call caches one feature per batch element, which is what the
separate uncond and cond calls must get. Everything else compares dcfx with dcfx run serially,
before the change of state, or through the batched loop.
"""

from __future__ import annotations

import copy
import io
import pickle
import re
import threading

import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler, PNDMScheduler

import dcfx
from dcfx import DeepCacheUNet
from _tiny_unet import CROSS_DIM, LATENT, TOKENS, ReferenceDeepCache, tiny_unet, uniform
from _tolerance import as_float64, assert_float32_close, assert_float32_far, float64_copy
from test_pipelines import by_hand, components, components64, embeds, generate, image, img2img_of, make_pipe  # noqa: F401 (fixtures)
from test_reference import _SD_BETAS, _sd_unet, reference_helper

T = 8  # steps per generation
GUIDANCE = 5.0
# Float32 against float64 (tests/_tolerance.py); caching moves the latents by more than FAR
# such bounds from the plain U-Net's.
FAR = 100


class LoopPipe:
    """Just what `dcfx.enable` needs: a U-Net and a scheduler."""

    def __init__(self, unet, scheduler):
        self.unet, self.scheduler = unet, scheduler


def no_host_reads(monkeypatch):
    def refuse(call):
        raise AssertionError("read a timestep on the host")

    monkeypatch.setattr(dcfx.runtime.steps, "host_timestep", refuse)


def cfg_loop(unet, scheduler, latents, uncond, cond, split: bool, rescale: bool = False) -> list[torch.Tensor]:
    """Guidance as two calls per step (`split`) or one batched call; the latents of every step.

    `rescale` makes each of the two calls' sample a new (equal) tensor.
    """
    lat = latents * scheduler.init_noise_sigma
    steps = []
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.scale_model_input(lat, t)
            if split:
                eps_u = unet(x, t, encoder_hidden_states=uncond).sample
                x2 = scheduler.scale_model_input(lat, t) if rescale else x
                eps_c = unet(x2, t, encoder_hidden_states=cond).sample
            else:
                both = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample
                eps_u, eps_c = both.chunk(2)
            lat = scheduler.step(eps_u + GUIDANCE * (eps_c - eps_u), t, lat).prev_sample
            steps.append(lat.clone())
    return steps


# -- 1. separate guidance calls --------------------------------------------------------------


@pytest.fixture(scope="module")
def sd():
    """An SD-shaped U-Net with 2 layers per block (the reference's branch ids are dcfx's)."""
    with torch.random.fork_rng():
        torch.manual_seed(7)
        unet = _sd_unet().eval()
    g = torch.Generator().manual_seed(8)
    uncond, cond = torch.randn(1, 7, 32, generator=g), torch.randn(1, 7, 32, generator=g)
    return unet, torch.randn(1, 4, 16, 16, generator=g), uncond, cond


@pytest.fixture(scope="module")
def sd64(sd):
    unet, *tensors = sd
    return float64_copy(unet), *as_float64(tensors)


SCHEDULERS = {
    "ddim": lambda: DDIMScheduler(**_SD_BETAS, clip_sample=False, set_alpha_to_one=False),
    "euler": lambda: EulerDiscreteScheduler(**_SD_BETAS),
}


def scheduler_of(kind: str):
    s = SCHEDULERS[kind]()
    s.set_timesteps(T)
    return s


@pytest.mark.parametrize("mode", ["auto", "auto_equal_samples", "explicit", "enable"])
@pytest.mark.parametrize(("kind", "interval", "branch"), [("ddim", 3, 1), ("euler", 2, 0)])
def test_separate_guidance_calls_match_the_reference(sd, sd64, kind, interval, branch, mode, monkeypatch):
    unet, latents, uncond, cond = sd
    sched = scheduler_of(kind)
    with reference_helper(unet, sched, interval, branch):
        ref = cfg_loop(unet, sched, latents, uncond, cond, split=False)
    unet64, latents64, uncond64, cond64 = sd64
    sched = scheduler_of(kind)
    with reference_helper(unet64, sched, interval, branch):
        ref64 = cfg_loop(unet64, sched, latents64, uncond64, cond64, split=False)
    plain = cfg_loop(unet, scheduler_of(kind), latents, uncond, cond, split=False)

    if mode == "enable":
        pipe = LoopPipe(unet, SCHEDULERS[kind]())
        fast = dcfx.enable(pipe, interval=interval, branch=branch)
        no_host_reads(monkeypatch)
        sched = pipe.scheduler
        sched.set_timesteps(T)  # announces the generation
    else:
        fast = dcfx.optimize(unet, interval=interval, branch=branch)
        sched = scheduler_of(kind)
        if mode == "explicit":
            no_host_reads(monkeypatch)
            fast.begin(T)
    run = cfg_loop(fast, sched, latents, uncond, cond, split=True, rescale=(mode == "auto_equal_samples"))

    assert fast.history == (uniform(T, interval),)  # decided per step, not per call
    assert_float32_close(run, ref, ref64, what="split guidance vs the reference")
    assert_float32_far(plain, ref, ref64, times=FAR, what="plain vs the reference")  # caching changed the result: the check can fail


@pytest.fixture(scope="module")
def tiny():
    g = torch.Generator().manual_seed(3)
    uncond, cond = torch.randn(1, TOKENS, CROSS_DIM, generator=g), torch.randn(1, TOKENS, CROSS_DIM, generator=g)
    return tiny_unet(seed=0), torch.randn(1, 4, LATENT, LATENT, generator=g), uncond, cond


@pytest.fixture(scope="module")
def tiny64(tiny):
    unet, *tensors = tiny
    return float64_copy(unet), *as_float64(tensors)


TWO_CALL_SCHEDULERS = {
    "heun": lambda: HeunDiscreteScheduler(steps_offset=1),  # two calls per step, repeated timesteps
    "pndm": lambda: PNDMScheduler(steps_offset=1, skip_prk_steps=False),  # PRK: timesteps come in pairs
}


@pytest.mark.parametrize("mode", ["auto", "enable"])
@pytest.mark.parametrize("kind", list(TWO_CALL_SCHEDULERS))
def test_separate_guidance_calls_with_repeating_schedulers_equal_batched(tiny, tiny64, kind, mode, monkeypatch):
    """Heun/PNDM repeat a timestep with a new sample: those calls stay separate steps, and
    split guidance on top of them gives what the batched call gives."""
    unet, latents, uncond, cond = tiny
    runs, histories = [], []
    sched = TWO_CALL_SCHEDULERS[kind]()
    sched.set_timesteps(4)
    unet64, *inputs64 = tiny64
    batched64 = cfg_loop(dcfx.optimize(unet64, interval=3, branch=1), sched, *inputs64, split=False)  # the batched calls
    for split in (False, True):
        if mode == "enable":
            pipe = LoopPipe(unet, TWO_CALL_SCHEDULERS[kind]())
            fast = dcfx.enable(pipe, interval=3, branch=1)
            sched = pipe.scheduler
            with monkeypatch.context() as m:
                no_host_reads(m)
                sched.set_timesteps(4)
                runs.append(cfg_loop(fast, sched, latents, uncond, cond, split))
        else:
            fast = dcfx.optimize(unet, interval=3, branch=1)
            sched = TWO_CALL_SCHEDULERS[kind]()
            sched.set_timesteps(4)
            runs.append(cfg_loop(fast, sched, latents, uncond, cond, split))
        histories.append(fast.history)
    batched, split = runs
    calls = len(sched.timesteps)
    assert histories == [(uniform(calls, 3),)] * 2
    assert_float32_close(split, batched, batched64, what="split against batched")


def test_step_rule(tiny):
    """What makes a call join the current step, and what starts the next one."""
    unet, x, uncond, cond = tiny
    fast = dcfx.optimize(unet, interval=2)
    oracle = ReferenceDeepCache(unet, 0)  # one cache per batch shape: run slots in separate oracles
    other = ReferenceDeepCache(unet, 0)

    def call(sample, t, e, oracle_, mode):
        with torch.no_grad():
            out = fast(sample, t, encoder_hidden_states=e).sample
        assert_float32_close(out, *oracle_(mode, sample, t, encoder_hidden_states=e), what=f"{mode} at {t}")

    t = torch.tensor([900])  # the signature of a Python int timestep, used below
    call(x, t, uncond, oracle, "F")
    call(x, t, cond, other, "F")  # same sample and timestep: slot 1 of step 0
    x1, t1 = x * 0.9, torch.tensor([800])
    call(x1, t1, uncond, oracle, "S")
    call(x1, t1, cond, other, "S")  # reads its own cache (slot 1), not slot 0's
    call(x1, t1, uncond, oracle, "F")  # an exact repeat of step 1's first call: step 2
    call(x1, t1, cond, other, "F")  # slot 1 of step 2
    x2 = x * 0.8
    call(x2, 700, uncond, oracle, "S")  # Python numbers: step 3 ...
    call(x2, 700, cond, other, "S")  # ... and, an equal number with the same sample, its slot 1
    assert fast.history == ("FSFS",)


# -- 2. threads -----------------------------------------------------------------------------


def thread_job(fast, seed: int, batch: int, generations: int = 2) -> tuple[list[torch.Tensor], tuple[str, ...]]:
    """A few automatic-mode generations of a DDIM loop (every call a step); outputs and history."""
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(batch, TOKENS, CROSS_DIM, generator=g)
    outs = []
    for _ in range(generations):
        lat = torch.randn(batch, 4, LATENT, LATENT, generator=g)
        sched = DDIMScheduler(steps_offset=1, clip_sample=False)
        sched.set_timesteps(5)
        with torch.no_grad():
            for t in sched.timesteps:
                eps = fast(lat, t, encoder_hidden_states=e).sample
                lat = sched.step(eps, t, lat).prev_sample
                outs.append(eps)
    return outs, fast.history


def test_threads_sharing_one_wrapper_equal_serial_runs():
    unet = tiny_unet(seed=11)  # a fresh U-Net: the threads' first calls capture concurrently
    jobs = [(1, 2), (2, 1), (3, 2)]  # (seed, batch): two signatures, three generations at once
    fast = dcfx.optimize(unet, interval=3, branch=1)
    start = threading.Barrier(len(jobs))
    results: dict[int, tuple] = {}
    errors: list[BaseException] = []

    def work(i, seed, batch):
        try:
            start.wait()
            results[i] = thread_job(fast, seed, batch)
        except BaseException as e:  # reported below, with the thread's traceback
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i, *job)) for i, job in enumerate(jobs)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise errors[0]

    serial = dcfx.optimize(unet, interval=3, branch=1)
    for i, (seed, batch) in enumerate(jobs):
        expected, history = thread_job(serial, seed, batch)  # its timesteps go up: new generations
        outs, thread_history = results[i]
        assert thread_history == ("FSSFS", "FSSFS")
        assert history[-2:] == thread_history
        for a, b in zip(outs, expected):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert fast.history == ()  # the main thread ran nothing


# -- 3. moving away and back ----------------------------------------------------------------


def test_moving_away_and_back_reuses_captures_and_cache_buffers(monkeypatch):
    unet = tiny_unet(seed=12)
    exports, compiles = [], []
    real_export = torch.export.export

    def counting_export(*args, **kwargs):
        exports.append(1)
        return real_export(*args, **kwargs)

    def counting_compile(graph, **kwargs):
        compiles.append(1)
        return graph  # what a compile returns is irrelevant here: whether one happens is

    monkeypatch.setattr(torch.export, "export", counting_export)
    monkeypatch.setattr(torch, "compile", counting_compile)
    fast = dcfx.optimize(unet, interval=2, branch=1, compile=True)
    x, e = torch.randn(2, 4, LATENT, LATENT), torch.randn(2, TOKENS, CROSS_DIM)

    def generation(dtype):
        fast.begin(4)
        with torch.no_grad():
            outs = [fast(x.to(dtype), t, encoder_hidden_states=e.to(dtype)).sample for t in (900, 700, 500, 300)]
        (entry,) = fast.runtime.entries.current.values()
        (slot,) = fast.runtime.slots(entry)
        return outs, [b.data_ptr() for b in slot.buffers]

    before, ptrs = generation(torch.float32)
    assert (len(exports), len(compiles)) == (1, 2)
    fast.to(torch.float64)
    away, _ = generation(torch.float64)
    assert away[0].dtype == torch.float64
    assert (len(exports), len(compiles)) == (2, 4)
    fast.to(torch.float32)
    again, ptrs_again = generation(torch.float32)
    assert (len(exports), len(compiles)) == (2, 4)  # neither exported nor compiled again
    assert ptrs_again == ptrs  # the buffers a captured CUDA graph reads still exist
    for a, b in zip(again, before):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert fast.history[-3:] == ("FSFS",) * 3


def test_replaced_parameters_drop_the_old_states():
    # The other side of keeping states: graphs holding replaced weights are let go.
    unet = tiny_unet(seed=13)
    fast = dcfx.optimize(unet, interval=2)
    x, e = torch.randn(1, 4, LATENT, LATENT), torch.randn(1, TOKENS, CROSS_DIM)
    with torch.no_grad():
        fast(x, 900, encoder_hidden_states=e)
        fast.to(torch.float64)
        fast(x.double(), 950, encoder_hidden_states=e.double())
        assert len(fast.runtime.entries.states) == 2
        unet.conv_out.weight = torch.nn.Parameter(unet.conv_out.weight.detach() * 2)
        out = fast(x.double(), 990, encoder_hidden_states=e.double()).sample
        # a full step: the U-Net's own ops, bit for bit
        torch.testing.assert_close(out, unet(x.double(), 990, encoder_hidden_states=e.double()).sample, rtol=0, atol=0)
    assert len(fast.runtime.entries.states) == 1


# -- 4. interrupted generations -------------------------------------------------------------


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


# -- 6. pickling ----------------------------------------------------------------------------


def test_pickle_copy_and_torch_save_round_trip(tiny):
    unet, x, uncond, _ = tiny
    fast = dcfx.optimize(unet, interval=2, branch=1)
    fast.begin()
    with torch.no_grad():
        expected = [fast(x, t, encoder_hidden_states=uncond).sample for t in (900, 700, 500)]

    buffer = io.BytesIO()
    torch.save(fast, buffer)
    buffer.seek(0)
    clones = [
        pickle.loads(pickle.dumps(fast)),
        copy.deepcopy(fast),
        torch.load(buffer, weights_only=False),
    ]
    for clone in clones:
        assert isinstance(clone, DeepCacheUNet) and clone.unet is not unet
        assert clone.deepcache_config == fast.deepcache_config
        assert clone.history == () and not clone.runtime.entries.states  # graphs are rebuilt lazily
        with torch.no_grad():
            outs = [clone(x, t, encoder_hidden_states=uncond).sample for t in (900, 700, 500)]
        assert clone.history == ("FSF",)
        for a, b in zip(outs, expected):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_call_that_fails_in_capture_does_not_break_the_next_call():
    # A rejected first call (wrong conditioning width) registers its step; the corrected call
    # at the same timestep then runs as that step's next call and must work.
    unet = tiny_unet()
    fast = dcfx.optimize(unet, interval=2, branch=0)
    x, t = torch.randn(2, 4, LATENT, LATENT), torch.tensor(999)
    too_wide = torch.randn(2, TOKENS, CROSS_DIM + 1)
    with torch.no_grad(), pytest.raises(RuntimeError) as plain:
        unet(x, t, encoder_hidden_states=too_wide)
    assert "cannot be multiplied" in str(plain.value)  # the cross-attention projection's shape error
    with torch.no_grad(), pytest.raises(RuntimeError, match=re.escape(str(plain.value))):
        fast(x, t, encoder_hidden_states=too_wide)
    with torch.no_grad():
        out = fast(x, t, encoder_hidden_states=torch.randn(2, TOKENS, CROSS_DIM)).sample
    assert out.shape == x.shape and fast.history[-1] == "F"
