"""The partial-statistics kernel (dcfx.kernels.group_partial_stats) against its PyTorch
reference and against a direct float64 computation."""

import pytest
import torch
from _kernel_cases import STATS_ATOL, STATS_RTOL, needs_interpreter
from torch.testing import assert_close

from dcfx.kernels import group_partial_stats as kernel
from dcfx.kernels import plan
from dcfx.kernels.group_partial_stats import group_partial_stats_reference, group_partial_stats_triton

# (N, C, H, W, group_size, channels_last)
STATS_SHAPES = [
    (1, 4, 2, 2, 2, False),  # minimal
    (2, 10, 3, 5, 4, False),  # trailing partial group (10 = 4 + 4 + 2), odd spatial size
    (2, 40, 8, 8, 20, True),  # SD-like groups of 20, channels_last: several groups per tile
    (2, 6, 4, 4, 4, True),  # channels_last, trailing partial group
]


def _x(n, c, h, w, channels_last):
    x = torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(0)) * 3.0 + 5.0
    return x.to(memory_format=torch.channels_last) if channels_last else x


@needs_interpreter
@pytest.mark.parametrize("n, c, h, w, group_size, channels_last", STATS_SHAPES)
def test_group_partial_stats_matches_reference_cpu(n, c, h, w, group_size, channels_last):
    x = _x(n, c, h, w, channels_last)
    out = group_partial_stats_triton(x, group_size)
    want = group_partial_stats_reference(x, group_size)
    assert out.shape == want.shape == (n, -(-c // group_size), 3)
    assert_close(out, want, rtol=STATS_RTOL, atol=STATS_ATOL)
    # And against a direct float64 computation: counts, means and M2 of each channel run.
    x64 = x.double().reshape(n, c, h * w)
    for g in range(out.shape[1]):
        part = x64[:, g * group_size : (g + 1) * group_size].reshape(n, -1)
        direct = torch.stack([torch.full((n,), float(part.shape[1])), part.mean(1), part.var(1, correction=0) * part.shape[1]], 1)
        assert_close(out[:, g].double(), direct, rtol=STATS_RTOL, atol=STATS_ATOL)


@needs_interpreter
def test_past_int32_offsets_falls_back_to_pytorch(monkeypatch):
    def no_launch(kernel):
        raise AssertionError("launched a kernel past the int32 offset guard")

    monkeypatch.setattr(plan, "fits_int32", lambda shape, stride: False)
    x = _x(2, 12, 4, 4, False)
    out = kernel.launch(x, 4, wrap=no_launch)
    assert torch.equal(out, group_partial_stats_reference(x, 4))
    assert torch.equal(group_partial_stats_triton(x, 4), out)


@pytest.mark.parametrize(
    "shape, group_size, message",
    [
        ((2, 4, 3), 2, "4-D"),  # not 4-D
        ((2, 4, 3, 3), 0, "group_size must be positive"),  # no channels per group
    ],
)
def test_bad_input_raises(shape, group_size, message):
    with pytest.raises(ValueError, match=message):
        group_partial_stats_triton(torch.zeros(shape), group_size)
