"""Writing the study down: the markdown tables, the CSV (one row per method and seed) and the
frontier plot (matplotlib, imported only for it)."""

from __future__ import annotations

import csv
import json
import math
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .analysis import Measured, Row, best_row, by_method, families, goal_at, mean_std, row_verdicts
from .calibrations import signal_correlations
from .methods import Method, config_fields
from .tasks import Study


@dataclass(frozen=True)
class Run:
    """What the report says about the invocation that made it."""

    study: Study
    reference: Method
    check: Method
    fraction: dict[int, float]  # shallow/full FLOP fraction per branch
    budgets: Sequence[float]
    goal_db: float
    command: str  # the arguments it was given
    calibrations: dict[str, Any]  # calibrations.json's records
    seconds: float  # this invocation's sampling
    executed: int  # tasks this invocation ran


def _ms(values: Sequence[float], digits: int = 1, scale: float = 1.0) -> str:
    m, s = mean_std([scale * v for v in values])
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def _cost(values: Sequence[float]) -> str:
    """A cost: one number when every seed ran the same steps (static schedules), else mean ± std."""
    return f"{values[0]:.2f}" if len(set(values)) == 1 else _ms(values, 2)


def _diff(d: tuple[float, float] | None, digits: int = 1, scale: float = 1.0) -> str:
    if d is None:
        return "—"
    spread = "" if math.isnan(d[1]) else f" ± {scale * d[1]:.{digits}f}"
    mean = round(scale * d[0], digits) + 0.0  # no "-0.0"
    return f"{mean:+.{digits}f}{spread}"


def _psnr(m: Measured | None) -> str:
    return _ms(list(m.per_seed("psnr_ref").values())) if m else "—"


def _named(m: Measured | None, none: str = "none at or under") -> str:
    """A row by its label and cost, as a verdict names the row that won."""
    return f"{m.method.label} ({m.cost:.2f})" if m else none


def _header(rows: Sequence[Row], checks: dict, run: Run) -> list[str]:
    from dcfx.models.quality import judge

    study, seeds = run.study, sorted(checks)
    shallow = ", ".join(f"b={b} {100 * f:.1f}%" for b, f in sorted(run.fraction.items()))
    minutes = (sum(r.seconds for r in rows) + sum(c["seconds"] for c in checks.values())) / 60
    return [
        f"Digits model (guidance {study.guidance:g}), {study.samples} samples x {len(seeds)} seeds "
        f"({', '.join(map(str, seeds))}) per row, timestep spacing '{study.spacing}', {study.threads} torch thread(s) "
        f"per task; mean ± std over seeds. Judge: accuracy {100 * judge().test_accuracy:.1f}% on the held-out digits. "
        f"Cost in full-U-Net-call equivalents per sample"
        + (f" (shallow step: {shallow} of a full one, dcfx.report)" if shallow else "")
        + f". `python benchmarks/fidelity_study.py {run.command}`".rstrip()
        + f" on {platform.machine()} ({os.cpu_count()} cores, shared), torch {torch.__version__}: sampling took "
          f"{minutes:.0f} min summed over the tasks; this invocation ran {run.executed} of them in {run.seconds / 60:.1f} min."
    ]


def _reference_table(checks: dict, run: Run) -> list[str]:
    seeds = sorted(checks)
    lines = ["", f"**Reference**: {run.reference.label}, from the same noise. Its convergence check, {run.check.label} "
             "against it:", "", "| seed | PSNR dB | SSIM | worst image PSNR dB |", "|---|---:|---:|---:|"]
    lines += [f"| {s} | {checks[s]['psnr']:.1f} | {checks[s]['ssim']:.5f} | {checks[s]['min_psnr']:.1f} |" for s in seeds]
    lines.append(f"| mean ± std | {_ms([checks[s]['psnr'] for s in seeds])} | "
                 f"{_ms([checks[s]['ssim'] for s in seeds], 5)} | {min(checks[s]['min_psnr'] for s in seeds):.1f} (min) |")
    return lines


def _signals_table(run: Run) -> list[str]:
    correlations = signal_correlations(run.calibrations)
    if not correlations:
        return []
    lines = ["", "**Which adaptive signal predicts the deep feature's change**: Spearman rank correlation of each "
             "signal with the true relative L1 change of the cached deep feature, since a full step (gaps of 1-5 "
             "steps) and step to step, pooled over the steps of three calibration generations of 16 samples each "
             f"(their own noise), mean ± spread over the calibrations the study ran ({len(run.calibrations)}: "
             "DPM-Solver++ 2M at each calibrated row's step count).", "", "| signal | Spearman |", "|---|---:|"]
    for name, (mean, spread) in sorted(correlations.items(), key=lambda kv: -kv[1][0]):
        lines.append(f"| {name} | {mean:.3f} ± {spread:.3f} |")
    return lines


