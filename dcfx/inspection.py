"""Inspection: the two graphs dcfx runs for one call, as `DeepCacheUNet.graphs(...)` returns them.

A view of graphs for people, below the runtime: it takes the graphs, their `CacheLayout` and
the call's tensors, never runtime state.

`DeepCacheGraphs.cut` describes the cut in the U-Net's own module names (what a shallow step
runs, what it skips, what is cached and how big it is); `DeepCacheGraphs.write(directory)`
writes both graphs' code and that description (`dcfx graphs --out DIR` does it from the
command line).
"""

from __future__ import annotations

import functools
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import fx

from ._torch_private import pytree
from .capture import UNET_PREFIX, module_path
from .costs import GraphCost, graph_cost
from .passes import BlocksCut, CacheLayout, UNetCut
from .passes.split import CACHE_INPUT

# First line of every file `write` makes (`dcfx graphs` overwrites only files that start so).
WRITTEN_BY = "# Written by dcfx (DeepCacheGraphs.write)"


@dataclass(frozen=True)
class DeepCacheGraphs:
    """The full and the shallow graph for one call (module state and input signature).

    Both are flat GraphModules over the U-Net's own weights (no copies): `full(*inputs)`
    returns the U-Net's output leaves followed by the `num_cached` cached tensors;
    `shallow(*inputs, *cached)` returns the output leaves (rebuilt with `out_spec`).
    `layout` says what the graphs cache and how (`dcfx.passes.CacheLayout`).
    """

    full: fx.GraphModule
    shallow: fx.GraphModule
    inputs: tuple[torch.Tensor, ...]  # the call's tensors, in placeholder order
    layout: CacheLayout
    out_spec: pytree.TreeSpec
    key: tuple  # the input signature key (packages record it)
    signature: str  # the input signature in words
    # Head-gated policies: `head(*inputs)` runs first; `full` and `shallow` are then the rest
    # and the tail, which also take the head's outputs after the call's tensors.
    head: fx.GraphModule | None = None

    @property
    def branch(self) -> int:
        """The skip connection the U-Net is cut at (U-Nets; a transformer's cut is `layout.cut`)."""
        return self.layout.cut.branch

    @property
    def num_cached(self) -> int:
        """How many trailing outputs of `full` the shallow graph takes (without a forecast)."""
        return self.layout.num_cached

    @property
    def by_kind(self) -> dict[str, fx.GraphModule]:
        """The graphs by kind, as the runtime names them (`layout.graphs`)."""
        graphs = (self.full, self.shallow) if self.head is None else (self.head, self.full, self.shallow)
        return dict(zip(self.layout.graphs, graphs))

    @functools.cached_property
    def cost(self) -> GraphCost:
        """FLOPs of one call of each graph (`dcfx.costs`), counted on meta tensors."""
        return graph_cost(self.by_kind, self.layout, self.inputs)

    @functools.cached_property
    def cut(self) -> Cut:
        """Where the U-Net is cut, in its own module names (see `Cut`)."""
        return _describe_cut(self)

    def write(self, directory: str | Path, overwrite: bool = False) -> list[Path]:
        """Write `full.py` and `shallow.py` (each graph's code, marked with the U-Net module
        every stretch of it comes from) and `cut.txt` (`str(self.cut)`) into `directory`,
        created if needed. Returns the paths.

        An existing folder must be empty: with anything in it (an earlier `write` too) this
        raises FileExistsError and writes nothing, unless `overwrite=True`, which replaces
        files of those names and leaves other files alone.
        """
        out = Path(directory)
        if out.exists() and not out.is_dir():
            raise FileExistsError(f"{out} is a file, not a folder")
        if not overwrite and out.is_dir() and any(out.iterdir()):
            raise FileExistsError(
                f"{out} is not empty: write into a new or empty folder, or pass overwrite=True "
                f"to replace its full.py, shallow.py and cut.txt"
            )
        out.mkdir(parents=True, exist_ok=True)
        cached = ", ".join(c.name for c in self.cut.cached)
        texts = {
            "full.py": _readable_code(
                self.full,
                f"dcfx full graph, cut {self.layout.cut.label}: the whole model, run on full steps.",
                f"Returns the U-Net's output leaves, then the {self.num_cached} cached tensor(s): {cached}.",
                f"Input signature: {self.signature}",
            ),
            "shallow.py": _readable_code(
                self.shallow,
                f"dcfx shallow graph, cut {self.layout.cut.label}: run on the steps between full steps.",
                f"Takes the call's tensors, then the cached tensor(s) ({cached}); returns the output leaves.",
                f"Input signature: {self.signature}",
            ),
            "cut.txt": f"{self.cut}\n\ninput signature: {self.signature}\n",
        }
        if self.head is not None:
            texts["head.py"] = _readable_code(
                self.head,
                f"dcfx head graph, cut {self.layout.cut.label}: run first on every step; its outputs feed the",
                "full graph (the rest) or the shallow graph (the tail), after the call's tensors.",
                f"Input signature: {self.signature}",
            )
        paths = []
        for name, text in texts.items():
            path = out / name
            path.write_text(text if name.endswith(".py") else f"{WRITTEN_BY}\n{text}")
            paths.append(path)
        return paths


