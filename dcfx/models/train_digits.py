"""Train the embedded digits model: `python -m dcfx.models.train_digits [--out DIR]`.

Epsilon-prediction DDPM training (MSE on the noise, 1,000 linear-beta timesteps) of the
SD-shaped `UNet2DConditionModel` and its label embedding on the training split of
scikit-learn's digits, with labels dropped to "no label" 10% of the time so that
classifier-free guidance works. AdamW with warm-up and cosine decay; the saved weights are
an exponential moving average (the loop: `training.py`). Seeded: the same machine, thread
count and versions give the same weights. The shipped weights took 48 minutes on a shared
2-core CPU (`training.json`); not run by CI.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel

from . import training
from .data import load_split
from .digits import WEIGHTS_DIR, DigitsPipeline, LabelEmbedding, scheduler_config, unet_config


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m dcfx.models.train_digits", description=__doc__.split("\n\n")[0])
    training.add_arguments(p, out=WEIGHTS_DIR, steps=2000, batch=32, lr=2e-3, warmup=100, ema=0.995)
    args = p.parse_args(argv)

    training.start(args)
    data = load_split()
    unet = UNet2DConditionModel(**unet_config())
    embedding = LabelEmbedding()
    alphas = DDPMScheduler(**scheduler_config()).alphas_cumprod

    def loss_fn(x0: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, len(alphas), (len(y),), generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        return F.mse_loss(unet(xt, t, encoder_hidden_states=embedding(y)).sample, noise)

    params = [*unet.parameters(), *embedding.parameters()]
    smoothed, seconds = training.train(
        args, data.train_images, data.train_labels, embedding.null_label, params, loss_fn, "train digits"
    )
    pipe = DigitsPipeline(unet=unet.eval(), label_embedding=embedding.eval(), scheduler=DDIMScheduler(**scheduler_config()))
    training.save(args, pipe, smoothed, seconds, len(data.train_images), params)


if __name__ == "__main__":
    main()
