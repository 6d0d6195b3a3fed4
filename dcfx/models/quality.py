"""How good digit samples are: class accuracy, Fréchet distance, and fidelity to plain sampling.

The judge is a small scikit-learn MLP (one hidden layer of 128 ReLU units) trained on the
training split only, on the same 16x16 pixels the model draws. Why this judge:
- it is deterministic, trains in seconds on the CPU and needs nothing downloaded;
- it reaches about 97% on the held-out split (printed by `DigitJudge.test_accuracy`), so
  a drop in sample accuracy is the sampler's, not the judge's;
- its hidden layer is a learned digit feature space, the role Inception's pool layer plays
  in FID. Fréchet distance is measured there rather than in raw pixels: pixel statistics
  (256 dimensions, 360 held-out images) are dominated by stroke position, so the
  covariance is poorly estimated and the distance rewards blur; 128 learned features that
  separate the classes are closer to "does it look like a real digit of some class".
Absolute Fréchet values depend on the sample count (the estimate is biased upwards for
small n): compare settings only at equal sample counts, as the demo and the study do.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from .data import load_split

_HIDDEN = 128


class DigitJudge:
    """The evaluation classifier and its feature space; build it with `judge()`."""

    def __init__(self) -> None:
        from sklearn.neural_network import MLPClassifier

        split = load_split()
        self._clf = MLPClassifier(hidden_layer_sizes=(_HIDDEN,), alpha=1e-3, max_iter=400, random_state=0)
        # The judge takes images as the pipeline returns them (`output_type="pt"`): [0, 1].
        train, test = (split.train_images + 1) / 2, (split.test_images + 1) / 2
        from threadpoolctl import threadpool_limits

        # BLAS threads on these tiny matrices only spin against each other on a shared machine.
        with threadpool_limits(1):
            self._clf.fit(_flat(train), split.train_labels.numpy())
        self.test_accuracy = self.accuracy(test, split.test_labels)
        test_features = self.features(test)
        self._ref_mean = test_features.mean(0)
        self._ref_cov = np.cov(test_features, rowvar=False)

    def predict(self, images: torch.Tensor) -> np.ndarray:
        """Predicted classes of (N, 1, 16, 16) images in [0, 1]."""
        return self._clf.predict(_flat(images))

    def accuracy(self, images: torch.Tensor, labels: torch.Tensor | np.ndarray) -> float:
        """Fraction of `images` the judge assigns to their intended class."""
        return float((self.predict(images) == np.asarray(labels)).mean())

    def features(self, images: torch.Tensor) -> np.ndarray:
        """The hidden layer's activations, (N, 128)."""
        w, b = self._clf.coefs_[0], self._clf.intercepts_[0]
        return np.maximum(_flat(images) @ w + b, 0.0)

    def frechet_to_test(self, images: torch.Tensor) -> float:
        """Fréchet distance between `images` and the held-out split in feature space."""
        f = self.features(images)
        return frechet_distance(f.mean(0), np.cov(f, rowvar=False), self._ref_mean, self._ref_cov)


@functools.lru_cache(maxsize=1)
def judge() -> DigitJudge:
    """The (cached) evaluation classifier, trained on the training split."""
    return DigitJudge()


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(C1 + C2 - 2 (C1 C2)^(1/2)) of two Gaussians."""
    # The eigenvalues of C1 C2 (both PSD) are real and >= 0, so tr((C1 C2)^(1/2)) is the sum of
    # their square roots: no matrix square root (and no scipy) needed.
    eig = np.linalg.eigvals(cov1 @ cov2)
    covmean_trace = np.sqrt(np.clip(eig.real, 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(cov1) + np.trace(cov2) - 2 * covmean_trace)


def psnr(images: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean per-image PSNR (dB) of images in [0, 1] against `reference` (inf if identical)."""
    mse = (images.double() - reference.double()).pow(2).flatten(1).mean(1)
    values = 10 * torch.log10(1 / mse)  # inf where an image is identical
    return float(values.mean())


def ssim(images: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean per-image SSIM of images in [0, 1] against `reference` (1 if identical).

    Wang et al. (2004): Gaussian window (sigma 1.5, 11x11), K1 = 0.01, K2 = 0.03, data range
    1, population statistics, averaged over the positions where the window fits inside the
    image (6x6 of them at 16x16) and over channels; scikit-image's `structural_similarity`
    with `gaussian_weights=True, use_sample_covariance=False, data_range=1` is the same.
    """
    x, y = images.double(), reference.double()
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"ssim needs two (N, C, H, W) batches of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    channels = x.shape[1]
    g = torch.exp(-((torch.arange(_SSIM_WINDOW, dtype=torch.float64) - _SSIM_WINDOW // 2) ** 2) / (2 * _SSIM_SIGMA**2))
    g = g / g.sum()
    window = (g[:, None] * g[None, :]).expand(channels, 1, _SSIM_WINDOW, _SSIM_WINDOW)
    blur = lambda t: torch.nn.functional.conv2d(t, window, groups=channels)  # noqa: E731 (valid positions only)
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(s.flatten(1).mean(1).mean())


_SSIM_WINDOW, _SSIM_SIGMA = 11, 1.5


def _flat(images: torch.Tensor) -> np.ndarray:
    return images.detach().float().reshape(len(images), -1).cpu().numpy()
