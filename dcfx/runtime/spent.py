"""What a generation cost: steps, graph runs, misses and FLOPs (`DeepCacheUNet.spent`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .graphs import GraphCache
from .steps import Generation


@dataclass(frozen=True)
class Spent:
    """One generation's cost, from the same FLOP counts `dcfx.report` uses.

    `flops` is what the graphs that ran cost; `plain_flops` what the plain U-Net would have
    cost for the same calls. `cost` is the generation in full-U-Net-step equivalents (plain
    sampling with T steps costs T), comparable across policies and step counts.
    """

    steps: str  # one 'F' or 'S' per step
    runs: dict[str, int] = field(default_factory=dict)  # graph runs by kind (full, shallow, head, ...)
    misses: int = 0  # calls of a shallow step that ran full: no cache for their stream
    plain_steps: int = 0  # steps that ran the plain U-Net (the export limit was hit)
    flops: int | None = None  # None when a graph's FLOPs cannot be counted (AOT packages)
    plain_flops: int | None = None

    @property
    def full_steps(self) -> int:
        return self.steps.count("F")

    @property
    def shallow_steps(self) -> int:
        return self.steps.count("S")

    @property
    def cost(self) -> float | None:
        """Full-U-Net-step equivalents: len(steps) * flops / plain_flops."""
        if not self.flops or not self.plain_flops:
            return None
        return len(self.steps) * self.flops / self.plain_flops

    @property
    def speedup(self) -> float | None:
        """plain_flops / flops: the compute-bound speedup of this generation."""
        return self.plain_flops / self.flops if self.flops and self.plain_flops else None

    def __str__(self) -> str:
        parts = [f"{len(self.steps)} steps ({self.full_steps} full, {self.shallow_steps} shallow)"]
        if self.misses:
            parts.append(f"{self.misses} misses")
        if self.cost is not None:
            parts.append(f"{self.flops / 1e9:.3f} GFLOPs = {self.cost:.2f} full-step equivalents ({self.speedup:.2f}x fewer)")
        return ", ".join(parts)


def spent_of(gen: Generation, graphs: GraphCache) -> Spent:
    entries = {e.serial: e for state in graphs.states.values() for e in state.values()}
    if graphs.preloaded is not None:
        entries[graphs.preloaded[2].serial] = graphs.preloaded[2]
    runs: dict[str, int] = {}
    flops: int | None = 0
    plain: int | None = 0
    calls = 0  # U-Net calls: the full or shallow graph (rest/tail) ran once per call
    for key, count in gen.counts.items():
        if not isinstance(key, tuple):
            continue
        serial, kind = key
        runs[kind] = runs.get(kind, 0) + count
        entry = entries.get(serial)
        counted = entry.flops() if entry is not None else None
        if counted is None:
            flops = plain = None
        elif flops is not None:
            flops += count * counted[kind]
            if kind != "head":
                plain += count * counted["full"]
        if kind != "head":
            calls += count
    plain_calls = int(gen.counts.get("plain", 0))
    if plain_calls and flops is not None:
        counted = [e.flops() for s, e in entries.items() if any(k[0] == s for k in gen.counts if isinstance(k, tuple))]
        if counted and counted[0] is not None:
            flops += plain_calls * counted[0]["full"]
            plain += plain_calls * counted[0]["full"]
            calls += plain_calls
        else:
            flops = plain = None
    return Spent("".join(gen.log), runs, int(gen.counts.get("misses", 0)), plain_calls,
                 flops if calls else None, plain if calls else None)
