"""Build the configured animation backend (`backend.name`) from local folders.

The factory never talks to a model registry: a `models:/` URI is resolved to a local
folder by the stages (`ipa_lib.stages.common.load_start_backend`) or the pyfunc model
(`ipa_lib.mlops.registry`) before they call `load_backend`.
"""

from __future__ import annotations

from pathlib import Path

from ipa_lib.core.errors import InputError


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def load_backend(params, base_model: str | Path | None = None, adapter: str | Path | None = None, *,
                 init_adapter: str | Path | None = None):
    """The backend of `params.backend` over the local `base_model` (default `backend.base_model`).

    `init_adapter` (a local adapter folder; default `backend.init_adapter`) is merged into
    the base first: the round starts from that model, which is then the frozen reference.
    `adapter` (this round's LoRA) is loaded on top, unmerged.
    """
    import torch

    cfg = params.backend
    device = resolve_device(cfg.device)
    init = init_adapter if init_adapter is not None else cfg.init_adapter
    if init and str(init).startswith("models:/"):
        raise InputError(f"backend.init_adapter: {init} is a registry URI; resolve it to a local folder first "
                         "(ipa_lib.stages.common.load_start_backend does)")
    path = base_model or cfg.base_model
    if cfg.name == "toy":
        from ipa_lib.models.toy import ToyBackend

        backend = ToyBackend.from_pretrained(path, device=device, dtype=getattr(torch, cfg.dtype))
    elif cfg.name == "wan-animate":
        from ipa_lib.models.wan_animate import WanAnimateBackend

        backend = WanAnimateBackend.from_pretrained(str(path), cfg)
    else:  # config validation makes this unreachable; kept for a readable error
        raise InputError(f"backend.name: unknown backend {cfg.name!r} (valid: toy, wan-animate)")
    if init:
        from ipa_lib.models.lora import merge_lora

        backend.load_adapter(init)
        merge_lora(backend.transformer)
    if adapter:
        backend.load_adapter(adapter)
    return backend
