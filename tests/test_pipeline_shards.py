"""Sampling fans out: one `sample-shard` task per shard of the clip store, then `merge-shards`.

On real cases (pans over the test photos, `ipa cases build`) with the tiny Wan model, the
sample part of the DAG runs through kfp.local (SubprocessRunner) with 2 shards and with 1:
the same clips (ids, seeds, arrays), and the same store as the DVC path (`ipa sample`, here
with a `sample.workers=2` process pool). The merge refuses a missing shard, a shard given
twice, duplicate clip ids and a missing planned clip. The compiled IR puts the sample task
inside a ParallelFor over the shards, on the GPU pool.
"""

# no `from __future__ import annotations`: KFP reads the test pipeline's real annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import REPO, copy_shard, sh
from hands_fixtures import CASE_DATA, pan_256

pytestmark = pytest.mark.slow

DATA = CASE_DATA


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(root, overrides): a tiny Wan-Animate folder and four self-reenactment cases from real photos:
    three train (the split always tests one), 2 clips each: with 2 shards, the second case's fall in both."""
    from ipa_lib.data.video import write_video

    root = tmp_path_factory.mktemp("shards")
    media = root / "media"
    media.mkdir()
    write_video(media / "raise-428.mp4", pan_256("428", 200, 360), 30)
    write_video(media / "phones-536.mp4", pan_256("536", 100, 336), 30)
    write_video(media / "kitchen-294.mp4", pan_256("294", 100, 427), 30)
    write_video(media / "cross-428.mp4", pan_256("428", 220, 360), 30)
    py = [sys.executable, "-m", "ipa_lib.cli"]
    env = {"OMP_NUM_THREADS": "1", "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(Path.home())}
    sh(py + ["wan-tiny", str(root / "tiny")], REPO, env)
    sh(py + ["cases", "build", "--driving", *map(str, sorted(media.iterdir())), "--reference-frame", "0",
             "--out", str(root / "cases"), *[a for d in DATA for a in ("--set", d)]], REPO, env)
    overrides = [
        "backend.name=wan-animate", f"backend.base_model={root / 'tiny'}", "backend.device=cpu",
        f"data.cases={root / 'cases'}", *DATA, "data.val_fraction=0", "data.test_fraction=0",
        "sample.per_case=2", "sample.num_inference_steps=2", "tracking.enabled=false",
    ]
    return root, overrides


def _params(overrides: list[str]):
    from ipa_lib.core.config import load_params

    return load_params(REPO / "params.yaml", overrides)


def _sample_part(params, pipeline_root: Path) -> Path:
    """resolve-params -> ParallelFor(shard: sample-shard) -> merge-shards through kfp.local, with
    the round's components and shard list; returns merge-shards' clip store."""
    from kfp import dsl, local

    from components.stages import build
    from ipa_lib.orchestration.kfp import canonical_json, typed_values
    from ipa_lib.stages.sample import shard_indices

    c = build("unused", "unused")
    base = params.backend.base_model

    @dsl.pipeline(name="sample-part")
    def sample_part(params_json: str):
        resolved = c["resolve_params"](params_json=params_json, **typed_values(params))
        with dsl.ParallelFor(items=shard_indices(params), name="sample-shards") as shard:
            sharded = c["sample_shard"](params=resolved.outputs["params"], shard=shard, base_model=base)
        c["merge_shards"](params_json=resolved.outputs["Output"], base_model=base, kfp_run_id="test",
                          shards=dsl.Collected(sharded.outputs["sampled"]))

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root), raise_on_error=True)
    sample_part(params_json=canonical_json(params))
    (run,) = pipeline_root.glob("sample-part-*")
    return run / "merge-shards" / "samples"


def _clips(store: Path) -> dict[str, tuple[int, np.ndarray]]:
    """sample_id -> (seed, clip array) of a case clip store."""
    from ipa_lib.data.clip_store import ClipStore, read_manifest

    with ClipStore(store) as s:
        return {r["sample_id"]: (r["seed"], np.array(s.clip(r))) for r in read_manifest(store)}


