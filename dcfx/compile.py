"""Compile: a plain GraphModule -> a callable, optionally through torch.compile (inductor).

Each graph is compiled lazily, at its first call, so a generation that never takes a shallow
step never compiles the shallow graph; the time of that first call is recorded, because
compile time is the user's first-image latency.
"""

from __future__ import annotations

import time
from typing import Callable

import torch
from torch import fx

from .config import DeepCacheConfig


class LazyGraph:
    """Runs `graph` eagerly, or compiled with the config's torch.compile settings."""

    def __init__(self, graph: fx.GraphModule, config: DeepCacheConfig, name: str):
        self.graph = graph
        self.name = name
        self._config = config
        self._fn: Callable | None = None if config.compile else graph
        self.compile_seconds: float | None = None

    def __call__(self, *args: torch.Tensor) -> tuple:
        if self._fn is not None:
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
