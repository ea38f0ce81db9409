"""MediaPipe Tasks `HandLandmarker` behind a small context manager.

- IMAGE mode for stills: one landmarker, reused, recreated every `recycle_every` images
  (MediaPipe's memory grows over very long runs).
- VIDEO mode for clips: a fresh landmarker per clip (its tracker state must not leak from
  one clip into the next), timestamps in ms from frame index and fps, strictly increasing.
- Landmarks come back in pixels: x, y (pixel-edge convention, pixel i spans [i, i+1)),
  z scaled like x (MediaPipe's z is relative to the wrist, "roughly the scale of x").
  World landmarks are metric 3D (metres, origin at the hand's centre), used for geometry.
- Handedness follows MediaPipe, which assumes a mirrored (selfie) image: on an ordinary
  photo its "Left" is usually the person's right hand. Scoring never trusts the label for
  matching; it matches hands by position.

mediapipe is imported lazily so `ipa --help` and the toy path never load it. Its native
log lines are kept off stderr (`native_logs_to_debug`) and go to this module's logger at DEBUG.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from ipa_lib.data.hands import model_file


@dataclass(frozen=True, eq=False)  # arrays inside: identity, not element-wise ==
class Hand:
    """One detected hand. landmarks (21, 3) pixels [x, y, z]; world (21, 3) metres."""

    score: float  # handedness score in [0, 1]: MediaPipe's only per-hand confidence
    handedness: str  # "Left" / "Right" as MediaPipe labels it (mirrored convention)
    landmarks: np.ndarray = field(repr=False)
    world: np.ndarray = field(repr=False)

    @property
    def box(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) pixels around the 21 landmarks."""
        xy = self.landmarks[:, :2]
        x0, y0 = xy.min(0)
        x1, y1 = xy.max(0)
        return float(x0), float(y0), float(x1), float(y1)

    def to_json(self) -> dict:
        return {
            "score": round(self.score, 4),
            "handedness": self.handedness,
            "box": [round(v, 2) for v in self.box],
            "landmarks": np.round(self.landmarks, 2).tolist(),
        }


def _hands_from_result(result, width: int, height: int) -> list[Hand]:
    hands = []
    for lms, world, cats in zip(result.hand_landmarks, result.hand_world_landmarks, result.handedness):
        px = np.array([[p.x * width, p.y * height, p.z * width] for p in lms], np.float32)  # (21, 3)
        wd = np.array([[p.x, p.y, p.z] for p in world], np.float32)  # (21, 3)
        best = max(cats, key=lambda c: c.score)
        hands.append(Hand(float(best.score), str(best.category_name), px, wd))
    return hands


log = logging.getLogger(__name__)

# MediaPipe 1.2.3 writes from C++ straight to file descriptor 2: LiteRT/TFLite "INFO: ..." lines
# whenever a landmarker is created or closed, absl "W0000 ..." lines (after "WARNING: Logging
# before InitGoogle() ...") on the first detection. No switch reaches them (GLOG_minloglevel,
# TF_CPP_MIN_LOG_LEVEL, ABSL_MIN_LOG_LEVEL, GLOG_stderrthreshold all tried; MpSetLoggingCallback
# only adds an absl sink), so native calls run with fd 2 on a scratch file: these lines go to
# `log.debug`, any other line (an error) back to stderr.
_NATIVE_NOISE = re.compile(r"(INFO: |[IW]\d{4} |WARNING: Logging before InitGoogle\(\))")
_native_lock = threading.RLock()
_native_state = {"depth": 0, "scratch": None}


@contextmanager
def native_logs_to_debug() -> Iterator[None]:
    """Run MediaPipe calls with their native INFO/WARNING lines sent to `log.debug`."""
    with _native_lock:
        if _native_state["depth"]:  # nested: the outer call filters
            yield
            return
        try:
            saved = os.dup(2)
        except OSError:  # no stderr to protect
            yield
            return
        scratch = _native_state["scratch"] = _native_state["scratch"] or tempfile.TemporaryFile(buffering=0)
        try:
            sys.stderr.flush()
        except (AttributeError, OSError, ValueError):
            pass
        os.dup2(scratch.fileno(), 2)
        _native_state["depth"] = 1
        try:
            yield
        finally:
            _native_state["depth"] = 0
            os.dup2(saved, 2)
            os.close(saved)
            _replay(scratch)


def _replay(scratch) -> None:
    fd = scratch.fileno()
    if os.fstat(fd).st_size == 0:
        return
    os.lseek(fd, 0, os.SEEK_SET)  # fd 2 shared this file's offset: read it all back, then empty it
    chunks = list(iter(lambda: os.read(fd, 1 << 16), b""))
    text = b"".join(chunks).decode("utf-8", "replace")
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    for line in text.splitlines():
        if _NATIVE_NOISE.match(line):
            log.debug("mediapipe: %s", line)
        elif line.strip():
            os.write(2, (line + "\n").encode())


