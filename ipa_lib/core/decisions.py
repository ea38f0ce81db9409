"""Pure decisions: the promotion rule and best-of-sweep, over the metric registry.

Both read each metric's direction from `ipa_lib.core.metrics` (higher- or lower-is-better),
so a lower-is-better metric (an error, a jitter, an FD) can be primary or tolerated.
Nothing here touches MLflow or the file system; `ipa_lib.mlops.registry` applies the
decision, `ipa_lib.stages.select` copies the chosen run.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ipa_lib.core import metrics as metric_registry
from ipa_lib.core.config import PromoteRule
from ipa_lib.core.errors import InputError


class MetricsError(InputError):
    """Evaluation numbers missing or not finite (bad input: exit 2)."""


@dataclass
class Decision:
    promote: bool
    reason: str
    compared: dict = field(default_factory=dict)
    action: str = ""  # promote | reject | keep | rollback
    candidate: int | None = None
    previous_champion: int | None = None
    champion: int | None = None  # champion after the decision (would-be, for a dry run)
    dry_run: bool = False
    model: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def required_metrics(cfg: PromoteRule) -> list[str]:
    return [cfg.primary_metric, *[k for k in cfg.tolerances if k != cfg.primary_metric]]


def check_metrics(what: str, metrics: Mapping[str, Any] | None, keys: list[str]) -> dict[str, float]:
    if metrics is None:
        raise MetricsError(f"{what}: no evaluation metrics")
    missing = [k for k in keys if k not in metrics or metrics[k] is None]
    if missing:
        raise MetricsError(f"{what}: missing evaluation metric(s) {missing} (has {sorted(metrics)})")
    out = {}
    for k in keys:
        try:
            v = float(metrics[k])
        except (TypeError, ValueError):
            raise MetricsError(f"{what}: metric {k!r} is not a number: {metrics[k]!r}") from None
        if not math.isfinite(v):
            raise MetricsError(f"{what}: metric {k!r} is not finite: {v}")
        out[k] = v
    return out


def decide(
    candidate_metrics: Mapping[str, float],
    champion_metrics: Mapping[str, float] | None,
    base_metrics: Mapping[str, float] | None,
    cfg: PromoteRule,
    *,
    reference_label: str | None = None,
) -> Decision:
    """Promote iff the candidate beats the reference on `cfg.primary_metric` by at least
    `cfg.margin` (and by more than zero) and no metric in `cfg.tolerances` falls more than
    its tolerance behind the reference. The reference is the champion, or the base model
    when there is no champion yet. "Beats" and "behind" follow each metric's direction in
    the metric registry (`ipa_lib.core.metrics`): for a lower-is-better metric the gain is
    reference - candidate. `compared["delta"]` stays candidate - reference.

    Raises MetricsError if a needed number is missing or not finite. `reference_label`
    (e.g. "champion v3") only changes the wording of the reason.
    """
    keys = required_metrics(cfg)
    cand = check_metrics("candidate", candidate_metrics, keys)
    if champion_metrics is not None:
        ref_name, ref = "champion", check_metrics("champion", champion_metrics, keys)
    else:
        ref_name, ref = "base", check_metrics("base model", base_metrics, keys)
    pm = cfg.primary_metric
    defs = {k: metric_registry.get(k) for k in keys}
    delta = {k: cand[k] - ref[k] for k in keys}
    gains = {k: defs[k].gain(cand[k], ref[k]) for k in keys}
    regressions = {k: delta[k] for k, tol in cfg.tolerances.items() if gains[k] < -tol}
    compared = {
        "reference": ref_name,
        "primary_metric": pm,
        "margin": cfg.margin,
        "tolerances": dict(cfg.tolerances),
        "candidate": cand,
        "reference_metrics": ref,
        "delta": delta,
        "regressions": regressions,
        "higher_is_better": {k: defs[k].higher_is_better for k in keys},
    }
    gain = gains[pm]
    label = reference_label or ref_name
    head = f"{pm} {cand[pm]:.4f} vs {label} {ref[pm]:.4f} ({gain:+.4f}, margin {cfg.margin:.4f})"
    if gain <= 0 or gain < cfg.margin:
        return Decision(False, f"{head}: does not beat the {label} by the margin", compared, "reject")
    if regressions:
        worst = ", ".join(f"{k} {d:+.4f} (tolerance {cfg.tolerances[k]})" for k, d in regressions.items())
        return Decision(False, f"{head}; but regresses beyond tolerance: {worst}", compared, "reject")
    ok = ", ".join(f"{k} {delta[k]:+.4f}" for k in cfg.tolerances)
    return Decision(True, f"{head}; global metrics within tolerance ({ok})", compared, "promote")


def format_decision(d) -> str:
    """A readable decision: verdict, the compared numbers, the alias before/after."""
    verb = {"promote": "PROMOTED", "reject": "REJECTED", "keep": "UNCHANGED", "rollback": "ROLLED BACK"}[d.action]
    if d.dry_run:
        verb = f"DRY RUN, would be {verb.lower()}"
    lines = [f"{d.model} v{d.candidate}: {verb}", f"  reason: {d.reason}"]
    c = d.compared
    if c.get("candidate"):
        ref = c["reference"] if c.get("reference_version") is None else f"{c['reference']} v{c['reference_version']}"
        lines.append(f"  {'metric':<16}{'candidate':>11}{ref:>16}{'delta':>10}  rule")
        for k, v in c["candidate"].items():
            up = (c.get("higher_is_better") or {}).get(k, True)
            if k == c["primary_metric"]:
                rule = f">= +{c['margin']}" if up else f"<= -{c['margin']}"
            elif k in c["tolerances"]:
                rule = f">= -{c['tolerances'][k]}" if up else f"<= +{c['tolerances'][k]}"
            else:
                rule = ""
            flag = "  <- regression" if k in c.get("regressions", {}) else ""
            lines.append(f"  {k:<16}{v:>11.4f}{c['reference_metrics'][k]:>16.4f}{c['delta'][k]:>+10.4f}  {rule}{flag}")
    before = "none" if d.previous_champion is None else f"v{d.previous_champion}"
    after = "none" if d.champion is None else f"v{d.champion}"
    lines.append(f"  champion: {before} -> {after}" + (" (not applied)" if d.dry_run else ""))
    return "\n".join(lines)


def finite_number(value: object) -> float | None:
    """`value` as a float when it is a finite number (not a bool), else None."""
    if isinstance(value, bool):
        return None
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def select_best(metrics: Sequence[Mapping[str, object]], primary: str, higher_is_better: bool | None = None) -> int:
    """Index of the run with the best `metrics[i][primary]`; the first one on ties. Best means
    highest or lowest by the metric's registry direction (or `higher_is_better` when given).
    Runs whose primary number is missing or not finite cannot win.

    Raises InputError for an empty list, or when no run has a finite `primary` number
    (the message names the metric and what each run had).
    """
    if higher_is_better is None:
        higher_is_better = metric_registry.get(primary).higher_is_better
        if higher_is_better is None:
            raise InputError(f"select-best: metric {primary!r} has no better direction")
    if not metrics:
        raise InputError("select-best: no runs to choose from")
    sign = 1.0 if higher_is_better else -1.0
    best, best_value = -1, -math.inf
    for i, m in enumerate(metrics):
        v = finite_number(m.get(primary)) if isinstance(m, Mapping) else None
        if v is not None and sign * v > best_value:
            best, best_value = i, sign * v
    if best < 0:
        seen = [m.get(primary, "<missing>") if isinstance(m, Mapping) else type(m).__name__ for m in metrics]
        raise InputError(f"select-best: no run has a finite {primary!r} (got {seen})")
    return best
