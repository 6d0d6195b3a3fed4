"""Fuse pass: remove the concatenation at the cut point of a shallow graph.

In the shallow graph the cached feature (placeholder `deepcache_feature`) is concatenated
with a fresh skip tensor and fed to a ResnetBlock, which reads the concatenation twice:

    x = cat([cached, skip], 1)
    h = silu(group_norm(x, G, w, b, eps))     # -> conv3x3 -> ...
    r = conv2d(x, W_s, b_s)                   # 1x1 shortcut, channels change

The pass rewrites this pattern wherever the cached feature is concatenated, whatever the
model class:

    h = dcfx.cat_group_norm_silu(cached, skip, w, b, G, eps)     # Triton on CUDA
    r = conv2d(cached, W_s[:, :C1], b_s) + conv2d(skip, W_s[:, C1:])

The shortcut split is exact by linearity (up to summation order). The weight halves are
views of the module's own weight, taken in the graph: nothing is copied. The rewrite is
all-or-nothing per concatenation: if any reader of `x` is not one of the two forms above,
that concatenation is left alone (and the graph stays correct).

A second pass, `cache_cut_stats(full, shallow)`, then moves the statistics of the cached
feature to the full step: the cached feature is constant until the next full step, so its
group statistics are too. The full graph also returns `dcfx.group_partial_stats(h_b, C / G)`
(one more cached output, meta `dcfx_cached_outputs`), and each fused op whose first operand
is the cached feature gets them as a new shallow-graph input (`deepcache_feature_stats`):

    h = dcfx.cat_group_norm_silu(cached, skip, w, b, G, eps, cached_stats=stats)

so a shallow step reads only the skip tensor for statistics.

`dcfx.options.pass_options` leaves this pass out where the config (`fuse_cut`) or the
environment (`DCFX_DISABLE_FUSION=1`) says so.

`inductor_ops(gm)`, applied by dcfx's compile path to a copy of a graph that runs on CUDA,
swaps both ops for their `torch.library.triton_op` twins (`dcfx::*_inductor`: the same
kernels, visible to inductor). The graphs this module returns keep the custom ops.
"""

from __future__ import annotations

import torch
from torch import fx

from ..kernels import ops as kernel_ops  # registers torch.ops.dcfx.cat_group_norm_silu, group_partial_stats
from .split import CACHE_INPUT, CACHED_OUTPUTS, finish_graph

aten = torch.ops.aten
FUSED_OP = torch.ops.dcfx.cat_group_norm_silu.default
STATS_OP = torch.ops.dcfx.group_partial_stats.default
STATS_INPUT = "deepcache_feature_stats"
_COPIED_META = ("nn_module_stack", "stack_trace", "source_fn_stack")


