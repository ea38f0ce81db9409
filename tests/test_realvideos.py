"""Indexing a folder of real videos: every input counted, bad ones reported per file, the batch goes on."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hands_fixtures import encode, real_dir

from ipa_lib.data.realvideos import index_videos
from ipa_lib.data.video import write_video

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("videos")
    rng = np.random.default_rng(0)
    write_video(d / "good.mp4", rng.integers(0, 256, (9, 32, 48, 3), dtype=np.uint8), fps=16)
    write_video(d / "same.mp4", np.zeros((5, 16, 16, 3), np.uint8), fps=8)
    write_video(d / "same.mkv", np.zeros((5, 16, 16, 3), np.uint8), fps=8)  # same stem, other container
    write_video(d / "one_frame.mp4", np.zeros((1, 16, 16, 3), np.uint8), fps=8)
    (d / "nested").mkdir()
    write_video(d / "nested" / "clip 1.mp4", np.zeros((5, 20, 20, 3), np.uint8), fps=8)
    encode(d / "gray.mkv", np.zeros((3, 16, 16), np.uint8), "gray", "ffv1")
    encode(d / "rgba.mov", np.zeros((3, 16, 16, 4), np.uint8), "rgba", "png")
    src = (real_dir() / "video.avi").read_bytes()
    (d / "truncated.avi").write_bytes(src[: len(src) // 3])
    (d / "corrupt.mp4").write_bytes(os.urandom(5000))
    (d / "readme.txt").write_text("not a video\n")
    (d / "empty.mp4").write_bytes(b"")
    (d / "photo.jpg").write_bytes((real_dir() / "COCO_val2014_000000000536.jpg").read_bytes())
    (d / "dangling.mp4").symlink_to(d / "deleted.mp4")
    return d


BAD = {
    "truncated.avi": "corrupt or truncated",
    "corrupt.mp4": "not a decodable video",
    "readme.txt": "not a decodable video",
    "empty.mp4": "empty file",
    "photo.jpg": "still image",
    "dangling.mp4": "no such file",
}
GOOD = {"good.mp4": (9, 32, 48), "same.mp4": (5, 16, 16), "same.mkv": (5, 16, 16), "one_frame.mp4": (1, 16, 16),
        "nested/clip 1.mp4": (5, 20, 20), "gray.mkv": (3, 16, 16), "rgba.mov": (3, 16, 16)}  # fmt: skip


def test_every_input_counted(folder, tmp_path):
    out = tmp_path / "samples"
    rows, summary = index_videos(folder, out)
    assert summary["given"] == len(BAD) + len(GOOD) == len(rows)
    assert summary["processed"] == len(GOOD) and summary["failed"] == len(BAD)
    assert summary["processed"] + summary["failed"] == summary["given"]
    assert json.loads((out / "index.json").read_text()) == summary
    failed = {Path(f["path"]).name: f["error"] for f in summary["failures"]}
    assert set(failed) == set(BAD)
    for name, problem in BAD.items():
        assert problem in failed[name], (name, failed[name])
    by_video = {str((out / r["video"]).resolve().relative_to(folder.resolve())): r for r in rows}
    for name, (frames, h, w) in GOOD.items():
        r = by_video[name]
        assert r["decodable"] and r["error"] is None
        assert (r["num_frames"], r["height"], r["width"]) == (frames, h, w)
        assert (out / r["video"]).exists()  # relative to the samples folder
    ids = [r["sample_id"] for r in rows]
    assert len(set(ids)) == len(ids)
    assert {"same.mp4", "same.mkv", "nested__clip_1", "good"} <= set(ids)


def test_manifest_check_names_the_bad_files(folder, tmp_path):
    from ipa_lib.data.checks import validate_manifest

    rows, _ = index_videos(folder, tmp_path)
    df = pd.DataFrame(rows)
    df["hand_score"] = [0.9 if r["decodable"] else None for r in rows]
    report = validate_manifest(df, num_frames=None, height=None, width=None, min_kept=1, threshold=0.5,
                               score_columns=["hand_score"])  # fmt: skip
    assert not report.success
    dec = next(f for f in report.failures if f["column"] == "decodable")
    bad_ids = {r["sample_id"] for r in rows if not r["decodable"]}
    assert set(dec["sample_ids"]) == bad_ids and len(dec["rows"]) == len(BAD)
    # the rest of the suite is happy: errors present exactly where decoding failed
    assert [f["column"] for f in report.failures] == ["decodable"]


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="videos folder not found"):
        index_videos(tmp_path / "nope", tmp_path)
