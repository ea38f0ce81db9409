"""The paper table: intervals and claims from synthetic cells (numbers known by construction),
FD through a pluggable extractor, and the reduced grid end to end (tiny world, 1 seed,
2 methods, a few steps): the report must show exactly the numbers the cells computed, and
the same seed must reproduce them."""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import REPO, TINY, tiny_params

from ipa_lib.analysis.cells import CLIP_METRICS, load_cells, method_name
from ipa_lib.analysis.claims import Config, compare, evaluate_claims, verdict
from ipa_lib.analysis.clip_metrics import reference_set
from ipa_lib.analysis.render import table_digits
from ipa_lib.analysis.report import build_report
from ipa_lib.analysis.stats import Stat, aggregate, bootstrap_interval, find_row, shared_base, t_interval
from ipa_lib.cli.report import add_arguments, report_main

sys.path.insert(0, str(REPO / "scripts"))
import paper_grid  # noqa: E402

POSES = 6


def _base_value(metric: str, i: int) -> float:
    return {"hand_quality": 0.5, "hand_pass_rate": 0.5, "psnr": 20.0, "ssim": 0.6, "hand_psnr": 15.0}[metric] + 0.01 * i


def write_fake_cell(root: Path, method: str, beta: float | None, seed: int, effect: dict[str, float],
                    rnd: int = 1, params: dict | None = None, clips: dict | None = None, start: float = 0.0) -> Path:
    """A collected cell whose aligned rows are the base rows + `effect` (per metric); `start`
    shifts this cell's base (round >= 2: each cell starts from its own round-1 model)."""
    spec = paper_grid.CellSpec(method, beta, seed, rnd)
    rows = []
    for model in ("base", "ipa"):
        for i in range(POSES):
            row = {"model": model, "seed": 0, "pose": 99_000 + i}
            for m in CLIP_METRICS:
                row[m] = _base_value(m, i) + start + (effect.get(m, 0.0) if model == "ipa" else 0.0)
            rows.append(row)
    files = {"per_clip.json": json.dumps(rows).encode(), "params.yaml": yaml.safe_dump(params or {}).encode()}
    if clips is not None:
        buf = root / "tmp.npz"
        root.mkdir(parents=True, exist_ok=True)
        np.savez(buf, **clips)
        files["clips.npz"] = buf.read_bytes()
        buf.unlink()
    return paper_grid.write_cell(root, spec, files, {"total": 10.0 + seed}, "test")


# ---- intervals and verdicts ----------------------------------------------------------------------

def test_shared_arrays_are_kept_once_and_put_back(tmp_path):
    from ipa_lib.core.io import load_npz, load_shared_npz, save_npz, share_arrays

    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (2, 3, 5, 8, 8, 3), dtype=np.uint8)
    files = []
    for i in range(3):
        f = save_npz(tmp_path / f"cell-{i}" / "clips.npz", base=base, ipa=base + i, seeds=np.array([0, 1]))
        moved = share_arrays(f, tmp_path / "shared", ("base", "absent"))
        assert list(moved) == ["base"] and "base" not in load_npz(f)
        files.append(f)
    assert len(list((tmp_path / "shared").glob("*.npz"))) == 1  # one copy for three cells
    for i, f in enumerate(files):
        got = load_shared_npz(f)
        assert sorted(got) == ["base", "ipa", "seeds"]
        np.testing.assert_array_equal(got["base"], base)
        np.testing.assert_array_equal(got["ipa"], base + i)
    (tmp_path / "cell-0").rename(tmp_path / "moved")  # the pointer is relative: a copied folder tree still loads
    np.testing.assert_array_equal(load_shared_npz(tmp_path / "moved" / "clips.npz")["base"], base)
    for f in (tmp_path / "shared").glob("*.npz"):
        f.unlink()
    with pytest.raises(FileNotFoundError, match=r"clips.npz: its 'base' array lives in .*shared.*, which is missing"):
        load_shared_npz(files[1])


