"""`dcfx.calibrate`: a static schedule fitted to a model, for a FLOP budget.

Runs the generations (every step full, the cut split at its head so that the fresh feature
there is seen too), shows each full step to a `policies.calibrate.Recorder` through the
runtime's observer hook, and has `policies.calibrate.fit` choose the schedule. See
`dcfx/policies/calibrate.py` for what is fitted.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import nn

from . import api, pipelines
from .config import DeepCacheConfig
from .costs import full_steps_for
from .policies.calibrate import Recorder, fit
from .runtime import DeepCacheUNet


def calibrate(
    target: Any,
    inputs: Iterable[Any] | Callable[[nn.Module], Any],
    *,
    budget: float,
    branch: int = 0,
    forecast: int = 0,
    first_blocks: int | None = None,
    last_blocks: int | None = None,
    scheduler: Any = None,
    **call_kwargs: Any,
) -> DeepCacheConfig:
    """Fit a static schedule to a model for a FLOP budget; returns an explicit-schedule config.

    Give either a diffusers pipeline and the prompts (or labels) to generate, each as the
    pipeline's first argument, with `call_kwargs` passed to every pipeline call
    (`num_inference_steps=...`, `guidance_scale=...`): `calibrate(pipe, ["a cat", "a dog"],
    budget=10, num_inference_steps=50)`; or a U-Net and a function that runs generations
    with the U-Net it is given: `calibrate(unet, lambda u: my_loop(u), budget=10,
    scheduler=my_scheduler)`. Every step runs full during calibration.

    `budget` is the cost of one generation in full-U-Net-step equivalents (plain sampling with
    T steps costs T): the schedule gets as many full steps as it affords at `branch`'s
    shallow/full FLOP ratio. A diffusion transformer (or a pipeline's `transformer`) is cut at
    `first_blocks` and `last_blocks` instead (`DeepCacheConfig`'s defaults when None). The
    config keeps the cut and `forecast`, and its `calibration`
    records the model, the scheduler and the step count, which dcfx checks wherever it runs
    the config (another model, scheduler or step count is refused), plus the rescale
    polynomial for `adaptive="accumulated"` and each adaptive signal's rank correlation with
    the deep feature's true change. `config.save(path)` / `DeepCacheConfig.load(path)` keep
    it as JSON.
    """
    pipe = None
    if isinstance(target, nn.Module):
        unet, run_all = target, inputs
        if not callable(run_all):
            raise TypeError("calibrate(unet, loop, ...) needs a function that runs generations with the U-Net it is given")
    else:
        pipe = target
        if not (hasattr(pipe, "unet") or hasattr(pipe, "transformer")) or not callable(pipe):
            raise TypeError(f"calibrate takes a diffusers pipeline or a U-Net, got {type(target).__name__}")
        unet = getattr(pipe, pipelines.denoiser(pipe))
        scheduler = scheduler if scheduler is not None else getattr(pipe, "scheduler", None)
        prompts = list(inputs)  # type: ignore[arg-type]
        if not prompts:
            raise ValueError("calibrate needs at least one prompt or label to generate")
    if isinstance(unet, DeepCacheUNet):
        unet = unet.unet
    if not budget > 0:
        raise ValueError(f"budget must be > 0 full-step equivalents, got {budget!r}")
    # Every step full (a warm-up longer than any generation), with the head split so that the
    # fresh feature at the cut is seen too.
    record = DeepCacheConfig(branch=branch, first_blocks=first_blocks, last_blocks=last_blocks, adaptive="cut",
                             warmup=1 << 30, fuse_cut=False)
    recorder = Recorder()
    with torch.no_grad():
        if pipe is not None:
            fast = api.enable(pipe, record)
            try:
                with fast.runtime.observing(recorder):
                    for prompt in prompts:
                        pipe(prompt, **call_kwargs)
            finally:
                api.disable(pipe)
        else:
            fast = api.optimize(unet, record)
            with fast.runtime.observing(recorder):
                run_all(fast)
    num_steps = recorder.step_count()
    count = full_steps_for(budget, num_steps, _shallow_fraction(fast))
    cut = fast.deepcache_config  # a transformer's cut filled in
    return fit(recorder.complete(), count, unet=unet, scheduler=scheduler, budget=budget, branch=branch,
               forecast=forecast, first_blocks=cut.first_blocks, last_blocks=cut.last_blocks)


def _shallow_fraction(fast: DeepCacheUNet) -> float:
    """Shallow/full FLOPs of the calibrated U-Net's first signature (`dcfx.costs`)."""
    for cost in fast.runtime.costs():
        if cost.full:
            return cost.shallow_fraction
    raise ValueError("calibration could not count the graphs' FLOPs")
