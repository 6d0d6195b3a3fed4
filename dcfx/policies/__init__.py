"""Policies: which steps run the deep path.

- `fixed`: uniform, the paper's non-uniform schedule, or an explicit list (a calibrated one
  among them); integer arithmetic on the host, nothing read from the device;
- `adaptive`: gates on one scalar signal per step, and the signals (`SIGNALS`);
- `policy`: `Policy`, a config's decisions, as the runtime asks for them;
- `forecast`: the forecast's host side (the feature history a full step updates);
- `calibrate`: calibration's fit (the dynamic program, the rescale polynomial, the
  `Calibration` record and the checks that hold a calibrated config to its model and
  scheduler). `dcfx.calibrate` runs the generations it fits.

Policies know nothing of graphs or of the runtime: the runtime asks them.
"""

from .adaptive import DEFAULT_THRESHOLDS, SIGNALS, Signal, latent_change, relative_l1
from .fixed import StepSchedule, nonuniform_full_steps
from .policy import Policy

__all__ = [
    "DEFAULT_THRESHOLDS",
    "SIGNALS",
    "Policy",
    "Signal",
    "StepSchedule",
    "latent_change",
    "nonuniform_full_steps",
    "relative_l1",
]
