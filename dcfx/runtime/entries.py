"""The entry cache: per module state and input signature, the graphs a call runs.

An `Entry` is what one input signature (`capture.Call.key`) runs in one module state: the
graphs the passes made of its capture (full and shallow, or head, rest and tail), each
compiled lazily (`compile.LazyCompiled`), and what the runtime needs to call them. A
`PackagedModel` (an AOT package's stand-in U-Net) brings one precompiled entry instead.

Module state. Captures bake in the U-Net's non-tensor state (`module_state.py`), so entries
are kept per state: the parameters and every submodule's scalar attributes are checked at
the first call of each generation (`check(full=True)`), the watched attributes at the first
call of every step. A state seen before (moved away and back) gets its graphs back;
parameters replaced drop the others; at most `MAX_STATES` are kept, least recently used
first.

Exports are bounded: a generation that would export more than `max_exports` times (an argument
that changes every step and cannot be a graph input) gets one warning naming the argument and
runs the plain U-Net for the rest of that generation.

A cut whose shallow graph costs more than half the full graph's FLOPs saves little: the first
such cut built for a model gets one warning with `dcfx.report`'s figure (once per model).
"""

from __future__ import annotations

import collections
import itertools
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from .._torch_private import pytree
from ..capture import Call, CallBinder, FloatsNotLiftable, capture
from ..compile import TRACING, Compiler, LazyCompiled
from ..config import DeepCacheConfig
from ..costs import GraphCost, graph_cost
from ..inspection import DeepCacheGraphs
from ..options import pass_options
from ..passes import CacheLayout, PassOutput, build_graphs
from ..signature import changed_arguments, describe_signature
from .module_state import Watch, param_fingerprint, state_digest

# Module states whose graphs and cache buffers are kept (dtype/device moves, FreeU on/off, ...).
MAX_STATES = 8
# Captures and graph sets depend only on the U-Net, its state, the call signature and the
# pass options, so wrappers of one U-Net (one per branch while choosing one) share them.
_SHARED: weakref.WeakKeyDictionary[nn.Module, dict] = weakref.WeakKeyDictionary()
_SERIAL = itertools.count()
# Per model: the cuts whose cost was checked, or None once one warned (`_warn_costly_cut`).
_COST_CHECKED: weakref.WeakKeyDictionary[nn.Module, set | None] = weakref.WeakKeyDictionary()
COSTLY_FRACTION = 0.5  # a shallow graph above this fraction of the full graph's FLOPs warns


class Precompiled:
    """A graph that runs as given (an AOT-compiled one): never captured nor compiled again."""

    def __init__(self, fn: Callable, name: str):
        self.fn = fn
        self.name = name
        self.compile_seconds = None

    def __call__(self, compiler: Compiler | None, *args: torch.Tensor) -> tuple:
        with TRACING.shared():
            return tuple(self.fn(*args))


@dataclass(eq=False)
class Entry:
    """One input signature in one module state: its graphs and how to call them."""

    key: tuple
    out_spec: pytree.TreeSpec
    graphs: dict[str, LazyCompiled | Precompiled]
    layout: CacheLayout
    cuda: bool = False  # the signature pins the device: NVTX ranges or not, decided once
    example: tuple | None = None  # the capture's inputs (meta copies), to count FLOPs
    serial: int = field(default_factory=lambda: next(_SERIAL))
    _cost: GraphCost | None = None

    def __post_init__(self) -> None:
        # Profiler (and NVTX) range names: which graph ran, at which cut.
        self.ranges = {kind: f"dcfx.{kind}[{self.layout.cut.label}]" for kind in self.graphs}

    @property
    def full(self) -> LazyCompiled | Precompiled:
        """The graph of a full step (rest, for a head-gated policy)."""
        return self.graphs[self.layout.full_kind]

    @property
    def shallow(self) -> LazyCompiled | Precompiled:
        """The graph of a shallow step (tail, for a head-gated policy)."""
        return self.graphs[self.layout.shallow_kind]

    def cost(self) -> GraphCost | None:
        """FLOPs per call of each graph (`dcfx.costs`), counted on meta tensors once; None
        for graphs without FX code (AOT-compiled)."""
        if self._cost is None and self.example is not None:
            graphs = {k: g.graph for k, g in self.graphs.items() if isinstance(g, LazyCompiled)}
            if len(graphs) == len(self.graphs):
                self._cost = graph_cost(graphs, self.layout, self.example)
        return self._cost

    def rebuild(self, outputs: tuple, return_dict: bool) -> Any:
        """The model's return value from a call's output leaves."""
        result = pytree.tree_unflatten(list(outputs), self.out_spec)
        if not return_dict and hasattr(result, "to_tuple"):
            result = result.to_tuple()
        return result

    def view(self, call: Call) -> DeepCacheGraphs:
        """The graphs this entry runs, for inspection (`DeepCacheUNet.graphs`)."""
        if not isinstance(self.full, LazyCompiled):
            raise TypeError("this DeepCacheUNet runs AOT-compiled graphs (a loaded package): it has no FX graphs")
        return DeepCacheGraphs(
            full=self.full.graph,
            shallow=self.shallow.graph,
            inputs=call.tensors,
            layout=self.layout,
            out_spec=self.out_spec,
            key=call.key,
            signature=describe_signature(call.key),
            head=self.graphs["head"].graph if self.layout.head else None,
        )

    @property
    def compile_seconds(self) -> dict[str, float]:
        """Seconds of each graph's first (compiling) call, by kind; compiled graphs only."""
        return {k: g.compile_seconds for k, g in self.graphs.items() if g.compile_seconds is not None}


