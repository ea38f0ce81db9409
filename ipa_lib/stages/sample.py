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
outputs before rerunning it); the folder is removed once the output is complete. The shards
are sampled in this process or, with `sample.workers` > 1, in a pool of processes.

The KFP round fans out instead: `sample_one_shard` (one pod per shard, `shard_indices`) and
`merge_shards`, which checks the union against the plan and writes the same store.
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
        "sample": params.sample.model_dump(mode="json", exclude={"out", "batch_size", "workers"}),
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


def _cases_plan(params: Params, out_dir: Path) -> tuple[list[dict], list[dict], list[dict], Path]:
    """(scanned rows, train cases, plan, report stem) of a case store at `out_dir`."""
    from ipa_lib.data.cases import cases_of, scan

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    report = out_dir.parent / f".{out_dir.name}.cases-report"
    rows = scan(params, report)
    train = cases_of(rows, "train")
    if not train:
        raise InputError(f"data.cases: {params.data.cases}: no usable case in the train split "
                         f"(splits: {({r['case_id']: r['split'] for r in rows if r['ok']})})")
    return rows, train, plan_cases(params, train), report


def shard_indices(params: Params) -> list[int]:
    """The shards of the clip store: `sample.shards` on cases (fewer when there are fewer clips,
    which the merge checks), one on the toy world (its store is one shard)."""
    return list(range(params.sample.shards)) if params.on_cases else [0]


def _sample_worker(params: Params, base_model, adapter, plan: list[dict], shards: list[int], work: Path) -> list[int]:
    """One process of the `sample.workers` pool: its own backend, then its shards."""
    from ipa_lib.stages.common import load_start_backend as load_backend

    backend = load_backend(params, base_model, adapter)
    for s in shards:
        sample_shard(backend, params, plan, s, work, progress=False)
    return shards


def _sample_todo(params: Params, base_model, adapter, plan: list[dict], todo: list[int], work: Path,
                 progress: bool) -> None:
    """Sample the shards `todo` in this process (`sample.workers` = 1) or in a pool of
    `sample.workers` processes (spawned; shards dealt round-robin, each worker loads the model once)."""
    workers = min(params.sample.workers, len(todo))
    if workers <= 1:
        from ipa_lib.stages.common import load_start_backend as load_backend

        backend = load_backend(params, base_model, adapter)
        for s in todo:
            sample_shard(backend, params, plan, s, work, progress)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    groups = [todo[i::workers] for i in range(workers)]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for done in pool.map(_sample_worker, *zip(*[(params, base_model, adapter, plan, g, work) for g in groups])):
            log.info("sample: shards %s done", done)


def sample_cases(params: Params, out_dir: str | Path, base_model: str | None = None, adapter: str | None = None,
                 progress: bool = True) -> dict:
    from ipa_lib.data.cases import load_case

    out_dir = Path(out_dir)
    rows, train, plan, report = _cases_plan(params, out_dir)
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
        _sample_todo(params, base_model, adapter, plan, todo, work, progress)
    summary = _write_store(out_dir, plan, rows, train, {s: work / shard_name(s) for s in shards},
                           {c["case_id"]: work / CASES_DIR / f"{c['case_id']}.npz" for c in train}, report, len(done))
    shutil.rmtree(work.parent, ignore_errors=True)
    return summary


def _write_store(out_dir: Path, plan: list[dict], rows: list[dict], train: list[dict], shard_files: dict[int, Path],
                 condition_files: dict[str, Path], report: Path, resumed: int) -> dict:
    """Assemble the case clip store at `out_dir` (atomically) from finished shard files and
    per-case conditioning files; removes the scan's report files beside it."""
    from ipa_lib.core.io import atomic_dir, atomic_write_json
    from ipa_lib.data.cases import cases_of

    with atomic_dir(out_dir) as tmp:
        for s, path in sorted(shard_files.items()):
            _link_or_copy(path, tmp / shard_name(s))
        (tmp / CASES_DIR).mkdir()
        for case_id, path in sorted(condition_files.items()):
            shutil.copy2(path, tmp / CASES_DIR / f"{case_id}.npz")
        for ext in (".md", ".json"):
            shutil.copy(report.with_suffix(ext), tmp / f"cases-report{ext}")
        write_manifest(tmp, plan)
        atomic_write_json(tmp / "cases.json", rows)
        summary = {"source": "cases", "clips": len(plan), "cases": len(train), "shards": len(shard_files),
                   "resumed_shards": resumed, "refused_cases": {r["case_id"]: r["error"] for r in rows if not r["ok"]},
                   "splits": {s: len(cases_of(rows, s)) for s in ("train", "val", "test")}}  # fmt: skip
        atomic_write_json(tmp / "summary.json", summary)
    for ext in (".md", ".json"):
        report.with_suffix(ext).unlink(missing_ok=True)
    return summary


# ---- one shard per task, then a merge (the KFP fan-out) --------------------------------
# a shard folder: shard-NNN.npz + the conditioning of its cases (cases/<id>.npz) + SHARD_INFO;
# on the toy world, shard 0 is the whole toy store (shard-000.npz + manifest.jsonl)
SHARD_INFO = "shard.json"


