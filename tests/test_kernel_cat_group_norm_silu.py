"""The fused cat + GroupNorm + SiLU kernels (dcfx.kernels.cat_group_norm_silu) against their
PyTorch reference: both paths (single pass; statistics + apply), with and without the cached
feature's precomputed statistics, every layout mix; the launcher's input checks.
"""

import pytest
import torch
from _kernel_cases import (
    DTYPES,
    EPS,
    FP32,
    TOLERANCES,
    assert_matches,
    dtype_ids,
    expected,
    make_inputs,
    needs_cuda,
    needs_interpreter,
    triton_enabled,  # noqa: F401  (a fixture)
)
from torch.testing import assert_close

from dcfx.kernels import cat_group_norm_silu as kernel
from dcfx.kernels import plan
from dcfx.kernels.cat_group_norm_silu import cat_group_norm_silu_reference, cat_group_norm_silu_triton
from dcfx.kernels.group_partial_stats import group_partial_stats_reference, group_partial_stats_triton
from dcfx.kernels.ops import cat_group_norm_silu, group_partial_stats

# (N, C1, C2, H, W, num_groups, cached channels_last, skip channels_last)
SHAPES = [
    (1, 2, 2, 2, 2, 2, False, False),  # minimal
    (2, 5, 7, 4, 4, 3, False, False),  # group straddles the two inputs (C1=5, groups of 4)
    (2, 6, 9, 5, 3, 5, False, False),  # non-power-of-2 channels and spatial size (groups of 3, HW=15)
    (2, 12, 4, 6, 6, 4, True, True),  # channels_last
    (2, 10, 14, 4, 4, 4, True, False),  # mixed layouts: channels_last cached, NCHW skip
    (2, 10, 14, 4, 4, 4, False, True),  # mixed layouts: NCHW cached, channels_last skip
    (2, 40, 40, 16, 16, 4, False, False),  # tiny SD-like cut shape: groups of 20 channels as in SD1.5
]

# Every shape in fp32 and fp16; bf16 shares their code path (only the rounding differs), so
# three shapes: groups straddling the inputs, channels_last, SD-like groups of 20.
INTERPRETED = [(*shape, *dtype) for dtype in DTYPES[:2] for shape in SHAPES]
INTERPRETED += [(*SHAPES[i], *DTYPES[2]) for i in (1, 3, 6)]


@needs_interpreter
@pytest.mark.parametrize("n, c1, c2, h, w, groups, cached_cl, skip_cl, dtype, rtol, atol", INTERPRETED, ids=dtype_ids)
def test_triton_matches_reference_cpu(n, c1, c2, h, w, groups, cached_cl, skip_cl, dtype, rtol, atol):
    cached, skip, weight, bias = make_inputs(n, c1, c2, h, w, dtype, cached_cl=cached_cl, skip_cl=skip_cl)
    out = cat_group_norm_silu_triton(cached, skip, weight, bias, groups, EPS)
    assert_matches(out, expected(cached, skip, weight, bias, groups), rtol, atol)


@pytest.fixture
def two_pass(monkeypatch):
    """Force the statistics + apply launches (the single-pass kernel takes small groups)."""
    monkeypatch.setattr(plan, "SINGLE_PASS_ELEMENTS", 0)
    plan.cut_plan.cache_clear()
    yield
    plan.cut_plan.cache_clear()


