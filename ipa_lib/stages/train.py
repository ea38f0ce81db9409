"""LoRA alignment of an animator on its own gated samples (IPA and the baselines).

One loop for every backend and every loss. Reference = the same network with adapters
disabled (`backend.reference_model()`), evaluated on the same x_t and t as the policy.
Every step draws its batch, t and noise from a generator seeded by (seed, step), so a run
resumed from a checkpoint replays exactly the steps an uninterrupted run would take.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ipa_lib.core.config import Params, TrainConfig
from ipa_lib.core.errors import RuntimeFailure
from ipa_lib.core.results import TrainResult


class TrainingDiverged(RuntimeFailure):
    """Loss became NaN/inf or spiked; the last good checkpoint is kept."""


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def _noisy(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    tt = t.view(-1, *([1] * (x0.ndim - 1)))
    return (1 - tt) * x0 + tt * noise, noise - x0


def compute_loss(backend, batch: dict[str, torch.Tensor], cfg: TrainConfig, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
    """One training loss on a batch (backend batch convention, see backends/base.py).

    Draws t ~ U(0, 1) and noise e (shared by policy and reference, and by winner and
    loser for DPO), builds x_t = (1 - t) x0 + t e and the target v = e - x0, and applies
    the configured objective. Returns the loss and float diagnostics for logging.
    """
    from ipa_lib.core import objective

    x0 = backend.encode(batch["video"])
    b = x0.shape[0]
    t = torch.rand(b, generator=generator).to(x0.device, torch.float32)
    noise = torch.randn(x0.shape, generator=generator).to(x0)
    cond = backend.condition(batch)
    mask = backend.mask_to_latent(batch["hand_mask"]) if "hand_mask" in batch else None
    x_t, v = _noisy(x0, t.to(x0.dtype), noise)

    def reference(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), backend.reference_model():
            return backend.predict_velocity(x, t.to(x.dtype), cond)

    if cfg.loss == "sft":
        pred = backend.predict_velocity(x_t, t.to(x_t.dtype), cond)
        loss = objective.sft_loss(pred, v, mask, hand_weight=cfg.hand_weight)
        return loss, {"loss": loss.item()}
    if cfg.loss == "ipa":
        ref = reference(x_t)  # before the policy: its activations are freed before the graph is built
        pred = backend.predict_velocity(x_t, t.to(x_t.dtype), cond)
        terms = objective.ipa_terms(pred, ref, v, t, mask, beta=cfg.beta, hand_weight=cfg.hand_weight)
        return terms.loss, terms.metrics()
    if cfg.loss == "kto":
        ref = reference(x_t)
        pred = backend.predict_velocity(x_t, t.to(x_t.dtype), cond)
        terms = objective.kto_terms(pred, ref, v, t, batch["desirable"].to(x0.device), mask, beta=cfg.beta, hand_weight=cfg.hand_weight)
        return terms.loss, terms.metrics()
    if cfg.loss == "dpo":
        x0_l = backend.encode(batch["video_lose"])
        x_t_l, v_l = _noisy(x0_l, t.to(x0_l.dtype), noise)  # same noise and t as the winner
        mask_l = backend.mask_to_latent(batch["hand_mask_lose"]) if "hand_mask_lose" in batch else mask
        pred_w = backend.predict_velocity(x_t, t.to(x_t.dtype), cond)
        pred_l = backend.predict_velocity(x_t_l, t.to(x_t.dtype), cond)
        terms = objective.dpo_terms(pred_w, reference(x_t), v, pred_l, reference(x_t_l), v_l, t, mask, mask_l, beta=cfg.beta, hand_weight=cfg.hand_weight)
        return terms.loss, terms.metrics()
    raise ValueError(f"train.loss: unknown loss {cfg.loss!r} (valid: ipa, sft, dpo, kto)")


# ---- training data ---------------------------------------------------------------------

@dataclass
class TrainData:
    arrays: dict[str, np.ndarray]  # reference, pose, video (+ video_lose / desirable)
    masks: np.ndarray  # (N, F, H, W) pixel hand masks of the driving pose
    masks_lose: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.arrays["video"])

    def batch(self, idx: np.ndarray) -> dict[str, torch.Tensor]:
        from ipa_lib.data.tensors import make_batch, video_to_tensor

        out = make_batch(self.arrays, idx, self.masks)
        if "video_lose" in self.arrays:
            out["video_lose"] = video_to_tensor(self.arrays["video_lose"][idx])
            out["hand_mask_lose"] = torch.from_numpy(self.masks_lose[idx])
        if "desirable" in self.arrays:
            out["desirable"] = torch.from_numpy(self.arrays["desirable"][idx].astype(bool))
        return out


def kto_rows(kept: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """KTO's examples: kept samples are desirable, those below the median score undesirable.
    Returns (row mask, desirable flag of the selected rows)."""
    good = kept.astype(bool)
    bad = score < np.quantile(score, 0.5)
    rows = good | bad
    return rows, good[rows]


def dpo_pair_indices(pose_id: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per driving pose: its best-scored sample wins against its worst (same conditioning)."""
    winners, losers = [], []
    for pose in np.unique(pose_id):
        rows = np.flatnonzero(pose_id == pose)
        if len(rows) < 2:
            continue
        order = rows[np.argsort(score[rows])]
        if score[order[-1]] > score[order[0]]:
            winners.append(order[-1])
            losers.append(order[0])
    return np.array(winners, dtype=int), np.array(losers, dtype=int)