@dataclass(frozen=True)
class CachedTensor:
    """One tensor kept from a full step for the next shallow steps (per call slot)."""

    name: str  # the shallow graph's input: deepcache_feature, deepcache_feature_stats, ...
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int  # numel * element size
    producer: str  # the U-Net module computing it in the full graph ('' when a dcfx pass adds it)
    op: str  # the operator computing it, e.g. 'aten.add.Tensor', 'dcfx.group_partial_stats.default'


@dataclass(frozen=True)
class Cut:
    """Where DeepCache cuts the U-Net for one call; `str(cut)` is a readable summary.

    Module lists are in the U-Net's own names, in execution order, collapsed to the
    outermost modules that run entirely on shallow steps (`shallow_modules`) or only on full
    steps (`skipped_modules`): e.g. `mid_block`, or `up_blocks.3.resnets.0` when its block
    is cut through.
    """

    record: UNetCut | BlocksCut  # the layout's cut
    consumer: str  # the up-path module reading the cached feature (the resnet at the cut)
    cached: tuple[CachedTensor, ...]  # the feature first, then what passes add (statistics)
    shallow_modules: tuple[str, ...]  # modules a shallow step runs
    skipped_modules: tuple[str, ...]  # modules only full steps run
    full_nodes: int  # operator (call_function) nodes of the full graph, as dcfx.report counts
    shallow_nodes: int  # the same for the shallow graph

    @property
    def branch(self) -> int:
        """A U-Net's cut: its skip connection."""
        return self.record.branch

    @property
    def num_skips(self) -> int:
        """A U-Net's skip connections (valid branches: 0..num_skips - 1)."""
        return self.record.num_skips

    @property
    def cached_bytes(self) -> int:
        """Bytes kept per call slot between steps (all cached tensors)."""
        return sum(c.nbytes for c in self.cached)

    def __str__(self) -> str:
        feature = self.cached[0]
        rows = [
            (c.name, f"{_dtype_name(c.dtype)}{list(c.shape)}", f"{c.nbytes:,} bytes", c.producer or c.op)
            for c in self.cached
        ]
        rows.append(("total", "", f"{self.cached_bytes:,} bytes", f"({human_bytes(self.cached_bytes)} per call slot)"))
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        table = [
            f"    {r[0].ljust(widths[0])}  {r[1].ljust(widths[1])}  {r[2].rjust(widths[2])}  {r[3]}".rstrip()
            for r in rows
        ]
        share = self.shallow_nodes / self.full_nodes if self.full_nodes else float("nan")
        return "\n".join([
            f"dcfx cut at {self.record.describe()}",
            f"  cached feature: output of {feature.producer or feature.op} on full steps; "
            f"{self.consumer} takes it with skip connection s{self.branch}" if isinstance(self.record, UNetCut) else
            f"  cached feature: what blocks {self.record.first_blocks}..{self.record.num_blocks - self.record.last_blocks - 1} "
            f"add to the streams on full steps (their output minus their input), added back on shallow steps",
            "  cached tensors (written on full steps, read on shallow steps):",
            *table,
            _module_list(f"shallow steps run ({len(self.shallow_modules)}): ", self.shallow_modules),
            _module_list(f"only full steps run ({len(self.skipped_modules)}): ", self.skipped_modules),
            f"  operators: full graph {self.full_nodes}, shallow graph {self.shallow_nodes} ({100 * share:.0f}%)",
        ])


