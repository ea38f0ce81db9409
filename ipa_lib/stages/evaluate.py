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

Fan-out (`evaluate.shards`): the work splits into independent shards, contiguous runs of its
units, the test then val (split, case) pairs on cases and the 64-pose generation batches of the
test then val poses on the toy world (so a shard generates exactly the batches one run does).
`evaluate_shard` writes one shard's per-clip rows (and the clips the outputs keep) and
`merge_evaluations` checks the union and writes the files `evaluate` writes: one KFP pod per
shard, or under DVC a pool of `evaluate.workers` processes (`evaluate`; 1 = one process).
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
BATCH = 64  # toy world: poses generated at once (a shard's unit, so shards generate the same batches)
SHARD_INFO = "shard.json"  # an evaluation shard's plan and key (its rows: rows.json; `evaluate_shard`)
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
    `evaluate.val_metrics`; on the toy world written only when given). With `evaluate.workers` > 1
    (and `evaluate.shards` > 1) the shards run in a pool of processes and are merged: the same files.

    Toy world, for the experiments in docs/results.md: `evaluate.train_poses` > 0 also animates
    that many of the gated set's own driving poses (`gated_dir`, default `gate.out`; rows in
    `per_clip_train.json`); `evaluate.along` also evaluates the aligned model at every adapter
    `train.save_at` kept (`adapter_dir/along/step-N` -> `out_dir/along/step-N/`: per_clip.json,
    clips.npz, and per_clip_train.json with train_poses), the base being the same for all."""
    from ipa_lib.stages.common import load_start_backend as load_backend
    from ipa_lib.core.io import atomic_dir, atomic_write_json, require_dir, save_npz
    from ipa_lib.data.toy_quality import ToyHandScorer

    if min(params.evaluate.workers, params.evaluate.shards) > 1:
        return _evaluate_in_pool(params, adapter_dir, out_dir, metrics_path, base_model, val_metrics_path)
    if params.on_cases:
        return evaluate_cases(params, adapter_dir, out_dir, metrics_path, base_model, progress, val_metrics_path)
    cfg, toy = params.evaluate, params.toy
    adapter_dir = require_dir(adapter_dir, "adapter")
    backend = load_backend(params, base_model, adapter_dir)
    scorer = ToyHandScorer()
    # test poses (the report) and val poses (select-best, promotion): two seed ranges nothing else uses
    test = _toy_split(backend, params, scorer, cfg.pose_seed, cfg.num_poses, 7_000_000, progress, "test")
    val = _toy_split(backend, params, scorer, cfg.val_pose_seed, cfg.val_poses, 8_000_000, progress, "val")
    rows, clips = test[0], test[3]
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
    result, val_result, details = _toy_summary(params, rows, val[0])
    if train_split is not None:
        details["train_poses"] = {"num_poses": cfg.train_poses, "pose_ids": [int(i) for i in train_cond["pose_id"]],
                                  "base": summarize(train_split[0], "base"), "ipa": summarize(train_split[0], "ipa")}
    if along:
        details["along"] = {name: summarize(a["test"][0], "ipa") for name, a in along.items()}
    with atomic_dir(out_dir) as tmp:
        _write_toy(tmp, params, rows, val[0], details, np.stack(clips["base"]), np.stack(clips["ipa"]))
        if train_split is not None:
            atomic_write_json(tmp / "per_clip_train.json", train_split[0])
        for name, a in along.items():
            (tmp / "along" / name).mkdir(parents=True)
            atomic_write_json(tmp / "along" / name / "per_clip.json", a["test"][0])
            save_npz(tmp / "along" / name / "clips.npz", ipa=np.stack(a["test"][3]["ipa"]), seeds=np.array(cfg.seeds))
            if a["train"] is not None:
                atomic_write_json(tmp / "along" / name / "per_clip_train.json", a["train"][0])
    return _write_metrics(result, val_result, details, metrics_path, val_metrics_path)


def _toy_summary(params: Params, rows: list[dict], val_rows: list[dict]) -> tuple[dict, dict, dict]:
    """(test result, val result, details) of the toy world's per-clip rows."""
    cfg = params.evaluate
    result = {"base": summarize(rows, "base"), "ipa": summarize(rows, "ipa")}
    val_result = {"base": summarize(val_rows, "base"), "ipa": summarize(val_rows, "ipa")}
    details = {
        "method": params.train.loss, "beta": params.train.beta, "hand_weight": params.train.hand_weight,
        "num_poses": cfg.num_poses, "seeds": cfg.seeds,
        "base": per_seed(rows, "base"), "ipa": per_seed(rows, "ipa"),
        "val": {"num_poses": cfg.val_poses, "pose_seed": cfg.val_pose_seed, **val_result},
    }
    return result, val_result, details


