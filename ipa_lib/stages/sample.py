"""Sample stage: the current model animates many (reference, driving pose) pairs.

Toy default: driving pose p comes from toy-world seed `sample.seed + p` (its reference
image, pose video and hand keypoints; never its ground-truth frames), and each pose is
animated `per_pose` times with generator seeds `sample.seed * 1000 + i`. Output: one
compressed shard plus `manifest.jsonl` (one row per clip). With `sample.videos_dir` set the
stage indexes a folder of real videos instead (gated by the MediaPipe scorer).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ipa_lib.core.config import Params

SHARD = "shard-000.npz"


def toy_conditions(first_seed: int, count: int, frames: int, size: int, motion: float) -> dict[str, np.ndarray]:
    """Reference images, pose videos and hand keypoints of `count` clean toy clips."""
    from ipa_lib.data.toyworld import make_clip

    clips = [make_clip(first_seed + i, frames, size, corrupt=False, motion=motion) for i in range(count)]
    return {
        "reference": np.stack([c.reference for c in clips]),
        "pose": np.stack([c.pose for c in clips]),
        "hand_keypoints": np.stack([c.hand_keypoints for c in clips]),
        "target": np.stack([c.video for c in clips]),  # ground truth: evaluation only
    }


def generate_clips(backend, reference: np.ndarray, pose: np.ndarray, seeds: list[int], num_inference_steps: int,
                   batch_size: int, progress: bool = True, desc: str = "sample") -> np.ndarray:
    """Animate each (reference[i], pose[i]) with its own seed: (N, F, H, W, 3) uint8."""
    from tqdm.auto import tqdm

    from ipa_lib.data.tensors import image_to_tensor, tensor_to_video, video_to_tensor

    out = []
    for lo in tqdm(range(0, len(seeds), batch_size), desc=desc, disable=not progress, leave=False):
        hi = min(lo + batch_size, len(seeds))
        batch = {"reference": image_to_tensor(reference[lo:hi]), "pose": video_to_tensor(pose[lo:hi])}
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds[lo:hi]]
        out.append(tensor_to_video(backend.generate(batch, gens, num_inference_steps)))
    return np.concatenate(out)


def animate(backend, reference: np.ndarray, pose_video: np.ndarray, *, seed: int, num_inference_steps: int) -> np.ndarray:
    """One clip: reference (H, W, 3) uint8 + pose video (F, H, W, 3) uint8 -> (F, H, W, 3) uint8."""
    if reference.ndim != 3 or pose_video.ndim != 4 or reference.shape[:2] != pose_video.shape[1:3]:
        raise ValueError(f"reference must be (H, W, 3) and pose_video (F, H, W, 3) of the same size, got {reference.shape} and {pose_video.shape}")
    return generate_clips(backend, reference[None], pose_video[None], [seed], num_inference_steps, 1, progress=False)[0]


def sample(params: Params, out_dir: str | Path, base_model: str | None = None, adapter: str | None = None,
           progress: bool = True) -> dict:
    from ipa_lib.stages.common import load_start_backend as load_backend
    from ipa_lib.core.io import atomic_dir, save_npz

    cfg, toy = params.sample, params.toy
    if cfg.videos_dir:
        from ipa_lib.data.realvideos import index_videos

        with atomic_dir(out_dir) as tmp:
            rows, summary = index_videos(cfg.videos_dir, str(tmp))
            _write_manifest(tmp, rows)
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
        _write_manifest(tmp, rows)
    return {"source": "toy", "clips": len(rows), "poses": n_poses}


def _write_manifest(folder: Path, rows: list[dict]) -> None:
    (folder / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def read_manifest(folder: str | Path) -> list[dict]:
    path = Path(folder) / "manifest.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path}: sample manifest not found (run the sample stage first)")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n}: not valid JSON ({err})") from None
    return rows
