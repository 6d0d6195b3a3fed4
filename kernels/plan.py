"""Launch plans for the cut kernels: which path, block sizes, tiles and grids.

A "group block" is k consecutive groups; k > 1 only for channels_last, where the contiguous
axis is C and a tile of whole groups keeps lanes and loads full.

`cat_group_norm_silu` takes one of two paths:
- single pass, grid (N * group blocks), when a group block fits one tile;
- otherwise statistics, grid (N * group blocks of a channel window, hw splits), then apply,
  grid (N * group blocks, channel chunks, hw blocks). With `cached_stats` the window is only
  skip's channels.

The plan of an input signature is cached (`cut_plan`); nothing here reads a tensor's data, so
planning never syncs with the device. Also here: what the launchers accept (dtype, device,
layout) and the layout helpers the kernels' strides come from.
"""

import functools
import math
import os
from dataclasses import dataclass

import torch

from .tiles import triton

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Lanes per [BLOCK_C, BLOCK_HW] tile of the two-pass path: 16 fp32 values per thread at 8 warps.
TILE_ELEMENTS = 4096
# Largest padded group block the single-pass kernel holds in registers (32 per thread).
SINGLE_PASS_ELEMENTS = 8192
# Most channel chunks per group (NCHW), so per-group loops stay short.
MAX_CHANNEL_CHUNKS = 64
# channels_last tiles: at most this many groups and channels per tile.
MAX_GROUPS_PER_TILE = 16
MAX_TILE_CHANNELS = 256


# ---- layouts ------------------------------------------------------------------------------


def output_memory_format(cached):
    """channels_last when cached is (unambiguously) channels_last, else contiguous."""
    if not cached.is_contiguous() and cached.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def hw_stride(shape, stride):
    """Stride of the merged H*W axis of a 4-D tensor, or None if H and W do not merge."""
    _, _, h, w = shape
    _, _, stride_h, stride_w = stride
    if w == 1:
        return stride_h
    if h == 1 or stride_h == w * stride_w:
        return stride_w
    return None


def fits_int32(shape, stride):
    """Whether every element offset of the tensor fits the kernels' int32 arithmetic."""
    return sum((size - 1) * abs(s) for size, s in zip(shape, stride)) < 2**31


def contiguous_strides(n, c, h, w):
    return (c * h * w, h * w, w, 1)


def channels_last_strides(n, c, h, w):
    return (h * w * c, 1, w * c, c)


# ---- what the launchers accept ------------------------------------------------------------


def interpreting():
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def check_launchable(t, name):
    """Raise unless t can go to the Triton launchers (dtype, device, mergeable H and W)."""
    if triton is None:
        raise ValueError(f"{name} needs triton, which is not importable")
    if t.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype must be one of {SUPPORTED_DTYPES}; got {t.dtype}")
    if t.device.type != "cuda" and not interpreting():
        raise ValueError(f"tensors must be on CUDA (or set TRITON_INTERPRET=1); got {t.device}")
    if hw_stride(t.shape, t.stride()) is None:
        raise ValueError(
            "inputs need H and W mergeable into one axis (contiguous or channels_last); "
            f"got strides {t.stride()}"
        )


# ---- block sizes --------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def target_programs(device):
    """Programs per launch to aim for: a few per SM fill the GPU with bytes in flight."""
    if device.type == "cuda":
        return 8 * torch.cuda.get_device_properties(device).multi_processor_count
    return 16  # the interpreter runs programs one by one: keep few


def next_power_of_2(x):
    return 1 << (x - 1).bit_length()


