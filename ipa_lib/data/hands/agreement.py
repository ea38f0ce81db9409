"""Hand metrics of one generated clip: the gate's detector (MediaPipe) looking again, against
the driver's hands (`hands.json` of the case). Definitions: `ipa_lib.core.metrics` (CASE_METRICS).

- hand_detect_rate:    over frames where the driver shows a hand (>= MIN_VISIBLE keypoints
                       above `min_score`), the fraction where the clip shows at least one.
- hand_confidence:     mean handedness score of the clip's detections.
- hand_keypoint_error: per driver hand and frame, the mean distance of the matched detection's
                       landmarks to the driver's visible keypoints, in the driver hand's size
                       (longer side of its keypoint box), at most 1; an unmatched driver hand
                       counts 1. Mean over all driver hands of all frames. Hands are matched one
                       to one by position (the gate's `_match`), never by the mirrored label.
- hand_jitter:         median, over position-matched tracks of detections and frames with three
                       tracked frames in a row, of the median landmark acceleration, in hand
                       sizes per frame^2 (the gate's smoothness measure before its exp).
A metric that a clip does not define is absent from its dict: no driver hand (detect rate,
keypoint error), no detection (confidence), no track of 3 frames (jitter).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ipa_lib.data.hands.landmarker import Hand
from ipa_lib.data.hands.layouts import visible
from ipa_lib.data.hands.quality import MIN_VISIBLE, _hand_size, _match, _tracks

UNMATCHED_ERROR = 1.0  # a driver hand the clip does not show: one hand size off


def hand_jitter(detections: Sequence[Sequence[Hand]]) -> float | None:
    """Median landmark acceleration along tracks, in hand sizes per frame^2; None without a 3-frame track."""
    tracks = _tracks(detections)  # (F, T, 21, 2), NaN where a track has no hand
    jitters = []
    for t in range(tracks.shape[1]):
        xy = tracks[:, t]
        acc = xy[2:] - 2 * xy[1:-1] + xy[:-2]
        for f in range(acc.shape[0]):
            if np.isfinite(acc[f]).all():
                jitters.append(float(np.median(np.linalg.norm(acc[f], axis=-1))) / _hand_size(xy[f + 1]))
    return float(np.median(jitters)) if jitters else None


def hand_agreement(detections: Sequence[Sequence[Hand]], driver_keypoints: np.ndarray,
                   min_score: float = 0.3) -> dict[str, float]:
    """Per-frame detections on a clip + the driver's hands (F, 2, 21, 3) [x, y, score] pixels of
    the same frame size -> the hand metrics the clip defines (module docstring)."""
    kp = np.asarray(driver_keypoints, np.float32)
    if kp.ndim != 4 or kp.shape[0] != len(detections) or kp.shape[2:] != (21, 3):
        raise ValueError(f"driver keypoints must be ({len(detections)}, K, 21, 3), got {kp.shape}")
    kp = kp.copy()
    kp[..., 2] = visible(kp, min_score)
    shown, frames_with_hand, errors = 0, 0, []
    for f, dets in enumerate(detections):
        driver = [kp[f, h] for h in range(kp.shape[1]) if kp[f, h, :, 2].sum() >= MIN_VISIBLE]
        if not driver:
            continue
        frames_with_hand += 1
        shown += bool(dets)
        matched = {i: j for i, j, _ in _match(driver, dets)}
        for i, hand in enumerate(driver):
            if i not in matched:
                errors.append(UNMATCHED_ERROR)
                continue
            vis = hand[:, 2] > 0
            dist = np.linalg.norm(hand[vis, :2] - dets[matched[i]].landmarks[vis, :2], axis=-1)
            errors.append(min(float(dist.mean()) / _hand_size(hand[vis, :2]), UNMATCHED_ERROR))
    out: dict[str, float] = {}
    if frames_with_hand:
        out["hand_detect_rate"] = shown / frames_with_hand
        out["hand_keypoint_error"] = float(np.mean(errors))
    scores = [d.score for frame in detections for d in frame]
    if scores:
        out["hand_confidence"] = float(np.mean(scores))
    jitter = hand_jitter(detections)
    if jitter is not None:
        out["hand_jitter"] = jitter
    return out
