"""The fast training settings: per-block `torch.compile` and selective activation checkpointing.

`train.compile` compiles each transformer block's forward (regional compilation: one small
graph per block type, reused by every block of that type); `train.checkpoint_blocks = K`
recomputes the activations of the first K blocks in backward instead of keeping them
(-1: every block). A checkpointed block runs its (compiled) forward inside
`torch.utils.checkpoint` (non-reentrant), so compiling does not keep the activations the
checkpoint drops; without grad (the reference forward, sampling) nothing is checkpointed.

The blocks are `transformer.blocks` of diffusers' `WanTransformer3DModel` (toy backend) and
`WanAnimateTransformer3DModel` (wan-animate), with or without LoRA: peft injects adapters
inside the blocks, and a `PeftModel` wrapper is looked through. Only each block's `forward`
changes, never its module names, so LoRA keys and saved adapters stay the same; a deep copy
of the transformer keeps the settings and runs its own blocks.
"""

from __future__ import annotations

import functools

import torch

_FLAGS = "_ipa_speed"  # per block: (checkpointed, compiled)
_COMPILED: dict[type, object] = {}  # block class -> torch.compile of its forward


def transformer_blocks(transformer: torch.nn.Module) -> torch.nn.ModuleList:
    """The transformer's block list (`.blocks`), looking through a peft `PeftModel` wrapper."""
    module = transformer
    for _ in range(3):  # PeftModel -> LoraModel -> the diffusers model
        blocks = getattr(module, "blocks", None)
        if isinstance(blocks, torch.nn.ModuleList):
            return blocks
        module = getattr(module, "base_model", None) or getattr(module, "model", None)
        if module is None:
            break
    raise ValueError(f"{type(transformer).__name__} has no `blocks` list: train.compile / train.checkpoint_blocks "
                     f"support Wan-style transformers only")


def _block_forward(block: torch.nn.Module, *args, **kwargs):
    checkpointed, compiled = getattr(block, _FLAGS)
    forward = _COMPILED[type(block)] if compiled else type(block).forward
    if checkpointed and torch.is_grad_enabled():
        from torch.utils.checkpoint import checkpoint

        return checkpoint(forward, block, *args, use_reentrant=False, **kwargs)
    return forward(block, *args, **kwargs)


def configure_blocks(transformer: torch.nn.Module, checkpoint_blocks: int = 0, compile: bool = False) -> dict:
    """Checkpoint the first `checkpoint_blocks` blocks (-1: all, 0: none) and/or compile every
    block; calling it again replaces the previous choice. Returns {"blocks", "checkpointed", "compiled"}."""
    blocks = list(transformer_blocks(transformer))
    n = len(blocks)
    if not -1 <= checkpoint_blocks <= n:
        raise ValueError(f"train.checkpoint_blocks={checkpoint_blocks}: {type(transformer).__name__} has {n} "
                         f"blocks; use 0..{n} (or -1 for every block)")
    k = n if checkpoint_blocks == -1 else checkpoint_blocks
    if k and getattr(transformer, "gradient_checkpointing", False):
        raise ValueError(f"train.checkpoint_blocks={checkpoint_blocks} with backend.gradient_checkpointing=true: the "
                         f"backend already checkpoints every block; set one of the two")
    for i, block in enumerate(blocks):
        flags = (i < k, bool(compile))
        if flags == (False, False):
            vars(block).pop("forward", None)
            vars(block).pop(_FLAGS, None)
            continue
        if compile and type(block) not in _COMPILED:
            _COMPILED[type(block)] = torch.compile(type(block).forward)
        setattr(block, _FLAGS, flags)
        # a partial over the block (not a closure over its bound forward): deepcopy maps it to the copy
        block.forward = functools.partial(_block_forward, block)
    return speed_summary(transformer)


def speed_summary(transformer: torch.nn.Module) -> dict:
    """How the blocks run now: {"blocks": n, "checkpointed": k, "compiled": bool}."""
    flags = [getattr(b, _FLAGS, (False, False)) for b in transformer_blocks(transformer)]
    return {"blocks": len(flags), "checkpointed": sum(f[0] for f in flags), "compiled": any(f[1] for f in flags)}


def apply_speed_settings(backend, cfg) -> dict:
    """Apply `cfg.compile` / `cfg.checkpoint_blocks` (a TrainConfig) to `backend.transformer`.
    Defaults (False, 0) leave the model untouched."""
    if not cfg.compile and cfg.checkpoint_blocks == 0:
        return {"blocks": None, "checkpointed": 0, "compiled": False}
    return configure_blocks(backend.transformer, cfg.checkpoint_blocks, cfg.compile)
