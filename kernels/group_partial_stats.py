"""Partial GroupNorm statistics: (count, mean, M2) of runs of channels, kept as fp32 *pieces*
that Chan's parallel formula merges exactly, whichever program, launch or step made them.

`_group_partial_stats_kernel` computes the pieces of a window of groups of the concatenation
`cat([cached, skip], 1)`, read in place, for one hw split each. It serves two callers:
- `group_partial_stats(x, group_size)`: x alone (x as both halves, all its channels, one
  piece per group). DeepCache's cached feature stays the same over the shallow steps that
  follow a full step, so its statistics are computed once there and passed on as
  `cached_stats`;
- the two-pass path of `cat_group_norm_silu` (its statistics launch).

Here: the kernel, `group_partial_stats_triton` (its checked launcher) and the PyTorch
reference `group_partial_stats_reference`, with the statistics helpers the fused op's
reference shares.
"""

import torch

from .plan import check_launchable, plan_stats
from .tiles import tl, triton

# Fields of one statistics piece: element count, mean, sum of squared deviations (M2).
STATS_FIELDS = 3


if triton is not None:
    from .tiles import group_onehot, load_cat_tile

    @triton.jit
    def _group_partial_stats_kernel(
        cached_ptr,  # [N, C1, H, W]
        skip_ptr,  # [N, C2, H, W]
        stats_ptr,  # [N * GW, 3, P] fp32 out: (count, mean, M2) of group G_FIRST + i's piece p
        C1,
        C_LO,
        C_HI,
        HW,
        CHANNELS_PER_GROUP,
        G_FIRST,
        GW,
        GROUP_BLOCKS,
        K,
        HW_PER_SPLIT,
        stride_cached_n,
        stride_cached_c,
        stride_cached_hw,
        stride_skip_n,
        stride_skip_c,
        stride_skip_hw,
        CHANNEL_ALIGN: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_HW: tl.constexpr,
        KP: tl.constexpr,
    ):
        # Program: groups g0 .. g0 + K - 1 restricted to channels [C_LO, C_HI), hw split p.
        pid = tl.program_id(0)
        split = tl.program_id(1)
        n = pid // GROUP_BLOCKS
        g0 = G_FIRST + (pid % GROUP_BLOCKS) * K
        c_begin = tl.maximum(g0 * CHANNELS_PER_GROUP, C_LO)
        c_end = tl.minimum((g0 + K) * CHANNELS_PER_GROUP, C_HI)
        hw_lo = split * HW_PER_SPLIT
        hw_hi = tl.minimum(hw_lo + HW_PER_SPLIT, HW)
        hw_count = (hw_hi - hw_lo).to(tl.float32)

        r_count = tl.zeros((KP,), dtype=tl.float32)
        r_mean = tl.zeros((KP,), dtype=tl.float32)
        r_m2 = tl.zeros((KP,), dtype=tl.float32)
        for chunk in range(0, tl.cdiv(c_end - c_begin, BLOCK_C)):
            # CHANNEL_ALIGN divides the group size, C1 and BLOCK_C.
            c_lo = tl.multiple_of(c_begin + chunk * BLOCK_C, CHANNEL_ALIGN)
            c_hi = tl.minimum(c_lo + BLOCK_C, c_end)
            c = c_lo + tl.arange(0, BLOCK_C)
            c_mask = c < c_hi
            # Shift each channel by its first value in this piece: the shifted sums then stay
            # small and s2 - s1^2 / n does not cancel catastrophically in fp32.
            shift = load_cat_tile(
                cached_ptr, skip_ptr, n, c, hw_lo + tl.arange(0, 1), c_mask[:, None], c_lo, c_hi, C1,
                stride_cached_n, stride_cached_c, stride_cached_hw,
                stride_skip_n, stride_skip_c, stride_skip_hw,
            )  # [BLOCK_C, 1]
            acc1 = tl.zeros((BLOCK_C, BLOCK_HW), dtype=tl.float32)
            acc2 = tl.zeros((BLOCK_C, BLOCK_HW), dtype=tl.float32)
            for hw_start in range(hw_lo, hw_hi, BLOCK_HW):
                hw = hw_start + tl.arange(0, BLOCK_HW)
                mask = c_mask[:, None] & (hw < hw_hi)[None, :]
                x = load_cat_tile(
                    cached_ptr, skip_ptr, n, c, hw, mask, c_lo, c_hi, C1,
                    stride_cached_n, stride_cached_c, stride_cached_hw,
                    stride_skip_n, stride_skip_c, stride_skip_hw,
                )
                d = tl.where(mask, x - shift, 0.0)
                acc1 += d
                acc2 += d * d
            # Per channel: mean and M2 over hw_count positions; then per group of the block.
            s1 = tl.sum(acc1, axis=1)
            s2 = tl.sum(acc2, axis=1)
            ch_mean = tl.sum(shift, axis=1) + s1 / hw_count
            ch_m2 = tl.maximum(s2 - s1 * s1 / hw_count, 0.0)
            onehot = group_onehot(c, c_mask, g0, CHANNELS_PER_GROUP, KP)
            n_channels = tl.sum(onehot.to(tl.float32), axis=1)
            mean = tl.sum(tl.where(onehot, ch_mean[None, :], 0.0), axis=1) / tl.maximum(n_channels, 1.0)
            dev = ch_mean - tl.sum(tl.where(onehot, mean[:, None], 0.0), axis=0)
            m2 = tl.sum(tl.where(onehot, (ch_m2 + hw_count * dev * dev)[None, :], 0.0), axis=1)
            count = n_channels * hw_count
            # Chan's merge of this chunk into the running piece (count 0 merges as a no-op).
            total = r_count + count
            delta = mean - r_mean
            frac = count / tl.maximum(total, 1.0)
            r_mean += delta * frac
            r_m2 += m2 + delta * delta * r_count * frac
            r_count = total

        j = tl.arange(0, KP)
        valid = (j < K) & (g0 + j < G_FIRST + GW)
        num_pieces = tl.num_programs(1)
        offset = (n * GW + g0 - G_FIRST + j) * 3 * num_pieces + split  # 3 = STATS_FIELDS
        tl.store(stats_ptr + offset, r_count, mask=valid)
        tl.store(stats_ptr + offset + num_pieces, r_mean, mask=valid)
        tl.store(stats_ptr + offset + 2 * num_pieces, r_m2, mask=valid)