def num_warps(block_c, block_hw):
    return max(1, min(8, block_c * block_hw // 512))


def common_align(*sizes, element_size):
    """A power of 2 dividing every chunk boundary, capped at 16 bytes: lets Triton vectorize
    loads along channels when C is the contiguous axis."""
    return math.gcd(*sizes, 16 // element_size)


def groups_per_tile(channels_per_group, num_groups, channels_contiguous, limit):
    """k: whole groups per tile. channels_last reads C contiguously, so a tile of k whole groups
    whose channel count just fits a power of 2 keeps lanes busy (20-channel groups: k = 3 fills
    60 of 64 lanes where one group fills 20 of 32) and rows of loads long."""
    if not channels_contiguous:
        return 1
    best = (0.0, 1)
    for k in range(1, min(MAX_GROUPS_PER_TILE, num_groups) + 1):
        lanes = next_power_of_2(k * channels_per_group)
        if lanes > limit and k > 1:
            break
        useful = round(k * channels_per_group / lanes, 2)
        best = max(best, (useful, k))
    return best[1]


def _block_hw(block_c, hw):
    return min(next_power_of_2(hw), max(TILE_ELEMENTS // block_c, 16))


def pick_blocks(channels_per_group, hw, channels_contiguous):
    """(BLOCK_C, BLOCK_HW) for two-pass tiles of one group: few wasted lanes, ~TILE_ELEMENTS."""
    max_c = min(next_power_of_2(channels_per_group), 64)
    if channels_contiguous:
        candidates = [max_c]
    else:
        # NCHW: rows along hw are contiguous, so narrow channel chunks cost nothing and
        # avoid padding non-power-of-2 groups (20 channels -> chunks of 4, not one of 32).
        candidates = [1 << i for i in range(max_c.bit_length())]
        candidates = [b for b in candidates if -(-channels_per_group // b) <= MAX_CHANNEL_CHUNKS] or [max_c]

    def score(b):
        block_hw = _block_hw(b, hw)
        padded = -(-channels_per_group // b) * b * -(-hw // block_hw) * block_hw
        useful = channels_per_group * hw / padded
        fill = min(1.0, b * block_hw / TILE_ELEMENTS)
        return (useful * fill, b)

    b = max(candidates, key=score)
    return b, _block_hw(b, hw)


def _tile_blocks(channels_per_group, hw, k, channels_contiguous):
    """(BLOCK_C, BLOCK_HW) of a two-pass tile of k whole groups (k > 1) or one group's chunk."""
    if k > 1:
        block_c = next_power_of_2(k * channels_per_group)
        return block_c, _block_hw(block_c, hw)
    return pick_blocks(channels_per_group, hw, channels_contiguous)


# ---- plans --------------------------------------------------------------------------------


@dataclass(frozen=True)
class CutPlan:
    """How one input signature of cat_group_norm_silu is launched (see `cut_plan`)."""

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


@functools.lru_cache(maxsize=256)
def cut_plan(
    n, c1, c2, h, w, cached_stride, skip_stride, element_size, num_groups, with_stats, programs, channels_last,
):
    """The launch plan of cat_group_norm_silu for one input signature, aiming at `programs`
    programs per statistics launch (cached per signature)."""
    channels, hw = c1 + c2, h * w
    cpg = channels // num_groups
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    out_stride = (
        channels_last_strides(n, channels, h, w) if channels_last else contiguous_strides(n, channels, h, w)
    )
    out_shape = (n, channels, h, w)
    fallback = not all(
        fits_int32(shape, stride)
        for shape, stride in (((n, c1, h, w), cached_stride), ((n, c2, h, w), skip_stride), (out_shape, out_stride))
    )
    strides = (
        cached_stride[0], cached_stride[1], hw_stride((n, c1, h, w), cached_stride),
        skip_stride[0], skip_stride[1], hw_stride((n, c2, h, w), skip_stride),
        out_stride[0], out_stride[1], hw_stride(out_shape, out_stride),
    )
    channels_contiguous = out_stride[1] == 1 and channels > 1
    g1 = -(-c1 // cpg) if with_stats else 1
    common = dict(fallback=fallback, memory_format=memory_format, strides=strides, g1=g1)

    # Single pass when a group block fits one tile.
    hw_pad = next_power_of_2(hw)
    k = groups_per_tile(cpg, num_groups, channels_contiguous, max(SINGLE_PASS_ELEMENTS // hw_pad, 1))
    block_c = next_power_of_2(k * cpg)
    if block_c * hw_pad <= SINGLE_PASS_ELEMENTS:
        return CutPlan(
            **common, single_pass=True, channel_align=common_align(cpg, c1, block_c, element_size=element_size),
            block_c=block_c, block_hw=hw_pad, k=k, kp=next_power_of_2(k), group_blocks=-(-num_groups // k),
            channel_chunks=1, hw_blocks=1, num_warps=num_warps(block_c, hw_pad),
            c_lo=0, g_first=0, stats_group_blocks=0, hw_splits=0, hw_per_split=0,
        )

    k = groups_per_tile(cpg, num_groups, channels_contiguous, MAX_TILE_CHANNELS)
    block_c, block_hw = _tile_blocks(cpg, hw, k, channels_contiguous)
    channel_chunks = -(-(k * cpg) // block_c)
    hw_blocks = -(-hw // block_hw)
    # Statistics over every channel, or only skip's when cached's pieces come precomputed.
    c_lo = c1 if with_stats else 0
    g_first = c_lo // cpg
    stats_group_blocks = -(-(num_groups - g_first) // k)
    # Split each group's statistics over enough programs to fill the device; each program
    # loops over hw_per_split positions.
    base = n * stats_group_blocks
    hw_splits = min(hw_blocks, max(1, -(-programs // base)))
    hw_per_split = -(-hw_blocks // hw_splits) * block_hw
    hw_splits = -(-hw // hw_per_split)
    return CutPlan(
        **common, single_pass=False, channel_align=common_align(cpg, c1, block_c, element_size=element_size),
        block_c=block_c, block_hw=block_hw, k=k, kp=next_power_of_2(k), group_blocks=-(-num_groups // k),
        channel_chunks=channel_chunks, hw_blocks=hw_blocks, num_warps=num_warps(block_c, block_hw),
        c_lo=c_lo, g_first=g_first, stats_group_blocks=stats_group_blocks,
        hw_splits=hw_splits, hw_per_split=hw_per_split,
    )


def plan_cut(cached, skip, num_groups, with_stats):
    """`cut_plan` of these (checked) inputs on their device."""
    n, c1, h, w = cached.shape
    return cut_plan(
        n, c1, skip.shape[1], h, w, tuple(cached.stride()), tuple(skip.stride()), cached.element_size(),
        num_groups, with_stats, target_programs(cached.device),
        output_memory_format(cached) is torch.channels_last,
    )


@dataclass(frozen=True)
class StatsPlan:
    """How group_partial_stats of one tensor is launched: one program per group block and
    sample, each looping over all of hw (this runs once per full step: plenty)."""

    stride_hw: int
    channel_align: int
    block_c: int
    block_hw: int
    k: int
    kp: int
    group_blocks: int
    num_warps: int


def plan_stats(x, group_size):
    """The launch plan of group_partial_stats for x (checked, H and W mergeable), or None where
    plain PyTorch computes it instead: x empty, or offsets past int32."""
    if x.numel() == 0 or not fits_int32(x.shape, x.stride()):
        return None
    _, c, h, w = x.shape
    hw, groups = h * w, -(-c // group_size)
    channels_contiguous = x.stride(1) == 1 and c > 1
    k = groups_per_tile(group_size, groups, channels_contiguous, MAX_TILE_CHANNELS)
    block_c, block_hw = _tile_blocks(group_size, hw, k, channels_contiguous)
    return StatsPlan(
        stride_hw=hw_stride(x.shape, x.stride()),
        channel_align=common_align(group_size, c, block_c, element_size=x.element_size()),
        block_c=block_c, block_hw=block_hw, k=k, kp=next_power_of_2(k), group_blocks=-(-groups // k),
        num_warps=num_warps(block_c, block_hw),
    )
