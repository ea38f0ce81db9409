"""Hand-quality scorer for the toy world, judged from pixels and the driving pose only.

A real detector does not see toy hands, so the toy world has its own scorer with the
interface of `ipa_lib.data.hands.quality.MediaPipeHandScorer`. It never looks at the loss or
at ground-truth frames. For every frame and hand it takes the palm colour at the palm
centre the driving pose asks for, then probes:
- presence: the palm is there (its colour stands out from the frame's background);
- fingers:  each of the five finger segments of the driving pose is drawn in palm colour;
- gaps:     the spaces between and beside the fingers are *not* palm colour (extra
            fingers, melted palms and blur fill them);
- stability: per-frame scores do not flicker (1 - mean absolute change between frames).
core       = 0.45 fingers + 0.45 gaps + 0.10 stability (means over frames and hands)
worst      = min over frames and hands of presence * fingers * gaps
hand_score = presence * (0.3 core + 0.7 worst)   (a clip is as good as its worst hand)
"""

from __future__ import annotations

import math

import numpy as np

from ipa_lib.data.toyworld import FINGER_END, FINGER_START, hand_scale, palm_centre

WEIGHTS = {"fingers": 0.45, "gaps": 0.45, "stability": 0.10}


def _bilinear(img: np.ndarray, pts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sample (H, W, 3) float at (N, 2) pixel coords (x, y of pixel centres at +0.5)."""
    h, w = img.shape[:2]
    x, y = pts[:, 0] - 0.5, pts[:, 1] - 0.5
    inside = (x >= 0) & (y >= 0) & (x <= w - 1) & (y <= h - 1)
    x, y = np.clip(x, 0, w - 1), np.clip(y, 0, h - 1)
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    top = img[y0, x0] * (1 - fx) + img[y0, x1] * fx
    bottom = img[y1, x0] * (1 - fx) + img[y1, x1] * fx
    return top * (1 - fy) + bottom * fy, inside


def _probe_points(hand: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Palm centre (2,), finger probes (5, 3, 2) and gap probes (G, 2) for one driving hand."""
    centre = palm_centre(hand)
    k = float(hand_scale(hand))
    tips = hand[[4, 8, 12, 16, 20], :2]
    dirs = (tips - centre) / (np.linalg.norm(tips - centre, axis=-1, keepdims=True) + 1e-6)
    angles = np.arctan2(dirs[:, 1], dirs[:, 0])
    radii = np.array([0.55, 0.75, 0.92]) * FINGER_END * k
    fingers = centre + radii[None, :, None] * dirs[:, None, :]
    # midway between neighbouring fingers, and past thumb and pinky (where extra fingers go)
    diffs = np.angle(np.exp(1j * (angles[1:] - angles[:-1])))
    mids = angles[:-1] + diffs / 2
    step = np.mean(np.abs(diffs))
    outer = np.array([angles[0] - np.sign(diffs[0]) * step, angles[-1] + np.sign(diffs[-1]) * step])
    gap_angles = np.concatenate([mids, outer])
    gap_r = np.array([0.8, 0.97]) * FINGER_END * k
    gaps = centre + gap_r[None, :, None] * np.stack([np.cos(gap_angles), np.sin(gap_angles)], -1)[:, None, :]
    return centre, fingers, gaps.reshape(-1, 2)


def score_hand(frame: np.ndarray, hand: np.ndarray) -> dict[str, float]:
    """One frame (H, W, 3) uint8 and one driving hand (21, 3) -> presence/fingers/gaps in [0, 1]."""
    img = frame.astype(np.float32)
    centre, fingers, gaps = _probe_points(hand)
    k = float(hand_scale(hand))
    # palm colour: mean of a small disc around the centre (robust to a one-pixel offset)
    ring = centre + 0.6 * k * np.stack([np.cos(np.arange(6) * math.pi / 3), np.sin(np.arange(6) * math.pi / 3)], -1)
    palm_px, _ = _bilinear(img, np.vstack([centre[None], ring]))
    palm = palm_px.mean(0)
    h, w = img.shape[:2]
    corners = img[[0, 0, h - 1, h - 1], [0, w - 1, 0, w - 1]]
    background = np.median(corners, axis=0)
    contrast = float(np.linalg.norm(palm - background))
    presence = float(np.clip((contrast - 40.0) / 60.0, 0.0, 1.0))
    # "handness" of a pixel ~ how much of it is palm-coloured (1 = palm, 0 = background);
    # anti-aliased one-pixel fingers give ~0.5 where the stroke straddles two pixels
    def handness(pts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        px, inside = _bilinear(img, pts)
        return np.clip(1.0 - np.linalg.norm(px - palm, axis=-1) / max(contrast, 1.0), 0.0, 1.0), inside

    # fingers: best of three probes across the stroke (a half-pixel offset is not an error)
    dirs = fingers[:, -1] - centre
    normal = np.stack([-dirs[:, 1], dirs[:, 0]], -1) / (np.linalg.norm(dirs, axis=-1, keepdims=True) + 1e-6)
    offsets = np.array([-0.5, 0.0, 0.5])[:, None, None, None] * normal[None, :, None, :]
    probe = (fingers[None] + offsets).reshape(-1, 2)
    hv, inside = handness(probe)
    hv = np.where(inside, hv, 1.0).reshape(3, 5, 3).max(axis=0)
    finger_ok = (hv >= 0.4).all(axis=1)

    hv, inside = handness(gaps)
    gap_ok = (hv <= 0.35) | ~inside
    return {"presence": presence, "fingers": float(finger_ok.mean()), "gaps": float(gap_ok.mean())}


class ToyHandScorer:
    """Same interface as the MediaPipe scorer: `score(frames, hand_keypoints) -> dict`."""

    components = ("presence", "fingers", "gaps", "stability")

    def score(self, frames: np.ndarray, hand_keypoints: np.ndarray | None) -> dict[str, float]:
        """frames (F, H, W, 3) uint8, hand_keypoints (F, 2, 21, 3) pixels from the driving pose."""
        if hand_keypoints is None:
            raise ValueError("the toy scorer needs the driving pose's hand keypoints (got None)")
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"frames must be (F, H, W, 3), got {frames.shape}")
        if hand_keypoints.shape[:2] != (frames.shape[0], 2) or hand_keypoints.shape[2] != 21:
            raise ValueError(f"hand_keypoints must be (F={frames.shape[0]}, 2, 21, 3), got {hand_keypoints.shape}")
        per = [[score_hand(frames[f], hand_keypoints[f, s]) for s in range(2)] for f in range(frames.shape[0])]
        presence = np.array([[p["presence"] for p in row] for row in per])
        fingers = np.array([[p["fingers"] for p in row] for row in per])
        gaps = np.array([[p["gaps"] for p in row] for row in per])
        frame_score = 0.5 * (fingers + gaps)  # (F, 2)
        stability = 1.0 - float(np.abs(np.diff(frame_score, axis=0)).mean()) if len(frame_score) > 1 else 1.0
        parts = {
            "presence": float(presence.mean()),
            "fingers": float(fingers.mean()),
            "gaps": float(gaps.mean()),
            "stability": stability,
        }
        core = sum(WEIGHTS[c] * parts[c] for c in WEIGHTS)
        # a clip is only as good as its worst hand-frame: one bad hand is a bad clip
        worst = float((presence * fingers * gaps).min())
        hand_score = parts["presence"] * (0.3 * core + 0.7 * worst)
        return {"hand_score": float(np.clip(hand_score, 0.0, 1.0)), **{f"score_{c}": v for c, v in parts.items()}}

    def close(self) -> None:
        pass

    def __enter__(self) -> "ToyHandScorer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
