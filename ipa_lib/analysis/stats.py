"""Intervals and the table: one row per (round, method, beta), each metric a mean and its interval.

Intervals (level `level`, 95 % by default):
- a trained configuration with >= 2 training seeds: t-interval over its per-seed means
  (the seed is the unit that is replicated);
- the base, or a configuration with one seed: percentile bootstrap over held-out poses
  (`scipy.stats.bootstrap`, seeded; all evaluation seeds of a pose resampled together, and
  both sides of a paired comparison resampled with the same poses); FD is recomputed on the
  resampled sets and reported as estimate +- z * bootstrap s.e. (resampling repeats clips,
  which biases FD upwards, so its percentile interval need not contain the estimate).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ipa_lib.analysis.cells import CLIP_METRICS, PROBE_METRICS, SET_METRICS, Cell, cell_order, clip_values, has_metric, pose_matrix
from ipa_lib.core.metrics import get as get_metric


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


def _bootstrap(stat: Callable[[np.ndarray], float], n_units: int, level: float, n_boot: int, seed: int):
    """`scipy.stats.bootstrap` (percentile) over the unit indices 0..n_units-1, seeded: `stat` gets
    one resampled index vector per draw, so every array it indexes with it (both sides of a
    paired comparison: the same poses, all their evaluation seeds) is resampled together, which
    is what scipy's `paired=True` does. Returns (its result, the finite draws); None for n < 2."""
    import warnings

    from scipy import stats

    if n_units < 2:
        return None
    with warnings.catch_warnings():  # non-finite draws (an all-nan resample) are dropped below
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        res = stats.bootstrap((np.arange(n_units),), lambda i: stat(i.astype(np.intp)), n_resamples=n_boot,
                              vectorized=False, confidence_level=level, method="percentile",
                              rng=np.random.default_rng(seed))
    draws = np.asarray(res.bootstrap_distribution, dtype=np.float64)
    return res, draws[np.isfinite(draws)]


def bootstrap_interval(stat: Callable[[np.ndarray], float], n_units: int, level: float = 0.95, n_boot: int = 1000,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap of `stat(indices)` over `n_units` resampled with replacement
    (`scipy.stats.bootstrap`, seeded, paired as in `_bootstrap`); nan when n_units < 2."""
    out = _bootstrap(stat, n_units, level, n_boot, seed)
    if out is None or out[1].size == 0:
        return math.nan, math.nan
    res, draws = out
    if draws.size == res.bootstrap_distribution.size:
        return float(res.confidence_interval.low), float(res.confidence_interval.high)
    a = (1 - level) / 2  # scipy's percentile interval, over the finite draws only
    return float(np.quantile(draws, a)), float(np.quantile(draws, 1 - a))


def bootstrap_se_interval(stat: Callable[[np.ndarray], float], n_units: int, estimate: float, level: float = 0.95,
                          n_boot: int = 200, seed: int = 0) -> tuple[float, float]:
    """estimate +- z * bootstrap standard error (`scipy.stats.bootstrap`, seeded, paired as in
    `_bootstrap`): for biased statistics such as FD, whose percentile interval need not contain
    the estimate (resampling repeats clips, which inflates the distance)."""
    from scipy import stats

    out = _bootstrap(stat, n_units, level, n_boot, seed)
    if out is None or out[1].size < 2:
        return math.nan, math.nan
    res, draws = out
    se = float(res.standard_error) if draws.size == res.bootstrap_distribution.size else float(draws.std(ddof=1))
    hw = float(stats.norm.ppf(0.5 + level / 2) * se)
    return estimate - hw, estimate + hw


def finite_mean(x: np.ndarray) -> float:
    x = x[np.isfinite(x)]
    return float(x.mean()) if x.size else math.nan


def clip_stat(cell: Cell, model: str, metric: str, level: float, n_boot: int, seed: int = 0) -> Stat:
    """Mean of a per-clip metric over a cell's clips, bootstrap interval over poses."""
    vals = clip_values(cell, model, metric)
    poses = sorted({p for _, p in vals})
    seeds = sorted({s for s, _ in vals})
    per_pose = np.array([finite_mean(row) for row in pose_matrix(vals, poses, seeds)])
    lo, hi = bootstrap_interval(lambda i: finite_mean(per_pose[i]), len(poses), level, n_boot, seed)
    return Stat(finite_mean(per_pose), lo, hi, 1, f"bootstrap over {len(poses)} poses")


def fd_rows(cell: Cell, model: str, metric: str, pose_idx: np.ndarray) -> float:
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
    lo, hi = bootstrap_se_interval(lambda i: fd_rows(cell, model, metric, i), n, value, level, max(n_boot // 5, 50), seed)
    return Stat(value, lo, hi, 1, f"bootstrap s.e. over {n} poses")


def cell_value(cell: Cell, model: str, metric: str) -> float:
    if metric in SET_METRICS:
        return float(cell.set_metrics[model][metric])
    return finite_mean(np.array(list(clip_values(cell, model, metric).values())))


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
    for c in sorted(cells, key=cell_order):
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


def _stat(cell: Cell, model: str, metric: str, level: float, n_boot: int) -> Stat:
    return (set_stat if metric in SET_METRICS else clip_stat)(cell, model, metric, level, n_boot)


def _group_stats(group: Sequence[Cell], model: str, metrics: Sequence[str], level: float, n_boot: int):
    stats, per_seed = {}, {}
    for m in metrics:
        per_seed[m] = {c.seed: cell_value(c, model, m) for c in group}
        if len(group) >= 2:
            stats[m] = t_interval(list(per_seed[m].values()), level)
        else:
            stats[m] = _stat(group[0], model, m, level, n_boot)
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
            base_stats = {m: _stat(in_round[0], "base", m, level, n_boot) for m in metrics}
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


def best_beta(rows: Sequence[Row], rnd: int, method: str, metric: str) -> float | None:
    """The beta of `method`'s best row on `metric` in round `rnd` (None when it was not run)."""
    cands = [r for r in rows if r.round == rnd and r.method == method and metric in r.stats]
    if not cands:
        return None
    sign = 1 if get_metric(metric).higher_is_better else -1
    return max(cands, key=lambda r: sign * r.stats[metric].mean).beta


def best_beta_val(cells: Sequence[Cell], rnd: int, method: str, metric: str) -> float | None:
    """The beta of `method` whose cells score best on `metric` on the val split (the val means in
    each cell's details.json, training seeds averaged): selection never reads the reported test
    poses. None when the method was not run or its cells carry no val numbers."""
    by_beta: dict[float | None, list[float]] = {}
    for c in cells:
        val = ((c.meta.get("val") or {}).get("ipa") or {})
        if c.round == rnd and c.method == method and metric in val:
            by_beta.setdefault(c.beta, []).append(float(val[metric]))
    if not by_beta:
        return None
    sign = 1 if get_metric(metric).higher_is_better else -1
    return max(by_beta, key=lambda b: sign * float(np.mean(by_beta[b])))
