"""Real data as Wan2.2-Animate cases: one folder per input, in the layout its preprocessing writes.

A case folder (`preprocess_data.py` output, or `ipa cases build`):
    src_ref.png    the reference image (identity, appearance)             always
    src_pose.mp4   the rendered skeleton video (the driving motion)       always
    src_face.mp4   square face crops of the driver, frame-aligned         always
    src_bg.mp4     the scene to insert the character into                 replacement mode
    src_mask.mp4   where the character goes (white = 1)                   replacement mode
    driving.mp4    the raw driving video, frame-aligned with src_pose     optional
    hands.json     the driver's hands per frame of src_pose (below)       optional
    case.json      {"self_reenactment": bool, "reference_frame": N, ...}  optional
A dataset (`data.cases`) is a folder of case folders; the case id is the folder name.

hands.json: {"width": W, "height": H, "fps": f, "frames": [[hand, ...], ...]}, one list per
frame of src_pose.mp4, each hand {"landmarks": [[x, y, z] x 21] pixels of a W x H frame in
MediaPipe's layout, "handedness": "Left" | "Right" (MediaPipe's mirrored label), "score": s}.

A self-reenactment case (`case.json` "self_reenactment": true, written by
`ipa cases build --reference-frame N`) has its reference taken from its own driving video, so
`driving.mp4` is the ground truth of the animation (TikTok-benchmark protocol).

Every clip is taken at `data.height` x `data.width`, `data.frames` frames at `data.fps`:
frame i of the case is source frame round(i * source_fps / data.fps), so a longer video is
sampled and one with too few frames is refused (`CaseError` names the case and the problem).
What the stock `WanAnimatePipeline` accepts is not refused: any video length that covers the
clip, a reference of another size (resized), face crops of any square size (resized).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np

from ipa_lib.core.errors import InputError

REQUIRED = ("src_ref.png", "src_pose.mp4", "src_face.mp4")
REPLACE = ("src_bg.mp4", "src_mask.mp4")
DRIVING, HANDS, META = "driving.mp4", "hands.json", "case.json"
SPLITS = ("train", "val", "test")


class CaseError(InputError):
    """A case that cannot be used; the message names the case and the problem."""

    def __init__(self, case: str | os.PathLike, problem: str) -> None:
        self.case, self.problem = str(case), problem
        super().__init__(f"case {case}: {problem}")


# ---- discovery and split ---------------------------------------------------------------

def list_cases(folder: str | os.PathLike) -> list[Path]:
    """The case folders of a dataset (sorted by id); hidden entries and plain files are skipped."""
    root = Path(folder)
    if not root.is_dir():
        raise InputError(f"data.cases: {root}: not a folder (a folder of case folders: src_ref.png, src_pose.mp4, ...)")
    cases = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not cases:
        raise InputError(f"data.cases: {root}: no case folders in it (each case is a folder with {', '.join(REQUIRED)})")
    return cases


def _unit(case_id: str) -> float:
    """A case id's fixed position in [0, 1) (sha256), so a case keeps its split as others come and go."""
    return int(hashlib.sha256(case_id.encode()).hexdigest()[:15], 16) / 16**15


def split_cases(case_ids: list[str], val_fraction: float, test_fraction: float) -> dict[str, str]:
    """Case id -> "train" | "val" | "test", deterministic by id.

    Each id lands by its hash position: [0, test) test, [test, test + val) val, the rest
    train. Then the guarantees: with 2 or more cases at least one trains and one is tested;
    with 3 or more and val_fraction > 0, one is validated. A guarantee takes the case whose
    position is nearest to the split it joins, from the split that can spare one.
    """
    ids = sorted(set(case_ids))
    if len(ids) != len(case_ids):
        raise InputError(f"data.cases: duplicate case ids in {sorted(case_ids)}")
    u = {c: _unit(c) for c in ids}
    out = {c: "test" if u[c] < test_fraction else "val" if u[c] < test_fraction + val_fraction else "train" for c in ids}

    def members(split: str) -> list[str]:
        return [c for c in ids if out[c] == split]

    def take(split: str, donors: tuple[str, ...], key) -> None:
        pool = [c for d in donors if len(members(d)) > (1 if d in ("train", "test") else 0) for c in members(d)]
        if pool:
            out[min(pool, key=key)] = split

    if len(ids) >= 2 and not members("train"):
        take("train", ("val", "test"), key=lambda c: -u[c])
    if len(ids) >= 2 and not members("test"):
        take("test", ("val", "train"), key=lambda c: u[c])
    if len(ids) >= 3 and val_fraction > 0 and not members("val"):
        take("val", ("train", "test"), key=lambda c: abs(u[c] - test_fraction - val_fraction / 2))
    return out


