"""Does DeepCache beat fewer steps at the same cost? Quality against cost on the digits model.

    python benchmarks/fidelity_study.py [--grid budgets|ddim50|none] [--method SPEC ...]
        [--samples 64] [--seeds 0 1 2] [--guidance 1.5] [--spacing SPACING] [--model PATH]
        [--reference SCHEDULER:STEPS] [--check-steps 100] [--budgets 5 7 10 14] [--goal-db 3]
        [--threads 1] [--ray [ADDRESS]] [--tasks-dir DIR] [--out-dir benchmarks/results]
        [--name NAME] [--no-plot]

What is run. A method is data: `Method(scheduler, steps, config, label, family)`, a scheduler
of `SCHEDULERS` at a step count, with a `dcfx.DeepCacheConfig` (or None: the plain sampler).
A new policy is a row with its config fields, in `policy_grid()` or on the command line:
`--method "dpm++2m:20:interval=2,branch=0,schedule='nonuniform',center=6"` (SCHEDULER:STEPS
and optional config fields, values as Python literals); `--grid none` runs only those. Rows
with the same `family` form one line of the frontier (by default: scheduler and config
without the step count). Every dcfx row brings the plain sampler at its scheduler and steps.

Grids. `budgets` (default): `baseline_grid()`, i.e. plain DDIM (as shipped, clipping), DDIM
without clipping, DPM-Solver++ 2M and UniPC over a range of steps, and DeepCache (uniform and
non-uniform, branch 0) on DDIM and on DPM-Solver++ placed around the budgets, and
`policy_grid()`, the new policies.
`ddim50`: the first version of this study (DDIM 50 steps with the model's "leading" spacing,
dcfx at intervals 2/3/5/10, branches 0/1/3, non-uniform at 3/5/10, and plain DDIM at the step
count of matched cost), with the same measurements. `--spacing` defaults to "trailing" for
`budgets`/`none` (every solver starts at t = 999, where the noise is) and "leading" for
`ddim50`.

Ground truth. For every seed the reference (default DPM-Solver++ 2M, 200 steps) is run, and
the same solver at `--check-steps` (default 100) is compared with it: the script prints that
PSNR as the reference's convergence check. DDIM with `clip_sample=True` (the model's shipped
scheduler) clips its prediction of the clean sample at every step, so it does not solve the
probability-flow ODE the unclipped solvers (DPM-Solver++, UniPC, DDIM without clipping)
converge to: its distance to the reference includes that difference, whatever its steps.

Cost. In full-U-Net-call equivalents per sample (plain DDIM 50 = 50; a CFG step is one
batched call): a full step costs 1, a shallow step the shallow/full FLOP fraction that
`dcfx.report` gives for its branch, counted from the steps each generation actually ran
(`history`), so policies that decide at run time are priced by what they did.

Quality, per (row, seed): PSNR and SSIM against the converged reference and against the plain
sampler at the same scheduler and steps, class accuracy and Fréchet distance to the held-out
digits (`dcfx.models.quality`). Tables give mean ± std over seeds.

Verdicts. Each family's PSNR vs the reference is interpolated, per seed, linearly in log cost
(no extrapolation beyond 1% past its end rows). At each budget the best plain scheduler (best mean), the best uniform
DeepCache and the best other dcfx policy are compared, paired by seed; the goal is the best dcfx
policy at least `--goal-db` dB above both with class accuracy no more than 1 point below the
best plain scheduler's. Each dcfx row is also judged against the best plain frontier at its own
cost. "better"/"worse" only where the mean paired difference exceeds the std of the per-seed
differences, else "no difference".

Tasks. Each (method, seed) is one task: it samples `--samples` images (labels 0..9 in turn)
from the seed's noise with `--threads` torch threads, independent of any other task, so its
images are the same bit for bit wherever it runs. Finished tasks are kept under `--tasks-dir`
(default: OUT_DIR/fidelity_tasks, one .npz each, named by a hash of everything that decides its
images), and a re-run skips them. `--ray` runs the pending tasks as Ray tasks (`--threads` CPUs
each) on a new local Ray instance (never one that another process started here), `--ray ADDRESS`
on a running cluster, whose workers need dcfx installed (`dcfx serve` prints its local
cluster's address; with Ray's token authentication, on for a new cluster, a job joining by
address needs RAY_AUTH_MODE=token in its environment). Ray is imported only then. Ray lowers
its workers' priority (`RAY_worker_niceness`, default 15).

Writes OUT_DIR/NAME.md (the tables), NAME.csv (one row per method and seed) and NAME.png (the
frontier, PSNR vs the reference and class accuracy against cost; needs matplotlib:
`pip install dcfx[bench]`, or pass --no-plot). NAME defaults to "fidelity" (budgets) or
"fidelity_<grid>". Prints the tables.
"""

from __future__ import annotations

import argparse
import ast
import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from dcfx import DeepCacheConfig
from dcfx.models.compare import SCHEDULERS, make_scheduler
from dcfx.models.digits import DEFAULT_GUIDANCE_SCALE

# Bump when a change alters what a task computes: finished tasks of older versions are ignored.
TASK_VERSION = 1

SPACINGS = ("leading", "trailing", "linspace")
BUDGETS = (5, 7, 10, 14)

