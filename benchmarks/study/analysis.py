"""Measuring the study's finished tasks, and judging rows that exist against each other.

Cost, in full-U-Net-call equivalents per sample (plain DDIM 50 = 50; a CFG step is one batched
call): `dcfx.costs.history_cost` of the steps each generation actually ran, a shallow step
priced at the shallow/full FLOP fraction `dcfx.report` gives for its branch, so policies that
decide at run time are priced by what they did. A row's cost is its mean over seeds.

Quality, per (row, seed): PSNR and SSIM against the converged reference and against the plain
sampler at the same scheduler and steps, class accuracy and Fréchet distance to the held-out
digits (`dcfx.models.quality`).

Verdicts compare configurations that were run, never values between them: at a budget, the
best row of a kind is the one with the highest mean PSNR vs the reference among the rows of
that kind whose cost is at or under the budget. Differences are paired by seed (same noise);
"better"/"worse" only where the mean paired difference exceeds the std of the per-seed
differences.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch

from dcfx import DeepCacheConfig
from dcfx.costs import history_cost

from .methods import Method
from .tasks import Study, load_finished, pipeline

KINDS = ("plain", "uniform DeepCache", "dcfx policy")


@dataclass
class Row:
    """One method at one seed, measured."""

    method: Method
    seed: int
    history: str
    cost: float
    seconds: float
    metrics: dict[str, float]


def shallow_fractions(model: str | None, branches: Iterable[int], guidance: float) -> dict[int, float]:
    """Shallow/full FLOP fraction per branch, from dcfx.report on one (CFG-batched) call."""
    from dcfx.models import example_call
    from dcfx.report import report

    branches = sorted(set(branches))
    if not branches:
        return {}
    pipe = pipeline(model)
    call = example_call(pipe.unet, 1, guided=guidance > 1, tokens=pipe.label_embedding.config.tokens_per_class)
    r = report(pipe.unet, *call.args, branches=branches, **call.kwargs)
    return {b.branch: b.shallow_fraction for b in r.branches}


def cost_of(history: str, config: DeepCacheConfig | None, fraction: dict[int, float]) -> float:
    """Full-U-Net-call equivalents of one generation, from the steps it ran."""
    return history_cost(history, fraction[config.branch] if config is not None else 1.0)  # plain: full steps only


def measure(study: Study, methods: Sequence[Method], reference: Method, check: Method, seeds: Sequence[int],
            tasks_dir: Path, fraction: dict[int, float]) -> tuple[list[Row], dict[int, dict[str, float]]]:
    """Rows with their metrics, and per seed the reference's convergence check."""
    from dcfx.models.quality import judge as make_judge, psnr, ssim

    judge = make_judge()
    rows, checks = [], {}
    for seed in seeds:
        ref_task, check_task = (load_finished(study, tasks_dir, m, seed) for m in (reference, check))
        ref_images, chk = torch.from_numpy(ref_task["images"]), torch.from_numpy(check_task["images"])
        per_image = [psnr(chk[i : i + 1], ref_images[i : i + 1]) for i in range(len(chk))]
        checks[seed] = {"psnr": psnr(chk, ref_images), "ssim": ssim(chk, ref_images), "min_psnr": min(per_image),
                        "seconds": ref_task["seconds"] + check_task["seconds"]}
        loaded: dict[Method, dict] = {}
        images = lambda m: torch.from_numpy(loaded.setdefault(m, load_finished(study, tasks_dir, m, seed))["images"])  # noqa: E731
        for m in methods:
            x = images(m)
            metrics = {"psnr_ref": psnr(x, ref_images), "ssim_ref": ssim(x, ref_images)}
            if m.config is not None:
                plain = images(m.plain)
                metrics.update(psnr_plain=psnr(x, plain), ssim_plain=ssim(x, plain))
            labels = torch.arange(len(x)) % 10
            metrics.update(accuracy=judge.accuracy(x, labels), frechet=judge.frechet_to_test(x))
            history = loaded[m]["history"]
            rows.append(Row(m, seed, history, cost_of(history, m.config, fraction), loaded[m]["seconds"], metrics))
    return rows, checks


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    values = list(values)
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def families(rows: Sequence[Row]) -> dict[str, list[Method]]:
    """family -> its methods, in first-seen order (plain families first)."""
    out: dict[str, list[Method]] = {}
    for r in sorted(rows, key=lambda r: r.method.kind != "plain"):
        group = out.setdefault(r.method.family, [])
        if r.method not in group:
            group.append(r.method)
    return out