def next_timestamp_ms(index: int, fps: float, last: int) -> int:
    """VIDEO-mode timestamp of frame `index`: from index and fps, forced above `last`.

    MediaPipe rejects a timestamp that does not increase; rounding at fps > 1000 would
    otherwise repeat one.
    """
    return max(int(round(index * 1000.0 / fps)), last + 1)


class HandDetector:
    """Context manager around MediaPipe HandLandmarker; always `close()` it (or use `with`).

    Args:
        model_path: hand_landmarker.task; None resolves it (see `model_file.resolve`).
        num_hands: at most this many hands per frame.
        min_detection_confidence / min_presence_confidence / min_tracking_confidence:
            MediaPipe thresholds (0.3 detection finds the hands in the test photos).
        recycle_every: recreate the IMAGE-mode landmarker after this many images.
    """

    def __init__(
        self,
        model_path: str | os.PathLike | None = None,
        *,
        num_hands: int = 2,
        min_detection_confidence: float = 0.3,
        min_presence_confidence: float = 0.5,
        min_tracking_confidence: float = 0.5,
        recycle_every: int = 5000,
    ) -> None:
        self.model_path = str(model_file.resolve(model_path))
        self.num_hands = num_hands
        self._thresholds = (min_detection_confidence, min_presence_confidence, min_tracking_confidence)
        self.recycle_every = recycle_every
        self._image_lm = None
        self._image_count = 0
        self._closed = False

    # -- plumbing -----------------------------------------------------------------------
    def _create(self, video: bool):
        from mediapipe.tasks.python import BaseOptions, vision

        det, pres, track = self._thresholds
        opts = vision.HandLandmarkerOptions(
            base_options=BaseOptions(model_asset_path=self.model_path),
            running_mode=vision.RunningMode.VIDEO if video else vision.RunningMode.IMAGE,
            num_hands=self.num_hands,
            min_hand_detection_confidence=det,
            min_hand_presence_confidence=pres,
            min_tracking_confidence=track,
        )
        with native_logs_to_debug():
            return vision.HandLandmarker.create_from_options(opts)

    @staticmethod
    def _mp_image(frame: np.ndarray):
        import mediapipe as mp

        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
            raise ValueError(f"expected an RGB uint8 frame (H, W, 3), got {frame.dtype} {frame.shape}")
        return mp.Image(image_format=mp.ImageFormat.SRGB, data=np.ascontiguousarray(frame))

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("HandDetector is closed")

    # -- API ----------------------------------------------------------------------------
    def detect_image(self, frame: np.ndarray) -> list[Hand]:
        """One RGB uint8 still (H, W, 3) -> hands (IMAGE mode)."""
        self._check_open()
        if self._image_lm is not None and self._image_count >= self.recycle_every:
            with native_logs_to_debug():
                self._image_lm.close()
            self._image_lm, self._image_count = None, 0
        if self._image_lm is None:
            self._image_lm = self._create(video=False)
        self._image_count += 1
        image = self._mp_image(frame)
        with native_logs_to_debug():
            result = self._image_lm.detect(image)
        return _hands_from_result(result, frame.shape[1], frame.shape[0])

    def detect_clip(self, frames: Iterable[np.ndarray], fps: float = 16.0) -> Iterator[list[Hand]]:
        """Frames of one clip, in order -> hands per frame (VIDEO mode, fresh tracker).

        Frames are consumed lazily, so a long video never sits in memory. The landmarker
        is closed when the iterator is exhausted or closed.
        """
        self._check_open()
        if fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        lm = self._create(video=True)
        try:
            last = -1
            for i, frame in enumerate(frames):
                last = next_timestamp_ms(i, fps, last)
                image = self._mp_image(frame)
                with native_logs_to_debug():
                    result = lm.detect_for_video(image, last)
                yield _hands_from_result(result, frame.shape[1], frame.shape[0])
        finally:
            with native_logs_to_debug():
                lm.close()

    def detect_frames(self, frames: np.ndarray, fps: float = 16.0) -> list[list[Hand]]:
        """(F, H, W, 3) uint8 -> hands per frame: IMAGE mode for F == 1, else VIDEO mode."""
        if frames.ndim != 4:
            raise ValueError(f"expected frames (F, H, W, 3), got shape {frames.shape}")
        if len(frames) == 1:
            return [self.detect_image(frames[0])]
        return list(self.detect_clip(frames, fps))

    def close(self) -> None:
        if self._image_lm is not None:
            with native_logs_to_debug():
                self._image_lm.close()
            self._image_lm = None
        self._closed = True

    def __enter__(self) -> "HandDetector":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
