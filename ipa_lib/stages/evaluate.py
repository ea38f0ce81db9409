"""Evaluate stage: base vs aligned on held-out driving poses, same seeds for both.

Held-out poses come from toy-world seed ranges that sampling and pretraining never use: the
test poses (`evaluate.pose_seed`, the report) and the val poses (`evaluate.val_pose_seed`, what
select-best and promotion use, so nothing is chosen on the numbers that are reported). Both models animate every pose once per evaluation seed with the
same generator seed; the base is the same network with its adapter disabled.

Metrics per clip (means reported; per-clip rows kept for intervals):
- hand_quality:   the GATE's toy hand scorer on the generated clip (pixels + driving pose only)
- hand_pass_rate: fraction of clips with hand_quality >= gate.threshold (the gate's too)
- psnr, ssim:     whole clip against the ground-truth rendering of that pose (float64)
- hand_psnr:      PSNR inside the driving pose's hand mask: the independent judge (ground truth
                  the gate never saw), what promotion ranks by (`promote.primary_metric`)

On cases (`data.cases`, `evaluate_cases`): every test and val case is animated once per
evaluation seed (generator seed `case_seed(case_id, 7_000_000 + seed, 0)`, the same for both
models) with its own conditioning. Per clip, the CASE_METRICS of `ipa_lib.core.metrics`:
the gate's detector (MediaPipe, VIDEO mode) against the driver's hands (hand_detect_rate,
hand_confidence, hand_keypoint_error, hand_jitter; `ipa_lib.data.hands.agreement`) and, on
self-reenactment cases, psnr / ssim against the driving video and hand_psnr / hand_ssim inside
the driver's hand mask. Means over the clips that define a metric; a metric no clip defines
is left out. Test cases give `evaluate.metrics` (the report), val cases `evaluate.val_metrics`
(select-best and promotion).
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path

import numpy as np

from ipa_lib.core.config import Params
from ipa_lib.core.errors import InputError
from ipa_lib.core.metrics import CASE_METRICS, EVAL_METRICS
from ipa_lib.core.results import EvalResult

METRICS = EVAL_METRICS  # the metric registry's evaluate-stage metrics (ipa_lib.core.metrics)
SHOWN = 6  # clips in the side-by-side strip
log = logging.getLogger(__name__)


def clip_metrics(video: np.ndarray, target: np.ndarray, hand_keypoints: np.ndarray, mask: np.ndarray, scorer, threshold: float) -> dict[str, float]:
    from ipa_lib.core.image_metrics import psnr, ssim

    q = scorer.score(video, hand_keypoints)["hand_score"]
    return {
        "hand_quality": q,
        "hand_pass_rate": float(q >= threshold),
        "psnr": psnr(video, target),
        "ssim": ssim(video, target),
        "hand_psnr": psnr(video, target, mask),
    }


def summarize(rows: list[dict], model: str) -> dict[str, float]:
    sel = [r for r in rows if r["model"] == model]
    return {m: float(np.mean([r[m] for r in sel])) for m in METRICS}


def per_seed(rows: list[dict], model: str) -> dict[str, dict[str, float]]:
    """Means per evaluation seed, and their spread (std over seeds) for the README table."""
    seeds = sorted({r["seed"] for r in rows})
    by_seed = {s: {m: float(np.mean([r[m] for r in rows if r["model"] == model and r["seed"] == s])) for m in METRICS} for s in seeds}
    spread = {m: float(np.std([by_seed[s][m] for s in seeds])) for m in METRICS}
    return {"by_seed": by_seed, "std_over_seeds": spread}


def evaluate(params: Params, adapter_dir: str | Path, out_dir: str | Path, metrics_path: str | Path,
             base_model: str | None = None, progress: bool = True, val_metrics_path: str | Path | None = None,
             gated_dir: str | Path | None = None) -> EvalResult:
    """Base vs aligned; writes `out_dir`, `metrics_path` (the test split: the report) and the val
    split's numbers (what select-best and promotion use) to `val_metrics_path` (on cases default
    `evaluate.val_metrics`; on the toy world written only when given).

    Toy world, for the experiments in docs/results.md: `evaluate.train_poses` > 0 also animates
    that many of the gated set's own driving poses (`gated_dir`, default `gate.out`; rows in
    `per_clip_train.json`); `evaluate.along` also evaluates the aligned model at every adapter
    `train.save_at` kept (`adapter_dir/along/step-N` -> `out_dir/along/step-N/`: per_clip.json,
    clips.npz, and per_clip_train.json with train_poses), the base being the same for all."""
    from ipa_lib.stages.common import load_start_backend as load_backend
    from ipa_lib.core.io import atomic_dir, atomic_write_json, require_dir, save_npz
    from ipa_lib.data.toy_quality import ToyHandScorer
    from ipa_lib.data.visualize import side_by_side

    if params.on_cases:
        return evaluate_cases(params, adapter_dir, out_dir, metrics_path, base_model, progress, val_metrics_path)
    cfg, toy = params.evaluate, params.toy
    adapter_dir = require_dir(adapter_dir, "adapter")
    backend = load_backend(params, base_model, adapter_dir)
    scorer = ToyHandScorer()
    # test poses (the report) and val poses (select-best, promotion): two seed ranges nothing else uses
    test = _toy_split(backend, params, scorer, cfg.pose_seed, cfg.num_poses, 7_000_000, progress, "test")
    val = _toy_split(backend, params, scorer, cfg.val_pose_seed, cfg.val_poses, 8_000_000, progress, "val")
    rows, cond, shown, clips = test
    train_split = None
    if cfg.train_poses:
        train_cond = train_pose_conditions(gated_dir if gated_dir is not None else params.gate.out, cfg.train_poses, toy)
        train_split = _toy_split(backend, params, scorer, None, cfg.train_poses, 9_000_000, progress, "train", cond=train_cond)
    along = {}
    if cfg.along:  # last: it swaps the adapter
        for step_dir in sorted((adapter_dir / "along").glob("step-*"), key=lambda p: int(p.name.split("-")[1])):
            backend.load_adapter(step_dir)
            along[step_dir.name] = {
                "test": _toy_split(backend, params, scorer, cfg.pose_seed, cfg.num_poses, 7_000_000, progress,
                                   f"test {step_dir.name}", models=("ipa",)),
                "train": None if train_split is None else _toy_split(
                    backend, params, scorer, None, cfg.train_poses, 9_000_000, progress, f"train {step_dir.name}",
                    models=("ipa",), cond=train_cond),
            }
    result = {"base": summarize(rows, "base"), "ipa": summarize(rows, "ipa")}
    val_result = {"base": summarize(val[0], "base"), "ipa": summarize(val[0], "ipa")}
    details = {
        "method": params.train.loss, "beta": params.train.beta, "hand_weight": params.train.hand_weight,
        "num_poses": cfg.num_poses, "seeds": cfg.seeds,
        "base": per_seed(rows, "base"), "ipa": per_seed(rows, "ipa"),
        "val": {"num_poses": cfg.val_poses, "pose_seed": cfg.val_pose_seed, **val_result},
    }
    if train_split is not None:
        details["train_poses"] = {"num_poses": cfg.train_poses, "pose_ids": [int(i) for i in train_cond["pose_id"]],
                                  "base": summarize(train_split[0], "base"), "ipa": summarize(train_split[0], "ipa")}
    if along:
        details["along"] = {name: summarize(a["test"][0], "ipa") for name, a in along.items()}
    with atomic_dir(out_dir) as tmp:
        atomic_write_json(tmp / "per_clip.json", rows)
        atomic_write_json(tmp / "per_clip_val.json", val[0])
        atomic_write_json(tmp / "details.json", details)
        if train_split is not None:
            atomic_write_json(tmp / "per_clip_train.json", train_split[0])
        for name, a in along.items():
            (tmp / "along" / name).mkdir(parents=True)
            atomic_write_json(tmp / "along" / name / "per_clip.json", a["test"][0])
            save_npz(tmp / "along" / name / "clips.npz", ipa=np.stack(a["test"][3]["ipa"]), seeds=np.array(cfg.seeds))
            if a["train"] is not None:
                atomic_write_json(tmp / "along" / name / "per_clip_train.json", a["train"][0])
        # the generated clips, (S seeds, N poses, F, H, W, 3) uint8: set-level metrics (FD) in `ipa report`
        save_npz(tmp / "clips.npz", base=np.stack(clips["base"]), ipa=np.stack(clips["ipa"]),
                 seeds=np.array(cfg.seeds), poses=np.arange(cfg.pose_seed, cfg.pose_seed + cfg.num_poses))
        n = min(6, cfg.num_poses)
        side_by_side(tmp / "side_by_side", {"driving pose": cond["pose"][:n], "base": shown["base"][:n],
                                            "IPA": shown["ipa"][:n], "ground truth": cond["target"][:n]})
    atomic_write_json(metrics_path, result)
    if val_metrics_path is not None:
        atomic_write_json(val_metrics_path, val_result)
    return {**result, "val": val_result, "details": details}


def train_pose_conditions(gated_dir: str | Path, count: int, toy) -> dict[str, np.ndarray]:
    """The toy conditions (with ground truth) of the first `count` distinct driving poses of a
    gated set's kept clips (`kept.npz` pose ids `p<seed>`), in kept order; `pose_id` the seeds."""
    from ipa_lib.core.io import load_npz, require_dir
    from ipa_lib.data.toyworld import toy_conditions

    kept = require_dir(gated_dir, "gated samples", "kept.npz") / "kept.npz"
    ids = list(dict.fromkeys(int(str(p).lstrip("p")) for p in load_npz(kept)["pose_id"]))[:count]
    if len(ids) < count:
        raise InputError(f"evaluate.train_poses={count}: {kept} keeps clips of only {len(ids)} driving poses")
    parts = [toy_conditions(i, 1, toy.frames, toy.size, toy.motion) for i in ids]
    return {**{k: np.concatenate([p[k] for p in parts]) for k in parts[0]}, "pose_id": np.array(ids)}


