"""The handwritten-digits data set the demo model is trained and judged on (offline).

scikit-learn ships 1,797 8x8 digit images (UCI optdigits, values 0..16) inside its package, so
nothing is downloaded. Images are upsampled bilinearly to 16x16 and scaled to [-1, 1], the
range a pixel-space diffusion model samples in. One fixed, stratified split holds out 20% for
evaluation: the model and the evaluation classifier only ever see the training part.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

RESOLUTION = 16
NUM_CLASSES = 10
_TEST_FRACTION = 0.2
_SPLIT_SEED = 0


@dataclass(frozen=True)
class DigitsSplit:
    """Images as float32 tensors (N, 1, 16, 16) in [-1, 1] and int64 labels (N,)."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor


def _require_sklearn():
    try:
        import sklearn.datasets  # noqa: F401
    except ImportError as e:
        raise ImportError(
            "the digits data set comes from scikit-learn: pip install 'dcfx[demo]' "
            "(or pip install scikit-learn)"
        ) from e


def to_pixels(images_8x8: np.ndarray) -> torch.Tensor:
    """(N, 8, 8) values 0..16 -> (N, 1, 16, 16) float32 in [-1, 1]."""
    x = torch.as_tensor(np.asarray(images_8x8, dtype=np.float32) / 16.0).unsqueeze(1)
    x = F.interpolate(x, size=(RESOLUTION, RESOLUTION), mode="bilinear", align_corners=False)
    return (x * 2 - 1).clamp(-1, 1)


def load_split() -> DigitsSplit:
    """The fixed train/test split of scikit-learn's digits, at 16x16 in [-1, 1]."""
    _require_sklearn()
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    tr_x, te_x, tr_y, te_y = train_test_split(
        data.images, data.target, test_size=_TEST_FRACTION, random_state=_SPLIT_SEED, stratify=data.target
    )
    return DigitsSplit(
        to_pixels(tr_x), torch.as_tensor(tr_y, dtype=torch.int64), to_pixels(te_x), torch.as_tensor(te_y, dtype=torch.int64)
    )
