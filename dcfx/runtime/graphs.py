"""The graph cache: per module state and input signature, the graphs a call runs.

An `Entry` is what one input signature (`capture.Call.key`) runs in one module state: the
graphs the passes made of its capture (full and shallow, or head, rest and tail), each
compiled lazily by `compile.LazyGraph`, and what the runtime needs to call them.

Module state. Captures bake in the U-Net's non-tensor state, so they are kept per state:
- the parameters (which tensors, their dtypes and devices) and every submodule's scalar
  attributes, checked at the first call of each generation (`check(full=True)`);
- a cheap watch, at the first call of every step: the attributes that change what a U-Net
  computes without touching its parameters (FreeU factors, attention processors and their
  scales, PEFT adapter scalings and switches), so that a change made by a step callback
  takes effect at that very step.
A state seen before (moved away and back) gets its graphs back; parameters replaced drop the
others; at most `MAX_STATES` are kept, least recently used first.

Exports are bounded: a generation that would export more than `max_exports` times (an argument
that changes every step and cannot be a graph input) gets one warning naming the argument and
runs the plain U-Net for the rest of that generation.
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
from ..capture import Call, capture
from ..signature import changed_arguments, describe_signature
from ..compile import TRACING, Compiler, LazyGraph
from ..config import DeepCacheConfig
from ..costs import GraphCost, graph_cost
from ..passes import CacheLayout, GraphSet, PassOptions, build_graphs

# Module states whose graphs and cache buffers are kept (dtype/device moves, FreeU on/off, ...).
MAX_STATES = 8
# Captures and graph sets depend only on the U-Net, its state, the call signature and the
# pass options, so wrappers of one U-Net (one per branch while choosing one) share them.
_SHARED: weakref.WeakKeyDictionary[nn.Module, dict] = weakref.WeakKeyDictionary()
_SERIAL = itertools.count()


class Fixed:
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
    graphs: dict[str, LazyGraph | Fixed]
    layout: CacheLayout
    cuda: bool = False  # the signature pins the device: NVTX ranges or not, decided once
    example: tuple | None = None  # the capture's inputs (meta copies), to count FLOPs
    serial: int = field(default_factory=lambda: next(_SERIAL))
    _cost: GraphCost | None = None

    def __post_init__(self) -> None:
        # Profiler (and NVTX) range names: which graph ran, at which cut.
        self.ranges = {kind: f"dcfx.{kind}[{self.layout.cut.label}]" for kind in self.graphs}

    @property
    def full(self) -> LazyGraph | Fixed:
        """The graph of a full step (rest, for a head-gated policy)."""
        return self.graphs[self.layout.full_kind]

    @property
    def shallow(self) -> LazyGraph | Fixed:
        """The graph of a shallow step (tail, for a head-gated policy)."""
        return self.graphs[self.layout.shallow_kind]

    def cost(self) -> GraphCost | None:
        """FLOPs per call of each graph (`dcfx.costs`), counted on meta tensors once; None
        for graphs without FX code (AOT-compiled)."""
        if self._cost is None and self.example is not None:
            graphs = {k: g.graph for k, g in self.graphs.items() if isinstance(g, LazyGraph)}
            if len(graphs) == len(self.graphs):
                self._cost = graph_cost(graphs, self.layout, self.example)
        return self._cost


class GraphCache:
    """Entries per module state and signature, for one DeepCacheUNet."""

    def __init__(self, unet: nn.Module, config: DeepCacheConfig, max_exports: int = 4):
        self.unet = unet
        self.config = config
        self.max_exports = max_exports
        # fingerprint -> {signature key -> Entry}, least recently used first.
        self.states: collections.OrderedDict[tuple, dict[tuple, Entry]] = collections.OrderedDict()
        self.fingerprint: tuple | None = None
        self.preloaded: tuple[tuple, str, Entry] | None = None
        self._watch: _Watch | None = None
        self._warned = False

    @property
    def entries(self) -> dict[tuple, Entry]:
        """The current module state's entries, by signature key."""
        return self.states.get(self.fingerprint, {})

    def all_entries(self) -> list[Entry]:
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
            self._select((*self.fingerprint[:2], _state_digest(self.unet), watched))
            return
        identity, layout = _param_fingerprint(self.unet)
        if self._watch is None or self._watch.identity != identity:
            self._watch = _Watch(self.unet, identity)
        self._select((identity, layout, _state_digest(self.unet), self._watch.digest()))

    def moved(self) -> None:
        """Parameters changed dtype or device (`.to()` on the wrapper): switch state."""
        if self.fingerprint is not None:
            identity, layout = _param_fingerprint(self.unet)
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

    def entry(self, call: Call, exports: list[tuple] | None = None) -> Entry | None:
        """The entry for `call`; None when `exports` (the signature keys the generation
        exported so far) is at the limit: the caller then runs the plain U-Net."""
        if self.preloaded is not None:
            key, signature, entry = self.preloaded
            if call.key != key:
                raise ValueError(
                    f"this DeepCacheUNet runs an AOT package built for one input signature: "
                    f"{signature}; this call has {describe_signature(call.key)}"
                )
            return entry
        fp = self.fingerprint
        entries = self.states.get(fp)
        entry = entries.get(call.key) if entries is not None else None
        if entry is not None:
            return entry
        if exports is not None and len(exports) >= self.max_exports:
            self._warn_exports(call, exports)
            return None
        with TRACING.exclusive():  # one trace at a time, and no graph running meanwhile
            entries = self.states.get(fp)
            if entries is None:
                entries = self.states[fp] = {}
                while len(self.states) > MAX_STATES:
                    self._drop(next(iter(self.states)))
            entry = entries.get(call.key)
            if entry is None:
                entry = entries[call.key] = self._build(call, fp)
                if exports is not None:
                    exports.append(call.key)
        return entry

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
        options = PassOptions.of(self.config, call.timestep_index)
        graphs_key = (fp, call.key, options)
        graphs: GraphSet | None = shared.get(graphs_key)
        if graphs is None:
            graphs = shared[graphs_key] = build_graphs(cap.graph_module, options)
        return Entry(
            call.key, cap.out_spec, {k: LazyGraph(g, k) for k, g in graphs.graphs.items()}, graphs.layout,
            cuda=any(t.is_cuda for t in call.tensors),
            example=tuple(torch.empty_like(t, device="meta") for t in call.tensors),
        )

    def preload(self, graphs: Any, runners: dict[str, Callable]) -> None:
        """Run `runners` (AOT-compiled graphs by kind, as `graphs.layout.graphs` names them)
        for calls with `graphs.key`, and refuse every other signature. `graphs` has `key`,
        `signature`, `out_spec` and `layout` (a `DeepCacheGraphs` or a package's record)."""
        entry = Entry(
            graphs.key, graphs.out_spec, {kind: Fixed(fn, kind) for kind, fn in runners.items()}, graphs.layout,
            cuda=any(leaf[0] == "T" and torch.device(leaf[3]).type == "cuda" for leaf in graphs.key[1]),
        )
        self.preloaded = (graphs.key, graphs.signature, entry)


