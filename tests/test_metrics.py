"""Evaluation metrics: PSNR in float (uint8 arithmetic would wrap), SSIM with the standard
window (checked against an independent float64 reference), masked PSNR."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from hands_fixtures import photo
from ipa_lib.core.image_metrics import psnr, ssim

TOL = 1e-12  # measured: |ssim - reference| <= 7e-16 on random images, <= 3e-14 on 1280x720 real frames


def reference_ssim(a: np.ndarray, b: np.ndarray, L: float = 255.0) -> float:
    """Wang et al. 2004 written out in float64: 11x11 Gaussian (sigma 1.5, truncated at 3.5 sigma),
    population variances, mean over the 'valid' region, averaged over frames and channels."""
    g = np.exp(-(np.arange(-5, 6) ** 2) / (2 * 1.5**2))
    k = np.outer(g, g) / np.outer(g, g).sum()
    vals = []
    for f in range(a.shape[0]):
        for c in range(a.shape[-1]):
            x, y = a[f, ..., c].astype(np.float64), b[f, ..., c].astype(np.float64)
            mean = lambda z: ndimage.correlate(z, k, mode="constant")[5:-5, 5:-5]  # noqa: E731 (valid part only)
            mx, my = mean(x), mean(y)
            sxx, syy, sxy = mean(x * x) - mx**2, mean(y * y) - my**2, mean(x * y) - mx * my
            c1, c2 = (0.01 * L) ** 2, (0.03 * L) ** 2
            vals.append((((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))).mean())
    return float(np.mean(vals))


def test_psnr_is_computed_in_float():
    a = np.zeros((2, 8, 8, 3), np.uint8)
    b = np.full_like(a, 10)
    # uint8 a - b wraps to 246: the float answer is 10 log10(255^2 / 100)
    assert psnr(a, b) == pytest.approx(10 * np.log10(255**2 / 100), abs=1e-12)
    assert psnr(a, a) == float("inf")
    assert psnr(a / 255.0, b / 255.0, max_value=1.0) == pytest.approx(psnr(a, b), abs=1e-9)


def test_psnr_is_one_mse_over_the_clip_and_matches_the_masked_path():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (3, 12, 10, 3)).astype(np.uint8)
    b = rng.integers(0, 256, a.shape).astype(np.uint8)
    mse = np.mean((a.astype(np.float64) - b) ** 2)
    assert psnr(a, b) == pytest.approx(10 * np.log10(255**2 / mse), abs=1e-12)
    assert psnr(a, b, np.ones(a.shape[:-1])) == pytest.approx(psnr(a, b), abs=1e-12)


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
    with pytest.raises(ValueError, match="smaller than the 11x11 window"):
        ssim(x[:, :10], x[:, :10])


@pytest.mark.parametrize("shape", [(3, 32, 32, 3), (2, 16, 23, 1), (11, 11, 3)])
def test_ssim_matches_the_float64_reference_on_random_images(shape):
    rng = np.random.default_rng(sum(shape))
    x = rng.integers(0, 256, shape).astype(np.uint8)
    for y in (np.clip(x + rng.normal(0, 25, shape), 0, 255).astype(np.uint8), rng.integers(0, 256, shape).astype(np.uint8)):
        ref = reference_ssim(x.reshape(-1, *shape[-3:]), y.reshape(-1, *shape[-3:]))
        assert ssim(x, y) == pytest.approx(ref, abs=TOL)


def test_ssim_matches_the_reference_on_structured_and_real_images():
    # a ramp vs a checkerboard-modulated ramp, and a real photo vs a blurred, shifted copy
    ramp = np.tile(np.linspace(0, 255, 40), (30, 1))
    check = ramp * (0.8 + 0.2 * (np.indices((30, 40)).sum(0) % 2))
    a, b = ramp[None, ..., None], check[None, ..., None]
    assert ssim(a, b) == pytest.approx(reference_ssim(a, b), abs=TOL)
    img = photo("428")[100:196, 200:328]
    blurred = np.roll(ndimage.gaussian_filter(img.astype(np.float64), (1.0, 1.0, 0)), 2, axis=1)
    got, ref = ssim(img, blurred), reference_ssim(img[None], blurred[None])
    assert got == pytest.approx(ref, abs=TOL) and 0.2 < got < 0.95
    # a constant shift of a constant image leaves only the luminance term: exact closed form
    k, c, c1 = 100.0, 30.0, (0.01 * 255) ** 2
    assert ssim(np.full((12, 12, 1), k), np.full((12, 12, 1), k + c)) == pytest.approx(
        (2 * k * (k + c) + c1) / (k**2 + (k + c) ** 2 + c1), abs=TOL)


def test_ssim_is_float_safe_and_scale_free():
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, (2, 20, 20, 3)).astype(np.uint8)
    y = rng.integers(0, 256, x.shape).astype(np.uint8)
    assert ssim(x, y) == pytest.approx(ssim(x / 255.0, y / 255.0, max_value=1.0), abs=1e-12)
    assert ssim(x, y) == pytest.approx(ssim(x.astype(np.float32), y.astype(np.float32)), abs=1e-12)
