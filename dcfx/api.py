"""The public entry points: `optimize` a U-Net, `enable`/`disable` DeepCache on a pipeline."""

from __future__ import annotations

import functools
from typing import Any

from torch import nn

from .config import DeepCacheConfig
from .runtime import DeepCacheUNet

_PATCHED = ("set_timesteps", "set_begin_index")


def optimize(unet: nn.Module, config: DeepCacheConfig | None = None, **options: Any) -> DeepCacheUNet:
    """Wrap `unet` so that it runs DeepCache; a drop-in replacement in pipelines and loops.

    Give either a `DeepCacheConfig` or its fields as keywords (`interval=3, branch=0, ...`).
    Nothing happens to `unet`: graphs are captured lazily, per input signature, at the first
    call, and share its weights. Passing a `DeepCacheUNet` re-wraps its U-Net with the new
    config (and reuses the captures).

    >>> import dcfx, torch
    >>> from diffusers import UNet2DModel
    >>> unet = UNet2DModel(sample_size=8, block_out_channels=(8, 16), norm_num_groups=4,
    ...                    down_block_types=("DownBlock2D", "DownBlock2D"),
    ...                    up_block_types=("UpBlock2D", "UpBlock2D")).eval()
    >>> fast = dcfx.optimize(unet, interval=2, branch=0)
    >>> x = torch.randn(1, 3, 8, 8)
    >>> for t in (900, 600, 300):
    ...     x = fast(x, t).sample
    >>> fast.history
    ('FSF',)
    """
    if config is not None and options:
        raise TypeError("pass either a DeepCacheConfig or its fields as keywords, not both")
    if config is None:
        config = DeepCacheConfig(**options)
    elif not isinstance(config, DeepCacheConfig):
        raise TypeError(f"config must be a DeepCacheConfig, got {type(config).__name__}")
    if isinstance(unet, DeepCacheUNet):
        unet = unet.unet
    if not isinstance(unet, nn.Module):
        raise TypeError(f"optimize expects a torch.nn.Module U-Net, got {type(unet).__name__}")
    return DeepCacheUNet(unet, config)


def enable(pipe: Any, config: DeepCacheConfig | None = None, **options: Any) -> DeepCacheUNet:
    """Run `pipe.unet` with DeepCache, with generation boundaries taken from the scheduler.

    Sets `pipe.unet = optimize(pipe.unet, ...)` and hooks this pipeline's scheduler instance:
    each `set_timesteps` (and `set_begin_index`, img2img's start) calls
    `unet.begin(number of U-Net calls left)`. No timestep is read back from the device, and
    the non-uniform schedule knows its step count. Call it after choosing the scheduler;
    `disable(pipe)` undoes it.
    """
    if isinstance(pipe.unet, DeepCacheUNet):
        disable(pipe)
    unet = optimize(pipe.unet, config, **options)
    scheduler = pipe.scheduler
    for name in _PATCHED:
        original = getattr(scheduler, name, None)
        if original is not None:
            setattr(scheduler, name, _planning(original, scheduler, unet))
    scheduler._dcfx_patched = True
    pipe.unet = unet
    return unet


def disable(pipe: Any) -> nn.Module:
    """Undo `enable` (or `optimize`): restore the plain U-Net and the scheduler's methods."""
    scheduler = pipe.scheduler
    if getattr(scheduler, "_dcfx_patched", False):
        for name in _PATCHED:
            scheduler.__dict__.pop(name, None)
        del scheduler._dcfx_patched
    if isinstance(pipe.unet, DeepCacheUNet):
        pipe.unet = pipe.unet.unet
    return pipe.unet


def _planning(method, scheduler, unet: DeepCacheUNet):
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        result = method(*args, **kwargs)
        timesteps = getattr(scheduler, "timesteps", None)
        if timesteps is not None:
            start = getattr(scheduler, "begin_index", None) or 0
            unet.begin(max(len(timesteps) - start, 1))
        return result

    return wrapper
