"""Split rule for diffusion transformers: the first Fn blocks and the last Bn blocks always run,
the blocks between them are cached as a residual (cache-dit's DBCache layout).

In: a GraphModule from `dcfx.capture` (flat tensor placeholders, flat tuple output), ATen
ops with `meta["val"]` and `meta["nn_module_stack"]`.

A *block* is a module held in a ModuleList (an uncalled container, so its path has a number
last and its parent is not on the module stack): `transformer_blocks.0`,
`single_transformer_blocks.3`, Wan's `blocks.7`. Blocks are numbered in execution order across
all their lists (Flux: the double-stream blocks, then the single-stream ones). The *middle* is
every node from the first node of block Fn to the last node of block N - Bn - 1.

A *stream* is a tensor the middle carries through: one the middle outputs (read after it)
paired with the tensor entering the middle that it continues. It is found by walking back from
the output along the residual path only: elementwise ops with an operand of the output's shape
(`x + gate * f(x)`), casts and dropout, and token slices of token concatenations (Flux's single
blocks join text and image tokens and split them again). Flux, SD3 and Qwen-Image carry two
(image and text tokens; with Bn = 0 the text stream's last value is dead, so only the image
stream is cached); PixArt, DiT and Wan one (the text enters through cross-attention); Flux 2 two
through its double-stream blocks and one joint stream after them. A middle output that is a
middle input passed through unchanged (a cast to its own dtype) is read from the input instead.

Out, for (Fn, Bn):
- the full graph: the input graph plus one output, the *residual* (middle output minus
  middle input) of every stream. With several streams, they are concatenated along dim 1
  (tokens; all other dims must agree): one cached tensor, so the runtime keeps one buffer and a
  forecast extrapolates every stream alike. The image stream (the one computed from the
  sample, the call's first input, before the blocks) comes first;
- the shallow graph: the input graph with one more placeholder, `deepcache_feature` (the
  residual), where every stream's middle output is replaced by middle input + its part of the
  residual; dead code removal then drops every middle node.
Both keep the input graph's placeholders in order, share its weights, and leave it unmodified.
Graph meta `dcfx_cached_outputs` is 1, as for a U-Net's split, so fuse (nothing to fuse
here), forecast and the runtime treat both rules alike.

`split_dit_head` cuts for adaptive gating as `split.split_head` does (head, rest, tail over
the same boundary) and adds First-Block-Cache's signal to the head's outputs, last: the image
stream's residual over blocks 0..Fn-1 (its value entering block Fn minus its value entering
block 0). Rest and tail take it as an unused input.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import fx

from .functional import functional
from .split import CACHED_OUTPUTS, ancestors, copy_with_cache_input, cut_head, finish_graph

aten = torch.ops.aten

# Ops that return their first operand's value (casts to its own dtype, dropout in eval), and
# those a residual path passes through besides (fp16 clipping).
_IDENTITY = {aten.to, aten._to_copy, aten.type_as, aten.clone, aten.contiguous, aten.alias, aten.dropout}
_PASS_THROUGH = _IDENTITY | {aten.clamp, aten.clip}
_ELEMENTWISE = {aten.add, aten.sub, aten.mul, aten.div}
SIGNAL_NAME = "head_residual"  # the head's extra output (see the module docstring)


@dataclass(frozen=True)
class Block:
    """One transformer block as found in a graph: its module path and node positions."""

    path: str  # relative to the model, e.g. "single_transformer_blocks.3"
    first: int  # position of its first and last node in the graph
    last: int


@dataclass(frozen=True)
class Joined:
    """A concatenation of values a stream continues (Flux 2 joins its text and image streams
    between its double- and single-stream blocks, so a joint stream leaving the middle may
    continue two streams entering it)."""

    parts: tuple[fx.Node | Joined, ...]
    dim: int


Source = fx.Node | Joined


@dataclass(frozen=True)
class Stream:
    """A tensor the middle carries through, in the input graph."""

    middle_in: Source  # its value entering block Fn
    middle_out: fx.Node  # its value leaving block N - Bn - 1
    head_in: Source | None  # its value entering block 0 (None: no residual path back there)
    image: bool  # computed from the call's first input (the sample) before the blocks
    tokens: tuple[int, int]  # its rows of the cached residual along dim 1


@dataclass
class DiTSplit:
    """Result of `split_dit`: `full(*inputs)` -> outputs + residual,
    `shallow(*inputs, residual)` -> outputs."""

    full: fx.GraphModule
    shallow: fx.GraphModule
    fn: int
    bn: int
    blocks: tuple[Block, ...]
    streams: tuple[Stream, ...]  # in the residual's order (the image stream first)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def middle(self) -> tuple[Block, ...]:
        return self.blocks[self.fn: len(self.blocks) - self.bn]


@dataclass
class DiTHeadSplit:
    """Result of `split_dit_head`: head(*inputs) -> boundary (the signal last);
    rest(*inputs, *boundary) -> outputs + residual; tail(*inputs, *boundary, residual) -> outputs."""

    head: fx.GraphModule
    rest: fx.GraphModule
    tail: fx.GraphModule
    fn: int
    bn: int
    num_boundary: int
    skip_index: int  # which boundary output is the signal (the head's image-stream residual)
    num_blocks: int


def find_blocks(graph: fx.Graph) -> list[Block]:
    """The transformer blocks of a captured graph, in execution order."""
    spans: dict[str, list[int]] = {}
    for i, node in enumerate(graph.nodes):
        path = _block_path(node) if node.op == "call_function" else None
        if path is not None:
            span = spans.setdefault(path, [i, i])
            span[1] = i
    blocks = sorted((Block(p, a, b) for p, (a, b) in spans.items()), key=lambda b: b.first)
    for a, b in zip(blocks, blocks[1:]):
        if a.last > b.first:
            raise ValueError(f"blocks {a.path} and {b.path} interleave in the graph: not a chain of blocks")
    return blocks


def split_dit(gm: fx.GraphModule, fn: int, bn: int) -> DiTSplit:
    """Split a captured transformer graph: blocks 0..fn-1 and the last bn blocks run, the
    others are cached as a residual (module docstring)."""
    gm = functional(gm)
    cut = _Cut(gm.graph, fn, bn)
    return DiTSplit(_full_graph(gm, cut), _shallow_graph(gm, cut), fn, bn, tuple(cut.blocks), tuple(cut.streams))


def split_dit_head(gm: fx.GraphModule, fn: int, bn: int) -> DiTHeadSplit:
    """Split a captured transformer graph into head, rest and tail (module docstring)."""
    gm = functional(gm)
    cut = _Cut(gm.graph, fn, bn)
    stream = cut.streams[0]
    if stream.head_in is None:
        raise ValueError(
            f"{_describe(stream.middle_in)}, entering block {cut.blocks[fn].path}, continues no tensor entering "
            f"block {cut.blocks[0].path}: the head has no residual to gate on"
        )

    def signal(graph: fx.Graph, env: dict[fx.Node, fx.Node]) -> fx.Node:
        with graph.inserting_before(env[cut.nodes[cut.start]]):
            args = (_emit(graph, env, stream.middle_in), _emit(graph, env, stream.head_in))
            node = graph.create_node("call_function", aten.sub.Tensor, args, name=SIGNAL_NAME)
        node.meta["val"] = _source_val(stream.middle_in)
        return node

    head, rest, tail, names = cut_head(gm, _full_graph(gm, cut), _shallow_graph(gm, cut), signal)
    return DiTHeadSplit(head, rest, tail, fn, bn, len(names), len(names) - 1, len(cut.blocks))


class _Cut:
    """Where (fn, bn) cuts a graph: its blocks, the middle's nodes and its streams."""

    def __init__(self, graph: fx.Graph, fn: int, bn: int):
        self.blocks = blocks = find_blocks(graph)
        n = len(blocks)
        if not blocks:
            raise ValueError(
                "found no transformer blocks (modules of a ModuleList, such as transformer_blocks.0) "
                "in the graph: this split rule needs a diffusion transformer"
            )
        if not (isinstance(fn, int) and isinstance(bn, int) and fn >= 1 and bn >= 0 and fn + bn < n):
            raise ValueError(
                f"Fn={fn!r}, Bn={bn!r} do not fit this model's {n} transformer blocks: need integers "
                f"Fn >= 1, Bn >= 0 and Fn + Bn <= {n - 1} (at least one cached block)"
            )
        self.nodes = nodes = list(graph.nodes)
        self.start, self.end = start, end = blocks[fn].first, blocks[n - bn - 1].last
        self.middle = {x for x in nodes[start: end + 1] if x.op == "call_function"}
        outs = [x for x in nodes[start: end + 1] if x in self.middle and any(u not in self.middle for u in x.users)]
        head = {x for x in nodes[blocks[0].first: start] if x.op == "call_function"}
        sample = next((x for x in nodes if x.op == "placeholder"), None)
        found = []
        self.carried: list[tuple[fx.Node, fx.Node]] = []  # (a middle output, the same value entering it)
        for out in outs:
            same = _identity_source(out, self.middle)
            if same is not None:
                self.carried.append((out, same))
                continue
            middle_in = _stream_source(out, self.middle)
            if middle_in is None:
                raise ValueError(
                    f"{out.name} ({_block_path(out) or 'top level'}) is read after block {blocks[n - bn - 1].path} "
                    f"but continues no tensor entering block {blocks[fn].path}: cannot cache the middle as a residual"
                )
            head_in = _trace(middle_in, head)
            image = head_in is not None and any(sample in ancestors(x) for x in _source_nodes(head_in))
            found.append((middle_in, out, head_in, image))
        if not found:
            raise ValueError(f"nothing after block {blocks[n - bn - 1].path} reads what the middle computes")
        found.sort(key=lambda f: not f[3])  # the image stream first (a stable sort keeps graph order)
        _check_packable([f[1] for f in found])
        self.streams, offset = [], 0
        for middle_in, out, head_in, image in found:
            size = _val(out).shape[1]
            self.streams.append(Stream(middle_in, out, head_in, image, (offset, offset + size)))
            offset += size

    def after(self, graph: fx.Graph, env: dict[fx.Node, fx.Node]) -> contextlib.AbstractContextManager:
        """Insertion right after the middle, in a copy of the graph (`env`: the copy's nodes)."""
        following = self.nodes[self.end + 1]
        return graph.inserting_before(env[following]) if following in env else contextlib.nullcontext()

    def residual_meta(self) -> torch.Tensor:
        first = _val(self.streams[0].middle_out)
        if len(self.streams) == 1:
            return first.new_empty(first.shape)
        return first.new_empty((first.shape[0], self.streams[-1].tokens[1], *first.shape[2:]))


