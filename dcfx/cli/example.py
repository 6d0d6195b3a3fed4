"""`dcfx example`: DeepCache end to end on a random-weight U-Net, step by step.

Builds an SD-shaped UNet2DConditionModel (`dcfx.models.random_unet`: random weights, nothing
downloaded), samples with
DDIM once plainly and once through `dcfx.optimize`, and prints for every step whether it ran
the full or the shallow graph and how long it took, then the FLOPs of both graphs (from
`dcfx.report`), the total times and how far the result is from the plain U-Net's.
"""

from __future__ import annotations

import argparse
import time

import torch
from diffusers import DDIMScheduler

from .. import DeepCacheConfig, optimize, report
from ..models.calls import example_call
from ..models.sd_shaped import SIZES, random_unet
from ._model import parse_device


def _sample(unet, scheduler, latents, ehs, steps):
    scheduler.set_timesteps(steps)
    times = []
    for t in scheduler.timesteps:
        start = time.perf_counter()
        eps = unet(torch.cat([latents] * 2), t, encoder_hidden_states=ehs).sample
        times.append(time.perf_counter() - start)
        eps_uncond, eps_text = eps.chunk(2)
        latents = scheduler.step(eps_uncond + 7.5 * (eps_text - eps_uncond), t, latents).prev_sample
    return latents, times


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", choices=SIZES, default="small", help="U-Net widths")
    p.add_argument("--resolution", type=int, default=16, help="latent height and width")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--interval", type=int, default=3)
    p.add_argument("--branch", type=int, default=0)
    p.add_argument("--schedule", choices=("uniform", "nonuniform"), default="uniform")
    p.add_argument("--compile", action="store_true", help="torch.compile both graphs (slow first step)")
    p.add_argument("--repeats", type=int, default=2, help="generations timed per variant")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def run(args: argparse.Namespace) -> None:
    """Samples plainly and with dcfx, timed; prints the steps, FLOPs and totals."""
    for name in ("resolution", "steps", "repeats"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    device = parse_device(args.device)
    if device.type == "meta":
        raise ValueError("--device meta computes nothing to time; use cpu or cuda")
    config = DeepCacheConfig(
        interval=args.interval, branch=args.branch, schedule=args.schedule, compile=args.compile
    )
    torch.manual_seed(0)
    unet = random_unet(args.size).to(device)
    call = example_call(unet, 1, args.resolution)  # one prompt, guided: a batch of 2
    latents, ehs = call.args[0][:1], call.kwargs["encoder_hidden_states"]
    fast = optimize(unet, config)
    scheduler = DDIMScheduler()

    with torch.no_grad():
        print(report(fast, *call.args, **call.kwargs, num_steps=args.steps, branches=[args.branch]))
        fast.begin(args.steps)  # the first generation also captures (and compiles) the graphs
        _sample(fast, scheduler, latents, ehs, args.steps)
        # Alternate plain and dcfx generations and keep each step's best time: this machine
        # may be shared, and ratios from one interleaved run are what can be compared.
        plain_times, fast_times = [float("inf")] * args.steps, [float("inf")] * args.steps
        for _ in range(args.repeats):
            plain, times = _sample(unet, scheduler, latents, ehs, args.steps)
            plain_times = list(map(min, plain_times, times))
            fast.begin(args.steps)
            cached, times = _sample(fast, scheduler, latents, ehs, args.steps)
            fast_times = list(map(min, fast_times, times))

    print(f"\n{'step':>4}  {'t':>4}  {'graph':<7}  {'plain ms':>9}  {'dcfx ms':>8}")
    scheduler.set_timesteps(args.steps)
    for i, (t, kind) in enumerate(zip(scheduler.timesteps.tolist(), fast.history[-1])):
        graph = "full" if kind == "F" else "shallow"
        print(f"{i:>4}  {t:>4}  {graph:<7}  {1e3 * plain_times[i]:>9.2f}  {1e3 * fast_times[i]:>8.2f}")
    total_plain, total_fast = sum(plain_times), sum(fast_times)
    rel = ((cached - plain).norm() / plain.norm()).item()
    print(
        f"\n{args.size} U-Net on {device.type}, {args.steps} steps: plain {total_plain:.3f} s, "
        f"dcfx {total_fast:.3f} s ({total_plain / total_fast:.2f}x); "
        f"final latents differ from plain by {rel:.2e} (relative; random weights lack the "
        f"step-to-step feature similarity of trained models, so this is no quality measure)"
    )
    if fast.compile_seconds:
        print("compile seconds:", {k: round(v, 1) for k, v in fast.compile_seconds.items()})
