"""Generation over any AnimationBackend: many clips with their own seeds, or one clip.

Used by the sample and evaluate stages and by the registered pyfunc model, so all three draw
the same clip for the same (reference, pose, seed).
"""

from __future__ import annotations

import numpy as np
import torch

from ipa_lib.core.errors import InputError


def condition_batch(reference: np.ndarray, pose: np.ndarray, conditions: dict[str, np.ndarray] | None = None) -> dict:
    """Stored conditioning (uint8 arrays, channels last) -> the backend batch convention.

    reference (N, H, W, 3), pose (N, F, H, W, 3); `conditions` may add face (N, F, S, S, 3),
    background (N, F, H, W, 3) and replace_mask (N, F, H, W) in [0, 1] (wan-animate)."""
    import torch

    from ipa_lib.data.tensors import image_to_tensor, video_to_tensor

    batch = {"reference": image_to_tensor(reference), "pose": video_to_tensor(pose)}
    for key, value in (conditions or {}).items():
        if key in ("face", "background"):
            batch[key] = video_to_tensor(value)
        elif key == "replace_mask":
            batch[key] = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
        else:
            raise InputError(f"unknown conditioning {key!r} (valid: face, background, replace_mask)")
    return batch


def generate_clips(backend, reference: np.ndarray, pose: np.ndarray, seeds: list[int], num_inference_steps: int,
                   batch_size: int, progress: bool = True, desc: str = "sample",
                   conditions: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """Animate each (reference[i], pose[i]) with its own seed: (N, F, H, W, 3) uint8.
    `conditions`: per-clip face / background / replace_mask arrays (see `condition_batch`)."""
    from tqdm.auto import tqdm

    from ipa_lib.data.tensors import tensor_to_video

    out = []
    for lo in tqdm(range(0, len(seeds), batch_size), desc=desc, disable=not progress, leave=False):
        hi = min(lo + batch_size, len(seeds))
        batch = condition_batch(reference[lo:hi], pose[lo:hi], {k: v[lo:hi] for k, v in (conditions or {}).items()})
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds[lo:hi]]
        out.append(tensor_to_video(backend.generate(batch, gens, num_inference_steps)))
    return np.concatenate(out)


def animate(backend, reference: np.ndarray, pose_video: np.ndarray, *, seed: int, num_inference_steps: int,
            conditions: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """One clip: reference (H, W, 3) uint8 + pose video (F, H, W, 3) uint8 -> (F, H, W, 3) uint8.
    `conditions`: this clip's face (F, S, S, 3) / background (F, H, W, 3) / replace_mask (F, H, W)."""
    if reference.ndim != 3 or pose_video.ndim != 4 or reference.shape[:2] != pose_video.shape[1:3]:
        raise InputError(f"reference must be (H, W, 3) and pose_video (F, H, W, 3) of the same size, got {reference.shape} and {pose_video.shape}")
    extra = {k: np.asarray(v)[None] for k, v in (conditions or {}).items()}
    return generate_clips(backend, reference[None], pose_video[None], [seed], num_inference_steps, 1, progress=False,
                          conditions=extra)[0]
