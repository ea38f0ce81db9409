"""Shared test setup: telemetry off, few threads, and a tiny toy world to run stages on."""

from __future__ import annotations

import os
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
TINY = [
    "toy.size=16",
    "model.num_layers=2", "model.num_attention_heads=2", "model.attention_head_dim=8", "model.ffn_dim=32",
    "pretrain.steps=2", "pretrain.batch_size=4", "pretrain.corpus_size=8", "pretrain.warmup_steps=1",
    "sample.num_clips=12", "sample.num_inference_steps=3", "sample.batch_size=12",
    "gate.threshold=0.0", "gate.top_k=8", "gate.min_kept=2",
    "train.steps=6", "train.batch_size=4", "train.checkpoint_every=2", "train.log_every=1", "train.lora_rank=4", "train.lora_alpha=4",
    "evaluate.num_poses=3", "evaluate.seeds=[0]", "evaluate.num_inference_steps=2",
    "tracking.enabled=false",
]


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
