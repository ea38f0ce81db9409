"""`ipa wan-tiny`, `ipa animate` on a case built from a real photo, and the registered pyfunc's
face / replacement inputs, all on the tiny random Wan-Animate model (real diffusers classes)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY, write_params

pytest.importorskip("transformers")
pytest.importorskip("ftfy")

PHOTO = Path("/work/shared/testdata/real/COCO_val2014_000000000428.jpg")
# the tiny model: 17 frames at 32x32, 16x16 faces; the case videos are 64x64, 40 frames at 30 fps
DATA = ["data.height=32", "data.width=32", "data.frames=17", "data.fps=16", "data.face_size=16"]
WAN = ["backend.name=wan-animate", "backend.device=cpu"]


@pytest.fixture(scope="module")
def tiny_wan(tmp_path_factory) -> Path:
    """A tiny Wan-Animate folder written by `ipa wan-tiny`."""
    from ipa_lib.cli import main

    out = tmp_path_factory.mktemp("wan") / "tiny-wan"
    assert main(["wan-tiny", str(out), "--seed", "0"]) == 0
    return out


def _pan(frames: int = 40, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """A slow pan over the photo: (frames, size, size, 3) and the square face-area crops (frames, 32, 32, 3)."""
    from PIL import Image

    if not PHOTO.is_file():
        pytest.skip(f"{PHOTO} not available")
    im = Image.open(PHOTO).convert("RGB")
    w, h = im.size
    side = min(w, h) * 3 // 4
    video, faces = [], []
    for i in range(frames):
        x = (w - side) * i // (frames - 1)
        crop = im.crop((x, (h - side) // 2, x + side, (h - side) // 2 + side))
        video.append(np.asarray(crop.resize((size, size), Image.BILINEAR)))
        q = side // 4
        faces.append(np.asarray(crop.crop((q, 0, 3 * q, 2 * q)).resize((32, 32), Image.BILINEAR)))
    return np.stack(video), np.stack(faces)


@pytest.fixture(scope="module")
def case_dir(tmp_path_factory) -> Path:
    """A case (src_ref.png, src_pose.mp4, src_face.mp4) at 64x64, 40 frames at 30 fps."""
    from PIL import Image

    from ipa_lib.data.video import write_video

    case = tmp_path_factory.mktemp("cases") / "toddler-pan"
    case.mkdir()
    video, faces = _pan()
    Image.fromarray(video[0]).save(case / "src_ref.png")
    write_video(case / "src_pose.mp4", video, fps=30)
    write_video(case / "src_face.mp4", faces, fps=30)
    return case


def _wan_params(base: Path, extra: list[str] = ()):
    from conftest import tiny_params

    return tiny_params([*WAN, f"backend.base_model={base}", *DATA, *extra])


# ---- ipa wan-tiny ---------------------------------------------------------------------------

def test_wan_tiny_loads_with_from_pretrained_and_load_backend(tiny_wan, capsys):
    from diffusers import WanAnimatePipeline

    from ipa_lib.cli import main
    from ipa_lib.models.factory import load_backend
    from ipa_lib.models.wan_animate import WanAnimateBackend

    assert (tiny_wan / "model_index.json").is_file()
    pipe = WanAnimatePipeline.from_pretrained(str(tiny_wan))
    assert type(pipe).__name__ == "WanAnimatePipeline"
    backend = load_backend(_wan_params(tiny_wan))
    assert isinstance(backend, WanAnimateBackend) and backend.face_size == 16
    assert [p.name for p in tiny_wan.parent.iterdir()] == [tiny_wan.name]  # no temp folder left behind

    # an existing non-empty folder is refused (exit 2) unless --force, and left as it was
    before = sorted(p.relative_to(tiny_wan) for p in tiny_wan.rglob("*"))
    capsys.readouterr()
    assert main(["wan-tiny", str(tiny_wan)]) == 2
    err = capsys.readouterr().err
    assert str(tiny_wan) in err and "--force" in err
    assert sorted(p.relative_to(tiny_wan) for p in tiny_wan.rglob("*")) == before


def test_wan_tiny_force_replaces_and_seed_changes_the_weights(tmp_path):
    from safetensors.numpy import load_file

    from ipa_lib.cli import main

    out = tmp_path / "tiny"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    assert main(["wan-tiny", str(out), "--force", "--seed", "1"]) == 0
    assert not (out / "stale.txt").exists() and (out / "model_index.json").is_file()
    other = tmp_path / "other"
    assert main(["wan-tiny", str(other), "--seed", "2"]) == 0
    w1 = load_file(next((out / "transformer").glob("*.safetensors")))
    w2 = load_file(next((other / "transformer").glob("*.safetensors")))
    assert w1.keys() == w2.keys() and any(not np.array_equal(w1[k], w2[k]) for k in w1)


# ---- ipa animate ----------------------------------------------------------------------------

def _animate(tmp_path, params_path, model, case, out, seed, extra=()):
    from ipa_lib.cli import main

    return main(["animate", "--model", str(model), "--case", str(case), "--out", str(out), "--seed", str(seed),
                 "--steps", "2", "--params", str(params_path), *extra])


def test_animate_writes_the_clip_and_strip_reproducibly(tiny_wan, case_dir, tmp_path, capsys):
    import json

    from ipa_lib.data.video import probe, read_video

    params_path = write_params(tmp_path / "params.yaml", [*TINY, *WAN, *DATA])
    clips = []
    for name, seed in (("a.mp4", 3), ("b.mp4", 3), ("c.mp4", 4)):
        capsys.readouterr()
        assert _animate(tmp_path, params_path, tiny_wan, case_dir, tmp_path / name, seed) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["case"] == "toddler-pan" and result["mode"] == "animate" and result["seed"] == seed
        info = probe(tmp_path / name, decode=True)
        assert (info["frames"], info["height"], info["width"], info["fps"]) == (17, 32, 32, 16)
        assert Path(result["strip"]) == tmp_path / f"{Path(name).stem}_strip.png" and Path(result["strip"]).is_file()
        clips.append(read_video(tmp_path / name))
    assert np.array_equal(clips[0], clips[1])  # same seed, same clip
    assert not np.array_equal(clips[0], clips[2])  # the seed is used
    assert clips[0].std() > 0


def test_animate_bad_case_exits_2_naming_the_case(tiny_wan, case_dir, tmp_path, capsys):
    params_path = write_params(tmp_path / "params.yaml", [*TINY, *WAN, *DATA])
    bad = tmp_path / "no-face"
    shutil.copytree(case_dir, bad)
    (bad / "src_face.mp4").unlink()
    assert _animate(tmp_path, params_path, tiny_wan, bad, tmp_path / "clip.mp4", 0) == 2
    err = capsys.readouterr().err
    assert "no-face" in err and "src_face.mp4" in err
    assert not (tmp_path / "clip.mp4").exists()

    # too few frames for data.frames at data.fps: the case and the counts are named
    assert _animate(tmp_path, params_path, tiny_wan, case_dir, tmp_path / "clip.mp4", 0, ["--set", "data.frames=81"]) == 2
    err = capsys.readouterr().err
    assert "toddler-pan" in err and "frames" in err and not (tmp_path / "clip.mp4").exists()


# ---- the registered pyfunc: face and replacement inputs --------------------------------------

def _pyfunc(params, tmp_path):
    """IPAAnimatorModel loaded as MLflow loads it: artifacts params (snapshot) + base_model."""
    import yaml
    from mlflow.pyfunc import PythonModelContext

    from ipa_lib.mlops.registry import IPAAnimatorModel

    snap = tmp_path / "params-snapshot.yaml"
    snap.write_text(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))
    model = IPAAnimatorModel()
    model.load_context(PythonModelContext(artifacts={"params": str(snap), "base_model": params.backend.base_model},
                                          model_config={}))
    return model, snap


def test_pyfunc_takes_face_and_replacement_videos(tiny_wan, tmp_path):
    import mlflow.pyfunc

    from ipa_lib.mlops import registry

    params = _wan_params(tiny_wan)
    model, snap = _pyfunc(params, tmp_path)
    ex = registry.input_example(params, replace=True)
    assert ex["face_video"].shape == (5, 16, 16, 3)
    run = {"seed": 1, "num_inference_steps": 2}
    animate_in = {k: ex[k] for k in ("reference", "pose_video", "face_video")}
    with_face = model.predict(None, animate_in, params=run)
    want = registry._animate(model.backend, ex["reference"], ex["pose_video"], 1, 2, {"face": ex["face_video"]})
    assert with_face.shape == ex["pose_video"].shape and np.array_equal(with_face, want)
    blank = model.predict(None, {k: ex[k] for k in ("reference", "pose_video")}, params=run)  # toy-style input
    assert blank.shape == with_face.shape and not np.array_equal(blank, with_face)  # the face is used
    replaced = model.predict(None, ex, params=run)
    assert not np.array_equal(replaced, with_face)  # background + mask are used

    with pytest.raises(ValueError, match="mask_video"):
        model.predict(None, {**animate_in, "background_video": ex["background_video"]}, params=run)
    with pytest.raises(ValueError, match="face_video"):
        model.predict(None, {**animate_in, "face_video": ex["face_video"][:3]}, params=run)

    # through MLflow: the wan-animate signature declares face_video (and the replacement
    # inputs when asked); the toy signature is the two inputs it always had
    toy = registry.model_signature(_wan_params(tiny_wan, ["backend.name=toy"]))
    assert toy.inputs.input_names() == ["reference", "pose_video"]
    sig = registry.model_signature(params, replace=True)
    assert sig.inputs.input_names() == ["reference", "pose_video", "face_video", "background_video", "mask_video"]
    path = tmp_path / "pyfunc"
    mlflow.pyfunc.save_model(str(path), python_model=registry.IPAAnimatorModel(), signature=sig,
                             artifacts={"params": str(snap), "base_model": str(tiny_wan)}, pip_requirements=[],
                             input_example=(ex, run))  # MLflow predicts it on saving: the signature fits
    loaded = mlflow.pyfunc.load_model(str(path))
    assert np.array_equal(loaded.predict(ex, params=run), replaced)


def test_pyfunc_toy_refuses_wan_inputs(tiny_base, tmp_path):
    from ipa_lib.mlops import registry

    from conftest import tiny_params

    params = tiny_params()
    params.backend.base_model = str(tiny_base)
    model, _ = _pyfunc(params, tmp_path)
    ex = registry.input_example(params)
    assert set(ex) == {"reference", "pose_video"}
    clip = model.predict(None, ex, params={"seed": 0, "num_inference_steps": 2})
    assert clip.shape == ex["pose_video"].shape
    face = np.zeros((ex["pose_video"].shape[0], 8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="toy backend"):
        model.predict(None, {**ex, "face_video": face}, params={"seed": 0, "num_inference_steps": 2})


# ---- ipa animate from a registered model ------------------------------------------------------

def _adapter(params, out: Path) -> Path:
    """A LoRA adapter over the tiny model that changes its output (random lora_B)."""
    import torch

    from ipa_lib.models.factory import load_backend

    backend = load_backend(params)
    backend.add_lora(4, 4, params.train.lora_targets)
    g = torch.Generator().manual_seed(0)
    for name, p in backend.transformer.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.5
    backend.save_adapter(out)
    return out


def test_animate_from_a_registered_model_matches_base_plus_adapter(tiny_wan, case_dir, tmp_path, monkeypatch,
                                                                   mlflow_server, capsys):
    import json
    import uuid

    from ipa_lib.core.decisions import required_metrics
    from ipa_lib.data.video import read_video
    from ipa_lib.mlops.registry import register_model

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    uid = uuid.uuid4().hex[:8]
    tracking = ["tracking.enabled=true", f"tracking.uri={mlflow_server.uri}", f"tracking.experiment=animate-{uid}",
                f"tracking.registered_model=ipa-animator-{uid}", "tracking.max_retries=1"]
    params = _wan_params(tiny_wan, tracking)
    adapter = _adapter(params, tmp_path / "adapter")
    nums = {k: 0.5 for k in required_metrics(params.promote_rule)}  # what registering requires
    (tmp_path / "eval.json").write_text(json.dumps({"base": nums, "ipa": nums}))
    version = register_model(params, adapter, tiny_wan, tmp_path / "eval.json")

    # the user's params carry no backend: the registered model's snapshot does
    params_path = write_params(tmp_path / "params.yaml", [*TINY, *DATA, "backend.device=cpu", *tracking])
    uri = f"models:/ipa-animator-{uid}/{version}"
    capsys.readouterr()
    assert _animate(tmp_path, params_path, uri, case_dir, tmp_path / "registered.mp4", 5) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["model_uri"] == uri and result["model_version"] == version
    wan_params = write_params(tmp_path / "wan.yaml", [*TINY, *WAN, *DATA])
    assert _animate(tmp_path, wan_params, tiny_wan, case_dir, tmp_path / "folder.mp4", 5, ["--adapter", str(adapter)]) == 0
    assert _animate(tmp_path, wan_params, tiny_wan, case_dir, tmp_path / "base.mp4", 5) == 0
    registered, folder, base = (read_video(tmp_path / f"{n}.mp4") for n in ("registered", "folder", "base"))
    assert registered.shape == (17, 32, 32, 3)
    assert np.array_equal(registered, folder) and not np.array_equal(registered, base)

    # a registered model carries its adapter: --adapter with a models:/ URI is refused
    capsys.readouterr()
    assert _animate(tmp_path, params_path, uri, case_dir, tmp_path / "x.mp4", 5, ["--adapter", str(adapter)]) == 2
    assert "--adapter" in capsys.readouterr().err
