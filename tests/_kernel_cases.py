"""Shared by the tests of dcfx.kernels: inputs, the expected result, tolerances, skip marks.

Without a GPU, tests/conftest.py sets TRITON_INTERPRET=1 and the Triton kernels run on CPU
tensors through the interpreter; with a GPU the CUDA tests run the compiled kernels.

Not a test module (no `test_` prefix); the test files import it as `_kernel_cases`.
"""

from __future__ import annotations

import os

import pytest
import torch
from _tolerance import ulps
from torch.testing import assert_close

from dcfx.kernels.cat_group_norm_silu import cat_group_norm_silu_reference

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
needs_interpreter = pytest.mark.skipif(not INTERPRET, reason="CPU kernel tests need TRITON_INTERPRET=1")
needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available() or INTERPRET,
    reason="needs a CUDA GPU and the compiled (not interpreted) Triton kernels",
)

EPS = 1e-5

# fp32 results: the kernel and the reference compute the same statistics in fp32 in another
# summation order. Measured on the interpreter's shapes: at most 4 ulps (of max(|x|, 1)); the
# CUDA shapes' groups sum up to 122,880 values, whose order matters more. 80 ulps (~1e-5)
# leaves 20 times the measured error, far below a wrong or stale statistic's (percents).
FP32 = ulps(torch.float32, 80)

# (dtype, rtol, atol). In fp16/bf16 the kernel rounds its fp32 result once, like the fp32
# reference cast to the dtype; their fp32 values differ by ~1e-6, so the rounded results land
# at most 1 ulp apart (near a rounding boundary): rtol allows 2 ulp. atol is one ulp at the
# outputs' unit scale (normalized, times weight, plus bias: O(1)), for values near zero, where
# the fp32 difference is absolute.
DTYPES = [
    (torch.float32, FP32, FP32),
    (torch.float16, ulps(torch.float16, 2), ulps(torch.float16, 1)),
    (torch.bfloat16, ulps(torch.bfloat16, 2), ulps(torch.bfloat16, 1)),
]
TOLERANCES = {dtype: (rtol, atol) for dtype, rtol, atol in DTYPES}

# group_partial_stats of fp32 inputs ~ 5 + 3 N(0, 1): counts are exact; means and M2 differ
# from the reference's in summation order only (measured: at most 3 ulps), like the fused op's
# outputs, so FP32 relative; the absolute floor is the same ulps at the inputs' scale (~10).
STATS_RTOL, STATS_ATOL = FP32, 10 * FP32


def dtype_ids(value):
    """pytest ids: dtypes by name, tolerances by pytest's default."""
    return str(value).removeprefix("torch.") if isinstance(value, torch.dtype) else None


def make_inputs(n, c1, c2, h, w, dtype, device="cpu", cached_cl=False, skip_cl=False, seed=0):
    """cached [n, c1, h, w], skip [n, c2, h, w], weight and bias [c1 + c2]."""
    gen = torch.Generator().manual_seed(seed)
    # Offsets keep the group means away from 0, which the variance computation must survive.
    cached = torch.randn(n, c1, h, w, generator=gen) * 2.0 + 3.0
    skip = torch.randn(n, c2, h, w, generator=gen) - 1.0
    weight = torch.randn(c1 + c2, generator=gen)
    bias = torch.randn(c1 + c2, generator=gen)
    cached, skip, weight, bias = (t.to(device=device, dtype=dtype) for t in (cached, skip, weight, bias))
    if cached_cl:
        cached = cached.to(memory_format=torch.channels_last)
    if skip_cl:
        skip = skip.to(memory_format=torch.channels_last)
    return cached, skip, weight, bias


def expected(cached, skip, weight, bias, num_groups, eps=EPS):
    """The reference in fp32 on the upcast inputs, cast back: one rounding, like the kernel."""
    out = cat_group_norm_silu_reference(cached.float(), skip.float(), weight.float(), bias.float(), num_groups, eps)
    return out.to(cached.dtype)


def assert_matches(out, want, rtol, atol):
    """Same shape, dtype and strides (memory format), values within rtol and atol."""
    assert out.shape == want.shape and out.dtype == want.dtype
    assert out.stride() == want.stride()
    assert_close(out, want, rtol=rtol, atol=atol)


@pytest.fixture
def triton_enabled(monkeypatch):
    """The kill switch off, whatever the environment says."""
    monkeypatch.delenv("DCFX_DISABLE_TRITON", raising=False)
