"""Training with several processes (accelerate launch, gloo on CPU): the same global batch gives
the single-process adapter, a crash in one rank stops the run with its error and keeps the last
checkpoint. Real processes, real files."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import adapter_state, write_params

# Measured (tests/test_train_distributed.py on the tiny toy round, IPA, 6 steps, global batch 4,
# 2 processes x 2 rows vs 1 process x 4 rows): max |delta| over the adapter weights 3.9e-4
# (LoRA B weights reach ~3e-3). The difference is the float order of a batch of 2 vs 4 in
# the forward, amplified by Adam's first, sign-like steps: 2 processes equal 1 process with
# train.micro_batch_size=2 bit for bit. docs/distributed.md states the same numbers.
ADAPTER_ATOL = 1e-3
STEP0_RTOL = 1e-5  # step 0 (same weights everywhere): loss and gradient norm, measured 1e-7


def _log(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / "train_log.jsonl").read_text().splitlines()]


def _launch(params, work: Path, out: Path, processes: int = 2, env: dict | None = None) -> subprocess.CompletedProcess:
    from ipa_lib.stages.train import launch_command

    cmd = launch_command(write_params(work / "params.yaml", params=params), work / "gated", out, processes=processes)
    full = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", **(env or {})}
    # cwd=work: rank 0 writes train.metrics / train.curve (relative defaults) under work, not this checkout
    return subprocess.run(cmd, cwd=work, env=full, capture_output=True, text=True, timeout=600)


def test_two_processes_match_one_process_at_the_same_global_batch(gated):
    from ipa_lib.stages.train import train

    params, work = gated
    assert params.train.batch_size == 4
    two = _launch(params, work, work / "two")
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    assert json.loads((work / params.train.metrics).read_text())["final_step"] == params.train.steps - 1  # rank 0's metrics
    train(params, work / "gated", work / "one", progress=False)  # 1 process x 4 rows
    split = params.model_copy(deep=True)
    split.train.micro_batch_size = 2  # 1 process x 2 rows x 2 accumulation steps
    train(split, work / "gated", work / "split", progress=False)

    a, b, c = adapter_state(work / "one"), adapter_state(work / "two"), adapter_state(work / "split")
    assert a.keys() == b.keys() == c.keys()
    for k in a:  # the same forwards (2 rows each) and the same sums: bit for bit
        torch.testing.assert_close(b[k], c[k], rtol=0, atol=0)
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    moved = max(a[k].abs().max().item() for k in a if "lora_B" in k)  # B starts at 0
    assert worst <= ADAPTER_ATOL < moved, (worst, moved)
    one_log, two_log = _log(work / "one"), _log(work / "two")
    assert [e["step"] for e in one_log] == [e["step"] for e in two_log] == list(range(params.train.steps))
    for key in ("loss", "grad_norm", "policy_err"):  # rank 0 logged the global batch's mean, not its half
        assert two_log[0][key] == pytest.approx(one_log[0][key], rel=STEP0_RTOL), key


def test_a_crash_in_one_rank_stops_the_run_and_keeps_the_last_checkpoint(gated):
    from ipa_lib.models.lora import lora_parameters
    from ipa_lib.stages.common import load_start_backend
    from ipa_lib.stages.train import FAIL_ENV, latest_checkpoint, load_checkpoint

    params, work = gated
    assert params.train.checkpoint_every == 2  # checkpoints after steps 1, 3, 5
    run = _launch(params, work, work / "adapter", env={FAIL_ENV: "1:3"})
    output = run.stdout + run.stderr
    assert run.returncode != 0, output[-3000:]
    assert "injected failure in rank 1 at step 3" in output, output[-3000:]
    assert not (work / "adapter").exists()
    (folder,) = (work / ".adapter.checkpoints").iterdir()
    ckpt = latest_checkpoint(folder)
    assert ckpt is not None and ckpt.name == "step-000001", sorted(p.name for p in folder.iterdir())

    backend = load_start_backend(params)
    backend.add_lora(params.train.lora_rank, params.train.lora_alpha, params.train.lora_targets)
    optimizer = torch.optim.AdamW(lora_parameters(backend.transformer), lr=params.train.lr)
    step, log = load_checkpoint(backend, optimizer, ckpt)
    assert step == 1 and [e["step"] for e in log] == [0, 1]


def test_batch_split_keeps_the_global_batch():
    from ipa_lib.core.errors import InputError
    from ipa_lib.core.config import TrainConfig
    from ipa_lib.stages.train import batch_split, micro_rows

    assert batch_split(TrainConfig(batch_size=16), 1) == (16, 1)
    assert batch_split(TrainConfig(batch_size=16), 4) == (4, 1)
    assert batch_split(TrainConfig(batch_size=16, micro_batch_size=2), 4) == (2, 2)
    assert micro_rows(1, 2, 8, 2) == [slice(4, 6), slice(6, 8)]
    rows = [r for rank in range(4) for s in micro_rows(rank, 4, 16, 2) for r in range(16)[s]]
    assert rows == list(range(16))  # every row of the global batch once
    with pytest.raises(InputError, match=r"train.batch_size=16 .*3 process.*train.micro_batch_size"):
        batch_split(TrainConfig(batch_size=16), 3)
    with pytest.raises(InputError, match=r"train.micro_batch_size=3"):
        batch_split(TrainConfig(batch_size=16, micro_batch_size=3), 2)


def test_torchrun_and_the_pod_launcher_give_the_accelerate_adapter(gated, monkeypatch):
    """Plain `torchrun` (no accelerate launcher) and the KFP train task's path with
    `pipeline.accelerator_limit=2` (`train_in_pod`, what components/stages.py runs) both train
    the bit-identical adapter of `accelerate launch` with 2 processes."""
    import sys

    from ipa_lib.stages.train import train_in_pod

    params, work = gated
    ref = _launch(params, work, work / "accelerate")
    assert ref.returncode == 0, ref.stdout[-3000:] + ref.stderr[-3000:]
    import socket

    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(port),
           "-m", "ipa_lib.cli", "train", "--params", str(work / "params.yaml"), "--gated", str(work / "gated"),
           "--out", str(work / "torchrun"), "--quiet"]
    run = subprocess.run(cmd, cwd=work, env={**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"},
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    pod = params.model_copy(deep=True)
    pod.pipeline.accelerator_limit = 2
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    result = train_in_pod(pod, work / "gated", work / "pod", progress=False, metrics_path=work / "pod-metrics.json")
    assert result["steps"] == params.train.steps and len(result["log"]) == params.train.steps
    assert json.loads((work / "pod-metrics.json").read_text())["final_step"] == params.train.steps - 1

    a = adapter_state(work / "accelerate")
    for other in ("torchrun", "pod"):
        b = adapter_state(work / other)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=0)
