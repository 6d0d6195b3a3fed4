"""The training loop the demo models share: label-dropout batches, AdamW, EMA, the saved run.

A model's trainer builds its networks and a loss `(images, labels, generator) -> loss`; `train`
does the rest: shuffled batches of the digits training split with labels dropped to "no label"
(classifier-free guidance's unconditional input), AdamW with linear warm-up and cosine decay to
a tenth of the peak, gradient clipping at 1, an exponential moving average of the weights that
replaces them at the end, and a tqdm bar with the smoothed loss. Every random draw comes from
one generator seeded with `--seed`, in a fixed order: the same machine, thread count and
versions give the same weights.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from diffusers import DiffusionPipeline
from tqdm.auto import tqdm

Loss = Callable[[torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor]


def add_arguments(
    parser: argparse.ArgumentParser, *, out: Path, steps: int, batch: int, lr: float, warmup: int, ema: float
) -> None:
    """The options every trainer takes, with that model's defaults."""
    parser.add_argument("--out", type=Path, default=out, help="folder to write (diffusers layout)")
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--batch", type=int, default=batch)
    parser.add_argument("--lr", type=float, default=lr)
    parser.add_argument("--warmup", type=int, default=warmup)
    parser.add_argument("--ema", type=float, default=ema, help="EMA decay of the saved weights")
    parser.add_argument("--label-dropout", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (1 is fastest on a shared 2-core machine)")


def start(args: argparse.Namespace) -> None:
    """Threads and the seed of the weights' initialisation: call before building the networks."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)


def train(
    args: argparse.Namespace,
    images: torch.Tensor,
    labels: torch.Tensor,
    null_label: int,
    params: Sequence[torch.nn.Parameter],
    loss_fn: Loss,
    desc: str,
) -> tuple[float, float]:
    """Train `params` on `loss_fn` for `args.steps` steps and leave their EMA in them.

    Returns the smoothed final loss and the seconds spent.
    """
    params = list(params)
    ema = [q.detach().clone() for q in params]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return (step + 1) / args.warmup
        progress = (step - args.warmup) / max(1, args.steps - args.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    gen = torch.Generator().manual_seed(args.seed)
    n = len(images)
    order, pos = torch.randperm(n, generator=gen), 0
    start_time, smoothed = time.perf_counter(), None
    bar = tqdm(range(args.steps), desc=desc, unit="step")
    for step in bar:
        if pos + args.batch > n:
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos : pos + args.batch]
        pos += args.batch
        x0, y = images[idx], labels[idx].clone()
        y[torch.rand(len(y), generator=gen) < args.label_dropout] = null_label
        loss = loss_fn(x0, y, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            decay = min(args.ema, (1 + step) / (10 + step))  # short warm-up of the average
            for e, q in zip(ema, params):
                e.lerp_(q, 1 - decay)
        smoothed = loss.item() if smoothed is None else 0.98 * smoothed + 0.02 * loss.item()
        bar.set_postfix(loss=f"{smoothed:.4f}", lr=f"{sched.get_last_lr()[0]:.1e}")
    seconds = time.perf_counter() - start_time
    with torch.no_grad():
        for e, q in zip(ema, params):
            q.copy_(e)
    return smoothed, seconds


def save(
    args: argparse.Namespace,
    pipe: DiffusionPipeline,
    smoothed: float,
    seconds: float,
    train_images: int,
    params: Sequence[torch.Tensor],
    **extra: Any,
) -> None:
    """Write `pipe` to `args.out` (diffusers layout, safetensors) with `training.json`, the run's
    settings, result, time and versions (and `extra`)."""
    args.out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(args.out, safe_serialization=True)
    record = {
        "steps": args.steps, "batch": args.batch, "lr": args.lr, "ema": args.ema,
        "label_dropout": args.label_dropout, "seed": args.seed, "threads": args.threads, **extra,
        "final_loss_smoothed": round(smoothed, 5), "train_seconds": round(seconds, 1),
        "train_images": train_images, "torch": torch.__version__, "machine": platform.machine(),
        "parameters": sum(q.numel() for q in params),
    }
    (args.out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out} ({record['parameters'] / 1e6:.2f}M parameters, {seconds / 60:.1f} min, loss {smoothed:.4f})")