@dataclass(frozen=True)
class Measured:
    """One method over its seeds."""

    method: Method
    rows: tuple[Row, ...]

    def per_seed(self, metric: str) -> dict[int, float]:
        return {r.seed: r.metrics[metric] for r in self.rows}

    @property
    def cost(self) -> float:
        """Mean over seeds (the seeds of an adaptive policy may run different steps)."""
        return statistics.fmean(r.cost for r in self.rows)

    @property
    def psnr(self) -> float:
        """Mean PSNR vs the reference over seeds: what "best" ranks by."""
        return statistics.fmean(r.metrics["psnr_ref"] for r in self.rows)


def by_method(rows: Sequence[Row]) -> list[Measured]:
    """The rows grouped by method, in first-seen order."""
    groups: dict[Method, list[Row]] = {}
    for r in rows:
        groups.setdefault(r.method, []).append(r)
    return [Measured(m, tuple(g)) for m, g in groups.items()]


# Costs are sums of FLOP fractions: a row priced at the budget must not lose to rounding.
_COST_EPS = 1e-9


def best_row(measured: Iterable[Measured], budget: float, *, kind: str | None = None,
             family: str | None = None) -> Measured | None:
    """Of the rows of `kind` (or of `family`) that cost at most `budget`, the one with the best
    mean PSNR vs the reference; None where no such row is that cheap."""
    if (kind is None) == (family is None):
        raise ValueError("best_row takes a kind or a family")
    if kind is not None and kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; one of {', '.join(KINDS)}")
    fits = [m for m in measured if (m.method.kind == kind if kind is not None else m.method.family == family)
            and m.cost <= budget + _COST_EPS]
    return max(fits, key=lambda m: m.psnr, default=None)


def paired(a: Measured, b: Measured, metric: str = "psnr_ref") -> tuple[float, float]:
    """Mean and std over seeds of a - b in `metric` (same noise per seed); std is nan with one seed."""
    x, y = a.per_seed(metric), b.per_seed(metric)
    diffs = [x[s] - y[s] for s in x if s in y]
    mean, std = mean_std(diffs)
    return mean, (std if len(diffs) > 1 else float("nan"))


def verdict(mean: float, spread: float, higher_is_better: bool = True) -> str:
    """'better'/'worse' only where the mean paired difference exceeds its spread over seeds."""
    if math.isnan(spread):
        return "one seed: no spread"
    if abs(mean) <= spread:
        return "no difference"
    return "better" if (mean > 0) == higher_is_better else "worse"


@dataclass(frozen=True)
class Goal:
    """At one budget: the best row of each kind at or under it, and the best dcfx policy's
    paired differences (mean, std) to the best plain and the best uniform DeepCache row."""

    budget: float
    plain: Measured | None
    uniform: Measured | None
    policy: Measured | None
    vs_plain: tuple[float, float] | None
    vs_uniform: tuple[float, float] | None
    accuracy_vs_plain: tuple[float, float] | None
    state: str  # "met", "not met", or "not judged" (a kind has no row that cheap)


def goal_at(measured: Sequence[Measured], budget: float, goal_db: float) -> Goal:
    """Whether the best dcfx policy at or under `budget` is `goal_db` above the best plain and
    the best uniform DeepCache row there, with class accuracy no more than 1 point below plain's."""
    plain, uniform, policy = (best_row(measured, budget, kind=k) for k in KINDS)
    vs_plain = paired(policy, plain) if policy and plain else None
    vs_uniform = paired(policy, uniform) if policy and uniform else None
    accuracy = paired(policy, plain, "accuracy") if policy and plain else None
    if vs_plain is None or vs_uniform is None or accuracy is None:
        state = "not judged"
    else:
        met = vs_plain[0] >= goal_db and vs_uniform[0] >= goal_db and accuracy[0] >= -0.01
        state = "met" if met else "not met"
    return Goal(budget, plain, uniform, policy, vs_plain, vs_uniform, accuracy, state)


@dataclass(frozen=True)
class RowVerdict:
    """A dcfx row against the best plain row at or under its cost, and (for a policy other than
    uniform DeepCache) the best uniform DeepCache row there."""

    row: Measured
    plain: Measured | None
    uniform: Measured | None
    vs_plain: tuple[float, float] | None
    vs_uniform: tuple[float, float] | None
    accuracy_vs_plain: tuple[float, float] | None

    @property
    def verdict(self) -> str:
        return verdict(*self.vs_plain) if self.vs_plain else "—"


def row_verdicts(measured: Sequence[Measured]) -> list[RowVerdict]:
    out = []
    for m in measured:
        if m.method.config is None:
            continue
        plain = best_row(measured, m.cost, kind="plain")
        uniform = best_row(measured, m.cost, kind="uniform DeepCache") if m.method.kind == "dcfx policy" else None
        out.append(RowVerdict(m, plain, uniform, paired(m, plain) if plain else None,
                              paired(m, uniform) if uniform else None,
                              paired(m, plain, "accuracy") if plain else None))
    return out
