"""The slot cache: the tensors a stream keeps between steps, per entry (input signature).

A slot is one stream's (one conditioning's, see `steps.py`) tensors for one entry:
- `buffers`: the full step's cached outputs (the deep feature, then e.g. its group
  statistics), which the shallow graph reads;
- with a forecast of order k: `history` (the features of the k full steps before) and
  `times` (float32 [n, t0, t1, ...]: how many features are valid, and their timesteps;
  `policies.forecast` keeps them);
- for an adaptive signal, `kept`: the signal's earlier values of its source, newest first
  (the fresh feature at the cut at the last full step, or at the last step; the last three
  samples).
A slot is valid only in the generation that wrote it, so a cache never crosses generations.
Buffers are allocated once and always written in place, so a captured CUDA graph that reads
them stays valid: full steps copy into them, shallow steps read them. The device work here
(`store`, `keep`) reads nothing back; the generation stamps are host bookkeeping that the
step (`run.take_step`) writes, never a captured graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..policies.forecast import new_history, remember


@dataclass(eq=False)
class Slot:
    buffers: list[torch.Tensor]
    generation: int = -1  # the generation whose full step wrote `buffers` (-1: none yet)
    history: list[torch.Tensor] = field(default_factory=list)
    times: torch.Tensor | None = None
    kept: list[torch.Tensor] = field(default_factory=list)
    kept_generation: int = -1  # the generation `kept_count` counts in
    kept_count: int = 0  # values kept in that generation (host count)

    def inputs(self) -> list[torch.Tensor]:
        """The shallow graph's trailing inputs."""
        if self.times is None:
            return self.buffers
        return [self.buffers[0], *self.history, self.times]

    def ready(self, generation: int, depth: int) -> bool:
        """Whether this generation kept enough values for a signal of this depth."""
        return self.kept_generation == generation and self.kept_count >= depth

    def count_kept(self, generation: int) -> None:
        if self.kept_generation != generation:
            self.kept_generation, self.kept_count = generation, 0
        self.kept_count += 1


def _new(t: torch.Tensor) -> torch.Tensor:
    # Normal tensors even under inference_mode, so later calls outside it may still write them.
    with torch.inference_mode(False):
        return torch.empty_like(t)


def store(slot: Slot | None, cached: tuple[torch.Tensor, ...], restart: bool, forecast: int,
          timestep: torch.Tensor | None) -> Slot:
    """Keep a full step's cached outputs in `slot` (allocated when None), in place.

    With a forecast the feature's history shifts back first, unless `restart` (the slot holds
    another generation's features, or none): then the history starts over at this step.
    """
    # Detached: a cache must not keep a full step's autograd graph alive.
    with torch.no_grad():
        if slot is None:
            slot = Slot([_new(t) for t in cached])
            if forecast:
                slot.history, slot.times = new_history(cached[0], forecast)
            restart = True
        if forecast:
            remember(slot.history, slot.buffers[0], slot.times, restart, timestep)
        for buffer, t in zip(slot.buffers, cached):
            buffer.copy_(t)
    return slot


def keep(slot: Slot, value: torch.Tensor, depth: int) -> None:
    """Push `value` onto the slot's `depth` kept values (newest first), in place."""
    with torch.no_grad():
        if not slot.kept:
            slot.kept = [_new(value) for _ in range(depth)]
        for older, newer in zip(reversed(slot.kept), reversed([value, *slot.kept[:-1]])):
            older.copy_(newer)
