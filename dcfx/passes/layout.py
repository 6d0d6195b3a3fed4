"""`CacheLayout`: what a graph set caches and how, in one frozen record.

`build_graphs` makes it once, next to the graphs; the runtime's entries, `DeepCacheGraphs`,
AOT packages (their manifest stores it), `dcfx.costs` and inspection read it whole.

The cut is described by a small record per model family (`UNetCut`: a skip connection;
`BlocksCut`: a transformer's first and last blocks), so that another family's split rule adds
its own cut record and nothing else changes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Sequence, Union

import torch

from ..config import DeepCacheConfig
from .families import DEFAULT_FIRST_BLOCKS, DEFAULT_LAST_BLOCKS

# The graphs of a fixed or latent-gated policy, and of a head-gated one.
PAIR = ("full", "shallow")
HEADED = ("head", "rest", "tail")


@dataclass(frozen=True)
class UNetCut:
    """A U-Net cut at skip connection `branch` of its `num_skips` (see `passes.split`)."""

    family: ClassVar[str] = "unet"
    branch: int
    num_skips: int

    @property
    def label(self) -> str:
        """Short name of the cut, for profiler ranges: 'b0'."""
        return f"b{self.branch}"

    def describe(self) -> str:
        """The cut in words, for reports and inspection."""
        return f"branch {self.branch} (skip connections 0..{self.num_skips - 1})"

    def runs(self, config: DeepCacheConfig) -> bool:
        """Whether `config` asks for this cut."""
        return not config.blocks_given and config.branch == self.branch


@dataclass(frozen=True)
class BlocksCut:
    """A transformer cut after its first `first_blocks` blocks and before its last
    `last_blocks` of `num_blocks`, the middle cached as a residual (see `passes.split_dit`)."""

    family: ClassVar[str] = "transformer"
    first_blocks: int
    last_blocks: int
    num_blocks: int

    @property
    def label(self) -> str:
        """Short name of the cut, for profiler ranges: 'F1B0'."""
        return f"F{self.first_blocks}B{self.last_blocks}"

    def describe(self) -> str:
        """The cut in words, for reports and inspection."""
        return (f"{self.label} (the first {self.first_blocks} and the last {self.last_blocks} of "
                f"{self.num_blocks} transformer blocks run, the middle is cached)")

    def runs(self, config: DeepCacheConfig) -> bool:
        """Whether `config` asks for this cut (unset fields: the defaults, `families`)."""
        fn = DEFAULT_FIRST_BLOCKS if config.first_blocks is None else config.first_blocks
        bn = DEFAULT_LAST_BLOCKS if config.last_blocks is None else config.last_blocks
        return not config.branch and (fn, bn) == (self.first_blocks, self.last_blocks)


Cut = Union[UNetCut, BlocksCut]
_CUTS: dict[str, type] = {UNetCut.family: UNetCut, BlocksCut.family: BlocksCut}


@dataclass(frozen=True)
class CacheLayout:
    """What a graph set caches and how.

    Attributes:
        cut: where the model is cut (a family's cut record: `UNetCut`, `BlocksCut`).
        graphs: the graphs by kind: ("full", "shallow"), or ("head", "rest", "tail") for
            policies that decide after the head. full(*inputs) -> outputs + cached;
            shallow(*inputs, *cached_inputs) -> outputs; head(*inputs) -> boundary, and rest
            and tail take the boundary after the inputs.
        num_cached: trailing outputs of full (or rest) kept for shallow (or tail): the
            feature first, then what passes add (statistics).
        forecast: the shallow graph extrapolates the feature from this many earlier ones;
            its cached inputs are then the feature's history (c0, c1, ..., times).
        num_boundary: head-gated: how many tensors the head passes on.
        cut_index: head-gated: which of them is the fresh feature at the cut.
        timestep_index: the timestep's position among the graphs' inputs (None: not a tensor).
    """

    cut: Cut
    graphs: tuple[str, ...] = PAIR
    num_cached: int = 1
    forecast: int = 0
    num_boundary: int = 0
    cut_index: int = -1
    timestep_index: int | None = None

    @property
    def head(self) -> bool:
        """Whether a head graph runs first (head, rest and tail)."""
        return "head" in self.graphs

    @property
    def full_kind(self) -> str:
        """The graph of a full step: "full", or "rest" after the head."""
        return self.graphs[-2]

    @property
    def shallow_kind(self) -> str:
        """The graph of a shallow step: "shallow", or "tail" after the head."""
        return self.graphs[-1]

    def example_cached(self, outputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """The shallow graph's cached inputs, from a full call's `outputs`: the cached outputs,
        or with a forecast the feature as its own history and zero times."""
        cached = tuple(outputs[len(outputs) - self.num_cached:])
        if not self.forecast:
            return cached
        feature = cached[0]
        times = torch.zeros(self.forecast + 2, dtype=torch.float32, device=feature.device)
        # Distinct tensors: an export that sees one tensor twice may assume they alias.
        return (feature, *(feature.clone() for _ in range(self.forecast)), times)

    def to_dict(self) -> dict[str, Any]:
        """The layout as JSON-able values (`from_dict` reads them back)."""
        out = asdict(self)
        out["cut"] = {"family": self.cut.family, **out["cut"]}
        out["graphs"] = list(self.graphs)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CacheLayout":
        values = dict(data)
        cut = dict(values.pop("cut"))
        family = cut.pop("family", None)
        if family not in _CUTS:
            raise ValueError(f"unknown cut family {family!r}; dcfx knows {', '.join(_CUTS)}")
        return cls(cut=_CUTS[family](**cut), graphs=tuple(values.pop("graphs")), **values)
