"""The sample stage on cases: a clip set independent of the shard count, and a run stopped
mid-sampling resumes at the shard it stopped in (what DVC needs: it deletes the outputs first)."""

from __future__ import annotations

import numpy as np
import pytest

from test_cases import write_case

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_wan(tmp_path_factory):
    from ipa_lib.models.wan_tiny import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("wan") / "tiny")


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    root = tmp_path_factory.mktemp("cases") / "cases"
    for name in ("alpha", "bravo", "charlie", "delta", "echo"):
        write_case(root / name)
    return root


def _params(cases, tiny_wan, **sample):
    from ipa_lib.core.config import parse_params

    return parse_params({
        "data": {"cases": str(cases), "height": 64, "width": 64, "frames": 17, "fps": 16, "face_size": 16},
        "backend": {"name": "wan-animate", "base_model": str(tiny_wan), "device": "cpu"},
        "sample": {"per_case": 2, "num_inference_steps": 2, **sample},
    })


def _clips(folder):
    from ipa_lib.data.clip_store import ClipStore, read_manifest

    rows = read_manifest(folder)
    with ClipStore(folder) as store:
        return {r["sample_id"]: (r["seed"], store.clip(r).copy()) for r in rows}


def test_the_clip_set_does_not_depend_on_the_shard_count(cases, tiny_wan, tmp_path):
    from ipa_lib.stages.sample import sample

    one = sample(_params(cases, tiny_wan, shards=1), tmp_path / "one", progress=False)
    three = sample(_params(cases, tiny_wan, shards=3), tmp_path / "three", progress=False)
    assert (one["shards"], three["shards"]) == (1, 3) and one["clips"] == three["clips"] == 2 * one["cases"]
    a, b = _clips(tmp_path / "one"), _clips(tmp_path / "three")
    assert a.keys() == b.keys()
    for sid in a:
        assert a[sid][0] == b[sid][0] and np.array_equal(a[sid][1], b[sid][1]), sid
    # only train cases are sampled; the store carries their conditioning
    import json

    splits = {r["case_id"]: r["split"] for r in json.loads((tmp_path / "one" / "cases.json").read_text())}
    assert {sid.rsplit("-s", 1)[0] for sid in a} == {c for c, s in splits.items() if s == "train"}
    assert sorted(p.stem for p in (tmp_path / "one" / "cases").glob("*.npz")) == sorted(c for c, s in splits.items() if s == "train")


def test_a_stopped_run_resumes_at_its_shard(cases, tiny_wan, tmp_path):
    """What a run killed after its first shard leaves: that shard in the work folder beside the
    output (not in the output, which DVC deletes). The rerun samples only the other shards."""
    from ipa_lib.data.cases import cases_of, load_case, scan
    from ipa_lib.data.clip_store import save_conditions
    from ipa_lib.models.factory import load_backend
    from ipa_lib.stages.sample import plan_cases, sample, sample_shard, work_dir, work_key

    params = _params(cases, tiny_wan, shards=2)
    out = tmp_path / "samples"
    train = cases_of(scan(params), "train")
    work = work_dir(out, work_key(params, train, None, None))
    for case in train:
        save_conditions(work, case["case_id"], load_case(case["path"], params.data))
    plan = plan_cases(params, train)
    first = sample_shard(load_backend(params), params, plan, 0, work, progress=False)
    mtime = first.stat().st_mtime_ns

    resumed = sample(params, out, progress=False)
    assert resumed["resumed_shards"] == 1 and resumed["shards"] == 2
    assert not work.parent.exists()  # removed once the output is complete
    assert (out / "shard-000.npz").stat().st_mtime_ns == mtime  # the finished shard was kept, not redone
    fresh = sample(params, tmp_path / "fresh", progress=False)
    assert fresh["resumed_shards"] == 0
    a, b = _clips(out), _clips(tmp_path / "fresh")
    assert a.keys() == b.keys() and all(np.array_equal(a[k][1], b[k][1]) for k in a)


def test_shards_of_other_params_are_never_reused(cases, tiny_wan, tmp_path):
    from ipa_lib.data.cases import cases_of, scan
    from ipa_lib.stages.sample import sample, work_dir, work_key

    old = _params(cases, tiny_wan, shards=2, seed=1)
    new = _params(cases, tiny_wan, shards=2, seed=2)
    out = tmp_path / "samples"
    train = cases_of(scan(old), "train")
    assert work_key(old, train, None, None) != work_key(new, train, None, None)
    stale = work_dir(out, work_key(old, train, None, None))
    stale.mkdir(parents=True)
    (stale / "shard-000.npz").write_bytes(b"stale")
    summary = sample(new, out, progress=False)
    assert summary["resumed_shards"] == 0 and not stale.exists()
