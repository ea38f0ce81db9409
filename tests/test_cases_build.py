"""`ipa cases build` / `ipa cases check` on real media: pans over COCO photos 428 and 536 (real
hands, MediaPipe VIDEO mode) and video.avi (no visible hands); the pose style against the
table of Wan2.2-Animate's preprocessing (`human_visualization.py`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hands_fixtures import PHOTOS, hand_model, photo, real_dir  # noqa: F401 (fixture)

REPO = Path(__file__).resolve().parents[1]
SMALL = ["data.height=128", "data.width=128", "data.frames=17", "data.fps=16", "data.face_size=32"]


def sets(model: str) -> list[str]:
    return [a for kv in [*SMALL, f"gate.hand_landmarker={model}"] for a in ("--set", kv)]


def data_params():
    from ipa_lib.core.config import parse_params

    return parse_params({"data": {"height": 128, "width": 128, "frames": 17, "fps": 16, "face_size": 32}}).data


def pan(key: str, n: int = 40, size: int = 256) -> np.ndarray:
    """A sideways pan of size x size crops over a photo: (n, size, size, 3)."""
    im = photo(key)
    h, w = im.shape[:2]
    y0 = (h - size) // 2
    return np.stack([im[y0 : y0 + size, int((w - size) * i / (n - 1)) :][:, :size] for i in range(n)])


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    from ipa_lib.data.video import iter_frames, write_video

    d = tmp_path_factory.mktemp("media")
    out = {"p428": write_video(d / "p428.mp4", pan("428"), fps=30), "p536": write_video(d / "p536.mp4", pan("536"), fps=30)}
    street = []
    for i, frame in enumerate(iter_frames(real_dir() / "video.avi")):  # 50 fps, 1280x720
        street.append(frame[::4, ::4])
        if i == 59:
            break
    out["street"] = write_video(d / "street.mp4", np.stack(street), fps=50)
    (d / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a video")
    out["broken"] = d / "broken.mp4"
    for key in PHOTOS:
        out[f"ref{key}"] = real_dir() / PHOTOS[key]
    return out


def ipa(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "ipa_lib.cli", *args], cwd=cwd, env=env, capture_output=True, check=False,
                          text=True, timeout=600)  # fmt: skip


@pytest.fixture(scope="module")
def built(media, hand_model, tmp_path_factory) -> Path:
    """Three cases through the CLI in a subprocess (no params.yaml there: built-in defaults + --set)."""
    work = tmp_path_factory.mktemp("built")
    r = ipa("cases", "build", "--driving", str(media["p428"]), str(media["p536"]), str(media["street"]),
            "--reference", str(media["ref294"]), str(media["ref428"]), str(media["ref536"]),
            "--out", str(work / "cases"), "--quiet", *sets(hand_model), cwd=work)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "processed 3 + failed 0 = given 3" in r.stdout
    assert "no body" in r.stderr  # no keypoints file: warned
    return work / "cases"


def frames_with_hands(case: Path) -> tuple[int, int, dict]:
    doc = json.loads((case / "hands.json").read_text())
    return sum(bool(f) for f in doc["frames"]), len(doc["frames"]), doc


def test_build_writes_probed_cases_with_real_hands(built):
    from ipa_lib.data.cases import REQUIRED, list_cases, probe_case
    from ipa_lib.data.video import probe

    assert [c.name for c in list_cases(built)] == ["p428", "p536", "street"]
    assert not [p for p in built.iterdir() if p.name.startswith(".")]  # no temp folders left
    for case in list_cases(built):
        for name in (*REQUIRED, "driving.mp4", "hands.json", "case.json"):
            assert (case / name).is_file(), f"{case.name}: {name}"
        row = probe_case(case, data_params())
        assert row["ok"], row["error"]
        assert (row["height"], row["width"], row["pose_fps"], row["face_size"]) == (128, 128, 16.0, 32)
        assert probe(case / "driving.mp4")["frames"] == row["pose_frames"]
        meta = json.loads((case / "case.json").read_text())
        assert meta["self_reenactment"] is False
    # every source frame is kept, resampled: 40 frames at 30 fps -> 22 at 16 fps; 60 at 50 -> 20
    assert probe(built / "p428" / "driving.mp4")["frames"] == 22
    assert probe(built / "street" / "driving.mp4")["frames"] == 20
    for pan_case in ("p428", "p536"):
        with_hands, total, doc = frames_with_hands(built / pan_case)
        assert with_hands >= total // 2, f"{pan_case}: hands in {with_hands}/{total} frames"
        assert (doc["width"], doc["height"]) == (128, 128)
        lm = np.array([h["landmarks"] for f in doc["frames"] for h in f])
        assert lm.shape[1:] == (21, 3) and lm[..., :2].min() > -20 and lm[..., :2].max() < 148  # pixels of 128x128
    with_hands, total, _ = frames_with_hands(built / "street")
    assert with_hands <= 2, f"street: hands in {with_hands}/{total} frames (people too small to see hands)"
    from PIL import Image

    with Image.open(built / "p428" / "src_ref.png") as im:
        assert im.size == (128, 128)


def test_pose_video_draws_the_detected_hands(built):
    from ipa_lib.data.video import read_video

    pose = read_video(built / "p536" / "src_pose.mp4").astype(int)
    _, _, doc = frames_with_hands(built / "p536")
    lit = pose.max(-1) > 60
    for i, hands in enumerate(doc["frames"]):
        if hands:  # hand bones drawn near the landmarks; nothing where no hand was seen
            x, y = np.array(hands[0]["landmarks"])[0, :2].astype(int).clip(0, 127)
            assert lit[i, max(y - 12, 0) : y + 12, max(x - 12, 0) : x + 12].any(), f"frame {i}"
        else:
            assert not lit[i].any(), f"frame {i}: no hand detected but something drawn"
    assert not (read_video(built / "street" / "src_pose.mp4").max(-1) > 60).any()


def test_check_prints_table_and_refuses_a_bad_case(built, tmp_path):
    import shutil

    r = ipa("cases", "check", str(built), *[a for kv in SMALL for a in ("--set", kv)], cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert all(c in r.stdout for c in ("p428", "p536", "street", "split", "3/3 usable"))
    bad = tmp_path / "cases"
    shutil.copytree(built, bad)
    (bad / "p536" / "src_face.mp4").unlink()
    r = ipa("cases", "check", str(bad), *[a for kv in SMALL for a in ("--set", kv)], cwd=tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "2/3 usable" in r.stdout and "missing src_face.mp4" in r.stdout


def test_self_reenactment_reference_is_frame_n(media, hand_model, tmp_path):
    from PIL import Image

    from ipa_lib.data.case_build import build_cases
    from ipa_lib.data.cases import probe_case
    from ipa_lib.data.video import read_video

    data = data_params()
    # pair 2: frame 21 exists in p428 (22 frames) but not in street (20 frames)
    res = build_cases([media["p428"], media["street"]], tmp_path / "cases", data, reference_frame=21,
                      hand_model=hand_model, progress=False)  # fmt: skip
    assert (res["given"], res["processed"], res["failed"]) == (2, 1, 1)
    assert "street.mp4" in res["errors"][0]["driving"] and "reference frame 21 is beyond" in res["errors"][0]["error"]
    assert not (tmp_path / "cases" / "street").exists()
    case = tmp_path / "cases" / "p428"
    with Image.open(case / "src_ref.png") as im:
        ref = np.asarray(im.convert("RGB"))
    assert np.array_equal(ref, read_video(case / "driving.mp4")[21])
    meta = json.loads((case / "case.json").read_text())
    assert meta["self_reenactment"] is True and meta["reference_frame"] == 21
    row = probe_case(case, data)
    assert row["ok"] and row["self_reenactment"]


def test_mismatched_lists_exit_2_with_counts(media, tmp_path, capsys, monkeypatch):
    from ipa_lib.cli import main

    monkeypatch.chdir(tmp_path)

    drivings = [str(media["p428"]), str(media["p536"]), str(media["street"])]
    code = main(["cases", "build", "--driving", *drivings, "--reference", str(media["ref294"]), str(media["ref428"]),
                 "--out", str(tmp_path / "cases"), *[a for kv in SMALL for a in ("--set", kv)]])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "--driving has 3 videos but --reference has 2 images" in err
    code = main(["cases", "build", "--driving", *drivings, "--reference-frame", "0", "--keypoints", "a.json",
                 "--out", str(tmp_path / "cases")])  # fmt: skip
    assert code == 2 and "--keypoints has 1 files" in capsys.readouterr().err
    assert not (tmp_path / "cases").exists()


def test_undecodable_driving_is_reported_and_the_rest_built(media, hand_model, tmp_path, capsys, monkeypatch):
    from ipa_lib.cli import main

    monkeypatch.chdir(tmp_path)  # no params.yaml: built-in defaults + --set
    from ipa_lib.data.cases import list_cases, probe_case

    out = tmp_path / "cases"
    code = main(["cases", "build", "--driving", str(media["p428"]), str(media["broken"]), str(media["p428"]),
                 "--reference", str(media["ref428"]), str(media["ref536"]), str(tmp_path / "missing.png"),
                 "--out", str(out), "--quiet", *sets(hand_model)])  # fmt: skip
    cap = capsys.readouterr()
    assert code == 2
    assert "processed 1 + failed 2 = given 3" in cap.out
    assert "broken.mp4" in cap.err and PHOTOS["536"] in cap.err  # the pair's two files
    assert "missing.png" in cap.err  # the third pair: its reference does not exist
    assert [c.name for c in list_cases(out)] == ["p428"]  # ids: p428, broken, p428-2
    assert probe_case(out / "p428", data_params())["ok"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


# ---- keypoint files: COCO-WholeBody (133) and DWPose (134) ---------------------------------

def wholebody_track(n: int, size: int = 256) -> np.ndarray:
    """A synthetic person (133 COCO-WholeBody points, source pixels) swaying over n frames."""
    body = np.array([[128, 60], [122, 54], [134, 54], [114, 58], [142, 58], [100, 100], [156, 100], [90, 140],
                     [166, 140], [84, 176], [172, 176], [110, 180], [146, 180], [108, 220], [148, 220],
                     [106, 250], [150, 250]], float)  # fmt: skip
    feet = np.array([[100, 254], [96, 254], [108, 252], [156, 254], [160, 254], [148, 252]], float)
    t = np.linspace(0, 2 * np.pi, 68, endpoint=False)
    face = np.stack([128 + 14 * np.cos(t), 62 + 18 * np.sin(t)], 1)
    hand = np.array([[0, 0]] + [[dx, -6 * k] for dx in (-8, -4, 0, 4, 8) for k in range(1, 5)], float)
    lh, rh = hand + body[9] + [0, -4], hand + body[10] + [0, -4]
    base = np.concatenate([body, feet, face, lh, rh])
    out = []
    for i in range(n):
        kp = np.concatenate([base + [3 * np.sin(i / 4), 0], np.full((133, 1), 0.9)], 1)
        kp[4, 2] = 0.2  # one point (right ear) below the threshold: not drawn in either layout
        out.append(kp)
    return np.stack(out)


def dwpose(kp133: np.ndarray) -> np.ndarray:
    """Insert DWPose's neck (mean of the shoulders) at index 17."""
    neck = (kp133[..., 5, :] + kp133[..., 6, :]) / 2
    return np.concatenate([kp133[..., :17, :], neck[..., None, :], kp133[..., 17:, :]], axis=-2)