def load_train_data(gated_dir: str | Path, loss: str):
    """IPA/SFT learn from the kept set; KTO from kept (desirable) + rejected (undesirable);
    DPO from best-vs-worst pairs of samples that share a driving pose. A gated case store
    (data.cases: `clips.npz` + `manifest.jsonl`) gives a `CaseTrainData`, the toy world's
    `kept.npz` a `TrainData`."""
    from ipa_lib.core.io import load_npz, require_dir
    from ipa_lib.data.tensors import hand_masks

    gated_dir = require_dir(gated_dir, "gated samples")
    if (gated_dir / "clips.npz").exists():
        return CaseTrainData.load(gated_dir, loss)
    gated_dir = require_dir(gated_dir, "gated samples", "kept.npz")
    kept = load_npz(gated_dir / "kept.npz")
    if loss in ("ipa", "sft"):
        arrays = kept
    else:
        scored = load_npz(gated_dir / "scored.npz")
        if loss == "kto":
            rows, desirable = kto_rows(scored["kept"], scored["hand_score"])
            arrays = {k: scored[k][rows] for k in ("reference", "pose", "video", "hand_keypoints")}
            arrays["desirable"] = desirable
        else:
            arrays = _dpo_pairs(scored)
    h, w = arrays["video"].shape[2:4]
    if len(arrays["video"]) == 0:
        raise ValueError(f"{gated_dir}: no training samples for loss {loss!r}")
    masks = hand_masks(arrays["hand_keypoints"], h, w)
    return TrainData(arrays, masks, masks if loss == "dpo" else None)


