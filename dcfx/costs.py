"""Cost: FLOPs of a graph, of each graph of a graph set, and of a generation.

FLOPs are counted without computing: `torch.utils.flop_counter.FlopCounterMode` while a graph
runs on meta copies of its inputs and weights. It counts matrix products, convolutions and
attention (as its matrix products, whatever kernel a device would pick), which dominate a
U-Net; elementwise work is not counted. `dcfx.report` (what a branch would cost),
`DeepCacheUNet.spent` (what a generation cost), `dcfx.calibrate` (what a budget buys) and the
demo all count here, so their numbers agree.

Costs of generations are in *full-call equivalents*: one call of the full graph costs 1, a
shallow call `shallow_fraction` (its FLOPs over the full graph's), so plain sampling with T
steps costs T.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import fx
from torch.utils.flop_counter import FlopCounterMode

from .capture import CallBinder, capture
from .passes.layout import CacheLayout


class _OnMeta(fx.Interpreter):
    """Runs a graph with its weights read as meta tensors (no data, no compute)."""

    def get_attr(self, target: Any, args: Any, kwargs: Any) -> Any:
        value = super().get_attr(target, args, kwargs)
        return value.to("meta") if isinstance(value, torch.Tensor) else value

    def call_function(self, target: Any, args: Any, kwargs: Any) -> Any:
        # Factories with a device baked in at capture (arange for the time embedding, ...).
        if "device" in kwargs:
            kwargs = {**kwargs, "device": torch.device("meta")}
        return super().call_function(target, args, kwargs)


def count_flops(gm: fx.GraphModule, inputs: Sequence[Any]) -> tuple[int, tuple]:
    """(FLOPs of one call of `gm`, its outputs as meta tensors)."""
    metas = tuple(x.to("meta") if isinstance(x, torch.Tensor) else x for x in inputs)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        outputs = _OnMeta(gm).run(*metas)
    return counter.get_total_flops(), tuple(outputs)


def call_flops(module: torch.nn.Module, *args: Any, **kwargs: Any) -> int:
    """FLOPs of one plain call of `module` with these arguments, counted as its graphs are
    (captured once, run on meta copies): what a full call costs without DeepCache."""
    call = CallBinder(module).bind(args, kwargs)
    return count_flops(capture(module, call).graph_module, call.tensors)[0]


@dataclass(frozen=True)
class GraphCost:
    """FLOPs of one call of each graph of a graph set, for one input signature.

    `flops` has one entry per graph (full and shallow; or head, rest and tail, and then also
    full = head + rest and shallow = head + tail: what a full and a shallow call cost).
    `cached` are the tensors a full call keeps for the shallow calls (meta tensors).
    """

    flops: Mapping[str, int]
    cached: tuple[torch.Tensor, ...] = field(default=(), compare=False, repr=False)

    @property
    def full(self) -> int:
        """FLOPs of a full call."""
        return self.flops["full"]

    @property
    def shallow(self) -> int:
        """FLOPs of a shallow call."""
        return self.flops["shallow"]

    @property
    def shallow_fraction(self) -> float:
        """A shallow call's FLOPs as a fraction of a full call's."""
        return self.shallow / self.full if self.full else float("nan")

    def generation_flops(self, full_calls: int, shallow_calls: int) -> int:
        """FLOPs of `full_calls` full and `shallow_calls` shallow calls."""
        return full_calls * self.full + shallow_calls * self.shallow

    def slot_bytes(self, forecast: int = 0) -> int:
        """What a call slot keeps between steps, as the runtime keeps it: the full graph's
        cached outputs (the feature first, then the statistics the fuse pass hoists); with a
        forecast of order k, the feature, k earlier ones and k + 2 float32 timesteps (no
        statistics: the forecast feature is new at every step)."""
        nbytes = lambda t: t.numel() * t.element_size()  # noqa: E731
        if forecast:
            return (1 + forecast) * nbytes(self.cached[0]) + 4 * (forecast + 2)
        return sum(nbytes(t) for t in self.cached)


def graph_cost(graphs: Mapping[str, fx.GraphModule], layout: CacheLayout, inputs: Sequence[torch.Tensor]) -> GraphCost:
    """The `GraphCost` of a graph set (its graphs by kind and its layout, as
    `passes.build_graphs` makes them) for a call with these tensors (on any device: they are
    counted as meta copies)."""
    head = layout.head
    flops: dict[str, int] = {}
    boundary: tuple = ()
    if head:
        flops["head"], boundary = count_flops(graphs["head"], inputs)
    full, shallow = layout.full_kind, layout.shallow_kind
    flops[full], outputs = count_flops(graphs[full], (*inputs, *boundary))
    cached = tuple(outputs[len(outputs) - layout.num_cached:])
    flops[shallow], _ = count_flops(graphs[shallow], (*inputs, *boundary, *layout.example_cached(outputs)))
    if head:
        flops["full"] = flops["head"] + flops["rest"]
        flops["shallow"] = flops["head"] + flops["tail"]
    return GraphCost(flops, cached)


def equivalents(full_calls: int, shallow_calls: int, shallow_fraction: float) -> float:
    """Cost in full-call equivalents of `full_calls` full and `shallow_calls` shallow calls."""
    return full_calls + shallow_calls * shallow_fraction


def history_cost(history: str, shallow_fraction: float) -> float:
    """Full-call equivalents of a generation that ran `history` (one 'F' or 'S' per call;
    plain sampling's is all 'F')."""
    return equivalents(history.count("F"), history.count("S"), shallow_fraction)


def full_steps_for(budget: float, num_steps: int, shallow_fraction: float) -> int:
    """How many full steps a budget of `budget` full-call equivalents buys over `num_steps`
    steps whose shallow steps cost `shallow_fraction` each."""
    ratio = shallow_fraction
    if not budget <= num_steps:
        raise ValueError(f"budget {budget} is above the step count {num_steps}: a budget counts full-step equivalents (plain sampling costs {num_steps})")
    cheapest = equivalents(1, num_steps - 1, ratio)
    if budget < cheapest:
        raise ValueError(
            f"budget {budget} is below the cheapest schedule of {num_steps} steps at this branch "
            f"({cheapest:.2f}: one full step, every other step shallow at {ratio:.3f} of a full step)"
        )
    return max(1, min(num_steps, int((budget - num_steps * ratio) / (1 - ratio) + 1e-9)))


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


def spent(steps: str, runs: Iterable[tuple[str, int, GraphCost | None]], misses: int = 0,
          plain_calls: int = 0, plain_cost: GraphCost | None = None) -> Spent:
    """What a generation cost. `steps`: one 'F' or 'S' per step; `runs`: (graph kind, how often
    it ran, the `GraphCost` of its graph set, None where not counted); `plain_calls` ran the
    plain U-Net, each costing a full call of `plain_cost` (None: not counted)."""
    by_kind: dict[str, int] = {}
    flops: int | None = 0
    plain: int | None = 0
    calls = 0  # U-Net calls: the full or shallow graph (rest/tail) ran once per call
    for kind, count, cost in runs:
        by_kind[kind] = by_kind.get(kind, 0) + count
        if cost is None:
            flops = plain = None
        elif flops is not None:
            flops += count * cost.flops[kind]
            if kind != "head":
                plain += count * cost.full
        if kind != "head":
            calls += count
    if plain_calls and flops is not None:
        if plain_cost is not None:
            flops += plain_calls * plain_cost.full
            plain += plain_calls * plain_cost.full
            calls += plain_calls
        else:
            flops = plain = None
    return Spent(steps, by_kind, misses, plain_calls, flops if calls else None, plain if calls else None)
