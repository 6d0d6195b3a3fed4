"""What the per-step profiler/NVTX ranges cost when no profiler is running.

    python benchmarks/bench_overhead.py [--sizes tiny small] [--resolution 16] [--device cpu]

Every graph run in `DeepCacheUNet.forward` sits in `dcfx.runtime.run.graph_range`
(`dcfx.full[bB]`, `dcfx.shallow[bB]`, and `dcfx.cache_copy` inside full steps): a
`record_function` entered only while a profiler runs, and on CUDA an NVTX range. Two measurements, no profiler active:

1. the range alone: one enter/exit of `_range` in a tight loop (median of repeated loops),
   next to an always-on `record_function` for comparison; a shallow step enters one range,
   a full step two;
2. a shallow step with the ranges and with `_range` patched to a no-op, on random-weight
   SD-shaped U-Nets (`dcfx.models.random_unet`), blocks of the two variants interleaved;
   the median difference and its spread show whether the cost is visible at all next to
   the machine's noise.

Prints one table; the range cost as a share of a shallow step is (1) / median step time.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

import dcfx
import dcfx.runtime.run
from dcfx._torch_private import profiler_enabled
from dcfx.models import random_unet


def per_call_us(fn, calls: int, repeats: int) -> float:
    """Median over `repeats` loops of `calls` calls of fn(), in microseconds per call."""
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(samples)


def range_cost_us(cuda: bool, calls: int = 20000, repeats: int = 15) -> tuple[float, float]:
    """(dcfx's range, an always-on record_function) enter/exit, µs each."""
    assert not profiler_enabled()

    def dcfx_range():
        with dcfx.runtime.run.graph_range("dcfx.shallow[b0]", cuda):
            pass

    def record_function():
        with torch.profiler.record_function("dcfx.shallow[b0]"):
            pass

    return per_call_us(dcfx_range, calls, repeats), per_call_us(record_function, calls // 4, repeats)


@torch.no_grad()
def shallow_step_times(size: str, args: argparse.Namespace, device: torch.device) -> tuple[list[float], list[float]]:
    """Per-block median shallow-step times (s), with the ranges and without, interleaved."""
    torch.manual_seed(0)
    with torch.device(device):
        unet = random_unet(size)
    x = torch.randn(args.batch, 4, args.resolution, args.resolution, device=device)
    t = torch.tensor(999, device=device)
    ehs = torch.randn(args.batch, 77, unet.config.cross_attention_dim, device=device)
    # One full step, then only shallow ones: a repeat of the same call is the next step.
    fast = dcfx.optimize(unet, interval=10**9)
    fast.begin()
    fast(x, t, encoder_hidden_states=ehs)
    original = dcfx.runtime.run.graph_range

    def block() -> float:
        steps = []
        for _ in range(args.steps):
            start = time.perf_counter()
            fast(x, t, encoder_hidden_states=ehs)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            steps.append(time.perf_counter() - start)
        return statistics.median(steps)

    block()  # warm-up: the shallow graph's first run
    with_ranges, without = [], []
    try:
        for i in range(2 * args.blocks):
            # Alternate which variant goes first, so a drift in machine load hits both alike.
            off = (i % 2 == 0) == (i // 2 % 2 == 0)
            dcfx.runtime.run.graph_range = (lambda name, cuda: contextlib.nullcontext()) if off else original
            (without if off else with_ranges).append(block())
    finally:
        dcfx.runtime.run.graph_range = original
    assert fast.history[-1].count("F") == 1
    return with_ranges, without


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", choices=("tiny", "small", "sd15"), default=["tiny", "small"])
    p.add_argument("--resolution", type=int, default=16, help="latent height and width (default: 16)")
    p.add_argument("--batch", type=int, default=2, help="U-Net batch (default: 2, one prompt with guidance)")
    p.add_argument("--blocks", type=int, default=10, help="blocks per variant (default: 10)")
    p.add_argument("--steps", type=int, default=20, help="shallow steps per block (default: 20)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default: 1)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"

    range_us, record_us = range_cost_us(cuda)
    print(
        f"dcfx range overhead, no profiler active: torch {torch.__version__}, {device}, "
        f"{torch.get_num_threads()} thread(s), latent {args.resolution}x{args.resolution}, batch {args.batch}; "
        f"{args.blocks} blocks of {args.steps} shallow steps per variant, interleaved"
    )
    print(
        f"one range enter/exit (dcfx.runtime.run.graph_range{', with NVTX' if cuda else ''}): {range_us:.2f} µs; "
        f"an always-on torch.profiler.record_function for comparison: {record_us:.2f} µs"
    )
    head = ("model", "shallow step ms", "range µs/step", "% of step", "A/B with-without µs", "A/B spread µs")
    rows = []
    for size in args.sizes:
        with_ranges, without = shallow_step_times(size, args, device)
        step = statistics.median(with_ranges + without)
        diffs = [(a - b) * 1e6 for a, b in zip(with_ranges, without)]
        q = statistics.quantiles(diffs, n=4) if len(diffs) > 1 else [diffs[0]] * 3
        rows.append((
            size, f"{step * 1e3:.3f}", f"{range_us:.2f}", f"{100 * range_us * 1e-6 / step:.3f}%",
            f"{statistics.median(diffs):+.1f}", f"{q[0]:+.1f} .. {q[2]:+.1f}",
        ))
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    print("\n".join([line(head), line(["-" * w for w in widths]), *map(line, rows)]))
    print("(A/B: per-block medians, with ranges minus without, median and interquartile range over block pairs)")


if __name__ == "__main__":
    main()
