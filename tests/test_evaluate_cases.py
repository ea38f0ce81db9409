"""The evaluate stage on Wan-Animate cases: the tiny random pipeline, cases built here from pans
over the real photos (real hands, MediaPipe VIDEO mode), base vs aligned with the same seeds;
the hand metrics judged on real and blank clips; masked SSIM."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_params
from hands_fixtures import hand_model, photo, zoom_pan_clip  # noqa: F401 (fixture)

SIZE, FRAMES, FPS, FACE = 64, 17, 16, 16
# crops with one hand large enough for the detector at 64x64 (found in every frame of the pan)
CROPS = {"c428": ("428", (170, 200, 330, 360)), "c536": ("536", (86, 204, 206, 324)),
         "c428b": ("428", (440, 60, 620, 240))}  # fmt: skip
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def pan(key: str, box: tuple[int, int, int, int]) -> np.ndarray:
    from PIL import Image

    x0, y0, x1, y1 = box
    clip = zoom_pan_clip(photo(key)[y0:y1, x0:x1], FRAMES, zoom=0.01, pan=1)
    return np.stack([np.asarray(Image.fromarray(f).resize((SIZE, SIZE), Image.BILINEAR)) for f in clip])


def write_case(folder, clip: np.ndarray, model: str) -> None:
    """A self-reenactment case whose driving video is `clip` (reference = its frame 0)."""
    from PIL import Image

    from ipa_lib.data.hands.landmarker import HandDetector
    from ipa_lib.data.video import write_video

    folder.mkdir(parents=True)
    Image.fromarray(clip[0]).save(folder / "src_ref.png")
    write_video(folder / "src_pose.mp4", clip, fps=FPS)
    write_video(folder / "src_face.mp4", clip[:, 24:40, 24:40], fps=FPS)
    write_video(folder / "driving.mp4", clip, fps=FPS)
    with HandDetector(model) as det:
        hands = det.detect_frames(clip, FPS)
    frames = [[{"landmarks": h.landmarks.tolist(), "handedness": h.handedness, "score": h.score} for h in f] for f in hands]
    (folder / "hands.json").write_text(json.dumps({"width": SIZE, "height": SIZE, "fps": FPS, "frames": frames}))
    (folder / "case.json").write_text(json.dumps({"self_reenactment": True, "reference_frame": 0}))


@pytest.fixture(scope="module")
def world(tmp_path_factory, hand_model):
    """(cases folder, tiny Wan-Animate pipeline folder, nonzero adapter folder)."""
    import torch

    from ipa_lib.models.lora import lora_parameters
    from ipa_lib.models.wan_animate import WanAnimateBackend
    from ipa_lib.models.wan_tiny import save_tiny_pipeline

    root = tmp_path_factory.mktemp("evalcases")
    for name, (key, box) in CROPS.items():
        write_case(root / "cases" / name, pan(key, box), hand_model)
    pipe = save_tiny_pipeline(root / "tiny-wan")
    backend = WanAnimateBackend.from_pretrained(str(pipe))
    backend.add_lora(4, 4, TARGETS)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in lora_parameters(backend.transformer):
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)  # lora_B starts at zero: make the adapter act
    backend.save_adapter(root / "adapter")
    return root / "cases", pipe, root / "adapter"


def case_params(world, work, hand_model, extra=()):
    cases, pipe, _ = world
    return tiny_params([
        "backend.name=wan-animate", f"backend.base_model={pipe}", "backend.device=cpu",
        f"data.cases={cases}", f"data.height={SIZE}", f"data.width={SIZE}", f"data.frames={FRAMES}",
        f"data.fps={FPS}", f"data.face_size={FACE}", f"gate.hand_landmarker={hand_model}",
        "evaluate.seeds=[0]", "evaluate.num_inference_steps=2", f"evaluate.val_metrics={work / 'metrics' / 'eval_val.json'}",
        *extra,
    ])  # fmt: skip


ALWAYS = {"hand_detect_rate", "hand_keypoint_error", "psnr", "ssim", "hand_psnr", "hand_ssim"}  # every case here


def test_evaluate_cases_writes_test_and_val_metrics(world, tmp_path, hand_model):
    from ipa_lib.core.metrics import CASE_METRICS
    from ipa_lib.stages.evaluate import evaluate

    params = case_params(world, tmp_path, hand_model)
    result = evaluate(params, world[2], tmp_path / "eval", tmp_path / "metrics" / "eval.json", progress=False)
    test = json.loads((tmp_path / "metrics" / "eval.json").read_text())
    val = json.loads((tmp_path / "metrics" / "eval_val.json").read_text())
    assert set(test) == {"base", "ipa"} and set(val) == {"base", "ipa"}
    for doc in (test, val):
        for model in ("base", "ipa"):
            assert ALWAYS <= set(doc[model]) <= set(CASE_METRICS)
            assert all(np.isfinite(v) for v in doc[model].values())
    assert result["base"] == test["base"] and result["val"] == val
    details = json.loads((tmp_path / "eval" / "details.json").read_text())
    assert len(details["cases"]["test"]) == 1 and len(details["cases"]["val"]) == 1 and not details["failed"]
    assert details["method"] == params.train.loss and details["seeds"] == [0]
    rows = json.loads((tmp_path / "eval" / "per_clip.json").read_text())
    assert len(rows) == 4 and {r["split"] for r in rows} == {"test", "val"}
    for split in ("test", "val"):
        base, ipa = ([r for r in rows if r["split"] == split and r["model"] == m] for m in ("base", "ipa"))
        assert [r["seed"] for r in base] == [r["seed"] for r in ipa]  # same seeds for both models
    assert any(r["metrics"] != s["metrics"] for r, s in zip(rows[::2], rows[1::2]))  # the adapter acts
    assert (tmp_path / "eval" / "side_by_side.png").stat().st_size > 0


def test_zero_adapter_gives_base_equal_aligned_and_a_bad_case_is_skipped(world, tmp_path, hand_model):
    from ipa_lib.data.cases import scan
    from ipa_lib.models.factory import load_backend
    from ipa_lib.stages.evaluate import evaluate_cases_with

    params = case_params(world, tmp_path, hand_model)
    backend = load_backend(params)
    backend.add_lora(4, 4, TARGETS)  # lora_B is zero: the aligned model is the base
    rows = scan(params)
    val = next(r for r in rows if r["split"] == "val")
    broken = tmp_path / "broken" / val["case_id"]
    shutil.copytree(val["path"], broken)
    (broken / "src_face.mp4").write_bytes(b"not a video")  # after the scan: fails to load
    val["path"] = str(broken)
    result = evaluate_cases_with(backend, params, rows, tmp_path / "eval", tmp_path / "eval.json", progress=False)
    assert result["base"] == result["ipa"] and ALWAYS <= set(result["base"])
    assert list(result["details"]["failed"]) == [val["case_id"]] and "src_face.mp4" in result["details"]["failed"][val["case_id"]]
    assert result["val"] == {"base": {}, "ipa": {}, "note": "no val case could be loaded (see details.failed)"}


def test_no_test_case_names_data_cases_and_no_val_case_is_noted(world, tmp_path, hand_model):
    from ipa_lib.core.errors import InputError
    from ipa_lib.data.cases import split_cases
    from ipa_lib.stages.evaluate import evaluate_cases

    # one case alone lands where its id hashes: take ids that train (no test) and test (no val)
    names = [f"solo{i}" for i in range(40)]
    train = next(n for n in names if split_cases([n], 0.2, 0.2)[n] == "train")
    folder = tmp_path / "one"
    folder.mkdir()
    shutil.copytree(world[0] / "c428", folder / train)
    params = case_params(world, tmp_path, hand_model, [f"data.cases={folder}"])
    with pytest.raises(InputError, match=r"data\.cases: .*no usable case in the test split.*" + train):
        evaluate_cases(params, world[2], tmp_path / "eval", tmp_path / "eval.json", progress=False)
    assert not (tmp_path / "eval").exists()

    test = next(n for n in names if split_cases([n], 0.2, 0.2)[n] == "test")
    folder = tmp_path / "two"
    folder.mkdir()
    shutil.copytree(world[0] / "c536", folder / test)
    params = case_params(world, tmp_path, hand_model, [f"data.cases={folder}"])
    result = evaluate_cases(params, world[2], tmp_path / "eval", tmp_path / "eval.json", progress=False)
    assert ALWAYS <= set(result["base"])
    assert json.loads(Path(params.evaluate.val_metrics).read_text()) == {"base": {}, "ipa": {}, "note": "no val cases"}


def test_hand_metrics_on_a_real_clip_and_a_blank_one(world, hand_model):
    from ipa_lib.core.config import DataConfig
    from ipa_lib.data.cases import load_case
    from ipa_lib.data.hands.quality import MediaPipeHandScorer
    from ipa_lib.stages.evaluate import case_clip_metrics

    data = DataConfig(cases=str(world[0]), height=SIZE, width=SIZE, frames=FRAMES, fps=FPS, face_size=FACE)
    case = load_case(world[0] / "c428", data)
    assert (case["hand_keypoints"][..., 2] > 0.3).any(-1).any(-1).all()  # the driver shows a hand in every frame
    with MediaPipeHandScorer(hand_model, fps=FPS) as scorer:
        real = case_clip_metrics(case["driving"], case, scorer, True)  # the pan itself as the "generated" clip
        blank = case_clip_metrics(np.zeros_like(case["driving"]), case, scorer, True)
    assert real["hand_detect_rate"] >= 0.9 and real["hand_keypoint_error"] < 0.15
    assert real["hand_confidence"] > 0.5 and real["hand_jitter"] < 0.2
    assert real["psnr"] == float("inf") and real["ssim"] == pytest.approx(1.0) and real["hand_ssim"] == pytest.approx(1.0)
    assert blank["hand_detect_rate"] == 0.0 and blank["hand_keypoint_error"] == 1.0
    assert "hand_confidence" not in blank and "hand_jitter" not in blank  # no detection defines them
    assert blank["hand_ssim"] < 0.5 and blank["hand_psnr"] < real["hand_psnr"]


def test_ssim_mask():
    from skimage.metrics import structural_similarity

    from ipa_lib.core.image_metrics import ssim

    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (3, 40, 48, 3), dtype=np.uint8)
    b = a.copy()
    b[:, :, :20] = np.clip(a[:, :, :20] + rng.normal(0, 30, b[:, :, :20].shape), 0, 255).astype(np.uint8)  # noise on the left
    direct = np.mean([structural_similarity(f.astype(np.float64), g.astype(np.float64), gaussian_weights=True, sigma=1.5,
                                            use_sample_covariance=False, data_range=255.0, channel_axis=-1)
                      for f, g in zip(a, b)])  # fmt: skip
    assert ssim(a, b) == float(direct)  # mask=None: unchanged
    ones = np.ones(a.shape[:-1])
    assert ssim(a, b, ones) == pytest.approx(ssim(a, b), abs=1e-12)  # a full mask is the plain mean
    left, right = np.zeros_like(ones), np.zeros_like(ones)
    left[:, :, :15], right[:, :, 32:] = 1, 1
    assert ssim(a, a, left) == pytest.approx(1.0)
    assert ssim(a, b, right) == pytest.approx(1.0) and ssim(a, b, left) < ssim(a, b) < ssim(a, b, right)
    assert np.isnan(ssim(a, b, np.zeros_like(ones)))
    with pytest.raises(ValueError, match="mask shape"):
        ssim(a, b, ones[0])
