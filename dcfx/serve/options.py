"""`ServeOptions`: what a dcfx serve deployment runs and how much load it takes, in one record
that `app`, `Service`, `build_package` and `dcfx serve` (one flag per field) all take.

This module imports neither Ray nor the models, so `dcfx serve`'s parser can read it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any

from ..config import DeepCacheConfig, integer

OFF = "off"


def parse_setting(text: Any) -> tuple[str, DeepCacheConfig | None]:
    """A dcfx setting by name: "off" -> ("off", None), anything else -> (its canonical name,
    its config), read by `DeepCacheConfig.from_setting` ("3:0", "5:0:nonuniform", "2:0:f1").

    Adaptive settings ("cut:0:0.15") are refused: a gate decides each U-Net call for the whole
    batch, so an image's steps would depend on the requests batched with it.

    >>> name, config = parse_setting("5:0:nonuniform")
    >>> name, config.interval, config.branch, config.schedule
    ('5:0:nonuniform', 5, 0, 'nonuniform')
    """
    if isinstance(text, str) and text.strip().lower() == OFF:
        return OFF, None
    config = DeepCacheConfig.from_setting(text)
    if config.adaptive is not None:
        raise ValueError(
            f"dcfx setting {text!r} is adaptive, which dcfx serve does not offer: a gate decides each U-Net "
            f"call for the whole batch, so an image would depend on its batch-mates; use a fixed schedule "
            f"such as 3:0 or 5:0:nonuniform"
        )
    return config.setting, config


@dataclasses.dataclass(frozen=True)
class ServeOptions:
    """What a deployment serves and how much load it takes (each field is a `dcfx serve` flag).

    Attributes:
        model: a local folder: a digits model folder, or a diffusers text-to-image pipeline
            (requests then carry prompts); none: the embedded digits model.
        settings: dcfx settings offered besides 'off' (fixed schedules: `N:B[:nonuniform][:fK]`);
            a request without "dcfx" gets the first ('off' first makes plain the default).
        package: an AOT package from --build-package for this deployment's signature: the dcfx
            settings run its graphs, and replicas start without exporting or compiling.
        compile: torch.compile the dcfx graphs at each replica's warm-up (not with a package).
        max_batch_size: most images per batch, and per request (>= 1).
        batch_wait_s: how long a batch waits for more images once it has one (>= 0 seconds).
        max_steps: most denoising steps a request may ask for (>= 1; none: the scheduler's
            training steps). A running batch is not interrupted: this bounds how long a long
            request holds the replica and the requests behind it.
        request_timeout_s: a request not answered this many seconds after it arrived gets HTTP
            504, and is not run if its batch has not started (> 0; none: no deadline).
        max_queued_requests: requests that may wait for a replica beyond those the replicas
            hold (max_batch_size each); more get HTTP 503 with Retry-After (>= 1; none: unbounded).
        retry_after_s: the Retry-After (seconds, rounded up) of a 503 for a full queue (>= 0).
        replicas: replicas of the deployment (>= 1).
        cpus_per_replica: CPUs each replica reserves (> 0).
        gpus_per_replica: GPUs each replica reserves (>= 0); with one, the replica runs on CUDA.
        threads: torch threads per replica (>= 1; none: its CPUs).
    """

    model: str | None = None
    settings: tuple[str, ...] = ("3:0",)
    package: str | None = None
    compile: bool = False
    max_batch_size: int = 4
    batch_wait_s: float = 0.05
    max_steps: int | None = None
    request_timeout_s: float | None = 60.0
    max_queued_requests: int | None = 32
    retry_after_s: float = 2.0
    replicas: int = 1
    cpus_per_replica: float = 1.0
    gpus_per_replica: float = 0.0
    threads: int | None = None

    def __post_init__(self) -> None:
        for name in ("model", "package"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, os.PathLike)):
                raise ValueError(f"{name} must be a path or None, got {value!r}")
            object.__setattr__(self, name, None if value is None else os.fspath(value))
        if isinstance(self.settings, str) or not all(isinstance(s, str) for s in self.settings):
            raise ValueError(f"settings must be a sequence of setting strings such as ('3:0', 'off'), got {self.settings!r}")
        names = tuple(dict.fromkeys(parse_setting(s)[0] for s in self.settings))
        object.__setattr__(self, "settings", names)
        if not isinstance(self.compile, bool):
            raise ValueError(f"compile must be True or False, got {self.compile!r}")
        if self.package is not None and self.compile:
            raise ValueError("a package's graphs are compiled already: give package or compile, not both")
        for name, minimum in (("max_batch_size", 1), ("replicas", 1), ("max_steps", 1), ("max_queued_requests", 1),
                              ("threads", 1)):
            value = getattr(self, name)
            if value is not None or name in ("max_batch_size", "replicas"):
                object.__setattr__(self, name, integer(name, value, minimum))
        for name, low, strict in (("batch_wait_s", 0, False), ("request_timeout_s", 0, True), ("retry_after_s", 0, False),
                                  ("cpus_per_replica", 0, True), ("gpus_per_replica", 0, False)):
            value = getattr(self, name)
            if value is None and name == "request_timeout_s":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < low or (strict and value == low):
                raise ValueError(f"{name} must be a finite number {'>' if strict else '>='} {low}, got {value!r}")
            object.__setattr__(self, name, float(value))

    @property
    def configs(self) -> dict[str, DeepCacheConfig | None]:
        """The offered settings by name, "off" included (last, unless given): the configs that
        `settings` names (with `compile`), None for "off"."""
        configs = {}
        for text in self.settings:
            name, config = parse_setting(text)
            configs[name] = config if config is None or not self.compile else dataclasses.replace(config, compile=True)
        configs.setdefault(OFF, None)
        return configs


def field_help() -> dict[str, str]:
    """Each `ServeOptions` field's line of its docstring (for `dcfx serve --help`)."""
    doc = ServeOptions.__doc__.split("Attributes:")[1]
    found = re.findall(r"^ {8}(\w+): (.*(?:\n {12}.*)*)", doc, flags=re.MULTILINE)
    return {name: " ".join(text.split()) for name, text in found}


def resolve(options: ServeOptions | None = None, **changes: Any) -> ServeOptions:
    """`options` (default: `ServeOptions()`) with `changes` to its fields."""
    if options is not None and not isinstance(options, ServeOptions):
        raise TypeError(f"options must be a dcfx.serve.ServeOptions, got {type(options).__name__}")
    unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(ServeOptions)})
    if unknown:
        names = ", ".join(f.name for f in dataclasses.fields(ServeOptions))
        raise TypeError(f"unknown option(s) {', '.join(unknown)}; ServeOptions has {names}")
    return dataclasses.replace(options or ServeOptions(), **changes)