def _toy_split(backend, params: Params, scorer, pose_seed: int | None, num_poses: int, seed_base: int, progress: bool,
               split: str, models: tuple[str, ...] = ("base", "ipa"), cond: dict | None = None) -> tuple[list[dict], dict, dict, dict]:
    """`models` (base and/or aligned) on `num_poses` toy poses from `pose_seed` (or the given
    conditions `cond`, with their `pose_id`s), every evaluation seed: (rows, conditions, the first
    seed's clips, all clips). The same generator seeds for both models."""
    from ipa_lib.data.tensors import hand_masks
    from ipa_lib.data.toyworld import toy_conditions
    from ipa_lib.models.generate import generate_clips

    cfg, toy = params.evaluate, params.toy
    if cond is None:
        cond = toy_conditions(pose_seed, num_poses, toy.frames, toy.size, toy.motion)
        cond["pose_id"] = np.arange(pose_seed, pose_seed + num_poses)
    masks = hand_masks(cond["hand_keypoints"], toy.size, toy.size)
    rows, shown, clips = [], {}, {"base": [], "ipa": []}
    for seed in cfg.seeds:
        seeds = [seed_base + seed * 10_000 + i for i in range(num_poses)]
        for model in models:
            desc = f"eval[{split} {model} seed {seed}]"
            with backend.reference_model() if model == "base" else nullcontext():
                video = generate_clips(backend, cond["reference"], cond["pose"], seeds, cfg.num_inference_steps, 64, progress, desc)
            clips[model].append(video)
            if seed == cfg.seeds[0]:
                shown[model] = video
            for i in range(num_poses):
                m = clip_metrics(video[i], cond["target"][i], cond["hand_keypoints"][i], masks[i], scorer, params.gate.threshold)
                rows.append({"model": model, "seed": seed, "pose": int(cond["pose_id"][i]), **m})
    return rows, cond, shown, clips