def _write_toy(tmp: Path, params: Params, rows: list[dict], val_rows: list[dict], details: dict, base: np.ndarray,
               ipa: np.ndarray) -> None:
    """The toy world's evaluation files into `tmp`; `base`/`ipa`: the test clips (S seeds, N poses, F, H, W, 3)."""
    from ipa_lib.core.io import atomic_write_json, save_npz
    from ipa_lib.data.toyworld import toy_conditions
    from ipa_lib.data.visualize import side_by_side

    cfg, toy = params.evaluate, params.toy
    atomic_write_json(tmp / "per_clip.json", rows)
    atomic_write_json(tmp / "per_clip_val.json", val_rows)
    atomic_write_json(tmp / "details.json", details)
    # the generated clips, (S seeds, N poses, F, H, W, 3) uint8: set-level metrics (FD) in `ipa report`
    save_npz(tmp / "clips.npz", base=base, ipa=ipa, seeds=np.array(cfg.seeds),
             poses=np.arange(cfg.pose_seed, cfg.pose_seed + cfg.num_poses))
    n = min(SHOWN, cfg.num_poses)
    cond = toy_conditions(cfg.pose_seed, n, toy.frames, toy.size, toy.motion)  # a pose's clip depends on its seed only
    side_by_side(tmp / "side_by_side", {"driving pose": cond["pose"], "base": base[0, :n], "IPA": ipa[0, :n],
                                        "ground truth": cond["target"]})


def _write_metrics(result: dict, val_result: dict, details: dict, metrics_path, val_metrics_path) -> dict:
    from ipa_lib.core.io import atomic_write_json

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
               split: str, models: tuple[str, ...] = ("base", "ipa"), cond: dict | None = None,
               first: int = 0) -> tuple[list[dict], dict, dict, dict]:
    """`models` (base and/or aligned) on `num_poses` toy poses from `pose_seed` (or the given
    conditions `cond`, with their `pose_id`s), every evaluation seed: (rows, conditions, the first
    seed's clips, all clips). The same generator seeds for both models; `first`: the index of the
    first pose in its split (a shard's pose range), which its generator seeds count from."""
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
        seeds = [seed_base + seed * 10_000 + first + i for i in range(num_poses)]
        for model in models:
            desc = f"eval[{split} {model} seed {seed}]"
            with backend.reference_model() if model == "base" else nullcontext():
                video = generate_clips(backend, cond["reference"], cond["pose"], seeds, cfg.num_inference_steps, BATCH, progress, desc)
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
    from ipa_lib.data.hands.quality import MediaPipeHandScorer

    splits = eval_splits(params, rows)
    with MediaPipeHandScorer(params.gate.hand_landmarker, fps=params.data.fps) as scorer:
        part = _case_rows(backend, params, [(s, c) for s, cases in splits.items() for c in cases], scorer, progress,
                          whole=True)
    return _write_cases(params, rows, splits, part, out_dir, metrics_path, val_metrics_path)


