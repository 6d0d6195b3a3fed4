"""Policies: which steps run the deep path.

- Fixed (`schedule.py`): uniform, non-uniform or an explicit list (a calibrated one among
  them). Integer arithmetic on the host; nothing is read from the device, so a whole loop can
  be graph-captured.
- Adaptive: a gate on one scalar signal of the step. The first `warmup` steps of a generation
  are full; after that a step is full when its signal reaches the threshold, or when
  `max_shallow` shallow steps ran in a row. One decision holds for the whole step: every batch
  element (the largest change wins) and every call of the step (the first call decides). The
  signal costs one device-to-host read of one scalar per step, and nothing else:
  - "cut": the relative L1 change of the fresh feature at the cut (`s_b`, computed by the
    head graph) since the last full step: First-Block-Cache's signal, at a U-Net's cut;
  - "accumulated": its change since the previous step, mapped through the `rescale`
    polynomial that `dcfx.calibrate` fits to the deep feature's true change, summed since the
    last full step: TeaCache's idea;
  - "latent": the third-order difference of the last four samples relative to their
    first-order difference (AdaptiveDiffusion's signal); needs no head graph.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .config import DeepCacheConfig
from .schedule import StepSchedule

# Default thresholds, chosen on the embedded digits model (benchmarks/fidelity_study.py) for
# about the FLOPs of a uniform interval-3 schedule.
DEFAULT_THRESHOLDS = {"cut": 0.2, "accumulated": 0.2, "latent": 0.25}


def relative_l1(x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """max over batch rows of mean|x - reference| / mean|reference| (a 0-d float32 tensor)."""
    x, reference = x.float().flatten(1), reference.float().flatten(1)
    change = (x - reference).abs().mean(1) / reference.abs().mean(1).clamp_min(1e-12)
    return change.max()


def latent_change(sample: torch.Tensor, previous: list[torch.Tensor]) -> torch.Tensor:
    """max over batch rows of |third-order difference| / |first-order difference| of the
    samples (newest first: `sample`, then the last three)."""
    x0, x1, x2, x3 = (t.float().flatten(1) for t in (sample, *previous))
    third = (x0 - 3 * x1 + 3 * x2 - x3).abs().mean(1)
    first = (x0 - x1).abs().mean(1).clamp_min(1e-12)
    return (third / first).max()


class Policy:
    """A config's decisions. Per-generation state (run length, accumulated signal) lives in
    the generation's `state` dict, so it is per thread and per generation."""

    def __init__(self, config: DeepCacheConfig):
        self.config = config
        self.adaptive = config.adaptive
        self.schedule = StepSchedule(config)
        self.threshold = config.threshold if config.threshold is not None else DEFAULT_THRESHOLDS.get(self.adaptive or "", 0.0)
        self._rescale = np.poly1d(config.rescale) if config.rescale else None

    @property
    def needs_num_steps(self) -> bool:
        return self.adaptive is None and self.schedule.needs_num_steps

    def first(self, state: dict[str, Any], index: int, num_steps: int | None) -> bool | None:
        """A new step's decision, or None when the signal decides (adaptive, after warm-up)."""
        if self.adaptive is None:
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
        was not fitted for."""
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
        if self.adaptive == "accumulated":
            change = float(self._rescale(signal)) if self._rescale is not None else signal
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
