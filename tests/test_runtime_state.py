"""What a `DeepCacheUNet` keeps between calls, and for whom.

- moving the model to another dtype and back reuses its captures, compiled graphs and cache
  buffers; replacing its parameters lets the graphs that hold the old ones go;
- a call that failed in capture leaves nothing behind that breaks the next call;
- `history` keeps the current generation and the 16 before it;
- threads sharing one wrapper each get what a serial run gets, generations being per thread.

Every result is compared with dcfx run serially or before the change of state, or with the
plain U-Net on full steps.
"""

from __future__ import annotations

import re
import threading

import pytest
import torch
from _tiny_unet import CROSS_DIM, LATENT, TOKENS, tiny_unet, unet_inputs
from diffusers import DDIMScheduler

import dcfx


# -- changes of state: moves, replaced parameters, a failed capture ------------------------------


@pytest.mark.slow
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


@pytest.mark.slow
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


# -- history ------------------------------------------------------------------------------------


def test_history_keeps_the_current_generation_and_the_16_before_it(unet):
    # Generations of 1, 2 and 3 steps in turn (interval 2: "F", "FS", "FSF"), so that the
    # entries kept show which generations they are, and in which order.
    fast = dcfx.optimize(unet, interval=2)
    x, ehs = unet_inputs(batch=1)
    patterns = ("F", "FS", "FSF")
    with torch.no_grad():
        for g in range(20):
            fast.begin()
            for _ in range(g % 3 + 1):
                fast(x, 900, ehs)
            assert fast.history[-1] == patterns[g % 3]
    assert fast.history == tuple(patterns[g % 3] for g in range(3, 20))


# -- threads ------------------------------------------------------------------------------------


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


@pytest.mark.slow
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
