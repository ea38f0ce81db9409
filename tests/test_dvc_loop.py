"""The real DVC pipeline in a temporary git+DVC repo: `dvc repro` runs the round end to end,
a second `dvc repro` does nothing, and `dvc exp run -S` reruns only what a param touches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import TINY, sh as _sh

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dvc_repo(scratch_dvc_repo):
    """The TINY round with tracking left on (local SQLite): the stages record lineage."""
    return scratch_dvc_repo([t for t in TINY if not t.startswith("tracking.")])


def test_repro_runs_the_round_then_nothing(dvc_repo):
    repo, env = dvc_repo
    first = _sh(["dvc", "repro"], repo, env)
    for stage in ("sample", "gate", "train", "evaluate", "register", "promote"):
        assert f"Running stage '{stage}'" in first.stdout
    metrics = json.loads((repo / "metrics" / "eval.json").read_text())
    assert set(metrics) == {"base", "ipa"}
    assert 0.0 <= metrics["ipa"]["hand_pass_rate"] <= 1.0
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert {"sample", "gate", "train", "evaluate", "register", "promote"} <= set(lock["stages"])
    registered = json.loads((repo / "models" / "registered.json").read_text())
    assert registered["version"] == 1
    promotion = json.loads((repo / "metrics" / "promotion.json").read_text())
    assert promotion["action"] in {"promote", "reject"}
    # every stage's output carries the round's lineage (one parent MLflow run per round)
    rounds = {json.loads((repo / p / "lineage.json").read_text())["round_run_id"] for p in ("data/samples", "data/gated", "models/adapter", "eval")}
    assert len(rounds) == 1

    imported = set(Path(env["IPA_CODE_MARKER"]).read_text().split())
    assert imported == {str(repo / "ipa_lib" / "__init__.py")}, imported

    second = _sh(["dvc", "repro"], repo, env)
    assert "Running stage" not in second.stdout, second.stdout


def test_exp_run_reruns_only_downstream_of_the_param(dvc_repo):
    repo, env = dvc_repo
    _sh(["git", "add", "-A"], repo, env)
    _sh(["git", "commit", "-qm", "round 1"], repo, env)
    baseline = json.loads((repo / "metrics" / "eval.json").read_text())
    r = _sh(["dvc", "exp", "run", "-n", "beta200", "-S", "train.beta=200"], repo, env)
    assert "Running stage 'train'" in r.stdout and "Running stage 'evaluate'" in r.stdout
    assert "Running stage 'sample'" not in r.stdout and "Running stage 'gate'" not in r.stdout
    shown = json.loads(_sh(["dvc", "exp", "show", "--json"], repo, env).stdout)
    head = next(n for n in shown if n["rev"] != "workspace")
    exps = {rev["name"]: rev["data"] for e in head.get("experiments") or [] for rev in e["revs"]}
    assert set(exps) == {"beta200"}, exps
    params = exps["beta200"]["params"]["params.yaml"]["data"]
    assert params["train"]["beta"] == 200 and head["data"]["params"]["params.yaml"]["data"]["train"]["beta"] == 600
    # the experiment's own metrics: the same base (sample/gate reused), a different adapter's numbers
    metrics = exps["beta200"]["metrics"]["metrics/eval.json"]["data"]
    assert metrics["base"] == baseline["base"]
    assert metrics["ipa"] != baseline["ipa"]
    assert head["data"]["metrics"]["metrics/eval.json"]["data"] == baseline
