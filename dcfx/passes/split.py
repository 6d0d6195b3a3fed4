"""Split pass: one captured U-Net graph + a branch -> the full graph and the shallow graph.

In: a GraphModule from `dcfx.capture` (flat tensor placeholders, flat tuple output), ATen
ops with `meta["val"]`. In-place writes into intermediates (FreeU's) are first rewritten out
of place (`functional`): the shallow graph must not repeat them on the cached feature.

A *skip connection* is a channel concatenation (`aten.cat`, dim 1, two tensors of rank >= 3)
one of whose operands is an ancestor of the other: the ancestor is the skip tensor `s`,
made on the way down, and the other the up path's hidden state `h`, which depends on it
through the deep part of the network. The skip operand may also be a sum with `s` as a term
(ControlNet adds its residuals to the skips: `cat([h, s + r])`). Skips are numbered in the
order their tensors are produced (the graph's topological order), so `s0` is the outermost.

Out, for branch b:
- the full graph: the input graph with `h_b` appended to its outputs (the feature to cache);
- the shallow graph: the input graph with `h_b` replaced by a new last placeholder (the
  cached feature), then dead code removed, which drops the mid block and every layer that
  only fed `h_b`.
Both keep the input graph's placeholders in order (unused ones included), so the runtime
calls them with the same tensors; neither mutates the input graph, and both share its
weights (no copies).

`split_head` cuts once more, for policies that decide after seeing the step (adaptive
gating): the *head* is what a shallow step computes without the cached feature (the time
embedding, the down path to `s_b`, ...), returning the tensors the rest of the network reads
from it (the *boundary*, `s_b` among them); the *rest* is the full graph with the boundary as
inputs (head + rest = full, no node computed twice), the *tail* the shallow graph with the
boundary as inputs (head + tail = shallow). Rest and tail keep the full/shallow conventions
(cache output and cache input last), so the fuse pass applies to them unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import fx

from .functional import functional

CACHE_INPUT = "deepcache_feature"
# Graph meta key: how many trailing outputs of the full graph are cached (and passed, in
# order, as the shallow graph's trailing inputs). split makes 1; later passes may add more.
CACHED_OUTPUTS = "dcfx_cached_outputs"


@dataclass(frozen=True)
class Skip:
    """Skip connection `s_index`, as found in a graph."""

    index: int
    skip: fx.Node  # s_b, the down-path tensor
    hidden: fx.Node  # h_b, the up-path hidden state it is concatenated with (cached at branch b)
    concat: fx.Node  # the aten.cat joining them

    @property
    def hidden_first(self) -> bool:
        return self.concat.args[0][0] is self.hidden


@dataclass
class UNetSplit:
    """Result of `split`: outputs of `full` are the input graph's plus the cached feature."""

    full: fx.GraphModule
    shallow: fx.GraphModule
    branch: int
    num_skips: int


