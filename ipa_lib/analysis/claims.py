"""The paper's claims (and the questions it leaves open) as data: one `Claim` per claim and round.

Comparisons use paired differences: per training seed (t-interval) when both sides have
>= 2 common seeds, else per clip (same pose, same evaluation seed) bootstrapped. A claim
*held* when the interval of the difference lies above 0, is *contradicted* when it lies
below 0, and is *inconclusive* otherwise ("not run" when a side is missing). "Without
hurting the whole video" fails when PSNR, SSIM or FD get worse than the base by more than a
tolerance on average *and* significantly (tolerances: `promote.tolerances` for PSNR/SSIM,
the FD between two independent real sets of the same size for FD).

Each claim keeps the differences it was judged on (`Claim.diffs`, metric -> `Stat`), its
verdict and a stable `key`; `evidence` is the same numbers as one sentence.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from ipa_lib.analysis.cells import METHOD_TITLES, PAPER_BETA, SET_METRICS, Cell, clip_values, pose_matrix
from ipa_lib.analysis.stats import (Row, Stat, best_beta_val, bootstrap_interval, bootstrap_se_interval, cell_value, fd_rows,
                                    finite_mean, t_interval, table_metrics)
from ipa_lib.core.metrics import get as get_metric

VERDICTS = ("held", "contradicted", "inconclusive", "not run")


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
        lo, hi = bootstrap_se_interval(lambda i: fd_rows(cell_a, model_a, metric, i) - fd_rows(cell_b, model_b, metric, i),
                                       n, d, level, max(n_boot // 5, 50), seed)
        return Stat(d, lo, hi, 1, f"paired bootstrap over {n} poses")
    va, vb = clip_values(cell_a, model_a, metric), clip_values(cell_b, model_b, metric)
    keys = sorted(set(va) & set(vb))
    poses = sorted({p for _, p in keys})
    seeds = sorted({s for s, _ in keys})
    diff = np.array([finite_mean(row) for row in (pose_matrix(va, poses, seeds) - pose_matrix(vb, poses, seeds))])
    lo, hi = bootstrap_interval(lambda i: finite_mean(diff[i]), len(poses), level, n_boot, seed)
    return Stat(finite_mean(diff), lo, hi, 1, f"paired bootstrap over {len(poses)} poses")


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
    """One claim in one round: its verdict, the paired differences behind it, and those as a sentence."""

    round: int
    text: str
    verdict: str  # one of VERDICTS
    evidence: str
    source: str = "paper"  # paper | question (the comparisons the paper did not make)
    key: str = ""  # stable id: no_harm, beta_vs_200, beta_vs_2000, hand_vs_global, vs_sft, vs_dpo, vs_kto
    diffs: dict[str, Stat | None] = field(default_factory=dict)  # metric -> a - b (None: a side not run)

    def record(self) -> dict:
        """JSON-ready: the fields, each difference as {mean, lo, hi, n, how} or None."""
        out = {k: v for k, v in self.__dict__.items() if k != "diffs"}
        out["diffs"] = {m: (asdict(d) if d is not None else None) for m, d in self.diffs.items()}
        return out


def fmt_diff(name: str, d: Stat | None, digits: int = 3) -> str:
    if d is None:
        return f"Δ{name} n/a"
    if math.isfinite(d.lo):
        return f"Δ{name} = {d.mean:+.{digits}f} [{d.lo:+.{digits}f}, {d.hi:+.{digits}f}]"
    return f"Δ{name} = {d.mean:+.{digits}f}"


def evaluate_claims(cells: Sequence[Cell], rows: Sequence[Row], *, primary: str = "hand_psnr",
                    tolerances: dict[str, float] | None = None, level: float = 0.95, n_boot: int = 1000,
                    paper_beta: float = PAPER_BETA) -> list[Claim]:
    """One claim per paper claim (and per question the issue asks) and round, from paired differences."""
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
        harms, ok_parts, whole = [], [], {}
        for m in ("psnr", "ssim", "fd"):
            d = cmp(rnd, ipa, Config("base"), m)
            if d is None:
                continue
            whole[m] = d
            sign = 1.0 if get_metric(m).higher_is_better else -1.0  # gain > 0: better than the base
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
        extra = {m: cmp(rnd, ipa, Config("base"), m) for m in ("hand_pass_rate", "hand_fd") if m != primary and m in metrics}
        ev = f"{', '.join([fmt_diff(primary, hand)] + [fmt_diff(m, d) for m, d in extra.items()])} vs {start}; whole video: " + ", ".join(harms + ok_parts)
        if harms:
            ev += f" (harmed beyond tolerance {', '.join(f'{k} {v:.3g}' for k, v in tol.items())})"
        claims.append(Claim(rnd, f"Hand-weighted IPA (λ=10, β={paper_beta:g}) improves hands without hurting the whole video", v1, ev,
                            key="no_harm", diffs={primary: hand, **extra, **whole}))

        # 2-3. beta = 600 beats 200 (extra-hand artefacts) and 2000 (blurry hands)
        for other, artefact, probe in ((200.0, "extra-hand artefacts", "score_gaps"), (2000.0, "blurry hands", "hand_sharpness")):
            d = cmp(rnd, ipa, Config("ipa-hand", other), primary)
            ev = f"{fmt_diff(primary, d)} (β={paper_beta:g} minus β={other:g})"
            diffs = {primary: d}
            p = cmp(rnd, ipa, Config("ipa-hand", other), probe)
            if p is not None:
                ev += f"; artefact probe {fmt_diff(probe, p)}"
                diffs[probe] = p
            claims.append(Claim(rnd, f"β={paper_beta:g} beats β={other:g} ({artefact})", verdict(d), ev,
                                key=f"beta_vs_{other:g}", diffs=diffs))

        # 4. hand-local weighting beats global
        d = cmp(rnd, ipa, Config("ipa-global", paper_beta), primary)
        ev = f"{fmt_diff(primary, d)} (λ=10 minus λ=1, β={paper_beta:g})"
        diffs = {primary: d}
        for m in [x for x in ("hand_quality", "hand_psnr", "hand_fd") if x != primary]:
            e = cmp(rnd, ipa, Config("ipa-global", paper_beta), m)
            if e is not None:
                ev += f"; {fmt_diff(m, e)}"
                diffs[m] = e
        claims.append(Claim(rnd, "Hand-local weighting beats global weighting", verdict(d), ev, key="hand_vs_global", diffs=diffs))

        # questions the paper leaves open: IPA against SFT, DPO and KTO at equal steps
        d = cmp(rnd, ipa, Config("sft"), primary)
        claims.append(Claim(rnd, "IPA beats SFT on the same gated samples", verdict(d), f"{fmt_diff(primary, d)} (IPA minus SFT)", "question",
                            key="vs_sft", diffs={primary: d}))
        for method in ("dpo", "kto"):
            b = best_beta_val(cells, rnd, method, primary)  # chosen on the val poses, reported on test
            d = cmp(rnd, ipa, Config(method, b), primary) if b is not None else None
            where = f"its best β={b:g} on the val poses" if b is not None else "not run, or no val numbers"
            claims.append(Claim(rnd, f"IPA beats {METHOD_TITLES[method]} at equal steps ({where})", verdict(d),
                                f"{fmt_diff(primary, d)} (IPA β={paper_beta:g} minus {method.upper()})", "question",
                                key=f"vs_{method}", diffs={primary: d}))
    return claims
