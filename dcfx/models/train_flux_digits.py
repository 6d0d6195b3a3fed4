"""Train the embedded Flux-shaped digits model: `python -m dcfx.models.train_flux_digits [--out DIR]`.

Rectified flow (flow matching) as Flux and SD3 train: x_t = (1 - t) x0 + t noise with t drawn
logit-normal (the sigmoid of a standard normal, which weights the middle of the path), and the
transformer, given timestep t (it scales it by 1000 itself, as FluxPipeline's `timestep / 1000`
undoes), predicts the velocity noise - x0 under MSE. That is `FlowMatchEulerDiscreteScheduler`'s
convention: its Euler step x + (sigma_next - sigma) * v walks from noise (sigma 1) to data.
Labels are dropped to "no label" 10% of the time for classifier-free guidance. The loop (AdamW,
warm-up and cosine decay, EMA, seeded batches) is `training.py`'s, shared with `train_digits`.
Not run by CI; `training.json` in the written folder records the run.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

from . import training
from .data import RESOLUTION, load_split
from .flux_digits import (
    WEIGHTS_DIR,
    FluxDigitsPipeline,
    FluxLabelEmbedding,
    image_ids,
    pack,
    scheduler_config,
    text_ids,
    transformer_config,
)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m dcfx.models.train_flux_digits", description=__doc__.split("\n\n")[0])
    training.add_arguments(p, out=WEIGHTS_DIR, steps=2000, batch=64, lr=1e-3, warmup=200, ema=0.998)
    args = p.parse_args(argv)

    training.start(args)
    data = load_split()
    transformer = FluxTransformer2DModel(**transformer_config())
    embedding = FluxLabelEmbedding()
    img_ids = image_ids(RESOLUTION, RESOLUTION)
    txt_ids = text_ids(embedding.config.tokens_per_class)

    def loss_fn(x0: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.sigmoid(torch.randn(len(y), generator=gen))
        s = t.view(-1, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        v = transformer(
            hidden_states=pack(xt),
            timestep=t,
            pooled_projections=embedding.pooled(y),
            encoder_hidden_states=embedding(y),
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0]
        return F.mse_loss(v, pack(noise - x0))

    params = [*transformer.parameters(), *embedding.parameters()]
    smoothed, seconds = training.train(
        args, data.train_images, data.train_labels, embedding.null_label, params, loss_fn, "train flux digits"
    )
    pipe = FluxDigitsPipeline(
        transformer=transformer.eval(),
        label_embedding=embedding.eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(**scheduler_config()),
    )
    training.save(
        args, pipe, smoothed, seconds, len(data.train_images), params, timesteps="logit-normal (sigmoid of N(0, 1))"
    )


if __name__ == "__main__":
    main()
