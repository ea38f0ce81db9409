"""Animation backends behind one protocol (see base.py); chosen by `backend.name` in params.yaml."""

from __future__ import annotations

from pathlib import Path


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def load_backend(params, base_model: str | Path | None = None, adapter: str | Path | None = None):
    """Build the configured backend from `base_model` (default `backend.base_model`).

    With `backend.init_adapter` set (an adapter folder or `models:/name@alias`), that
    adapter is merged into the base first: the round starts from the aligned model, which
    is then the frozen reference. `adapter` (this round's LoRA) is loaded on top.
    """
    import torch

    cfg = params.backend
    device = resolve_device(cfg.device)
    init = None
    if cfg.init_adapter:
        from ipa_lib.registry import resolve_start  # models:/ URIs -> local folders

        start_base, init, _ = resolve_start(params)
        # a registered model carries the base its adapter was trained over (for a later round,
        # base + earlier champions merged): that base wins over a base passed in
        base_model = start_base if cfg.init_adapter.startswith("models:/") else (base_model or start_base)
    path = base_model or cfg.base_model
    if cfg.name == "toy":
        from ipa_lib.backends.toy import ToyBackend

        backend = ToyBackend.from_pretrained(path, device=device, dtype=getattr(torch, cfg.dtype))
    elif cfg.name == "wan-animate":
        from ipa_lib.backends.wan_animate import WanAnimateBackend

        backend = WanAnimateBackend.from_pretrained(str(path), cfg)
    else:  # config validation makes this unreachable; kept for a readable error
        raise ValueError(f"backend.name: unknown backend {cfg.name!r} (valid: toy, wan-animate)")
    if init:
        from ipa_lib.backends.lora import merge_lora

        backend.load_adapter(init)
        merge_lora(backend.transformer)
    if adapter:
        backend.load_adapter(adapter)
    return backend
