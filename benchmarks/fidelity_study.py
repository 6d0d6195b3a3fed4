"""Does DeepCache beat fewer steps at the same cost? Quality against cost on the digits model.

    python benchmarks/fidelity_study.py [--grid budgets|ddim50|none] [--method SPEC ...]
        [--samples 64] [--seeds 0 1 2] [--guidance 1.5] [--spacing SPACING] [--model PATH]
        [--reference SCHEDULER:STEPS] [--check-steps 100] [--budgets 5 7 10 14] [--goal-db 3]
        [--threads 1] [--ray [ADDRESS]] [--tasks-dir DIR] [--out-dir benchmarks/results]
        [--name NAME] [--no-plot]

Rows (`benchmarks/study/methods.py`). `--grid budgets` (default): plain DDIM (as shipped,
clipping), DDIM without clipping, DPM-Solver++ 2M and UniPC over a range of steps, DeepCache
(uniform and non-uniform) around the budgets, and the dcfx policies (forecasts, calibrated
schedules, adaptive gates). `--grid ddim50`: DDIM 50 with dcfx at branches 0/1/3 against plain
DDIM at the matched cost. `--grid none`: only the `--method SCHEDULER:STEPS[:SETTING]` rows,
SETTING as `dcfx.DeepCacheConfig.from_setting` reads it ("2:0:f1",
"interval=2,branch=0,schedule=(0,3,7)"). Every dcfx row brings the plain sampler at its scheduler
and steps. `--spacing` defaults to "trailing" (every solver starts at t = 999, where the noise
is), "leading" for ddim50.

Ground truth. For every seed the reference (default DPM-Solver++ 2M, 200 steps) is run, and the
same solver at `--check-steps` is compared with it: that PSNR is the reference's convergence
check. DDIM with `clip_sample=True` does not solve the probability-flow ODE the unclipped
solvers converge to, so its distance to the reference includes that difference.

Measures and verdicts (`benchmarks/study/analysis.py`): cost in full-U-Net-call equivalents from
the steps each generation ran; PSNR/SSIM against the reference and the plain sampler, class
accuracy, Fréchet distance; at each budget the best row of each kind at or under it, paired by
seed; the goal: the best dcfx policy `--goal-db` above the best plain and uniform DeepCache rows.

Tasks (`benchmarks/study/tasks.py`): each (row, seed) is one task, kept under `--tasks-dir`
(default OUT_DIR/fidelity_tasks) once finished, so a re-run only samples what changed. `--ray`
runs the pending ones on a new local Ray instance, `--ray ADDRESS` on a running cluster (`dcfx
serve` prints its local cluster's address; a job joining a cluster with token authentication
needs RAY_AUTH_MODE=token in its environment). Ray lowers its workers' priority
(`RAY_worker_niceness`, default 15).

Writes OUT_DIR/NAME.md (the tables), NAME.csv (one row per method and seed) and NAME.png (the
frontier; needs matplotlib: `pip install dcfx[bench]`, or pass --no-plot). NAME defaults to
"fidelity" (budgets) or "fidelity_<grid>". Prints the tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # its package `study`, also under `python -P`
from study.analysis import Row, measure, shallow_fractions  # noqa: E402
from study.calibrations import calibrated_schedule, read_calibrations  # noqa: E402
from study.methods import BUDGETS, GRIDS, SPACINGS, Method, baseline_grid, ddim50_grid, grid_branches, parse_method, policy_grid  # noqa: E402
from study.report import Run, markdown, plot, write_csv  # noqa: E402
from study.tasks import Study, execute, model_digest  # noqa: E402

from dcfx.models.compare import SCHEDULERS  # noqa: E402
from dcfx.models.digits import DEFAULT_GUIDANCE_SCALE  # noqa: E402


def _method(text: str) -> Method:
    try:
        return parse_method(text)
    except ValueError as e:  # argparse shows an ArgumentTypeError's message, not a ValueError's
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", choices=GRIDS, default="budgets", help="rows to run (default: %(default)s)")
    p.add_argument("--method", action="append", default=[], metavar="SPEC", type=_method,
                   help="an extra row, SCHEDULER:STEPS[:SETTING] (repeatable); schedulers: " + ", ".join(SCHEDULERS))
    p.add_argument("--samples", type=int, default=64, help="samples per seed and row")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE_SCALE)
    p.add_argument("--spacing", choices=SPACINGS, help="timestep spacing of every scheduler (default: trailing; leading for ddim50)")
    p.add_argument("--model", help="a digits model folder (default: the embedded one)")
    p.add_argument("--reference", default="dpm++2m:200", metavar="SCHEDULER:STEPS", help="the converged reference (default: %(default)s)")
    p.add_argument("--check-steps", type=int, default=100, help="the reference's solver at these steps is its convergence check")
    p.add_argument("--budgets", type=float, nargs="+", default=list(BUDGETS))
    p.add_argument("--goal-db", type=float, default=3.0)
    p.add_argument("--threads", type=int, default=1, help="torch threads per task (part of a task's identity)")
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="run tasks on Ray: a local instance, or the cluster at ADDRESS")
    p.add_argument("--tasks-dir", type=Path, help="finished tasks (default: OUT_DIR/fidelity_tasks)")
    p.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--name", help="output file stem (default: fidelity, or fidelity_<grid>)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG (no matplotlib needed)")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.samples < 2 or args.threads < 1 or args.check_steps < 1:
        p.error("--samples must be >= 2 (Fréchet needs a covariance), --threads and --check-steps >= 1")
    if args.grid == "none" and not args.method:
        p.error("--grid none needs at least one --method")
    args.spacing = args.spacing or ("leading" if args.grid == "ddim50" else "trailing")
    args.name = args.name or ("fidelity" if args.grid == "budgets" else f"fidelity_{args.grid}")
    args.tasks_dir = args.tasks_dir or args.out_dir / "fidelity_tasks"
    return args


def rows_of(args: argparse.Namespace, study: Study) -> list[Method]:
    """The grid's rows and the extra ones, each dcfx row with its plain sampler, once each."""
    methods: list[Method] = []
    if args.grid == "ddim50":
        methods += ddim50_grid(shallow_fractions(args.model, grid_branches(args.grid), args.guidance))
    elif args.grid == "budgets":
        methods += baseline_grid() + policy_grid(partial(calibrated_schedule, study, args.tasks_dir))
    methods += args.method
    methods += [m.plain for m in methods if m.config is not None]
    return list(dict.fromkeys(methods))


