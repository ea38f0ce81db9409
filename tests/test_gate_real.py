"""The gate stage on a folder of real videos with the MediaPipe scorer (params switch only):
hands in view score above a clip without hands, a broken file is reported and skipped."""

from __future__ import annotations

import json

import numpy as np

from hands_fixtures import hand_model, photo, real_dir, zoom_pan_clip  # noqa: F401 (fixture)


def test_gate_scores_real_videos_with_mediapipe(tiny, hand_model):
    from ipa_lib.stages.gate import gate
    from ipa_lib.stages.sample import sample
    from ipa_lib.data.video import iter_frames, write_video

    params, work = tiny
    videos = work / "videos"
    videos.mkdir()
    write_video(videos / "hands.mp4", zoom_pan_clip(photo("428"), 9), fps=10)
    street = []
    for i, frame in enumerate(iter_frames(real_dir() / "video.avi")):
        street.append(frame[::2, ::2])
        if i == 8:
            break
    write_video(videos / "street.mp4", np.stack(street), fps=10)
    (videos / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a video")

    params.sample.videos_dir = str(videos)
    params.gate.scorer = "mediapipe"
    params.gate.hand_landmarker = hand_model
    params.gate.threshold, params.gate.top_k, params.gate.min_kept = 0.3, 1, 1
    summary = sample(params, work / "samples", progress=False)
    assert summary["given"] == 3 and summary["failed"] == 1
    result = gate(params, work / "samples", work / "gated", progress=False)
    assert result["given"] == 3 and result["scored"] == 2 and result["kept"] == 1
    rows = {r["sample_id"]: r for r in map(json.loads, (work / "gated" / "manifest.jsonl").read_text().splitlines())}
    assert rows["broken"]["decodable"] is False and rows["broken"]["error"]
    assert rows["hands"]["kept"] and not rows["street"]["kept"]
    assert rows["hands"]["hand_score"] > rows["street"]["hand_score"]