def _dpo_pairs(scored: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    w, l = dpo_pair_indices(scored["pose_id"], scored["hand_score"])
    out = {k: scored[k][w] for k in ("reference", "pose", "video", "hand_keypoints")}
    out["video_lose"] = scored["video"][l]
    return out


class CaseTrainData:
    """Training examples from a gated case store: clips, the gate's hand masks and each case's
    real conditioning (reference, pose video, face video; background + mask in replacement
    mode), read per batch so the training set never has to fit in memory."""

    def __init__(self, store, rows: list[dict], desirable: np.ndarray | None = None, losers: list[dict] | None = None):
        self.store, self.rows, self.desirable, self.losers = store, rows, desirable, losers

    @classmethod
    def load(cls, gated_dir: Path, loss: str) -> "CaseTrainData":
        from ipa_lib.data.clip_store import ClipStore, read_manifest

        rows = [r for r in read_manifest(gated_dir) if r.get("decodable", True) and r.get("hand_score") is not None]
        store = ClipStore(gated_dir)
        kept = np.array([bool(r.get("kept")) for r in rows])
        score = np.array([float(r["hand_score"]) for r in rows])
        if loss in ("ipa", "sft"):
            data = cls(store, [r for r, k in zip(rows, kept) if k])
        elif loss == "kto":
            sel, desirable = kto_rows(kept, score)
            data = cls(store, [r for r, k in zip(rows, sel) if k], desirable)
        else:
            w, l = dpo_pair_indices(np.array([r["pose_id"] for r in rows]), score)
            data = cls(store, [rows[i] for i in w], losers=[rows[i] for i in l])
        if not data.rows:
            raise ValueError(f"{gated_dir}: no training samples for loss {loss!r}")
        return data

    def __len__(self) -> int:
        return len(self.rows)

    def _mask(self, row: dict) -> np.ndarray:
        return self.store.clip({"video": row["mask"]}).astype(np.float32)

    def batch(self, idx: np.ndarray) -> dict[str, torch.Tensor]:
        from ipa_lib.data.tensors import video_to_tensor
        from ipa_lib.models.generate import condition_batch
        from ipa_lib.data.clip_store import CONDITIONS

        rows = [self.rows[int(i)] for i in idx]
        conds = [self.store.conditions(r["case_id"]) for r in rows]
        extra = {k: np.stack([c[k] for c in conds]) for k in CONDITIONS if k in conds[0]}
        out = condition_batch(np.stack([c["reference"] for c in conds]), np.stack([c["pose"] for c in conds]), extra)
        out["video"] = video_to_tensor(np.stack([self.store.clip(r) for r in rows]))
        out["hand_mask"] = torch.from_numpy(np.stack([self._mask(r) for r in rows]))
        if self.losers is not None:
            lose = [self.losers[int(i)] for i in idx]
            out["video_lose"] = video_to_tensor(np.stack([self.store.clip(r) for r in lose]))
            out["hand_mask_lose"] = torch.from_numpy(np.stack([self._mask(r) for r in lose]))
        if self.desirable is not None:
            out["desirable"] = torch.from_numpy(self.desirable[idx].astype(bool))
        return out


# ---- checkpoints -----------------------------------------------------------------------

HOLD_ENV = "IPA_TRAIN_HOLD_AFTER_STEP"  # "N:MARKER": after checkpointing step N, touch MARKER and wait


def hold_after_checkpoint(step: int) -> None:
    """Fault-injection point for the kill-and-resume tests (and operators rehearsing a
    preemption): with `IPA_TRAIN_HOLD_AFTER_STEP=N:MARKER` set, the run writes MARKER once the
    checkpoint of step N is on disk and then waits to be killed, so the kill lands at a known
    step however fast the machine is. Unset (the default), this does nothing."""
    spec = os.environ.get(HOLD_ENV)
    if not spec:
        return
    at, _, marker = spec.partition(":")
    if int(at) != step:
        return
    Path(marker).write_text(f"{step}\n")
    while True:  # the caller kills the process (SIGKILL); nothing else ends this wait
        time.sleep(0.1)


def _checkpoint_root(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}.checkpoints"


def save_checkpoint(backend, optimizer, step: int, log: list[dict], root: Path) -> Path:
    from ipa_lib.core.io import atomic_dir

    with atomic_dir(root / f"step-{step:06d}") as tmp:
        backend.save_adapter(tmp)
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "log": log}, tmp / "state.pt")
    return root / f"step-{step:06d}"


def latest_checkpoint(root: Path) -> Path | None:
    steps = sorted(p for p in root.glob("step-*") if (p / "state.pt").exists())
    return steps[-1] if steps else None


def load_checkpoint(backend, optimizer, path: Path) -> tuple[int, list[dict]]:
    try:
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
        backend.load_adapter(path)
        optimizer.load_state_dict(state["optimizer"])
    except Exception as err:
        raise ValueError(f"{path}: corrupt checkpoint ({type(err).__name__}: {err}); delete it to restart from the previous one") from None
    return int(state["step"]), list(state["log"])


# ---- the loop --------------------------------------------------------------------------

