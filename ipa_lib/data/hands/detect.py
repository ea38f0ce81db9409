"""Hand detection over a batch of images and videos (what `ipa hands detect` runs).

`detect(paths)` returns one document:
    {"model": path, "inputs": [{"path", "ok", "error", "kind", "fps",
                                "frames": [{"index", "hands": [{"score", "handedness",
                                           "box": [x0, y0, x1, y1], "landmarks": [[x, y, z] x 21]}]}]}],
     "summary": {"given", "processed", "failed"}}
(pixels). A bad input is reported in its entry and the rest go on.
"""

from __future__ import annotations


def _detect_one(detector, path: str) -> dict:
    from ipa_lib.data.video import VideoError, header_fps, is_image, iter_frames

    entry: dict = {"path": path, "ok": False, "error": None, "kind": None, "fps": None, "frames": []}
    try:
        image = is_image(path)
        entry["kind"] = "image" if image else "video"
        if image:
            # stills (and each frame of a GIF) are independent pictures: IMAGE mode
            for i, frame in enumerate(iter_frames(path)):
                entry["frames"].append({"index": i, "hands": [h.to_json() for h in detector.detect_image(frame)]})
        else:
            fps = header_fps(path) or 25.0  # only spaces the VIDEO-mode timestamps
            entry["fps"] = fps
            frames = iter_frames(path)
            try:
                for i, hands in enumerate(detector.detect_clip(frames, fps)):
                    entry["frames"].append({"index": i, "hands": [h.to_json() for h in hands]})
            finally:
                frames.close()  # stops ffmpeg at once if detection failed midway
        entry["ok"] = True
    except VideoError as err:
        entry["error"] = err.problem
    except (OSError, ValueError, RuntimeError) as err:  # the batch goes on whatever one file does
        entry["error"] = f"{type(err).__name__}: {err}"
    return entry


def detect(paths: list[str], model: str | None = None) -> dict:
    """Detect hands in every path; the JSON document described in the module docstring."""
    from ipa_lib.data.hands.landmarker import HandDetector

    with HandDetector(model) as detector:
        inputs = [_detect_one(detector, p) for p in paths]
        model_path = detector.model_path
    ok = sum(e["ok"] for e in inputs)
    return {"model": model_path, "inputs": inputs,
            "summary": {"given": len(inputs), "processed": ok, "failed": len(inputs) - ok}}  # fmt: skip
