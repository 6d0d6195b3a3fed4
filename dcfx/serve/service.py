"""`Service`: what one replica does, without Ray. A request body becomes a `Job` (`parse`); a
batch of jobs becomes groups that share the dcfx setting, step count and guidance, one pipeline
call per group (`run`), shortest first; a job whose deadline has passed, or would pass before
its group finished, is answered with `DeadlineExceeded` instead of running.
"""

from __future__ import annotations

import base64
import dataclasses
import inspect
import io
import logging
import math
import secrets
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from .. import costs, enable, load_package
from ..models import describe, load, model_kind
from . import package as packages
from .options import OFF, ServeOptions, parse_setting, resolve

FIELDS = ("label", "prompt", "seed", "steps", "guidance", "dcfx")
_SEED_LIMIT = 2**63  # torch.Generator.manual_seed takes up to 64 bits; stay in int64
logger = logging.getLogger("ray.serve")


class BadRequest(ValueError):
    """A request the deployment refuses (HTTP 400); the message names the problem and the
    valid choices."""


class DeadlineExceeded(TimeoutError):
    """A job not run because its deadline passed before its group started, or would pass
    before the group finished (HTTP 504)."""


@dataclasses.dataclass(frozen=True)
class Job:
    """One accepted request: its images (labels or prompts, one seed each), how to draw them,
    when it arrived and by when it must be answered (wall-clock seconds, `time.time()`)."""

    inputs: tuple[int | str, ...]
    seeds: tuple[int, ...]
    steps: int
    guidance: float
    setting: str
    received: float = dataclasses.field(default_factory=time.time, compare=False)
    deadline: float | None = dataclasses.field(default=None, compare=False)

    @property
    def group(self) -> tuple[str, int, float]:
        """Jobs with the same group run in one pipeline call."""
        return self.setting, self.steps, self.guidance


def count_images(jobs: Sequence[Job]) -> int:
    """`@serve.batch`'s batch size: images, not requests."""
    return sum(len(job.inputs) for job in jobs)