# -- module state ---------------------------------------------------------------------------


def _param_fingerprint(module: nn.Module) -> tuple[tuple, tuple]:
    """(which tensors, their layout): parameters and buffers by name and identity, and the
    training flag, dtypes, devices and shapes.

    Not data pointers: graphs read the parameters through the same Parameter objects, so
    weights moved away and back (CPU offload) reuse that state's graphs.
    """
    tensors = (*module.named_parameters(), *module.named_buffers())
    identity = tuple((name, id(t)) for name, t in tensors)
    layout = (module.training,) + tuple((t.dtype, t.device, tuple(t.shape)) for _, t in tensors)
    return identity, layout


_SCALARS = (bool, int, float, str, type(None))
# nn.Module bookkeeping that the parameter fingerprint or nothing at all depends on.
_MODULE_INTERNALS = frozenset(nn.Module().__dict__)


def _value(value: Any) -> Any:
    """A hashable stand-in for a module attribute's value; None: not state."""
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, (tuple, list)) and all(isinstance(v, _SCALARS) for v in value):
        return tuple(value)
    if isinstance(value, dict) and all(isinstance(v, _SCALARS) for v in value.values()):
        return tuple(sorted(value.items(), key=repr))
    if not isinstance(value, (torch.Tensor, nn.Module, dict, list, tuple)):
        return ("object", id(value))  # e.g. an attention processor object
    return _NOT_STATE


_NOT_STATE = object()


def _state_digest(module: nn.Module) -> tuple:
    """The non-tensor state of every submodule a capture may have baked in."""
    out = []
    for name, m in module.named_modules():
        for key, value in m.__dict__.items():
            if key in _MODULE_INTERNALS:
                continue
            v = _value(value)
            if v is not _NOT_STATE:
                out.append((name, key, v))
    return tuple(out)


# Attributes that switch or scale what a U-Net computes without touching its parameters:
# FreeU's factors (on up blocks), attention processors (and, below, their own scalars, e.g.
# IP-Adapter's scale), PEFT adapters' scalings and switches.
_WATCHED = frozenset({
    "s1", "s2", "b1", "b2", "processor", "scaling", "_active_adapter", "_disable_adapters",
    "merged_adapters", "scale", "_lora_scale",
})


class _Watch:
    """The watched attributes of one U-Net (found once per parameter set), read cheaply."""

    def __init__(self, unet: nn.Module, identity: tuple):
        self.identity = identity
        self._modules = [
            (m, sorted(k for k in m.__dict__ if k in _WATCHED)) for m in unet.modules()
            if any(k in _WATCHED for k in m.__dict__)
        ]
        # FreeU sets its factors on up blocks that did not have them before.
        self._freeu = list(getattr(unet, "up_blocks", ()))

    def digest(self) -> tuple:
        out = []
        for m, keys in self._modules:
            d = m.__dict__
            for k in keys:
                value = d.get(k)
                out.append(_value(value))
                if k == "processor" and value is not None:
                    out.append(tuple(_value(v) for v in vars(value).values()) if hasattr(value, "__dict__") else ())
        for block in self._freeu:
            d = block.__dict__
            out.append((d.get("s1"), d.get("s2"), d.get("b1"), d.get("b2")))
        return tuple(out)
