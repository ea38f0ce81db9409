"""What every stage shares: the model it starts from, with `models:/` URIs resolved here,
before the model factory (which knows local folders only) is called."""

from __future__ import annotations

from pathlib import Path


def load_start_backend(params, base_model: str | Path | None = None, adapter: str | Path | None = None):
    """The backend a stage runs: the start model (base + merged `backend.init_adapter`) with
    this round's `adapter` on top. Without a registry URI in `backend.init_adapter` the
    registry client is never imported."""
    init = params.backend.init_adapter
    if init and init.startswith("models:/"):
        from ipa_lib.mlops.registry import start_backend

        return start_backend(params, base_model, adapter)
    from ipa_lib.models.factory import load_backend

    return load_backend(params, base_model, adapter)