# Config fields always part of a row's identity; the others only where they differ from their
# default, so that fields added to DeepCacheConfig later keep finished tasks' names.
_CORE_FIELDS = ("interval", "branch")


# -- what is run --------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Method:
    """One way of sampling: `scheduler` (a key of SCHEDULERS) at `steps`, plain or with dcfx.

    `label` names the row, `family` the frontier line it belongs to; both are derived from
    the rest when left empty.
    """

    scheduler: str
    steps: int
    config: DeepCacheConfig | None = None
    label: str = ""
    family: str = ""

    def __post_init__(self) -> None:
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {self.scheduler!r}; one of {', '.join(SCHEDULERS)}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {self.steps!r}")
        if self.config is not None and not isinstance(self.config, DeepCacheConfig):
            raise TypeError(f"config must be a DeepCacheConfig or None, got {type(self.config).__name__}")
        family = self.family or _family_name(self.scheduler, self.config)
        object.__setattr__(self, "family", family)
        if not self.label:
            plain = SCHEDULERS[self.scheduler][0]
            tail = "" if self.config is None else f" + {_policy_name(self.config)}"
            object.__setattr__(self, "label", f"{plain} {self.steps}{tail}")

    @property
    def kind(self) -> str:
        """'plain', 'uniform DeepCache' (interval and branch only) or 'dcfx policy'."""
        if self.config is None:
            return "plain"
        rest = {k: v for k, v in config_fields(self.config).items() if k not in _CORE_FIELDS}
        return "uniform DeepCache" if not rest else "dcfx policy"

    @property
    def plain(self) -> "Method":
        """The plain sampler at this method's scheduler and steps."""
        return Method(self.scheduler, self.steps)

    def identity(self) -> dict[str, Any]:
        """What decides this method's images (labels and families do not)."""
        return {"scheduler": self.scheduler, "steps": self.steps,
                "config": None if self.config is None else config_fields(self.config)}

    def _key(self) -> str:
        # A config holds a dict (compile_options), so it does not hash: compare by contents.
        return json.dumps([self.identity(), self.label, self.family], sort_keys=True, default=str)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Method) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())


def config_fields(config: DeepCacheConfig) -> dict[str, Any]:
    """interval and branch, and every other field that differs from its default (JSON-ready)."""
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        if f.name in _CORE_FIELDS or value != default:
            out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def _policy_name(config: DeepCacheConfig) -> str:
    rest = {k: v for k, v in config_fields(config).items() if k not in _CORE_FIELDS}
    schedule = rest.pop("schedule", "uniform")
    if isinstance(schedule, list):
        schedule = f"explicit {len(schedule)} full"
    if config.adaptive is not None:  # interval and schedule are unused: the signal decides
        words = [f"DeepCache adaptive '{rest.pop('adaptive')}' b={config.branch}"]
    else:
        words = [f"DeepCache {schedule} N={config.interval} b={config.branch}"]
    words += [f"{k}={v}" for k, v in rest.items()]
    return " ".join(words)


def _family_name(scheduler: str, config: DeepCacheConfig | None) -> str:
    plain = SCHEDULERS[scheduler][0]
    return plain if config is None else f"{plain} + {_policy_name(config)}"


def parse_method(text: str) -> Method:
    """'dpm++2m:20' or 'dpm++2m:20:interval=2,branch=0,schedule=(0, 2, 5)' -> a Method."""
    parts = text.split(":", 2)
    try:
        if len(parts) < 2:
            raise ValueError("expected SCHEDULER:STEPS[:FIELD=VALUE,...]")
        scheduler, steps = parts[0], int(parts[1])
        config = None
        if len(parts) == 3 and parts[2].strip():
            fields = {}
            for item in _split_top_level(parts[2]):
                key, sep, value = item.partition("=")
                if not sep:
                    raise ValueError(f"config field {item!r} is not FIELD=VALUE")
                try:
                    fields[key.strip()] = ast.literal_eval(value.strip())
                except (ValueError, SyntaxError):
                    fields[key.strip()] = value.strip()  # a bare word: a string
            config = DeepCacheConfig(**fields)
        return Method(scheduler, steps, config)
    except (ValueError, TypeError) as e:
        raise ValueError(f"--method {text!r}: {e}") from None


def _split_top_level(text: str) -> list[str]:
    """Splits at commas outside brackets (an explicit schedule is a tuple)."""
    out, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            out.append(text[start:i])
            start = i + 1
    out.append(text[start:])
    return [s for s in (s.strip() for s in out) if s]


