"""`DeepCacheConfig`: what to cache, when, and how to compile; validated on construction.

A *setting* is a config written short, as the demo, `dcfx serve` and the studies take it:

    N:B[:nonuniform][:fK]           interval N at branch B (uniform schedule unless said),
                                    with a forecast of order K: 3:0, 5:0:nonuniform, 2:0:f1
    SIGNAL:B[:THRESHOLD][:fK]       adaptive gating on SIGNAL (cut, accumulated, latent): cut:0:0.15

where a transformer's B is its cut FnBm (the first n and the last m blocks run): 3:F1B0,
cut:F2B1:0.1; F1 alone leaves last_blocks unset, B1 alone first_blocks;

then any other field as FIELD=VALUE (a Python literal, or a bare word for a string), separated
by ':' or ','; or FIELD=VALUE items alone: `interval=2,branch=0,schedule=(0,3,7)`. `from_setting`
reads one, `config.setting` writes the canonical one. "off" (no DeepCache, as `dcfx serve`
offers it) is no config: callers that offer it handle it before asking for one.
"""

from __future__ import annotations

import ast
import json
import re
import numbers
import operator
import os
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

import numpy as np

from .compile_options import CompileOptions

SCHEDULES = ("uniform", "nonuniform")
# Adaptive gating signals (see dcfx/policies.py): the change of the fresh feature at the cut
# since the last full step, its step-to-step change accumulated (rescaled by a calibration),
# and the third-order difference of the latents.
SIGNALS = ("cut", "accumulated", "latent")
DEFAULT_SIGNAL = "cut"
FORECAST_ORDERS = (0, 1, 2)

Schedule = Union[str, Sequence[int]]


