"""The cut kernels' launch planner (dcfx.kernels.plan): tiles, paths, the per-signature cache."""

import pytest
import torch
from _kernel_cases import EPS, make_inputs, needs_cuda, needs_interpreter, triton_enabled  # noqa: F401  (a fixture)

from dcfx.kernels import plan
from dcfx.kernels.cat_group_norm_silu import cat_group_norm_silu_triton


def test_channels_last_tiles_fit_groups():
    # SD1.5's 20-channel groups: one group fills 20 of 32 lanes; whole groups per tile fill
    # over 90% (3 groups: 60 of 64; 12 groups: 240 of 256, preferred for longer rows).
    k = plan.groups_per_tile(20, 32, True, 256)
    assert k > 1 and k * 20 / plan.next_power_of_2(k * 20) > 0.9
    assert plan.groups_per_tile(20, 32, True, 64) == 3
    assert plan.groups_per_tile(32, 32, True, 256) > 1  # powers of 2 fill lanes anyway
    assert plan.groups_per_tile(20, 32, False, 256) == 1  # NCHW: chunks along hw


@needs_interpreter
def test_launch_plan_is_cached():
    cached, skip, weight, bias = make_inputs(2, 5, 7, 4, 4, torch.float32)
    cat_group_norm_silu_triton(cached, skip, weight, bias, 3, EPS)
    before = plan.cut_plan.cache_info()
    cat_group_norm_silu_triton(cached, skip, weight, bias, 3, EPS)
    after = plan.cut_plan.cache_info()
    assert after.hits == before.hits + 1 and after.misses == before.misses


@pytest.mark.cuda
@needs_cuda
@pytest.mark.usefixtures("triton_enabled")
def test_cuda_plans_sd_cut():
    # The SD1.5 cut takes the two-pass path with skip-only statistics; small groups one pass.
    cached, skip, _, _ = make_inputs(2, 320, 320, 64, 64, torch.float16, "cuda")
    cut = plan.plan_cut(cached, skip, 32, True)
    assert not cut.single_pass and cut.c_lo == 320 and cut.g_first == 16
    small, _, _, _ = make_inputs(2, 40, 40, 8, 8, torch.float16, "cuda")
    assert plan.plan_cut(small, small, 8, True).single_pass
