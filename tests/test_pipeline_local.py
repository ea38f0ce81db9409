"""`ipa pipeline run-local`: the whole DAG through kfp.local agrees with the library.

The reference is what `dvc repro` runs, the stage functions called in-process with the
same params and seeds (few clips, steps and poses; one beta); `run-local` must reproduce
its `eval.json` to 1e-6 and go all the way through register and promote.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ipa_lib.orchestration import kfp as kfp_cli

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "models" / "base"
BETA = 600.0
SMALL = {
    "sample": {"num_clips": 8, "per_pose": 2, "num_inference_steps": 2, "batch_size": 8},
    "gate": {"threshold": 0.0, "top_k": 8, "min_kept": 2},
    "train": {"steps": 3, "batch_size": 2, "log_every": 1, "checkpoint_every": 3, "beta": BETA},
    "evaluate": {"num_poses": 2, "val_poses": 2, "seeds": [0], "num_inference_steps": 2},
    # hand_pass_rate is 1.0 for both models at threshold 0: decide on hand_quality so the
    # promotion branch runs too
    "promote": {"primary_metric": "hand_quality", "margin": 0.0},
    "pipeline": {"betas": [BETA]},
}


def _small_params(tmp_path: Path) -> Path:
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in SMALL.items():
        data.setdefault(section, {}).update(values)
    data["backend"]["base_model"] = str(BASE)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _reference(params_path: Path, out: Path) -> dict:
    """The DVC stages' functions, in this process."""
    from ipa_lib.core.config import load_params
    from ipa_lib.stages.evaluate import evaluate
    from ipa_lib.stages.gate import gate
    from ipa_lib.stages.sample import sample
    from ipa_lib.stages.train import train

    p = load_params(params_path)
    sample(p, out / "samples", str(BASE), progress=False)
    gate(p, out / "samples", out / "gated", progress=False)
    train(p, out / "gated", out / "adapter", str(BASE), progress=False)
    result = evaluate(p, out / "adapter", out / "eval", out / "metrics" / "eval.json", str(BASE), progress=False,
                      val_metrics_path=out / "metrics" / "eval_val.json")
    return {"base": result["base"], "ipa": result["ipa"], "val": result["val"]}


