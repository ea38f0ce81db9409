"""Clip hand-quality score from a real hand detector (MediaPipe), independent of training.

Components, each in [0, 1], reported separately as `score_<name>`:
- presence:   per frame, matched hands / max(hands the pose expects, hands detected), so
              missing *and* extra hands cost (1.0 for a frame that expects and shows none).
              Reference-free: fraction of frames with at least one detected hand.
- confidence: mean handedness score of all detections (MediaPipe has no per-landmark
              confidence; this is the only per-hand one). 0 when nothing is detected.
- agreement:  PCK of detected landmarks against the driving pose's hand keypoints: the
              fraction of visible pose keypoints within PCK_ALPHA x hand size of the matched
              detection, over all expected hands (an unmatched one scores 0). Hands are
              matched by position, never by MediaPipe's (mirrored) handedness label.
              Skipped without a driving pose, or when the pose never shows a hand.
- handedness: per hand matched to a pose hand, the probability that the detection is the
              hand of the pose's slot (slot 0 = the person's left): its handedness score
              when its label names that slot, 1 - score when it names the other. MediaPipe
              labels as if the frame were mirrored, so on an ordinary frame "Right" is the
              person's left (as `masks.hands_to_keypoints`). Mean over matched hands; skipped
              without a driving pose or a match. Opt-in: computed and reported only with a
              positive "handedness" weight (CASE_WEIGHTS, the gate on cases); not in
              COMPONENTS / DEFAULT_WEIGHTS, so existing callers see the five above.
- geometry:   plausible fingers on MediaPipe's metric 3D world landmarks: phalanx length
              ratios against adult anatomy (log-normal tolerance) and bend angles within the
              joints' flexion range, per finger (geometric mean), then the mean of the five
              fingers. Mean over detections; 0 when nothing is detected.
- stability:  0.5 x smoothness (exp(-median landmark acceleration / JITTER_TAU), in hand
              sizes per frame^2, along position-matched tracks) + 0.5 x count consistency
              (the number of detected hands changes only when the pose's does). Needs 3+
              frames, skipped otherwise.
hand_score = sum(w_c * score_c) / sum(w_c) over the components that are not skipped
(weights renormalised), with DEFAULT_WEIGHTS unless given.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Iterable, Sequence

import numpy as np

from ipa_lib.data.hands.landmarker import Hand, HandDetector
from ipa_lib.data.hands.layouts import visible

COMPONENTS: tuple[str, ...] = ("presence", "confidence", "agreement", "geometry", "stability")
OPTIONAL: tuple[str, ...] = ("handedness",)  # scored only when given a positive weight
ALL_COMPONENTS: tuple[str, ...] = COMPONENTS + OPTIONAL
# presence and agreement carry most weight: a hand where the pose wants it, in the pose's
# shape, is what the animation must get right; the rest guards against confident nonsense
DEFAULT_WEIGHTS: dict[str, float] = {
    "presence": 0.30,
    "confidence": 0.15,
    "agreement": 0.25,
    "geometry": 0.15,
    "stability": 0.15,
}
# the gate on cases (driver hands from hands.json): the left/right hand in each place counts too
CASE_WEIGHTS: dict[str, float] = {
    "presence": 0.25,
    "confidence": 0.15,
    "agreement": 0.25,
    "geometry": 0.10,
    "stability": 0.15,
    "handedness": 0.10,
}
LEFT_LABEL = "Right"  # MediaPipe's label of the person's left hand (slot 0) on an ordinary frame
PCK_ALPHA = 0.2  # keypoint agrees within 0.2 x hand size (PCKh-style threshold)
MATCH_MAX = 1.0  # pose hand and detection match when mean distance < 1 hand size
MIN_VISIBLE = 5  # a pose hand is expected in a frame with >= 5 visible keypoints
JITTER_TAU = 0.1  # hand sizes per frame^2 at which smoothness is 1/e; MediaPipe noise on a
# smooth pan over the test photos is ~0.03-0.06 (small hands are noisier), so clean clips score ~0.6-0.75

# Per finger: bones as landmark pairs with adult phalanx lengths in mm (Buryanov & Kotiuk
# 2010, "Proportions of hand segments", Int. J. Morphol. 28(3); thumb: proximal, distal),
# compared as ratios to the middle finger's proximal phalanx (landmarks 9-10) so hand size
# cancels; and joints as (parent, joint, child) landmarks with the largest plausible bend in
# degrees: active flexion (MCP ~90, PIP ~110, DIP ~90, thumb MCP ~60, IP ~80) + 10-20 for noise.
FINGERS: dict[str, dict] = {
    "thumb": {"bones": {(2, 3): 30.9, (3, 4): 21.7}, "joints": {(1, 2, 3): 80, (2, 3, 4): 100}},
    "index": {"bones": {(5, 6): 39.8, (6, 7): 22.4, (7, 8): 15.8},
              "joints": {(0, 5, 6): 100, (5, 6, 7): 120, (6, 7, 8): 100}},
    "middle": {"bones": {(10, 11): 26.3, (11, 12): 17.4},
               "joints": {(0, 9, 10): 100, (9, 10, 11): 120, (10, 11, 12): 100}},
    "ring": {"bones": {(13, 14): 41.4, (14, 15): 25.7, (15, 16): 17.3},
             "joints": {(0, 13, 14): 100, (13, 14, 15): 120, (14, 15, 16): 100}},
    "pinky": {"bones": {(17, 18): 32.7, (18, 19): 18.1, (19, 20): 15.4},
              "joints": {(0, 17, 18): 100, (17, 18, 19): 120, (18, 19, 20): 100}},
}  # fmt: skip
UNIT_BONE, UNIT_MM = (9, 10), 44.6  # middle proximal phalanx
RATIO_TOLERANCE = math.log(1.6)  # a ratio 1.6x off the anatomical one scores exp(-0.5)
ANGLE_SOFTNESS = 15.0  # degrees past the limit at which a joint scores exp(-1)
FEATURE_FLOOR = 1e-3  # keeps one absurd feature from zeroing a finger outright


def finger_scores(world: np.ndarray) -> dict[str, float]:
    """Per-finger plausibility in [0, 1] from 21 world landmarks (21, 3) in metres.

    A finger's score is the geometric mean of its bone-ratio and bend-angle scores, so one
    absurd phalanx or joint sinks that finger instead of being averaged away.
    """
    w = np.asarray(world, np.float64)
    unit = float(np.linalg.norm(w[UNIT_BONE[1]] - w[UNIT_BONE[0]]))
    if not np.isfinite(unit) or unit < 1e-6:
        return {f: 0.0 for f in FINGERS}
    out = {}
    for finger, spec in FINGERS.items():
        feats = []
        for (a, b), mm in spec["bones"].items():
            r = max(float(np.linalg.norm(w[b] - w[a])) / unit, 1e-6)
            feats.append(math.exp(-0.5 * (math.log(r / (mm / UNIT_MM)) / RATIO_TOLERANCE) ** 2))
        for (p, j, c), limit in spec["joints"].items():
            u, v = w[j] - w[p], w[c] - w[j]
            cos = float(np.dot(u, v) / (np.linalg.norm(u) * np.linalg.norm(v) + 1e-12))
            bend = math.degrees(math.acos(max(-1.0, min(1.0, cos))))
            feats.append(1.0 if bend <= limit else math.exp(-(((bend - limit) / ANGLE_SOFTNESS) ** 2)))
        out[finger] = float(np.exp(np.mean(np.log(np.maximum(feats, FEATURE_FLOOR)))))
    return out


def geometry_score(world: np.ndarray) -> float:
    """Plausibility in [0, 1] of one hand: mean of its five finger scores (one bad finger costs 1/5)."""
    return float(np.mean(list(finger_scores(world).values())))


def _hand_size(xy: np.ndarray) -> float:
    """Longer side of the landmark box (pixels), at least 1."""
    return max(float(np.ptp(xy[:, 0])), float(np.ptp(xy[:, 1])), 1.0)


def _match(pose_hands: list[np.ndarray], dets: Sequence[Hand]) -> list[tuple[int, int, float]]:
    """Best one-to-one (pose index, detection index, mean distance / hand size) pairs."""
    cost = np.full((len(pose_hands), len(dets)), np.inf)
    for i, ph in enumerate(pose_hands):
        vis = ph[:, 2] > 0
        for j, d in enumerate(dets):
            dist = np.linalg.norm(ph[vis, :2] - d.landmarks[vis, :2], axis=-1)
            cost[i, j] = float(dist.mean()) / _hand_size(d.landmarks[:, :2])
    # tiny sets (<= num_hands each): try every partial assignment, most pairs then least cost
    best: list[tuple[int, int, float]] = []
    best_key = (0, 0.0)
    slots = [*range(len(dets)), *([None] * len(pose_hands))]
    for perm in itertools.permutations(slots, len(pose_hands)):
        pairs = [(i, j, float(cost[i, j])) for i, j in enumerate(perm) if j is not None and cost[i, j] < MATCH_MAX]
        key = (len(pairs), -sum(c for *_, c in pairs))
        if key > best_key:
            best, best_key = pairs, key
    return best


def _tracks(detections: Sequence[Sequence[Hand]]) -> np.ndarray:
    """Position-matched tracks: (F, T, 21, 2) landmark xy, NaN where a track has no hand."""
    num_tracks = max((len(d) for d in detections), default=0)
    out = np.full((len(detections), num_tracks, 21, 2), np.nan, np.float64)
    last: list[np.ndarray | None] = [None] * num_tracks
    for f, dets in enumerate(detections):
        best, best_cost = None, math.inf
        for perm in itertools.permutations(range(num_tracks), len(dets)):
            cost = 0.0
            for d, t in zip(dets, perm):
                xy = d.landmarks[:, :2]
                # a jump of more than one hand size costs more than starting an unused track
                prev = last[t]
                cost += 1.0 if prev is None else float(np.linalg.norm(xy.mean(0) - prev.mean(0))) / _hand_size(xy)
            if cost < best_cost:
                best, best_cost = perm, cost
        for d, t in zip(dets, best or ()):
            out[f, t] = d.landmarks[:, :2]
            last[t] = d.landmarks[:, :2]
    return out


def _stability(detections: Sequence[Sequence[Hand]], expected: list[int] | None) -> float:
    tracks = _tracks(detections)  # (F, T, 21, 2)
    jitters = []
    for t in range(tracks.shape[1]):
        xy = tracks[:, t]
        acc = xy[2:] - 2 * xy[1:-1] + xy[:-2]  # (F-2, 21, 2), NaN unless 3 frames in a row
        for f in range(acc.shape[0]):
            if np.isfinite(acc[f]).all():
                jitters.append(float(np.median(np.linalg.norm(acc[f], axis=-1))) / _hand_size(xy[f + 1]))
    smooth = math.exp(-float(np.median(jitters)) / JITTER_TAU) if jitters else 0.0
    counts = np.array([len(d) for d in detections])
    change = np.diff(counts)
    if expected is not None:
        change = change - np.diff(np.array(expected))
    consistency = float(np.mean(change == 0))
    return 0.5 * smooth + 0.5 * consistency


def score_hands(
    detections: Sequence[Sequence[Hand]],
    hand_keypoints: np.ndarray | None = None,
    weights: dict[str, float] | None = None,
    *,
    min_score: float = 0.3,
) -> dict[str, float]:
    """Per-frame detections (+ optional pose hands (F, 2, 21, 3) pixels) -> hand_score and components.

    Pure function (no detector): `MediaPipeHandScorer.score` runs the detector, then this.
    """
    weights = resolve_weights(weights)
    num_frames = len(detections)
    if num_frames == 0:
        raise ValueError("no frames to score")
    comps: dict[str, float] = {}
    all_dets = [d for frame in detections for d in frame]

    expected: list[int] | None = None
    if hand_keypoints is not None:
        kp = np.asarray(hand_keypoints, np.float32)
        if kp.shape != (num_frames, 2, 21, 3):
            raise ValueError(f"hand_keypoints must be ({num_frames}, 2, 21, 3), got {kp.shape}")
        kp = kp.copy()
        kp[..., 2] = visible(kp, min_score)  # score -> 0/1 visibility
        presence, pck_sum, n_expected, expected, sided = [], 0.0, 0, [], []
        sided_on = weights.get("handedness", 0.0) > 0
        for f, dets in enumerate(detections):
            slots = [h for h in range(2) if kp[f, h, :, 2].sum() >= MIN_VISIBLE]
            pose = [kp[f, h] for h in slots]
            expected.append(len(pose))
            pairs = _match(pose, dets)
            denom = max(len(pose), len(dets))
            presence.append(len(pairs) / denom if denom else 1.0)
            n_expected += len(pose)
            for i, j, _ in pairs:
                vis = pose[i][:, 2] > 0
                err = np.linalg.norm(pose[i][vis, :2] - dets[j].landmarks[vis, :2], axis=-1)
                pck_sum += float(np.mean(err <= PCK_ALPHA * _hand_size(dets[j].landmarks[:, :2])))
                if not sided_on:
                    continue
                says_left = dets[j].handedness == LEFT_LABEL
                p = float(np.clip(dets[j].score, 0.0, 1.0))
                sided.append(p if says_left == (slots[i] == 0) else 1.0 - p)
        comps["presence"] = float(np.mean(presence))
        if n_expected:
            comps["agreement"] = pck_sum / n_expected
        if sided:
            comps["handedness"] = float(np.mean(sided))
    else:
        comps["presence"] = float(np.mean([len(d) > 0 for d in detections]))

    comps["confidence"] = float(np.mean([d.score for d in all_dets])) if all_dets else 0.0
    comps["geometry"] = float(np.mean([geometry_score(d.world) for d in all_dets])) if all_dets else 0.0
    if num_frames >= 3:
        comps["stability"] = _stability(detections, expected)

    used = {c: v for c, v in comps.items() if weights.get(c, 0.0) > 0}
    total = sum(weights[c] for c in used)
    hand = sum(weights[c] * v for c, v in used.items()) / total if total > 0 else 0.0
    out = {"hand_score": float(np.clip(hand, 0.0, 1.0))}
    out.update({f"score_{c}": float(np.clip(comps[c], 0.0, 1.0)) for c in ALL_COMPONENTS if c in comps})
    return out


def resolve_weights(weights: dict[str, float] | None) -> dict[str, float]:
    """DEFAULT_WEIGHTS updated by `weights`; unknown names and negative values are errors."""
    if weights is None:
        return dict(DEFAULT_WEIGHTS)
    unknown = set(weights) - set(ALL_COMPONENTS)
    if unknown:
        raise ValueError(f"unknown score components {sorted(unknown)}; valid: {', '.join(ALL_COMPONENTS)}")
    merged = {**DEFAULT_WEIGHTS, **{k: float(v) for k, v in weights.items()}}
    if any(v < 0 for v in merged.values()) or sum(merged.values()) <= 0:
        raise ValueError(f"weights must be >= 0 with a positive sum, got {merged}")
    return merged


class MediaPipeHandScorer:
    """Hand-quality scorer with the gate's scorer interface (see module docstring).

    score(frames (F, H, W, 3) uint8, hand_keypoints (F, 2, 21, 3) pixels | None) -> dict.
    One detector per scorer; each clip gets a fresh VIDEO-mode tracker (IMAGE mode for F=1).
    """

    def __init__(
        self,
        model_path: str | os.PathLike | None = None,
        weights: dict[str, float] | None = None,
        *,
        fps: float = 16.0,  # Wan's output rate; only spaces VIDEO-mode timestamps
        num_hands: int = 2,
        min_detection_confidence: float = 0.3,
    ) -> None:
        self.weights = resolve_weights(weights)
        # the score_<name> columns this scorer can report: the five, plus opted-in ones
        self.components = COMPONENTS + tuple(c for c in OPTIONAL if self.weights.get(c, 0.0) > 0)
        self.fps = fps
        self.detector = HandDetector(
            model_path, num_hands=num_hands, min_detection_confidence=min_detection_confidence
        )

    def detect(self, frames: np.ndarray) -> list[list[Hand]]:
        """(F, H, W, 3) uint8 -> detections per frame."""
        return self.detector.detect_frames(np.asarray(frames), self.fps)

    def detect_clip(self, frames: Iterable[np.ndarray]) -> list[list[Hand]]:
        """Frames of one clip, consumed one at a time -> detections per frame (VIDEO mode
        always, fresh tracker), so a clip of any length goes through in windows."""
        return list(self.detector.detect_clip(frames, self.fps))

    def score_detections(self, detections: Sequence[Sequence[Hand]],
                         hand_keypoints: np.ndarray | None = None) -> dict[str, float]:
        """`score_hands` with this scorer's weights."""
        return score_hands(detections, hand_keypoints, self.weights)

    def score(self, frames: np.ndarray, hand_keypoints: np.ndarray | None = None) -> dict[str, float]:
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"frames must be (F, H, W, 3) uint8, got {frames.dtype} {frames.shape}")
        return score_hands(self.detect(frames), hand_keypoints, self.weights)

    def close(self) -> None:
        self.detector.close()

    def __enter__(self) -> "MediaPipeHandScorer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
