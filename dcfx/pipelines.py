"""diffusers pipelines: generation boundaries from the scheduler, and saving.

- Announcing (`attach`): the pipeline's scheduler becomes a subclass of its own class whose
  `set_timesteps` (and `set_begin_index`, or img2img's first `add_noise`) announce each
  generation, with its length, to the DeepCacheUNets listening to it (`Runtime.plan`), so no
  timestep is read per step. `detach` restores the class.
- Saving: a pipeline records each component's class in its config; recorded as
  DeepCacheUNet, the U-Net could be neither saved nor loaded. So `set_model` swaps the module
  without touching the record, and `save_plain_modules` makes `save_pretrained` save the
  plain module in dcfx's place.

The denoiser is `pipe.unet`, or `pipe.transformer` in a pipeline without a U-Net (Flux, SD3,
PixArt, ...): `denoiser(pipe)` names it.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import weakref
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from . import _torch_private as _private
from .policies.calibrate import check_scheduler
from .runtime import DeepCacheUNet


def deepcache_unet(module: Any) -> DeepCacheUNet | None:
    """`module` if it is a DeepCacheUNet, or the one a torch.compile wrapper holds."""
    module = _private.unwrap_compiled(module)
    return module if isinstance(module, DeepCacheUNet) else None


# -- the pipeline's config, and saving ---------------------------------------------------------
#
# A diffusers pipeline records each component's (library, class) in its config when it is
# assigned, and `save_pretrained` saves each component by its class. Recorded as
# DeepCacheUNet, the U-Net could be neither saved nor loaded: diffusers warns, writes
# "unet": [null, null] and keeps that record for every later save. So `enable` swaps the
# module without touching the record, and while dcfx is imported every pipeline's
# `save_pretrained` saves the plain module in dcfx's place, however it was assigned.


def denoiser(pipe: Any) -> str:
    """The attribute holding `pipe`'s denoising model: "unet", else "transformer"."""
    for name in ("unet", "transformer"):
        if getattr(pipe, name, None) is not None:
            return name
    raise TypeError(f"{type(pipe).__name__} has neither a .unet nor a .transformer for dcfx to run")


def _uses_config_record(pipe: Any, name: str = "unet") -> bool:
    """A diffusers pipeline (its config lists the model), as opposed to any object with a .unet."""
    config = getattr(pipe, "config", None)
    return isinstance(config, Mapping) and name in config and not isinstance(pipe, nn.Module)


def _registered_class(pipe: Any, name: str = "unet") -> str | None:
    entry = pipe.config.get(name) if _uses_config_record(pipe, name) else None
    return entry[1] if isinstance(entry, (tuple, list)) and len(entry) == 2 else None


def set_model(pipe: Any, name: str, model: nn.Module) -> None:
    if _uses_config_record(pipe, name):
        object.__setattr__(pipe, name, model)  # past DiffusionPipeline.__setattr__'s config record
    else:
        setattr(pipe, name, model)


def restore(pipe: Any, name: str, fast: DeepCacheUNet) -> None:
    """Put the module `fast` was given back as `pipe.<name>`, recorded in the pipeline's
    config as that module (a record diffusers made of dcfx's module is replaced)."""
    if _uses_config_record(pipe, name) and _registered_class(pipe, name) != type(fast.unet).__name__:
        pipe.register_modules(**{name: fast.given})  # diffusers' own record of the plain module
    elif name in ("unet", "transformer"):
        set_model(pipe, name, fast.given)
    else:
        object.__setattr__(pipe, name, fast.given)


@contextlib.contextmanager
def _plain_components(pipe: Any) -> Iterator[None]:
    """Within: `pipe`'s dcfx modules replaced by the modules they were given, and recorded as
    those; after: dcfx's modules back, the records kept (so later saves stay right)."""
    swapped = {}
    for name in list(getattr(pipe, "config", {})):
        value = pipe.__dict__.get(name) if not name.startswith("_") else None
        fast = deepcache_unet(value)
        if fast is None:
            continue
        if fast.runtime.packaged:
            raise TypeError(
                f"pipe.{name} runs an AOT package (dcfx.load_package), which holds no U-Net to save; "
                f"save the pipeline with its U-Net before loading the package into it"
            )
        swapped[name] = value
    try:
        for name, value in swapped.items():
            restore(pipe, name, deepcache_unet(value))
        yield
    finally:
        for name, value in swapped.items():
            object.__setattr__(pipe, name, value)


def save_plain_modules() -> None:
    """Make diffusers' `DiffusionPipeline.save_pretrained` save the plain module in place of
    any dcfx module (once per process; only when diffusers is imported already, so dcfx
    never imports it: no pipeline can hold dcfx's module before it is)."""
    if "diffusers" not in sys.modules:
        return
    from diffusers.pipelines.pipeline_utils import DiffusionPipeline

    original = DiffusionPipeline.save_pretrained
    if getattr(original, "_dcfx_saves_plain", False):
        return

    @functools.wraps(original)
    def save_pretrained(self: Any, *args: Any, **kwargs: Any) -> Any:
        with _plain_components(self):
            return original(self, *args, **kwargs)

    save_pretrained._dcfx_saves_plain = True
    DiffusionPipeline.save_pretrained = save_pretrained


class _Listener:
    """A pipeline's DeepCacheUNet, planned by the scheduler it listens to (both held weakly)."""

    def __init__(self, pipe: Any, unet: DeepCacheUNet, name: str):
        self.pipe = weakref.ref(pipe)
        self.unet = weakref.ref(unet)
        self.name = name

    def valid(self) -> bool:
        pipe, unet = self.pipe(), self.unet()
        if pipe is None or unet is None or deepcache_unet(getattr(pipe, self.name)) is not unet:
            return False
        if self not in _LISTENERS.get(pipe.scheduler, ()):
            _listen(pipe.scheduler, self)  # a new scheduler: it plans the next generation
            return False
        return True


def attach(pipe: Any, unet: DeepCacheUNet) -> None:
    """`unet` becomes the pipeline's denoiser (`pipe.unet` or `pipe.transformer`), its
    generations announced by `pipe.scheduler`."""
    name = denoiser(pipe)
    set_model(pipe, name, unet)
    _listen(pipe.scheduler, _Listener(pipe, unet, name))


def detach(pipe: Any) -> None:
    """`pipe`'s schedulers stop announcing to it (a scheduler nobody listens to any more gets
    its own class back)."""
    for scheduler in list(_LISTENERS):
        kept = [x for x in _LISTENERS[scheduler] if x.pipe() not in (pipe, None)]
        if kept:
            _LISTENERS[scheduler] = kept
        else:
            del _LISTENERS[scheduler]
            base = getattr(type(scheduler), "_dcfx_base", None)
            if base is not None:
                scheduler.__class__ = base


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
            unet.runtime.plan(max(len(timesteps) - start, 1), listener.valid)


def _img2img_start(scheduler: Any, timesteps: Any) -> None:
    # For schedulers without set_begin_index: where img2img starts, once per generation.
    if getattr(scheduler, "begin_index", None) is not None:
        return
    listeners = [x.unet() for x in _LISTENERS.get(scheduler, ())]
    if not any(u is not None and u.runtime.awaits_planned_start() for u in listeners):
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
