"""`ipa hands detect PATH... [--json] [--model FILE]`: run the hand landmarker on images and videos.

--json prints one document:
    {"model": path, "inputs": [{"path", "ok", "error", "kind", "fps",
                                "frames": [{"index", "hands": [{"score", "handedness",
                                           "box": [x0, y0, x1, y1], "landmarks": [[x, y, z] x 21]}]}]}],
     "summary": {"given", "processed", "failed"}}
(pixels). Without it: a table, one row per input. A bad input is reported and the rest go on;
the exit code is 0 when every input was read, 1 when some failed, 2 when the model is missing.
"""

from __future__ import annotations

import json
import sys

from ipa_lib.data.hands.model_file import ModelFileError


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


def _table(doc: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"hand detection ({doc['summary']['processed']}/{doc['summary']['given']} read)")
    table.add_column("path", overflow="fold")  # wrapped, never cut: the path is the point
    for col in ("kind", "frames", "with hands", "hands", "mean score", "first hands / error"):
        table.add_column(col)
    for e in doc["inputs"]:
        if not e["ok"]:
            table.add_row(e["path"], e["kind"] or "-", "-", "-", "-", "-", f"[red]{e['error']}[/red]")
            continue
        hands = [h for f in e["frames"] for h in f["hands"]]
        with_hands = sum(bool(f["hands"]) for f in e["frames"])
        first = next((f["hands"] for f in e["frames"] if f["hands"]), [])
        desc = ", ".join(f"{h['handedness']} {h['score']:.2f}" for h in first)
        mean = f"{sum(h['score'] for h in hands) / len(hands):.2f}" if hands else "-"
        table.add_row(e["path"], e["kind"], str(len(e["frames"])), str(with_hands), str(len(hands)), mean,
                      desc or "no hands")  # fmt: skip
    Console().print(table)


def detect_main(paths: list[str], as_json: bool, model: str | None) -> int:
    """CLI body: print JSON or a table; exit code 0 all read, 1 some failed, 2 no model."""
    try:
        doc = detect(paths, model)
    except ModelFileError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if as_json:
        print(json.dumps(doc))
    else:
        _table(doc)
    return 0 if doc["summary"]["failed"] == 0 else 1
