"""dcfx.models.quality's image metrics (the judge itself is tested with the model)."""

import pytest
import torch

from dcfx.models.quality import psnr, ssim


def test_ssim_is_one_for_identical_images_and_symmetric():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(3, 1, 16, 16, generator=g)
    b = (a + 0.1 * torch.randn(3, 1, 16, 16, generator=g)).clamp(0, 1)
    assert ssim(a, a) == pytest.approx(1.0)
    assert ssim(a, b) == pytest.approx(ssim(b, a)) and 0 < ssim(a, b) < 1
    assert ssim(a, 1 - a) < 0  # inverted contrast: anti-correlated structure
    assert psnr(a, b) > psnr(a, (a + 0.3 * torch.randn(3, 1, 16, 16, generator=g)).clamp(0, 1))


def test_ssim_of_flat_images_is_the_luminance_term():
    # No variance anywhere: SSIM = (2 mu_x mu_y + C1) / (mu_x^2 + mu_y^2 + C1), C1 = 0.01^2.
    x, y = torch.full((2, 1, 16, 16), 0.3), torch.full((2, 1, 16, 16), 0.6)
    c1 = 1e-4
    assert ssim(x, y) == pytest.approx((2 * 0.3 * 0.6 + c1) / (0.3**2 + 0.6**2 + c1), rel=1e-9)


def test_ssim_wants_batches_of_one_shape():
    with pytest.raises(ValueError, match="one shape"):
        ssim(torch.zeros(1, 1, 16, 16), torch.zeros(1, 1, 8, 8))
