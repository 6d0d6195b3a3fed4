"""Serving with Ray Serve: concurrent HTTP requests batched into pipeline calls, with dcfx.

    from ray import serve
    import dcfx.serve

    serve.run(dcfx.serve.app(settings=["3:0"], max_batch_size=4))
    # POST http://127.0.0.1:8000/ {"label": 3, "seed": 0, "steps": 50, "dcfx": "3:0"}

A replica loads a pipeline (the embedded digits model, or a local diffusers folder) and offers
dcfx *settings* by name: "off" (the plain U-Net) and each `INTERVAL:BRANCH[:SCHEDULE]` it was
given, each on its own copy of the pipeline (shared modules, its own scheduler and
`DeepCacheUNet`), so no request re-wraps, re-captures or re-compiles anything. With an AOT
package (`package=`, made by `build_package` for the deployment's signature) the dcfx settings
run the packaged graphs: a replica starts without exporting or compiling.

HTTP reaches `HTTPIngress`, which hands each request to a `DiffusionDeployment` replica (and
turns a replica that dies under a request into a clear 503). There requests go through Ray
Serve's `@serve.batch`, which counts images (`batch_size_fn`), so one batch holds at most
`max_batch_size` images and a request's images stay together. The batch is split into groups
that share the dcfx setting, step count and guidance, one pipeline call per group. Each image
has its own seed and its own CPU `torch.Generator`, so its noise is the noise of a local
`pipe(label, generator=torch.Generator().manual_seed(seed))`, whatever its batch-mates.

What "the same image" means: at equal batch size the result does not depend on the
batch-mates or the position (bit for bit, tested), but between batch sizes the CPU's matrix
kernels sum in another order for another row count (the time-embedding GEMMs have one row per
image), so a batched image may differ from the one-image call by about 1e-6 in [0, 1] (4e-7
measured on the digits model; the tests allow 1e-5): the PNG pixels agree unless one sits on
a rounding boundary (none of 40 images' did when measured), and then differ by one level.

`Service` is the replica's work without Ray (parse a request, run a batch), so it can be used
and tested in-process. `import dcfx` does not import this module (nor Ray).
"""

from __future__ import annotations

import base64
import dataclasses
import inspect
import io
import json
import logging
import math
import secrets
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from torch.utils.flop_counter import FlopCounterMode

# Through the package's public names, not the module that defines them.
from . import DeepCacheConfig, enable, load_package, optimize
from . import package as package_graphs
from .config import SCHEDULES

OFF = "off"
FIELDS = ("label", "prompt", "seed", "steps", "guidance", "dcfx")
_SEED_LIMIT = 2**63  # torch.Generator.manual_seed takes up to 64 bits; stay in int64
logger = logging.getLogger("ray.serve")


class BadRequest(ValueError):
    """A request the deployment refuses (HTTP 400); the message names the problem and the
    valid choices."""


def parse_setting(text: str) -> tuple[str, DeepCacheConfig | None]:
    """A dcfx setting by name: "off" -> ("off", None); "3:0" or "5:0:nonuniform" ->
    (canonical name, DeepCacheConfig(interval, branch, schedule)).

    >>> name, config = parse_setting("5:0:nonuniform")
    >>> name, config.interval, config.branch, config.schedule
    ('5:0:nonuniform', 5, 0, 'nonuniform')
    """
    form = f"'{OFF}' or INTERVAL:BRANCH[:SCHEDULE] with SCHEDULE one of {', '.join(SCHEDULES)} (e.g. 3:0)"
    if not isinstance(text, str):
        raise ValueError(f"a dcfx setting is a string, {form}; got {text!r}")
    if text.strip().lower() == OFF:
        return OFF, None
    parts = text.strip().split(":")
    if len(parts) not in (2, 3) or not all(p.strip().lstrip("-").isdigit() for p in parts[:2]):
        raise ValueError(f"dcfx setting {text!r} is not {form}")
    schedule = parts[2].strip() if len(parts) == 3 else "uniform"
    try:
        config = DeepCacheConfig(interval=int(parts[0]), branch=int(parts[1]), schedule=schedule)
    except ValueError as e:
        raise ValueError(f"dcfx setting {text!r}: {e}") from None
    name = f"{config.interval}:{config.branch}" + ("" if schedule == "uniform" else f":{schedule}")
    return name, config


