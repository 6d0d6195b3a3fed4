"""Cold start: process start to the first generation, compiled four ways, each in a fresh process.

    python benchmarks/bench_package.py [--size small] [--resolution 16] [--batch 2] [--steps 10]
                                       [--interval 3] [--branch 0] [--threads 1] [--no-mega]
                                       [--work DIR] [--out table.md]

Random-weight U-Net from `dcfx.models.random_unet(size)` (seed 0), DDIM, `begin(steps)`,
the U-Net called as `unet(x, t, encoder_hidden_states=..., return_dict=False)`. Each variant
is a new Python process, timed from just before the parent spawns it to the end of its first
generation (interpreter start, imports, model, compile or load, generation), in this order:

- dcfx:      `dcfx.optimize(unet)`, graphs uncompiled (the reference for the outputs)
- cold:      `compile=True` with an empty inductor cache (`TORCHINDUCTOR_CACHE_DIR` a new
             folder): a fresh machine. At the end it saves the mega-cache
             (`torch.compiler.save_cache_artifacts`)
- warm:      `compile=True` again on cold's cache folder: inductor's FX-graph cache
             (`TORCHINDUCTOR_FX_GRAPH_CACHE`, on by default) and AOTAutograd cache are warm
- mega:      `compile=True` on another empty cache folder after
             `torch.compiler.load_cache_artifacts(<cold's artifacts>)`
- package:   `dcfx.package(...)` on an empty cache folder (one-off; not a generation)
- load:      `dcfx.load_package(...)` on an empty cache folder, no U-Net built

The table gives each phase, the second generation (steady state) and the largest absolute
difference of the final latents from uncompiled dcfx and from cold `compile=True`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = ("dcfx", "cold", "warm", "mega", "package", "load")
LABELS = {
    "dcfx": "uncompiled dcfx graphs",
    "cold": "`compile=True`, cold (empty inductor cache)",
    "warm": "`compile=True`, warm FX-graph cache (same cache folder)",
    "mega": "`compile=True`, mega-cache (`load_cache_artifacts`, empty folder)",
    "load": "AOT package (`load_package`, empty inductor cache)",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", choices=("tiny", "small", "sd15"), default="small")
    p.add_argument("--resolution", type=int, default=16, help="latent height and width")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--interval", type=int, default=3)
    p.add_argument("--branch", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--no-mega", action="store_true", help="skip the mega-cache variant")
    p.add_argument("--work", help="folder for caches, package and outputs (default: a new temporary one)")
    p.add_argument("--out", help="also write the markdown table to this file")


# -- child processes --------------------------------------------------------------------------


def _child(args: argparse.Namespace) -> None:
    """One variant, in its own process: times its phases, saves its latents, prints JSON."""
    imported = time.time()
    import torch

    torch.set_num_threads(args.threads)
    from diffusers import DDIMScheduler

    import dcfx
    from dcfx.models import random_unet
    from dcfx.aot import load_package, package

    work = Path(args.work)
    variant = args.child
    report = {"import_s": time.time() - imported}
    start = time.time()
    if variant == "mega":
        artifacts = (work / "mega.bin").read_bytes()
        torch.compiler.load_cache_artifacts(artifacts)
    if variant == "load":
        fast = load_package(work / "model.pt2")
        width = fast.config.cross_attention_dim
    else:
        torch.manual_seed(0)
        unet = random_unet(args.size)
        width = unet.config.cross_attention_dim
        fast = dcfx.optimize(
            unet, interval=args.interval, branch=args.branch, compile=variant in ("cold", "warm", "mega")
        )
    report["model_s"] = time.time() - start

    g = torch.Generator().manual_seed(1)
    latents = torch.randn(args.batch, 4, args.resolution, args.resolution, generator=g)
    ehs = torch.randn(args.batch, 77, width, generator=g)
    scheduler = DDIMScheduler()

    if variant == "package":
        scheduler.set_timesteps(args.steps)
        start = time.time()
        path = package(
            fast, work / "model.pt2", latents, scheduler.timesteps[0], encoder_hidden_states=ehs, return_dict=False
        )
        report["package_s"] = time.time() - start
        report["package_bytes"] = path.stat().st_size
        report["weights_bytes"] = sum(t.numel() * t.element_size() for t in unet.state_dict().values())
        print(json.dumps(report))
        return

    def generate():
        scheduler.set_timesteps(args.steps)
        fast.begin(args.steps)
        x = latents
        with torch.no_grad():
            for t in scheduler.timesteps:
                eps = fast(x, t, encoder_hidden_states=ehs, return_dict=False)[0]
                x = scheduler.step(eps, t, x).prev_sample
        return x

    start = time.time()
    x = generate()
    report["first_s"] = time.time() - start
    report["total_s"] = time.time() - args.spawned_at
    start = time.time()
    generate()
    report["second_s"] = time.time() - start
    report["history"] = fast.history[-1]
    torch.save(x, work / f"{variant}.pt")
    if variant == "cold" and not args.no_mega:
        saved = torch.compiler.save_cache_artifacts()
        if saved is not None:
            (work / "mega.bin").write_bytes(saved[0])
    print(json.dumps(report))


def _spawn(args: argparse.Namespace, variant: str, work: Path) -> dict:
    cache = work / ("cache-cold" if variant in ("cold", "warm") else f"cache-{variant}")
    cache.mkdir(exist_ok=True)
    env = dict(
        os.environ,
        TORCHINDUCTOR_CACHE_DIR=str(cache),
        OMP_NUM_THREADS=str(args.threads),
        PYTHONUNBUFFERED="1",
    )
    argv = [sys.executable, __file__, "--child", variant, "--work", str(work)] + _model_argv(args)
    print(f"[{variant}] ...", file=sys.stderr, flush=True)
    spawned = time.time()
    done = subprocess.run(argv + ["--spawned-at", repr(spawned)], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"variant {variant} failed:\n{done.stderr[-4000:]}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"[{variant}] {report}", file=sys.stderr, flush=True)
    return report


def _model_argv(args: argparse.Namespace) -> list[str]:
    argv = [
        "--size", args.size, "--resolution", str(args.resolution), "--batch", str(args.batch),
        "--steps", str(args.steps), "--interval", str(args.interval), "--branch", str(args.branch),
        "--threads", str(args.threads),
    ]
    return argv + (["--no-mega"] if args.no_mega else [])


# -- parent -----------------------------------------------------------------------------------


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _table(args: argparse.Namespace, reports: dict[str, dict], work: Path) -> str:
    import torch

    reference = torch.load(work / "dcfx.pt")
    cold = torch.load(work / "cold.pt")
    rows = [
        "| variant | import s | model s | first generation s | process start to first generation s "
        "| second generation s | max abs diff vs dcfx | vs cold compile |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for variant, label in LABELS.items():
        if variant not in reports:
            continue
        r = reports[variant]
        x = torch.load(work / f"{variant}.pt")
        rows.append(
            f"| {label} | {r['import_s']:.1f} | {r['model_s']:.1f} | {r['first_s']:.1f} | **{r['total_s']:.1f}** "
            f"| {r['second_s']:.2f} | {(x - reference).abs().max().item():.1e} | {(x - cold).abs().max().item():.1e} |"
        )
    p = reports["package"]
    histories = {r["history"] for v, r in reports.items() if "history" in r}
    command = "python benchmarks/bench_package.py " + shlex.join(_model_argv(args))
    lines = [
        f"U-Net `{args.size}` (random weights, seed 0), latent {args.resolution}x{args.resolution}, batch "
        f"{args.batch}, {args.steps} DDIM steps, N={args.interval}, b={args.branch}, fp32; "
        f"{_cpu()}, {os.cpu_count()} cores, {args.threads} torch thread(s); torch {torch.__version__}.",
        f"Command: `{command}`. Steps per generation: {', '.join(sorted(histories))}.",
        "",
        *rows,
        "",
        f"Packaging (one-off, empty inductor cache): {p['model_s'] + p['package_s']:.1f} s "
        f"({p['package_s']:.1f} s in `dcfx.package`); package {p['package_bytes'] / 2**20:.1f} MiB "
        f"for {p['weights_bytes'] / 2**20:.1f} MiB of weights.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--spawned-at", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args)
        return
    with tempfile.TemporaryDirectory(prefix="dcfx-bench-package-") as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        reports = {}
        for variant in VARIANTS:
            if variant == "mega" and not args.no_mega and not (work / "mega.bin").exists():
                print("torch.compiler.save_cache_artifacts() returned nothing: no mega-cache row", file=sys.stderr)
            if variant != "mega" or (work / "mega.bin").exists() and not args.no_mega:
                reports[variant] = _spawn(args, variant, work)
        table = _table(args, reports, work)
    print(table)
    if args.out:
        Path(args.out).write_text(table)


if __name__ == "__main__":
    main()