def find_skips(graph: fx.Graph) -> list[Skip]:
    """The skip connections of a U-Net graph, numbered in production order."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    found = []
    for node in graph.nodes:
        pair = _channel_concat_pair(node)
        if pair is None:
            continue
        a, b = pair
        options = []
        for skip, hidden in ((b, a), (a, b)):
            source = _skip_source(skip, ancestors(hidden), order)
            if source is not None:
                options.append((len(ancestors(skip)), source, skip, hidden))
        if options:
            # Both ways may share ancestors; the skip is the shallower operand.
            _, source, skip, hidden = min(options, key=lambda o: o[0])
            found.append((source, skip, hidden, node))
    found.sort(key=lambda f: order[f[0]])
    return [Skip(i, s, h, c) for i, (_, s, h, c) in enumerate(found)]


def split(gm: fx.GraphModule, branch: int) -> UNetSplit:
    """Split a captured U-Net graph at skip connection `branch` (see the module docstring)."""
    gm = functional(gm)
    skips = find_skips(gm.graph)
    if not skips:
        raise ValueError(
            "found no skip connections (a down-path tensor concatenated along channels with the "
            "up path): DeepCache needs a U-Net"
        )
    if not 0 <= branch < len(skips):
        raise ValueError(
            f"branch {branch} is out of range: this U-Net has {len(skips)} skip connections, "
            f"valid branches are 0..{len(skips) - 1}"
        )
    cut = skips[branch]
    return UNetSplit(_full_graph(gm, cut.hidden), _shallow_graph(gm, cut), branch, len(skips))


BOUNDARY_INPUT = "head_"  # prefix of the rest/tail placeholders that take the head's outputs


@dataclass
class UNetHeadSplit:
    """Result of `split_head`: head(*inputs) -> boundary; rest(*inputs, *boundary) -> outputs
    + cached feature; tail(*inputs, *boundary, cached) -> outputs."""

    head: fx.GraphModule
    rest: fx.GraphModule
    tail: fx.GraphModule
    branch: int
    num_skips: int
    num_boundary: int
    skip_index: int  # which boundary output is s_b, the fresh feature at the cut


def split_head(gm: fx.GraphModule, branch: int) -> UNetHeadSplit:
    """Split a captured U-Net graph at `branch` into head, rest and tail (module docstring)."""
    gm = functional(gm)
    graphs = split(gm, branch)
    cut = find_skips(gm.graph)[branch]
    head, rest, tail, names = cut_head(gm, graphs.full, graphs.shallow)
    if cut.skip.name not in names:
        raise AssertionError(f"the skip tensor {cut.skip.name} is not among the head's outputs")
    return UNetHeadSplit(head, rest, tail, branch, graphs.num_skips, len(names), names.index(cut.skip.name))


def cut_head(gm: fx.GraphModule, full: fx.GraphModule, shallow: fx.GraphModule,
             signal: Callable[[fx.Graph, dict[fx.Node, fx.Node]], fx.Node] | None = None,
             ) -> tuple[fx.GraphModule, fx.GraphModule, fx.GraphModule, list[str]]:
    """(head, rest, tail, the boundary's names) of captured graph `gm` split into `full` and
    `shallow` (whose cache input is the placeholder `deepcache_feature`), as `split_head` makes
    them for any split rule.

    `signal(graph, env)`, if given, adds a node to the head (a copy of `gm`; `env` maps `gm`'s
    nodes to it) that the head returns last: a gate's signal that neither rest nor tail reads.
    They still take it, unused, so every boundary output is an input of both.
    """
    cache = next(n for n in shallow.graph.nodes if n.op == "placeholder" and n.name == CACHE_INPUT)
    on_cache = _descendants(cache)
    head = {
        n.name for n in shallow.graph.nodes
        if n.op not in ("placeholder", "output") and n not in on_cache
    }
    # The head's outputs: its nodes read outside it (weights are re-read, not passed).
    boundary = [
        n for n in gm.graph.nodes
        if n.name in head and n.op != "get_attr" and any(u.name not in head for u in n.users)
    ]
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    graph.graph_copy(gm.graph, env)
    outputs = [env[n] for n in boundary]
    if signal is not None:
        outputs.append(signal(graph, env))
    graph.output(tuple(outputs))
    head_gm = finish_graph(gm, graph)
    rest = _with_boundary_inputs(full, outputs, before=None)
    rest.meta[CACHED_OUTPUTS] = full.meta[CACHED_OUTPUTS]
    tail = _with_boundary_inputs(shallow, outputs, before=CACHE_INPUT)
    return head_gm, rest, tail, [n.name for n in outputs]


def _with_boundary_inputs(gm: fx.GraphModule, boundary: list[fx.Node], before: str | None) -> fx.GraphModule:
    """A copy of `gm` whose nodes named as the `boundary` nodes are placeholders (inserted
    after the original placeholders, or before placeholder `before`), their producers dropped;
    a boundary node `gm` lacks becomes an unused placeholder."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    graph.output(graph.graph_copy(gm.graph, env))
    nodes = {n.name: n for n in graph.nodes}
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    anchor = next((p for p in placeholders if p.name == before), None)
    inserted: list[fx.Node] = []
    for source in boundary:
        if anchor is not None:
            ctx = graph.inserting_before(anchor)
        else:
            ctx = graph.inserting_after(inserted[-1] if inserted else placeholders[-1])
        with ctx:
            new = graph.placeholder(BOUNDARY_INPUT + source.name)
        new.meta = {k: v for k, v in source.meta.items() if k in ("val", "tensor_meta")}
        node = nodes.get(source.name)
        if node is not None:
            node.replace_all_uses_with(new)  # the producers become dead code
        inserted.append(new)
    return finish_graph(gm, graph)


def _reachable(node: fx.Node, step) -> set[fx.Node]:
    """Every node reached from `node` (not itself) through `step` (a node's users or inputs)."""
    seen, stack = set(), [node]
    while stack:
        for n in step(stack.pop()):
            if n not in seen:
                seen.add(n)
                stack.append(n)
    return seen


def _descendants(node: fx.Node) -> set[fx.Node]:
    return _reachable(node, lambda n: n.users)


def _full_graph(gm: fx.GraphModule, hidden: fx.Node) -> fx.GraphModule:
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    out = graph.graph_copy(gm.graph, env)
    graph.output((*out, env[hidden]))
    full = finish_graph(gm, graph)
    full.meta[CACHED_OUTPUTS] = 1
    return full


def copy_with_cache_input(gm: fx.GraphModule) -> tuple[fx.Graph, dict[fx.Node, fx.Node], fx.Node]:
    """A copy of `gm`'s graph with one more placeholder, `deepcache_feature`, after its inputs
    (no reader yet); the map from `gm`'s nodes to the copy's; the new placeholder."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    graph.output(graph.graph_copy(gm.graph, env))
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    with graph.inserting_after(placeholders[-1]):
        cache = graph.placeholder(CACHE_INPUT)
    return graph, env, cache


def _shallow_graph(gm: fx.GraphModule, cut: Skip) -> fx.GraphModule:
    graph, env, cache = copy_with_cache_input(gm)
    hidden = env[cut.hidden]
    cache.meta = {k: v for k, v in hidden.meta.items() if k in ("val", "tensor_meta")}
    if cut.skip is cut.hidden:
        # No mid block: the deepest skip is also the up path's input. Only the up path's
        # operand is the cached one; the skip operand stays fresh.
        concat = env[cut.concat]
        parts = list(concat.args[0])
        parts[0 if cut.hidden_first else 1] = cache
        concat.args = (parts, *concat.args[1:])
    else:
        hidden.replace_all_uses_with(cache)
    return finish_graph(gm, graph)


def finish_graph(gm: fx.GraphModule, graph: fx.Graph) -> fx.GraphModule:
    """`graph` as a GraphModule over `gm`'s modules and weights, without dead code."""
    out = fx.GraphModule(gm, graph)
    # Dropout is random only in training; a dropped-out deep path is unused either way.
    out.graph.eliminate_dead_code(is_impure_node=lambda n: n.is_impure(impure_random=False))
    out.graph.lint()
    out.delete_all_unused_submodules()
    out.recompile()
    return out


def _channel_concat_pair(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    if node.op != "call_function" or node.target is not torch.ops.aten.cat.default:
        return None
    tensors = node.args[0]
    if len(tensors) != 2 or not all(isinstance(t, fx.Node) for t in tensors):
        return None
    val = tensors[0].meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dim() < 3:
        return None
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    if dim % val.dim() != 1:
        return None
    return tensors[0], tensors[1]


def _skip_source(skip: fx.Node, hidden_ancestors: set[fx.Node], order: dict[fx.Node, int]) -> fx.Node | None:
    """The down-path tensor behind concat operand `skip` that the other operand depends on.

    `skip` itself, or, when the skip is modified on its way to the concatenation (ControlNet
    adds residuals, FreeU filters it), the tensor of the same shape the modification starts
    from: walking back from `skip` until the other operand's ancestors, the latest one met.
    """
    if skip in hidden_ancestors:
        return skip
    shape = _shape(skip)
    stack, seen, met = [skip], {skip}, []
    while stack:
        for i in stack.pop().all_input_nodes:
            if i not in seen:
                seen.add(i)
                (met if i in hidden_ancestors else stack).append(i)
    matching = [n for n in met if shape is not None and _shape(n) == shape]
    return max(matching, key=order.__getitem__, default=None)


def ancestors(node: fx.Node) -> set[fx.Node]:
    """Every node `node` depends on (not itself)."""
    return _reachable(node, lambda n: n.all_input_nodes)


def _shape(node: fx.Node) -> tuple | None:
    val = node.meta.get("val")
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None