def baseline_grid() -> list[Method]:
    """Plain solvers over a range of steps, and DeepCache's existing schedules around the budgets."""
    rows = [Method("ddim", s) for s in (5, 7, 10, 14, 20, 50)]
    rows += [Method("ddim-noclip", s) for s in (5, 7, 10, 14, 20, 50)]
    for scheduler in ("dpm++2m", "unipc"):
        rows += [Method(scheduler, s) for s in (4, 5, 6, 7, 8, 10, 12, 14, 17, 20)]
    # DeepCache at branch 0 (a shallow step costs 9% of a full one): N=2 costs about 0.55 T,
    # N=3 about 0.39 T, so these step counts bracket every budget (4.4 to 14.2).
    for scheduler in ("dpm++2m", "ddim"):
        rows += [Method(scheduler, s, DeepCacheConfig(interval=2, branch=0)) for s in (8, 12, 18, 26)]
        rows += [Method(scheduler, s, DeepCacheConfig(interval=3, branch=0)) for s in (12, 18, 27, 36)]
        # The paper's non-uniform schedule (eq. 7), its centre c=15 at 50 steps scaled to T.
        name = f"{SCHEDULERS[scheduler][0]} + DeepCache nonuniform N=3 b=0 c=0.3T"
        rows += [Method(scheduler, s, DeepCacheConfig(interval=3, branch=0, schedule="nonuniform", center=round(0.3 * s)),
                        family=name) for s in (12, 18, 27, 36)]
    return rows


def policy_grid(study: "Study", tasks_dir: Path) -> list[Method]:
    """The dcfx policies of issue 16 on DPM-Solver++ 2M at branch 0, one family per policy, at
    step counts whose costs bracket the budgets 5, 7, 10 and 14.

    - forecast order 1 and 2 on uniform N=2 (a cost of about 0.55 T) and N=3 (about 0.39 T),
      and order 1 on UniPC;
    - calibrated schedules (`dcfx.calibrate` at each budget: the full steps it affords, placed
      by dynamic programming), at T of about 1.6 and 2 times the budget, and the latter with a
      forecast of order 1;
    - adaptive gating on the "accumulated" and the "cut" signal, at thresholds chosen from
      the signals' range on this model (their cost is what each generation ran), and "cut"
      with a forecast of order 1.
    Calibrations run on their own noise and labels (not the study's seeds) and are kept in
    `tasks_dir/calibrations.json`, so the rows, and their finished tasks, stay the same.
    """
    # Forecasts on uniform schedules: N=2 (about 0.55 T) and N=3 (about 0.39 T), on DPM-Solver++
    # 2M, and N=2 order 1 on UniPC.
    # Step counts that end the schedule on a full step and on a shallow one (T - 1 a multiple of
    # N or not), which matters to a forecast (a shallow last step extrapolates furthest).
    rows = [Method("dpm++2m", s, DeepCacheConfig(interval=2, branch=0, forecast=order))
            for order in (1, 2) for s in (7, 8, 9, 11, 13, 15, 18, 21, 24, 26)]
    rows += [Method("dpm++2m", s, DeepCacheConfig(interval=3, branch=0, forecast=order))
             for order in (1, 2) for s in (10, 13, 16, 18, 22, 25, 28, 31, 34, 36)]
    rows += [Method("unipc", s, DeepCacheConfig(interval=2, branch=0, forecast=1)) for s in (7, 9, 13, 18, 26)]
    for factor, forecast in ((1.6, 0), (2.0, 0), (2.0, 1)):
        family = f"DPM-Solver++ 2M + calibrated T={factor:g}B b=0" + (f" forecast {forecast}" if forecast else "")
        for budget in BUDGETS:
            steps = round(factor * budget)
            schedule = calibrated_schedule(study, tasks_dir, "dpm++2m", steps, budget)
            rows.append(Method("dpm++2m", steps, DeepCacheConfig(branch=0, schedule=schedule, forecast=forecast),
                               label=f"DPM-Solver++ 2M {steps} + calibrated for {budget} b=0" + (f" forecast {forecast}" if forecast else ""),
                               family=family))
    for signal, threshold, forecast in (("accumulated", 0.15, 0), ("cut", 0.3, 0), ("cut", 0.15, 1)):
        rows += [Method("dpm++2m", s, DeepCacheConfig(branch=0, adaptive=signal, threshold=threshold, max_shallow=4, forecast=forecast))
                 for s in (10, 14, 20, 28)]
    return rows


def calibrated_schedule(study: "Study", tasks_dir: Path, scheduler: str, steps: int, budget: float) -> tuple[int, ...]:
    """`dcfx.calibrate`'s full steps for this scheduler, step count and budget (cached)."""
    import dcfx

    path = tasks_dir / "calibrations.json"
    cache = json.loads(path.read_text()) if path.exists() else {}
    key = f"{study.model_digest}:{scheduler}:{study.spacing}:{study.guidance}:{steps}:{budget}"
    if key not in cache:
        pipe = _pipeline(study.model)
        pipe.scheduler = make_scheduler(scheduler, pipe._study_scheduler_config, study.spacing)
        labels = [torch.arange(16) % 10] * 3  # three calibration generations of 16 samples
        config = dcfx.calibrate(pipe, labels, budget=budget, num_inference_steps=steps, guidance_scale=study.guidance,
                                generator=torch.Generator().manual_seed(1000))
        cache[key] = {"schedule": list(config.schedule), "correlations": dict(config.calibration.correlations),
                      "rescale": list(config.calibration.rescale)}
        tasks_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cache, indent=1) + "\n")
    return tuple(cache[key]["schedule"])


def signal_correlations(tasks_dir: Path) -> dict[str, tuple[float, float]]:
    """Each adaptive signal's Spearman correlation with the deep feature's true change, over
    the calibrations the study ran (mean and spread), from `calibrations.json`."""
    path = tasks_dir / "calibrations.json"
    if not path.exists():
        return {}
    values: dict[str, list[float]] = {}
    for record in json.loads(path.read_text()).values():
        for name, value in record["correlations"].items():
            values.setdefault(name, []).append(value)
    return {n: (statistics.mean(v), statistics.pstdev(v)) for n, v in values.items()}


