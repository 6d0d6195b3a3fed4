"""Fused cat + GroupNorm + SiLU for DeepCache's cut point.

At the cut point the shallow U-Net concatenates the cached deep feature with a fresh skip
feature and feeds the result to a ResnetBlock, which starts with GroupNorm -> SiLU:

    out = silu(group_norm(cat([cached, skip], dim=1), num_groups, weight, bias, eps))

The kernels read `cached` and `skip` in place and never materialize the concatenation.
Groups may straddle the two inputs; `cached` and `skip` may differ in layout (H and W are
merged into one `hw` axis, which covers NCHW and channels_last). Statistics are fp32.

Two paths (`plan.py` picks one per input signature):
1. `_cat_group_norm_silu_kernel`: a group block fits one tile. Load it once, compute exact
   two-pass statistics in registers, normalize, write. One launch; inputs read once.
2. otherwise the statistics kernel of `group_partial_stats.py` writes pieces of the groups
   (all channels, or only skip's when `cached_stats` is given) into a small fp32 workspace,
   and `_cat_group_norm_silu_apply_kernel` merges them (and `cached_stats`), normalizes one
   tile, applies weight, bias and SiLU, and writes.

Nothing is read back to the host, so the kernels can be captured in CUDA graphs: the
workspace is reused per (device, stream) outside a capture and taken from the graph's pool
inside one.

Here: the kernels, `cat_group_norm_silu_triton` (the checked launcher), `launch` (the planned
launches, for the ops) and the PyTorch reference `cat_group_norm_silu_reference`.
"""

import torch
import torch.nn.functional as F

from .group_partial_stats import STATS_FIELDS, group_stats_torch, launch_pieces, merge_stats, stats_dtype
from .plan import check_launchable, next_power_of_2, output_memory_format, plan_cut
from .tiles import tl, triton

