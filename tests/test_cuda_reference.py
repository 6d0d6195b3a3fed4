"""dcfx against the reference `DeepCacheSDHelper` (DeepCache==0.1.1) on the same CUDA device.

tests/test_reference.py checks step-exact equality on CPU; here the same tiny SD- and
SDXL-shaped U-Nets run on CUDA, where dcfx's fused Triton cut kernel, its precomputed
cached-feature statistics, inductor and CUDA graphs are in the loop. Every test compares the
latents after each step with the reference helper run on the same device, and asserts that
caching changed the result by more than the bound (so the comparison can fail):

- fp32 (eager, and the CUDA-graph recipe of docs/cuda-graphs.md: one captured full and one shallow step,
  replayed by the schedule, with PNDM and Euler): against the reference run in fp32 and in
  fp64 on the same device, as on CPU (tests/_tolerance.py). TF32 off: with it, cuDNN rounds
  conv inputs to 10 mantissa bits and dcfx's split shortcut conv differs from the whole one at
  that precision. The CPU parameter runs the same body here, without a GPU.
- fp16 (eager, and compiled with `compile=True` in the default mode and "reduce-overhead"):
  dcfx and the reference round differently at the cut (the fused kernel rounds its fp32
  result once where eager GroupNorm and SiLU each round to fp16; the split shortcut conv adds
  one rounding; inductor fuses and rounds elsewhere again), i.e. a few units of fp16 roundoff
  u = 2^-11 per shallow step. The bound is therefore relative to fp16's own noise, measured in
  the same test: dcfx's distance to the fp32 reference trajectory may exceed the fp16
  reference's by at most 2x + 4u (the same rule as float32 against float64, one precision
  down, with an epsilon floor of a few u).

PNDM repeats its first timestep; the reference helper numbers steps by looking the timestep
up in `scheduler.timesteps`, so its full steps are computed the same way here and given to
dcfx as an explicit schedule (for interval 3 they are the uniform ones anyway).
"""

from __future__ import annotations

import contextlib
import copy
import types

import pytest
import torch
import torch.utils._pytree as pytree
from _tiny_unet import sample_steps
from _tolerance import assert_float32_close, assert_float32_far
from diffusers import DDIMScheduler, EulerDiscreteScheduler, PNDMScheduler
from test_reference import _SD_BETAS, models, reference_helper  # noqa: F401  (models: a fixture)

import dcfx
from dcfx.kernels import plan as kernel_plan

T = 8
FP16_ROUNDOFF = 2.0**-11
FAR = 100  # fp32: a cached run is more than this many float32 bounds from the plain U-Net's

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = pytest.param("cuda", marks=[pytest.mark.cuda, needs_cuda])

SCHEDULERS = {
    "ddim": lambda: DDIMScheduler(**_SD_BETAS, clip_sample=False, set_alpha_to_one=False),
    "euler": lambda: EulerDiscreteScheduler(**_SD_BETAS),
    "pndm": lambda: PNDMScheduler(**_SD_BETAS, skip_prk_steps=True),
}

# (model, scheduler, interval, branch): the cut in up block 1 (b=0, 1) and at the downsampler
# (b=3), both models, every scheduler kind.
CASES = [("sd", "ddim", 3, 0), ("sdxl", "euler", 2, 3), ("sd", "pndm", 3, 1)]


@pytest.fixture(autouse=True)
def no_tf32():
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


@pytest.fixture(scope="module")
def model(models):
    """model(name, device, dtype) -> (unet, conditioning, latents): test_reference's seeded
    models, copied to device and dtype (once each)."""
    moved = {}

    def get(name, device, dtype):
        if (name, device, dtype) not in moved:
            unet, cond, latents = models[name]
            cond = pytree.tree_map(lambda t: t.to(device, dtype), cond)
            moved[name, device, dtype] = (copy.deepcopy(unet).to(device, dtype), cond, latents.to(device, dtype))
        return moved[name, device, dtype]

    return get


def fresh_scheduler(kind: str, device: str):
    sched = SCHEDULERS[kind]()
    sched.set_timesteps(T, device=device)
    return sched


def reference_full_steps(timesteps, interval: int) -> tuple[int, ...]:
    """The calls the reference helper runs in full: it numbers a call by the first index of
    its timestep in `scheduler.timesteps` (PNDM's repeated timestep gets the earlier index)."""
    values = [float(t) for t in timesteps]
    return tuple(i for i, t in enumerate(values) if values.index(t) % interval == 0)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def per_step(run, ref) -> list[float]:
    assert len(run) == len(ref)
    return [rel(a, b) for a, b in zip(run, ref)]


def run_plain(model, name, kind, device, dtype):
    unet, cond, latents = model(name, device, dtype)
    return sample_steps(unet, fresh_scheduler(kind, device), latents, cond)


def run_reference(model, name, kind, device, dtype, interval, branch):
    unet, cond, latents = model(name, device, dtype)
    sched = fresh_scheduler(kind, device)
    with reference_helper(unet, sched, interval, branch):
        return sample_steps(unet, sched, latents, cond)


def run_dcfx(model, name, kind, device, dtype, interval, branch, **config):
    unet, cond, latents = model(name, device, dtype)
    sched = fresh_scheduler(kind, device)
    calls = len(sched.timesteps)  # T, or T + 1 for PNDM
    full = reference_full_steps(sched.timesteps, interval)
    fast = dcfx.optimize(unet, interval=interval, branch=branch, schedule=full, **config)
    fast.begin(calls)
    steps = sample_steps(fast, sched, latents, cond)
    assert fast.history[-1] == "".join("F" if i in full else "S" for i in range(calls))
    return steps


