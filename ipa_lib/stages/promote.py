"""Promote stage: move the champion alias to the candidate only when it is measurably better
(`ipa_lib.core.decisions.decide`), or roll back to a chosen version; the decision is
written to `promote.out` and, inside a round, logged as the round's promote run."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ipa_lib.core.config import Params
from ipa_lib.core.decisions import Decision
from ipa_lib.core.errors import InputError

log = logging.getLogger(__name__)


def registered_candidate(params: Params) -> tuple[int | None, dict | None]:
    """(version, lineage) from the `ipa register` record (`tracking.register_out`), or
    (None, None) when there is none for this registered model."""
    from ipa_lib.mlops.tracking import read_lineage

    record = Path(params.tracking.register_out)
    if not record.is_file():
        return None, None
    try:
        rec = json.loads(record.read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"{record}: registration record is not valid JSON ({err})") from None
    if rec.get("name") == params.tracking.registered_model and rec.get("version"):
        return int(rec["version"]), read_lineage(record)
    return None, None


def promote_stage(params: Params, candidate: int | None = None, dry_run: bool = False, to_version: int | None = None,
                  out: str | Path | None = None) -> Decision | None:
    """Decide on `candidate` (default: the version `ipa register` recorded, else the newest) or
    roll back to `to_version`. Returns the decision (None with tracking disabled) and, unless
    `dry_run`, writes it to `promote.out`."""
    from ipa_lib.core.io import atomic_write_json
    from ipa_lib.stages.register import mlflow_errors

    out = out or params.promote.out
    if not params.tracking.enabled:
        if not dry_run:
            atomic_write_json(out, {"action": "skipped", "reason": "tracking.enabled is false"})
        return None
    from ipa_lib.mlops.registry import promote
    from ipa_lib.mlops.tracking import stage_run

    lineage = None
    if candidate is None and to_version is None:
        candidate, lineage = registered_candidate(params)
        if candidate is None:
            log.warning("no %s from `ipa register`; deciding on the newest version", params.tracking.register_out)
    with mlflow_errors():
        if lineage and not dry_run:  # the DVC promote stage: log the decision in the round
            with stage_run(params, "promote", lineage) as run:
                d = promote(params, candidate, dry_run, to_version)
                run.log_dict(d.to_dict(), "promotion/decision.json")
                run.set_tags({"ipa.promotion.action": d.action, "ipa.promotion.candidate": d.candidate})
                delta = (d.compared or {}).get("delta") or {}
                run.log_metrics({f"promote/delta/{k}": v for k, v in delta.items()} | {"promote/promoted": float(d.promote)})
        else:
            d = promote(params, candidate, dry_run, to_version)
    if not dry_run:
        atomic_write_json(out, d.to_dict())
    return d
