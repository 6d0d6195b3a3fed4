"""The public entry points: `optimize` a U-Net, `enable`/`disable` DeepCache on a pipeline."""

from __future__ import annotations

import dataclasses
import functools
import types
import weakref
from typing import Any, Mapping

import torch
from torch import nn

from . import compile as _compile
from .calibrate import check_model, check_scheduler
from .capture import CallBinder
from .config import DeepCacheConfig
from .runtime import DeepCacheUNet
from .runtime.cuda_graphs import StepGraphs

def optimize(unet: nn.Module, config: DeepCacheConfig | None = None, **options: Any) -> DeepCacheUNet:
    """Wrap `unet` so that it runs DeepCache; a drop-in replacement in pipelines and loops.

    Give either a `DeepCacheConfig` or its fields as keywords (`interval=3, branch=0, ...`).
    Nothing happens to `unet`: graphs are captured lazily, per input signature, at the first
    call, and share its weights. Passing a `DeepCacheUNet` re-wraps its U-Net with the new
    config (and reuses the captures).

    A compiled U-Net (`torch.compile(unet, ...)` or after `unet.compile(...)`) is run as the
    plain U-Net it wraps, with its torch.compile settings applied to the full and the shallow
    graph (they replace the config's compile settings); `dcfx.disable` gives the compiled
    module back. Compiling afterwards works the same: `torch.compile(fast, ...)` or
    `fast.compile(...)`.

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
    unet, compiler = _compile.of_module(unet)
    not_a_unet = CallBinder(unet).not_a_unet
    if not_a_unet:
        raise TypeError(not_a_unet)
    check_model(config, unet)
    fast = DeepCacheUNet(unet, config, compiler)  # compiler None: the config's settings
    fast.__dict__["_dc_given"] = given  # not a submodule: `unet` already registers its weights
    return fast


def cuda_graphs(fast: DeepCacheUNet, *args: Any, capture: bool | None = None, **kwargs: Any) -> StepGraphs:
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
    return StepGraphs(fast, args, kwargs, capture=capture)


def enable(pipe: Any, config: DeepCacheConfig | None = None, **options: Any) -> DeepCacheUNet:
    """Run `pipe.unet` with DeepCache, with generation boundaries taken from the scheduler.

    Sets `pipe.unet = optimize(pipe.unet, ...)` and makes the pipeline's scheduler announce
    generations: each `set_timesteps` starts one of the scheduler's number of U-Net calls,
    corrected by `set_begin_index` or, for schedulers without it, by the first `add_noise`
    (img2img's start; one device read per generation). No timestep is read per step, and the
    non-uniform schedule knows its step count. A call past the announced count, or after
    `pipe.scheduler` was replaced (the new one is hooked for the next generation), falls back
    to automatic boundaries. The scheduler keeps its class for `isinstance`, copies and
    pickles as a plain scheduler. A diffusers pipeline's config keeps recording the plain
    U-Net, and `pipe.save_pretrained` saves the plain U-Net, so `from_pretrained` loads what
    was saved. `disable(pipe)` undoes it all.

    `pipe.unet = torch.compile(pipe.unet, ...)` before or after `enable` compiles the full and
    the shallow graph with those settings (see `optimize`).
    """
    if _deepcache_unet(pipe.unet) is not None:
        disable(pipe)
    unet = optimize(pipe.unet, config, **options)
    check_scheduler(unet.deepcache_config, pipe.scheduler)
    _set_unet(pipe, unet)
    _listen(pipe.scheduler, _Listener(pipe, unet))
    return unet


def disable(pipe: Any) -> nn.Module:
    """Undo `enable` (or `optimize`): restore the plain U-Net, the scheduler and the
    pipeline's config as they were before (also after `pipe.unet = dcfx.optimize(...)`)."""
    for scheduler in list(_LISTENERS):
        kept = [x for x in _LISTENERS[scheduler] if x.pipe() not in (pipe, None)]
        if kept:
            _LISTENERS[scheduler] = kept
        else:
            del _LISTENERS[scheduler]
            base = getattr(type(scheduler), "_dcfx_base", None)
            if base is not None:
                scheduler.__class__ = base
    attributes = getattr(pipe, "__dict__", {})
    if getattr(attributes.get("save_pretrained"), "__func__", None) is _save_pretrained:
        del attributes["save_pretrained"]
    fast = _deepcache_unet(pipe.unet)
    if fast is not None:
        if _registered_class(pipe) == DeepCacheUNet.__name__:
            pipe.unet = fast.given  # assigned by hand: diffusers records the plain one again
        else:
            _set_unet(pipe, fast.given)
    return pipe.unet


def _deepcache_unet(module: Any) -> DeepCacheUNet | None:
    """`module` if it is a DeepCacheUNet, or the one a torch.compile wrapper holds."""
    if isinstance(module, _compile.OptimizedModule):
        module = module._orig_mod
    return module if isinstance(module, DeepCacheUNet) else None


# -- the pipeline's config and save_pretrained while enabled ----------------------------------
#
# A diffusers pipeline records each component's (library, class) in its config when it is
# assigned. Recorded as DeepCacheUNet, the U-Net could not be saved (save_pretrained warns and
# writes "unet": [null, null]) nor loaded. So `enable` swaps the module without touching the
# record, and saving swaps the plain U-Net in for the duration of the save.


def _uses_config_record(pipe: Any) -> bool:
    """A diffusers pipeline (its config lists the U-Net), as opposed to any object with a .unet."""
    config = getattr(pipe, "config", None)
    return isinstance(config, Mapping) and "unet" in config and not isinstance(pipe, nn.Module)


def _registered_class(pipe: Any) -> str | None:
    entry = pipe.config.get("unet") if _uses_config_record(pipe) else None
    return entry[1] if isinstance(entry, (tuple, list)) and len(entry) == 2 else None


def _set_unet(pipe: Any, unet: nn.Module) -> None:
    if not _uses_config_record(pipe):
        pipe.unet = unet
        return
    object.__setattr__(pipe, "unet", unet)  # past DiffusionPipeline.__setattr__'s config record
    if isinstance(unet, DeepCacheUNet) and callable(getattr(type(pipe), "save_pretrained", None)):
        pipe.__dict__["save_pretrained"] = types.MethodType(_save_pretrained, pipe)


def _save_pretrained(self: Any, *args: Any, **kwargs: Any) -> Any:
    """The pipeline's own `save_pretrained`, with dcfx's U-Net replaced by the plain one."""
    current = self.__dict__.get("unet")
    fast = _deepcache_unet(current)
    if fast is None:
        return type(self).save_pretrained(self, *args, **kwargs)
    # Assigned normally, so the config records the plain U-Net again even if a wrapper around
    # dcfx's U-Net (`pipe.unet = torch.compile(pipe.unet)`) was recorded since `enable`.
    setattr(self, "unet", fast.given)
    try:
        return type(self).save_pretrained(self, *args, **kwargs)
    finally:
        object.__setattr__(self, "unet", current)


_save_pretrained.__name__ = "save_pretrained"  # a copied or pickled pipeline finds its own


class _Listener:
    """A pipeline's DeepCacheUNet, planned by the scheduler it listens to (both held weakly)."""

    def __init__(self, pipe: Any, unet: DeepCacheUNet):
        self.pipe = weakref.ref(pipe)
        self.unet = weakref.ref(unet)

    def valid(self) -> bool:
        pipe, unet = self.pipe(), self.unet()
        if pipe is None or unet is None or _deepcache_unet(pipe.unet) is not unet:
            return False
        if self not in _LISTENERS.get(pipe.scheduler, ()):
            _listen(pipe.scheduler, self)  # a new scheduler: it plans the next generation
            return False
        return True


# scheduler -> its listeners. Weak keys: a dropped scheduler takes its hooks with it.
_LISTENERS: weakref.WeakKeyDictionary[Any, list[_Listener]] = weakref.WeakKeyDictionary()


def _listen(scheduler: Any, listener: _Listener) -> None:
    listeners = _LISTENERS.setdefault(scheduler, [])
    if listener not in listeners:
        listeners.append(listener)
    if not hasattr(type(scheduler), "_dcfx_base"):
        scheduler.__class__ = _announcing_class(type(scheduler))


def _announce(scheduler: Any, start: int) -> None:
    timesteps = getattr(scheduler, "timesteps", None)
    if timesteps is None:
        return
    for listener in list(_LISTENERS.get(scheduler, ())):
        unet = listener.unet()
        if unet is not None:
            check_scheduler(unet.deepcache_config, scheduler)
            unet._plan(max(len(timesteps) - start, 1), listener.valid)


def _img2img_start(scheduler: Any, timesteps: Any) -> None:
    # For schedulers without set_begin_index: where img2img starts, once per generation.
    if getattr(scheduler, "begin_index", None) is not None:
        return
    listeners = [x.unet() for x in _LISTENERS.get(scheduler, ())]
    if not any(u is not None and u._awaits_planned_start() for u in listeners):
        return
    schedule = getattr(scheduler, "timesteps", None)
    if isinstance(schedule, torch.Tensor) and isinstance(timesteps, torch.Tensor) and timesteps.numel():
        hits = (schedule == timesteps.reshape(-1)[0].to(schedule.device, schedule.dtype)).nonzero()
        if len(hits):
            _announce(scheduler, int(hits[0, 0]))


def _rebuild(base: type) -> Any:
    return base.__new__(base)


@functools.lru_cache(maxsize=None)
def _announcing_class(base: type) -> type:
    """`base` with its timestep methods announcing generations to the listening U-Nets."""

    def set_timesteps(self, *args, **kwargs):
        result = base.set_timesteps(self, *args, **kwargs)
        _announce(self, getattr(self, "begin_index", None) or 0)
        return result

    def set_begin_index(self, begin_index=0, *args, **kwargs):
        result = base.set_begin_index(self, begin_index, *args, **kwargs)
        _announce(self, begin_index)
        return result

    def add_noise(self, original_samples, noise, timesteps, *args, **kwargs):
        result = base.add_noise(self, original_samples, noise, timesteps, *args, **kwargs)
        _img2img_start(self, timesteps)
        return result

    def __reduce_ex__(self, protocol):
        # Copies and pickles are plain schedulers: the hooks belong to this instance.
        return (_rebuild, (base,), dict(self.__dict__))

    namespace = {
        "__module__": base.__module__,
        "__qualname__": base.__qualname__,
        "__reduce_ex__": __reduce_ex__,
        "_dcfx_base": base,
    }
    for method in (set_timesteps, set_begin_index, add_noise):
        if callable(getattr(base, method.__name__, None)):
            namespace[method.__name__] = functools.wraps(getattr(base, method.__name__))(method)
    return type(base.__name__, (base,), namespace)