def _readable_code(gm: fx.GraphModule, *header: str) -> str:
    """`gm`'s Python code (`print_readable`), headed by `header` lines and with a
    `# -- module: <path>` comment wherever the U-Net module the code comes from changes."""
    code = gm.print_readable(print_output=False)
    paths = {n.name: _layer(module_path(n)) for n in gm.graph.nodes if n.op == "call_function"}
    lines: list[str] = []
    current = None
    for line in code.splitlines():
        match = _ASSIGNMENT.match(line)
        path = paths.get(match.group(2)) if match else None
        if path is not None and path != current:
            current = path
            # Above the node's own comment block (print_readable's source-line comments).
            at = len(lines)
            while at and (not lines[at - 1].strip() or lines[at - 1].lstrip().startswith("#")):
                at -= 1
            lines.insert(at, f"\n{match.group(1)}# -- module: {path or '(top level)'}")
        lines.append(line)
    head = [WRITTEN_BY, *(f"# {h}" for h in header)]
    head.append("# Weights are the U-Net's own parameters (self.unet.<module path>), not copies.")
    return "\n".join(head) + "\n" + "\n".join(lines).rstrip() + "\n"


def _layer(path: str) -> str:
    """`path` cut to layer level: `down_blocks.0.resnets.0.norm1` -> `down_blocks.0.resnets.0`,
    `mid_block.attentions.0.proj_in` -> `mid_block.attentions.0`, `time_embedding.linear_1`
    -> `time_embedding`."""
    parts = path.split(".")
    wanted = 2 if len(parts) > 1 and parts[1].isdigit() else 1
    seen = 0
    for i, part in enumerate(parts):
        if part.isdigit():
            seen += 1
            if seen == wanted:
                return ".".join(parts[: i + 1])
    return path if seen else parts[0]


_ASSIGNMENT = re.compile(r'^(\s+)([A-Za-z_]\w*)(?:: "[^"]*")? = ')


def _describe_cut(graphs: DeepCacheGraphs) -> Cut:
    full, shallow, n = graphs.full, graphs.shallow, graphs.num_cached
    (output,) = full.graph.find_nodes(op="output")
    produced = list(output.args[0])[-n:]
    placeholders = [p for p in shallow.graph.nodes if p.op == "placeholder"]
    first = next(i for i, p in enumerate(placeholders) if p.name == CACHE_INPUT)
    inputs = placeholders[first:]
    cached = []
    for i, placeholder in enumerate(inputs):
        node = produced[i] if i < len(produced) else None
        val = placeholder.meta.get("val")
        if val is None and node is not None:
            val = node.meta["val"]
        producer = (module_path(node), _op_name(node)) if node is not None else ("", "earlier full steps")
        cached.append(CachedTensor(placeholder.name, tuple(val.shape), val.dtype, val.numel() * val.element_size(), *producer))
    head = [graphs.head.graph] if graphs.head is not None else []
    shallow_modules, skipped_modules = _partition_modules([*head, full.graph], [*head, shallow.graph])
    return Cut(
        record=graphs.layout.cut,
        consumer=_consumer(inputs[0]),
        cached=tuple(cached),
        shallow_modules=shallow_modules,
        skipped_modules=skipped_modules,
        full_nodes=sum(operator_count(g) for g in [*head, full.graph]),
        shallow_nodes=sum(operator_count(g) for g in [*head, shallow.graph]),
    )


