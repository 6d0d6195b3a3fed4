"""`dcfx.report`: what each branch costs, to choose one before running anything big.

FLOPs are counted by `dcfx.costs` while the full and the shallow graph run on meta copies of
the example inputs and weights: nothing is computed, so SD1.5- and SDXL-sized models report
in seconds, and attention is counted as its matrix products whatever kernel the device would
pick (the runtime's `spent` counts the same way).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from .capture import CallBinder, capture
from .config import DeepCacheConfig
from .costs import GraphCost, equivalents, graph_cost
from .inspection import operator_count
from .options import pass_options
from .passes import PassOptions, build_graphs
from .passes.split import find_skips, split
from .runtime import DeepCacheUNet
from .policies import StepSchedule


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
    def cost(self) -> GraphCost:
        """The FLOPs of a full and of a shallow call, as `dcfx.costs` prices generations."""
        return GraphCost({"full": self.full_flops, "shallow": self.shallow_flops})

    @property
    def shallow_fraction(self) -> float:
        """Shallow-graph FLOPs as a fraction of the full graph's."""
        return self.cost.shallow_fraction

    @property
    def speedup_bound(self) -> float:
        """FLOP ratio plain / DeepCache over one generation: the compute-bound speedup."""
        cost = equivalents(self.num_full_steps, self.num_steps - self.num_full_steps, self.shallow_fraction)
        return self.num_steps / cost if self.full_flops and cost else float("nan")


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
    U-Net count without computing; `dcfx.models.example_call(unet)` makes one for a
    diffusers U-Net from its config). `config` (default: a `DeepCacheUNet`'s own, else
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
    fuse = pass_options(config).fuse
    rows = []
    with torch.no_grad():
        for b in chosen:
            graphs = build_graphs(gm, PassOptions(b, fuse, timestep_index=call.timestep_index))  # validates b
            cost = graph_cost(graphs.graphs, graphs.layout, call.tensors)
            nodes = [operator_count(graphs.graphs[kind].graph) for kind in graphs.layout.graphs]
            rows.append(BranchReport(b, cost.full, cost.shallow, *nodes, num_steps, num_full, cost.slot_bytes(config.forecast)))
    return Report(type(unet).__name__, num_skips, config, num_steps, tuple(rows))
