"""The public entry points: `optimize` a U-Net, `enable`/`disable` DeepCache on a pipeline,
`cuda_graphs`. Wiring only: the runtime runs the calls, `pipelines` hooks diffusers.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from . import compile as _compile
from . import pipelines
from .capture import CallBinder
from .config import DeepCacheConfig
from .policies.calibrate import check_model, check_scheduler
from .runtime import DeepCacheUNet
from .runtime.cuda_graphs import CapturedSteps


def optimize(unet: nn.Module, config: DeepCacheConfig | None = None, **options: Any) -> DeepCacheUNet:
    """Wrap `unet` so that it runs DeepCache; a drop-in replacement in pipelines and loops.

    `unet` is a U-Net (cut at skip connection `branch`) or a diffusion transformer of a class
    `dcfx.passes.families.TRANSFORMERS` lists (its first `first_blocks` and last `last_blocks`
    blocks run every step, the middle is cached as a residual); another transformer class is
    refused with a ValueError naming the supported ones.

    Give either a `DeepCacheConfig` or its fields as keywords (`interval=3, branch=0, ...`).
    Nothing happens to `unet`: graphs are captured lazily, per input signature, at the first
    call, and share its weights. Passing a `DeepCacheUNet` re-wraps its U-Net with the new
    config (and reuses the captures).

    A compiled U-Net (`torch.compile(unet, ...)` or after `unet.compile(...)`) is run as the
    plain U-Net it wraps, with its torch.compile settings applied to the full and the shallow
    graph (they replace the config's compile settings); `dcfx.disable` gives the compiled
    module back. Compiling afterwards works the same: `torch.compile(fast, ...)` or
    `fast.compile(...)`. Disabled compiling compiles nothing, also with `compile=True`:
    `unet.compile(disable=True)`, `torch.compiler.disable(unet)`, `TORCHDYNAMO_DISABLE=1`.

    `pipe.unet = dcfx.optimize(pipe.unet)` keeps a diffusers pipeline saveable: its
    `save_pretrained` saves the plain U-Net, which `from_pretrained` loads back.

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
        unet = unet.given
    if not isinstance(unet, nn.Module):
        raise TypeError(f"optimize expects a torch.nn.Module U-Net, got {type(unet).__name__}")
    given = unet
    unet, has_setting, compiler = _compile.of_module(unet)
    not_a_unet = CallBinder(unet).not_a_unet
    if not_a_unet:
        raise TypeError(not_a_unet)
    if has_setting:  # the module's compile setting (also "disabled") replaces the config's
        config = _compile.with_compiler(config, compiler)
    check_model(config, unet)
    pipelines.save_plain_modules()
    return DeepCacheUNet(unet, config, compiler, given=given)  # compiler None: the config's settings


def cuda_graphs(fast: DeepCacheUNet, *args: Any, capture: bool | None = None, **kwargs: Any) -> CapturedSteps:
    """Capture `fast`'s steps for this call signature in CUDA graphs, to replay per step.

    Call it like the U-Net, with the static tensors the loop will update in place (the
    sample and a tensor timestep; the conditioning usually stays). Then `graphs.step(i,
    num_steps)` runs step `i` of a generation (0 starts one) by replaying the graph its
    policy picks, and returns the U-Net's output in static tensors (the next step overwrites
    them: hand the scheduler a copy). Fixed and calibrated schedules read nothing from the
    device; adaptive policies read their one scalar per step. `capture=False` (the default
    without CUDA) runs the same steps uncaptured.

        graphs = dcfx.cuda_graphs(fast, x, t, encoder_hidden_states=text)
        for i, step_t in enumerate(scheduler.timesteps):
            x.copy_(scheduler.scale_model_input(latents, step_t)); t.copy_(step_t)
            eps = graphs.step(i, len(scheduler.timesteps)).sample.clone()
            latents = scheduler.step(eps, step_t, latents).prev_sample
    """
    if not isinstance(fast, DeepCacheUNet):
        raise TypeError(f"cuda_graphs takes a DeepCacheUNet (dcfx.optimize's result), got {type(fast).__name__}")
    return CapturedSteps(fast.runtime, args, kwargs, capture=capture)


def enable(pipe: Any, config: DeepCacheConfig | None = None, **options: Any) -> DeepCacheUNet:
    """Run `pipe.unet` (or `pipe.transformer`, in a pipeline without a U-Net) with DeepCache,
    with generation boundaries taken from the scheduler.

    Sets `pipe.unet = optimize(pipe.unet, ...)` and makes the pipeline's scheduler announce
    generations: each `set_timesteps` starts one of the scheduler's number of U-Net calls,
    corrected by `set_begin_index` or, for schedulers without it, by the first `add_noise`
    (img2img's start; one device read per generation). No timestep is read per step, and the
    non-uniform schedule knows its step count. A call past the announced count, or after
    `pipe.scheduler` was replaced (the new one is hooked for the next generation), falls back
    to automatic boundaries. The scheduler keeps its class for `isinstance`, copies and
    pickles as a plain scheduler. A diffusers pipeline's config keeps recording the plain
    U-Net, and `pipe.save_pretrained` saves the plain U-Net (as for any dcfx U-Net, see
    `optimize`), so `from_pretrained` loads what was saved. `disable(pipe)` undoes it all.

    `pipe.unet = torch.compile(pipe.unet, ...)` before or after `enable` compiles the full and
    the shallow graph with those settings (see `optimize`).
    """
    name = pipelines.denoiser(pipe)
    if pipelines.deepcache_unet(getattr(pipe, name)) is not None:
        disable(pipe)
    unet = optimize(getattr(pipe, name), config, **options)
    check_scheduler(unet.deepcache_config, pipe.scheduler)
    pipelines.attach(pipe, unet)
    return unet


def disable(pipe: Any) -> nn.Module:
    """Undo `enable` (or `optimize`): restore the plain U-Net, the scheduler and the
    pipeline's config as they were before (also after `pipe.unet = dcfx.optimize(...)`)."""
    pipelines.detach(pipe)
    name = pipelines.denoiser(pipe)
    fast = pipelines.deepcache_unet(getattr(pipe, name))
    if fast is not None:
        pipelines.restore(pipe, name, fast)
    return getattr(pipe, name)
