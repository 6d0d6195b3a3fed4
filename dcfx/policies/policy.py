"""`Policy`: a config's decisions, fixed (`fixed.py`) or adaptive (`adaptive.py`).

A fixed policy decides when a step starts, with integer arithmetic on the host: nothing is
read from the device, so a whole loop can be graph-captured. An adaptive one decides at the
step's first call from its signal (one scalar read on the host), after a warm-up.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..config import DeepCacheConfig
from .adaptive import SIGNALS, Signal
from .fixed import StepSchedule


class Policy:
    """A config's decisions. Per-generation state (run length, accumulated signal) lives in
    the generation's `state` dict, so it is per thread and per generation."""

    def __init__(self, config: DeepCacheConfig):
        self.config = config
        self.signal: Signal | None = SIGNALS[config.adaptive] if config.adaptive else None
        self.schedule = StepSchedule(config)
        default = self.signal.threshold if self.signal is not None else 0.0
        self.threshold = config.threshold if config.threshold is not None else default
        self.rescale = np.poly1d(config.rescale) if config.rescale else None

    @property
    def needs_num_steps(self) -> bool:
        return self.signal is None and self.schedule.needs_num_steps

    def first(self, state: dict[str, Any], index: int, num_steps: int | None) -> bool | None:
        """A new step's decision, or None when the signal decides (adaptive, after warm-up)."""
        if self.signal is None:
            return self.schedule.is_full(index, num_steps)
        if index < self.config.warmup or state.get("run", 0) >= self.config.max_shallow:
            return True
        return None

    def first_checked(self, state: dict[str, Any], index: int, num_steps: int | None) -> bool | None:
        """`first`, after checking that the generation's step count is known where the
        schedule needs it and fits a calibrated schedule."""
        if self.needs_num_steps and num_steps is None:
            raise RuntimeError(
                "schedule='nonuniform' needs the number of steps of each generation: use "
                "dcfx.enable(pipe, ...) with a pipeline, or call unet.begin(num_steps) before "
                "each generation; or choose schedule='uniform' or an explicit list"
            )
        calibration = self.config.calibration
        if index == 0:
            self.check_steps(num_steps)
        elif calibration is not None and index >= calibration.num_steps:
            raise ValueError(
                f"this schedule was calibrated for {calibration.num_steps} steps; this generation "
                f"has more: calibrate for its step count"
            )
        return self.first(state, index, num_steps)

    def check_steps(self, num_steps: int | None) -> None:
        """Refuse a generation of `num_steps` steps (when known) that a calibrated schedule
        is not fitted for."""
        calibration = self.config.calibration
        if calibration is not None and num_steps is not None and num_steps != calibration.num_steps:
            raise ValueError(
                f"this schedule was calibrated for {calibration.num_steps} steps "
                f"({calibration.scheduler_name}); this generation has {num_steps}: calibrate for it"
            )

    def decide(self, state: dict[str, Any], signal: float | None) -> bool:
        """The decision from the step's signal (None: not measurable yet, so full)."""
        if signal is None or not np.isfinite(signal):
            return True
        if self.signal is not None and self.signal.accumulates:
            change = float(self.rescale(signal)) if self.rescale is not None else signal
            total = state.get("accumulated", 0.0) + max(change, 0.0)
            state["accumulated"] = total
            return total >= self.threshold
        return signal >= self.threshold

    @staticmethod
    def record(state: dict[str, Any], full: bool) -> None:
        """Update the gate after the step's first call ran."""
        if full:
            state["run"] = 0
            state["accumulated"] = 0.0
        else:
            state["run"] = state.get("run", 0) + 1
