"""Registry: the promotion policy alone, then register / promote / reject / roll back / load
through `models:/` URIs, racing promotions and bad input, against a real `mlflow server`."""

from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

import ipa_lib.mlops.registry as registry
from ipa_lib.core.config import ModelConfig, Params, PromoteConfig, TrackingConfig
from ipa_lib.mlops.registry import (
    LOCK_SUFFIX,
    MetricsError,
    RegistryError,
    champion_at,
    champion_version,
    decide,
    fetch_model,
    input_example,
    promote,
    promotion_history,
    read_eval_metrics,
    register_model,
    resolve_start,
    version_metrics,
)
from ipa_lib.cli import main as ipa
from ipa_lib.mlops.tracking import TrackingUnavailable

CFG = PromoteConfig(primary_metric="hand_pass_rate", margin=0.02, tolerances={"psnr": 1.0, "ssim": 0.02})


def M(hpr: float, psnr: float = 20.0, ssim: float = 0.80, hq: float = 0.7, hpsnr: float = 18.0) -> dict[str, float]:
    return {"hand_quality": hq, "hand_pass_rate": hpr, "psnr": psnr, "ssim": ssim, "hand_psnr": hpsnr}


# ----------------------------------------------------------------------------- policy (pure)


def test_first_model_must_beat_the_base():
    d = decide(M(0.60), None, M(0.50), CFG)
    assert d.promote and d.action == "promote" and d.compared["reference"] == "base"
    assert d.compared["delta"]["hand_pass_rate"] == pytest.approx(0.10)
    d = decide(M(0.51), None, M(0.50), CFG)
    assert not d.promote and "does not beat the base" in d.reason


def test_margin_is_inclusive_but_a_tie_never_wins():
    assert decide(M(0.75), M(0.50), None, CFG.model_copy(update={"margin": 0.25})).promote  # exact in binary
    assert not decide(M(0.74), M(0.50), None, CFG.model_copy(update={"margin": 0.25})).promote
    assert not decide(M(0.5), M(0.5), None, CFG.model_copy(update={"margin": 0.0})).promote
    assert decide(M(0.51), M(0.5), None, CFG.model_copy(update={"margin": 0.0})).promote


@pytest.mark.parametrize(
    ("cand", "regressed"),
    [(M(0.9, psnr=18.9), "psnr"), (M(0.9, ssim=0.77), "ssim"), (M(0.9, psnr=19.1, ssim=0.79), None)],
)
def test_global_metrics_may_not_regress_beyond_tolerance(cand, regressed):
    d = decide(cand, M(0.6), M(0.5), CFG)
    if regressed:
        assert not d.promote and regressed in d.compared["regressions"] and "regresses" in d.reason
    else:
        assert d.promote and d.compared["regressions"] == {}
    assert d.compared["reference"] == "champion"  # the base is ignored once there is a champion


def test_missing_or_bad_numbers_are_errors():
    with pytest.raises(MetricsError, match=r"candidate: missing evaluation metric\(s\) \['hand_pass_rate'\]"):
        decide({"psnr": 20.0, "ssim": 0.8}, None, M(0.5), CFG)
    with pytest.raises(MetricsError, match="not finite"):
        decide(M(float("nan")), None, M(0.5), CFG)
    with pytest.raises(MetricsError, match="champion"):
        decide(M(0.9), {"hand_pass_rate": 0.5}, None, CFG)
    with pytest.raises(MetricsError, match="base model: no evaluation metrics"):
        decide(M(0.9), None, None, CFG)


