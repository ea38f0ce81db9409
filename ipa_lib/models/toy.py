"""The embedded default backend: a tiny diffusers `WanTransformer3DModel` on pixel "latents".

The toy VAE is the identity (clips are 32x32, small enough to model in pixel space), so
the latent grid is the pixel grid and the hand mask maps with temporal/spatial factor 1.
Conditioning follows Wan-Animate's idea in miniature: the rendered pose video and the
reference image (broadcast over frames) are concatenated to the noisy latents along
channels; the text stream is a constant null prompt.
"""

from __future__ import annotations

import json
from contextlib import AbstractContextManager
from pathlib import Path

import torch

from ipa_lib.models import lora

TOY_CONFIG = "toy_backend.json"


def build_transformer(model_cfg, seed: int = 0):
    """A fresh random toy animator (9 input channels: noisy video, pose, reference)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    heads = model_cfg.num_attention_heads
    return WanTransformer3DModel(
        patch_size=tuple(model_cfg.patch_size),
        num_attention_heads=heads,
        attention_head_dim=model_cfg.attention_head_dim,
        in_channels=9,
        out_channels=3,
        text_dim=model_cfg.text_dim,
        freq_dim=model_cfg.freq_dim,
        ffn_dim=model_cfg.ffn_dim,
        num_layers=model_cfg.num_layers,
        rope_max_seq_len=64,
    )


class ToyBackend:
    name = "toy"

    def __init__(self, transformer: torch.nn.Module, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        self.device = torch.device(device)
        self.dtype = dtype
        # cast only when asked: diffusers keeps norms/rope in float32 on its own
        self.transformer = transformer.to(self.device) if dtype == torch.float32 else transformer.to(self.device, dtype)
        self.transformer.eval()
        self.text_dim = transformer.config.text_dim

    # ---- persistence (diffusers layout: <dir>/transformer + a small json) -------------
    @classmethod
    def from_pretrained(cls, path: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32) -> "ToyBackend":
        from diffusers import WanTransformer3DModel

        path = Path(path)
        if not (path / "transformer" / "config.json").exists():
            raise FileNotFoundError(
                f"{path}: not a toy base model (no transformer/config.json); run `ipa pretrain` or `dvc repro pretrain`"
            )
        try:
            transformer = WanTransformer3DModel.from_pretrained(path / "transformer")
        except Exception as err:  # corrupt or truncated weights
            raise ValueError(f"{path / 'transformer'}: cannot load weights: {err}") from None
        return cls(transformer, device, dtype)

    def save_pretrained(self, path: str | Path, extra: dict | None = None) -> None:
        path = Path(path)
        self.transformer.save_pretrained(path / "transformer")
        (path / TOY_CONFIG).write_text(json.dumps({"backend": "toy", **(extra or {})}, indent=2))

    # ---- the AnimationBackend protocol ------------------------------------------------
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        return video.to(self.device, self.dtype)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents.clamp(-1.0, 1.0)

    def condition(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        pose = batch["pose"].to(self.device, self.dtype)  # (B, 3, F, H, W)
        ref = batch["reference"].to(self.device, self.dtype)  # (B, 3, H, W)
        if pose.ndim != 5 or ref.ndim != 4 or pose.shape[-2:] != ref.shape[-2:]:
            raise ValueError(f"pose must be (B, 3, F, H, W) and reference (B, 3, H, W) of one size, got {tuple(pose.shape)} and {tuple(ref.shape)}")
        ref = ref[:, :, None].expand(-1, -1, pose.shape[2], -1, -1)
        text = torch.zeros(pose.shape[0], 1, self.text_dim, device=self.device, dtype=self.dtype)
        return {"channels": torch.cat([pose, ref], dim=1), "text": text}

    def predict_velocity(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = torch.cat([x_t, cond["channels"]], dim=1)  # (B, 9, F, H, W)
        # Wan embeds timesteps on the 0..1000 scale of its scheduler
        return self.transformer(hidden, timestep=t * 1000.0, encoder_hidden_states=cond["text"], return_dict=False)[0]

    def mask_to_latent(self, hand_mask: torch.Tensor) -> torch.Tensor:
        from ipa_lib.data.hands.masks import pixel_mask_to_latent

        return pixel_mask_to_latent(hand_mask.to(self.device, torch.float32), temporal_factor=1, spatial_factor=1, require_4k1=False)

    @torch.no_grad()
    def generate(self, batch: dict[str, torch.Tensor], generator: torch.Generator | list[torch.Generator], num_inference_steps: int) -> torch.Tensor:
        """Euler integration of the flow from t=1 (noise) to t=0; one generator per sample keeps
        each clip independent of how samples are batched."""
        cond = self.condition(batch)
        b, _, f, h, w = cond["channels"].shape
        gens = generator if isinstance(generator, list) else [generator] * b
        x = torch.stack([torch.randn(3, f, h, w, generator=g) for g in gens]).to(self.device, self.dtype)
        ts = torch.linspace(1.0, 0.0, num_inference_steps + 1)
        for t0, t1 in zip(ts[:-1], ts[1:]):
            v = self.predict_velocity(x, torch.full((b,), float(t0), device=self.device, dtype=self.dtype), cond)
            x = x + (t1 - t0) * v  # dt < 0: x_{t1} = x_{t0} - |dt| v
        return self.decode(x)

    def add_lora(self, rank: int, alpha: int, targets: list[str]) -> None:
        lora.add_lora(self.transformer, rank, alpha, targets)

    def reference_model(self) -> AbstractContextManager[None]:
        return lora.disabled_adapters(self.transformer)

    def save_adapter(self, path: str | Path) -> None:
        lora.save_lora(self.transformer, path)

    def load_adapter(self, path: str | Path) -> None:
        lora.load_lora(self.transformer, path)
