"""Graph passes: split (full and shallow graph, or head, rest and tail; a split rule first
rewrites in-place writes into intermediates out of place, `functional`), fuse (the shallow
graph's cut point, and the cached feature's statistics moved to the full graph), forecast (the
shallow graph extrapolates the cached feature). `build_graphs` runs them for one
`PassOptions` and returns the graphs with their `CacheLayout`. Passes are pure: graphs and
options in, graphs out.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from .forecast import FORECAST_META, forecast
from .fuse import cache_cut_stats, fuse_cut
from .layout import HEADED, PAIR, BlocksCut, CacheLayout, UNetCut
from .split import CACHED_OUTPUTS, split, split_head
from .split_dit import split_dit, split_dit_head

__all__ = ["BlocksCut", "CacheLayout", "PassOptions", "PassOutput", "UNetCut", "build_graphs", "deepcache_graphs"]


def deepcache_graphs(gm: fx.GraphModule, branch: int, fuse: bool) -> tuple[fx.GraphModule, fx.GraphModule]:
    """The full and the (optionally fused) shallow graph of captured graph `gm`.

    The full graph's last `meta["dcfx_cached_outputs"]` outputs are the shallow graph's last
    inputs, in order.
    """
    graphs = build_graphs(gm, PassOptions(branch, fuse)).graphs
    return graphs["full"], graphs["shallow"]


@dataclass(frozen=True)
class PassOptions:
    """What the passes make of a captured graph for one config (and one call signature)."""

    branch: int
    fuse: bool
    forecast: int = 0  # forecast order of the shallow graph (0: the feature is reused)
    head: bool = False  # head, rest and tail instead of full and shallow (adaptive gating)
    timestep_index: int | None = None  # the timestep's placeholder (a forecast needs it)
    blocks: tuple[int, int] | None = None  # a transformer's (Fn, Bn): its split rule; None: a U-Net's


@dataclass
class PassOutput:
    """The graphs of one captured call under `PassOptions`, by kind (`layout.graphs`), and
    their layout."""

    graphs: dict[str, fx.GraphModule]
    layout: CacheLayout


def build_graphs(gm: fx.GraphModule, options: PassOptions) -> PassOutput:
    """Run the passes on captured graph `gm` (not modified) for `options`."""
    if options.blocks is not None:
        parts = (split_dit_head if options.head else split_dit)(gm, *options.blocks)
        cut = BlocksCut(*options.blocks, parts.num_blocks)
    else:
        parts = (split_head if options.head else split)(gm, options.branch)
        cut = UNetCut(options.branch, parts.num_skips)
    if options.head:
        full, shallow = parts.rest, parts.tail
        extra = {"head": parts.head}
        boundary, cut_index = parts.num_boundary, parts.skip_index
    else:
        full, shallow = parts.full, parts.shallow
        extra, boundary, cut_index = {}, 0, -1
    if options.fuse:
        shallow = fuse_cut(shallow)
        if not options.forecast:
            full, shallow = cache_cut_stats(full, shallow)
    if options.forecast:
        if options.timestep_index is None:
            raise ValueError("a forecast needs the timestep's position among the graph inputs")
        shallow = forecast(shallow, options.forecast, options.timestep_index)
    names = HEADED if options.head else PAIR
    layout = CacheLayout(
        cut=cut,
        graphs=names,
        num_cached=full.meta.get(CACHED_OUTPUTS, 1),
        forecast=shallow.meta.get(FORECAST_META, 0),
        num_boundary=boundary,
        cut_index=cut_index,
        timestep_index=options.timestep_index,
    )
    return PassOutput({**extra, names[-2]: full, names[-1]: shallow}, layout)
