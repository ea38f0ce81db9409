"""The compiled pipeline IR: DAG shape, control flow, GPU pool and cluster settings.

kfp.local ignores resources, retries, caching and Kubernetes settings, so they are
asserted here, on the YAML KFP would run.
The last section checks the packaging: `pipelines` and `components` come with the install.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import yaml

from ipa_lib.core.config import PIPELINE_TASKS, load_params, parse_params
from ipa_lib.orchestration import kfp as kfp_cli

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "pipelines" / "ipa_round.yaml"
PARAMS = ROOT / "params.yaml"


def _args(tmp_path: Path, *, params: Path = PARAMS, sets: list[str] | None = None, out: Path | None = None):
    return argparse.Namespace(params=str(params), set=sets or [], pipeline_cmd="compile",
                              out=str(out or tmp_path / "ipa_round.yaml"))


def _load(path: Path) -> tuple[dict, dict]:
    spec, platform = yaml.safe_load_all(path.read_text())
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> tuple[Path, dict, dict]:
    out = tmp_path_factory.mktemp("compile") / "ipa_round.yaml"
    assert kfp_cli.main(_args(out.parent, out=out)) == 0
    spec, k8s = _load(out)
    return out, spec, k8s


@pytest.fixture(scope="module")
def params():
    return load_params(PARAMS)


def _tasks(spec: dict, component: str | None = None) -> dict:
    dag = spec["root"]["dag"] if component is None else spec["components"][component]["dag"]
    return dag["tasks"]


def _body(spec: dict) -> str:
    """The component of the ExitHandler group that holds the whole round."""
    (name,) = [n for n, t in _tasks(spec).items() if n != "record-failure"]
    return _tasks(spec)[name]["componentRef"]["name"]


def _all_tasks(spec: dict) -> dict:
    """Task key -> task spec, across the root DAG and every sub-DAG (loop, condition)."""
    out = dict(_tasks(spec))
    for comp in spec["components"].values():
        out.update(comp.get("dag", {}).get("tasks", {}))
    return out


def test_committed_yaml_is_current(compiled):
    out, _, _ = compiled
    assert COMMITTED.is_file(), "pipelines/ipa_round.yaml missing: run `ipa pipeline compile`"
    assert COMMITTED.read_text() == out.read_text(), (
        "pipelines/ipa_round.yaml is stale (params.yaml, components/ or pipelines/ changed): run `ipa pipeline compile`")


def test_dag_edges(compiled):
    _, spec, _ = compiled
    root = _tasks(spec, _body(spec))
    deps = {name: sorted(t.get("dependentTasks", [])) for name, t in root.items()}
    loop = next(n for n, t in root.items() if "inputParameter" in t.get("parameterIterator", {}).get("items", {}))
    shards = next(n for n, t in root.items() if "raw" in t.get("parameterIterator", {}).get("items", {}))
    cond = next(n for n, t in root.items() if "triggerPolicy" in t)
    assert deps == {
        "resolve-params": [],
        shards: ["resolve-params"],
        "merge-shards": [shards, "resolve-params"],
        "gate": ["merge-shards", "resolve-params"],
        loop: ["gate", "resolve-params"],
        "select-best": [loop, "resolve-params"],
        "register": ["resolve-params", "select-best"],
        "decide-promotion": ["register", "resolve-params"],
        cond: ["decide-promotion", "register", "resolve-params"],
    }
    # every task after resolve-params runs with its params (typed parameters applied)
    for name, task in root.items():
        if name != "resolve-params" and "params_json" in task["inputs"]["parameters"]:
            assert task["inputs"]["parameters"]["params_json"]["taskOutputParameter"] == {
                "outputParameterKey": "Output", "producerTask": "resolve-params"}, name
    assert sorted(_tasks(spec, root[shards]["componentRef"]["name"])) == ["sample-shard"]
    assert root["gate"]["inputs"]["artifacts"]["samples"]["taskOutputArtifact"] == {
        "outputArtifactKey": "samples", "producerTask": "merge-shards"}
    loop_tasks = _tasks(spec, root[loop]["componentRef"]["name"])
    assert sorted(loop_tasks) == ["evaluate", "train"]
    assert loop_tasks["evaluate"]["dependentTasks"] == ["train"]
    assert loop_tasks["train"]["inputs"]["artifacts"]["gated"]["componentInputArtifact"] == "pipelinechannel--gate-gated"
    assert loop_tasks["evaluate"]["inputs"]["artifacts"]["adapter"]["taskOutputArtifact"] == {
        "outputArtifactKey": "adapter", "producerTask": "train"}
    assert sorted(_tasks(spec, root[cond]["componentRef"]["name"])) == ["promote"]
    # select-best sees every run of the sweep (dsl.Collected), register gets the winner
    best_in = root["select-best"]["inputs"]["artifacts"]
    assert best_in["adapters"]["taskOutputArtifact"]["producerTask"] == loop
    assert best_in["evaluations"]["taskOutputArtifact"]["producerTask"] == loop
    loop_outputs = spec["components"][root[loop]["componentRef"]["name"]]["outputDefinitions"]["artifacts"]
    assert all(o["isArtifactList"] for o in loop_outputs.values()) and len(loop_outputs) == 2
    reg_in = root["register"]["inputs"]["artifacts"]
    assert reg_in["adapter"]["taskOutputArtifact"] == {"outputArtifactKey": "best_adapter", "producerTask": "select-best"}
    assert reg_in["evaluation"]["taskOutputArtifact"] == {"outputArtifactKey": "best_evaluation", "producerTask": "select-best"}


def test_parallel_for_over_betas(compiled):
    _, spec, _ = compiled
    root = _tasks(spec, _body(spec))
    loop = next(t for t in root.values() if "inputParameter" in t.get("parameterIterator", {}).get("items", {}))
    it = loop["parameterIterator"]
    assert it["items"] == {"inputParameter": "pipelinechannel--betas"}
    assert loop["inputs"]["parameters"]["pipelinechannel--betas"] == {"componentInputParameter": "pipelinechannel--betas"}
    for task in _tasks(spec, loop["componentRef"]["name"]).values():
        assert task["inputs"]["parameters"]["beta"] == {"componentInputParameter": it["itemInput"]}


def test_promote_only_under_the_condition(compiled):
    _, spec, _ = compiled
    root = _tasks(spec, _body(spec))
    cond = next(t for t in root.values() if "triggerPolicy" in t)
    expr = " ".join(cond["triggerPolicy"]["condition"].split())
    assert expr == "inputs.parameter_values['pipelinechannel--decide-promotion-Output'] == true"
    assert cond["inputs"]["parameters"]["pipelinechannel--decide-promotion-Output"]["taskOutputParameter"] == {
        "outputParameterKey": "Output", "producerTask": "decide-promotion"}
    assert "promote" not in root  # only inside the condition
    promote = _tasks(spec, cond["componentRef"]["name"])["promote"]
    assert promote["inputs"]["parameters"]["version"] == {"componentInputParameter": "pipelinechannel--register-Output"}


GPU_EXECUTORS = ("exec-sample-shard", "exec-train", "exec-evaluate")  # the model's forward passes


@pytest.mark.parametrize("gpu", GPU_EXECUTORS)
def test_gpu_pool_on_the_model_tasks_only(compiled, params, gpu):
    _, spec, k8s = compiled
    pc = params.pipeline
    executors = spec["deploymentSpec"]["executors"]
    res = executors[gpu]["container"]["resources"]
    assert res["accelerator"]["resourceType"] == pc.accelerator_type
    assert res["accelerator"]["resourceCount"] == str(pc.accelerator_limit)
    assert (res["cpuRequest"], res["cpuLimit"]) == (float(pc.cpu_request), float(pc.cpu_limit))
    assert res["resourceMemoryRequest"] == pc.memory_request and res["resourceMemoryLimit"] == pc.memory_limit
    assert res["resourceCpuRequest"] == pc.cpu_request and res["resourceCpuLimit"] == pc.cpu_limit
    train = k8s[gpu]
    assert train["nodeSelector"]["labels"] == pc.node_selector
    assert train["tolerations"] == [{"key": pc.gpu_toleration_key, "operator": "Exists"}]
    assert train["emptyDirMounts"] == [{"medium": "Memory", "mountPath": "/dev/shm", "sizeLimit": pc.shm_size_limit,
                                        "volumeName": "dshm"}]
    for name, ex in executors.items():
        if name not in GPU_EXECUTORS:
            assert "accelerator" not in ex["container"].get("resources", {}), name
            assert "nodeSelector" not in k8s.get(name, {}) and "tolerations" not in k8s.get(name, {}), name


def test_retries_on_the_gpu_tasks(compiled, params):
    _, spec, _ = compiled
    tasks = _all_tasks(spec)
    for name in ("sample-shard", "train", "evaluate"):
        assert tasks[name]["retryPolicy"]["maxRetryCount"] == params.pipeline.train_retries, name
    assert sorted(n for n, t in tasks.items() if "retryPolicy" in t) == ["evaluate", "sample-shard", "train"]


def test_caching_off_for_sampling_training_and_registry(compiled):
    _, spec, _ = compiled
    tasks = _all_tasks(spec)
    cached = {n for n, t in tasks.items() if t.get("cachingOptions", {}).get("enableCache") is True}
    assert cached == {"resolve-params", "gate", "evaluate", "select-best"}
    for name in ("sample-shard", "merge-shards", "train", "register", "decide-promotion", "promote", "record-failure"):
        assert tasks[name]["cachingOptions"] == {}, name  # explicit enable_caching=False


def test_pvc_and_secret_env(compiled, params):
    _, spec, k8s = compiled
    pc = params.pipeline
    with_pvc = {n for n, e in k8s.items() if "pvcMount" in e}
    assert with_pvc == {"exec-sample-shard", "exec-merge-shards", "exec-train", "exec-evaluate", "exec-register"}
    for name in with_pvc:
        assert k8s[name]["pvcMount"] == [{"constant": pc.pvc_name, "mountPath": pc.mount_path,
                                          "pvcNameParameter": {"runtimeValue": {"constant": pc.pvc_name}}}]
    with_secret = {n for n, e in k8s.items() if "secretAsEnv" in e}
    assert with_secret == {"exec-sample-shard", "exec-merge-shards", "exec-gate", "exec-train", "exec-evaluate", "exec-register",
                           "exec-decide-promotion", "exec-promote", "exec-record-failure"}
    for name in with_secret:
        required, optional = k8s[name]["secretAsEnv"]
        assert required["secretName"] == pc.mlflow_secret and required["optional"] is False
        assert required["keyToEnv"] == [{"envVar": "MLFLOW_TRACKING_URI", "secretKey": "MLFLOW_TRACKING_URI"}]
        assert optional["secretName"] == pc.mlflow_secret and optional["optional"] is True
        assert {e["envVar"] for e in optional["keyToEnv"]} == {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"}


def test_runtime_image_on_every_executor(compiled, params):
    _, spec, _ = compiled
    executors = spec["deploymentSpec"]["executors"]
    assert len(executors) == 11
    for name, ex in executors.items():
        c = ex["container"]
        want = params.pipeline.gpu_image if name in GPU_EXECUTORS else params.pipeline.image
        assert c["image"] == want, name
        script = " ".join(c["command"])
        assert "kfp.dsl.executor_main" in script and "pip install" not in script, name  # nothing installed in pods
        assert "from ipa_lib" in c["command"][-1], name  # each component calls the library


def test_parameters_default_to_params_yaml(compiled, params):
    _, spec, _ = compiled
    inputs = spec["root"]["inputDefinitions"]["parameters"]
    assert sorted(inputs) == sorted(kfp_cli.PARAMETERS)
    assert parse_params(json.loads(inputs["params_json"]["defaultValue"])) == params
    assert inputs["betas"]["defaultValue"] == params.pipeline.betas
    assert inputs["base_model"]["defaultValue"] == f"{params.pipeline.mount_path}/{params.backend.base_model}"
    typed = {"train_steps": ("NUMBER_INTEGER", params.train.steps), "train_lr": ("NUMBER_DOUBLE", params.train.lr),
             "hand_weight": ("NUMBER_DOUBLE", params.train.hand_weight),
             "num_clips": ("NUMBER_INTEGER", params.sample.num_clips),
             "gate_threshold": ("NUMBER_DOUBLE", params.gate.threshold),
             "gate_top_k": ("NUMBER_INTEGER", params.gate.top_k), "init_adapter": ("STRING", "")}
    assert params.backend.init_adapter is None
    for name, (kind, default) in typed.items():
        assert (inputs[name]["parameterType"], inputs[name]["defaultValue"]) == (kind, default), name
    # they reach the tasks only through resolve-params, which takes every one of them
    resolve = _tasks(spec, _body(spec))["resolve-params"]["inputs"]["parameters"]
    assert sorted(resolve) == sorted(["params_json", *typed])
    assert "outputDefinitions" not in spec["root"]  # KFP returns no outputs from inside an ExitHandler


def test_exit_handler_records_a_failed_round(compiled):
    """record-failure runs after the whole round (success or not) with its final status and
    the KFP run id that merge-shards (the sample stage) and train tag the MLflow round with."""
    _, spec, _ = compiled
    root = _tasks(spec)
    assert sorted(root) == ["exit-handler-1", "record-failure"]
    exit_task = root["record-failure"]
    assert exit_task["triggerPolicy"] == {"strategy": "ALL_UPSTREAM_TASKS_COMPLETED"}
    assert exit_task["dependentTasks"] == ["exit-handler-1"]
    ins = exit_task["inputs"]["parameters"]
    assert ins["status"] == {"taskFinalStatus": {"producerTask": "exit-handler-1"}}
    assert ins["params_json"] == {"componentInputParameter": "params_json"}
    run_id = {"runtimeValue": {"constant": "{{$.pipeline_job_uuid}}"}}
    assert ins["kfp_run_id"] == run_id
    tasks = _all_tasks(spec)
    assert [n for n, t in tasks.items() if "kfp_run_id" in t["inputs"].get("parameters", {})] == [
        "record-failure", "merge-shards", "train"]  # not on cached tasks: a per-run value would defeat the cache
    assert tasks["merge-shards"]["inputs"]["parameters"]["kfp_run_id"] == run_id
    assert tasks["train"]["inputs"]["parameters"]["kfp_run_id"] == run_id


SHARDED_EVAL_TASKS = ("evaluate-shard", "merge-evaluations")  # only with evaluate.shards > 1 (test below)
ONE_SHARD_TASKS = tuple(t for t in PIPELINE_TASKS if t not in SHARDED_EVAL_TASKS)


def test_timeouts_and_image_pull_secrets(compiled, params, tmp_path):
    _, _, k8s = compiled
    timeouts = params.pipeline.task_timeout_s
    assert sorted(timeouts) == sorted(PIPELINE_TASKS)
    assert not any(f"exec-{t}" in k8s for t in SHARDED_EVAL_TASKS)
    for task in ONE_SHARD_TASKS:
        assert k8s[f"exec-{task}"]["activeDeadlineSeconds"] == str(timeouts[task]), task
        assert "imagePullSecret" not in k8s[f"exec-{task}"], task  # none by default
    out = tmp_path / "private.yaml"
    sets = ["pipeline.image_pull_secrets=[regcred, other]", "pipeline.task_timeout_s.train=3600"]
    assert kfp_cli.main(_args(tmp_path, sets=sets, out=out)) == 0
    _, k8s = _load(out)
    for task in ONE_SHARD_TASKS:
        assert [s["secretName"] for s in k8s[f"exec-{task}"]["imagePullSecret"]] == ["regcred", "other"], task
    assert k8s["exec-train"]["activeDeadlineSeconds"] == "3600"
    assert k8s["exec-sample-shard"]["activeDeadlineSeconds"] == str(timeouts["sample-shard"])  # the others keep theirs


def test_sharded_evaluation_fans_out_on_the_gpu_pool(tmp_path, params):
    """evaluate.shards=2: inside the beta loop, evaluate-shard in a ParallelFor over [0, 1] on the
    GPU pool, then merge-evaluations, whose evaluation select-best collects as the evaluate task's."""
    out = tmp_path / "sharded.yaml"
    assert kfp_cli.main(_args(tmp_path, sets=["evaluate.shards=2"], out=out)) == 0
    spec, k8s = _load(out)
    pc = params.pipeline
    root = _tasks(spec, _body(spec))
    beta_loop = next(t for t in root.values() if "inputParameter" in t.get("parameterIterator", {}).get("items", {}))
    member = _tasks(spec, beta_loop["componentRef"]["name"])
    shard_loop = next(n for n, t in member.items() if "raw" in t.get("parameterIterator", {}).get("items", {}))
    assert sorted(member) == sorted(["train", shard_loop, "merge-evaluations"])
    assert json.loads(member[shard_loop]["parameterIterator"]["items"]["raw"]) == [0, 1]
    inner = _tasks(spec, member[shard_loop]["componentRef"]["name"])
    assert sorted(inner) == ["evaluate-shard"]
    assert inner["evaluate-shard"]["retryPolicy"]["maxRetryCount"] == pc.train_retries
    assert member["merge-evaluations"]["inputs"]["artifacts"]["shards"]["taskOutputArtifact"]["producerTask"] == shard_loop
    executors = spec["deploymentSpec"]["executors"]
    res = executors["exec-evaluate-shard"]["container"]["resources"]
    assert res["accelerator"]["resourceType"] == pc.accelerator_type and executors["exec-evaluate-shard"]["container"]["image"] == pc.gpu_image
    assert k8s["exec-evaluate-shard"]["nodeSelector"]["labels"] == pc.node_selector
    assert "accelerator" not in executors["exec-merge-evaluations"]["container"].get("resources", {})
    assert "exec-evaluate" not in executors
    for task in SHARDED_EVAL_TASKS:
        assert k8s[f"exec-{task}"]["activeDeadlineSeconds"] == str(pc.task_timeout_s[task]), task
    loop_out = spec["components"][beta_loop["componentRef"]["name"]]["outputDefinitions"]["artifacts"]
    assert loop_out["pipelinechannel--merge-evaluations-evaluation"]["isArtifactList"]


