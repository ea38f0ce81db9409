"""Grid cells: one trained configuration (method, beta, training seed) with its evaluation rows.

A cell is one DVC experiment of the grid (`scripts/paper_grid.py`), collected into a folder::

    <cells>/round-<r>/<name>/cell.json     {"name", "round", "loss", "beta", "hand_weight", "seed", "steps", "seconds", ...}
                            params.yaml    the experiment's exact params
                            per_clip.json  evaluate's per-clip rows (model base | ipa, eval seed, pose, metrics)
                            details.json   evaluate's details (method, beta, eval seeds, ...)
                            clips.npz      optional: evaluate's generated clips, base / ipa (S, N, F, H, W, 3);
                                           the base clips, the same in every cell, may be kept once
                                           under <cells>/shared-clips/ (`ipa_lib.core.io.share_arrays`)

Which metrics a cell has, and how each is formed, comes from the registry
(`ipa_lib.core.metrics`, `Metric.kind`): "clip" metrics are per-clip rows, "set" metrics
(FD) one number per generated set, "probe" metrics per-clip probes of stored clips.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ipa_lib.core.metrics import kind_metrics

CLIP_METRICS = kind_metrics("clip")  # evaluate's per-clip rows
SET_METRICS = kind_metrics("set")  # from stored clips, one number per generated set
PROBE_METRICS = kind_metrics("probe")  # from stored clips, one number per clip
METHODS = ("base", "sft", "ipa-global", "ipa-hand", "dpo", "kto")
METHOD_TITLES = {"base": "base (no training)", "sft": "SFT on gated", "ipa-global": "IPA global (λ=1)",
                 "ipa-hand": "IPA hand (λ=10)", "dpo": "Diffusion-DPO", "kto": "Diffusion-KTO"}
BETA_METHODS = ("ipa-global", "ipa-hand", "dpo", "kto")
PAPER_BETA = 600.0


def method_name(loss: str, hand_weight: float) -> str:
    """The grid's method label: IPA splits into hand-weighted and global (lambda = 1)."""
    if loss == "ipa":
        return "ipa-global" if hand_weight == 1 else "ipa-hand"
    if loss in ("sft", "dpo", "kto"):
        return loss
    raise ValueError(f"unknown loss {loss!r} (valid: ipa, sft, dpo, kto)")


@dataclass
class Cell:
    """One trained configuration at one training seed, with its base next to it."""

    name: str
    round: int
    loss: str
    beta: float | None  # None where the method has no beta (SFT)
    hand_weight: float
    seed: int
    rows: list[dict]  # evaluate's per-clip rows, both models
    meta: dict = field(default_factory=dict)  # cell.json (steps, seconds, source, ...)
    params: dict = field(default_factory=dict)  # the run's params.yaml
    set_metrics: dict = field(default_factory=dict)  # {"base": {"fd": ..}, "ipa": {...}}
    feats: dict = field(default_factory=dict)  # {(model, metric): (S*N, D) generated features}
    real: dict = field(default_factory=dict)  # {metric: (N, D) real features} (shared)
    clips: dict | None = None  # {"base", "ipa": (S, N, F, H, W, 3)} when stored

    @property
    def method(self) -> str:
        return method_name(self.loss, self.hand_weight)

    @property
    def key(self) -> tuple[int, str, float | None]:
        return (self.round, self.method, self.beta)


def _beta_of(loss: str, beta: float) -> float | None:
    return None if loss == "sft" else float(beta)


def load_cell(folder: str | Path, with_clips: bool = True) -> Cell:
    import yaml

    from ipa_lib.core.io import load_shared_npz, read_json

    folder = Path(folder)
    meta = read_json(folder / "cell.json", "grid cell record")
    rows = read_json(folder / "per_clip.json", "per-clip evaluation rows")
    params = yaml.safe_load((folder / "params.yaml").read_text()) if (folder / "params.yaml").exists() else {}
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{folder / 'per_clip.json'}: expected a non-empty list of rows")
    if (folder / "details.json").exists():  # the val split's means: what selection (best beta) reads
        meta = {**meta, "val": (read_json(folder / "details.json", "evaluation details") or {}).get("val")}
    clips = None
    if with_clips and (folder / "clips.npz").exists():
        clips = load_shared_npz(folder / "clips.npz")  # base clips may live once per round (`share_arrays`)
    return Cell(name=meta["name"], round=int(meta.get("round", 1)), loss=meta["loss"],
                beta=_beta_of(meta["loss"], meta["beta"]), hand_weight=float(meta["hand_weight"]),
                seed=int(meta["seed"]), rows=rows, meta=meta, params=params, clips=clips)


def load_cells(root: str | Path, with_clips: bool = True) -> list[Cell]:
    """Every `cell.json` under `root` (sorted by round, method, beta, seed)."""
    root = Path(root)
    found = sorted(root.rglob("cell.json"))
    if not found:
        raise FileNotFoundError(f"{root}: no grid cells (cell.json) found; run `python scripts/paper_grid.py run` first")
    cells = [load_cell(p.parent, with_clips) for p in found]
    return sorted(cells, key=cell_order)


def cell_order(c: Cell):
    return (c.round, METHODS.index(c.method), c.beta or 0.0, c.seed)


def clip_values(cell: Cell, model: str, metric: str) -> dict[tuple[int, int], float]:
    """{(eval seed, pose): value} of one model ("base" | "ipa") in a cell."""
    out = {(int(r["seed"]), int(r["pose"])): float(r[metric]) for r in cell.rows if r["model"] == model and metric in r}
    if not out:
        raise KeyError(f"cell {cell.name}: no {metric!r} for model {model!r}")
    return out


def has_metric(cell: Cell, metric: str) -> bool:
    if metric in SET_METRICS:
        return metric in cell.set_metrics.get("ipa", {})
    return any(metric in r for r in cell.rows)


def pose_matrix(values: dict[tuple[int, int], float], poses: Sequence[int], seeds: Sequence[int]) -> np.ndarray:
    return np.array([[values[(s, p)] for s in seeds] for p in poses], dtype=np.float64)  # (P, S)