def _full_graph(gm: fx.GraphModule, cut: _Cut) -> fx.GraphModule:
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    out = graph.graph_copy(gm.graph, env)
    with cut.after(graph, env):
        parts = []
        for s in cut.streams:
            part = graph.call_function(aten.sub.Tensor, (env[s.middle_out], _emit(graph, env, s.middle_in)))
            part.meta["val"] = _like(s.middle_out)
            parts.append(part)
        residual = parts[0] if len(parts) == 1 else graph.call_function(aten.cat.default, (parts, 1))
        residual.meta["val"] = cut.residual_meta()
    graph.output((*out, residual))
    full = finish_graph(gm, graph)
    full.meta[CACHED_OUTPUTS] = 1
    return full


def _shallow_graph(gm: fx.GraphModule, cut: _Cut) -> fx.GraphModule:
    graph, env, cache = copy_with_cache_input(gm)
    cache.meta["val"] = cut.residual_meta()
    middle = {env[x] for x in cut.middle}
    with cut.after(graph, env):
        for s in cut.streams:
            part = cache
            if len(cut.streams) > 1:
                part = graph.call_function(aten.slice.Tensor, (cache, 1, *s.tokens))
                part.meta["val"] = _like(s.middle_out)
            new = graph.call_function(aten.add.Tensor, (_emit(graph, env, s.middle_in), part))
            new.meta["val"] = _like(s.middle_out)
            _read_instead(env[s.middle_out], new, middle)
        for out, same in cut.carried:
            _read_instead(env[out], env[same], middle)
    return finish_graph(gm, graph)


