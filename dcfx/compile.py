"""Compile: a plain GraphModule -> a callable, optionally through torch.compile.

A `Compiler` is one torch.compile setting (backend, mode, options). It comes from the config
(`compile=True`), from `DeepCacheUNet.compile(...)`, from a U-Net compiled before `optimize`
(`unet.compile(...)`, `torch.compile(unet)`), or, per call, from a `torch.compile` wrapped
around the DeepCacheUNet: in every case the full and the shallow graph are what gets compiled
(fullgraph, static shapes: one capture per input signature), never the per-step host logic.

Each graph is compiled lazily, at its first call with a given compiler, so a generation that
never takes a shallow step never compiles the shallow graph; the time of that first call is
recorded, because compile time is the user's first-image latency.

Tracing (torch.export, and torch.compile's AOT tracing) patches `torch.nn.Module.__call__`
process-wide while it runs, so a module called from another thread meanwhile is traced into
the wrong graph or breaks the trace. `TRACING` orders the two: graph runs share it, a trace
holds it alone.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import threading
import time
import warnings
from dataclasses import dataclass
from sys import _getframe
from typing import Any, Callable, Iterator

import torch
from torch import fx, nn

# torch's own classes for its compile wrappers (private; present in torch 2.11-2.13).
from torch._dynamo.eval_frame import DisableContext as _DisableContext
from torch._dynamo.eval_frame import OptimizedModule
from torch._dynamo.eval_frame import _TorchDynamoContext as _DynamoContext

from .config import DeepCacheConfig

try:
    from torch._dynamo.eval_frame import _is_in_optimized_module as _in_optimized_module
except ImportError:  # a torch without the flag: walk the frames on every call

    def _in_optimized_module() -> bool:
        return True



class _SharedExclusiveLock:
    """A readers-writer lock: any number of `shared` holders, or one `exclusive` holder.

    Waiting exclusive holders block new shared ones (a trace is not starved by back-to-back
    graph runs). The exclusive side is reentrant, and a thread that holds it may also enter
    the shared side.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._owner: int | None = None
        self._depth = 0
        self._waiting = 0

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        me = threading.get_ident()
        with self._cond:
            if self._owner == me:
                counted = False
            else:
                while self._owner is not None or self._waiting:
                    self._cond.wait()
                self._shared += 1
                counted = True
        try:
            yield
        finally:
            if counted:
                with self._cond:
                    self._shared -= 1
                    if not self._shared:
                        self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        me = threading.get_ident()
        with self._cond:
            if self._owner != me:
                self._waiting += 1
                try:
                    while self._owner is not None or self._shared:
                        self._cond.wait()
                finally:
                    self._waiting -= 1
                self._owner = me
            self._depth += 1
        try:
            yield
        finally:
            with self._cond:
                self._depth -= 1
                if not self._depth:
                    self._owner = None
                    self._cond.notify_all()


TRACING = _SharedExclusiveLock()


@dataclass(frozen=True, eq=False)
class Compiler:
    """One torch.compile setting for the graphs. `backend` is a name ("inductor") or a dynamo
    backend object (as a torch.compile'd module holds it, mode and options applied)."""

    backend: Any = "inductor"
    mode: str | None = None
    options: dict | None = None
    source: str = "compile=True"  # where the setting came from, for messages

    @property
    def key(self) -> tuple:
        backend = self.backend if isinstance(self.backend, str) else id(self.backend)
        options = tuple(sorted((k, repr(v)) for k, v in (self.options or {}).items()))
        return backend, self.mode, options

    def compile(self, graph: fx.GraphModule) -> Callable:
        return torch.compile(
            graph,
            fullgraph=True,
            # Shapes are fixed per capture (one capture per input signature), so static
            # kernels are both fastest and never recompile within a generation.
            dynamic=False,
            backend=self.backend,
            mode=self.mode,
            options=self.options or None,
        )

    def __str__(self) -> str:
        backend = self.backend
        if not isinstance(backend, str):
            backend = getattr(backend, "compiler_name", None) or getattr(backend, "__name__", type(backend).__name__)
        parts = [f"backend={backend!r}"]
        if self.mode:
            parts.append(f"mode={self.mode!r}")
        options = self.options or getattr(self.backend, "config", None)
        if options:
            parts.append(f"options={options!r}")
        return f"torch.compile({', '.join(parts)}) from {self.source}"


def from_config(config: DeepCacheConfig) -> Compiler | None:
    if not config.compile:
        return None
    return Compiler("inductor", config.compile_mode, dict(config.compile_options) or None, "compile=True")


_COMPILE_SIGNATURE = inspect.signature(torch.compile)


def from_arguments(args: tuple, kwargs: dict, source: str) -> Compiler | None:
    """The graphs' compiler for `module.compile(*args, **kwargs)` (torch.compile's keywords).

    fullgraph and dynamic are not used: the graphs are always compiled whole, with static
    shapes. Bad settings fail here, as torch.compile would fail, not at the first call.
    """
    try:
        bound = _COMPILE_SIGNATURE.bind(None, *args, **kwargs)
    except TypeError as e:
        raise TypeError(f"{source}: {e}; it takes torch.compile's keyword arguments") from None
    named = bound.arguments
    if named.get("disable"):
        return None
    backend = named.get("backend") or "inductor"
    mode, options = named.get("mode"), named.get("options")
    torch.compile(_validate, backend=backend, mode=mode, options=options)  # raises on bad settings
    return Compiler(backend, mode, dict(options) if options else None, source)