def test_decide_reads_each_metrics_direction():
    """A lower-is-better primary metric (fd) promotes when it falls by the margin, and a
    lower-is-better tolerance (hand_fd) flags a rise, not a fall."""
    cfg = PromoteConfig(primary_metric="fd", margin=0.5, tolerances={"hand_fd": 0.1})
    assert decide({"fd": 1.0, "hand_fd": 2.0}, None, {"fd": 2.0, "hand_fd": 2.0}, cfg).promote
    assert not decide({"fd": 1.8, "hand_fd": 2.0}, None, {"fd": 2.0, "hand_fd": 2.0}, cfg).promote  # gain 0.2 < margin
    assert not decide({"fd": 3.0, "hand_fd": 2.0}, None, {"fd": 2.0, "hand_fd": 2.0}, cfg).promote  # worse
    d = decide({"fd": 1.0, "hand_fd": 2.5}, None, {"fd": 2.0, "hand_fd": 2.0}, cfg)
    assert not d.promote and set(d.compared["regressions"]) == {"hand_fd"}
    assert decide({"fd": 1.0, "hand_fd": 1.0}, None, {"fd": 2.0, "hand_fd": 2.0}, cfg).promote  # hand_fd improved


def test_read_eval_metrics(tmp_path):
    p = tmp_path / "eval.json"
    p.write_text(json.dumps({"base": M(0.5), "ipa": {**M(0.6), "extra": 3}}))
    cand, base = read_eval_metrics(p, CFG)
    assert cand == {**M(0.6), "extra": 3.0} and base == M(0.5)
    p.write_text(json.dumps({"ipa": M(0.6)}))
    with pytest.raises(MetricsError, match='expected {"base"'):
        read_eval_metrics(p, CFG)
    p.write_text(json.dumps({"base": M(0.5), "ipa": {"psnr": 20.0, "ssim": 0.8}}))
    with pytest.raises(MetricsError, match=r"\[ipa\]: missing .*hand_pass_rate"):
        read_eval_metrics(p, CFG)
    with pytest.raises(MetricsError, match="not found"):
        read_eval_metrics(tmp_path / "nope.json", CFG)


def test_champion_at():
    hist = [{"seq": 1, "ts": 10.0, "champion": 1}, {"seq": 2, "ts": 20.0, "champion": 1}, {"seq": 3, "ts": 30.0, "champion": 3}]
    assert [champion_at(hist, t) for t in (5, 10, 25, 31)] == [None, 1, 1, 3]


# ----------------------------------------------------------------------------- helpers


class FakeBackend:
    def __init__(self, base: str, adapter: str):
        self.base, self.adapter = Path(base), Path(adapter)


@pytest.fixture()
def fake_animator(monkeypatch):
    """Stand-in for load_backend/animate that checks the model carried its folders."""
    loaded: list[FakeBackend] = []

    def build(params, base, adapter):
        assert (Path(base) / "transformer" / "config.json").is_file(), base
        assert (Path(adapter) / "pytorch_lora_weights.safetensors").is_file(), adapter
        assert params.backend.init_adapter is None
        loaded.append(FakeBackend(base, adapter))
        return loaded[-1]

    def animate(backend, reference, pose_video, seed, num_inference_steps):
        assert isinstance(backend, FakeBackend) and num_inference_steps >= 1
        return np.maximum(pose_video, reference[None]).astype(np.uint8)

    monkeypatch.setattr(registry, "_build_backend", build)
    monkeypatch.setattr(registry, "_animate", animate)
    return loaded


def _model_dirs(root: Path) -> tuple[Path, Path]:
    base, adapter = root / "models/base", root / "models/adapter"
    (base / "transformer").mkdir(parents=True)
    (base / "transformer" / "config.json").write_text("{}")
    (base / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"\0" * 64)
    adapter.mkdir(parents=True)
    (adapter / "pytorch_lora_weights.safetensors").write_bytes(b"\1" * 32)
    (adapter / "adapter_config.json").write_text('{"r": 4}')
    return base, adapter


def _write_eval(path: Path, ipa: dict, base: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"base": base, "ipa": ipa}, indent=2))
    return path


def _params(uri: str, **promote_kw) -> Params:
    uid = uuid.uuid4().hex[:8]
    return Params(
        tracking=TrackingConfig(uri=uri, experiment=f"reg-{uid}", registered_model=f"ipa-animator-{uid}", max_retries=1),
        # the registry's mechanics on the gate-scorer numbers these tests write (M(...)); the
        # project default ranks by hand_psnr (tests of that default: test_selection.py)
        promote=PromoteConfig(**{"primary_metric": "hand_pass_rate", "margin": 0.02, **promote_kw}),
    )