@dataclass(frozen=True)
class DeepCacheConfig:
    """How dcfx runs DeepCache on a U-Net or a diffusion transformer.

    Attributes:
        interval: N, one full step every N steps (uniform) or ceil(T/N) full steps
            (non-uniform). 1 turns caching off. Not used by an explicit schedule, whose
            list alone decides (also with interval=1).
        branch: skip-connection index b whose up-path layer input is cached; 0 is the
            outermost (cheapest shallow step). The valid range depends on the model
            (`dcfx.report` lists it); an out-of-range branch fails at the first call.
            U-Nets only: a transformer is cut by `first_blocks` and `last_blocks`.
        schedule: "uniform" (step i is full iff i % interval == 0), "nonuniform" (the
            paper's eq. 7, denser around `center`; needs the step count, see
            `DeepCacheUNet.begin` and `dcfx.enable`), or an explicit sequence of full
            step indices that includes 0 (list, tuple or numpy array; kept as a sorted
            tuple of ints).
        center: centre step c of the non-uniform schedule.
        power: power p of the non-uniform schedule (> 1).
        compile: True to compile the full and the shallow graph with torch.compile
            (inductor, fullgraph, static shapes), once per input signature.
        compile_mode: torch.compile mode, e.g. "max-autotune-no-cudagraphs", or
            "reduce-overhead" for inductor's CUDA graphs. Exclusive with compile_options.
        compile_options: inductor options passed through to torch.compile (`options=`), any
            mapping; kept as a read-only, hashable `CompileOptions` that compares equal to a
            dict of the same items. `{"freezing": True}` folds the weights into the compiled
            graphs: they are copied/prepacked, so memory grows and later in-place weight
            changes (LoRA fusion) are not seen.
        fuse_cut: True to replace the shallow graph's concatenation at the cut by the fused
            cat + GroupNorm + SiLU op (Triton on CUDA). The environment variable
            `DCFX_DISABLE_FUSION=1` turns this off regardless.
        adaptive: None for a fixed schedule, or the signal that decides per step whether the
            deep path runs: "cut" (relative L1 change of the fresh feature at the cut since
            the last full step), "accumulated" (its step-to-step change, rescaled by
            `rescale` and summed since the last full step), "latent" (third-order difference
            of the latents relative to their first-order one). True means "cut". A step is
            full when its signal reaches `threshold`. The signal is one scalar read on the
            host per step (a device-to-host sync on CUDA); interval and schedule are unused.
        threshold: the adaptive signal's threshold (> 0); None: the signal's default.
        warmup: adaptive: the first `warmup` steps of a generation are full (>= 1).
        max_shallow: adaptive: at most this many shallow steps in a row (>= 1).
        rescale: "accumulated": polynomial coefficients (highest power first) mapping the
            step-to-step signal to the deep feature's change, as `dcfx.calibrate` fits them;
            empty: the signal itself.
        forecast: 0 reuses the last full step's deep feature; 1 or 2 extrapolates it from the
            last 2 or 3 full steps (in timestep units, inside the shallow graph). Each order
            keeps one more cached tensor per stream.
        first_blocks: transformers: Fn, the first blocks, which run on every step (>= 1);
            None: 1. The blocks between them and the last `last_blocks` are cached as one
            residual (their output minus their input), refreshed on full steps.
        last_blocks: transformers: Bn, the last blocks, which run on every step (>= 0); None: 0
            (None for both is First-Block-Cache's cut). Fn + Bn must be below the model's
            block count (`dcfx.report` lists the cuts). U-Nets refuse both.
        calibration: set by `dcfx.calibrate`: what the explicit schedule was fitted for (the
            model, scheduler and step count); dcfx refuses to run it elsewhere.
    """

    interval: int = 3
    branch: int = 0
    schedule: Schedule = "uniform"
    center: int = 15
    power: float = 1.4
    compile: bool = False
    compile_mode: str | None = None
    compile_options: Mapping[str, Any] = field(default_factory=dict)  # stored as CompileOptions
    fuse_cut: bool = True
    adaptive: str | None = None
    threshold: float | None = None
    warmup: int = 2
    max_shallow: int = 4
    rescale: tuple[float, ...] = ()
    forecast: int = 0
    first_blocks: int | None = None
    last_blocks: int | None = None
    calibration: "Calibration | None" = None

    def to_dict(self) -> dict[str, Any]:
        """The config as JSON-able values (`from_dict` reads them back)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["schedule"] = self.schedule if isinstance(self.schedule, str) else list(self.schedule)
        out["compile_options"] = dict(self.compile_options)
        out["rescale"] = list(self.rescale)
        if self.calibration is not None:
            out["calibration"] = asdict(self.calibration)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "DeepCacheConfig":
        """A config from `to_dict`'s values (unknown keys are refused, naming the valid ones)."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown DeepCacheConfig field(s) {', '.join(unknown)}; valid fields are {', '.join(sorted(names))}")
        values = dict(data)
        if values.get("calibration") is not None:
            values["calibration"] = Calibration(**values["calibration"])
        return cls(**values)

    def save(self, path: str | os.PathLike) -> None:
        """Write the config (a calibrated schedule with its calibration record) as JSON."""
        Path(path).write_text(json.dumps({"dcfx_config": 1, **self.to_dict()}, indent=1) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "DeepCacheConfig":
        """Read a config `save` wrote."""
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict) or data.pop("dcfx_config", None) != 1:
            raise ValueError(f"{path} is not a dcfx config file (DeepCacheConfig.save writes them)")
        return cls.from_dict(data)

    @classmethod
    def from_setting(cls, text: str) -> "DeepCacheConfig":
        """The config a setting string describes (see the module docstring): "3:0",
        "5:0:nonuniform", "2:0:f1", "cut:0:0.15", "interval=2,branch=0,schedule=(0,3,7)".
        Raises ValueError naming the valid forms."""
        return _from_setting(cls, text)

    @property
    def setting(self) -> str:
        """This config written short: `DeepCacheConfig.from_setting(config.setting) == config`.
        Fixed schedules read `N:B[:nonuniform][:fK]`, adaptive ones `SIGNAL:B[:THRESHOLD][:fK]`,
        then the fields off their defaults as FIELD=VALUE. A calibrated config has none (its
        calibration is a record, not a value: `save` it)."""
        if self.calibration is not None:
            raise ValueError("a calibrated config has no short setting: keep it with config.save(path)")
        if self.adaptive is not None:
            parts = [self.adaptive, self.cut_word] + ([repr(self.threshold)] if self.threshold is not None else [])
            shown = {"adaptive", "threshold", "forecast"}
        else:
            parts = [str(self.interval), self.cut_word] + (["nonuniform"] if self.schedule == "nonuniform" else [])
            shown = {"interval", "forecast"} | ({"schedule"} if isinstance(self.schedule, str) else set())
        shown |= {"branch", "first_blocks", "last_blocks"}
        parts += [f"f{self.forecast}"] if self.forecast else []
        for f in fields(self):
            value, default = getattr(self, f.name), f.default if f.default_factory is MISSING else f.default_factory()
            if f.name not in shown and value != default:
                parts.append(f"{f.name}={_short_value(value)}")
        return ":".join(parts)

    @property
    def blocks_given(self) -> bool:
        """Whether the config names a transformer cut (first_blocks or last_blocks)."""
        return self.first_blocks is not None or self.last_blocks is not None

    @property
    def cut_word(self) -> str:
        """The setting's B: the branch, or a transformer's cut FnBm (module docstring)."""
        if not self.blocks_given:
            return str(self.branch)
        first = "" if self.first_blocks is None else f"F{self.first_blocks}"
        return first + ("" if self.last_blocks is None else f"B{self.last_blocks}")

    @property
    def needs_head(self) -> bool:
        """Whether steps decide after running the head graph (a signal at the cut)."""
        return self.adaptive in ("cut", "accumulated")

    def __post_init__(self) -> None:
        # Numpy integers and floats (e.g. from a sweep over np.arange) are accepted and
        # stored as Python numbers, so configs compare, hash and print the same either way.
        interval = integer("interval", self.interval, minimum=1, meaning="1 = no caching")
        branch = integer(
            "branch", self.branch, minimum=0,
            meaning="a skip-connection index; dcfx.report lists the valid range for a model",
        )
        object.__setattr__(self, "interval", interval)
        object.__setattr__(self, "branch", branch)
        for name, least in (("first_blocks", 1), ("last_blocks", 0)):
            if getattr(self, name) is not None:
                value = integer(name, getattr(self, name), minimum=least, meaning="a transformer's blocks; None: default")
                object.__setattr__(self, name, value)
        if self.blocks_given and branch:
            raise ValueError(
                f"branch={branch} cuts a U-Net, first_blocks/last_blocks a transformer: give one or "
                f"the other (got first_blocks={self.first_blocks}, last_blocks={self.last_blocks})"
            )
        if isinstance(self.schedule, str):
            if self.schedule not in SCHEDULES:
                raise ValueError(
                    f"schedule must be one of {SCHEDULES} or a sequence of full step indices, "
                    f"got {self.schedule!r}"
                )
            object.__setattr__(self, "schedule", str(self.schedule))
        else:
            object.__setattr__(self, "schedule", _explicit_schedule(self.schedule))
        object.__setattr__(self, "center", integer("center", self.center, minimum=0, kind="an integer step index"))
        power = self.power
        if isinstance(power, (bool, np.bool_)) or not isinstance(power, numbers.Real) or not power > 1:
            raise ValueError(f"power must be a number > 1, got {power!r}")
        object.__setattr__(self, "power", float(power))
        for name in ("compile", "fuse_cut"):
            # Strings such as "false" are truthy: only real booleans are unambiguous.
            value = getattr(self, name)
            if not isinstance(value, (bool, np.bool_)):
                raise ValueError(f"{name} must be True or False, got {value!r}")
            object.__setattr__(self, name, bool(value))
        if self.compile_mode is not None and self.compile_mode not in _COMPILE_MODES:
            raise ValueError(f"compile_mode must be None or one of {_COMPILE_MODES}, got {self.compile_mode!r}")
        if not isinstance(self.compile_options, Mapping):
            raise ValueError(f"compile_options must be a mapping of inductor options, got {self.compile_options!r}")
        if self.compile_mode is not None and self.compile_options:
            raise ValueError(
                "torch.compile takes either compile_mode or compile_options, not both: put the "
                "mode's settings into compile_options or drop them"
            )
        object.__setattr__(self, "compile_options", CompileOptions(self.compile_options))
        self._check_policy()

    def _check_policy(self) -> None:
        adaptive = self.adaptive
        if adaptive is True or isinstance(adaptive, np.bool_) and adaptive:
            adaptive = DEFAULT_SIGNAL
        elif adaptive is False or isinstance(adaptive, np.bool_):
            adaptive = None
        if adaptive is not None and adaptive not in SIGNALS:
            raise ValueError(f"adaptive must be None, True or one of {SIGNALS}, got {self.adaptive!r}")
        object.__setattr__(self, "adaptive", adaptive)
        threshold = self.threshold
        if threshold is not None:
            if isinstance(threshold, (bool, np.bool_)) or not isinstance(threshold, numbers.Real) or not threshold > 0:
                raise ValueError(f"threshold must be a number > 0 (or None for the signal's default), got {threshold!r}")
            object.__setattr__(self, "threshold", float(threshold))
        object.__setattr__(self, "warmup", integer("warmup", self.warmup, minimum=1, meaning="step 0 is always full"))
        object.__setattr__(self, "max_shallow", integer("max_shallow", self.max_shallow, minimum=1))
        try:
            rescale = tuple(float(c) for c in self.rescale)
        except (TypeError, ValueError):
            raise ValueError(f"rescale must be a sequence of polynomial coefficients, got {self.rescale!r}") from None
        object.__setattr__(self, "rescale", rescale)
        if rescale and adaptive != "accumulated":
            raise ValueError(f"rescale applies to adaptive='accumulated' only (adaptive={adaptive!r})")
        if isinstance(self.forecast, (bool, np.bool_)) or self.forecast not in FORECAST_ORDERS:
            raise ValueError(f"forecast must be one of {FORECAST_ORDERS} (the extrapolation order), got {self.forecast!r}")
        object.__setattr__(self, "forecast", int(self.forecast))
        if self.forecast and adaptive is None and self.interval == 1 and isinstance(self.schedule, str):
            raise ValueError("forecast needs shallow steps to forecast: interval=1 runs every step full")
        if self.calibration is not None:
            if not isinstance(self.calibration, Calibration):
                raise ValueError(f"calibration must be a dcfx Calibration (made by dcfx.calibrate), got {self.calibration!r}")
            if isinstance(self.schedule, str) and adaptive is None:
                raise ValueError("a calibration belongs to an explicit schedule (the one dcfx.calibrate chose)")