def assert_cached(model, run, name, kind, device):
    """fp32: `run` is more than FAR float32 bounds from the plain U-Net's trajectory."""
    plain, plain64 = (run_plain(model, name, kind, device, dtype) for dtype in (torch.float32, torch.float64))
    assert_float32_far(run, plain, plain64, times=FAR, what="caching did not change the result")


def fp16_bound(model, name, kind, interval, branch, **config):
    """fp16 dcfx against the fp32 reference: per step, at most 2x the fp16 reference's own
    distance to it plus 4u. Also checks that the plain fp16 U-Net would fail that bound (so
    that the comparison can fail)."""
    ref32 = run_reference(model, name, kind, "cuda", torch.float32, interval, branch)
    ref16 = run_reference(model, name, kind, "cuda", torch.float16, interval, branch)
    run16 = run_dcfx(model, name, kind, "cuda", torch.float16, interval, branch, **config)
    noise = per_step(ref16, ref32)
    bound = [2 * e + 4 * FP16_ROUNDOFF for e in noise]
    err = per_step(run16, ref32)
    assert all(e <= b for e, b in zip(err, bound)), (
        f"fp16 dcfx vs fp32 reference {['%.1e' % e for e in err]} exceeds 2x the fp16 reference's "
        f"{['%.1e' % e for e in noise]} + 4u"
    )
    plain = per_step(run_plain(model, name, kind, "cuda", torch.float16), ref32)
    assert any(p > b for p, b in zip(plain, bound)), "caching did not change the result by more than the bound"


@contextlib.contextmanager
def two_pass_kernels():
    """Route the cut through the statistics + apply kernels (with the cached feature's
    precomputed statistics), which the tiny models' small groups would otherwise skip."""
    saved = kernel_plan.SINGLE_PASS_ELEMENTS
    kernel_plan.SINGLE_PASS_ELEMENTS = 0
    kernel_plan.cut_plan.cache_clear()
    try:
        yield
    finally:
        kernel_plan.SINGLE_PASS_ELEMENTS = saved
        kernel_plan.cut_plan.cache_clear()


# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("name, kind, interval, branch", CASES)
@pytest.mark.slow
def test_fp32_matches_reference(model, device, name, kind, interval, branch):
    ref = run_reference(model, name, kind, device, torch.float32, interval, branch)
    ref64 = run_reference(model, name, kind, device, torch.float64, interval, branch)
    run = run_dcfx(model, name, kind, device, torch.float32, interval, branch)
    assert_float32_close(run, ref, ref64, what=f"dcfx vs DeepCacheSDHelper on {device}")
    assert_cached(model, run, name, kind, device)
    assert_cached(model, ref, name, kind, device)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("kernels", ["default", "two_pass"])
@pytest.mark.parametrize("name, kind, interval, branch", CASES)
def test_fp16_matches_reference_cuda(model, name, kind, interval, branch, kernels):
    with two_pass_kernels() if kernels == "two_pass" else contextlib.nullcontext():
        fp16_bound(model, name, kind, interval, branch)


@pytest.mark.cuda
@pytest.mark.inductor
@needs_cuda
@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_compiled_fp16_matches_reference_cuda(model, mode):
    name, kind, interval, branch = CASES[0]
    torch._dynamo.reset()
    fp16_bound(model, name, kind, interval, branch, compile=True, compile_mode=mode)


class _Replay:
    """The recipe of docs/cuda-graphs.md: `dcfx.cuda_graphs`, replayed step by step; called
    like the U-Net (positional timestep, conditioning as captured)."""

    def __init__(self, fast, x, t, cond, num_steps):
        self.num_steps, self.step = num_steps, 0
        self.x, self.t = x.clone(), t.clone()
        self.graphs = dcfx.cuda_graphs(fast, self.x, self.t, **cond)

    def __call__(self, x, t, **cond):
        self.x.copy_(x)
        self.t.copy_(t)
        out = self.graphs.step(self.step, self.num_steps).sample.clone()
        self.step += 1
        return types.SimpleNamespace(sample=out)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("kind", ["pndm", "euler"])
@pytest.mark.parametrize("name", ["sd", "sdxl"])
def test_cuda_graph_recipe_matches_reference(model, name, kind):
    interval, branch = 3, 1
    unet, cond, latents = model(name, "cuda", torch.float32)
    ref = run_reference(model, name, kind, "cuda", torch.float32, interval, branch)
    ref64 = run_reference(model, name, kind, "cuda", torch.float64, interval, branch)
    sched = fresh_scheduler(kind, "cuda")
    full = reference_full_steps(sched.timesteps, interval)
    fast = dcfx.optimize(unet, interval=interval, branch=branch, schedule=full)
    replay = _Replay(fast, latents, sched.timesteps[0], cond, len(sched.timesteps))
    run = sample_steps(replay, sched, latents, cond)
    assert_float32_close(run, ref, ref64, what="CUDA-graph replay vs reference")
    assert_cached(model, run, name, kind, "cuda")


def test_reference_full_steps_pndm():
    # PNDM (skip_prk_steps) repeats its first timestep (T + 1 calls): the reference numbers
    # the repeat's call like the one before.
    sched = fresh_scheduler("pndm", "cpu")
    values = [int(t) for t in sched.timesteps]
    assert len(values) == T + 1 and values[1] == values[2]
    assert reference_full_steps(sched.timesteps, 3) == (0, 3, 6)
    assert reference_full_steps(sched.timesteps, 2) == (0, 4, 6, 8)
