"""select-best: the pure rule, the sweep folders it reads, and the KFP UI reports."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from ipa_lib.stages.select import (
    eval_metric_items,
    evaluation_html,
    select_best,
    select_from_runs,
    selection_markdown,
)


def test_highest_primary_wins():
    runs = [{"hand_pass_rate": 0.5}, {"hand_pass_rate": 0.8}, {"hand_pass_rate": 0.7}]
    assert select_best(runs, "hand_pass_rate") == 1


def test_ties_go_to_the_first_run():
    runs = [{"m": 0.7}, {"m": 0.9}, {"m": 0.9}]
    assert select_best(runs, "m", higher_is_better=True) == 1


def test_missing_or_non_finite_numbers_cannot_win():
    runs = [{"m": math.nan}, {"other": 1.0}, {"m": -3.0}, {"m": math.inf}, {"m": "high"}, {"m": True}]
    assert select_best(runs, "m", higher_is_better=True) == 2


def test_numpy_numbers_count():
    assert select_best([{"m": np.float32(0.1)}, {"m": np.float64(0.2)}], "m", higher_is_better=True) == 1


@pytest.mark.parametrize("runs", [[], [{"m": math.nan}], [{"x": 1.0}, {"y": 2.0}]])
def test_no_winner_is_a_readable_error(runs):
    with pytest.raises(ValueError, match="select-best") as err:
        select_best(runs, "m", higher_is_better=True)
    if runs:
        assert "'m'" in str(err.value)


# ---- the sweep folders ------------------------------------------------------------------


def _run(root: Path, beta: float, primary: float, *, tag: str | None = None) -> tuple[Path, Path]:
    """An evaluation folder and an adapter folder as the evaluate/train stages write them."""
    name = tag or f"{beta:g}"
    ev, ad = root / f"eval-{name}", root / f"adapter-{name}"
    ev.mkdir(parents=True)
    ad.mkdir(parents=True)
    metrics = {"hand_pass_rate": primary, "psnr": 20.0 + beta / 1000}
    (ev / "eval.json").write_text(json.dumps({"base": {"hand_pass_rate": 0.1, "psnr": 19.0}, "ipa": metrics}))
    (ev / "details.json").write_text(json.dumps({"beta": beta, "method": "ipa"}))
    (ev / "side_by_side.png").write_bytes(b"png")
    (ad / "train_summary.json").write_text(json.dumps({"beta": beta, "steps": 3}))
    (ad / "pytorch_lora_weights.safetensors").write_bytes(f"weights {beta}".encode())
    return ev, ad


def test_select_from_runs_copies_the_winner(tmp_path):
    runs = [_run(tmp_path, 200.0, 0.5), _run(tmp_path, 600.0, 0.9), _run(tmp_path, 2000.0, 0.7)]
    out_ad, out_ev = tmp_path / "best_adapter", tmp_path / "best_eval"
    chosen = select_from_runs([e for e, _ in runs], [a for _, a in runs], "hand_pass_rate", out_ad, out_ev)
    assert chosen["beta"] == 600.0 and chosen["value"] == 0.9 and chosen["index"] == 1
    assert [c["beta"] for c in chosen["candidates"]] == [200.0, 600.0, 2000.0]
    assert (out_ad / "pytorch_lora_weights.safetensors").read_bytes() == b"weights 600.0"
    assert json.loads((out_ev / "eval.json").read_text())["ipa"]["hand_pass_rate"] == 0.9
    assert chosen["metrics"]["base"]["hand_pass_rate"] == 0.1


def test_pairs_by_beta_not_by_position(tmp_path):
    """dsl.Collected may hand adapters and evaluations over in different orders."""
    runs = [_run(tmp_path, 200.0, 0.9), _run(tmp_path, 600.0, 0.5)]
    evals = [runs[1][0], runs[0][0]]
    adapters = [runs[0][1], runs[1][1]]
    chosen = select_from_runs(evals, adapters, "hand_pass_rate", tmp_path / "a", tmp_path / "e")
    assert chosen["beta"] == 200.0
    assert (tmp_path / "a" / "pytorch_lora_weights.safetensors").read_bytes() == b"weights 200.0"


def test_ties_resolve_to_the_smallest_beta_whatever_the_order(tmp_path):
    runs = [_run(tmp_path, 2000.0, 0.8), _run(tmp_path, 200.0, 0.8)]
    chosen = select_from_runs([e for e, _ in runs], [a for _, a in runs], "hand_pass_rate", tmp_path / "a", tmp_path / "e")
    assert chosen["beta"] == 200.0


def test_existing_output_folders_are_replaced(tmp_path):
    ev, ad = _run(tmp_path, 600.0, 0.5)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "stale.txt").write_text("old")
    select_from_runs([ev], [ad], "hand_pass_rate", tmp_path / "a", tmp_path / "e")
    assert not (tmp_path / "a" / "stale.txt").exists()


def test_bad_sweeps_name_the_problem(tmp_path):
    ev1, ad1 = _run(tmp_path, 200.0, 0.5)
    ev2, ad2 = _run(tmp_path, 600.0, 0.6)
    with pytest.raises(ValueError, match="2 evaluations but 1 adapters"):
        select_from_runs([ev1, ev2], [ad1], "hand_pass_rate", tmp_path / "a", tmp_path / "e")
    _, ad_dup = _run(tmp_path, 200.0, 0.1, tag="dup")
    with pytest.raises(ValueError, match="two adapters trained with beta=200.0"):
        select_from_runs([ev1, ev2], [ad1, ad_dup], "hand_pass_rate", tmp_path / "a", tmp_path / "e")
    ev_x, _ = _run(tmp_path, 900.0, 0.9)
    with pytest.raises(ValueError, match="beta=900.0 but no adapter"):
        select_from_runs([ev1, ev_x], [ad1, ad2], "hand_pass_rate", tmp_path / "a", tmp_path / "e")
    (ev2 / "eval.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        select_from_runs([ev1, ev2], [ad1, ad2], "hand_pass_rate", tmp_path / "a", tmp_path / "e")
    (ev2 / "eval.json").write_text(json.dumps({"ipa": {"hand_pass_rate": 1.0}}))
    with pytest.raises(ValueError, match='expected {"base"'):
        select_from_runs([ev1, ev2], [ad1, ad2], "hand_pass_rate", tmp_path / "a", tmp_path / "e")
    (ev2 / "details.json").unlink()
    with pytest.raises(FileNotFoundError, match="evaluation details not found"):
        select_from_runs([ev1, ev2], [ad1, ad2], "hand_pass_rate", tmp_path / "a", tmp_path / "e")
    with pytest.raises(ValueError, match="'missing_metric'"):
        select_from_runs([ev1], [ad1], "missing_metric", tmp_path / "a", tmp_path / "e")


# ---- reports ------------------------------------------------------------------------------


def test_eval_metric_items_use_the_registry_keys():
    items = eval_metric_items({"base": {"psnr": 20.0, "note": "x"}, "ipa": {"psnr": 21.5, "hand_pass_rate": 0.75}})
    assert items == {"eval/psnr": 21.5, "eval/hand_pass_rate": 0.75, "eval/base/psnr": 20.0}


def test_selection_markdown_marks_the_best(tmp_path):
    runs = [_run(tmp_path, 200.0, 0.5), _run(tmp_path, 600.0, 0.9)]
    chosen = select_from_runs([e for e, _ in runs], [a for _, a in runs], "hand_pass_rate", tmp_path / "a", tmp_path / "e")
    md = selection_markdown(chosen)
    assert "Best beta: 600 (hand_pass_rate = 0.9000)" in md
    assert "| 600 **(best)** | 0.9000 |" in md and "| 200 | 0.5000 |" in md and "| base model | 0.1000 |" in md


def test_evaluation_html_embeds_the_side_by_side(tmp_path):
    from PIL import Image

    png = tmp_path / "side_by_side.png"
    Image.new("RGB", (4, 2), (255, 0, 0)).save(png)
    page = evaluation_html({"base": {"psnr": 20.0}, "ipa": {"psnr": 21.25}}, png, "beta = 600")
    assert page.startswith("<!doctype html>") and "<h2>beta = 600</h2>" in page
    assert "<td>psnr</td><td>20.0000</td><td>21.2500</td><td>+1.2500</td>" in page
    assert 'src="data:image/png;base64,iVBOR' in page  # the PNG signature, base64
    assert "<img" not in evaluation_html({"base": {"psnr": 1.0}, "ipa": {"psnr": 1.0}}, tmp_path / "none.png")


def test_select_best_follows_the_registry_direction():
    from ipa_lib.core.metrics import Metric, METRICS

    runs = [{"fd": 3.0}, {"fd": 1.0}, {"fd": 2.0}]
    assert not METRICS["fd"].higher_is_better
    assert select_best(runs, "fd") == 1  # lower is better
    assert select_best(runs, "fd", higher_is_better=True) == 0
    with pytest.raises(ValueError, match="unknown metric"):
        select_best(runs, "no_such_metric")
    assert isinstance(METRICS["psnr"], Metric)


# ---- split discipline: select and promote on val, report on test (issue: independent judge) ----


def test_selection_and_registration_read_the_val_split_never_the_test_split(tmp_path):
    """A sweep where the test numbers favour one beta and the val numbers the other: the pipeline's
    select-best (eval_val.json) and `ipa register`'s default metrics file follow val."""
    from ipa_lib.core.config import Params

    runs = []
    for beta, test_value, val_value in ((200.0, 0.9, 0.1), (600.0, 0.1, 0.9)):
        ev, ad = _run(tmp_path, beta, test_value)
        (ev / "eval_val.json").write_text(json.dumps({"base": {"hand_pass_rate": 0.1}, "ipa": {"hand_pass_rate": val_value}}))
        runs.append((ev, ad))
    evs, ads = [r[0] for r in runs], [r[1] for r in runs]
    on_test = select_from_runs(evs, ads, "hand_pass_rate", tmp_path / "a1", tmp_path / "e1")
    on_val = select_from_runs(evs, ads, "hand_pass_rate", tmp_path / "a2", tmp_path / "e2", eval_file="eval_val.json")
    assert (on_test["beta"], on_val["beta"]) == (200.0, 600.0)
    import inspect

    import components.stages as comps

    assert 'eval_file="eval_val.json"' in inspect.getsource(comps.select_best)
    assert "eval_val.json" in inspect.getsource(comps.register)
    # the DVC register stage and the default rule: val metrics, an independent metric (not the gate's scorer)
    p = Params()
    assert p.evaluate.val_metrics != p.evaluate.metrics and p.promote.primary_metric == "hand_psnr"
    assert p.evaluate.val_pose_seed != p.evaluate.pose_seed
    import ipa_lib.stages.register as reg

    assert "params.evaluate.val_metrics" in inspect.getsource(reg.register)
