"""`DeepCacheUNet`: the drop-in U-Net that runs the full or the shallow graph per step.

The module around a `Runtime` (`runtime.py`), which does the work of each call; this module
adds what makes it a U-Net in pipelines: the wrapped U-Net's attributes, `.to()` and
pickling, torch.compile settings, and the per-thread generation API.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from .. import compile as _compile
from ..config import DeepCacheConfig
from ..costs import Spent
from ..inspection import DeepCacheGraphs
from .runtime import Runtime


class DeepCacheUNet(nn.Module):
    """A U-Net that runs DeepCache; build it with `dcfx.optimize`.

    Call it exactly like the wrapped U-Net (same arguments, same return type). Attributes it
    does not define (`config`, `dtype`, `device`, `conv_in`, ...) are the wrapped U-Net's. The
    wrapped U-Net is `self.unet`; it is not modified and stays usable. Generations (`begin`,
    `history`, `spent`) and caches are per thread. Pickles (and `copy.deepcopy`, `torch.save`)
    as its U-Net and config: graphs are rebuilt at the first call, generations start afresh.

    Compiling: `compile=True` in the config, `fast.compile(...)`, `torch.compile(fast, ...)`, or
    a U-Net compiled before `optimize` all compile the graphs with those torch.compile settings
    (whole graphs, static shapes, once per input signature); the per-step bookkeeping stays in
    Python, outside any compiled region. `self.runtime` (a `Runtime`) does the work.
    """

    # torch.compile of this module (or of a model around it) must not trace the per-step host
    # logic: that would graph-break at every call and recompile per step and per signature.
    # Instead the call runs here, and the graphs are compiled with the wrapper's settings.
    __call__ = torch.compiler.disable(nn.Module.__call__)

    def __init__(self, unet: nn.Module, config: DeepCacheConfig, compiler: _compile.Compiler | None = None,
                 given: nn.Module | None = None):
        """`compiler` None: the config's settings. `given`: the module `dcfx.optimize` was
        given, when it is not `unet` (a torch.compile wrapper around it)."""
        super().__init__()
        self.unet = unet
        self.runtime = Runtime(unet, config, compiler)
        self.__dict__["_dc_given"] = given if given is not None else unet  # not a submodule: `unet` holds its weights

    def __reduce_ex__(self, protocol: int) -> tuple:
        # Graphs, caches and generations are derived state, rebuilt lazily after loading.
        if self.runtime.packaged:
            raise TypeError("a DeepCacheUNet loaded from an AOT package cannot be pickled; load the package again")
        return (type(self), (self.unet, self.runtime.config))

    def compile(self, *args: Any, **kwargs: Any) -> None:
        """Compile the graphs with these torch.compile settings (its keyword arguments:
        `mode=`, `options=`, `backend=`, `disable=`); always whole graphs with static shapes,
        once per input signature, at their first call. Replaces the config's settings;
        `torch.compile(fast, ...)` does the same for calls made through it."""
        compiler = _compile.from_arguments(args, kwargs, f"{type(self).__name__}.compile()")
        self.runtime.compiler = compiler
        if compiler is None or isinstance(compiler.backend, str) and compiler.backend == "inductor":
            self.runtime.config = dataclasses.replace(
                self.runtime.config, compile=compiler is not None, compile_mode=compiler.mode if compiler else None,
                compile_options=(compiler.options or {}) if compiler else {},
            )

    @property
    def given(self) -> nn.Module:
        """The module `dcfx.optimize` was given: `self.unet`, or the torch.compile'd module
        around it (what `dcfx.disable` restores)."""
        return self.__dict__["_dc_given"]

    @property
    def deepcache_config(self) -> DeepCacheConfig:
        """The `DeepCacheConfig` this module runs with (`.config` is the U-Net's)."""
        return self.runtime.config

    def begin(self, num_steps: int | None = None) -> None:
        """Start a new generation in the calling thread: its next call (that does not join a
        step in progress) is step 0 and runs full.

        With `num_steps`, that many steps form the generation (the non-uniform schedule needs
        it); the step after them is found automatically again. Either way no timestep is read
        on the host: this is the sync-free path, and the one to use while capturing CUDA graphs.
        """
        self.runtime.begin(num_steps)

    def is_full_step(self, step: int, num_steps: int | None = None) -> bool:
        """Whether step `step` of a generation runs the full graph under a fixed schedule."""
        return self.runtime.policy.schedule.is_full(step, num_steps)

    def full_steps(self, num_steps: int) -> tuple[int, ...]:
        """The full steps of a generation of `num_steps` steps under a fixed schedule."""
        return self.runtime.policy.schedule.full_steps(num_steps)

    @property
    def history(self) -> tuple[str, ...]:
        """The calling thread's last generations, one 'F' (a full graph ran) or 'S' per step."""
        return self.runtime.steps.history()

    @property
    def spent(self) -> Spent | None:
        """What the calling thread's last generation cost: steps, graph runs, misses and FLOPs."""
        return self.runtime.spent()

    def graphs(self, *args: Any, **kwargs: Any) -> DeepCacheGraphs:
        """The graphs this module runs for a call with these arguments (call it like the
        U-Net). Captures (once per signature, shared with the runtime) but runs nothing."""
        entry, call = self.runtime.entry_for(args, kwargs)
        return entry.view(call)

    @property
    def compile_seconds(self) -> dict[str, float]:
        """Seconds spent in the first (compiling) call of each compiled graph, by name."""
        return self.runtime.compile_seconds()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.runtime.call(args, kwargs)

    def extra_repr(self) -> str:
        c = self.runtime.config
        policy = f"adaptive={c.adaptive!r}" if c.adaptive else f"interval={c.interval}, schedule={c.schedule!r}"
        cut = f"first_blocks={c.first_blocks}, last_blocks={c.last_blocks}" if c.blocks_given else f"branch={c.branch}"
        return f"{policy}, {cut}, forecast={c.forecast}, compile={c.compile}"

    def _apply(self, fn, recurse=True):
        # .to(), .half(), ...: graphs bake in dtypes and devices, so a real change switches to
        # that state's graphs; a no-op move (CPU offload hooks move before every forward)
        # keeps everything.
        result = super()._apply(fn, recurse)
        self.runtime.entries.moved()
        return result

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules", {})
            if "unet" not in modules or name.startswith("_dc"):
                raise
            return getattr(modules["unet"], name)
