"""The step tracker: where a call falls, i.e. which generation, which step, which stream.

A *stream* is the calls that share their conditioning (every tensor argument except the
sample, the timestep and per-step residuals such as ControlNet's): the uncond and the cond
call of separate guidance are two streams, two interleaved generations with their own
prompts are two streams. Each stream keeps its own cached features (its slots, `slots.py`),
so a call never reads the cache of another conditioning, whatever the order of calls.

A *step* is the calls that evaluate the same sample at the same timestep: the same sample
object, unmodified since, with the same timestep (object or number; or another timestep
tensor, whose value is not read), no device read; or in automatic mode equal values. Its
calls share one full/shallow decision. A stream that calls again in a step it already called
in (an exact re-run, e.g. to capture a CUDA graph per step) starts the next step.

A *generation* is the steps from a step 0 on; streams that meet in a step share it (one log,
one step count, one adaptive gate). Where generations start:
- planned (`dcfx.enable(pipe)`): each `set_timesteps` of the pipeline's scheduler announces
  one, with its length; nothing is read from the device per step;
- explicit (`begin(num_steps)`): likewise announced by the caller;
- automatic (neither): the timestep's value is read on the host (a device-to-host sync per
  step for a CUDA tensor). A stream's step starts a new generation when its timestep is larger
  than its previous step's, or equal to it right after a repeat (schedulers repeat a timestep
  at most once in a row); a repeat of step 0's timestep at step 1 (a PNDM/Heun img2img start,
  or a new one-step generation) runs full, right either way.
An announced generation starts at the next call that does not join a step in progress. A
stream first seen while an announced generation runs (a guidance cutoff's new conditioning)
continues that generation. In automatic mode a new stream continues the thread's latest
generation when its timestep is below that generation's last one (a new dtype, a rebuilt
prompt), else it starts its own; each stream then follows its own generation, which is what
makes interleaved generations (A, B, A, B, ... with their own conditioning) work.

A call's stream is found by the identity of its conditioning tensors. Tensors rebuilt between
steps (a loop that concatenates the prompts at every step) are new objects: then their values
are compared with the streams of the generation the call continues, one device read per such
call, to find their stream (`StepTracker.compared` counts them).

Everything here is host bookkeeping, per thread; the only device reads are automatic mode's
timestep and those comparisons of rebuilt conditioning.
"""

from __future__ import annotations

import collections
import itertools
import numbers
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .._torch_private import tensor_version

# Generations whose logs `history` keeps (per thread).
HISTORY_LENGTH = 17  # the current generation and the 16 before it
# Streams kept per thread (each holds its conditioning tensors and its slots, `slots.py`);
# the least recently used beyond this are dropped.
MAX_STREAMS = 32


@dataclass(eq=False)
class Generation:
    """One generation's steps: shared by the streams that meet in its steps."""

    index: int  # unique per thread: caches are valid only within their generation
    num_steps: int | None = None  # announced length (explicit/planned), None: open-ended
    explicit: bool = False
    planned: bool = False  # announced by a pipeline's scheduler (dcfx.enable)
    steps: int = 0  # steps started so far
    step: "Step | None" = None
    log: list[str] = field(default_factory=list)
    last_t: float | None = None  # automatic mode: the last step's timestep value
    last_was_repeat: bool = False
    plain: bool = False  # the graph cache gave up on this generation: the plain U-Net runs
    streams: list["Stream"] = field(default_factory=list)  # the streams that called in it
    state: dict[str, Any] = field(default_factory=dict)  # the policy's per-generation state
    counts: collections.Counter = field(default_factory=collections.Counter)  # (entry, graph) runs

    @property
    def started(self) -> bool:
        return self.step is not None

    def ended(self) -> bool:
        """An announced generation whose steps are all taken."""
        return self.explicit and self.num_steps is not None and self.steps >= self.num_steps