def test_t_interval_by_hand():
    s = t_interval([1.0, 2.0, 3.0], 0.95)
    # mean 2, sd 1, t(0.975, 2) = 4.302652729911275
    assert s.mean == 2.0 and s.half_width == pytest.approx(4.302652729911275 / math.sqrt(3))
    single = t_interval([5.0])
    assert single.mean == 5.0 and math.isnan(single.lo)


def test_bootstrap_is_seeded():
    x = np.arange(20.0)
    a = bootstrap_interval(lambda i: x[i].mean(), 20, n_boot=200, seed=3)
    b = bootstrap_interval(lambda i: x[i].mean(), 20, n_boot=200, seed=3)
    assert a == b and a[0] < x.mean() < a[1]
    assert bootstrap_interval(lambda i: x[i].mean(), 20, n_boot=200, seed=4) != a


def test_bootstrap_resamples_both_sides_of_a_comparison_together():
    from scipy import stats

    rng = np.random.default_rng(5)
    a = rng.normal(size=15)
    b = a + 1.0 + rng.normal(scale=0.05, size=15)  # strongly paired with a
    ours = bootstrap_interval(lambda i: a[i].mean() - b[i].mean(), 15, n_boot=500, seed=2)
    paired = stats.bootstrap((a, b), lambda x, y: x.mean() - y.mean(), paired=True, vectorized=False, n_resamples=500,
                             method="percentile", rng=np.random.default_rng(2)).confidence_interval
    unpaired = stats.bootstrap((a, b), lambda x, y: x.mean() - y.mean(), paired=False, vectorized=False, n_resamples=500,
                               method="percentile", rng=np.random.default_rng(2)).confidence_interval
    assert ours == pytest.approx((paired.low, paired.high), abs=1e-12)  # scipy's paired resampling, same seed
    assert ours[1] - ours[0] < 0.2 * (unpaired.high - unpaired.low)  # pairing removes the between-pose spread


def test_bootstrap_edge_cases_and_standard_error():
    from ipa_lib.analysis.stats import bootstrap_se_interval

    assert all(math.isnan(v) for v in bootstrap_interval(lambda i: 1.0, 1))  # one pose: no interval
    y = np.array([np.nan, 1.0, 2.0, 3.0])  # resamples of only the nan pose give nan: dropped
    lo, hi = bootstrap_interval(lambda i: np.nanmean(y[i]) if np.isfinite(y[i]).any() else np.nan, 4, n_boot=500)
    assert 1.0 <= lo < hi <= 3.0
    x = np.random.default_rng(6).normal(size=40)
    lo, hi = bootstrap_se_interval(lambda i: x[i].mean(), 40, 0.25, n_boot=2000)
    se = x.std(ddof=0) / math.sqrt(len(x))  # the bootstrap s.e. of a mean
    assert (lo + hi) / 2 == pytest.approx(0.25) and (hi - lo) / 2 == pytest.approx(1.959964 * se, rel=0.1)


def test_verdicts():
    assert verdict(Stat(1.0, 0.5, 1.5, 3, "")) == "held"
    assert verdict(Stat(-1.0, -1.5, -0.5, 3, "")) == "contradicted"
    assert verdict(Stat(0.1, -0.5, 0.7, 3, "")) == "inconclusive"
    assert verdict(Stat(-1.0, -1.5, -0.5, 3, ""), higher_is_better=False) == "held"  # FD: lower is better
    assert verdict(None) == "not run"


def test_method_names():
    assert method_name("ipa", 10) == "ipa-hand" and method_name("ipa", 1) == "ipa-global"
    with pytest.raises(ValueError, match="unknown loss"):
        method_name("ppo", 1)


# ---- the table and the claims from synthetic cells ------------------------------------------------

