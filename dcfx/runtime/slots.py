"""The slot cache: the tensors a stream keeps between steps, per entry (input signature).

A slot is one stream's (one conditioning's, see `steps.py`) tensors for one entry:
- `buffers`: the full step's cached outputs (the deep feature, then e.g. its group
  statistics), which the shallow graph reads;
- with a forecast of order k: `history` (the features of the k full steps before) and
  `times` (float32 [n, t0, t1, ...]: how many features are valid, and their timesteps);
- for a head-gated policy, `reference`: the fresh feature at the cut, at the last full step
  ("cut") or the last step ("accumulated");
- for the latent-gated policy, `samples`: the last three samples.
A slot is valid only in the generation that wrote it, so a cache never crosses generations.
Buffers are allocated once and always written in place, so a captured CUDA graph that reads
them stays valid: full steps copy into them, shallow steps read them. All updates are device
operations decided on the host: nothing is read back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(eq=False)
class Slot:
    buffers: list[torch.Tensor]
    generation: int
    history: list[torch.Tensor] = field(default_factory=list)
    times: torch.Tensor | None = None
    reference: torch.Tensor | None = None
    reference_generation: int = -1
    samples: list[torch.Tensor] = field(default_factory=list)
    samples_seen: int = 0  # samples recorded in `samples_generation` (host count)
    samples_generation: int = -1

    def inputs(self) -> list[torch.Tensor]:
        """The shallow graph's trailing inputs."""
        if self.times is None:
            return self.buffers
        return [self.buffers[0], *self.history, self.times]

    @property
    def nbytes(self) -> int:
        tensors = [*self.buffers, *self.history, *self.samples]
        tensors += [t for t in (self.times, self.reference) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)


def _new(t: torch.Tensor) -> torch.Tensor:
    # Normal tensors even under inference_mode, so later calls outside it may still write them.
    with torch.inference_mode(False):
        return torch.empty_like(t)


def store(slot: Slot | None, cached: tuple[torch.Tensor, ...], generation: int, forecast: int,
          timestep: torch.Tensor | None) -> Slot:
    """Keep a full step's cached outputs in `slot` (allocated when None), in place.

    With a forecast the feature's history shifts back first, unless the slot holds another
    generation's features (then the history restarts at this step).
    """
    # Detached: a cache must not keep a full step's autograd graph alive.
    with torch.no_grad():
        if slot is None:
            slot = Slot([_new(t) for t in cached], generation)
            if forecast:
                slot.history = [_new(cached[0]) for _ in range(forecast)]
                with torch.inference_mode(False):
                    slot.times = torch.zeros(forecast + 2, dtype=torch.float32, device=cached[0].device)
        if forecast:
            same = slot.generation == generation
            if same:
                for older, newer in zip(reversed(slot.history), reversed([slot.buffers[0], *slot.history[:-1]])):
                    older.copy_(newer)
                slot.times[2:].copy_(slot.times[1:-1].clone())
                slot.times[0].add_(1).clamp_(max=forecast + 1)
            else:
                slot.times[0].fill_(1)
            if timestep is not None:
                slot.times[1].copy_(timestep.reshape(-1)[0])
        for buffer, t in zip(slot.buffers, cached):
            buffer.copy_(t)
    slot.generation = generation
    return slot


def keep_reference(slot: Slot, feature: torch.Tensor, generation: int) -> None:
    """Remember `feature` (the fresh feature at the cut) as the next signal's reference."""
    with torch.no_grad():
        if slot.reference is None:
            slot.reference = _new(feature)
        slot.reference.copy_(feature)
    slot.reference_generation = generation


def keep_sample(slot: Slot, sample: torch.Tensor, generation: int) -> None:
    """Push `sample` onto the slot's last three samples (newest first)."""
    with torch.no_grad():
        if not slot.samples:
            slot.samples = [_new(sample) for _ in range(3)]
        if slot.samples_generation != generation:
            slot.samples_seen, slot.samples_generation = 0, generation
        for older, newer in zip(reversed(slot.samples), reversed([sample, *slot.samples[:-1]])):
            older.copy_(newer)
    slot.samples_seen += 1
