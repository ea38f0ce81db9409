"""Image/video quality metrics, computed in float64 (PSNR on uint8 overflows otherwise)."""

from __future__ import annotations

import numpy as np


def psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None, max_value: float = 255.0) -> float:
    """10 log10(MAX^2 / MSE); `mask` (same leading shape, no channel axis) restricts the MSE
    to masked pixels (weighted by the mask). Identical inputs give +inf."""
    if a.shape != b.shape:
        raise ValueError(f"psnr: shapes differ: {a.shape} vs {b.shape}")
    err = (a.astype(np.float64) - b.astype(np.float64)) ** 2
    if mask is not None:
        w = np.broadcast_to(mask.astype(np.float64)[..., None], err.shape)
        if w.sum() == 0:
            return float("nan")
        mse = float((err * w).sum() / w.sum())
    else:
        mse = float(err.mean())
    return float("inf") if mse == 0 else float(10.0 * np.log10(max_value**2 / mse))


def _gaussian_window(size: int = 7, sigma: float = 1.5) -> np.ndarray:
    x = np.arange(size) - size // 2
    g = np.exp(-(x**2) / (2 * sigma**2))
    g /= g.sum()
    return np.outer(g, g)


def ssim(a: np.ndarray, b: np.ndarray, max_value: float = 255.0, window: int = 7) -> float:
    """Mean SSIM (Wang et al. 2004) over frames and channels; inputs (..., H, W, C) uint8 or float.
    Gaussian window (sigma 1.5), 'valid' filtering, C1 = (0.01 L)^2, C2 = (0.03 L)^2."""
    import torch
    import torch.nn.functional as F

    if a.shape != b.shape:
        raise ValueError(f"ssim: shapes differ: {a.shape} vs {b.shape}")
    h, w, c = a.shape[-3:]
    x = torch.from_numpy(a.reshape(-1, h, w, c).astype(np.float64)).permute(0, 3, 1, 2).reshape(-1, 1, h, w)
    y = torch.from_numpy(b.reshape(-1, h, w, c).astype(np.float64)).permute(0, 3, 1, 2).reshape(-1, 1, h, w)
    k = torch.from_numpy(_gaussian_window(window))[None, None]
    mu_x, mu_y = F.conv2d(x, k), F.conv2d(y, k)
    sxx = F.conv2d(x * x, k) - mu_x**2
    syy = F.conv2d(y * y, k) - mu_y**2
    sxy = F.conv2d(x * y, k) - mu_x * mu_y
    c1, c2 = (0.01 * max_value) ** 2, (0.03 * max_value) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return float(s.mean())
