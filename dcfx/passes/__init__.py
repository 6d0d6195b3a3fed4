"""Graph passes: split (full and shallow graph), then fuse (the shallow graph's cut point, and
the cached feature's statistics moved to the full graph)."""

from __future__ import annotations

from torch import fx

from ..config import DeepCacheConfig
from .fuse import cache_cut_stats, fuse_cut, fusion_disabled
from .split import split


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