def sample_one_shard(params: Params, shard: int, out_dir: str | Path, base_model: str | None = None,
                     adapter: str | None = None, progress: bool = True) -> dict:
    """Sample shard `shard` of the clip store into the folder `out_dir`, independently of the
    other shards (one KFP pod each); `merge_shards` assembles the store from the folders."""
    from ipa_lib.core.io import atomic_dir, atomic_write_json
    from ipa_lib.data.cases import load_case
    from ipa_lib.data.clip_store import read_manifest
    from ipa_lib.stages.common import load_start_backend as load_backend

    out_dir = Path(out_dir)
    expected = shard_indices(params)
    if shard not in expected:
        raise InputError(f"shard {shard}: not a shard of this clip store (sample.shards={params.sample.shards}, "
                         f"{'cases' if params.on_cases else 'toy world: one shard'}: {expected})")
    if not params.on_cases:
        with atomic_dir(out_dir) as tmp:
            result = sample(params, tmp / "store", base_model, adapter, progress)
            for f in (tmp / "store").iterdir():
                f.rename(tmp / f.name)
            (tmp / "store").rmdir()
            atomic_write_json(tmp / SHARD_INFO, {"shard": 0, "source": "toy", "summary": result,
                                                 "sample_ids": [r["sample_id"] for r in read_manifest(tmp)]})
        return {"shard": 0, "clips": result["clips"]}
    _, train, plan, report = _cases_plan(params, out_dir)
    for ext in (".md", ".json"):
        report.with_suffix(ext).unlink(missing_ok=True)
    mine = [r for r in plan if r["shard"] == shard]
    with atomic_dir(out_dir) as tmp:
        by_id = {c["case_id"]: c for c in train}
        for case_id in sorted({r["case_id"] for r in mine}):
            save_conditions(tmp, case_id, load_case(by_id[case_id]["path"], params.data))
        if mine:  # a shard past the clip count is empty (the merge says so)
            sample_shard(load_backend(params, base_model, adapter), params, plan, shard, tmp, progress)
        atomic_write_json(tmp / SHARD_INFO, {"shard": shard, "source": "cases",
                                             "key": work_key(params, train, base_model, adapter),
                                             "sample_ids": [r["sample_id"] for r in mine]})
    return {"shard": shard, "clips": len(mine)}


def _shard_infos(params: Params, shard_dirs: list[str | Path]) -> dict[int, tuple[Path, dict]]:
    """shard index -> (folder, info), checked: every shard of the store present exactly once."""
    from ipa_lib.data.clip_store import read_shard_infos

    found = read_shard_infos(shard_dirs, SHARD_INFO, "sampled shard")
    expected = shard_indices(params)
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected), key=str)
    if missing or extra:
        raise InputError(f"sample.shards={params.sample.shards}: expected shards {expected}, got {sorted(found, key=str)}"
                         + (f"; missing {missing}" if missing else "") + (f"; not of this store {extra}" if extra else "")
                         + " (a package compiled for another shard count: recompile)")
    ids: dict[str, int] = {}
    for s, (folder, info) in sorted(found.items()):
        for sid in info["sample_ids"]:
            if sid in ids:
                raise InputError(f"duplicate clip id {sid!r} in shards {ids[sid]} and {s} ({folder})")
            ids[sid] = s
    return found


def merge_shards(params: Params, shard_dirs: list[str | Path], out_dir: str | Path, base_model: str | None = None,
                 adapter: str | None = None) -> dict:
    """Validate the sampled shard folders and assemble the clip store the gate reads: every
    shard present exactly once, no duplicate clip ids, every planned clip present (in its
    planned shard, sampled with the same params, data and model); the same store as `sample`."""
    from ipa_lib.core.io import atomic_dir

    out_dir = Path(out_dir)
    found = _shard_infos(params, shard_dirs)
    if not params.on_cases:
        folder, info = found[0]
        with atomic_dir(out_dir) as tmp:
            for f in sorted(folder.iterdir()):
                if f.name != SHARD_INFO:
                    shutil.copy2(f, tmp / f.name)
        return info["summary"]
    rows, train, plan, report = _cases_plan(params, out_dir)
    key = work_key(params, train, base_model, adapter)
    planned = {s: [r["sample_id"] for r in plan if r["shard"] == s] for s in found}
    for s, (folder, info) in sorted(found.items()):
        if info.get("key") != key:
            raise InputError(f"{folder}: shard {s} was sampled with other params, data or model (key {info.get('key')}, "
                             f"expected {key})")
        if info["sample_ids"] != planned[s]:
            lost = sorted(set(planned[s]) - set(info["sample_ids"]))
            raise InputError(f"{folder}: shard {s} holds clips {info['sample_ids']}, planned {planned[s]}"
                             + (f" (missing {lost})" if lost else ""))
        if planned[s]:
            import numpy as np

            with np.load(folder / shard_name(s)) as z:
                absent = sorted(set(planned[s]) - set(z.files))
            if absent:
                raise InputError(f"{folder / shard_name(s)}: clips {absent} missing from the shard file")
    conditions = {}
    for s, (folder, _) in sorted(found.items()):
        for path in sorted((folder / CASES_DIR).glob("*.npz")) if (folder / CASES_DIR).exists() else []:
            conditions.setdefault(path.stem, path)
    lost = sorted({c["case_id"] for c in train} - set(conditions))
    if lost:
        raise InputError(f"no shard carries the conditioning of train cases {lost}")
    return _write_store(out_dir, plan, rows, train,
                        {s: found[s][0] / shard_name(s) for s in sorted(found) if planned[s]}, conditions, report, 0)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem
        shutil.copy2(src, dst)
