"""benchmarks/dit_cut_fusion.py: the transformer cut's pattern and its traffic model."""

import torch
import torch.nn.functional as F
from _benchmarks import script

fusion = script("dit_cut_fusion")


def test_the_pattern_is_the_residual_add_then_the_modulated_norm():
    g = torch.Generator().manual_seed(0)
    stream, residual = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    scale, shift = torch.randn(2, 8, generator=g), torch.randn(2, 8, generator=g)
    total, out = fusion.cut(stream, residual, scale, shift)
    assert torch.equal(total, stream + residual)
    by_hand = F.layer_norm(stream + residual, (8,), eps=1e-6) * (1 + scale[:, None, :]) + shift[:, None, :]
    torch.testing.assert_close(out, by_hand, rtol=0, atol=0)  # the same ops in the same order


def test_traffic_model():
    # Flux at 1024x1024, bf16: one (4608, 3072) pass is 28.3 MB.
    one = 4608 * 3072 * 2
    assert fusion.traffic_bytes(4608, 3072, 2, fusion.EAGER_PASSES) == 9 * one
    assert fusion.traffic_bytes(4608, 3072, 2, fusion.FUSED_PASSES, batch=2) == 8 * one
