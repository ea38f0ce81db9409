"""Pretrain the toy animator on a corpus in which some clips have broken hands.

Plain flow matching (Wan convention), full fine-tuning of a fresh tiny
`WanTransformer3DModel`. The result is the "base model" the alignment round starts from:
it draws bodies well and, like real animators, makes hand errors.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from ipa_lib.core.config import Params


def flow_pair(x0: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample t ~ U(0, 1) and noise; return (x_t, t, v) with x_t = (1-t) x0 + t e, v = e - x0."""
    b = x0.shape[0]
    t = torch.rand(b, generator=generator).to(x0)
    e = torch.randn(x0.shape, generator=generator).to(x0)
    tt = t.view(b, *([1] * (x0.ndim - 1)))
    return (1 - tt) * x0 + tt * e, t, e - x0


def lr_at(step: int, base: float, warmup: int, total: int) -> float:
    """Linear warmup then cosine decay to 10 % (nanoGPT's schedule)."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def pretrain(params: Params, out_dir: str | Path, progress: bool = True) -> dict:
    from tqdm.auto import tqdm

    from ipa_lib.models.toy import ToyBackend, build_transformer
    from ipa_lib.data.tensors import make_batch
    from ipa_lib.core.io import atomic_dir, atomic_write_json
    from ipa_lib.core.objective import sft_loss
    from ipa_lib.data.toyworld import make_corpus

    cfg, toy = params.pretrain, params.toy
    started = time.time()
    corpus = make_corpus(cfg.corpus_size, cfg.seed, toy.frames, toy.size, toy.corrupt_fraction, toy.motion, progress)
    from ipa_lib.models.factory import resolve_device

    backend = ToyBackend(build_transformer(params.model, cfg.seed), device=resolve_device(params.backend.device))
    model = backend.transformer.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    curve = []
    bar = tqdm(range(cfg.steps), desc="pretrain", disable=not progress)
    running = None
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg.lr, cfg.warmup_steps, cfg.steps)
        batch = make_batch(corpus, rng.integers(0, cfg.corpus_size, cfg.batch_size))
        x_t, t, v = flow_pair(backend.encode(batch["video"]), gen)
        loss = sft_loss(backend.predict_velocity(x_t, t, backend.condition(batch)), v, None, hand_weight=1.0)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"pretrain: loss became {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            curve.append({"step": step, "loss": loss.item(), "loss_ema": running})
            bar.set_postfix(loss=f"{running:.4f}", refresh=False)
    model.eval()
    summary = {
        "steps": cfg.steps,
        "final_loss_ema": running,
        "seconds": round(time.time() - started, 1),
        "params": sum(p.numel() for p in model.parameters()),
        "corrupt_fraction": toy.corrupt_fraction,
        "device": str(backend.device),
    }
    model.to("cpu")
    with atomic_dir(out_dir) as tmp:
        backend.save_pretrained(tmp, {"toy": toy.model_dump(), "model": params.model.model_dump(mode="json"), "pretrain": summary})
        atomic_write_json(tmp / "pretrain_curve.json", curve)
    return {**summary, "log": curve}