def test_keypoint_layouts_render_the_same_skeleton():
    from ipa_lib.data.case_build import to_wholebody
    from ipa_lib.data.pose_render import render_wholebody

    kp = wholebody_track(1)[0]
    a = render_wholebody(256, 256, to_wholebody(kp))
    b = render_wholebody(256, 256, to_wholebody(dwpose(kp)))
    assert np.array_equal(a, b) and (a.max(-1) > 0).sum() > 500
    naive = render_wholebody(256, 256, dwpose(kp)[:133])  # 134 read as 133: everything after the neck one off
    assert not np.array_equal(a, naive)


def test_build_with_133_and_134_keypoint_files(media, hand_model, tmp_path):
    from ipa_lib.data.case_build import build_cases
    from ipa_lib.data.video import read_video

    track = wholebody_track(40)
    f133, f134 = tmp_path / "k133.json", tmp_path / "k134.json"
    f133.write_text(json.dumps(track.tolist()))
    f134.write_text(json.dumps(dwpose(track)[..., :2].tolist()))  # [x, y] only: scores default to 1
    f134s = tmp_path / "k134s.json"
    f134s.write_text(json.dumps(dwpose(track).tolist()))
    res = build_cases([media["p428"]] * 2, tmp_path / "cases", data_params(), reference_frame=0,
                      keypoints=[f133, f134s], hand_model=hand_model, progress=False)  # fmt: skip
    assert res["failed"] == 0, res["errors"]
    a = read_video(tmp_path / "cases" / "p428" / "src_pose.mp4")
    b = read_video(tmp_path / "cases" / "p428-2" / "src_pose.mp4")
    assert np.array_equal(a, b)
    assert ((a.astype(int).max(-1) > 60).sum(axis=(1, 2)) > 100).all()  # a body in every frame
    faces = read_video(tmp_path / "cases" / "p428" / "src_face.mp4")
    assert faces.shape[1:3] == (32, 32)
    # the [x, y]-only file draws the low-score ear too (score 1), so it differs from the scored one
    res = build_cases([media["p428"]], tmp_path / "xy", data_params(), reference_frame=0, keypoints=[f134],
                      hand_model=hand_model, progress=False)  # fmt: skip
    assert res["failed"] == 0
    assert not np.array_equal(read_video(tmp_path / "xy" / "p428" / "src_pose.mp4"), a)
    short = tmp_path / "short.json"
    short.write_text(json.dumps(track[:10].tolist()))
    res = build_cases([media["p428"]], tmp_path / "short", data_params(), reference_frame=0, keypoints=[short],
                      hand_model=hand_model, progress=False)  # fmt: skip
    assert res["failed"] == 1 and "10 frames of keypoints" in res["errors"][0]["error"]