def ddim50_grid(shallow_fraction: dict[int, float]) -> list[Method]:
    """The first version of this study: dcfx at DDIM 50, and plain DDIM at the matched cost."""
    configs = [DeepCacheConfig(interval=n, branch=b) for b in (0, 1, 3) for n in (2, 3, 5, 10)]
    configs += [DeepCacheConfig(interval=n, branch=0, schedule="nonuniform") for n in (3, 5, 10)]
    from dcfx.schedule import StepSchedule

    rows = [Method("ddim", 50)]
    for c in configs:
        full = len(StepSchedule(c).full_steps(50))
        cost = full + (50 - full) * shallow_fraction[c.branch]
        rows += [Method("ddim", 50, c), Method("ddim", min(50, max(1, round(cost))))]
    return rows


def grid_branches(grid: str) -> tuple[int, ...]:
    return (0, 1, 3) if grid == "ddim50" else ()


@dataclass(frozen=True)
class Study:
    """What every task of a run shares."""

    samples: int
    guidance: float
    spacing: str
    threads: int
    model: str | None  # a digits model folder, or None: the embedded one
    model_digest: str  # of its weights

    def task_key(self, method: Method, seed: int) -> str:
        spec = {"version": TASK_VERSION, "method": method.identity(), "seed": seed, "samples": self.samples,
                "guidance": self.guidance, "spacing": self.spacing, "threads": self.threads,
                "model": self.model_digest, "torch": torch.__version__}
        blob = json.dumps(spec, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:20]


def model_digest(path: str | None) -> str:
    from dcfx.models.digits import WEIGHTS_DIR

    root = Path(path) if path else WEIGHTS_DIR
    h = hashlib.sha256()
    for name in ("unet/diffusion_pytorch_model.safetensors", "label_embedding/diffusion_pytorch_model.safetensors",
                 "scheduler/scheduler_config.json"):
        h.update((root / name).read_bytes())
    return h.hexdigest()[:16]


# -- one task -------------------------------------------------------------------------------------

_PIPELINES: dict[str | None, Any] = {}


def _pipeline(path: str | None) -> Any:
    """The digits pipeline (loaded once per process), with its shipped DDIM config kept aside."""
    if path not in _PIPELINES:
        from dcfx.models import digits, load_pipeline

        pipe = load_pipeline(path) if path else digits()
        pipe.set_progress_bar_config(disable=True)
        pipe._study_scheduler_config = dict(pipe.scheduler.config)
        _PIPELINES[path] = pipe
    return _PIPELINES[path]


def run_task(study: Study, method: Method, seed: int) -> dict[str, Any]:
    """Samples one (method, seed): images (float32 numpy, [0, 1]), history, seconds.

    Deterministic and independent of what ran before in this process: the noise comes from
    the seed alone, the scheduler is new, dcfx is enabled for this call only, and the number of
    torch threads (which decides the order of floating-point sums) is fixed.
    """
    import dcfx

    threads = torch.get_num_threads()
    torch.set_num_threads(study.threads)
    try:
        pipe = _pipeline(study.model)
        pipe.scheduler = make_scheduler(method.scheduler, pipe._study_scheduler_config, study.spacing)
        unet = pipe.unet
        size = unet.config.sample_size
        latents = torch.randn(study.samples, unet.config.in_channels, size, size, generator=torch.Generator().manual_seed(seed))
        labels = torch.arange(study.samples) % 10
        fast = dcfx.enable(pipe, method.config) if method.config is not None else None
        start = time.perf_counter()
        try:
            images = pipe(labels, num_inference_steps=method.steps, guidance_scale=study.guidance,
                          latents=latents, output_type="pt").images
        finally:
            seconds = time.perf_counter() - start
            if fast is not None:
                dcfx.disable(pipe)
        history = fast.history[-1] if fast is not None else "F" * method.steps
    finally:
        torch.set_num_threads(threads)
    if len(history) != method.steps:
        raise RuntimeError(f"{method.label}: {len(history)} U-Net steps recorded for {method.steps} scheduler steps")
    return {"images": images.numpy().astype(np.float32), "history": history, "seconds": seconds}


# -- running tasks: serially or on Ray, resuming from finished ones ------------------------------


def task_path(tasks_dir: Path, key: str) -> Path:
    return tasks_dir / f"{key}.npz"


def save_task(path: Path, result: dict[str, Any], meta: dict[str, Any]) -> None:
    """Writes atomically: a task file exists only once it is complete."""
    meta = {**meta, "history": result["history"], "seconds": result["seconds"]}
    buffer = io.BytesIO()
    np.savez(buffer, images=result["images"], meta=np.array(json.dumps(meta, sort_keys=True)))
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(buffer.getvalue())
    os.replace(tmp, path)


def load_task(path: Path) -> dict[str, Any]:
    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(str(data["meta"]))
        return {"images": data["images"], **meta}