@dataclass(frozen=True)
class Calibration:
    """What a calibrated schedule was fitted for: `dcfx.calibrate` makes it, the runtime checks
    it (another model, scheduler or step count is refused)."""

    model: str  # the U-Net's class, config and a weight fingerprint, as a digest
    model_name: str  # the U-Net's class name, for messages
    scheduler: str  # the scheduler's class and config, as a digest ('' when not known)
    scheduler_name: str
    num_steps: int
    budget: float  # full-U-Net-call equivalents per generation the schedule was chosen for
    rescale: tuple[float, ...] = ()  # the "accumulated" signal's fitted polynomial
    correlations: tuple[tuple[str, float], ...] = ()  # each signal's Spearman correlation

    def __post_init__(self) -> None:
        object.__setattr__(self, "rescale", tuple(float(c) for c in self.rescale))
        object.__setattr__(self, "correlations", tuple((str(n), float(v)) for n, v in self.correlations))



def integer(name: str, value: Any, minimum: int, meaning: str = "", kind: str = "an integer") -> int:
    """`value` as a Python int >= minimum; any integer type (numpy's too), never a bool."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) or value < minimum:
        meaning = f" ({meaning})" if meaning else ""
        kind = f"{kind} " if kind else ""
        raise ValueError(f"{name} must be {kind}>= {minimum}{meaning}, got {value!r}")
    return operator.index(value)


def _explicit_schedule(schedule: Any) -> tuple[int, ...]:
    """A sequence (list, tuple, numpy array, ...) of full step indices -> sorted unique ints."""
    error = ValueError(
        f"schedule must be one of {SCHEDULES} or a non-empty sequence of step indices >= 0 "
        f"(integers), got {schedule!r}"
    )
    try:
        steps = list(schedule)
    except TypeError:
        raise error from None
    try:
        steps = sorted({integer("step", s, minimum=0) for s in steps})
    except ValueError:
        raise error from None
    if not steps:
        raise error
    if steps[0] != 0:
        raise ValueError(f"an explicit schedule must include step 0 (always full), got {tuple(steps)}")
    return tuple(steps)


_COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

# -- settings -------------------------------------------------------------------------------

SETTING_FORMS = "N:B[:nonuniform][:fK] (a fixed schedule) or SIGNAL:B[:THRESHOLD][:fK] (adaptive)"
_FORECAST = re.compile(r"^f(\d+)$")
_BLOCKS = re.compile(r"^(?=[FB])(?:F(\d+))?(?:B(\d+))?$")  # a transformer's cut: F1B0, F2, B1


def _setting_error(text: Any, detail: str = "") -> ValueError:
    return ValueError(  # the valid forms, then what was wrong
        f"setting {text!r} must be {SETTING_FORMS}, then any FIELD=VALUE (N:B is INTERVAL:BRANCH, "
        f"or INTERVAL:FnBm for a transformer's first n and last m blocks, e.g. 3:F1B0); "
        f"signals {', '.join(SIGNALS)}, schedules {' or '.join(SCHEDULES)}, forecasts "
        f"{', '.join(f'f{k}' for k in FORECAST_ORDERS[1:])}; e.g. 3:0, 5:0:nonuniform, 2:0:f1, cut:0:0.15 "
        f"or interval=2,branch=0,schedule=(0,3,7)" + (f" ({detail})" if detail else "")
    )


def _from_setting(cls: type, text: Any) -> DeepCacheConfig:
    if not isinstance(text, str):
        raise ValueError(f"a setting is a string such as '3:0' ({SETTING_FORMS}), got {text!r}")
    parts = _split_top_level(text.strip())
    words = [p for p in parts if "=" not in p]
    values: dict[str, Any] = {}
    for item in (p for p in parts if "=" in p):
        key, _, value = (x.strip() for x in item.partition("="))
        if key in values:
            raise _setting_error(text, f"{key} given twice")
        try:
            values[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            values[key] = value  # a bare word: a string
    if words or not values:
        if len(words) < 2 or [p for p in parts[:2] if "=" in p]:
            raise _setting_error(text)
        head, branch, options = words[0], words[1], words[2:]
        given = {"adaptive": head} if head in SIGNALS else {"interval": head}
        if "interval" in given and not head.lstrip("-").isdigit():
            raise _setting_error(text, f"{head!r} is neither an interval nor a signal")
        blocks = _BLOCKS.match(branch)
        if blocks:
            given.update((k, v) for k, v in zip(("first_blocks", "last_blocks"), blocks.groups()) if v is not None)
        else:
            given["branch"] = branch
        for option in options:
            forecast = _FORECAST.match(option)
            name = "forecast" if forecast else "threshold" if "adaptive" in given else "schedule"
            if name in given:
                raise _setting_error(text, f"{name} given twice")
            given[name] = forecast.group(1) if forecast else option
        for name, value in given.items():
            if name in values:
                raise _setting_error(text, f"{name} given twice")
            values[name] = value if name in ("adaptive", "schedule") else _number(name, value, text)
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise _setting_error(text, f"unknown field(s) {', '.join(unknown)}; fields are {', '.join(sorted(names))}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise _setting_error(text, str(e)) from None


def _number(name: str, value: str, text: str) -> int | float:
    try:
        return float(value) if name == "threshold" else int(value)
    except ValueError:
        kind = "a number > 0" if name == "threshold" else "an integer"
        raise _setting_error(text, f"{name} must be {kind}, got {value!r}") from None


def _split_top_level(text: str) -> list[str]:
    """`text` split at ':' and ',' outside brackets (an explicit schedule is a tuple)."""
    out, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch in ":," and depth == 0:
            out.append(text[start:i])
            start = i + 1
    out.append(text[start:])
    return [p.strip() for p in out]


def _short_value(value: Any) -> str:
    """A field's value as a setting writes it: a literal, or a bare word for a string that
    reads back as itself."""
    if isinstance(value, tuple):
        return "(" + ",".join(map(repr, value)) + ("," if len(value) == 1 else "") + ")"
    if isinstance(value, Mapping):
        return repr(dict(value))
    if isinstance(value, str):
        try:
            ast.literal_eval(value)
        except (ValueError, SyntaxError):
            if not re.search(r"[\s:,=()\[\]{}]", value):
                return value
    return repr(value)
