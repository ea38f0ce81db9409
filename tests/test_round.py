"""The foundation loop on a tiny toy world: sample -> gate -> train -> evaluate, resume,
divergence handling, corrupt inputs. Real stages, real files, no mocks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, TINY, adapter_state

from ipa_lib.core.config import ConfigError


def test_sample_and_gate_outputs(gated):
    params, work = gated
    rows = [json.loads(l) for l in (work / "samples" / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == params.sample.num_clips
    assert len({r["sample_id"] for r in rows}) == len(rows)
    # per_pose=2: consecutive samples share a driving pose but not a seed
    assert rows[0]["pose_id"] == rows[1]["pose_id"] and rows[0]["seed"] != rows[1]["seed"]
    summary = json.loads((work / "gated" / "summary.json").read_text())
    kept = np.load(work / "gated" / "kept.npz")
    scored = np.load(work / "gated" / "scored.npz")
    score, keep = scored["hand_score"], scored["kept"]
    # TINY's threshold passes fewer clips than top_k: the threshold decides, and exactly the passing ones stay
    passing = score >= params.gate.threshold
    assert params.gate.min_kept <= passing.sum() < params.gate.top_k, np.sort(score)
    np.testing.assert_array_equal(keep, passing)
    assert summary["given"] == params.sample.num_clips and summary["kept"] == passing.sum()
    assert summary["pass_rate"] == pytest.approx(passing.mean())
    assert kept["video"].shape == (passing.sum(), 5, 16, 16, 3)
    # the kept ones are the best-scored ones
    assert score[keep].min() >= score[~keep].max()
    assert (work / "gated" / "report.md").exists()


def test_sampling_is_deterministic_and_batch_independent(tiny):
    from ipa_lib.models.factory import load_backend
    from ipa_lib.data.toyworld import toy_conditions
    from ipa_lib.models.generate import generate_clips

    params, _ = tiny
    backend = load_backend(params)
    cond = toy_conditions(5, 3, 5, 16, 1.0)
    a = generate_clips(backend, cond["reference"], cond["pose"], [1, 2, 3], 2, batch_size=3, progress=False)
    b = generate_clips(backend, cond["reference"], cond["pose"], [1, 2, 3], 2, batch_size=1, progress=False)
    np.testing.assert_array_equal(a, b)


def test_gate_refuses_too_few_kept(tiny):
    from ipa_lib.data.checks import DataCheckError
    from ipa_lib.stages.gate import gate
    from ipa_lib.stages.sample import sample

    params, work = tiny
    sample(params, work / "samples", progress=False)
    params.gate.threshold = 1.0  # a random tiny model never scores a perfect 1.0
    params.gate.min_kept = 5
    with pytest.raises(DataCheckError, match="kept"):
        gate(params, work / "samples", work / "gated", progress=False)
    assert not (work / "gated").exists()  # nothing partial passed on
    assert (work / "gated-report.md").exists()  # but the report is there


def test_train_reference_frozen_and_policy_moves(gated):
    from ipa_lib.models.factory import load_backend
    from ipa_lib.stages.train import train

    params, work = gated
    base_before = {k: v.clone() for k, v in load_backend(params).transformer.state_dict().items()}
    train(params, work / "gated", work / "adapter", progress=False)
    # base weights on disk untouched, adapter loads and changes the output (a LoRA whose keys
    # do not match loads without error and changes nothing)
    fresh = load_backend(params)
    for k, v in fresh.transformer.state_dict().items():
        torch.testing.assert_close(v, base_before[k])
    aligned = load_backend(params, adapter=work / "adapter")
    batch = {"reference": torch.rand(1, 3, 16, 16) * 2 - 1, "pose": torch.rand(1, 3, 5, 16, 16) * 2 - 1}
    x = torch.randn(1, 3, 5, 16, 16)
    t = torch.tensor([0.5])
    with torch.no_grad():
        out_base = fresh.predict_velocity(x, t, fresh.condition(batch))
        out_aligned = aligned.predict_velocity(x, t, aligned.condition(batch))
        with aligned.reference_model():
            out_ref = aligned.predict_velocity(x, t, aligned.condition(batch))
    assert not torch.allclose(out_base, out_aligned)
    torch.testing.assert_close(out_ref, out_base)  # reference = adapters disabled = the base
    log = [json.loads(l) for l in (work / "adapter" / "train_log.jsonl").read_text().splitlines()]
    assert {"loss", "policy_err", "reference_err", "gain", "implicit_acc", "logits", "grad_norm"} <= set(log[-1])
    assert log[0]["gain"] == pytest.approx(0.0, abs=1e-6)  # step 0: policy == reference


def _objective_on_all(backend, params, gated_dir: Path) -> float:
    """The training objective over the whole training set at four fixed (t, noise) draws."""
    from ipa_lib.stages.train import compute_loss, load_train_data

    data = load_train_data(gated_dir, params.train.loss)
    batch = data.batch(np.arange(len(data)))
    with torch.no_grad():
        return float(np.mean([compute_loss(backend, batch, params.train, torch.Generator().manual_seed(100 + i))[0].item()
                              for i in range(4)]))


@pytest.mark.parametrize("loss", ["sft", "sft_t2", "dpo", "kto", "ipa"])
def test_each_loss_lowers_its_objective(gated, loss):
    """A few steps of each loss lower that loss on the training set (same t and noise before
    and after), and the adapter it writes is no longer the zero update."""
    from ipa_lib.models.factory import load_backend
    from ipa_lib.stages.train import train

    params, work = gated
    params.train.loss = loss
    params.train.steps = 4
    params.train.dpo_min_margin = 0.0  # the tiny base's scores span 0.112..0.153
    train(params, work / "gated", work / f"adapter-{loss}", progress=False)
    start = load_backend(params)
    start.add_lora(params.train.lora_rank, params.train.lora_alpha, params.train.lora_targets)  # B = 0: the base
    trained = load_backend(params, adapter=work / f"adapter-{loss}")
    before, after = _objective_on_all(start, params, work / "gated"), _objective_on_all(trained, params, work / "gated")
    assert after < before, (loss, before, after)
    state = adapter_state(work / f"adapter-{loss}")
    assert any(k.endswith("lora_B.weight") for k in state)
    assert all(v.abs().max() > 0 for k, v in state.items() if k.endswith("lora_B.weight"))


def _ipa(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "ipa_lib.cli", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_killed_and_resumed_training_matches_uninterrupted(gated, params_file):
    """SIGKILL a real `ipa train` held right after its checkpoint of step N, resume, compare
    bit for bit with a clean run."""
    from ipa_lib.stages.train import HOLD_ENV

    params, work = gated
    every = 2
    hold_at = 2 * every - 1  # 0-based step 3: the second checkpoint (steps 1, 3, 5, 7 are checkpointed)
    assert (hold_at + 1) % every == 0
    p = params_file(TINY + [f"backend.base_model={params.backend.base_model}", "train.steps=8", f"train.checkpoint_every={every}"])
    common = ["--params", str(p), "--gated", str(work / "gated"), "--quiet"]
    clean = _ipa(["train", *common, "--out", str(work / "clean")], work)
    assert clean.wait(300) == 0, clean.stderr.read()

    marker = work / "held"
    victim = _ipa(["train", *common, "--out", str(work / "resumed")], work, {HOLD_ENV: f"{hold_at}:{marker}"})
    deadline = time.monotonic() + 300  # a bound on the wait, not a timing check
    while not marker.exists() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    held = marker.exists()
    victim.send_signal(signal.SIGKILL)
    victim.wait(30)
    assert held, f"train never reached the hold after step {hold_at} (exit {victim.returncode}):\n{victim.stderr.read()[-3000:]}"
    assert victim.returncode == -signal.SIGKILL
    assert not (work / "resumed").exists(), "killed before the end: no final adapter"
    ckpts = work / ".resumed.checkpoints"
    assert sorted(c.name for c in ckpts.glob("*/step-*") if (c / "state.pt").exists()) == ["step-000001", "step-000003"]
    resumed = _ipa(["train", *common, "--out", str(work / "resumed"), "--resume"], work)
    assert resumed.wait(300) == 0, resumed.stderr.read()

    a, b = adapter_state(work / "clean"), adapter_state(work / "resumed")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    log = [json.loads(l) for l in (work / "resumed" / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == list(range(8))  # steps 0-3 from the checkpoint, 4-7 after the resume


def test_divergence_stops_and_keeps_last_good_checkpoint(gated):
    from ipa_lib.stages.train import TrainingDiverged, train

    params, work = gated
    params.train.steps = 40
    params.train.checkpoint_every = 1
    params.train.lr = 1e4  # blows the adapter up within a few steps
    params.train.max_grad_norm = 1e9
    with pytest.raises(TrainingDiverged, match="last good checkpoint") as err:
        train(params, work / "gated", work / "adapter", progress=False)
    assert not (work / "adapter").exists()
    ckpt = Path(str(err.value).split("last good checkpoint: ")[1])
    assert (ckpt / "pytorch_lora_weights.safetensors").exists()
    state = adapter_state(ckpt)
    assert all(torch.isfinite(v).all() for v in state.values())


def test_corrupt_checkpoint_is_a_clear_error(gated):
    from ipa_lib.stages.train import train

    params, work = gated
    train(params, work / "gated", work / "adapter", progress=False, stop_after=2)
    ckpt = sorted((work / ".adapter.checkpoints").glob("*/step-*"))[-1]
    (ckpt / "state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"corrupt checkpoint"):
        train(params, work / "gated", work / "adapter", progress=False, resume=True)


def test_evaluate_writes_metrics_and_pictures(gated):
    from ipa_lib.stages.evaluate import METRICS, evaluate
    from ipa_lib.stages.train import train

    params, work = gated
    train(params, work / "gated", work / "adapter", progress=False)
    result = evaluate(params, work / "adapter", work / "eval", work / "metrics" / "eval.json", progress=False,
                      val_metrics_path=work / "metrics" / "eval_val.json")
    saved = json.loads((work / "metrics" / "eval.json").read_text())
    # the val poses (selection, promotion) are other poses than the test poses (the report)
    val = json.loads((work / "metrics" / "eval_val.json").read_text())
    assert set(val) == {"base", "ipa"} and set(val["ipa"]) == set(METRICS) and val != saved
    val_rows = json.loads((work / "eval" / "per_clip_val.json").read_text())
    test_poses = {r["pose"] for r in json.loads((work / "eval" / "per_clip.json").read_text())}
    assert test_poses.isdisjoint({r["pose"] for r in val_rows}) and len(val_rows) == 2 * params.evaluate.val_poses * len(params.evaluate.seeds)
    assert set(saved) == {"base", "ipa"} and set(saved["base"]) == set(METRICS)
    assert saved["base"] == result["base"]
    rows = json.loads((work / "eval" / "per_clip.json").read_text())
    assert len(rows) == 2 * params.evaluate.num_poses * len(params.evaluate.seeds)
    assert (work / "eval" / "side_by_side.png").stat().st_size > 0
    assert (work / "eval" / "side_by_side.gif").stat().st_size > 0


# ---- the CLI's errors ---------------------------------------------------------------------

def _run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ipa_lib.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_cli_bad_params_names_file_and_key(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("train:\n  beta: lots\n  betta: 3\n")
    r = _run_cli(["train", "--params", str(bad)], tmp_path)
    assert r.returncode == 2
    assert str(bad) in r.stderr and "train.beta" in r.stderr and "train.betta: unknown key" in r.stderr


def test_cli_missing_input_dir(tmp_path):
    r = _run_cli(["gate", "--params", str(REPO / "params.yaml"), "--set", "tracking.enabled=false",
                  "--samples", str(tmp_path / "nope"), "--out", str(tmp_path / "g")], tmp_path)
    assert r.returncode == 2
    assert "nope" in r.stderr and "not found" in r.stderr


def test_cli_corrupt_base_model(tmp_path):
    base = tmp_path / "base" / "transformer"
    base.mkdir(parents=True)
    (base / "config.json").write_text("{}")
    (base / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00" * 10)
    r = _run_cli(["sample", "--params", str(REPO / "params.yaml"), "--set", "tracking.enabled=false",
                  "--base-model", str(tmp_path / "base"), "--out", str(tmp_path / "s")], tmp_path)
    assert r.returncode == 2 and "cannot load weights" in r.stderr


def test_params_validation():
    from conftest import tiny_params

    with pytest.raises(ConfigError, match=r"toy\.frames"):
        tiny_params(["toy.frames=6"])
    with pytest.raises(ConfigError, match=r"pipeline\.betas"):
        tiny_params(["pipeline.betas=[-1]"])
    with pytest.raises(ConfigError, match=r"gate\.min_kept"):
        tiny_params(["gate.min_kept=50", "gate.top_k=10"])
    with pytest.raises(ConfigError, match="must look like"):
        tiny_params(["train.beta"])


def test_second_round_starts_from_the_aligned_model(gated):
    """backend.init_adapter merges the previous round's adapter: the new reference is the
    aligned model, and a fresh adapter trains on top of it."""
    from ipa_lib.models.factory import load_backend
    from ipa_lib.stages.train import train

    params, work = gated
    train(params, work / "gated", work / "round1", progress=False)
    aligned = load_backend(params, adapter=work / "round1")
    params.backend.init_adapter = str(work / "round1")
    merged = load_backend(params)
    batch = {"reference": torch.rand(2, 3, 16, 16) * 2 - 1, "pose": torch.rand(2, 3, 5, 16, 16) * 2 - 1}
    x, t = torch.randn(2, 3, 5, 16, 16), torch.tensor([0.3, 0.7])
    with torch.no_grad():
        want = aligned.predict_velocity(x, t, aligned.condition(batch))
        got = merged.predict_velocity(x, t, merged.condition(batch))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    train(params, work / "gated", work / "round2", progress=False)
    second = load_backend(params, adapter=work / "round2")
    with torch.no_grad(), second.reference_model():
        ref = second.predict_velocity(x, t, second.condition(batch))
    torch.testing.assert_close(ref, want, rtol=1e-4, atol=1e-5)


def test_a_spike_must_also_exceed_the_first_loss():
    """A saturated DPO loss (~1e-4) that swings back to 0.59 < log 2 is not a divergence; a
    loss far above both the running median and the first step's loss is; NaN always is."""
    from ipa_lib.stages.train import is_divergence

    saturated = [0.693] + [1e-4] * 30
    assert not is_divergence(0.59, saturated, 1000.0)
    assert is_divergence(5.0, saturated, 1000.0)
    assert not is_divergence(5.0, saturated[:10], 1000.0)  # too few losses for a median yet
    assert is_divergence(float("nan"), [], 50.0) and is_divergence(float("inf"), saturated, 50.0)
