"""Compile: a plain GraphModule -> a callable, optionally through torch.compile.

A `Compiler` is one torch.compile setting (backend, mode, options). It comes from the config
(`compile=True`), from `DeepCacheUNet.compile(...)`, from a U-Net compiled before `optimize`
(`unet.compile(...)`, `torch.compile(unet)`), or, per call, from a `torch.compile` wrapped
around the DeepCacheUNet: in every case the full and the shallow graph are what gets compiled
(fullgraph, static shapes: one capture per input signature), never the per-step host logic.
Which setting a call uses is decided per call from the calling thread's own stack (a wrapper
there, else the module's own setting), so threads running under different wrappers never
take each other's.

Disabled means nothing is compiled: `compile(disable=True)` (on the U-Net before `optimize`,
or on the DeepCacheUNet), `torch.compiler.disable(...)` around either, and
`TORCHDYNAMO_DISABLE=1` (torch.compile then returns its argument unchanged, which is how dcfx
sees it) all run the graphs uncompiled, whatever the config says.

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
import dataclasses
import inspect
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import fx, nn

from . import _torch_private as _private
from .config import DeepCacheConfig
from .options import inductor_twins
from .passes.fuse import inductor_ops


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
    """The graphs' compiler for `module.compile(*args, **kwargs)` (torch.compile's keywords);
    None when that compile is disabled (`disable=True`, or `TORCHDYNAMO_DISABLE=1`).

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
    # Raises on bad settings; returns its argument unchanged when dynamo is disabled.
    if torch.compile(_validate, backend=backend, mode=mode, options=options) is _validate:
        return None
    return Compiler(backend, mode, dict(options) if options else None, source)


def _validate() -> None:
    """Compiled only to let torch.compile check a backend, mode and options; never called."""


def _from_backend(backend: Any, source: str) -> Compiler | None:
    return None if backend is None else Compiler(backend, None, None, source)


def of_module(module: nn.Module) -> tuple[nn.Module, bool, Compiler | None]:
    """For a module given to `optimize`: (the plain module, whether it carries a
    torch.compile setting, that setting's compiler or None when it compiles nothing).

    Carrying a setting: a torch.compile wrapper (`torch.compile(unet)`,
    `torch.compiler.disable(unet)`) or a module compiled in place (`unet.compile(...)`,
    also with `disable=True` or under `TORCHDYNAMO_DISABLE=1`).
    """
    plain = _private.unwrap_compiled(module)
    if plain is not module:
        return plain, True, _from_backend(_private.wrapper_backend(module), "torch.compile(unet) before dcfx.optimize")
    backend = _private.in_place_compile_backend(module)
    if backend is _private.NOT_COMPILED:
        return module, False, None
    source = "unet.compile() before dcfx.optimize"
    if backend is _private.UNREADABLE:
        warnings.warn(
            f"dcfx could not read the torch.compile settings of {type(module).__name__}.compile() "
            f"(torch {torch.__version__}); the full and the shallow graph are compiled with "
            "torch.compile's defaults",
            stacklevel=3,
        )
        return module, True, Compiler(source=source)
    return module, True, _from_backend(backend, source)


def with_compiler(config: DeepCacheConfig, compiler: Compiler | None) -> DeepCacheConfig:
    """`config` with its compile fields saying what `compiler` does: off for None, inductor's
    mode and options for an inductor compiler named by string; other backends are not
    config fields, so those leave it as it is."""
    if compiler is None:
        return dataclasses.replace(config, compile=False, compile_mode=None, compile_options={})
    if isinstance(compiler.backend, str) and compiler.backend == "inductor":
        return dataclasses.replace(
            config, compile=True, compile_mode=compiler.mode, compile_options=compiler.options or {}
        )
    return config


def outer(cache: Any) -> tuple[bool, Compiler | None]:
    """Whether this call runs inside a torch.compile wrapper (one around the calling module,
    or around a model that calls it), and the innermost such wrapper's compiler (None: it
    compiles nothing, e.g. `torch.compiler.disable`).

    Decided from the calling thread's own stack, so threads (and calls) that run under
    different wrappers, or under none, each get their own answer. `cache` (weak keys) keeps
    each wrapper's compiler.
    """
    wrapper = _private.enclosing_compile_wrapper()
    if wrapper is None:
        return False, None
    hit = cache.get(wrapper)
    if hit is None:
        hit = cache[wrapper] = (_from_backend(_private.wrapper_backend(wrapper), "torch.compile(dcfx.optimize(unet))"),)
    return True, hit[0]


class LazyCompiled:
    """A graph that runs eagerly, or compiled by a `Compiler` (compiled once per compiler, at
    its first call).

    Safe to call from several threads: runs share `TRACING`, a compiling first call holds it
    alone. Each compiler compiles its own copy of the GraphModule (same nodes, same weights):
    dynamo keeps compiled code per code object, so two compilers of one graph would count as
    recompiles of each other. On CUDA, with DCFX_INDUCTOR_TWINS=1, that copy calls the cut
    ops' triton_op twins (`passes.fuse.inductor_ops`), whose Triton kernels inductor sees.
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
            copied = _copy(self.graph)
            if inductor_twins() and any(isinstance(a, torch.Tensor) and a.is_cuda for a in args):
                inductor_ops(copied)  # inductor launches the cut's Triton kernels itself
            fn = compiler.compile(copied)
            if fn is copied:  # torch.compile did nothing: dynamo is disabled (TORCHDYNAMO_DISABLE=1)
                self._compiled[compiler.key] = (compiler, self.graph)
                return self.graph(*args)
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