def test_cpu_only_train_has_no_gpu(tmp_path, params):
    out = tmp_path / "cpu.yaml"
    assert kfp_cli.main(_args(tmp_path, sets=["pipeline.cpu_only=true", "pipeline.cpu_limit=2"], out=out)) == 0
    spec, k8s = _load(out)
    train = spec["deploymentSpec"]["executors"]["exec-train"]["container"]
    assert train["image"] == params.pipeline.image and "accelerator" not in train["resources"]
    assert train["resources"]["resourceCpuLimit"] == "2"  # a YAML number is a Kubernetes quantity
    assert "nodeSelector" not in k8s["exec-train"] and "tolerations" not in k8s["exec-train"]
    assert k8s["exec-train"]["emptyDirMounts"][0]["mountPath"] == "/dev/shm"


DEV = ROOT / "k8s" / "overlays" / "dev" / "kustomization.yaml"


def _q(value: str) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "m": 1e-3}
    for unit, factor in units.items():
        if str(value).endswith(unit):
            return float(str(value)[: -len(unit)]) * factor
    return float(value)


def test_dev_overlay_command_compiles_a_pipeline_that_fits_its_quota(tmp_path, params):
    """The `--set`s the dev overlay documents: CPU-only training whose parallel sweep fits the
    overlay's quota and per-container maximum (the quota rejects pods over it)."""
    import re
    import shlex

    text = DEV.read_text()
    (command,) = [line.lstrip("# ").strip() for line in text.splitlines() if "compile --out" in line]
    argv = shlex.split(command.rstrip("\\"))
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    assert argv[:2] == ["ipa", "pipeline"] and "pipeline.cpu_only=true" in sets
    assert "-o " not in text
    out = tmp_path / "dev.yaml"
    assert kfp_cli.main(_args(tmp_path, sets=sets, out=out)) == 0
    spec, k8s = _load(out)
    res = spec["deploymentSpec"]["executors"]["exec-train"]["container"]["resources"]
    assert "accelerator" not in res and "nodeSelector" not in k8s["exec-train"]
    patches = {p["target"]["name"]: yaml.safe_load(p["patch"])[0]["value"] for p in yaml.safe_load(text)["patches"]}
    hard, max_ = patches["ipa-quota"], patches["ipa-limits"]
    n = len(params.pipeline.betas)  # train pods in flight at once
    shm = _q(k8s["exec-train"]["emptyDirMounts"][0]["sizeLimit"])
    assert n * _q(res["resourceCpuRequest"]) <= _q(hard["requests.cpu"]) / 2  # room for the other pods
    assert n * _q(res["resourceCpuLimit"]) <= _q(hard["limits.cpu"]) / 2
    assert n * _q(res["resourceMemoryRequest"]) <= _q(hard["requests.memory"]) / 2
    assert n * _q(res["resourceMemoryLimit"]) <= _q(hard["limits.memory"]) / 2
    assert _q(res["resourceMemoryLimit"]) <= _q(max_["memory"]) and _q(res["resourceCpuLimit"]) <= _q(max_["cpu"])
    assert shm < _q(res["resourceMemoryLimit"])  # /dev/shm counts against the pod's memory
    assert re.search(r"submit .*--package", text)


