"""Tracking: URI resolution, bounded retries, one round with nested stage runs, DVC/git tags,
datasets, artifacts, curves; against a real `mlflow server` and the default local store."""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from ipa_lib.core.config import Params, TrackingConfig
from ipa_lib.mlops.tracking import (
    TrackingUnavailable,
    check_server,
    default_tracking_uri,
    dvc_tags,
    read_lineage,
    redact_uri,
    resolve_tracking_uri,
    stage_run,
    tree_digest,
)

DVC_YAML = """\
stages:
  sample:
    cmd: ipa sample
    deps: [ipa_lib, models/base]
    outs: [data/samples]
  gate:
    cmd: ipa gate
    deps: [ipa_lib, data/samples]
    outs: [data/gated]
"""

DVC_LOCK = """\
schema: '2.0'
stages:
  pretrain:
    cmd: ipa pretrain
    outs:
    - path: models/base
      hash: md5
      md5: 1111aaaa.dir
  sample:
    cmd: ipa sample
    deps:
    - path: models/base
      hash: md5
      md5: 1111aaaa.dir
    outs:
    - path: data/samples
      hash: md5
      md5: 2222bbbb.dir
"""


@pytest.fixture()
def repo(tmp_path: Path) -> Path:
    """A tiny git repo with dvc.yaml / dvc.lock, standing in for the project root."""
    (tmp_path / "dvc.yaml").write_text(DVC_YAML)
    (tmp_path / "dvc.lock").write_text(DVC_LOCK)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([*git, "add", "-A"], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-qm", "init"], cwd=tmp_path, check=True)
    return tmp_path


def _params(uri: str | None, **kw) -> Params:
    return Params(tracking=TrackingConfig(uri=uri, experiment=f"t-{uuid.uuid4().hex[:8]}", **kw))


def _client(uri: str):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=uri)


# ----------------------------------------------------------------------------- no server


def test_uri_precedence(monkeypatch, tmp_path):
    cfg = TrackingConfig(uri="http://from-params:5000")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://from-env:5000")
    assert resolve_tracking_uri(cfg, tmp_path) == "http://from-env:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert resolve_tracking_uri(cfg, tmp_path) == "http://from-params:5000"
    local = resolve_tracking_uri(TrackingConfig(), tmp_path)
    assert local == default_tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/.ipa/mlflow.db"


def test_unreachable_server_fails_fast_with_clear_message(monkeypatch, repo, free_port):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"http://127.0.0.1:{free_port}"
    t0 = time.monotonic()
    with pytest.raises(TrackingUnavailable, match=r"unreachable after 3 attempt\(s\)") as err:
        check_server(uri, max_retries=2, timeout_s=1, backoff_s=0.1)
    assert uri in str(err.value) and "MLFLOW_TRACKING_URI" in str(err.value)
    ran = []
    with pytest.raises(TrackingUnavailable):
        with stage_run(_params(uri, max_retries=1), "sample", root=repo):
            ran.append(1)
    assert not ran, "the stage body must not run without its tracking store"
    assert time.monotonic() - t0 < 15


def test_disabled_tracking_still_writes_lineage(repo):
    params = Params(tracking=TrackingConfig(enabled=False))
    with stage_run(params, "sample", None, lineage_out=repo / "data/samples", root=repo) as run:
        run.log_metrics({"x": 1.0})
        run.log_dataset(repo, "anything")
    lin = read_lineage(repo / "data/samples")
    assert lin["round_run_id"] is None and lin["tracking"] == "disabled"


def test_dvc_tags_link_inputs_to_upstream_outputs(repo):
    tags = dvc_tags(repo, "gate")
    assert tags["ipa.dvc.stage"] == "gate"
    assert len(tags["ipa.dvc.lock_sha256"]) == 64
    assert tags["ipa.dvc.dep.data/samples"] == "2222bbbb.dir"  # from the sample stage's outs
    assert "ipa.dvc.dep.ipa_lib" not in tags  # source code: covered by the git commit
    assert dvc_tags(repo, "sample")["ipa.dvc.dep.models/base"] == "1111aaaa.dir"