def execute(study: Study, tasks: Sequence[tuple[Method, int]], tasks_dir: Path, ray_address: str | None = None) -> int:
    """Runs the tasks without a finished file in `tasks_dir`; returns how many ran.

    `ray_address` None: here, one after the other; "": on a local Ray instance started for
    this; anything else: on the Ray cluster at that address.
    """
    tasks_dir.mkdir(parents=True, exist_ok=True)
    pending: dict[str, tuple[Method, int]] = {}
    for method, seed in tasks:
        key = study.task_key(method, seed)
        if not task_path(tasks_dir, key).exists():
            pending.setdefault(key, (method, seed))
    if not pending:
        return 0
    meta = lambda m, s: {"label": m.label, "seed": s, "method": m.identity(), "torch": torch.__version__}  # noqa: E731
    bar = tqdm(total=len(pending), desc="fidelity tasks", unit="task")
    if ray_address is None:
        for key, (method, seed) in pending.items():
            bar.set_postfix_str(f"{method.label}, seed {seed}")
            save_task(task_path(tasks_dir, key), run_task(study, method, seed), meta(method, seed))
            bar.update()
    else:
        _execute_on_ray(study, pending, tasks_dir, ray_address, bar, meta)
    bar.close()
    return len(pending)


def _execute_on_ray(study, pending, tasks_dir, address, bar, meta) -> None:
    import ray
    import ray.cloudpickle

    # The task function is sent by value, so workers need dcfx but not this script.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    started = not ray.is_initialized()
    if started:
        if address:
            ray.init(address=address)
        else:  # "local": a new instance of our own, never one found on this machine
            ray.init(address="local", include_dashboard=False, log_to_driver=False)
    try:
        remote = ray.remote(num_cpus=study.threads, max_retries=0)(run_task)
        running = {remote.remote(study, method, seed): key for key, (method, seed) in pending.items()}
        while running:
            done, _ = ray.wait(list(running), num_returns=1)
            key = running.pop(done[0])
            method, seed = pending[key]
            save_task(task_path(tasks_dir, key), ray.get(done[0]), meta(method, seed))
            bar.update()
    finally:
        if started:
            ray.shutdown()


# -- measuring --------------------------------------------------------------------------------------


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
    from dcfx.report import report

    branches = sorted(set(branches))
    if not branches:
        return {}
    pipe = _pipeline(model)
    batch = 2 if guidance > 1 else 1
    c = pipe.unet.config
    x = torch.zeros(batch, c.in_channels, c.sample_size, c.sample_size)
    cond = pipe.label_embedding(torch.zeros(batch, dtype=torch.int64)).detach()
    r = report(pipe.unet, x, torch.tensor([999]), encoder_hidden_states=cond, branches=branches)
    return {b.branch: b.shallow_fraction for b in r.branches}


def cost_of(history: str, config: DeepCacheConfig | None, fraction: dict[int, float]) -> float:
    """Full-U-Net-call equivalents of one generation, from the steps it ran."""
    if config is None:
        return float(len(history))
    return history.count("F") + history.count("S") * fraction[config.branch]


def measure(study: Study, methods: Sequence[Method], reference: Method, check: Method, seeds: Sequence[int],
            tasks_dir: Path, fraction: dict[int, float]) -> tuple[list[Row], dict[int, dict[str, float]]]:
    """Rows with their metrics, and per seed the reference's convergence check."""
    from dcfx.models.quality import judge as make_judge, psnr, ssim

    judge = make_judge()
    rows, checks = [], {}
    for seed in seeds:
        load = lambda m: load_task(task_path(tasks_dir, study.task_key(m, seed)))  # noqa: E731
        ref_task, check_task = load(reference), load(check)
        ref_images, chk = torch.from_numpy(ref_task["images"]), torch.from_numpy(check_task["images"])
        per_image = [psnr(chk[i : i + 1], ref_images[i : i + 1]) for i in range(len(chk))]
        checks[seed] = {"psnr": psnr(chk, ref_images), "ssim": ssim(chk, ref_images), "min_psnr": min(per_image),
                        "seconds": ref_task["seconds"] + check_task["seconds"]}
        cache: dict[str, dict] = {}
        for m in methods:
            key = study.task_key(m, seed)
            task = cache.setdefault(key, load_task(task_path(tasks_dir, key)))
            x = torch.from_numpy(task["images"])
            metrics = {"psnr_ref": psnr(x, ref_images), "ssim_ref": ssim(x, ref_images)}
            if m.config is not None:
                pk = study.task_key(m.plain, seed)
                plain = torch.from_numpy(cache.setdefault(pk, load_task(task_path(tasks_dir, pk)))["images"])
                metrics.update(psnr_plain=psnr(x, plain), ssim_plain=ssim(x, plain))
            labels = torch.arange(len(x)) % 10
            metrics.update(accuracy=judge.accuracy(x, labels), frechet=judge.frechet_to_test(x))
            rows.append(Row(m, seed, task["history"], cost_of(task["history"], m.config, fraction), task["seconds"], metrics))
    return rows, checks


# -- judging ---------------------------------------------------------------------------------------


def mean_std(values: Sequence[float]) -> tuple[float, float]:
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


