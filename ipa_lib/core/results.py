"""Typed results the stages return. Every driver (CLI, DVC stage, KFP component, scripts)
reads these keys; none of them re-derives what a stage already wrote."""

from __future__ import annotations

from typing import Any, TypedDict

from ipa_lib.core.metrics import EVAL_METRICS


class TrainResult(TypedDict, total=False):
    loss: str  # the objective: ipa | sft | dpo | kto
    beta: float
    hand_weight: float
    steps: int
    train_samples: int
    seconds: float
    final: dict[str, float]  # the last logged step's diagnostics (loss, implicit_acc, grad_norm, ...)
    trainable_params: int
    log: list[dict[str, float]]  # one entry per logged step: the training curve
    stopped_at: int  # only for a run stopped early (`stop_after`): the last step done
    checkpoint: str  # ... and its last checkpoint


class EvalResult(TypedDict):
    base: dict[str, float]  # metric name -> mean over held-out clips, the reference model
    ipa: dict[str, float]  # ... the aligned model
    details: dict[str, Any]  # method, beta, poses, seeds, per-seed means


def train_metrics(result: TrainResult) -> dict[str, Any]:
    """The flat `metrics/train.json` of a finished run: the summary without the curve, and the
    last logged diagnostics as `final_<name>`."""
    summary = {k: v for k, v in result.items() if k not in ("log", "final")}
    return summary | {f"final_{k}": v for k, v in result.get("final", {}).items()}


def eval_table(result: EvalResult | dict) -> str:
    """Base vs aligned, one row per evaluation metric (what `ipa evaluate` and `ipa show` print)."""
    lines = [f"{'metric':<16}{'base':>10}{'ipa':>10}{'delta':>10}"]
    for m in EVAL_METRICS:
        if m in result["base"] and m in result["ipa"]:
            b, a = result["base"][m], result["ipa"][m]
            lines.append(f"{m:<16}{b:>10.4f}{a:>10.4f}{a - b:>+10.4f}")
    return "\n".join(lines)
