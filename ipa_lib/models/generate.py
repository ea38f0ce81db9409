"""Generation over any AnimationBackend: many clips with their own seeds, or one clip.

Used by the sample and evaluate stages and by the registered pyfunc model, so all three draw
the same clip for the same (reference, pose, seed).
"""

from __future__ import annotations

import numpy as np
import torch

from ipa_lib.core.errors import InputError


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
        raise InputError(f"reference must be (H, W, 3) and pose_video (F, H, W, 3) of the same size, got {reference.shape} and {pose_video.shape}")
    return generate_clips(backend, reference[None], pose_video[None], [seed], num_inference_steps, 1, progress=False)[0]
