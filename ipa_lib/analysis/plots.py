"""The report's pictures: metric-vs-beta curves per round and a clip grid (matplotlib / PIL inside the functions)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ipa_lib.analysis.cells import BETA_METHODS, METHOD_TITLES, METHODS, PAPER_BETA, Cell
from ipa_lib.analysis.stats import Row, best_beta, shared_base
from ipa_lib.core.metrics import get as get_metric

COLOURS = {"ipa-hand": "tab:red", "ipa-global": "tab:orange", "dpo": "tab:blue", "kto": "tab:green", "sft": "tab:purple", "base": "black"}
DIRECTION = {True: " (higher is better)", False: " (lower is better)", None: " (1 = as sharp as ground truth)"}


def clip_ylim(ylim: tuple[float, float], lower: float, upper: float, pad: float = 0.03) -> tuple[float, float]:
    """An axis range kept inside the metric's range [lower, upper], plus `pad` of it (or of the
    axis, for an open range) so points on a bound stay whole."""
    lo, hi = ylim
    finite = math.isfinite(lower) and math.isfinite(upper)
    margin = pad * ((upper - lower) if finite else (hi - lo))
    return max(lo, lower - margin), min(hi, upper + margin)


def plot_beta_curves(rows: Sequence[Row], out_dir: str | Path, rnd: int = 1, metrics: Sequence[str] | None = None) -> list[Path]:
    """One PNG per metric: the metric against beta for every beta-using method (interval bars),
    with the base and SFT as horizontal lines (their intervals shaded). Intervals and the axis
    stay inside the metric's range (`Metric.lower`/`upper`: a rate cannot leave [0, 1])."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    in_round = [r for r in rows if r.round == rnd]
    metrics = list(metrics or (in_round[0].stats if in_round else []))
    paths = []
    for m in metrics:
        metric = get_metric(m)
        fig, ax = plt.subplots(figsize=(5, 3.4))
        for method in BETA_METHODS:
            pts = sorted((r.beta, r.stats[m]) for r in in_round if r.method == method and m in r.stats)
            if not pts:
                continue
            x = [b for b, _ in pts]
            y = np.array([s.mean for _, s in pts])
            lo, hi = (np.clip([getattr(s, end) for _, s in pts], metric.lower, metric.upper) for end in ("lo", "hi"))
            err = np.array([y - lo, hi - y])  # NaN (no interval) stays NaN: no bar
            err = np.clip(np.where(np.isfinite(err), err, 0.0), 0.0, None)
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=METHOD_TITLES[method], color=COLOURS[method])
        for method, style in (("base", "--"), ("sft", ":")):
            r = next((r for r in in_round if r.method == method and r.start_of is None and m in r.stats), None)
            if r is None:
                continue
            s = r.stats[m]
            ax.axhline(s.mean, linestyle=style, color=COLOURS[method], label=METHOD_TITLES[method])
            if math.isfinite(s.lo):
                ax.axhspan(max(s.lo, metric.lower), min(s.hi, metric.upper), color=COLOURS[method], alpha=0.08)
        ax.set_xscale("log")
        betas = sorted({r.beta for r in in_round if r.beta is not None})
        if betas:
            ax.set_xticks(betas)
            ax.set_xticklabels([f"{b:g}" for b in betas])
            ax.minorticks_off()
        ax.set_xlabel("β")
        ax.set_ylim(*clip_ylim(ax.get_ylim(), metric.lower, metric.upper))
        ax.set_title(f"{metric.label}{DIRECTION[metric.higher_is_better]}", fontsize=9)
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
    from ipa_lib.analysis.clip_metrics import reference_set
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