@pytest.fixture()
def synthetic(tmp_path):
    """3 seeds; IPA hand beats base, 200 and 2000 clearly; global ties IPA hand; SFT ties too."""
    root = tmp_path / "cells"
    seeds_noise = [0.01, -0.01, 0.0]
    for s, e in enumerate(seeds_noise):
        write_fake_cell(root, "ipa-hand", 600.0, s, {"hand_quality": 0.2 + e, "psnr": -0.1})
        write_fake_cell(root, "ipa-hand", 200.0, s, {"hand_quality": 0.05 + e})
        write_fake_cell(root, "ipa-hand", 2000.0, s, {"hand_quality": 0.1 + e})
        write_fake_cell(root, "ipa-global", 600.0, s, {"hand_quality": 0.2 + [0.02, -0.02, 0.0][s] - e})
        write_fake_cell(root, "sft", None, s, {"hand_quality": 0.2 - [0.03, -0.03, 0.0][s] + e})
    return root


def test_table_is_the_mean_over_seeds_with_a_t_interval(synthetic):
    cells = load_cells(synthetic)
    rows = aggregate(cells, n_boot=200)
    row = find_row(rows, 1, "ipa-hand", 600.0)
    per_seed = [np.mean([_base_value("hand_quality", i) + 0.2 + e for i in range(POSES)]) for e in (0.01, -0.01, 0.0)]
    expected = t_interval(per_seed)
    assert row.stats["hand_quality"].mean == pytest.approx(np.mean(per_seed))
    assert row.stats["hand_quality"].half_width == pytest.approx(expected.half_width)
    assert row.seeds == [0, 1, 2] and row.seconds == pytest.approx(11.0)
    base = find_row(rows, 1, "base")
    assert base.stats["hand_quality"].mean == pytest.approx(np.mean([_base_value("hand_quality", i) for i in range(POSES)]))
    assert "bootstrap" in base.stats["hand_quality"].how
    assert find_row(rows, 1, "sft").beta is None


def test_claims_follow_the_paired_differences(synthetic):
    cells = load_cells(synthetic)
    rows = aggregate(cells, n_boot=200)
    claims = evaluate_claims(cells, rows, primary="hand_quality", n_boot=200)

    def verdict_of(start: str) -> str:
        return next(c.verdict for c in claims if c.text.startswith(start))

    assert verdict_of("Hand-weighted IPA (λ=10, β=600) improves hands without hurting the whole video") == "held"
    assert verdict_of("β=600 beats β=200") == "held"
    assert verdict_of("β=600 beats β=2000") == "held"
    assert verdict_of("Hand-local weighting beats global weighting") == "inconclusive"
    assert verdict_of("IPA beats SFT on the same gated samples") == "inconclusive"
    assert verdict_of("IPA beats Diffusion-DPO at equal steps") == "not run"
    d = compare(cells, 1, Config("ipa-hand", 600.0), Config("ipa-hand", 200.0), "hand_quality")
    assert d.mean == pytest.approx(0.15) and d.n == 3


def test_a_large_psnr_drop_contradicts_no_harm(tmp_path):
    root = tmp_path / "cells"
    for s in range(3):
        write_fake_cell(root, "ipa-hand", 600.0, s, {"hand_quality": 0.2, "psnr": -3.0 - 0.1 * s})
    cells = load_cells(root)
    claims = evaluate_claims(cells, aggregate(cells, n_boot=100), primary="hand_quality", n_boot=100, tolerances={"psnr": 1.0})
    first = claims[0]
    assert first.verdict == "contradicted" and "harmed beyond tolerance" in first.evidence and "Δpsnr = -3.100" in first.evidence


