"""The metric registry: one definition of every number the project reports.

A `Metric` says what a number is called, which way is better, which stage writes it, its
range and how a table shows it. Evaluation, promotion, select-best, the report and the
scripts all read these definitions; none of them keeps its own list of names.

Keys are the names inside `metrics/eval.json` (`{"base": {name: value}, "ipa": {...}}`);
MLflow gets them namespaced (`eval/<name>`, `train/<name>`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    name: str
    higher_is_better: bool | None  # None: a diagnostic with no better direction
    stage: str  # the stage that writes it: "evaluate" | "train" | "report"
    label: str  # for tables and plot axes
    description: str
    lower: float = -math.inf  # the metric's range, for clipping intervals on plots
    upper: float = math.inf
    digits: int = 4  # decimals in tables
    # how one model's value is formed: "clip" (one value per generated clip, averaged), "set" (one
    # number per generated set, e.g. FD), "probe" (a per-clip artefact probe on stored clips), "run" (training)
    kind: str = "clip"
    # which evaluation writes it: "toy" (the toy world), "cases" (real cases), "both"
    world: str = "toy"

    def _directed(self) -> None:
        if self.higher_is_better is None:
            from ipa_lib.core.errors import InputError

            raise InputError(f"metric {self.name!r} has no better direction: it cannot rank models")

    def better(self, a: float, b: float) -> bool:
        """True when `a` is strictly better than `b`."""
        self._directed()
        return a > b if self.higher_is_better else a < b

    def gain(self, candidate: float, reference: float) -> float:
        """How much better `candidate` is than `reference` (negative: worse), in the metric's units."""
        self._directed()
        return candidate - reference if self.higher_is_better else reference - candidate


_ALL = (
    # evaluate: one value per generated clip, averaged (toy world: against the ground-truth rendering)
    Metric("hand_quality", True, "evaluate", "hand quality (gate's scorer)",
           "toy hand scorer on the generated clip (the gate's scorer: pixels + driving pose)", 0.0, 1.0),
    Metric("hand_pass_rate", True, "evaluate", "hand pass rate (gate's scorer)",
           "fraction of clips whose hand_quality reaches gate.threshold", 0.0, 1.0),
    Metric("psnr", True, "evaluate", "PSNR (dB)", "whole clip vs ground truth, float64", 0.0, math.inf, 2, world="both"),
    Metric("ssim", True, "evaluate", "SSIM", "whole clip vs ground truth", -1.0, 1.0, world="both"),
    Metric("hand_psnr", True, "evaluate", "hand PSNR (dB)", "PSNR inside the driving pose's hand mask", 0.0, math.inf, 2,
           world="both"),
    # cases: ground truth of self-reenactment cases (the driving video; TikTok-benchmark protocol)
    Metric("hand_ssim", True, "evaluate", "hand SSIM",
           "SSIM inside the driver's hand mask, self-reenactment cases (ground truth)", -1.0, 1.0, world="cases"),
    # cases: the gate's detector (MediaPipe) looking again at the generated clip, against the driver's hands
    Metric("hand_detect_rate", True, "evaluate", "hand detect rate (gate's detector)",
           "frames where the driver shows a hand and the clip shows one, over frames where the driver shows one",
           0.0, 1.0, world="cases"),
    Metric("hand_confidence", True, "evaluate", "hand confidence (gate's detector)",
           "mean MediaPipe handedness score of the clip's detections", 0.0, 1.0, world="cases"),
    Metric("hand_keypoint_error", False, "evaluate", "hand keypoint error (gate's detector)",
           "mean distance of detected to driver keypoints, in hand sizes (matched hands; unmatched = 1)",
           0.0, math.inf, world="cases"),
    Metric("hand_jitter", False, "evaluate", "hand jitter (gate's detector)",
           "median landmark acceleration along tracks, in hand sizes per frame^2", 0.0, math.inf, world="cases"),
    # report: computed from stored clips, one number per generated set or per clip
    Metric("fd", False, "report", "FD", "Frechet distance of whole-clip features to real clips", 0.0, math.inf, 3, "set"),
    Metric("hand_fd", False, "report", "hand FD", "Frechet distance of hand-crop features to real clips", 0.0, math.inf, 3, "set"),
    Metric("score_gaps", True, "report", "finger gaps clear", "toy scorer probe: finger gaps visible", kind="probe"),
    Metric("hand_sharpness", None, "report", "hand sharpness", "toy scorer probe: hand-region sharpness (diagnostic)", kind="probe"),
    # train: the last logged step (metrics/train.json as final_<name>)
    Metric("loss", False, "train", "loss", "training loss of the chosen objective", kind="run"),
    Metric("implicit_acc", True, "train", "implicit accuracy", "fraction of samples with gain > 0 (IPA/DPO/KTO)", 0.0, 1.0, kind="run"),
)

METRICS: dict[str, Metric] = {m.name: m for m in _ALL}
EVAL_METRICS: tuple[str, ...] = tuple(m.name for m in _ALL if m.stage == "evaluate" and m.world in ("toy", "both"))
CASE_METRICS: tuple[str, ...] = tuple(m.name for m in _ALL if m.stage == "evaluate" and m.world in ("cases", "both"))


def get(name: str) -> Metric:
    """The definition of `name`; an unknown name lists the known ones."""
    try:
        return METRICS[name]
    except KeyError:
        from ipa_lib.core.errors import InputError

        raise InputError(f"unknown metric {name!r} (known: {', '.join(METRICS)})") from None


def stage_metrics(stage: str, world: str = "toy") -> tuple[str, ...]:
    return tuple(m.name for m in _ALL if m.stage == stage and m.world in (world, "both"))


def kind_metrics(kind: str, world: str = "toy") -> tuple[str, ...]:
    """The metrics of one `kind` ("clip" | "set" | "probe" | "run") that `world` ("toy" |
    "cases") writes, in registry order."""
    return tuple(m.name for m in _ALL if m.kind == kind and m.world in (world, "both"))
