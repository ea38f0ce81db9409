"""Wan-Animate backend on a tiny random pipeline (same diffusers classes, few layers), CPU only.

What the issue asks: generate a clip, a few IPA steps lower the loss on a fixed batch,
adapters save in diffusers' LoRA format and a stock `WanAnimatePipeline.load_lora_weights`
reproduces the trained model exactly; bad inputs fail with errors that name the problem.
"""

from __future__ import annotations

import json

import pytest

from ipa_lib.core.config import ConfigError, parse_params
import torch

from ipa_lib.models import lora as lora_lib
from ipa_lib.models.base import AnimationBackend
from ipa_lib.models.wan_animate import WanAnimateBackend, check_frames
from ipa_lib.models.wan_tiny import TINY_TEXT_LEN, save_tiny_pipeline, tiny_batch
from ipa_lib.core.config import BackendConfig, TrainConfig
from ipa_lib.stages.train import compute_loss

TARGETS = TrainConfig().lora_targets


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("wan") / "tiny-wan-animate")


def _backend(pipe_dir, **kw) -> WanAnimateBackend:
    cfg = BackendConfig(name="wan-animate", base_model=str(pipe_dir), device="cpu", dtype="float32")
    return WanAnimateBackend.from_pretrained(str(pipe_dir), cfg, max_sequence_length=TINY_TEXT_LEN, **kw)


@pytest.fixture(scope="module")
def backend(pipe_dir):
    """Shared, adapter-free backend (tests that add LoRA build their own)."""
    return _backend(pipe_dir)


@pytest.fixture(scope="module")
def batch():
    return tiny_batch(batch_size=2)


