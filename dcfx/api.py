"""The public entry points: `optimize` a U-Net, `enable`/`disable` DeepCache on a pipeline."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import sys
import weakref
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from . import _torch_private as _private
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
    _save_plain_unets()
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
    U-Net, and `pipe.save_pretrained` saves the plain U-Net (as for any dcfx U-Net, see
    `optimize`), so `from_pretrained` loads what was saved. `disable(pipe)` undoes it all.

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
    fast = _deepcache_unet(pipe.unet)
    if fast is not None:
        _restore(pipe, "unet", fast)
    return pipe.unet


def _deepcache_unet(module: Any) -> DeepCacheUNet | None:
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


def _uses_config_record(pipe: Any) -> bool:
    """A diffusers pipeline (its config lists the U-Net), as opposed to any object with a .unet."""
    config = getattr(pipe, "config", None)
    return isinstance(config, Mapping) and "unet" in config and not isinstance(pipe, nn.Module)


def _registered_class(pipe: Any, name: str = "unet") -> str | None:
    entry = pipe.config.get(name) if _uses_config_record(pipe) else None
    return entry[1] if isinstance(entry, (tuple, list)) and len(entry) == 2 else None


def _set_unet(pipe: Any, unet: nn.Module) -> None:
    if _uses_config_record(pipe):
        object.__setattr__(pipe, "unet", unet)  # past DiffusionPipeline.__setattr__'s config record
    else:
        pipe.unet = unet


def _restore(pipe: Any, name: str, fast: DeepCacheUNet) -> None:
    """Put the module `fast` was given back as `pipe.<name>`, recorded in the pipeline's
    config as that module (a record diffusers made of dcfx's module is replaced)."""
    if _uses_config_record(pipe) and _registered_class(pipe, name) != type(fast.unet).__name__:
        pipe.register_modules(**{name: fast.given})  # diffusers' own record of the plain module
    elif name == "unet":
        _set_unet(pipe, fast.given)
    else:
        object.__setattr__(pipe, name, fast.given)


@contextlib.contextmanager
def _plain_components(pipe: Any) -> Iterator[None]:
    """Within: `pipe`'s dcfx modules replaced by the modules they were given, and recorded as
    those; after: dcfx's modules back, the records kept (so later saves stay right)."""
    swapped = {}
    for name in list(getattr(pipe, "config", {})):
        value = pipe.__dict__.get(name) if not name.startswith("_") else None
        fast = _deepcache_unet(value)
        if fast is None:
            continue
        if hasattr(fast.unet, "_dcfx_preload"):
            raise TypeError(
                f"pipe.{name} runs an AOT package (dcfx.load_package), which holds no U-Net to save; "
                f"save the pipeline with its U-Net before loading the package into it"
            )
        swapped[name] = value
    try:
        for name, value in swapped.items():
            _restore(pipe, name, _deepcache_unet(value))
        yield
    finally:
        for name, value in swapped.items():
            object.__setattr__(pipe, name, value)


def _save_plain_unets() -> None:
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