# ---- cases -----------------------------------------------------------------------------

def case_clip_metrics(video: np.ndarray, case: dict[str, np.ndarray], scorer, self_reenactment: bool) -> dict[str, float]:
    """The CASE_METRICS one clip (F, H, W, 3) uint8 of a loaded case (`load_case`) defines."""
    from ipa_lib.core.image_metrics import psnr, ssim
    from ipa_lib.data.hands.agreement import hand_agreement
    from ipa_lib.data.hands.masks import keypoints_mask

    out = hand_agreement(scorer.detect(video), case["hand_keypoints"])
    if self_reenactment:
        truth = case["driving"]
        out["psnr"], out["ssim"] = psnr(video, truth), ssim(video, truth)
        mask = keypoints_mask(case["hand_keypoints"], video.shape[1], video.shape[2])
        if mask.any():
            out["hand_psnr"], out["hand_ssim"] = psnr(video, truth, mask), ssim(video, truth, mask)
    return {m: float(out[m]) for m in CASE_METRICS if m in out and not np.isnan(out[m])}


def summarize_cases(rows: list[dict], model: str) -> dict[str, float]:
    """Means over the clips of `model` that define each metric; a metric none defines is left out."""
    out = {}
    for m in CASE_METRICS:
        values = [r["metrics"][m] for r in rows if r["model"] == model and m in r["metrics"]]
        if values:
            out[m] = float(np.mean(values))
    return out