# ---- pipeline arguments (submit / run-local) --------------------------------------------------


def test_typed_parameters_and_dotted_keys_agree(params):
    """`--param train.steps=7` and `--param train_steps=7` give the same arguments: the typed
    value and a params_json that says the same; resolve-params (what the pods run) agrees."""
    _, by_key = kfp_cli.pipeline_arguments(params, ["train.steps=7", "gate.threshold=0.5", "init_adapter=models:/m@c"])
    _, by_name = kfp_cli.pipeline_arguments(params, ["train_steps=7", "gate_threshold=0.5",
                                                     "backend.init_adapter=models:/m@c"])
    assert by_key == by_name
    assert (by_key["train_steps"], by_key["gate_threshold"], by_key["init_adapter"]) == (7, 0.5, "models:/m@c")
    assert json.loads(by_key["params_json"])["train"]["steps"] == 7
    typed = {k: by_key[k] for k in kfp_cli.TYPED_PARAMETERS}
    assert kfp_cli.resolve_params(by_key["params_json"], typed) == by_key["params_json"]
    # a run that sets only the typed parameter (the KFP UI) still means it
    _, plain = kfp_cli.pipeline_arguments(params)
    resolved = parse_params(json.loads(kfp_cli.resolve_params(plain["params_json"], {**typed, "init_adapter": ""})))
    assert (resolved.train.steps, resolved.gate.threshold, resolved.backend.init_adapter) == (7, 0.5, None)


