"""The public entry points: `optimize` a U-Net, `enable`/`disable` DeepCache on a pipeline."""

from __future__ import annotations

import dataclasses
import functools
import weakref
from typing import Any

import torch
from torch import nn

from .config import DeepCacheConfig
from .runtime import DeepCacheUNet

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
        unknown = sorted(set(options) - {f.name for f in dataclasses.fields(DeepCacheConfig)})
        if unknown:
            valid = ", ".join(f.name for f in dataclasses.fields(DeepCacheConfig))
            raise TypeError(f"unknown DeepCacheConfig field(s) {', '.join(unknown)}; valid fields are {valid}")
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

    Sets `pipe.unet = optimize(pipe.unet, ...)` and hooks the pipeline's scheduler instance:
    each `set_timesteps` starts a generation of the scheduler's number of U-Net calls,
    corrected by `set_begin_index` or, for schedulers without it, by the first `add_noise`
    (img2img's start; one device read per generation). No timestep is read per step, and the
    non-uniform schedule knows its step count. If `pipe.scheduler` is replaced later, the new
    one is hooked and the generation in flight falls back to automatic boundaries.
    `disable(pipe)` undoes it.
    """
    if isinstance(pipe.unet, DeepCacheUNet):
        disable(pipe)
    unet = optimize(pipe.unet, config, **options)
    pipe.unet = unet
    _hook(pipe, pipe.scheduler, unet)
    return unet


def disable(pipe: Any) -> nn.Module:
    """Undo `enable` (or `optimize`): restore the plain U-Net and the scheduler's methods."""
    _unhook(pipe.scheduler)
    if isinstance(pipe.unet, DeepCacheUNet):
        pipe.unet = pipe.unet.unet
    return pipe.unet


def _hook(pipe: Any, scheduler: Any, unet: DeepCacheUNet) -> None:
    pipe_ref = weakref.ref(pipe)

    def valid() -> bool:
        current = pipe_ref()
        if current is None or current.unet is not unet:
            return False
        if current.scheduler is not scheduler:
            _hook(current, current.scheduler, unet)  # plans the next generation
            return False
        return True

    def plan(start: int) -> None:
        timesteps = getattr(scheduler, "timesteps", None)
        if timesteps is not None:
            unet._plan(max(len(timesteps) - start, 1), valid)

    def after_set_timesteps(*args, **kwargs):
        result = originals["set_timesteps"](*args, **kwargs)
        plan(getattr(scheduler, "begin_index", None) or 0)
        return result

    def after_set_begin_index(begin_index=0, *args, **kwargs):
        result = originals["set_begin_index"](begin_index, *args, **kwargs)
        plan(begin_index)
        return result

    def after_add_noise(original_samples, noise, timesteps, *args, **kwargs):
        result = originals["add_noise"](original_samples, noise, timesteps, *args, **kwargs)
        # img2img's start for schedulers without set_begin_index: find it once per generation.
        if getattr(scheduler, "begin_index", None) is None and unet._gen.planned and unet._gen.step == 0:
            schedule = getattr(scheduler, "timesteps", None)
            if isinstance(schedule, torch.Tensor) and isinstance(timesteps, torch.Tensor) and timesteps.numel():
                first = timesteps.reshape(-1)[0].to(schedule.device, schedule.dtype)
                hits = (schedule == first).nonzero()
                if len(hits):
                    plan(int(hits[0, 0]))
        return result

    wrappers = {
        "set_timesteps": after_set_timesteps,
        "set_begin_index": after_set_begin_index,
        "add_noise": after_add_noise,
    }
    _unhook(scheduler)
    originals = {}
    for name, wrapper in wrappers.items():
        method = getattr(scheduler, name, None)
        if method is not None:
            originals[name] = method
            setattr(scheduler, name, functools.wraps(method)(wrapper))
    scheduler._dcfx_hooked = tuple(originals)


def _unhook(scheduler: Any) -> None:
    for name in getattr(scheduler, "_dcfx_hooked", ()):
        scheduler.__dict__.pop(name, None)
    scheduler.__dict__.pop("_dcfx_hooked", None)
