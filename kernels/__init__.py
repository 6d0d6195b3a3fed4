"""Triton kernels for dcfx, each with a plain-PyTorch reference and a torch custom op.

- `cat_group_norm_silu`: silu(group_norm(cat([cached, skip], 1))) at DeepCache's cut point,
  without materializing the concatenation (`torch.ops.dcfx.cat_group_norm_silu`).
"""

from .cut_norm import (
    cat_group_norm_silu,
    cat_group_norm_silu_reference,
    cat_group_norm_silu_triton,
)

__all__ = ["cat_group_norm_silu", "cat_group_norm_silu_reference", "cat_group_norm_silu_triton"]