def interpolate(rows: Sequence[Row], family: str, cost: float, seed: int, metric: str) -> float | None:
    """The family's `metric` at `cost` for `seed`: linear in log cost between its rows.

    None outside its range, except that up to `_END_SLACK` beyond an end row counts as that row
    (schedules price a family's end rows a hundredth or so apart from another family's).
    """
    pts = sorted((r.cost, r.metrics[metric]) for r in rows if r.method.family == family and r.seed == seed)
    if not pts or not pts[0][0] * (1 - _END_SLACK) <= cost <= pts[-1][0] * (1 + _END_SLACK):
        return None
    cost = min(max(cost, pts[0][0]), pts[-1][0])
    for (c0, v0), (c1, v1) in zip(pts, pts[1:] + pts[-1:]):
        if c0 <= cost <= c1:
            if c1 - c0 < 1e-12:
                return v0
            w = (math.log(cost) - math.log(c0)) / (math.log(c1) - math.log(c0))
            return v0 + w * (v1 - v0)
    return None


_END_SLACK = 0.01


@dataclass
class AtCost:
    """A family at one cost: per-seed PSNR vs the reference and accuracy (None: out of range)."""

    family: str
    psnr: dict[int, float]
    accuracy: dict[int, float]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.psnr.values())


def at_cost(rows: Sequence[Row], family: str, cost: float | dict[int, float], seeds: Sequence[int]) -> AtCost | None:
    out = AtCost(family, {}, {})
    for s in seeds:
        c = cost[s] if isinstance(cost, dict) else cost
        p, a = interpolate(rows, family, c, s, "psnr_ref"), interpolate(rows, family, c, s, "accuracy")
        if p is None:
            return None
        out.psnr[s], out.accuracy[s] = p, a
    return out


def best_at(rows: Sequence[Row], kind: str, cost: float | dict[int, float], seeds: Sequence[int]) -> AtCost | None:
    """The family of `kind` with the best mean PSNR vs the reference at `cost`."""
    candidates = []
    for fam, methods in families(rows).items():
        if methods[0].kind != kind:
            continue
        found = at_cost(rows, fam, cost, seeds)
        if found is not None:
            candidates.append(found)
    return max(candidates, key=lambda a: a.mean, default=None)


def paired(a: dict[int, float], b: dict[int, float]) -> tuple[float, float]:
    """Mean and std over seeds of a - b (same noise per seed); std is nan with one seed."""
    diffs = [a[s] - b[s] for s in a if s in b]
    mean, std = mean_std(diffs)
    return mean, (std if len(diffs) > 1 else float("nan"))


def verdict(mean: float, spread: float, higher_is_better: bool = True) -> str:
    """'better'/'worse' only where the mean paired difference exceeds its spread over seeds."""
    if math.isnan(spread):
        return "one seed: no spread"
    if abs(mean) <= spread:
        return "no difference"
    return "better" if (mean > 0) == higher_is_better else "worse"


def _diff(d: tuple[float, float] | None, digits: int = 1, scale: float = 1.0) -> str:
    if d is None:
        return "—"
    spread = "" if math.isnan(d[1]) else f" ± {scale * d[1]:.{digits}f}"
    mean = round(scale * d[0], digits) + 0.0  # no "-0.0"
    return f"{mean:+.{digits}f}{spread}"


# -- reporting -------------------------------------------------------------------------------------


def _ms(values: Sequence[float], digits: int = 1, scale: float = 1.0) -> str:
    m, s = mean_std([scale * v for v in values])
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def _cost(values: Sequence[float]) -> str:
    """A cost: one number when every seed ran the same steps (static schedules), else mean ± std."""
    return f"{values[0]:.2f}" if len(set(values)) == 1 else _ms(values, 2)


