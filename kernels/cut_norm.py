"""Fused cat + GroupNorm + SiLU for DeepCache's cut point.

At the cut point the shallow U-Net concatenates the cached deep feature with a fresh skip
feature and feeds the result to a ResnetBlock, which starts with GroupNorm -> SiLU:

    out = silu(group_norm(cat([cached, skip], dim=1), num_groups, weight, bias, eps))

The Triton path reads `cached` and `skip` in place and never materializes the concatenation.
Groups may straddle the two inputs; `cached` and `skip` may differ in layout (H and W are
merged into one `hw` axis, which covers NCHW and channels_last).

Statistics are kept as *pieces*, fp32 (count, mean, M2) triples merged with Chan's parallel
formula, so partial results from different programs, launches and even steps combine exactly.
`cached` is the same tensor on every shallow step until the next full step, so its pieces can
be computed once (`group_partial_stats`, on the full step) and passed in as `cached_stats`;
then the shallow step reads only `skip` for statistics.

Kernels (a "group block" is k consecutive groups; k > 1 only for channels_last, where the
contiguous axis is C and a tile of whole groups keeps lanes and loads full):
1. `_cut_single_pass_kernel`, grid (N * group blocks): when a group block fits one tile,
   load it once, compute exact two-pass statistics in registers, normalize, write. One
   launch; inputs read once.
2. otherwise `_cut_stats_kernel`, grid (N * group blocks of a channel window, hw splits):
   pieces of the window's groups (all channels, or only skip's when `cached_stats` is given)
   into a small fp32 workspace [N * groups, 3, splits]; then `_cut_apply_kernel`, grid
   (N * group blocks, channel chunks, hw blocks): merge the pieces (and `cached_stats`),
   normalize one tile, apply weight/bias and SiLU, write.

Launch plans (validation, block sizes, grids) are cached per input signature. Nothing is read
back to the host, so the ops can be captured in CUDA graphs; the workspace is reused per
(device, stream) outside a capture and taken from the graph's pool inside one.

Entry points:
- `cat_group_norm_silu(...)` calls the custom op `torch.ops.dcfx.cat_group_norm_silu`: Triton
  on CUDA, plain PyTorch elsewhere (so CPU-compiled graphs never trace into Triton).
- `group_partial_stats(x, group_size)` calls `torch.ops.dcfx.group_partial_stats`: the pieces
  of `x`'s channel groups, the `cached_stats` argument of the former.
- `cat_group_norm_silu_triton(...)`, `group_partial_stats_triton(...)`: the launchers (CUDA
  tensors, or CPU tensors when TRITON_INTERPRET=1).
- `cat_group_norm_silu_reference(...)`, `group_partial_stats_reference(...)`: plain PyTorch.
- `cut_traffic(...)`: the bytes and launches a call moves, from the same launch plan.

Kill switch: `DCFX_DISABLE_TRITON=1` makes the ops' CUDA kernels use plain PyTorch (read at
every call). Tensors too large for the kernels' int32 offsets also take the PyTorch path.
"""

import functools
import math
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # the ops and the references still work, the CUDA path falls back
    triton = None

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Lanes per [BLOCK_C, BLOCK_HW] tile of the two-pass path: 16 fp32 values per thread at 8 warps.
_TILE_ELEMENTS = 4096
# Largest padded group block the single-pass kernel holds in registers (32 per thread).
_SINGLE_PASS_ELEMENTS = 8192
# Most channel chunks per group (NCHW), so per-group loops stay short.
_MAX_CHANNEL_CHUNKS = 64
# channels_last tiles: at most this many groups and channels per tile.
_MAX_GROUPS_PER_TILE = 16
_MAX_TILE_CHANNELS = 256
# Fields of one statistics piece: element count, mean, sum of squared deviations (M2).
STATS_FIELDS = 3


