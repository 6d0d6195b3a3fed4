"""CUDA-graph safety: a sync-free step path, a stable cache buffer, and a replay test on GPU."""

import pytest
import torch
from _tiny_unet import tiny_unet
from _tolerance import assert_float32_close, float64_copy
from diffusers import DDIMScheduler

# TF32 off (an autouse fixture): replays are checked against float32's own error, measured
# against float64; with TF32, cuDNN rounds conv inputs to 10 mantissa bits.
from test_cuda_reference import no_tf32  # noqa: F401

import dcfx

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _unet(device="cpu", dtype=torch.float32):
    return tiny_unet(seed=0).to(device, dtype)


def test_explicit_generations_never_read_the_device(monkeypatch):
    unet = _unet()
    fast = dcfx.optimize(unet, interval=2, branch=1)
    x, ehs = torch.randn(2, 4, 8, 8), torch.randn(2, 7, 32)
    with torch.no_grad():
        fast.begin(3)
        fast(x, torch.tensor(900), ehs)  # export happens here (it may read values)

        def no_sync(self):
            raise AssertionError("the per-step path read a tensor value on the host")

        monkeypatch.setattr(torch.Tensor, "item", no_sync)
        monkeypatch.setattr(torch.Tensor, "tolist", no_sync)
        monkeypatch.setattr(torch.Tensor, "__bool__", no_sync)
        fast(x, torch.tensor(800), ehs)
        fast(x, torch.tensor(700), ehs)
        fast.begin(2)
        fast(x, torch.tensor(900), ehs)
        fast(x, torch.tensor(800), ehs)
    assert fast.history == ("FSF", "FS")


def test_cache_buffer_is_reused_across_steps_and_generations():
    unet = _unet()
    fast = dcfx.optimize(unet, interval=2, branch=0)
    x, ehs = torch.randn(1, 4, 8, 8), torch.randn(1, 7, 32)
    ptrs = set()
    with torch.no_grad():
        for _ in range(2):
            fast.begin(4)
            for t in (900, 700, 500, 300):
                fast(x, torch.tensor(t), ehs)
                (entry,) = fast.runtime.entries.current.values()
                (slot,) = fast.runtime.slots(entry)
                ptrs.update(t.data_ptr() for t in slot.buffers)
    assert len(ptrs) == len(slot.buffers) == 2  # the feature and its group statistics


POLICIES = {
    "uniform": dict(interval=3),
    "forecast": dict(interval=3, forecast=2),
    "cut": dict(adaptive="cut", threshold=0.3, max_shallow=3),
    "latent": dict(adaptive="latent", threshold=1.0, max_shallow=3),
    "calibrated": dict(schedule=(0, 1, 4, 8)),
}


def _capture_and_replay(compile: bool, options: dict):
    """`dcfx.cuda_graphs` (captured) against the DeepCacheUNet run eagerly, step by step, in
    float32 and in float64 (tests/_tolerance.py)."""
    device = torch.device("cuda")
    unet = _unet(device)
    fast = dcfx.optimize(unet, branch=1, compile=compile, **options)
    reference = dcfx.optimize(unet, branch=1, **options)
    reference64 = dcfx.optimize(float64_copy(unet), branch=1, **options)
    ehs = torch.randn(2, 7, 32, device=device)
    static_x = torch.randn(2, 4, 8, 8, device=device)
    static_t = torch.tensor(999, device=device)
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(10, device=device)
    with torch.no_grad():
        graphs = dcfx.cuda_graphs(fast, static_x, static_t, ehs)
        assert graphs.capture
        for generation in range(2):
            latents = torch.randn(2, 4, 8, 8, device=device, generator=torch.Generator(device).manual_seed(generation))
            ref_latents = latents.clone()
            reference.begin(10)
            reference64.begin(10)
            for i, t in enumerate(scheduler.timesteps):
                static_x.copy_(latents)
                static_t.copy_(t)
                eps = graphs.step(i, 10).sample.clone()
                expected = reference(ref_latents, t, ehs).sample
                expected64 = reference64(ref_latents.double(), t, ehs.double()).sample
                assert_float32_close(eps, expected, expected64, what=f"generation {generation} step {i}")
                latents = ref_latents = scheduler.step(expected, t, ref_latents).prev_sample
            assert graphs.history == reference.history[-1] == reference64.history[-1]
        assert "S" in graphs.history


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("policy", list(POLICIES))
def test_cuda_graph_replay_by_policy(policy):
    _capture_and_replay(compile=False, options=POLICIES[policy])


@pytest.mark.cuda
@pytest.mark.inductor
@needs_cuda
@pytest.mark.parametrize("policy", ["uniform", "cut"])
def test_cuda_graph_replay_by_policy_compiled(policy):
    _capture_and_replay(compile=True, options=POLICIES[policy])