# ---- the style: Wan2.2's table -------------------------------------------------------------

# Transcribed from Wan2.2 wan/modules/animate/preprocess/human_visualization.py, draw_aapose_new
# (called by draw_aapose_by_meta_new, which process_pipepline.py uses for src_pose.mp4), 1-based
WAN_LIMB_SEQ = [[2, 3], [2, 6], [3, 4], [4, 5], [6, 7], [7, 8], [2, 9], [9, 10], [10, 11], [2, 12], [12, 13],
                [13, 14], [2, 1], [1, 15], [15, 17], [1, 16], [16, 18], [14, 19], [11, 20]]  # fmt: skip
WAN_COLORS = [[255, 0, 0], [255, 85, 0], [255, 170, 0], [255, 255, 0], [170, 255, 0], [85, 255, 0], [0, 255, 0],
              [0, 255, 85], [0, 255, 170], [0, 255, 255], [0, 170, 255], [0, 85, 255], [0, 0, 255], [85, 0, 255],
              [170, 0, 255], [255, 0, 255], [255, 0, 170], [255, 0, 85], [200, 200, 0], [100, 100, 0]]  # fmt: skip
# draw_handpose_new's edges; pose2d_utils.split_kp2ds_for_aa's body points from COCO-WholeBody
WAN_HAND_EDGES = [[0, 1], [1, 2], [2, 3], [3, 4], [0, 5], [5, 6], [6, 7], [7, 8], [0, 9], [9, 10], [10, 11],
                  [11, 12], [0, 13], [13, 14], [14, 15], [15, 16], [0, 17], [17, 18], [18, 19], [19, 20]]  # fmt: skip
