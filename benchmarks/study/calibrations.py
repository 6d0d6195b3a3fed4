"""The calibrated schedules the study's rows use, and what their calibrations measured.

Calibrations run on their own noise and labels (not the study's seeds) and are kept in
`TASKS_DIR/calibrations.json`, so the rows, and their finished tasks, stay the same from run
to run.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import torch

from .tasks import Study, pipeline


def _path(tasks_dir: Path) -> Path:
    return tasks_dir / "calibrations.json"


def read_calibrations(tasks_dir: Path) -> dict[str, Any]:
    """The calibrations kept in `tasks_dir`, by key ({} for none)."""
    path = _path(tasks_dir)
    return json.loads(path.read_text()) if path.exists() else {}


def calibrated_schedule(study: Study, tasks_dir: Path, scheduler: str, steps: int, budget: float) -> tuple[int, ...]:
    """`dcfx.calibrate`'s full steps for this scheduler, step count and budget (cached)."""
    import dcfx

    cache = read_calibrations(tasks_dir)
    key = f"{study.model_digest}:{scheduler}:{study.spacing}:{study.guidance}:{steps}:{budget}"
    if key not in cache:
        pipe = pipeline(study.model, scheduler, study.spacing)
        labels = [torch.arange(16) % 10] * 3  # three calibration generations of 16 samples
        config = dcfx.calibrate(pipe, labels, budget=budget, num_inference_steps=steps, guidance_scale=study.guidance,
                                generator=torch.Generator().manual_seed(1000))
        cache[key] = {"schedule": list(config.schedule), "correlations": dict(config.calibration.correlations),
                      "rescale": list(config.calibration.rescale)}
        tasks_dir.mkdir(parents=True, exist_ok=True)
        _path(tasks_dir).write_text(json.dumps(cache, indent=1) + "\n")
    return tuple(cache[key]["schedule"])


def signal_correlations(calibrations: dict[str, Any]) -> dict[str, tuple[float, float]]:
    """Each adaptive signal's Spearman correlation with the deep feature's true change over
    these calibrations: mean and spread (population std)."""
    values: dict[str, list[float]] = {}
    for record in calibrations.values():
        for name, value in record["correlations"].items():
            values.setdefault(name, []).append(value)
    return {n: (statistics.mean(v), statistics.pstdev(v)) for n, v in values.items()}