def _stats_of(cached, skip, groups):
    return group_partial_stats_triton(cached, (cached.shape[1] + skip.shape[1]) // groups)


# The two-pass kernels, without and with precomputed cached statistics.
@needs_interpreter
@pytest.mark.parametrize("with_stats", [False, True], ids=["stats_in_kernel", "cached_stats"])
@pytest.mark.parametrize("n, c1, c2, h, w, groups, cached_cl, skip_cl", SHAPES)
@pytest.mark.usefixtures("two_pass")
def test_triton_two_pass_matches_reference_cpu(n, c1, c2, h, w, groups, cached_cl, skip_cl, with_stats):
    cached, skip, weight, bias = make_inputs(n, c1, c2, h, w, torch.float32, cached_cl=cached_cl, skip_cl=skip_cl)
    stats = _stats_of(cached, skip, groups) if with_stats else None
    out = cat_group_norm_silu_triton(cached, skip, weight, bias, groups, EPS, cached_stats=stats)
    assert_matches(out, expected(cached, skip, weight, bias, groups), FP32, FP32)


@needs_interpreter
@pytest.mark.parametrize("dtype, rtol, atol", DTYPES[:2], ids=dtype_ids)
@pytest.mark.parametrize("n, c1, c2, h, w, groups, cached_cl, skip_cl", [SHAPES[1], SHAPES[4]])
def test_triton_single_pass_cached_stats_cpu(n, c1, c2, h, w, groups, cached_cl, skip_cl, dtype, rtol, atol):
    # The single-pass kernel reads the whole group anyway and ignores cached_stats.
    cached, skip, weight, bias = make_inputs(n, c1, c2, h, w, dtype, cached_cl=cached_cl, skip_cl=skip_cl)
    assert plan.plan_cut(cached, skip, groups, True).single_pass
    out = cat_group_norm_silu_triton(cached, skip, weight, bias, groups, EPS, cached_stats=_stats_of(cached, skip, groups))
    assert_matches(out, expected(cached, skip, weight, bias, groups), rtol, atol)


@needs_interpreter
@pytest.mark.parametrize("target_programs", [1, 256])  # 1: one program loops over all hw; 256: hw split
@pytest.mark.parametrize("cached_cl, skip_cl", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("with_stats", [False, True], ids=["stats_in_kernel", "cached_stats"])
@pytest.mark.usefixtures("two_pass")
def test_triton_pieces_merge_cpu(monkeypatch, target_programs, cached_cl, skip_cl, with_stats):
    # Tiny tiles force several channel chunks and hw pieces per group, with a chunk straddling
    # the two inputs (C1=10, groups of 12), so the statistics merge is exercised.
    monkeypatch.setattr(plan, "TILE_ELEMENTS", 64)
    monkeypatch.setattr(plan, "MAX_TILE_CHANNELS", 16)
    cached, skip, weight, bias = make_inputs(2, 10, 14, 8, 8, torch.float32, cached_cl=cached_cl, skip_cl=skip_cl)
    monkeypatch.setattr(plan, "target_programs", lambda device: target_programs)
    stats = _stats_of(cached, skip, 2) if with_stats else None
    out = cat_group_norm_silu_triton(cached, skip, weight, bias, 2, EPS, cached_stats=stats)
    assert_matches(out, expected(cached, skip, weight, bias, 2), FP32, FP32)


@needs_interpreter
@pytest.mark.usefixtures("two_pass")
def test_cached_stats_are_used_cpu():
    cached, skip, weight, bias = make_inputs(2, 8, 8, 4, 4, torch.float32)
    stale = group_partial_stats_triton(cached * 2.0, 4)
    out = cat_group_norm_silu_triton(cached, skip, weight, bias, 4, EPS, cached_stats=stale)
    assert_close(out, cat_group_norm_silu_reference(cached, skip, weight, bias, 4, EPS, cached_stats=stale), rtol=FP32, atol=FP32)
    assert not torch.allclose(out, expected(cached, skip, weight, bias, 4), atol=1e-2)


@needs_interpreter
def test_past_int32_offsets_falls_back_to_pytorch(monkeypatch):
    def no_launch(kernel):
        raise AssertionError("launched a kernel past the int32 offset guard")

    monkeypatch.setattr(plan, "fits_int32", lambda shape, stride: False)
    plan.cut_plan.cache_clear()
    try:
        cached, skip, weight, bias = make_inputs(2, 5, 7, 4, 4, torch.float32)
        out = kernel.launch(cached, skip, weight, bias, 3, EPS, None, wrap=no_launch)
        assert torch.equal(out, cat_group_norm_silu_reference(cached, skip, weight, bias, 3, EPS))
        assert torch.equal(cat_group_norm_silu_triton(cached, skip, weight, bias, 3, EPS), out)
    finally:
        plan.cut_plan.cache_clear()


@needs_interpreter
def test_triton_large_mean_cpu():
    # Mean 1000, std ~1.5: E[x^2] - E[x]^2 in fp32 gets the variance ~10% wrong here.
    cached, skip, weight, bias = make_inputs(2, 8, 8, 16, 16, torch.float32)
    cached, skip = cached + 1000.0, skip + 1000.0
    out = cat_group_norm_silu_triton(cached, skip, weight, bias, 4, EPS)
    want = cat_group_norm_silu_reference(cached.double(), skip.double(), weight.double(), bias.double(), 4, EPS)
    # The fp32 mean is off by up to ulp(1000) / 2 = 3e-5, scaled by |weight| * rstd (up to ~3):
    # any fp32 method (torch's included) errs by ~1e-4 here.
    assert_close(out.double(), want, rtol=1e-4, atol=2e-4)


def _bad_inputs():
    good = make_inputs(2, 4, 4, 3, 3, torch.float32)
    cached, skip, weight, bias = good
    return [
        ((cached[0], skip, weight, bias, 2), "4-D"),  # not 4-D
        ((cached, skip[:1], weight, bias, 2), "agree in N, H, W"),  # mismatched N
        ((cached, skip[:, :, :2], weight, bias, 2), "agree in N, H, W"),  # mismatched H
        ((cached, skip[..., :2], weight, bias, 2), "agree in N, H, W"),  # mismatched W
        ((cached, skip.half(), weight, bias, 2), "share one dtype"),  # inputs' dtypes differ
        ((cached, skip, weight.half(), bias, 2), "share one dtype"),  # weight dtype differs
        ((cached, skip, weight[:-1], bias, 2), r"shape \(8,\)"),  # wrong weight size
        ((cached, skip, weight, bias[:-1], 2), r"shape \(8,\)"),  # wrong bias size
        ((cached, skip, weight, bias, 3), r"divide C1 \+ C2 = 8"),  # num_groups does not divide C
        ((cached, skip, weight, bias, 0), "must be positive"),  # no groups
        ((cached, skip, weight, bias, 2, EPS, torch.zeros(2, 2, 3)), "cached_stats must be"),  # wrong shape
        ((cached, skip, weight, bias, 2, EPS, torch.zeros(2, 1, 3).double()), "cached_stats must be"),  # dtype
    ]


@pytest.mark.parametrize("fn", [cat_group_norm_silu, cat_group_norm_silu_triton], ids=["op", "triton"])
@pytest.mark.parametrize("case", range(len(_bad_inputs())))
def test_bad_inputs_raise(fn, case):
    args, message = _bad_inputs()[case]
    with pytest.raises(ValueError, match=message):
        fn(*args) if len(args) > 5 else fn(*args, EPS)


def test_triton_rejects_unsupported(monkeypatch):
    cached, skip, weight, bias = make_inputs(1, 2, 2, 3, 4, torch.float64)
    with pytest.raises(ValueError, match="dtype must be one of"):
        cat_group_norm_silu_triton(cached, skip, weight, bias, 2, EPS)
    cached, skip, weight, bias = make_inputs(1, 2, 2, 3, 4, torch.float32)
    transposed = skip.transpose(2, 3).contiguous().transpose(2, 3)  # H and W do not merge
    with pytest.raises(ValueError, match="mergeable"):
        cat_group_norm_silu_triton(cached, transposed, weight, bias, 2, EPS)
    monkeypatch.setattr(plan, "interpreting", lambda: False)
    with pytest.raises(ValueError, match="must be on CUDA"):
        cat_group_norm_silu_triton(cached, skip, weight, bias, 2, EPS)


# ---- CUDA: the compiled kernels ----


CUDA_SHAPES = [
    (2, 5, 7, 4, 4, 3, False, False),  # group straddles the two inputs
    (2, 40, 40, 16, 16, 4, True, False),  # tiny SD-like cut shape, mixed layouts
    (2, 320, 320, 64, 64, 32, False, False),  # SD1.5 branch-0 cut shape: up_blocks[3] hidden + conv_in skip
    (2, 640, 320, 64, 64, 32, False, False),  # SD1.5 up_blocks.3 resnets[0]: groups straddle (30 channels)
    (2, 320, 320, 64, 64, 32, True, True),  # SD1.5 cut shape, channels_last
]


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("with_stats", [False, True], ids=["stats_in_kernel", "cached_stats"])
@pytest.mark.parametrize("dtype, rtol, atol", DTYPES, ids=dtype_ids)
@pytest.mark.parametrize("n, c1, c2, h, w, groups, cached_cl, skip_cl", CUDA_SHAPES)
@pytest.mark.usefixtures("triton_enabled")
def test_triton_matches_reference_cuda(n, c1, c2, h, w, groups, cached_cl, skip_cl, dtype, rtol, atol, with_stats):
    cached, skip, weight, bias = make_inputs(n, c1, c2, h, w, dtype, "cuda", cached_cl, skip_cl)
    want = expected(cached, skip, weight, bias, groups)
    stats = group_partial_stats(cached, (c1 + c2) // groups) if with_stats else None
    if with_stats:
        # rtol 1e-4 (~840 fp32 ulps): sums over up to 30 x 4096 values in other orders. atol
        # is a floor for the means (~3); the outputs below, which depend on them, check tighter.
        assert_close(stats, group_partial_stats_reference(cached, (c1 + c2) // groups), rtol=1e-4, atol=1e-2)
    out = cat_group_norm_silu_triton(cached, skip, weight, bias, groups, EPS, cached_stats=stats)
    assert_matches(out, want, rtol, atol)
    assert_matches(cat_group_norm_silu(cached, skip, weight, bias, groups, EPS, stats), want, rtol, atol)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.usefixtures("triton_enabled")
def test_cuda_graph_capture_replay():
    cached, skip, weight, bias = make_inputs(2, 40, 40, 16, 16, torch.float16, "cuda")
    # Warm up (compile the kernels) on a side stream, as capture requires.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        cat_group_norm_silu(cached, skip, weight, bias, 4, EPS)
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = cat_group_norm_silu(cached, skip, weight, bias, 4, EPS)
    new_cached, new_skip, _, _ = make_inputs(2, 40, 40, 16, 16, torch.float16, "cuda", seed=1)
    cached.copy_(new_cached)
    skip.copy_(new_skip)
    graph.replay()
    torch.cuda.synchronize()
    assert_matches(out, expected(new_cached, new_skip, weight, bias, 4), *TOLERANCES[torch.float16])


@pytest.mark.cuda
@needs_cuda
@pytest.mark.usefixtures("triton_enabled")
def test_cuda_graph_capture_replay_two_pass_cached_stats():
    # As a DeepCache step pair: the full step captures the statistics op into a buffer, the
    # shallow step reads it; replays with new data must see the new statistics.
    shape = (2, 320, 320, 32, 32)
    cached, skip, weight, bias = make_inputs(*shape, torch.float16, "cuda")
    stats = group_partial_stats(cached, 20)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        group_partial_stats(cached, 20)
        cat_group_norm_silu(cached, skip, weight, bias, 32, EPS, stats)
    torch.cuda.current_stream().wait_stream(side)
    g_full, g_shallow = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    with torch.cuda.graph(g_full):
        stats.copy_(group_partial_stats(cached, 20))
    with torch.cuda.graph(g_shallow):
        out = cat_group_norm_silu(cached, skip, weight, bias, 32, EPS, stats)
    for seed in (1, 2):
        new_cached, new_skip, _, _ = make_inputs(*shape, torch.float16, "cuda", seed=seed)
        cached.copy_(new_cached)
        skip.copy_(new_skip)
        g_full.replay()
        g_shallow.replay()
        torch.cuda.synchronize()
        assert_matches(out, expected(new_cached, new_skip, weight, bias, 32), *TOLERANCES[torch.float16])
