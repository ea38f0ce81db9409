"""The whole round on real cases, as a user runs it: `ipa wan-tiny`, `ipa cases build` from real
media (pans over the test photos give driving clips with real hands; video.avi is a real clip
without visible hands), then sample -> gate -> train -> evaluate -> register -> promote through
`dvc exp run -S ...` and through `ipa pipeline ... run-local` (kfp.local).

The tiny random model draws no hands, so the gate threshold is 0 here (the best clips are kept
anyway): these tests prove the plumbing; the gate's judgement is tested on real clips in
test_gate_cases.py. Promotion decides on a ground-truth metric of the val cases (hand_ssim).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, TINY, sh
from hands_fixtures import CASE_DATA, PHOTOS, pan_256, real_dir

pytestmark = pytest.mark.slow

DATA = CASE_DATA


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(root, overrides): a tiny Wan-Animate folder and a cases folder built from real media."""
    from ipa_lib.data.video import write_video

    root = tmp_path_factory.mktemp("cases-loop")
    media = root / "media"
    media.mkdir()
    write_video(media / "raise-428.mp4", pan_256("428", 200, 360), 30)  # both hands up
    write_video(media / "phones-536.mp4", pan_256("536", 100, 336), 30)
    write_video(media / "kitchen-294.mp4", pan_256("294", 100, 427), 30)
    write_video(media / "cross-428.mp4", pan_256("428", 220, 360), 30)
    shutil.copy(real_dir() / "video.avi", media / "street.avi")  # a real clip, no visible hands
    py = [sys.executable, "-m", "ipa_lib.cli"]
    sets = [a for d in DATA for a in ("--set", d)]
    env = {"OMP_NUM_THREADS": "1", "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(Path.home())}
    sh(py + ["wan-tiny", str(root / "tiny")], REPO, env)
    drivings = [media / n for n in ("raise-428.mp4", "phones-536.mp4", "kitchen-294.mp4", "street.avi")]
    sh(py + ["cases", "build", "--driving", *map(str, drivings), "--reference-frame", "0", "--out", str(root / "cases"), *sets],
       REPO, env)
    sh(py + ["cases", "build", "--driving", str(media / "cross-428.mp4"), "--reference", str(real_dir() / PHOTOS["536"]),
             "--out", str(root / "cases"), *sets], REPO, env)
    overrides = [
        "backend.name=wan-animate", f"backend.base_model={root / 'tiny'}", "backend.device=cpu",
        f"data.cases={root / 'cases'}", *DATA,
        "sample.per_case=2", "sample.shards=2", "sample.num_inference_steps=2",
        "gate.threshold=0.0", "gate.top_k=16", "gate.min_kept=1",
        "train.steps=4", "train.batch_size=2", "train.checkpoint_every=2", "train.log_every=1",
        "train.lora_rank=4", "train.lora_alpha=4",
        "evaluate.seeds=[0]", "evaluate.num_inference_steps=2",
    ]
    return root, overrides


def test_cases_built_from_real_media(world):
    root, overrides = world
    from ipa_lib.core.config import load_params
    from ipa_lib.data.cases import list_cases, probe_case, read_hands

    params = load_params(REPO / "params.yaml", overrides)
    rows = {r["case_id"]: r for r in (probe_case(c, params.data) for c in list_cases(root / "cases"))}
    assert len(rows) == 5 and all(r["ok"] for r in rows.values()), rows
    assert sum(r["self_reenactment"] for r in rows.values()) == 4
    def shown(case: str) -> float:  # fraction of frames where MediaPipe found the driver's hand
        frames = read_hands(Path(rows[case]["path"]) / "hands.json")["frames"]
        return sum(bool(f) for f in frames) / len(frames)

    assert shown("raise-428") > 0.8 and shown("cross-428") > 0.8, (shown("raise-428"), shown("cross-428"))
    assert shown("street") < 0.25  # people too small: a stray detection at most


def _case_metrics(metrics: dict) -> None:
    from ipa_lib.core.metrics import CASE_METRICS

    assert set(metrics) >= {"base", "ipa"}
    for model in ("base", "ipa"):
        assert {"hand_detect_rate", "hand_keypoint_error"} <= set(metrics[model]) <= set(CASE_METRICS), metrics[model]


def test_dvc_exp_run_on_cases(world, scratch_dvc_repo):
    root, overrides = world
    repo, env = scratch_dvc_repo([t for t in TINY if not t.startswith("tracking.")])
    args = [a for o in overrides for a in ("-S", o)]
    r = sh(["dvc", "exp", "run", "-n", "cases", *args], repo, env, timeout=900)
    for stage in ("sample", "gate", "train", "evaluate", "register", "promote"):
        assert f"Running stage '{stage}'" in r.stdout, r.stdout[-2000:]
    sh(["dvc", "exp", "apply", "cases"], repo, env)
    summary = json.loads((repo / "data" / "samples" / "summary.json").read_text())
    assert summary["source"] == "cases" and summary["shards"] == 2
    assert summary["clips"] == 2 * summary["cases"] and summary["refused_cases"] == {}
    assert sorted(p.name for p in (repo / "data" / "samples").glob("shard-*.npz")) == ["shard-000.npz", "shard-001.npz"]
    gated = json.loads((repo / "data" / "gated" / "summary.json").read_text())
    assert gated["kept"] >= 1
    _case_metrics(json.loads((repo / "metrics" / "eval.json").read_text()))
    val = json.loads((repo / "metrics" / "eval_val.json").read_text())
    _case_metrics(val)
    assert "hand_ssim" in val["ipa"], "the val split has a self-reenactment case: promotion has its ground truth"
    promotion = json.loads((repo / "metrics" / "promotion.json").read_text())
    assert promotion["action"] in {"promote", "reject"}
    assert promotion["compared"]["primary_metric"] == "hand_ssim"
    assert promotion["compared"]["candidate"]["hand_ssim"] == pytest.approx(val["ipa"]["hand_ssim"])
    # the cases folder is a dependency by content: editing a case makes sample (and evaluate) stale
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert any(d["path"] == str(root / "cases") for d in lock["stages"]["sample"]["deps"])


def test_kfp_local_run_on_cases(world, tmp_path, params_file):
    root, overrides = world
    tracked = [t for t in TINY if not t.startswith("tracking.")]  # MLflow in a SQLite store under tmp_path/.ipa
    pf = params_file(tracked + overrides + ["pipeline.betas=[600.0]", "pipeline.cpu_only=true"])
    env = {"OMP_NUM_THREADS": "1", "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(Path.home())}
    r = subprocess.run([sys.executable, "-m", "ipa_lib.cli", "pipeline", "--params", str(pf), "run-local",
                        "--workdir", str(tmp_path / "kfp")], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((tmp_path / "kfp" / "summary.json").read_text())
    _case_metrics(summary["eval"])
    assert summary["model_version"] == 1
    val = json.loads((Path(summary["best_evaluation"]) / "eval_val.json").read_text())
    assert "hand_ssim" in val["ipa"]
