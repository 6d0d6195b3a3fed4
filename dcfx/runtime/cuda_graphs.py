"""CUDA graphs of a DeepCacheUNet's steps, replayed by its policy: `dcfx.cuda_graphs`.

One input signature is captured once; each step then replays one graph, chosen on the host:
- a fixed policy (uniform, non-uniform, explicit or calibrated schedule): the first full step
  of a generation, a later full step (they differ only with a forecast, whose history
  restarts on the first one), or a shallow step; nothing is read from the device;
- an adaptive policy: first the signal's graph (the head graph and the signal for "cut" and
  "accumulated", the latent difference for "latent"), then one read of one scalar on the host,
  then the rest (full) or the tail (shallow).
The graphs read the caller's input tensors (update them in place before each step) and write
static outputs (consume or copy them before the next step). They keep their own cached
features, apart from the DeepCacheUNet's. Without CUDA (or with `capture=False`) the same
steps run uncaptured, which is how the logic is tested on a CPU.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from .._torch_private import pytree
from ..capture import FloatsNotLiftable
from ..policies import latent_change, relative_l1
from .graphs import Entry
from .slots import Slot, keep_reference, keep_sample, store


class StepGraphs:
    """A DeepCacheUNet's steps for one call signature, captured in CUDA graphs.

    Build it with `dcfx.cuda_graphs(fast, *args, **kwargs)`, passing the U-Net's arguments
    as static tensors (a tensor timestep among them). `step(i, num_steps)` runs step `i` of a
    generation and returns the U-Net's output (static tensors). `history` is one 'F' or 'S'
    per step of the current generation.
    """

    def __init__(self, fast: Any, args: tuple, kwargs: dict, capture: bool | None = None, warmup: int = 2):
        self.fast = fast
        self.policy = fast._policy
        call = fast._binder.bind(args, kwargs)
        if not isinstance(call.timestep, torch.Tensor):
            raise TypeError("dcfx.cuda_graphs needs the timestep as a tensor (a static input the loop updates)")
        fast._graphs.check()
        try:
            entry = fast._graphs.entry(call)
        except FloatsNotLiftable:
            fast._binder.keep_floats(call)
            call = fast._binder.bind(args, kwargs)
            entry = fast._graphs.entry(call)
        self.entry: Entry = entry
        self.call = call
        self.compiler = fast._compiler
        self.capture = torch.cuda.is_available() and entry.cuda if capture is None else capture
        self.history = ""
        self._state: dict[str, Any] = {}
        self._slot: Slot | None = None
        self._signal = torch.zeros((), dtype=torch.float32, device=call.tensors[0].device)
        self._outputs: dict[str, tuple] = {}
        self._static: dict[str, tuple] = {}
        self._boundary: tuple = ()
        kinds = self._kinds()
        runners = {kind: self._runner(kind) for kind in kinds}
        if self.capture:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side), torch.no_grad():
                for _ in range(warmup):  # compile, allocate the cache, settle the allocator
                    for kind in kinds:
                        runners[kind]()
            torch.cuda.current_stream().wait_stream(side)
            self._replay: dict[str, Callable[[], None]] = {}
            pool = None
            for kind in kinds:
                graph = torch.cuda.CUDAGraph()
                with torch.no_grad(), torch.cuda.graph(graph, pool=pool):
                    runners[kind]()
                pool = graph.pool()
                self._replay[kind] = graph.replay
        else:
            with torch.no_grad():
                for kind in kinds:  # allocate the cache; also compiles, as the capture would
                    runners[kind]()
            self._replay = runners

    def _kinds(self) -> list[str]:
        kinds = ["first", "full", "shallow"]
        if self.entry.layout.head:
            kinds.insert(0, "signal")
        elif self.policy.adaptive == "latent":
            kinds.insert(0, "signal")
        return kinds

    def _runner(self, kind: str) -> Callable[[], None]:
        entry, inputs, adaptive = self.entry, self.call.tensors, self.policy.adaptive
        layout = entry.layout
        timestep = inputs[layout.timestep_index] if layout.timestep_index is not None else None
        sample = self.call.sample

        def run(graph: str, *extra: torch.Tensor) -> tuple:
            return entry.graphs[graph](self.compiler, *inputs, *extra)

        if kind == "signal":
            def signal() -> None:
                if layout.head:
                    self._boundary = run("head")
                    fresh = self._boundary[layout.cut_index]
                    if self._slot is not None and self._slot.reference is not None:
                        self._signal.copy_(relative_l1(fresh, self._slot.reference))
                        if adaptive == "accumulated":
                            keep_reference(self._slot, fresh, 0)
                elif self._slot is not None and len(self._slot.samples) == 3:
                    self._signal.copy_(latent_change(sample, self._slot.samples))
            return signal

        if kind in ("first", "full"):
            def full() -> None:
                if layout.head and not self._boundary:
                    self._boundary = run("head")
                outputs = run(layout.full_kind, *self._boundary)
                cached = outputs[len(outputs) - layout.num_cached:]
                if self._slot is not None:
                    self._slot.generation = -1 if kind == "first" else 0  # restart or shift the history
                self._slot = store(self._slot, cached, 0, layout.forecast, timestep)
                if layout.head:
                    keep_reference(self._slot, self._boundary[layout.cut_index], 0)
                if adaptive == "latent":
                    keep_sample(self._slot, sample, 0)
                self._outputs[kind] = outputs[: len(outputs) - layout.num_cached]
            return full

        def shallow() -> None:
            if layout.head and not self._boundary:
                self._boundary = run("head")
            outputs = run(layout.shallow_kind, *self._boundary, *self._slot.inputs())
            if adaptive == "latent":
                keep_sample(self._slot, sample, 0)
            self._outputs["shallow"] = outputs
        return shallow

    def is_full(self, index: int, num_steps: int | None = None) -> bool:
        """Step `index`'s decision; replays the signal's graph and reads it for an adaptive policy."""
        if index == 0:
            self._state = {}
        full = self.policy.first(self._state, index, num_steps)
        if "signal" in self._replay:
            self._replay["signal"]()
        if full is None:
            ready = self.policy.adaptive != "latent" or index >= 3
            full = self.policy.decide(self._state, float(self._signal.item()) if ready else None)  # the one read
        self.policy.record(self._state, full)
        return full

    @torch.no_grad()
    def step(self, index: int, num_steps: int | None = None) -> Any:
        """Run step `index` (0 starts a generation) and return the U-Net's output."""
        full = self.is_full(index, num_steps)
        kind = ("first" if index == 0 else "full") if full else "shallow"
        self._replay[kind]()
        self.history = ("" if index == 0 else self.history) + ("F" if full else "S")
        outputs = self._outputs[kind]
        if not self.capture:
            # Uncaptured, still as a replay behaves: each graph writes its own static outputs,
            # which its next run overwrites.
            static = self._static.get(kind)
            if static is None:
                static = self._static[kind] = tuple(o.clone() for o in outputs)
            else:
                for out, value in zip(static, outputs):
                    out.copy_(value)
            outputs = static
        result = pytree.tree_unflatten(list(outputs), self.entry.out_spec)
        if not self.call.return_dict and hasattr(result, "to_tuple"):
            result = result.to_tuple()
        return result