def _defined(rows: list[dict]) -> dict[str, dict[str, int]]:
    return {model: {m: sum(m in r["metrics"] for r in rows if r["model"] == model) for m in CASE_METRICS}
            for model in ("base", "ipa")}


def eval_splits(params: Params, rows: list[dict]) -> dict[str, list[dict]]:
    """The test and val cases of scanned rows; no test case is an InputError naming the splits."""
    from ipa_lib.data.cases import cases_of

    splits = {s: cases_of(rows, s) for s in ("test", "val")}
    if not splits["test"]:
        raise InputError(f"data.cases: {params.data.cases}: no usable case in the test split, nothing to evaluate "
                         f"(splits: {({r['case_id']: r['split'] for r in rows if r['ok']})}; "
                         f"data.test_fraction={params.data.test_fraction})")  # fmt: skip
    return splits


def evaluate_cases(params: Params, adapter_dir: str | Path, out_dir: str | Path, metrics_path: str | Path,
                   base_model: str | None = None, progress: bool = True, val_metrics_path: str | Path | None = None) -> dict:
    """Base vs aligned on the test and val cases of `data.cases` (module docstring)."""
    from ipa_lib.core.io import require_dir
    from ipa_lib.data.cases import scan
    from ipa_lib.stages.common import load_start_backend as load_backend

    adapter_dir = require_dir(adapter_dir, "adapter")
    rows = scan(params)
    eval_splits(params, rows)  # fail before loading a model
    backend = load_backend(params, base_model, adapter_dir)
    return evaluate_cases_with(backend, params, rows, out_dir, metrics_path, progress, val_metrics_path)


