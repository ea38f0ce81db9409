"""`ipa cases build`: raw driving videos (+ reference images) -> case folders (`ipa_lib.data.cases`).

Per (driving, reference) pair, one case folder written atomically (`atomic_dir`):
- driving.mp4: every frame of the driving video resampled to `data.fps` (output frame i is
  source frame round(i * source_fps / data.fps)), centre-cropped to the aspect ratio
  data.width : data.height, then resized to data.height x data.width;
- hands.json: MediaPipe HandLandmarker (VIDEO mode) on the same resampled, cropped frames at
  detection size (the crop's own resolution, its short side capped at DETECT_SHORT_SIDE, and
  never below the output's: MediaPipe finds few hands in small frames), landmarks scaled to
  driving.mp4's pixels;
- src_pose.mp4: the skeleton in Wan2.2-Animate's style (`ipa_lib.data.pose_render`): body and
  hands from a whole-body keypoints file when one is given, else MediaPipe's hands only;
- src_face.mp4: square face crops at data.face_size, from the keypoints' face points or
  OpenCV's Haar frontal-face cascade, tracked and smoothed over frames;
- src_ref.png: the reference image, cropped and resized like the video, or (self-reenactment,
  `reference_frame=N`) frame N of driving.mp4; case.json records which.
A built case must pass `probe_case` for the same `data`, else it is not kept.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from ipa_lib.core.errors import InputError

log = logging.getLogger(__name__)

NECK_DWPOSE = 17  # DWPose inserts a neck here; every later COCO-WholeBody index shifts by one
FACE_MARGIN_HAAR = 1.5  # Haar boxes hug brows to chin: widen for hair and jaw
FACE_MARGIN_POINTS = 1.3  # the 68 face points span the face itself
FACE_SMOOTH = 5  # centred moving average over this many frames
KEYPOINT_SCORE = 0.3  # face points above this score place the face box
DETECT_SHORT_SIDE = 512  # hands are detected at up to this short side (or the output's, if larger)


class BuildError(InputError):
    """A pair that cannot be built; the message names the file and the problem."""


# ---- geometry --------------------------------------------------------------------------

def crop_box(src_h: int, src_w: int, height: int, width: int) -> tuple[int, int, int, int]:
    """(x0, y0, crop_w, crop_h): the centred crop of a src_w x src_h frame with the aspect ratio
    width : height (the largest one), which then resizes to width x height."""
    if src_w * height > src_h * width:  # source wider: trim the sides
        cw, ch = max(1, round(src_h * width / height)), src_h
    else:
        cw, ch = src_w, max(1, round(src_w * height / width))
    return (src_w - cw) // 2, (src_h - ch) // 2, cw, ch


def fit(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    """Centre-crop to the aspect ratio, then resize to height x width (RGB uint8)."""
    import cv2

    x0, y0, cw, ch = crop_box(frame.shape[0], frame.shape[1], height, width)
    crop = frame[y0 : y0 + ch, x0 : x0 + cw]
    if crop.shape[:2] == (height, width):
        return np.ascontiguousarray(crop)
    interp = cv2.INTER_AREA if cw * ch > height * width else cv2.INTER_LINEAR
    return cv2.resize(np.ascontiguousarray(crop), (width, height), interpolation=interp)


# ---- keypoints files -------------------------------------------------------------------

def to_wholebody(kp: np.ndarray) -> np.ndarray:
    """(..., 133 | 134, 2 | 3) -> (..., 133, 3) COCO-WholeBody [x, y, score].

    134 points are DWPose's order (`ipa_lib.data.hands.layouts`: neck at 17, later indices
    one up): the neck is dropped. Points without a score get 1.
    """
    from ipa_lib.data.hands.layouts import HAND_SLICES, NUM_POINTS

    kp = np.asarray(kp, np.float64)
    shift = HAND_SLICES["dwpose"][0].start - HAND_SLICES["coco_wholebody"][0].start
    assert shift == NUM_POINTS["dwpose"] - NUM_POINTS["coco_wholebody"] == 1  # one inserted point
    if kp.shape[-1] == 2:
        kp = np.concatenate([kp, np.ones(kp.shape[:-1] + (1,))], axis=-1)
    if kp.shape[-2] == NUM_POINTS["dwpose"]:
        kp = np.delete(kp, NECK_DWPOSE, axis=-2)
    if kp.shape[-2] != NUM_POINTS["coco_wholebody"] or kp.shape[-1] != 3:
        raise ValueError(f"expected (..., 133 | 134, 2 | 3) keypoints, got shape {kp.shape}")
    return kp


def read_keypoints(path: str | os.PathLike) -> np.ndarray:
    """A keypoints JSON file -> (frames, 133, 3) COCO-WholeBody [x, y, score] in source pixels.

    The file: a list with one entry per source frame, each a list of [x, y] or [x, y, score]
    for 133 (COCO-WholeBody) or 134 (DWPose) points; null or [] for a frame without a
    person (nothing drawn).
    """
    p = Path(path)
    try:
        doc = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BuildError(f"{p}: not a readable JSON keypoints file ({err})") from None
    if not isinstance(doc, list) or not doc:
        raise BuildError(f"{p}: expected a JSON list with one entry per source frame, each a list of [x, y, score]")
    counts = {len(e) for e in doc if e}
    if not counts:
        raise BuildError(f"{p}: no frame has keypoints")
    if len(counts) > 1 or not counts <= {133, 134}:
        raise BuildError(f"{p}: frames have {sorted(counts)} points; expected 133 (COCO-WholeBody) or 134 (DWPose, with neck)")
    n = counts.pop()
    out = np.zeros((len(doc), 133, 3))
    for f, entry in enumerate(doc):
        if not entry:
            continue
        try:
            arr = np.asarray(entry, np.float64)
        except (TypeError, ValueError):
            raise BuildError(f"{p}: frame {f}: points must be [x, y] or [x, y, score] numbers") from None
        if arr.shape not in ((n, 2), (n, 3)) or not np.isfinite(arr).all():
            raise BuildError(f"{p}: frame {f}: expected {n} finite [x, y(, score)] points, got shape {arr.shape}")
        out[f] = to_wholebody(arr)
    return out


def _to_output(kp: np.ndarray, box: tuple[int, int, int, int], height: int, width: int) -> np.ndarray:
    """Source-pixel keypoints -> pixels of the cropped, resized frame."""
    x0, y0, cw, _ = box
    s = width / cw
    out = kp.copy()
    out[..., 0] = (kp[..., 0] - x0) * s
    out[..., 1] = (kp[..., 1] - y0) * s
    return out


# ---- face boxes ------------------------------------------------------------------------

def _haar():
    import cv2

    cascade = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
    if cascade.empty():
        raise BuildError("OpenCV's haarcascade_frontalface_default.xml did not load (cv2.data.haarcascades)")
    return cascade


def haar_face(cascade, frame: np.ndarray, last: tuple | None) -> tuple[float, float, float] | None:
    """(cx, cy, side) of a face in an RGB frame, or None: the one nearest `last`, else the largest."""
    import cv2

    gray = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
    m = max(12, min(frame.shape[:2]) // 16)
    found = cascade.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=4, minSize=(m, m))
    if len(found) == 0:
        return None
    boxes = [(x + w / 2.0, y + h / 2.0, float(max(w, h)) * FACE_MARGIN_HAAR) for x, y, w, h in found]
    if last is not None:
        return min(boxes, key=lambda b: (b[0] - last[0]) ** 2 + (b[1] - last[1]) ** 2)
    return max(boxes, key=lambda b: b[2])


def points_face(kp: np.ndarray) -> tuple[float, float, float] | None:
    """(cx, cy, side) around the visible face points of (133, 3) output-pixel keypoints."""
    from ipa_lib.data.pose_render import WHOLEBODY_FACE

    face = kp[WHOLEBODY_FACE]
    face = face[face[:, 2] > KEYPOINT_SCORE]
    if len(face) < 5:
        return None
    (x0, y0), (x1, y1) = face[:, :2].min(0), face[:, :2].max(0)
    return (x0 + x1) / 2.0, (y0 + y1) / 2.0, float(max(x1 - x0, y1 - y0)) * FACE_MARGIN_POINTS


def track_boxes(found: list, height: int, width: int) -> np.ndarray:
    """Per-frame (cx, cy, side) or None -> (F, 3) boxes: a frame without a face keeps the last
    box (frames before the first face take the first one; no face at all: the centred square
    of half the short side), then a centred moving average over FACE_SMOOTH frames."""
    if all(b is None for b in found):
        return np.tile([width / 2.0, height / 2.0, min(height, width) / 2.0], (len(found), 1))
    first = next(b for b in found if b is not None)
    boxes, last = [], first
    for b in found:
        last = b if b is not None else last
        boxes.append(last)
    arr = np.asarray(boxes, np.float64)
    k = min(FACE_SMOOTH, len(arr))
    pad = np.pad(arr, ((k // 2, k - 1 - k // 2), (0, 0)), mode="edge")
    kernel = np.ones(k) / k
    return np.stack([np.convolve(pad[:, c], kernel, mode="valid") for c in range(3)], axis=1)


def crop_face(frame: np.ndarray, box, size: int) -> np.ndarray:
    """The square `box` (cx, cy, side) of a frame, kept inside it, resized to size x size."""
    import cv2

    h, w = frame.shape[:2]
    side = round(min(max(box[2], 2.0), h, w))
    x0 = round(min(max(box[0] - side / 2.0, 0), w - side))
    y0 = round(min(max(box[1] - side / 2.0, 0), h - side))
    crop = np.ascontiguousarray(frame[y0 : y0 + side, x0 : x0 + side])
    interp = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
    return cv2.resize(crop, (size, size), interpolation=interp)


# ---- one case --------------------------------------------------------------------------

def _read_image(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise BuildError(f"{path}: not a readable image ({err})") from None


def _resampled(path: Path, fps: float, src_fps: float, height: int, width: int, index: list[int], box: list,
               size: tuple[int, int] | None = (0, 0)):
    """Frames of `path` at `fps`, fitted to height x width (`size=None`: to `detect_size`);
    appends each frame's source index to `index` and the crop box to `box` (once)."""
    from ipa_lib.data.cases import source_index
    from ipa_lib.data.video import VideoError, iter_frames

    i = 0
    for n, frame in enumerate(iter_frames(path)):
        if not box:
            box.append(crop_box(frame.shape[0], frame.shape[1], height, width))
        elif box[0] != crop_box(frame.shape[0], frame.shape[1], height, width):
            raise VideoError(path, f"frame size changes mid-video at frame {n}")
        if size is None:
            size = detect_size(box[0][3], box[0][2], height, width)
        out_h, out_w = (height, width) if size == (0, 0) else size
        while source_index(i, fps, src_fps) == n:
            index.append(n)
            i += 1
            yield fit(frame, out_h, out_w)


