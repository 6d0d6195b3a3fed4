"""One call's step, written once: the signal, the decision, the graph runs, what the slot keeps.

`take_step` does a call's host work: whether its stream's slot is valid in this generation,
the policy's decision (at the step's first call; an adaptive policy reads its one scalar
here, nowhere else), the slot's generation stamps, the counts and the step's log. The device
work it asks of a `Phases` object, in three phases:
- `measure(slot, want)`: the head graph (head-gated layouts) and, when `want`, the adaptive
  signal as a 0-d tensor;
- `full(slot, measured, restart)`: the full graph (or the rest) and the copy of what it
  caches into the slot (`restart`: the slot holds no feature of this generation, so a
  forecast's history starts over);
- `shallow(slot, measured)`: the shallow graph (or the tail) on the slot's tensors.
Both full and shallow also keep what the signal measures next (`slots.keep`).

`StepPhases` runs the phases now: the eager runtime. `cuda_graphs.CapturedSteps` captures
each phase of a `StepPhases` once in a CUDA graph and replays it, so the two differ in that
only. The phases do device work only (no host reads, no host state but the slot's first
allocation), which is what makes them capturable.

Each graph run sits in a profiler range (and an NVTX range on CUDA) named after the graph,
so traces say what every step ran; a full step's cache copy is a range inside it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol

import torch

from .._torch_private import profiler_enabled
from ..policies import Policy, Signal
from ..policies.adaptive import CUT
from .entries import Entry
from .slots import Slot, keep, store
from .steps import Placement


@dataclass(frozen=True)
class Measured:
    """What `measure` gives the other phases: the head graph's outputs, the signal's source
    now (the fresh feature at the cut, or the sample) and the signal (0-d, or None)."""

    boundary: tuple[torch.Tensor, ...] = ()
    current: torch.Tensor | None = None
    signal: torch.Tensor | None = None


NOTHING_MEASURED = Measured()


@dataclass(frozen=True)
class FullStep:
    """A full step at a head-gated cut, as an observer (`Runtime.observing`) sees it."""

    generation: int  # the generation's index (per thread)
    stream: object  # the call's stream (its identity tells streams apart)
    step: int  # the step's index in the generation
    sample: torch.Tensor
    feature: torch.Tensor  # the deep feature the cut caches
    fresh: torch.Tensor  # the fresh feature at the cut (the head graph's)


class Phases(Protocol):
    entry: Entry
    sample: Any

    def measure(self, slot: Slot | None, want: bool) -> Measured: ...
    def full(self, slot: Slot | None, measured: Measured, restart: bool) -> tuple[tuple, tuple, Slot]: ...
    def shallow(self, slot: Slot, measured: Measured) -> tuple: ...


def take_step(phases: Phases, place: Placement, policy: Policy,
              observer: Callable[[FullStep], None] | None = None) -> tuple:
    """Run one call of a step; returns the output leaves (see the module docstring)."""
    step, gen, stream, entry = place.step, place.generation, place.stream, phases.entry
    layout, signal = entry.layout, policy.signal
    slot = stream.slots.get(entry)
    valid = slot is not None and slot.generation == gen.index
    decide = step.full is None and place.first
    want = decide and signal is not None and valid and slot.ready(gen.index, signal.depth)
    measured = phases.measure(slot, want)
    if decide:
        step.signal = float(measured.signal.item()) if want else None  # the one read
        step.full = policy.decide(gen.state, step.signal)
    full = step.full is not False or not valid
    gen.counts["misses"] += full and step.full is False
    if layout.head:
        gen.counts[(entry.serial, "head")] += 1
    gen.counts[(entry.serial, layout.full_kind if full else layout.shallow_kind)] += 1
    if full:
        outputs, cached, slot = phases.full(slot, measured, restart=not valid)
        stream.slots[entry] = slot
        slot.generation = gen.index
        if observer is not None and layout.head:
            observer(FullStep(gen.index, stream, step.index, phases.sample, cached[0], measured.current))
    else:
        outputs = phases.shallow(slot, measured)
    if signal is not None and (full or signal.every_step):
        slot.count_kept(gen.index)
    if place.first:
        policy.record(gen.state, full)
    step.log(full)
    return outputs


class StepPhases:
    """The device work of one call's step (see the module docstring), on the call's tensors."""

    def __init__(self, entry: Entry, signal: Signal | None, compiler: Any, call: Any):
        self.entry, self.signal, self.compiler = entry, signal, compiler
        self.inputs, self.sample = call.tensors, call.sample
        index = entry.layout.timestep_index
        self.timestep = self.inputs[index] if index is not None else None

    def measure(self, slot: Slot | None, want: bool) -> Measured:
        layout, signal = self.entry.layout, self.signal
        if signal is None and not layout.head:
            return NOTHING_MEASURED
        boundary = self._run("head", self.inputs) if layout.head else ()
        current = None
        if signal is not None:
            current = boundary[layout.cut_index] if signal.source == CUT else self.sample
        value = signal.measure(current, slot.kept) if want and slot is not None and slot.kept else None
        return Measured(boundary, current, value)

    def full(self, slot: Slot | None, measured: Measured, restart: bool) -> tuple[tuple, tuple, Slot]:
        layout, entry = self.entry.layout, self.entry
        with graph_range(entry.ranges[layout.full_kind], entry.cuda):
            outputs = entry.graphs[layout.full_kind](self.compiler, *self.inputs, *measured.boundary)
            n = len(outputs) - layout.num_cached
            outputs, cached = outputs[:n], outputs[n:]
            with graph_range("dcfx.cache_copy", entry.cuda):
                slot = store(slot, cached, restart, layout.forecast, self.timestep)
        if self.signal is not None:
            keep(slot, measured.current, self.signal.depth)
        return outputs, cached, slot

    def shallow(self, slot: Slot, measured: Measured) -> tuple:
        layout = self.entry.layout
        outputs = self._run(layout.shallow_kind, (*self.inputs, *measured.boundary, *slot.inputs()))
        if self.signal is not None and self.signal.every_step:
            keep(slot, measured.current, self.signal.depth)
        return outputs

    def _run(self, kind: str, inputs: tuple) -> tuple:
        entry = self.entry
        with graph_range(entry.ranges[kind], entry.cuda):
            return entry.graphs[kind](self.compiler, *inputs)


def graph_range(name: str, cuda: bool) -> contextlib.AbstractContextManager:
    """A profiler range (only while a profiler runs) and, on CUDA, an NVTX range, so traces and
    Nsight timelines say which graph each step ran. Otherwise nothing (a shared no-op)."""
    if not cuda and not profiler_enabled():
        return _NO_RANGE
    return _ranges(name, cuda)


_NO_RANGE = contextlib.nullcontext()


@contextlib.contextmanager
def _ranges(name: str, cuda: bool) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        if profiler_enabled():
            stack.enter_context(torch.profiler.record_function(name))
        if cuda:
            stack.enter_context(torch.cuda.nvtx.range(name))
        yield