def operator_count(graph: fx.Graph) -> int:
    """Operator (call_function) nodes of a graph: the node counts `Cut` and `dcfx.report` give."""
    return sum(1 for n in graph.nodes if n.op == "call_function")


# The class of an operator overload such as `torch.ops.aten.add.Tensor` (reached through
# public names; torch exports no name for it).
_OP_OVERLOAD = type(torch.ops.aten.add.Tensor)


def _op_name(node: fx.Node) -> str:
    target = node.target
    return str(target) if isinstance(target, _OP_OVERLOAD) else getattr(target, "__name__", str(target))


def _consumer(feature: fx.Node) -> str:
    """The innermost module holding every reader of the cached feature, looking through the
    concatenation (the unfused cut concatenates in the up block, then its resnet reads it)."""
    readers: list[fx.Node] = []
    for user in feature.users:
        if user.target is torch.ops.aten.cat.default:
            readers.extend(user.users)
        else:
            readers.append(user)
    paths = [module_path(r).split(".") for r in readers] or [[""]]
    common = paths[0]
    for p in paths[1:]:
        i = 0
        while i < min(len(common), len(p)) and common[i] == p[i]:
            i += 1
        common = common[:i]
    return ".".join(common)


def _partition_modules(full: list[fx.Graph], shallow: list[fx.Graph]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(run on shallow steps, full steps only), collapsed to uniform subtrees (see `Cut`);
    `full` and `shallow` are the graphs a full and a shallow step run, in order."""
    # Module paths with operators or parameters of their own, in execution order; their
    # prefixes form the tree. Parameters count because a fused operator is traced in one
    # module but does the work of another (the cut's norm1 inside the SiLU's op).
    own_full = dict.fromkeys(p for g in full for p in _own_modules(g))
    own_shallow = {p for g in shallow for p in _own_modules(g)}
    children: dict[str, list[str]] = {}
    has_own = set()
    for path in own_full:
        has_own.add(path)
        parts = path.split(".") if path else []
        for i in range(len(parts)):
            parent, child = ".".join(parts[:i]), ".".join(parts[: i + 1])
            siblings = children.setdefault(parent, [])
            if child not in siblings:
                siblings.append(child)

    status: dict[str, str] = {}

    def state(path: str) -> str:
        if path not in status:
            states = {state(c) for c in children.get(path, ())}
            if path in has_own:
                # Operators traced directly in this module (e.g. an up block's concatenations):
                # present in the shallow graph if any of them is.
                states.add("run" if path in own_shallow else "skip")
            status[path] = states.pop() if len(states) == 1 else "mixed"
        return status[path]

    run, skip = [], []

    def walk(path: str) -> None:
        s = state(path)
        if s == "mixed":
            for child in children.get(path, ()):
                walk(child)
        else:
            (run if s == "run" else skip).append(path or "(whole U-Net)")

    walk("")
    return tuple(run), tuple(skip)


def _own_modules(graph: fx.Graph) -> list[str]:
    """The module of each operator in execution order, then of each parameter read."""
    ops = [module_path(n) for n in graph.nodes if n.op == "call_function"]
    params = [
        n.target.removeprefix(UNET_PREFIX).rpartition(".")[0]
        for n in graph.nodes if n.op == "get_attr" and isinstance(n.target, str)
    ]
    return ops + params


def _module_list(head: str, modules: tuple[str, ...]) -> str:
    return textwrap.fill(", ".join(modules) or "(none)", width=100, initial_indent="  " + head,
                         subsequent_indent=" " * 6, break_on_hyphens=False)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def human_bytes(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.1f} {unit}" if unit != "bytes" else f"{n} bytes"
        n /= 1024
    return f"{n:.2f} GiB"
