"""Evaluation fans out: `evaluate_shard` per shard, then `merge_evaluations`, the same files as `evaluate`.

On the tiny toy round (a trained adapter): two shards merged give the one-process evaluation's
files (metrics byte for byte, the same per-clip rows and clips), and so does the DVC path's
`evaluate.workers` pool; the merge refuses a missing shard, a shard given twice, a shard made with
other params, a repeated clip row and a missing one. Through kfp.local (SubprocessRunner) the
beta loop with `evaluate.shards=2` (a nested ParallelFor of evaluate-shard, then
merge-evaluations) gives the evaluate task's metrics.
"""

# no `from __future__ import annotations`: KFP reads the test pipeline's real annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import copy_shard, tiny_params

FILES = ("per_clip.json", "per_clip_val.json", "details.json")


@pytest.fixture(scope="module")
def trained(tiny_base, tmp_path_factory):
    """(params, workdir with adapter/, one/ = the one-process evaluation) of the tiny round."""
    from ipa_lib.stages.evaluate import evaluate
    from ipa_lib.stages.gate import gate
    from ipa_lib.stages.sample import sample
    from ipa_lib.stages.train import train

    work = tmp_path_factory.mktemp("evalshards")
    params = tiny_params()
    params.backend.base_model = str(tiny_base)
    sample(params, work / "samples", progress=False)
    gate(params, work / "samples", work / "gated", progress=False)
    train(params, work / "gated", work / "adapter", progress=False)
    evaluate(params, work / "adapter", work / "one", work / "one.json", progress=False, val_metrics_path=work / "one_val.json")
    return params, work


def _sharded(params, shards: int):
    p = params.model_copy(deep=True)
    p.evaluate.shards = shards
    return p


def _same_evaluation(a: Path, b: Path) -> None:
    assert sorted(f.name for f in a.iterdir()) == sorted(f.name for f in b.iterdir())
    for f in FILES:
        assert json.loads((a / f).read_text()) == json.loads((b / f).read_text()), f
    with np.load(a / "clips.npz") as x, np.load(b / "clips.npz") as y:
        assert sorted(x.files) == sorted(y.files)
        for k in x.files:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


@pytest.fixture(scope="module")
def shard_dirs(trained):
    from ipa_lib.stages.evaluate import evaluate_shard

    params, work = trained
    for s in (0, 1):
        evaluate_shard(_sharded(params, 2), work / "adapter", s, work / f"shard{s}", progress=False)
    return [work / "shard0", work / "shard1"]


def test_two_shards_merge_to_the_one_process_evaluation(trained, shard_dirs):
    from ipa_lib.stages.evaluate import merge_evaluations

    params, work = trained
    s0, s1 = shard_dirs
    assert json.loads((s0 / "shard.json").read_text())["units"] == [{"split": "test", "lo": 0, "hi": 3}]
    assert json.loads((s1 / "shard.json").read_text())["units"] == [{"split": "val", "lo": 0, "hi": 3}]
    merge_evaluations(_sharded(params, 2), [s1, s0], work / "merged", work / "merged.json", work / "merged_val.json")
    assert (work / "merged.json").read_bytes() == (work / "one.json").read_bytes()
    assert (work / "merged_val.json").read_bytes() == (work / "one_val.json").read_bytes()
    _same_evaluation(work / "one", work / "merged")
    assert len(json.loads((work / "merged" / "per_clip.json").read_text())) == 3 * 2  # 3 poses x (base, ipa) x 1 seed


def test_dvc_worker_pool_writes_the_same_files(trained, tmp_path):
    from ipa_lib.stages.evaluate import evaluate

    params, work = trained
    p = _sharded(params, 2)
    p.evaluate.workers = 2
    evaluate(p, work / "adapter", tmp_path / "eval", tmp_path / "eval.json", progress=False, val_metrics_path=tmp_path / "val.json")
    assert (tmp_path / "eval.json").read_bytes() == (work / "one.json").read_bytes()
    assert (tmp_path / "val.json").read_bytes() == (work / "one_val.json").read_bytes()
    _same_evaluation(work / "one", tmp_path / "eval")
    assert sorted(f.name for f in tmp_path.iterdir()) == ["eval", "eval.json", "val.json"]  # no work folder left


def _copy(src: Path, dst: Path, edit_rows=None) -> Path:
    return copy_shard(src, dst, "rows.json", edit_rows)


