"""Register stage: log the aligned model (base + adapter + params snapshot) to MLflow and
register a version of `tracking.registered_model`, with its evaluation numbers as tags."""

from __future__ import annotations

import contextlib
from pathlib import Path

from ipa_lib.core.config import Params


@contextlib.contextmanager
def mlflow_errors():
    """MLflow's own exceptions become a RegistryError naming MLflow (exit 1)."""
    from mlflow.exceptions import MlflowException

    from ipa_lib.mlops.registry import RegistryError

    try:
        yield
    except MlflowException as err:
        raise RegistryError(f"MLflow: {err.message}") from err


def register(params: Params, adapter_dir: str | Path | None = None, base_model_dir: str | Path | None = None,
             metrics_path: str | Path | None = None, out: str | Path | None = None) -> dict:
    """Register the adapter (default `train.out`) over the base (`backend.base_model`) with the
    numbers promotion decides on: `evaluate.val_metrics` (the val poses or cases), so no model
    is promoted on the test split; writes the record (name, version, run) to
    `tracking.register_out` and returns it. With tracking disabled, records why nothing was
    registered."""
    from ipa_lib.core.io import atomic_write_json, read_json

    out = out or params.tracking.register_out
    if not params.tracking.enabled:
        record = {"registered": False, "reason": "tracking.enabled is false"}
        atomic_write_json(out, record)
        return record
    from ipa_lib.mlops.registry import register_model
    from ipa_lib.mlops.tracking import read_lineage

    metrics_path = metrics_path or params.evaluate.val_metrics
    lineage = read_lineage(params.evaluate.out) or read_lineage(Path(metrics_path).parent)
    with mlflow_errors():
        register_model(params, adapter_dir or params.train.out, base_model_dir or params.backend.base_model,
                       metrics_path, lineage_in=lineage, record_path=out)
    return read_json(out, "registration record")
