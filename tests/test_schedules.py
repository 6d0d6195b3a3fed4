"""Which steps run the full U-Net: uniform, non-uniform and explicit schedules.

`dcfx.nonuniform_full_steps` is checked against the reference's own `sample_from_quad_center`
(read from the installed DeepCache package) and against the algorithm written from
DEEPCACHE.md; the schedule queries of `DeepCacheUNet` need no model; an explicit schedule is
honoured in a run. (Schedules through pipelines: test_pipelines.py; calibrated ones:
test_policies.py.)
"""

from __future__ import annotations

import ast
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from _tiny_unet import unet_inputs
from torch import nn

import dcfx
from dcfx import DeepCacheConfig, DeepCacheUNet


# -- non-uniform schedules --------------------------------------------------------------------


def test_nonuniform_checked_examples():
    assert dcfx.nonuniform_full_steps(50, 5) == (0, 5, 9, 13, 17, 21, 26, 31, 37, 43)
    assert dcfx.nonuniform_full_steps(50, 6) == (0, 5, 10, 15, 18, 24, 29, 36, 42)


def _reference_nonuniform(num_steps, interval, center=15, power=1.4):
    """The reference helper's algorithm, written from DEEPCACHE.md with Python complex powers."""
    k = math.ceil(num_steps / interval)
    while power > 1:
        x = np.linspace(complex(-center) ** (1 / power), complex(num_steps - center) ** (1 / power), k + 1)
        values = np.unique(np.real(x**power).astype(np.int32))
        steps = [0] + [int(v) + center for v in values[1:-1]]
        if len(steps) == k:
            return tuple(steps)
        power -= 0.02
    return None


@pytest.mark.parametrize("center", [5, 15])
def test_nonuniform_matches_the_reference_algorithm(center):
    compared = 0
    for num_steps in range(8, 61):
        for interval in range(2, 7):
            expected = _reference_nonuniform(num_steps, interval, center)
            if expected is None:
                with pytest.raises(ValueError, match="schedule='uniform'"):
                    dcfx.nonuniform_full_steps(num_steps, interval, center)
                continue
            got = dcfx.nonuniform_full_steps(num_steps, interval, center)
            assert got == expected, (num_steps, interval)
            assert len(got) == math.ceil(num_steps / interval) and got[0] == 0
            assert list(got) == sorted(set(got)) and got[-1] < num_steps
            compared += 1
    assert compared > 200


def test_nonuniform_edge_cases():
    assert dcfx.nonuniform_full_steps(4, 1) == (0, 1, 2, 3)  # every step full
    with pytest.raises(ValueError, match="num_steps must be >= 1"):
        dcfx.nonuniform_full_steps(0, 3)


def reference_sample_from_quad_center():
    """The reference's own function, from the installed DeepCache package's source (its module
    cannot be imported with today's diffusers: it imports names diffusers has removed)."""
    import importlib.util

    spec = importlib.util.find_spec("DeepCache")
    path = Path(spec.origin).parent / "sd" / "pipeline_stable_diffusion.py"
    tree = ast.parse(path.read_text())
    (fn,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "sample_from_quad_center"]
    namespace = {"np": np}
    exec(compile(ast.Module([fn], type_ignores=[]), str(path), "exec"), namespace)
    return namespace["sample_from_quad_center"]


def test_nonuniform_schedule_equals_the_reference_over_a_grid_of_21049_settings():
    reference = reference_sample_from_quad_center()
    # 97 step counts x 7 intervals x 31 centers at the SD power = 21,049 settings.
    grid = [(t, n, c, 1.4) for t in range(2, 99) for n in range(2, 9) for c in range(31)]
    assert len(grid) == 21_049
    differ = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the reference's np.int32(complex array)
        for t, n, c, p in grid:
            # The reference's caller: ceil(T / N) full steps.
            try:
                expected = tuple(int(i) for i in reference(t, math.ceil(t / n), c, p)[0])
            except ValueError:
                expected = None
            try:
                got = dcfx.nonuniform_full_steps(t, n, c, p)
            except ValueError:
                got = None
            if got != expected:
                differ.append(((t, n, c, p), got, expected))
    assert not differ, f"{len(differ)} configurations differ, e.g. {differ[:3]}"


# -- queries and explicit schedules -------------------------------------------------------------


def test_schedule_queries():
    unet = nn.Identity()  # the schedule needs no model
    fast = DeepCacheUNet(unet, DeepCacheConfig(interval=3))
    assert fast.full_steps(10) == (0, 3, 6, 9)
    assert [fast.is_full_step(i) for i in range(7)] == [True, False, False, True, False, False, True]
    explicit = DeepCacheUNet(unet, DeepCacheConfig(schedule=(0, 2, 7)))
    assert explicit.full_steps(10) == (0, 2, 7)
    assert explicit.full_steps(5) == (0, 2)
    off = DeepCacheUNet(unet, DeepCacheConfig(interval=1))
    assert off.full_steps(4) == (0, 1, 2, 3)
    nonuniform = DeepCacheUNet(unet, DeepCacheConfig(interval=5, schedule="nonuniform"))
    assert nonuniform.full_steps(50) == (0, 5, 9, 13, 17, 21, 26, 31, 37, 43)
    assert nonuniform.is_full_step(9, 50) and not nonuniform.is_full_step(10, 50)


def test_explicit_schedule_is_honoured_with_interval_one(unet):
    fast = dcfx.optimize(unet, interval=1, schedule=[0, 4], branch=1)
    assert fast.full_steps(6) == (0, 4) and not fast.is_full_step(1, 6)
    x, ehs = unet_inputs(batch=1)
    fast.begin(6)
    with torch.no_grad():
        for t in (900, 800, 700, 600, 500, 400):
            fast(x, t, ehs)
    assert fast.history == ("FSSSFS",)
