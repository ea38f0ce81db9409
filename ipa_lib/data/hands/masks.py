"""Hand masks: from keypoints or detections in pixel space, and down to the Wan latent grid.

Pixel convention: pixel (row j, column i) spans [i, i+1) x [j, j+1); a keypoint at x = 10.0
lies on the edge between columns 9 and 10. A pixel belongs to a box when its centre does.

Latent grid (Wan VAE): the first frame is encoded alone, then every group of
`temporal_factor` (4) frames becomes one latent frame; space shrinks by `spatial_factor`
(8) per side. A latent cell is "hand" if any pixel it covers is (max-pool), so small
hands never vanish from the weighted loss.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

from ipa_lib.data.hands.landmarker import Hand


def _check_hands(kp: np.ndarray) -> np.ndarray:
    kp = np.asarray(kp, dtype=np.float32)
    if kp.ndim != 4 or kp.shape[2:] != (21, 3):
        raise ValueError(f"expected hand keypoints (F, K, 21, 3) [x, y, score], got shape {kp.shape}")
    return kp


def keypoints_mask(
    hand_keypoints: np.ndarray,
    height: int,
    width: int,
    *,
    dilate: float = 0.25,
    min_size: int = 3,
    min_score: float = 0.3,
    shape: Literal["box", "hull"] = "box",
) -> np.ndarray:
    """Hand keypoints (F, K, 21, 3) [x_px, y_px, score] (K = 2: left, right) -> (F, H, W) float32 {0, 1}.

    For each hand with at least one keypoint scoring above `min_score`:
    - "box": the box around its visible keypoints, grown on every side by `dilate` x the
      box's longer side (a hand seen edge-on is thin in one axis but its fingers are not),
      and at least `min_size` pixels wide and high;
    - "hull": their convex hull, dilated by the same margin with a round kernel.
    """
    kp = _check_hands(hand_keypoints)
    if shape not in ("box", "hull"):
        raise ValueError(f"shape must be 'box' or 'hull', got {shape!r}")
    num_frames = kp.shape[0]
    mask = np.zeros((num_frames, height, width), np.float32)
    for f in range(num_frames):
        for hand in kp[f]:
            vis = hand[:, 2] > min_score
            if not vis.any():
                continue
            pts = hand[vis, :2]
            (x0, y0), (x1, y1) = pts.min(0), pts.max(0)
            pad = dilate * max(x1 - x0, y1 - y0)
            if shape == "box":
                _fill_box(mask[f], x0 - pad, y0 - pad, x1 + pad, y1 + pad, min_size)
            else:
                _fill_hull(mask[f], pts, pad, min_size)
    return mask


def _fill_box(m: np.ndarray, x0: float, y0: float, x1: float, y1: float, min_size: int) -> None:
    h, w = m.shape
    if x1 - x0 < min_size:
        c = (x0 + x1) / 2
        x0, x1 = c - min_size / 2, c + min_size / 2
    if y1 - y0 < min_size:
        c = (y0 + y1) / 2
        y0, y1 = c - min_size / 2, c + min_size / 2
    # columns whose centre i + 0.5 lies in [x0, x1)
    i0, i1 = max(0, math.ceil(x0 - 0.5)), min(w, math.ceil(x1 - 0.5))
    j0, j1 = max(0, math.ceil(y0 - 0.5)), min(h, math.ceil(y1 - 0.5))
    if i1 > i0 and j1 > j0:
        m[j0:j1, i0:i1] = 1.0


def _fill_hull(m: np.ndarray, pts: np.ndarray, pad: float, min_size: int) -> None:
    import cv2  # ships with mediapipe (opencv-contrib-python)

    canvas = np.zeros(m.shape, np.uint8)
    # cv2 draws at integer pixel centres: shift the edge convention by -0.5, 4 fractional bits
    fixed = np.round((pts - 0.5) * 16).astype(np.int32)
    hull = cv2.convexHull(fixed)
    cv2.fillConvexPoly(canvas, hull, 1, lineType=cv2.LINE_8, shift=4)
    radius = max(int(round(pad)), (min_size - 1) // 2)
    if radius > 0:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
        canvas = cv2.dilate(canvas, kernel)
    m[canvas > 0] = 1.0


def hands_to_keypoints(detections: Sequence[Sequence[Hand]], *, mirrored: bool = False) -> np.ndarray:
    """Detections per frame -> (F, 2, 21, 3) [x, y, score], slot 0 = person's left hand.

    MediaPipe labels handedness as if the image were mirrored, so on an ordinary (not
    mirrored) frame its "Right" is the person's left. A second hand with the same label goes
    to the free slot; hands beyond two are dropped. Empty slots are all zeros (not visible).
    """
    out = np.zeros((len(detections), 2, 21, 3), np.float32)
    left_label = "Left" if mirrored else "Right"
    for f, hands in enumerate(detections):
        taken = [False, False]
        for hand in sorted(hands, key=lambda h: -h.score):
            slot = 0 if hand.handedness == left_label else 1
            if taken[slot]:
                slot = 1 - slot
            if taken[slot]:
                continue
            taken[slot] = True
            out[f, slot, :, :2] = hand.landmarks[:, :2]
            out[f, slot, :, 2] = hand.score
    return out


def detections_mask(
    detections: Sequence[Sequence[Hand]], height: int, width: int, **kwargs
) -> np.ndarray:
    """Mask (F, H, W) float32 around detected hands; kwargs as for `keypoints_mask`.

    Every landmark of a detected hand counts as visible (MediaPipe gives no per-landmark
    confidence), whatever its handedness score.
    """
    kp = hands_to_keypoints(detections)
    filled = kp[..., 2].max(axis=-1, keepdims=True) > 0  # (F, 2, 1): slot holds a hand
    kp[..., 2] = np.broadcast_to(filled, kp[..., 2].shape).astype(np.float32)
    return keypoints_mask(kp, height, width, **kwargs)


def pixel_mask_to_latent(
    mask: torch.Tensor,
    temporal_factor: int = 4,
    spatial_factor: int = 8,
    *,
    require_4k1: bool = True,
) -> torch.Tensor:
    """Pixel mask (B, F, H, W) or (F, H, W) in [0, 1] -> latent grid by max-pooling (Wan rule).

    Returns (B, 1 + (F - 1) // tf, ceil(H / s), ceil(W / s)) (no batch dim for 3-D input).
    Latent frame 0 is pixel frame 0 alone; latent frame k >= 1 pools pixel frames
    1 + (k - 1) * tf ... k * tf. Spatial sizes that are not multiples of s are zero-padded
    at the bottom/right (a partial cell still sees its pixels). With require_4k1=False a
    trailing partial time group is dropped, as Wan's VAE drops it; tf = s = 1 is the identity.
    """
    if temporal_factor < 1 or spatial_factor < 1:
        raise ValueError(f"factors must be >= 1, got temporal {temporal_factor}, spatial {spatial_factor}")
    squeeze = mask.dim() == 3
    if squeeze:
        mask = mask.unsqueeze(0)
    if mask.dim() != 4:
        raise ValueError(f"expected a mask (B, F, H, W) or (F, H, W), got shape {tuple(mask.shape)}")
    b, f, h, w = mask.shape
    if f < 1:
        raise ValueError("mask has no frames")
    if (f - 1) % temporal_factor and require_4k1:
        raise ValueError(
            f"frame count {f} is not {temporal_factor}k+1 (1, {1 + temporal_factor}, {1 + 2 * temporal_factor}, ...): "
            "the Wan VAE encodes the first frame alone, then groups of "
            f"{temporal_factor}; pass require_4k1=False to drop the trailing frames"
        )
    groups = (f - 1) // temporal_factor
    # 1) time: first frame alone, then max over each group of tf frames
    rest = mask[:, 1 : 1 + groups * temporal_factor].reshape(b, groups, temporal_factor, h, w).amax(dim=2)
    pooled_t = torch.cat([mask[:, :1], rest], dim=1)  # (B, f_lat, H, W)
    # 2) space: zero-pad to multiples of s, then max over each s x s cell
    s = spatial_factor
    hp, wp = -(-h // s) * s, -(-w // s) * s
    if (hp, wp) != (h, w):
        pooled_t = torch.nn.functional.pad(pooled_t, (0, wp - w, 0, hp - h))
    out = pooled_t.reshape(b, 1 + groups, hp // s, s, wp // s, s).amax(dim=(3, 5))
    return out[0] if squeeze else out
