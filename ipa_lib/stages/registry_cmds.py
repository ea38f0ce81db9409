"""`ipa register` and `ipa promote`: thin I/O around `ipa_lib.mlops.registry`.

Exit codes: 0 when a decision was made (promoted, rejected, kept, rolled back) or tracking
is disabled; 1 on an error (message on stderr, alias unchanged).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ipa_lib.core.config import ConfigError, load_params


def _error(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 1


def _write_json(path: str | Path, data: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def register_main(
    params_path: str = "params.yaml",
    overrides: list[str] | None = None,
    *,
    adapter_dir: str | None = None,
    base_model_dir: str | None = None,
    metrics_path: str | None = None,
    out: str | None = None,
) -> int:
    """Register the trained adapter (default `train.out`) over the base (`backend.base_model`)
    with the numbers in `evaluate.metrics`; writes the record to `tracking.register_out`."""
    from mlflow.exceptions import MlflowException

    from ipa_lib.mlops.registry import RegistryError, register_model
    from ipa_lib.mlops.tracking import TrackingError, read_lineage

    try:
        params = load_params(params_path, overrides)
        out = out or params.tracking.register_out
        if not params.tracking.enabled:
            _write_json(out, {"registered": False, "reason": "tracking.enabled is false"})
            print("tracking disabled: nothing registered")
            return 0
        metrics_path = metrics_path or params.evaluate.metrics
        lineage = read_lineage(params.evaluate.out) or read_lineage(Path(metrics_path).parent)
        version = register_model(
            params,
            adapter_dir or params.train.out,
            base_model_dir or params.backend.base_model,
            metrics_path,
            lineage_in=lineage,
            record_path=out,
        )
    except (ConfigError, RegistryError, TrackingError) as err:
        return _error(str(err))
    except MlflowException as err:
        return _error(f"MLflow: {err.message}")
    name = params.tracking.registered_model
    print(f"registered {name} version {version} (models:/{name}/{version}); record: {out}")
    return 0


def format_decision(d) -> str:
    """A readable decision: verdict, the compared numbers, the alias before/after."""
    verb = {"promote": "PROMOTED", "reject": "REJECTED", "keep": "UNCHANGED", "rollback": "ROLLED BACK"}[d.action]
    if d.dry_run:
        verb = f"DRY RUN, would be {verb.lower()}"
    lines = [f"{d.model} v{d.candidate}: {verb}", f"  reason: {d.reason}"]
    c = d.compared
    if c.get("candidate"):
        ref = c["reference"] if c.get("reference_version") is None else f"{c['reference']} v{c['reference_version']}"
        lines.append(f"  {'metric':<16}{'candidate':>11}{ref:>16}{'delta':>10}  rule")
        for k, v in c["candidate"].items():
            if k == c["primary_metric"]:
                rule = f">= +{c['margin']}"
            elif k in c["tolerances"]:
                rule = f">= -{c['tolerances'][k]}"
            else:
                rule = ""
            flag = "  <- regression" if k in c.get("regressions", {}) else ""
            lines.append(f"  {k:<16}{v:>11.4f}{c['reference_metrics'][k]:>16.4f}{c['delta'][k]:>+10.4f}  {rule}{flag}")
    before = "none" if d.previous_champion is None else f"v{d.previous_champion}"
    after = "none" if d.champion is None else f"v{d.champion}"
    lines.append(f"  champion: {before} -> {after}" + (" (not applied)" if d.dry_run else ""))
    return "\n".join(lines)


def promote_main(
    params_path: str = "params.yaml",
    candidate: int | None = None,
    dry_run: bool = False,
    to_version: int | None = None,
    *,
    overrides: list[str] | None = None,
    out: str | None = None,
) -> int:
    """Decide on `candidate` (default: the version in `tracking.register_out`, else the
    newest), or roll back to `to_version`; prints the decision, writes it to `promote.out`."""
    from mlflow.exceptions import MlflowException

    from ipa_lib.mlops.registry import RegistryError, promote
    from ipa_lib.mlops.tracking import TrackingError, read_lineage, stage_run

    try:
        params = load_params(params_path, overrides)
        out = out or params.promote.out
        if not params.tracking.enabled:
            if not dry_run:
                _write_json(out, {"action": "skipped", "reason": "tracking.enabled is false"})
            print("tracking disabled: no promotion")
            return 0
        lineage = None
        if candidate is None and to_version is None:
            record = Path(params.tracking.register_out)
            if record.is_file():
                rec = json.loads(record.read_text())
                if rec.get("name") == params.tracking.registered_model and rec.get("version"):
                    candidate, lineage = int(rec["version"]), read_lineage(record)
            if candidate is None:
                print(f"note: no {record} from `ipa register`; deciding on the newest version", file=sys.stderr)
        if lineage and not dry_run:  # the DVC promote stage: log the decision in the round
            with stage_run(params, "promote", lineage) as run:
                d = promote(params, candidate, dry_run, to_version)
                run.log_dict(d.to_dict(), "promotion/decision.json")
                run.set_tags({"ipa.promotion.action": d.action, "ipa.promotion.candidate": d.candidate})
                delta = (d.compared or {}).get("delta") or {}
                run.log_metrics({f"promote/delta/{k}": v for k, v in delta.items()} | {"promote/promoted": float(d.promote)})
        else:
            d = promote(params, candidate, dry_run, to_version)
    except (ConfigError, RegistryError, TrackingError, json.JSONDecodeError) as err:
        return _error(str(err))
    except MlflowException as err:
        return _error(f"MLflow: {err.message}")
    print(format_decision(d))
    if not dry_run:
        _write_json(out, d.to_dict())
    return 0
