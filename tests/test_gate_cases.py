"""The gate stage on cases: MediaPipe over the case clip store that the tiny Wan model's
sample stage writes (layout, masks on the latent grid, a damaged shard reported per clip),
and the scorer's judgement on real clips: a pan over a photo with hands against blank and
noise clips, and a mirrored pan whose hands sit where the driver's are but on the wrong side."""

from __future__ import annotations

import json
import shutil
import zipfile

import numpy as np
import pytest
import torch
from conftest import tiny_params
from hands_fixtures import hand_model, photo, real_dir, zoom_pan_clip  # noqa: F401 (fixture)

H, W, FPS, SOURCE_FRAMES = 240, 320, 16, 20  # the cases' own videos (multiples of 16)
HANDS_CASES = {"pan428": ("428", 1), "zoom428": ("428", -1), "pan536": ("536", 1)}
STREET = "video-street"  # no hands.json: scored reference-free
# with val 0 / test 0.01 the split sends pan536 to test: pan428, zoom428, video-street train


def source_clip(key: str, direction: int) -> np.ndarray:
    from PIL import Image

    still = np.asarray(Image.fromarray(photo(key)).resize((W, H), Image.BILINEAR))
    return zoom_pan_clip(still, SOURCE_FRAMES, zoom=0.01, pan=direction)


def street_clip() -> np.ndarray:
    from PIL import Image

    from ipa_lib.data.video import iter_frames

    out = []
    for frame in iter_frames(real_dir() / "video.avi"):
        out.append(np.asarray(Image.fromarray(frame).resize((W, H), Image.BILINEAR)))
        if len(out) == SOURCE_FRAMES:
            break
    return np.stack(out)


def hands_doc(clip: np.ndarray, model: str) -> dict:
    """hands.json (ipa_lib.data.cases format) of a clip, by the HandLandmarker in VIDEO mode."""
    from ipa_lib.data.hands.landmarker import HandDetector

    with HandDetector(model) as det:
        frames = [[{"landmarks": h.landmarks.tolist(), "handedness": h.handedness, "score": h.score} for h in hands]
                  for hands in det.detect_clip(iter(clip), FPS)]  # fmt: skip
    return {"width": W, "height": H, "fps": FPS, "frames": frames}


def write_case(folder, clip: np.ndarray, hands: dict | None) -> None:
    from PIL import Image

    from ipa_lib.data.video import write_video

    folder.mkdir(parents=True)
    Image.fromarray(clip[0]).save(folder / "src_ref.png")
    write_video(folder / "src_pose.mp4", clip, fps=FPS)
    write_video(folder / "src_face.mp4", clip[:, 80:160, 120:200], fps=FPS)
    write_video(folder / "driving.mp4", clip, fps=FPS)
    if hands is not None:
        (folder / "hands.json").write_text(json.dumps(hands))


@pytest.fixture(scope="module")
def cases_root(tmp_path_factory, hand_model):
    root = tmp_path_factory.mktemp("cases")
    for name, (key, direction) in HANDS_CASES.items():
        clip = source_clip(key, direction)
        write_case(root / name, clip, hands_doc(clip, hand_model))
    write_case(root / STREET, street_clip(), None)
    return root


@pytest.fixture(scope="module")
def tiny_wan(tmp_path_factory):
    from ipa_lib.models.wan_tiny import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("wan") / "tiny-wan-animate")


def case_params(cases_root, model: str, hand_model: str, extra: list[str] = ()):
    return tiny_params([
        "backend.name=wan-animate", f"backend.base_model={model}", "backend.device=cpu",
        f"data.cases={cases_root}", "data.height=64", "data.width=64", "data.frames=17", f"data.fps={FPS}",
        "data.face_size=16", "data.val_fraction=0.0", "data.test_fraction=0.01",
        "sample.per_case=2", "sample.num_inference_steps=2", "sample.shards=6",
        "gate.threshold=0.0", "gate.top_k=4", "gate.min_kept=1", f"gate.hand_landmarker={hand_model}",
        *extra,
    ])  # fmt: skip


@pytest.fixture(scope="module")
def samples(tmp_path_factory, cases_root, tiny_wan, hand_model):
    """(params, samples folder): 3 train cases x 2 seeds by the tiny random model, 6 shards."""
    from ipa_lib.stages.sample import sample

    params = case_params(cases_root, tiny_wan, hand_model)
    out = tmp_path_factory.mktemp("samples") / "samples"
    summary = sample(params, out, progress=False)
    assert summary["clips"] == 6 and summary["splits"]["train"] == 3 and summary["shards"] == 6
    return params, out


def manifest(folder) -> dict[str, dict]:
    return {r["sample_id"]: r for r in map(json.loads, (folder / "manifest.jsonl").read_text().splitlines())}