class Service:
    """A replica's work: load the pipeline and its dcfx settings (`ServeOptions`: model,
    settings, package, compile, max_batch_size, max_steps, request_timeout_s), check requests
    (`parse`), and turn a batch of jobs into images (`run`).

    Every setting runs on its own copy of the pipeline (shared modules, its own scheduler and
    `DeepCacheUNet`), so no request re-wraps, re-captures or re-compiles anything. With a
    package the dcfx settings run its graphs, padded to its batch; they must use its branch.
    `warm_up` runs each setting once per batch size now; `device`: default CUDA when there is
    one. `Service(settings=["3:0"])` is `Service(ServeOptions(settings=["3:0"]))`.
    """

    def __init__(self, options: ServeOptions | None = None, *, warm_up: bool = True, device: str | None = None,
                 **changes: Any):
        self.options = options = resolve(options, **changes)
        self.max_batch_size = options.max_batch_size
        self.configs = options.configs
        self.default_setting = next(iter(self.configs))
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if model_kind(options.model) == "unet":
            raise FileNotFoundError(
                f"{options.model} is not a diffusers pipeline folder (no model_index.json); give a digits model "
                f"folder or a text-to-image pipeline saved with save_pretrained"
            )
        self.model_name, self.pipe = describe(options.model), load(options.model)
        if self.device.type != "cpu":
            self.pipe.to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        self.takes_labels = hasattr(self.pipe, "label_embedding")
        defaults = inspect.signature(self.pipe.__call__).parameters
        if not self.takes_labels and "prompt" not in defaults:
            raise ValueError(
                f"{options.model}: {type(self.pipe).__name__} takes neither class labels nor a prompt; dcfx serve "
                f"serves the digits model or text-to-image pipelines"
            )
        self.default_steps = _default(defaults, "num_inference_steps", 50)
        self.default_guidance = float(_default(defaults, "guidance_scale", 1.0))
        trained = int(self.pipe.scheduler.config.get("num_train_timesteps", 1000))
        if options.max_steps is not None and options.max_steps > trained:
            raise ValueError(f"max_steps must be <= {trained} (the scheduler's training steps), got {options.max_steps}")
        self.max_steps = options.max_steps or trained
        self._steps_bound = "this deployment's max_steps" if options.max_steps else "the scheduler's training steps"
        self.package = Path(options.package) if options.package is not None else None
        # setting -> FLOPs of a full and of a shallow U-Net call per row (see _row_flops)
        self._flops: dict[str, tuple[int, int]] = {}
        # (setting, images) -> seconds per step of its last pipeline call, for the deadline
        self._step_seconds: dict[tuple[str, int], float] = {}
        packaged = None
        if self.package is not None:
            full, shallow = packages.row_flops(packages.check(options))
            # A full call costs what the plain U-Net does (as dcfx.costs counts): "off" too.
            self._flops.update({n: (full, shallow if c is not None else 0) for n, c in self.configs.items()})
            packaged = load_package(self.package, device=self.device)
        self.pipes: dict[str, Any] = {}
        for name, config in self.configs.items():
            self.pipes[name] = self.pipe if config is None else self._copy(config, packaged)
        if warm_up:
            self.warm_up()

    # -- requests -----------------------------------------------------------------------

    def parse(self, body: Any, received: float | None = None) -> Job:
        """A request body (decoded JSON) as a `Job`, or `BadRequest` naming what is wrong.
        `received`: when the request arrived (`time.time()`; default now), from which its
        deadline counts."""
        if not isinstance(body, dict):
            raise BadRequest(f"the body must be a JSON object with the fields {', '.join(FIELDS)}; got {type(body).__name__}")
        unknown = sorted(set(body) - set(FIELDS))
        if unknown:
            raise BadRequest(f"unknown field(s) {', '.join(map(repr, unknown))}; valid fields are {', '.join(FIELDS)}")
        inputs = self._inputs(body)
        if len(inputs) > self.max_batch_size:
            raise BadRequest(
                f"a request may ask for at most {self.max_batch_size} images (this deployment's batch size), "
                f"got {len(inputs)}; send several requests"
            )
        seed = body.get("seed")
        if seed is None:
            seed = secrets.randbelow(2**31)  # returned with the images, so the draw can be repeated
        elif isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= _SEED_LIMIT - len(inputs):
            raise BadRequest(f"seed must be an integer in 0..{_SEED_LIMIT - len(inputs)} (image i gets seed + i), got {seed!r}")
        steps = body.get("steps", self.default_steps)
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= self.max_steps:
            raise BadRequest(f"steps must be an integer in 1..{self.max_steps} ({self._steps_bound}), got {steps!r}")
        guidance = body.get("guidance", self.default_guidance)
        if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not math.isfinite(guidance) or guidance < 0:
            raise BadRequest(f"guidance must be a finite number >= 0 (<= 1 turns classifier-free guidance off), got {guidance!r}")
        setting = self._setting(body.get("dcfx", self.default_setting))
        if self.package is not None and setting != OFF and guidance <= 1:
            raise BadRequest(
                f"guidance {guidance:g} turns classifier-free guidance off, which halves the U-Net's batch, and this "
                f"deployment's AOT package holds the guided batch only: send guidance > 1, or dcfx {OFF!r}"
            )
        received = time.time() if received is None else received
        timeout = self.options.request_timeout_s
        return Job(tuple(inputs), tuple(range(seed, seed + len(inputs))), steps, float(guidance), setting,
                   received, None if timeout is None else received + timeout)

    def _inputs(self, body: dict) -> list[int | str]:
        want, other = ("label", "prompt") if self.takes_labels else ("prompt", "label")
        if other in body:
            raise BadRequest(f"this deployment serves {self.model_name}, which takes {want!r}, not {other!r}")
        if want not in body:
            raise BadRequest(f"the field {want!r} is missing ({self._describe_input()})")
        value = body[want]
        values = value if isinstance(value, list) else [value]
        if not values:
            raise BadRequest(f"{want!r} is an empty list ({self._describe_input()})")
        if self.takes_labels:
            classes = self.pipe.label_embedding.config.num_classes
            bad = [v for v in values if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < classes]
            if bad:
                raise BadRequest(f"unknown label(s) {', '.join(map(repr, bad))}: this model draws the classes 0..{classes - 1}")
        elif not all(isinstance(v, str) for v in values):
            raise BadRequest(f"'prompt' must be a string or a list of strings, got {value!r}")
        return values

    def _describe_input(self) -> str:
        if self.takes_labels:
            return f"a class 0..{self.pipe.label_embedding.config.num_classes - 1} or a list of them"
        return "a string or a list of strings"

    def _setting(self, text: Any) -> str:
        offered = ", ".join(self.configs)
        try:
            name, _ = parse_setting(text)
        except ValueError as e:
            raise BadRequest(f"{e}; this deployment offers the dcfx settings {offered}") from None
        if name not in self.configs:
            raise BadRequest(f"dcfx setting {name!r} is not served here; this deployment offers {offered}")
        return name

    def describe(self) -> dict[str, Any]:
        """What a client may send (the deployment's answer to GET)."""
        return {
            "model": self.model_name,
            "input": ("label: " if self.takes_labels else "prompt: ") + self._describe_input(),
            "fields": list(FIELDS),
            "dcfx": list(self.configs),
            "defaults": {"dcfx": self.default_setting, "steps": self.default_steps, "guidance": self.default_guidance},
            "max_images_per_request": self.max_batch_size,
            "max_steps": self.max_steps,
            "request_timeout_s": self.options.request_timeout_s,
            "package": str(self.package) if self.package is not None else None,
            "device": str(self.device),
        }

    # -- batches ------------------------------------------------------------------------

    def run(self, jobs: Sequence[Job]) -> list[dict[str, Any] | Exception]:
        """One result per job, in order: a dict (images as base64 PNG, the step history, U-Net
        FLOPs, seconds), or the exception that failed it (`DeadlineExceeded`, or its group's
        error). Jobs of one group share a pipeline call; groups run one after the other, fewest
        steps first, and their answers leave together when the last one is done."""
        groups: dict[tuple, list[int]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault(job.group, []).append(i)
        results: list[Any] = [None] * len(jobs)
        for indices in sorted(groups.values(), key=lambda ix: jobs[ix[0]].steps):
            images = count_images([jobs[i] for i in indices])
            members = []
            for i in indices:
                results[i] = self._late(jobs[i], images)
                if results[i] is None:
                    members.append(i)
            if not members:
                continue
            try:
                outcome = self._run_group([jobs[i] for i in members])
            except Exception as e:  # one group's failure is its own jobs' error, not the batch's
                logger.exception("dcfx serve: a batch of %d image(s) failed", count_images([jobs[i] for i in members]))
                outcome = [e] * len(members)
            for i, result in zip(members, outcome):
                results[i] = result
        return results

    def _late(self, job: Job, images: int) -> DeadlineExceeded | None:
        """Why `job` is not run now (in a group of `images` images), or None to run it."""
        if job.deadline is None:
            return None
        now = time.time()
        timeout = f"request_timeout_s={self.options.request_timeout_s:g}"
        if now >= job.deadline:
            return DeadlineExceeded(
                f"not started within {timeout}: it waited {now - job.received:.1f} s behind other requests; "
                f"the deployment is busy, send it again later"
            )
        per_step = self._step_seconds.get((job.setting, images))
        if per_step is not None and now + per_step * job.steps > job.deadline:
            return DeadlineExceeded(
                f"{job.steps} steps would take about {per_step * job.steps:.1f} s here and end after {timeout} "
                f"({now - job.received:.1f} s gone already); ask for fewer steps, or send it again later"
            )
        return None

    def _run_group(self, jobs: list[Job]) -> list[dict[str, Any]]:
        setting, steps, guidance = jobs[0].group
        inputs = [x for job in jobs for x in job.inputs]
        seeds = [s for job in jobs for s in job.seeds]
        if len(inputs) > self.max_batch_size:
            raise ValueError(f"{len(inputs)} images in one group; this service runs at most {self.max_batch_size}")
        images_asked = len(inputs)
        if self.package is not None and setting != OFF:
            # The packaged graphs take one batch size: fill it with throw-away images.
            padding = self.max_batch_size - len(inputs)
            inputs += [inputs[0]] * padding
            seeds += [0] * padding
        started = time.time()
        images, history = self._generate(setting, inputs, seeds, steps, guidance)
        seconds = time.time() - started
        self._step_seconds[(setting, images_asked)] = seconds / steps
        per_image = self._flops_per_image(setting, history, guidance)
        results, at = [], 0
        for job in jobs:
            n = len(job.inputs)
            results.append({
                "images": [
                    {("label" if self.takes_labels else "prompt"): x, "seed": s, "png": _png(im)}
                    for x, s, im in zip(job.inputs, job.seeds, images[at:at + n])
                ],
                "dcfx": setting,
                "steps": steps,
                "guidance": guidance,
                "history": history,
                "flops": per_image * n,
                "seconds": round(seconds, 4),
                "queued_seconds": round(started - job.received, 4),
                "batch_size": len(inputs),
            })
            at += n
        return results

    def _generate(
        self, setting: str, inputs: list, seeds: list[int], steps: int, guidance: float, output_type: str = "pil"
    ) -> tuple[Any, str]:
        """The images (PIL, or as `output_type` says) and the step history ('F' full, 'S'
        shallow, one per U-Net call)."""
        pipe = self.pipes[setting]
        calls = []
        # "off" has no DeepCacheUNet to keep a history: count the plain U-Net's calls instead.
        counting = pipe.unet.register_forward_pre_hook(lambda *_: calls.append("F")) if setting == OFF else None
        try:
            # CPU generators, one per image: the noise of a one-image call with that seed, on any device.
            generators = [torch.Generator().manual_seed(s) for s in seeds]
            first = {"labels": inputs} if self.takes_labels else {"prompt": inputs}
            images = pipe(**first, num_inference_steps=steps, guidance_scale=guidance, generator=generators, output_type=output_type).images
        finally:
            if counting is not None:
                counting.remove()
        return images, "".join(calls) if setting == OFF else pipe.unet.history[-1]

    def _flops_per_image(self, setting: str, history: str, guidance: float) -> int:
        full, shallow = self._row_flops(setting)
        # Classifier-free guidance runs the U-Net on two rows per image (diffusers' convention).
        rows = 2 if guidance > 1 else 1
        return rows * (history.count("F") * full + history.count("S") * shallow)

    def _row_flops(self, setting: str) -> tuple[int, int]:
        """FLOPs of a full and of a shallow U-Net call per row (one image without guidance), as
        `dcfx.costs` counts them (attention included, as `dcfx.report` plans): the plain U-Net
        for "off", the setting's graphs for dcfx (a package's come from its manifest)."""
        if setting not in self._flops:
            args, kwargs = self._record_call(setting, 1, self.default_guidance)
            sample = args[0] if args else next(iter(kwargs.values()))
            rows = sample.shape[0]
            unet = self.pipes[setting].unet
            if self.configs[setting] is None:
                full, shallow = costs.call_flops(unet, *args, **kwargs), 0
            else:
                cost = unet.graphs(*args, **kwargs).cost
                full, shallow = cost.full, cost.shallow
            self._flops[setting] = (full // rows, shallow // rows)
        return self._flops[setting]

    def _record_call(self, setting: str, images: int, guidance: float) -> tuple[tuple, dict]:
        """The arguments the pipeline of `setting` passes its U-Net for `images` images."""
        calls = []
        unet = self.pipes[setting].unet
        hook = unet.register_forward_pre_hook(lambda m, a, kw: calls.append((a, kw)), with_kwargs=True)
        try:
            self._generate(setting, [self._filler()] * images, [0] * images, 1, guidance)
        finally:
            hook.remove()
        return calls[0]

    def _filler(self) -> int | str:
        return 0 if self.takes_labels else ""

    def warm_up(self) -> None:
        """Run each dcfx setting once per batch size (the package's one with a package), so
        that captures and compiles happen now, and count each setting's FLOPs."""
        for name, config in self.configs.items():
            if config is not None:
                sizes = [self.max_batch_size] if self.package is not None else range(1, self.max_batch_size + 1)
                # Two full steps' worth, so both graphs run (and compile) under every schedule.
                steps = max(2, 2 * config.interval)
                for n in sizes:
                    self._generate(name, [self._filler()] * n, [0] * n, steps, self.default_guidance)
            self._row_flops(name)

    def build_package(self, path: str | Path, overwrite: bool = False) -> Path:
        """Compile the first dcfx setting's graphs for this deployment's signature (a batch of
        `max_batch_size` images with the default guidance) into an AOT package at `path`; its
        manifest records the batch and the graphs' FLOPs. Replaces an earlier dcfx package,
        and another file only with `overwrite`."""
        name, config = next(((n, c) for n, c in self.configs.items() if c is not None), (OFF, None))
        if config is None:
            raise ValueError(f"a package holds dcfx graphs: give a dcfx setting, not only {OFF!r}")
        if self.default_guidance <= 1:
            raise ValueError(f"{self.model_name} samples without guidance by default; dcfx serve packages the guided batch")
        args, kwargs = self._record_call(OFF, self.max_batch_size, self.default_guidance)
        return packages.write(path, self.pipe.unet, config, args, kwargs, overwrite=overwrite)

    def _copy(self, config: Any, packaged: Any) -> Any:
        """The pipeline with its own scheduler and a DeepCacheUNet of `config` (the packaged
        graphs' if any): every setting keeps its captures, compiled graphs and caches."""
        from diffusers.utils import logging as diffusers_logging

        scheduler = type(self.pipe.scheduler).from_config(self.pipe.scheduler.config)
        overrides = {"scheduler": scheduler} if packaged is None else {"scheduler": scheduler, "unet": packaged}
        verbosity = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()  # from_pipe's notes about dtypes it does not change
        try:
            pipe = type(self.pipe).from_pipe(self.pipe, **overrides)
        finally:
            diffusers_logging.set_verbosity(verbosity)
        pipe.set_progress_bar_config(disable=True)
        enable(pipe, config)  # a package's stand-in U-Net refuses another branch here, naming both
        return pipe


def build_package(path: str | Path, options: ServeOptions | None = None, *, overwrite: bool = False,
                  **changes: Any) -> Path:
    """Write the AOT package that a deployment with these options loads (`package=path`): the
    graphs of the first dcfx setting, compiled with AOTInductor for a batch of `max_batch_size`
    images with guidance, on this machine's device (build it on the kind of machine that
    serves; about a minute for the digits model on a CPU). Returns the package's path.

    >>> build_package("digits-b4.pt2", settings=["3:0"], max_batch_size=4)  # doctest: +SKIP
    """
    # What is built is eager graphs: a package or compile given for serving plays no part.
    options = dataclasses.replace(resolve(options, **changes), package=None, compile=False)
    return Service(options, warm_up=False).build_package(path, overwrite=overwrite)


def _default(parameters: Any, name: str, fallback: Any) -> Any:
    p = parameters.get(name)
    return p.default if p is not None and p.default is not inspect.Parameter.empty and p.default is not None else fallback


def _png(image: Any) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