def _validate() -> None:
    """Compiled only to let torch.compile check a backend, mode and options; never called."""


def of_dynamo_context(context: Any, source: str) -> Compiler | None:
    """The compiler of a torch.compile wrapper's dynamo context (None: compile disabled)."""
    callback = getattr(context, "callback", None)
    if callback is None or callback is False or isinstance(context, _DisableContext):
        return None
    backend = callback
    while hasattr(backend, "_torchdynamo_orig_backend"):  # unwrap dynamo's frame converters
        backend = backend._torchdynamo_orig_backend
    return Compiler(backend, None, None, source)


def of_module(module: nn.Module) -> tuple[nn.Module, Compiler | None]:
    """(the plain module, its torch.compile setting or None) for a module given to
    `optimize`: `torch.compile(unet)` (an OptimizedModule) or `unet.compile()`."""
    if isinstance(module, OptimizedModule):
        return module._orig_mod, of_dynamo_context(module.dynamo_ctx, "torch.compile(unet) before dcfx.optimize")
    compiled = getattr(module, "_compiled_call_impl", None)
    if compiled is None:
        return module, None
    source = "unet.compile() before dcfx.optimize"
    for cell in getattr(compiled, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if isinstance(value, _DynamoContext):
            return module, of_dynamo_context(value, source)
    warnings.warn(
        f"dcfx could not read the torch.compile settings of {type(module).__name__}.compile(); "
        "the full and the shallow graph are compiled with torch.compile's defaults",
        stacklevel=3,
    )
    return module, Compiler(source=source)


def outer(cache: Any) -> tuple[bool, Compiler | None]:
    """Whether the calling module runs inside a torch.compile'd module (an OptimizedModule
    around it, or around a model that calls it), and the nearest such module's compiler.

    The wrapper is the `self` of one of the calling frames: found by walking up the Python
    frames, only while torch says an OptimizedModule call is running. `cache` (weak keys)
    keeps each wrapper's compiler.
    """
    if not _in_optimized_module():
        return False, None
    frame = _getframe(2)
    for _ in range(24):
        if frame is None:
            break
        owner = frame.f_locals.get("self") if "self" in frame.f_code.co_varnames else None
        if isinstance(owner, OptimizedModule):
            hit = cache.get(owner)
            if hit is None:
                hit = cache[owner] = (of_dynamo_context(owner.dynamo_ctx, "torch.compile(dcfx.optimize(unet))"),)
            return True, hit[0]
        frame = frame.f_back
    return False, None


class LazyGraph:
    """Runs `graph` eagerly, or compiled by a `Compiler` (compiled once per compiler, at its
    first call).

    Safe to call from several threads: runs share `TRACING`, a compiling first call holds it
    alone. Each compiler compiles its own copy of the GraphModule (same nodes, same weights):
    dynamo keeps compiled code per code object, so two compilers of one graph would count as
    recompiles of each other.
    """

    def __init__(self, graph: fx.GraphModule, name: str):
        self.graph = graph
        self.name = name
        self._compiled: dict[tuple, tuple[Compiler, Callable]] = {}
        self.compile_seconds: float | None = None

    def __call__(self, compiler: Compiler | None, *args: torch.Tensor) -> tuple:
        if compiler is None:
            with TRACING.shared():
                return self.graph(*args)
        hit = self._compiled.get(compiler.key)
        if hit is not None:
            with TRACING.shared():
                return hit[1](*args)
        with TRACING.exclusive():
            hit = self._compiled.get(compiler.key)
            if hit is not None:  # another thread compiled it while this one waited
                return hit[1](*args)
            fn = compiler.compile(_copy(self.graph))
            start = time.perf_counter()
            try:
                out = fn(*args)
            except Exception as e:  # noqa: BLE001 - reported, then the graph runs uncompiled
                out = self.graph(*args)  # an error of the call itself is raised here, plainly
                cause = getattr(e, "inner_exception", None) or e  # dynamo wraps backend errors
                message = str(cause).strip().splitlines()
                warnings.warn(
                    f"dcfx: {compiler} failed on the {self.name} graph "
                    f"({type(cause).__name__}: {message[0] if message else ''}); this graph runs uncompiled",
                    RuntimeWarning,
                    stacklevel=2,
                )
                fn = self.graph
            else:
                self.compile_seconds = time.perf_counter() - start
            self._compiled[compiler.key] = (compiler, fn)
            return out


def _copy(graph: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule with its own code object over the same nodes' copies and weights."""
    copied = fx.GraphModule(graph, copy.deepcopy(graph.graph), class_name=type(graph).__name__)
    copied.meta.update(graph.meta)
    return copied
