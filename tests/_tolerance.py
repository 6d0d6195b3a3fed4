"""Tolerances with a reason: what error a comparison expects, and why.

Float32 results differ in their last bits between machines: another instruction set (AVX-512,
AVX2, none), another BLAS or oneDNN kernel, another thread count sums in another order. A
fixed tolerance chosen where it passed says nothing elsewhere. Every comparison in the suite
is one of three kinds:

- **exact** (`rtol=0, atol=0`): the same graph on the same inputs on the same device, or two
  paths that run the same operators in the same order (asserted bit for bit where the test
  says why);
- **float32 against float64** (`assert_float32_close`): the reference path runs twice, in
  float32 and in float64. Its float32 run's distance from its float64 run is the float32
  error *this machine* makes on this computation; the checked path (float32) may be at most
  `FACTOR` times as far from the float64 result. Both errors scale together from one CPU to
  another, so the bound travels;
- **kernels** (`ulps`): an elementwise op whose rounding is known: a few units in the last
  place of the output's dtype, scaled by the magnitude.

`FACTOR`: the checked path computes the same function with other summation orders (a fused
cut, a split shortcut convolution, inductor's fusions, a forecast whose Lagrange weights exceed
1 in float32 arithmetic); its float32 error is of the same order as the reference's, not equal
to it. Four times leaves room for that, while a caching bug (a stale feature, a wrong step, a
wrong stream) is orders of magnitude above it: tests that use this also check that caching
moves the result far more than the bound.
"""

from __future__ import annotations

import copy
from typing import Any, Sequence

import torch
from torch import nn

EPS32 = torch.finfo(torch.float32).eps
FACTOR = 4.0


def float64_copy(module: nn.Module) -> nn.Module:
    """A float64 copy of `module` (the user's module is never changed)."""
    return copy.deepcopy(module).double()


def as_float64(value: Any) -> Any:
    """Floating-point tensors in `value` (nested tuples, lists, dicts) as float64."""
    if isinstance(value, torch.Tensor):
        return value.double() if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(as_float64(v) for v in value)
    if isinstance(value, dict):
        return {k: as_float64(v) for k, v in value.items()}
    return value


def _distance(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm())


def float32_bound(reference32: torch.Tensor, reference64: torch.Tensor, factor: float = FACTOR) -> float:
    """The distance (L2 norm) from `reference64` that a float32 result may have: `factor` times
    the float32 reference's own, and at least one float32 ulp of the result's norm (a
    computation that happens to round exactly still has a nonzero bound)."""
    own = _distance(reference32, reference64)
    floor = EPS32 * float(reference64.double().norm())
    return factor * max(own, floor)


def assert_float32_close(got: torch.Tensor | Sequence[torch.Tensor], reference32: torch.Tensor | Sequence[torch.Tensor],
                         reference64: torch.Tensor | Sequence[torch.Tensor], factor: float = FACTOR,
                         what: str = "") -> None:
    """`got` (float32) is within `float32_bound` of `reference64`, for one tensor or per step of
    a trajectory (lists of equal length, compared step by step)."""
    if isinstance(got, torch.Tensor):
        got, reference32, reference64 = [got], [reference32], [reference64]
    assert len(got) == len(reference32) == len(reference64), (len(got), len(reference32), len(reference64))
    for i, (g, r32, r64) in enumerate(zip(got, reference32, reference64)):
        assert g.shape == r64.shape, f"{what} step {i}: shape {tuple(g.shape)} != {tuple(r64.shape)}"
        bound = float32_bound(r32, r64, factor)
        distance = _distance(g, r64)
        assert distance <= bound, (
            f"{what} step {i}: {distance:.3e} from the float64 reference, above {factor:g} x the float32 "
            f"reference's own error ({_distance(r32, r64):.3e}; bound {bound:.3e})"
        )


def relative_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    return _distance(a, b) / max(float(b.double().norm()), 1e-300)


def ulps(dtype: torch.dtype, count: float = 2.0) -> float:
    """`count` units in the last place of `dtype` relative to 1: a relative tolerance."""
    return count * torch.finfo(dtype).eps
