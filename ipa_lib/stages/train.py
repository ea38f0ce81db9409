"""LoRA alignment of an animator on its own gated samples (IPA and the baselines).

One loop for every backend and every loss. Reference = the same network with adapters
disabled (`backend.reference_model()`), evaluated on the same x_t and t as the policy.
Every step draws its batch, t and noise from a generator seeded by (seed, step), so a run
resumed from a checkpoint replays exactly the steps an uninterrupted run would take.
"""

from __future__ import annotations

import json
import logging
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

logger = logging.getLogger(__name__)


class TrainingDiverged(RuntimeFailure):
    """Loss became NaN/inf or spiked; the last good checkpoint is kept."""


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def _noisy(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    tt = t.view(-1, *([1] * (x0.ndim - 1)))
    return (1 - tt) * x0 + tt * noise, noise - x0


class StepDraws:
    """One step's t and noise, drawn for the whole (global) batch from the step's generator
    the first time they are needed, exactly as a single process draws them; each process
    and micro-batch takes its `rows`, so the split never changes the numbers drawn."""

    def __init__(self, generator: torch.Generator, batch_size: int):
        self.generator, self.batch_size = generator, batch_size
        self.t: torch.Tensor | None = None
        self.noise: torch.Tensor | None = None

    def take(self, x0: torch.Tensor, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        if self.t is None:
            self.t = torch.rand(self.batch_size, generator=self.generator)
            self.noise = torch.randn((self.batch_size, *x0.shape[1:]), generator=self.generator)
        return self.t[rows].to(x0.device, torch.float32), self.noise[rows].to(x0)


def compute_loss(backend, batch: dict[str, torch.Tensor], cfg: TrainConfig, generator: torch.Generator | StepDraws,
                 rows: slice | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """One training loss on a batch (backend batch convention, see backends/base.py).

    Draws t ~ U(0, 1) and noise e (shared by policy and reference, and by winner and
    loser for DPO), builds x_t = (1 - t) x0 + t e and the target v = e - x0, and applies
    the configured objective. Returns the loss and float diagnostics for logging.
    With `StepDraws` and `rows`, `batch` is those rows of the global batch and gets their
    t and noise.
    """
    from ipa_lib.core import objective

    x0 = backend.encode(batch["video"])
    b = x0.shape[0]
    draws = generator if isinstance(generator, StepDraws) else StepDraws(generator, b)
    t, noise = draws.take(x0, slice(0, b) if rows is None else rows)
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
    if cfg.loss in ("ipa", "sft_t2"):
        ref = reference(x_t)  # before the policy: its activations are freed before the graph is built
        pred = backend.predict_velocity(x_t, t.to(x_t.dtype), cond)
        fn = objective.ipa_terms if cfg.loss == "ipa" else objective.sft_t2_terms
        terms = fn(pred, ref, v, t, mask, beta=cfg.beta, hand_weight=cfg.hand_weight)
        return terms.loss, terms.metrics()
    if cfg.loss == "kto":
        ref = reference(x_t)
        pred = backend.predict_velocity(x_t, t.to(x_t.dtype), cond)
        kl_pol, kl_ref = mismatched_errors(backend, x_t, t, v, cond, mask, cfg.hand_weight)
        terms = objective.kto_terms(pred, ref, v, t, batch["desirable"].to(x0.device), mask, kl_policy_err=kl_pol,
                                    kl_reference_err=kl_ref, beta=cfg.beta, hand_weight=cfg.hand_weight)
        return terms.loss, terms.metrics()
    if cfg.loss == "dpo":
        x0_l = backend.encode(batch["video_lose"])
        x_t_l, v_l = _noisy(x0_l, t.to(x0_l.dtype), noise)  # same noise and t as the winner
        mask_l = backend.mask_to_latent(batch["hand_mask_lose"]) if "hand_mask_lose" in batch else mask
        pred_w = backend.predict_velocity(x_t, t.to(x_t.dtype), cond)
        pred_l = backend.predict_velocity(x_t_l, t.to(x_t.dtype), cond)
        terms = objective.dpo_terms(pred_w, reference(x_t), v, pred_l, reference(x_t_l), v_l, t, mask, mask_l, beta=cfg.beta, hand_weight=cfg.hand_weight)
        return terms.loss, terms.metrics()
    raise ValueError(f"train.loss: unknown loss {cfg.loss!r} (valid: ipa, sft, sft_t2, dpo, kto)")


@torch.no_grad()
def mismatched_errors(backend, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor, cond: dict, mask, hand_weight: float):
    """KTO's mismatched pairs: clip b denoised under the conditioning of clip b - 1 (the batch's
    conditioning rolled by one, as KTO pairs x_i with y_{i+1}); returns (err(policy), err(reference))
    of those pairs, (B,), for the KL reference point z0 (`objective.kto_terms`). A batch of one
    has no other sample: its pair is itself."""
    from ipa_lib.core import objective

    b = x_t.shape[0]
    rolled = {k: torch.roll(c, 1, dims=0) if isinstance(c, torch.Tensor) and c.ndim and c.shape[0] == b else c
              for k, c in cond.items()}
    tt = t.to(x_t.dtype)
    pol = backend.predict_velocity(x_t, tt, rolled)
    with backend.reference_model():
        ref = backend.predict_velocity(x_t, tt, rolled)
    return (objective.weighted_error(pol, v, mask, hand_weight=hand_weight),
            objective.weighted_error(ref, v, mask, hand_weight=hand_weight))


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


_NO_PAIRS = (": no driving pose has a passing sample (hand_score >= gate.threshold) and a failing one "
             "at least train.dpo_min_margin apart")


def dpo_pair_indices(pose_id: np.ndarray, score: np.ndarray, threshold: float | None = None,
                     min_margin: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Per driving pose: its best-scored sample wins against its worst (same conditioning),
    only when the winner passes the gate (score >= `threshold`) and the loser fails it, and
    their scores are at least `min_margin` apart: a pass-vs-fail pair, never fail-vs-fail,
    pass-vs-pass or a coin flip of the scorer. threshold=None keeps every strictly ordered pair."""
    winners, losers = [], []
    for pose in np.unique(pose_id):
        rows = np.flatnonzero(pose_id == pose)
        if len(rows) < 2:
            continue
        order = rows[np.argsort(score[rows], kind="stable")]
        w, l = order[-1], order[0]
        if not score[w] > score[l] or score[w] - score[l] < min_margin:
            continue
        if threshold is not None and not (score[w] >= threshold > score[l]):
            continue
        winners.append(w)
        losers.append(l)
    return np.array(winners, dtype=int), np.array(losers, dtype=int)


def load_train_data(gated_dir: str | Path, loss: str, threshold: float | None = None, min_margin: float = 0.0):
    """IPA/SFT learn from the kept set; KTO from kept (desirable) + rejected (undesirable);
    DPO from best-vs-worst pairs of samples that share a driving pose (pass vs fail at
    `threshold`, scores `min_margin` apart: `dpo_pair_indices`). A gated case store
    (data.cases: `clips.npz` + `manifest.jsonl`) gives a `CaseTrainData`, the toy world's
    `kept.npz` a `TrainData`."""
    from ipa_lib.core.io import load_npz, require_dir
    from ipa_lib.data.tensors import hand_masks

    gated_dir = require_dir(gated_dir, "gated samples")
    if (gated_dir / "clips.npz").exists():
        return CaseTrainData.load(gated_dir, loss, threshold, min_margin)
    gated_dir = require_dir(gated_dir, "gated samples", "kept.npz")
    kept = load_npz(gated_dir / "kept.npz")
    if loss in ("ipa", "sft", "sft_t2"):
        arrays = kept
    else:
        scored = load_npz(gated_dir / "scored.npz")
        if loss == "kto":
            rows, desirable = kto_rows(scored["kept"], scored["hand_score"])
            arrays = {k: scored[k][rows] for k in ("reference", "pose", "video", "hand_keypoints")}
            arrays["desirable"] = desirable
        else:
            arrays = _dpo_pairs(scored, threshold, min_margin)
    h, w = arrays["video"].shape[2:4]
    if len(arrays["video"]) == 0:
        raise ValueError(f"{gated_dir}: no training samples for loss {loss!r}{_NO_PAIRS if loss == 'dpo' else ''}")
    masks = hand_masks(arrays["hand_keypoints"], h, w)
    return TrainData(arrays, masks, masks if loss == "dpo" else None)


def _dpo_pairs(scored: dict[str, np.ndarray], threshold: float | None = None, min_margin: float = 0.0) -> dict[str, np.ndarray]:
    w, l = dpo_pair_indices(scored["pose_id"], scored["hand_score"], threshold, min_margin)
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
    def load(cls, gated_dir: Path, loss: str, threshold: float | None = None, min_margin: float = 0.0) -> "CaseTrainData":
        from ipa_lib.data.clip_store import ClipStore, read_manifest

        rows = [r for r in read_manifest(gated_dir) if r.get("decodable", True) and r.get("hand_score") is not None]
        store = ClipStore(gated_dir)
        kept = np.array([bool(r.get("kept")) for r in rows])
        score = np.array([float(r["hand_score"]) for r in rows])
        if loss in ("ipa", "sft", "sft_t2"):
            data = cls(store, [r for r, k in zip(rows, kept) if k])
        elif loss == "kto":
            sel, desirable = kto_rows(kept, score)
            data = cls(store, [r for r, k in zip(rows, sel) if k], desirable)
        else:
            w, l = dpo_pair_indices(np.array([r["pose_id"] for r in rows]), score, threshold, min_margin)
            data = cls(store, [rows[i] for i in w], losers=[rows[i] for i in l])
        if not data.rows:
            raise ValueError(f"{gated_dir}: no training samples for loss {loss!r}{_NO_PAIRS if loss == 'dpo' else ''}")
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


# Checkpoints live in `<root>/<key>/step-NNNNNN`, `key` a hash of everything that decides the
# trained adapter (`checkpoint_key`), written out in `<root>/<key>/key.json`. A run resumes the
# latest checkpoint of its own key and never another key's, so DVC's rerun-on-change and resume
# agree: what makes `dvc repro` rerun train also makes it start afresh.
KEY_VERSION = 1
# train settings that do not change the adapter a finished run writes (paths, logging cadence,
# checkpoint cadence, the divergence guard, speed settings): left out of the key
KEY_IGNORES_TRAIN = frozenset({"out", "metrics", "curve", "log_every", "checkpoint_every", "spike_factor",
                               "compile", "checkpoint_blocks"})
# backend settings likewise (the model folders enter the key by their contents)
KEY_IGNORES_BACKEND = frozenset({"device", "gradient_checkpointing", "guidance_scale", "base_model", "init_adapter"})
_WHOLE_FILE = 64 << 20  # files up to 64 MiB are hashed whole; larger ones by size and samples
_SAMPLE = 1 << 20


def _file_digest(path: Path, size: int) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= _WHOLE_FILE:
            for chunk in iter(lambda: f.read(_SAMPLE), b""):
                h.update(chunk)
        else:  # head (safetensors header + first tensors), 8 windows across, tail
            for offset in [0, *(size * i // 9 for i in range(1, 9)), size - _SAMPLE]:
                f.seek(offset)
                h.update(f.read(_SAMPLE))
    return h.hexdigest()


def fingerprint(path: str | Path | None) -> str | None:
    """sha256 over a file's or folder's files: relative names, sizes and contents (a file over
    64 MiB contributes its size and ten 1 MiB windows: a 14B base model costs milliseconds, and
    weights that changed keep the same bytes at every window practically never). A path that is
    not on disk (a hub id, a models:/ URI) stands for itself."""
    import hashlib

    if path is None or path == "":
        return None
    p = Path(path)
    if not p.exists():
        return f"name:{path}"
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file() and "__pycache__" not in f.parts)
    h = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.relative_to(p) if f != p else f.name}\0{size}\0{_file_digest(f, size)}\n".encode())
    return h.hexdigest()


def checkpoint_key(params: Params, gated_dir: str | Path, base_model: str | Path | None = None) -> tuple[str, dict]:
    """(key, what went into it): the train settings that change the result (beta, lr, steps,
    seed, ...), the backend's, and fingerprints of the gated data, the base model, the start
    adapter (`backend.init_adapter`) and the ipa_lib code. A `models:/` init_adapter enters by
    its URI: pin a version (not an alias) if an alias may move while a run is interrupted."""
    import hashlib

    import ipa_lib

    init = params.backend.init_adapter
    what = {
        "version": KEY_VERSION,
        "train": {k: v for k, v in params.train.model_dump(mode="json").items() if k not in KEY_IGNORES_TRAIN},
        "backend": {k: v for k, v in params.backend.model_dump(mode="json").items() if k not in KEY_IGNORES_BACKEND},
        "gated": fingerprint(gated_dir),
        "base_model": fingerprint(base_model or params.backend.base_model),
        "init_adapter": init if init and init.startswith("models:/") else fingerprint(init),
        "code": fingerprint(Path(ipa_lib.__file__).parent),
    }
    key = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]
    return key, what


def _key_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """The dotted fields that differ between two key.json contents, `field: old -> new`."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _key_changes(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a} -> {b}")
    return out


def _checkpoint_root(out_dir: Path) -> Path:
    """The default root: beside the adapter folder, outside the DVC stage's outs."""
    return out_dir.parent / f".{out_dir.name}.checkpoints"


def prepare_checkpoints(root: Path, key: str, what: dict, resume: bool | None, shared: bool,
                        main: bool = True) -> tuple[Path, list[str]]:
    """The key's checkpoint folder, made ready, and what changed since another key's checkpoints
    (`field: old -> new`, for the log). `resume`: None resumes when the key has checkpoints;
    True insists (an error naming what changed when it has none); False starts afresh,
    deleting them. Another key's folder is deleted too unless the root is `shared` (the
    workspace PVC, where other runs train at the same time). Only the `main` process writes
    or deletes; the others only check (call `latest_checkpoint` after a barrier)."""
    from ipa_lib.core.errors import InputError
    from ipa_lib.core.io import atomic_write_text

    folder = root / key
    others = sorted(p for p in root.glob("*") if p.is_dir() and p.name != key and (p / "key.json").exists()) if root.is_dir() else []
    changed: list[str] = []
    if others and not shared:
        try:
            changed = _key_changes(json.loads((others[-1] / "key.json").read_text()), {"key": key, **what})
        except (OSError, ValueError) as err:
            changed = [f"{others[-1] / 'key.json'} unreadable ({err})"]
    if resume is True and latest_checkpoint(folder) is None:
        why = f"; changed since the checkpoints of key {others[-1].name}: {'; '.join(changed)}" if changed else ""
        raise InputError(f"train --resume: no checkpoint of this run's key {key} under {root}{why} "
                         "(without --resume a run resumes when it can and starts afresh otherwise)")
    if main:
        if resume is False and folder.exists():
            shutil.rmtree(folder)
        if not shared:
            for other in others:
                shutil.rmtree(other, ignore_errors=True)  # stale: other params, data, base model or code
        folder.mkdir(parents=True, exist_ok=True)
        for tmp in folder.glob(".step-*"):  # a checkpoint being written when the run was killed
            shutil.rmtree(tmp, ignore_errors=True)
        atomic_write_text(folder / "key.json", json.dumps({"key": key, **what}, indent=1, sort_keys=True) + "\n")
    return folder, changed


ALONG = "along"  # train.save_at: <checkpoint key>/along/step-N while training, <out>/along/step-N after


def is_divergence(value: float, losses: list[float], spike_factor: float) -> bool:
    """A loss that stops training: not finite, or a spike, i.e. above `spike_factor` x the running
    median of the last 50 losses (once 20 are logged) *and* above the first step's loss. The
    second condition keeps a saturated DPO/KTO loss near 0 that swings back towards log 2 (the
    method's behaviour to measure) from counting as a divergence."""
    if not math.isfinite(value):
        return True
    if len(losses) < 20:
        return False
    median = float(np.median(losses[-50:]))
    return value > spike_factor * max(median, 1e-8) and value > losses[0]


def make_optimizer(cfg: TrainConfig, trainable: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """`train.optimizer`: AdamW without weight decay, or SGD with `train.momentum`, at `train.lr`."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(trainable, lr=cfg.lr, momentum=cfg.momentum)
    return torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=0.0)


def finish_checkpoints(folder: Path, main: bool = True) -> None:
    """A finished run's checkpoints are not needed any more (its adapter is the output)."""
    if main:
        shutil.rmtree(folder, ignore_errors=True)


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
    """Restore adapter and optimizer from `path`. A checkpoint that does not load is an error
    naming it (checkpoints are written by one rename, so a kill never leaves a half one): it
    is never skipped for an older one, which would hide a damaged disk."""
    try:
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
        backend.load_adapter(path)
        optimizer.load_state_dict(state["optimizer"])
    except Exception as err:
        raise ValueError(f"{path}: corrupt checkpoint ({type(err).__name__}: {err}); delete it to resume from "
                         f"the previous one, or run `ipa train --fresh` to start afresh") from None
    return int(state["step"]), list(state["log"])


# ---- processes (accelerate: DDP / FSDP) ----------------------------------------------------

FAIL_ENV = "IPA_TRAIN_FAIL_RANK"  # "RANK:STEP": that process raises at the start of that step


def fail_injected(rank: int, step: int) -> None:
    """Fault-injection point for the multi-process tests: with `IPA_TRAIN_FAIL_RANK=R:S` set,
    process R raises at the start of step S (after every earlier checkpoint is on disk).
    Unset (the default), this does nothing."""
    spec = os.environ.get(FAIL_ENV)
    if not spec:
        return
    r, _, at = spec.partition(":")
    if int(r) == rank and int(at) == step:
        raise RuntimeFailure(f"train: injected failure in rank {rank} at step {step} ({FAIL_ENV}={spec})")


def batch_split(cfg: TrainConfig, processes: int) -> tuple[int, int]:
    """(micro batch, accumulation steps) that keep `train.batch_size` the global batch:
    batch_size = processes x micro_batch_size x accumulation."""
    from ipa_lib.core.errors import InputError

    micro = cfg.micro_batch_size or max(cfg.batch_size // processes, 1)
    if cfg.batch_size % (processes * micro):
        raise InputError(f"train.batch_size={cfg.batch_size} is not a multiple of {processes} process(es) x "
                         f"train.micro_batch_size={micro}; choose train.batch_size / train.micro_batch_size so it divides")
    return micro, cfg.batch_size // (processes * micro)


def micro_rows(rank: int, processes: int, batch_size: int, micro: int) -> list[slice]:
    """The rows of the global batch that process `rank` runs, one slice per micro-batch."""
    per = batch_size // processes
    return [slice(rank * per + k, rank * per + k + micro) for k in range(0, per, micro)]


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def make_accelerator(cfg: TrainConfig, backend):
    """The run's Accelerator: DDP (`train.distributed: ddp`) or FSDP through accelerate's
    plugin when launched with several processes; one process = autocast + backward only."""
    from accelerate import Accelerator

    kwargs = {}
    if _world_size() > 1 and cfg.distributed == "fsdp":
        from accelerate import FullyShardedDataParallelPlugin

        if backend.device.type == "cpu":
            from ipa_lib.core.errors import InputError

            raise InputError("train.distributed=fsdp needs GPUs (accelerate's FSDP has no CPU backend); use ddp on CPU")

        # use_orig_params: frozen base weights and trainable LoRA weights share flat parameters
        kwargs["fsdp_plugin"] = FullyShardedDataParallelPlugin(use_orig_params=True, sync_module_states=True)
    elif _world_size() > 1 and cfg.loss == "dpo":
        from accelerate import DistributedDataParallelKwargs

        # DPO runs the policy twice (winner, loser) before one backward
        kwargs["kwargs_handlers"] = [DistributedDataParallelKwargs(static_graph=True)]
    return Accelerator(cpu=backend.device.type == "cpu", mixed_precision="bf16" if backend.dtype == torch.bfloat16 else "no", **kwargs)


def _init_process_group(params: Params) -> None:
    """Under `accelerate launch`/torchrun: join the process group before the model is built,
    so `cuda` is this process's GPU (LOCAL_RANK)."""
    if _world_size() > 1:
        from accelerate import PartialState

        PartialState(cpu=params.backend.device == "cpu" or not torch.cuda.is_available())


def _global_mean(accelerator, values: list[float], parts: list[dict[str, float]]) -> tuple[float, dict[str, float]]:
    """Loss and diagnostics averaged over micro-batches and processes (equal sizes: the
    global batch's mean); one process with one micro-batch returns its numbers untouched."""
    if accelerator.num_processes == 1 and len(values) == 1:
        return values[0], parts[0]
    keys = list(parts[0])
    local = torch.tensor([[v, *(p[k] for k in keys)] for v, p in zip(values, parts)], dtype=torch.float64).mean(0)
    if accelerator.num_processes > 1:
        local = accelerator.reduce(local.to(accelerator.device), "mean").cpu()
    total = local.tolist()
    return total[0], dict(zip(keys, total[1:]))


class _Unwrapped:
    """Context: `backend.transformer` is the plain (peft) module, full weights gathered under
    FSDP, for saving and loading adapters; the prepared (wrapped) module again on exit."""

    def __init__(self, accelerator, backend, model):
        self.accelerator, self.backend, self.model = accelerator, backend, model

    def __enter__(self):
        from contextlib import ExitStack

        self.stack = ExitStack()
        if self.accelerator.distributed_type.name == "FSDP":
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            self.stack.enter_context(FSDP.summon_full_params(self.model, writeback=False, offload_to_cpu=True, rank0_only=True))
        self.backend.transformer = self.accelerator.unwrap_model(self.model)
        return self.backend

    def __exit__(self, *exc):
        self.backend.transformer = self.model
        self.stack.close()
        return False


def launch_command(params_file: str | Path, gated_dir: str | Path, out_dir: str | Path, base_model: str | None = None, *,
                   processes: int, resume: bool | None = None, checkpoint_root: str | Path | None = None,
                   port: int | None = None) -> list[str]:
    """`accelerate launch` of `ipa train` with `processes` processes on this machine (torchrun
    underneath: accelerate's `--cpu` would start one process, so `--multi_gpu` also on CPU;
    each process then picks gloo or NCCL from its device)."""
    import socket
    import sys

    if port is None:
        with socket.socket() as sock:  # a free port for the rendezvous of this run
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
           "--num_machines", "1", "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "ipa_lib.cli", "train", "--params", str(params_file), "--gated", str(gated_dir), "--out", str(out_dir), "--quiet"]
    if base_model:
        cmd += ["--base-model", str(base_model)]
    if checkpoint_root is not None:
        cmd += ["--checkpoint-root", str(checkpoint_root)]
    return cmd + {None: [], True: ["--resume"], False: ["--fresh"]}[resume]


def train_in_pod(params: Params, gated_dir: str | Path, out_dir: str | Path, base_model: str | None = None, *,
                 processes: int | None = None, resume: bool | None = None, progress: bool = True,
                 metrics_path: str | Path | None = None, curve_path: str | Path | None = None,
                 checkpoint_root: str | Path | None = None) -> TrainResult:
    """`train` with one process per GPU of the pod (`pipeline.accelerator_limit`): 1 trains in
    this process; more runs `launch_command` (the workers do not track: this process does)
    and reads the result rank 0 wrote into `out_dir`. A failed worker raises with the end of
    the launcher's output (its traceback)."""
    import subprocess
    import tempfile
    from collections import deque

    import yaml

    processes = processes or params.pipeline.accelerator_limit
    if processes == 1:
        return train(params, gated_dir, out_dir, base_model, resume=resume, progress=progress,
                     metrics_path=metrics_path, curve_path=curve_path, checkpoint_root=checkpoint_root)
    with tempfile.TemporaryDirectory(prefix="ipa-train-") as tmp:
        worker = params.model_copy(deep=True)
        worker.tracking.enabled = False
        worker.train.metrics, worker.train.curve = f"{tmp}/metrics.json", f"{tmp}/curve.json"
        params_file = Path(tmp) / "params.yaml"
        params_file.write_text(yaml.safe_dump(worker.model_dump(mode="json"), sort_keys=False))
        cmd = launch_command(params_file, gated_dir, out_dir, base_model, processes=processes, resume=resume,
                             checkpoint_root=checkpoint_root)
        tail: deque[str] = deque(maxlen=60)
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
            for line in proc.stdout:  # the workers' output goes on to this task's log
                print(line, end="", flush=True)
                tail.append(line)
        if proc.returncode != 0:
            raise RuntimeFailure(f"train: {processes} processes (accelerate launch) failed with exit {proc.returncode}:\n"
                                 + "".join(tail))
    out_dir = Path(out_dir)
    summary = json.loads((out_dir / "train_summary.json").read_text())
    result: TrainResult = {**summary, "log": [json.loads(l) for l in (out_dir / "train_log.jsonl").read_text().splitlines()]}
    write_train_metrics(result, metrics_path, curve_path)
    return result


# ---- the loop --------------------------------------------------------------------------

def train(params: Params, gated_dir: str | Path, out_dir: str | Path, base_model: str | None = None,
          resume: bool | None = None, progress: bool = True, stop_after: int | None = None,
          metrics_path: str | Path | None = None, curve_path: str | Path | None = None,
          checkpoint_root: str | Path | None = None) -> TrainResult:
    """Train a LoRA adapter with `params.train.loss` and write it (diffusers LoRA format) to `out_dir`.

    Writes `out_dir` (adapter, summary, log, curve plot) and, when given, `metrics_path` (summary +
    final diagnostics) and `curve_path` (the logged steps): the files DVC declares as metrics and
    plots (`train.metrics`, `train.curve` for `ipa train`).
    `stop_after` ends the process's work after that many steps without writing `out_dir`,
    leaving only checkpoints (what a killed run leaves).
    Checkpoints go to `checkpoint_root/<key>/step-NNNNNN` (`checkpoint_key`; default root
    `.<out name>.checkpoints` beside `out_dir`, private to it; a given root is shared, as on the
    workspace PVC). `resume=None` continues from the latest checkpoint of this key when there is
    one, `True` insists on it, `False` deletes it and starts at step 0 (`prepare_checkpoints`).
    """
    from contextlib import nullcontext

    from tqdm.auto import tqdm

    from ipa_lib.core.io import atomic_dir, atomic_write_json
    from ipa_lib.data.visualize import plot_curve
    from ipa_lib.models.lora import adapter_norm, lora_parameters
    from ipa_lib.models.speed import apply_speed_settings
    from ipa_lib.stages.common import load_start_backend as load_backend

    cfg = params.train
    out_dir = Path(out_dir)
    micro, accum = batch_split(cfg, _world_size())  # before any loading: a bad split fails at once
    _init_process_group(params)
    data = load_train_data(gated_dir, cfg.loss, params.gate.threshold, cfg.dpo_min_margin)
    backend = load_backend(params, base_model)
    torch.manual_seed(cfg.seed)  # LoRA A matrices start random: same seed, same adapter
    backend.add_lora(cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
    apply_speed_settings(backend, cfg)  # train.compile, train.checkpoint_blocks
    backend.transformer.train()
    accelerator = make_accelerator(cfg, backend)
    rank, processes, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    trainable = lora_parameters(backend.transformer)
    optimizer = make_optimizer(cfg, trainable)

    key, what = checkpoint_key(params, gated_dir, base_model)
    keys_root = Path(checkpoint_root) if checkpoint_root is not None else _checkpoint_root(out_dir)
    # root: this key's folder; the main process prepares it, the others wait and read it
    root, changed = prepare_checkpoints(keys_root, key, what, resume, shared=checkpoint_root is not None, main=main)
    accelerator.wait_for_everyone()
    start, log, resumed_from = 0, [], None
    if (ckpt := latest_checkpoint(root)) is not None:
        resumed_from, log = load_checkpoint(backend, optimizer, ckpt)
        start = resumed_from + 1
        logger.info("train: resuming after step %d from %s", resumed_from, ckpt)
    elif changed:
        logger.info("train: starting afresh, the checkpoints under %s were made with %s", keys_root, "; ".join(changed))

    model, fsdp = backend.transformer, accelerator.distributed_type.name == "FSDP"
    if processes > 1:  # one process runs unwrapped, exactly as before
        if fsdp:  # FSDP (v1) flattens the parameters: the optimizer is built on the wrapped module
            model = accelerator.prepare(model)
            trainable = [p for p in model.parameters() if p.requires_grad]
            optimizer = accelerator.prepare(make_optimizer(cfg, trainable))
        else:
            model, optimizer = accelerator.prepare(model, optimizer)
        backend.transformer = model  # policy and reference forwards both run through the wrapper

    started = time.time()
    losses: list[float] = [e["loss"] for e in log]
    last_good = latest_checkpoint(root)
    end = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
    bar = tqdm(range(start, end), desc=f"train[{cfg.loss}]", disable=not (progress and main), initial=start, total=cfg.steps)
    for step in bar:
        fail_injected(rank, step)
        gen = step_generator(cfg.seed, step)
        idx = torch.randint(0, len(data), (cfg.batch_size,), generator=gen).numpy()
        draws = StepDraws(gen, cfg.batch_size)  # the global batch's t and noise; this process takes its rows
        optimizer.zero_grad(set_to_none=True)
        values, parts = [], []
        for k, rows in enumerate(micro_rows(rank, processes, cfg.batch_size, micro)):
            with nullcontext() if k == accum - 1 or processes == 1 else accelerator.no_sync(model):
                with accelerator.autocast():
                    loss, stats = compute_loss(backend, data.batch(idx[rows]), cfg, draws, rows)
                values.append(loss.item())
                parts.append(stats)
                accelerator.backward(loss / accum if accum > 1 else loss)  # gradients: mean over the global batch
        value, stats = _global_mean(accelerator, values, parts)
        median = float(np.median(losses[-50:])) if len(losses) >= 20 else math.inf
        if is_divergence(value, losses, cfg.spike_factor):
            where = f"last good checkpoint: {last_good}" if last_good else "no checkpoint was written yet"
            raise TrainingDiverged(f"train: loss {value} at step {step} (running median {median:.4g}); stopped, {where}")
        grad_norm = float(accelerator.clip_grad_norm_(model.parameters() if fsdp else trainable, cfg.max_grad_norm))
        optimizer.step()
        losses.append(value)
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            # grad_norm: before clipping (what clip_grad_norm_ returns); adapter_norm: ||scaling B A||
            log.append({"step": step, **stats, "grad_norm": grad_norm, "adapter_norm": adapter_norm(backend.transformer)})
            bar.set_postfix(loss=f"{value:.4f}", acc=f"{stats.get('implicit_acc', float('nan')):.2f}", refresh=False)
        if (step + 1) % cfg.checkpoint_every == 0 or step == cfg.steps - 1:
            with _Unwrapped(accelerator, backend, model):  # rank 0 writes, the others wait
                last_good = save_checkpoint(backend, optimizer, step, log, root) if main else root / f"step-{step:06d}"
            accelerator.wait_for_everyone()
            hold_after_checkpoint(step)
        if step + 1 in cfg.save_at and step + 1 < cfg.steps:  # kept with the checkpoints until the end
            with _Unwrapped(accelerator, backend, model):
                if main:
                    with atomic_dir(root / ALONG / f"step-{step + 1}") as tmp:
                        backend.save_adapter(tmp)
            accelerator.wait_for_everyone()
    if end < cfg.steps:
        return {"stopped_at": end - 1, "checkpoint": str(last_good)}

    summary = {
        "loss": cfg.loss, "beta": cfg.beta, "hand_weight": cfg.hand_weight, "steps": cfg.steps,
        "train_samples": len(data), "seconds": round(time.time() - started, 1),
        "final": log[-1] if log else {},
        "trainable_params": sum(p.numel() for p in trainable),
        "resumed_from": resumed_from, "checkpoint_key": key,  # the run's own record, not DVC metrics
    }
    result: TrainResult = {**summary, "log": log}
    with _Unwrapped(accelerator, backend, model):
        if main:  # the outputs come from rank 0 alone; the others wait for them
            with atomic_dir(out_dir) as tmp:
                backend.save_adapter(tmp)
                atomic_write_json(tmp / "train_summary.json", summary)
                (tmp / "train_log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in log))
                plot_curve(tmp / "train_curve.png", log, title=f"train[{cfg.loss}] beta={cfg.beta} lambda={cfg.hand_weight}")
                if (root / ALONG).is_dir():  # train.save_at: the adapters along the budget
                    shutil.copytree(root / ALONG, tmp / ALONG)
            write_train_metrics(result, metrics_path, curve_path)
    accelerator.wait_for_everyone()
    finish_checkpoints(root, main)
    return result


def write_train_metrics(result: TrainResult, metrics_path: str | Path | None, curve_path: str | Path | None) -> None:
    """The run's summary + final diagnostics (`metrics_path`) and its logged steps (`curve_path`),
    each written atomically when its path is given."""
    from ipa_lib.core.io import atomic_write_json
    from ipa_lib.core.results import train_metrics

    if curve_path is not None:
        atomic_write_json(curve_path, result["log"])
    if metrics_path is not None:
        atomic_write_json(metrics_path, train_metrics({k: v for k, v in result.items() if k not in ("resumed_from", "checkpoint_key")}))