def _ddim_note(rows: Sequence[Row]) -> list[str]:
    if not any(r.method.scheduler == "ddim" for r in rows):
        return []
    return ["", "DDIM as the model ships it clips its prediction of the clean sample to [-1, 1] at every step "
            "(`clip_sample=True`), so it does not solve the ODE the reference and the unclipped solvers (DDIM "
            "no-clip, DPM-Solver++, UniPC) converge to: its PSNR vs converged includes that difference and does "
            "not keep rising with its steps. Judge DDIM rows, and DeepCache on DDIM, by PSNR vs plain, accuracy "
            "and Fréchet distance as well."]


def _rows_table(rows: Sequence[Row]) -> list[str]:
    lines = ["", "All rows (\"vs plain\": against the same scheduler at the same steps without dcfx):", "",
             "| method | cost | PSNR vs converged | SSIM vs converged | PSNR vs plain | SSIM vs plain | accuracy % | Fréchet |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    measured = {m.method: m for m in by_method(rows)}
    for methods in families(rows).values():
        for m in sorted((measured[method] for method in methods), key=lambda m: m.cost):
            get = lambda k: list(m.per_seed(k).values())  # noqa: E731
            vs_plain = (_ms(get("psnr_plain")), _ms(get("ssim_plain"), 4)) if m.method.config is not None else ("—", "—")
            lines.append(f"| {m.method.label} | {_cost([r.cost for r in m.rows])} | {_ms(get('psnr_ref'))} | "
                         f"{_ms(get('ssim_ref'), 4)} | {vs_plain[0]} | {vs_plain[1]} | {_ms(get('accuracy'), 1, 100)} | "
                         f"{_ms(get('frechet'), 2)} |")
    return lines


def _families_table(rows: Sequence[Row], budgets: Sequence[float]) -> list[str]:
    measured = by_method(rows)
    lines = ["", "PSNR (dB) vs the converged reference at each budget, per family: the family's best row at or under "
             "the budget (its cost in brackets; blank: none of its rows is that cheap):", "",
             "| family | kind | " + " | ".join(f"cost ≤ {b:g}" for b in budgets) + " |",
             "|---|---|" + "---:|" * len(budgets)]
    for fam, methods in families(rows).items():
        best = [best_row(measured, b, family=fam) for b in budgets]
        cells = [f"{_psnr(m)} ({m.cost:.2f})" if m else "" for m in best]
        lines.append(f"| {fam} | {methods[0].kind} | " + " | ".join(cells) + " |")
    return lines


def _goal_table(rows: Sequence[Row], budgets: Sequence[float], goal_db: float) -> list[str]:
    measured = by_method(rows)
    lines = ["", f"**Goal**: at each budget the best dcfx policy at least {goal_db:g} dB (PSNR vs converged) above the "
             "best plain scheduler and above the best uniform DeepCache, class accuracy within 1 point of the best "
             "plain scheduler's. Each is the row of its kind with the best mean PSNR among those that cost at most "
             "the budget (its cost in brackets). Differences paired by seed, mean ± std:", "",
             "| budget | best plain | PSNR | best uniform DeepCache | PSNR | best dcfx policy | PSNR | vs plain dB | "
             "vs uniform dB | accuracy vs plain (pts) | goal |", "|---:|---|---:|---|---:|---|---:|---:|---:|---:|---|"]
    goals = [goal_at(measured, b, goal_db) for b in budgets]
    for g in goals:
        lines.append(f"| {g.budget:g} | {_named(g.plain)} | {_psnr(g.plain)} | {_named(g.uniform)} | {_psnr(g.uniform)} | "
                     f"{_named(g.policy)} | {_psnr(g.policy)} | {_diff(g.vs_plain)} | {_diff(g.vs_uniform)} | "
                     f"{_diff(g.accuracy_vs_plain, 1, 100)} | {g.state} |")
    states = [g.state for g in goals]
    unjudged = states.count("not judged")
    lines += ["", f"Goal met at {states.count('met')} of {len(budgets)} budgets"
              + (f" ({unjudged} not judged: no row of a kind at or under that cost)." if unjudged else ".")]
    return lines


def _row_verdicts_table(rows: Sequence[Row]) -> list[str]:
    lines = ["", "Each dcfx row against the best plain row that costs no more (the plain row of the best mean PSNR "
             "at or under the dcfx row's cost) and, for other policies, the best uniform DeepCache row that costs "
             "no more; paired by seed, mean ± std; \"better\"/\"worse\" only beyond the spread:", "",
             "| dcfx row | cost | PSNR vs converged | best plain at or under its cost | diff dB | verdict | "
             "best uniform DeepCache there | diff dB | accuracy diff (pts) |", "|---|---:|---:|---|---:|---|---|---:|---:|"]
    for v in row_verdicts(by_method(rows)):
        uniform = _named(v.uniform) if v.row.method.kind == "dcfx policy" else "—"
        lines.append(f"| {v.row.method.label} | {_cost([r.cost for r in v.row.rows])} | {_psnr(v.row)} | "
                     f"{_named(v.plain, 'no plain row that cheap')} | {_diff(v.vs_plain)} | {v.verdict} | {uniform} | "
                     f"{_diff(v.vs_uniform)} | {_diff(v.accuracy_vs_plain, 1, 100)} |")
    return lines


def markdown(rows: Sequence[Row], checks: dict, run: Run) -> str:
    """The study's tables: setup, the reference's convergence, signals, every row, the families
    at the budgets, the goal and each dcfx row's verdict."""
    lines = (_header(rows, checks, run) + _reference_table(checks, run) + _signals_table(run) + _ddim_note(rows)
             + _rows_table(rows) + _families_table(rows, run.budgets) + _goal_table(rows, run.budgets, run.goal_db)
             + _row_verdicts_table(rows))
    return "\n".join(lines) + "\n"


def write_csv(rows: Sequence[Row], path: Path, study: Study) -> None:
    keys = ["psnr_ref", "ssim_ref", "psnr_plain", "ssim_plain", "accuracy", "frechet"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["label", "family", "kind", "scheduler", "steps", "config", "seed", "samples", "spacing",
                    "history", "full_steps", "shallow_steps", "cost", *keys, "seconds", "task"])
        for r in rows:
            m = r.method
            config = "" if m.config is None else json.dumps(config_fields(m.config), sort_keys=True)
            w.writerow([m.label, m.family, m.kind, m.scheduler, m.steps, config, r.seed, study.samples, study.spacing,
                        r.history, r.history.count("F"), r.history.count("S"), f"{r.cost:.4f}",
                        *(f"{r.metrics[k]:.6g}" if k in r.metrics else "" for k in keys), f"{r.seconds:.3f}",
                        study.task_key(m, r.seed)])


def plot(rows: Sequence[Row], path: Path, budgets: Sequence[float], title: str) -> None:
    """PSNR vs the reference and class accuracy against cost: one line per family through its
    rows' means, band ± std."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("the frontier plot needs matplotlib: pip install 'dcfx[bench]' (or pass --no-plot)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import NullFormatter

    fams = families(rows)
    measured = {m.method: m for m in by_method(rows)}
    fig, axes = plt.subplots(1, 2, figsize=(15, 7 + 0.12 * len(fams)), gridspec_kw={"width_ratios": [2, 1]})
    colors = plt.get_cmap("tab10").colors + plt.get_cmap("Dark2").colors
    for i, (fam, methods) in enumerate(fams.items()):
        plain = methods[0].kind == "plain"
        style = {"color": colors[i % len(colors)], "linestyle": "--" if plain else "-", "marker": "s" if plain else "o",
                 "markersize": 4, "linewidth": 1.6}
        pts = sorted((measured[m].cost, *mean_std(measured[m].per_seed("psnr_ref").values()),
                      *mean_std(100 * a for a in measured[m].per_seed("accuracy").values())) for m in methods)
        x = [p[0] for p in pts]
        for ax, k, top, alpha in ((axes[0], 1, np.inf, 0.15), (axes[1], 3, 100.0, 0.06)):
            mean = np.array([p[k] for p in pts])
            std = np.array([p[k + 1] for p in pts])
            ax.plot(x, mean, label=fam, **style)
            ax.fill_between(x, mean - std, np.minimum(mean + std, top), color=style["color"], alpha=alpha, linewidth=0)
    for ax in axes:
        ax.set_xscale("log")
        for b in budgets:
            ax.axvline(b, color="grey", linewidth=0.8, linestyle=":")
        ax.set_xlabel("cost: full-U-Net-call equivalents per sample (log)")
        ax.grid(True, which="both", alpha=0.25)
        ticks = sorted({*budgets, 20, 50} & set(range(1, int(max(r.cost for r in rows)) + 2)))
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{t:g}" for t in ticks])
        ax.xaxis.set_minor_formatter(NullFormatter())
    axes[0].set_ylabel("PSNR dB vs the converged reference (higher is better)")
    axes[1].set_ylabel("class accuracy % (judge)")
    axes[0].set_title("fidelity to the converged sample; dotted: budgets", fontsize=10)
    axes[1].set_title("class accuracy", fontsize=10)
    fig.suptitle(title, fontsize=11)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False,
               title="dashed: plain schedulers; solid: dcfx; bands: ± std over seeds", title_fontsize=8)
    fig.tight_layout(rect=(0, 0.04 + 0.028 * math.ceil(len(fams) / 3), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
