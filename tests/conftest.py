"""Shared test setup: telemetry off, few threads, a tiny toy world to run stages on, and the
shared fixtures: params files, free ports, a scratch git+DVC repo."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("TQDM_DISABLE", "1")

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))  # helper modules next to the tests

from mlflow_server import mlflow_server  # noqa: E402,F401 (fixture shared by the MLflow tests)

# A round small enough for tests: 5x16x16 clips, a 2-layer animator, a few steps everywhere.
# The tiny base's 12 samples score 0.112..0.153 (toy scorer): threshold 0.128 passes 7 of them,
# fewer than top_k, so the gate filters by threshold and not only by rank.
TINY = [
    "toy.size=16",
    "model.num_layers=2", "model.num_attention_heads=2", "model.attention_head_dim=8", "model.ffn_dim=32",
    "pretrain.steps=2", "pretrain.batch_size=4", "pretrain.corpus_size=8", "pretrain.warmup_steps=1",
    "sample.num_clips=12", "sample.num_inference_steps=3", "sample.batch_size=12",
    "gate.threshold=0.128", "gate.top_k=8", "gate.min_kept=2",
    "train.steps=6", "train.batch_size=4", "train.checkpoint_every=2", "train.log_every=1", "train.lora_rank=4", "train.lora_alpha=4",
    "evaluate.num_poses=3", "evaluate.val_poses=3", "evaluate.seeds=[0]", "evaluate.num_inference_steps=2",
    "tracking.enabled=false",
]


def _checkout_metrics() -> dict[str, str]:
    """sha256 of each of this checkout's metrics/*.json (the real round's DVC metrics)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((REPO / "metrics").glob("*.json"))}


@pytest.fixture(scope="session", autouse=True)
def checkout_metrics_untouched():
    """Fail the session when a test changed this checkout's metrics/*.json: tests write into tmp
    dirs (a stage run with cwd=REPO writes the relative defaults, e.g. train.metrics, there)."""
    before = _checkout_metrics()
    yield
    after = _checkout_metrics()
    changed = sorted(n for n in before.keys() | after.keys() if before.get(n) != after.get(n))
    if changed:
        pytest.fail(f"tests changed this checkout's {', '.join(f'metrics/{n}' for n in changed)}: "
                    "write stage outputs into a tmp dir (cwd=tmp_path or --set train.metrics=...)", pytrace=False)


def tiny_params(extra: list[str] | None = None, workdir: Path | None = None):
    from ipa_lib.core.config import load_params

    params = load_params(REPO / "params.yaml", TINY + (extra or []))
    if workdir is not None:
        params.backend.base_model = str(workdir / "base")
    return params


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """A randomly initialised tiny toy animator saved like `ipa pretrain` saves one."""
    import torch

    from ipa_lib.models.toy import ToyBackend, build_transformer

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("models") / "base"
    params = tiny_params()
    ToyBackend(build_transformer(params.model, 0)).save_pretrained(path)
    return path


@pytest.fixture()
def tiny(tiny_base, tmp_path):
    """(params, workdir) with the tiny base model in place."""
    params = tiny_params()
    params.backend.base_model = str(tiny_base)
    return params, tmp_path


@pytest.fixture()
def gated(tiny):
    """(params, workdir): samples and a gated set of the tiny round, produced by the real stages."""
    from ipa_lib.stages.gate import gate
    from ipa_lib.stages.sample import sample

    params, work = tiny
    sample(params, work / "samples", progress=False)
    gate(params, work / "samples", work / "gated", progress=False)
    return params, work


def adapter_state(path: Path) -> dict:
    """The LoRA tensors of an adapter folder (diffusers format)."""
    import safetensors.torch

    return safetensors.torch.load_file(str(path / "pytorch_lora_weights.safetensors"))


# ---- shared helpers: params files, free ports, a scratch git+DVC repo -----------------------

def copy_shard(src: Path, dst: Path, json_name: str, edit=None) -> Path:
    """A copy of shard folder `src` at `dst`, with `edit` applied to its JSON file `json_name`
    (for the merge-refusal tests of sampled and evaluation shards)."""
    shutil.copytree(src, dst)
    if edit:
        data = json.loads((dst / json_name).read_text())
        edit(data)
        (dst / json_name).write_text(json.dumps(data))
    return dst


def write_params(path: Path, overrides: list[str] | tuple[str, ...] = (), params=None) -> Path:
    """Write a params file: `params` (a Params) or else this checkout's params.yaml, with
    `overrides` (`a.b=value`, as `--set` takes them) applied; returns `path`."""
    import yaml

    from ipa_lib.core.config import apply_override

    data = params.model_dump(mode="json") if params is not None else yaml.safe_load((REPO / "params.yaml").read_text())
    for item in overrides:
        apply_override(data, item)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture()
def params_file(tmp_path):
    """write(overrides=(), path=tmp_path/"params.yaml", params=None) -> path (see `write_params`)."""

    def write(overrides=(), path: Path | None = None, params=None) -> Path:
        return write_params(path or tmp_path / "params.yaml", overrides, params)

    return write


@pytest.fixture()
def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (picked by binding to port 0, then released)."""
    import mlflow_server as ms

    return ms.free_port()


@pytest.fixture()
def silent_port():
    """A port on 127.0.0.1 that completes the TCP handshake (the listen backlog) and never answers."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield s.getsockname()[1]


def sh(cmd: list[str], cwd: Path, env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run a command that must succeed; on failure the assert shows the end of its output."""
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="session")
def scratch_dvc_repo(tmp_path_factory, tiny_base):
    """make(overrides=TINY) -> (repo, env): a fresh git+DVC repo holding this checkout's dvc.yaml,
    a copy of ipa_lib, params.yaml with `overrides`, the tiny base model in models/base, all
    committed. `env` runs git and dvc there (this venv first on PATH, no MLFLOW_TRACKING_URI);
    the copied ipa_lib appends its path to env["IPA_CODE_MARKER"] whenever it is imported,
    so a test can check the stages ran this copy and not the editable install."""

    def make(overrides: list[str] = TINY) -> tuple[Path, dict]:
        repo = tmp_path_factory.mktemp("dvcrepo")
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
               "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
               "IPA_CODE_MARKER": str(repo.parent / f"{repo.name}-imports.txt")}
        env.pop("MLFLOW_TRACKING_URI", None)
        shutil.copy(REPO / "dvc.yaml", repo / "dvc.yaml")
        shutil.copytree(REPO / "ipa_lib", repo / "ipa_lib", ignore=shutil.ignore_patterns("__pycache__"))
        with open(repo / "ipa_lib" / "__init__.py", "a") as f:
            f.write('\nimport os as _os\nif _os.environ.get("IPA_CODE_MARKER"):\n'
                    '    open(_os.environ["IPA_CODE_MARKER"], "a").write(__file__ + "\\n")\n')
        write_params(repo / "params.yaml", overrides)
        shutil.copytree(tiny_base, repo / "models" / "base")
        shutil.copytree(REPO / "data" / "cases", repo / "data" / "cases")  # the default data.cases (a dvc dep)
        (repo / ".gitignore").write_text("/.ipa/\n")
        for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "init"]):
            sh(cmd, repo, env)
        return repo, env

    return make