WAN_BODY_A = [0, 6, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3, 17, 20]
WAN_BODY_B = [0, 5, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3, 18, 21]


def test_style_tables_match_wan_preprocessing():
    from ipa_lib.data import pose_render as pr

    assert [[i + 1, j + 1] for i, j in pr.LIMBS] == WAN_LIMB_SEQ
    assert [list(c) for c in pr.COLORS] == WAN_COLORS
    assert [list(e) for e in pr.HAND_EDGES] == WAN_HAND_EDGES
    assert [list(x) for x in pr.BODY_FROM_WHOLEBODY] == [WAN_BODY_A, WAN_BODY_B]
    assert pr.THRESHOLD == 0.5 and pr.LIMB_SHADE == 0.6 and pr.HAND_POINT_COLOR == (0, 0, 255)
    # 'v2' widths: 720x1280 -> limbs 2, hand bones 1; 1080x1920 -> 4, 2
    assert (pr.stick_width(720, 1280), pr.hand_width(720, 1280)) == (2, 1)
    assert (pr.stick_width(1080, 1920), pr.hand_width(1080, 1920)) == (4, 2)
    # Wan colours hand bone i with matplotlib.colors.hsv_to_rgb([i / 20, 1, 1]) * 255 (cv2 rounds it)
    from matplotlib.colors import hsv_to_rgb

    wan = [tuple(int(v) for v in np.round(hsv_to_rgb([i / 20.0, 1.0, 1.0]) * 255)) for i in range(20)]
    assert [pr.hand_edge_color(i) for i in range(20)] == wan
    assert wan[0] == (255, 0, 0) and wan[5] == (128, 255, 0) and wan[10] == (0, 255, 255)


