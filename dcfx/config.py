"""`DeepCacheConfig`: what to cache, when, and how to compile; validated on construction."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence, Union

SCHEDULES = ("uniform", "nonuniform")

Schedule = Union[str, Sequence[int]]


@dataclass(frozen=True)
class DeepCacheConfig:
    """How dcfx runs DeepCache on a U-Net.

    Attributes:
        interval: N, one full step every N steps (uniform) or ceil(T/N) full steps
            (non-uniform). 1 turns caching off.
        branch: skip-connection index b whose up-path layer input is cached; 0 is the
            outermost (cheapest shallow step). The valid range depends on the model
            (`dcfx.report` lists it); an out-of-range branch fails at the first call.
        schedule: "uniform" (step i is full iff i % interval == 0), "nonuniform" (the
            paper's eq. 7, denser around `center`; needs the step count, see
            `DeepCacheUNet.begin` and `dcfx.enable`), or an explicit sequence of full
            step indices that includes 0.
        center: centre step c of the non-uniform schedule.
        power: power p of the non-uniform schedule (> 1).
        compile: compile the full and the shallow graph with torch.compile (inductor,
            fullgraph, static shapes), once per input signature.
        compile_mode: torch.compile mode, e.g. "max-autotune-no-cudagraphs", or
            "reduce-overhead" for inductor's CUDA graphs. Exclusive with compile_options.
        compile_options: inductor options passed through to torch.compile (`options=`).
            `{"freezing": True}` folds the weights into the compiled graphs: they are
            copied/prepacked, so memory grows and later in-place weight changes (LoRA
            fusion) are not seen.
        fuse_cut: replace the shallow graph's concatenation at the cut by the fused
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
    compile_options: Mapping[str, Any] = field(default_factory=dict)
    fuse_cut: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.interval, bool) or not isinstance(self.interval, int) or self.interval < 1:
            raise ValueError(f"interval must be an integer >= 1 (1 = no caching), got {self.interval!r}")
        if isinstance(self.branch, bool) or not isinstance(self.branch, int) or self.branch < 0:
            raise ValueError(
                f"branch must be an integer >= 0 (a skip-connection index; dcfx.report lists the "
                f"valid range for a model), got {self.branch!r}"
            )
        if isinstance(self.schedule, str):
            if self.schedule not in SCHEDULES:
                raise ValueError(
                    f"schedule must be one of {SCHEDULES} or a sequence of full step indices, "
                    f"got {self.schedule!r}"
                )
        else:
            steps = tuple(self.schedule)
            if not steps or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in steps):
                raise ValueError(
                    f"an explicit schedule must be a non-empty sequence of step indices >= 0, "
                    f"got {self.schedule!r}"
                )
            if 0 not in steps:
                raise ValueError(f"an explicit schedule must include step 0 (always full), got {steps}")
            object.__setattr__(self, "schedule", tuple(sorted(set(steps))))
        if isinstance(self.center, bool) or not isinstance(self.center, int) or self.center < 0:
            raise ValueError(f"center must be an integer step index >= 0, got {self.center!r}")
        if not isinstance(self.power, (int, float)) or not self.power > 1:
            raise ValueError(f"power must be a number > 1, got {self.power!r}")
        if self.compile_mode is not None and self.compile_mode not in _COMPILE_MODES:
            raise ValueError(f"compile_mode must be None or one of {_COMPILE_MODES}, got {self.compile_mode!r}")
        if not isinstance(self.compile_options, Mapping):
            raise ValueError(f"compile_options must be a mapping of inductor options, got {self.compile_options!r}")
        if self.compile_mode is not None and self.compile_options:
            raise ValueError(
                "torch.compile takes either compile_mode or compile_options, not both: put the "
                "mode's settings into compile_options or drop them"
            )
        object.__setattr__(self, "compile_options", dict(self.compile_options))


_COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