def main(argv: list[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    reference = parse_method(args.reference)
    if reference.config is not None:
        raise SystemExit("--reference must be a plain solver, SCHEDULER:STEPS")
    reference = dataclasses.replace(reference, label=f"{reference.label} (reference)", family="reference")
    check = Method(reference.scheduler, args.check_steps, label=f"{SCHEDULERS[reference.scheduler][0]} {args.check_steps}",
                   family="reference check")
    study = Study(args.samples, args.guidance, args.spacing, args.threads, args.model, model_digest(args.model))
    methods = rows_of(args, study)
    fraction = shallow_fractions(args.model, {m.config.branch for m in methods if m.config is not None}, args.guidance)

    tasks = [(m, s) for s in args.seeds for m in (reference, check, *methods)]
    print(f"{len(methods)} rows + reference and check, {len(args.seeds)} seeds: {len(tasks)} tasks; "
          f"finished tasks in {args.tasks_dir}", file=sys.stderr)
    start = time.perf_counter()
    executed = execute(study, tasks, args.tasks_dir, args.ray)
    seconds = time.perf_counter() - start
    rows, checks = measure(study, methods, reference, check, args.seeds, args.tasks_dir, fraction)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    run = Run(study, reference, check, fraction, args.budgets, args.goal_db, " ".join(args.argv),
              read_calibrations(args.tasks_dir), seconds, executed)
    text = markdown(rows, checks, run)
    (args.out_dir / f"{args.name}.md").write_text(text)
    write_csv(rows, args.out_dir / f"{args.name}.csv", study)
    written = [f"{args.name}.md", f"{args.name}.csv"]
    if not args.no_plot:
        title = (f"Digits model, guidance {study.guidance:g}, {study.samples} samples x {len(args.seeds)} seeds, "
                 f"spacing '{study.spacing}'; reference: {SCHEDULERS[reference.scheduler][0]} {reference.steps} steps")
        plot(rows, args.out_dir / f"{args.name}.png", args.budgets, title)
        written.append(f"{args.name}.png")
    print(text)
    print(f"wrote {', '.join(str(args.out_dir / w) for w in written)}", file=sys.stderr)
    return rows


if __name__ == "__main__":
    main()