def _client(uri: str):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def _add_version(client, name: str, ipa: dict | None, base: dict | None = None, like=None) -> int:
    """A version with eval tags and no model of its own (promotion only reads tags); `like`: a
    version whose logged model it shares (so it loads)."""
    try:
        client.create_registered_model(name)
    except Exception:  # noqa: BLE001 (exists)
        pass
    tags = {f"eval.ipa.{k}": repr(v) for k, v in (ipa or {}).items()}
    tags |= {f"eval.base.{k}": repr(v) for k, v in (base or M(0.5)).items()} if ipa else {}
    if like is None:  # the server wants a source inside a run
        run = client.create_run("0")
        return int(client.create_model_version(name, f"{run.info.artifact_uri}/model", run.info.run_id, tags=tags).version)
    mv = client.create_model_version(name, like.source, tags=tags, model_id=like.tags["ipa.model_id"])
    return int(mv.version)


# ----------------------------------------------------------------------------- end to end


def test_register_promote_reject_rollback_and_load(monkeypatch, mlflow_server, fake_animator, tmp_path, capsys, params_file):
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    params = _params(mlflow_server.uri)
    name, client = params.tracking.registered_model, _client(mlflow_server.uri)
    base_dir, adapter_dir = _model_dirs(tmp_path)

    # 1. register v1 from metrics/eval.json: registry numbers equal the file
    eval1 = _write_eval(tmp_path / "metrics/eval.json", M(0.62, hq=0.731234567891), M(0.50))
    v1 = register_model(params, adapter_dir, base_dir, eval1, record_path=tmp_path / "models/registered.json")
    assert v1 == 1
    mv1 = client.get_model_version(name, "1")
    data = json.loads(eval1.read_text())
    assert version_metrics(mv1) == (data["ipa"], data["base"])
    logged = mlflow.get_logged_model(mv1.tags["ipa.model_id"])
    assert {m.key: m.value for m in logged.metrics} == {f"eval/{k}": v for k, v in data["ipa"].items()} | {
        f"eval/base/{k}": v for k, v in data["base"].items()
    }
    rec = json.loads((tmp_path / "models/registered.json").read_text())
    assert rec["version"] == 1 and rec["model_uri"] == f"models:/{name}/1" and rec["metrics"]["ipa"] == data["ipa"]
    assert mv1.tags["ipa.promotion.decision"] == "pending" and mv1.tags["ipa.source_run_id"] == rec["run_id"]

    # 2. the first model beats the base: champion
    d = promote(params)
    assert (d.action, d.candidate, d.previous_champion, d.champion) == ("promote", 1, None, 1)
    assert "base model" in d.reason and champion_version(client, name, "champion") == 1

    # 3. load through the alias and generate a clip; signature + example travel with it
    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    ex = input_example(params)
    clip = model.predict(ex, params={"seed": 3, "num_inference_steps": 2})
    assert clip.shape == ex["pose_video"].shape and clip.dtype == np.uint8
    assert model.metadata.get_input_schema().input_names() == ["reference", "pose_video"]
    assert model.metadata.saved_input_example_info is not None
    with pytest.raises(Exception, match="pose_video"):
        model.predict({"reference": ex["reference"]})
    fetched = fetch_model(params, f"models:/{name}@champion", tmp_path / "fetched")
    assert fetched.version == 1 and (fetched.adapter / "pytorch_lora_weights.safetensors").is_file()
    assert (Path(fetched.base_model) / "transformer" / "config.json").is_file()
    next_round = params.model_copy(deep=True)
    next_round.backend.init_adapter = f"models:/{name}@champion"
    base_start, adapter_start, tags = resolve_start(next_round, tmp_path / "start")
    assert (Path(adapter_start) / "adapter_config.json").is_file() and Path(base_start).is_dir()
    assert tags == {"ipa.init_model": f"{name}/1", "ipa.init_model_uri": f"models:/{name}@champion"}
    assert resolve_start(params) == (params.backend.base_model, None, {})

    # 4. a candidate within the margin is rejected; the alias stays, the tags say why
    v2 = _add_version(client, name, M(0.63), like=mv1)
    d = promote(params, candidate=v2)
    assert not d.promote and d.action == "reject" and champion_version(client, name, "champion") == 1
    t2 = client.get_model_version(name, str(v2)).tags
    assert t2["ipa.promotion.decision"] == "rejected" and " at 20" in t2["ipa.promotion.by"]
    compared = json.loads(t2["ipa.promotion.compared"])
    assert compared["reference_version"] == 1 and compared["candidate"]["hand_pass_rate"] == 0.63
    assert compared["reference_metrics"]["hand_pass_rate"] == 0.62

    # 5. better hands but psnr down 2 dB: rejected on the global metric
    v3 = _add_version(client, name, M(0.80, psnr=18.0), like=mv1)
    d = promote(params, candidate=v3)
    assert not d.promote and "psnr" in d.compared["regressions"]

    # 6. the CLI path (DVC stages): register v4, dry run, promote, roll back
    pfile = params_file(params=params)
    eval4 = _write_eval(tmp_path / "metrics/eval.json", M(0.70, psnr=19.5), M(0.50))
    assert ipa(["register", "--params", str(pfile), "--adapter", str(adapter_dir), "--base-model", str(base_dir), "--metrics", str(eval4)]) == 0
    assert "version 4" in capsys.readouterr().out
    assert ipa(["promote", "--params", str(pfile), "--dry-run"]) == 0  # candidate from models/registered.json
    out = capsys.readouterr().out
    assert "v4: DRY RUN, would be promoted" in out and "hand_pass_rate" in out and "champion: v1 -> v4 (not applied)" in out
    assert champion_version(client, name, "champion") == 1 and not Path(params.promote.out).exists()
    assert ipa(["promote", "--params", str(pfile)]) == 0
    out = capsys.readouterr().out
    assert "v4: PROMOTED" in out and champion_version(client, name, "champion") == 4
    decision = json.loads(Path(params.promote.out).read_text())
    assert decision["action"] == "promote" and decision["compared"]["candidate"]["psnr"] == 19.5
    assert client.get_model_version(name, "1").tags["ipa.promotion.superseded_by"] == "4"
    # the promote stage run sits in the same round as register
    reg_lineage = json.loads((tmp_path / "models/registered.json").read_text())["lineage"]
    promote_runs = client.search_runs(
        [reg_lineage["experiment_id"]], f"tags.`mlflow.parentRunId` = '{reg_lineage['round_run_id']}' and tags.`ipa.stage` = 'promote'"
    )
    assert len(promote_runs) == 1 and promote_runs[0].data.tags["ipa.promotion.action"] == "promote"

    assert ipa(["promote", "--params", str(pfile), "--to-version", "1"]) == 0
    assert "v1: ROLLED BACK" in capsys.readouterr().out and champion_version(client, name, "champion") == 1
    assert client.get_model_version(name, "1").tags["ipa.promotion.decision"] == "rollback"
    assert mlflow.pyfunc.load_model(f"models:/{name}@champion").metadata.model_uuid == model.metadata.model_uuid

    # 7. the history answers "who was champion when"
    hist = promotion_history(params)
    assert [(h["action"], h["candidate"], h["champion"]) for h in hist] == [
        ("promote", 1, 1), ("reject", 2, 1), ("reject", 3, 1), ("promote", 4, 4), ("rollback", 1, 1),
    ]
    assert all(b["previous_champion"] == a["champion"] for a, b in zip(hist, hist[1:]))
    assert champion_at(hist, hist[3]["ts"]) == 4 and champion_at(hist, hist[0]["ts"] - 1) is None


