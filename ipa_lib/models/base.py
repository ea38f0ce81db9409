"""The backend seam: what the training loop, sampler and evaluator need from an animator.

The objective never knows which backend it runs on. A backend wraps a diffusers
transformer that predicts the flow-matching velocity (Wan convention:
x_t = (1 - t) x0 + t e, v = e - x0, t in [0, 1]).

Batch convention (all backends), a dict of tensors on any device:
    "video":     (B, 3, F, H, W) float in [-1, 1]   clip to learn from (training only)
    "reference": (B, 3, H, W)    float in [-1, 1]   reference image (identity/appearance)
    "pose":      (B, 3, F, H, W) float in [-1, 1]   rendered driving-pose video
    "hand_mask": (B, F, H, W)    float in [0, 1]    pixel-space hand mask from the driving pose
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class AnimationBackend(Protocol):
    name: str
    transformer: torch.nn.Module  # the network LoRA is added to (peft-wrapped after add_lora)
    device: torch.device
    dtype: torch.dtype

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """(B, 3, F, H, W) in [-1, 1] -> clean latents x0 (B, C, f, h, w)."""

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> (B, 3, F, H, W) in [-1, 1]."""

    def condition(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Everything the transformer needs besides x_t and t (encoded reference, pose, text)."""

    def predict_velocity(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """x_t (B, C, f, h, w), t (B,) in [0, 1] -> predicted velocity, same shape as x_t."""

    def mask_to_latent(self, hand_mask: torch.Tensor) -> torch.Tensor:
        """Pixel mask (B, F, H, W) -> latent-grid mask (B, f, h, w) (max-pool, Wan rule)."""

    @torch.no_grad()
    def generate(
        self, batch: dict[str, torch.Tensor], generator: torch.Generator, num_inference_steps: int
    ) -> torch.Tensor:
        """Animate `reference` along `pose`: returns (B, 3, F, H, W) in [-1, 1]."""

    def add_lora(self, rank: int, alpha: int, targets: list[str]) -> None:
        """Wrap `transformer` with a peft LoRA adapter; raise ValueError if targets match nothing."""

    def reference_model(self) -> AbstractContextManager[None]:
        """Context in which `predict_velocity` is the frozen starting model (adapters disabled)."""

    def save_adapter(self, path: str | Path) -> None:
        """Adapter weights only, in the diffusers/peft LoRA format."""

    def load_adapter(self, path: str | Path) -> None:
        """Load adapter weights saved by `save_adapter` (and check they change the output)."""