def markdown(rows: list[Row], checks: dict, args: argparse.Namespace, study: Study, reference: Method, check: Method,
             fraction: dict[int, float], seconds: float, executed: int) -> str:
    seeds = sorted({r.seed for r in rows})
    from dcfx.models.quality import judge

    head = (
        f"Digits model (guidance {study.guidance:g}), {study.samples} samples x {len(seeds)} seeds "
        f"({', '.join(map(str, seeds))}) per row, timestep spacing '{study.spacing}', {study.threads} torch thread(s) "
        f"per task; mean ± std over seeds. Judge: accuracy {100 * judge().test_accuracy:.1f}% on the held-out digits. "
        f"Cost in full-U-Net-call equivalents per sample"
        + (f" (shallow step: {', '.join(f'b={b} {100 * f:.1f}%' for b, f in sorted(fraction.items()))} of a full one, dcfx.report)"
           if fraction else "")
        + f". `python benchmarks/fidelity_study.py {' '.join(args.argv)}`".rstrip()
        + f" on {platform.machine()} ({os.cpu_count()} cores, shared), torch {torch.__version__}: sampling took "
          f"{(sum(r.seconds for r in rows) + sum(c['seconds'] for c in checks.values())) / 60:.0f} min summed over "
          f"the tasks; this invocation ran {executed} of them in {seconds / 60:.1f} min."
    )
    lines = [head, "", f"**Reference**: {reference.label}, from the same noise. Its convergence check, {check.label} "
             "against it:", "",
             "| seed | PSNR dB | SSIM | worst image PSNR dB |", "|---|---:|---:|---:|"]
    for s in seeds:
        c = checks[s]
        lines.append(f"| {s} | {c['psnr']:.1f} | {c['ssim']:.5f} | {c['min_psnr']:.1f} |")
    lines.append(f"| mean ± std | {_ms([checks[s]['psnr'] for s in seeds])} | "
                 f"{_ms([checks[s]['ssim'] for s in seeds], 5)} | {min(checks[s]['min_psnr'] for s in seeds):.1f} (min) |")
    correlations = signal_correlations(args.tasks_dir)
    if correlations:
        lines += ["", "**Which adaptive signal predicts the deep feature's change**: Spearman rank correlation of "
                  "each signal with the true relative L1 change of the cached deep feature, since a full step (gaps "
                  "of 1-5 steps) and step to step, pooled over the steps of three calibration generations of 16 "
                  "samples each (their own noise), mean ± spread over the calibrations the study ran "
                  f"({len(json.loads((args.tasks_dir / 'calibrations.json').read_text()))}: DPM-Solver++ 2M at "
                  "each calibrated row's step count).", "", "| signal | Spearman |", "|---|---:|"]
        for name, (mean, spread) in sorted(correlations.items(), key=lambda kv: -kv[1][0]):
            lines.append(f"| {name} | {mean:.3f} ± {spread:.3f} |")

    if any(r.method.scheduler == "ddim" for r in rows):
        lines += ["", "DDIM as the model ships it clips its prediction of the clean sample to [-1, 1] at every step "
                  "(`clip_sample=True`), so it does not solve the ODE the reference and the unclipped solvers (DDIM "
                  "no-clip, DPM-Solver++, UniPC) converge to: its PSNR vs converged includes that difference and does "
                  "not keep rising with its steps. Judge DDIM rows, and DeepCache on DDIM, by PSNR vs plain, accuracy "
                  "and Fréchet distance as well."]
    by_method: dict[Method, list[Row]] = {}
    for r in rows:
        by_method.setdefault(r.method, []).append(r)
    fams = families(rows)
    lines += ["", "All rows (\"vs plain\": against the same scheduler at the same steps without dcfx):", "",
              "| method | cost | PSNR vs converged | SSIM vs converged | PSNR vs plain | SSIM vs plain | accuracy % | Fréchet |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for fam, methods in fams.items():
        for m in sorted(methods, key=lambda m: statistics.fmean(r.cost for r in by_method[m])):
            g = by_method[m]
            get = lambda k: [r.metrics[k] for r in g]  # noqa: E731
            vs_plain = (_ms(get("psnr_plain")), _ms(get("ssim_plain"), 4)) if m.config is not None else ("—", "—")
            cost = _cost([r.cost for r in g])
            lines.append(f"| {m.label} | {cost} | {_ms(get('psnr_ref'))} | {_ms(get('ssim_ref'), 4)} | {vs_plain[0]} | "
                         f"{vs_plain[1]} | {_ms(get('accuracy'), 1, 100)} | {_ms(get('frechet'), 2)} |")

    budgets = args.budgets
    lines += ["", "PSNR (dB) vs the converged reference at each budget, per family (interpolated per seed in log cost "
              "between the family's rows; blank: outside the family's range):", "",
              "| family | kind | " + " | ".join(f"cost {b:g}" for b in budgets) + " |",
              "|---|---|" + "---:|" * len(budgets)]
    for fam, methods in fams.items():
        cells = []
        for b in budgets:
            a = at_cost(rows, fam, b, seeds)
            cells.append(_ms(list(a.psnr.values())) if a else "")
        lines.append(f"| {fam} | {methods[0].kind} | " + " | ".join(cells) + " |")

    lines += ["", f"**Goal** (issue 16): at each budget the best dcfx policy at least {args.goal_db:g} dB (PSNR vs "
              "converged) above the best plain scheduler and above the best uniform DeepCache, class accuracy within "
              "1 point of the best plain scheduler's. Differences paired by seed, mean ± std:", "",
              "| budget | best plain | PSNR | best uniform DeepCache | PSNR | best dcfx policy | PSNR | vs plain dB | "
              "vs uniform dB | accuracy vs plain (pts) | goal |", "|---:|---|---:|---|---:|---|---:|---:|---:|---:|---|"]
    goal_met = []
    for b in budgets:
        plain = best_at(rows, "plain", b, seeds)
        uni = best_at(rows, "uniform DeepCache", b, seeds)
        pol = best_at(rows, "dcfx policy", b, seeds)
        name = lambda a: a.family if a else "none in range"  # noqa: E731
        val = lambda a: _ms(list(a.psnr.values())) if a else "—"  # noqa: E731
        d_plain = paired(pol.psnr, plain.psnr) if pol and plain else None
        d_uni = paired(pol.psnr, uni.psnr) if pol and uni else None
        d_acc = paired(pol.accuracy, plain.accuracy) if pol and plain else None
        if d_plain is None or d_uni is None:
            state = "not judged"  # a side of the comparison has no rows at this cost
        else:
            ok = d_plain[0] >= args.goal_db and d_uni[0] >= args.goal_db and d_acc[0] >= -0.01
            state = "met" if ok else "not met"
        goal_met.append(state)
        lines.append(f"| {b:g} | {name(plain)} | {val(plain)} | {name(uni)} | {val(uni)} | {name(pol)} | {val(pol)} | "
                     f"{_diff(d_plain)} | {_diff(d_uni)} | {_diff(d_acc, 1, 100)} | {state} |")
    lines += ["", f"Goal met at {goal_met.count('met')} of {len(budgets)} budgets"
              + (f" ({goal_met.count('not judged')} not judged: no rows of a kind at that cost)." if "not judged" in goal_met else ".")]

    lines += ["", "Each dcfx row against the best plain scheduler's frontier at the row's own cost (per seed) and "
              "against the best uniform DeepCache there (for other policies); paired by seed, mean ± std; "
              "\"better\"/\"worse\" only beyond the spread:", "",
              "| dcfx row | cost | PSNR vs converged | best plain there | diff dB | verdict | uniform DeepCache diff dB | "
              "accuracy diff (pts) |", "|---|---:|---:|---|---:|---|---:|---:|"]
    for m, g in by_method.items():
        if m.config is None:
            continue
        cost = {r.seed: r.cost for r in g}
        mine = {r.seed: r.metrics["psnr_ref"] for r in g}
        acc = {r.seed: r.metrics["accuracy"] for r in g}
        plain = best_at(rows, "plain", cost, seeds)
        uni = best_at(rows, "uniform DeepCache", cost, seeds) if m.kind == "dcfx policy" else None
        if plain is None:
            lines.append(f"| {m.label} | {_cost(list(cost.values()))} | {_ms(list(mine.values()))} | "
                         "outside the plain rows' costs | — | — | — | — |")
            continue
        d = paired(mine, plain.psnr)
        du = _diff(paired(mine, uni.psnr)) if uni else "—"
        da = paired(acc, plain.accuracy)
        lines.append(f"| {m.label} | {_cost(list(cost.values()))} | {_ms(list(mine.values()))} | {plain.family} | "
                     f"{_diff(d)} | {verdict(*d)} | {du} | {_diff(da, 1, 100)} |")
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
    """PSNR vs the reference and class accuracy against cost: one line per family, band ± std."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("the frontier plot needs matplotlib: pip install 'dcfx[bench]' (or pass --no-plot)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import NullFormatter

    fams = families(rows)
    fig, axes = plt.subplots(1, 2, figsize=(15, 7 + 0.12 * len(fams)), gridspec_kw={"width_ratios": [2, 1]})
    colors = plt.get_cmap("tab10").colors + plt.get_cmap("Dark2").colors
    for i, (fam, methods) in enumerate(fams.items()):
        plain = methods[0].kind == "plain"
        style = {"color": colors[i % len(colors)], "linestyle": "--" if plain else "-", "marker": "s" if plain else "o",
                 "markersize": 4, "linewidth": 1.6}
        pts = []
        for m in methods:
            g = [r for r in rows if r.method == m]
            pts.append((statistics.fmean(r.cost for r in g), *mean_std([r.metrics["psnr_ref"] for r in g]),
                        *mean_std([100 * r.metrics["accuracy"] for r in g])))
        pts.sort()
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


# -- the command -----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", choices=("budgets", "ddim50", "none"), default="budgets", help="rows to run (default: %(default)s)")
    p.add_argument("--method", action="append", default=[], metavar="SPEC", type=parse_method,
                   help="an extra row, SCHEDULER:STEPS[:FIELD=VALUE,...] (repeatable); schedulers: " + ", ".join(SCHEDULERS))
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


def main(argv: list[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    reference = parse_method(args.reference)
    if reference.config is not None:
        raise SystemExit("--reference must be a plain solver, SCHEDULER:STEPS")
    reference = dataclasses.replace(reference, label=f"{reference.label} (reference)", family="reference")
    check = Method(reference.scheduler, args.check_steps, label=f"{SCHEDULERS[reference.scheduler][0]} {args.check_steps}",
                   family="reference check")
    study = Study(args.samples, args.guidance, args.spacing, args.threads, args.model, model_digest(args.model))

    fraction_branches = set(grid_branches(args.grid))
    methods: list[Method] = []
    if args.grid == "ddim50":
        methods += ddim50_grid(shallow_fractions(args.model, fraction_branches, args.guidance))
    elif args.grid == "budgets":
        methods += baseline_grid() + policy_grid(study, args.tasks_dir)
    methods += args.method
    for m in list(methods):  # every dcfx row is judged against its plain sampler too
        if m.config is not None and m.plain not in methods:
            methods.append(m.plain)
    methods = list(dict.fromkeys(methods))
    fraction = shallow_fractions(args.model, {m.config.branch for m in methods if m.config is not None}, args.guidance)

    tasks = [(m, s) for s in args.seeds for m in (reference, check, *methods)]
    print(f"{len(methods)} rows + reference and check, {len(args.seeds)} seeds: {len(tasks)} tasks; "
          f"finished tasks in {args.tasks_dir}", file=sys.stderr)
    start = time.perf_counter()
    executed = execute(study, tasks, args.tasks_dir, args.ray)
    seconds = time.perf_counter() - start
    rows, checks = measure(study, methods, reference, check, args.seeds, args.tasks_dir, fraction)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    text = markdown(rows, checks, args, study, reference, check, fraction, seconds, executed)
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
