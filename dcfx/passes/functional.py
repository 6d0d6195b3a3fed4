"""Functional pass: in-place writes into intermediate tensors become out-of-place ops.

In: a graph from `torch.export` (its default IR keeps in-place ops). diffusers writes into
intermediates in place in a few places, e.g. FreeU's

    hidden_states[:, :half] = hidden_states[:, :half] * b1    # copy_(slice(h), mul)

A write like that breaks the split: the shallow graph, whose cached feature stands in for
`h`, would still hold the `copy_` (an impure node, so dead-code elimination keeps it and the
deep path feeding it) and would scale the cache buffer again at every shallow step.

Out: the same computation with every such write replaced by its functional form, scattered
back through the view chain (`slice_scatter`, `select_scatter`), and every later reader of the
written tensor reading the new value. Writes into graph inputs or weights are left alone
(they are effects the caller sees; none occurs in diffusers' U-Nets). A write through a view
that another node also reads after the write raises NotImplementedError rather than guess.
"""

from __future__ import annotations

import torch
from torch import fx

from .._torch_private import out_of_place, writes_first_argument

aten = torch.ops.aten
_VIEWS = {aten.slice.Tensor: aten.slice_scatter.default, aten.select.int: aten.select_scatter.default}


def functional(gm: fx.GraphModule) -> fx.GraphModule:
    """`gm` if it writes into no intermediate in place, else a copy with those writes
    rewritten (`remove_mutations`); `gm` itself is not modified. The split rules start so."""
    if not any(_written_intermediate(n) is not None for n in gm.graph.nodes):
        return gm
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    out = fx.GraphModule(gm, graph)
    out.meta.update(gm.meta)
    remove_mutations(out)
    return out


def remove_mutations(gm: fx.GraphModule) -> int:
    """Rewrite `gm` in place (see the module docstring); returns the writes removed."""
    graph = gm.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    removed = 0
    for node in list(graph.nodes):
        base = _written_intermediate(node)
        if base is None:
            continue
        view = node.args[0]
        chain = _view_chain(view)
        _check_no_stale_views(base, node, order)
        with graph.inserting_before(node):
            value = _functional_value(graph, node, view)
            _meta(value, node, view)
            new = value
            for parent, view_node in reversed(chain):
                new = graph.call_function(_VIEWS[view_node.target], (parent, new, *view_node.args[1:]))
                _meta(new, node, parent)
        for user in list(base.users):
            if user is not new and order.get(user, -1) > order[node]:
                user.replace_input_with(base, new)
        if node.users:
            node.replace_all_uses_with(value)
        graph.erase_node(node)
        order = {n: i for i, n in enumerate(graph.nodes)}
        removed += 1
    if removed:
        graph.eliminate_dead_code()
        graph.lint()
        gm.recompile()
    return removed


def _written_intermediate(node: fx.Node) -> fx.Node | None:
    """The intermediate tensor `node` writes into in place (through views); None for any
    other node, and for writes into an input or a weight (real effects, kept)."""
    if node.op != "call_function" or not writes_first_argument(node.target):
        return None
    chain = _view_chain(node.args[0])
    base = chain[0][0] if chain else node.args[0]
    return base if isinstance(base, fx.Node) and base.op == "call_function" else None


def _meta(new: fx.Node, write: fx.Node, like: fx.Node) -> None:
    """`new` gets `like`'s value metadata (shape, dtype) and the write's module stack."""
    for key in ("val", "tensor_meta"):
        if key in like.meta:
            new.meta[key] = like.meta[key]
    for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
        if key in write.meta:
            new.meta[key] = write.meta[key]


def _view_chain(node: object) -> list[tuple[fx.Node, fx.Node]]:
    """[(parent, view), ...] from the base tensor to `node`, for slice/select views."""
    chain = []
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target in _VIEWS:
        chain.append((node.args[0], node))
        node = node.args[0]
    return list(reversed(chain))


def _functional_value(graph: fx.Graph, node: fx.Node, view: fx.Node) -> fx.Node:
    """The value the write leaves in `view`, computed out of place."""
    if node.target is aten.copy_.default:
        src = node.args[1]
        val = view.meta.get("val")
        if isinstance(val, torch.Tensor):
            cast = graph.call_function(aten._to_copy.default, (src,), {"dtype": val.dtype})
            _meta(cast, node, view)
            return graph.call_function(aten.expand.default, (cast, list(val.shape)))
        return src
    return graph.call_function(out_of_place(node.target), node.args, node.kwargs)


def _check_no_stale_views(base: fx.Node, write: fx.Node, order: dict[fx.Node, int]) -> None:
    """Views of `base` taken before the write and read after it would read the new value in
    eager mode; rewiring them is not implemented, so refuse."""
    stack = [u for u in base.users if u.op == "call_function" and u.target in _VIEWS]
    while stack:
        view = stack.pop()
        if order[view] < order[write]:
            for reader in view.users:
                if reader is not write and order[reader] > order[write]:
                    raise NotImplementedError(
                        f"dcfx cannot capture this U-Net: {write.format_node()} writes into a view of "
                        f"{base.name} that {reader.name} reads afterwards"
                    )
            stack.extend(u for u in view.users if u.op == "call_function" and u.target in _VIEWS)
