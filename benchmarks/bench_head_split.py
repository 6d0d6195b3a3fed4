"""What a full step costs when the adaptive policies split it into head + rest.

    python benchmarks/bench_head_split.py [--arch sd15] [--resolution 32] [--branch 0]
        [--device cpu|cuda] [--dtype fp32|fp16] [--repeats 21] [--compile]

An adaptive policy ("cut", "accumulated") runs the head graph first, reads its signal, then
the rest (full step) or the tail (shallow step). Head + rest compute exactly the full graph's
nodes; what can cost more is the boundary: one more graph launch, and no fusion across it
when compiled. The goal is at most 2% over the full graph. This times, on the same inputs
and interleaved (median and min-max over `--repeats` rounds, each round one call of each):

- full: dcfx's full graph (a fixed policy's full step);
- head + rest: the two graphs of an adaptive full step, back to back;
- signal: the adaptive step's signal (relative L1 of the fresh feature, one scalar read).

Eager graphs by default; `--compile` compiles every graph with inductor; on CUDA each variant
is also captured in CUDA graphs (head and rest as two graphs, as `dcfx.cuda_graphs` replays
them). Random weights (the timing does not depend on them). Prints one table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_unet import DTYPES, build_arch, conditioning, machine, versions  # noqa: E402

import dcfx  # noqa: E402
from dcfx.policies import relative_l1  # noqa: E402


def timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def captured(fns: list[Callable[[], object]]) -> Callable[[], None]:
    """Each of `fns` in its own CUDA graph, replayed back to back."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            for fn in fns:
                fn()
    torch.cuda.current_stream().wait_stream(side)
    graphs = []
    for fn in fns:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        graphs.append(g)

    def replay() -> None:
        for g in graphs:
            g.replay()
    return replay


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="sd15", help="random-weight architecture (bench_unet.py's --arch)")
    p.add_argument("--resolution", type=int, default=32, help="latent height and width")
    p.add_argument("--branch", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--repeats", type=int, default=21)
    p.add_argument("--compile", action="store_true", help="inductor-compile every graph")
    args = p.parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    torch.manual_seed(0)
    unet = build_arch(args.arch).to(device, dtype)
    rows = 2
    x = torch.randn(rows, unet.config.in_channels, args.resolution, args.resolution, device=device, dtype=dtype)
    t = torch.tensor(999, device=device)
    cond = conditioning(unet.config, rows, device, dtype)
    fixed = dcfx.optimize(unet, interval=3, branch=args.branch, compile=args.compile)
    adaptive = dcfx.optimize(unet, adaptive="cut", branch=args.branch, compile=args.compile)
    with torch.no_grad():
        for fast in (fixed, adaptive):
            fast(x, t, **cond)  # capture (and compile the full step's graphs)
        (full_entry,) = fixed.runtime.entries.current.values()
        (head_entry,) = adaptive.runtime.entries.current.values()
        full_c, head_c = fixed.runtime.compiler, adaptive.runtime.compiler
        inputs = fixed.graphs(x, t, **cond).inputs
        boundary = head_entry.graphs["head"](head_c, *inputs)
        fresh = boundary[head_entry.layout.cut_index]
        reference = fresh.clone()

        def full() -> object:
            return full_entry.graphs["full"](full_c, *inputs)

        def head() -> object:
            return head_entry.graphs["head"](head_c, *inputs)

        def rest() -> object:
            return head_entry.graphs["rest"](head_c, *inputs, *boundary)

        def signal() -> float:
            return float(relative_l1(fresh, reference).item())

        variants = {"full": [full], "head + rest": [head, rest], "signal": [signal]}
        runs = {name: (lambda fns=fns: [f() for f in fns]) for name, fns in variants.items()}
        if device.type == "cuda":
            runs["full, CUDA graph"] = captured([full])
            runs["head + rest, CUDA graphs"] = captured([head, rest])
        for run in runs.values():
            run()
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, run in runs.items():
                times[name].append(timed(run, device))
    med = {name: statistics.median(v) for name, v in times.items()}
    print(f"dcfx head split: {args.arch} U-Net (random weights), latent {args.resolution}x{args.resolution}, "
          f"batch {rows}, {args.dtype}, branch {args.branch}, {'inductor' if args.compile else 'eager'} graphs")
    print(f"{machine(device)}; {versions()}; median and min-max of {args.repeats} interleaved rounds")
    print(f"{'variant':<26} {'ms':>9} {'min-max ms':>17} {'vs full':>8}")
    for name, values in times.items():
        base = med["full, CUDA graph"] if "CUDA" in name else med["full"]
        ratio = "" if name == "signal" else f"{med[name] / base:7.3f}x"
        print(f"{name:<26} {med[name] * 1e3:9.3f} {min(values) * 1e3:8.3f}-{max(values) * 1e3:<8.3f} {ratio:>8}")
    print("goal: head + rest at most 1.02x the full graph")


if __name__ == "__main__":
    main()