def _read_instead(old: fx.Node, new: fx.Node, middle: set[fx.Node]) -> None:
    """Readers of `old` outside the middle read `new`."""
    for user in [u for u in old.users if u not in middle]:
        user.replace_input_with(old, new)


def _block_path(node: fx.Node) -> str | None:
    """The path of the block a node runs in (relative to the model), or None."""
    stack = node.meta.get("nn_module_stack") or {}
    paths = [path for path, _ in stack.values()]
    called = set(paths)
    for path in paths:  # outermost first
        parent, _, last = path.rpartition(".")
        if last.isdigit() and parent and parent not in called:
            return ".".join(path.split(".")[-2:])
    return None


def _stream_source(out: fx.Node, region: set[fx.Node]) -> Source | None:
    """The value from outside `region` that `out` continues along a residual path (module
    docstring), nearest first; None if there is none. A window (dim, start, stop) follows token
    slices into concatenations; a whole concatenation inside `region` is a `Joined` source when
    each of its parts has one."""
    frontier: list[tuple[fx.Node, tuple | None]] = [(out, None)]
    seen = set(frontier)
    while frontier:
        found = []
        for x, window in frontier:
            if window is None and x not in region:
                found.append(x)
            elif window is None and getattr(x.target, "overloadpacket", None) is aten.cat:
                parts = [_stream_source(p, region) for p in x.args[0]]
                if all(p is not None for p in parts):
                    found.append(Joined(tuple(parts), x.args[1] if len(x.args) > 1 else 0))
        if len(set(found)) > 1:
            names = ", ".join(sorted(_describe(x) for x in set(found)))
            raise ValueError(f"{out.name} continues several tensors equally near ({names}): cannot pair its stream")
        if found:
            return found[0]
        step = []
        for x, window in frontier:
            if x in region:
                for nxt in _residual_inputs(x, window):
                    if nxt not in seen:
                        seen.add(nxt)
                        step.append(nxt)
        frontier = step
    return None