if triton is not None:

    @triton.jit
    def _load_cat_tile(
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
    def _group_onehot(c, c_mask, g0, CHANNELS_PER_GROUP, KP: tl.constexpr):
        """[KP, BLOCK_C] bool: row j marks the channels c (masked by c_mask) of group g0 + j."""
        local = c // CHANNELS_PER_GROUP - g0
        return (tl.arange(0, KP)[:, None] == local[None, :]) & c_mask[None, :]

    @triton.jit
    def _affine_silu_store(
        centered,  # [BLOCK_C, BLOCK_HW] fp32: x - its group's mean
        rstd,  # [BLOCK_C] fp32: its group's 1 / sqrt(var + eps)
        weight_ptr,  # [C], contiguous
        bias_ptr,  # [C], contiguous
        out_ptr,  # [N, C, H, W]
        n,
        c,  # [BLOCK_C]
        c_mask,  # [BLOCK_C]
        hw,  # [BLOCK_HW]
        mask,  # [BLOCK_C, BLOCK_HW]
        stride_out_n,
        stride_out_c,
        stride_out_hw,
    ):
        """out[n, c, hw] = silu(centered * rstd * weight + bias), cast to out's dtype."""
        weight = tl.load(weight_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
        bias = tl.load(bias_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
        # Centering first keeps digits when |mean| >> std; folding the mean into the bias
        # would round them away.
        y = centered * (weight * rstd)[:, None] + bias[:, None]
        y = y / (1.0 + tl.exp(-y))
        tl.store(
            out_ptr + n * stride_out_n + c[:, None] * stride_out_c + hw[None, :] * stride_out_hw,
            y.to(out_ptr.dtype.element_ty),
            mask=mask,
        )

    @triton.jit
    def _cut_stats_kernel(
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
            # CHANNEL_ALIGN divides the group size, C1 and BLOCK_C: it lets Triton vectorize
            # loads along channels when C is the contiguous axis.
            c_lo = tl.multiple_of(c_begin + chunk * BLOCK_C, CHANNEL_ALIGN)
            c_hi = tl.minimum(c_lo + BLOCK_C, c_end)
            c = c_lo + tl.arange(0, BLOCK_C)
            c_mask = c < c_hi
            # Shift each channel by its first value in this piece: the shifted sums then stay
            # small and s2 - s1^2 / n does not cancel catastrophically in fp32.
            shift = _load_cat_tile(
                cached_ptr, skip_ptr, n, c, hw_lo + tl.arange(0, 1), c_mask[:, None], c_lo, c_hi, C1,
                stride_cached_n, stride_cached_c, stride_cached_hw,
                stride_skip_n, stride_skip_c, stride_skip_hw,
            )  # [BLOCK_C, 1]
            acc1 = tl.zeros((BLOCK_C, BLOCK_HW), dtype=tl.float32)
            acc2 = tl.zeros((BLOCK_C, BLOCK_HW), dtype=tl.float32)
            for hw_start in range(hw_lo, hw_hi, BLOCK_HW):
                hw = hw_start + tl.arange(0, BLOCK_HW)
                mask = c_mask[:, None] & (hw < hw_hi)[None, :]
                x = _load_cat_tile(
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
            onehot = _group_onehot(c, c_mask, g0, CHANNELS_PER_GROUP, KP)
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

    @triton.jit
    def _cut_apply_kernel(
        cached_ptr,  # [N, C1, H, W]
        skip_ptr,  # [N, C2, H, W]
        weight_ptr,  # [C], contiguous
        bias_ptr,  # [C], contiguous
        stats_ptr,  # [N * GW, 3, NUM_PIECES] fp32 from the stats kernel: groups G_FIRST .. G - 1
        cached_stats_ptr,  # [N, G1, 3] fp32 (count, mean, M2) of cached's channels of groups 0 .. G1 - 1
        out_ptr,  # [N, C, H, W], memory format of cached
        C1,
        C,
        HW,
        CHANNELS_PER_GROUP,
        NUM_GROUPS,
        GROUP_BLOCKS,
        K,
        G_FIRST,
        GW,
        NUM_PIECES,
        G1,
        eps,
        stride_cached_n,
        stride_cached_c,
        stride_cached_hw,
        stride_skip_n,
        stride_skip_c,
        stride_skip_hw,
        stride_out_n,
        stride_out_c,
        stride_out_hw,
        CHANNEL_ALIGN: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_HW: tl.constexpr,
        KP: tl.constexpr,
        BLOCK_P: tl.constexpr,
        HAS_CACHED_STATS: tl.constexpr,
    ):
        pid = tl.program_id(0)
        pid_c = tl.program_id(1)
        pid_hw = tl.program_id(2)
        n = pid // GROUP_BLOCKS
        g0 = (pid % GROUP_BLOCKS) * K

        # Merge each group's pieces: [KP groups, BLOCK_P pieces].
        j = tl.arange(0, KP)
        g = g0 + j
        g_valid = (j < K) & (g < NUM_GROUPS)
        p = tl.arange(0, BLOCK_P)
        row = n * GW + tl.maximum(g - G_FIRST, 0)
        piece_mask = (g_valid & (g >= G_FIRST))[:, None] & (p < NUM_PIECES)[None, :]
        offset = row[:, None] * 3 * NUM_PIECES + p[None, :]  # 3 = STATS_FIELDS
        p_count = tl.load(stats_ptr + offset, mask=piece_mask, other=0.0)
        p_mean = tl.load(stats_ptr + offset + NUM_PIECES, mask=piece_mask, other=0.0)
        p_m2 = tl.load(stats_ptr + offset + 2 * NUM_PIECES, mask=piece_mask, other=0.0)
        count = tl.sum(p_count, axis=1)
        weighted = tl.sum(p_count * p_mean, axis=1)
        if HAS_CACHED_STATS:
            cached_mask = g_valid & (g < G1)
            c_offset = (n * G1 + tl.minimum(g, G1 - 1)) * 3
            c_count = tl.load(cached_stats_ptr + c_offset, mask=cached_mask, other=0.0)
            c_mean = tl.load(cached_stats_ptr + c_offset + 1, mask=cached_mask, other=0.0)
            c_m2 = tl.load(cached_stats_ptr + c_offset + 2, mask=cached_mask, other=0.0)
            count += c_count
            mean = (weighted + c_count * c_mean) / tl.maximum(count, 1.0)
            c_dev = c_mean - mean
            m2 = c_m2 + c_count * c_dev * c_dev
        else:
            mean = weighted / tl.maximum(count, 1.0)
            m2 = tl.zeros((KP,), dtype=tl.float32)
        dev = p_mean - mean[:, None]
        m2 += tl.sum(p_m2 + p_count * dev * dev, axis=1)
        rstd = tl.math.rsqrt(m2 / tl.maximum(count, 1.0) + eps)

        # This program's channels: chunk pid_c of the group block.
        c_lo = tl.multiple_of(g0 * CHANNELS_PER_GROUP + pid_c * BLOCK_C, CHANNEL_ALIGN)
        c_hi = tl.minimum(c_lo + BLOCK_C, tl.minimum((g0 + K) * CHANNELS_PER_GROUP, C))
        c = c_lo + tl.arange(0, BLOCK_C)
        c_mask = c < c_hi
        onehot = _group_onehot(c, c_mask, g0, CHANNELS_PER_GROUP, KP)
        mean_c = tl.sum(tl.where(onehot, mean[:, None], 0.0), axis=0)
        rstd_c = tl.sum(tl.where(onehot, rstd[:, None], 0.0), axis=0)

        hw = pid_hw * BLOCK_HW + tl.arange(0, BLOCK_HW)
        mask = c_mask[:, None] & (hw < HW)[None, :]
        x = _load_cat_tile(
            cached_ptr, skip_ptr, n, c, hw, mask, c_lo, c_hi, C1,
            stride_cached_n, stride_cached_c, stride_cached_hw,
            stride_skip_n, stride_skip_c, stride_skip_hw,
        )
        _affine_silu_store(
            x - mean_c[:, None], rstd_c, weight_ptr, bias_ptr, out_ptr, n, c, c_mask, hw, mask,
            stride_out_n, stride_out_c, stride_out_hw,
        )

    @triton.jit
    def _cut_single_pass_kernel(
        cached_ptr,  # [N, C1, H, W]
        skip_ptr,  # [N, C2, H, W]
        weight_ptr,  # [C], contiguous
        bias_ptr,  # [C], contiguous
        out_ptr,  # [N, C, H, W], memory format of cached
        C1,
        C,
        HW,
        CHANNELS_PER_GROUP,
        GROUP_BLOCKS,
        K,
        eps,
        stride_cached_n,
        stride_cached_c,
        stride_cached_hw,
        stride_skip_n,
        stride_skip_c,
        stride_skip_hw,
        stride_out_n,
        stride_out_c,
        stride_out_hw,
        CHANNEL_ALIGN: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_HW: tl.constexpr,
        KP: tl.constexpr,
    ):
        # Program: all of groups g0 .. g0 + K - 1 of sample n in one tile.
        pid = tl.program_id(0)
        n = pid // GROUP_BLOCKS
        g0 = (pid % GROUP_BLOCKS) * K
        c_lo = tl.multiple_of(g0 * CHANNELS_PER_GROUP, CHANNEL_ALIGN)
        c_hi = tl.minimum(c_lo + K * CHANNELS_PER_GROUP, C)
        c = c_lo + tl.arange(0, BLOCK_C)
        c_mask = c < c_hi
        hw = tl.arange(0, BLOCK_HW)
        mask = c_mask[:, None] & (hw < HW)[None, :]
        x = _load_cat_tile(
            cached_ptr, skip_ptr, n, c, hw, mask, c_lo, c_hi, C1,
            stride_cached_n, stride_cached_c, stride_cached_hw,
            stride_skip_n, stride_skip_c, stride_skip_hw,
        )
        # Exact two-pass statistics: the data is in registers already.
        onehot = _group_onehot(c, c_mask, g0, CHANNELS_PER_GROUP, KP)
        count = tl.maximum(tl.sum(onehot.to(tl.float32), axis=1) * HW, 1.0)
        mean = tl.sum(tl.where(onehot, tl.sum(x, axis=1)[None, :], 0.0), axis=1) / count
        mean_c = tl.sum(tl.where(onehot, mean[:, None], 0.0), axis=0)
        d = tl.where(mask, x - mean_c[:, None], 0.0)
        var = tl.sum(tl.where(onehot, tl.sum(d * d, axis=1)[None, :], 0.0), axis=1) / count
        rstd_c = tl.sum(tl.where(onehot, tl.math.rsqrt(var + eps)[:, None], 0.0), axis=0)
        _affine_silu_store(
            d, rstd_c, weight_ptr, bias_ptr, out_ptr, n, c, c_mask, hw, mask,
            stride_out_n, stride_out_c, stride_out_hw,
        )


# ---- validation ----------------------------------------------------------------------------


def _check_inputs(cached, skip, weight, bias, num_groups, cached_stats=None):
    """Raise ValueError unless the arguments describe a valid cat + group_norm."""
    if cached.dim() != 4 or skip.dim() != 4:
        raise ValueError(
            f"cached and skip must be 4-D [N, C, H, W]; got {tuple(cached.shape)} and {tuple(skip.shape)}"
        )
    n1, c1, h1, w1 = cached.shape
    n2, c2, h2, w2 = skip.shape
    if (n1, h1, w1) != (n2, h2, w2):
        raise ValueError(
            f"cached and skip must agree in N, H, W; got cached {tuple(cached.shape)}, skip {tuple(skip.shape)}"
        )
    if cached.dtype != skip.dtype or weight.dtype != cached.dtype or bias.dtype != cached.dtype:
        raise ValueError(
            "cached, skip, weight and bias must share one dtype; got "
            f"{cached.dtype}, {skip.dtype}, {weight.dtype}, {bias.dtype}"
        )
    if not (cached.device == skip.device == weight.device == bias.device):
        raise ValueError(
            "cached, skip, weight and bias must be on one device; got "
            f"{cached.device}, {skip.device}, {weight.device}, {bias.device}"
        )
    channels = c1 + c2
    if weight.shape != (channels,) or bias.shape != (channels,):
        raise ValueError(
            f"weight and bias must have shape ({channels},) = C1 + C2; "
            f"got {tuple(weight.shape)} and {tuple(bias.shape)}"
        )
    if num_groups <= 0 or channels % num_groups != 0:
        raise ValueError(f"num_groups must be positive and divide C1 + C2 = {channels}; got {num_groups}")
    if cached_stats is not None:
        expected = (n1, -(-c1 // (channels // num_groups)), STATS_FIELDS)
        dtype = _stats_dtype(cached.dtype)
        if tuple(cached_stats.shape) != expected or cached_stats.dtype != dtype or cached_stats.device != cached.device:
            raise ValueError(
                f"cached_stats must be group_partial_stats(cached, C // num_groups): {dtype} {expected} "
                f"on {cached.device}; got {cached_stats.dtype} {tuple(cached_stats.shape)} on {cached_stats.device}"
            )


def _stats_dtype(dtype):
    """Statistics are fp32, or float64 for float64 inputs (the PyTorch path keeps their precision)."""
    return torch.promote_types(dtype, torch.float32)


def _check_stats_input(x, group_size):
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D [N, C, H, W]; got {tuple(x.shape)}")
    if group_size <= 0:
        raise ValueError(f"group_size must be positive; got {group_size}")


# ---- launch plans ------------------------------------------------------------------------


def _output_memory_format(cached):
    """channels_last when cached is (unambiguously) channels_last, else contiguous."""
    if not cached.is_contiguous() and cached.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _hw_stride(shape, stride):
    """Stride of the merged H*W axis of a 4-D tensor, or None if H and W do not merge."""
    _, _, h, w = shape
    _, _, stride_h, stride_w = stride
    if w == 1:
        return stride_h
    if h == 1 or stride_h == w * stride_w:
        return stride_w
    return None


def _max_offset(shape, stride):
    return sum((size - 1) * abs(s) for size, s in zip(shape, stride))


def _interpreting():
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@functools.lru_cache(maxsize=None)
def _target_programs(device):
    """Programs per launch to aim for: a few per SM fill the GPU with bytes in flight."""
    if device.type == "cuda":
        return 8 * torch.cuda.get_device_properties(device).multi_processor_count
    return 16  # the interpreter runs programs one by one: keep few


def _next_power_of_2(x):
    return 1 << (x - 1).bit_length()


def _groups_per_tile(channels_per_group, num_groups, channels_contiguous, limit):
    """k: whole groups per tile. channels_last reads C contiguously, so a tile of k whole groups
    whose channel count just fits a power of 2 keeps lanes busy (20-channel groups: k = 3 fills
    60 of 64 lanes where one group fills 20 of 32) and rows of loads long."""
    if not channels_contiguous:
        return 1
    best = (0.0, 1)
    for k in range(1, min(_MAX_GROUPS_PER_TILE, num_groups) + 1):
        lanes = _next_power_of_2(k * channels_per_group)
        if lanes > limit and k > 1:
            break
        useful = round(k * channels_per_group / lanes, 2)
        best = max(best, (useful, k))
    return best[1]


def _pick_blocks(channels_per_group, hw, channels_contiguous):
    """(BLOCK_C, BLOCK_HW) for two-pass tiles of one group: few wasted lanes, ~_TILE_ELEMENTS."""
    max_c = min(_next_power_of_2(channels_per_group), 64)
    if channels_contiguous:
        candidates = [max_c]
    else:
        # NCHW: rows along hw are contiguous, so narrow channel chunks cost nothing and
        # avoid padding non-power-of-2 groups (20 channels -> chunks of 4, not one of 32).
        candidates = [1 << i for i in range(max_c.bit_length())]
        candidates = [b for b in candidates if -(-channels_per_group // b) <= _MAX_CHANNEL_CHUNKS] or [max_c]

    def block_hw(b):
        return min(_next_power_of_2(hw), max(_TILE_ELEMENTS // b, 16))

    def score(b):
        padded = -(-channels_per_group // b) * b * -(-hw // block_hw(b)) * block_hw(b)
        useful = channels_per_group * hw / padded
        fill = min(1.0, b * block_hw(b) / _TILE_ELEMENTS)
        return (useful * fill, b)

    b = max(candidates, key=score)
    return b, block_hw(b)


@dataclass(frozen=True)
class _CutPlan:
    """How one input signature is launched (see _cut_plan)."""

    fallback: bool  # offsets past int32: plain PyTorch instead
    memory_format: torch.memory_format
    strides: tuple  # cached (n, c, hw), skip (n, c, hw), out (n, c, hw)
    single_pass: bool
    channel_align: int
    block_c: int
    block_hw: int
    k: int  # groups per group block
    kp: int  # next power of 2 of k
    group_blocks: int  # apply / single pass: group blocks per sample
    channel_chunks: int  # apply: chunks per group block
    hw_blocks: int
    num_warps: int
    # two-pass statistics over channels [c_lo, C): groups g_first .. G - 1
    c_lo: int
    g_first: int
    stats_group_blocks: int
    hw_splits: int
    hw_per_split: int
    g1: int  # groups that cached_stats covers (1 when unused)


def _common_align(*sizes, element_size):
    # A power of 2 dividing every chunk boundary, capped at 16 bytes.
    return math.gcd(*sizes, 16 // element_size)


@functools.lru_cache(maxsize=256)
def _cut_plan(
    n, c1, c2, h, w, cached_stride, skip_stride, element_size, num_groups, with_stats, target_programs,
    channels_last,
):
    """The launch plan of cat_group_norm_silu for one input signature (cached per signature)."""
    channels, hw = c1 + c2, h * w
    cpg = channels // num_groups
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    out_stride = (
        _channels_last_strides(n, channels, h, w) if memory_format is torch.channels_last
        else _contiguous_strides(n, channels, h, w)
    )
    out_shape = (n, channels, h, w)
    fallback = any(
        _max_offset(shape, stride) >= 2**31
        for shape, stride in (((n, c1, h, w), cached_stride), ((n, c2, h, w), skip_stride), (out_shape, out_stride))
    )
    strides = (
        cached_stride[0], cached_stride[1], _hw_stride((n, c1, h, w), cached_stride),
        skip_stride[0], skip_stride[1], _hw_stride((n, c2, h, w), skip_stride),
        out_stride[0], out_stride[1], _hw_stride(out_shape, out_stride),
    )
    channels_contiguous = out_stride[1] == 1 and channels > 1
    g1 = -(-c1 // cpg) if with_stats else 1
    common = dict(fallback=fallback, memory_format=memory_format, strides=strides, g1=g1)

    # Single pass when a group block fits one tile.
    hw_pad = _next_power_of_2(hw)
    k = _groups_per_tile(cpg, num_groups, channels_contiguous, max(_SINGLE_PASS_ELEMENTS // hw_pad, 1))
    block_c = _next_power_of_2(k * cpg)
    if block_c * hw_pad <= _SINGLE_PASS_ELEMENTS:
        return _CutPlan(
            **common, single_pass=True, channel_align=_common_align(cpg, c1, block_c, element_size=element_size),
            block_c=block_c, block_hw=hw_pad, k=k, kp=_next_power_of_2(k), group_blocks=-(-num_groups // k),
            channel_chunks=1, hw_blocks=1, num_warps=max(1, min(8, block_c * hw_pad // 512)),
            c_lo=0, g_first=0, stats_group_blocks=0, hw_splits=0, hw_per_split=0,
        )

    k = _groups_per_tile(cpg, num_groups, channels_contiguous, _MAX_TILE_CHANNELS)
    if k > 1:
        block_c = _next_power_of_2(k * cpg)
        block_hw = min(hw_pad, max(_TILE_ELEMENTS // block_c, 16))
    else:
        block_c, block_hw = _pick_blocks(cpg, hw, channels_contiguous)
    channel_chunks = -(-(k * cpg) // block_c)
    hw_blocks = -(-hw // block_hw)
    # Statistics over every channel, or only skip's when cached's pieces come precomputed.
    c_lo = c1 if with_stats else 0
    g_first = c_lo // cpg
    stats_group_blocks = -(-(num_groups - g_first) // k)
    # Split each group's statistics over enough programs to fill the device; each program
    # loops over hw_per_split positions.
    base = n * stats_group_blocks
    hw_splits = min(hw_blocks, max(1, -(-target_programs // base)))
    hw_per_split = -(-hw_blocks // hw_splits) * block_hw
    hw_splits = -(-hw // hw_per_split)
    return _CutPlan(
        **common, single_pass=False, channel_align=_common_align(cpg, c1, block_c, element_size=element_size),
        block_c=block_c, block_hw=block_hw, k=k, kp=_next_power_of_2(k), group_blocks=-(-num_groups // k),
        channel_chunks=channel_chunks, hw_blocks=hw_blocks,
        num_warps=max(1, min(8, block_c * block_hw // 512)),
        c_lo=c_lo, g_first=g_first, stats_group_blocks=stats_group_blocks,
        hw_splits=hw_splits, hw_per_split=hw_per_split,
    )


def _contiguous_strides(n, c, h, w):
    return (c * h * w, h * w, w, 1)


def _channels_last_strides(n, c, h, w):
    return (h * w * c, 1, w * c, c)


# Workspaces for the statistics pieces, reused per (device, stream, size): launches on one
# stream run in order, so reuse is race-free; inside a CUDA-graph capture a fresh tensor comes
# from the graph's private pool instead (its address is baked into the graph).
_WORKSPACES: dict = {}


def _workspace(numel, device):
    if device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return torch.empty(numel, dtype=torch.float32, device=device)
    key = (device, torch.cuda.current_stream(device).cuda_stream, numel)
    ws = _WORKSPACES.get(key)
    if ws is None:
        ws = _WORKSPACES[key] = torch.empty(numel, dtype=torch.float32, device=device)
    return ws


def _plan_for(cached, skip, num_groups, with_stats):
    n, c1, h, w = cached.shape
    return _cut_plan(
        n, c1, skip.shape[1], h, w, tuple(cached.stride()), tuple(skip.stride()), cached.element_size(),
        num_groups, with_stats, _target_programs(cached.device),
        _output_memory_format(cached) is torch.channels_last,
    )


def _as_is(kernel):
    return kernel


def _launch_cut(plan, cached, skip, weight, bias, num_groups, eps, cached_stats, wrap=_as_is, workspace=None):
    """Run the planned kernels (inputs already checked). `wrap` is applied to each kernel
    before its launch (`wrap_triton` inside a triton_op); `workspace(numel, device)` gives the
    statistics workspace (default: the reused one)."""
    n, c1, h, w = cached.shape
    channels, hw = c1 + skip.shape[1], h * w
    cpg = channels // num_groups
    out = torch.empty((n, channels, h, w), dtype=cached.dtype, device=cached.device, memory_format=plan.memory_format)
    if out.numel() == 0:
        return out
    weight, bias = weight.contiguous(), bias.contiguous()
    if plan.single_pass:
        wrap(_cut_single_pass_kernel)[(n * plan.group_blocks,)](
            cached, skip, weight, bias, out,
            c1, channels, hw, cpg, plan.group_blocks, plan.k, eps, *plan.strides,
            CHANNEL_ALIGN=plan.channel_align, BLOCK_C=plan.block_c, BLOCK_HW=plan.block_hw, KP=plan.kp,
            num_warps=plan.num_warps,
        )
        return out
    gw = num_groups - plan.g_first
    stats = (workspace or _workspace)(n * gw * STATS_FIELDS * plan.hw_splits, cached.device)
    wrap(_cut_stats_kernel)[(n * plan.stats_group_blocks, plan.hw_splits)](
        cached, skip, stats,
        c1, plan.c_lo, channels, hw, cpg, plan.g_first, gw, plan.stats_group_blocks, plan.k, plan.hw_per_split,
        *plan.strides[:6],
        CHANNEL_ALIGN=plan.channel_align, BLOCK_C=plan.block_c, BLOCK_HW=plan.block_hw, KP=plan.kp,
        num_warps=plan.num_warps,
    )
    has_cached = cached_stats is not None
    wrap(_cut_apply_kernel)[(n * plan.group_blocks, plan.channel_chunks, plan.hw_blocks)](
        cached, skip, weight, bias, stats, cached_stats if has_cached else stats, out,
        c1, channels, hw, cpg, num_groups, plan.group_blocks, plan.k, plan.g_first, gw, plan.hw_splits,
        plan.g1, eps, *plan.strides,
        CHANNEL_ALIGN=plan.channel_align, BLOCK_C=plan.block_c, BLOCK_HW=plan.block_hw, KP=plan.kp,
        BLOCK_P=_next_power_of_2(plan.hw_splits), HAS_CACHED_STATS=has_cached, num_warps=plan.num_warps,
    )
    return out


def _triton_ready(t, name):
    """Raise unless t can go to the Triton launchers (dtype, device, mergeable H and W)."""
    if triton is None:
        raise ValueError(f"{name} needs triton, which is not importable")
    if t.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"dtype must be one of {_SUPPORTED_DTYPES}; got {t.dtype}")
    if t.device.type != "cuda" and not _interpreting():
        raise ValueError(f"tensors must be on CUDA (or set TRITON_INTERPRET=1); got {t.device}")
    if _hw_stride(t.shape, t.stride()) is None:
        raise ValueError(
            "inputs need H and W mergeable into one axis (contiguous or channels_last); "
            f"got strides {t.stride()}"
        )


def cat_group_norm_silu_triton(cached, skip, weight, bias, num_groups, eps=1e-5, cached_stats=None):
    """silu(group_norm(cat([cached, skip], 1), num_groups, weight, bias, eps)) with Triton.

    cached [N, C1, H, W] and skip [N, C2, H, W] (fp32/fp16/bf16, NCHW or channels_last each),
    weight and bias [C1 + C2] in the same dtype. Statistics in fp32. `cached_stats`, if given,
    must be `group_partial_stats(cached, (C1 + C2) // num_groups)`; then only skip is read for
    statistics. Returns [N, C1 + C2, H, W] in the input dtype and the memory format of
    `cached`. Tensors past int32 offsets are computed by the PyTorch reference.
    """
    _check_inputs(cached, skip, weight, bias, num_groups, cached_stats)
    _triton_ready(cached, "cat_group_norm_silu_triton")
    _triton_ready(skip, "cat_group_norm_silu_triton")
    plan = _plan_for(cached, skip, num_groups, cached_stats is not None)
    if plan.fallback:
        return cat_group_norm_silu_reference(cached, skip, weight, bias, num_groups, eps, cached_stats)
    return _launch_cut(plan, cached, skip, weight, bias, num_groups, eps, cached_stats)


def group_partial_stats_triton(x, group_size):
    """fp32 [N, ceil(C / group_size), 3]: (count, mean, M2) of each run of group_size channels of x."""
    _check_stats_input(x, group_size)
    _triton_ready(x, "group_partial_stats_triton")
    return _launch_stats(x, group_size)


def _launch_stats(x, group_size, wrap=_as_is):
    """`group_partial_stats` of x (checked, ready for Triton); `wrap` as for `_launch_cut`."""
    n, c, h, w = x.shape
    hw, groups = h * w, -(-c // group_size)
    if x.numel() == 0 or _max_offset(x.shape, x.stride()) >= 2**31:
        return group_partial_stats_reference(x, group_size)
    # The statistics kernel over x as the "cached" half of a concatenation with nothing, one
    # piece per group: this runs once per full step, so one program per group block is plenty.
    channels_contiguous = x.stride(1) == 1 and c > 1
    k = _groups_per_tile(group_size, groups, channels_contiguous, _MAX_TILE_CHANNELS)
    block_c = _next_power_of_2(k * group_size) if k > 1 else _pick_blocks(group_size, hw, channels_contiguous)[0]
    block_hw = min(_next_power_of_2(hw), max(_TILE_ELEMENTS // block_c, 16))
    group_blocks = -(-groups // k)
    out = torch.empty((n, groups, STATS_FIELDS), dtype=torch.float32, device=x.device)
    stride_hw = _hw_stride(x.shape, x.stride())
    wrap(_cut_stats_kernel)[(n * group_blocks, 1)](
        x, x, out,
        c, 0, c, hw, group_size, 0, groups, group_blocks, k, hw,
        x.stride(0), x.stride(1), stride_hw, x.stride(0), x.stride(1), stride_hw,
        CHANNEL_ALIGN=_common_align(group_size, c, block_c, element_size=x.element_size()),
        BLOCK_C=block_c, BLOCK_HW=block_hw, KP=_next_power_of_2(k),
        num_warps=max(1, min(8, block_c * block_hw // 512)),
    )
    return out


# ---- plain PyTorch ------------------------------------------------------------------------


def _group_stats_torch(x, group_size, channel_offset, num_groups):
    """fp32 [N, num_groups, 3] (count, mean, M2) of x's channels, channel i being channel
    channel_offset + i of a concatenation cut into groups of group_size channels."""
    n, c = x.shape[:2]
    like = dict(dtype=_stats_dtype(x.dtype), device=x.device)
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


def group_partial_stats_reference(x, group_size):
    """Plain PyTorch `group_partial_stats`."""
    return _group_stats_torch(x, group_size, 0, -(-x.shape[1] // group_size))


def cat_group_norm_silu_reference(cached, skip, weight, bias, num_groups, eps=1e-5, cached_stats=None):
    """Plain PyTorch, output in the memory format of cached.

    Without `cached_stats`: torch.cat + F.group_norm + F.silu. With: the group statistics are
    `cached_stats` merged with skip's (so stale statistics show in the result, as they would
    in the kernel), then the same normalization in fp32.
    """
    if cached_stats is None:
        out = F.silu(F.group_norm(torch.cat([cached, skip], dim=1), num_groups, weight, bias, eps))
        return out.contiguous(memory_format=_output_memory_format(cached))
    n, c1, h, w = cached.shape
    channels = c1 + skip.shape[1]
    skip_stats = _group_stats_torch(skip, channels // num_groups, c1, num_groups)
    cached_part = F.pad(cached_stats, (0, 0, 0, num_groups - cached_stats.shape[1]))
    count, mean, m2 = _merge_stats(torch.stack([cached_part, skip_stats], dim=2))
    rstd = torch.rsqrt(m2 / count + eps)
    compute = cached_stats.dtype
    x = torch.cat([cached, skip], dim=1).to(compute).reshape(n, num_groups, -1)
    y = ((x - mean[..., None]) * rstd[..., None]).reshape(n, channels, h, w)
    y = y * weight.to(compute)[:, None, None] + bias.to(compute)[:, None, None]
    return F.silu(y).to(cached.dtype).contiguous(memory_format=_output_memory_format(cached))


def _merge_stats(pieces):
    """(count, mean, M2) over dim -2 of pieces [..., P, 3] (Chan's formula)."""
    count, mean, m2 = pieces.unbind(-1)
    total = count.sum(-1)
    merged_mean = (count * mean).sum(-1) / total.clamp_min(1.0)
    merged_m2 = m2.sum(-1) + (count * (mean - merged_mean[..., None]).square()).sum(-1)
    return total, merged_mean, merged_m2


# ---- custom ops ---------------------------------------------------------------------------


def _triton_disabled():
    """Kill switch: DCFX_DISABLE_TRITON=1 routes the CUDA kernels to the reference."""
    return os.environ.get("DCFX_DISABLE_TRITON", "0") == "1"


# Explicit schemas: inferred hints would make num_groups a SymInt.
@torch.library.custom_op(
    "dcfx::cat_group_norm_silu",
    mutates_args=(),
    schema=(
        "(Tensor cached, Tensor skip, Tensor weight, Tensor bias, int num_groups, float eps, "
        "Tensor? cached_stats=None) -> Tensor"
    ),
)
def _cat_group_norm_silu_op(cached, skip, weight, bias, num_groups, eps, cached_stats=None):
    _check_inputs(cached, skip, weight, bias, num_groups, cached_stats)
    return cat_group_norm_silu_reference(cached, skip, weight, bias, num_groups, eps, cached_stats)


@_cat_group_norm_silu_op.register_kernel("cuda")
def _cat_group_norm_silu_cuda(cached, skip, weight, bias, num_groups, eps, cached_stats=None):
    return _cut_on_device(cached, skip, weight, bias, num_groups, eps, cached_stats)


def _cut_on_device(cached, skip, weight, bias, num_groups, eps, cached_stats, wrap=_as_is, workspace=None):
    """The ops' CUDA path: Triton kernels (launched through `wrap`), or the reference."""
    _check_inputs(cached, skip, weight, bias, num_groups, cached_stats)
    if triton is None or _triton_disabled() or cached.dtype not in _SUPPORTED_DTYPES:
        return cat_group_norm_silu_reference(cached, skip, weight, bias, num_groups, eps, cached_stats)
    # Layouts whose H and W do not merge are rare here; one copy makes them NCHW.
    if _hw_stride(cached.shape, cached.stride()) is None:
        cached = cached.contiguous()
    if _hw_stride(skip.shape, skip.stride()) is None:
        skip = skip.contiguous()
    plan = _plan_for(cached, skip, num_groups, cached_stats is not None)
    if plan.fallback:
        return cat_group_norm_silu_reference(cached, skip, weight, bias, num_groups, eps, cached_stats)
    return _launch_cut(plan, cached, skip, weight, bias, num_groups, eps, cached_stats, wrap, workspace)


@_cat_group_norm_silu_op.register_fake
def _cat_group_norm_silu_fake(cached, skip, weight, bias, num_groups, eps, cached_stats=None):
    _check_inputs(cached, skip, weight, bias, num_groups, cached_stats)
    n, c1, h, w = cached.shape
    return torch.empty(
        (n, c1 + skip.shape[1], h, w), dtype=cached.dtype, device=cached.device,
        memory_format=_output_memory_format(cached),
    )


def _setup_backward(ctx, inputs, output):
    cached, skip, weight, bias, num_groups, eps, _ = inputs
    ctx.save_for_backward(cached, skip, weight, bias)
    ctx.num_groups, ctx.eps = num_groups, eps


def _backward(ctx, grad):
    # Recompute through the reference: DeepCache is inference-first, and this keeps the
    # gradient exactly that of cat + group_norm + silu (cached_stats are taken as what they
    # must be, statistics of cached, so they get no gradient of their own).
    inputs = [t.detach().requires_grad_(needs) for t, needs in zip(ctx.saved_tensors, ctx.needs_input_grad)]
    with torch.enable_grad():
        out = cat_group_norm_silu_reference(*inputs, ctx.num_groups, ctx.eps)
        wanted = [t for t in inputs if t.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, grad) if wanted else ())
    return (*(next(grads) if t.requires_grad else None for t in inputs), None, None, None)


_cat_group_norm_silu_op.register_autograd(_backward, setup_context=_setup_backward)


@torch.library.custom_op(
    "dcfx::group_partial_stats", mutates_args=(), schema="(Tensor x, int group_size) -> Tensor"
)
def _group_partial_stats_op(x, group_size):
    _check_stats_input(x, group_size)
    return group_partial_stats_reference(x, group_size)


@_group_partial_stats_op.register_kernel("cuda")
def _group_partial_stats_cuda(x, group_size):
    return _stats_on_device(x, group_size)


def _stats_on_device(x, group_size, wrap=_as_is):
    _check_stats_input(x, group_size)
    if triton is None or _triton_disabled() or x.dtype not in _SUPPORTED_DTYPES:
        return group_partial_stats_reference(x, group_size)
    if _hw_stride(x.shape, x.stride()) is None:
        x = x.contiguous()
    return _launch_stats(x, group_size, wrap)


@_group_partial_stats_op.register_fake
def _group_partial_stats_fake(x, group_size):
    _check_stats_input(x, group_size)
    return x.new_empty((x.shape[0], -(-x.shape[1] // group_size), STATS_FIELDS), dtype=_stats_dtype(x.dtype))


# ---- the same ops for inductor on CUDA (torch.library.triton_op) ---------------------------
#
# The custom ops above are opaque to inductor: a compiled graph calls them, and through them
# the Triton launchers, from Python. These twins run the same kernels through `wrap_triton`,
# so inductor sees each kernel and launches it from its own generated code. dcfx puts them
# into CUDA graphs it compiles (`inductor_ops`); CPU graphs keep the custom ops, and on other
# devices the twins run the reference, which never touches Triton (inductor traces that
# branch on a machine without a GPU too). Not run on a GPU yet: tests/test_kernel_cut_norm.py
# has the CUDA test.


def _fresh_workspace(numel, device):
    # Inside a traced op the workspace must be the op's own allocation.
    return torch.empty(numel, dtype=torch.float32, device=device)


def _visible_cut(
    cached: torch.Tensor, skip: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, num_groups: int,
    eps: float, cached_stats: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    if cached.device.type != "cuda":
        _check_inputs(cached, skip, weight, bias, num_groups, cached_stats)
        return cat_group_norm_silu_reference(cached, skip, weight, bias, num_groups, eps, cached_stats)
    return _cut_on_device(cached, skip, weight, bias, num_groups, eps, cached_stats, _wrap_triton, _fresh_workspace)


def _visible_stats(x: torch.Tensor, group_size: int) -> torch.Tensor:
    if x.device.type != "cuda":
        _check_stats_input(x, group_size)
        return group_partial_stats_reference(x, group_size)
    return _stats_on_device(x, group_size, _wrap_triton)


# custom op overload -> its triton_op twin (empty without triton). The twins' schemas are
# inferred from the annotations above (num_groups a SymInt: dcfx compiles static shapes).
INDUCTOR_OPS = {}
if triton is not None:
    from torch.library import triton_op
    from torch.library import wrap_triton as _wrap_triton

    triton_op("dcfx::cat_group_norm_silu_inductor", _visible_cut, mutates_args=()).register_autograd(
        _backward, setup_context=_setup_backward
    )
    triton_op("dcfx::group_partial_stats_inductor", _visible_stats, mutates_args=())
    INDUCTOR_OPS = {
        torch.ops.dcfx.cat_group_norm_silu.default: torch.ops.dcfx.cat_group_norm_silu_inductor.default,
        torch.ops.dcfx.group_partial_stats.default: torch.ops.dcfx.group_partial_stats_inductor.default,
    }


def cat_group_norm_silu(cached, skip, weight, bias, num_groups, eps=1e-5, cached_stats=None):
    """silu(group_norm(cat([cached, skip], 1), ...)) via torch.ops.dcfx.cat_group_norm_silu.

    `cached_stats = group_partial_stats(cached, (C1 + C2) // num_groups)`, computed once while
    `cached` stays the same, spares every call the statistics reads of `cached`.
    """
    return torch.ops.dcfx.cat_group_norm_silu(cached, skip, weight, bias, num_groups, eps, cached_stats)


def group_partial_stats(x, group_size):
    """(count, mean, M2) per run of group_size channels of x, [N, ceil(C / group_size), 3] in fp32
    (float64 for float64 x)."""
    return torch.ops.dcfx.group_partial_stats(x, group_size)


# ---- traffic model ------------------------------------------------------------------------


@dataclass(frozen=True)
class Traffic:
    """Bytes one call moves through DRAM (no L2 reuse assumed) and its kernel launches."""

    read_bytes: int
    write_bytes: int
    launches: int
    ideal_bytes: int  # read both inputs once, write the output once

    @property
    def bytes(self):
        return self.read_bytes + self.write_bytes

    def seconds(self, bandwidth, launch_seconds=0.0):
        return self.bytes / bandwidth + self.launches * launch_seconds

    def copy_fraction(self, bandwidth, launch_seconds=0.0):
        """Fraction of copy bandwidth at which the ideal bytes move, if the kernel moves its own
        bytes at `bandwidth` (the README's % copy metric)."""
        return self.ideal_bytes / bandwidth / self.seconds(bandwidth, launch_seconds)


def cut_traffic(n, c1, c2, h, w, element_size, num_groups=32, cached_stats=True, target_programs=1056, before=False):
    """Traffic of one cat_group_norm_silu call from its launch plan (1056 programs: an H100's
    132 SMs x 8). `before=True` gives the previous design's: statistics of both inputs, then
    apply, always two launches."""
    channels, hw = c1 + c2, h * w
    ideal = n * channels * hw * element_size * 2
    if before:
        return Traffic(2 * n * channels * hw * element_size, n * channels * hw * element_size, 2, ideal)
    contiguous = _contiguous_strides(n, c1, h, w)
    plan = _cut_plan(
        n, c1, c2, h, w, contiguous, _contiguous_strides(n, c2, h, w), element_size, num_groups,
        cached_stats, target_programs, False,
    )
    inputs = n * channels * hw * element_size
    write = inputs
    if plan.single_pass:
        return Traffic(inputs, write, 1, ideal)
    stats_channels = channels - plan.c_lo
    gw = num_groups - plan.g_first
    pieces = n * gw * STATS_FIELDS * plan.hw_splits * 4
    cached_stats_bytes = n * plan.g1 * STATS_FIELDS * 4 if cached_stats else 0
    read = n * stats_channels * hw * element_size + inputs + pieces + cached_stats_bytes
    return Traffic(read, write + pieces, 2, ideal)
