"""The fast training settings (`train.compile`, `train.checkpoint_blocks`, ipa_lib/models/speed.py):
same loss and gradients as the plain model on the toy and the tiny Wan-Animate transformer,
fewer saved activations, validated settings, and a compiled training step through `train`.

Measured on this CPU (torch 2.13): checkpointing changes neither loss nor gradients (max
difference 0.0, both backends); compiling changes the loss by 1.2e-5 (toy) / 4.4e-5 (Wan)
relative and the LoRA gradients by 2.2e-5 / 3.5e-5 of their largest entry (inductor's fused
kernels sum in another order). Tolerances: 1e-6 and 1e-3.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from conftest import REPO, tiny_params

from ipa_lib.core.config import ConfigError, TrainConfig, load_params
from ipa_lib.models.lora import lora_parameters
from ipa_lib.models.speed import apply_speed_settings, configure_blocks, speed_summary
from ipa_lib.stages.train import compute_loss, step_generator

CKPT_RTOL = 1e-6  # measured 0.0
COMPILE_RTOL = 1e-3  # measured <= 4.4e-5


def _toy():
    from ipa_lib.models.toy import ToyBackend, build_transformer
    from ipa_lib.models.wan_tiny import tiny_batch

    return ToyBackend(build_transformer(tiny_params().model, seed=0)), tiny_batch(2, 5, 16, seed=0)


def _wan():
    from ipa_lib.core.config import BackendConfig
    from ipa_lib.models.wan_animate import WanAnimateBackend
    from ipa_lib.models.wan_tiny import tiny_batch

    return WanAnimateBackend.tiny(BackendConfig(name="wan-animate", device="cpu", dtype="float32")), tiny_batch(1)


MAKERS = {"toy": _toy, "wan-animate": _wan}


def _lora_backend(make):
    """A backend with a LoRA whose B matrices are nonzero, so every adapter weight gets a gradient."""
    torch.manual_seed(0)
    be, batch = make()
    cfg = TrainConfig(lora_rank=4, lora_alpha=4)
    be.add_lora(cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
    g = torch.Generator().manual_seed(1)
    for name, p in be.transformer.named_parameters():
        if "lora_B" in name:
            p.data.copy_(0.02 * torch.randn(p.shape, generator=g))
    be.transformer.train()
    return be, batch


def _loss_and_grads(be, batch, **speed) -> tuple[float, torch.Tensor, int]:
    """IPA loss, flat LoRA gradients and the bytes autograd saved, under `speed` settings."""
    configure_blocks(be.transformer, **speed)
    params = lora_parameters(be.transformer)
    for p in params:
        p.grad = None
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = compute_loss(be, batch, TrainConfig(), step_generator(0, 0))
    loss.backward()
    return loss.item(), torch.cat([p.grad.flatten() for p in params]), saved[0]


@pytest.mark.parametrize("model", sorted(MAKERS))
def test_checkpoint_blocks_same_loss_and_gradients(model):
    # a fresh backend per setting: wan-animate's conditioning draws from the backend's own noise generator
    be, batch = _lora_backend(MAKERS[model])
    n = speed_summary(be.transformer)["blocks"]
    loss0, grad0, saved0 = _loss_and_grads(be, batch, checkpoint_blocks=0)
    assert grad0.abs().max() > 0
    saved = {}
    for k in (1, -1):
        be, batch = _lora_backend(MAKERS[model])
        loss, grad, saved[k] = _loss_and_grads(be, batch, checkpoint_blocks=k)
        assert speed_summary(be.transformer)["checkpointed"] == (n if k == -1 else k)
        assert loss == pytest.approx(loss0, rel=CKPT_RTOL)
        torch.testing.assert_close(grad, grad0, rtol=CKPT_RTOL, atol=CKPT_RTOL * grad0.abs().max().item())
    # the checkpointed blocks really drop their activations: fewer bytes saved, fewest with all
    assert saved0 > saved[1] > saved[-1], (saved0, saved[1], saved[-1])
    configure_blocks(be.transformer, checkpoint_blocks=0)  # back to plain blocks
    assert speed_summary(be.transformer) == {"blocks": n, "checkpointed": 0, "compiled": False}
    assert not any("forward" in vars(b) for b in be.transformer.blocks)


def test_settings_survive_a_deep_copy_and_run_the_copy():
    """A deep copy (the deep-copy reference of benchmarks/train_step.py) checkpoints its own blocks."""
    be, batch = _lora_backend(_toy)
    configure_blocks(be.transformer, checkpoint_blocks=-1)
    twin = copy.deepcopy(be.transformer)
    assert speed_summary(twin)["checkpointed"] == speed_summary(be.transformer)["blocks"]
    x = torch.randn(1, 9, 5, 16, 16)
    t = torch.full((1,), 500.0)
    text = torch.zeros(1, 1, tiny_params().model.text_dim)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.5)
        a = be.transformer(x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
        b = twin(x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
    assert not torch.allclose(a, b)  # the copy's blocks ran with the copy's (halved) weights


def test_settings_are_validated():
    with pytest.raises(ConfigError, match="train.checkpoint_blocks"):
        load_params(REPO / "params.yaml", ["train.checkpoint_blocks=-2"])
    with pytest.raises(ConfigError, match="train.compile"):
        load_params(REPO / "params.yaml", ["train.compile=maybe"])
    be, _ = _toy()  # 2 blocks
    with pytest.raises(ValueError, match=r"train.checkpoint_blocks=3: WanTransformer3DModel has 2 blocks"):
        apply_speed_settings(be, TrainConfig(checkpoint_blocks=3))
    be.transformer.enable_gradient_checkpointing()
    with pytest.raises(ValueError, match="backend.gradient_checkpointing"):
        apply_speed_settings(be, TrainConfig(checkpoint_blocks=1))
    assert apply_speed_settings(be, TrainConfig())["checkpointed"] == 0  # defaults touch nothing
    with pytest.raises(ValueError, match="no `blocks` list"):
        configure_blocks(torch.nn.Linear(2, 2), checkpoint_blocks=1)


def test_too_many_blocks_stops_train_with_exit_2(tiny, tmp_path):
    """Through `ipa train`: the error names the key, exit code 2, before any step."""
    from ipa_lib.core.errors import exit_code
    from ipa_lib.stages.train import train

    params, work = tiny
    gated = _gated(params, work)
    params.train.checkpoint_blocks = 5
    with pytest.raises(ValueError, match="train.checkpoint_blocks=5") as info:
        train(params, gated, work / "adapter", progress=False)
    assert exit_code(info.value) == 2
    assert not (work / "adapter").exists()


def _gated(params, work):
    from ipa_lib.stages.gate import gate
    from ipa_lib.stages.sample import sample

    if not (work / "gated").exists():
        sample(params, work / "samples", progress=False)
        gate(params, work / "samples", work / "gated", progress=False)
    return work / "gated"


@pytest.mark.slow  # inductor compiles the block forward (grad and no-grad): ~70 s on 2 busy cores
def test_compiled_checkpointed_training_matches_plain(tiny):
    """Two steps of `train` with train.compile and train.checkpoint_blocks give the plain run's losses."""
    from ipa_lib.stages.train import train

    params, work = tiny
    gated = _gated(params, work)
    params.train.steps, params.train.log_every = 2, 1
    plain = train(params, gated, work / "plain", progress=False)
    params.train.compile, params.train.checkpoint_blocks = True, 1
    fast = train(params, gated, work / "fast", progress=False)
    assert [e["step"] for e in fast["log"]] == [0, 1]
    for a, b in zip(plain["log"], fast["log"]):
        assert b["loss"] == pytest.approx(a["loss"], rel=COMPILE_RTOL)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=COMPILE_RTOL)
    json.loads((work / "fast" / "train_summary.json").read_text())  # a finished run