@pytest.mark.slow
@pytest.mark.skipif(not (BASE / "toy_backend.json").is_file(), reason="models/base missing (committed to git: git checkout -- models/base)")
def test_run_local_matches_the_library(tmp_path):
    import torch

    params_path = _small_params(tmp_path)
    reference = _reference(params_path, tmp_path / "reference")

    work = tmp_path / "kfp"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())  # same arithmetic as the reference
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "ipa_lib.cli", "pipeline", "--params", str(params_path), "run-local", "--workdir", str(work)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    seconds = time.monotonic() - started
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    print(f"run-local took {seconds:.0f} s")

    summary = json.loads((work / "summary.json").read_text())
    assert summary["best_beta"] == BETA and summary["model_version"] == 1
    for model in ("base", "ipa"):
        for k, want in reference[model].items():  # the test poses: the report's numbers
            assert summary["eval"][model][k] == pytest.approx(want, abs=1e-6, rel=0), f"{model}.{k}"

    run_root = Path(summary["best_evaluation"]).parents[1]
    tasks = {p.name for p in run_root.iterdir()}
    assert {"merge-shards", "gate", "select-best", "register", "decide-promotion"} <= tasks
    (shard,) = [p for p in run_root.glob("for-loop-*") if (p / "sample-shard").is_dir()]  # the toy store: one shard
    for f in ("shard-000.npz", "manifest.jsonl"):  # merge-shards writes the store `ipa sample` writes
        assert (run_root / "merge-shards" / "samples" / f).read_bytes() == (tmp_path / "reference" / "samples" / f).read_bytes(), f
    (iteration,) = [p for p in run_root.glob("for-loop-*") if p != shard]
    assert {p.name for p in iteration.iterdir()} == {"train", "evaluate"}
    # the KFP UI's view of the run: metrics, the HTML side-by-side, the decisions
    metrics = json.loads((iteration / "evaluate" / "executor_output.json").read_text())["artifacts"]["metrics"]
    logged = metrics["artifacts"][0]["metadata"]
    assert logged["eval/hand_quality"] == pytest.approx(reference["ipa"]["hand_quality"], abs=1e-6)
    assert logged["eval/base/psnr"] == pytest.approx(reference["base"]["psnr"], abs=1e-6)
    html = (iteration / "evaluate" / "report").read_text()
    assert "data:image/png;base64," in html
    assert "**(best)**" in (run_root / "select-best" / "report").read_text()
    # the decision is made on the val poses (3 training steps: a coin flip which way it goes);
    # the If branch must follow it: promote runs exactly when decide-promotion says it would
    decided = (run_root / "decide-promotion" / "report").read_text()
    assert ("would be promoted" in decided) == ("promote" in tasks), decided
    if "promote" in tasks:
        promoted = (run_root / "promote" / "report").read_text()
        assert "v1: PROMOTED" in promoted and "champion: none -> v1" in promoted
    else:
        assert "would be rejected" in decided
    registration = json.loads((run_root / "register" / "registration").read_text())
    # the registered numbers are the val poses': what promotion decides on
    assert registration["version"] == 1 and registration["metrics"]["ipa"]["hand_quality"] == pytest.approx(
        reference["val"]["ipa"]["hand_quality"], abs=1e-6)

    # MLflow: every task ran in its stage run under one round run, like `dvc repro`'s stages
    stages = registration["lineage"]["stages"]
    assert set(stages) == {"sample", "gate", f"train@{BETA:g}", f"evaluate@{BETA:g}", "register"}, stages
    from mlflow.tracking import MlflowClient

    from ipa_lib.mlops.tracking import default_tracking_uri

    client = MlflowClient(default_tracking_uri(tmp_path))
    round_id = registration["lineage"]["round_run_id"]
    for stage, run_id in stages.items():
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == round_id, stage
    train_run = client.get_run(stages[f"train@{BETA:g}"])
    assert train_run.data.params["train.beta"] == f"{BETA}" and "train/loss" in train_run.data.metrics
    assert client.get_run(stages[f"evaluate@{BETA:g}"]).data.metrics["evaluate/ipa/hand_quality"] == pytest.approx(
        reference["ipa"]["hand_quality"], abs=1e-6)


