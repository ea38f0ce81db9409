"""Image/video quality metrics from `skimage.metrics`, computed in float64 (PSNR on uint8 overflows otherwise).

SSIM is Wang et al. 2004 as in their reference code (`ssim_index.m`): 11x11 Gaussian window,
sigma 1.5, population covariances, K1 = 0.01, K2 = 0.03, mean over the valid region; i.e.
`structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)`.
(torchmetrics was tried: it averages over the reflect-padded border too, and its float64
convolution on CPU is ~70x slower than skimage here.)
"""

from __future__ import annotations

import numpy as np

SSIM_SIGMA = 1.5
SSIM_WINDOW = 11  # skimage's Gaussian support for sigma 1.5: 2 * int(3.5 sigma + 0.5) + 1


def _clip(x: np.ndarray, name: str) -> np.ndarray:
    """(..., H, W, C) -> float64 (N, H, W, C)."""
    if x.ndim < 3:
        raise ValueError(f"{name}: expected (..., H, W, C), got shape {x.shape}")
    return np.asarray(x, dtype=np.float64).reshape(-1, *x.shape[-3:])


def psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None, max_value: float = 255.0) -> float:
    """10 log10(MAX^2 / MSE), one MSE over the whole array (all frames); `mask` (same leading
    shape, no channel axis) restricts the MSE to masked pixels (weighted by the mask).
    Identical inputs give +inf, an all-zero mask nan."""
    if a.shape != b.shape:
        raise ValueError(f"psnr: shapes differ: {a.shape} vs {b.shape}")
    x, y = a.astype(np.float64), b.astype(np.float64)
    if mask is None:
        from skimage.metrics import mean_squared_error, peak_signal_noise_ratio

        if mean_squared_error(x, y) == 0:
            return float("inf")  # skimage divides by zero (and warns)
        return float(peak_signal_noise_ratio(x, y, data_range=max_value))
    # skimage has no pixel weights: the same formula, weighted
    err = (x - y) ** 2
    w = np.broadcast_to(mask.astype(np.float64)[..., None], err.shape)
    if w.sum() == 0:
        return float("nan")
    mse = float((err * w).sum() / w.sum())
    return float("inf") if mse == 0 else float(10.0 * np.log10(max_value**2 / mse))


def ssim(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None, max_value: float = 255.0) -> float:
    """Mean SSIM over frames and channels; inputs (..., H, W, C) uint8 or float, H and W >= 11
    (the window; see the module docstring).

    `mask` (same leading shape, no channel axis) gives the mean of the SSIM map (skimage
    `full=True`) weighted by the mask over the same valid region (the border of half a window
    is left out, as in the unmasked mean), all frames pooled; an all-zero mask there gives nan."""
    from skimage.metrics import structural_similarity

    if a.shape != b.shape:
        raise ValueError(f"ssim: shapes differ: {a.shape} vs {b.shape}")
    x, y = _clip(a, "ssim"), _clip(b, "ssim")
    if min(x.shape[1:3]) < SSIM_WINDOW:
        raise ValueError(f"ssim: frames {x.shape[1:3]} are smaller than the {SSIM_WINDOW}x{SSIM_WINDOW} window")
    kw = dict(gaussian_weights=True, sigma=SSIM_SIGMA, use_sample_covariance=False, data_range=max_value, channel_axis=-1)
    if mask is None:
        # every frame has the same number of pixels: the mean of per-frame means is the clip mean
        return float(np.mean([structural_similarity(f, g, **kw) for f, g in zip(x, y)]))
    if mask.shape != a.shape[:-1]:
        raise ValueError(f"ssim: mask shape {mask.shape} must be the clip's without the channel axis, {a.shape[:-1]}")
    w = np.asarray(mask, dtype=np.float64).reshape(-1, *x.shape[1:3])
    pad = (SSIM_WINDOW - 1) // 2
    valid = (slice(pad, -pad), slice(pad, -pad))
    num = den = 0.0
    for f, g, m in zip(x, y, w):
        _, full = structural_similarity(f, g, full=True, **kw)  # (H, W, C) map
        m = m[valid]
        num += float((full[valid] * m[..., None]).sum())
        den += float(m.sum()) * full.shape[-1]
    return float(num / den) if den > 0 else float("nan")
