"""Evaluation metrics: PSNR in float (uint8 arithmetic would wrap), SSIM, masked PSNR."""

from __future__ import annotations

import numpy as np
import pytest

from ipa_lib.core.image_metrics import psnr, ssim


def test_psnr_is_computed_in_float():
    a = np.zeros((2, 8, 8, 3), np.uint8)
    b = np.full_like(a, 10)
    # uint8 a - b wraps to 246: the float answer is 10 log10(255^2 / 100)
    assert psnr(a, b) == pytest.approx(10 * np.log10(255**2 / 100))
    assert psnr(a, a) == float("inf")


def test_masked_psnr_only_sees_the_mask():
    a = np.zeros((1, 4, 4, 3), np.uint8)
    b = a.copy()
    b[0, 0, 0] = 200  # error outside the mask
    mask = np.zeros((1, 4, 4), np.float32)
    mask[0, 2:, 2:] = 1
    assert psnr(a, b, mask) == float("inf")
    assert np.isnan(psnr(a, b, np.zeros_like(mask)))


def test_ssim_identity_and_order():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (3, 16, 16, 3)).astype(np.uint8)
    noisy = np.clip(x + rng.normal(0, 20, x.shape), 0, 255).astype(np.uint8)
    noisier = np.clip(x + rng.normal(0, 60, x.shape), 0, 255).astype(np.uint8)
    assert ssim(x, x) == pytest.approx(1.0)
    assert 1.0 > ssim(x, noisy) > ssim(x, noisier)
    with pytest.raises(ValueError, match="shapes differ"):
        ssim(x, x[:2])