def test_racing_promotions_leave_a_consistent_alias(monkeypatch, mlflow_server):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = _params(mlflow_server.uri)
    name, client = params.tracking.registered_model, _client(mlflow_server.uri)
    _add_version(client, name, M(0.60))
    assert promote(params, 1).champion == 1
    cands = [_add_version(client, name, M(hpr)) for hpr in (0.65, 0.70, 0.75)]  # v2, v3, v4

    barrier, results, errors = threading.Barrier(len(cands)), {}, []

    def go(v: int) -> None:
        try:
            barrier.wait()
            results[v] = promote(params, v)
        except Exception as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=go, args=(v,)) for v in cands]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    # whatever the order, the best candidate ends as champion and nobody compared against a stale one
    assert champion_version(client, name, "champion") == 4
    hist = promotion_history(params)
    assert len(hist) == 4 and sorted(h["candidate"] for h in hist[1:]) == [2, 3, 4]
    for a, b in zip(hist, hist[1:]):
        assert b["previous_champion"] == a["champion"], hist
    for v, d in results.items():
        tags = client.get_model_version(name, str(v)).tags
        assert tags["ipa.promotion.decision"] == ("promoted" if d.promote else "rejected")
        assert json.loads(tags["ipa.promotion.compared"])["reference_version"] == d.previous_champion
    assert client.get_model_version(name, "4").tags["ipa.promotion.decision"] == "promoted"
    with pytest.raises(Exception, match="RESOURCE_DOES_NOT_EXIST"):
        client.get_registered_model(name + LOCK_SUFFIX)  # released


