"""CUDA graphs of a DeepCacheUNet's steps, replayed by its policy: `dcfx.cuda_graphs`.

One input signature is captured once: each device phase of a step (`run.StepPhases`: the
signal's measure, a generation's first full step, a later full step, a shallow step) becomes
one CUDA graph. A step is then `run.take_step`, the runtime's own, with each phase replayed:
- a fixed policy (uniform, non-uniform, explicit or calibrated schedule) decides on the host
  before anything runs; nothing is read from the device;
- an adaptive policy replays the measure graph (the head graph and the signal for "cut" and
  "accumulated", the latent difference for "latent"), reads one scalar on the host, then
  replays the rest (full) or the tail (shallow).
A generation's first full step and a later one are two graphs because they differ with a
forecast, whose history restarts on the first. The graphs read the caller's input tensors
(update them in place before each step) and write static outputs (consume or copy them
before the next step). They keep their own slot, apart from the DeepCacheUNet's streams.
Without CUDA (or with `capture=False`) the same phases run uncaptured, each writing static
outputs as a replay does, which is how the logic is tested on a CPU.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable

import torch

from .entries import Entry
from .run import NOTHING_MEASURED, Measured, StepPhases, take_step
from .runtime import Runtime
from .slots import Slot
from .steps import Generation, Placement, Step, Stream


class CapturedSteps:
    """A DeepCacheUNet's steps for one call signature, captured in CUDA graphs.

    Build it with `dcfx.cuda_graphs(fast, *args, **kwargs)`, passing the U-Net's arguments
    as static tensors (a tensor timestep among them). `step(i, num_steps)` runs step `i` of a
    generation and returns the U-Net's output (static tensors). `history` is one 'F' or 'S'
    per step of the current generation.
    """

    def __init__(self, runtime: Runtime, args: tuple, kwargs: dict, capture: bool | None = None, warmup: int = 2):
        if not isinstance(runtime.binder.bind(args, kwargs).timestep, torch.Tensor):
            raise TypeError("dcfx.cuda_graphs needs the timestep as a tensor (a static input the loop updates)")
        entry, call = runtime.entry_for(args, kwargs)
        self.policy = runtime.policy
        self.entry: Entry = entry
        self.sample = call.sample
        self.capture = torch.cuda.is_available() and entry.cuda if capture is None else capture
        self._return_dict = call.return_dict
        self._phases = StepPhases(entry, self.policy.signal, runtime.compiler, call)
        self._stream = Stream((), (), ())
        self._generations = itertools.count()
        self._generation: Generation | None = None
        self._slot: Slot | None = None
        self._measured = NOTHING_MEASURED
        self._cached: tuple = ()
        self._outputs: dict[str, tuple] = {}
        self._static: dict[str, tuple] = {}
        kinds = ["first", "full", "shallow"]
        if entry.layout.head or self.policy.signal is not None:
            kinds.insert(0, "measure")
        runners = {kind: self._runner(kind) for kind in kinds}
        if self.capture:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side), torch.no_grad():
                for _ in range(warmup):  # compile, allocate the slot, settle the allocator
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
                for kind in kinds:  # allocate the slot; also compiles, as the capture would
                    runners[kind]()
            self._replay = runners
        # The slot holds no generation's feature yet: the first step restarts it.
        self._slot.generation, self._slot.kept_generation, self._slot.kept_count = -1, -1, 0
        self._stream.slots[entry] = self._slot

    def _runner(self, kind: str) -> Callable[[], None]:
        phases = self._phases

        def measure() -> None:
            self._measured = phases.measure(self._slot, want=True)

        def full() -> None:
            self._outputs[kind], self._cached, self._slot = phases.full(self._slot, self._measured, restart=kind == "first")

        def shallow() -> None:
            self._outputs[kind] = phases.shallow(self._slot, self._measured)

        return {"measure": measure, "first": full, "full": full, "shallow": shallow}[kind]

    # -- the phases `take_step` asks for: replays -----------------------------------------------

    def measure(self, slot: Slot | None, want: bool) -> Measured:
        replay = self._replay.get("measure")
        if replay is not None:
            replay()
        return self._measured

    def full(self, slot: Slot | None, measured: Measured, restart: bool) -> tuple[tuple, tuple, Slot]:
        kind = "first" if restart else "full"
        self._replay[kind]()
        return self._static_outputs(kind), self._cached, self._slot

    def shallow(self, slot: Slot, measured: Measured) -> tuple:
        self._replay["shallow"]()
        return self._static_outputs("shallow")

    def _static_outputs(self, kind: str) -> tuple:
        outputs = self._outputs[kind]
        if self.capture:
            return outputs
        # Uncaptured, still as a replay behaves: each graph writes its own static outputs,
        # which its next run overwrites.
        static = self._static.get(kind)
        if static is None:
            static = self._static[kind] = tuple(o.clone() for o in outputs)
        else:
            for out, value in zip(static, outputs):
                out.copy_(value)
        return static

    # -- steps ----------------------------------------------------------------------------------

    @property
    def history(self) -> str:
        """The current generation's steps, one 'F' or 'S' each."""
        return "".join(self._generation.log) if self._generation is not None else ""

    @torch.no_grad()
    def step(self, index: int, num_steps: int | None = None) -> Any:
        """Run step `index` (0 starts a generation) and return the U-Net's output."""
        if index == 0 or self._generation is None:
            self._generation = Generation(next(self._generations), num_steps=num_steps)
        gen = self._generation
        step = Step(index, gen, None, None, None, None, self.policy.first_checked(gen.state, index, num_steps))
        gen.step, gen.steps = step, gen.steps + 1
        outputs = take_step(self, Placement(step, self._stream, first=True), self.policy)
        return self.entry.rebuild(outputs, self._return_dict)
