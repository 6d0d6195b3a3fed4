"""How good the Flux-shaped digits model's samples are, and which flow solvers converge on it.

    python -P benchmarks/flux_digits_quality.py [--model DIR] [--per-label 10] [--threads 1]
        [--guidance 1.0 1.5 2.0 3.0] [--steps 10 25 50] [--shift S] [--skip-quality] [--skip-convergence]

Quality: for each guidance scale and step count, 10 samples per label (100) from the same
noise with flow matching's Euler scheduler (the model's own), scored by the digits judge
(`dcfx.models.quality`): the fraction labelled as the asked digit and the Fréchet distance to the
held-out digits in the judge's feature space (compare only at equal sample counts).

Convergence (at the model's default guidance): each solver at 10, 25 and 50 steps against the
same solver at 200 steps (PSNR of pixels in [0, 1], same noise and labels), and against one
shared reference, Heun at 200 steps (399 transformer calls per sample and guidance branch). A
solver converges if its PSNR keeps climbing with steps. Solvers: `FlowMatchEulerDiscreteScheduler`
(1 call per step), `FlowMatchHeunDiscreteScheduler` (2 per step, less 1), and UniPC and
DPM-Solver++ 2M with flow sigmas (`use_flow_sigmas=True, prediction_type="flow_prediction"`,
1 per step). Prints two tables and the machine.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    UniPCMultistepScheduler,
)

from dcfx.models.flux_digits import DEFAULT_GUIDANCE_SCALE, WEIGHTS_DIR, load_flux_digits
from dcfx.models.quality import judge, psnr

REFERENCE_STEPS = 200
SOLVER_STEPS = (10, 25, 50)


def solvers(shift: float) -> dict[str, tuple[object, int]]:
    """name -> (scheduler, transformer calls per step beyond the first)."""
    flow = dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=shift)
    return {
        "Euler": (FlowMatchEulerDiscreteScheduler(shift=shift), 1),
        "Heun": (FlowMatchHeunDiscreteScheduler(shift=shift), 2),
        "UniPC": (UniPCMultistepScheduler(**flow), 1),
        "DPM-Solver++ 2M": (DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, **flow), 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=WEIGHTS_DIR)
    p.add_argument("--per-label", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0])
    p.add_argument("--steps", type=int, nargs="+", default=[10, 25, 50])
    p.add_argument("--shift", type=float, help="sigma shift of every solver (default: the model's scheduler's)")
    p.add_argument("--skip-quality", action="store_true")
    p.add_argument("--skip-convergence", action="store_true")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    pipe = load_flux_digits(args.model)
    pipe.set_progress_bar_config(disable=True)
    labels = torch.arange(10).repeat_interleave(args.per_label)
    noise = torch.randn(len(labels), 1, 16, 16, generator=torch.Generator().manual_seed(args.seed))
    j = judge()
    print(f"Flux digits model {args.model}: {len(labels)} samples ({args.per_label} per label), seed {args.seed}, "
          f"torch threads {args.threads}, {platform.machine()} {platform.processor() or ''}; "
          f"judge accuracy on held-out digits {j.test_accuracy:.1%}")

    def sample(steps: int, guidance: float, scheduler=None) -> torch.Tensor:
        if scheduler is not None:
            pipe.scheduler = scheduler
        return pipe(labels, num_inference_steps=steps, guidance_scale=guidance, latents=noise, output_type="pt").images

    euler = pipe.scheduler
    if args.shift is not None:
        euler = FlowMatchEulerDiscreteScheduler.from_config(euler.config, shift=args.shift)
    if not args.skip_quality:
        print("\n| guidance | steps | accuracy | Fréchet | seconds |\n|---:|---:|---:|---:|---:|")
        for g in args.guidance:
            for n in args.steps:
                start = time.perf_counter()
                images = sample(n, g, euler)
                seconds = time.perf_counter() - start
                print(f"| {g:g} | {n} | {j.accuracy(images, labels):.0%} | {j.frechet_to_test(images):.1f} | {seconds:.1f} |",
                      flush=True)

    if not args.skip_convergence:
        g = DEFAULT_GUIDANCE_SCALE
        shift = euler.config.shift
        table = solvers(shift)
        reference = {name: sample(REFERENCE_STEPS, g, s) for name, (s, _) in table.items()}
        shared = reference["Heun"]
        print(f"\nConvergence at guidance {g:g}, shift {shift:g}: PSNR (dB) against the same solver at "
              f"{REFERENCE_STEPS} steps / against Heun {REFERENCE_STEPS}; calls = transformer calls per "
              "sample and guidance branch")
        print("\n| solver | steps | calls | vs own 200 | vs Heun 200 | accuracy |\n|---|---:|---:|---:|---:|---:|")
        for name, (scheduler, calls) in table.items():
            for n in (*SOLVER_STEPS, REFERENCE_STEPS):
                images = reference[name] if n == REFERENCE_STEPS else sample(n, g, scheduler)
                own = "-" if n == REFERENCE_STEPS else f"{psnr(images, reference[name]):.1f}"
                print(f"| {name} | {n} | {calls * n - (calls - 1)} | {own} | {psnr(images, shared):.1f} | "
                      f"{j.accuracy(images, labels):.0%} |", flush=True)


if __name__ == "__main__":
    main()