if triton is not None:
    from .tiles import group_onehot, load_cat_tile

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
    def _cat_group_norm_silu_kernel(
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
        x = load_cat_tile(
            cached_ptr, skip_ptr, n, c, hw, mask, c_lo, c_hi, C1,
            stride_cached_n, stride_cached_c, stride_cached_hw,
            stride_skip_n, stride_skip_c, stride_skip_hw,
        )
        # Exact two-pass statistics: the data is in registers already.
        onehot = group_onehot(c, c_mask, g0, CHANNELS_PER_GROUP, KP)
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

    @triton.jit
    def _cat_group_norm_silu_apply_kernel(
        cached_ptr,  # [N, C1, H, W]
        skip_ptr,  # [N, C2, H, W]
        weight_ptr,  # [C], contiguous
        bias_ptr,  # [C], contiguous
        stats_ptr,  # [N * GW, 3, NUM_PIECES] fp32 pieces of groups G_FIRST .. G - 1 (_group_partial_stats_kernel)
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
        onehot = group_onehot(c, c_mask, g0, CHANNELS_PER_GROUP, KP)
        mean_c = tl.sum(tl.where(onehot, mean[:, None], 0.0), axis=0)
        rstd_c = tl.sum(tl.where(onehot, rstd[:, None], 0.0), axis=0)

        hw = pid_hw * BLOCK_HW + tl.arange(0, BLOCK_HW)
        mask = c_mask[:, None] & (hw < HW)[None, :]
        x = load_cat_tile(
            cached_ptr, skip_ptr, n, c, hw, mask, c_lo, c_hi, C1,
            stride_cached_n, stride_cached_c, stride_cached_hw,
            stride_skip_n, stride_skip_c, stride_skip_hw,
        )
        _affine_silu_store(
            x - mean_c[:, None], rstd_c, weight_ptr, bias_ptr, out_ptr, n, c, c_mask, hw, mask,
            stride_out_n, stride_out_c, stride_out_hw,
        )


def check_inputs(cached, skip, weight, bias, num_groups, cached_stats=None):
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
        dtype = stats_dtype(cached.dtype)
        if tuple(cached_stats.shape) != expected or cached_stats.dtype != dtype or cached_stats.device != cached.device:
            raise ValueError(
                f"cached_stats must be group_partial_stats(cached, C // num_groups): {dtype} {expected} "
                f"on {cached.device}; got {cached_stats.dtype} {tuple(cached_stats.shape)} on {cached_stats.device}"
            )


def cat_group_norm_silu_triton(cached, skip, weight, bias, num_groups, eps=1e-5, cached_stats=None):
    """silu(group_norm(cat([cached, skip], 1), num_groups, weight, bias, eps)) with Triton.

    cached [N, C1, H, W] and skip [N, C2, H, W] (fp32/fp16/bf16, NCHW or channels_last each),
    weight and bias [C1 + C2] in the same dtype, on CUDA (or on the CPU with
    TRITON_INTERPRET=1). Statistics in fp32. `cached_stats`, if given, must be
    `group_partial_stats(cached, (C1 + C2) // num_groups)`; then only skip is read for
    statistics. Returns [N, C1 + C2, H, W] in the input dtype and the memory format of
    `cached`. Tensors past int32 offsets are computed by the PyTorch reference.
    """
    check_inputs(cached, skip, weight, bias, num_groups, cached_stats)
    check_launchable(cached, "cat_group_norm_silu_triton")
    check_launchable(skip, "cat_group_norm_silu_triton")
    return launch(cached, skip, weight, bias, num_groups, eps, cached_stats)


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


def launch(cached, skip, weight, bias, num_groups, eps, cached_stats, wrap=None, workspace=None):
    """The planned kernels on checked inputs, ready for Triton (the reference where the plan
    says so). `wrap` is applied to each kernel before its launch (`wrap_triton` inside a
    triton_op); `workspace(numel, device)` gives the statistics workspace (default: the
    reused one)."""
    plan = plan_cut(cached, skip, num_groups, cached_stats is not None)
    if plan.fallback:
        return cat_group_norm_silu_reference(cached, skip, weight, bias, num_groups, eps, cached_stats)
    wrap = wrap or (lambda kernel: kernel)
    n, c1, h, w = cached.shape
    channels, hw = c1 + skip.shape[1], h * w
    cpg = channels // num_groups
    out = torch.empty((n, channels, h, w), dtype=cached.dtype, device=cached.device, memory_format=plan.memory_format)
    if out.numel() == 0:
        return out
    weight, bias = weight.contiguous(), bias.contiguous()
    blocks = dict(CHANNEL_ALIGN=plan.channel_align, BLOCK_C=plan.block_c, BLOCK_HW=plan.block_hw, KP=plan.kp)
    if plan.single_pass:
        wrap(_cat_group_norm_silu_kernel)[(n * plan.group_blocks,)](
            cached, skip, weight, bias, out,
            c1, channels, hw, cpg, plan.group_blocks, plan.k, eps, *plan.strides,
            **blocks, num_warps=plan.num_warps,
        )
        return out
    gw = num_groups - plan.g_first
    stats = (workspace or _workspace)(n * gw * STATS_FIELDS * plan.hw_splits, cached.device)
    launch_pieces(
        (n * plan.stats_group_blocks, plan.hw_splits), cached, skip, stats,
        c1, plan.c_lo, channels, hw, cpg, plan.g_first, gw, plan.stats_group_blocks, plan.k, plan.hw_per_split,
        *plan.strides[:6],
        wrap=wrap, **blocks, num_warps=plan.num_warps,
    )
    has_cached = cached_stats is not None
    wrap(_cat_group_norm_silu_apply_kernel)[(n * plan.group_blocks, plan.channel_chunks, plan.hw_blocks)](
        cached, skip, weight, bias, stats, cached_stats if has_cached else stats, out,
        c1, channels, hw, cpg, num_groups, plan.group_blocks, plan.k, plan.g_first, gw, plan.hw_splits,
        plan.g1, eps, *plan.strides,
        **blocks, BLOCK_P=next_power_of_2(plan.hw_splits), HAS_CACHED_STATS=has_cached, num_warps=plan.num_warps,
    )
    return out


def cat_group_norm_silu_reference(cached, skip, weight, bias, num_groups, eps=1e-5, cached_stats=None):
    """Plain PyTorch, output in the memory format of cached.

    Without `cached_stats`: torch.cat + F.group_norm + F.silu. With: the group statistics are
    `cached_stats` merged with skip's (so stale statistics show in the result, as they would
    in the kernel), then the same normalization in fp32.
    """
    if cached_stats is None:
        out = F.silu(F.group_norm(torch.cat([cached, skip], dim=1), num_groups, weight, bias, eps))
        return out.contiguous(memory_format=output_memory_format(cached))
    n, c1, h, w = cached.shape
    channels = c1 + skip.shape[1]
    skip_stats = group_stats_torch(skip, channels // num_groups, c1, num_groups)
    cached_part = F.pad(cached_stats, (0, 0, 0, num_groups - cached_stats.shape[1]))
    count, mean, m2 = merge_stats(torch.stack([cached_part, skip_stats], dim=2))
    rstd = torch.rsqrt(m2 / count + eps)
    compute = cached_stats.dtype
    x = torch.cat([cached, skip], dim=1).to(compute).reshape(n, num_groups, -1)
    y = ((x - mean[..., None]) * rstd[..., None]).reshape(n, channels, h, w)
    y = y * weight.to(compute)[:, None, None] + bias.to(compute)[:, None, None]
    return F.silu(y).to(cached.dtype).contiguous(memory_format=output_memory_format(cached))
