"""Every way users call a U-Net: caches keyed by conditioning, guidance as separate calls per
step, per-step floats as graph inputs, module state changed mid-generation, model-state options
with the fused cut, timesteps as the model class converts them, interleaved generations. Each
against an independent reference: DeepCache by hand (a hook per conditioning), the plain
U-Net, or the reference helper (DeepCache==0.1.1) run on the batched form of the same loop (a
batched call caches one feature per batch element, which is what the separate uncond and cond
calls must get)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from _tiny_unet import CROSS_DIM, LATENT, TOKENS, ReferenceDeepCache, tiny_unet, uniform
from _tolerance import as_float64, assert_float32_close, assert_float32_far, float64_copy
from diffusers import DDIMScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler, PNDMScheduler, UNet2DModel
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
from test_reference import _SD_BETAS, _sd_unet, reference_helper

import dcfx

# Float32 against float64 (tests/_tolerance.py); a change that matters moves the output by more
# than FAR such bounds.
FAR = 100


@pytest.fixture(scope="module")
def unet():
    return tiny_unet(seed=2)


def conds(seed=0, n=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, TOKENS, CROSS_DIM, generator=g) for _ in range(n)]


def noise(seed=0, batch=1):
    return torch.randn(batch, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(seed))


def timesteps(n=9):
    s = DDIMScheduler(num_train_timesteps=1000)
    s.set_timesteps(n)
    return s.timesteps


class Oracles:
    """One hand-written DeepCache per conditioning (its own cache, whatever the call order),
    in float32 and float64."""

    def __init__(self, unet, branch=0):
        self.unet, self.branch, self.by_cond = unet, branch, {}

    def __call__(self, mode, x, t, cond, **kwargs):
        if id(cond) not in self.by_cond:
            self.by_cond[id(cond)] = ReferenceDeepCache(self.unet, self.branch)
        return self.by_cond[id(cond)](mode, x, t, encoder_hidden_states=cond, **kwargs)


def check(out, expected, what=""):
    """`out` against a `ReferenceDeepCache` step (float32, float64): tests/_tolerance.py."""
    assert_float32_close(out, *expected, what=what)


# -- 1. separate guidance calls, then the uncond call dropped ---------------------------------


@pytest.mark.parametrize("mode", ["auto", "begin_fresh_timesteps"])
def test_guidance_cutoff_reads_each_conditionings_own_cache(unet, mode):
    uncond, cond = conds()
    fast = dcfx.optimize(unet, interval=3, branch=0)
    oracles = Oracles(unet)
    pattern = uniform(9, 3)
    if mode != "auto":
        fast.begin(9)
    x = noise()
    for i, t in enumerate(timesteps()):
        step_t = torch.tensor(int(t)) if mode != "auto" else t  # a new timestep tensor per call
        with torch.no_grad():
            if i < 5:
                u = fast(x, step_t, uncond).sample
                check(u, oracles(pattern[i], x, t, uncond), f"uncond step {i}")
            step_t = torch.tensor(int(t)) if mode != "auto" else t
            c = fast(x, step_t, cond).sample  # from step 5 on, only the cond call (a cutoff)
        check(c, oracles(pattern[i], x, t, cond), f"cond step {i}")
        x = x - 0.1 * c
    assert fast.history == (pattern,)


# -- 1b. separate guidance calls against the reference helper; the step rule ---------------------


T = 8  # steps per generation
GUIDANCE = 5.0


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
@pytest.mark.slow
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
@pytest.mark.slow
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


# -- 2. floats that change every step are graph inputs -----------------------------------------


class Strength(AttnProcessor2_0):
    """An attention processor scaled by a per-call float from cross_attention_kwargs."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, strength=1.0):
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb) * self.factor(strength)

    @staticmethod
    def factor(strength):
        return strength


class Branching(Strength):
    """The same, but deciding on the float in Python (so it cannot be a graph input)."""

    @staticmethod
    def factor(strength):
        return 0.5 if strength < 0.5 else 1.0


def count_exports(monkeypatch) -> list:
    exports = []
    real = torch.export.export
    monkeypatch.setattr(torch.export, "export", lambda *a, **k: exports.append(1) or real(*a, **k))
    return exports


def test_a_float_schedule_costs_one_export(monkeypatch):
    unet = tiny_unet(seed=3)
    unet.set_attn_processor(Strength())
    exports = count_exports(monkeypatch)
    (cond,) = conds(n=1)
    fast = dcfx.optimize(unet, interval=3)
    oracle = ReferenceDeepCache(unet, 0)
    x = noise()
    for i, t in enumerate(timesteps()):
        kwargs = {"cross_attention_kwargs": {"strength": 1.0 - 0.05 * i, "scale": 0.9}}  # a LoRA scale too
        with torch.no_grad():
            out = fast(x, t, cond, **kwargs).sample
        check(out, oracle(uniform(9, 3)[i], x, t, encoder_hidden_states=cond, **kwargs), f"step {i}")
        x = x - 0.1 * out
    assert fast.history == (uniform(9, 3),) and len(exports) == 1


