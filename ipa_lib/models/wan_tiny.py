"""A tiny random Wan-Animate pipeline, built offline from the real diffusers classes.

Same classes as the released model (`WanAnimatePipeline`, `WanAnimateTransformer3DModel`,
`AutoencoderKLWan`, `UMT5EncoderModel`, `CLIPVisionModel`), a few layers and small dims
(the sizes diffusers' own fast tests use), so tests and `ipa smoke --backend wan-animate`
exercise the exact code paths of the 14B model on a CPU in seconds. No weights are
downloaded: the tokenizer is a word-level `tokenizers` model wrapped in
`PreTrainedTokenizerFast`, every network is randomly initialised from a fixed seed.

Modules built from a config start in training mode (dropout on); everything is put in
`.eval()` so a seeded generation is reproducible (with dropout on it differs run to run
even with a seeded generator).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ipa_lib.core.extras import require

# 17 frames at 32x32: 5 latent frames on a 4x4 latent grid (+1 reference slot), 2x2 patches
TINY_FRAMES = 17
TINY_SIZE = 32
TINY_TEXT_LEN = 16  # max_sequence_length used with the tiny text encoder
TINY_FACE_SIZE = 16  # motion_encoder_size: face frames are 16x16


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "</s>", "<unk>", "a", "person", "dancing", "waving", "hands", "video", "high", "quality"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def tiny_components(seed: int = 0) -> dict:
    """The seven modules `WanAnimatePipeline(**components)` takes, tiny and random (seeded)."""
    require("transformers", "ftfy", extra="wan", purpose="the tiny wan-animate backend")
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanAnimateTransformer3DModel
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

    tokenizer = _tokenizer()
    torch.manual_seed(seed)
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, dropout_rate=0.0,
        )
    )
    torch.manual_seed(seed + 1)
    image_encoder = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=4, projection_dim=4, num_hidden_layers=2, num_attention_heads=2,
            image_size=4, intermediate_size=16, patch_size=1,
        )
    )
    image_processor = CLIPImageProcessor(size=4, crop_size=4)
    torch.manual_seed(seed + 2)
    vae = AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )
    torch.manual_seed(seed + 3)
    transformer = WanAnimateTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=36,  # 2 * 16 latent channels + 4 mask channels
        latent_channels=16,
        out_channels=16,
        text_dim=32,  # = text_encoder d_model
        freq_dim=256,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        image_dim=4,  # = image_encoder hidden_size
        rope_max_seq_len=32,
        motion_encoder_channel_sizes={"4": 16, "8": 16, "16": 16},
        motion_encoder_size=TINY_FACE_SIZE,
        motion_style_dim=8,
        motion_dim=4,
        motion_encoder_dim=16,
        face_encoder_hidden_dim=16,
        face_encoder_num_heads=2,
        inject_face_latents_blocks=2,
    )
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    for m in (text_encoder, image_encoder, vae, transformer):
        m.eval()
    return {
        "tokenizer": tokenizer,
        "text_encoder": text_encoder,
        "vae": vae,
        "scheduler": scheduler,
        "image_processor": image_processor,
        "image_encoder": image_encoder,
        "transformer": transformer,
    }


def tiny_pipeline(seed: int = 0):
    """A `WanAnimatePipeline` over `tiny_components(seed)` (same seed: same weights)."""
    from diffusers import WanAnimatePipeline

    pipe = WanAnimatePipeline(**tiny_components(seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_pipeline(path: str | Path, seed: int = 0) -> Path:
    """Write a tiny pipeline folder that `WanAnimatePipeline.from_pretrained(path)` loads offline."""
    path = Path(path)
    tiny_pipeline(seed).save_pretrained(str(path))
    return path


def tiny_batch(batch_size: int = 1, frames: int = TINY_FRAMES, size: int = TINY_SIZE, seed: int = 0) -> dict[str, torch.Tensor]:
    """A synthetic batch in the backend convention (see backends/base.py), hand box in the middle.

    The reference is a smooth colour field, the pose a moving bar, so VAE/CLIP see structure
    rather than white noise; values in [-1, 1], masks in {0, 1}.
    """
    g = torch.Generator().manual_seed(seed)
    B, F, S = batch_size, frames, size
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, S), torch.linspace(-1, 1, S), indexing="ij")
    colours = torch.rand(B, 3, 1, 1, generator=g) * 2 - 1
    reference = (colours * 0.6 + 0.3 * torch.stack([xx, yy, xx * yy])[None]).clamp(-1, 1)  # (B, 3, S, S)
    phase = torch.rand(B, generator=g) * 6.28
    tt = torch.linspace(0, 1, F)
    centre = 0.5 * torch.sin(phase[:, None] + 6.28 * tt[None])  # (B, F)
    bar = (-(((xx[None, None] - centre[..., None, None]) / 0.15) ** 2)).exp()  # (B, F, S, S)
    pose = (bar[:, None].expand(B, 3, F, S, S) * 2 - 1).contiguous()
    video = (reference[:, :, None] * (1 - bar[:, None]) + bar[:, None] * 0.8).clamp(-1, 1)
    video = video + 0.05 * torch.randn(video.shape, generator=g)
    hand_mask = torch.zeros(B, F, S, S)
    hand_mask[:, :, S // 4 : S // 2, S // 4 : S // 2] = 1.0
    return {"video": video.clamp(-1, 1), "reference": reference, "pose": pose, "hand_mask": hand_mask}
