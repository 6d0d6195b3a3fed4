"""The second embedded demo model: a class-conditional, Flux-shaped flow-matching model of digits.

It is Flux in miniature, so that what dcfx does on a transformer it does on Flux: a diffusers
`FluxTransformer2DModel` with double-stream (joint image/text attention) and single-stream
blocks and rotary positions from `img_ids`/`txt_ids`, trained by rectified flow and sampled
with `FlowMatchEulerDiscreteScheduler`. It works in pixel space (16x16, one channel; no VAE),
packed as FluxPipeline packs latents: each 2x2 patch is one token of 4 channels, 64 image
tokens. A label embedding plays the text encoders: a few learned tokens per class as
`encoder_hidden_states` (T5's role) and a learned pooled vector per class as
`pooled_projections` (CLIP's role), plus a "no label" class for classifier-free guidance.

The weights (trained by `python -m dcfx.models.train_flux_digits`, fp32 safetensors) ship inside
the package in diffusers' folder layout; `flux_digits()` loads them into a `FluxDigitsPipeline`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel, ImagePipelineOutput
from diffusers.configuration_utils import register_to_config
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from .conditional import check_output_type, class_labels, load_folder, to_output
from .data import NUM_CLASSES, RESOLUTION
from .digits import LabelEmbedding

WEIGHTS_DIR = Path(__file__).parent / "flux_digits"
PATCH = 2  # pixels per token side, as FluxPipeline packs latents
TOKENS_PER_CLASS = 4
JOINT_ATTENTION_DIM = 64
POOLED_PROJECTION_DIM = 64
DEFAULT_STEPS = 25
DEFAULT_GUIDANCE_SCALE = 1.5


def transformer_config() -> dict[str, Any]:
    """The transformer's diffusers config: Flux's two block kinds (2 double-stream, 4 single-
    stream), 3 heads of 32, rotary positions over the (index, row, column) id axes as Flux splits
    them (1/4, 3/8, 3/8 of a head)."""
    return dict(
        patch_size=1,
        in_channels=PATCH * PATCH,
        num_layers=2,
        num_single_layers=4,
        attention_head_dim=32,
        num_attention_heads=3,
        joint_attention_dim=JOINT_ATTENTION_DIM,
        pooled_projection_dim=POOLED_PROJECTION_DIM,
        guidance_embeds=False,
        axes_dims_rope=(8, 12, 12),
    )


def scheduler_config() -> dict[str, Any]:
    """Flow matching's Euler solver, sigmas evenly from 1 to 0 (no shift). Flux's resolution-
    dependent shift (`use_dynamic_shifting`) is fitted to latents of 256 to 4096 tokens, not 64."""
    return dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)


class FluxLabelEmbedding(LabelEmbedding):
    """Class labels -> Flux's two text conditions: `forward` gives the token sequence
    (B, tokens, joint_attention_dim), `pooled` the pooled vector (B, pooled_dim).

    Class `num_classes` is "no label", the unconditional input of classifier-free guidance.
    """

    @register_to_config
    def __init__(
        self,
        num_classes: int = NUM_CLASSES,
        tokens_per_class: int = TOKENS_PER_CLASS,
        dim: int = JOINT_ATTENTION_DIM,
        pooled_dim: int = POOLED_PROJECTION_DIM,
    ):
        super().__init__(num_classes=num_classes, tokens_per_class=tokens_per_class, dim=dim)
        self.pooled_table = nn.Embedding(num_classes + 1, pooled_dim)
        nn.init.normal_(self.pooled_table.weight, std=0.5)

    def pooled(self, labels: torch.Tensor) -> torch.Tensor:
        return self.pooled_table(labels.reshape(-1))


def pack(pixels: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, C * 4) tokens: one token per 2x2 patch, row-major over
    patches, channels then patch rows then patch columns within a token (FluxPipeline's order)."""
    b, c, h, w = pixels.shape
    x = pixels.reshape(b, c, h // PATCH, PATCH, w // PATCH, PATCH)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // PATCH) * (w // PATCH), c * PATCH * PATCH)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of `pack`: (B, H/2 * W/2, C * 4) -> (B, C, H, W)."""
    b, _, d = tokens.shape
    c = d // (PATCH * PATCH)
    x = tokens.reshape(b, height // PATCH, width // PATCH, c, PATCH, PATCH)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(b, c, height, width)


def image_ids(height: int, width: int) -> torch.Tensor:
    """(H/2 * W/2, 3) rotary position ids of the packed tokens: (0, patch row, patch column)."""
    rows, cols = torch.meshgrid(torch.arange(height // PATCH), torch.arange(width // PATCH), indexing="ij")
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).float()


def text_ids(tokens: int) -> torch.Tensor:
    """(tokens, 3) position ids of the label tokens: all zero, as FluxPipeline gives T5's tokens."""
    return torch.zeros(tokens, 3)


class FluxDigitsPipeline(DiffusionPipeline):
    """Class-conditional digit generation by flow matching, sampled as FluxPipeline samples.

    `pipe(labels, num_inference_steps=25, guidance_scale=1.5, generator=...)` returns
    `ImagePipelineOutput(images)`: PIL images by default, or `output_type="pt"` for a
    (B, 1, 16, 16) tensor in [0, 1], `"np"` for a (B, 16, 16, 1) array. `latents` are noise in
    pixel shape (B, 1, 16, 16), as `DigitsPipeline` takes them; the pipeline packs them.

    The model has no guidance embedding (`guidance=None`), so `guidance_scale` is classifier-
    free guidance as FluxPipeline does its `true_cfg_scale`: two transformer calls per step at
    batch B, the conditional one under `transformer.cache_context("cond")` and then the
    unconditional one under `"uncond"` (the contexts diffusers' cache hooks keep their state
    under; they also carry the step index, step count and sigma, which SeaCache reads).
    Guidance 1 makes one call per step.

    Other flow-matching schedulers work: `FlowMatchHeunDiscreteScheduler`, or
    `UniPCMultistepScheduler` / `DPMSolverMultistepScheduler` with `use_flow_sigmas=True,
    prediction_type="flow_prediction"`. The transformer gets `timestep / 1000`, the sigma.
    """

    model_cpu_offload_seq = "label_embedding->transformer"

    def __init__(self, transformer: FluxTransformer2DModel, label_embedding: FluxLabelEmbedding, scheduler: Any):
        super().__init__()
        self.register_modules(transformer=transformer, label_embedding=label_embedding, scheduler=scheduler)

    @torch.no_grad()
    def __call__(
        self,
        labels: int | Sequence[int] | torch.Tensor,
        num_inference_steps: int = DEFAULT_STEPS,
        guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        check_output_type(output_type)
        embedding, transformer = self.label_embedding, self.transformer
        labels = class_labels(labels, embedding.config.num_classes).to(self.device)
        dtype = transformer.dtype
        shape = (labels.numel(), transformer.config.in_channels // (PATCH * PATCH), RESOLUTION, RESOLUTION)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=self.device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        latents = pack(latents.to(self.device, dtype))

        cfg = guidance_scale > 1.0
        cond = self._conditions(labels)
        uncond = self._conditions(torch.full_like(labels, embedding.null_label)) if cfg else None
        img_ids = image_ids(RESOLUTION, RESOLUTION).to(self.device, dtype)
        txt_ids = text_ids(embedding.config.tokens_per_class).to(self.device, dtype)

        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        self.scheduler.set_begin_index(0)
        timesteps = self.scheduler.timesteps
        sigmas = (timesteps.float().cpu() / 1000).tolist()  # on the host once: no sync per step

        def velocity(name: str, conditions: tuple[torch.Tensor, torch.Tensor], i: int, t: torch.Tensor) -> torch.Tensor:
            tokens, pooled = conditions
            with transformer.cache_context(name, step_index=i, num_inference_steps=len(timesteps), timestep=t, sigma=sigmas[i]):
                return transformer(
                    hidden_states=latents,
                    timestep=t.expand(latents.shape[0]).to(dtype) / 1000,
                    guidance=None,
                    pooled_projections=pooled,
                    encoder_hidden_states=tokens,
                    txt_ids=txt_ids,
                    img_ids=img_ids,
                    joint_attention_kwargs=joint_attention_kwargs,
                    return_dict=False,
                )[0]

        for i, t in enumerate(self.progress_bar(timesteps)):
            v = velocity("cond", cond, i, t)
            if cfg:
                v_uncond = velocity("uncond", uncond, i, t)
                v = v_uncond + guidance_scale * (v - v_uncond)
            latents = self.scheduler.step(v, t, latents, return_dict=False)[0]

        images = to_output(unpack(latents, RESOLUTION, RESOLUTION), output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    def _conditions(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = self.transformer.dtype
        return self.label_embedding(labels).to(dtype), self.label_embedding.pooled(labels).to(dtype)


def load_flux_digits(path: str | Path, scheduler: Any = None) -> FluxDigitsPipeline:
    """A `FluxDigitsPipeline` from a folder in diffusers' layout (as `train_flux_digits` writes it).

    Raises FileNotFoundError naming the missing files, or ValueError for a file that does
    not load (corrupt or of another model).
    """
    models = {"transformer": FluxTransformer2DModel, "label_embedding": FluxLabelEmbedding}
    return load_folder(
        path, FluxDigitsPipeline, models, FlowMatchEulerDiscreteScheduler, scheduler, "Flux digits",
        "dcfx.models.train_flux_digits",
    )


def flux_digits(scheduler: Any = None) -> FluxDigitsPipeline:
    """The embedded trained Flux-shaped digits model as a ready `FluxDigitsPipeline` (CPU, fp32).

    >>> import dcfx.models
    >>> pipe = dcfx.models.flux_digits()
    >>> pipe.set_progress_bar_config(disable=True)
    >>> images = pipe([3, 7], num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="pt").images
    >>> tuple(images.shape)
    (2, 1, 16, 16)
    """
    return load_flux_digits(WEIGHTS_DIR, scheduler=scheduler)


def training_record() -> dict[str, Any]:
    """What `train_flux_digits` recorded about the shipped weights (steps, seed, loss, time)."""
    return json.loads((WEIGHTS_DIR / "training.json").read_text())
