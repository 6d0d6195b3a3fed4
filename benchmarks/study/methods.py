"""What the fidelity study runs: methods, as data, and the grids of them.

A method is `Method(scheduler, steps, config, label, family)`: a scheduler of `SCHEDULERS` at a
step count, with a `dcfx.DeepCacheConfig` (or None: the plain sampler). A new policy is a row
with its config, in `policy_grid()` or on the command line as SCHEDULER:STEPS[:SETTING], the
setting in `DeepCacheConfig.from_setting`'s grammar:
`--method "dpm++2m:20:5:0:nonuniform:center=6"` or
`--method "dpm++2m:20:interval=2,branch=0,schedule=(0,3,7)"`. Rows with the same `family` form
one line of the frontier (by default: scheduler and config without the step count).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Callable

from dcfx import DeepCacheConfig
from dcfx.costs import equivalents
from dcfx.models.compare import SCHEDULERS
from dcfx.policies import StepSchedule

SPACINGS = ("leading", "trailing", "linspace")
BUDGETS = (5, 7, 10, 14)
GRIDS = ("budgets", "ddim50", "none")

# Config fields always part of a row's identity; the others only where they differ from their
# default, so that fields added to DeepCacheConfig later keep finished tasks' names.
_CORE_FIELDS = ("interval", "branch")


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
        object.__setattr__(self, "family", self.family or _family_name(self.scheduler, self.config))
        if not self.label:
            tail = "" if self.config is None else f" + {_policy_name(self.config)}"
            object.__setattr__(self, "label", f"{SCHEDULERS[self.scheduler][0]} {self.steps}{tail}")

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
    """'dpm++2m:20' or 'dpm++2m:20:SETTING' (a `DeepCacheConfig.from_setting` setting) -> a Method."""
    scheduler, sep, rest = text.partition(":")
    steps, _, setting = rest.partition(":")
    try:
        if not sep:
            raise ValueError("expected SCHEDULER:STEPS[:SETTING]")
        config = DeepCacheConfig.from_setting(setting) if setting.strip() else None
        return Method(scheduler, int(steps), config)
    except (ValueError, TypeError) as e:
        raise ValueError(f"--method {text!r}: {e}") from None


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


def policy_grid(calibrated: Callable[[str, int, float], tuple[int, ...]]) -> list[Method]:
    """The dcfx policies on DPM-Solver++ 2M at branch 0, one family per policy, at step counts
    whose costs bracket the budgets 5, 7, 10 and 14.

    - forecast order 1 and 2 on uniform N=2 (a cost of about 0.55 T) and N=3 (about 0.39 T),
      and order 1 on UniPC;
    - calibrated schedules (`calibrated(scheduler, steps, budget)`: the full steps
      `dcfx.calibrate` affords at each budget, placed by dynamic programming), at T of about
      1.6 and 2 times the budget, and the latter with a forecast of order 1;
    - adaptive gating on the "accumulated" and the "cut" signal, at thresholds chosen from
      the signals' range on this model (their cost is what each generation ran), and "cut"
      with a forecast of order 1.
    """
    # Step counts that end the schedule on a full step and on a shallow one (T - 1 a multiple of
    # N or not), which matters to a forecast (a shallow last step extrapolates furthest).
    rows = [Method("dpm++2m", s, DeepCacheConfig(interval=2, branch=0, forecast=order))
            for order in (1, 2) for s in (7, 8, 9, 11, 13, 15, 18, 21, 24, 26)]
    rows += [Method("dpm++2m", s, DeepCacheConfig(interval=3, branch=0, forecast=order))
             for order in (1, 2) for s in (10, 13, 16, 18, 22, 25, 28, 31, 34, 36)]
    rows += [Method("unipc", s, DeepCacheConfig(interval=2, branch=0, forecast=1)) for s in (7, 9, 13, 18, 26)]
    for factor, forecast in ((1.6, 0), (2.0, 0), (2.0, 1)):
        tail = f" forecast {forecast}" if forecast else ""
        for budget in BUDGETS:
            steps = round(factor * budget)
            config = DeepCacheConfig(branch=0, schedule=calibrated("dpm++2m", steps, budget), forecast=forecast)
            rows.append(Method("dpm++2m", steps, config, label=f"DPM-Solver++ 2M {steps} + calibrated for {budget} b=0{tail}",
                               family=f"DPM-Solver++ 2M + calibrated T={factor:g}B b=0{tail}"))
    for signal, threshold, forecast in (("accumulated", 0.15, 0), ("cut", 0.3, 0), ("cut", 0.15, 1)):
        rows += [Method("dpm++2m", s, DeepCacheConfig(branch=0, adaptive=signal, threshold=threshold, max_shallow=4, forecast=forecast))
                 for s in (10, 14, 20, 28)]
    return rows


def ddim50_grid(shallow_fraction: dict[int, float]) -> list[Method]:
    """DDIM 50 with dcfx at intervals 2/3/5/10 and branches 0/1/3 (and non-uniform at 3/5/10,
    branch 0), each followed by plain DDIM at the step count of about its cost."""
    configs = [DeepCacheConfig(interval=n, branch=b) for b in (0, 1, 3) for n in (2, 3, 5, 10)]
    configs += [DeepCacheConfig(interval=n, branch=0, schedule="nonuniform") for n in (3, 5, 10)]
    rows = [Method("ddim", 50)]
    for c in configs:
        full = len(StepSchedule(c).full_steps(50))
        cost = equivalents(full, 50 - full, shallow_fraction[c.branch])
        rows += [Method("ddim", 50, c), Method("ddim", min(50, max(1, round(cost))))]
    return rows


def grid_branches(grid: str) -> tuple[int, ...]:
    """The branches whose shallow fraction `grid` needs to place its rows."""
    return (0, 1, 3) if grid == "ddim50" else ()
