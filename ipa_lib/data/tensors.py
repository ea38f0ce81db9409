"""Clips as arrays (uint8, channels last, what is stored) <-> batches (float, what models eat)."""

from __future__ import annotations

import numpy as np
import torch


def video_to_tensor(video: np.ndarray) -> torch.Tensor:
    """(N, F, H, W, 3) uint8 -> (N, 3, F, H, W) float32 in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(video)).permute(0, 4, 1, 2, 3).float().div(127.5).sub(1.0)


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def tensor_to_video(x: torch.Tensor) -> np.ndarray:
    """(N, 3, F, H, W) in [-1, 1] -> (N, F, H, W, 3) uint8."""
    x = ((x.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 4, 1).cpu().numpy()


def hand_masks(hand_keypoints: np.ndarray, height: int, width: int) -> np.ndarray:
    """(N, F, 2, 21, 3) driving-pose hand keypoints -> (N, F, H, W) float32 pixel masks."""
    from ipa_lib.data.hands.masks import keypoints_mask

    return np.stack([keypoints_mask(k, height, width) for k in hand_keypoints]).astype(np.float32)


def make_batch(arrays: dict[str, np.ndarray], idx: np.ndarray, masks: np.ndarray | None = None) -> dict[str, torch.Tensor]:
    """Select rows `idx` of stored arrays and convert them to the backend batch convention."""
    batch = {
        "reference": image_to_tensor(arrays["reference"][idx]),
        "pose": video_to_tensor(arrays["pose"][idx]),
    }
    if "video" in arrays:
        batch["video"] = video_to_tensor(arrays["video"][idx])
    if masks is not None:
        batch["hand_mask"] = torch.from_numpy(masks[idx])
    return batch
