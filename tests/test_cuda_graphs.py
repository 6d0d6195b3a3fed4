"""CUDA-graph safety: a sync-free step path, a stable cache buffer, and a replay test on GPU."""

import pytest
import torch
from _tiny_unet import tiny_unet
from diffusers import DDIMScheduler

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
                (entry,) = fast._entries.values()
                ptrs.update(t.data_ptr() for t in entry.cache)
    assert len(ptrs) == len(entry.cache) == 2  # the feature and its group statistics


def _capture_and_replay(compile: bool):
    device = torch.device("cuda")
    unet = _unet(device)
    fast = dcfx.optimize(unet, interval=3, branch=1, compile=compile)
    reference = dcfx.optimize(unet, interval=3, branch=1)
    ehs = torch.randn(2, 7, 32, device=device)
    static_x = torch.randn(2, 4, 8, 8, device=device)
    static_t = torch.tensor(999, device=device)
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(10, device=device)

    with torch.no_grad():
        # Warm up on a side stream: export (and compile) both graphs, allocate the cache.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                fast.begin()
                fast(static_x, static_t, ehs)
                fast(static_x, static_t, ehs)
        torch.cuda.current_stream().wait_stream(side)

        # Capture step 0 (full) and step 1 (shallow) of one explicit generation.
        g_full, g_shallow = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        fast.begin()
        with torch.cuda.graph(g_full):
            out_full = fast(static_x, static_t, ehs).sample
        with torch.cuda.graph(g_shallow):
            out_shallow = fast(static_x, static_t, ehs).sample
        assert fast.history[-1] == "FS"

        latents = torch.randn(2, 4, 8, 8, device=device)
        ref_latents = latents.clone()
        timesteps = scheduler.timesteps
        for i, t in enumerate(timesteps):
            static_x.copy_(latents)
            static_t.copy_(t)
            if fast.is_full_step(i, len(timesteps)):
                g_full.replay()
                eps = out_full.clone()
            else:
                g_shallow.replay()
                eps = out_shallow.clone()
            expected = reference(ref_latents, t, ehs).sample
            assert ((eps - expected).norm() / expected.norm()).item() < 1e-4, f"step {i}"
            latents = ref_latents = scheduler.step(expected, t, ref_latents).prev_sample
        assert reference.history[-1] == "FSSFSSFSSF"


@pytest.mark.cuda
@needs_cuda
def test_cuda_graph_replay_by_schedule():
    _capture_and_replay(compile=False)


@pytest.mark.cuda
@pytest.mark.compile
@needs_cuda
def test_cuda_graph_replay_by_schedule_compiled():
    _capture_and_replay(compile=True)
