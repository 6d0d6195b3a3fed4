"""One example call of a diffusers U-Net (or a Flux transformer), built from its config:
`example_call(unet)`.

What `dcfx.report`, `DeepCacheUNet.graphs`, `dcfx.package` and the commands need when there is
no pipeline at hand to record a call from: a sample of the model's shape, a timestep and
random conditioning of the widths its config names (text, SDXL's added text and time
embeddings, class labels). Any device, meta included (then nothing is computed).

A `FluxTransformer2DModel` is called as FluxPipeline calls it: packed latent tokens (2x2
patches) as the sample, the sigma as the timestep (keyword, like everything but the sample),
text tokens and their pooled projection, rotary ids, and guidance where the model embeds it.
True classifier-free guidance is two calls there, so its example is never `guided`.
"""

from __future__ import annotations

import inspect
from typing import Any, NamedTuple

import torch
from torch import nn

from .loader import TEXT_TOKENS


class ExampleCall(NamedTuple):
    """`unet(*args, **kwargs)`; `guided`: the batch is classifier-free guidance's two halves
    (unconditional first), one row each per prompt. `args` is (sample, timestep), or (sample,)
    with the timestep in `kwargs` (a transformer's call)."""

    args: tuple
    kwargs: dict[str, Any]
    guided: bool


def example_call(
    unet: nn.Module,
    batch: int = 1,
    resolution: int | None = None,
    *,
    guided: bool | None = None,
    tokens: int = TEXT_TOKENS,
    timestep: int = 999,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    seed: int = 0,
) -> ExampleCall:
    """One denoising call of `unet` for `batch` prompts (or images), with random conditioning.

    `resolution`: the latent height and width (default: the config's `sample_size`).
    `guided`: double the batch for classifier-free guidance (default: when the U-Net takes
    text, `encoder_hidden_states`). `tokens`: the conditioning's sequence length. `device`
    and `dtype` default to the U-Net's. Raises ValueError for conditioning it cannot make up
    (class embeddings without labels, image or other added embeddings).
    """
    if type(unet).__name__ == "FluxTransformer2DModel":
        return _flux_call(unet, batch, resolution or 16, tokens, timestep, device, dtype, seed)
    cfg = unet.config
    params = inspect.signature(unet.forward).parameters
    texts = "encoder_hidden_states" in params
    guided = texts if guided is None else guided
    n = 2 * batch if guided else batch
    first = next(iter(unet.parameters()), None)
    device = torch.device(device) if device is not None else (first.device if first is not None else torch.device("cpu"))
    dtype = dtype or (first.dtype if first is not None else torch.float32)
    if resolution is None:
        size = cfg.sample_size
        resolution = int(size if isinstance(size, int) else size[0])
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    where = type(unet).__name__
    sample = randn(n, cfg.in_channels, resolution, resolution)
    kwargs: dict[str, Any] = {}
    if getattr(cfg, "class_embed_type", None) is not None:
        raise ValueError(f"{where}: class_embed_type={cfg.class_embed_type!r} needs class conditioning an example does not make up")
    if getattr(cfg, "num_class_embeds", None):
        kwargs["class_labels"] = torch.zeros(n, dtype=torch.long, device=device)
    if texts:
        hid_type = getattr(cfg, "encoder_hid_dim_type", None)
        if hid_type not in (None, "text_proj"):
            raise ValueError(f"{where}: encoder_hid_dim_type={hid_type!r} is not supported here (only text conditioning)")
        width = cfg.encoder_hid_dim if hid_type == "text_proj" else cfg.cross_attention_dim
        if not isinstance(width, int):
            raise ValueError(f"{where}: cross_attention_dim={width!r} per block is not supported here")
        kwargs["encoder_hidden_states"] = randn(n, tokens, width)
        added = getattr(cfg, "addition_embed_type", None)
        if added == "text_time":  # SDXL: pooled text embedding and size/crop conditioning
            text = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
            kwargs["added_cond_kwargs"] = {"text_embeds": randn(n, text), "time_ids": randn(n, 6)}
        elif added is not None:
            raise ValueError(f"{where}: addition_embed_type={added!r} is not supported here (None or 'text_time')")
    return ExampleCall((sample, torch.tensor(timestep, device=device)), kwargs, guided)


def _flux_call(model: nn.Module, batch: int, resolution: int, tokens: int, timestep: int,
               device: torch.device | str | None, dtype: torch.dtype | None, seed: int) -> ExampleCall:
    """FluxPipeline's call for a `resolution` x `resolution` latent (default 16: the Flux
    digits model's pixels) packed into (resolution / 2)^2 tokens."""
    cfg = model.config
    if resolution % 2:
        raise ValueError(f"FluxTransformer2DModel packs 2x2 patches: the resolution must be even, got {resolution}")
    first = next(iter(model.parameters()))
    device, dtype = torch.device(device) if device is not None else first.device, dtype or first.dtype
    gen = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)  # noqa: E731
    side = resolution // 2
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    kwargs: dict[str, Any] = dict(
        encoder_hidden_states=randn(batch, tokens, cfg.joint_attention_dim),
        pooled_projections=randn(batch, cfg.pooled_projection_dim),
        timestep=torch.full((batch,), timestep / 1000, device=device, dtype=dtype),
        img_ids=torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).to(device=device, dtype=dtype),
        txt_ids=torch.zeros(tokens, 3, device=device, dtype=dtype),
    )
    if cfg.guidance_embeds:
        kwargs["guidance"] = torch.full((batch,), 3.5, device=device, dtype=dtype)
    return ExampleCall((randn(batch, side * side, cfg.in_channels),), kwargs, False)
