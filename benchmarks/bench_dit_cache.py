"""Step caching on one Flux-shaped transformer: diffusers' hooks against dcfx, eager and compiled.

    python -P benchmarks/bench_dit_cache.py                  # the trained flux-digits model, ~10 min on 2 cores
    python -P benchmarks/bench_dit_cache.py --quick          # tiny random Flux, a ~1 minute smoke run
    python -P benchmarks/bench_dit_cache.py --model flux-width --device cuda --dtype bf16   # Flux's width

Same noise, one process. Rows: the plain transformer eager and under torch.compile;
FirstBlockCache (`transformer.enable_cache(FirstBlockCacheConfig(threshold))`, its threshold
searched so that it runs as many full steps as dcfx at interval 2, and 3) eager and compiled;
TaylorSeerCache compiled; dcfx (Fn=1, Bn=0) at interval 2 and 3 and adaptive "cut", eager, with
`compile=True`, and inside `torch.compile(fullgraph=True)`; on CUDA also `dcfx.cuda_graphs`.
Prints a markdown table (and writes it with the command and the machine to --out).
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dit_cache as dc  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "dit_cache.md"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ALL_ROWS = ("eager", "compile", "fbc-2", "fbc-3", "fbc-2-compile", "taylorseer-compile",
            "dcfx-2", "dcfx-3", "dcfx-cut", "dcfx-2-compile", "dcfx-3-compile", "dcfx-cut-compile",
            "dcfx-2-fullgraph", "dcfx-2-cudagraph")
QUICK_ROWS = ("eager", "compile", "fbc-2", "fbc-2-compile", "dcfx-2", "dcfx-2-compile", "dcfx-2-fullgraph")


def setup_of(args: argparse.Namespace) -> dc.Setup:
    if args.model == "flux-digits":
        return dc.flux_digits(args.steps)
    image, text = args.tokens
    width = args.width or (64 if args.model == "tiny" else 3072)
    if args.model == "tiny":
        config = dc.flux_config(width, 16, 24, 12, 2, 4)
    else:  # Flux's width, T5's and CLIP's sizes (scaled down with a small width), fewer blocks
        big = width >= 1024
        config = dc.flux_config(width, 64, 4096 if big else width, 768 if big else width, args.double, args.single)
    return dc.random_flux(config, image, text, args.steps, dtype=DTYPES[args.dtype], device=args.device)


def full_of(fast) -> callable:
    return lambda: f"{fast.history[-1].count('F')}/{len(fast.history[-1])}"


def match_threshold(loop: dc.Loop, target: int, trials: int = 10) -> tuple[float, int]:
    """A FirstBlockCache threshold whose eager generation runs `target` full steps (bisection on
    log threshold; the closest found if none matches). The hook is left enabled."""
    from diffusers import FirstBlockCacheConfig

    t = loop.setup.transformer
    low, high, best = 1e-5, 10.0, None
    for _ in range(trials):
        mid = (low * high) ** 0.5
        t.enable_cache(FirstBlockCacheConfig(threshold=mid))
        counter = dc.FullStepCounter(t)
        loop.run(t)
        t.disable_cache()
        if best is None or abs(counter.full - target) < abs(best[1] - target):
            best = (mid, counter.full)
        if counter.full == target:
            break
        low, high = (mid, high) if counter.full > target else (low, mid)
    return best


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("flux-digits", "tiny", "flux-width"), default=None)
    p.add_argument("--steps", type=int, default=None, help="default: 25 (flux-digits), 10 (others), 6 (--quick)")
    p.add_argument("--repeats", type=int, default=None, help="timed generations per row (median); default 3, 1 with --quick")
    p.add_argument("--rows", nargs="+", choices=ALL_ROWS, default=None)
    p.add_argument("--width", type=int, help="hidden size of tiny / flux-width (default 64 / 3072)")
    p.add_argument("--tokens", type=int, nargs=2, metavar=("IMAGE", "TEXT"), default=None,
                   help="image and text tokens (default: tiny 16 8, flux-width 4096 512)")
    p.add_argument("--double", type=int, default=2)
    p.add_argument("--single", type=int, default=4)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    p.add_argument("--quick", action="store_true", help="tiny model, few steps and rows, one repeat")
    p.add_argument("--out", type=Path, help="markdown file (default: benchmarks/results/dit_cache.md for flux-digits without --quick)")
    args = p.parse_args(argv)
    args.model = args.model or ("tiny" if args.quick else "flux-digits")
    args.steps = args.steps or (6 if args.quick else 25 if args.model == "flux-digits" else 10)
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.tokens = args.tokens or ((16, 8) if args.model == "tiny" else (4096, 512))
    rows_wanted = args.rows or (QUICK_ROWS if args.quick else [r for r in ALL_ROWS if r != "dcfx-2-cudagraph" or args.device != "cpu"])
    out = args.out or (RESULTS if args.model == "flux-digits" and not args.quick else None)

    import dcfx
    from dcfx import DeepCacheConfig
    from diffusers import FirstBlockCacheConfig, TaylorSeerCacheConfig

    setup = setup_of(args)
    loop, t = dc.Loop(setup), setup.transformer
    rows: list[dc.Row] = []
    reference = None
    fasts = {}

    def fast_of(name: str, compiled: bool):
        key = name.split("-")[1]
        policy = dict(adaptive="cut") if key == "cut" else dict(interval=int(key))
        return dcfx.optimize(t, DeepCacheConfig(first_blocks=1, last_blocks=0, compile=compiled, **policy))

    def add(name: str, compiled: bool, run, full=None, fullgraph: str = "-") -> None:
        nonlocal reference
        row = dc.Row(name, compiled, fullgraph=fullgraph)
        out_latent = dc.measure(row, run, reference, args.repeats, full)
        if name == "eager":
            reference = out_latent
            row.distance = None
        rows.append(row)
        print(dc.markdown([row], None, setup.steps).splitlines()[-1], flush=True)

    def compiled_plain(module):
        """torch.compile with fullgraph=True if that runs a generation, else without."""
        try:
            c = torch.compile(module, fullgraph=True)
            loop.run(c)
            return c, "yes"
        except Exception as e:
            torch._dynamo.reset()
            return torch.compile(module), f"no ({type(e).__name__})"

    targets = {}
    for name in rows_wanted:
        if name == "eager":
            add(name, False, lambda: loop.run(t), lambda: f"{setup.steps}/{setup.steps}")
        elif name == "compile":
            c, fg = compiled_plain(t)
            add(name, True, lambda: loop.run(c), lambda: f"{setup.steps}/{setup.steps}", fg)
        elif name.startswith("fbc"):
            interval = int(name.split("-")[1])
            if interval not in targets:
                targets[interval] = len(fast_of(f"dcfx-{interval}", False).full_steps(setup.steps))
            threshold, _ = match_threshold(loop, targets[interval])
            t.enable_cache(FirstBlockCacheConfig(threshold=threshold))
            counter = dc.FullStepCounter(t)
            model, fg = compiled_plain(t) if name.endswith("compile") else (t, "-")

            def run(model=model, counter=counter):
                counter.reset()
                t._reset_stateful_cache()
                return loop.run(model)

            add(f"{name} (threshold {threshold:.3g})", model is not t, run,
                lambda counter=counter: f"{counter.full}/{counter.steps}", fg)
            t.disable_cache()
        elif name == "taylorseer-compile":
            t.enable_cache(TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1))
            counter = dc.FullStepCounter(t)
            model, fg = compiled_plain(t)

            def run(model=model, counter=counter):
                counter.reset()
                t._reset_stateful_cache()
                return loop.run(model)

            add("taylorseer-compile (interval 2)", True, run, lambda: f"{counter.full}/{counter.steps}", fg)
            t.disable_cache()
        elif name.endswith("fullgraph"):
            fast = fast_of(name, False)
            model = torch.compile(fast, fullgraph=True)
            add(name, True, lambda: loop.run(model), full_of(fast), "yes")
        elif name.endswith("cudagraph"):
            fast = fast_of(name, True)
            add(name, True, loop.run_captured(lambda **call: dcfx.cuda_graphs(fast, return_dict=False, **call)),
                lambda: f"{len(fast.full_steps(setup.steps))}/{setup.steps}")
        else:
            fast = fast_of(name, name.endswith("compile"))
            add(name, name.endswith("compile"), lambda: loop.run(fast), full_of(fast), "-")

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{cpu}, {torch.get_num_threads()} threads"
    import diffusers

    text = "\n".join([
        f"`{' '.join(['python -P benchmarks/bench_dit_cache.py', *(argv if argv is not None else sys.argv[1:])])}`",
        "",
        f"{args.model}, {setup.steps} steps, {args.dtype}, median of {args.repeats} generations after 2 warm-up ones; "
        f"{device}; torch {torch.__version__}, diffusers {diffusers.__version__}",
        "",
        dc.markdown(rows, "compile", setup.steps),
        "",
        "Full steps: dcfx's history, the hooks' own decisions (FirstBlockCache's threshold searched so that its "
        "eager run matches dcfx's full steps at that interval). Graph breaks: dynamo's `counters['graph_break']` "
        "over the warm-up and timed generations (a break is counted when its frame is traced); recompiles: graphs "
        "compiled during the timed generations (`counters['stats']['unique_graphs']`), the same counters for hooks "
        "and dcfx. fullgraph=True: whether `torch.compile(..., fullgraph=True)` ran a generation (else the error "
        "type, and the row ran without it). rel. L2: the final latent against the plain eager one.",
    ])
    print("\n" + text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    return text


if __name__ == "__main__":
    main()
