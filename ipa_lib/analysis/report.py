"""The miniature paper table: grid cells -> mean +- interval per method x beta, claims, docs/results.md.

A *cell* is one trained configuration (method, beta, training seed) of the grid, run as a
DVC experiment (`scripts/paper_grid.py`) and collected into a folder::

    <cells>/round-<r>/<name>/cell.json     {"name", "round", "loss", "beta", "hand_weight", "seed", "steps", "seconds", ...}
                            params.yaml    the experiment's exact params
                            per_clip.json  evaluate's per-clip rows (model base | ipa, eval seed, pose, metrics)
                            details.json   evaluate's details (method, beta, eval seeds, ...)
                            clips.npz      optional: evaluate's generated clips, base / ipa (S, N, F, H, W, 3)

Everything below `load_cells` is a pure function of those numbers, so the report is exactly
what the cells computed (tests/test_report.py checks it). With clips, the report adds
Frechet distances in the feature space of the toy extractors (`ipa_lib.analysis.features`, whole
clip and hand region) and two artefact probes per clip: `score_gaps` (toy scorer: gaps
between fingers left clear; extra fingers, melted palms and blur fill them) and
`hand_sharpness` (gradient energy in the hand mask relative to the ground truth; < 1 = blurrier).

Intervals (level `--level`, 95 % by default):
- a trained configuration with >= 2 training seeds: t-interval over its per-seed means
  (the seed is the unit that is replicated);
- the base, or a configuration with one seed: percentile bootstrap over held-out poses
  (all evaluation seeds of a pose resampled together); FD is recomputed on the resampled
  sets and reported as estimate +- z * bootstrap s.e. (resampling repeats clips, which
  biases FD upwards, so its percentile interval need not contain the estimate).
Comparisons (the claims) use paired differences: per training seed (t-interval) when both
sides have >= 2 common seeds, else per clip (same pose, same evaluation seed) bootstrapped.
A claim *held* when the interval of the difference lies above 0, is *contradicted* when it
lies below 0, and is *inconclusive* otherwise. "Without hurting the whole video" fails when
PSNR, SSIM or FD get worse than the base by more than a tolerance on average *and*
significantly (tolerances: `promote.tolerances` for PSNR/SSIM, the FD between two
independent real sets of the same size for FD).
"""

from __future__ import annotations

import argparse
import hashlib
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

CLIP_METRICS = ("hand_quality", "hand_pass_rate", "psnr", "ssim", "hand_psnr")  # = evaluation.METRICS
PROBE_METRICS = ("score_gaps", "hand_sharpness")  # from stored clips
SET_METRICS = ("fd", "hand_fd")  # from stored clips, one number per generated set
HIGHER_IS_BETTER = {"hand_quality": True, "hand_pass_rate": True, "psnr": True, "ssim": True, "hand_psnr": True,
                    "score_gaps": True, "hand_sharpness": None, "fd": False, "hand_fd": False}
LABELS = {"hand_quality": "hand quality", "hand_pass_rate": "hand pass rate", "psnr": "PSNR (dB)", "ssim": "SSIM",
          "hand_psnr": "hand PSNR (dB)", "fd": "FD", "hand_fd": "hand FD", "score_gaps": "finger gaps clear",
          "hand_sharpness": "hand sharpness"}
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


# ---- cells ------------------------------------------------------------------------------------

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

    from ipa_lib.core.io import load_npz, read_json

    folder = Path(folder)
    meta = read_json(folder / "cell.json", "grid cell record")
    rows = read_json(folder / "per_clip.json", "per-clip evaluation rows")
    params = yaml.safe_load((folder / "params.yaml").read_text()) if (folder / "params.yaml").exists() else {}
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{folder / 'per_clip.json'}: expected a non-empty list of rows")
    clips = None
    if with_clips and (folder / "clips.npz").exists():
        clips = load_npz(folder / "clips.npz")
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
    return sorted(cells, key=_cell_order)


def _cell_order(c: Cell):
    return (c.round, METHODS.index(c.method), c.beta or 0.0, c.seed)


# ---- per-clip values ----------------------------------------------------------------------------

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


def _pose_matrix(values: dict[tuple[int, int], float], poses: Sequence[int], seeds: Sequence[int]) -> np.ndarray:
    return np.array([[values[(s, p)] for s in seeds] for p in poses], dtype=np.float64)  # (P, S)


# ---- intervals ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Stat:
    """A mean and its interval; `how` says which interval ("t over n seeds" / "bootstrap over poses")."""

    mean: float
    lo: float
    hi: float
    n: int
    how: str

    @property
    def half_width(self) -> float:
        return (self.hi - self.lo) / 2


def t_interval(values: Sequence[float], level: float = 0.95) -> Stat:
    """Mean and Student-t interval of independent replicates (n >= 2; n = 1 gives nan bounds)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("t_interval of no values")
    m = float(x.mean())
    if x.size < 2:
        return Stat(m, math.nan, math.nan, 1, "single value")
    from scipy import stats

    hw = float(stats.t.ppf(0.5 + level / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return Stat(m, m - hw, m + hw, int(x.size), f"t over {x.size} seeds")


def bootstrap_interval(stat: Callable[[np.ndarray], float], n_units: int, level: float = 0.95, n_boot: int = 1000,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap of `stat(indices)` over `n_units` resampled with replacement (seeded)."""
    rng = np.random.default_rng(seed)
    draws = np.array([stat(rng.integers(0, n_units, n_units)) for _ in range(n_boot)])
    draws = draws[np.isfinite(draws)]
    if draws.size == 0:
        return math.nan, math.nan
    a = (1 - level) / 2
    return float(np.quantile(draws, a)), float(np.quantile(draws, 1 - a))