def launch_pieces(grid, cached, skip, pieces, *args, wrap=None, **meta):
    """Launch the statistics kernel on `grid`: its pointers, then `args` (its other arguments,
    in order) and `meta` (its constexprs, num_warps). `wrap` is applied to the kernel first
    (`wrap_triton` inside a triton_op)."""
    kernel = _group_partial_stats_kernel if wrap is None else wrap(_group_partial_stats_kernel)
    kernel[grid](cached, skip, pieces, *args, **meta)


def stats_dtype(dtype):
    """Statistics are fp32, or float64 for float64 inputs (the PyTorch path keeps their precision)."""
    return torch.promote_types(dtype, torch.float32)


def check_input(x, group_size):
    """Raise ValueError unless group_partial_stats(x, group_size) is defined."""
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D [N, C, H, W]; got {tuple(x.shape)}")
    if group_size <= 0:
        raise ValueError(f"group_size must be positive; got {group_size}")


def group_partial_stats_triton(x, group_size):
    """fp32 [N, ceil(C / group_size), 3]: (count, mean, M2) of each run of group_size channels of x.

    x [N, C, H, W] in fp32/fp16/bf16, NCHW or channels_last, on CUDA (or on the CPU with
    TRITON_INTERPRET=1). Tensors past int32 offsets are computed by the PyTorch reference.
    """
    check_input(x, group_size)
    check_launchable(x, "group_partial_stats_triton")
    return launch(x, group_size)


def launch(x, group_size, wrap=None):
    """group_partial_stats of x (checked, ready for Triton). `wrap` is applied to the kernel
    before its launch (`wrap_triton` inside a triton_op)."""
    plan = plan_stats(x, group_size)
    if plan is None:
        return group_partial_stats_reference(x, group_size)
    n, c, h, w = x.shape
    groups = -(-c // group_size)
    out = torch.empty((n, groups, STATS_FIELDS), dtype=torch.float32, device=x.device)
    # x as the "cached" half of a concatenation with nothing: all channels, one piece per group.
    launch_pieces(
        (n * plan.group_blocks, 1), x, x, out,
        c, 0, c, h * w, group_size, 0, groups, plan.group_blocks, plan.k, h * w,
        x.stride(0), x.stride(1), plan.stride_hw, x.stride(0), x.stride(1), plan.stride_hw,
        wrap=wrap, CHANNEL_ALIGN=plan.channel_align, BLOCK_C=plan.block_c, BLOCK_HW=plan.block_hw, KP=plan.kp,
        num_warps=plan.num_warps,
    )
    return out


# ---- plain PyTorch ------------------------------------------------------------------------


def group_stats_torch(x, group_size, channel_offset, num_groups):
    """[N, num_groups, 3] (count, mean, M2) of x's channels in `stats_dtype`, channel i being
    channel channel_offset + i of a concatenation cut into groups of group_size channels."""
    n, c = x.shape[:2]
    like = dict(dtype=stats_dtype(x.dtype), device=x.device)
    xf = x.to(like["dtype"]).reshape(n, c, -1)
    hw = xf.shape[-1]
    ch_mean = xf.mean(-1)
    ch_m2 = (xf - ch_mean[..., None]).square().sum(-1)
    group = (torch.arange(c, device=x.device) + channel_offset) // group_size
    count = torch.zeros(num_groups, **like).index_add_(0, group, torch.full((c,), float(hw), **like))
    mean = torch.zeros(n, num_groups, **like).index_add_(1, group, ch_mean * hw) / count.clamp_min(1.0)
    dev = ch_mean - mean[:, group]
    m2 = torch.zeros(n, num_groups, **like).index_add_(1, group, ch_m2 + hw * dev.square())
    return torch.stack([count.expand(n, -1), mean, m2], dim=2)


def merge_stats(pieces):
    """(count, mean, M2) over dim -2 of pieces [..., P, 3] (Chan's formula)."""
    count, mean, m2 = pieces.unbind(-1)
    total = count.sum(-1)
    merged_mean = (count * mean).sum(-1) / total.clamp_min(1.0)
    merged_m2 = m2.sum(-1) + (count * (mean - merged_mean[..., None]).square()).sum(-1)
    return total, merged_mean, merged_m2


def group_partial_stats_reference(x, group_size):
    """Plain PyTorch `group_partial_stats`: [N, ceil(C / group_size), 3] in `stats_dtype`."""
    return group_stats_torch(x, group_size, 0, -(-x.shape[1] // group_size))
