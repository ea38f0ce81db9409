"""Great Expectations suite on the sample manifest.

Passes on a good manifest; on a broken one names the expectation and the rows.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest

os.environ["GX_ANALYTICS_ENABLED"] = "false"  # before GE is imported anywhere

from ipa_lib.data.checks import DataCheckError, check_or_raise, validate_manifest  # noqa: E402

SCORES = ["hand_score", "score_presence", "score_confidence"]
KW = dict(num_frames=5, height=32, width=32, min_kept=3, threshold=0.75, score_columns=SCORES)


def manifest(n: int = 8) -> pd.DataFrame:
    rows = []
    for i in range(n):
        rows.append({"sample_id": f"s-{i:03d}", "video": f"shard-000.npz#{i}", "pose_id": f"p{i // 2}",
                     "seed": 1000 + i, "num_frames": 5, "height": 32, "width": 32, "decodable": True, "error": None,
                     "hand_score": 0.501 + 0.05 * i, "score_presence": 1.0, "score_confidence": 0.9})  # fmt: skip
    return pd.DataFrame(rows)


def failures_by_name(report) -> dict[tuple[str, str | None], dict]:
    return {(f["expectation"], f["column"]): f for f in report.failures}


def test_good_manifest_passes(tmp_path):
    df = manifest()
    report = check_or_raise(df, tmp_path / "report", **KW)
    assert report.success and report.failures == [] and report.evaluated >= 20
    assert "PASSED" in (tmp_path / "report.md").read_text()
    assert json.loads((tmp_path / "report.json").read_text())["success"] is True
    assert os.environ["GX_ANALYTICS_ENABLED"] == "false"


def test_unconfigured_sizes_and_ints_stored_as_floats():
    """Real-video manifests: sizes vary (not configured); ints with gaps arrive as floats."""
    df = manifest()
    df["height"] = [720, 480, 720, 1080, 720, 720, 480, 720]
    df["num_frames"] = df["num_frames"].astype(float)
    report = validate_manifest(df, **{**KW, "num_frames": None, "height": None, "width": None})
    assert report.success, report.failures


@pytest.fixture(scope="module")
def broken_report():
    df = manifest(10)
    df["seed"] = df["seed"].astype(object)
    df.loc[2, "hand_score"] = 1.7  # out of range
    df.loc[3, "score_presence"] = -0.1  # out of range
    df.loc[5, "sample_id"] = "s-004"  # duplicate id
    df.loc[6, "video"] = None  # null path
    df.loc[7, "num_frames"] = 4  # not as configured
    df.loc[8, "decodable"] = False  # undecodable, and no error given
    df.loc[1, "seed"] = "seven"  # wrong type
    df = df.drop(columns=["pose_id"])  # schema: missing column
    return validate_manifest(df, **{**KW, "min_kept": 9})


def test_broken_manifest_names_expectations_and_rows(broken_report):
    r = broken_report
    assert not r.success
    f = failures_by_name(r)
    assert f[("expect_column_values_to_be_between", "hand_score")]["rows"] == [2]
    assert f[("expect_column_values_to_be_between", "hand_score")]["values"] == [1.7]
    assert f[("expect_column_values_to_be_between", "score_presence")]["rows"] == [3]
    dup = f[("expect_column_values_to_be_unique", "sample_id")]
    assert dup["rows"] == [4, 5] and dup["sample_ids"] == ["s-004", "s-004"]
    assert f[("expect_column_values_to_not_be_null", "video")]["rows"] == [6]
    assert f[("expect_column_values_to_be_in_set", "num_frames")]["values"] == [4]
    assert f[("expect_column_values_to_be_in_set", "decodable")]["rows"] == [8]
    assert f[("expect_column_values_to_not_be_null", "error")]["rows"] == [8]
    assert f[("expect_column_values_to_be_in_type_list", "seed")]["values"] == ["seven"]
    assert f[("expect_table_columns_to_match_set", None)]["observed"] == {"missing": ["pose_id"]}
    kept = f[("expect_column_sum_to_be_between", "_passes_threshold")]
    assert "at least 9" in kept["why"]
    assert len(r.failures) == 10


def test_check_or_raise_writes_report_and_message(tmp_path):
    df = manifest()
    df.loc[3, "hand_score"] = np.nan  # a decodable sample without a score
    df.loc[4, "height"] = 31
    with pytest.raises(DataCheckError) as err:
        check_or_raise(df, tmp_path / "gate-report", **KW)
    msg = str(err.value)
    assert "expect_column_values_to_not_be_null(hand_score)" in msg and "rows [3]" in msg and "'s-003'" in msg
    assert "expect_column_values_to_be_in_set(height)" in msg and "rows [4]" in msg and "values [31]" in msg
    assert str(tmp_path / "gate-report.md") in msg
    md = (tmp_path / "gate-report.md").read_text()
    assert "FAILED" in md and "expect_column_values_to_be_in_set" in md and "[4]" in md
    saved = json.loads((tmp_path / "gate-report.json").read_text())
    assert saved["success"] is False and err.value.report.to_dict() == saved
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gate-report.json", "gate-report.md"]  # no temp files


def test_too_few_kept():
    df = manifest()
    df["hand_score"] = 0.2
    r = validate_manifest(df, **KW)
    assert [(f["expectation"], f["column"]) for f in r.failures] == [
        ("expect_column_sum_to_be_between", "_passes_threshold")
    ]
    assert r.failures[0]["observed"] == 0
