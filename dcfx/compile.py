"""Compile: a plain GraphModule -> a callable, optionally through torch.compile (inductor).

Each graph is compiled lazily, at its first call, so a generation that never takes a shallow
step never compiles the shallow graph; the time of that first call is recorded, because
compile time is the user's first-image latency.

Tracing (torch.export, and torch.compile's AOT tracing) patches `torch.nn.Module.__call__`
process-wide while it runs, so a module called from another thread meanwhile is traced into
the wrong graph or breaks the trace. `TRACING` orders the two: graph runs share it, a trace
holds it alone.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Callable, Iterator

import torch
from torch import fx

from .config import DeepCacheConfig


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


class LazyGraph:
    """Runs `graph` eagerly, or compiled with the config's torch.compile settings.

    Safe to call from several threads: runs share `TRACING`, the compiling first call holds it
    alone (and compiles once).
    """

    def __init__(self, graph: fx.GraphModule, config: DeepCacheConfig, name: str):
        self.graph = graph
        self.name = name
        self._config = config
        self._fn: Callable | None = None if config.compile else graph
        self.compile_seconds: float | None = None

    def __call__(self, *args: torch.Tensor) -> tuple:
        fn = self._fn
        if fn is not None:
            with TRACING.shared():
                return fn(*args)
        with TRACING.exclusive():
            if self._fn is not None:  # another thread compiled it while this one waited
                return self._fn(*args)
            c = self._config
            fn = torch.compile(
                self.graph,
                fullgraph=True,
                # Shapes are fixed per capture (one capture per input signature), so static
                # kernels are both fastest and never recompile within a generation.
                dynamic=False,
                mode=c.compile_mode,
                options=dict(c.compile_options) or None,
            )
            start = time.perf_counter()
            out = fn(*args)
            self.compile_seconds = time.perf_counter() - start
            self._fn = fn
            return out