def _stock(pipe_dir):
    from diffusers import WanAnimatePipeline

    pipe = WanAnimatePipeline.from_pretrained(str(pipe_dir))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _train(be, batch, steps=4, lr=1e-2):
    cfg = TrainConfig(loss="ipa", lora_rank=4, lora_alpha=8)
    be.add_lora(cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
    opt = torch.optim.AdamW(be.trainable_parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss, stats = compute_loss(be, batch, cfg, torch.Generator().manual_seed(0))  # fixed t and noise
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, stats


# ---------------------------------------------------------------- protocol and shapes


def test_protocol_shapes(backend, batch):
    assert isinstance(backend, AnimationBackend)
    x0 = backend.encode(batch["video"])
    assert x0.shape == (2, 16, 5, 4, 4)  # 17 frames -> 1 + 16/4; 32 px -> 4
    mask = backend.mask_to_latent(batch["hand_mask"])
    assert mask.shape == (2, 5, 4, 4) and mask.max() == 1 and mask.min() == 0
    cond = backend.condition(batch)
    assert cond["y"].shape == (2, 20, 6, 4, 4)  # 4 mask + 16 latent channels, reference slot + 5 frames
    assert cond["pose_latents"].shape == x0.shape
    t = torch.tensor([0.2, 0.9])
    v = backend.predict_velocity(x0, t, cond)
    assert v.shape == x0.shape and torch.isfinite(v).all()
    assert backend.decode(x0).shape == (2, 3, 17, 32, 32)


def test_generate_clip_reproducible(backend, batch):
    a = backend.generate(batch, torch.Generator().manual_seed(0), num_inference_steps=2)
    b = backend.generate(batch, torch.Generator().manual_seed(0), num_inference_steps=2)
    assert a.shape == (2, 3, 17, 32, 32)
    assert a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, b)
    # the backend's generation is the stock pipeline's, call for call
    kw = backend.pipeline_kwargs(batch, 0, 2)
    stock = backend.pipe(**kw, prompt=backend.prompt, generator=torch.Generator().manual_seed(0)).frames[0]
    assert torch.allclose(stock.permute(1, 0, 2, 3) * 2 - 1, a[0], atol=1e-6)


def test_generate_per_clip_generators(backend, batch):
    """A list of generators: each clip depends on its own seed only, not on its batch neighbours."""
    both = backend.generate(batch, [torch.Generator().manual_seed(s) for s in (3, 4)], 2)
    second = backend.generate({k: v[1:] for k, v in batch.items()}, [torch.Generator().manual_seed(4)], 2)
    assert torch.equal(both[1:], second)
    with pytest.raises(ValueError, match="1 generators for a batch of 2"):
        backend.generate(batch, [torch.Generator()], 2)


def test_conditioning_matches_generation_preprocessing(backend, batch):
    """Training conditioning = what the pipeline builds when sampling (same uint8 pose/ref)."""
    cond = backend.condition(batch)
    pipe = backend.pipe
    kw = backend.pipeline_kwargs(batch, 1, 2)
    pose = pipe.video_processor.preprocess_video(kw["pose_video"], height=32, width=32)
    assert torch.allclose(pipe.prepare_pose_latents(pose, 1), cond["pose_latents"][1:2], atol=1e-5)  # batched conv rounding
    assert torch.allclose(pipe.encode_image(kw["image"], torch.device("cpu")), cond["image_embeds"][1:2], atol=1e-5)


# ---------------------------------------------------------------- training


def test_ipa_steps_lower_loss_reference_frozen(pipe_dir, batch):
    be = _backend(pipe_dir)
    base = {n: p.detach().clone() for n, p in be.transformer.named_parameters()}
    losses, stats = _train(be, batch, steps=4)
    assert losses[0] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at step 0: -log sigmoid(0)
    assert losses[-1] < losses[0] and all(b <= a + 1e-6 for a, b in zip(losses, losses[1:])), losses
    assert stats["implicit_acc"] == 1.0
    # only adapter weights moved; every trainable parameter is a float32 LoRA weight
    for n, p in be.transformer.named_parameters():
        if "lora_" in n:
            assert p.requires_grad and p.dtype == torch.float32
        else:
            assert not p.requires_grad and torch.equal(p, base[n.replace(".base_layer", "")]), n
    # reference = adapters disabled: equals the untouched base model, differs from the policy
    x0, cond, t = be.encode(batch["video"]), be.condition(batch), torch.tensor([0.3, 0.6])
    fresh = _backend(pipe_dir)
    with torch.no_grad():
        with be.reference_model():
            ref = be.predict_velocity(x0, t, cond)
        pol = be.predict_velocity(x0, t, cond)
        untouched = fresh.predict_velocity(x0, t, cond)
    assert torch.equal(ref, untouched)
    assert not torch.allclose(pol, ref)


def test_reference_context_restores_on_error(pipe_dir, batch):
    be = _backend(pipe_dir)
    be.add_lora(2, 2, ["to_q"])
    with pytest.raises(RuntimeError):
        with be.reference_model():
            raise RuntimeError("boom")
    assert all(p.requires_grad for p in lora_lib.lora_parameters(be.transformer))
    assert not any(layer.disable_adapters for layer in lora_lib._lora_layers(be.transformer))


def test_gradient_checkpointing_same_gradients(pipe_dir, batch):
    grads = []
    for ckpt in (False, True):
        be = _backend(pipe_dir, gradient_checkpointing=ckpt)
        assert be.transformer.gradient_checkpointing is ckpt
        torch.manual_seed(0)
        be.add_lora(2, 2, ["to_q", "ffn.net.2"])
        for p in be.trainable_parameters():
            torch.nn.init.normal_(p, std=0.02)
        loss, _ = compute_loss(be, batch, TrainConfig(loss="sft"), torch.Generator().manual_seed(0))
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in be.trainable_parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


# ---------------------------------------------------------------- adapters


def test_adapter_roundtrip_into_stock_pipeline(pipe_dir, batch, tmp_path):
    be = _backend(pipe_dir)
    _train(be, batch, steps=2)
    be.save_adapter(tmp_path / "adapter")
    file = tmp_path / "adapter" / "pytorch_lora_weights.safetensors"
    assert file.is_file()
    import safetensors

    with safetensors.safe_open(str(file), "pt") as f:
        keys = list(f.keys())
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert all(k.startswith("transformer.") and ".lora_" in k for k in keys)
    assert meta["transformer.r"] == 4 and meta["transformer.lora_alpha"] == 8  # alpha != rank survives

    ours = be.generate(batch, torch.Generator().manual_seed(7), 2)[0]
    kw = be.pipeline_kwargs(batch, 0, 2)
    pipe = _stock(pipe_dir)
    base = pipe(**kw, prompt=be.prompt, generator=torch.Generator().manual_seed(7)).frames[0].permute(1, 0, 2, 3) * 2 - 1
    pipe.load_lora_weights(str(tmp_path / "adapter"))
    theirs = pipe(**kw, prompt=be.prompt, generator=torch.Generator().manual_seed(7)).frames[0].permute(1, 0, 2, 3) * 2 - 1
    assert torch.equal(ours, theirs)
    assert not torch.allclose(base, theirs)

    # and back into a fresh backend through the protocol
    fresh = _backend(pipe_dir)
    fresh.load_adapter(tmp_path / "adapter")
    assert torch.equal(fresh.generate(batch, torch.Generator().manual_seed(7), 2)[0], ours)


def test_load_adapter_that_changes_nothing_fails(pipe_dir, tmp_path):
    be = _backend(pipe_dir)
    be.add_lora(2, 2, ["to_q"])  # lora_B starts at zero: a no-op adapter
    be.save_adapter(tmp_path / "noop")
    with pytest.raises(ValueError, match="does not change"):
        _backend(pipe_dir).load_adapter(tmp_path / "noop")


def test_load_adapter_with_wrong_keys_fails(pipe_dir, tmp_path):
    import safetensors.torch

    (tmp_path / "bad").mkdir()
    safetensors.torch.save_file(
        {"transformer.blocks.9.attn1.to_q.lora_A.weight": torch.zeros(2, 24),
         "transformer.blocks.9.attn1.to_q.lora_B.weight": torch.ones(24, 2)},
        str(tmp_path / "bad" / "pytorch_lora_weights.safetensors"),
    )
    with pytest.raises(ValueError, match="blocks.9"):
        _backend(pipe_dir).load_adapter(tmp_path / "bad")
    with pytest.raises(FileNotFoundError, match="no LoRA weights"):
        _backend(pipe_dir).load_adapter(tmp_path / "missing")


# ---------------------------------------------------------------- bad input


def test_wrong_model_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        WanAnimateBackend.from_pretrained(str(tmp_path / "no-such-model"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="model_index.json"):
        WanAnimateBackend.from_pretrained(str(tmp_path / "empty"))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    with pytest.raises(ValueError, match="WanPipeline, not a WanAnimatePipeline"):
        WanAnimateBackend.from_pretrained(str(tmp_path / "other"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "model_index.json").write_text(
        json.dumps({"_class_name": "WanAnimatePipeline", "transformer": ["diffusers", "WanAnimateTransformer3DModel"]})
    )
    with pytest.raises(ValueError, match="broken.*cannot be loaded"):
        WanAnimateBackend.from_pretrained(str(tmp_path / "broken"))


def test_frame_count_not_4k1(backend, batch):
    with pytest.raises(ValueError, match="16 frames.*4k\\+1.*13 or 17"):
        backend.encode(batch["video"][:, :, :16])
    with pytest.raises(ValueError, match="pose has 16 frames"):
        backend.condition({k: (v[:, :, :16] if k in ("pose", "video") else v) for k, v in batch.items()})
    with pytest.raises(ConfigError, match=r"data.frames: .*4k\+1"):
        parse_params({"data": {"frames": 80}})
    check_frames(81)


def test_mask_shape_mismatch(backend, batch):
    with pytest.raises(ValueError, match=r"hand_mask must be \(B, F, H, W\) = \(2, 17, 32, 32\)"):
        backend.condition({**batch, "hand_mask": batch["hand_mask"][:, :, :16]})
    with pytest.raises(ValueError, match="hand_mask must be"):
        backend.mask_to_latent(batch["hand_mask"][0])
    with pytest.raises(ValueError, match="hand_mask has 16 frames"):
        backend.mask_to_latent(batch["hand_mask"][:, :16])


def test_lora_targets_that_match_nothing(pipe_dir):
    be = _backend(pipe_dir)
    with pytest.raises(ValueError, match=r"\['to_qkv'\] match no module.*to_out.0"):
        be.add_lora(4, 4, ["to_q", "to_qkv"])
    assert not lora_lib.has_lora(be.transformer)  # nothing half-applied


def test_all_default_targets_match(backend):
    hits = lora_lib.match_targets(backend.transformer, TARGETS)
    assert all(hits.values()), hits


# ---------------------------------------------------------------- the CLI smoke


def test_smoke_main_wan_animate(capsys):
    from ipa_lib.stages.smoke import smoke_main

    assert smoke_main("wan-animate") == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out and "smoke passed" in out
    for what in ("generate a clip", "IPA steps", "load_lora_weights", "bad LoRA target names", "frame count"):
        assert what in out
