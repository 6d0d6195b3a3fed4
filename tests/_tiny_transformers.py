"""Tiny random diffusion transformers from diffusers, with a call each in the model's own
signature: what the transformer split rule is tested and surveyed on. Each builds in well under
a second.

Not a test module (no `test_` prefix); pytest puts tests/ on sys.path, so the test files
import it as `_tiny_transformers`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import diffusers
import torch
from torch import nn


@dataclass(frozen=True)
class TinyTransformer:
    """A diffusers transformer class, a tiny config for it and a call of it."""

    class_name: str
    config: dict[str, Any]
    call: Callable[[torch.Generator, int], dict[str, Any]]  # (generator, batch) -> keyword arguments
    streams: int  # tensors its blocks carry (Flux: image and text tokens)

    def model(self, seed: int = 0) -> nn.Module:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return getattr(diffusers, self.class_name)(**self.config).eval()

    def inputs(self, seed: int = 0, batch: int = 1) -> dict[str, Any]:
        return self.call(torch.Generator().manual_seed(seed), batch)


def _randn(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g)


# Flux: 2 double-stream and 4 single-stream blocks, hidden size 32 (4 heads of 8; the rotary
# axes sum to the head size), 16 image tokens (a 4x4 grid of packed 2x2 patches of a 4-channel
# latent) and 8 text tokens: enough tokens that the blocks, not the embedders, hold the FLOPs.
FLUX_IMAGE_TOKENS, FLUX_TEXT_TOKENS = 16, 8
FLUX = TinyTransformer(
    "FluxTransformer2DModel",
    dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=4, attention_head_dim=8,
         num_attention_heads=4, joint_attention_dim=24, pooled_projection_dim=12, guidance_embeds=False,
         axes_dims_rope=(2, 2, 4)),
    lambda g, b: dict(
        hidden_states=_randn(g, b, FLUX_IMAGE_TOKENS, 16),
        encoder_hidden_states=_randn(g, b, FLUX_TEXT_TOKENS, 24),
        pooled_projections=_randn(g, b, 12),
        timestep=torch.full((b,), 0.75),
        img_ids=torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1).reshape(16, 3),
        txt_ids=torch.zeros(FLUX_TEXT_TOKENS, 3),
    ),
    streams=2,
)

# Flux with guidance embedding (FLUX.1-dev's layout) and as many text as image tokens, so only
# the graph's structure, not the shapes, tells the streams apart.
FLUX_GUIDANCE = TinyTransformer(
    "FluxTransformer2DModel",
    {**FLUX.config, "guidance_embeds": True},
    lambda g, b: {
        **FLUX.call(g, b),
        "encoder_hidden_states": _randn(g, b, FLUX_IMAGE_TOKENS, 24),
        "txt_ids": torch.zeros(FLUX_IMAGE_TOKENS, 3),
        "guidance": torch.full((b,), 3.5),
    },
    streams=2,
)

TINY: dict[str, TinyTransformer] = {"flux": FLUX, "flux_guidance": FLUX_GUIDANCE}