def _same_clips(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for sid in a:
        assert a[sid][0] == b[sid][0], sid
        np.testing.assert_array_equal(a[sid][1], b[sid][1], err_msg=sid)


@pytest.fixture(scope="module")
def fanned_out(world, tmp_path_factory):
    """The kfp.local sample part with 2 shards and with 1: (store with 2, store with 1, shard folders of 2)."""
    _, overrides = world
    out = tmp_path_factory.mktemp("kfp")
    two = _sample_part(_params(overrides + ["sample.shards=2"]), out / "two")
    one = _sample_part(_params(overrides + ["sample.shards=1"]), out / "one")
    shard_dirs = sorted(two.parents[1].glob("for-loop-*-iteration-*/sample-shard/sampled"))
    return two, one, shard_dirs


def test_two_shards_give_the_clip_set_of_one(fanned_out):
    two, one, shard_dirs = fanned_out
    assert len(shard_dirs) == 2, sorted(p.name for p in two.parents[1].iterdir())
    assert sorted(p.name for p in two.glob("shard-*.npz")) == ["shard-000.npz", "shard-001.npz"]
    assert sorted(p.name for p in one.glob("shard-*.npz")) == ["shard-000.npz"]
    a, b = _clips(two), _clips(one)
    assert len(a) == 6  # 3 train cases x sample.per_case
    _same_clips(a, b)
    train = sorted(r["case_id"] for r in json.loads((two / "cases.json").read_text()) if r["split"] == "train")
    assert len(train) == 3
    rows = [json.loads(line) for line in (two / "manifest.jsonl").read_text().splitlines()]
    assert {r["shard"] for r in rows if r["case_id"] == train[1]} == {0, 1}  # a case split over both shards
    for store in (two, one):
        assert sorted(p.stem for p in (store / "cases").glob("*.npz")) == train
    summary = json.loads((two / "summary.json").read_text())
    assert summary["source"] == "cases" and summary["clips"] == 6 and summary["shards"] == 2


def test_dvc_path_with_a_worker_pool_writes_the_same_store(world, fanned_out, tmp_path):
    """`ipa sample` (what dvc repro runs), 2 shards sampled by a pool of 2 processes: the kfp store."""
    _, overrides = world
    two, _, _ = fanned_out
    py = [sys.executable, "-m", "ipa_lib.cli"]
    env = {"OMP_NUM_THREADS": "1", "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(Path.home())}
    sets = [a for o in overrides + ["sample.shards=2", "sample.workers=2"] for a in ("--set", o)]
    sh(py + ["sample", "--params", str(REPO / "params.yaml"), "--out", str(tmp_path / "samples"), "--quiet", *sets],
       tmp_path, env)
    store = tmp_path / "samples"
    _same_clips(_clips(store), _clips(two))
    assert (store / "manifest.jsonl").read_text() == (two / "manifest.jsonl").read_text()
    for f in ("summary.json", "cases.json"):
        assert json.loads((store / f).read_text()) == json.loads((two / f).read_text()), f
    for case in (two / "cases").glob("*.npz"):
        with np.load(case) as x, np.load(store / "cases" / case.name) as y:
            assert sorted(x.files) == sorted(y.files)
            for k in x.files:
                np.testing.assert_array_equal(x[k], y[k], err_msg=f"{case.name}:{k}")
    assert not (tmp_path / ".samples.shards").exists()  # the work folder goes once the store is complete


def _copy(src: Path, dst: Path, edit=None) -> Path:
    return copy_shard(src, dst, "shard.json", edit)


def test_merge_refuses_a_bad_union(world, fanned_out, tmp_path):
    from ipa_lib.core.errors import InputError
    from ipa_lib.stages.sample import merge_shards

    _, overrides = world
    params = _params(overrides + ["sample.shards=2"])
    _, _, (s0, s1) = fanned_out
    base = params.backend.base_model

    def refused(dirs, needle):
        with pytest.raises(InputError, match=needle):
            merge_shards(params, dirs, tmp_path / "out", base)
        assert not (tmp_path / "out").exists()

    refused([s0], r"expected shards \[0, 1\], got \[0\]; missing \[1\]")
    refused([s0, s0], "shard 0 given twice")
    first = json.loads((s0 / "shard.json").read_text())["sample_ids"][0]
    dup = _copy(s1, tmp_path / "dup", lambda i: i["sample_ids"].append(first))
    refused([s0, dup], f"duplicate clip id '{first}' in shards 0 and 1")
    lost = _copy(s1, tmp_path / "lost", lambda i: i["sample_ids"].pop())
    refused([s0, lost], r"shard 1 holds clips .* \(missing \[")
    other = _copy(s1, tmp_path / "other", lambda i: i.update(key="0" * 16))
    refused([s0, other], "shard 1 was sampled with other params, data or model")
    refused([s0, tmp_path], "not a sampled shard")
    # the good union merges (the same folders the pipeline merged)
    assert merge_shards(params, [s1, s0], tmp_path / "out", base)["clips"] == 6


# ---- the compiled IR ---------------------------------------------------------------------


def _compile(tmp_path: Path, sets: list[str]) -> tuple[dict, dict]:
    from ipa_lib.orchestration import kfp as kfp_cli

    out = tmp_path / "ipa_round.yaml"
    args = argparse.Namespace(params=str(REPO / "params.yaml"), set=sets, pipeline_cmd="compile", out=str(out))
    assert kfp_cli.main(args) == 0
    spec, platform = yaml.safe_load_all(out.read_text())
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def _shard_loop(spec: dict) -> tuple[dict, dict]:
    """(the loop task over shards, the round's DAG) inside the ExitHandler."""
    (body,) = [t["componentRef"]["name"] for n, t in spec["root"]["dag"]["tasks"].items() if n != "record-failure"]
    tasks = spec["components"][body]["dag"]["tasks"]
    (loop,) = [t for t in tasks.values() if t.get("parameterIterator", {}).get("items", {}).get("raw")]
    return loop, tasks


@pytest.mark.parametrize("shards, items", [(1, [0]), (3, [0, 1, 2])])
def test_compiled_sample_task_fans_out_on_the_gpu_pool(tmp_path, shards, items):
    sets = ["backend.name=wan-animate", "backend.base_model=models/wan", f"sample.shards={shards}"]
    spec, k8s = _compile(tmp_path, sets)
    params = _params(sets)
    pc = params.pipeline
    loop, tasks = _shard_loop(spec)
    assert json.loads(loop["parameterIterator"]["items"]["raw"]) == items
    inner = spec["components"][loop["componentRef"]["name"]]["dag"]["tasks"]
    assert sorted(inner) == ["sample-shard"]
    shard_task = inner["sample-shard"]
    assert shard_task["retryPolicy"]["maxRetryCount"] == pc.train_retries
    assert shard_task["inputs"]["parameters"]["shard"] == {"componentInputParameter": loop["parameterIterator"]["itemInput"]}
    res = spec["deploymentSpec"]["executors"]["exec-sample-shard"]["container"]["resources"]
    assert res["accelerator"]["resourceType"] == pc.accelerator_type
    assert res["accelerator"]["resourceCount"] == str(pc.accelerator_limit)
    assert res["resourceMemoryLimit"] == pc.memory_limit and res["resourceCpuLimit"] == pc.cpu_limit
    assert spec["deploymentSpec"]["executors"]["exec-sample-shard"]["container"]["image"] == pc.gpu_image
    assert k8s["exec-sample-shard"]["nodeSelector"]["labels"] == pc.node_selector
    assert k8s["exec-sample-shard"]["tolerations"] == [{"key": pc.gpu_toleration_key, "operator": "Exists"}]
    # merge-shards collects every shard's folder, and the gate reads the merged store
    loop_name = next(n for n, t in tasks.items() if t is loop)
    merge = tasks["merge-shards"]
    assert loop_name in merge["dependentTasks"]
    assert merge["inputs"]["artifacts"]["shards"]["taskOutputArtifact"]["producerTask"] == loop_name
    assert tasks["gate"]["inputs"]["artifacts"]["samples"]["taskOutputArtifact"] == {
        "outputArtifactKey": "samples", "producerTask": "merge-shards"}
    assert "accelerator" not in spec["deploymentSpec"]["executors"]["exec-merge-shards"]["container"].get("resources", {})


def test_cpu_only_shards_have_no_gpu(tmp_path):
    spec, k8s = _compile(tmp_path, ["backend.name=wan-animate", "sample.shards=2", "pipeline.cpu_only=true"])
    loop, _ = _shard_loop(spec)
    assert json.loads(loop["parameterIterator"]["items"]["raw"]) == [0, 1]
    res = spec["deploymentSpec"]["executors"]["exec-sample-shard"]["container"]["resources"]
    assert "accelerator" not in res and "nodeSelector" not in k8s["exec-sample-shard"]


def test_toy_world_has_one_shard_whatever_sample_shards_says(tmp_path):
    from ipa_lib.stages.sample import shard_indices

    assert shard_indices(_params(["sample.shards=4"])) == [0]  # the toy store is one shard
    spec, _ = _compile(tmp_path, ["sample.shards=4"])
    loop, _ = _shard_loop(spec)
    assert json.loads(loop["parameterIterator"]["items"]["raw"]) == [0]
