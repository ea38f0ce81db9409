"""`wan-animate`: the AnimationBackend over diffusers' `WanAnimatePipeline` (Wan2.2-Animate).

Generation reuses the stock pipeline (one call per clip: the pipeline takes one reference
image per call). Training wraps only the transformer's forward, with conditioning built by
the pipeline's own `prepare_*` methods from the same inputs generation sees, so the model is
trained on exactly the conditioning it is sampled with.

Latent layout (Wan-Animate, diffusers 0.42):
    pixels  (B, 3, F, H, W), F = 4k + 1, H and W multiples of 16
    x0      (B, 16, f, h, w), f = 1 + (F - 1) // 4, h = H / 8, w = W / 8  (normalised VAE latents)
    transformer input (B, 36, 1 + f, h, w):
        channels  [noisy latents (16) | i2v mask (4) | conditioning latents (16)]
        frames    [reference slot | f video frames]
    The reference slot carries the reference image: its conditioning channels hold the
    clean reference latent (mask 1); its noisy channels, which the pipeline starts from
    noise and discards after decoding, are noised at the same t during training
    ((1 - t) ref + t e_ref, e_ref fixed per `condition` call so policy and reference see the
    same input). The velocity returned is for the f video frames only.
    Pose latents (B, 16, f, h, w) are added to the patch embeddings of the video frames; the
    face video (B, 3, F, S, S), S = motion_encoder_size (512), drives the face adapter.

Batch keys beyond base.py's convention (all optional):
    "face":          (B, 3, F, S', S') in [-1, 1]  face crops; absent = blank face (all -1),
                     the pipeline's own unconditional face
    "background":    (B, 3, F, H, W) in [-1, 1]   replacement mode: the scene to insert into
    "replace_mask":  (B, F, H, W) in [0, 1]       replacement mode: 1 where the character goes
"""

from __future__ import annotations

import json
import re
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch

from ipa_lib.core.extras import require
from ipa_lib.models import lora as lora_lib

__all__ = ["WanAnimateBackend", "cast_keeping_fp32", "check_frames", "resolve_device", "resolve_dtype"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
NUM_TRAIN_TIMESTEPS = 1000  # Wan: timestep = t * 1000, sigma = t


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"backend.device={name!r} but CUDA is not available on this machine")
    return torch.device(name)


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in _DTYPES:
        raise ValueError(f"backend.dtype must be one of {sorted(_DTYPES)}, got {name!r}")
    return _DTYPES[name]


