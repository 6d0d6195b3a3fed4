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
    streams: int  # tensors cached at the cut Fn = 1, Bn = 1 (Flux: image and text tokens)

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

# The latent models below take a 4-channel 8x8 latent (16 tokens of 2x2 patches) or its tokens.
SD3 = TinyTransformer(
    "SD3Transformer2DModel",
    dict(sample_size=8, patch_size=2, in_channels=4, num_layers=4, attention_head_dim=8, num_attention_heads=4,
         joint_attention_dim=24, caption_projection_dim=32, pooled_projection_dim=12, out_channels=4,
         pos_embed_max_size=8),
    lambda g, b: dict(hidden_states=_randn(g, b, 4, 8, 8), encoder_hidden_states=_randn(g, b, 8, 24),
                      pooled_projections=_randn(g, b, 12), timestep=torch.full((b,), 500.0)),
    streams=2,
)

# SD 3.5's layout: a second (image-only) attention in the first blocks, RMS-normed q and k.
SD35 = TinyTransformer("SD3Transformer2DModel", {**SD3.config, "dual_attention_layers": (0, 1), "qk_norm": "rms_norm"},
                       SD3.call, streams=2)

PIXART = TinyTransformer(
    "PixArtTransformer2DModel",
    dict(num_attention_heads=4, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=4,
         cross_attention_dim=32, sample_size=8, patch_size=2, caption_channels=24, norm_num_groups=4),
    lambda g, b: dict(hidden_states=_randn(g, b, 4, 8, 8), encoder_hidden_states=_randn(g, b, 8, 24),
                      timestep=torch.full((b,), 500), added_cond_kwargs={"resolution": None, "aspect_ratio": None}),
    streams=1,
)

DIT = TinyTransformer(
    "DiTTransformer2DModel",
    dict(num_attention_heads=4, attention_head_dim=8, in_channels=4, num_layers=4, sample_size=8, patch_size=2,
         num_embeds_ada_norm=10, norm_num_groups=4),
    lambda g, b: dict(hidden_states=_randn(g, b, 4, 8, 8), timestep=torch.full((b,), 500), class_labels=torch.arange(b) % 10),
    streams=1,
)

# Flux 2 joins text and image tokens between its double- and single-stream blocks: one joint
# stream from there on. Rotary axes: 4 of 2 (they sum to the head size 8).
FLUX2 = TinyTransformer(
    "Flux2Transformer2DModel",
    dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=4, attention_head_dim=8, num_attention_heads=4,
         joint_attention_dim=24, timestep_guidance_channels=32, axes_dims_rope=(2, 2, 2, 2), guidance_embeds=True),
    lambda g, b: dict(
        hidden_states=_randn(g, b, 16, 16),
        encoder_hidden_states=_randn(g, b, 8, 24),
        timestep=torch.full((b,), 0.75),
        img_ids=torch.stack(torch.meshgrid(torch.zeros(1), torch.zeros(1), torch.arange(4.0), torch.arange(4.0),
                                           indexing="ij"), -1).reshape(16, 4),
        txt_ids=torch.zeros(8, 4),
        guidance=torch.full((b,), 3.5),
    ),
    streams=1,
)

# Qwen-Image: 16 tokens of a 4x4 grid (img_shapes, a constant of the call), all text tokens valid.
QWEN_IMAGE = TinyTransformer(
    "QwenImageTransformer2DModel",
    dict(patch_size=2, in_channels=16, out_channels=4, num_layers=4, attention_head_dim=8, num_attention_heads=4,
         joint_attention_dim=24, axes_dims_rope=(2, 2, 4)),
    lambda g, b: dict(hidden_states=_randn(g, b, 16, 16), encoder_hidden_states=_randn(g, b, 8, 24),
                      encoder_hidden_states_mask=torch.ones(b, 8), timestep=torch.full((b,), 0.75),
                      img_shapes=[(1, 4, 4)] * b),
    streams=2,
)

# Wan: a video latent of 2 frames of 8x8 (32 tokens of 1x2x2 patches); head size 12 splits into
# rotary axes 4 + 4 + 4. The text only enters through cross-attention: one stream.
WAN = TinyTransformer(
    "WanTransformer3DModel",
    dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4, text_dim=24,
         freq_dim=16, ffn_dim=48, num_layers=4, rope_max_seq_len=32),
    lambda g, b: dict(hidden_states=_randn(g, b, 4, 2, 8, 8), timestep=torch.full((b,), 500),
                      encoder_hidden_states=_randn(g, b, 8, 24)),
    streams=1,
)

TINY: dict[str, TinyTransformer] = {
    "flux": FLUX, "flux_guidance": FLUX_GUIDANCE, "sd3": SD3, "sd35": SD35, "pixart": PIXART, "dit": DIT,
    "flux2": FLUX2, "qwen_image": QWEN_IMAGE, "wan": WAN,
}
