"""Driving-pose keypoint layouts -> MediaPipe hand layout, (..., 2, 21, 3) [x, y, score].

Slot 0 is the person's left hand, slot 1 the right. Within a hand all four layouts share
the MediaPipe / OpenPose order: wrist 0, thumb 1-4, index 5-8, middle 9-12, ring 13-16,
pinky 17-20.

| layout          | input shape                     | left hand | right hand |
|-----------------|---------------------------------|-----------|------------|
| mediapipe       | (..., 2, 21, C) or (..., 42, C) | slot 0    | slot 1     |
| openpose_hand   | (..., 2, 21, C) or (..., 42, C) | slot 0    | slot 1     |
| coco_wholebody  | (..., 133, C)                   | 91-111    | 112-132    |
| dwpose          | (..., 134, C)                   | 92-112    | 113-133    |

DWPose inserts a neck point into the COCO-WholeBody list, shifting every later index by
one: reading a 134-point array with COCO-WholeBody offsets puts the left hand one joint off
(the "left wrist" would be the last face point). C is 2 (x, y: every point counts as
visible, score 1) or 3 (x, y, score). OpenPose marks missing points as (0, 0, 0).
"""

from __future__ import annotations

import numpy as np

HAND_SLICES: dict[str, tuple[slice, slice] | None] = {
    "mediapipe": None,
    "openpose_hand": None,
    "coco_wholebody": (slice(91, 112), slice(112, 133)),
    "dwpose": (slice(92, 113), slice(113, 134)),
}
NUM_POINTS = {"coco_wholebody": 133, "dwpose": 134}
LAYOUTS = tuple(HAND_SLICES)


def to_mediapipe(
    keypoints: np.ndarray, layout: str, *, image_size: tuple[int, int] | None = None
) -> np.ndarray:
    """Hand keypoints of one of `LAYOUTS` -> (..., 2, 21, 3) float32 [x, y, score].

    image_size: (width, height) to scale normalised [0, 1] coordinates to pixels
    (DWPose and MediaPipe emit normalised ones); None keeps the coordinates as they are.
    """
    if layout not in HAND_SLICES:
        raise ValueError(f"unknown keypoint layout {layout!r}; valid: {', '.join(LAYOUTS)}")
    kp = np.asarray(keypoints, dtype=np.float32)
    if kp.ndim < 2 or kp.shape[-1] not in (2, 3):
        raise ValueError(f"{layout}: expected (..., N, 2|3) keypoints, got shape {kp.shape}")
    if kp.shape[-1] == 2:
        kp = np.concatenate([kp, np.ones(kp.shape[:-1] + (1,), np.float32)], axis=-1)

    slices = HAND_SLICES[layout]
    if slices is None:
        if kp.shape[-2] == 42:
            hands = kp.reshape(kp.shape[:-2] + (2, 21, 3))
        elif kp.ndim >= 3 and kp.shape[-3:-1] == (2, 21):
            hands = kp
        else:
            raise ValueError(f"{layout}: expected (..., 2, 21, C) or (..., 42, C), got shape {kp.shape}")
    else:
        n = NUM_POINTS[layout]
        if kp.shape[-2] != n:
            hint = ""
            if layout == "coco_wholebody" and kp.shape[-2] == 134:
                hint = " (134 points look like DWPose with a neck point: use layout 'dwpose')"
            elif layout == "dwpose" and kp.shape[-2] == 133:
                hint = " (133 points look like COCO-WholeBody: use layout 'coco_wholebody')"
            raise ValueError(f"{layout}: expected (..., {n}, C) keypoints, got shape {kp.shape}{hint}")
        hands = np.stack([kp[..., slices[0], :], kp[..., slices[1], :]], axis=-3)
    hands = hands.copy()
    if image_size is not None:
        hands[..., 0] *= float(image_size[0])
        hands[..., 1] *= float(image_size[1])
    return hands


def visible(hands: np.ndarray, min_score: float = 0.3) -> np.ndarray:
    """(..., 21, 3) -> (..., 21) bool: score above `min_score` (OpenPose (0,0,0) is never visible)."""
    return hands[..., 2] > min_score