@dataclasses.dataclass(frozen=True)
class Job:
    """One accepted request: its images (labels or prompts, one seed each) and how to draw them."""

    inputs: tuple[int | str, ...]
    seeds: tuple[int, ...]
    steps: int
    guidance: float
    setting: str
    received: float = dataclasses.field(default_factory=time.perf_counter, compare=False)

    @property
    def group(self) -> tuple[str, int, float]:
        """Jobs with the same group run in one pipeline call."""
        return self.setting, self.steps, self.guidance


def count_images(jobs: Sequence[Job]) -> int:
    """`@serve.batch`'s batch size: images, not requests."""
    return sum(len(job.inputs) for job in jobs)


class Service:
    """What one replica does, without Ray: load the pipeline and its dcfx settings, check
    requests (`parse`), and turn a batch of jobs into images (`run`).

    Args:
        model: None for the embedded digits model, or a local diffusers folder: a digits
            model folder (`python -m dcfx.models.train_digits` writes one) or a text-to-image
            pipeline whose `__call__` takes `prompt` (requests then carry prompts).
        settings: the dcfx settings offered besides "off" ("3:0", "5:0:nonuniform", ...); a
            request without "dcfx" gets the first one ("off" first makes plain the default).
        package: an AOT package from `build_package` for this deployment's signature
            (`max_batch_size` images with guidance): dcfx settings then run its graphs,
            padded to that batch; they must use its branch.
        compile: compile the dcfx graphs with torch.compile (at warm-up; not with a package).
        max_batch_size: the most images one pipeline call (and one request) may hold.
        warm_up: run every dcfx setting once per batch size now, so that requests never
            wait for a capture or a compile.
        device: "cuda" or "cpu" (default: cuda when torch sees a GPU).

    >>> service = Service(settings=["3:0"], max_batch_size=2, warm_up=False)
    >>> [result] = service.run([service.parse({"label": 7, "seed": 1, "steps": 6})])
    >>> result["history"], len(result["images"])
    ('FSSFSS', 1)
    """

    def __init__(
        self,
        model: str | Path | None = None,
        settings: Sequence[str] = ("3:0",),
        package: str | Path | None = None,
        compile: bool = False,
        max_batch_size: int = 4,
        warm_up: bool = True,
        device: str | None = None,
    ):
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be an integer >= 1, got {max_batch_size!r}")
        if package is not None and compile:
            raise ValueError("a package's graphs are compiled already: pass package= or compile=True, not both")
        self.max_batch_size = max_batch_size
        self.configs: dict[str, DeepCacheConfig | None] = {}
        for text in settings:
            name, config = parse_setting(text)
            if config is not None and compile:
                config = dataclasses.replace(config, compile=True)
            self.configs.setdefault(name, config)
        self.configs.setdefault(OFF, None)
        self.default_setting = next(iter(self.configs))
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model_name, self.pipe = load_pipeline(model)
        if self.device.type != "cpu":
            self.pipe.to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        self.takes_labels = hasattr(self.pipe, "label_embedding")
        if not self.takes_labels and "prompt" not in inspect.signature(self.pipe.__call__).parameters:
            raise ValueError(
                f"{model}: {type(self.pipe).__name__} takes neither class labels nor a prompt; dcfx serve "
                f"serves the digits model or text-to-image pipelines"
            )
        defaults = inspect.signature(self.pipe.__call__).parameters
        self.default_steps = _default(defaults, "num_inference_steps", 50)
        self.default_guidance = float(_default(defaults, "guidance_scale", 1.0))
        self.max_steps = int(self.pipe.scheduler.config.get("num_train_timesteps", 1000))
        self.package = Path(package) if package is not None else None
        # setting -> FLOPs of a full and of a shallow U-Net call per row (see _row_flops)
        self._flops: dict[str, tuple[int, int]] = {}
        packaged = None
        if self.package is not None:
            record = _package_record(self.package, max_batch_size, self.configs.values())
            flops = (record["row_flops"]["full"], record["row_flops"]["shallow"])
            self._flops.update({n: flops for n, c in self.configs.items() if c is not None})
            packaged = load_package(self.package, device=self.device)
        self.pipes: dict[str, Any] = {}
        for name, config in self.configs.items():
            self.pipes[name] = self.pipe if config is None else self._copy(config, packaged)
        if warm_up:
            self.warm_up()

    # -- requests -----------------------------------------------------------------------

    def parse(self, body: Any) -> Job:
        """A request body (decoded JSON) as a `Job`, or `BadRequest` naming what is wrong."""
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
            raise BadRequest(f"steps must be an integer in 1..{self.max_steps} (the scheduler's training steps), got {steps!r}")
        guidance = body.get("guidance", self.default_guidance)
        if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not math.isfinite(guidance) or guidance < 0:
            raise BadRequest(f"guidance must be a finite number >= 0 (<= 1 turns classifier-free guidance off), got {guidance!r}")
        setting = self._setting(body.get("dcfx", self.default_setting))
        if self.package is not None and setting != OFF and guidance <= 1:
            raise BadRequest(
                f"guidance {guidance:g} turns classifier-free guidance off, which halves the U-Net's batch, and this "
                f"deployment's AOT package holds the guided batch only: send guidance > 1, or dcfx {OFF!r}"
            )
        return Job(tuple(inputs), tuple(range(seed, seed + len(inputs))), steps, float(guidance), setting)

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
            "package": str(self.package) if self.package is not None else None,
            "device": str(self.device),
        }

    # -- batches ------------------------------------------------------------------------

    def run(self, jobs: Sequence[Job]) -> list[dict[str, Any] | Exception]:
        """One result per job, in order: a dict (images as base64 PNG, the step history, U-Net
        FLOPs, seconds), or the exception that failed its group. Jobs of one group share a
        pipeline call; groups run one after the other."""
        groups: dict[tuple, list[int]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault(job.group, []).append(i)
        results: list[Any] = [None] * len(jobs)
        for indices in groups.values():
            members = [jobs[i] for i in indices]
            try:
                outcome = self._run_group(members)
            except Exception as e:  # one group's failure is its own jobs' error, not the batch's
                logger.exception("dcfx serve: a batch of %d image(s) failed", count_images(members))
                outcome = [e] * len(members)
            for i, result in zip(indices, outcome):
                results[i] = result
        return results

    def _run_group(self, jobs: list[Job]) -> list[dict[str, Any]]:
        setting, steps, guidance = jobs[0].group
        inputs = [x for job in jobs for x in job.inputs]
        seeds = [s for job in jobs for s in job.seeds]
        if len(inputs) > self.max_batch_size:
            raise ValueError(f"{len(inputs)} images in one group; this service runs at most {self.max_batch_size}")
        padding = 0
        if self.package is not None and setting != OFF:
            # The packaged graphs take one batch size: fill it with throw-away images.
            padding = self.max_batch_size - len(inputs)
            inputs += [inputs[0]] * padding
            seeds += [0] * padding
        started = time.perf_counter()
        images, history = self._generate(setting, inputs, seeds, steps, guidance)
        seconds = time.perf_counter() - started
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
        """FLOPs of a full and of a shallow U-Net call per row (one image without guidance),
        counted by torch's FlopCounterMode as `dcfx.report` counts them: on the plain U-Net
        for "off", on the setting's captured graphs for dcfx (a package's come from its record)."""
        if setting not in self._flops:
            args, kwargs = self._record_call(setting, 1, self.default_guidance)
            sample = args[0] if args else next(iter(kwargs.values()))
            rows = sample.shape[0]
            unet = self.pipes[setting].unet
            with torch.no_grad():
                if self.configs[setting] is None:
                    with FlopCounterMode(display=False) as counter:
                        unet(*args, **kwargs)
                    full, shallow = counter.get_total_flops(), 0
                else:
                    full, shallow = _graph_flops(unet.graphs(*args, **kwargs))
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
        `max_batch_size` images with the default guidance) into an AOT package at `path`, and
        write its record (FLOPs, signature) next to it as `<path>.json`. Replaces an earlier
        package and record, and other files only with `overwrite`."""
        path = Path(path)
        record_path = _record_path(path)
        ours = _read_record(record_path, path) is not None
        for target in (path, record_path):
            if target.exists() and not ours and not overwrite:
                raise FileExistsError(f"{target} exists and was not written by dcfx serve: choose another path, or overwrite it")
        name, config = next(((n, c) for n, c in self.configs.items() if c is not None), (OFF, None))
        if config is None:
            raise ValueError(f"a package holds dcfx graphs: give a dcfx setting, not only {OFF!r}")
        if self.default_guidance <= 1:
            raise ValueError(f"{self.model_name} samples without guidance by default; dcfx serve packages the guided batch")
        args, kwargs = self._record_call(OFF, self.max_batch_size, self.default_guidance)
        fast = optimize(self.pipe.unet, config)
        graphs = fast.graphs(*args, **kwargs)
        full, shallow = _graph_flops(graphs)
        rows = graphs.inputs[0].shape[0]
        written = package_graphs(fast, path, *args, **kwargs)
        record = {
            "format": _RECORD_FORMAT,
            "package": path.name,
            "model": self.model_name,
            "setting": name,
            "branch": config.branch,
            "max_batch_size": self.max_batch_size,
            "guidance": self.default_guidance,
            "signature": graphs.signature,
            "row_flops": {"full": full // rows, "shallow": shallow // rows},
        }
        record_path.write_text(json.dumps(record, indent=1) + "\n")
        return written

    def _copy(self, config: DeepCacheConfig, packaged: Any) -> Any:
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


def load_pipeline(model: str | Path | None) -> tuple[str, Any]:
    """(a name for messages, the pipeline): the embedded digits model, a digits model folder,
    or a diffusers text-to-image pipeline folder."""
    from .models import digits
    from .models import load_pipeline as load_digits

    if model is None:
        return "the digits model", digits()
    root = Path(model)
    index = root / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(
            f"{model} is not a diffusers pipeline folder (no model_index.json); give a digits model "
            f"folder or a text-to-image pipeline saved with save_pretrained"
        )
    kind = json.loads(index.read_text()).get("_class_name")
    if kind == "DigitsPipeline":
        return f"the digits model in {model}", load_digits(root)
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(root)
    if not hasattr(pipe, "unet"):
        raise ValueError(f"{model}: {kind} has no U-Net, so dcfx has nothing to cache")
    return f"{kind} from {model}", pipe


_RECORD_FORMAT = 1


def _record_path(package: Path) -> Path:
    return package.with_name(package.name + ".json")


def _package_record(package: Path, max_batch_size: int, configs: Any) -> dict[str, Any]:
    """The record `build_package` wrote next to `package`, checked against a deployment's batch
    size and dcfx configs (their branch); errors name what the package was built for."""
    record_path = _record_path(package)
    if not record_path.is_file():
        raise FileNotFoundError(
            f"{record_path} is missing: dcfx serve needs the record that dcfx.serve.build_package (or "
            f"`dcfx serve --build-package`) writes next to the package"
        )
    record = _read_record(record_path, package)
    if record is None:
        raise ValueError(f"{record_path} is not a dcfx serve package record (format {_RECORD_FORMAT})")
    if record["max_batch_size"] != max_batch_size:
        raise ValueError(
            f"{package} was built for max_batch_size={record['max_batch_size']} (its signature: "
            f"{record['signature']}); this deployment has max_batch_size={max_batch_size}"
        )
    wrong = [c for c in configs if c is not None and c.branch != record["branch"]]
    if wrong:
        raise ValueError(
            f"{package} holds the graphs of branch {record['branch']}; dcfx settings with branch "
            f"{', '.join(sorted({str(c.branch) for c in wrong}))} need another package"
        )
    return record


def _read_record(record_path: Path, package: Path) -> dict[str, Any] | None:
    """The record `build_package` wrote for `package`, or None for another file."""
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("format") != _RECORD_FORMAT or record.get("package") != package.name:
        return None
    return record


def _graph_flops(graphs: Any) -> tuple[int, int]:
    """FLOPs of one call of the full and of the shallow graph on `graphs.inputs`."""
    with torch.no_grad():
        with FlopCounterMode(display=False) as counter:
            outputs = graphs.full(*graphs.inputs)
        full = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            graphs.shallow(*graphs.inputs, *outputs[len(outputs) - graphs.num_cached:])
    return full, counter.get_total_flops()


def _default(parameters: Any, name: str, fallback: Any) -> Any:
    p = parameters.get(name)
    return p.default if p is not None and p.default is not inspect.Parameter.empty and p.default is not None else fallback


def _png(image: Any) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


# -- Ray Serve ----------------------------------------------------------------------------


@serve.deployment
class DiffusionDeployment:
    """The replicas: request bodies in, `@serve.batch` batches of images, `Service` out.

    `answer(method, body)` takes an HTTP method and a raw body and returns (HTTP status,
    JSON-able answer); `HTTPIngress` is its front. POST a JSON object: "label" (a class or a
    list) or "prompt" (a string or a list), and optionally "seed" (image i gets seed + i;
    random when absent), "steps", "guidance" and "dcfx" (a setting name: "off", "3:0", ...).
    The answer: "images" (label or prompt, seed, base64 PNG each), "history" ('F'/'S' per
    U-Net call), "flops" (U-Net FLOPs spent on these images), "seconds" (the pipeline call),
    "queued_seconds" (in the batch queue), "batch_size" (images in that call) and "replica".
    A bad request gets 400 and {"error": "..."}; GET describes what is accepted.
    """

    def __init__(
        self,
        model: str | None = None,
        settings: Sequence[str] = ("3:0",),
        package: str | None = None,
        compile: bool = False,
        max_batch_size: int = 4,
        batch_wait_timeout_s: float = 0.05,
        threads: int | None = None,
    ):
        if threads is not None:
            torch.set_num_threads(threads)
        self.service = Service(model, settings=settings, package=package, compile=compile, max_batch_size=max_batch_size)
        self.generate.set_max_batch_size(max_batch_size)
        self.generate.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self._replica = serve.get_replica_context().replica_id.unique_id

    async def answer(self, method: str, body: bytes) -> tuple[int, dict[str, Any]]:
        if method == "GET":
            return 200, {**self.service.describe(), "replica": self._replica}
        if method != "POST":
            return 405, {"error": f"{method} is not served: POST a JSON request, or GET a description"}
        try:
            job = self.service.parse(json.loads(body))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return 400, {"error": f"malformed JSON: {e}"}
        except BadRequest as e:
            return 400, {"error": str(e)}
        result = await self.generate(job)
        if isinstance(result, Exception):
            return 500, {"error": f"generation failed: {type(result).__name__}: {result}"}
        return 200, {**result, "replica": self._replica}

    @serve.batch(batch_size_fn=count_images)
    async def generate(self, jobs: list[Job]) -> list[dict[str, Any] | Exception]:
        # The batch runs here, on the replica's event loop, not in a thread: requests that
        # arrive meanwhile wait outside the batch queue, so the next batch takes all of them.
        # (In a thread, Serve would close the next batch batch_wait_timeout_s after its first
        # request while this one still runs: with two replicas that halved the batches.)
        return self.service.run(jobs)


@serve.deployment(ray_actor_options={"num_cpus": 0})
class HTTPIngress:
    """HTTP in front of the replicas: forwards each request to a `DiffusionDeployment` replica
    and answers a replica that died under a request with a clear 503 (Serve's proxy would say
    only "Internal Server Error"); Serve starts a replacement on its own."""

    def __init__(self, replicas: DeploymentHandle):
        self._replicas = replicas

    async def __call__(self, request: Request) -> Response:
        body = await request.body()
        try:
            status, answer = await self._replicas.answer.remote(request.method, body)
        except RayActorError as e:
            answer = {"error": f"the replica running this request stopped ({type(e).__name__}); Serve replaces it: send the request again"}
            status = 503
        return JSONResponse(answer, status_code=status)


def app(
    model: str | None = None,
    *,
    settings: Sequence[str] = ("3:0",),
    package: str | None = None,
    compile: bool = False,
    max_batch_size: int = 4,
    batch_wait_timeout_s: float = 0.05,
    num_replicas: int = 1,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    threads: int | None = None,
) -> serve.Application:
    """The deployment as a Ray Serve application, for `serve.run(app(...))`: an `HTTPIngress`
    (no CPU reserved) in front of `num_replicas` `DiffusionDeployment` replicas.

    `model`, `settings`, `package`, `compile` and `max_batch_size` are `Service`'s (paths must
    exist on every node that runs a replica). `batch_wait_timeout_s`: how long a batch waits
    for more images once it has one. Each of the `num_replicas` replicas gets `num_cpus` CPUs
    and `num_gpus` GPUs (with a GPU it runs on CUDA) and `threads` torch threads (default: its
    CPU count). Settings and sizes are checked here, before any replica starts.

    >>> from ray import serve
    >>> serve.run(app(settings=["3:0", "5:0:nonuniform"], num_replicas=2))  # doctest: +SKIP
    """
    configs = [parse_setting(text)[1] for text in settings]
    if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
        raise ValueError(f"max_batch_size must be an integer >= 1, got {max_batch_size!r}")
    if isinstance(num_replicas, bool) or not isinstance(num_replicas, int) or num_replicas < 1:
        raise ValueError(f"num_replicas must be an integer >= 1, got {num_replicas!r}")
    if not batch_wait_timeout_s >= 0:
        raise ValueError(f"batch_wait_timeout_s must be >= 0, got {batch_wait_timeout_s!r}")
    if not num_cpus > 0 or not num_gpus >= 0:
        raise ValueError(f"num_cpus must be > 0 and num_gpus >= 0, got {num_cpus!r} and {num_gpus!r}")
    for name, path in (("model", model), ("package", package)):
        if path is not None and not Path(path).exists():
            raise FileNotFoundError(f"{name} {path}: no such file or folder")
    if package is not None:
        _package_record(Path(package), max_batch_size, configs)  # the replicas would refuse it too
    if threads is None:
        threads = max(1, int(num_cpus))
    replicas = DiffusionDeployment.options(
        num_replicas=num_replicas,
        # A replica running a full batch takes no more: new requests go to an idle replica, or
        # wait in Serve's router and reach this one together when its batch is done.
        max_ongoing_requests=max_batch_size,
        ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus},
    ).bind(
        model=None if model is None else str(Path(model).resolve()),
        settings=tuple(settings),
        package=None if package is None else str(Path(package).resolve()),
        compile=compile,
        max_batch_size=max_batch_size,
        batch_wait_timeout_s=batch_wait_timeout_s,
        threads=threads,
    )
    return HTTPIngress.bind(replicas)


def build_package(
    path: str | Path,
    model: str | Path | None = None,
    *,
    setting: str = "3:0",
    max_batch_size: int = 4,
    overwrite: bool = False,
) -> Path:
    """Write the AOT package that a deployment with this model, setting and `max_batch_size`
    loads (`app(package=path, settings=[setting, ...])`), and its record `<path>.json`: the
    dcfx graphs compiled with AOTInductor for a batch of `max_batch_size` images with
    guidance, on this machine's device (build it on the kind of machine that serves; about a
    minute for the digits model on a CPU). Returns the package's path.

    >>> build_package("digits-b4.pt2", setting="3:0", max_batch_size=4)  # doctest: +SKIP
    """
    service = Service(model, settings=[setting], max_batch_size=max_batch_size, warm_up=False)
    return service.build_package(path, overwrite=overwrite)


__all__ = ["BadRequest", "DiffusionDeployment", "HTTPIngress", "Job", "Service", "app", "build_package", "parse_setting"]