def test_tree_digest_ignores_lineage(tmp_path):
    (tmp_path / "a.npz").write_bytes(b"abc")
    d1 = tree_digest(tmp_path)
    (tmp_path / "lineage.json").write_text("{}")
    assert tree_digest(tmp_path) == d1 and d1["files"] == 1 and d1["bytes"] == 3
    (tmp_path / "a.npz").write_bytes(b"abd")
    assert tree_digest(tmp_path)["sha256"] != d1["sha256"]


def test_default_local_store_under_dot_ipa(monkeypatch, repo):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = _params(None)
    report = repo / "reports"
    report.mkdir()
    (report / "gate.md").write_text("# gate\n")
    with stage_run(params, "gate", None, root=repo) as run:
        run.log_artifacts(report, "reports")
        run.log_metrics({"gate/kept": 12})
    assert (repo / ".ipa" / "mlflow.db").is_file()
    assert list((repo / ".ipa" / "mlartifacts").rglob("gate.md")), "artifacts must land in .ipa/mlartifacts"
    client = _client(default_tracking_uri(repo))
    assert client.get_run(run.run_id).data.metrics["gate/kept"] == 12


# ----------------------------------------------------------------------------- real server


def test_round_with_nested_stages(monkeypatch, mlflow_server, repo):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = _params(mlflow_server.uri)
    client = _client(mlflow_server.uri)
    base, samples, gated = repo / "models/base", repo / "data/samples", repo / "data/gated"
    for d in (base, samples, gated):
        d.mkdir(parents=True)
    (base / "weights.bin").write_bytes(b"w" * 100)
    (samples / "shard-000.npz").write_bytes(b"s" * 64)
    (gated / "shard-000.npz").write_bytes(b"g" * 32)
    (repo / "report.md").write_text("kept 12 of 16\n")

    with stage_run(params, "pretrain", None, lineage_out=base, root=repo) as run:
        for step in range(3):
            run.log_metrics({"pretrain/loss": 1.0 / (step + 1)}, step=step)
        run.log_outputs(base)
    with stage_run(params, "sample", read_lineage(base), lineage_out=samples, root=repo) as run:
        run.log_dataset(samples, name="samples", context="generated")
    with stage_run(params, "gate", [read_lineage(base), read_lineage(samples)], lineage_out=gated, root=repo) as run:
        run.log_dataset(samples, name="samples", context="input")
        run.log_dataset(gated, name="gated", context="training")
        run.log_artifact(repo / "report.md", "gate")
        run.log_metrics({"gate/pass_rate": 0.75}, to_round=True)

    lin = read_lineage(gated)
    assert set(lin["stages"]) == {"pretrain", "sample", "gate"}
    round_id = lin["round_run_id"]
    assert read_lineage(base)["round_run_id"] == read_lineage(samples)["round_run_id"] == round_id

    parent = client.get_run(round_id)
    assert parent.data.tags["ipa.kind"] == "round" and parent.info.status == "FINISHED"
    assert parent.data.params["train.beta"] == "600.0"  # flattened config
    assert parent.data.metrics["gate/pass_rate"] == 0.75
    children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{round_id}'")
    assert sorted(r.data.tags["ipa.stage"] for r in children) == ["gate", "pretrain", "sample"]

    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    gate = client.get_run(lin["stages"]["gate"])
    tags = gate.data.tags
    assert tags["mlflow.source.git.commit"] == head and tags["ipa.git.dirty"] == "false"
    assert tags["ipa.dvc.stage"] == "gate" and tags["ipa.dvc.dep.data/samples"] == "2222bbbb.dir"
    assert tags["ipa.upstream.sample"] == lin["stages"]["sample"]
    assert gate.data.params["gate.threshold"] == "0.75" and gate.info.status == "FINISHED"
    # dataset lineage: the digest of data/samples links the sample and gate runs
    inputs = {(d.dataset.name, {t.key: t.value for t in d.tags}["mlflow.data.context"]): d.dataset for d in gate.inputs.dataset_inputs}
    assert set(inputs) == {("samples", "input"), ("gated", "training")}
    sample_run = client.get_run(lin["stages"]["sample"])
    assert sample_run.inputs.dataset_inputs[0].dataset.digest == inputs[("samples", "input")].digest
    assert json.loads(inputs[("gated", "training")].source)["uri"].endswith("data/gated")
    assert [a.path for a in client.list_artifacts(gate.info.run_id, "gate")] == ["gate/report.md"]
    # curves by step, output hashes
    hist = client.get_metric_history(lin["stages"]["pretrain"], "pretrain/loss")
    assert [(m.step, m.value) for m in sorted(hist, key=lambda m: m.step)] == [(0, 1.0), (1, 0.5), (2, 1 / 3)]
    pre = client.get_run(lin["stages"]["pretrain"]).data.tags
    assert pre["ipa.outs.models/base.sha256"] == tree_digest(base)["sha256"]

    # DVC re-runs gate (say, a new threshold): a new round linked to the old one
    with stage_run(params, "gate", read_lineage(samples), lineage_out=gated, root=repo):
        pass
    lin2 = read_lineage(gated)
    assert lin2["round_run_id"] != round_id
    assert client.get_run(lin2["round_run_id"]).data.tags["ipa.previous_round"] == round_id
    assert client.get_run(lin2["stages"]["gate"]).data.tags["ipa.upstream.sample"] == lin["stages"]["sample"]