def evaluate_cases_with(backend, params: Params, rows: list[dict], out_dir: str | Path, metrics_path: str | Path,
                        progress: bool = True, val_metrics_path: str | Path | None = None) -> dict:
    """`evaluate_cases` on a loaded backend (its adapter on = aligned, off = base) and scanned rows."""
    from tqdm.auto import tqdm

    from ipa_lib.core.io import atomic_dir, atomic_write_json
    from ipa_lib.data.cases import load_case
    from ipa_lib.data.hands.quality import MediaPipeHandScorer
    from ipa_lib.data.visualize import side_by_side
    from ipa_lib.models.generate import generate_clips
    from ipa_lib.data.clip_store import CONDITIONS
    from ipa_lib.data.cases import case_seed

    cfg = params.evaluate
    splits = eval_splits(params, rows)
    per_clip: list[dict] = []
    failed: dict[str, str] = {}
    seeds: dict[str, list[int]] = {}
    shown: list[dict] = []
    with MediaPipeHandScorer(params.gate.hand_landmarker, fps=params.data.fps) as scorer:
        for split, cases in splits.items():
            for case in tqdm(cases, desc=f"evaluate[{split}]", disable=not progress, leave=False):
                cid = case["case_id"]
                try:
                    loaded = load_case(case["path"], params.data)
                except (InputError, OSError, ValueError) as err:
                    failed[cid] = str(err)
                    log.warning("evaluate: skipping case %s: %s", cid, err)
                    continue
                truth = bool(case.get("self_reenactment")) and "driving" in loaded
                extra = {k: loaded[k][None] for k in CONDITIONS if k in loaded}
                seeds[cid] = [case_seed(cid, 7_000_000 + s, 0) for s in cfg.seeds]
                for s, seed in zip(cfg.seeds, seeds[cid]):
                    clips = {}
                    for model in ("base", "ipa"):
                        with backend.reference_model() if model == "base" else nullcontext():
                            clips[model] = generate_clips(backend, loaded["reference"][None], loaded["pose"][None], [seed],
                                                          cfg.num_inference_steps, 1, False, conditions=extra)[0]  # fmt: skip
                        per_clip.append({"split": split, "case_id": cid, "eval_seed": s, "seed": seed, "model": model,
                                         "self_reenactment": truth,
                                         "metrics": case_clip_metrics(clips[model], loaded, scorer, truth)})  # fmt: skip
                    if split == "test" and s == cfg.seeds[0] and len(shown) < SHOWN:
                        shown.append({"case": loaded, "truth": truth, **clips})
            if split == "test" and not shown:
                lines = "\n".join(f"  {c}: {e}" for c, e in failed.items())
                raise InputError(f"data.cases: {params.data.cases}: no test case could be loaded\n{lines}")

    def result(split: str) -> dict:
        sel = [r for r in per_clip if r["split"] == split]
        out = {"base": summarize_cases(sel, "base"), "ipa": summarize_cases(sel, "ipa")}
        if not splits[split]:
            out["note"] = f"no {split} cases"
        elif not sel:
            out["note"] = f"no {split} case could be loaded (see details.failed)"
        return out

    test_result, val_result = result("test"), result("val")
    details = {
        "method": params.train.loss, "beta": params.train.beta, "hand_weight": params.train.hand_weight,
        "seeds": cfg.seeds, "case_seeds": seeds,
        "cases": {split: [c["case_id"] for c in cases] for split, cases in splits.items()},
        "self_reenactment": {c["case_id"]: bool(c.get("self_reenactment")) for cases in splits.values() for c in cases},
        "failed": failed, "refused": {r["case_id"]: r["error"] for r in rows if not r["ok"]},
        "defined": {split: _defined([r for r in per_clip if r["split"] == split]) for split in splits},
        "hand_metrics": "the gate's detector (MediaPipe HandLandmarker, VIDEO mode) on the generated clip vs the driver's hands",
    }  # fmt: skip
    with atomic_dir(out_dir) as tmp:
        atomic_write_json(tmp / "per_clip.json", per_clip)
        atomic_write_json(tmp / "details.json", details)
        side_by_side(tmp / "side_by_side", _strip_columns(shown))
    atomic_write_json(metrics_path, test_result)
    atomic_write_json(val_metrics_path or cfg.val_metrics, val_result)
    return {**test_result, "val": val_result, "details": details}


def _strip_columns(shown: list[dict]) -> dict[str, np.ndarray]:
    """driver | base | aligned, and the ground truth when a shown case is a self-reenactment
    (then the driver column is the pose video, the driving video being the ground truth;
    blank for a case without one)."""
    base, ipa = np.stack([s["base"] for s in shown]), np.stack([s["ipa"] for s in shown])
    if not any(s["truth"] for s in shown):
        driver = np.stack([s["case"].get("driving", s["case"]["pose"]) for s in shown])
        return {"driver": driver, "base": base, "aligned": ipa}
    truth = np.stack([s["case"]["driving"] if s["truth"] else np.full_like(s["base"], 255) for s in shown])
    return {"driving pose": np.stack([s["case"]["pose"] for s in shown]), "base": base, "aligned": ipa,
            "ground truth": truth}
