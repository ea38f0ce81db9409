"""Evaluate stage: base vs aligned on held-out driving poses, same seeds for both.

Held-out poses come from a toy-world seed range that sampling and pretraining never use
(`evaluate.pose_seed`). Both models animate every pose once per evaluation seed with the
same generator seed; the base is the same network with its adapter disabled.

Metrics per clip (means reported; per-clip rows kept for intervals):
- hand_quality:   toy hand scorer on the generated clip (pixels + driving pose only)
- hand_pass_rate: fraction of clips with hand_quality >= gate.threshold
- psnr, ssim:     whole clip against the ground-truth rendering of that pose (float64)
- hand_psnr:      PSNR inside the driving pose's hand mask
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ipa_lib.core.config import Params
from ipa_lib.core.metrics import EVAL_METRICS
from ipa_lib.core.results import EvalResult

METRICS = EVAL_METRICS  # the metric registry's evaluate-stage metrics (ipa_lib.core.metrics)


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
             base_model: str | None = None, progress: bool = True) -> EvalResult:
    from ipa_lib.stages.common import load_start_backend as load_backend
    from ipa_lib.data.tensors import hand_masks
    from ipa_lib.core.io import atomic_dir, atomic_write_json, require_dir, save_npz
    from ipa_lib.data.toyworld import toy_conditions
    from ipa_lib.models.generate import generate_clips
    from ipa_lib.data.toy_quality import ToyHandScorer
    from ipa_lib.data.visualize import side_by_side

    cfg, toy = params.evaluate, params.toy
    adapter_dir = require_dir(adapter_dir, "adapter")
    backend = load_backend(params, base_model, adapter_dir)
    cond = toy_conditions(cfg.pose_seed, cfg.num_poses, toy.frames, toy.size, toy.motion)
    masks = hand_masks(cond["hand_keypoints"], toy.size, toy.size)
    scorer = ToyHandScorer()
    rows, shown, clips = [], {}, {"base": [], "ipa": []}
    for seed in cfg.seeds:
        seeds = [7_000_000 + seed * 10_000 + i for i in range(cfg.num_poses)]
        for model in ("base", "ipa"):
            if model == "base":
                with backend.reference_model():
                    video = generate_clips(backend, cond["reference"], cond["pose"], seeds, cfg.num_inference_steps, 64, progress, f"eval[{model} seed {seed}]")
            else:
                video = generate_clips(backend, cond["reference"], cond["pose"], seeds, cfg.num_inference_steps, 64, progress, f"eval[{model} seed {seed}]")
            clips[model].append(video)
            if seed == cfg.seeds[0]:
                shown[model] = video
            for i in range(cfg.num_poses):
                m = clip_metrics(video[i], cond["target"][i], cond["hand_keypoints"][i], masks[i], scorer, params.gate.threshold)
                rows.append({"model": model, "seed": seed, "pose": cfg.pose_seed + i, **m})

    result = {"base": summarize(rows, "base"), "ipa": summarize(rows, "ipa")}
    details = {
        "method": params.train.loss, "beta": params.train.beta, "hand_weight": params.train.hand_weight,
        "num_poses": cfg.num_poses, "seeds": cfg.seeds,
        "base": per_seed(rows, "base"), "ipa": per_seed(rows, "ipa"),
    }
    with atomic_dir(out_dir) as tmp:
        atomic_write_json(tmp / "per_clip.json", rows)
        atomic_write_json(tmp / "details.json", details)
        # the generated clips, (S seeds, N poses, F, H, W, 3) uint8: set-level metrics (FD) in `ipa report`
        save_npz(tmp / "clips.npz", base=np.stack(clips["base"]), ipa=np.stack(clips["ipa"]),
                 seeds=np.array(cfg.seeds), poses=np.arange(cfg.pose_seed, cfg.pose_seed + cfg.num_poses))
        n = min(6, cfg.num_poses)
        side_by_side(tmp / "side_by_side", {"driving pose": cond["pose"][:n], "base": shown["base"][:n],
                                            "IPA": shown["ipa"][:n], "ground truth": cond["target"][:n]})
    atomic_write_json(metrics_path, result)
    return {**result, "details": details}