def _case_rows(backend, params: Params, units: list[tuple[str, dict]], scorer, progress: bool = True,
               whole: bool = False) -> dict:
    """Base and aligned on the (split, case) units, every evaluation seed: {"per_clip", "failed"
    (case id -> why it did not load), "seeds" (case id -> generator seeds), "shown" (the first
    SHOWN test cases' first-seed clips, for the strip)}. `whole`: the units are every test and
    val case, so no loadable test case is an InputError right after the test cases."""
    from tqdm.auto import tqdm

    from ipa_lib.data.cases import case_seed, load_case
    from ipa_lib.data.clip_store import CONDITIONS
    from ipa_lib.models.generate import generate_clips

    cfg = params.evaluate
    per_clip: list[dict] = []
    failed: dict[str, str] = {}
    seeds: dict[str, list[int]] = {}
    shown: list[dict] = []
    for split in ("test", "val"):
        cases = [c for s, c in units if s == split]
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
        if split == "test" and whole:
            _require_shown(params, shown, failed)
    return {"per_clip": per_clip, "failed": failed, "seeds": seeds, "shown": shown}


def _require_shown(params: Params, shown: list[dict], failed: dict[str, str]) -> None:
    if not shown:
        lines = "\n".join(f"  {c}: {e}" for c, e in failed.items())
        raise InputError(f"data.cases: {params.data.cases}: no test case could be loaded\n{lines}")


def _write_cases(params: Params, rows: list[dict], splits: dict[str, list[dict]], part: dict, out_dir: str | Path,
                 metrics_path: str | Path, val_metrics_path: str | Path | None) -> dict:
    """The case evaluation's files from the `_case_rows` of every test and val case."""
    from ipa_lib.core.io import atomic_dir, atomic_write_json
    from ipa_lib.data.visualize import side_by_side

    cfg = params.evaluate
    per_clip, failed, seeds, shown = part["per_clip"], part["failed"], part["seeds"], part["shown"]

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


# ---- one shard per task, then a merge (the KFP fan-out, the evaluate.workers pool) -----------
# a shard folder: rows.json ({"test": rows, "val": rows}), SHARD_INFO (shard, key, adapter, units;
# on cases also failed, seeds, shown) and the clips the outputs keep: clips.npz (toy: its test
# poses' clips, (S, n, F, H, W, 3)) or strip.npz (cases: its first SHOWN test cases' columns)

def evaluation_shards(params: Params) -> list[int]:
    """The shards of the evaluation: `evaluate.shards` of them (one past the unit count is empty)."""
    return list(range(params.evaluate.shards))


def eval_units(params: Params, rows: list[dict] | None = None) -> list[dict]:
    """The evaluation's work, in order: on cases {"split", "case_id"} of every test then val case
    of the scanned `rows`; on the toy world {"split", "lo", "hi"}, the BATCH-pose generation
    batches of the test then val poses (pose indices lo..hi-1 of the split)."""
    if params.on_cases:
        return [{"split": s, "case_id": c["case_id"]} for s, cases in eval_splits(params, rows).items() for c in cases]
    cfg = params.evaluate
    return [{"split": split, "lo": lo, "hi": min(lo + BATCH, n)}
            for split, n in (("test", cfg.num_poses), ("val", cfg.val_poses)) for lo in range(0, n, BATCH)]


def shard_units(params: Params, units: list[dict], shard: int) -> list[dict]:
    """The units of shard `shard`: a contiguous run (`ipa_lib.data.clip_store.shard_of`)."""
    from ipa_lib.data.clip_store import shard_of

    return [u for i, u in enumerate(units) if shard_of(i, len(units), params.evaluate.shards) == shard]