def test_round_two_pairs_each_cell_with_its_start_model(tmp_path):
    root = tmp_path / "cells"
    for s in range(3):
        write_fake_cell(root, "ipa-hand", 600.0, s, {"hand_quality": 0.2})
        write_fake_cell(root, "sft", None, s, {"hand_quality": 0.1})
        # round 2: IPA starts 0.2 higher (its round-1 model) and gains 0.05; SFT starts 0.1 higher, gains 0.01
        write_fake_cell(root, "ipa-hand", 600.0, s, {"hand_quality": 0.05 + 0.01 * s}, rnd=2, start=0.2)
        write_fake_cell(root, "sft", None, s, {"hand_quality": 0.01 + 0.01 * s}, rnd=2, start=0.1)
    cells = load_cells(root)
    assert shared_base([c for c in cells if c.round == 1]) and not shared_base([c for c in cells if c.round == 2])
    rows = aggregate(cells, n_boot=100)
    starts = [r for r in rows if r.round == 2 and r.start_of is not None]
    assert [r.start_of for r in starts] == [("sft", None), ("ipa-hand", 600.0)]
    base_mean = np.mean([_base_value("hand_quality", i) for i in range(POSES)])
    assert starts[1].stats["hand_quality"].mean == pytest.approx(base_mean + 0.2)
    gain = compare(cells, 2, Config("ipa-hand", 600.0), Config("base"), "hand_quality")
    assert gain.mean == pytest.approx(0.06)  # against its own start, not the pretrained base
    claims = evaluate_claims(cells, rows, primary="hand_quality", n_boot=100)
    first2 = next(c for c in claims if c.round == 2)
    assert "vs its start (the round-1 model)" in first2.evidence
    out = tmp_path / "results.md"
    build_report(cells, out, tmp_path / "results", extractors=None, primary="hand_quality", n_boot=100)
    text = out.read_text()
    assert "## Round 2" in text and "| start: round-1 IPA hand (λ=10) β=600 |" in text
    assert (tmp_path / "results" / "beta_hand_quality_round2.png").exists()


def test_claims_are_data_with_their_differences(synthetic, tmp_path):
    """Each claim keeps a stable key and the paired differences it was judged on; cells.json carries them."""
    cells = load_cells(synthetic)
    rows = aggregate(cells, n_boot=200)
    claims = {c.key: c for c in evaluate_claims(cells, rows, primary="hand_quality", n_boot=200)}
    assert list(claims) == ["no_harm", "beta_vs_200", "beta_vs_2000", "hand_vs_global", "vs_sft", "vs_dpo", "vs_kto"]
    d = compare(cells, 1, Config("ipa-hand", 600.0), Config("ipa-hand", 200.0), "hand_quality", n_boot=200)
    assert claims["beta_vs_200"].diffs["hand_quality"] == d and d.mean == pytest.approx(0.15)
    assert claims["no_harm"].diffs["psnr"].mean == pytest.approx(-0.1)  # the whole-video side of the claim
    assert claims["vs_dpo"].verdict == "not run" and claims["vs_dpo"].diffs == {"hand_quality": None}
    build_report(cells, tmp_path / "results.md", tmp_path / "results", extractors=None, primary="hand_quality", n_boot=200)
    saved = {c["key"]: c for c in json.loads((tmp_path / "results" / "cells.json").read_text())["claims"]}
    assert saved["beta_vs_200"]["diffs"]["hand_quality"]["mean"] == pytest.approx(d.mean)
    assert saved["beta_vs_200"]["diffs"]["hand_quality"]["lo"] == pytest.approx(d.lo) and saved["vs_dpo"]["diffs"]["hand_quality"] is None


def test_ipa_report_names_a_bad_extractor_and_exits_2(synthetic, tmp_path, capsys):
    from ipa_lib.cli import main

    code = main(["report", "--cells", str(synthetic), "--out", str(tmp_path / "r.md"), "--extractor", "no_such_module:fn",
                 "--params", str(REPO / "params.yaml"), "--quiet"])
    assert code == 2 and "--extractor 'no_such_module:fn': cannot import it" in capsys.readouterr().err
    assert not (tmp_path / "r.md").exists()