def detect_size(crop_h: int, crop_w: int, height: int, width: int) -> tuple[int, int]:
    """(h, w) to detect hands at: the crop's resolution with its short side capped at
    DETECT_SHORT_SIDE, but never smaller than the output (same aspect ratio as the output)."""
    short = max(min(crop_h, crop_w, DETECT_SHORT_SIDE), min(height, width))
    scale = short / min(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def detect_hands(detector, path: Path, fps: float, src_fps: float, height: int, width: int) -> list:
    """The driver's hands per output frame, detected at `detect_size` and scaled to height x width."""
    from ipa_lib.data.hands.landmarker import Hand

    index, box = [], []
    frames = _resampled(path, fps, src_fps, height, width, index, box, size=None)
    out = []
    for f, hands in enumerate(detector.detect_clip(frames, fps=fps)):
        dh, dw = detect_size(box[0][3], box[0][2], height, width)
        sx, sy = width / dw, height / dh
        scaled = []
        for h in hands:
            lm = h.landmarks.copy()
            lm[:, 0] *= sx
            lm[:, 1] *= sy
            lm[:, 2] *= sx
            scaled.append(Hand(h.score, h.handedness, lm, h.world))
        out.append(scaled)
    return out


def _driving_fps(path: Path) -> float:
    from ipa_lib.data.video import VideoError, _check_file, header_fps, is_image

    try:
        _check_file(path)
        if is_image(path):
            raise BuildError(f"{path}: a still image, not a driving video")
    except VideoError as err:
        raise BuildError(str(err)) from None
    fps = header_fps(path)
    if fps <= 0:
        raise BuildError(f"{path}: not a decodable video with a known frame rate (no fps in its header)")
    return fps


def build_case(driving: str | os.PathLike, out_dir: str | os.PathLike, data, detector, *,
               reference: str | os.PathLike | None = None, reference_frame: int | None = None,
               keypoints: str | os.PathLike | None = None) -> dict:  # fmt: skip
    """Build one case folder at `out_dir` (replaced atomically); returns its `probe_case` row.

    `detector`: an open `HandDetector`. Exactly one of `reference` and `reference_frame`.
    Raises BuildError / VideoError (InputError) naming the file and the problem; then
    nothing is written.
    """
    from PIL import Image

    from ipa_lib.core.io import atomic_dir, atomic_write_json
    from ipa_lib.data.cases import DRIVING, HANDS, META, probe_case
    from ipa_lib.data.pose_render import WHOLEBODY_HANDS, render_frame, wholebody_to_body
    from ipa_lib.data.video import iter_frames, write_video

    if (reference is None) == (reference_frame is None):
        raise BuildError("give a reference image or a reference frame, exactly one")
    if reference_frame is not None and reference_frame < 0:
        raise BuildError(f"reference frame must be >= 0, got {reference_frame}")
    driving, H, W, fps = Path(driving), data.height, data.width, data.fps
    src_fps = _driving_fps(driving)
    ref = fit(_read_image(Path(reference)), H, W) if reference is not None else None
    kps = read_keypoints(keypoints) if keypoints is not None else None
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        index, box = [], []
        write_video(tmp / DRIVING, _resampled(driving, fps, src_fps, H, W, index, box), fps=fps)
        n = len(index)
        if reference_frame is not None and reference_frame >= n:
            raise BuildError(f"{driving}: reference frame {reference_frame} is beyond the video "
                             f"({n} frames at data.fps={fps:g})")  # fmt: skip
        if kps is not None and len(kps) <= index[-1]:
            raise BuildError(f"{keypoints}: {len(kps)} frames of keypoints, the driving video {driving.name} "
                             f"needs {index[-1] + 1} (one entry per source frame)")  # fmt: skip
        body = _to_output(kps[index], box[0], H, W) if kps is not None else None

        # pass 2 over the written frames: hands (VIDEO mode), face boxes, the reference frame
        cascade = _haar() if body is None else None
        found: list = []

        def tap():
            for i, frame in enumerate(iter_frames(tmp / DRIVING)):
                if i == reference_frame:
                    found_ref.append(frame.copy())
                last = next((b for b in reversed(found) if b is not None), None)
                found.append(haar_face(cascade, frame, last) if body is None else points_face(body[i]))
                yield frame

        found_ref: list = []
        for _ in tap():
            pass
        hands = detect_hands(detector, driving, fps, src_fps, H, W)
        atomic_write_json(tmp / HANDS, {"width": W, "height": H, "fps": fps,
                                        "frames": [[h.to_json() for h in f] for f in hands]})  # fmt: skip
        boxes = track_boxes(found, H, W)
        write_video(tmp / "src_face.mp4", (crop_face(f, b, data.face_size) for f, b in zip(iter_frames(tmp / DRIVING), boxes)),
                    fps=fps)  # fmt: skip

        if body is None:
            log.warning("%s: no --keypoints file: src_pose.mp4 shows the hands (MediaPipe) but no body", driving)

            def pose_frames():
                for f in hands:
                    pts = [np.concatenate([h.landmarks[:, :2], np.ones((21, 1), np.float32)], 1) for h in f]
                    yield render_frame(H, W, None, pts)
        else:

            def pose_frames():
                for kp in body:
                    yield render_frame(H, W, wholebody_to_body(kp), [kp[s] for s in WHOLEBODY_HANDS])

        write_video(tmp / "src_pose.mp4", pose_frames(), fps=fps)
        Image.fromarray(found_ref[0] if reference_frame is not None else ref).save(tmp / "src_ref.png")
        meta = {"self_reenactment": reference_frame is not None, "built_by": "ipa cases build",
                "driving": str(driving), "reference": None if reference is None else str(reference),
                "keypoints": None if keypoints is None else str(keypoints), "source_fps": src_fps,
                "frames": n, "fps": fps, "height": H, "width": W, "face_size": data.face_size}  # fmt: skip
        if reference_frame is not None:
            meta["reference_frame"] = reference_frame
        atomic_write_json(tmp / META, meta)
        row = probe_case(tmp, data)
        if not row["ok"]:
            raise BuildError(f"{driving}: the built case is refused: {row['error']}")
    row.update(case_id=out_dir.name, path=str(out_dir))
    return row


# ---- many pairs ------------------------------------------------------------------------

def case_ids(drivings: list) -> list[str]:
    """Case ids from the driving files' stems, in order, made unique with -2, -3, ..."""
    ids: list[str] = []
    for d in drivings:
        stem = Path(d).stem.lstrip(".") or "case"
        cid, k = stem, 2
        while cid in ids:
            cid, k = f"{stem}-{k}", k + 1
        ids.append(cid)
    return ids


def build_cases(drivings: list, out: str | os.PathLike, data, *, references: list | None = None,
                reference_frame: int | None = None, keypoints: list | None = None,
                hand_model: str | None = None, progress: bool = True) -> dict:  # fmt: skip
    """One case per (driving, reference) pair under `out`, in order.

    Raises InputError before building anything when the lists do not pair up. A bad pair is
    logged and skipped; returns {given, processed, failed, cases: [row], errors: [{...}]}.
    """
    from tqdm import tqdm

    from ipa_lib.data.hands.landmarker import HandDetector

    drivings, references = pair_up(drivings, references, reference_frame, keypoints)
    ids = case_ids(drivings)
    cases, errors = [], []
    with HandDetector(hand_model) as detector:
        for k, (d, cid) in enumerate(tqdm(list(zip(drivings, ids)), desc="cases", unit="case", disable=not progress)):
            ref = references[k] if references is not None else None
            try:
                row = build_case(d, Path(out) / cid, data, detector, reference=ref, reference_frame=reference_frame,
                                 keypoints=None if keypoints is None else keypoints[k])  # fmt: skip
                cases.append(row)
            except (InputError, OSError) as err:
                pair = f"driving {d}, " + (f"reference {ref}" if ref is not None else f"reference frame {reference_frame}")
                log.warning("case %s (%s) not built: %s", cid, pair, err)
                errors.append({"case_id": cid, "driving": d, "reference": ref, "error": str(err)})
    return {"given": len(drivings), "processed": len(cases), "failed": len(errors), "out": str(out),
            "cases": cases, "errors": errors}  # fmt: skip


def pair_up(drivings: list, references: list | None, reference_frame: int | None,
            keypoints: list | None) -> tuple[list[str], list[str] | None]:  # fmt: skip
    """Check that the lists pair up (InputError naming the counts); (drivings, references or None)."""
    drivings = [str(d) for d in drivings or []]
    if not drivings:
        raise InputError("--driving: no driving videos given")
    if reference_frame is None:
        references = [str(r) for r in references or []]
        if len(references) != len(drivings):
            raise InputError(f"--driving has {len(drivings)} videos but --reference has {len(references)} images; "
                             "give one reference per driving video (or --reference-frame N)")  # fmt: skip
    elif references:
        raise InputError("give --reference images or --reference-frame N, not both")
    if keypoints is not None and len(keypoints) != len(drivings):
        raise InputError(f"--driving has {len(drivings)} videos but --keypoints has {len(keypoints)} files; "
                         "give one keypoints file per driving video")  # fmt: skip
    return drivings, (references if reference_frame is None else None)
