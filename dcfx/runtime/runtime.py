"""`Runtime`: one wrapped model's calls, from arguments to outputs.

Per call: normalise the arguments (`capture.CallBinder`), place the call in a step, a
generation and a stream (`steps.StepTracker`), select the module state's entry for the
call's signature (`entries.EntryCache`) and take the step (`run.take_step`): the policy
decides (`policies.Policy`), the graphs run, the stream's slot keeps what the next steps need.

`DeepCacheUNet` is the module around it. Its public surface is also what dcfx's other layers
use, so none reaches into it: `entry_for` (the CUDA-graph helper), `observing` and `costs`
(calibration), `plan` and `awaits_planned_start` (a pipeline's scheduler), a `PackagedModel`
as the model (AOT packages), and `slots` (what a stream keeps, for tests and tools).
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any, Callable, Iterator

from ..capture import Call, CallBinder
from ..compile import Compiler, from_config, outer
from ..config import DeepCacheConfig
from ..costs import GraphCost, Spent
from ..passes import families
from ..policies import Policy
from .entries import Entry, EntryCache, PackagedModel
from .run import FullStep, StepPhases, take_step
from .slots import Slot
from .spent import spent_of
from .steps import Generation, StepTracker


class Runtime:
    """The calls of one model under one config (see the module docstring)."""

    def __init__(self, unet: Any, config: DeepCacheConfig, compiler: Compiler | None = None):
        if not isinstance(unet, PackagedModel):  # a package's config was resolved when it was built
            config = families.resolve(config, unet)
        self.unet = unet
        self.config = config
        self.compiler = compiler if compiler is not None else from_config(config)
        self.policy = Policy(config)
        self.binder = CallBinder(unet)
        self.steps = StepTracker()
        self.entries = EntryCache(unet, config, self.binder)
        self.observer: Callable[[FullStep], None] | None = None
        self._wrappers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # torch.compile wrappers' compilers
        if isinstance(unet, PackagedModel):
            unet.check(config)
            self.entries.preload(unet)

    @property
    def packaged(self) -> bool:
        """Whether the model is an AOT package's stand-in (it has no graphs to capture)."""
        return self.entries.preloaded is not None

    def call(self, args: tuple, kwargs: dict) -> Any:
        """Run one call of the model (`DeepCacheUNet.forward`)."""
        call = self.binder.bind(args, kwargs)
        place = self.steps.place(call.timestep, call.sample, call.conditioning, self._first_decision)
        gen = place.generation
        if place.first:
            self.entries.check(full=not gen.state.get("checked"))  # state at each step's first call
            gen.state["checked"] = True
        entry = None
        if not gen.plain:
            entry, call = self.entries.entry(call, args, kwargs, gen.state.setdefault("exports", []))
        if entry is None:
            gen.plain = True  # the export limit was hit: the plain U-Net runs
            gen.counts["plain"] += 1
            place.step.log(True)
            return self.unet(*args, **kwargs)
        found, compiler = outer(self._wrappers)
        phases = StepPhases(entry, self.policy.signal, compiler if found else self.compiler, call)
        outputs = take_step(phases, place, self.policy, self.observer)
        return entry.rebuild(outputs, call.return_dict)

    def entry_for(self, args: tuple, kwargs: dict) -> tuple[Entry, Call]:
        """The entry (of the module's current state) for a call with these arguments, and the
        bound call; captures once per signature, runs nothing."""
        self.entries.check()
        return self.entries.entry(self.binder.bind(args, kwargs), args, kwargs)

    def _first_decision(self, gen: Generation, index: int) -> bool | None:
        return self.policy.first_checked(gen.state, index, gen.num_steps)

    # -- generations ----------------------------------------------------------------------

    def begin(self, num_steps: int | None) -> None:
        """Announce a generation in the calling thread (`DeepCacheUNet.begin`)."""
        if num_steps is not None and (isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1):
            raise ValueError(f"num_steps must be None or an integer >= 1, got {num_steps!r}")
        if num_steps is None and self.policy.needs_num_steps:
            raise ValueError("schedule='nonuniform' needs begin(num_steps), the generation's number of steps")
        self.policy.check_steps(num_steps)
        self.steps.begin(num_steps)

    def plan(self, num_steps: int, valid: Callable[[], bool]) -> None:
        """A pipeline's scheduler announces a generation of `num_steps` steps (`dcfx.enable`);
        it ends after them or when `valid()` turns false. Per thread, like all generations."""
        self.policy.check_steps(num_steps)
        self.steps.begin(num_steps, planned=True, valid=valid)

    def awaits_planned_start(self) -> bool:
        """A scheduler announced a generation (in this thread) whose first call has not come."""
        return self.steps.awaits_planned_start()

    def spent(self) -> Spent | None:
        """What the calling thread's last generation cost."""
        generations = self.steps.generations()
        return spent_of(generations[-1], self.entries) if generations else None

    # -- for calibration, tools and tests -------------------------------------------------

    @contextlib.contextmanager
    def observing(self, observer: Callable[[FullStep], None]) -> Iterator[None]:
        """Within: `observer` sees every full step at a head-gated cut (a `FullStep`)."""
        previous, self.observer = self.observer, observer
        try:
            yield
        finally:
            self.observer = previous

    def costs(self) -> list[GraphCost]:
        """The FLOPs of every entry's graphs that can be counted (oldest state first)."""
        return [cost for cost in (e.cost() for e in self.entries.all()) if cost is not None]

    def slots(self, entry: Entry) -> list[Slot]:
        """The calling thread's slots for `entry`, one per stream that has one."""
        return self.steps.slots(entry)

    def compile_seconds(self) -> dict[str, float]:
        """Seconds spent in the first (compiling) call of each compiled graph, by name."""
        entries = [e for state in list(self.entries.states.values()) for e in state.values()]
        return {f"{kind}[{i}]": s for i, e in enumerate(entries) for kind, s in e.compile_seconds.items()}
