"""Triton device functions shared by the cut kernels: a tile of `cat([cached, skip], 1)` read
in place, and the masks that map a tile's channels to their groups.

Triton is optional: without it `triton` and `tl` are None, no kernel is defined, and the ops
run their PyTorch references (see `ops.py`).
"""

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None


if triton is not None:

    @triton.jit
    def load_cat_tile(
        cached_ptr,  # [N, C1, H, W]
        skip_ptr,  # [N, C2, H, W]
        n,
        c,  # [BLOCK_C] channel indices into the concatenation
        hw,  # [BLOCK_HW] merged spatial indices
        mask,  # [BLOCK_C, BLOCK_HW]
        c_lo,
        c_hi,
        C1,
        stride_cached_n,
        stride_cached_c,
        stride_cached_hw,
        stride_skip_n,
        stride_skip_c,
        stride_skip_hw,
    ):
        """fp32 tile cat([cached, skip], 1)[n, c, hw] for channels c_lo <= c < c_hi, 0 where masked."""
        # Branch per program, not per element: only tiles that straddle the two inputs pay
        # for two masked loads.
        if c_hi <= C1:
            x = tl.load(
                cached_ptr + n * stride_cached_n + c[:, None] * stride_cached_c + hw[None, :] * stride_cached_hw,
                mask=mask,
                other=0.0,
            )
        elif c_lo >= C1:
            x = tl.load(
                skip_ptr + n * stride_skip_n + (c - C1)[:, None] * stride_skip_c + hw[None, :] * stride_skip_hw,
                mask=mask,
                other=0.0,
            )
        else:
            in_cached = (c < C1)[:, None]
            x = tl.load(
                cached_ptr + n * stride_cached_n + c[:, None] * stride_cached_c + hw[None, :] * stride_cached_hw,
                mask=mask & in_cached,
                other=0.0,
            ) + tl.load(
                skip_ptr + n * stride_skip_n + (c - C1)[:, None] * stride_skip_c + hw[None, :] * stride_skip_hw,
                mask=mask & ~in_cached,
                other=0.0,
            )
        return x.to(tl.float32)

    @triton.jit
    def group_onehot(c, c_mask, g0, CHANNELS_PER_GROUP, KP: tl.constexpr):
        """[KP, BLOCK_C] bool: row j marks the channels c (masked by c_mask) of group g0 + j."""
        local = c // CHANNELS_PER_GROUP - g0
        return (tl.arange(0, KP)[:, None] == local[None, :]) & c_mask[None, :]