def train(params: Params, gated_dir: str | Path, out_dir: str | Path, base_model: str | None = None,
          resume: bool = False, progress: bool = True, stop_after: int | None = None,
          metrics_path: str | Path | None = None, curve_path: str | Path | None = None) -> TrainResult:
    """Train a LoRA adapter with `params.train.loss` and write it (diffusers LoRA format) to `out_dir`.

    Writes `out_dir` (adapter, summary, log, curve plot) and, when given, `metrics_path` (summary +
    final diagnostics) and `curve_path` (the logged steps): the files DVC declares as metrics and
    plots (`train.metrics`, `train.curve` for `ipa train`).
    `stop_after` ends the process's work after that many steps without writing `out_dir`,
    leaving only checkpoints (what a killed run leaves); `resume=True` continues from the
    latest checkpoint.
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    from ipa_lib.core.io import atomic_dir, atomic_write_json
    from ipa_lib.data.visualize import plot_curve
    from ipa_lib.models.lora import lora_parameters
    from ipa_lib.stages.common import load_start_backend as load_backend

    cfg = params.train
    out_dir = Path(out_dir)
    data = load_train_data(gated_dir, cfg.loss)
    backend = load_backend(params, base_model)
    torch.manual_seed(cfg.seed)  # LoRA A matrices start random: same seed, same adapter
    backend.add_lora(cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
    backend.transformer.train()
    accelerator = Accelerator(cpu=backend.device.type == "cpu", mixed_precision="bf16" if backend.dtype == torch.bfloat16 else "no")
    trainable = lora_parameters(backend.transformer)
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=0.0)

    root = _checkpoint_root(out_dir)
    start, log = 0, []
    if resume and (ckpt := latest_checkpoint(root)) is not None:
        start, log = load_checkpoint(backend, optimizer, ckpt)
        start += 1
    elif root.exists():
        shutil.rmtree(root)  # a fresh run must not resume someone else's steps by accident

    started = time.time()
    losses: list[float] = [e["loss"] for e in log]
    last_good = latest_checkpoint(root)
    end = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
    bar = tqdm(range(start, end), desc=f"train[{cfg.loss}]", disable=not progress, initial=start, total=cfg.steps)
    for step in bar:
        gen = step_generator(cfg.seed, step)
        idx = torch.randint(0, len(data), (cfg.batch_size,), generator=gen).numpy()
        with accelerator.autocast():
            loss, stats = compute_loss(backend, data.batch(idx), cfg, gen)
        value = loss.item()
        median = float(np.median(losses[-50:])) if len(losses) >= 20 else math.inf
        if not math.isfinite(value) or value > cfg.spike_factor * max(median, 1e-8):
            where = f"last good checkpoint: {last_good}" if last_good else "no checkpoint was written yet"
            raise TrainingDiverged(f"train: loss {value} at step {step} (running median {median:.4g}); stopped, {where}")
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm))
        optimizer.step()
        losses.append(value)
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            log.append({"step": step, **stats, "grad_norm": grad_norm})
            bar.set_postfix(loss=f"{value:.4f}", acc=f"{stats.get('implicit_acc', float('nan')):.2f}", refresh=False)
        if (step + 1) % cfg.checkpoint_every == 0 or step == cfg.steps - 1:
            last_good = save_checkpoint(backend, optimizer, step, log, root)
            hold_after_checkpoint(step)
    if end < cfg.steps:
        return {"stopped_at": end - 1, "checkpoint": str(last_good)}

    summary = {
        "loss": cfg.loss, "beta": cfg.beta, "hand_weight": cfg.hand_weight, "steps": cfg.steps,
        "train_samples": len(data), "seconds": round(time.time() - started, 1),
        "final": log[-1] if log else {},
        "trainable_params": sum(p.numel() for p in trainable),
    }
    result: TrainResult = {**summary, "log": log}
    with atomic_dir(out_dir) as tmp:
        backend.save_adapter(tmp)
        atomic_write_json(tmp / "train_summary.json", summary)
        (tmp / "train_log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in log))
        plot_curve(tmp / "train_curve.png", log, title=f"train[{cfg.loss}] beta={cfg.beta} lambda={cfg.hand_weight}")
    write_train_metrics(result, metrics_path, curve_path)
    return result


def write_train_metrics(result: TrainResult, metrics_path: str | Path | None, curve_path: str | Path | None) -> None:
    """The run's summary + final diagnostics (`metrics_path`) and its logged steps (`curve_path`),
    each written atomically when its path is given."""
    from ipa_lib.core.io import atomic_write_json
    from ipa_lib.core.results import train_metrics

    if curve_path is not None:
        atomic_write_json(curve_path, result["log"])
    if metrics_path is not None:
        atomic_write_json(metrics_path, train_metrics(result))