def test_failed_stage_marks_runs_failed_and_writes_no_lineage(monkeypatch, mlflow_server, repo):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = _params(mlflow_server.uri)
    out = repo / "data/gated"
    with pytest.raises(ZeroDivisionError):
        with stage_run(params, "gate", None, lineage_out=out, root=repo) as run:
            1 / 0
    client = _client(mlflow_server.uri)
    assert client.get_run(run.run_id).info.status == "FAILED"
    assert client.get_run(run.round_run_id).info.status == "FAILED"
    assert read_lineage(out) is None


def test_round_run_for_single_process_drivers(monkeypatch, mlflow_server, repo):
    from ipa_lib.mlops.tracking import round_run

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = _params(mlflow_server.uri)
    with round_run(params, "kfp-round", root=repo) as rnd:
        with stage_run(params, "sample", rnd.lineage, root=repo) as s1:
            pass
        with stage_run(params, "gate", s1.lineage, root=repo) as s2:
            pass
    assert s1.round_run_id == s2.round_run_id == rnd.run_id
    assert s2.lineage["stages"] == {"sample": s1.run_id, "gate": s2.run_id}
    parent = _client(mlflow_server.uri).get_run(rnd.run_id)
    assert parent.info.run_name == "kfp-round" and parent.info.status == "FINISHED"


def test_round_numbers_are_unique_under_concurrency(monkeypatch, mlflow_server, repo):
    """Rounds opened at the same time get distinct consecutive numbers (the experiment's counter
    tag, advanced under a registry lock); an experiment without the tag continues after its
    newest round."""
    import threading

    from ipa_lib.mlops.tracking import TAG_ROUND_COUNTER, round_run

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = _params(mlflow_server.uri)
    names, errors, barrier = [], [], threading.Barrier(4)

    def open_round() -> None:
        try:
            barrier.wait()
            with round_run(params, root=repo) as rnd:
                names.append(rnd.lineage["round_name"])
        except Exception as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=open_round) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and sorted(names) == ["round-001", "round-002", "round-003", "round-004"]
    client = _client(mlflow_server.uri)
    exp = client.get_experiment_by_name(params.tracking.experiment)
    assert exp.tags[TAG_ROUND_COUNTER] == "4"
    assert not client.search_registered_models(f"name = 'ipa-experiment-{exp.experiment_id}.round-lock'")  # released
    client.delete_experiment_tag(exp.experiment_id, TAG_ROUND_COUNTER)  # an experiment from before the counter
    with round_run(params, root=repo) as rnd:
        assert rnd.lineage["round_name"] == "round-005"


def test_redact_uri_drops_credentials_and_keeps_local_paths():
    assert redact_uri("http://alice:s3cret@mlflow.example:5000/x") == "http://mlflow.example:5000/x"
    assert redact_uri("sqlite:////work/repo/.ipa/mlflow.db") == "sqlite:////work/repo/.ipa/mlflow.db"
    assert redact_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
