"""Random-weight U-Nets shaped like Stable Diffusion's, for examples, profiles and benchmarks.

Nothing is downloaded: `random_unet(size)` builds a diffusers `UNet2DConditionModel` with SD's
block layout (cross-attention down/up blocks, a plain bottom block, two layers per block) at
one of a few widths. Random weights say nothing about image quality; the trained digits
model (`dcfx.models.digits`) does.
"""

from __future__ import annotations

from diffusers import UNet2DConditionModel

# Block widths per size; "sd15" is SD1.5's U-Net (860M parameters).
WIDTHS: dict[str, tuple[int, ...]] = {"tiny": (32, 64, 64), "small": (64, 128, 256), "sd15": (320, 640, 1280, 1280)}
SIZES = tuple(WIDTHS)


def random_unet(size: str) -> UNet2DConditionModel:
    """A random-weight SD-shaped U-Net in eval mode: 'tiny', 'small' or 'sd15' (SD1.5's widths).

    Seed torch first for the same weights every time; build it under `torch.device("meta")`
    for graphs and FLOPs without weights.
    """
    if size not in WIDTHS:
        raise ValueError(f"size {size!r} is not one of {', '.join(SIZES)}")
    widths = WIDTHS[size]
    n = len(widths)
    return UNet2DConditionModel(
        sample_size=32,
        block_out_channels=widths,
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        cross_attention_dim=768 if size == "sd15" else widths[0],
        norm_num_groups=32 if widths[0] >= 64 else 8,
        attention_head_dim=8,
    ).eval()
