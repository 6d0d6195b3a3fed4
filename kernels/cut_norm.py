"""Fused cat + GroupNorm + SiLU for DeepCache's cut point.

At the cut point the shallow U-Net concatenates the cached deep feature with a fresh skip
feature and feeds the result to a ResnetBlock, which starts with GroupNorm -> SiLU:

    out = silu(group_norm(cat([cached, skip], dim=1), num_groups, weight, bias, eps))

The Triton path reads `cached` and `skip` in place and never materializes the concatenation.
Groups may straddle the two inputs. Work is cut into pieces of one group: a chunk of
BLOCK_C channels times a range of spatial positions (H and W merged into one `hw` axis, which
covers NCHW and channels_last; `cached` and `skip` may differ in layout). Two launches:

1. `_cat_group_norm_silu_stats_kernel`, grid (N * G, channel chunks, hw splits): each program
   reduces its piece to (mean, M2) in fp32 (per-channel shifted sums, then merged exactly) and
   writes them to a small fp32 workspace [N * G, 2, chunks * splits].
2. `_cat_group_norm_silu_apply_kernel`, grid (N * G, channel chunks, hw blocks): each program
   merges its group's partials (Chan's parallel variance formula), then normalizes, applies
   weight/bias and SiLU to one [BLOCK_C, BLOCK_HW] tile and writes it.

The inputs are read twice and the output written once. Nothing is read back to the host, so
the op can be captured in a CUDA graph.

Entry points:
- `cat_group_norm_silu(...)` calls the custom op `torch.ops.dcfx.cat_group_norm_silu`: Triton
  on CUDA, the reference elsewhere (so CPU-compiled graphs never trace into Triton).
- `cat_group_norm_silu_triton(...)` is the launcher: CUDA tensors, or CPU tensors when
  TRITON_INTERPRET=1.
- `cat_group_norm_silu_reference(...)` is plain PyTorch: the CPU path and the test reference.

Kill switch: `DCFX_DISABLE_TRITON=1` makes the op's CUDA kernel use the reference instead
(read at every call).
"""