def test_single_seed_comparisons_pair_the_clips(tmp_path):
    root = tmp_path / "cells"
    write_fake_cell(root, "ipa-hand", 600.0, 0, {"hand_quality": 0.1})
    write_fake_cell(root, "sft", None, 0, {"hand_quality": 0.04})
    cells = load_cells(root)
    d = compare(cells, 1, Config("ipa-hand", 600.0), Config("sft"), "hand_quality", n_boot=200)
    assert d.mean == pytest.approx(0.06) and d.lo == pytest.approx(0.06) and d.hi == pytest.approx(0.06)
    assert "paired bootstrap" in d.how


def test_markdown_shows_the_computed_numbers(synthetic, tmp_path):
    cells = load_cells(synthetic)
    out = tmp_path / "docs" / "results.md"
    result = build_report(cells, out, tmp_path / "docs" / "results", extractors=None, primary="hand_quality", n_boot=200)
    text = out.read_text()
    row = find_row(result["rows"], 1, "ipa-hand", 600.0)
    s = row.stats["hand_quality"]
    assert f"| IPA hand (λ=10) | 600 | 10 | 3 | {s.mean:.3f} ± {s.half_width:.3f} |" in text
    assert "**held**" in text and "**inconclusive**" in text
    for m in CLIP_METRICS:
        assert (tmp_path / "docs" / "results" / f"beta_{m}.png").stat().st_size > 0
        assert f"](results/beta_{m}.png)" in text
    saved = json.loads((tmp_path / "docs" / "results" / "cells.json").read_text())
    got = next(r for r in saved["rows"] if r["method"] == "ipa-hand" and r["beta"] == 600.0)
    assert got["stats"]["hand_quality"]["mean"] == pytest.approx(s.mean)
    assert "No cell stored its generated clips" in text


# ---- FD through a pluggable extractor ----------------------------------------------------------------

def _colour_stats(clips: np.ndarray) -> np.ndarray:
    """A stand-in extractor: per-channel mean and std of each clip."""
    x = clips.reshape(len(clips), -1, 3).astype(np.float64)
    return np.concatenate([x.mean(1), x.std(1)], axis=1)


def test_fd_columns_come_from_the_extractor(tmp_path):
    from ipa_lib.analysis.features import frechet_distance, hand_view

    params = tiny_params([f"evaluate.num_poses={POSES}"]).model_dump(mode="json")
    ref = reference_set(params)
    target = ref["target"]
    noisy = np.clip(target.astype(int) + np.random.default_rng(0).integers(-60, 60, target.shape), 0, 255).astype(np.uint8)
    clips = {"base": noisy[None], "ipa": target[None], "seeds": np.array([0])}
    root = tmp_path / "cells"
    write_fake_cell(root, "ipa-hand", 600.0, 0, {"hand_quality": 0.1}, params=params, clips=clips)
    cells = load_cells(root)
    extractors = {"fd": _colour_stats, "hand_fd": _colour_stats}
    result = build_report(cells, tmp_path / "results.md", tmp_path / "results", extractors=extractors, primary="hand_quality", n_boot=100)
    fd_base = frechet_distance(_colour_stats(noisy), _colour_stats(target))
    hand_base = frechet_distance(_colour_stats(hand_view(noisy, ref["hand_keypoints"])), _colour_stats(hand_view(target, ref["hand_keypoints"])))
    assert cells[0].set_metrics["base"]["fd"] == pytest.approx(fd_base)
    assert cells[0].set_metrics["base"]["hand_fd"] == pytest.approx(hand_base)
    assert cells[0].set_metrics["ipa"]["fd"] == pytest.approx(0.0, abs=1e-9)  # the ground truth itself
    text = (tmp_path / "results.md").read_text()
    assert f"{fd_base:.3f} ± " in text  # base row, bootstrap interval
    row = find_row(result["rows"], 1, "ipa-hand", 600.0)
    assert {"fd", "hand_fd", "score_gaps", "hand_sharpness"} <= set(row.stats)
    assert row.stats["hand_sharpness"].mean == pytest.approx(1.0)  # ground truth is as sharp as itself
    assert (tmp_path / "results" / "clips.png").stat().st_size > 0 and "](results/clips.png)" in text
    assert (tmp_path / "results" / "beta_fd.png").exists()

    # the same through `ipa report --extractor module:callable` (any extractor plugs in)
    args = add_arguments(argparse.ArgumentParser()).parse_args(
        ["--cells", str(root), "--out", str(tmp_path / "cli.md"), "--extractor", "test_report:_colour_stats",
         "--params", str(REPO / "params.yaml"), "--bootstrap", "100", "--quiet"])
    assert report_main(args) == 0
    saved = json.loads((tmp_path / "cli" / "cells.json").read_text())
    assert saved["cells"][0]["set_metrics"]["base"]["fd"] == pytest.approx(fd_base)