def case_seed(case_id: str, base_seed: int, k: int) -> int:
    """Generator seed of clip k of a case: fixed by (case id, base seed, k) alone, so a clip is the
    same whatever the other cases, the shard count or the order."""
    h = int(hashlib.sha256(case_id.encode()).hexdigest()[:8], 16)
    return (h + base_seed * 1000 + k) % 2**31


# ---- probing (one row per case, never raises for a bad case) ----------------------------

def needed_source_frames(frames: int, fps: float, source_fps: float) -> int:
    """How many source frames cover `frames` frames at `fps` from a video at `source_fps`."""
    return source_index(frames - 1, fps, source_fps) + 1


def source_index(i: int, fps: float, source_fps: float) -> int:
    return int(math.floor(i * source_fps / fps + 0.5))


def _video_info(path: Path) -> dict:
    from ipa_lib.data.video import VideoError, probe

    try:
        info = probe(path, decode=True)  # "decodable" means every frame decoded
    except VideoError as err:
        raise CaseError(path.parent.name, f"{path.name}: {err.problem}") from None
    if info["kind"] != "video":
        raise CaseError(path.parent.name, f"{path.name}: a still image, not a video")
    return info


def probe_case(case_dir: str | os.PathLike, data) -> dict:
    """A row describing the case against `data` (DataConfig): ok, error, sizes, frames, fps, mode.

    Checks, in order (the first failure is the row's error): required files present (and both
    replacement files or neither), every video decodes, src_pose is height x width multiples of
    16, fps known, every video covers `data.frames` frames at `data.fps`, face crops square,
    the reference image decodes, hands.json and case.json parse.
    """
    p = Path(case_dir)
    row: dict = {"case_id": p.name, "path": str(p), "mode": None, "pose_frames": None, "pose_fps": None,
                 "height": None, "width": None, "face_size": None, "needed_frames": None,
                 "has_driving": (p / DRIVING).is_file(), "has_hands": (p / HANDS).is_file(),
                 "self_reenactment": False, "ok": False, "error": None}  # fmt: skip
    try:
        missing = [f for f in REQUIRED if not (p / f).is_file()]
        if missing:
            raise CaseError(p.name, f"missing {', '.join(missing)} (a case needs {', '.join(REQUIRED)})")
        have_replace = [f for f in REPLACE if (p / f).is_file()]
        if len(have_replace) == 1:
            other = next(f for f in REPLACE if f not in have_replace)
            raise CaseError(p.name, f"has {have_replace[0]} but not {other}: replacement mode needs both")
        row["mode"] = "replace" if have_replace else "animate"
        pose = _video_info(p / "src_pose.mp4")
        row.update(pose_frames=pose["frames"], pose_fps=pose["fps"], height=pose["height"], width=pose["width"])
        if pose["height"] % 16 or pose["width"] % 16:
            raise CaseError(p.name, f"src_pose.mp4 is {pose['width']}x{pose['height']} pixels; Wan-Animate needs "
                                    "height and width divisible by 16")  # fmt: skip
        if not pose["fps"] or pose["fps"] <= 0:
            raise CaseError(p.name, "src_pose.mp4: frame rate unknown (no fps in the container)")
        need = needed_source_frames(data.frames, data.fps, pose["fps"])
        row["needed_frames"] = need
        videos = ["src_pose.mp4", "src_face.mp4", *have_replace] + ([DRIVING] if row["has_driving"] else [])
        for name in videos:
            info = pose if name == "src_pose.mp4" else _video_info(p / name)
            if info["frames"] < need:
                raise CaseError(p.name, f"{name} has {info['frames']} frames at {info['fps']:g} fps; "
                                        f"{data.frames} frames at data.fps={data.fps:g} need {need}")  # fmt: skip
            if name == "src_face.mp4":
                row["face_size"] = info["width"]
                if info["width"] != info["height"]:
                    raise CaseError(p.name, f"src_face.mp4 is {info['width']}x{info['height']}: face crops must be square")
        _read_reference(p)
        if row["has_hands"]:
            read_hands(p / HANDS, frames=need)
        meta = read_meta(p)
        row["self_reenactment"] = bool(meta.get("self_reenactment"))
        if row["self_reenactment"] and not row["has_driving"]:
            raise CaseError(p.name, "case.json says self_reenactment but there is no driving.mp4 (the ground truth)")
        row["ok"] = True
    except CaseError as err:
        row["error"] = err.problem
    return row


