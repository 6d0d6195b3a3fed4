"""Running the fidelity study's tasks: serially or on Ray, resuming from finished ones.

Each (method, seed) is one task: it samples `Study.samples` images (labels 0..9 in turn) from
the seed's noise with `Study.threads` torch threads, independent of any other task, so its
images are the same bit for bit wherever it runs. Finished tasks are kept in a folder, one .npz
each, named by a hash of everything that decides its images (`Study.task_key`), and a re-run
skips them. On Ray, the pending tasks run as Ray tasks (`Study.threads` CPUs each) on a new local
instance (never one that another process started here) or on a running cluster joined by
address, whose workers need dcfx installed (not this package: it is sent by value). Ray is
imported only then.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from dcfx.models.compare import make_scheduler

from .methods import Method

# Bump when a change alters what a task computes: finished tasks of older versions are ignored.
TASK_VERSION = 1


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
    """A digest of the digits model's weights and scheduler (the embedded one for None)."""
    from dcfx.models.digits import WEIGHTS_DIR

    root = Path(path) if path else WEIGHTS_DIR
    h = hashlib.sha256()
    for name in ("unet/diffusion_pytorch_model.safetensors", "label_embedding/diffusion_pytorch_model.safetensors",
                 "scheduler/scheduler_config.json"):
        h.update((root / name).read_bytes())
    return h.hexdigest()[:16]


# model -> (its pipeline, its shipped scheduler config): loaded once per process.
_PIPELINES: dict[str | None, tuple[Any, dict]] = {}


def pipeline(model: str | None, scheduler: str | None = None, spacing: str = "trailing") -> Any:
    """The digits pipeline of `model`, with a new `scheduler` (a key of SCHEDULERS) built from
    its shipped scheduler config at that timestep spacing (None: the scheduler it has)."""
    if model not in _PIPELINES:
        from dcfx.models import load

        pipe = load(model)
        pipe.set_progress_bar_config(disable=True)
        _PIPELINES[model] = pipe, dict(pipe.scheduler.config)
    pipe, shipped = _PIPELINES[model]
    if scheduler is not None:
        pipe.scheduler = make_scheduler(scheduler, shipped, spacing)
    return pipe


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
        pipe = pipeline(study.model, method.scheduler, study.spacing)
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


def load_finished(study: Study, tasks_dir: Path, method: Method, seed: int) -> dict[str, Any]:
    """The finished task of (method, seed)."""
    return load_task(task_path(tasks_dir, study.task_key(method, seed)))


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
    bar = tqdm(total=len(pending), desc="fidelity tasks", unit="task")
    if ray_address is None:
        for key, (method, seed) in pending.items():
            bar.set_postfix_str(f"{method.label}, seed {seed}")
            _save(tasks_dir, key, method, seed, run_task(study, method, seed))
            bar.update()
    else:
        _execute_on_ray(study, pending, tasks_dir, ray_address, bar)
    bar.close()
    return len(pending)


def _save(tasks_dir: Path, key: str, method: Method, seed: int, result: dict[str, Any]) -> None:
    meta = {"label": method.label, "seed": seed, "method": method.identity(), "torch": torch.__version__}
    save_task(task_path(tasks_dir, key), result, meta)


def _execute_on_ray(study: Study, pending: dict[str, tuple[Method, int]], tasks_dir: Path, address: str, bar: Any) -> None:
    import ray
    import ray.cloudpickle

    # The task function and the study's classes are sent by value, so workers need dcfx but
    # not this package.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__package__])
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
            _save(tasks_dir, key, *pending[key], ray.get(done[0]))
            bar.update()
    finally:
        if started:
            ray.shutdown()
