"""Adaptive gates: a step runs the deep path when one scalar signal of it says so.

The first `warmup` steps of a generation are full; after that a step is full when its signal
reaches the threshold, or when `max_shallow` shallow steps ran in a row. One decision holds
for the whole step: every batch element (the largest change wins) and every call of the step
(the first call decides). The signal costs one device-to-host read of one scalar per step,
and nothing else.

A `Signal` says what it measures and what a stream keeps for it between steps; the runtime
computes it on the device and reads the one scalar. The signals:
- "cut": the relative L1 change of the fresh feature at the cut (`s_b`, computed by the head
  graph) since the last full step: First-Block-Cache's signal, at a U-Net's cut;
- "accumulated": its change since the previous step, mapped through the `rescale` polynomial
  that `dcfx.calibrate` fits to the deep feature's true change, summed since the last full
  step: TeaCache's idea;
- "latent": the third-order difference of the last four samples relative to their
  first-order difference (AdaptiveDiffusion's signal); needs no head graph.
A model family with a signal of its own adds a `Signal` to `SIGNALS` (and its name to
`config.SIGNALS`, which validates settings); the runtime needs no change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

# What a signal measures: the fresh feature at the cut (the head graph's output `s_b`), or
# the call's sample.
CUT, SAMPLE = "cut", "sample"


def relative_l1(x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """max over batch rows of mean|x - reference| / mean|reference| (a 0-d float32 tensor)."""
    x, reference = x.float().flatten(1), reference.float().flatten(1)
    change = (x - reference).abs().mean(1) / reference.abs().mean(1).clamp_min(1e-12)
    return change.max()


def latent_change(sample: torch.Tensor, previous: Sequence[torch.Tensor]) -> torch.Tensor:
    """max over batch rows of |third-order difference| / |first-order difference| of the
    samples (newest first: `sample`, then the last three)."""
    x0, x1, x2, x3 = (t.float().flatten(1) for t in (sample, *previous))
    third = (x0 - 3 * x1 + 3 * x2 - x3).abs().mean(1)
    first = (x0 - x1).abs().mean(1).clamp_min(1e-12)
    return (third / first).max()


@dataclass(frozen=True)
class Signal:
    """One adaptive gate's signal.

    Attributes:
        name: as `DeepCacheConfig.adaptive` names it.
        source: what it measures: `CUT` (the fresh feature at the cut, so the graphs are
            split into head, rest and tail) or `SAMPLE` (the call's sample).
        depth: how many earlier values of the source a stream keeps (newest first); the
            signal is measurable once that many were kept in the generation.
        every_step: keep a value at every step (else at full steps only: a change since the
            last full step).
        accumulates: the decision sums the (rescaled) signal since the last full step.
        threshold: the default threshold, chosen on the embedded digits model
            (benchmarks/fidelity_study.py) for about the FLOPs of a uniform interval-3 schedule.
        measure: (the source now, the kept values) -> a 0-d float32 tensor, on the device.
    """

    name: str
    source: str
    depth: int
    every_step: bool
    accumulates: bool
    threshold: float
    measure: Callable[[torch.Tensor, Sequence[torch.Tensor]], torch.Tensor]


def _since_kept(x: torch.Tensor, kept: Sequence[torch.Tensor]) -> torch.Tensor:
    return relative_l1(x, kept[0])


SIGNALS: dict[str, Signal] = {
    s.name: s for s in (
        Signal("cut", CUT, 1, every_step=False, accumulates=False, threshold=0.2, measure=_since_kept),
        Signal("accumulated", CUT, 1, every_step=True, accumulates=True, threshold=0.2, measure=_since_kept),
        Signal("latent", SAMPLE, 3, every_step=True, accumulates=False, threshold=0.25, measure=latent_change),
    )
}
DEFAULT_THRESHOLDS = {name: s.threshold for name, s in SIGNALS.items()}
