"""Sample stage: the current model animates many (reference, driving pose) pairs.

Toy default: driving pose p comes from toy-world seed `sample.seed + p` (its reference
image, pose video and hand keypoints; never its ground-truth frames), and each pose is
animated `per_pose` times with generator seeds `sample.seed * 1000 + i`. Output: one
compressed shard plus `manifest.jsonl` (one row per clip). With `sample.videos_dir` set the
stage indexes a folder of real videos instead (gated by the MediaPipe scorer).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ipa_lib.core.config import Params
from ipa_lib.data.clip_store import SHARD, write_manifest
from ipa_lib.data.toyworld import toy_conditions
from ipa_lib.models.generate import generate_clips


def sample(params: Params, out_dir: str | Path, base_model: str | None = None, adapter: str | None = None,
           progress: bool = True) -> dict:
    from ipa_lib.stages.common import load_start_backend as load_backend
    from ipa_lib.core.io import atomic_dir, save_npz

    cfg, toy = params.sample, params.toy
    if cfg.videos_dir:
        from ipa_lib.data.realvideos import index_videos

        with atomic_dir(out_dir) as tmp:
            rows, summary = index_videos(cfg.videos_dir, str(tmp))
            write_manifest(tmp, rows)
        return {"source": "videos", **summary}

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