@pytest.mark.parametrize(("values", "needle"), [
    ({"train_steps": 0}, "train.steps"),
    ({"gate_threshold": 1.5}, "gate.threshold"),
    ({"gate_top_k": 1}, "gate.min_kept"),
    ({"nope": 1}, "unknown typed parameter(s) nope"),
])
def test_resolve_params_validates(params, values, needle):
    from ipa_lib.core.config import ConfigError

    with pytest.raises(ConfigError) as err:
        kfp_cli.resolve_params(kfp_cli.canonical_json(params), values)
    assert needle in str(err.value)


@pytest.mark.parametrize("override", ["pipeline.cpu_limit=2", "pipeline.memory_limit=8Gi", "pipeline.cpu_only=true",
                                      'params_json={"pipeline": {"image": "other:1"}}'])
def test_compile_time_settings_are_refused_at_submit(params, override):
    from ipa_lib.core.config import ConfigError

    with pytest.raises(ConfigError) as err:
        kfp_cli.pipeline_arguments(params, [override])
    message = str(err.value)
    assert "compiled into the package" in message and "ipa pipeline --set pipeline." in message and "compile" in message
    if not override.startswith("params_json"):
        assert f"--set {override} compile" in message


def test_betas_stay_a_run_argument(params):
    _, args = kfp_cli.pipeline_arguments(params, ["pipeline.betas=[5, 6]"])
    assert args["betas"] == [5.0, 6.0]
    _, args = kfp_cli.pipeline_arguments(params, ['params_json={"train": {"steps": 4}}'])  # pipeline kept
    assert json.loads(args["params_json"])["pipeline"] == params.pipeline.model_dump(mode="json")
    assert args["train_steps"] == 4