def test_merge_refuses_a_bad_union(trained, shard_dirs, tmp_path):
    from ipa_lib.core.errors import InputError
    from ipa_lib.stages.evaluate import evaluate_shard, merge_evaluations

    params, work = trained
    p = _sharded(params, 2)
    s0, s1 = shard_dirs

    def refused(dirs, needle, params=p):
        with pytest.raises(InputError, match=needle):
            merge_evaluations(params, dirs, tmp_path / "out", tmp_path / "out.json")
        assert not (tmp_path / "out").exists() and not (tmp_path / "out.json").exists()

    refused([s0], r"expected shards \[0, 1\], got \[0\]; missing \[1\]")
    refused([s0, s0], "evaluation shard 0 given twice")
    refused([s0, s1], r"expected shards \[0, 1, 2\]", _sharded(params, 3))
    other = _sharded(params, 2)
    other.evaluate.num_inference_steps = 1
    evaluate_shard(other, work / "adapter", 1, tmp_path / "other", progress=False)
    refused([s0, tmp_path / "other"], "evaluation shard 1 was made with other params")
    dup = _copy(s1, tmp_path / "dup", lambda r: r["val"].append(r["val"][0]))
    refused([s0, dup], r"evaluation shard 1: clip \('val', 98000, 0, 'base'\) has more than one row")
    lost = _copy(s1, tmp_path / "lost", lambda r: r["val"].pop())
    refused([s0, lost], r"evaluation shard 1 lacks the row of planned clip \('val', 98002, 0, 'ipa'\)")
    refused([s0, tmp_path], "not an evaluation shard")


def test_shard_path_refuses_the_toy_experiments(trained, tmp_path):
    from ipa_lib.core.errors import InputError
    from ipa_lib.stages.evaluate import evaluate, evaluate_shard

    params, work = trained
    p = _sharded(params, 2)
    p.evaluate.along = True
    with pytest.raises(InputError, match="evaluate.along=True"):
        evaluate_shard(p, work / "adapter", 0, tmp_path / "s", progress=False)
    p.evaluate.workers, p.evaluate.along, p.evaluate.train_poses = 2, False, 1
    with pytest.raises(InputError, match="evaluate.train_poses=1"):
        evaluate(p, work / "adapter", tmp_path / "e", tmp_path / "e.json", progress=False)
    assert not list(tmp_path.iterdir())


# ---- kfp.local: the beta loop with the evaluation fanned out ---------------------------


def _eval_part(params, adapter: Path, pipeline_root: Path) -> Path:
    """resolve-params, then inside ParallelFor(beta) the round's evaluation (evaluate, or with
    evaluate.shards > 1 ParallelFor(shard: evaluate-shard) -> merge-evaluations), through kfp.local;
    returns the evaluation artifact folder."""
    from kfp import dsl, local

    from components.stages import build
    from ipa_lib.orchestration.kfp import canonical_json, typed_values
    from ipa_lib.stages.evaluate import evaluation_shards

    c = build("unused", "unused")
    base = params.backend.base_model

    @dsl.pipeline(name="eval-part")
    def eval_part(params_json: str):
        resolved = c["resolve_params"](params_json=params_json, **typed_values(params))
        imported = dsl.importer(artifact_uri=str(adapter), artifact_class=dsl.Model, reimport=False)
        with dsl.ParallelFor(items=[params.train.beta], name="beta-sweep") as beta:
            if params.evaluate.shards > 1:
                with dsl.ParallelFor(items=evaluation_shards(params), name="evaluate-shards") as shard:
                    part = c["evaluate_shard"](params=resolved.outputs["params"], shard=shard, base_model=base,
                                               adapter=imported.output)
                c["merge_evaluations"](params=resolved.outputs["params"], beta=beta, adapter=imported.output,
                                       shards=dsl.Collected(part.outputs["evaluated"]))
            else:
                c["evaluate"](params=resolved.outputs["params"], beta=beta, base_model=base, adapter=imported.output)

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root), raise_on_error=True)
    eval_part(params_json=canonical_json(params))
    (run,) = pipeline_root.glob("eval-part-*")
    (evaluation,) = run.glob("for-loop-*/*/evaluation")
    return evaluation


@pytest.mark.slow
def test_kfp_local_two_evaluation_shards_give_the_metrics_of_one(trained, tmp_path):
    params, work = trained
    one = _eval_part(params, work / "adapter", tmp_path / "one")
    two = _eval_part(_sharded(params, 2), work / "adapter", tmp_path / "two")
    assert one.parent.name == "evaluate" and two.parent.name == "merge-evaluations"
    assert len(list(two.parents[1].glob("for-loop-*-iteration-*/evaluate-shard/evaluated"))) == 2
    for f in ("eval.json", "eval_val.json"):
        assert (two / f).read_bytes() == (one / f).read_bytes() == (work / f"one{'' if f == 'eval.json' else '_val'}.json").read_bytes(), f
    _same_evaluation(one, two)
    # what the KFP UI shows: the same logged metrics, and the HTML report with the strip
    logged = [json.loads((d.parent / "executor_output.json").read_text())["artifacts"]["metrics"]["artifacts"][0]["metadata"]
              for d in (one, two)]
    assert logged[0] == logged[1] and logged[0]
    assert "data:image/png;base64," in (two.parent / "report").read_text()