def bootstrap_se_interval(stat: Callable[[np.ndarray], float], n_units: int, estimate: float, level: float = 0.95,
                          n_boot: int = 200, seed: int = 0) -> tuple[float, float]:
    """estimate +- z * bootstrap standard error: for biased statistics such as FD, whose
    percentile interval need not contain the estimate (resampling repeats clips, which
    inflates the distance)."""
    from scipy import stats

    rng = np.random.default_rng(seed)
    draws = np.array([stat(rng.integers(0, n_units, n_units)) for _ in range(n_boot)])
    draws = draws[np.isfinite(draws)]
    if draws.size < 2:
        return math.nan, math.nan
    hw = float(stats.norm.ppf(0.5 + level / 2) * draws.std(ddof=1))
    return estimate - hw, estimate + hw


def _finite_mean(x: np.ndarray) -> float:
    x = x[np.isfinite(x)]
    return float(x.mean()) if x.size else math.nan


def clip_stat(cell: Cell, model: str, metric: str, level: float, n_boot: int, seed: int = 0) -> Stat:
    """Mean of a per-clip metric over a cell's clips, bootstrap interval over poses."""
    vals = clip_values(cell, model, metric)
    poses = sorted({p for _, p in vals})
    seeds = sorted({s for s, _ in vals})
    per_pose = np.array([_finite_mean(row) for row in _pose_matrix(vals, poses, seeds)])
    lo, hi = bootstrap_interval(lambda i: _finite_mean(per_pose[i]), len(poses), level, n_boot, seed)
    return Stat(_finite_mean(per_pose), lo, hi, 1, f"bootstrap over {len(poses)} poses")