# ---- the grid plan ------------------------------------------------------------------------------------------

def test_full_grid_plan_is_39_dvc_experiments():
    specs = paper_grid.plan()
    assert len(specs) == 39 and len({s.name for s in specs}) == 39
    common = paper_grid.budget_overrides(paper_grid.BUDGET, ["train.steps=7"])
    cmd = paper_grid.exp_cmd(next(s for s in specs if s.method == "ipa-global" and s.beta == 200.0), common, "queue")
    assert cmd[:4] == ["dvc", "exp", "run", "--queue"] and cmd[-1] == "evaluate"
    sets = [cmd[i + 1] for i, a in enumerate(cmd) if a == "-S"]
    assert {"train.loss=ipa", "train.beta=200", "train.hand_weight=1", "train.steps=7"} <= set(sets)
    assert "train.steps=100" not in sets  # --set wins over the budget
    with pytest.raises(SystemExit, match="round 2"):
        paper_grid.plan(["sft"], round_=2, init_adapters={})


def test_dpo_cells_get_equal_compute_per_step():
    """A DPO item is a pair of clips: its batch is half the grid's, whatever the grid's is."""
    specs = {s.name: s for s in paper_grid.plan()}
    for extra, want in (([], "4"), (["train.batch_size=6"], "3"), (["train.batch_size=1"], "1")):
        common = paper_grid.budget_overrides(paper_grid.BUDGET, extra)
        batches = {name: dict(o.split("=", 1) for o in paper_grid.cell_overrides(s, common))["train.batch_size"]
                   for name, s in specs.items()}
        grid = dict(o.split("=", 1) for o in common)["train.batch_size"]
        assert {n: b for n, b in batches.items() if "-dpo-" in n} == {n: want for n in batches if "-dpo-" in n}
        assert {b for n, b in batches.items() if "-dpo-" not in n} == {grid}
    cmd = paper_grid.exp_cmd(specs["paper-r1-dpo-b600-s1"], paper_grid.budget_overrides(paper_grid.BUDGET, []), "queue")
    sets = [cmd[i + 1] for i, a in enumerate(cmd) if a == "-S"]
    assert [s for s in sets if s.startswith("train.batch_size=")] == ["train.batch_size=4"]  # once, not twice


# ---- the reduced grid end to end --------------------------------------------------------------------------

def _report_args(cells: Path, out: Path, features: Path) -> argparse.Namespace:
    return add_arguments(argparse.ArgumentParser()).parse_args(
        ["--cells", str(cells), "--out", str(out), "--features", str(features), "--params", str(REPO / "params.yaml"),
         "--bootstrap", "100", "--quiet"])


