"""Calibration's fit: a static schedule, for a budget, from generations run all full.

`dcfx.calibrate` runs a few generations with every step full; `Recorder` keeps, per stream
and step, the deep feature the cut caches (`h`), the fresh feature at the cut (`s`) and the
sample. From them `fit` makes:
- `error[j][k]`, the relative L1 distance between the deep features of steps j < k: what
  step k loses by reusing step j's feature, averaged over the calibration runs;
- the full steps: `count` of them, step 0 included, chosen by dynamic programming to
  minimise the summed error of every shallow step against its last full step (the
  accumulated change of the deep feature);
- the "accumulated" signal's rescale polynomial (TeaCache's calibration): the step-to-step
  change of `s` fitted to that of `h`;
- how well each adaptive signal predicts the true change of `h` (Spearman rank correlation
  over steps and runs).
The result is a config with an explicit schedule, so a whole loop can be graph-captured (no
host reads), and a `Calibration` record that keys it to the model, scheduler and step count,
which `check_model` and `check_scheduler` hold any later use to.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config import Calibration, DeepCacheConfig
from .adaptive import latent_change, relative_l1


def choose_full_steps(error: np.ndarray, count: int) -> tuple[int, ...]:
    """The `count` full steps (step 0 among them) minimising sum_k error[last_full(k)][k].

    `error` is a T x T matrix with error[j][k] (j < k) the cost of step k reusing step j's
    feature. Dynamic programming over (number of full steps, last full step): O(T^2 count).
    """
    T = error.shape[0]
    if not 1 <= count <= T:
        raise ValueError(f"count must be in 1..{T}, got {count}")
    # run[j][k]: cost of steps j+1..k-1 all reusing j (shallow), i.e. segment cost.
    prefix = np.zeros((T, T + 1))
    for j in range(T):
        prefix[j, j + 1:] = np.cumsum(np.concatenate([[0.0], error[j, j + 1:]]))[: T - j]
    def segment(j: int, end: int) -> float:  # steps j+1 .. end-1 reuse j
        return prefix[j, end] - prefix[j, j + 1] if end > j + 1 else 0.0
    inf = float("inf")
    best = np.full((count + 1, T), inf)  # best[m][j]: m full steps so far, the last at j
    back = np.zeros((count + 1, T), dtype=int)
    best[1][0] = 0.0
    for m in range(2, count + 1):
        for j in range(1, T):
            candidates = [best[m - 1][i] + segment(i, j) for i in range(j)]
            i = int(np.argmin(candidates))
            best[m][j], back[m][j] = candidates[i], i
    totals = [best[count][j] + segment(j, T) for j in range(T)]
    last = int(np.argmin(totals))
    steps = [last]
    for m in range(count, 1, -1):
        last = int(back[m][last])
        steps.append(last)
    return tuple(sorted(steps))


@dataclasses.dataclass
class Run:
    """One stream's generation as calibration saw it."""

    features: list[torch.Tensor] = dataclasses.field(default_factory=list)  # h per step
    fresh: list[torch.Tensor] = dataclasses.field(default_factory=list)  # s per step
    samples: list[torch.Tensor] = dataclasses.field(default_factory=list)


class Recorder:
    """Keeps the full steps the runtime shows it (`FullStep` records), per stream's generation."""

    def __init__(self) -> None:
        self.runs: dict[tuple[int, int], Run] = {}  # (generation, stream id) -> run

    def __call__(self, full_step: Any) -> None:
        run = self.runs.setdefault((full_step.generation, id(full_step.stream)), Run())
        if full_step.step != len(run.features):
            return  # a second call of the step in this stream (an exact re-run): keep the first
        run.features.append(full_step.feature.detach().float().clone())
        run.fresh.append(full_step.fresh.detach().float().clone())
        run.samples.append(full_step.sample.detach().float().clone())

    def step_count(self) -> int:
        """The calibrated generations' step count (they must agree)."""
        runs = self.complete()
        if not runs:
            raise ValueError("calibration ran no U-Net call: check the prompts or the loop")
        lengths = {len(r.features) for r in runs}
        if len(lengths) != 1:
            raise ValueError(
                f"calibration generations differ in length ({sorted(lengths)} steps): calibrate one step count at a time"
            )
        return lengths.pop()

    def complete(self) -> list[Run]:
        return [r for r in self.runs.values() if r.features]


def fit(runs: list[Run], count: int, *, unet: nn.Module, scheduler: Any, budget: float, branch: int,
        forecast: int, first_blocks: int | None = None, last_blocks: int | None = None) -> DeepCacheConfig:
    """The explicit-schedule config with `count` full steps that `runs` (all of one step count)
    call for, at the cut `branch` (a transformer's: `first_blocks`, `last_blocks`), with its
    `Calibration` record (see the module docstring)."""
    num_steps = len(runs[0].features)
    error = np.zeros((num_steps, num_steps))
    for run in runs:
        for k in range(num_steps):
            for j in range(k):
                error[j, k] += _rel(run.features[k], run.features[j])
    error /= len(runs)
    schedule = choose_full_steps(error, count)
    rescale, correlations = _signals(runs)
    calibration = Calibration(
        model=model_digest(unet),
        model_name=type(unet).__name__,
        scheduler=scheduler_digest(scheduler),
        scheduler_name=type(scheduler).__name__ if scheduler is not None else "",
        num_steps=num_steps,
        budget=float(budget),
        rescale=rescale,
        correlations=correlations,
    )
    return DeepCacheConfig(schedule=schedule, branch=branch, forecast=forecast, first_blocks=first_blocks,
                           last_blocks=last_blocks, calibration=calibration)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(relative_l1(a, b))