@dataclass(eq=False)
class Step:
    """The current step of a generation: its sample and timestep, its decision, its streams."""

    index: int
    generation: Generation
    timestep: Any
    timestep_version: int | None
    sample: Any
    sample_version: int | None
    full: bool | None = None  # None until decided (an adaptive policy decides at the first call)
    signal: float | None = None  # the adaptive signal that decided, for inspection
    streams: list["Stream"] = field(default_factory=list)

    def log(self, full: bool) -> None:
        """Record that a call of this step ran full or shallow ('F' wins)."""
        log = self.generation.log
        if len(log) <= self.index:
            log.append("F" if full else "S")
        elif full:
            log[self.index] = "F"


@dataclass(eq=False)
class Stream:
    """The calls of one conditioning: its tensors (held, to recognise equal ones) and generation."""

    key: tuple
    tensors: tuple[torch.Tensor, ...]
    versions: tuple[int | None, ...]
    generation: Generation | None = None
    used: bool = False  # placed at least once
    slots: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary)  # entry -> slots.Slot

    def same(self, tensors: tuple[torch.Tensor, ...]) -> bool:
        return len(tensors) == len(self.tensors) and all(
            a is b and tensor_version(a) == v for a, b, v in zip(tensors, self.tensors, self.versions)
        )

    def like(self, tensors: tuple[torch.Tensor, ...]) -> bool:
        """Same shapes, dtypes and devices (host metadata)."""
        return len(tensors) == len(self.tensors) and all(
            a.shape == b.shape and a.dtype == b.dtype and a.device == b.device for a, b in zip(tensors, self.tensors)
        )

    def equal(self, tensors: tuple[torch.Tensor, ...]) -> bool:
        """Equal values (a device read)."""
        return self.like(tensors) and all(a is b or bool(torch.equal(a, b)) for a, b in zip(tensors, self.tensors))


@dataclass
class Placement:
    """Where a call falls: its step (and generation), its stream, and whether it is the step's
    first call (which decides)."""

    step: Step
    stream: Stream
    first: bool

    @property
    def generation(self) -> Generation:
        return self.step.generation


def _no_plan() -> bool:
    return False


@dataclass
class _ThreadState:
    streams: collections.OrderedDict[tuple, list[Stream]] = field(default_factory=collections.OrderedDict)
    generations: collections.deque[Generation] = field(default_factory=lambda: collections.deque(maxlen=HISTORY_LENGTH))
    announced: Generation | None = None  # explicit/planned, awaiting its first call
    current: Generation | None = None  # the latest announced generation that started
    plan_valid: Callable[[], bool] = _no_plan
    counter: Any = field(default_factory=itertools.count)


