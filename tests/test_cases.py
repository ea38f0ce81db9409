"""Cases (ipa_lib.data.cases): the split by case id, the checks every case gets, loading at
clip size, and each bad input named with its case while the batch goes on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hands_fixtures import photo, zoom_pan_clip
from ipa_lib.core.config import parse_params
from ipa_lib.core.errors import InputError
from ipa_lib.data import cases as C

DATA = {"height": 64, "width": 64, "frames": 17, "fps": 16, "face_size": 16}


def write_case(folder: Path, frames: int = 40, size: tuple[int, int] = (128, 128), fps: float = 30.0,
               replace: bool = False, hands: bool = False) -> Path:
    """A case from a pan over a real photo: src_ref.png, src_pose.mp4, src_face.mp4 (+ driving.mp4)."""
    from PIL import Image

    from ipa_lib.data.video import write_video

    folder.mkdir(parents=True)
    import cv2

    h, w = size
    square = photo("428")[:, 200:560]  # 360 x 360 around both hands
    clip = np.stack([cv2.resize(f, (w, h), interpolation=cv2.INTER_AREA) for f in zoom_pan_clip(square, frames, 0.005, 1)])
    Image.fromarray(clip[0]).save(folder / "src_ref.png")
    write_video(folder / "src_pose.mp4", clip, fps)
    write_video(folder / "src_face.mp4", clip[:, :32, :32], fps)
    write_video(folder / "driving.mp4", clip, fps)
    if replace:
        write_video(folder / "src_bg.mp4", clip[:, ::-1], fps)
        write_video(folder / "src_mask.mp4", np.where(np.arange(w)[None, None, :, None] < w // 2, 255, 0).astype(np.uint8)
                    * np.ones((frames, h, 1, 3), np.uint8), fps)
    if hands:
        from ipa_lib.data.hands.landmarker import HandDetector

        with HandDetector() as det:
            found = det.detect_frames(clip, fps)
        doc = {"width": w, "height": h, "fps": fps,
               "frames": [[{"landmarks": hand.landmarks.tolist(), "handedness": hand.handedness, "score": hand.score}
                           for hand in f] for f in found]}
        (folder / "hands.json").write_text(json.dumps(doc))
    return folder


def params_for(root: Path, **data):
    return parse_params({"data": {"cases": str(root), **DATA, **data}, "backend": {"name": "wan-animate"}})


def test_split_is_deterministic_and_keeps_a_train_and_a_test_case():
    ids = [f"case-{i}" for i in range(40)]
    a = C.split_cases(ids, 0.2, 0.2)
    assert a == C.split_cases(list(reversed(ids)), 0.2, 0.2)
    counts = {s: sum(v == s for v in a.values()) for s in C.SPLITS}
    assert all(counts[s] > 0 for s in C.SPLITS) and sum(counts.values()) == 40
    # a case keeps its split when others are added (positions are per id)
    more = C.split_cases(ids + [f"new-{i}" for i in range(10)], 0.2, 0.2)
    assert all(more[c] == a[c] for c in ids)
    for n in range(2, 8):
        for salt in ("x", "y", "z"):
            s = C.split_cases([f"{salt}{i}" for i in range(n)], 0.2, 0.2)
            assert "train" in s.values() and "test" in s.values(), s
            if n >= 3:
                assert "val" in s.values(), s
    assert C.split_cases(["only"], 0.2, 0.2) in ({"only": "train"}, {"only": "val"}, {"only": "test"})
    with pytest.raises(InputError, match="duplicate"):
        C.split_cases(["a", "a"], 0.2, 0.2)


def test_good_case_probes_ok_and_loads_at_clip_size(tmp_path):
    root = tmp_path / "cases"
    write_case(root / "anim")
    write_case(root / "repl", replace=True)
    p = params_for(root)
    rows = {r["case_id"]: r for r in (C.probe_case(c, p.data) for c in C.list_cases(root))}
    assert rows["anim"]["ok"] and rows["anim"]["mode"] == "animate", rows["anim"]
    assert rows["repl"]["ok"] and rows["repl"]["mode"] == "replace", rows["repl"]
    # 17 frames at 16 fps from a 30 fps video: source frames 0, 2, 4, ... up to round(16 * 30 / 16) = 30
    assert rows["anim"]["needed_frames"] == 31
    arrays = C.load_case(root / "repl", p.data)
    assert arrays["reference"].shape == (64, 64, 3) and arrays["pose"].shape == (17, 64, 64, 3)
    assert arrays["face"].shape == (17, 16, 16, 3) and arrays["driving"].shape == (17, 64, 64, 3)
    assert arrays["background"].shape == (17, 64, 64, 3)
    assert arrays["replace_mask"].shape == (17, 64, 64) and set(np.unique(arrays["replace_mask"])) == {0.0, 1.0}
    assert arrays["hand_keypoints"].shape == (17, 2, 21, 3) and not arrays["hand_keypoints"].any()
    # frame i of the clip is source frame round(i * 30 / 16): the driving video's frame 16 is clip frame 8 (15 -> 16)
    from ipa_lib.data.video import read_video

    src = read_video(root / "repl" / "driving.mp4")
    import cv2

    want = cv2.resize(src[C.source_index(8, 16, 30)], (64, 64), interpolation=cv2.INTER_AREA)
    assert np.abs(arrays["driving"][8].astype(int) - want.astype(int)).max() <= 1


def test_hands_json_maps_to_clip_pixels(tmp_path):
    root = tmp_path / "cases"
    write_case(root / "h", size=(256, 256), hands=True)
    p = params_for(root)
    doc = C.read_hands(root / "h" / "hands.json")
    assert any(doc["frames"]), "the pan over photo 428 shows hands"
    kp = C.load_case(root / "h", p.data)["hand_keypoints"]
    shown = kp[..., 2].max(axis=-1) > 0
    assert shown.any()
    xy = kp[..., :2][kp[..., 2] > 0]
    assert xy.min() >= -8 and xy.max() <= 72  # pixels of the 64 x 64 clip (landmarks may leave the frame a little)


BAD = {
    "no-face": ("missing src_face.mp4", lambda d: (d / "src_face.mp4").unlink()),
    "undecodable": ("src_pose.mp4", lambda d: (d / "src_pose.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not a video")),
    "short": ("has 20 frames.*need 31", None),
    "odd-size": ("not|divisible by 16", None),
    "half-replace": ("replacement mode needs both", lambda d: (d / "src_bg.mp4").write_bytes((d / "src_pose.mp4").read_bytes())),
    "bad-hands": ("hands.json: not valid JSON", lambda d: (d / "hands.json").write_text("{")),
    "non-square-face": ("face crops must be square", None),
}


@pytest.fixture()
def mixed_cases(tmp_path):
    """Three good cases and one of each bad kind."""
    from ipa_lib.data.video import write_video

    root = tmp_path / "cases"
    for name in ("good-a", "good-b", "good-c"):
        write_case(root / name)
    for name, (_, spoil) in BAD.items():
        if name == "short":
            write_case(root / name, frames=20)
        elif name == "odd-size":
            write_case(root / name, size=(72, 72))
        else:
            d = write_case(root / name)
            if spoil:
                spoil(d)
            if name == "non-square-face":
                write_video(d / "src_face.mp4", np.zeros((40, 32, 48, 3), np.uint8), 30)
    return root


def test_each_bad_case_is_named_and_the_batch_goes_on(mixed_cases, tmp_path):
    p = params_for(mixed_cases)
    rows = C.scan(p, tmp_path / "report")
    by_id = {r["case_id"]: r for r in rows}
    assert len(rows) == 3 + len(BAD)  # processed + failed = given
    assert sum(r["ok"] for r in rows) == 3
    import re

    for name, (pattern, _) in BAD.items():
        assert not by_id[name]["ok"] and re.search(pattern, by_id[name]["error"]), (name, by_id[name]["error"])
        assert by_id[name]["split"] is None
    assert {by_id[n]["split"] for n in ("good-a", "good-b", "good-c")} == {"train", "val", "test"}
    # the Great Expectations report names every refused case
    report = json.loads((tmp_path / "report.json").read_text())
    failed = {f["column"]: f for f in report["failures"]}
    assert set(failed) == {"ok"} and set(failed["ok"]["sample_ids"]) == set(BAD)
    assert "odd-size" in (tmp_path / "report.md").read_text()


def test_no_usable_or_no_case_at_all_is_an_error(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "README.md").write_text("no cases here\n")
    with pytest.raises(InputError, match="no case folders"):
        C.scan(params_for(empty))
    with pytest.raises(InputError, match="not a folder"):
        C.scan(params_for(tmp_path / "missing"))
    root = tmp_path / "bad"
    d = write_case(root / "x")
    (d / "src_pose.mp4").unlink()
    with pytest.raises(InputError, match="none of 1 cases is usable\n  x: missing src_pose.mp4"):
        C.scan(params_for(root))


def test_data_params_refuse_sizes_wan_cannot_take():
    from ipa_lib.core.config import ConfigError

    with pytest.raises(ConfigError, match="data.height: .*multiple of 16.*nearest: 64 or 80"):
        parse_params({"data": {"height": 72}})
    with pytest.raises(ConfigError, match="data.frames: .*4k\\+1"):
        parse_params({"data": {"frames": 16}})
    with pytest.raises(ConfigError, match="val_fraction \\+ test_fraction"):
        parse_params({"data": {"val_fraction": 0.5, "test_fraction": 0.5}})
    with pytest.raises(ConfigError, match="gate.scorer=toy"):
        parse_params({"backend": {"name": "wan-animate"}, "gate": {"scorer": "toy"}})
    p = parse_params({"backend": {"name": "wan-animate"}})
    assert p.on_cases and p.gate_scorer == "mediapipe" and p.promote_rule.primary_metric == "hand_ssim"
    toy = parse_params({})
    assert not toy.on_cases and toy.gate_scorer == "toy" and toy.promote_rule.primary_metric == "hand_psnr"


def test_sample_stage_on_an_empty_cases_folder_exits_2(tmp_path, params_file):
    empty = tmp_path / "cases"
    empty.mkdir()
    pf = params_file(["backend.name=wan-animate", f"data.cases={empty}", "tracking.enabled=false"])
    r = subprocess.run([sys.executable, "-m", "ipa_lib.cli", "sample", "--params", str(pf), "--out", str(tmp_path / "s")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert f"data.cases: {empty}: no case folders" in r.stderr
