"""Graph passes: split (full and shallow graph, or head, rest and tail), fuse (the shallow
graph's cut point, and the cached feature's statistics moved to the full graph), forecast (the
shallow graph extrapolates the cached feature)."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import fx

from ..config import DeepCacheConfig
from .forecast import FORECAST_META, forecast
from .fuse import cache_cut_stats, fuse_cut, fusion_disabled
from .split import CACHED_OUTPUTS, split, split_head


def pass_options(config: DeepCacheConfig) -> tuple[int, bool]:
    """(branch, fuse) as the passes apply them: DCFX_DISABLE_FUSION=1 overrides fuse_cut."""
    return config.branch, config.fuse_cut and not fusion_disabled()


def deepcache_graphs(gm: fx.GraphModule, branch: int, fuse: bool) -> tuple[fx.GraphModule, fx.GraphModule]:
    """The full and the (optionally fused) shallow graph of captured graph `gm`.

    The full graph's last `meta["dcfx_cached_outputs"]` outputs are the shallow graph's last
    inputs, in order.
    """
    graphs = split(gm, branch)
    if not fuse:
        return graphs.full, graphs.shallow
    return cache_cut_stats(graphs.full, fuse_cut(graphs.shallow))


@dataclass(frozen=True)
class PassOptions:
    """What the passes make of a captured graph for one config (and one call signature)."""

    branch: int
    fuse: bool
    forecast: int = 0  # forecast order of the shallow graph (0: the feature is reused)
    head: bool = False  # head, rest and tail instead of full and shallow (adaptive gating)
    timestep_index: int | None = None  # the timestep's placeholder (forecast needs it)

    @classmethod
    def of(cls, config: DeepCacheConfig, timestep_index: int | None) -> "PassOptions":
        branch, fuse = pass_options(config)
        return cls(branch, fuse, config.forecast, config.needs_head, timestep_index if config.forecast else None)


@dataclass
class GraphSet:
    """The graphs of one captured call under `PassOptions`, by kind.

    Fixed and latent-gated policies: `full(*inputs)` -> outputs + cached, `shallow(*inputs,
    *cached_inputs)` -> outputs. Head-gated policies: `head(*inputs)` -> boundary,
    `rest(*inputs, *boundary)` -> outputs + cached, `tail(*inputs, *boundary, *cached_inputs)`
    -> outputs. `num_cached` trailing outputs of full/rest are kept; the cached inputs are
    those, or with a forecast the feature's history (c0, c1, ..., times).
    """

    graphs: dict[str, fx.GraphModule]
    num_cached: int
    forecast: int = 0
    num_boundary: int = 0
    skip_index: int = -1  # the boundary output that is s_b (head-gated policies)
    meta: dict = field(default_factory=dict)

    @property
    def head(self) -> bool:
        return "head" in self.graphs


def build_graphs(gm: fx.GraphModule, options: PassOptions) -> GraphSet:
    """Run the passes on captured graph `gm` (not modified) for `options`."""
    if options.head:
        parts = split_head(gm, options.branch)
        full, shallow = parts.rest, parts.tail
        extra = {"head": parts.head}
        boundary, skip_index = parts.num_boundary, parts.skip_index
    else:
        graphs = split(gm, options.branch)
        full, shallow = graphs.full, graphs.shallow
        extra, boundary, skip_index = {}, 0, -1
    if options.fuse:
        shallow = fuse_cut(shallow)
        if not options.forecast:
            full, shallow = cache_cut_stats(full, shallow)
    if options.forecast:
        if options.timestep_index is None:
            raise ValueError("a forecast needs the timestep's position among the graph inputs")
        shallow = forecast(shallow, options.forecast, options.timestep_index)
    names = ("rest", "tail") if options.head else ("full", "shallow")
    return GraphSet(
        {**extra, names[0]: full, names[1]: shallow},
        num_cached=full.meta.get(CACHED_OUTPUTS, 1),
        forecast=shallow.meta.get(FORECAST_META, 0),
        num_boundary=boundary,
        skip_index=skip_index,
    )