# Gaps (steps since the last full step) over which the signals are judged.
_GAPS = range(1, 6)


def _signals(runs: list[Run]) -> tuple[tuple[float, ...], tuple[tuple[str, float], ...]]:
    """(the "accumulated" rescale polynomial, each signal's Spearman correlation with the deep
    feature's true change since a full step, over gaps of 1..5 steps, and step to step)."""
    steps_x, steps_y = [], []
    for run in runs:
        for k in range(1, len(run.features)):
            steps_x.append(_rel(run.fresh[k], run.fresh[k - 1]))
            steps_y.append(_rel(run.features[k], run.features[k - 1]))
    degree = min(2, max(len(set(steps_x)) - 1, 0))
    rescale = tuple(float(c) for c in np.polyfit(steps_x, steps_y, degree)) if len(steps_x) > degree else ()
    poly = np.poly1d(rescale) if rescale else (lambda v: v)
    pairs: dict[str, tuple[list[float], list[float]]] = {n: ([], []) for n in ("cut", "accumulated", "latent")}
    per_step: dict[str, tuple[list[float], list[float]]] = {n: ([], []) for n in ("cut", "latent")}
    for run in runs:
        T = len(run.features)
        step_change = [0.0] + [_rel(run.fresh[k], run.fresh[k - 1]) for k in range(1, T)]
        latent = [float("nan")] * min(T, 3) + [
            float(latent_change(run.samples[k], [run.samples[k - 1], run.samples[k - 2], run.samples[k - 3]]))
            for k in range(3, T)
        ]
        for k in range(1, T):
            truth = _rel(run.features[k], run.features[k - 1])
            per_step["cut"][0].append(step_change[k]), per_step["cut"][1].append(truth)
            if k >= 3:
                per_step["latent"][0].append(latent[k]), per_step["latent"][1].append(truth)
            for gap in _GAPS:
                j = k - gap
                if j < 0:
                    continue
                truth = _rel(run.features[k], run.features[j])
                pairs["cut"][0].append(_rel(run.fresh[k], run.fresh[j]))
                pairs["accumulated"][0].append(float(sum(max(float(poly(step_change[i])), 0.0) for i in range(j + 1, k + 1))))
                pairs["cut"][1].append(truth), pairs["accumulated"][1].append(truth)
                if j >= 3:
                    pairs["latent"][0].append(float(sum(latent[i] for i in range(j + 1, k + 1))))
                    pairs["latent"][1].append(truth)
    correlations = [(f"{name} since full", spearman(*xy)) for name, xy in pairs.items()]
    correlations += [(f"{name} per step", spearman(*xy)) for name, xy in per_step.items()]
    return rescale, tuple(correlations)


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation (average ranks for ties); nan for fewer than 3 points."""
    if len(x) < 3:
        return float("nan")
    rx, ry = _ranks(np.asarray(x, float)), _ranks(np.asarray(y, float))
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def _ranks(v: np.ndarray) -> np.ndarray:
    order = np.argsort(v, kind="stable")
    ranks = np.empty(len(v))
    ranks[order] = np.arange(len(v), dtype=float)
    for value in np.unique(v):  # ties share their average rank
        tied = v == value
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks


def model_digest(unet: nn.Module) -> str:
    """The U-Net's class, config and a weight fingerprint (its first and last parameters'
    sums: two small device reads), hashed: what a calibration is keyed to."""
    h = hashlib.sha256(type(unet).__name__.encode())
    config = getattr(unet, "config", None)
    if config is not None:
        h.update(json.dumps({k: v for k, v in dict(config).items() if not k.startswith("_")}, sort_keys=True, default=str).encode())
    params = list(unet.parameters())
    for p in (params[:1] + params[-1:]) if params else []:
        if p.device.type != "meta":
            with torch.no_grad():
                h.update(f"{float(p.detach().double().sum()):.6e}".encode())
    return h.hexdigest()[:16]


def scheduler_digest(scheduler: Any) -> str:
    """The scheduler's class and config, hashed ('' for none)."""
    if scheduler is None:
        return ""
    config = getattr(scheduler, "config", None)
    items = {k: v for k, v in dict(config).items() if not k.startswith("_")} if config is not None else {}
    # By class name: `dcfx.enable`'s announcing subclass has its base class's name.
    h = hashlib.sha256(type(scheduler).__name__.encode())
    h.update(json.dumps(items, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def check_model(config: DeepCacheConfig, unet: nn.Module) -> None:
    """Refuse a calibrated config on another model."""
    c = config.calibration
    if c is not None and model_digest(unet) != c.model:
        raise ValueError(
            f"this schedule was calibrated for another model ({c.model_name} {c.model}); this "
            f"{type(unet).__name__} has another config or other weights ({model_digest(unet)}): "
            f"run dcfx.calibrate on it"
        )


def check_scheduler(config: DeepCacheConfig, scheduler: Any) -> None:
    """Refuse a calibrated config with another scheduler (class or configuration)."""
    c = config.calibration
    if c is not None and c.scheduler and scheduler is not None and scheduler_digest(scheduler) != c.scheduler:
        raise ValueError(
            f"this schedule was calibrated with {c.scheduler_name} ({c.scheduler}); this pipeline "
            f"runs {type(scheduler).__name__} ({scheduler_digest(scheduler)}): calibrate with its scheduler"
        )