def _fd_rows(cell: Cell, model: str, metric: str, pose_idx: np.ndarray) -> float:
    """FD of a cell's generated set restricted to poses `pose_idx` (all eval seeds) vs those poses' real clips."""
    from ipa_lib.analysis.features import frechet_distance

    gen, real = cell.feats[(model, metric)], cell.real[metric]
    n = len(real)
    rows = (np.arange(len(gen) // n)[:, None] * n + pose_idx[None, :]).ravel()  # gen rows are (eval seed, pose)
    return frechet_distance(gen[rows], real[pose_idx])


def set_stat(cell: Cell, model: str, metric: str, level: float, n_boot: int, seed: int = 0) -> Stat:
    value = cell.set_metrics[model][metric]
    if not cell.feats:
        return Stat(value, math.nan, math.nan, 1, "single value")
    n = len(cell.real[metric])
    lo, hi = bootstrap_se_interval(lambda i: _fd_rows(cell, model, metric, i), n, value, level, max(n_boot // 5, 50), seed)
    return Stat(value, lo, hi, 1, f"bootstrap s.e. over {n} poses")


def cell_value(cell: Cell, model: str, metric: str) -> float:
    if metric in SET_METRICS:
        return float(cell.set_metrics[model][metric])
    return _finite_mean(np.array(list(clip_values(cell, model, metric).values())))


# ---- the table ----------------------------------------------------------------------------------------

@dataclass
class Row:
    round: int
    method: str
    beta: float | None
    hand_weight: float | None
    seeds: list[int]
    stats: dict[str, Stat]
    per_seed: dict[str, dict[int, float]]
    seconds: float | None = None  # mean wall time per cell (train + evaluate + overhead), when known
    train_seconds: float | None = None  # mean training-loop time per cell
    start_of: tuple[str, float | None] | None = None  # base rows of round >= 2: the start model of (method, beta)


def groups(cells: Sequence[Cell]) -> dict[tuple[int, str, float | None], list[Cell]]:
    out: dict = {}
    for c in sorted(cells, key=_cell_order):
        out.setdefault(c.key, []).append(c)
    return out


def table_metrics(cells: Sequence[Cell]) -> list[str]:
    """The metrics every cell has, in display order."""
    all_metrics = CLIP_METRICS + SET_METRICS + PROBE_METRICS
    return [m for m in all_metrics if cells and all(has_metric(c, m) for c in cells)]


def shared_base(cells: Sequence[Cell]) -> bool:
    """True when every cell evaluated the same base clips (round 1: the pretrained model);
    False in later rounds, where each cell's base is the round-1 model it started from."""
    ref = {k: round(v, 9) for k, v in clip_values(cells[0], "base", "hand_quality").items()}
    return all({k: round(v, 9) for k, v in clip_values(c, "base", "hand_quality").items()} == ref for c in cells[1:])


def _group_stats(group: Sequence[Cell], model: str, metrics: Sequence[str], level: float, n_boot: int):
    stats, per_seed = {}, {}
    for m in metrics:
        per_seed[m] = {c.seed: cell_value(c, model, m) for c in group}
        if len(group) >= 2:
            stats[m] = t_interval(list(per_seed[m].values()), level)
        else:
            stats[m] = (set_stat if m in SET_METRICS else clip_stat)(group[0], model, m, level, n_boot)
    return stats, per_seed


def aggregate(cells: Sequence[Cell], level: float = 0.95, n_boot: int = 1000) -> list[Row]:
    """One row per (round, method, beta) plus the base: one row per round when all cells share it,
    else (round >= 2) one "start model" row before each configuration. Each metric a `Stat`."""
    metrics = table_metrics(cells)
    rows: list[Row] = []
    for rnd in sorted({c.round for c in cells}):
        in_round = [c for c in cells if c.round == rnd]
        shared = shared_base(in_round)
        if shared:  # the same network, poses and seeds in every cell: one row, bootstrap over poses
            base_stats = {m: (set_stat if m in SET_METRICS else clip_stat)(in_round[0], "base", m, level, n_boot) for m in metrics}
            rows.append(Row(rnd, "base", None, None, [], base_stats, {m: {} for m in metrics}))
        for (r, method, beta), group in groups(in_round).items():
            if not shared:
                stats, per_seed = _group_stats(group, "base", metrics, level, n_boot)
                rows.append(Row(r, "base", None, None, sorted(c.seed for c in group), stats, per_seed, start_of=(method, beta)))
            stats, per_seed = _group_stats(group, "ipa", metrics, level, n_boot)
            secs = [c.meta.get("seconds", {}).get("total") for c in group]
            secs = [s for s in secs if s is not None]
            tsecs = [c.meta.get("seconds", {}).get("train") for c in group]
            tsecs = [s for s in tsecs if s is not None]
            rows.append(Row(r, method, beta, group[0].hand_weight, sorted(c.seed for c in group), stats, per_seed,
                            float(np.mean(secs)) if secs else None, float(np.mean(tsecs)) if tsecs else None))
    return rows


def find_row(rows: Sequence[Row], rnd: int, method: str, beta: float | None = None) -> Row | None:
    for r in rows:
        if r.round == rnd and r.method == method and (beta is None or r.beta == beta) and r.start_of is None:
            return r
    return None


# ---- paired comparisons and claims -----------------------------------------------------------------

@dataclass(frozen=True)
class Config:
    """A side of a comparison: a trained configuration, or "base" (beta None)."""

    method: str
    beta: float | None = None


def _cells_of(cells: Sequence[Cell], rnd: int, cfg: Config) -> dict[int, tuple[Cell, str]]:
    """{training seed: (cell, "ipa")} of a trained configuration."""
    return {c.seed: (c, "ipa") for c in cells
            if c.round == rnd and c.method == cfg.method and (cfg.method == "sft" or c.beta == cfg.beta)}


def compare(cells: Sequence[Cell], rnd: int, a: Config, b: Config, metric: str, level: float = 0.95,
            n_boot: int = 1000, seed: int = 0) -> Stat | None:
    """Paired difference a - b of `metric` (None when a side was not run)."""
    if a.method == "base" and b.method == "base":
        return None
    # the base side of a comparison is the same cells' own base (in round >= 2, their start model)
    ca = _cells_of(cells, rnd, a) if a.method != "base" else None
    cb = _cells_of(cells, rnd, b) if b.method != "base" else None
    ca = ca if ca is not None else {s: (c, "base") for s, (c, _) in (cb or {}).items()}
    cb = cb if cb is not None else {s: (c, "base") for s, (c, _) in ca.items()}
    if not ca or not cb:
        return None
    common = sorted(set(ca) & set(cb))
    if len(common) >= 2:
        return t_interval([cell_value(*ca[s], metric) - cell_value(*cb[s], metric) for s in common], level)
    # one seed (or none in common: base vs a configuration): paired over clips of one cell each
    cell_a, model_a = ca[common[0] if common else min(ca)]
    cell_b, model_b = cb[common[0] if common else min(cb)]
    if metric in SET_METRICS:
        if not cell_a.feats or not cell_b.feats:
            return None
        n = len(cell_a.real[metric])
        d = cell_a.set_metrics[model_a][metric] - cell_b.set_metrics[model_b][metric]
        lo, hi = bootstrap_se_interval(lambda i: _fd_rows(cell_a, model_a, metric, i) - _fd_rows(cell_b, model_b, metric, i),
                                       n, d, level, max(n_boot // 5, 50), seed)
        return Stat(d, lo, hi, 1, f"paired bootstrap over {n} poses")
    va, vb = clip_values(cell_a, model_a, metric), clip_values(cell_b, model_b, metric)
    keys = sorted(set(va) & set(vb))
    poses = sorted({p for _, p in keys})
    seeds = sorted({s for s, _ in keys})
    diff = np.array([_finite_mean(row) for row in (_pose_matrix(va, poses, seeds) - _pose_matrix(vb, poses, seeds))])
    lo, hi = bootstrap_interval(lambda i: _finite_mean(diff[i]), len(poses), level, n_boot, seed)
    return Stat(_finite_mean(diff), lo, hi, 1, f"paired bootstrap over {len(poses)} poses")


def verdict(diff: Stat | None, higher_is_better: bool = True) -> str:
    """held / contradicted / inconclusive for 'a beats b' from the interval of a - b."""
    if diff is None:
        return "not run"
    lo, hi = (diff.lo, diff.hi) if higher_is_better else (-diff.hi, -diff.lo)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "inconclusive"
    if lo > 0:
        return "held"
    if hi < 0:
        return "contradicted"
    return "inconclusive"


@dataclass
class Claim:
    round: int
    text: str
    verdict: str
    evidence: str
    source: str = "paper"  # paper | question (the comparisons the paper did not make)


def fmt_diff(name: str, d: Stat | None, digits: int = 3) -> str:
    if d is None:
        return f"Δ{name} n/a"
    if math.isfinite(d.lo):
        return f"Δ{name} = {d.mean:+.{digits}f} [{d.lo:+.{digits}f}, {d.hi:+.{digits}f}]"
    return f"Δ{name} = {d.mean:+.{digits}f}"


def best_beta(rows: Sequence[Row], rnd: int, method: str, metric: str) -> float | None:
    cands = [r for r in rows if r.round == rnd and r.method == method and metric in r.stats]
    if not cands:
        return None
    sign = 1 if HIGHER_IS_BETTER.get(metric, True) else -1
    return max(cands, key=lambda r: sign * r.stats[metric].mean).beta


def evaluate_claims(cells: Sequence[Cell], rows: Sequence[Row], *, primary: str = "hand_quality",
                    tolerances: dict[str, float] | None = None, level: float = 0.95, n_boot: int = 1000,
                    paper_beta: float = PAPER_BETA) -> list[Claim]:
    """One line per paper claim (and per question the issue asks) and round, from paired differences."""
    tol = {"psnr": 1.0, "ssim": 0.02, **(tolerances or {})}
    metrics = set(table_metrics(cells))
    claims: list[Claim] = []

    def cmp(rnd, a, b, m):
        return compare(cells, rnd, a, b, m, level, n_boot) if m in metrics else None

    ipa = Config("ipa-hand", paper_beta)
    for rnd in sorted({c.round for c in cells}):
        # 1. hand-weighted IPA improves hands without hurting the whole video
        hand = cmp(rnd, ipa, Config("base"), primary)
        hand_v = verdict(hand)
        harms, ok_parts = [], []
        for m in ("psnr", "ssim", "fd"):
            d = cmp(rnd, ipa, Config("base"), m)
            if d is None:
                continue
            sign = 1.0 if HIGHER_IS_BETTER[m] else -1.0  # gain > 0: better than the base
            gain, gain_hi = sign * d.mean, max(sign * d.lo, sign * d.hi)
            # hurt = worse than the tolerance on average and significantly worse than the base
            if gain < -tol.get(m, 0.0) and math.isfinite(gain_hi) and gain_hi < 0:
                harms.append(fmt_diff(m, d))
            else:
                ok_parts.append(fmt_diff(m, d))
        if hand_v == "not run":
            v1 = "not run"
        elif hand_v == "held" and not harms:
            v1 = "held"
        elif hand_v == "contradicted" or harms:
            v1 = "contradicted"
        else:
            v1 = "inconclusive"
        start = "base" if rnd == 1 else f"its start (the round-{rnd - 1} model)"
        extra = [fmt_diff(m, cmp(rnd, ipa, Config("base"), m)) for m in ("hand_pass_rate", "hand_fd")
                 if m != primary and m in metrics]
        ev = f"{', '.join([fmt_diff(primary, hand)] + extra)} vs {start}; whole video: " + ", ".join(harms + ok_parts)
        if harms:
            ev += f" (harmed beyond tolerance {', '.join(f'{k} {v:.3g}' for k, v in tol.items())})"
        claims.append(Claim(rnd, f"Hand-weighted IPA (λ=10, β={paper_beta:g}) improves hands without hurting the whole video", v1, ev))

        # 2-3. beta = 600 beats 200 (extra-hand artefacts) and 2000 (blurry hands)
        for other, artefact, probe in ((200.0, "extra-hand artefacts", "score_gaps"), (2000.0, "blurry hands", "hand_sharpness")):
            d = cmp(rnd, ipa, Config("ipa-hand", other), primary)
            ev = f"{fmt_diff(primary, d)} (β={paper_beta:g} minus β={other:g})"
            p = cmp(rnd, ipa, Config("ipa-hand", other), probe)
            if p is not None:
                ev += f"; artefact probe {fmt_diff(probe, p)}"
            claims.append(Claim(rnd, f"β={paper_beta:g} beats β={other:g} ({artefact})", verdict(d), ev))

        # 4. hand-local weighting beats global
        d = cmp(rnd, ipa, Config("ipa-global", paper_beta), primary)
        ev = f"{fmt_diff(primary, d)} (λ=10 minus λ=1, β={paper_beta:g})"
        for m in ("hand_psnr", "hand_fd"):
            e = cmp(rnd, ipa, Config("ipa-global", paper_beta), m)
            if e is not None:
                ev += f"; {fmt_diff(m, e)}"
        claims.append(Claim(rnd, "Hand-local weighting beats global weighting", verdict(d), ev))

        # questions the paper leaves open: IPA against SFT, DPO and KTO at equal steps
        d = cmp(rnd, ipa, Config("sft"), primary)
        claims.append(Claim(rnd, "IPA beats SFT on the same gated samples", verdict(d), f"{fmt_diff(primary, d)} (IPA minus SFT)", "question"))
        for method in ("dpo", "kto"):
            b = best_beta(rows, rnd, method, primary)
            d = cmp(rnd, ipa, Config(method, b), primary) if b is not None else None
            where = f"its best β={b:g}" if b is not None else "not run"
            claims.append(Claim(rnd, f"IPA beats {METHOD_TITLES[method]} at equal steps ({where})", verdict(d),
                                f"{fmt_diff(primary, d)} (IPA β={paper_beta:g} minus {method.upper()})", "question"))
    return claims


# ---- clip-derived metrics (FD, artefact probes) ------------------------------------------------------

def hand_sharpness(video: np.ndarray, target: np.ndarray, mask: np.ndarray) -> float:
    """Gradient energy inside the hand mask, generated / ground truth (1 = as sharp; < 1 blurrier)."""
    def energy(v):
        g = v.astype(np.float64).mean(-1)
        gx, gy = np.diff(g, axis=-1)[..., :-1, :], np.diff(g, axis=-2)[..., :, :-1]
        return float((np.hypot(gx, gy) * mask[..., :-1, :-1]).sum())

    ref = energy(target)
    return energy(video) / ref if ref > 0 else math.nan


def reference_set(params: dict) -> dict[str, np.ndarray]:
    """The held-out real clips the evaluation poses come from (ground truth of those poses)."""
    from ipa_lib.core.config import parse_params
    from ipa_lib.stages.sample import toy_conditions

    p = parse_params(params)
    return toy_conditions(p.evaluate.pose_seed, p.evaluate.num_poses, p.toy.frames, p.toy.size, p.toy.motion)


def add_clip_metrics(cells: Sequence[Cell], extractors: dict | None) -> dict:
    """Fill `feats`, `real`, `set_metrics` and the per-clip probes of every cell that stored clips.

    `extractors`: {"fd": callable, "hand_fd": callable on hand views} (any clips -> features
    callables), or None to skip FD. Returns {"real_floor": {metric: FD of two real sets}}.
    """
    from ipa_lib.data.tensors import hand_masks
    from ipa_lib.analysis.features import frechet_distance, hand_view
    from ipa_lib.data.toy_quality import ToyHandScorer

    with_clips = [c for c in cells if c.clips is not None]
    if not with_clips:
        return {}
    params = with_clips[0].params
    ref = reference_set(params)
    n = len(ref["target"])
    masks = hand_masks(ref["hand_keypoints"], *ref["target"].shape[2:4])
    scorer = ToyHandScorer()
    real, floor = {}, {}
    if extractors:
        real = {"fd": extractors["fd"](ref["target"]), "hand_fd": extractors["hand_fd"](hand_view(ref["target"], ref["hand_keypoints"]))}
        # noise floor: the same poses' real clips against another draw of real clips (other identities)
        other = reference_set({**params, "evaluate": {**params.get("evaluate", {}), "pose_seed": int(params.get("evaluate", {}).get("pose_seed", 99_000)) + 50_000}})
        floor = {"fd": frechet_distance(extractors["fd"](other["target"]), real["fd"]),
                 "hand_fd": frechet_distance(extractors["hand_fd"](hand_view(other["target"], other["hand_keypoints"])), real["hand_fd"])}
    cache: dict[bytes, tuple] = {}  # the base clips are identical in every cell: compute once
    for c in with_clips:
        if c.params.get("toy") != params.get("toy") or c.params.get("evaluate") != params.get("evaluate"):
            raise ValueError(f"cell {c.name}: toy/evaluate params differ from cell {with_clips[0].name}; one report needs one evaluation protocol")
        c.real = real
        seeds = [int(s) for s in c.clips.get("seeds", sorted({r["seed"] for r in c.rows}))]
        for model in ("base", "ipa"):
            video = c.clips[model]  # (S, N, F, H, W, 3)
            if video.shape[1] != n:
                raise ValueError(f"cell {c.name}: clips.npz has {video.shape[1]} poses, evaluate.num_poses is {n}")
            digest = hashlib.sha1(np.ascontiguousarray(video).tobytes()).digest() + bytes(str(video.shape), "ascii")
            if digest not in cache:
                flat = video.reshape(-1, *video.shape[2:])
                kps = np.tile(ref["hand_keypoints"], (len(seeds), 1, 1, 1, 1))
                feats, sm = {}, {}
                if extractors:
                    feats["fd"] = extractors["fd"](flat)
                    feats["hand_fd"] = extractors["hand_fd"](hand_view(flat, kps))
                    sm = {m: frechet_distance(feats[m], real[m]) for m in SET_METRICS}
                probes = {}
                for si, s in enumerate(seeds):
                    for i in range(n):
                        pose = int(params["evaluate"]["pose_seed"]) + i
                        comp = scorer.score(video[si, i], ref["hand_keypoints"][i])
                        probes[(s, pose)] = {"score_gaps": comp["score_gaps"],
                                             "hand_sharpness": hand_sharpness(video[si, i], ref["target"][i], masks[i])}
                cache[digest] = (feats, sm, probes)
            feats, sm, probes = cache[digest]
            for m, f in feats.items():
                c.feats[(model, m)] = f
            if sm:
                c.set_metrics.setdefault(model, {}).update(sm)
            for r in c.rows:
                if r["model"] == model and (int(r["seed"]), int(r["pose"])) in probes:
                    r.update(probes[(int(r["seed"]), int(r["pose"]))])
    return {"real_floor": floor}


# ---- pictures ----------------------------------------------------------------------------------------------

def plot_beta_curves(rows: Sequence[Row], out_dir: str | Path, rnd: int = 1, metrics: Sequence[str] | None = None) -> list[Path]:
    """One PNG per metric: the metric against beta for every beta-using method (interval bars),
    with the base and SFT as horizontal lines (their intervals shaded)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    in_round = [r for r in rows if r.round == rnd]
    metrics = list(metrics or (in_round[0].stats if in_round else []))
    paths = []
    colours = {"ipa-hand": "tab:red", "ipa-global": "tab:orange", "dpo": "tab:blue", "kto": "tab:green", "sft": "tab:purple", "base": "black"}
    for m in metrics:
        fig, ax = plt.subplots(figsize=(5, 3.4))
        for method in BETA_METHODS:
            pts = sorted((r.beta, r.stats[m]) for r in in_round if r.method == method and m in r.stats)
            if not pts:
                continue
            x = [b for b, _ in pts]
            y = np.array([s.mean for _, s in pts])
            err = np.array([[s.mean - s.lo, s.hi - s.mean] for _, s in pts]).T
            err = np.clip(np.where(np.isfinite(err), err, 0.0), 0.0, None)
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=METHOD_TITLES[method], color=colours[method])
        for method, style in (("base", "--"), ("sft", ":")):
            r = next((r for r in in_round if r.method == method and r.start_of is None and m in r.stats), None)
            if r is None:
                continue
            s = r.stats[m]
            ax.axhline(s.mean, linestyle=style, color=colours[method], label=METHOD_TITLES[method])
            if math.isfinite(s.lo):
                ax.axhspan(s.lo, s.hi, color=colours[method], alpha=0.08)
        ax.set_xscale("log")
        betas = sorted({r.beta for r in in_round if r.beta is not None})
        if betas:
            ax.set_xticks(betas)
            ax.set_xticklabels([f"{b:g}" for b in betas])
            ax.minorticks_off()
        ax.set_xlabel("β")
        arrow = {True: " (higher is better)", False: " (lower is better)", None: " (1 = as sharp as ground truth)"}[HIGHER_IS_BETTER.get(m, True)]
        ax.set_title(f"{LABELS.get(m, m)}{arrow}", fontsize=9)
        ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        path = out_dir / (f"beta_{m}.png" if rnd == 1 else f"beta_{m}_round{rnd}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def clip_grid(cells: Sequence[Cell], rows: Sequence[Row], out_dir: str | Path, rnd: int = 1, n: int = 4,
              primary: str = "hand_quality") -> Path | None:
    """driving pose | base | each method (at beta 600, or its best beta) for `n` held-out poses,
    first training seed, first evaluation seed. Writes clips[_roundN].png and .gif."""
    from ipa_lib.data.visualize import side_by_side

    in_round = [c for c in cells if c.round == rnd and c.clips is not None]
    if not in_round:
        return None
    ref = reference_set(in_round[0].params)
    n = min(n, len(ref["pose"]))
    start = "base" if shared_base(in_round) else f"start ({in_round[0].method} r{rnd - 1})"
    columns = {"driving pose": ref["pose"][:n], start: in_round[0].clips["base"][0, :n]}
    for method in METHODS[1:]:
        beta = None
        if method in BETA_METHODS:
            betas = {c.beta for c in in_round if c.method == method}
            beta = PAPER_BETA if PAPER_BETA in betas else best_beta(rows, rnd, method, primary)
        pick = sorted((c for c in in_round if c.method == method and (beta is None or c.beta == beta)), key=lambda c: c.seed)
        if pick:
            label = method if beta is None else f"{method} b{beta:g}"
            columns[label] = pick[0].clips["ipa"][0, :n]
    columns["ground truth"] = ref["target"][:n]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    png, _ = side_by_side(out_dir / ("clips" if rnd == 1 else f"clips_round{rnd}"), columns, scale=2)
    return png


# ---- markdown ----------------------------------------------------------------------------------------------

def fmt_stat(s: Stat | None, digits: int = 3) -> str:
    if s is None or not math.isfinite(s.mean):
        return "n/a"
    if math.isfinite(s.lo):
        return f"{s.mean:.{digits}f} ± {s.half_width:.{digits}f}"
    return f"{s.mean:.{digits}f}"


DIGITS = {"psnr": 2, "hand_psnr": 2, "fd": 3, "hand_fd": 3}


def render_table(rows: Sequence[Row], rnd: int, metrics: Sequence[str]) -> str:
    head = "| method | β | λ | seeds | " + " | ".join(LABELS.get(m, m) for m in metrics) + " |"
    lines = [head, "|" + "---|" * (4 + len(metrics))]
    for r in (r for r in rows if r.round == rnd):
        beta = f"{r.beta:g}" if r.beta is not None else "—"
        lam = f"{r.hand_weight:g}" if r.hand_weight is not None else "—"
        seeds = str(len(r.seeds)) if r.seeds else "—"
        cells = " | ".join(fmt_stat(r.stats.get(m), DIGITS.get(m, 3)) for m in metrics)
        lines.append(f"| {row_title(r)} | {beta} | {lam} | {seeds} | {cells} |")
    return "\n".join(lines)


def row_title(r: Row) -> str:
    if r.start_of is not None:
        method, beta = r.start_of
        return f"start: round-{r.round - 1} {METHOD_TITLES[method]}" + (f" β={beta:g}" if beta is not None else "")
    return METHOD_TITLES[r.method]


VERDICT_MARK = {"held": "**held**", "contradicted": "**did not hold**", "inconclusive": "**inconclusive**", "not run": "not run"}


def render_markdown(rows: Sequence[Row], claims: Sequence[Claim], *, setup: list[str], images: dict[int, dict[str, list[str]]],
                    notes: list[str], level: float = 0.95, command: str = "make paper-table") -> str:
    """The whole `docs/results.md` (paths in `images` are relative to the markdown file)."""
    out = ["# Miniature paper table (toy world)", "",
           f"Generated by `ipa report` from the grid's own numbers; regenerate with `{command}`. "
           "Do not edit by hand.", "", "## Setup", ""]
    out += [f"- {s}" for s in setup]
    for rnd in sorted({r.round for r in rows}):
        in_round = [r for r in rows if r.round == rnd]
        metrics = list(in_round[0].stats)
        out += ["", f"## Round {rnd}", "",
                f"Mean ± half-width of the {level:.0%} interval (t over training seeds for trained rows with "
                "≥ 2 seeds; bootstrap over held-out poses for the base and single-seed rows)."
                + (" FD: Frechet distance to the held-out real clips in the toy extractor's feature space (lower is better)."
                   if "fd" in metrics else ""), "",
                render_table(rows, rnd, [m for m in metrics if m not in PROBE_METRICS])]
        if any(r.start_of is not None for r in in_round):
            out += ["", f"Round {rnd}: every configuration sampled again from its own round-{rnd - 1} model (same method, β "
                    "and training seed), was gated, and trained a fresh LoRA on top of that model, which is its frozen "
                    "reference and its \"start\" row (the evaluation's base)."]
        probes = [m for m in metrics if m in PROBE_METRICS]
        if probes or any(r.train_seconds is not None for r in in_round):
            head = ["method", "β", *(LABELS[m] for m in probes), "train s / cell", "total s / cell"]
            out += ["", ("Artefact probes (what the β claims are about) and cost:" if probes else "Cost:"), "",
                    "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            for r in in_round:
                beta = f"{r.beta:g}" if r.beta is not None else "—"
                secs = f"{r.seconds:.0f}" if r.seconds is not None else "—"
                tsecs = f"{r.train_seconds:.0f}" if r.train_seconds is not None else "—"
                vals = [row_title(r), beta, *(fmt_stat(r.stats.get(m)) for m in probes), tsecs, secs]
                out.append("| " + " | ".join(vals) + " |")
        out += ["", "### Claims", ""]
        for c in (c for c in claims if c.round == rnd):
            tag = "" if c.source == "paper" else " *(not in the paper)*"
            out.append(f"- {c.text}{tag}: {VERDICT_MARK[c.verdict]}. {c.evidence}.")
        pics = images.get(rnd, {})
        if pics.get("curves"):
            out += ["", "### β curves", ""]
            out += [f"![{Path(p).stem}]({p})" for p in pics["curves"]]
        if pics.get("grid"):
            out += ["", "### Clips", "", "Rows: held-out driving poses (first training seed, first evaluation seed); "
                    "columns: driving pose | base | each method | ground truth, frames left to right.", "",
                    f"![clips]({pics['grid'][0]})"]
    if notes:
        out += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(out) + "\n"


# ---- the command -------------------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `ipa report` arguments (cli.py adds this subparser and calls `report_main`)."""
    p.add_argument("--cells", default=".ipa/paper", help="folder of collected grid cells (scripts/paper_grid.py)")
    p.add_argument("--out", default="docs/results.md", help="markdown report to write")
    p.add_argument("--images", default=None, help="folder for the PNGs (default: <out without .md>, i.e. docs/results)")
    p.add_argument("--features", default="models/features", help="feature extractors for FD (trained there if missing)")
    p.add_argument("--extractor", default=None, metavar="MODULE:CALLABLE",
                   help="use any callable clips (N,F,H,W,3) uint8 -> (N,D) features for FD and hand FD instead of the toy extractors")
    p.add_argument("--no-fd", action="store_true", help="skip Frechet distances (no extractor needed)")
    p.add_argument("--params", default="params.yaml", help="params file (promote.tolerances for the 'no harm' check)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a param")
    p.add_argument("--level", type=float, default=0.95, help="interval level (default 0.95)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (default 1000)")
    p.add_argument("--primary", default="hand_quality", help="metric the claims are judged on (default hand_quality)")
    p.add_argument("--command", default="make paper-table", help="the regenerate command named in the report")
    p.add_argument("--quiet", action="store_true")
    return p


def build_report(cells: Sequence[Cell], out: str | Path, images_dir: str | Path, *, extractors: dict | None,
                 tolerances: dict[str, float] | None = None, level: float = 0.95, n_boot: int = 1000,
                 primary: str = "hand_quality", command: str = "make paper-table", extra_notes: Sequence[str] = (),
                 grid_records: Sequence[dict] = ()) -> dict:
    """Compute everything from the cells, write the markdown, the PNGs and `<images>/cells.json`; return the numbers."""
    out, images_dir = Path(out), Path(images_dir)
    images_dir.mkdir(parents=True, exist_ok=True)
    clip_info = add_clip_metrics(cells, extractors)
    rows = aggregate(cells, level, n_boot)
    tolerances = dict(tolerances or {})
    floor = clip_info.get("real_floor", {})
    for m in SET_METRICS:  # an FD change smaller than the distance between two real sets is noise
        if m in floor and m not in tolerances:
            tolerances[m] = float(floor[m])
    claims = evaluate_claims(cells, rows, primary=primary, tolerances=tolerances, level=level, n_boot=n_boot)
    images: dict[int, dict[str, list[str]]] = {}
    for rnd in sorted({c.round for c in cells}):
        curves = plot_beta_curves(rows, images_dir, rnd)
        grid = clip_grid(cells, rows, images_dir, rnd, primary=primary)
        images[rnd] = {"curves": [_relpath(p, out.parent) for p in curves],
                       "grid": [_relpath(grid, out.parent)] if grid else []}
    setup = describe_setup(cells, clip_info, extractors, grid_records)
    notes = list(extra_notes)
    for rnd in sorted({c.round for c in cells}):
        sft_claim = next((c for c in claims if c.round == rnd and c.text.startswith("IPA beats SFT")), None)
        if rnd == 1 and sft_claim is not None and sft_claim.verdict != "held":
            if any(c.round == 2 for c in cells):
                notes.append("Round 1 did not show IPA better than SFT; round 2 (sampling again from each round-1 model) is reported above.")
            else:
                notes.append("Round 1 did not show IPA better than SFT. A second round (sample again from the aligned "
                             "models) is `python scripts/paper_grid.py run --round 2 --methods ipa-hand sft --betas 600` followed by "
                             "`ipa report`; it was not run here.")
    if not any(c.clips is not None for c in cells):
        notes.append("No cell stored its generated clips (eval/clips.npz), so FD, hand FD, the artefact probes and the clip grid are missing.")
    text = render_markdown(rows, claims, setup=setup, images=images, notes=notes, level=level, command=command)
    from ipa_lib.core.io import atomic_write_json, atomic_write_text

    atomic_write_text(out, text)
    numbers = {
        "rows": [{"round": r.round, "method": r.method, "beta": r.beta, "hand_weight": r.hand_weight, "seeds": r.seeds,
                  "seconds": r.seconds, "train_seconds": r.train_seconds, "start_of": r.start_of, "stats": {m: s.__dict__ for m, s in r.stats.items()},
                  "per_seed": {m: {str(k): v for k, v in d.items()} for m, d in r.per_seed.items()}} for r in rows],
        "claims": [c.__dict__ for c in claims],
        "cells": [{"name": c.name, "round": c.round, "method": c.method, "loss": c.loss, "beta": c.beta,
                   "hand_weight": c.hand_weight, "seed": c.seed, "meta": c.meta, "set_metrics": c.set_metrics, "rows": c.rows}
                  for c in cells],
        **clip_info,
    }
    atomic_write_json(images_dir / "cells.json", _jsonable(numbers))
    return {"rows": rows, "claims": claims, "markdown": text, "images": images, **clip_info}


def _relpath(p: Path, start: Path) -> str:
    import os

    return os.path.relpath(Path(p).resolve(), Path(start).resolve())


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return None if not math.isfinite(float(x)) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x


def describe_setup(cells: Sequence[Cell], clip_info: dict, extractors: dict | None, grid_records: Sequence[dict] = ()) -> list[str]:
    """The setup lines of the report, read from the cells' own params."""
    c0 = cells[0]
    p = c0.params or {}
    tr, ev, toy = p.get("train", {}), p.get("evaluate", {}), p.get("toy", {})
    dpo_batch = sorted({(c.params or {}).get("train", {}).get("batch_size") for c in cells if c.method == "dpo"} - {None})
    by_round = {r: [c for c in cells if c.round == r] for r in sorted({c.round for c in cells})}
    lines = [
        f"{len(cells)} trained cells in {len(by_round)} round(s): " + "; ".join(
            f"round {r}: {len(cs)} cells, methods {', '.join(sorted({c.method for c in cs}, key=METHODS.index))}, "
            f"β {', '.join(f'{b:g}' for b in sorted({c.beta for c in cs if c.beta is not None})) or '—'}, "
            f"training seeds {', '.join(str(x) for x in sorted({c.seed for c in cs}))}"
            for r, cs in by_round.items()),
        f"Toy world {toy.get('frames')} frames x {toy.get('size')} px; every method trains a LoRA (rank {tr.get('lora_rank')}) "
        f"on the same gated samples of the same base for the same {tr.get('steps')} steps (batch {tr.get('batch_size')}, lr {tr.get('lr')}). "
        "SFT/IPA see the kept samples, KTO kept (desirable) + bottom-half (undesirable), DPO best-vs-worst pairs of one driving pose. "
        + (f"Each DPO item is a pair (two clips), so DPO trains on {', '.join(map(str, dpo_batch))} pairs per step: "
           "every method pushes the same number of clips through the policy and the reference per step (equal compute)."
           if dpo_batch else ""),
        "Baselines (SFT, DPO, KTO) use the same hand weighting as IPA hand (λ=10), so the comparison isolates the objective; "
        "IPA global is λ=1.",
        "β mapping: identity (β_toy = β_paper: 200, 600, 2000). The toy's latents are pixels in [-1, 1] (the identity VAE) "
        f"and the frozen reference's hand-weighted velocity error (λ=10) on the gated samples is ≈{_ref_err(cells)} per element "
        "(last logged training batch, mean over IPA-hand cells); Wan's "
        "unit-variance latents are not available here to measure theirs. If the paper's error scale is k times the toy's, "
        "toy β corresponds to paper β/k: the 10x sweep brackets k between 1/3 and 3. Diffusion-DPO's logit is 0.5·β·margin "
        "and KTO's β·gain, without IPA's (1-t)² factor (mean 1/3), so at equal nominal β they are ~3x (DPO) and ~6x (KTO) sharper.",
        f"Evaluation: {ev.get('num_poses')} held-out driving poses x evaluation seeds {ev.get('seeds')}, "
        f"{ev.get('num_inference_steps')} Euler steps; base and aligned model with the same generator seeds.",
    ]
    if extractors:
        fl = clip_info.get("real_floor", {})
        ex = extractors.get("fd")
        acc = getattr(getattr(ex, "cfg", None), "train", {}) if ex is not None else {}
        hx = extractors.get("hand_fd")
        hacc = getattr(getattr(hx, "cfg", None), "train", {}) if hx is not None else {}
        lines.append(
            "FD feature space: `ipa_lib/analysis/features.py` extractors trained on toy clips to classify hand corruption "
            f"(+ regress wrists for the whole-clip one); held-out accuracy {acc.get('val_accuracy', 'n/a')} (whole clip) and "
            f"{hacc.get('val_accuracy', 'n/a')} (hand crops). Noise floor (two independent real sets of this size): "
            f"FD {fl.get('fd', math.nan):.3f}, hand FD {fl.get('hand_fd', math.nan):.3f}.")
    secs = [c.meta.get("seconds", {}) for c in cells if c.meta.get("seconds")]
    if secs:
        tot = [s.get("total") for s in secs if s.get("total") is not None]
        if tot:
            lines.append(f"Wall time per cell as run (train + evaluate, + DVC/process overhead for DVC cells): mean {np.mean(tot):.0f} s, "
                         f"max {np.max(tot):.0f} s, total {np.sum(tot) / 60:.1f} min.")
    for rec in grid_records:
        sg = rec.get("sample_gate_seconds")
        shared = (f"the shared sample + gate took {sg:.0f} s of it" + (" (restored from DVC's cache)" if sg < 30 else "")
                  if sg is not None else "shared sample + gate included")
        failed = f"; failed and rerun later: {', '.join(rec['failed'])}" if rec.get("failed") else ""
        failed += f"; {rec['note']}" if rec.get("note") else ""
        lines.append(f"Grid invocation (round {rec.get('round')}): {rec.get('cells')} cells with the {rec.get('runner')} runner "
                     f"({rec.get('jobs')} job(s)) on {rec.get('cpu_cores')} CPU cores in {rec.get('minutes')} min "
                     f"({shared}), finished {rec.get('finished')}{failed}; the grid's budget, as `-S` "
                     f"overrides shared by all cells: {', '.join(f'`{o}`' for o in rec.get('overrides', []))}.")
    sources = sorted({str(c.meta.get("source", "?")).split(":")[0] for c in cells})
    lines.append(f"Cells came from: {', '.join(sources)} (dvc = a DVC experiment per cell, see scripts/paper_grid.py).")
    return lines


def _ref_err(cells: Sequence[Cell]) -> str:
    errs = [c.meta.get("train_final", {}).get("reference_err") for c in cells if c.method == "ipa-hand"]
    errs = [e for e in errs if e is not None]
    return f"{np.mean(errs):.3f}" if errs else "n/a"


def report_main(args: argparse.Namespace) -> int:
    """`ipa report`: read the collected cells, compute, write `--out` and its images."""
    from ipa_lib.core.config import load_params

    params = load_params(args.params, getattr(args, "set", None))
    cells = load_cells(args.cells)
    out = Path(args.out)
    images = Path(args.images) if args.images else out.with_suffix("")
    extractors = None
    if not args.no_fd and args.extractor:
        import importlib

        module, _, name = args.extractor.partition(":")
        try:
            fn = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError, ValueError) as err:
            raise ValueError(f"--extractor {args.extractor!r}: cannot import it ({err})") from None
        extractors = {"fd": fn, "hand_fd": fn}  # hand views are clips too
    elif not args.no_fd and any(c.clips is not None for c in cells):
        from ipa_lib.analysis.features import load_extractors

        p0 = next(c for c in cells if c.clips is not None).params
        toy = p0.get("toy", {})
        ex = load_extractors(args.features, int(toy.get("frames", params.toy.frames)), int(toy.get("size", params.toy.size)),
                             float(toy.get("motion", params.toy.motion)))
        extractors = {"fd": ex["full"], "hand_fd": ex["hands"]}
    import json

    records = [json.loads(p.read_text()) for p in sorted(Path(args.cells).glob("grid-round-*.json"))]
    result = build_report(cells, out, images, extractors=extractors, tolerances=dict(params.promote.tolerances),
                          level=args.level, n_boot=args.bootstrap, primary=args.primary, command=args.command,
                          grid_records=records)
    if not args.quiet:
        for c in result["claims"]:
            print(f"[round {c.round}] {c.text}: {c.verdict} ({c.evidence})")
        print(f"wrote {out} and {images}/")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = add_arguments(argparse.ArgumentParser(prog="ipa report", description=__doc__.splitlines()[0]))
    return report_main(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