def _identity_source(out: fx.Node, region: set[fx.Node]) -> fx.Node | None:
    """The node outside `region` that `out` equals (same value, dtype and shape) through
    identity ops only, or None. Export threads a tensor the blocks only read through every block
    when each casts it to its own dtype (Wan's `temb.float()` returns its input, so the next
    block's cast reads the last one's)."""
    x = out
    while x in region and getattr(x.target, "overloadpacket", None) in _IDENTITY and isinstance(x.args[0], fx.Node):
        x = x.args[0]
    if x in region or x is out:
        return None
    a, b = _val(x), _val(out)
    return x if a.dtype == b.dtype and a.shape == b.shape else None


def _trace(source: Source, region: set[fx.Node]) -> Source | None:
    """`_stream_source` of every node of `source` (None if one has none)."""
    if isinstance(source, fx.Node):
        return _stream_source(source, region)
    parts = [_trace(p, region) for p in source.parts]
    return None if any(p is None for p in parts) else Joined(tuple(parts), source.dim)


def _emit(graph: fx.Graph, env: dict[fx.Node, fx.Node], source: Source) -> fx.Node:
    """`source` in a copy of the graph (`env`: the copy's nodes), concatenating a `Joined` one."""
    if isinstance(source, fx.Node):
        return env[source]
    node = graph.call_function(aten.cat.default, ([_emit(graph, env, p) for p in source.parts], source.dim))
    node.meta["val"] = _source_val(source)
    return node


def _source_val(source: Source) -> torch.Tensor:
    if isinstance(source, fx.Node):
        return _val(source)
    vals = [_source_val(p) for p in source.parts]
    shape = list(vals[0].shape)
    shape[source.dim] = sum(v.shape[source.dim] for v in vals)
    return vals[0].new_empty(shape)


def _source_nodes(source: Source) -> list[fx.Node]:
    return [source] if isinstance(source, fx.Node) else [n for p in source.parts for n in _source_nodes(p)]


def _describe(source: Source) -> str:
    if isinstance(source, fx.Node):
        return source.name
    return f"cat({', '.join(_describe(p) for p in source.parts)})"


def _residual_inputs(node: fx.Node, window: tuple | None) -> list[tuple[fx.Node, tuple | None]]:
    """The inputs of `node` whose values its residual path carries, each with its window."""
    packet = getattr(node.target, "overloadpacket", None)
    shape = _shape(node)
    args = node.args
    if packet in _PASS_THROUGH or packet in _ELEMENTWISE:
        operands = args[:1] if packet in _PASS_THROUGH else args[:2]
        return [(a, window) for a in operands if isinstance(a, fx.Node) and _shape(a) == shape]
    if packet is aten.slice and isinstance(args[0], fx.Node):
        source, dim, start, stop, step = (*args, *(None, 0, None, None, 1)[len(args):])
        size = _shape(source)
        if step != 1 or size is None:
            return []
        dim %= len(size)
        start, stop, _ = slice(start, stop).indices(size[dim])
        if window is not None:
            if window[0] != dim:
                return []
            start, stop = start + window[1], start + window[2]
        return [(source, _window(dim, start, stop, size))]
    if packet is aten.cat and window is not None:
        parts, dim = args[0], (args[1] if len(args) > 1 else 0) % len(shape)
        if window[0] != dim:
            return []
        offset = 0
        for part in parts:
            size = _shape(part)
            if offset <= window[1] and window[2] <= offset + size[dim]:
                return [(part, _window(dim, window[1] - offset, window[2] - offset, size))]
            offset += size[dim]
    return []


def _window(dim: int, start: int, stop: int, shape: tuple) -> tuple | None:
    return None if (start, stop) == (0, shape[dim]) else (dim, start, stop)


def _check_packable(outs: list[fx.Node]) -> None:
    """The streams concatenate along dim 1: same dtype, same sizes elsewhere."""
    vals = [_val(x) for x in outs]
    kinds = {(v.dtype, v.dim(), *(size for i, size in enumerate(v.shape) if i != 1)) for v in vals}
    if len(kinds) > 1 or vals[0].dim() < 2:
        shapes = ", ".join(f"{x.name} {str(v.dtype).removeprefix('torch.')}{list(v.shape)}" for x, v in zip(outs, vals))
        raise ValueError(f"the middle's streams ({shapes}) differ beyond dim 1 (tokens): cannot cache them as one residual")


def _val(node: fx.Node) -> torch.Tensor:
    return node.meta["val"]


def _like(node: fx.Node) -> torch.Tensor:
    return _val(node).new_empty(_val(node).shape)


def _shape(node) -> tuple | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None