def fuse_cut(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of shallow graph `gm` with the cut-point concatenation fused (see module doc).

    The result's `meta["dcfx_fused"]` counts the concatenations removed.
    """
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    graph.output(graph.graph_copy(gm.graph, env))
    fused = 0
    for node in list(graph.nodes):
        if node.op == "placeholder" and node.name == CACHE_INPUT:
            for user in list(node.users):
                fused += _fuse_concat(graph, user)
    out = finish_graph(gm, graph)
    out.meta["dcfx_fused"] = fused
    return out


def cache_cut_stats(full: fx.GraphModule, shallow: fx.GraphModule) -> tuple[fx.GraphModule, fx.GraphModule]:
    """Copies of the split (`full`) and fused (`shallow`) graphs where the fused cut ops take
    the cached feature's group statistics from the full step (see module doc).

    One statistics output per distinct group size among those ops (one in every diffusers
    U-Net); graphs without such an op come back unchanged.
    """
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    graph.output(graph.graph_copy(shallow.graph, env))
    (cache,) = [n for n in graph.nodes if n.op == "placeholder" and n.name == CACHE_INPUT]
    ops = [
        n for n in cache.users
        if n.target is FUSED_OP and n.args[0] is cache and _arg(n, 6, "cached_stats") is None
    ]
    if not ops:
        return full, shallow
    feature = cache.meta["val"]
    group_sizes = sorted({(feature.shape[1] + n.args[1].meta["val"].shape[1]) // n.args[4] for n in ops})
    last_input = cache
    stats_inputs = {}
    for size in group_sizes:
        with graph.inserting_after(last_input):
            name = STATS_INPUT if len(group_sizes) == 1 else f"{STATS_INPUT}_{size}"
            last_input = stats_inputs[size] = graph.placeholder(name)
        shape = (feature.shape[0], -(-feature.shape[1] // size), 3)
        last_input.meta["val"] = feature.new_empty(shape, dtype=torch.promote_types(feature.dtype, torch.float32))
    for node in ops:
        size = (feature.shape[1] + node.args[1].meta["val"].shape[1]) // node.args[4]
        node.args = (*node.args[:6], stats_inputs[size])
        node.kwargs = {}
    new_shallow = finish_graph(shallow, graph)
    new_shallow.meta.update(shallow.meta)

    graph = fx.Graph()
    env = {}
    outputs = graph.graph_copy(full.graph, env)
    cached = full.meta.get(CACHED_OUTPUTS, 1)
    feature_node = outputs[len(outputs) - cached]
    stats = [graph.call_function(STATS_OP, (feature_node, size)) for size in group_sizes]
    for node, size in zip(stats, group_sizes):
        node.meta["val"] = stats_inputs[size].meta["val"]
    graph.output((*outputs, *stats))
    new_full = finish_graph(full, graph)
    new_full.meta.update(full.meta)
    new_full.meta[CACHED_OUTPUTS] = cached + len(stats)
    return new_full, new_shallow


def inductor_ops(gm: fx.GraphModule) -> int:
    """Swap dcfx's custom ops in `gm` (in place) for their triton_op twins, which run the same
    Triton kernels where inductor can see them; for graphs on CUDA tensors (on other devices
    the twins run plain PyTorch). Returns how many nodes changed; none without triton."""
    changed = 0
    for node in gm.graph.nodes:
        twin = kernel_ops.INDUCTOR_OPS.get(node.target) if node.op == "call_function" else None
        if twin is not None:
            node.target = twin
            changed += 1
    if changed:
        gm.graph.lint()
        gm.recompile()
    return changed


def _arg(node: fx.Node, index: int, name: str):
    return node.args[index] if len(node.args) > index else node.kwargs.get(name)


def _fuse_concat(graph: fx.Graph, cat: fx.Node) -> int:
    if cat.op != "call_function" or cat.target is not aten.cat.default:
        return 0
    parts = cat.args[0]
    dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
    if len(parts) != 2 or not all(isinstance(p, fx.Node) for p in parts):
        return 0
    vals = [p.meta.get("val") for p in parts]
    if not all(isinstance(v, torch.Tensor) and v.dim() == 4 for v in vals) or dim % 4 != 1:
        return 0
    plans = []
    for user in cat.users:
        plan = _norm_silu(user, vals[0].dtype) or _shortcut_conv(user)
        if plan is None or plan[1].args[0] is not cat:
            return 0
        plans.append(plan)
    first, second = parts
    split_at = vals[0].shape[1]
    for kind, node, extra in plans:
        if kind == "norm":
            silu, (weight, bias, groups, eps) = extra, _group_norm_args(node)
            with graph.inserting_before(silu):
                new = graph.call_function(FUSED_OP, (first, second, weight, bias, groups, eps))
            _copy_meta(silu, new, val=True)
            silu.replace_all_uses_with(new)
            graph.erase_node(silu)
            graph.erase_node(node)
        else:
            weight, bias, rest = extra
            with graph.inserting_before(node):
                w1 = graph.call_function(aten.slice.Tensor, (weight, 1, 0, split_at))
                w2 = graph.call_function(aten.slice.Tensor, (weight, 1, split_at, None))
                y1 = graph.call_function(aten.conv2d.default, (first, w1, bias, *rest))
                y2 = graph.call_function(aten.conv2d.default, (second, w2, None, *rest))
                y = graph.call_function(aten.add.Tensor, (y1, y2))
            for new in (w1, w2, y1, y2):
                _copy_meta(node, new, val=False)
            _copy_meta(node, y, val=True)
            node.replace_all_uses_with(y)
            graph.erase_node(node)
    graph.erase_node(cat)
    return 1


def _norm_silu(node: fx.Node, dtype: torch.dtype):
    """('norm', group_norm, silu) if `node` is an affine GroupNorm read only by a SiLU."""
    if node.target is not aten.group_norm.default or len(node.users) != 1:
        return None
    (silu,) = node.users
    if silu.target is not aten.silu.default:
        return None
    weight, bias, _, _ = _group_norm_args(node)
    # The op takes an affine norm with parameters in the input's dtype.
    for p in (weight, bias):
        val = p.meta.get("val") if isinstance(p, fx.Node) else None
        if not isinstance(val, torch.Tensor) or val.dtype != dtype:
            return None
    return ("norm", node, silu)


def _group_norm_args(node: fx.Node):
    """(weight, bias, num_groups, eps) of aten.group_norm(input, G, weight, bias, eps, cudnn)."""
    names = ("input", "num_groups", "weight", "bias", "eps")
    values = [None, None, None, None, 1e-5]
    values[: len(node.args[:5])] = node.args[:5]
    for k, v in node.kwargs.items():
        if k in names:
            values[names.index(k)] = v
    return values[2], values[3], int(values[1]), float(values[4])


def _shortcut_conv(node: fx.Node):
    """('conv', conv2d, (weight, bias, rest)) if `node` is an ungrouped conv2d on the concat."""
    if node.target is not aten.conv2d.default or node.kwargs or node.args[0] is None:
        return None
    args = list(node.args) + [None] * (3 - len(node.args))
    weight, bias, rest = args[1], args[2], tuple(node.args[3:])
    groups = rest[3] if len(rest) > 3 else 1
    if groups != 1:
        return None
    return ("conv", node, (weight, bias, rest))


def _copy_meta(src: fx.Node, dst: fx.Node, val: bool) -> None:
    for k in _COPIED_META + (("val", "tensor_meta") if val else ()):
        if k in src.meta:
            dst.meta[k] = src.meta[k]
