"""Retries resume: checkpoints keyed by what decides them (train params, gated data, base model,
code), so a `dvc repro` after a killed `train` continues from its last checkpoint to the adapter an
uninterrupted run writes, and a changed param starts afresh. Real DVC repos, real SIGKILLs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import adapter_state, TINY, sh

ADAPTER = Path("models") / "adapter"
CHECKPOINTS = Path("models") / ".adapter.checkpoints"
HOLD_AT = 3  # TINY: 6 steps, a checkpoint every 2 -> steps 1, 3, 5; the kill lands after step 3's


def _kill_dvc_train(repo: Path, env: dict) -> None:
    """`dvc repro train` held right after the checkpoint of step HOLD_AT, then SIGKILL to its
    whole process group (dvc and the `ipa train` it runs), as a preempted node does."""
    from ipa_lib.stages.train import HOLD_ENV

    marker = repo.parent / f"{repo.name}-held"
    proc = subprocess.Popen(["dvc", "repro", "train"], cwd=repo, env={**env, HOLD_ENV: f"{HOLD_AT}:{marker}"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + 600  # a bound on the wait, not a timing check
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    held = marker.exists()
    os.killpg(proc.pid, signal.SIGKILL)
    out = proc.communicate(timeout=60)[0]
    assert held, f"train never reached the hold after step {HOLD_AT} (exit {proc.returncode}):\n{out[-3000:]}"
    assert not (repo / ADAPTER).exists(), "killed before the end: no adapter"
    keys = [p for p in (repo / CHECKPOINTS).iterdir() if p.is_dir()]
    assert len(keys) == 1 and (keys[0] / "key.json").is_file(), keys
    assert sorted(p.name for p in keys[0].glob("step-*")) == ["step-000001", "step-000003"]


def _summary(repo: Path) -> dict:
    return json.loads((repo / ADAPTER / "train_summary.json").read_text())


def _log_steps(repo: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (repo / ADAPTER / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_killed_dvc_train_resumes_to_the_uninterrupted_adapter(scratch_dvc_repo, tmp_path):
    """SIGKILL `dvc repro train` after step 3's checkpoint; a plain `dvc repro` resumes at step 4
    and writes exactly (atol=0) the adapter that `dvc repro --force train` (from step 0) writes."""
    repo, env = scratch_dvc_repo(TINY)
    _kill_dvc_train(repo, env)
    key = next(p.name for p in (repo / CHECKPOINTS).iterdir())

    sh(["dvc", "repro"], repo, env)
    summary = _summary(repo)
    assert summary["resumed_from"] == HOLD_AT and summary["checkpoint_key"] == key
    assert _log_steps(repo) == list(range(6))  # 0-3 restored with the checkpoint, 4-5 after the resume
    assert not (repo / CHECKPOINTS / key).exists(), "a finished run removes its checkpoints"
    metrics = json.loads((repo / "metrics" / "train.json").read_text())
    assert "resumed_from" not in metrics and "checkpoint_key" not in metrics  # DVC metrics: the same either way
    resumed = tmp_path / "resumed"
    shutil.copytree(repo / ADAPTER, resumed)

    sh(["dvc", "repro", "--force", "train"], repo, env)  # the uninterrupted run
    clean = _summary(repo)
    assert clean["resumed_from"] is None and clean["checkpoint_key"] == key
    a, b = adapter_state(repo / ADAPTER), adapter_state(resumed)
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0)
    assert (repo / ADAPTER / "train_log.jsonl").read_text() == (resumed / "train_log.jsonl").read_text()


@pytest.mark.slow
def test_changed_param_after_the_kill_starts_afresh(scratch_dvc_repo):
    """After the kill, train.lr changes: `ipa train --resume` refuses, naming the field, and
    `dvc repro` starts at step 0 under a new key, deleting the stale checkpoints."""
    repo, env = scratch_dvc_repo(TINY)
    _kill_dvc_train(repo, env)
    old = next(p.name for p in (repo / CHECKPOINTS).iterdir())
    params = yaml.safe_load((repo / "params.yaml").read_text())
    lr = params["train"]["lr"]
    params["train"]["lr"] = lr * 2
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    strict = subprocess.run([sys.executable, "-m", "ipa_lib.cli", "train", "--resume", "--quiet"], cwd=repo, env=env,
                            capture_output=True, text=True, timeout=600)
    assert strict.returncode == 2, strict.stderr[-3000:]
    assert f"train.lr: {lr} -> {lr * 2}" in strict.stderr and "no checkpoint of this run's key" in strict.stderr
    assert (repo / CHECKPOINTS / old / "step-000003").is_dir(), "a refused --resume deletes nothing"

    sh(["dvc", "repro"], repo, env)
    summary = _summary(repo)
    assert summary["resumed_from"] is None and summary["checkpoint_key"] != old
    assert _log_steps(repo) == list(range(6))
    assert not (repo / CHECKPOINTS / old).exists()


# ---- in-process: the key, the roots, a corrupt checkpoint ---------------------------------

def test_key_covers_what_decides_the_adapter(gated, tmp_path):
    """Paths, logging and checkpoint cadence leave the key alone; lr, beta, seed, the gated
    data's bytes and the base model's bytes change it; key.json-style `what` names each part."""
    from ipa_lib.stages.train import checkpoint_key

    params, work = gated
    key, what = checkpoint_key(params, work / "gated")
    assert set(what) == {"version", "train", "backend", "gated", "base_model", "init_adapter", "code"}
    assert "lr" in what["train"] and "out" not in what["train"] and "log_every" not in what["train"]

    def key_with(**changes) -> str:
        p = params.model_copy(deep=True)
        for dotted, value in changes.items():
            section, field = dotted.split("__")
            setattr(getattr(p, section), field, value)
        return checkpoint_key(p, work / "gated")[0]

    for same in ({"train__out": "elsewhere"}, {"train__log_every": 7}, {"train__checkpoint_every": 5},
                 {"train__metrics": "m.json"}, {"backend__device": "cpu"}):
        assert key_with(**same) == key, same
    for other in ({"train__lr": params.train.lr * 2}, {"train__beta": 200.0}, {"train__seed": 1}, {"train__steps": 7}):
        assert key_with(**other) != key, other

    copy = tmp_path / "gated-copy"  # the same bytes elsewhere: the same key
    shutil.copytree(work / "gated", copy)
    assert checkpoint_key(params, copy)[0] == key
    (copy / "summary.json").write_text((copy / "summary.json").read_text() + " ")
    assert checkpoint_key(params, copy)[0] != key
    base = tmp_path / "base-copy"
    shutil.copytree(params.backend.base_model, base)
    assert checkpoint_key(params, work / "gated", base)[0] == key
    weights = next(base.rglob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert checkpoint_key(params, work / "gated", base)[0] != key


def test_shared_root_keeps_other_keys_private_root_does_not(gated, tmp_path):
    """A given checkpoint_root (the workspace PVC) is shared: a run there leaves other keys'
    checkpoints alone (another beta training at the same time) and resumes its own; the default
    root beside the adapter deletes a stale key when a run starts afresh."""
    from ipa_lib.stages.train import train

    params, work = gated
    shared = tmp_path / "pvc" / "checkpoints"
    other = params.model_copy(deep=True)
    other.train.beta = 200.0
    stopped = train(other, work / "gated", work / "a200", progress=False, stop_after=2, checkpoint_root=shared)
    assert Path(stopped["checkpoint"]).parent.parent == shared
    result = train(params, work / "gated", work / "a600", progress=False, checkpoint_root=shared)
    assert result["resumed_from"] is None
    assert [p.name for p in shared.iterdir()] == [Path(stopped["checkpoint"]).parent.name]  # beta 200's, still there
    resumed = train(other, work / "gated", work / "a200", progress=False, checkpoint_root=shared)
    assert resumed["resumed_from"] == 1 and list(shared.iterdir()) == []

    train(other, work / "gated", work / "b", progress=False, stop_after=2)  # default root: .b.checkpoints
    result = train(params, work / "gated", work / "b", progress=False)
    assert result["resumed_from"] is None and not any((work / ".b.checkpoints").iterdir())


def test_corrupt_latest_checkpoint_is_a_clear_error_and_fresh_recovers(gated):
    """Chosen: an error naming the checkpoint, not a silent fall back to the previous one
    (checkpoints are written by one rename, so only a damaged disk leaves a bad one). The CLI
    exits 2 with that message; `--fresh` deletes the key's checkpoints and trains from step 0."""
    from ipa_lib.stages.train import train

    params, work = gated
    train(params, work / "gated", work / "adapter", progress=False, stop_after=4)  # steps 0-3: checkpoints 1, 3
    latest = sorted((work / ".adapter.checkpoints").glob("*/step-*"))[-1]
    assert latest.name == "step-000003"
    (latest / "state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=rf"{latest}: corrupt checkpoint .*--fresh"):
        train(params, work / "gated", work / "adapter", progress=False)
    p = work / "params.yaml"
    p.write_text(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    common = [sys.executable, "-m", "ipa_lib.cli", "train", "--params", str(p), "--gated", str(work / "gated"),
              "--out", str(work / "adapter"), "--quiet"]
    r = subprocess.run(common, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "corrupt checkpoint" in r.stderr and str(latest) in r.stderr, r.stderr[-3000:]
    r = subprocess.run([*common, "--fresh"], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((work / "adapter" / "train_summary.json").read_text())["resumed_from"] is None