def test_gate_on_cases_end_to_end(samples, tmp_path, hand_model):
    from ipa_lib.data.clip_store import ClipStore
    from ipa_lib.data.hands.masks import keypoints_mask, pixel_mask_to_latent
    from ipa_lib.data.hands.quality import ALL_COMPONENTS, MediaPipeHandScorer
    from ipa_lib.stages.gate import gate

    params, samples_dir = samples
    out = tmp_path / "gated"
    summary = gate(params, samples_dir, out, progress=False)
    assert {p.name for p in out.iterdir()} == {"clips.npz", "masks.npz", "cases", "manifest.jsonl", "summary.json",
                                              "report.md", "report.json"}  # fmt: skip
    assert summary["given"] == 6 and summary["scored"] == 6 and summary["kept"] == 4 and summary["checks_passed"]
    rows = manifest(out)
    assert sum(r["kept"] for r in rows.values()) == 4
    with np.load(out / "clips.npz") as clips, np.load(out / "masks.npz") as masks:
        assert sorted(clips.files) == sorted(masks.files) == sorted(rows)
    with MediaPipeHandScorer(hand_model, fps=FPS) as scorer, ClipStore(out) as store:
        for sid, row in rows.items():
            assert row["video"] == f"clips.npz#{sid}" and row["mask"] == f"masks.npz#{sid}"
            assert row["decodable"] and row["error"] is None and 0.0 <= row["hand_score"] <= 1.0
            assert set(k for k in row if k.startswith("score_")) == {f"score_{c}" for c in ALL_COMPONENTS}
            clip, mask = store.clip(row), store.clip({"video": row["mask"]})
            assert clip.shape == (17, 64, 64, 3) and clip.dtype == np.uint8
            assert mask.shape == (17, 64, 64) and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
            latent = pixel_mask_to_latent(torch.from_numpy(mask).float())
            assert latent.shape == (5, 8, 8)  # Wan 4x8x8: 1 + 16 / 4 frames, 64 / 8 cells
            driver = store.conditions(row["case_id"])["hand_keypoints"]
            if row["case_id"] == STREET:  # no hands.json: reference-free, no agreement of any kind
                assert not driver.any() and row["score_agreement"] is None and row["score_handedness"] is None
            else:
                assert driver.any() and row["score_agreement"] is not None
                # frames where the detector finds no hand take the driver's hand mask
                dets = scorer.detect_clip(iter(clip))
                fallback = [f for f, d in enumerate(dets) if not d]
                assert fallback, "a random model should draw no detectable hands"
                want = keypoints_mask(driver[fallback], 64, 64) > 0
                assert want.any() and np.array_equal(mask[fallback] > 0, want)


def _rewrite_without(shard, key: str) -> None:
    with np.load(shard) as z:
        keep = {k: z[k] for k in z.files if k != key}
    np.savez_compressed(shard, **keep)