def test_compile_follows_params(tmp_path):
    out = tmp_path / "custom.yaml"
    sets = ["pipeline.image=registry.local/ipa:9", "pipeline.gpu_image=registry.local/ipa:9-cu",
            "pipeline.node_selector={pool: a100}", "pipeline.gpu_toleration_key=gpu", "pipeline.accelerator_limit=2",
            "pipeline.train_retries=0", "pipeline.betas=[50, 100]", "pipeline.pvc_name=other-pvc",
            "pipeline.mlflow_secret=other-secret", "backend.base_model=/data/base"]
    assert kfp_cli.main(_args(tmp_path, sets=sets, out=out)) == 0
    spec, k8s = _load(out)
    executors = spec["deploymentSpec"]["executors"]
    assert {e["container"]["image"] for n, e in executors.items() if n not in GPU_EXECUTORS} == {"registry.local/ipa:9"}
    assert {executors[n]["container"]["image"] for n in GPU_EXECUTORS} == {"registry.local/ipa:9-cu"}
    assert executors["exec-train"]["container"]["resources"]["accelerator"]["resourceCount"] == "2"
    assert k8s["exec-train"]["nodeSelector"]["labels"] == {"pool": "a100"}
    assert k8s["exec-train"]["tolerations"][0]["key"] == "gpu"
    assert k8s["exec-train"]["pvcMount"][0]["constant"] == "other-pvc"
    assert k8s["exec-register"]["secretAsEnv"][0]["secretName"] == "other-secret"
    assert "retryPolicy" not in _all_tasks(spec)["train"]  # train_retries=0: no retries
    inputs = spec["root"]["inputDefinitions"]["parameters"]
    assert inputs["betas"]["defaultValue"] == [50.0, 100.0]
    assert inputs["base_model"]["defaultValue"] == "/data/base"