def check_frames(num_frames: int, what: str = "clip") -> None:
    """Wan's VAE compresses time 4x with the first frame alone: F must be 4k + 1."""
    if num_frames < 1 or (num_frames - 1) % 4:
        lo = max(1, (num_frames - 1) // 4 * 4 + 1)
        raise ValueError(
            f"{what} has {num_frames} frames, but Wan-Animate needs 4k+1 frames (1, 5, 9, ..., 77, 81); "
            f"nearest valid: {lo} or {lo + 4}"
        )


def cast_keeping_fp32(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast to `dtype` except the submodules a diffusers model keeps in float32 (`_keep_in_fp32_modules`:
    rope, time embedder, norms, scale_shift_table), as `from_pretrained(dtype=...)` does."""
    keep = set(getattr(module, "_keep_in_fp32_modules", None) or [])
    if not keep or dtype == torch.float32:
        module.to(dtype)
        return
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        if t.is_floating_point() and not keep.intersection(name.split(".")):
            t.data = t.data.to(dtype)


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def _pil(img: torch.Tensor):
    """(3, H, W) in [-1, 1] -> PIL RGB image."""
    from PIL import Image

    return Image.fromarray(_to_uint8(img).permute(1, 2, 0).numpy())


def _pil_frames(video: torch.Tensor) -> list:
    """(3, F, H, W) in [-1, 1] -> list of F PIL images."""
    return [_pil(video[:, i]) for i in range(video.shape[1])]


def _pil_mask_frames(mask: torch.Tensor) -> list:
    """(F, H, W) in [0, 1] -> list of F greyscale PIL images (255 = 1)."""
    from PIL import Image

    m = (mask.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    return [Image.fromarray(m[i].numpy(), mode="L").convert("RGB") for i in range(m.shape[0])]


def _load_pipeline(path_or_id: str, dtype: torch.dtype):
    """`WanAnimatePipeline.from_pretrained` with errors that name the problem."""
    require("transformers", "ftfy", extra="wan", purpose="the wan-animate backend")
    from diffusers import WanAnimatePipeline

    p = Path(path_or_id).expanduser()
    if p.exists():
        if not p.is_dir():
            raise ValueError(f"wan-animate base model {path_or_id!r} is a file; expected a diffusers pipeline folder")
        index = p / "model_index.json"
        if not index.is_file():
            raise ValueError(
                f"wan-animate base model {path_or_id!r} is not a diffusers pipeline folder (no model_index.json); "
                "use e.g. the Wan-AI/Wan2.2-Animate-14B-Diffusers layout"
            )
        cls_name = json.loads(index.read_text()).get("_class_name")
        if cls_name != "WanAnimatePipeline":
            raise ValueError(f"wan-animate base model {path_or_id!r} holds a {cls_name}, not a WanAnimatePipeline")
        try:
            return WanAnimatePipeline.from_pretrained(str(p), dtype=dtype)
        except Exception as err:  # missing component folder, truncated weights, ...
            raise ValueError(f"wan-animate base model {path_or_id!r} cannot be loaded: {type(err).__name__}: {err}") from err
    looks_local = str(path_or_id).startswith(("/", "./", "../", "~")) or not _HUB_ID.match(str(path_or_id))
    if looks_local:
        raise FileNotFoundError(f"wan-animate base model path {path_or_id!r} does not exist")
    try:
        return WanAnimatePipeline.from_pretrained(str(path_or_id), dtype=dtype)
    except Exception as err:  # hub/network errors come in many classes
        raise FileNotFoundError(
            f"wan-animate base model {path_or_id!r}: no such local folder, and loading it as a Hugging Face hub id "
            f"failed ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
        ) from err


class WanAnimateBackend:
    """AnimationBackend for Wan2.2-Animate through diffusers (see module docstring for layouts).

    Build with `from_pretrained(path_or_id, cfg)` (a local diffusers folder or a hub id) or
    `tiny(cfg)` (random tiny model for tests). Precision: transformer and encoders in
    `cfg.dtype` (bf16 on GPU), the VAE in float32, LoRA weights in float32; the transformer
    forward runs under autocast when `cfg.dtype` is not float32 (what accelerate's
    `mixed_precision="bf16"` does), so a training loop wrapped in an `Accelerator` sees the
    same numerics.
    """

    name = "wan-animate"

    def __init__(
        self,
        pipe,
        *,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = torch.float32,
        gradient_checkpointing: bool = False,
        guidance_scale: float = 1.0,
        prompt: str = "",
        negative_prompt: str = "",
        max_sequence_length: int = 512,
        seed: int = 0,
    ):
        self.pipe = pipe
        self.device = torch.device(device)
        self.dtype = resolve_dtype(dtype)
        self.guidance_scale = float(guidance_scale)
        self.prompt = prompt
        self.negative_prompt = negative_prompt
        self.max_sequence_length = int(max_sequence_length)
        self._noise_gen = torch.Generator(device="cpu").manual_seed(seed)
        self._cache: dict[Any, torch.Tensor] = {}

        pipe.set_progress_bar_config(disable=True)
        for m, dt in ((pipe.text_encoder, self.dtype), (pipe.image_encoder, self.dtype),
                      (pipe.transformer, self.dtype), (pipe.vae, torch.float32)):
            m.to(self.device)
            if m.dtype != dt:  # from_pretrained(dtype=) already did it
                cast_keeping_fp32(m, dt)
            m.eval().requires_grad_(False)
        if gradient_checkpointing:
            pipe.transformer.enable_gradient_checkpointing()
        tcfg = pipe.transformer.config
        self.latent_channels = int(pipe.vae.config.z_dim)
        self.t_factor = int(pipe.vae_scale_factor_temporal)
        self.s_factor = int(pipe.vae_scale_factor_spatial)
        self.patch = tuple(tcfg.patch_size)
        self.face_size = int(tcfg.motion_encoder_size)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_pretrained(cls, path_or_id: str, cfg=None, **kwargs) -> "WanAnimateBackend":
        """Load `WanAnimatePipeline` from a local folder or hub id; `cfg` is a BackendConfig."""
        device, dtype, extra = cls._from_cfg(cfg)
        extra.update(kwargs)
        pipe = _load_pipeline(path_or_id, dtype)
        return cls(pipe, device=device, dtype=dtype, **extra)

    @classmethod
    def tiny(cls, cfg=None, seed: int = 0, **kwargs) -> "WanAnimateBackend":
        """The tiny random pipeline of `wan_tiny` (same classes, few layers), for tests and smoke runs."""
        from ipa_lib.models.wan_tiny import TINY_TEXT_LEN, tiny_pipeline

        device, dtype, extra = cls._from_cfg(cfg)
        extra.setdefault("max_sequence_length", TINY_TEXT_LEN)
        extra.update(kwargs)
        return cls(tiny_pipeline(seed), device=device, dtype=dtype, seed=seed, **extra)

    @staticmethod
    def _from_cfg(cfg) -> tuple[torch.device, torch.dtype, dict]:
        if cfg is None:
            return torch.device("cpu"), torch.float32, {}
        extra = {"gradient_checkpointing": bool(cfg.gradient_checkpointing), "guidance_scale": float(cfg.guidance_scale)}
        for key in ("prompt", "negative_prompt", "max_sequence_length"):
            if getattr(cfg, key, None) is not None:
                extra[key] = getattr(cfg, key)
        return resolve_device(cfg.device), resolve_dtype(cfg.dtype), extra

    @property
    def transformer(self) -> torch.nn.Module:
        return self.pipe.transformer

    @transformer.setter
    def transformer(self, module: torch.nn.Module) -> None:
        """The training loop swaps in the distributed (DDP/FSDP) wrapper and back (`stages.train`)."""
        self.pipe.transformer = module

    @property
    def vae(self):
        return self.pipe.vae

    # ------------------------------------------------------------------ checks

    def check_video(self, video: torch.Tensor, name: str = "video") -> tuple[int, int, int, int]:
        """(B, 3, F, H, W) with F = 4k+1 and H, W multiples of 16; returns (B, F, H, W)."""
        if video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(f"{name} must be (B, 3, F, H, W), got shape {tuple(video.shape)}")
        B, _, F, H, W = video.shape
        check_frames(F, name)
        if H % 16 or W % 16:
            raise ValueError(f"{name} is {H}x{W} pixels; Wan-Animate needs height and width divisible by 16")
        return B, F, H, W

    def latent_shape(self, B: int, F: int, H: int, W: int) -> tuple[int, int, int, int, int]:
        return (B, self.latent_channels, 1 + (F - 1) // self.t_factor, H // self.s_factor, W // self.s_factor)

    def _check_batch(self, batch: dict[str, torch.Tensor]) -> tuple[int, int, int, int]:
        for key in ("reference", "pose"):
            if key not in batch:
                raise ValueError(f"batch has no {key!r}; got keys {sorted(batch)}")
        B, F, H, W = self.check_video(batch["pose"], "pose")
        ref = batch["reference"]
        if tuple(ref.shape) != (B, 3, H, W):
            raise ValueError(f"reference must be (B, 3, H, W) = {(B, 3, H, W)} to match pose, got {tuple(ref.shape)}")
        if "video" in batch and tuple(batch["video"].shape) != (B, 3, F, H, W):
            raise ValueError(f"video shape {tuple(batch['video'].shape)} != pose shape {(B, 3, F, H, W)}")
        if "hand_mask" in batch and tuple(batch["hand_mask"].shape) != (B, F, H, W):
            raise ValueError(
                f"hand_mask must be (B, F, H, W) = {(B, F, H, W)} to match the clip, got {tuple(batch['hand_mask'].shape)}"
            )
        if "face" in batch:
            face = batch["face"]
            if face.ndim != 5 or face.shape[:3] != (B, 3, F):
                raise ValueError(f"face must be (B, 3, F, S, S) with B={B}, F={F}, got {tuple(face.shape)}")
        if ("background" in batch) != ("replace_mask" in batch):
            raise ValueError("replacement mode needs both 'background' and 'replace_mask' in the batch")
        if "background" in batch:
            if tuple(batch["background"].shape) != (B, 3, F, H, W):
                raise ValueError(f"background must be {(B, 3, F, H, W)}, got {tuple(batch['background'].shape)}")
            if tuple(batch["replace_mask"].shape) != (B, F, H, W):
                raise ValueError(f"replace_mask must be {(B, F, H, W)}, got {tuple(batch['replace_mask'].shape)}")
        return B, F, H, W

    # ------------------------------------------------------------------ VAE

    def _latent_stats(self, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.vae.config
        mean = torch.tensor(c.latents_mean, device=device, dtype=dtype).view(1, c.z_dim, 1, 1, 1)
        std = torch.tensor(c.latents_std, device=device, dtype=dtype).view(1, c.z_dim, 1, 1, 1)
        return mean, std

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """(B, 3, F, H, W) in [-1, 1] -> normalised latents (B, 16, 1 + (F-1)/4, H/8, W/8), float32."""
        self.check_video(video)
        x = video.to(self.device, torch.float32)
        latents = self.vae.encode(x).latent_dist.mode()  # deterministic, as the pipeline's "argmax"
        mean, std = self._latent_stats(latents.device, latents.dtype)
        return (latents - mean) / std

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents (B, 16, f, h, w) -> (B, 3, 4(f-1)+1, 8h, 8w) in [-1, 1]."""
        if latents.ndim != 5 or latents.shape[1] != self.latent_channels:
            raise ValueError(f"latents must be (B, {self.latent_channels}, f, h, w), got {tuple(latents.shape)}")
        z = latents.to(self.device, torch.float32)
        mean, std = self._latent_stats(z.device, z.dtype)
        return self.vae.decode(z * std + mean, return_dict=False)[0].clamp(-1, 1)

    # ------------------------------------------------------------------ conditioning

    def _text(self, negative: bool = False) -> torch.Tensor:
        key = ("neg" if negative else "pos", str(self.device))
        if key not in self._cache:
            with torch.no_grad():
                emb, _ = self.pipe.encode_prompt(
                    prompt=self.negative_prompt if negative else self.prompt,
                    do_classifier_free_guidance=False,
                    max_sequence_length=self.max_sequence_length,
                    device=self.device,
                    dtype=self.dtype,
                )
            self._cache[key] = emb
        return self._cache[key]

    def _face_pixels(self, batch: dict[str, torch.Tensor], B: int, F: int) -> torch.Tensor:
        """(B, 3, F, S, S) in [-1, 1] as the pipeline would preprocess it (uint8 round trip, resize)."""
        if "face" not in batch:
            return torch.full((B, 3, F, self.face_size, self.face_size), -1.0, device=self.device, dtype=self.dtype)
        videos = [_pil_frames(batch["face"][b]) for b in range(B)]
        vp = self.pipe.video_processor
        face = torch.cat([vp.preprocess_video(v, height=self.face_size, width=self.face_size) for v in videos])
        return face.to(self.device, self.dtype)

    @torch.no_grad()
    def condition(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Reference image, pose video, face video (and background) -> transformer conditioning.

        Inputs go through the same uint8/PIL preprocessing as `generate`, so training sees the
        conditioning the model is sampled with. Returns:
            prompt_embeds (B, L, text_dim), image_embeds (B, N, image_dim) CLIP features,
            pose_latents (B, 16, f, h, w), face (B, 3, F, S, S),
            y (B, 20, 1+f, h, w) mask + conditioning latents (reference slot first),
            ref_x0, ref_noise (B, 16, 1, h, w) the reference slot's clean latent and its noise.
        """
        B, F, H, W = self._check_batch(batch)
        pipe, dev = self.pipe, self.device
        refs = [_pil(batch["reference"][b]) for b in range(B)]

        # 1. reference image: CLIP features and VAE latents (+ i2v mask = 1)
        image_embeds = pipe.encode_image(refs, dev).to(self.dtype)
        ref_pixels = pipe.vae_image_processor.preprocess(refs, height=H, width=W, resize_mode="fill").to(dev, torch.float32)
        ref_latents = pipe.prepare_reference_image_latents(ref_pixels, B, device=dev, dtype=torch.float32)  # (B, 20, 1, h, w)

        # 2. pose video -> latents
        pose_pixels = torch.cat(
            [pipe.video_processor.preprocess_video(_pil_frames(batch["pose"][b]), height=H, width=W) for b in range(B)]
        ).to(dev, torch.float32)
        pose_latents = pipe.prepare_pose_latents(pose_pixels, B, device=dev, dtype=torch.float32)

        # 3. conditioning latents of the video frames: zeros (animate) or the background (replace)
        if "background" in batch:
            bg = torch.cat(
                [pipe.video_processor.preprocess_video(_pil_frames(batch["background"][b]), height=H, width=W) for b in range(B)]
            ).to(dev, torch.float32)
            mask = torch.cat(
                [
                    pipe.video_processor_for_mask.preprocess_video(_pil_mask_frames(batch["replace_mask"][b]), height=H, width=W)
                    for b in range(B)
                ]
            ).to(dev, torch.float32)
            segment = pipe.prepare_prev_segment_cond_latents(
                None, background_video=bg, mask_video=mask, batch_size=B, segment_frame_length=F, start_frame=0,
                height=H, width=W, prev_segment_cond_frames=1, task="replace", device=dev, dtype=torch.float32,
            )
        else:
            key = ("animate", B, F, H, W, str(dev))
            if key not in self._cache:
                self._cache[key] = pipe.prepare_prev_segment_cond_latents(
                    None, batch_size=B, segment_frame_length=F, start_frame=0, height=H, width=W,
                    prev_segment_cond_frames=1, task="animate", device=dev, dtype=torch.float32,
                )
            segment = self._cache[key]
        y = torch.cat([ref_latents, segment], dim=2)  # (B, 20, 1 + f, h, w)

        ref_x0 = ref_latents[:, 4:]  # clean, normalised reference latent (B, 16, 1, h, w)
        ref_noise = torch.randn(ref_x0.shape, generator=self._noise_gen).to(dev, torch.float32)
        return {
            "prompt_embeds": self._text().expand(B, -1, -1),
            "image_embeds": image_embeds,
            "pose_latents": pose_latents.to(self.dtype),
            "face": self._face_pixels(batch, B, F),
            "y": y.to(self.dtype),
            "ref_x0": ref_x0,
            "ref_noise": ref_noise,
        }

    # ------------------------------------------------------------------ the trainable forward

    def _autocast(self) -> AbstractContextManager:
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def predict_velocity(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """x_t (B, 16, f, h, w), t (B,) in [0, 1] -> velocity (B, 16, f, h, w) in x_t's dtype."""
        pose = cond["pose_latents"]
        if x_t.ndim != 5 or tuple(x_t.shape) != tuple(pose.shape):
            raise ValueError(f"x_t shape {tuple(x_t.shape)} != conditioning latent shape {tuple(pose.shape)}")
        B = x_t.shape[0]
        if t.ndim != 1 or t.shape[0] != B:
            raise ValueError(f"t must have shape (B,) = ({B},), got {tuple(t.shape)}")
        tt = t.to(self.device, torch.float32).view(B, 1, 1, 1, 1)
        slot = (1 - tt) * cond["ref_x0"] + tt * cond["ref_noise"]  # reference slot, noised at the same t
        noisy = torch.cat([slot, x_t.to(self.device, torch.float32)], dim=2)
        hidden = torch.cat([noisy.to(self.dtype), cond["y"]], dim=1)  # (B, 36, 1 + f, h, w)
        with self._autocast():
            out = self.transformer(
                hidden_states=hidden,
                timestep=t.to(self.device, torch.float32) * NUM_TRAIN_TIMESTEPS,
                encoder_hidden_states=cond["prompt_embeds"],
                encoder_hidden_states_image=cond["image_embeds"],
                pose_hidden_states=cond["pose_latents"],
                face_pixel_values=cond["face"],
                return_dict=False,
            )[0]
        return out[:, :, 1:].to(x_t.dtype)

    def mask_to_latent(self, hand_mask: torch.Tensor) -> torch.Tensor:
        """Pixel mask (B, F, H, W) -> (B, 1 + (F-1)/4, H/8, W/8): max-pool, the first frame alone."""
        if hand_mask.ndim != 4:
            raise ValueError(f"hand_mask must be (B, F, H, W), got shape {tuple(hand_mask.shape)}")
        B, F, H, W = hand_mask.shape
        check_frames(F, "hand_mask")
        if H % self.s_factor or W % self.s_factor:
            raise ValueError(f"hand_mask is {H}x{W}; height and width must be multiples of {self.s_factor}")
        from ipa_lib.data.hands.masks import pixel_mask_to_latent

        return pixel_mask_to_latent(hand_mask.to(self.device, torch.float32), self.t_factor, self.s_factor)

    # ------------------------------------------------------------------ LoRA

    def add_lora(self, rank: int, alpha: int, targets: list[str]) -> None:
        lora_lib.add_lora(self.transformer, rank, alpha, list(targets))
        # trainable weights in float32 over a bf16 base (diffusers' cast_training_params)
        for p in lora_lib.lora_parameters(self.transformer):
            p.data = p.data.to(torch.float32)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in lora_lib.lora_parameters(self.transformer) if p.requires_grad]

    def reference_model(self) -> AbstractContextManager[None]:
        return lora_lib.disabled_adapters(self.transformer)

    def save_adapter(self, path: str | Path) -> None:
        lora_lib.save_lora(self.transformer, path, prefix="transformer")

    def load_adapter(self, path: str | Path, *, check: bool = True) -> None:
        """Load adapter weights; with `check`, fail if they leave the output unchanged."""
        lora_lib.load_lora(self.transformer, path, prefix="transformer")
        for p in lora_lib.lora_parameters(self.transformer):
            p.data = p.data.to(torch.float32)
        if check:
            probe = self._probe_batch()
            cond = self.condition(probe)
            x = torch.randn(self.latent_shape(1, 5, 32, 32), generator=torch.Generator().manual_seed(0)).to(self.device)
            t = torch.full((1,), 0.5, device=self.device)
            with torch.no_grad():
                on = self.predict_velocity(x, t, cond)
                with self.reference_model():
                    off = self.predict_velocity(x, t, cond)
            if torch.equal(on, off):
                raise ValueError(
                    f"adapter {path} loaded but does not change the transformer's output "
                    "(all-zero lora_B weights or keys that address the wrong layers)"
                )

    def _probe_batch(self) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(0)
        return {
            "reference": torch.rand(1, 3, 32, 32, generator=g) * 2 - 1,
            "pose": torch.rand(1, 3, 5, 32, 32, generator=g) * 2 - 1,
        }

    # ------------------------------------------------------------------ generation

    def pipeline_kwargs(self, batch: dict[str, torch.Tensor], i: int, num_inference_steps: int) -> dict[str, Any]:
        """Keyword arguments of the stock `WanAnimatePipeline.__call__` for clip `i` of `batch`.

        Text is passed as embeddings (encoded once and cached); pass `prompt=self.prompt`
        instead to a stock pipeline for the same result.
        """
        B, F, H, W = self._check_batch(batch)
        if F < 5:
            raise ValueError(f"generation needs at least 5 frames (one 4-frame segment after the first), got {F}")
        from PIL import Image

        if "face" in batch:
            face = _pil_frames(batch["face"][i])
        else:
            face = [Image.new("RGB", (self.face_size, self.face_size))] * F  # black = -1 = blank face
        kw = dict(
            image=_pil(batch["reference"][i]),
            pose_video=_pil_frames(batch["pose"][i]),
            face_video=face,
            height=H,
            width=W,
            segment_frame_length=F,
            num_inference_steps=num_inference_steps,
            guidance_scale=self.guidance_scale,
            mode="animate",
            prev_segment_conditioning_frames=1,
            output_type="pt",
            max_sequence_length=self.max_sequence_length,
        )
        if "background" in batch:
            kw.update(mode="replace", background_video=_pil_frames(batch["background"][i]),
                      mask_video=_pil_mask_frames(batch["replace_mask"][i]))
        return kw

    @torch.no_grad()
    def generate(
        self, batch: dict[str, torch.Tensor], generator: torch.Generator | list[torch.Generator], num_inference_steps: int
    ) -> torch.Tensor:
        """Animate each clip of `batch` with the stock pipeline: (B, 3, F, H, W) in [-1, 1].

        One pipeline call per clip (the pipeline takes one reference image per call); a list of
        generators gives each clip its own, so a clip does not depend on how clips are batched.
        """
        B = self._check_batch(batch)[0]
        if isinstance(generator, (list, tuple)) and len(generator) != B:
            raise ValueError(f"got {len(generator)} generators for a batch of {B} clips")
        outs = []
        for i in range(B):
            kw = self.pipeline_kwargs(batch, i, num_inference_steps)
            kw["prompt_embeds"] = self._text()
            if self.guidance_scale > 1:
                kw["negative_prompt_embeds"] = self._text(negative=True)
            gen = generator[i] if isinstance(generator, (list, tuple)) else generator
            frames = self.pipe(**kw, generator=gen).frames  # (1, F, 3, H, W) in [0, 1]
            outs.append(frames[0].permute(1, 0, 2, 3).float() * 2 - 1)
        return torch.stack(outs).clamp(-1, 1)