def _row_values(text: str, title: str) -> list[str]:
    line = next(l for l in text.splitlines() if l.startswith(f"| {title} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_reduced_grid_report_from_its_own_numbers(tiny_base, tmp_path):
    from ipa_lib.analysis.features import train_extractors

    common = paper_grid.budget_overrides(paper_grid.BUDGET, TINY + [f"backend.base_model={tiny_base}", "train.steps=3", "train.batch_size=4"])
    specs = paper_grid.plan(["ipa-hand", "sft"], [600.0], [0])
    cells_root = tmp_path / "cells"
    paper_grid.run_inline(specs, REPO / "params.yaml", common, tmp_path / "work", cells_root)
    train_extractors(tmp_path / "features", frames=5, size=16, corpus_size=16, steps=3)

    out = tmp_path / "docs" / "results.md"
    assert report_main(_report_args(cells_root, out, tmp_path / "features")) == 0
    text = out.read_text()

    # the table's IPA and SFT rows are the means of the per-clip rows the cells wrote
    for spec in specs:  # evaluate stores its clips: the set-level columns (FD) have numbers
        assert (cells_root / "round-1" / spec.name / "clips.npz").stat().st_size > 0
    # the two cells' base clips (the same model, poses and seeds) are kept once
    assert len(list((cells_root / paper_grid.SHARED_CLIPS).glob("*.npz"))) == 1
    assert {c.name: c.clips["base"].shape for c in load_cells(cells_root)}.keys() == {s.name for s in specs}
    for spec, title in zip(specs, ("IPA hand (λ=10)", "SFT on gated")):
        rows = json.loads((cells_root / "round-1" / spec.name / "per_clip.json").read_text())
        vals = _row_values(text, title)
        assert vals[3] == "1"  # one training seed
        for j, m in enumerate(CLIP_METRICS):
            mean = np.mean([r[m] for r in rows if r["model"] == "ipa"])
            digits = table_digits(m)
            assert re.match(rf"^{re.escape(f'{mean:.{digits}f}')}( ± |$)", vals[4 + j]), (m, vals[4 + j], mean)
        set_level = vals[4 + len(CLIP_METRICS):]
        assert set_level and all(v != "n/a" for v in set_level), vals
    assert "Hand-weighted IPA (λ=10, β=600) improves hands without hurting the whole video:" in text
    assert re.search(r"IPA beats SFT on the same gated samples \*\(not in the paper\)\*: \*\*(held|did not hold|inconclusive)\*\*", text)
    assert "β=600 beats β=200 (extra-hand artefacts): not run" in text
    assert (out.parent / "results" / "beta_hand_quality.png").stat().st_size > 0
    assert "](results/clips.png)" in text and (out.parent / "results" / "clips.png").stat().st_size > 0

    # the same seed reproduces the same numbers: rerun the IPA cell elsewhere, then the report
    again = tmp_path / "again"
    paper_grid.run_inline(specs[:1], REPO / "params.yaml", common, tmp_path / "work2", again)
    a = json.loads((cells_root / "round-1" / specs[0].name / "per_clip.json").read_text())
    b = json.loads((again / "round-1" / specs[0].name / "per_clip.json").read_text())
    assert a == b
    out2 = tmp_path / "docs2" / "results.md"
    assert report_main(_report_args(again, out2, tmp_path / "features")) == 0
    assert _row_values(out2.read_text(), "IPA hand (λ=10)") == _row_values(text, "IPA hand (λ=10)")


# ---- the same cells as real DVC experiments -----------------------------------------------------------------

@pytest.mark.slow
def test_grid_cells_run_as_dvc_experiments(scratch_dvc_repo, tmp_path, monkeypatch):
    """`dvc exp run --temp -S ... evaluate` per cell in a scratch git+DVC repo, collected via dvc.api;
    the workspace's params.yaml is left as it was (other people work in the same tree)."""
    import os

    repo, env = scratch_dvc_repo(TINY)
    for k, v in env.items():  # paper_grid runs dvc with this process's environment
        if os.environ.get(k) != v:
            monkeypatch.setenv(k, v)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    before = (repo / "params.yaml").read_text()

    common = paper_grid.budget_overrides(paper_grid.BUDGET, ["train.steps=2", "train.batch_size=4", "evaluate.num_poses=3",
                                                             "evaluate.val_poses=3", "evaluate.num_inference_steps=2", "tracking.enabled=false"])
    specs = paper_grid.plan(["ipa-hand"], [200.0], [1])
    cells = repo / ".ipa" / "paper"
    paper_grid.run_dvc(specs, common, "temp", cells, repo)

    cell = cells / "round-1" / specs[0].name
    record = json.loads((cell / "cell.json").read_text())
    assert record["source"].startswith("dvc:") and record["seconds"]["total"] > 0 and record["steps"] == 2
    exp_params = yaml.safe_load((cell / "params.yaml").read_text())
    assert exp_params["train"]["beta"] == 200.0 and exp_params["train"]["seed"] == 1 and exp_params["train"]["steps"] == 2
    assert len(json.loads((cell / "per_clip.json").read_text())) == 2 * 3
    assert (cell / "adapter" / "pytorch_lora_weights.safetensors").exists()
    assert (repo / "params.yaml").read_text() == before  # --temp: the shared workspace is untouched
    listed = paper_grid.existing_experiments(repo, {**os.environ})
    assert specs[0].name in listed and listed[specs[0].name]["params"]["train"]["beta"] == 200.0

    out = tmp_path / "results.md"
    args = add_arguments(argparse.ArgumentParser()).parse_args(
        ["--cells", str(cells), "--out", str(out), "--no-fd", "--params", str(REPO / "params.yaml"), "--bootstrap", "50", "--quiet"])
    assert report_main(args) == 0
    assert "| IPA hand (λ=10) | 200 | 10 | 1 |" in out.read_text()


# `dvc queue status` as DVC 3 printed it here while the experiment grid ran (two tasks running
# under one live worker, others waiting, older tasks of the same prefix done)
QUEUE_STATUS = """Task     Name                    Created    Status
a1d5312  exp-sgd-ipa-b6000-s0    01:16 PM   Running
ae478d2  exp-sgd-ipa-b60000-s0   01:16 PM   Queued
fbe05f0  exp-k24-sft_t2-s0       01:15 PM   Success
8c2c421  exp-sgd-ipa-b600-s0     01:16 PM   Failed

Worker status: 1 active, 0 idle
"""


def test_queue_state_counts_only_the_named_cells_by_their_exact_name():
    names = ["exp-sgd-ipa-b6000-s0", "exp-sgd-ipa-b60000-s0", "exp-k24-sft_t2-s0"]
    assert paper_grid.queue_state(QUEUE_STATUS, names) == (1, 1, 1)
    # exact names: exp-sgd-ipa-b600-s0 is not a prefix match of the b6000 / b60000 rows
    assert paper_grid.queue_state(QUEUE_STATUS, ["exp-sgd-ipa-b600-s0"]) == (0, 0, 1)
    assert paper_grid.queue_state("No experiment tasks in the queue.\n", names) == (0, 0, 0)


def test_cells_collected_by_an_earlier_checkout_count_as_run(tmp_path):
    import experiments  # scripts/experiments.py

    (tmp_path / "exp-k96-sft-s0").mkdir()
    (tmp_path / "exp-k96-sft-s0" / "cell.json").write_text("{}")  # collected before; its experiment is gone
    (tmp_path / "exp-k96-sft-s1").mkdir()  # a folder without cell.json was never collected
    names = ["exp-k96-sft-s0", "exp-k96-sft-s1", "exp-k24-sft-s0", "exp-k24-sft-s1"]
    exps = {"exp-k24-sft-s0": {"rev": "0" * 40, "timestamp": "2026-12-02T14:00:00"}}
    assert experiments.not_run(names, exps, tmp_path) == ["exp-k96-sft-s1", "exp-k24-sft-s1"]
