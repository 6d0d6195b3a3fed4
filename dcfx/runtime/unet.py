"""`DeepCacheUNet`: the drop-in U-Net that runs the full or the shallow graph per step.

Per call: normalise the arguments (`capture.CallBinder`), place the call in a step, a
generation and a stream (`steps.StepTracker`), select the module state's graphs for the
call's signature (`graphs.GraphCache`), let the policy decide (`policies.Policy`), run the
graphs, and keep what the next steps need in the stream's slot (`slots`).
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any, Callable

import torch
from torch import nn

from .. import compile as _compile
from .._torch_private import pytree
from ..capture import CallBinder, FloatsNotLiftable
from ..config import DeepCacheConfig
from ..costs import Spent
from ..inspection import DeepCacheGraphs, graphs_of
from ..policies import Policy
from .graphs import Entry, GraphCache
from .run import run_call
from .spent import spent_of
from .steps import Generation, StepTracker


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
    Python, outside any compiled region.
    """

    # torch.compile of this module (or of a model around it) must not trace the per-step host
    # logic: that would graph-break at every call and recompile per step and per signature.
    # Instead the call runs here, and the graphs are compiled with the wrapper's settings.
    __call__ = torch.compiler.disable(nn.Module.__call__)

    def __init__(self, unet: nn.Module, config: DeepCacheConfig, compiler: _compile.Compiler | None = None):
        super().__init__()
        self.unet = unet
        self._dc_config = config
        self._compiler = compiler if compiler is not None else _compile.from_config(config)
        self._outer: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # torch.compile wrappers' compilers
        self._binder = CallBinder(unet)
        self._policy = Policy(config)
        self._steps = StepTracker()
        self._graphs = GraphCache(unet, config)
        self._observer: Callable | None = None  # dcfx.calibrate's recorder of full steps
        # A loaded AOT package's stand-in U-Net brings its compiled graphs, also when re-wrapped.
        preload = getattr(unet, "_dcfx_preload", None)
        if preload is not None:
            preload(self)

    def __reduce_ex__(self, protocol: int) -> tuple:
        # Graphs, caches and generations are derived state, rebuilt lazily after loading.
        if self._graphs.preloaded is not None:
            raise TypeError("a DeepCacheUNet loaded from an AOT package cannot be pickled; load the package again")
        return (type(self), (self.unet, self._dc_config))

    def compile(self, *args: Any, **kwargs: Any) -> None:
        """Compile the graphs with these torch.compile settings (its keyword arguments:
        `mode=`, `options=`, `backend=`, `disable=`); always whole graphs with static shapes,
        once per input signature, at their first call. Replaces the config's settings;
        `torch.compile(fast, ...)` does the same for calls made through it."""
        compiler = _compile.from_arguments(args, kwargs, f"{type(self).__name__}.compile()")
        self._compiler = compiler
        if compiler is None or isinstance(compiler.backend, str) and compiler.backend == "inductor":
            self._dc_config = dataclasses.replace(
                self._dc_config, compile=compiler is not None, compile_mode=compiler.mode if compiler else None,
                compile_options=(compiler.options or {}) if compiler else {},
            )

    @property
    def given(self) -> nn.Module:
        """The module `dcfx.optimize` was given: `self.unet`, or the torch.compile'd module
        around it (what `dcfx.disable` restores)."""
        return self.__dict__.get("_dc_given", self.unet)

    @property
    def deepcache_config(self) -> DeepCacheConfig:
        """The `DeepCacheConfig` this module runs with (`.config` is the U-Net's)."""
        return self._dc_config

    def begin(self, num_steps: int | None = None) -> None:
        """Start a new generation in the calling thread: its next call (that does not join a
        step in progress) is step 0 and runs full.

        With `num_steps`, that many steps form the generation (the non-uniform schedule needs
        it); the step after them is found automatically again. Either way no timestep is read
        on the host: this is the sync-free path, and the one to use while capturing CUDA graphs.
        """
        if num_steps is not None and (isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1):
            raise ValueError(f"num_steps must be None or an integer >= 1, got {num_steps!r}")
        if num_steps is None and self._policy.needs_num_steps:
            raise ValueError("schedule='nonuniform' needs begin(num_steps), the generation's number of steps")
        self._policy.check_steps(num_steps)
        self._steps.begin(num_steps)

    def is_full_step(self, step: int, num_steps: int | None = None) -> bool:
        """Whether step `step` of a generation runs the full graph under a fixed schedule."""
        return self._policy.schedule.is_full(step, num_steps)

    def full_steps(self, num_steps: int) -> tuple[int, ...]:
        """The full steps of a generation of `num_steps` steps under a fixed schedule."""
        return self._policy.schedule.full_steps(num_steps)

    @property
    def history(self) -> tuple[str, ...]:
        """The calling thread's last generations, one 'F' (a full graph ran) or 'S' per step."""
        return self._steps.history()

    @property
    def spent(self) -> Spent | None:
        """What the calling thread's last generation cost: steps, graph runs, misses and FLOPs."""
        generations = self._steps.generations()
        return spent_of(generations[-1], self._graphs) if generations else None

    def graphs(self, *args: Any, **kwargs: Any) -> DeepCacheGraphs:
        """The graphs this module runs for a call with these arguments (call it like the
        U-Net). Captures (once per signature, shared with the runtime) but runs nothing."""
        call = self._binder.bind(args, kwargs)
        self._graphs.check()
        return graphs_of(self._graphs.entry(call), call)

    @property
    def compile_seconds(self) -> dict[str, float]:
        """Seconds spent in the first (compiling) call of each compiled graph, by name."""
        entries = [e for entries in list(self._graphs.states.values()) for e in entries.values()]
        return {
            f"{g.name}[{i}]": g.compile_seconds for i, e in enumerate(entries)
            for g in e.graphs.values() if g.compile_seconds is not None
        }

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        call = self._binder.bind(args, kwargs)
        place = self._steps.place(call.timestep, call.sample, call.conditioning, self._first)
        gen = place.generation
        if place.first:
            self._graphs.check(full=not gen.state.get("checked"))  # state at each step's first call
            gen.state["checked"] = True
        entry, call = (None, call) if gen.plain else self._entry(call, gen, args, kwargs)
        if entry is None:
            gen.plain = True  # the export limit was hit: the plain U-Net runs
            gen.counts["plain"] += 1
            place.step.log(True)
            return self.unet(*args, **kwargs)
        found, compiler = _compile.outer(self._outer)
        outputs = run_call(entry, call, place, compiler if found else self._compiler, self._policy, self._observer)
        result = pytree.tree_unflatten(list(outputs), entry.out_spec)
        if not call.return_dict and hasattr(result, "to_tuple"):
            result = result.to_tuple()
        return result

    def _entry(self, call: Any, gen: Generation, args: tuple, kwargs: dict) -> tuple[Entry | None, Any]:
        exports = gen.state.setdefault("exports", [])
        try:
            return self._graphs.entry(call, exports), call
        except FloatsNotLiftable:
            self._binder.keep_floats(call)  # the U-Net branches on them: constants from now on
            call = self._binder.bind(args, kwargs)
            return self._graphs.entry(call, exports), call

    def _first(self, gen: Generation, index: int) -> bool | None:
        return self._policy.first_checked(gen.state, index, gen.num_steps)

    def extra_repr(self) -> str:
        c = self._dc_config
        policy = f"adaptive={c.adaptive!r}" if c.adaptive else f"interval={c.interval}, schedule={c.schedule!r}"
        return f"{policy}, branch={c.branch}, forecast={c.forecast}, compile={c.compile}"

    # -- for dcfx.enable and packages ---------------------------------------------------

    def _plan(self, num_steps: int, valid: Callable[[], bool]) -> None:
        """A pipeline's scheduler announces a generation of `num_steps` steps (`dcfx.enable`);
        it ends after them or when `valid()` turns false. Per thread, like all generations."""
        self._policy.check_steps(num_steps)
        self._steps.begin(num_steps, planned=True, valid=valid)

    def _awaits_planned_start(self) -> bool:
        return self._steps.awaits_planned_start()

    def _preload(self, graphs: Any, runners: dict[str, Callable]) -> None:
        self._graphs.preload(graphs, runners)

    def _slots(self, entry: Entry) -> list:
        """The calling thread's slots (one per stream) for `entry`."""
        return self._steps.slots(entry)

    @property
    def _entries(self) -> dict[tuple, Entry]:
        return self._graphs.entries

    @property
    def _states(self) -> dict:
        return self._graphs.states

    def _apply(self, fn, recurse=True):
        # .to(), .half(), ...: graphs bake in dtypes and devices, so a real change switches to
        # that state's graphs; a no-op move (CPU offload hooks move before every forward)
        # keeps everything.
        result = super()._apply(fn, recurse)
        self._graphs.moved()
        return result

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules", {})
            if "unet" not in modules or name.startswith("_dc"):
                raise
            return getattr(modules["unet"], name)
