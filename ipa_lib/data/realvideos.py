"""Index a folder of real videos into sample-manifest rows, one bad file never stops the batch.

Every regular file under the folder (recursively, sorted; dangling links included) is one
input and becomes one row: decodable rows carry frames/size/fps from a full decode, the
others `decodable=False` and the reason in `error`. The summary counts every input:
processed + failed = given.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from ipa_lib.data.video import VideoError, probe

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _sample_ids(rel_paths: list[Path]) -> list[str]:
    """Ids from relative paths without suffix ('a/b.mp4' -> 'a__b'); suffix kept where stems collide."""
    def clean(s: str) -> str:
        return _UNSAFE.sub("_", s.replace(os.sep, "__")).strip("_") or "video"

    base = [clean(str(p.with_suffix(""))) for p in rel_paths]
    ids = [clean(str(p)) if base.count(b) > 1 else b for p, b in zip(rel_paths, base)]
    seen: dict[str, int] = {}
    out = []
    for i in ids:  # last resort for names that only differ in unsafe characters
        seen[i] = seen.get(i, 0) + 1
        out.append(i if seen[i] == 1 else f"{i}-{seen[i]}")
    return out


def index_videos(folder: str | os.PathLike, out_dir: str | os.PathLike) -> tuple[list[dict], dict]:
    """Rows for every file under `folder` (paths relative to `out_dir`) and a summary.

    Row keys: sample_id, video, pose_id (= sample_id: a real video is its own motion),
    seed (0), num_frames, height, width, fps, decodable, error. Summary: given, processed,
    failed, failures [{path, error}]. Also writes the summary to `out_dir/index.json`.
    """
    folder, out_dir = Path(folder), Path(out_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: videos folder not found (or not a folder)")
    files = sorted(p for p in folder.rglob("*") if p.is_symlink() or not p.is_dir())
    ids = _sample_ids([p.relative_to(folder) for p in files])
    rows, failures = [], []
    for path, sample_id in zip(files, ids):
        row = {"sample_id": sample_id, "video": os.path.relpath(path, out_dir), "pose_id": sample_id,
               "seed": 0, "num_frames": None, "height": None, "width": None, "fps": None,
               "decodable": False, "error": None}  # fmt: skip
        try:
            info = probe(path, decode=True)  # a full decode: "decodable" means every frame decoded
            if info["kind"] != "video":
                raise VideoError(path, "a still image, not a video")
            row.update(num_frames=info["frames"], height=info["height"], width=info["width"], fps=info["fps"],
                       decodable=True)  # fmt: skip
        except (VideoError, OSError) as err:  # OSError: races (file removed), odd filesystems
            problem = err.problem if isinstance(err, VideoError) else str(err)
            row["error"] = problem
            failures.append({"path": str(path), "error": problem})
        rows.append(row)
    processed = sum(r["decodable"] for r in rows)
    summary = {"given": len(files), "processed": processed, "failed": len(failures), "failures": failures}
    if summary["processed"] + summary["failed"] != summary["given"]:  # every input counted once
        raise AssertionError(f"index bookkeeping: {summary}")
    out_dir.mkdir(parents=True, exist_ok=True)
    from ipa_lib.core.io import atomic_write_text

    atomic_write_text(out_dir / "index.json", json.dumps(summary, indent=2) + "\n")
    return rows, summary
