"""Sample stage: the current model animates many (reference, driving pose) pairs.

Toy default: driving pose p comes from toy-world seed `sample.seed + p` (its reference
image, pose video and hand keypoints; never its ground-truth frames), and each pose is
animated `per_pose` times with generator seeds `sample.seed * 1000 + i`. Output: one
compressed shard plus `manifest.jsonl` (one row per clip).

Cases (`data.cases`): every train case x `sample.per_case` seeds, through the stock
pipeline with the case's conditioning (reference, pose video, face video, and background +
mask in replacement mode), into `sample.shards` independent shards (the case clip store of
`ipa_lib.data.clip_store`). A clip's seed depends only on its case id and index, so the clip
set is the same for any shard count. Finished shards wait in a work folder beside the output
(`.<out>.shards/<key>`, key = a hash of everything that determines them), so a run stopped
mid-sampling resumes at the shard it stopped in, even under DVC (which deletes a stage's
outputs before rerunning it); the folder is removed once the output is complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np

from ipa_lib.core.config import Params
from ipa_lib.core.errors import InputError
from ipa_lib.data.cases import case_seed
from ipa_lib.data.clip_store import CASES_DIR, CONDITIONS, SHARD, save_conditions, shard_name, shard_of, write_manifest
from ipa_lib.data.toyworld import toy_conditions
from ipa_lib.models.generate import generate_clips

log = logging.getLogger(__name__)


def sample(params: Params, out_dir: str | Path, base_model: str | None = None, adapter: str | None = None,
           progress: bool = True) -> dict:
    from ipa_lib.stages.common import load_start_backend as load_backend
    from ipa_lib.core.io import atomic_dir, save_npz

    if params.on_cases:
        return sample_cases(params, out_dir, base_model, adapter, progress)
    cfg, toy = params.sample, params.toy
    backend = load_backend(params, base_model, adapter)  # starts from backend.init_adapter when set
    n_poses = -(-cfg.num_clips // cfg.per_pose)
    cond = toy_conditions(cfg.seed, n_poses, toy.frames, toy.size, toy.motion)
    pose_idx = np.arange(cfg.num_clips) // cfg.per_pose
    seeds = [cfg.seed * 1000 + i for i in range(cfg.num_clips)]
    video = generate_clips(backend, cond["reference"][pose_idx], cond["pose"][pose_idx], seeds,
                           cfg.num_inference_steps, cfg.batch_size, progress)
    rows = [
        {"sample_id": f"s{cfg.seed}-{i:05d}", "video": f"{SHARD}#{i}", "pose_id": f"p{cfg.seed + int(p)}",
         "seed": seeds[i], "num_frames": toy.frames, "height": toy.size, "width": toy.size}
        for i, p in enumerate(pose_idx)
    ]
    with atomic_dir(out_dir) as tmp:
        save_npz(tmp / SHARD, video=video, reference=cond["reference"][pose_idx], pose=cond["pose"][pose_idx],
                 hand_keypoints=cond["hand_keypoints"][pose_idx], pose_id=np.array([r["pose_id"] for r in rows]))
        write_manifest(tmp, rows)
    return {"source": "toy", "clips": len(rows), "poses": n_poses}




# ---- cases -----------------------------------------------------------------------------

def plan_cases(params: Params, train_cases: list[dict]) -> list[dict]:
    """Manifest rows of the clips to sample: each train case x `sample.per_case`, in case-id order."""
    cfg, data = params.sample, params.data
    rows = []
    for case in train_cases:
        src = Path(case["path"])
        for k in range(cfg.per_case):
            rows.append({
                "sample_id": f"{case['case_id']}-s{k}", "case_id": case["case_id"], "pose_id": case["case_id"],
                "seed": case_seed(case["case_id"], cfg.seed, k), "num_frames": data.frames,
                "height": data.height, "width": data.width, "mode": case["mode"],
                "reference": str(src / "src_ref.png"), "pose": str(src / "src_pose.mp4"), "face": str(src / "src_face.mp4"),
                "conditions": f"{CASES_DIR}/{case['case_id']}.npz",
            })  # fmt: skip
    for i, row in enumerate(rows):
        row["shard"] = shard_of(i, len(rows), cfg.shards)
        row["video"] = f"{shard_name(row['shard'])}#{row['sample_id']}"
    return rows


def _files(folder: str | Path | None) -> list[tuple[str, int, int]]:
    if not folder or not Path(folder).exists():
        return []
    root = Path(folder)
    items = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return [(str(p.relative_to(root) if p != root else p.name), p.stat().st_size, p.stat().st_mtime_ns) for p in items]


def work_key(params: Params, train_cases: list[dict], base_model: str | None, adapter: str | None) -> str:
    """Hash of what determines the shards: sampling and data params, the backend, the model
    files and every train case's files (name, size, mtime), so stale shards are never reused."""
    doc = {
        "sample": params.sample.model_dump(mode="json", exclude={"out", "batch_size"}),
        "data": params.data.model_dump(mode="json", exclude={"cases"}),
        "backend": params.backend.model_dump(mode="json", exclude={"device"}),
        "base_model": _files(base_model or params.backend.base_model), "adapter": _files(adapter),
        "cases": {c["case_id"]: _files(c["path"]) for c in train_cases},
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def work_dir(out_dir: str | Path, key: str) -> Path:
    out = Path(out_dir)
    return out.parent / f".{out.name}.shards" / key


def sample_shard(backend, params: Params, plan: list[dict], shard: int, work: Path, progress: bool = True) -> Path:
    """Animate the clips of one shard from their cases' stored conditioning; write the shard atomically."""
    from tqdm.auto import tqdm

    from ipa_lib.core.io import load_npz, save_npz

    cfg = params.sample
    todo = [r for r in plan if r["shard"] == shard]
    cache: dict[str, dict] = {}
    clips = {}
    for row in tqdm(todo, desc=f"sample[shard {shard}]", disable=not progress, leave=False):
        cond = cache.setdefault(row["case_id"], load_npz(work / row["conditions"]))
        extra = {k: cond[k][None] for k in CONDITIONS if k in cond}
        clips[row["sample_id"]] = generate_clips(backend, cond["reference"][None], cond["pose"][None], [row["seed"]],
                                                 cfg.num_inference_steps, 1, progress=False, conditions=extra)[0]
    return save_npz(work / shard_name(shard), **clips)


def sample_cases(params: Params, out_dir: str | Path, base_model: str | None = None, adapter: str | None = None,
                 progress: bool = True) -> dict:
    from ipa_lib.core.io import atomic_dir, atomic_write_json
    from ipa_lib.data.cases import cases_of, load_case, scan
    from ipa_lib.stages.common import load_start_backend as load_backend

    cfg = params.sample
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    report = out_dir.parent / f".{out_dir.name}.cases-report"
    rows = scan(params, report)
    train = cases_of(rows, "train")
    if not train:
        raise InputError(f"data.cases: {params.data.cases}: no usable case in the train split "
                         f"(splits: {({r['case_id']: r['split'] for r in rows if r['ok']})})")
    plan = plan_cases(params, train)
    key = work_key(params, train, base_model, adapter)
    work = work_dir(out_dir, key)
    for stale in work.parent.glob("*") if work.parent.exists() else []:
        if stale != work:
            shutil.rmtree(stale, ignore_errors=True)  # shards of other params or data: never reused
    for case in train:
        if not (work / CASES_DIR / f"{case['case_id']}.npz").exists():
            save_conditions(work, case["case_id"], load_case(case["path"], params.data))
    shards = sorted({r["shard"] for r in plan})
    done = [s for s in shards if (work / shard_name(s)).exists()]
    if done:
        log.info("sample: resuming, %d of %d shards already sampled in %s", len(done), len(shards), work)
    todo = [s for s in shards if s not in done]
    if todo:
        backend = load_backend(params, base_model, adapter)
        for s in todo:
            sample_shard(backend, params, plan, s, work, progress)
    with atomic_dir(out_dir) as tmp:
        for s in shards:
            _link_or_copy(work / shard_name(s), tmp / shard_name(s))
        shutil.copytree(work / CASES_DIR, tmp / CASES_DIR)
        for ext in (".md", ".json"):
            shutil.copy(report.with_suffix(ext), tmp / f"cases-report{ext}")
        write_manifest(tmp, plan)
        atomic_write_json(tmp / "cases.json", rows)
        summary = {"source": "cases", "clips": len(plan), "cases": len(train), "shards": len(shards),
                   "resumed_shards": len(done), "refused_cases": {r["case_id"]: r["error"] for r in rows if not r["ok"]},
                   "splits": {s: len(cases_of(rows, s)) for s in ("train", "val", "test")}}  # fmt: skip
        atomic_write_json(tmp / "summary.json", summary)
    shutil.rmtree(work.parent, ignore_errors=True)
    for ext in (".md", ".json"):
        report.with_suffix(ext).unlink(missing_ok=True)
    return summary


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem
        shutil.copy2(src, dst)