def test_lock_held_times_out_and_a_stale_lock_is_broken(monkeypatch, mlflow_server):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = _params(mlflow_server.uri, lock_timeout_s=1.0, lock_stale_s=60.0)
    name, client = params.tracking.registered_model, _client(mlflow_server.uri)
    _add_version(client, name, M(0.60))
    lock = name + LOCK_SUFFIX
    client.create_registered_model(lock, tags={"ipa.lock.token": "other", "ipa.lock.owner": "ci@node:7", "ipa.lock.acquired_at": repr(time.time())})
    with pytest.raises(RegistryError, match=r"holds the lock .*ci@node:7"):
        promote(params, 1)
    assert champion_version(client, name, "champion") is None
    assert "ipa.promotion.reason" not in client.get_model_version(name, "1").tags
    client.set_registered_model_tag(lock, "ipa.lock.acquired_at", repr(time.time() - 3600))  # its owner died
    assert promote(params, 1).champion == 1


def test_bad_input_gives_clear_errors_and_leaves_the_alias(monkeypatch, mlflow_server, fake_animator, tmp_path, capsys,
                                                           params_file, free_port):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    params = _params(mlflow_server.uri)
    name, client = params.tracking.registered_model, _client(mlflow_server.uri)
    _add_version(client, name, M(0.60))
    promote(params, 1)
    no_metrics = _add_version(client, name, None)

    with pytest.raises(RegistryError, match=r"registered model 'no-such-model' not found"):
        promote(params.model_copy(update={"tracking": params.tracking.model_copy(update={"registered_model": "no-such-model"})}))
    with pytest.raises(RegistryError, match=r"version 99 does not exist \(versions: \[1, 2\]\)"):
        promote(params, 99)
    with pytest.raises(RegistryError, match="version 99 does not exist"):
        promote(params, to_version=99)
    with pytest.raises(MetricsError, match=f"version {no_metrics} has no evaluation metrics"):
        promote(params, no_metrics)
    with pytest.raises(RegistryError, match="not found"):
        fetch_model(params, "models:/no-such-model@champion")
    pfile = params_file(params=params)
    assert ipa(["promote", "--params", str(pfile), "--candidate", str(no_metrics)]) == 2  # bad input: no numbers to decide on
    assert "error:" in capsys.readouterr().err

    down = params.model_copy(update={"tracking": params.tracking.model_copy(update={"uri": f"http://127.0.0.1:{free_port}", "max_retries": 0})})
    with pytest.raises(TrackingUnavailable, match="unreachable"):
        promote(down, 1)
    assert ipa(["promote", "--params", str(params_file(path=tmp_path / "down.yaml", params=down)), "--candidate", "1"]) == 1  # runtime failure: server down
    assert "unreachable" in capsys.readouterr().err

    base_dir, adapter_dir = _model_dirs(tmp_path)
    before = len(client.search_model_versions(f"name = '{name}'"))
    bad = _write_eval(tmp_path / "metrics/bad.json", {"psnr": 20.0, "ssim": 0.8}, M(0.5))
    with pytest.raises(MetricsError, match="hand_pass_rate"):
        register_model(params, adapter_dir, base_dir, bad)
    with pytest.raises(RegistryError, match="adapter folder missing"):
        register_model(params, tmp_path / "nope", base_dir, _write_eval(tmp_path / "metrics/ok.json", M(0.7), M(0.5)))
    assert len(client.search_model_versions(f"name = '{name}'")) == before

    assert champion_version(client, name, "champion") == 1
    assert [h["action"] for h in promotion_history(params)] == ["promote"]