@pytest.mark.slow
def test_a_float_the_unet_branches_on_is_bounded_then_plain(monkeypatch):
    unet = tiny_unet(seed=3)
    unet.set_attn_processor(Branching())
    exports = count_exports(monkeypatch)
    (cond,) = conds(n=1)
    fast = dcfx.optimize(unet, interval=3)
    x = noise()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i, t in enumerate(timesteps()):
            kwargs = {"cross_attention_kwargs": {"strength": 0.1 * i}}
            with torch.no_grad():
                out = fast(x, t, cond, **kwargs).sample
                plain = unet(x, t, cond, **kwargs).sample
            if i == 0 or i >= 4:  # step 0 is full; from the 5th export on the plain U-Net runs
                torch.testing.assert_close(out, plain, rtol=0, atol=0)
            x = x - 0.1 * out
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "cross_attention_kwargs.strength" in messages[0], messages
    assert len(exports) == 1 + 4  # the lifted try, then four per-value exports
    assert fast.spent.plain_steps == 5


# -- 3. every model-state option, with the fused cut -----------------------------------------


OPTIONS = {
    "freeu": lambda u: u.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4),
    "fused_qkv": lambda u: u.fuse_qkv_projections(),
    "attn_processor": lambda u: u.set_attn_processor(AttnProcessor()),
    "attention_slice": lambda u: u.set_attention_slice(1),
}


@pytest.mark.parametrize(
    ("option", "branch"), [(option, 0) for option in OPTIONS] + [("freeu", 2)],  # FreeU scales deeper blocks too
)
@pytest.mark.slow
def test_model_state_options_with_the_fused_cut(option, branch):
    unet = tiny_unet(seed=5)
    (cond,) = conds(n=1)
    fast = dcfx.optimize(unet, interval=3, branch=branch)
    x = noise(batch=1)
    with torch.no_grad():
        for t in timesteps(3):
            fast(x, t, cond)  # a first generation without the option
        OPTIONS[option](unet)
        oracle = ReferenceDeepCache(unet, branch)  # its float64 copy has the option too
        pattern = uniform(9, 3)
        for i, t in enumerate(timesteps()):
            out = fast(x, t, cond).sample
            check(out, oracle(pattern[i], x, t, encoder_hidden_states=cond), f"step {i}")
            x = x - 0.1 * out
    assert fast.history[-1] == pattern
    (entry,) = fast.runtime.entries.current.values()
    assert entry.shallow.graph.meta.get("dcfx_fused", 0) == 1


# -- 4. state changed between steps ----------------------------------------------------------


@pytest.mark.slow
def test_a_state_change_mid_generation_takes_effect_at_that_step():
    unet = tiny_unet(seed=6)
    (cond,) = conds(n=1)
    fast = dcfx.optimize(unet, interval=4)
    fast.begin(9)
    x0 = noise()
    outs, x = [], x0.clone()
    with torch.no_grad():
        for i, t in enumerate(timesteps()):
            if i == 2:
                unet.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)  # a step-end callback's change
            if i == 6:
                unet.disable_freeu()
            out = fast(x, t, cond).sample
            outs.append(out)
            x = x - 0.1 * out
    unet.disable_freeu()
    # By hand: the changed steps recompute fully, shallow steps reuse the state's own cache.
    pattern = "FSFSFSFSF"  # interval 4, plus the changed steps 2 and 6
    assert fast.history == (pattern,)
    oracle, x = ReferenceDeepCache(unet, 0), x0.clone()
    with torch.no_grad():
        for i, t in enumerate(timesteps()):
            for u in oracle.unets:
                if i == 2:
                    u.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
                if i == 6:
                    u.disable_freeu()
            expected = oracle(pattern[i], x, t, encoder_hidden_states=cond)
            check(outs[i], expected, f"step {i}")
            x = x - 0.1 * expected[0]