@pytest.mark.parametrize("limb", range(19))
def test_each_limb_is_drawn_in_its_colour(limb):
    from ipa_lib.data import pose_render as pr

    body = np.zeros((20, 3))
    i, j = pr.LIMBS[limb]
    body[i], body[j] = [40, 100, 1.0], [160, 100, 1.0]
    img = pr.render_frame(200, 200, body)
    shade = [int(c * 0.6) for c in pr.COLORS[limb]]
    assert img[100, 100].tolist() == shade  # the bone's middle: the limb colour x 0.6
    assert img[100, 40].tolist() == list(pr.COLORS[i]) and img[100, 160].tolist() == list(pr.COLORS[j])  # points
    body[j, 2] = 0.4  # an end below the threshold: no bone, no point there
    img = pr.render_frame(200, 200, body)
    assert img[100, 100].tolist() == [0, 0, 0] and img[100, 160].tolist() == [0, 0, 0]


def test_hand_bones_and_points():
    from ipa_lib.data import pose_render as pr

    hand = np.zeros((21, 3))
    hand[:, 2] = 1.0
    hand[:, :2] = [10, 10]
    hand[0, :2], hand[1, :2] = [50, 150], [150, 150]  # bone 0 (wrist -> thumb 1) only: the rest sit at (10, 10)
    img = pr.render_frame(300, 300, None, [hand])
    assert img[150, 100].tolist() == list(pr.hand_edge_color(0))
    # the same bone drawn the way Wan's draw_handpose_new does (float colour, cv2.line)
    import cv2
    from matplotlib.colors import hsv_to_rgb

    ref = np.zeros((300, 300, 3), np.uint8)
    cv2.line(ref, (50, 150), (150, 150), hsv_to_rgb([0.0, 1.0, 1.0]) * 255, thickness=pr.hand_width(300, 300))
    assert np.array_equal(img[150, 55:146], ref[150, 55:146])
    assert img[150, 50].tolist() == [0, 0, 255] and img[150, 150].tolist() == [0, 0, 255]
    assert img[200:].max() == 0  # black background
