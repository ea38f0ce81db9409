"""The real DVC pipeline in a temporary git+DVC repo: `dvc repro` runs the round end to end,
a second `dvc repro` does nothing, and `dvc exp run -S` reruns only what a param touches."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, TINY

pytestmark = pytest.mark.slow


def _sh(cmd: list[str], cwd: Path, env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def dvc_repo(tmp_path_factory):
    from ipa_lib.models.toy import ToyBackend, build_transformer
    from ipa_lib.core.config import apply_override

    from conftest import tiny_params

    repo = tmp_path_factory.mktemp("dvcrepo")
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    env.pop("MLFLOW_TRACKING_URI", None)
    shutil.copy(REPO / "dvc.yaml", repo / "dvc.yaml")
    shutil.copytree(REPO / "ipa_lib", repo / "ipa_lib", ignore=shutil.ignore_patterns("__pycache__"))
    # which ipa_lib the stages import: must be this repo's copy, not the editable install
    with open(repo / "ipa_lib" / "__init__.py", "a") as f:
        f.write('\nimport os as _os\nif _os.environ.get("IPA_CODE_MARKER"):\n'
                '    open(_os.environ["IPA_CODE_MARKER"], "a").write(__file__ + "\\n")\n')
    env["IPA_CODE_MARKER"] = str(tmp_path_factory.mktemp("marker") / "imports.txt")
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    for item in [t for t in TINY if not t.startswith("tracking.")]:
        apply_override(data, item)
    (repo / "params.yaml").write_text(yaml.safe_dump(data))
    ToyBackend(build_transformer(tiny_params().model, 0)).save_pretrained(repo / "models" / "base")
    (repo / ".gitignore").write_text("/.ipa/\n")
    _sh(["git", "init", "-q"], repo, env)
    _sh(["dvc", "init", "-q"], repo, env)
    _sh(["git", "add", "-A"], repo, env)
    _sh(["git", "commit", "-qm", "init"], repo, env)
    return repo, env


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
    r = _sh(["dvc", "exp", "run", "-S", "train.beta=200"], repo, env)
    assert "Running stage 'train'" in r.stdout and "Running stage 'evaluate'" in r.stdout
    assert "Running stage 'sample'" not in r.stdout and "Running stage 'gate'" not in r.stdout
    shown = _sh(["dvc", "exp", "show", "--json"], repo, env)
    assert "200" in shown.stdout
