"""`dcfx.report`: what each branch costs, to choose one before running anything big.

FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode` while the full and the shallow
graph run on meta copies of the example inputs and weights (`dcfx.flops`): nothing is
computed, so SD1.5- and SDXL-sized models report in seconds, and attention is counted as its
matrix products whatever kernel the device would pick (the runtime's `spent` counts the same
way).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import fx, nn

from .capture import CallBinder, capture
from .config import DeepCacheConfig
from .flops import count_flops
from .inspection import operator_count
from .passes import deepcache_graphs, pass_options
from .passes.split import CACHED_OUTPUTS, find_skips, split
from .runtime import DeepCacheUNet
from .schedule import StepSchedule


@dataclass(frozen=True)
class BranchReport:
    """One branch: FLOPs and node counts of both graphs, and the schedule's speedup bound."""

    branch: int
    full_flops: int
    shallow_flops: int
    full_nodes: int
    shallow_nodes: int
    num_steps: int
    num_full_steps: int
    cached_bytes: int = 0  # kept per call slot between steps: the feature (and a forecast's history), statistics

    @property
    def shallow_fraction(self) -> float:
        """Shallow-graph FLOPs as a fraction of the full graph's."""
        return self.shallow_flops / self.full_flops if self.full_flops else float("nan")

    @property
    def speedup_bound(self) -> float:
        """FLOP ratio plain / DeepCache over one generation: the compute-bound speedup."""
        cached = self.num_full_steps * self.full_flops + (self.num_steps - self.num_full_steps) * self.shallow_flops
        return self.num_steps * self.full_flops / cached if cached else float("nan")


@dataclass(frozen=True)
class Report:
    """Result of `dcfx.report`; `str(report)` is a table, one row per branch."""

    model: str
    num_skips: int
    config: DeepCacheConfig
    num_steps: int
    branches: tuple[BranchReport, ...]

    def __str__(self) -> str:
        c = self.config
        schedule = c.schedule if isinstance(c.schedule, str) else "explicit"
        full = self.branches[0].num_full_steps if self.branches else 0
        head = (
            f"dcfx report: {self.model}, {self.num_skips} skip connections (branches 0..{self.num_skips - 1}); "
            f"schedule {schedule}, interval {c.interval}, {self.num_steps} steps ({full} full)"
        )
        cols = ("branch", "full GFLOPs", "shallow GFLOPs", "shallow/full", "speedup bound", "cache MiB", "nodes full", "nodes shallow")
        rows = [
            (
                str(r.branch),
                f"{r.full_flops / 1e9:.3f}",
                f"{r.shallow_flops / 1e9:.3f}",
                f"{100 * r.shallow_fraction:.1f}%",
                f"{r.speedup_bound:.2f}x",
                f"{r.cached_bytes / 2**20:.2f}",
                str(r.full_nodes),
                str(r.shallow_nodes),
            )
            for r in self.branches
        ]
        widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(cols)]
        line = lambda cells: "  ".join(cell.rjust(w) for cell, w in zip(cells, widths))  # noqa: E731
        return "\n".join([head, line(cols), line(["-" * w for w in widths]), *map(line, rows)])


def report(
    unet: nn.Module,
    *args: Any,
    config: DeepCacheConfig | None = None,
    num_steps: int = 50,
    branches: Sequence[int] | None = None,
    **kwargs: Any,
) -> Report:
    """FLOPs, node counts and speedup bound of every branch (or `branches`) of `unet`.

    `args`/`kwargs` are one example call of the U-Net (meta tensors with a meta-device
    U-Net count without computing). `config` (default: a `DeepCacheUNet`'s own, else
    `DeepCacheConfig()`) gives the schedule for the bound over `num_steps` steps, whether
    the cut is fused (as the runtime would run it), and the forecast order, which adds one
    cached feature per order to the memory a call slot keeps (`cached_bytes`, "cache MiB").
    """
    if isinstance(unet, DeepCacheUNet):
        config = config or unet.deepcache_config
        unet = unet.unet
    config = config or DeepCacheConfig()
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    call = CallBinder(unet).bind(args, kwargs)
    gm = capture(unet, call).graph_module
    num_skips = len(find_skips(gm.graph))
    if num_skips == 0:
        split(gm, 0)  # raises the "no skip connections" error
    chosen = tuple(range(num_skips)) if branches is None else tuple(branches)
    num_full = len(StepSchedule(config).full_steps(num_steps))
    fuse = pass_options(config)[1]
    rows = []
    with torch.no_grad():
        for b in chosen:
            full, shallow = deepcache_graphs(gm, b, fuse)  # validates b
            full_flops, outputs = _count(full, call.tensors)
            cached = full.meta.get(CACHED_OUTPUTS, 1)
            kept = outputs[-cached:]
            shallow_flops, _ = _count(shallow, (*call.tensors, *kept))
            rows.append(BranchReport(b, full_flops, shallow_flops, operator_count(full.graph), operator_count(shallow.graph),
                                     num_steps, num_full, _cached_bytes(kept, config.forecast)))
    return Report(type(unet).__name__, num_skips, config, num_steps, tuple(rows))


def _cached_bytes(kept: Sequence[torch.Tensor], forecast: int) -> int:
    """What a call slot keeps, as the runtime keeps it: the full graph's cached outputs (the
    feature first, then the statistics the fuse pass hoists); with a forecast of order k, the
    feature, k earlier ones and k + 2 float32 timesteps (no statistics: the forecast feature
    is new at every step)."""
    nbytes = lambda t: t.numel() * t.element_size()  # noqa: E731
    if forecast:
        return (1 + forecast) * nbytes(kept[0]) + 4 * (forecast + 2)
    return sum(nbytes(t) for t in kept)


def _count(gm: fx.GraphModule, inputs: tuple) -> tuple[int, tuple]:
    return count_flops(gm, inputs)