@pytest.mark.slow
def test_an_attention_processor_scale_set_by_a_callback():
    # IP-Adapter keeps its scale on its attention processors (set_ip_adapter_scale writes it
    # there); a step-end callback that sets it changes what the U-Net computes at once.
    unet = tiny_unet(seed=6)
    processor = _Scaled(0.5)
    unet.set_attn_processor(processor)
    (cond,) = conds(n=1)
    fast = dcfx.optimize(unet, interval=3)
    x0 = noise()
    outs, x = [], x0.clone()
    with torch.no_grad():
        for i, t in enumerate(timesteps(6)):
            if i == 1:
                processor.scale = 0.0
            outs.append(fast(x, t, cond).sample)
            x = x - 0.1 * outs[-1]
    pattern = "FFSFSS"  # interval 3, plus the changed step 1
    assert fast.history == (pattern,)
    processor.scale = 0.5
    oracle, x = ReferenceDeepCache(unet, 0), x0.clone()
    processors = {p for u in oracle.unets for p in u.attn_processors.values()}  # this one and its float64 copy
    assert len(processors) == 2
    with torch.no_grad():
        for i, t in enumerate(timesteps(6)):
            if i == 1:
                for p in processors:
                    p.scale = 0.0
            expected = oracle(pattern[i], x, t, encoder_hidden_states=cond)
            check(outs[i], expected, f"step {i}")
            x = x - 0.1 * expected[0]


class _Scaled(AttnProcessor2_0):
    def __init__(self, scale):
        super().__init__()
        self.scale = scale

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb) * (1 + self.scale)


# -- 5. timesteps as each model class converts them ---------------------------------------------


@pytest.mark.parametrize("timestep", [500.7, np.float64(500.7), np.float32(500.7), 500, np.int64(500)])
def test_unet2dmodel_numeric_timesteps_equal_the_plain_model(timestep):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        unet = UNet2DModel(
            sample_size=8, block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1,
            down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        ).eval()
    x = torch.randn(1, 3, 8, 8)
    fast = dcfx.optimize(unet, interval=1)
    # diffusers' own conversion (torch.tensor([t], dtype=long)) takes Python numbers only.
    plain_t = float(timestep) if isinstance(timestep, np.floating) else int(timestep) if isinstance(timestep, np.integer) else timestep
    with torch.no_grad():
        torch.testing.assert_close(fast(x, timestep).sample, unet(x, plain_t).sample, rtol=0, atol=0)


def test_unet2dcondition_fractional_timestep_equals_the_plain_model(unet):
    (cond,) = conds(n=1)
    x = noise()
    fast = dcfx.optimize(unet, interval=1)
    with torch.no_grad():
        torch.testing.assert_close(fast(x, 500.7, cond).sample, unet(x, 500.7, cond).sample, rtol=0, atol=0)


# -- 6. two generations interleaved on one U-Net -----------------------------------------------


@pytest.mark.parametrize("mode", ["auto", "begin"])
def test_interleaved_generations_each_see_their_own_last_full_step(unet, mode):
    a, b = conds(seed=4)
    fast = dcfx.optimize(unet, interval=3)
    oracles = Oracles(unet)
    xs = {"a": noise(1), "b": noise(2)}
    ts = timesteps()
    pattern = uniform(len(ts), 3)
    if mode == "begin":
        fast.begin(len(ts))  # A's generation
    with torch.no_grad():
        for i, t in enumerate(ts):
            for name, cond in (("a", a), ("b", b)):
                if mode == "begin" and i == 0 and name == "b":
                    fast.begin(len(ts))  # B's generation starts at its first call
                out = fast(xs[name], t, cond).sample
                check(out, oracles(pattern[i], xs[name], t, cond), f"{name} step {i}")
                xs[name] = xs[name] - 0.1 * out
    assert fast.history == (pattern, pattern)


# -- 2b. a LoRA scale schedule (PEFT adapters) -------------------------------------------------


def test_a_lora_scale_schedule_costs_one_export(monkeypatch):
    peft = pytest.importorskip("peft")
    unet = tiny_unet(seed=7)
    unet.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                     init_lora_weights=False))
    exports = count_exports(monkeypatch)
    (cond,) = conds(n=1)
    fast = dcfx.optimize(unet, interval=3)
    oracle = ReferenceDeepCache(unet, 0)
    x = noise()
    scales = [1.0 - 0.1 * i for i in range(9)]
    for i, t in enumerate(timesteps()):
        kwargs = {"cross_attention_kwargs": {"scale": scales[i]}}
        with torch.no_grad():
            out = fast(x, t, cond, **kwargs).sample
            if i == 1:  # the scale does change the output (the check can fail)
                unet64 = oracle.unets[1]
                scaled = unet(x, t, cond, **kwargs).sample, unet64(x.double(), t, cond.double(), **kwargs).sample
                assert_float32_far(unet(x, t, cond).sample, *scaled, times=FAR, what="LoRA scale 1 against 0.9")
        check(out, oracle(uniform(9, 3)[i], x, t, encoder_hidden_states=cond, **kwargs), f"step {i}")
        x = x - 0.1 * out
    assert fast.history == (uniform(9, 3),) and len(exports) == 1
    assert all(m.scaling == {"default": 1.0} for m in unet.modules() if isinstance(getattr(m, "scaling", None), dict))