class StepTracker:
    """Places each call in a step, a generation and a stream; one state per thread.

    `full_first(generation, index)` answers a fixed policy's question "is step `index` full?"
    when a step starts (None: the policy decides later, from a signal).
    """

    def __init__(self) -> None:
        self.compared = 0  # conditioning comparisons by value (rebuilt tensors; see `_adopt`)
        self._threads: weakref.WeakKeyDictionary[threading.Thread, _ThreadState] = weakref.WeakKeyDictionary()

    # -- announcing generations ---------------------------------------------------------

    def begin(self, num_steps: int | None, planned: bool = False, valid: Callable[[], bool] | None = None) -> None:
        """Announce a generation in the calling thread: the next call that does not join a
        step in progress is its step 0."""
        me = self._me()
        if planned:
            me.plan_valid = valid or _no_plan
            if me.announced is not None and me.announced.planned:
                me.announced.num_steps = num_steps  # a second announcement corrects the length
                return
        me.announced = Generation(next(me.counter), num_steps=num_steps, explicit=True, planned=planned)

    def awaits_planned_start(self) -> bool:
        """A scheduler announced a generation (in this thread) whose first call has not come."""
        announced = self._me().announced
        return announced is not None and announced.planned

    # -- placing calls ------------------------------------------------------------------

    def place(self, timestep: Any, sample: Any, conditioning: tuple[torch.Tensor, ...],
              full_first: Callable[[Generation, int], bool | None]) -> Placement:
        """Place a call; `full_first(generation, index)` gives a new step's decision (None: the
        policy decides at the step's first call, from a signal)."""
        me = self._me()
        stream = self._stream(me, conditioning)
        fresh = not stream.used  # new tensors: perhaps a known conditioning, rebuilt
        # 1. Join a step in progress: the same sample and timestep (objects).
        step = self._joinable(me, stream, timestep, sample)
        if step is not None:
            if fresh:
                stream = self._adopt(me, stream, step.generation, step)
            return self._join(step, stream)
        # 2. An announced generation starts here.
        if me.announced is not None:
            placement = self._new_step(me, me.announced, stream, timestep, sample, full_first)
            me.current, me.announced = me.announced, None
            return placement
        # 3. The stream's announced generation, or the one in progress for a new stream, goes on.
        gen = stream.generation if stream.generation is not None else me.current
        if gen is not None and gen.explicit:
            if not gen.ended() and (not gen.planned or me.plan_valid()):
                if fresh:
                    stream = self._adopt(me, stream, gen, None)
                return self._new_step(me, gen, stream, timestep, sample, full_first)
            # Over, or its planner is gone: read timesteps again.
            if me.current is gen:
                me.current = None
            stream.generation = None
        # 4. Automatic: the timestep's value decides.
        t = host_timestep(timestep)
        latest = me.generations[-1] if me.generations else None
        if fresh and latest is not None and not latest.explicit and latest.last_t is not None and t <= latest.last_t:
            # Joining the latest step (separate guidance) or starting the next one (a repeat).
            joining = t == latest.last_t and _equal_sample(latest.step.sample, sample)
            stream = self._adopt(me, stream, latest, latest.step if joining else None)
        own = stream.generation
        for gen in (own, latest):  # an equal sample at an equal timestep, under other conditioning
            if gen is not None and gen.step is not None and not gen.explicit and t == gen.last_t \
                    and stream not in gen.step.streams and _equal_sample(gen.step.sample, sample):
                return self._join(gen.step, stream)
        force_full = False
        if _continues(own, t):
            gen = own
            force_full = t == gen.last_t and gen.steps == 1 and not gen.last_was_repeat  # see the docstring
        elif latest is not None and latest is not own and not latest.explicit and latest.last_t is not None \
                and t < latest.last_t:
            gen = latest  # a new conditioning continuing the thread's generation (a new dtype, ...)
        else:
            gen = Generation(next(me.counter))
        repeat = gen.step is not None and t == gen.last_t
        placement = self._new_step(me, gen, stream, timestep, sample, full_first)
        gen.last_was_repeat, gen.last_t = repeat, t
        if force_full:
            placement.step.full = True
        return placement

    def _new_step(self, me: _ThreadState, gen: Generation, stream: Stream, timestep: Any, sample: Any,
                  full_first: Callable[[Generation, int], bool | None]) -> Placement:
        full = full_first(gen, gen.steps)  # may raise: nothing has changed yet
        if not gen.started:
            me.generations.append(gen)
        step = Step(gen.steps, gen, timestep, tensor_version(timestep), sample, tensor_version(sample), full)
        gen.steps += 1
        gen.step = step
        return self._join(step, stream, first=True)

    @staticmethod
    def _join(step: Step, stream: Stream, first: bool = False) -> Placement:
        step.streams.append(stream)
        gen = step.generation
        if stream not in gen.streams:
            gen.streams.append(stream)
        stream.generation, stream.used = gen, True
        return Placement(step, stream, first)

    def _joinable(self, me: _ThreadState, stream: Stream, timestep: Any, sample: Any) -> Step | None:
        """A step in progress this call evaluates too (same sample and timestep objects), that
        the stream has not called in yet: its own generation's first, then the latest ones."""
        candidates = [stream.generation] if stream.generation is not None else []
        candidates += [g for g in reversed(me.generations) if g is not stream.generation]
        for gen in candidates[:4]:
            step = gen.step
            if step is None or stream in step.streams:
                continue
            if _same(sample, step.sample, step.sample_version) and (
                _same(timestep, step.timestep, step.timestep_version)
                # A new timestep tensor per call (values unknown without a read): the same
                # unmodified sample object says it is the same step.
                or isinstance(timestep, torch.Tensor) and isinstance(step.timestep, torch.Tensor)
            ):
                return step
        return None

    # -- streams ------------------------------------------------------------------------

    def _stream(self, me: _ThreadState, conditioning: tuple[torch.Tensor, ...]) -> Stream:
        key = _identity(conditioning)
        streams = me.streams.get(key)
        if streams is not None:
            for stream in streams:
                if stream.same(conditioning):
                    me.streams.move_to_end(key)
                    return stream
        stream = Stream(key, conditioning, tuple(tensor_version(t) for t in conditioning))
        me.streams.setdefault(key, []).append(stream)
        me.streams.move_to_end(key)
        while len(me.streams) > MAX_STREAMS:
            me.streams.popitem(last=False)
        return stream

    def _adopt(self, me: _ThreadState, stream: Stream, gen: Generation, step: Step | None) -> Stream:
        """A stream of `gen` (not yet in `step`) with conditioning equal to new `stream`'s,
        which takes over its tensors; else `stream`. Compares values: a device read, only
        for conditioning tensors rebuilt between steps (the same objects need none)."""
        busy = step.streams if step is not None else ()
        for other in reversed(gen.streams):
            if other is stream or other in busy or not other.like(stream.tensors):
                continue
            self.compared += 1
            if other.equal(stream.tensors):
                _forget(me, stream)
                _forget(me, other)
                other.key, other.tensors, other.versions = stream.key, stream.tensors, stream.versions
                me.streams.setdefault(other.key, []).append(other)
                return other
        return stream

    # -- inspection ---------------------------------------------------------------------

    def history(self) -> tuple[str, ...]:
        """The calling thread's last generations, one 'F' or 'S' per step."""
        return tuple("".join(g.log) for g in self._me().generations if g.log)

    def slots(self, entry: Any) -> list[Any]:
        """The calling thread's slots for `entry`, one per stream that has one."""
        return [s.slots[entry] for streams in self._me().streams.values() for s in streams if entry in s.slots]

    def generations(self) -> tuple[Generation, ...]:
        return tuple(self._me().generations)

    def _me(self) -> _ThreadState:
        thread = threading.current_thread()
        me = self._threads.get(thread)
        if me is None:
            me = self._threads[thread] = _ThreadState()
        return me


