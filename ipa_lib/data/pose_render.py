"""Skeleton frames in the style Wan2.2-Animate's preprocessing draws (what its pose encoder saw).

Matches `draw_aapose_by_meta_new` -> `draw_aapose_new` + `draw_handpose_new` (stickwidth
'v2', threshold 0.5) in Wan2.2's `wan/modules/animate/preprocess/human_visualization.py`,
the call `process_pipepline.py` makes for `src_pose.mp4` (docs/cases.md has the table):
- black canvas, RGB;
- 20 body points made from COCO-WholeBody's 133 (`BODY_FROM_WHOLEBODY`: each point is the
  mean of two source points, the neck of the two shoulders, each toe of two toe points);
- 19 limbs (`LIMBS`), each a filled ellipse along the bone, half-width `stickwidth`, in
  0.6 x its colour; then every body point a filled circle of radius `stickwidth` in its colour;
- hands: 20 bones (`HAND_EDGES`) as lines in hue edge/20 (HSV, full saturation and value),
  thickness `hand_width`, then each hand point a filled blue (0, 0, 255) circle;
- a point (or a bone with an end) below the score threshold is not drawn; hand points at
  x or y <= 0.01 pixels neither (OpenPose's (0, 0, 0) for missing).
"""

from __future__ import annotations

import colorsys
import math

import numpy as np

# body point k = mean(wholebody[A[k]], wholebody[B[k]]) (score averaged too)
BODY_FROM_WHOLEBODY = (
    (0, 6, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3, 17, 20),
    (0, 5, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3, 18, 21),
)
BODY_NAMES = ("nose", "neck", "r_shoulder", "r_elbow", "r_wrist", "l_shoulder", "l_elbow", "l_wrist",
              "r_hip", "r_knee", "r_ankle", "l_hip", "l_knee", "l_ankle", "r_eye", "l_eye", "r_ear", "l_ear",
              "l_toe", "r_toe")  # fmt: skip
# limbs between body points (0-based; Wan's table is 1-based)
LIMBS = ((1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11), (11, 12), (12, 13),
         (1, 0), (0, 14), (14, 16), (0, 15), (15, 17), (13, 18), (10, 19))  # fmt: skip
# RGB; limb i uses COLORS[i] (x 0.6), body point k uses COLORS[k]
COLORS = ((255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
          (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
          (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85), (200, 200, 0), (100, 100, 0))  # fmt: skip
# the 21 hand points in MediaPipe / OpenPose order: wrist, then 4 per finger
HAND_EDGES = tuple((0 if j % 4 == 0 else j, j + 1) for j in range(20))
HAND_POINT_COLOR = (0, 0, 255)
LIMB_SHADE = 0.6
THRESHOLD = 0.5
WHOLEBODY_FACE = slice(23, 91)  # the 68 face points of COCO-WholeBody
WHOLEBODY_HANDS = (slice(91, 112), slice(112, 133))  # left, right


def hand_edge_color(i: int) -> tuple[int, int, int]:
    """Colour of hand bone i: hue i / 20 at full saturation and value, RGB 0-255."""
    rgb = colorsys.hsv_to_rgb(i / float(len(HAND_EDGES)), 1.0, 1.0)
    return tuple(round(c * 255.0) for c in rgb)  # rounded as cv2 rounds a float colour


def stick_width(height: int, width: int) -> int:
    """Body limb half-width and point radius ('v2': min side / 200 - 1, at least 1)."""
    return max(int(min(height, width) / 200) - 1, 1)


def hand_width(height: int, width: int) -> int:
    """Hand bone thickness and point radius ('v2')."""
    return max(stick_width(height, width) // 2, 1)


def wholebody_to_body(kp: np.ndarray) -> np.ndarray:
    """(133, 3) COCO-WholeBody [x, y, score] -> (20, 3) body points in Wan's order."""
    a, b = (np.asarray(i) for i in BODY_FROM_WHOLEBODY)
    return (kp[a] + kp[b]) / 2.0


def draw_body(canvas: np.ndarray, body: np.ndarray, threshold: float = THRESHOLD) -> np.ndarray:
    """Limbs then points of (20, 3) body keypoints onto an RGB uint8 canvas, in place."""
    import cv2

    h, w = canvas.shape[:2]
    sw = stick_width(h, w)
    for (i, j), color in zip(LIMBS, COLORS):
        p, q = body[i], body[j]
        if p[2] < threshold or q[2] < threshold:
            continue
        cx, cy = (p[0] + q[0]) / 2.0, (p[1] + q[1]) / 2.0
        length = math.hypot(p[0] - q[0], p[1] - q[1])
        angle = math.degrees(math.atan2(p[1] - q[1], p[0] - q[0]))
        poly = cv2.ellipse2Poly((int(cx), int(cy)), (int(length / 2), sw), int(angle), 0, 360, 1)
        cv2.fillConvexPoly(canvas, poly, [int(c * LIMB_SHADE) for c in color])
    for point, color in zip(body, COLORS):
        if point[2] >= threshold:
            cv2.circle(canvas, (int(point[0]), int(point[1])), sw, color, thickness=-1)
    return canvas


def draw_hand(canvas: np.ndarray, hand: np.ndarray, threshold: float = THRESHOLD) -> np.ndarray:
    """Bones then points of one (21, 3) hand [x, y, score] onto an RGB uint8 canvas, in place."""
    import cv2

    eps = 0.01
    h, w = canvas.shape[:2]
    hw = hand_width(h, w)
    for e, (i, j) in enumerate(HAND_EDGES):
        p, q = hand[i], hand[j]
        if p[2] < threshold or q[2] < threshold:
            continue
        x1, y1, x2, y2 = int(p[0]), int(p[1]), int(q[0]), int(q[1])
        if min(x1, y1, x2, y2) > eps:
            cv2.line(canvas, (x1, y1), (x2, y2), hand_edge_color(e), thickness=hw)
    for point in hand:
        x, y = int(point[0]), int(point[1])
        if point[2] >= threshold and x > eps and y > eps:
            cv2.circle(canvas, (x, y), hw, HAND_POINT_COLOR, thickness=-1)
    return canvas


def render_frame(height: int, width: int, body: np.ndarray | None = None,
                 hands: list[np.ndarray] | tuple = (), threshold: float = THRESHOLD) -> np.ndarray:  # fmt: skip
    """One skeleton frame: black (height, width, 3) uint8 with the body (20, 3) and hands (21, 3)."""
    canvas = np.zeros((height, width, 3), np.uint8)
    if body is not None:
        draw_body(canvas, np.asarray(body, np.float64), threshold)
    for hand in hands:
        draw_hand(canvas, np.asarray(hand, np.float64), threshold)
    return canvas


def render_wholebody(height: int, width: int, kp: np.ndarray, threshold: float = THRESHOLD) -> np.ndarray:
    """A frame from (133, 3) COCO-WholeBody keypoints in pixels of the frame: body and both hands."""
    kp = np.asarray(kp, np.float64)
    return render_frame(height, width, wholebody_to_body(kp), [kp[s] for s in WHOLEBODY_HANDS], threshold)
