"""`dcfx.report`: what each branch (a U-Net's) or cut (a transformer's first and last blocks)
costs, to choose one before running anything big.

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
from .passes import PassOptions, build_graphs, families
from .passes.layout import Cut
from .passes.split import find_skips, split
from .runtime import DeepCacheUNet
from .policies import StepSchedule


@dataclass(frozen=True)
class BranchReport:
    """One branch (or a transformer's cut): FLOPs and node counts of both graphs, and the
    schedule's speedup bound."""

    branch: int | None  # None for a transformer's cut (`cut`)
    full_flops: int
    shallow_flops: int
    full_nodes: int
    shallow_nodes: int
    num_steps: int
    num_full_steps: int
    cached_bytes: int = 0  # kept per call slot between steps: the feature (and a forecast's history), statistics
    cut: Cut | None = None  # the layout's cut record

    @property
    def label(self) -> str:
        """The row's name: the branch, or a transformer's cut ('F1B0')."""
        return str(self.branch) if self.branch is not None else self.cut.label

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
    """Result of `dcfx.report`; `str(report)` is a table, one row per branch (or cut)."""

    model: str
    num_skips: int  # a U-Net's skip connections (0 for a transformer)
    config: DeepCacheConfig
    num_steps: int
    branches: tuple[BranchReport, ...]  # the rows, also a transformer's cuts
    num_blocks: int | None = None  # a transformer's blocks (None for a U-Net)

    def __str__(self) -> str:
        c = self.config
        schedule = c.schedule if isinstance(c.schedule, str) else "explicit"
        full = self.branches[0].num_full_steps if self.branches else 0
        model = (
            f"{self.num_blocks} transformer blocks (cut FnBm: the first n and the last m blocks run)"
            if self.num_blocks is not None else
            f"{self.num_skips} skip connections (branches 0..{self.num_skips - 1})"
        )
        head = f"dcfx report: {self.model}, {model}; schedule {schedule}, interval {c.interval}, {self.num_steps} steps ({full} full)"
        cols = ("branch" if self.num_blocks is None else "cut", "full GFLOPs", "shallow GFLOPs", "shallow/full", "speedup bound", "cache MiB", "nodes full", "nodes shallow")
        rows = [
            (
                r.label,
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
    cuts: Sequence[tuple[int, int]] | None = None,
    **kwargs: Any,
) -> Report:
    """FLOPs, node counts and speedup bound of every branch (or `branches`) of `unet`; of a
    transformer, of the cuts (Fn, Bn) in `cuts` (default: Fn 1..3 with Bn 0..1, as they fit).

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
    config = families.resolve(config or DeepCacheConfig(), unet)
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    num_blocks = families.num_blocks(unet)
    if (branches is not None and num_blocks is not None) or (cuts is not None and num_blocks is None):
        what = "a U-Net's rows are branches=" if num_blocks is None else "a transformer's rows are cuts=[(Fn, Bn), ...]"
        raise ValueError(f"{type(unet).__name__}: {what}")
    call = CallBinder(unet).bind(args, kwargs)
    gm = capture(unet, call).graph_module
    num_skips = 0
    if num_blocks is None:
        num_skips = len(find_skips(gm.graph))
        if num_skips == 0:
            split(gm, 0)  # raises the "no skip connections" error
        chosen = [(b, None) for b in (range(num_skips) if branches is None else branches)]
    else:
        default = [(fn, bn) for fn in (1, 2, 3) for bn in (0, 1) if fn + bn < num_blocks]
        chosen = [(0, tuple(c)) for c in (default if cuts is None else cuts)]
    num_full = len(StepSchedule(config).full_steps(num_steps))
    fuse = pass_options(config).fuse
    rows = []
    with torch.no_grad():
        for b, blocks in chosen:
            # validates b (or the cut)
            graphs = build_graphs(gm, PassOptions(b, fuse, timestep_index=call.timestep_index, blocks=blocks))
            cost = graph_cost(graphs.graphs, graphs.layout, call.tensors)
            nodes = [operator_count(graphs.graphs[kind].graph) for kind in graphs.layout.graphs]
            rows.append(BranchReport(b if blocks is None else None, cost.full, cost.shallow, *nodes, num_steps, num_full,
                                     cost.slot_bytes(config.forecast), graphs.layout.cut))
    return Report(type(unet).__name__, num_skips, config, num_steps, tuple(rows), num_blocks)