def test_damaged_clips_are_reported_and_the_rest_gated(samples, tmp_path):
    from ipa_lib.stages.gate import gate

    params, src = samples
    work = tmp_path / "samples"
    shutil.copytree(src, work)
    rows = manifest(work)
    by_shard = {}
    for sid, r in rows.items():
        by_shard.setdefault(r["video"].partition("#")[0], []).append(sid)
    (missing_shard, missing), (cut_shard, cut) = [(s, ids[0]) for s, ids in sorted(by_shard.items())][:2]
    _rewrite_without(work / missing_shard, missing)  # a missing entry
    data = (work / cut_shard).read_bytes()
    (work / cut_shard).write_bytes(data[: len(data) // 2])  # a truncated shard
    with pytest.raises(zipfile.BadZipFile):
        zipfile.ZipFile(work / cut_shard)

    summary = gate(params, work, tmp_path / "gated", progress=False)
    assert summary["given"] == 6 and summary["scored"] == 4 and summary["checks_passed"]
    out = manifest(tmp_path / "gated")
    assert out[missing]["decodable"] is False and "no clip" in out[missing]["error"]
    assert out[cut]["decodable"] is False and "corrupt or truncated" in out[cut]["error"]
    assert cut_shard in out[cut]["error"]
    for sid in (missing, cut):
        assert out[sid]["hand_score"] is None and not out[sid]["kept"] and out[sid]["mask"] is None
    good = [sid for sid in out if sid not in (missing, cut)]
    assert all(out[s]["decodable"] and out[s]["hand_score"] is not None for s in good)
    with np.load(tmp_path / "gated" / "clips.npz") as z:
        assert sorted(z.files) == sorted(good)


def test_handedness_is_opt_in_and_reads_the_mirrored_label():
    from ipa_lib.data.hands.landmarker import Hand
    from ipa_lib.data.hands.masks import hands_to_keypoints
    from ipa_lib.data.hands.quality import CASE_WEIGHTS, DEFAULT_WEIGHTS, score_hands

    rng = np.random.default_rng(0)
    lm = np.concatenate([rng.uniform(100, 160, (21, 2)), np.zeros((21, 1))], 1).astype(np.float32)
    hand = Hand(0.9, "Right", lm, np.zeros((21, 3), np.float32))  # MediaPipe's "Right": the person's left
    dets = [[hand]] * 3
    pose = hands_to_keypoints(dets)
    assert pose[:, 0].any() and not pose[:, 1].any()  # slot 0 = the person's left
    swapped = pose[:, ::-1].copy()  # the same place, but the driver's right hand
    old = score_hands(dets, pose)
    assert "score_handedness" not in old and old == score_hands(dets, pose, DEFAULT_WEIGHTS)
    same, other = score_hands(dets, pose, CASE_WEIGHTS), score_hands(dets, swapped, CASE_WEIGHTS)
    assert same["score_handedness"] == pytest.approx(0.9) and other["score_handedness"] == pytest.approx(0.1)
    assert same["score_agreement"] == other["score_agreement"] == 1.0 and same["hand_score"] > other["hand_score"]
    assert "score_handedness" not in score_hands(dets, None, CASE_WEIGHTS)  # reference-free: skipped


# ---- the judgement on real clips (a random model draws no hands) -------------------------

def judged_store(folder, cases_root, params) -> dict[str, np.ndarray]:
    """A store-like input at the cases' own size: pan428's driving clip as the "generated"
    clip (real hands, the driver's own), blank and noise clips, and the pan mirrored against a
    driver mirrored in place but keeping its hands' sides (right place, wrong hand)."""
    from ipa_lib.core.io import save_npz
    from ipa_lib.data.cases import load_case
    from ipa_lib.data.clip_store import save_conditions, write_manifest

    cond = load_case(cases_root / "pan428", params.data)
    mirror = dict(cond)
    kp = cond["hand_keypoints"].copy()
    seen = kp[..., 2] > 0
    kp[..., 0] = np.where(seen, W - kp[..., 0], 0.0)  # x -> W - x (pixel-edge convention), slots kept
    mirror["hand_keypoints"] = kp
    save_conditions(folder, "pan428", cond)
    save_conditions(folder, "pan428-mirror", mirror)
    rng = np.random.default_rng(0)
    clips = {"real": cond["driving"], "blank": np.zeros_like(cond["driving"]),
             "noise": rng.integers(0, 256, cond["driving"].shape, dtype=np.uint8),
             "mirror": np.ascontiguousarray(cond["driving"][:, :, ::-1])}  # fmt: skip
    save_npz(folder / "shard-000.npz", **clips)
    write_manifest(folder, [
        {"sample_id": sid, "video": f"shard-000.npz#{sid}", "case_id": "pan428-mirror" if sid == "mirror" else "pan428",
         "pose_id": "pan428", "seed": i, "num_frames": 17, "height": H, "width": W, "shard": 0}
        for i, sid in enumerate(clips)
    ])  # fmt: skip
    return {"driver": cond["hand_keypoints"]}


def test_gate_judges_real_hands(cases_root, tiny_wan, hand_model, tmp_path):
    from ipa_lib.data.hands.masks import keypoints_mask
    from ipa_lib.stages.gate import gate

    params = case_params(cases_root, tiny_wan, hand_model,
                         [f"data.height={H}", f"data.width={W}", "gate.top_k=1"])  # fmt: skip
    store = tmp_path / "samples"
    store.mkdir()
    driver = judged_store(store, cases_root, params)["driver"]
    summary = gate(params, store, tmp_path / "gated", progress=False)
    assert summary["given"] == 4 and summary["scored"] == 4 and summary["kept"] == 1
    rows = manifest(tmp_path / "gated")
    real, blank, noise, mirror = (rows[k] for k in ("real", "blank", "noise", "mirror"))
    assert real["kept"] and not (blank["kept"] or noise["kept"] or mirror["kept"])
    # the real clip shows the driver's hands: detected, in place, on the right sides
    assert real["score_presence"] > 0.8 and real["score_agreement"] > 0.7 and real["score_handedness"] > 0.8
    assert real["hand_score"] > 0.6 > 0.3 > max(blank["hand_score"], noise["hand_score"])
    assert blank["score_presence"] == 0.0 and noise["score_presence"] < 0.2
    # mirrored: the hands sit where the driver's are, but each is the other hand
    assert mirror["score_agreement"] > 0.5
    assert mirror["score_handedness"] < real["score_handedness"] - 0.5
    assert mirror["hand_score"] < real["hand_score"]
    # the real clip's mask comes from its detections and covers the driver's hands
    with np.load(tmp_path / "gated" / "masks.npz") as z:
        mask = z["real"] > 0
    want = keypoints_mask(driver, H, W) > 0
    assert (mask & want).sum() / (mask | want).sum() > 0.5