def read_meta(case_dir: Path) -> dict:
    path = Path(case_dir) / META
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CaseError(Path(case_dir).name, f"{META}: not valid JSON ({err})") from None
    if not isinstance(meta, dict):
        raise CaseError(Path(case_dir).name, f"{META}: must be a JSON object")
    return meta


def _read_reference(case_dir: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(case_dir / "src_ref.png") as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, UnidentifiedImageError) as err:
        raise CaseError(case_dir.name, f"src_ref.png: not a readable image ({err})") from None


def read_hands(path: Path, frames: int | None = None) -> dict:
    """Parse and check hands.json; returns it (see module docstring for the format)."""
    case = path.parent.name
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CaseError(case, f"{HANDS}: not valid JSON ({err})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("frames"), list):
        raise CaseError(case, f'{HANDS}: expected {{"width", "height", "frames": [[hand, ...], ...]}}')
    for key in ("width", "height"):
        if not isinstance(doc.get(key), (int, float)) or doc[key] <= 0:
            raise CaseError(case, f"{HANDS}: '{key}' must be a positive number (the frame size of the landmarks)")
    if frames is not None and len(doc["frames"]) < frames:
        raise CaseError(case, f"{HANDS}: {len(doc['frames'])} frames, the clip needs {frames}")
    for f, hands in enumerate(doc["frames"]):
        for h, hand in enumerate(hands if isinstance(hands, list) else [None]):
            lm = hand.get("landmarks") if isinstance(hand, dict) else None
            if not (isinstance(lm, list) and len(lm) == 21 and all(isinstance(v, list) and len(v) >= 2 for v in lm)):
                raise CaseError(case, f"{HANDS}: frame {f} hand {h}: 'landmarks' must be 21 [x, y(, z)] points")
    return doc


# ---- loading ---------------------------------------------------------------------------

def _resize(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    import cv2

    if frame.shape[:2] == (height, width):
        return np.ascontiguousarray(frame)
    interp = cv2.INTER_AREA if frame.shape[0] * frame.shape[1] > height * width else cv2.INTER_LINEAR
    return cv2.resize(frame, (width, height), interpolation=interp)


def read_clip(path: Path, frames: int, fps: float, height: int, width: int) -> np.ndarray:
    """`frames` frames at `fps` from a video, resized: (frames, height, width, 3) uint8.

    Streams the video (one frame in memory besides the kept ones), so a long video is never
    read whole; stops decoding after the last frame it needs.
    """
    from ipa_lib.data.video import header_fps, iter_frames

    src_fps = header_fps(path)
    index = [source_index(i, fps, src_fps) for i in range(frames)]  # several clip frames may share one
    needed, kept = set(index), {}
    gen = iter_frames(path)
    try:
        for n, frame in enumerate(gen):
            if n in needed:
                kept[n] = _resize(frame, height, width)
            if n >= index[-1]:
                break
    finally:
        gen.close()
    missing = [i for i, j in enumerate(index) if j not in kept]
    if missing:
        raise CaseError(path.parent.name, f"{path.name}: ended before clip frame {missing[0]} "
                                          f"(source frame {index[missing[0]]})")  # fmt: skip
    out = [kept[j] for j in index]
    return np.stack(out)


def hands_keypoints(doc: dict, frames: int, fps: float, source_fps: float, height: int, width: int) -> np.ndarray:
    """hands.json -> the driver's hands at the clip's frames, (frames, 2, 21, 3) [x, y, score]
    in pixels of a height x width clip; slot 0 = the person's left hand (ipa_lib.data.hands.masks)."""
    from ipa_lib.data.hands.landmarker import Hand
    from ipa_lib.data.hands.masks import hands_to_keypoints

    sx, sy = width / float(doc["width"]), height / float(doc["height"])
    per_frame = []
    for i in range(frames):
        hands = doc["frames"][source_index(i, fps, source_fps)] or []
        objs = []
        for h in hands:
            lm = np.array([v[:3] if len(v) >= 3 else [*v, 0.0] for v in h["landmarks"]], np.float32)
            lm[:, 0] *= sx
            lm[:, 1] *= sy
            objs.append(Hand(float(h.get("score", 1.0)), str(h.get("handedness", "Right")), lm, np.zeros((21, 3), np.float32)))
        per_frame.append(objs)
    return hands_to_keypoints(per_frame)


def load_case(case_dir: str | os.PathLike, data) -> dict[str, np.ndarray]:
    """The case's conditioning at the clip's size and frames (uint8 unless noted):

    reference (H, W, 3), pose (F, H, W, 3), face (F, S, S, 3) with S = data.face_size,
    hand_keypoints (F, 2, 21, 3) float32 (zeros without hands.json), and when present
    background (F, H, W, 3), replace_mask (F, H, W) float32 in [0, 1], driving (F, H, W, 3).
    """
    from ipa_lib.data.video import header_fps

    p = Path(case_dir)
    F, H, W, fps = data.frames, data.height, data.width, data.fps
    out = {
        "reference": _resize(_read_reference(p), H, W),
        "pose": read_clip(p / "src_pose.mp4", F, fps, H, W),
        "face": read_clip(p / "src_face.mp4", F, fps, data.face_size, data.face_size),
    }
    if (p / "src_bg.mp4").is_file():
        out["background"] = read_clip(p / "src_bg.mp4", F, fps, H, W)
        mask = read_clip(p / "src_mask.mp4", F, fps, H, W)
        out["replace_mask"] = (mask.astype(np.float32).mean(-1) / 255.0 > 0.5).astype(np.float32)
    if (p / DRIVING).is_file():
        out["driving"] = read_clip(p / DRIVING, F, fps, H, W)
    if (p / HANDS).is_file():
        out["hand_keypoints"] = hands_keypoints(read_hands(p / HANDS), F, fps, header_fps(p / "src_pose.mp4"), H, W)
    else:
        out["hand_keypoints"] = np.zeros((F, 2, 21, 3), np.float32)
    return out


# ---- the dataset -----------------------------------------------------------------------

def scan(params, report_stem: str | os.PathLike | None = None) -> list[dict]:
    """Probe every case of `params.data.cases`, check the table with Great Expectations and
    attach each case's split. Bad cases are reported by name (logged, and in the report) and
    skipped; the batch goes on. Raises InputError when no case is usable."""
    import logging

    from ipa_lib.data.checks import check_cases

    data = params.data
    rows = [probe_case(c, data) for c in list_cases(data.cases)]
    splits = split_cases([r["case_id"] for r in rows if r["ok"]], data.val_fraction, data.test_fraction)
    for r in rows:
        r["split"] = splits.get(r["case_id"])
    bad = [r for r in rows if not r["ok"]]
    for r in bad:
        logging.getLogger(__name__).warning("skipping case %s: %s", r["case_id"], r["error"])
    check_cases(rows, data, report_stem)
    if len(bad) == len(rows):
        lines = "\n".join(f"  {r['case_id']}: {r['error']}" for r in bad)
        raise InputError(f"data.cases: {data.cases}: none of {len(rows)} cases is usable\n{lines}")
    return rows


def cases_of(rows: list[dict], split: str) -> list[dict]:
    """The usable cases of one split, in id order."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return [r for r in rows if r["ok"] and r["split"] == split]
