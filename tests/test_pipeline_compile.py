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

from ipa_lib.core.config import load_params, parse_params
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
    root = _tasks(spec)
    deps = {name: sorted(t.get("dependentTasks", [])) for name, t in root.items()}
    loop = next(n for n, t in root.items() if "parameterIterator" in t)
    cond = next(n for n, t in root.items() if "triggerPolicy" in t)
    assert deps == {
        "sample": [],
        "gate": ["sample"],
        loop: ["gate"],
        "select-best": [loop],
        "register": ["select-best"],
        "decide-promotion": ["register"],
        cond: ["decide-promotion", "register"],
    }
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
    root = _tasks(spec)
    loop = next(t for t in root.values() if "parameterIterator" in t)
    it = loop["parameterIterator"]
    assert it["items"] == {"inputParameter": "pipelinechannel--betas"}
    assert loop["inputs"]["parameters"]["pipelinechannel--betas"] == {"componentInputParameter": "betas"}
    for task in _tasks(spec, loop["componentRef"]["name"]).values():
        assert task["inputs"]["parameters"]["beta"] == {"componentInputParameter": it["itemInput"]}


def test_promote_only_under_the_condition(compiled):
    _, spec, _ = compiled
    root = _tasks(spec)
    cond = next(t for t in root.values() if "triggerPolicy" in t)
    expr = " ".join(cond["triggerPolicy"]["condition"].split())
    assert expr == "inputs.parameter_values['pipelinechannel--decide-promotion-Output'] == true"
    assert cond["inputs"]["parameters"]["pipelinechannel--decide-promotion-Output"]["taskOutputParameter"] == {
        "outputParameterKey": "Output", "producerTask": "decide-promotion"}
    assert "promote" not in root  # only inside the condition
    promote = _tasks(spec, cond["componentRef"]["name"])["promote"]
    assert promote["inputs"]["parameters"]["version"] == {"componentInputParameter": "pipelinechannel--register-Output"}


def test_gpu_pool_on_train_only(compiled, params):
    _, spec, k8s = compiled
    pc = params.pipeline
    executors = spec["deploymentSpec"]["executors"]
    res = executors["exec-train"]["container"]["resources"]
    assert res["accelerator"]["resourceType"] == pc.accelerator_type
    assert res["accelerator"]["resourceCount"] == str(pc.accelerator_limit)
    assert (res["cpuRequest"], res["cpuLimit"]) == (float(pc.cpu_request), float(pc.cpu_limit))
    assert res["resourceMemoryRequest"] == pc.memory_request and res["resourceMemoryLimit"] == pc.memory_limit
    assert res["resourceCpuRequest"] == pc.cpu_request and res["resourceCpuLimit"] == pc.cpu_limit
    train = k8s["exec-train"]
    assert train["nodeSelector"]["labels"] == pc.node_selector
    assert train["tolerations"] == [{"key": pc.gpu_toleration_key, "operator": "Exists"}]
    assert train["emptyDirMounts"] == [{"medium": "Memory", "mountPath": "/dev/shm", "sizeLimit": pc.shm_size_limit,
                                        "volumeName": "dshm"}]
    for name, ex in executors.items():
        if name != "exec-train":
            assert "accelerator" not in ex["container"].get("resources", {}), name
            assert "nodeSelector" not in k8s.get(name, {}) and "tolerations" not in k8s.get(name, {}), name


def test_retries_on_train(compiled, params):
    _, spec, _ = compiled
    tasks = _all_tasks(spec)
    assert tasks["train"]["retryPolicy"]["maxRetryCount"] == params.pipeline.train_retries
    assert [n for n, t in tasks.items() if "retryPolicy" in t] == ["train"]


def test_caching_off_for_sampling_training_and_registry(compiled):
    _, spec, _ = compiled
    tasks = _all_tasks(spec)
    cached = {n for n, t in tasks.items() if t.get("cachingOptions", {}).get("enableCache") is True}
    assert cached == {"gate", "evaluate", "select-best"}
    for name in ("sample", "train", "register", "decide-promotion", "promote"):
        assert tasks[name]["cachingOptions"] == {}, name  # explicit enable_caching=False


def test_pvc_and_secret_env(compiled, params):
    _, spec, k8s = compiled
    pc = params.pipeline
    with_pvc = {n for n, e in k8s.items() if "pvcMount" in e}
    assert with_pvc == {"exec-sample", "exec-train", "exec-evaluate", "exec-register"}
    for name in with_pvc:
        assert k8s[name]["pvcMount"] == [{"constant": pc.pvc_name, "mountPath": pc.mount_path,
                                          "pvcNameParameter": {"runtimeValue": {"constant": pc.pvc_name}}}]
    with_secret = {n for n, e in k8s.items() if "secretAsEnv" in e}
    assert with_secret == {"exec-sample", "exec-gate", "exec-train", "exec-evaluate", "exec-register",
                           "exec-decide-promotion", "exec-promote"}
    for name in with_secret:
        required, optional = k8s[name]["secretAsEnv"]
        assert required["secretName"] == pc.mlflow_secret and required["optional"] is False
        assert required["keyToEnv"] == [{"envVar": "MLFLOW_TRACKING_URI", "secretKey": "MLFLOW_TRACKING_URI"}]
        assert optional["secretName"] == pc.mlflow_secret and optional["optional"] is True
        assert {e["envVar"] for e in optional["keyToEnv"]} == {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"}


def test_runtime_image_on_every_executor(compiled, params):
    _, spec, _ = compiled
    executors = spec["deploymentSpec"]["executors"]
    assert len(executors) == 8
    for name, ex in executors.items():
        c = ex["container"]
        want = params.pipeline.gpu_image if name == "exec-train" else params.pipeline.image
        assert c["image"] == want, name
        script = " ".join(c["command"])
        assert "kfp.dsl.executor_main" in script and "pip install" not in script, name  # nothing installed in pods
        assert "from ipa_lib" in c["command"][-1], name  # each component calls the library


def test_parameters_default_to_params_yaml(compiled, params):
    _, spec, _ = compiled
    inputs = spec["root"]["inputDefinitions"]["parameters"]
    assert sorted(inputs) == ["base_model", "betas", "params_json"]
    assert parse_params(json.loads(inputs["params_json"]["defaultValue"])) == params
    assert inputs["betas"]["defaultValue"] == params.pipeline.betas
    assert inputs["base_model"]["defaultValue"] == f"{params.pipeline.mount_path}/{params.backend.base_model}"
    outputs = spec["root"]["outputDefinitions"]
    assert sorted(outputs["artifacts"]) == ["best_adapter", "best_evaluation"]
    assert sorted(outputs["parameters"]) == ["best_beta", "model_version"]


def test_compile_follows_params(tmp_path):
    out = tmp_path / "custom.yaml"
    sets = ["pipeline.image=registry.local/ipa:9", "pipeline.gpu_image=registry.local/ipa:9-cu",
            "pipeline.node_selector={pool: a100}", "pipeline.gpu_toleration_key=gpu", "pipeline.accelerator_limit=2",
            "pipeline.train_retries=0", "pipeline.betas=[50, 100]", "pipeline.pvc_name=other-pvc",
            "pipeline.mlflow_secret=other-secret", "backend.base_model=/data/base"]
    assert kfp_cli.main(_args(tmp_path, sets=sets, out=out)) == 0
    spec, k8s = _load(out)
    executors = spec["deploymentSpec"]["executors"]
    assert {e["container"]["image"] for n, e in executors.items() if n != "exec-train"} == {"registry.local/ipa:9"}
    assert executors["exec-train"]["container"]["image"] == "registry.local/ipa:9-cu"
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
