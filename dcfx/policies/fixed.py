"""Which denoising steps are full: uniform, the paper's non-uniform schedule, or explicit.

A step is one call of the U-Net within a generation, counted from 0. Everything here is
integer arithmetic on the host, computed once per step count.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from ..config import DeepCacheConfig, integer


def nonuniform_full_steps(num_steps: int, interval: int, center: int = 15, power: float = 1.4) -> tuple[int, ...]:
    """Full steps of the paper's non-uniform schedule (eq. 7), as the reference computes it.

    ceil(num_steps / interval) steps, denser around `center`. The reference samples
    x = linspace((-c)^(1/p), (T-c)^(1/p), k+1), keeps the distinct truncated real parts of
    x^p and shifts them by c; when that does not give exactly k steps it lowers p by 0.02 and
    tries again. Bit for bit as the reference (`sample_from_quad_center`, DeepCache 0.1.1):
    the two end points are Python `**` (complex for a negative base, a real 0.0 for c = 0),
    the rest is numpy; other roundings pick other steps in a few configurations.
    """
    num_steps = integer("num_steps", num_steps, minimum=1, kind="")
    interval = integer("interval", interval, minimum=1)
    center = integer("center", center, minimum=0)
    k = math.ceil(num_steps / interval)
    if k >= num_steps:
        return tuple(range(num_steps))
    p = float(power)
    while p > 1:
        x = np.linspace((-center) ** (1 / p), (num_steps - center) ** (1 / p), k + 1)
        # np.real, then truncation towards zero: what the reference's np.int32(x**p) does
        # (numpy drops the imaginary part of a complex array, with a warning).
        v = np.unique(np.real(x**p).astype(np.int32))
        steps = (0, *(int(u) + center for u in v[1:-1]))
        if len(steps) == k:
            return steps
        p -= 0.02
    raise ValueError(
        f"no non-uniform schedule with {k} distinct full steps for num_steps={num_steps}, "
        f"interval={interval}, center={center}, power={power} (the reference lowers the power "
        f"towards 1 and finds none either): choose another center (0..{num_steps - 1}), a larger "
        f"interval or power, or schedule='uniform'"
    )


class StepSchedule:
    """Answers "is step i full?" for a config; non-uniform needs the generation's step count."""

    def __init__(self, config: DeepCacheConfig):
        self._config = config

    @property
    def needs_num_steps(self) -> bool:
        return self._config.schedule == "nonuniform"

    def full_steps(self, num_steps: int) -> tuple[int, ...]:
        """The full step indices of a generation of `num_steps` U-Net calls."""
        return tuple(i for i in range(num_steps) if self.is_full(i, num_steps))

    def is_full(self, step: int, num_steps: int | None = None) -> bool:
        c = self._config
        if step == 0:
            return True
        if not isinstance(c.schedule, str):
            return step in _explicit_set(c.schedule)  # the list alone decides, whatever the interval
        if c.interval == 1:
            return True
        if c.schedule == "uniform":
            return step % c.interval == 0
        if num_steps is None:  # non-uniform
            raise RuntimeError(
                "schedule='nonuniform' needs the number of steps of the generation: use "
                "dcfx.enable(pipe, ...) or call unet.begin(num_steps) before each generation"
            )
        return step in _nonuniform_set(num_steps, c.interval, c.center, c.power)


@functools.lru_cache(maxsize=64)
def _nonuniform_set(num_steps: int, interval: int, center: int, power: float) -> frozenset[int]:
    return frozenset(nonuniform_full_steps(num_steps, interval, center, power))


@functools.lru_cache(maxsize=64)
def _explicit_set(steps: tuple[int, ...]) -> frozenset[int]:
    return frozenset(steps)