@pytest.mark.slow
@pytest.mark.skipif(not (BASE / "toy_backend.json").is_file(), reason="models/base missing (committed to git: git checkout -- models/base)")
def test_failed_task_stops_the_run_with_its_name(tmp_path):
    """The gate's data checks fail (nothing reaches threshold 1.0): exit 1, the task named."""
    params_path = _small_params(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.run(
        [sys.executable, "-m", "ipa_lib.cli", "pipeline", "--params", str(params_path), "--set", "gate.threshold=1.0",
         "--set", "sample.num_clips=4", "run-local", "--workdir", str(tmp_path / "kfp")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    err = proc.stderr.strip().splitlines()[-1]
    assert "Pipeline 'ipa-round' finished with status FAILURE" in err and "'gate'" in err, err
    assert "DataCheckError" in proc.stdout  # the task's own log, printed above
    assert not (tmp_path / "kfp" / "summary.json").exists()
    # the exit handler ran and marked the MLflow round FAILED, naming the task
    from mlflow.tracking import MlflowClient

    from ipa_lib.mlops.tracking import TAG_KFP_RUN, default_tracking_uri

    client = MlflowClient(default_tracking_uri(tmp_path))
    (exp,) = [e for e in client.search_experiments() if e.name == "ipa-align"]
    (round_,) = client.search_runs([exp.experiment_id], "tags.`ipa.kind` = 'round'")
    assert round_.info.status == "FAILED" and round_.data.tags["ipa.failed_task"] == "gate"
    assert round_.data.tags["ipa.failure"].startswith("KFP run FAILED") and round_.data.tags[TAG_KFP_RUN]
    (record,) = (tmp_path / "kfp" / "outputs").glob("ipa-round-*/record-failure/executor_output.json")
    assert json.loads(json.loads(record.read_text())["parameterValues"]["Output"])[0]["failed_task"] == "gate"


def test_fail_round_marks_the_round_and_killed_stages(mlflow_server, tmp_path, monkeypatch):
    """`fail_round` (the exit handler's library call) against a real tracking server: the
    round tagged with the KFP run ends FAILED naming the stage run left RUNNING (a killed
    pod); a finished stage and another KFP run's round are left alone."""
    from mlflow.tracking import MlflowClient

    from ipa_lib.core.config import load_params
    from ipa_lib.mlops import tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = load_params(ROOT / "params.yaml", [f"tracking.uri={mlflow_server.uri}", f"tracking.experiment=fail-{tmp_path.name}"])
    rounds = {}
    for kfp_run in ("kfp-a", "kfp-b"):
        with tracking.stage_run(params, "sample", None, round_tags={tracking.TAG_KFP_RUN: kfp_run}) as run:
            rounds[kfp_run] = run.round_run_id
    client = MlflowClient(mlflow_server.uri)
    exp = client.get_experiment_by_name(params.tracking.experiment).experiment_id
    killed = client.create_run(exp, tags={tracking.TAG_KIND: "stage", tracking.TAG_STAGE: "train@600",
                                          tracking.TAG_PARENT: rounds["kfp-a"]}).info.run_id
    assert tracking.fail_round(params, "kfp-none", "x") == []
    (done,) = tracking.fail_round(params, "kfp-a", "KFP run FAILED: exit-handler-1: pod deleted")
    assert done["round_run_id"] == rounds["kfp-a"] and done["failed_task"] == "train@600"
    r = client.get_run(rounds["kfp-a"])
    assert r.info.status == "FAILED" and r.data.tags["ipa.failed_task"] == "train@600"
    assert r.data.tags["ipa.failure"] == "KFP run FAILED: exit-handler-1: pod deleted"
    assert client.get_run(killed).info.status == "FAILED"
    (sample,) = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{rounds['kfp-a']}' and tags.`ipa.stage` = 'sample'")
    assert sample.info.status == "FINISHED"
    other = client.get_run(rounds["kfp-b"])
    assert other.info.status == "FINISHED" and "ipa.failed_task" not in other.data.tags
    # a failure in a task without a stage run (all stage runs finished): the reason names it
    (only,) = tracking.fail_round(params, "kfp-b", "KFP run FAILED: select-best: boom")
    assert only["failed_task"] == "a task without a stage run (KFP run FAILED: select-best: boom)"


# ---- bad input (no DAG runs) -----------------------------------------------------------------


def _args(params: Path, workdir: Path, sets: list[str] | None = None):
    return argparse.Namespace(params=str(params), set=sets or [], pipeline_cmd="run-local", workdir=str(workdir))


def test_missing_base_model(tmp_path, capsys):
    params = _small_params(tmp_path)
    assert kfp_cli.main(_args(params, tmp_path / "w", ["backend.base_model=/nonexistent/base"])) == 2
    assert "backend.base_model: /nonexistent/base is not a folder" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize(("sets", "needle"), [
    (["pipeline.betas=[]"], "pipeline.betas"),
    (["pipeline.betas=[1, 1]"], "must not repeat"),
    (["sample.num_clips=0"], "sample.num_clips"),
    (["gate.min_kept=100"], "gate.min_kept (100) > gate.top_k"),
])
def test_bad_params(tmp_path, capsys, sets, needle):
    assert kfp_cli.main(_args(_small_params(tmp_path), tmp_path / "w", sets)) == 2
    assert needle in capsys.readouterr().err
