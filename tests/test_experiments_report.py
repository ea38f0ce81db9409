"""The experiment sections of `ipa report` (ipa_lib/analysis/experiments.py) on real tiny cells:
trained and evaluated by the real stages (train.save_at, evaluate.along / train_poses,
gate.subset), laid out as scripts/experiments.py collects them."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import yaml

from ipa_lib.analysis.experiments import (diff_verdict, experiments_report, growth, load_exp_cells, paired_diff,
                                          per_pose, point_summary)
from ipa_lib.analysis.stats import Stat

LABELS = {  # label -> (overrides, seeds)
    "k96-sft": ({"loss": "sft"}, (0, 1)),
    "k96-ipa-b6000": ({"loss": "ipa", "beta": 6000.0}, (0, 1)),
    "sgd-sft": ({"loss": "sft", "optimizer": "sgd", "lr": 0.01}, (0,)),
    "sgd-ipa-b60000": ({"loss": "ipa", "beta": 60000.0, "optimizer": "sgd", "lr": 0.01}, (0,)),
    "red-sft": ({"loss": "sft"}, (0,)),
    "red-ipa-b600": ({"loss": "ipa", "beta": 600.0}, (0,)),
}
GRIDS = {"k96": ["budget"], "sgd": ["optimizer"], "red": ["biased"]}


@pytest.fixture(scope="module")
def cells_root(tmp_path_factory, tiny_base):
    """Eight tiny cells (train 6 steps, adapter kept at step 2, evaluated along, 2 evaluation seeds)."""
    from conftest import tiny_params

    from ipa_lib.core.io import load_npz, share_arrays
    from ipa_lib.data.toyworld import shirt_colour
    from ipa_lib.stages.evaluate import evaluate
    from ipa_lib.stages.gate import gate
    from ipa_lib.stages.sample import sample
    from ipa_lib.stages.train import train

    work = tmp_path_factory.mktemp("exp")
    root = work / "cells"
    params = tiny_params(["train.save_at=[2]", "evaluate.seeds=[0,1]", "evaluate.along=true", "evaluate.train_poses=2"])
    params.backend.base_model = str(tiny_base)
    sample(params, work / "samples", progress=False)
    gate(params, work / "samples", work / "gated", progress=False)
    colours = [shirt_colour(r) for r in load_npz(work / "gated" / "scored.npz")["reference"]]
    subset = max(set(colours), key=colours.count)
    biased = params.model_copy(deep=True)
    biased.gate.subset, biased.gate.min_kept = subset, 1
    gate(biased, work / "samples", work / "gated-red", progress=False)
    for label, (over, seeds) in LABELS.items():
        for seed in seeds:
            p = (biased if label.startswith("red-") else params).model_copy(deep=True)
            for k, v in over.items():
                setattr(p.train, k, v)
            p.train.seed = seed
            gated = work / ("gated-red" if label.startswith("red-") else "gated")
            run = work / f"{label}-s{seed}"
            train(p, gated, run / "adapter", progress=False, curve_path=run / "train_curve.json", metrics_path=run / "train.json")
            evaluate(p, run / "adapter", run / "eval", run / "eval.json", progress=False, gated_dir=gated)
            cell = root / f"exp-{label}-s{seed}"
            shutil.copytree(run / "eval", cell)
            for f in ("train_curve.json", "train.json"):
                shutil.copy(run / f, cell / f)
            shutil.copy(gated / "summary.json", cell / "gate_summary.json")
            (cell / "params.yaml").write_text(yaml.safe_dump(p.model_dump(mode="json")))
            (cell / "cell.json").write_text(json.dumps({"name": cell.name, "grids": GRIDS[label.split("-")[0]], "label": label, "seed": seed}))
            share_arrays(cell / "clips.npz", root / "shared-clips", ("base",))  # as scripts/experiments.py collects
    return root


def test_cells_load_with_their_points(cells_root):
    cells = load_exp_cells(cells_root)
    assert len(cells) == 8
    c = next(c for c in cells if c.label == "k96-sft" and c.seed == 0)
    assert sorted(c.points) == [0, 2, 6] and c.loss == "sft" and c.group == "k96"
    pp = per_pose(c, 6)
    assert pp["hand_psnr"].shape == (3,) and np.isfinite(pp["nonhand_psnr"]).all()
    assert (pp["diversity"] >= 0).all() and (pp["diversity"] <= 1).all()
    s = point_summary(c, 6)
    assert {"hand_psnr", "nonhand_psnr", "gap", "diversity", "adapter_norm"} <= set(s)
    ipa = next(c for c in cells if c.label == "k96-ipa-b6000" and c.seed == 0)
    assert 0.0 <= point_summary(ipa, 6)["saturated"] <= 1.0  # IPA's diagnostics
    assert "adapter_norm" not in point_summary(c, 0)  # the base has no training diagnostics
    red = next(c for c in cells if c.label == "red-sft")
    assert {"nonhand_psnr_in", "nonhand_psnr_out"} <= set(point_summary(red, 6)) or not per_pose(red, 6)["kept_colour"].all()


def test_paired_diff_is_the_mean_of_per_pose_differences(cells_root):
    cells = load_exp_cells(cells_root)
    stat, seeds = paired_diff(cells, ("k96-ipa-b6000", 6), ("k96-sft", 6), "hand_psnr", n_boot=200)
    by = {(c.label, c.seed): c for c in cells}
    want = [float(np.mean(per_pose(by[("k96-ipa-b6000", s)], 6)["hand_psnr"] - per_pose(by[("k96-sft", s)], 6)["hand_psnr"])) for s in (0, 1)]
    assert seeds == pytest.approx(want) and stat.mean == pytest.approx(np.mean(want))
    assert stat.lo <= stat.mean <= stat.hi
    none, _ = paired_diff(cells, ("k96-sft", 6), ("missing", 6), "hand_psnr")
    assert none is None


def test_verdict_rules():
    up = Stat(1.0, 0.5, 1.5, 3, "")
    assert diff_verdict(up, [0.8, 1.2]) == "held"
    assert diff_verdict(up, [0.8, -0.1]) == "inconclusive"  # one training seed disagrees
    assert diff_verdict(up, [1.0], expect_positive=False) == "failed"
    assert diff_verdict(Stat(0.1, -0.2, 0.4, 3, ""), [0.1]) == "inconclusive"
    assert diff_verdict(None, []) == "not run"


def test_report_sections_figures_and_numbers(cells_root, tmp_path):
    text, preds = experiments_report(cells_root, tmp_path / "img", tmp_path, tmp_path / "img" / "experiments.json", n_boot=200)
    assert "## Experiments" in text and "### Verdicts" in text
    for name in ("exp_budget.png", "exp_biased.png", "exp_optimizer.png"):
        assert (tmp_path / "img" / name).stat().st_size > 0 and f"img/{name}" in text
    grids = {p.grid for p in preds}
    assert grids == {"budget", "biased", "optimizer"}
    assert all(p.verdict in ("held", "failed", "inconclusive", "not run") for p in preds)
    numbers = json.loads((tmp_path / "img" / "experiments.json").read_text())
    assert len(numbers["cells"]) == 8 and len(numbers["predictions"]) == len(preds)
    sgd = next(c for c in load_exp_cells(cells_root) if c.label == "sgd-sft")
    assert math.isfinite(growth(sgd, 2))


def test_best_beta_is_chosen_on_the_val_split_not_the_reported_test_poses():
    """The paper claims' 'IPA vs DPO/KTO at its best beta' picks beta on val numbers only."""
    from ipa_lib.analysis.cells import Cell
    from ipa_lib.analysis.stats import best_beta_val

    def cell(beta, seed, val, test):
        rows = [{"model": "ipa", "seed": 0, "pose": 0, "hand_psnr": test}]
        return Cell(f"dpo-{beta}-{seed}", 1, "dpo", beta, 10.0, seed, rows, meta={"val": {"ipa": {"hand_psnr": val}}})

    cells = [cell(200.0, s, 20.0, 30.0) for s in (0, 1)] + [cell(2000.0, s, 25.0, 10.0) for s in (0, 1)]
    assert best_beta_val(cells, 1, "dpo", "hand_psnr") == 2000.0  # the test poses would say 200
    assert best_beta_val(cells, 1, "kto", "hand_psnr") is None
    no_val = [Cell("dpo", 1, "dpo", 600.0, 10.0, 0, [], meta={})]
    assert best_beta_val(no_val, 1, "dpo", "hand_psnr") is None