# ---- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(("sets", "needle"), [
    (["pipeline.betas=[]"], "pipeline.betas"),
    (["pipeline.betas=[200, -1]"], "pipeline.betas"),
    (["pipeline.betas=[200, 200]"], "must not repeat"),
    (["pipeline.betas=abc"], "pipeline.betas"),
    (["pipeline.betas=[200, high]"], "pipeline.betas.1"),
    (["train.nope=1"], "train.nope: unknown key"),
    (["train.steps"], "must look like key.path=value"),
])
def test_bad_params_exit_2_naming_the_key(tmp_path, capsys, sets, needle):
    out = tmp_path / "never.yaml"
    assert kfp_cli.main(_args(tmp_path, sets=sets, out=out)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err
    assert not out.exists()


def test_malformed_params_file(tmp_path, capsys):
    bad = tmp_path / "params.yaml"
    bad.write_text("train: [unclosed\n")
    assert kfp_cli.main(_args(tmp_path, params=bad)) == 2
    assert f"{bad}: not valid YAML" in capsys.readouterr().err
    assert kfp_cli.main(_args(tmp_path, params=tmp_path / "missing.yaml")) == 2
    assert "params file not found" in capsys.readouterr().err


def test_cli_wiring(tmp_path):
    """`ipa pipeline compile` through the real argparse entry point."""
    from ipa_lib.cli import main

    out = tmp_path / "cli.yaml"
    assert main(["pipeline", "--params", str(PARAMS), "compile", "--out", str(out)]) == 0
    assert out.read_text() == COMMITTED.read_text()


# ---- packaging: pipelines/ and components/ come with the install ------------------------------


def _python(*args: str, cwd: Path, pythonpath: list[Path] | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(map(str, pythonpath))
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False)


WHERE = "import components.stages as c, ipa_lib, pipelines.ipa_round as p; print(ipa_lib.__file__, p.__file__, c.__file__)"


def test_editable_install_finds_the_checkout_without_sys_path(tmp_path):
    """`-I`: neither the working directory nor PYTHONPATH is on sys.path; the install alone
    maps `pipelines`/`components` to the checkout, and `ipa pipeline` leaves sys.path as it is."""
    code = ("import sys; before = list(sys.path)\n"
            "from ipa_lib.orchestration import kfp\n"
            "kfp.compile_package(kfp.load_params(sys.argv[1]), sys.argv[2])\n"
            f"{WHERE}; print(sys.path == before)")
    proc = _python("-I", "-c", code, str(PARAMS), str(tmp_path / "round.yaml"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [str(ROOT / "ipa_lib" / "__init__.py"), str(ROOT / "pipelines" / "ipa_round.py"),
                                   str(ROOT / "components" / "stages.py"), "True"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path]:
    """A wheel built from a copy of the sources (no build/ in the checkout), installed with
    `pip install --target` into a folder outside the checkout: (wheel, site folder)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for pkg in ("ipa_lib", "pipelines", "components"):
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    built = _python("-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), str(src), cwd=tmp)
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp / "dist").glob("*.whl")
    site = tmp / "site"
    done = _python("-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(site), str(wheel), cwd=tmp)
    assert done.returncode == 0, done.stderr
    shutil.rmtree(src / "build", ignore_errors=True)
    return wheel, site


def test_wheel_carries_ipa_lib_pipelines_and_components(installed, compiled):
    """Every module of ipa_lib (all that pods import: KFP embeds each component's source),
    pipelines and components is in the wheel; installed elsewhere it compiles the same YAML."""
    wheel, site = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = {p.relative_to(ROOT).as_posix() for pkg in ("ipa_lib", "pipelines", "components")
               for p in (ROOT / pkg).rglob("*.py") if "__pycache__" not in p.parts}
    assert {n for n in names if not n.startswith("ipa_align-")} == sources
    (top_level,) = [n for n in names if n.endswith(".dist-info/top_level.txt")]
    assert zipfile.ZipFile(wheel).read(top_level).decode().split() == ["components", "ipa_lib", "pipelines"]

    where = _python("-c", WHERE, cwd=site.parent, pythonpath=[site])
    assert where.returncode == 0, where.stderr
    assert where.stdout.split() == [str(site / "ipa_lib" / "__init__.py"), str(site / "pipelines" / "ipa_round.py"),
                                    str(site / "components" / "stages.py")]
    out = site.parent / "round.yaml"
    proc = _python("-m", "ipa_lib.cli", "pipeline", "--params", str(PARAMS), "compile", "--out", str(out),
                   cwd=site.parent, pythonpath=[site])
    assert proc.returncode == 0, proc.stderr
    assert out.read_text() == compiled[0].read_text()


def test_install_without_the_pipeline_packages_says_so(installed, tmp_path):
    """An install that lacks pipelines/ (here: the wheel's ipa_lib alone, `-S` so the editable
    finder of this venv is not loaded) exits 1 naming the missing module."""
    _, site = installed
    broken = tmp_path / "site"
    shutil.copytree(site / "ipa_lib", broken / "ipa_lib")
    proc = _python("-S", "-m", "ipa_lib.cli", "pipeline", "--params", str(PARAMS), "compile",
                   "--out", str(tmp_path / "never.yaml"), cwd=tmp_path,
                   pythonpath=[broken, Path(sysconfig.get_paths()["purelib"])])
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: module pipelines.ipa_round is not installed: this ipa-align install lacks pipelines/ and components/ "
        "(reinstall from a checkout: `pip install .`, or `pip install -e .`)")
    assert not (tmp_path / "never.yaml").exists()