def shard_key(params: Params) -> str:
    """Hash of the params that determine a shard's rows (not where the outputs go, nor `train`:
    the adapter is the input, fingerprinted apart)."""
    import hashlib
    import json

    doc = {"evaluate": params.evaluate.model_dump(mode="json", exclude={"out", "metrics", "val_metrics", "workers"}),
           "data": params.data.model_dump(mode="json", exclude={"cases"}),
           "backend": params.backend.model_dump(mode="json", exclude={"device"}),
           **{k: getattr(params, k).model_dump(mode="json") for k in ("toy", "model", "gate")}}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def _fingerprint(folder: Path) -> str:
    """Hash of a folder's files (names and bytes): the adapter every shard must share."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(folder)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def _shardable(params: Params) -> None:
    cfg = params.evaluate
    if not params.on_cases and (cfg.train_poses or cfg.along):
        raise InputError(f"evaluate.train_poses={cfg.train_poses}, evaluate.along={cfg.along}: toy-world experiments "
                         "of a one-process evaluation; the sharded path (evaluate.shards > 1 in KFP, evaluate.workers > 1) "
                         "does not run them (set evaluate.train_poses=0 and evaluate.along=false)")


def evaluate_shard(params: Params, adapter_dir: str | Path, shard: int, out_dir: str | Path,
                   base_model: str | None = None, progress: bool = True) -> dict:
    """Evaluate shard `shard` (of `evaluation_shards`) into the folder `out_dir`, atomically,
    independently of the other shards (one KFP pod each); `merge_evaluations` writes the
    evaluation from the folders. Refuses (InputError) the toy-only `evaluate.train_poses` and
    `evaluate.along`, which only `evaluate` in one process runs."""
    from ipa_lib.core.io import require_dir
    from ipa_lib.data.cases import scan
    from ipa_lib.stages.common import load_start_backend as load_backend

    _shardable(params)
    if shard not in evaluation_shards(params):
        raise InputError(f"shard {shard}: not a shard of this evaluation (evaluate.shards={params.evaluate.shards})")
    adapter_dir = require_dir(adapter_dir, "adapter")
    rows = scan(params) if params.on_cases else None
    mine = shard_units(params, eval_units(params, rows), shard)
    backend = load_backend(params, base_model, adapter_dir) if mine else None  # past the unit count: empty
    return _evaluate_shard_with(backend, params, adapter_dir, shard, mine, rows, out_dir, progress)


def _evaluate_shard_with(backend, params: Params, adapter_dir: Path, shard: int, units: list[dict],
                         rows: list[dict] | None, out_dir: str | Path, progress: bool) -> dict:
    """`evaluate_shard` on a loaded backend, its units and (cases) the scanned rows."""
    from ipa_lib.core.io import atomic_dir, atomic_write_json, save_npz

    cfg = params.evaluate
    info = {"shard": shard, "source": "cases" if params.on_cases else "toy", "key": shard_key(params),
            "adapter": _fingerprint(adapter_dir), "units": units}
    out: dict[str, list[dict]] = {"test": [], "val": []}
    with atomic_dir(out_dir) as tmp:
        if params.on_cases and units:
            from ipa_lib.data.hands.quality import MediaPipeHandScorer

            by_unit = {(s, c["case_id"]): c for s, cases in eval_splits(params, rows).items() for c in cases}
            with MediaPipeHandScorer(params.gate.hand_landmarker, fps=params.data.fps) as scorer:
                part = _case_rows(backend, params, [(u["split"], by_unit[u["split"], u["case_id"]]) for u in units],
                                  scorer, progress)
            for r in part["per_clip"]:
                out[r["split"]].append(r)
            info.update(failed=part["failed"], seeds=part["seeds"], shown=[{"truth": s["truth"]} for s in part["shown"]])
            strip = {}
            for k, s in enumerate(part["shown"]):
                strip.update({f"{k}-base": s["base"], f"{k}-ipa": s["ipa"], f"{k}-pose": s["case"]["pose"]})
                if "driving" in s["case"]:
                    strip[f"{k}-driving"] = s["case"]["driving"]
            save_npz(tmp / "strip.npz", **strip)
        elif params.on_cases:
            info.update(failed={}, seeds={}, shown=[])
        elif units:
            from ipa_lib.data.toy_quality import ToyHandScorer

            scorer, clips = ToyHandScorer(), {"base": [], "ipa": []}
            for u in units:
                pose_seed, seed_base = (cfg.pose_seed, 7_000_000) if u["split"] == "test" else (cfg.val_pose_seed, 8_000_000)
                split_rows, _, _, split_clips = _toy_split(backend, params, scorer, pose_seed + u["lo"], u["hi"] - u["lo"],
                                                           seed_base, progress, u["split"], first=u["lo"])
                out[u["split"]] += split_rows
                if u["split"] == "test":
                    for model, kept in clips.items():
                        kept.append(np.stack(split_clips[model]))
            if clips["base"]:
                save_npz(tmp / "clips.npz", **{m: np.concatenate(v, axis=1) for m, v in clips.items()})
        atomic_write_json(tmp / "rows.json", out)
        atomic_write_json(tmp / SHARD_INFO, info)
    return {"shard": shard, "units": len(units), "rows": len(out["test"]) + len(out["val"])}


def _clip_id(split: str, row: dict) -> tuple:
    if "case_id" in row:
        return split, row["case_id"], row["eval_seed"], row["model"]
    return split, row["pose"], row["seed"], row["model"]


def _planned_clips(params: Params, units: list[dict], failed: dict[str, str]) -> list[tuple]:
    """The clip ids (`_clip_id`) `units` give, in the order `evaluate` writes their rows
    (toy: per split, seed, model, pose; cases: per case, seed, model); cases that failed to load give none."""
    cfg, models = params.evaluate, ("base", "ipa")
    if params.on_cases:
        return [(u["split"], u["case_id"], s, m) for u in units if u["case_id"] not in failed for s in cfg.seeds for m in models]
    out = []
    for split, first in (("test", cfg.pose_seed), ("val", cfg.val_pose_seed)):
        poses = [first + i for u in units if u["split"] == split for i in range(u["lo"], u["hi"])]
        out += [(split, p, s, m) for s in cfg.seeds for m in models for p in poses]
    return out


def _read_shards(params: Params, shard_dirs: list[str | Path], units: list[dict]) -> list[tuple[Path, dict, dict]]:
    """(folder, info, rows) of every shard in shard order, checked: each shard of
    `evaluation_shards` once, evaluated with these params and the same adapter, holding its planned units."""
    from ipa_lib.core.io import read_json
    from ipa_lib.data.clip_store import read_shard_infos

    found = read_shard_infos(shard_dirs, SHARD_INFO, "evaluation shard")
    expected = evaluation_shards(params)
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected), key=str)
    if missing or extra:
        raise InputError(f"evaluate.shards={params.evaluate.shards}: expected shards {expected}, got {sorted(found, key=str)}"
                         + (f"; missing {missing}" if missing else "") + (f"; not of this evaluation {extra}" if extra else "")
                         + " (a package compiled for another shard count: recompile)")
    key = shard_key(params)
    for s, (folder, info) in sorted(found.items()):
        if info.get("key") != key:
            raise InputError(f"{folder}: evaluation shard {s} was made with other params (key {info.get('key')}, expected {key})")
        planned = shard_units(params, units, s)
        if info.get("units") != planned:
            lost = [u for u in planned if u not in info.get("units", [])]
            raise InputError(f"{folder}: evaluation shard {s} holds units {info.get('units')}, planned {planned}"
                             + (f" (missing {lost})" if lost else ""))
    adapters = {s: info["adapter"] for s, (_, info) in found.items() if info["units"]}
    if len(set(adapters.values())) > 1:
        raise InputError(f"evaluation shards evaluated different adapters (fingerprint by shard: {adapters})")
    return [(folder, info, read_json(folder / "rows.json", "evaluation shard rows")) for _, (folder, info) in sorted(found.items())]


def merge_evaluations(params: Params, shard_dirs: list[str | Path], out_dir: str | Path, metrics_path: str | Path,
                      val_metrics_path: str | Path | None = None) -> dict:
    """Check the evaluation shard folders and write exactly the files `evaluate` writes (out_dir:
    per_clip.json, per_clip_val.json on the toy world, details.json, clips.npz on the toy world,
    side_by_side.*; `metrics_path`, `val_metrics_path` as `evaluate`). Refuses (InputError naming
    the shard or clip) a missing or repeated shard, one made with other params or another adapter
    or holding other units, a repeated clip row and a missing planned one. Like `evaluate_shard`,
    refuses `evaluate.train_poses` / `evaluate.along`."""
    from ipa_lib.core.io import atomic_dir, load_npz
    from ipa_lib.data.cases import scan

    _shardable(params)
    scanned = scan(params) if params.on_cases else None
    units = eval_units(params, scanned)
    shards = _read_shards(params, shard_dirs, units)
    by_id: dict[tuple, dict] = {}
    failed: dict[str, str] = {}
    for folder, info, rows in shards:
        failed.update(info.get("failed", {}))
        for split, row in [(sp, r) for sp in ("test", "val") for r in rows[sp]]:
            cid = _clip_id(split, row)
            if cid in by_id:
                raise InputError(f"{folder}: evaluation shard {info['shard']}: clip {cid} has more than one row")
            by_id[cid] = row
        for cid in _planned_clips(params, shard_units(params, units, info["shard"]), failed):
            if cid not in by_id:
                raise InputError(f"{folder}: evaluation shard {info['shard']} lacks the row of planned clip {cid}")
    planned = _planned_clips(params, units, failed)
    unplanned = sorted(set(by_id) - set(planned), key=str)
    if unplanned:
        raise InputError(f"evaluation shards hold rows of clips not planned: {unplanned[:5]}")
    ordered = [by_id[c] for c in planned]
    if params.on_cases:
        shown = []
        for folder, info, _ in shards:
            if info["shown"]:
                strip = load_npz(folder / "strip.npz")
                for k, s in enumerate(info["shown"]):
                    case = {"pose": strip[f"{k}-pose"], **({"driving": strip[f"{k}-driving"]} if f"{k}-driving" in strip else {})}
                    shown.append({"case": case, "truth": s["truth"], "base": strip[f"{k}-base"], "ipa": strip[f"{k}-ipa"]})
        _require_shown(params, shown, failed)
        seeds = {c: s for _, info, _ in shards for c, s in info["seeds"].items()}
        part = {"per_clip": ordered, "failed": failed, "seeds": seeds, "shown": shown[:SHOWN]}
        return _write_cases(params, scanned, eval_splits(params, scanned), part, out_dir, metrics_path, val_metrics_path)
    rows = [r for c, r in zip(planned, ordered) if c[0] == "test"]
    val_rows = [r for c, r in zip(planned, ordered) if c[0] == "val"]
    clips = [load_npz(folder / "clips.npz") for folder, info, _ in shards if any(u["split"] == "test" for u in info["units"])]
    base, ipa = (np.concatenate([c[m] for c in clips], axis=1) for m in ("base", "ipa"))
    result, val_result, details = _toy_summary(params, rows, val_rows)
    with atomic_dir(out_dir) as tmp:
        _write_toy(tmp, params, rows, val_rows, details, base, ipa)
    return _write_metrics(result, val_result, details, metrics_path, val_metrics_path)


def _evaluate_worker(params: Params, adapter_dir, base_model, shards: list[int], work: Path) -> list[int]:
    """One process of the `evaluate.workers` pool: its own backend, then its shards."""
    from ipa_lib.data.cases import scan
    from ipa_lib.stages.common import load_start_backend as load_backend

    rows = scan(params) if params.on_cases else None
    units = eval_units(params, rows)
    backend = load_backend(params, base_model, adapter_dir)
    for s in shards:
        _evaluate_shard_with(backend, params, Path(adapter_dir), s, shard_units(params, units, s), rows,
                             work / f"shard-{s:03d}", progress=False)
    return shards


def _evaluate_in_pool(params: Params, adapter_dir, out_dir, metrics_path, base_model, val_metrics_path) -> dict:
    """`evaluate` through the shard functions: the `evaluate.shards` shards in a pool of
    `evaluate.workers` processes (spawned; shards dealt round-robin, each worker loads the
    model once) into a work folder beside `out_dir`, then `merge_evaluations`."""
    import multiprocessing
    import shutil
    import tempfile
    from concurrent.futures import ProcessPoolExecutor

    from ipa_lib.core.io import require_dir

    _shardable(params)
    adapter_dir = require_dir(adapter_dir, "adapter")
    shards = evaluation_shards(params)
    workers = min(params.evaluate.workers, len(shards))
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.shards-", dir=out.parent))
    try:
        groups = [shards[i::workers] for i in range(workers)]
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            for done in pool.map(_evaluate_worker, *zip(*[(params, adapter_dir, base_model, g, work) for g in groups])):
                log.info("evaluate: shards %s done", done)
        return merge_evaluations(params, [work / f"shard-{s:03d}" for s in shards], out_dir, metrics_path, val_metrics_path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
