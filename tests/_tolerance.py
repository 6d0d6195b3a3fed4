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
to it. Four times leaves room for that (measured here: dcfx's eager graphs at about 1x the
reference's own error, inductor and AOT packages at 1.5x to 3x), while a caching bug (a stale
feature, a wrong step, a wrong stream) is orders of magnitude above it: tests that use this
also check, with `assert_float32_far`, that caching moves the result far more than the bound
(thousands of bounds, measured).

The float64 reference runs the same inputs: the noise is drawn in float32 and cast (a float64
draw from the same generator gives other numbers), a float64 copy of the module does the rest.
The same rule holds one precision down (float16 against a float32 reference run), and a
float64 result gets the float32 bound scaled by EPS64 / EPS32 (`assert_float64_close`).
"""

from __future__ import annotations

import copy
from typing import Any, Sequence

import torch
from torch import nn

EPS32 = torch.finfo(torch.float32).eps
EPS64 = torch.finfo(torch.float64).eps
FACTOR = 4.0

Tensors = torch.Tensor | Sequence[torch.Tensor]  # one tensor, or one per step


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
    the float32 reference's own, and at least one ulp of `reference32`'s dtype times the
    result's norm (a computation that happens to round exactly still has a nonzero bound).
    The same holds one precision down: a float16 result against a float32 reference run."""
    own = _distance(reference32, reference64)
    floor = torch.finfo(reference32.dtype).eps * float(reference64.double().norm())
    return factor * max(own, floor)


def _steps(got: Tensors, reference32: Tensors, reference64: Tensors) -> list[tuple[torch.Tensor, ...]]:
    """(got, reference32, reference64) per step: one tensor each, or lists of equal length (a
    trajectory, compared step by step)."""
    if isinstance(got, torch.Tensor):
        got, reference32, reference64 = [got], [reference32], [reference64]
    assert len(got) == len(reference32) == len(reference64), (len(got), len(reference32), len(reference64))
    for i, (g, r32, r64) in enumerate(zip(got, reference32, reference64)):
        assert g.shape == r32.shape == r64.shape, f"step {i}: shapes {tuple(g.shape)}, {tuple(r32.shape)}, {tuple(r64.shape)}"
    return list(zip(got, reference32, reference64))


def bounds_away(got: Tensors, reference32: Tensors, reference64: Tensors, factor: float = FACTOR) -> list[float]:
    """Per step, `got`'s distance from `reference64` in units of `float32_bound`: at most 1
    for a float32 result of the same computation, far above 1 for another computation."""
    return [_distance(g, r64) / float32_bound(r32, r64, factor) for g, r32, r64 in _steps(got, reference32, reference64)]


def assert_float32_close(got: Tensors, reference32: Tensors, reference64: Tensors, factor: float = FACTOR,
                         what: str = "") -> None:
    """`got` (float32) is within `float32_bound` of `reference64`, for one tensor or per step of
    a trajectory (lists of equal length, compared step by step)."""
    for i, (g, r32, r64) in enumerate(_steps(got, reference32, reference64)):
        bound, distance = float32_bound(r32, r64, factor), _distance(g, r64)
        assert distance <= bound, (
            f"{what} step {i}: {distance:.3e} from the float64 reference, above {factor:g} x the float32 "
            f"reference's own error ({_distance(r32, r64):.3e}; bound {bound:.3e})"
        )


def assert_float64_close(got: Tensors, reference32: Tensors, reference64: Tensors, factor: float = FACTOR,
                         what: str = "") -> None:
    """`got` (float64) within the bound `assert_float32_close` would give a float32 result,
    scaled by EPS64 / EPS32 (2^-29): float64 makes the same roundings that much finer. The
    reference's float32 run measures the error to scale."""
    for i, (g, r32, r64) in enumerate(_steps(got, reference32, reference64)):
        assert g.dtype == torch.float64, f"{what} step {i}: {g.dtype}"
        bound, distance = float32_bound(r32, r64, factor) * EPS64 / EPS32, _distance(g, r64)
        assert distance <= bound, f"{what} step {i}: {distance:.3e} from the float64 reference, above {bound:.3e}"


def assert_float32_far(got: Tensors, reference32: Tensors, reference64: Tensors, times: float,
                       what: str = "") -> None:
    """`got` is more than `times` float32 bounds from `reference64` (at some step of a
    trajectory): what a test checks to show that its `assert_float32_close` can fail, e.g.
    that caching moves the result far more than float32 rounding does."""
    away = max(bounds_away(got, reference32, reference64))
    assert away > times, f"{what}: at most {away:.3g} float32 bounds from the reference, not above {times:g}"


def relative_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    return _distance(a, b) / max(float(b.double().norm()), 1e-300)


def ulps(dtype: torch.dtype, count: float = 2.0) -> float:
    """`count` units in the last place of `dtype` relative to 1: a relative tolerance."""
    return count * torch.finfo(dtype).eps

