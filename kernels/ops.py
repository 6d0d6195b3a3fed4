"""The cut kernels as torch ops; importing this module registers them.

- `torch.ops.dcfx.cat_group_norm_silu(cached, skip, weight, bias, num_groups, eps,
  cached_stats=None)`: silu(group_norm(cat([cached, skip], 1))), Triton on CUDA and plain
  PyTorch elsewhere (so CPU-compiled graphs never trace into Triton); a fake for tracing and a
  backward through the reference.
- `torch.ops.dcfx.group_partial_stats(x, group_size)`: the pieces of x's channel groups, the
  `cached_stats` argument of the former.
- `dcfx::cat_group_norm_silu_inductor`, `dcfx::group_partial_stats_inductor`
  (`torch.library.triton_op`, with triton only): the same kernels, visible to inductor.
  `INDUCTOR_OPS` maps each custom op to its twin.

`cat_group_norm_silu(...)` and `group_partial_stats(...)` call the custom ops.

Kill switch: `DCFX_DISABLE_TRITON=1` makes the ops' CUDA kernels use plain PyTorch (read at
every call); without triton they always do, as they do for dtypes the kernels do not take.
"""

import os
from typing import Optional

import torch

from . import cat_group_norm_silu as fused_kernel
from . import group_partial_stats as stats_kernel
from .plan import SUPPORTED_DTYPES, hw_stride, output_memory_format
from .tiles import triton


def triton_disabled():
    """Kill switch: DCFX_DISABLE_TRITON=1 routes the CUDA kernels to the reference."""
    return os.environ.get("DCFX_DISABLE_TRITON", "0") == "1"


def _triton_runs(dtype):
    return triton is not None and not triton_disabled() and dtype in SUPPORTED_DTYPES


def _mergeable(t):
    # Layouts whose H and W do not merge are rare here; one copy makes them NCHW.
    return t if hw_stride(t.shape, t.stride()) is not None else t.contiguous()


def cat_group_norm_silu_on_device(cached, skip, weight, bias, num_groups, eps, cached_stats=None, wrap=None,
                                  workspace=None):
    """The op's CUDA kernel: the Triton kernels (each launched through `wrap`, statistics in
    `workspace`; see `cat_group_norm_silu.launch`), or the reference where Triton does not run."""
    fused_kernel.check_inputs(cached, skip, weight, bias, num_groups, cached_stats)
    if not _triton_runs(cached.dtype):
        return fused_kernel.cat_group_norm_silu_reference(cached, skip, weight, bias, num_groups, eps, cached_stats)
    return fused_kernel.launch(
        _mergeable(cached), _mergeable(skip), weight, bias, num_groups, eps, cached_stats, wrap, workspace
    )


def group_partial_stats_on_device(x, group_size, wrap=None):
    """The op's CUDA kernel: the Triton kernel (launched through `wrap`), or the reference
    where Triton does not run."""
    stats_kernel.check_input(x, group_size)
    if not _triton_runs(x.dtype):
        return stats_kernel.group_partial_stats_reference(x, group_size)
    return stats_kernel.launch(_mergeable(x), group_size, wrap)


# ---- dcfx::cat_group_norm_silu ------------------------------------------------------------


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
    fused_kernel.check_inputs(cached, skip, weight, bias, num_groups, cached_stats)
    return fused_kernel.cat_group_norm_silu_reference(cached, skip, weight, bias, num_groups, eps, cached_stats)


@_cat_group_norm_silu_op.register_kernel("cuda")
def _cat_group_norm_silu_cuda(cached, skip, weight, bias, num_groups, eps, cached_stats=None):
    return cat_group_norm_silu_on_device(cached, skip, weight, bias, num_groups, eps, cached_stats)


@_cat_group_norm_silu_op.register_fake
def _cat_group_norm_silu_fake(cached, skip, weight, bias, num_groups, eps, cached_stats=None):
    fused_kernel.check_inputs(cached, skip, weight, bias, num_groups, cached_stats)
    n, c1, h, w = cached.shape
    return torch.empty(
        (n, c1 + skip.shape[1], h, w), dtype=cached.dtype, device=cached.device,
        memory_format=output_memory_format(cached),
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
        out = fused_kernel.cat_group_norm_silu_reference(*inputs, ctx.num_groups, ctx.eps)
        wanted = [t for t in inputs if t.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, grad) if wanted else ())
    return (*(next(grads) if t.requires_grad else None for t in inputs), None, None, None)


_cat_group_norm_silu_op.register_autograd(_backward, setup_context=_setup_backward)


# ---- dcfx::group_partial_stats ------------------------------------------------------------


@torch.library.custom_op(
    "dcfx::group_partial_stats", mutates_args=(), schema="(Tensor x, int group_size) -> Tensor"
)
def _group_partial_stats_op(x, group_size):
    stats_kernel.check_input(x, group_size)
    return stats_kernel.group_partial_stats_reference(x, group_size)


@_group_partial_stats_op.register_kernel("cuda")
def _group_partial_stats_cuda(x, group_size):
    return group_partial_stats_on_device(x, group_size)


@_group_partial_stats_op.register_fake
def _group_partial_stats_fake(x, group_size):
    stats_kernel.check_input(x, group_size)
    shape = (x.shape[0], -(-x.shape[1] // group_size), stats_kernel.STATS_FIELDS)
    return x.new_empty(shape, dtype=stats_kernel.stats_dtype(x.dtype))


# ---- the same ops for inductor on CUDA (torch.library.triton_op) ---------------------------
#
# The custom ops above are opaque to inductor: a compiled graph calls them, and through them
# the Triton launchers, from Python. These twins run the same kernels through `wrap_triton`,
# so inductor sees each kernel and launches it from its own generated code. dcfx puts them
# into CUDA graphs it compiles (`dcfx.passes.fuse.inductor_ops`); CPU graphs keep the custom
# ops, and on other devices the twins run the reference, which never touches Triton (inductor
# traces that branch on a machine without a GPU too).


def fresh_workspace(numel, device):
    """The twins' statistics workspace: inside a traced op it must be the op's own allocation."""
    return torch.empty(numel, dtype=torch.float32, device=device)


def _visible_cut(
    cached: torch.Tensor, skip: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, num_groups: int,
    eps: float, cached_stats: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    if cached.device.type != "cuda":
        fused_kernel.check_inputs(cached, skip, weight, bias, num_groups, cached_stats)
        return fused_kernel.cat_group_norm_silu_reference(cached, skip, weight, bias, num_groups, eps, cached_stats)
    return cat_group_norm_silu_on_device(
        cached, skip, weight, bias, num_groups, eps, cached_stats, _wrap_triton, fresh_workspace
    )


def _visible_stats(x: torch.Tensor, group_size: int) -> torch.Tensor:
    if x.device.type != "cuda":
        stats_kernel.check_input(x, group_size)
        return stats_kernel.group_partial_stats_reference(x, group_size)
    return group_partial_stats_on_device(x, group_size, _wrap_triton)


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
