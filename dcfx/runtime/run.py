"""One call's run: the signal and the decision, the graphs, what the slot keeps.

Given where the call falls (`steps.Placement`) and its entry (`graphs.Entry`): an adaptive
policy's signal (after the head graph, or from the samples) and the step's decision, taken by
the step's first call; then the full graph (or the rest) or the shallow graph (or the tail),
and on full steps the copy into the stream's slot. Each graph run sits in a profiler range
(and an NVTX range on CUDA) named after the graph, so traces say what every step ran.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch

from .._torch_private import profiler_enabled
from ..policies import Policy, latent_change, relative_l1
from .graphs import Entry
from .slots import keep_reference, keep_sample, store
from .steps import Generation, Placement


def run_call(entry: Entry, call: Any, place: Placement, compiler: Any, policy: Policy,
             observer: Callable | None = None) -> tuple:
    """Run one call; returns the output leaves. `observer` sees every full step (calibration)."""
    step, gen, stream = place.step, place.generation, place.stream
    layout = entry.layout
    slot = stream.caches.get(entry)
    valid = slot is not None and slot.generation == gen.index
    adaptive, decide = policy.adaptive, step.full is None and place.first
    inputs, boundary = call.tensors, ()
    if layout.head:
        boundary = _graph(entry, "head", gen, compiler, inputs)
        fresh = boundary[layout.cut_index]
        if decide:
            ok = valid and slot.reference_generation == gen.index
            step.signal = float(relative_l1(fresh, slot.reference).item()) if ok else None  # the one read
    elif adaptive == "latent" and decide:
        ok = valid and slot.samples_generation == gen.index and slot.samples_seen >= 3
        step.signal = float(latent_change(call.sample, slot.samples).item()) if ok else None  # the one read
    if decide:
        step.full = policy.decide(gen.state, step.signal)
    full = step.full is not False or not valid
    gen.counts["misses"] += full and step.full is False
    if full:
        kind = layout.full_kind
        gen.counts[(entry.serial, kind)] += 1
        with _range(entry.ranges[kind], entry.cuda):
            outputs = entry.graphs[kind](compiler, *inputs, *boundary)
            outputs, cached = outputs[: -layout.num_cached], outputs[-layout.num_cached :]
            with _range("dcfx.cache_copy", entry.cuda):
                t = inputs[layout.timestep_index] if layout.timestep_index is not None else None
                slot = stream.caches[entry] = store(slot, cached, gen.index, layout.forecast, t)
    else:
        outputs = _graph(entry, layout.shallow_kind, gen, compiler, (*inputs, *boundary, *slot.inputs()))
    if layout.head and (full or adaptive == "accumulated"):
        keep_reference(slot, fresh, gen.index)
    if observer is not None and full and layout.head:
        observer(gen.index, stream, step.index, call.sample, cached[0], fresh)
    if adaptive == "latent":
        keep_sample(slot, call.sample, gen.index)
    if place.first:
        policy.record(gen.state, full)
    step.log(full)
    return outputs


def _graph(entry: Entry, kind: str, gen: Generation, compiler: Any, inputs: tuple) -> tuple:
    gen.counts[(entry.serial, kind)] += 1
    with _range(entry.ranges[kind], entry.cuda):
        return entry.graphs[kind](compiler, *inputs)


def _range(name: str, cuda: bool) -> contextlib.AbstractContextManager:
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