# ----------------------------------------------------------------------------- real animator


def test_champion_generates_a_clip_with_the_toy_animator(monkeypatch, mlflow_server, tmp_path):
    """The pyfunc model around the real toy backend."""
    import mlflow

    from ipa_lib.models.lora import lora_parameters
    from ipa_lib.models.toy import ToyBackend, build_transformer

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = _params(mlflow_server.uri).model_copy(
        update={"model": ModelConfig(num_layers=1, num_attention_heads=2, attention_head_dim=8, ffn_dim=32)}
    )
    params.backend.device = "cpu"
    params.train.lora_rank = params.train.lora_alpha = 2
    backend = ToyBackend(build_transformer(params.model, seed=0))
    backend.save_pretrained(tmp_path / "base")
    backend.add_lora(params.train.lora_rank, params.train.lora_alpha, params.train.lora_targets)
    for p in lora_parameters(backend.transformer):  # an adapter that changes the output
        p.data.normal_(0.0, 0.05)
    backend.save_adapter(tmp_path / "adapter")
    metrics = _write_eval(tmp_path / "eval.json", M(0.7), M(0.5))

    version = register_model(params, tmp_path / "adapter", tmp_path / "base", metrics)
    assert promote(params, version).champion == version
    model = mlflow.pyfunc.load_model(f"models:/{params.tracking.registered_model}@champion")
    ex = input_example(params)
    clip = model.predict(ex, params={"seed": 0, "num_inference_steps": 2})
    assert clip.shape == ex["pose_video"].shape and clip.dtype == np.uint8
    again = model.predict(ex, params={"seed": 0, "num_inference_steps": 2})
    assert np.array_equal(clip, again)  # seeded

    # a second round: its adapter was trained over base + the champion's LoRA (merged), so the
    # registered v2 must carry that merged base, not the original one
    from ipa_lib.stages.common import load_start_backend as load_backend

    round2 = params.model_copy(deep=True)
    round2.backend.init_adapter = f"models:/{params.tracking.registered_model}@champion"
    round2.backend.base_model = str(tmp_path / "base")
    start = load_backend(round2)  # base + v1 merged
    start.add_lora(params.train.lora_rank, params.train.lora_alpha, params.train.lora_targets)
    for p in lora_parameters(start.transformer):
        p.data.normal_(0.0, 0.05)
    start.save_adapter(tmp_path / "adapter2")
    v2 = register_model(round2, tmp_path / "adapter2", tmp_path / "base", _write_eval(tmp_path / "eval2.json", M(0.8), M(0.7)))
    assert promote(round2, v2).champion == v2
    clip2 = mlflow.pyfunc.load_model(f"models:/{params.tracking.registered_model}/{v2}").predict(
        ex, params={"seed": 0, "num_inference_steps": 2})
    want = registry._animate(load_backend(round2.model_copy(update={"backend": round2.backend.model_copy(
        update={"init_adapter": f"models:/{params.tracking.registered_model}/{version}"})}), adapter=tmp_path / "adapter2"),
        ex["reference"], ex["pose_video"], 0, 2)
    assert np.array_equal(clip2, np.asarray(want, dtype=np.uint8))
    plain = params.model_copy(deep=True)
    plain.backend.base_model = str(tmp_path / "base")
    wrong = registry._animate(load_backend(plain, adapter=tmp_path / "adapter2"), ex["reference"], ex["pose_video"], 0, 2)
    assert not np.array_equal(clip2, np.asarray(wrong, dtype=np.uint8))  # the original base alone differs
