"""Great Expectations (1.x) checks on the sample manifest, before the gate selects anything.

The suite (one expectation per line of `_suite`, each with a plain-language `meta.why`):
schema (required columns, per-value types), non-null ids and paths, unique sample ids,
every video decodable (and `error` set exactly when it is not), scores in [0, 1], a score
for every decodable row, frame counts and sizes as configured, and at least `min_kept`
decodable samples at or above the threshold.

GE runs offline in an ephemeral context over the pandas DataFrame with
result_format=COMPLETE, so a failure lists the offending row indices and values.
Usage analytics are switched off (GX_ANALYTICS_ENABLED=false) before GE is imported.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from ipa_lib.core.errors import InputError

SCHEMA: dict[str, str] = {
    "sample_id": "str",
    "video": "str",
    "pose_id": "str",
    "seed": "int",
    "num_frames": "int",
    "height": "int",
    "width": "int",
    "decodable": "bool",
    "error": "str",
    "hand_score": "float",
}
# python type names GE's per-value type check accepts for each schema type
_TYPE_LISTS = {"str": ["str"], "int": ["int"], "bool": ["bool"], "float": ["float", "int"]}
PASS_COLUMN = "_passes_threshold"  # derived: decodable and hand_score >= threshold
MAX_LISTED = 20  # rows/values shown per failure in messages and markdown (JSON has all)


class DataCheckError(InputError):
    """The manifest failed its checks; `report` holds the details."""

    def __init__(self, message: str, report: "DataCheckReport") -> None:
        super().__init__(message)
        self.report = report


@dataclass
class DataCheckReport:
    success: bool
    rows: int
    evaluated: int
    failures: list[dict] = field(default_factory=list)  # expectation, column, why, rows, sample_ids, values, observed

    def to_dict(self) -> dict:
        return asdict(self)

    def summary_lines(self) -> list[str]:
        lines = []
        for f in self.failures:
            target = f"({f['column']})" if f.get("column") else ""
            line = f"- {f['expectation']}{target}: {f['why']}"
            if f.get("rows"):
                line += f"; rows {_short(f['rows'])}"
                if f.get("sample_ids"):
                    line += f" (sample_id {_short(f['sample_ids'])})"
                line += f"; values {_short(f['values'])}"
            if f.get("observed") is not None:
                line += f"; observed {f['observed']}"
            if f.get("exception"):
                line += f"; error: {f['exception']}"
            lines.append(line)
        return lines

    def to_markdown(self) -> str:
        status = "PASSED" if self.success else "FAILED"
        out = [
            f"# Manifest check: {status}",
            "",
            f"{self.rows} rows, {self.evaluated} expectations, {len(self.failures)} failed.",
            "",
        ]
        if self.failures:
            out += ["| expectation | column | why | rows | values / observed |", "|---|---|---|---|---|"]
            for f in self.failures:
                rows = _short(f["rows"]) if f.get("rows") else ""
                if f.get("sample_ids"):
                    rows += f" ({_short(f['sample_ids'])})"
                vals = _short(f["values"]) if f.get("rows") else str(f.get("observed", f.get("exception", "")))
                cells = [f["expectation"], f.get("column") or "", f["why"], rows, vals]
                out.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
            out.append("")
        return "\n".join(out)


def _short(items: list) -> str:
    shown = ", ".join(repr(v) if isinstance(v, str) else str(v) for v in items[:MAX_LISTED])
    more = f", ... (+{len(items) - MAX_LISTED} more)" if len(items) > MAX_LISTED else ""
    return f"[{shown}{more}]"


def _jsonable(v):
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return None if math.isnan(v) else v
    if hasattr(v, "item"):  # numpy scalar
        return _jsonable(v.item())
    if v is pd.NA:
        return None
    return str(v)


def _typed_view(df: pd.DataFrame, columns: list[str], schema: dict[str, str] = SCHEMA) -> pd.DataFrame:
    """Copy with schema columns as object dtype of plain Python values (None for missing).

    GE checks object columns value by value (row indices for every bad value); typed
    columns are compared by dtype only, and pandas' own string dtype never matches.
    Integral floats in int columns (ints with a NaN elsewhere) become ints again.
    """
    view = df.reset_index(drop=True).copy()
    for col in columns:
        if col not in view:
            continue
        s = view[col]
        if schema.get(col) == "int" and pd.api.types.is_float_dtype(s):
            vals = s.dropna()
            if (vals == vals.round()).all():
                s = s.astype("Int64")
        view[col] = pd.Series([None if _jsonable(v) is None else (v.item() if hasattr(v, "item") else v)
                               for v in s.astype(object)], index=view.index, dtype=object)  # fmt: skip
    return view


def _suite(gx, df: pd.DataFrame, *, num_frames, height, width, min_kept, threshold, score_columns, decodable_mostly):
    from great_expectations.expectations.row_conditions import Column

    E = gx.expectations
    present = set(df.columns)
    has_dec = "decodable" in present
    cond = {"row_condition": Column("decodable") == True} if has_dec else {}  # noqa: E712

    def why(text: str) -> dict:
        return {"meta": {"why": text}}

    ex = [E.ExpectTableColumnsToMatchSet(column_set=sorted(set(SCHEMA) | set(score_columns)), exact_match=False,
                                         **why("the manifest has every required column")),
          E.ExpectTableRowCountToBeBetween(min_value=1, **why("the manifest is not empty"))]  # fmt: skip
    types = {**SCHEMA, **{c: "float" for c in score_columns}}
    for col, typ in types.items():
        if col in present:
            ex.append(E.ExpectColumnValuesToBeInTypeList(column=col, type_list=_TYPE_LISTS[typ],
                                                         **why(f"values are of type {typ}")))  # fmt: skip
    for col in ("sample_id", "video", "pose_id", "decodable"):
        if col in present:
            ex.append(E.ExpectColumnValuesToNotBeNull(column=col, **why("ids, paths and flags are never null")))
    if "sample_id" in present:
        ex.append(E.ExpectColumnValuesToBeUnique(column="sample_id", **why("sample ids are unique")))
    if has_dec:
        ex.append(E.ExpectColumnValuesToBeInSet(column="decodable", value_set=[True], mostly=decodable_mostly,
                                                **why("every video decodes")))  # fmt: skip
        if "error" in present:
            ex.append(E.ExpectColumnValuesToBeNull(column="error", **cond,
                                                   **why("decodable rows carry no error")))  # fmt: skip
            undecodable = Column("decodable") == False  # noqa: E712 - builds a GE condition
            ex.append(E.ExpectColumnValuesToNotBeNull(column="error", row_condition=undecodable,
                                                      **why("undecodable rows say why")))  # fmt: skip
    for col in ["hand_score", *score_columns]:
        if col in present:
            ex.append(E.ExpectColumnValuesToBeBetween(column=col, min_value=0.0, max_value=1.0,
                                                      **why("scores lie in [0, 1]")))  # fmt: skip
    if "hand_score" in present:
        ex.append(E.ExpectColumnValuesToNotBeNull(column="hand_score", **cond,
                                                  **why("every decodable sample has a hand score")))  # fmt: skip
    for col, want in (("num_frames", num_frames), ("height", height), ("width", width)):
        if col not in present:
            continue
        if want is not None:
            ex.append(E.ExpectColumnValuesToBeInSet(column=col, value_set=[int(want)], **cond,
                                                    **why(f"{col} is {want} as configured")))  # fmt: skip
        else:
            ex.append(E.ExpectColumnValuesToBeBetween(column=col, min_value=1, **cond,
                                                      **why(f"{col} is positive")))  # fmt: skip
    if PASS_COLUMN in present:
        kept = f"at least {min_kept} decodable samples score >= {threshold}"
        ex.append(E.ExpectColumnSumToBeBetween(column=PASS_COLUMN, min_value=min_kept, **why(kept)))
    return ex


def validate_manifest(
    df: pd.DataFrame,
    *,
    num_frames: int | None,
    height: int | None,
    width: int | None,
    min_kept: int,
    threshold: float,
    score_columns: list[str],
    decodable_mostly: float = 1.0,
) -> DataCheckReport:
    """Run the expectation suite on the manifest; rows are reported by position (0-based).

    decodable_mostly: fraction of rows that must decode (1.0 = every video, the default).
    """
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx

    score_columns = [c for c in score_columns if c != "hand_score"]
    view = _typed_view(df, list(SCHEMA) + score_columns)
    if "hand_score" in view and "decodable" in view:
        score = pd.to_numeric(view["hand_score"], errors="coerce")
        view[PASS_COLUMN] = ((view["decodable"] == True) & (score >= threshold)).astype(int)  # noqa: E712

    expectations = _suite(gx, view, num_frames=num_frames, height=height, width=width, min_kept=min_kept,
                          threshold=threshold, score_columns=score_columns, decodable_mostly=decodable_mostly)
    return _run(gx, view, expectations, "sample_id")


def _run(gx, view: pd.DataFrame, expectations: list, id_column: str) -> DataCheckReport:
    """Validate `view` against `expectations` in an ephemeral GE context (result_format=COMPLETE)."""
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.enable_analytics(False)
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    name = f"table-{uuid.uuid4().hex[:8]}"
    batch = (
        context.data_sources.add_pandas(name)
        .add_dataframe_asset("table")
        .add_batch_definition_whole_dataframe("all")
        .get_batch(batch_parameters={"dataframe": view})
    )
    suite = gx.ExpectationSuite(name=name)
    for e in expectations:
        suite.add_expectation(e)
    result = batch.validate(suite, result_format="COMPLETE")

    ids = view[id_column].tolist() if id_column in view else None
    failures = []
    for res in result.results:
        if res.success:
            continue
        cfg = res.expectation_config
        kw = cfg.kwargs
        r = res.result or {}
        rows = [int(i) for i in r.get("unexpected_index_list") or []]
        exc = res.exception_info or {}
        failures.append({
            "expectation": cfg.type,
            "column": kw.get("column"),
            "why": (cfg.meta or {}).get("why", ""),
            "rows": rows,
            "sample_ids": [_jsonable(ids[i]) for i in rows] if ids is not None else [],
            "values": [_jsonable(v) for v in r.get("unexpected_list") or []],
            "observed": _jsonable_observed(r.get("observed_value"), r.get("details")),
            "exception": exc.get("exception_message") if exc.get("raised_exception") else None,
        })  # fmt: skip
    return DataCheckReport(success=bool(result.success), rows=len(view), evaluated=len(result.results),
                           failures=failures)  # fmt: skip


def _jsonable_observed(observed, details):
    if isinstance(details, dict) and details.get("mismatched"):
        # extra columns are allowed (exact_match=False): only the missing ones matter
        missing = details["mismatched"].get("missing")
        return {"missing": [str(c) for c in missing]} if missing else None
    if isinstance(observed, (list, tuple)):
        return [_jsonable(v) for v in observed]
    return _jsonable(observed)


def check_or_raise(df: pd.DataFrame, report_path: str | os.PathLike, **kwargs) -> DataCheckReport:
    """Validate, write `<report_path>.md` and `.json` atomically, raise DataCheckError on failure."""
    from ipa_lib.core.io import atomic_write_text

    report = validate_manifest(df, **kwargs)
    stem = Path(report_path)
    md, js = stem.with_suffix(".md"), stem.with_suffix(".json")
    atomic_write_text(md, report.to_markdown())
    atomic_write_text(js, json.dumps(report.to_dict(), indent=2) + "\n")
    if not report.success:
        lines = [f"manifest check failed: {len(report.failures)} of {report.evaluated} expectations "
                 f"on {report.rows} rows (report: {md})", *report.summary_lines()]  # fmt: skip
        raise DataCheckError("\n".join(lines), report)
    return report


# ---- cases (ipa_lib.data.cases) ---------------------------------------------------------

CASE_SCHEMA: dict[str, str] = {"case_id": "str", "path": "str", "ok": "bool", "error": "str", "mode": "str",
                               "height": "int", "width": "int", "pose_frames": "int", "needed_frames": "int",
                               "pose_fps": "float", "face_size": "int"}  # fmt: skip


def _case_suite(gx, view: pd.DataFrame, data) -> list:
    from great_expectations.expectations.row_conditions import Column

    E = gx.expectations
    usable = {"row_condition": Column("ok") == True}  # noqa: E712 - builds a GE condition

    def why(text: str) -> dict:
        return {"meta": {"why": text}}

    return [
        E.ExpectTableRowCountToBeBetween(min_value=1, **why("the cases folder holds at least one case")),
        E.ExpectColumnValuesToNotBeNull(column="case_id", **why("every case has an id (its folder name)")),
        E.ExpectColumnValuesToBeUnique(column="case_id", **why("case ids are unique")),
        E.ExpectColumnValuesToBeInSet(column="ok", value_set=[True],
                                      **why("every case has its files, decodes, and covers the clip")),
        E.ExpectColumnValuesToNotBeNull(column="error", row_condition=Column("ok") == False,  # noqa: E712
                                        **why("a refused case says why")),
        E.ExpectColumnValuesToBeInSet(column="mode", value_set=["animate", "replace"], **usable,
                                      **why("animation or replacement mode")),
        E.ExpectColumnValuesToBeInSet(column="_height_mod16", value_set=[0], **usable,
                                      **why("src_pose height is a multiple of 16")),
        E.ExpectColumnValuesToBeInSet(column="_width_mod16", value_set=[0], **usable,
                                      **why("src_pose width is a multiple of 16")),
        E.ExpectColumnPairValuesAToBeGreaterThanB(column_A="pose_frames", column_B="needed_frames", or_equal=True,
                                                  **usable, **why(f"src_pose covers {data.frames} frames at {data.fps:g} fps")),
        E.ExpectColumnValuesToBeBetween(column="pose_fps", min_value=0, strict_min=True, **usable,
                                        **why("the pose video has a frame rate")),
        E.ExpectColumnValuesToBeBetween(column="face_size", min_value=1, **usable, **why("face crops have a size")),
    ]


def check_cases(rows: list[dict], data, report_stem: str | os.PathLike | None = None) -> DataCheckReport:
    """Great Expectations over the probed cases (`ipa_lib.data.cases.probe_case` rows).

    Refused cases fail the `ok` expectation, which names them; they are skipped by the stages
    and the batch goes on. Any other failed expectation (a duplicate id, a usable case that
    breaks a rule) raises DataCheckError. The report goes to `<report_stem>.md/.json`.
    """
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx

    df = pd.DataFrame(rows, columns=list(dict.fromkeys([*CASE_SCHEMA, *(rows[0] if rows else {})])))
    view = _typed_view(df, list(CASE_SCHEMA), CASE_SCHEMA)
    for col in ("height", "width"):
        view[f"_{col}_mod16"] = pd.Series([None if v is None else int(v) % 16 for v in view[col]], dtype=object)
    report = _run(gx, view, _case_suite(gx, view, data), "case_id")
    if report_stem is not None:
        from ipa_lib.core.io import atomic_write_text

        stem = Path(report_stem)
        atomic_write_text(stem.with_suffix(".md"), report.to_markdown())
        atomic_write_text(stem.with_suffix(".json"), json.dumps(report.to_dict(), indent=2) + "\n")
    blocking = [f for f in report.failures if f["column"] != "ok"]
    if blocking:
        lines = [f"case check failed: {len(blocking)} of {report.evaluated} expectations on {report.rows} cases",
                 *DataCheckReport(False, report.rows, report.evaluated, blocking).summary_lines()]
        raise DataCheckError("\n".join(lines), report)
    return report
