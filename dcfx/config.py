"""`DeepCacheConfig`: what to cache, when, and how to compile; validated on construction."""

from __future__ import annotations

import numbers
import operator
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence, Union

import numpy as np

SCHEDULES = ("uniform", "nonuniform")

Schedule = Union[str, Sequence[int]]


@dataclass(frozen=True)
class DeepCacheConfig:
    """How dcfx runs DeepCache on a U-Net.

    Attributes:
        interval: N, one full step every N steps (uniform) or ceil(T/N) full steps
            (non-uniform). 1 turns caching off. Not used by an explicit schedule, whose
            list alone decides (also with interval=1).
        branch: skip-connection index b whose up-path layer input is cached; 0 is the
            outermost (cheapest shallow step). The valid range depends on the model
            (`dcfx.report` lists it); an out-of-range branch fails at the first call.
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


class CompileOptions(Mapping[str, Any]):
    """A read-only mapping of inductor options, hashable so that a `DeepCacheConfig` is.

    Equal to any mapping with the same items (`== {"freezing": True}` holds), shown like a
    dict. Values that are lists, sets or dicts are hashed by their contents.
    """

    __slots__ = ("_items", "_hash")

    def __init__(self, options: Mapping[str, Any] = ()):
        self._items = dict(options)
        self._hash: int | None = None

    def __getitem__(self, key: str) -> Any:
        return self._items[key]

    def __iter__(self):
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Mapping):
            return self._items == dict(other)
        return NotImplemented

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = hash(_frozen(self._items))
        return self._hash

    def __repr__(self) -> str:
        return repr(self._items)

    def __reduce__(self) -> tuple:
        return (type(self), (self._items,))


def _frozen(value: Any) -> Any:
    """A hashable stand-in for an option value, equal for equal values."""
    if isinstance(value, Mapping):
        return frozenset((k, _frozen(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    if isinstance(value, (set, frozenset)):
        return frozenset(_frozen(v) for v in value)
    try:
        hash(value)
    except TypeError:
        return (type(value).__name__, repr(value))
    return value


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