class PackagedModel(nn.Module):
    """A stand-in model whose graphs were compiled ahead of time (an AOT package).

    A `DeepCacheUNet` around it runs `runners` (by kind, as `layout.graphs` names them) for
    calls with signature `key`, and refuses every other signature. Subclasses set the
    attributes and `check` a config against the packaged graphs.
    """

    key: tuple
    signature: str  # `key` in words
    out_spec: pytree.TreeSpec
    layout: CacheLayout
    runners: dict[str, Callable]

    def check(self, config: DeepCacheConfig) -> None:
        """Raise ValueError if the packaged graphs cannot run `config`."""


class EntryCache:
    """Entries per module state and signature, for one DeepCacheUNet."""

    def __init__(self, unet: nn.Module, config: DeepCacheConfig, binder: CallBinder, max_exports: int = 4):
        self.unet = unet
        self.config = config
        self.binder = binder
        self.max_exports = max_exports
        # fingerprint -> {signature key -> Entry}, least recently used first.
        self.states: collections.OrderedDict[tuple, dict[tuple, Entry]] = collections.OrderedDict()
        self.fingerprint: tuple | None = None
        self.preloaded: tuple[tuple, str, Entry] | None = None
        self._watch: Watch | None = None
        self._warned = False

    @property
    def current(self) -> dict[tuple, Entry]:
        """The current module state's entries, by signature key."""
        return self.states.get(self.fingerprint, {})

    def all(self) -> list[Entry]:
        """Every module state's entries, and a preloaded one (oldest state first)."""
        out = [e for state in self.states.values() for e in state.values()]
        return out + ([self.preloaded[2]] if self.preloaded is not None else [])

    # -- module state -------------------------------------------------------------------

    def check(self, full: bool = True) -> None:
        """Select the module state's graphs: `full` also looks at the parameters and every
        submodule's attributes (once per generation), else only at the watched attributes."""
        if not full and self.fingerprint is not None and self._watch is not None:
            watched = self._watch.digest()
            if watched == self.fingerprint[3]:
                return
            self._select((*self.fingerprint[:2], state_digest(self.unet), watched))
            return
        identity, layout = param_fingerprint(self.unet)
        if self._watch is None or self._watch.identity != identity:
            self._watch = Watch(self.unet, identity)
        self._select((identity, layout, state_digest(self.unet), self._watch.digest()))

    def moved(self) -> None:
        """Parameters changed dtype or device (`.to()` on the wrapper): switch state."""
        if self.fingerprint is not None:
            identity, layout = param_fingerprint(self.unet)
            self._select((identity, layout, *self.fingerprint[2:]))

    def _select(self, fp: tuple) -> None:
        if fp == self.fingerprint:
            return
        if self.fingerprint is not None and fp[0] != self.fingerprint[0]:
            with TRACING.exclusive():
                for old in [k for k in self.states if k[0] != fp[0]]:
                    self._drop(old)
                shared = _SHARED.get(self.unet)
                if shared:
                    for k in [k for k in shared if k[0][0] != fp[0]]:
                        del shared[k]
        elif fp in self.states:
            self.states.move_to_end(fp)
        self.fingerprint = fp

    def _drop(self, fp: tuple) -> None:
        self.states.pop(fp, None)
        shared = _SHARED.get(self.unet)
        if shared:
            for k in [k for k in shared if k[0] == fp]:
                del shared[k]

    # -- entries ------------------------------------------------------------------------

    def entry(self, call: Call, args: tuple, kwargs: dict, exports: list[tuple] | None = None,
              ) -> tuple[Entry | None, Call]:
        """The entry for `call` (bound from `args` and `kwargs`), and the call as bound; the
        entry is None when `exports` (the signature keys the generation exported so far) is at
        the limit: the caller then runs the plain U-Net. Where the U-Net branches on a float
        made a graph input, the call is bound again with its floats as constants."""
        if self.preloaded is not None:
            key, signature, entry = self.preloaded
            if call.key != key:
                raise ValueError(
                    f"this DeepCacheUNet runs an AOT package built for one input signature: "
                    f"{signature}; this call has {describe_signature(call.key)}"
                )
            return entry, call
        fp = self.fingerprint
        entries = self.states.get(fp)
        entry = entries.get(call.key) if entries is not None else None
        if entry is not None:
            return entry, call
        if exports is not None and len(exports) >= self.max_exports:
            self._warn_exports(call, exports)
            return None, call
        with TRACING.exclusive():  # one trace at a time, and no graph running meanwhile
            entries = self.states.get(fp)
            if entries is None:
                entries = self.states[fp] = {}
                while len(self.states) > MAX_STATES:
                    self._drop(next(iter(self.states)))
            entry = entries.get(call.key)
            if entry is None:
                try:
                    entry = entries[call.key] = self._build(call, fp)
                except FloatsNotLiftable:  # (a call bound again has no lifted floats)
                    self.binder.keep_floats(call)  # the U-Net branches on them: constants from now on
                    return self.entry(self.binder.bind(args, kwargs), args, kwargs, exports)
                if exports is not None:
                    exports.append(call.key)
        return entry, call

    def _warn_exports(self, call: Call, exports: list[tuple]) -> None:
        if self._warned:
            return
        self._warned = True
        changed = changed_arguments(exports[-1], call.key) if exports else []
        what = ", ".join(changed) if changed else "the module state or the input signature"
        warnings.warn(
            f"dcfx: {self.max_exports} graph exports in one generation ({what} keeps changing and "
            f"cannot be a graph input); the rest of this generation runs the plain U-Net. Pass a "
            f"tensor for it, keep it fixed within a generation, or raise max_exports",
            RuntimeWarning,
            stacklevel=4,
        )

    def _build(self, call: Call, fp: tuple) -> Entry:
        shared = _SHARED.setdefault(self.unet, {})
        key = (fp, call.key, None)
        cap = shared.get(key)
        if cap is None:
            cap = shared[key] = capture(self.unet, call)
        options = pass_options(self.config, call.timestep_index)
        graphs_key = (fp, call.key, options)
        graphs: PassOutput | None = shared.get(graphs_key)
        if graphs is None:
            graphs = shared[graphs_key] = build_graphs(cap.graph_module, options)
        entry = Entry(
            call.key, cap.out_spec, {k: LazyCompiled(g, k) for k, g in graphs.graphs.items()}, graphs.layout,
            cuda=any(t.is_cuda for t in call.tensors),
            example=tuple(torch.empty_like(t, device="meta") for t in call.tensors),
        )
        _warn_costly_cut(self.unet, entry)
        return entry

    def preload(self, model: PackagedModel) -> None:
        """Run `model`'s precompiled graphs for calls with its signature, and refuse others."""
        entry = Entry(
            model.key, model.out_spec, {kind: Precompiled(fn, kind) for kind, fn in model.runners.items()}, model.layout,
            cuda=any(leaf[0] == "T" and torch.device(leaf[3]).type == "cuda" for leaf in model.key[1]),
        )
        self.preloaded = (model.key, model.signature, entry)


def _warn_costly_cut(model: nn.Module, entry: Entry) -> None:
    """Warn, once per model, when the entry's shallow graph costs more than `COSTLY_FRACTION`
    of its full graph's FLOPs (each cut is counted once, on meta tensors)."""
    checked = _COST_CHECKED.setdefault(model, set())
    if checked is None or entry.layout.cut in checked:
        return
    checked.add(entry.layout.cut)
    cost = entry.cost()
    if cost is None or not cost.shallow_fraction > COSTLY_FRACTION:
        return
    _COST_CHECKED[model] = None
    warnings.warn(
        f"dcfx: {type(model).__name__} at {entry.layout.cut.describe()}: the shallow graph costs "
        f"{100 * cost.shallow_fraction:.1f}% of the full graph's FLOPs (dcfx.report's shallow/full), so a "
        f"shallow step saves less than half of a full one; dcfx.report lists cheaper cuts",
        RuntimeWarning,
        stacklevel=9,
    )
