"""How much quality DeepCache costs on the embedded digits model, and is it better than fewer steps?

    python benchmarks/fidelity_study.py [--samples 80] [--seeds 0 1 2] [--steps 50]
        [--intervals 2 3 5 10] [--branches 0 1 3] [--nonuniform 3 5 10] [--out-dir benchmarks/results]

For every seed (its own noise, `--samples` images, labels 0..9 in turn) it samples plain DDIM
at `--steps`, dcfx at every (interval, branch) with the uniform schedule, dcfx with the
paper's non-uniform schedule at branch 0 (`--nonuniform` intervals), and plain DDIM with the
step count whose FLOPs match each dcfx setting (the paper's "fewer steps" baseline, its
Table 4 / Figure 5). Each setting is judged by `dcfx.models.quality`: class accuracy and
Fréchet distance to the held-out digits (the judge's feature space; see that module for why),
PSNR and max error against the plain samples of the same noise.

Writes `fidelity.md` (a markdown table, mean ± std over seeds, and the paired comparison of
each dcfx setting with its FLOP-matched DDIM: "better"/"worse" only where the mean difference
exceeds the spread of the per-seed differences, else "no difference"), `fidelity.csv` (one
row per setting and seed) and `fidelity.png` (Fréchet distance and accuracy against the FLOP
speedup: the quality/speed frontier). Speedup is counted in FLOPs (what `dcfx.report`
counts), which a noisy shared CPU cannot distort; measured wall-time speedups are in the CSV.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dcfx.models.compare import Sampler, Setting, evaluate, matched_ddim
from dcfx.models import digits, load_pipeline
from dcfx.models.digits import DEFAULT_GUIDANCE_SCALE
from dcfx.models.quality import judge as make_judge

METRICS = ("accuracy", "frechet", "psnr", "max_err")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=80, help="samples per seed and setting")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--intervals", type=int, nargs="+", default=[2, 3, 5, 10])
    p.add_argument("--branches", type=int, nargs="+", default=[0, 1, 3])
    p.add_argument("--nonuniform", type=int, nargs="*", default=[3, 5, 10], help="intervals of the non-uniform rows (branch 0)")
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE_SCALE)
    p.add_argument("--model", type=Path, help="a digits model folder (default: the embedded one)")
    p.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args(argv)

    pipe = load_pipeline(args.model) if args.model else digits()
    pipe.set_progress_bar_config(disable=True)
    judge = make_judge()
    dcfx_settings = [Setting.dcfx(args.steps, n, b) for b in args.branches for n in args.intervals]
    dcfx_settings += [Setting.dcfx(args.steps, n, 0, "nonuniform") for n in args.nonuniform]
    plain = Setting.plain(args.steps)

    rows: list[dict] = []
    matched: dict[str, str] = {}
    start = time.perf_counter()
    for seed in args.seeds:
        sampler = Sampler(pipe, args.samples, seed, args.guidance)
        todo = [plain]
        for s in dcfx_settings:
            m = matched_ddim(sampler, s, args.steps)
            matched[s.name] = m.name
            todo += [s] + ([m] if m not in todo else [])
        base = sampler.flops(plain)
        reference = None
        for s in tqdm(todo, desc=f"seed {seed}", unit="setting"):
            r = sampler.run(s)
            reference = r if reference is None else reference
            row = {"setting": s.name, "seed": seed, "steps": s.steps, "flops_speedup": base / sampler.flops(s),
                   "seconds": r.seconds, "time_speedup": reference.seconds / r.seconds, "history": r.history}
            row.update(evaluate(r.images, sampler.labels, reference.images, judge))
            rows.append(row)
    elapsed = time.perf_counter() - start

    args.out_dir.mkdir(parents=True, exist_ok=True)
    with open(args.out_dir / "fidelity.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    summary = _summary(rows)
    text = _markdown(summary, rows, matched, args, judge.test_accuracy, elapsed)
    (args.out_dir / "fidelity.md").write_text(text)
    _plot(summary, args.out_dir / "fidelity.png", args)
    print(text)
    print(f"wrote {args.out_dir / 'fidelity.md'}, fidelity.csv, fidelity.png", file=sys.stderr)


def _summary(rows: list[dict]) -> dict[str, dict]:
    """setting -> mean and std over seeds of every metric, plus its FLOP speedup."""
    out: dict[str, dict] = {}
    for name in dict.fromkeys(r["setting"] for r in rows):
        group = [r for r in rows if r["setting"] == name]
        entry = {"flops_speedup": group[0]["flops_speedup"], "steps": group[0]["steps"],
                 "time_speedup": statistics.median(r["time_speedup"] for r in group)}
        for m in METRICS:
            entry[m] = _mean_std([r[m] for r in group])
        out[name] = entry
    return out


def _mean_std(values: list[float]) -> tuple[float, float]:
    if any(v == float("inf") for v in values):  # PSNR of the plain reference against itself
        return float("inf"), 0.0
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _paired(rows: list[dict], a: str, b: str, metric: str) -> tuple[float, float]:
    """Mean and std over seeds of metric(a) - metric(b) (same noise per seed)."""
    by_seed = {}
    for r in rows:
        if r["setting"] in (a, b):
            by_seed.setdefault(r["seed"], {})[r["setting"]] = r[metric]
    diffs = [v[a] - v[b] for v in by_seed.values() if a in v and b in v]
    return statistics.fmean(diffs), (statistics.stdev(diffs) if len(diffs) > 1 else float("inf"))


def _verdict(mean: float, spread: float, lower_is_better: bool) -> str:
    if abs(mean) <= spread:
        return "no difference"
    return "better" if (mean < 0) == lower_is_better else "worse"


def _markdown(summary, rows, matched, args, judge_accuracy, elapsed) -> str:
    fmt = lambda ms, d=2: f"{ms[0]:.{d}f} ± {ms[1]:.{d}f}"  # noqa: E731
    lines = [
        f"Digits model, DDIM {args.steps} steps, guidance {args.guidance:g}, {args.samples} samples x "
        f"{len(args.seeds)} seeds ({', '.join(map(str, args.seeds))}) per setting; mean ± std over seeds. "
        f"Judge: accuracy {100 * judge_accuracy:.1f}% on the held-out digits. "
        f"`python benchmarks/fidelity_study.py` ({elapsed / 60:.0f} min on this machine, torch {torch.__version__}).",
        "",
        "| setting | FLOP speedup | time speedup | accuracy % | Fréchet | PSNR dB vs plain | max err |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    order = sorted(summary, key=lambda n: (summary[n]["flops_speedup"], n))
    for name in order:
        s = summary[name]
        acc = (100 * s["accuracy"][0], 100 * s["accuracy"][1])
        psnr = "—" if s["psnr"][0] == float("inf") else fmt(s["psnr"], 1)
        lines.append(f"| {name} | {s['flops_speedup']:.2f}x | {s['time_speedup']:.2f}x | {fmt(acc, 1)} | "
                     f"{fmt(s['frechet'])} | {psnr} | {s['max_err'][0]:.3f} |")
    lines += [
        "",
        "DeepCache against plain DDIM with fewer steps at matched FLOPs (paired by seed; "
        "difference dcfx − DDIM, mean ± std of the per-seed differences; a difference within its spread is "
        "reported as no difference):",
        "",
        "| dcfx setting | matched DDIM | Fréchet diff | verdict | accuracy diff (pts) | verdict |",
        "|---|---|---:|---|---:|---|",
    ]
    for name, other in matched.items():
        fd = _paired(rows, name, other, "frechet")
        acc = _paired(rows, name, other, "accuracy")
        lines.append(f"| {name} | {other} | {fd[0]:+.2f} ± {fd[1]:.2f} | {_verdict(*fd, True)} | "
                     f"{100 * acc[0]:+.1f} ± {100 * acc[1]:.1f} | {_verdict(*acc, False)} |")
    return "\n".join(lines) + "\n"


def _plot(summary, path: Path, args) -> None:
    """Fréchet distance and accuracy against FLOP speedup, dcfx settings and DDIM steps."""
    from PIL import Image, ImageDraw

    # PIL's built-in font is ASCII only: no accents in the labels.
    panels = (("frechet", "Frechet distance to held-out digits (lower is better)"), ("accuracy", "class accuracy (higher is better)"))
    W, H, M, LEGEND = 520, 360, 56, 28
    img = Image.new("RGB", (W * len(panels), H + LEGEND), "white")
    d = ImageDraw.Draw(img)
    xs = [s["flops_speedup"] for s in summary.values()]
    x_lo, x_hi = 0.9, max(xs) * 1.05
    groups = {"DDIM (fewer steps)": ((0, 0, 0), lambda n: n.startswith("DDIM"))}
    palette = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]
    for i, b in enumerate(args.branches):
        groups[f"dcfx b={b}"] = (palette[i % len(palette)], lambda n, b=b: n.startswith("dcfx") and n.endswith(f"b={b}"))
    groups["dcfx b=0 nonuniform"] = (palette[len(args.branches) % len(palette)], lambda n: n.endswith("nonuniform"))
    for k, (metric, title) in enumerate(panels):
        ox = k * W
        y_lo = min(s[metric][0] - s[metric][1] for s in summary.values())  # error bars included
        y_hi = max(s[metric][0] + s[metric][1] for s in summary.values())
        pad = (y_hi - y_lo) * 0.1 or 1.0
        y_lo, y_hi = y_lo - pad, y_hi + pad
        px = lambda x: ox + M + (x - x_lo) / (x_hi - x_lo) * (W - 2 * M)  # noqa: E731
        py = lambda y: H - M - (y - y_lo) / (y_hi - y_lo) * (H - 2 * M)  # noqa: E731
        d.rectangle([ox + M, M, ox + W - M, H - M], outline="black")
        d.text((ox + M, 8), title, fill="black")
        d.text((ox + W // 2 - 40, H - 24), "FLOP speedup (x)", fill="black")
        for tick in range(1, int(x_hi) + 1):
            d.line([px(tick), H - M, px(tick), H - M + 4], fill="black")
            d.text((px(tick) - 4, H - M + 6), str(tick), fill="black")
        for frac in (0, 0.5, 1):
            y = y_lo + frac * (y_hi - y_lo)
            label = f"{100 * y:.0f}%" if metric == "accuracy" else f"{y:.1f}"
            d.text((ox + 4, py(y) - 6), label, fill="black")
        for g, (color, match) in groups.items():
            pts = sorted((s["flops_speedup"], s[metric][0], s[metric][1]) for n, s in summary.items() if match(n))
            for (x0, y0, _), (x1, y1, _) in zip(pts, pts[1:]):
                d.line([px(x0), py(y0), px(x1), py(y1)], fill=color, width=2)
            for x, y, e in pts:
                d.line([px(x), py(y - e), px(x), py(y + e)], fill=color)  # error bar: ± std over seeds
                d.ellipse([px(x) - 3, py(y) - 3, px(x) + 3, py(y) + 3], fill=color)
    x = M
    for j, (g, (color, _)) in enumerate(groups.items()):  # legend: one row under both panels
        label = g + " (bars: std over seeds)" * (j == 0)
        d.rectangle([x, H + 6, x + 8, H + 14], fill=color)
        d.text((x + 12, H + 4), label, fill="black")
        x += 12 + 6 * len(label) + 24
    img.save(path)


if __name__ == "__main__":
    main()
