"""Triton kernels for dcfx, each with a plain-PyTorch reference and a torch custom op.

- `cat_group_norm_silu`: silu(group_norm(cat([cached, skip], 1))) at DeepCache's cut point,
  without materializing the concatenation (`torch.ops.dcfx.cat_group_norm_silu`), optionally
  with the cached feature's group statistics precomputed by
- `group_partial_stats` (`torch.ops.dcfx.group_partial_stats`), once per full step.
"""

from .cut_norm import (
    cat_group_norm_silu,
    cat_group_norm_silu_reference,
    cat_group_norm_silu_triton,
    group_partial_stats,
    group_partial_stats_reference,
    group_partial_stats_triton,
)

__all__ = [
    "cat_group_norm_silu",
    "cat_group_norm_silu_reference",
    "cat_group_norm_silu_triton",
    "group_partial_stats",
    "group_partial_stats_reference",
    "group_partial_stats_triton",
]
