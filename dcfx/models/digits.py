"""The embedded demo model: a class-conditional, SD-shaped pixel diffusion model of digits.

It is Stable Diffusion in miniature, so that what dcfx does on it is what it does on SD:
a `UNet2DConditionModel` with cross-attention down/up blocks, a plain bottom block, two
layers per block and a cross-attention mid block, conditioned through cross-attention on a
label embedding that plays the text encoder (a learned table of a few tokens per class, plus
one "no label" row: classifier-free guidance's empty prompt), sampled with DDIM and CFG at
batch 2. It works in pixel space (16x16, one channel), so there is no VAE.

The weights (trained by `python -m dcfx.models.train_digits`, fp32 safetensors) ship inside
the package in diffusers' folder layout; `digits()` loads them into a `DigitsPipeline`.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any, Sequence

import torch
from diffusers import DDIMScheduler, DiffusionPipeline, ImagePipelineOutput, ModelMixin, UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from .conditional import check_output_type, class_labels, load_folder, to_output
from .data import NUM_CLASSES, RESOLUTION

WEIGHTS_DIR = Path(__file__).parent / "digits"
TOKENS_PER_CLASS = 4
CROSS_ATTENTION_DIM = 64
DEFAULT_GUIDANCE_SCALE = 1.5


def unet_config() -> dict[str, Any]:
    """The U-Net's diffusers config: SD1.5's block layout at 1/10 of its widths."""
    return dict(
        sample_size=RESOLUTION,
        in_channels=1,
        out_channels=1,
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CROSS_ATTENTION_DIM,
        norm_num_groups=16,
        attention_head_dim=8,
    )


def scheduler_config() -> dict[str, Any]:
    """DDPM's linear betas over 1,000 training steps (the pixel-space setting of DDPM/DDIM)."""
    return dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02, clip_sample=True)


class LabelEmbedding(ModelMixin, ConfigMixin):
    """Class labels -> a short token sequence for cross-attention (the text encoder's role).

    Row block `num_classes` is the "no label" sequence that classifier-free guidance uses as
    its unconditional input (the model was trained with labels dropped to it).
    """

    @register_to_config
    def __init__(self, num_classes: int = NUM_CLASSES, tokens_per_class: int = TOKENS_PER_CLASS, dim: int = CROSS_ATTENTION_DIM):
        super().__init__()
        self.table = nn.Embedding((num_classes + 1) * tokens_per_class, dim)
        nn.init.normal_(self.table.weight, std=0.5)

    @property
    def null_label(self) -> int:
        return self.config.num_classes

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        """(B,) int64 labels in 0..num_classes (num_classes = no label) -> (B, tokens, dim)."""
        k = self.config.tokens_per_class
        index = labels.reshape(-1, 1) * k + torch.arange(k, device=labels.device)
        return self.table(index)


class DigitsPipeline(DiffusionPipeline):
    """Class-conditional digit generation with classifier-free guidance, as SD samples text.

    `pipe(labels, num_inference_steps=50, guidance_scale=1.5, generator=...)` returns
    `ImagePipelineOutput(images)`: PIL images by default, or `output_type="pt"` for a
    (B, 1, 16, 16) tensor in [0, 1], `"np"` for a (B, 16, 16, 1) array. Any diffusers
    scheduler works (`pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)`).
    """

    model_cpu_offload_seq = "label_embedding->unet"

    def __init__(self, unet: UNet2DConditionModel, label_embedding: LabelEmbedding, scheduler: Any):
        super().__init__()
        self.register_modules(unet=unet, label_embedding=label_embedding, scheduler=scheduler)

    @torch.no_grad()
    def __call__(
        self,
        labels: int | Sequence[int] | torch.Tensor,
        num_inference_steps: int = 50,
        guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        eta: float = 0.0,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        check_output_type(output_type)
        labels = class_labels(labels, self.label_embedding.config.num_classes).to(self.device)
        batch = labels.numel()
        unet = self.unet
        shape = (batch, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=self.device, dtype=unet.dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        latents = latents.to(self.device, unet.dtype)

        cfg = guidance_scale > 1.0
        cond = self.label_embedding(labels)
        if cfg:
            # One U-Net call per step at batch 2B, unconditional half first, as SD does.
            uncond = self.label_embedding(torch.full_like(labels, self.label_embedding.null_label))
            cond = torch.cat([uncond, cond])
        cond = cond.to(unet.dtype)

        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        latents = latents * self.scheduler.init_noise_sigma
        step_kwargs = self._step_kwargs(generator, eta)
        for t in self.progress_bar(self.scheduler.timesteps):
            model_in = torch.cat([latents] * 2) if cfg else latents
            model_in = self.scheduler.scale_model_input(model_in, t)
            eps = unet(model_in, t, encoder_hidden_states=cond).sample
            if cfg:
                eps_uncond, eps_cond = eps.chunk(2)
                eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
            latents = self.scheduler.step(eps, t, latents, **step_kwargs).prev_sample

        images = to_output(latents, output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    def _step_kwargs(self, generator: Any, eta: float) -> dict[str, Any]:
        # Not every scheduler's step takes eta (DDIM's) or a generator (ancestral ones).
        params = inspect.signature(self.scheduler.step).parameters
        out = {}
        if "eta" in params:
            out["eta"] = eta
        if "generator" in params:
            out["generator"] = generator
        return out


def load_pipeline(path: str | Path, scheduler: Any = None) -> DigitsPipeline:
    """A `DigitsPipeline` from a folder in diffusers' layout (as `train_digits` writes it).

    Raises FileNotFoundError naming the missing files, or ValueError for a file that does
    not load (corrupt or of another model).
    """
    models = {"unet": UNet2DConditionModel, "label_embedding": LabelEmbedding}
    return load_folder(path, DigitsPipeline, models, DDIMScheduler, scheduler, "digits", "dcfx.models.train_digits")


def digits(scheduler: Any = None) -> DigitsPipeline:
    """The embedded trained digits model as a ready `DigitsPipeline` (CPU, fp32).

    >>> import dcfx.models
    >>> pipe = dcfx.models.digits()
    >>> pipe.set_progress_bar_config(disable=True)
    >>> images = pipe([3, 7], num_inference_steps=10, generator=torch.Generator().manual_seed(0), output_type="pt").images
    >>> tuple(images.shape)
    (2, 1, 16, 16)
    """
    return load_pipeline(WEIGHTS_DIR, scheduler=scheduler)


def training_record() -> dict[str, Any]:
    """What `train_digits` recorded about the shipped weights (steps, seed, loss, time)."""
    return json.loads((WEIGHTS_DIR / "training.json").read_text())