import functools
import math
import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # the op and the reference still work, the CUDA path falls back
    triton = None

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Lanes per [BLOCK_C, BLOCK_HW] tile: 16 fp32 values per thread at 8 warps.
_TILE_ELEMENTS = 4096
# Most channel chunks per group, so the apply kernel's merge of partials stays small.
_MAX_CHANNEL_CHUNKS = 64


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
        # Branch per program, not per element: only chunks that straddle the two inputs pay
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
    def _channel_chunk(g, pid_c, CHANNELS_PER_GROUP, CHANNEL_ALIGN: tl.constexpr, BLOCK_C: tl.constexpr):
        """Channels [c_lo, c_hi) of chunk pid_c of group g: (c_lo, c_hi, c [BLOCK_C], mask)."""
        # CHANNEL_ALIGN divides the group size and C1: telling Triton lets it vectorize
        # loads along channels when C is the contiguous axis (channels_last).
        c_lo = tl.multiple_of(g * CHANNELS_PER_GROUP + pid_c * BLOCK_C, CHANNEL_ALIGN)
        c_hi = tl.multiple_of(tl.minimum(c_lo + BLOCK_C, (g + 1) * CHANNELS_PER_GROUP), CHANNEL_ALIGN)
        c = c_lo + tl.arange(0, BLOCK_C)
        return c_lo, c_hi, c, c < c_hi

    @triton.jit
    def _cat_group_norm_silu_stats_kernel(
        cached_ptr,  # [N, C1, H, W]
        skip_ptr,  # [N, C2, H, W]
        partial_ptr,  # [N * G, 2, P] fp32, P = channel chunks * hw splits: (mean, M2) per piece
        C1,
        HW,
        CHANNELS_PER_GROUP,
        NUM_GROUPS,
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
    ):
        pid_ng = tl.program_id(0)
        pid_c = tl.program_id(1)
        pid_s = tl.program_id(2)
        n = pid_ng // NUM_GROUPS
        g = pid_ng % NUM_GROUPS

        c_lo, c_hi, c, c_mask = _channel_chunk(g, pid_c, CHANNELS_PER_GROUP, CHANNEL_ALIGN, BLOCK_C)
        hw_lo = pid_s * HW_PER_SPLIT
        hw_hi = tl.minimum(hw_lo + HW_PER_SPLIT, HW)

        # Shift each channel by its first value in this piece: the shifted sums then stay
        # small and s2 - s1^2 / n does not cancel catastrophically in fp32.
        first = hw_lo + tl.arange(0, 1)
        shift = _load_cat_tile(
            cached_ptr, skip_ptr, n, c, first, c_mask[:, None], c_lo, c_hi, C1,
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

        # Per channel: mean and M2 over the piece's hw_count positions.
        hw_count = (hw_hi - hw_lo).to(tl.float32)
        s1 = tl.sum(acc1, axis=1)
        s2 = tl.sum(acc2, axis=1)
        channel_mean = tl.sum(shift, axis=1) + s1 / hw_count
        channel_m2 = tl.maximum(s2 - s1 * s1 / hw_count, 0.0)
        # Merge the channels (equal counts) into the piece's mean and M2.
        n_channels = (c_hi - c_lo).to(tl.float32)
        mean = tl.sum(tl.where(c_mask, channel_mean, 0.0), axis=0) / n_channels
        dev = channel_mean - mean
        m2 = tl.sum(tl.where(c_mask, channel_m2 + hw_count * dev * dev, 0.0), axis=0)

        num_partials = tl.num_programs(1) * tl.num_programs(2)
        p = pid_c * tl.num_programs(2) + pid_s
        tl.store(partial_ptr + pid_ng * 2 * num_partials + p, mean)
        tl.store(partial_ptr + pid_ng * 2 * num_partials + num_partials + p, m2)

    @triton.jit
    def _cat_group_norm_silu_apply_kernel(
        cached_ptr,  # [N, C1, H, W]
        skip_ptr,  # [N, C2, H, W]
        weight_ptr,  # [C1 + C2], contiguous
        bias_ptr,  # [C1 + C2], contiguous
        partial_ptr,  # [N * G, 2, P] fp32 from the stats kernel
        out_ptr,  # [N, C1 + C2, H, W], memory format of cached
        C1,
        HW,
        CHANNELS_PER_GROUP,
        NUM_GROUPS,
        HW_PER_SPLIT,
        HW_SPLITS,
        NUM_PARTIALS,
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
        BLOCK_P: tl.constexpr,
    ):
        pid_ng = tl.program_id(0)
        pid_c = tl.program_id(1)
        pid_hw = tl.program_id(2)
        n = pid_ng // NUM_GROUPS
        g = pid_ng % NUM_GROUPS

        # Merge the group's pieces: piece p is channel chunk p // HW_SPLITS, hw split
        # p % HW_SPLITS; its count follows from the launch geometry.
        p = tl.arange(0, BLOCK_P)
        p_mask = p < NUM_PARTIALS
        p_mean = tl.load(partial_ptr + pid_ng * 2 * NUM_PARTIALS + p, mask=p_mask, other=0.0)
        p_m2 = tl.load(partial_ptr + pid_ng * 2 * NUM_PARTIALS + NUM_PARTIALS + p, mask=p_mask, other=0.0)
        p_channels = tl.minimum(BLOCK_C, CHANNELS_PER_GROUP - (p // HW_SPLITS) * BLOCK_C)
        p_hw = tl.minimum(HW_PER_SPLIT, HW - (p % HW_SPLITS) * HW_PER_SPLIT)
        p_count = tl.where(p_mask, p_channels * p_hw, 0).to(tl.float32)
        count = CHANNELS_PER_GROUP * HW * 1.0  # not .to(): ints equal to 1 arrive as constexprs
        mean = tl.sum(p_count * p_mean, axis=0) / count
        dev = p_mean - mean
        var = (tl.sum(p_m2, axis=0) + tl.sum(p_count * dev * dev, axis=0)) / count
        rstd = tl.math.rsqrt(var + eps)

        c_lo, c_hi, c, c_mask = _channel_chunk(g, pid_c, CHANNELS_PER_GROUP, CHANNEL_ALIGN, BLOCK_C)
        weight = tl.load(weight_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
        bias = tl.load(bias_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
        scale = weight * rstd

        hw = pid_hw * BLOCK_HW + tl.arange(0, BLOCK_HW)
        mask = c_mask[:, None] & (hw < HW)[None, :]
        x = _load_cat_tile(
            cached_ptr, skip_ptr, n, c, hw, mask, c_lo, c_hi, C1,
            stride_cached_n, stride_cached_c, stride_cached_hw,
            stride_skip_n, stride_skip_c, stride_skip_hw,
        )
        # (x - mean) is exact for x near the mean; folding mean into a bias would round away
        # digits when |mean| >> std.
        y = (x - mean) * scale[:, None] + bias[:, None]
        y = y / (1.0 + tl.exp(-y))
        tl.store(
            out_ptr + n * stride_out_n + c[:, None] * stride_out_c + hw[None, :] * stride_out_hw,
            y.to(out_ptr.dtype.element_ty),
            mask=mask,
        )


def _check_inputs(cached, skip, weight, bias, num_groups):
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


def _output_memory_format(cached):
    """channels_last when cached is (unambiguously) channels_last, else contiguous."""
    if not cached.is_contiguous() and cached.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _hw_stride(t):
    """Stride of the merged H*W axis of a 4-D tensor, or None if H and W do not merge."""
    _, _, h, w = t.shape
    _, _, stride_h, stride_w = t.stride()
    if w == 1:
        return stride_h
    if h == 1 or stride_h == w * stride_w:
        return stride_w
    return None


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


def _pick_blocks(channels_per_group, hw, channels_contiguous):
    """(BLOCK_C, BLOCK_HW) for tiles of one group: few wasted lanes, tiles near _TILE_ELEMENTS."""
    max_c = min(_next_power_of_2(channels_per_group), 64)
    if channels_contiguous:
        # channels_last: the contiguous axis is C, so keep whole groups in one tile.
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


def cat_group_norm_silu_triton(cached, skip, weight, bias, num_groups, eps=1e-5):
    """silu(group_norm(cat([cached, skip], 1), num_groups, weight, bias, eps)) with Triton.

    cached [N, C1, H, W] and skip [N, C2, H, W] (fp32/fp16/bf16, NCHW or channels_last each),
    weight and bias [C1 + C2] in the same dtype. Statistics in fp32. Returns [N, C1 + C2, H, W]
    in the input dtype and the memory format of `cached`.
    """
    if triton is None:
        raise ValueError("cat_group_norm_silu_triton needs triton, which is not importable")
    _check_inputs(cached, skip, weight, bias, num_groups)
    if cached.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"dtype must be one of {_SUPPORTED_DTYPES}; got {cached.dtype}")
    if cached.device.type != "cuda" and not _interpreting():
        raise ValueError(f"tensors must be on CUDA (or set TRITON_INTERPRET=1); got {cached.device}")
    stride_cached_hw = _hw_stride(cached)
    stride_skip_hw = _hw_stride(skip)
    if stride_cached_hw is None or stride_skip_hw is None:
        raise ValueError(
            "cached and skip need H and W mergeable into one axis (contiguous or channels_last); "
            f"got strides {cached.stride()} and {skip.stride()}"
        )

    n, c1, h, w = cached.shape
    c2 = skip.shape[1]
    channels, hw = c1 + c2, h * w
    out = torch.empty(
        (n, channels, h, w), dtype=cached.dtype, device=cached.device,
        memory_format=_output_memory_format(cached),
    )
    if out.numel() == 0:
        return out
    # Offsets are computed in int32 in the kernels.
    for t in (cached, skip, out):
        if sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride())) >= 2**31:
            raise ValueError(f"tensor of shape {tuple(t.shape)} is too large for 32-bit offsets")

    channels_per_group = channels // num_groups
    channels_contiguous = out.stride(1) == 1 and channels > 1
    block_c, block_hw = _pick_blocks(channels_per_group, hw, channels_contiguous)
    channel_chunks = -(-channels_per_group // block_c)
    hw_blocks = -(-hw // block_hw)
    # Split each group's statistics over enough programs to fill the device; each program
    # loops over hw_per_split positions.
    base = n * num_groups * channel_chunks
    hw_splits = min(hw_blocks, max(1, -(-_target_programs(cached.device) // base)))
    hw_per_split = -(-hw_blocks // hw_splits) * block_hw
    hw_splits = -(-hw // hw_per_split)
    num_partials = channel_chunks * hw_splits
    num_warps = max(1, min(8, block_c * block_hw // 512))
    # A power of 2 (block_c is one) dividing every chunk boundary, capped at 16 bytes.
    channel_align = math.gcd(channels_per_group, c1, block_c, 16 // cached.element_size())

    partials = torch.empty((n * num_groups, 2, num_partials), dtype=torch.float32, device=cached.device)
    strides = (
        cached.stride(0), cached.stride(1), stride_cached_hw,
        skip.stride(0), skip.stride(1), stride_skip_hw,
    )
    _cat_group_norm_silu_stats_kernel[(n * num_groups, channel_chunks, hw_splits)](
        cached, skip, partials,
        c1, hw, channels_per_group, num_groups, hw_per_split,
        *strides,
        CHANNEL_ALIGN=channel_align, BLOCK_C=block_c, BLOCK_HW=block_hw, num_warps=num_warps,
    )
    _cat_group_norm_silu_apply_kernel[(n * num_groups, channel_chunks, hw_blocks)](
        cached, skip, weight.contiguous(), bias.contiguous(), partials, out,
        c1, hw, channels_per_group, num_groups, hw_per_split, hw_splits, num_partials, eps,
        *strides,
        out.stride(0), out.stride(1), _hw_stride(out),
        CHANNEL_ALIGN=channel_align, BLOCK_C=block_c, BLOCK_HW=block_hw,
        BLOCK_P=_next_power_of_2(num_partials), num_warps=num_warps,
    )
    return out


def cat_group_norm_silu_reference(cached, skip, weight, bias, num_groups, eps=1e-5):
    """Plain PyTorch: torch.cat + F.group_norm + F.silu, output in the memory format of cached."""
    out = F.silu(F.group_norm(torch.cat([cached, skip], dim=1), num_groups, weight, bias, eps))
    return out.contiguous(memory_format=_output_memory_format(cached))


def _triton_disabled():
    """Kill switch: DCFX_DISABLE_TRITON=1 routes the CUDA kernel to the reference."""
    return os.environ.get("DCFX_DISABLE_TRITON", "0") == "1"


# Explicit schema: inferred hints would make num_groups a SymInt.
@torch.library.custom_op(
    "dcfx::cat_group_norm_silu",
    mutates_args=(),
    schema="(Tensor cached, Tensor skip, Tensor weight, Tensor bias, int num_groups, float eps) -> Tensor",
)
def _cat_group_norm_silu_op(cached, skip, weight, bias, num_groups, eps):
    _check_inputs(cached, skip, weight, bias, num_groups)
    return cat_group_norm_silu_reference(cached, skip, weight, bias, num_groups, eps)


@_cat_group_norm_silu_op.register_kernel("cuda")
def _cat_group_norm_silu_cuda(cached, skip, weight, bias, num_groups, eps):
    _check_inputs(cached, skip, weight, bias, num_groups)
    if triton is None or _triton_disabled() or cached.dtype not in _SUPPORTED_DTYPES:
        return cat_group_norm_silu_reference(cached, skip, weight, bias, num_groups, eps)
    # Layouts whose H and W do not merge are rare here; one copy makes them NCHW.
    if _hw_stride(cached) is None:
        cached = cached.contiguous()
    if _hw_stride(skip) is None:
        skip = skip.contiguous()
    return cat_group_norm_silu_triton(cached, skip, weight, bias, num_groups, eps)


@_cat_group_norm_silu_op.register_fake
def _cat_group_norm_silu_fake(cached, skip, weight, bias, num_groups, eps):
    _check_inputs(cached, skip, weight, bias, num_groups)
    n, c1, h, w = cached.shape
    return torch.empty(
        (n, c1 + skip.shape[1], h, w), dtype=cached.dtype, device=cached.device,
        memory_format=_output_memory_format(cached),
    )


def _setup_backward(ctx, inputs, output):
    cached, skip, weight, bias, num_groups, eps = inputs
    ctx.save_for_backward(cached, skip, weight, bias)
    ctx.num_groups, ctx.eps = num_groups, eps


def _backward(ctx, grad):
    # Recompute through the reference: DeepCache is inference-first, and this keeps the
    # gradient exactly that of cat + group_norm + silu.
    inputs = [t.detach().requires_grad_(needs) for t, needs in zip(ctx.saved_tensors, ctx.needs_input_grad)]
    with torch.enable_grad():
        out = cat_group_norm_silu_reference(*inputs, ctx.num_groups, ctx.eps)
        wanted = [t for t in inputs if t.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, grad) if wanted else ())
    return (*(next(grads) if t.requires_grad else None for t in inputs), None, None)


_cat_group_norm_silu_op.register_autograd(_backward, setup_context=_setup_backward)


def cat_group_norm_silu(cached, skip, weight, bias, num_groups, eps=1e-5):
    """silu(group_norm(cat([cached, skip], 1), ...)) via torch.ops.dcfx.cat_group_norm_silu."""
    return torch.ops.dcfx.cat_group_norm_silu(cached, skip, weight, bias, num_groups, eps)
