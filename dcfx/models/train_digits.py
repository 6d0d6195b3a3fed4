"""Train the embedded digits model: `python -m dcfx.models.train_digits [--out DIR]`.

Epsilon-prediction DDPM training (MSE on the noise, 1,000 linear-beta timesteps) of the
SD-shaped `UNet2DConditionModel` and its label embedding on the training split of
scikit-learn's digits, with labels dropped to "no label" 10% of the time so that
classifier-free guidance works. AdamW with warm-up and cosine decay; the saved weights are
an exponential moving average. Seeded: the same machine, thread count and versions give the
same weights. The shipped weights took 48 minutes on a shared 2-core CPU (`training.json`);
not run by CI.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from tqdm.auto import tqdm

from .data import load_split
from .digits import WEIGHTS_DIR, DigitsPipeline, LabelEmbedding, scheduler_config, unet_config


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m dcfx.models.train_digits", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=WEIGHTS_DIR, help="folder to write (diffusers layout)")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--ema", type=float, default=0.995, help="EMA decay of the saved weights")
    p.add_argument("--label-dropout", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (1 is fastest on a shared 2-core machine)")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    data = load_split()
    images, labels = data.train_images, data.train_labels
    unet = UNet2DConditionModel(**unet_config())
    embedding = LabelEmbedding()
    noise_schedule = DDPMScheduler(**scheduler_config())
    alphas = noise_schedule.alphas_cumprod
    params = [*unet.parameters(), *embedding.parameters()]
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
    start, smoothed = time.perf_counter(), None
    bar = tqdm(range(args.steps), desc="train digits", unit="step")
    for step in bar:
        if pos + args.batch > n:
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos : pos + args.batch]
        pos += args.batch
        x0, y = images[idx], labels[idx].clone()
        y[torch.rand(len(y), generator=gen) < args.label_dropout] = embedding.null_label
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, len(alphas), (len(y),), generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        loss = F.mse_loss(unet(xt, t, encoder_hidden_states=embedding(y)).sample, noise)
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
    seconds = time.perf_counter() - start

    with torch.no_grad():
        for e, q in zip(ema, params):
            q.copy_(e)
    pipe = DigitsPipeline(unet=unet.eval(), label_embedding=embedding.eval(), scheduler=DDIMScheduler(**scheduler_config()))
    args.out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(args.out, safe_serialization=True)
    record = {
        "steps": args.steps, "batch": args.batch, "lr": args.lr, "ema": args.ema,
        "label_dropout": args.label_dropout, "seed": args.seed, "threads": args.threads,
        "final_loss_smoothed": round(smoothed, 5), "train_seconds": round(seconds, 1),
        "train_images": n, "torch": torch.__version__, "machine": platform.machine(),
        "parameters": sum(q.numel() for q in params),
    }
    (args.out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out} ({record['parameters'] / 1e6:.2f}M parameters, {seconds / 60:.1f} min, loss {smoothed:.4f})")


if __name__ == "__main__":
    main()