def host_timestep(t: Any) -> float:
    """The timestep's value on the host: automatic mode's device-to-host sync."""
    if isinstance(t, torch.Tensor):
        if t.numel() == 0:
            raise ValueError("timestep is an empty tensor")
        return float(t.reshape(-1)[0].item())
    if t is None:
        raise ValueError("DeepCacheUNet needs the timestep argument to find generation boundaries")
    return float(t)


def _continues(gen: Generation | None, t: float) -> bool:
    """Whether a step at timestep value `t` continues automatic generation `gen`: the timestep
    went down, or repeats once (Heun, KDPM2, PNDM evaluate a timestep twice)."""
    if gen is None or gen.explicit or gen.step is None or gen.last_t is None:
        return False
    return t < gen.last_t or (t == gen.last_t and not gen.last_was_repeat)


def _forget(me: _ThreadState, stream: Stream) -> None:
    streams = me.streams.get(stream.key)
    if streams is not None and stream in streams:
        streams.remove(stream)
        if not streams:
            del me.streams[stream.key]


def _identity(tensors: tuple[torch.Tensor, ...]) -> tuple:
    return tuple(id(t) for t in tensors)


def _same(x: Any, obj: Any, version: int | None) -> bool:
    """`x` is `obj`, unmodified since `version` was read (tensors), or an equal number."""
    if isinstance(x, torch.Tensor):
        return x is obj and tensor_version(x) == version
    if isinstance(x, numbers.Number) and not isinstance(x, bool) and isinstance(obj, numbers.Number):
        return x == obj
    return False


def _equal_sample(a: Any, b: Any) -> bool:
    """Equal values (automatic mode only: a device read)."""
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        return False
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        return False
    return a is b or bool(torch.equal(a, b))
