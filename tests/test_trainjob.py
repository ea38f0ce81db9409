"""Multi-node training (ipa_lib/orchestration/trainjob.py) against a loopback API server.

The manifests validate against the CRD schemas vendored in k8s/crds/ (pinned releases).
Submitting, polling, failing, timing out and replacing go through the real kubernetes
client (`CustomObjectsApi`) to a loopback HTTP server (127.0.0.1) that answers like the API
server: POST echoes the object with server metadata, GET replays the recorded bodies in
tests/data/k8s/ in order, DELETE records the call. In the success test a small "controller"
runs the manifest's own command (`python -m ipa_lib.cli train ...`, torchrun left out) on
the inputs staged on a local folder standing in for the workspace PVC.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from ipa_lib.core.config import parse_params
from ipa_lib.core.errors import RuntimeFailure, exit_code
from ipa_lib.orchestration import trainjob as tj
from ipa_lib.orchestration.cluster import CRD_CHECK, TRAINING_CRDS, preflight
from test_preflight import _client, apiserver  # noqa: F401 (the preflight's recorded cluster and its client)

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data" / "k8s"
CRDS = ROOT / "k8s" / "crds"
CRD_FILES = {"trainjob": CRDS / "trainer.kubeflow.org_trainjobs.yaml", "pytorchjob": CRDS / "kubeflow.org_pytorchjobs.yaml"}
NS = "ipa-align"


# --------------------------------------------------------------------------- CRD schemas


def _strict(node):
    """The CRD schema as the API server applies it with fieldValidation=Strict: unknown fields
    are errors (jsonschema would accept them), except under x-kubernetes-preserve-unknown-fields."""
    if isinstance(node, dict):
        if node.get("type") == "object" and "properties" in node and "additionalProperties" not in node \
                and not node.get("x-kubernetes-preserve-unknown-fields"):
            node["additionalProperties"] = False
        for v in node.values():
            _strict(v)
    elif isinstance(node, list):
        for v in node:
            _strict(v)
    return node


@functools.cache
def _crd_text(operator: str) -> dict:  # parsed once (600 KB each)
    return yaml.load(CRD_FILES[operator].read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def _crd(operator: str) -> dict:
    return copy.deepcopy(_crd_text(operator))


def _validator(operator: str, version: str):
    import jsonschema

    v = next(v for v in _crd(operator)["spec"]["versions"] if v["name"] == version)
    return jsonschema.Draft7Validator(_strict(v["schema"]["openAPIV3Schema"]))


def _errors(manifest: dict) -> list[str]:
    group, version = manifest["apiVersion"].split("/")
    operator = "trainjob" if group == tj.TRAINJOB.group else "pytorchjob"
    return [f"{'.'.join(map(str, e.path))}: {e.message[:200]}" for e in _validator(operator, version).iter_errors(manifest)]


def _params(operator="trainjob", nodes=4, **pipeline):
    return parse_params({"pipeline": {"train_nodes": nodes, "train_operator": operator, **pipeline}})


def test_vendored_crds_are_the_pinned_releases():
    """k8s/crds/README.md names each file's release, commit and sha256; the files match them
    and define what trainjob.py submits (and what the preflight looks for)."""
    readme = (CRDS / "README.md").read_text()
    for operator, path in CRD_FILES.items():
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        assert f"| {path.name} |" in readme and digest in readme, f"{path.name}: sha256 {digest} not in k8s/crds/README.md"
        crd = _crd(operator)
        kind = tj.KINDS[operator]
        assert crd["metadata"]["name"] == kind.crd == TRAINING_CRDS[operator][0]
        assert crd["spec"]["names"]["kind"] == kind.kind == TRAINING_CRDS[operator][2]
        assert kind.version in [v["name"] for v in crd["spec"]["versions"] if v["served"]]
        assert kind.version == TRAINING_CRDS[operator][1]


@pytest.mark.parametrize("operator", ["trainjob", "pytorchjob"])
@pytest.mark.parametrize("cpu_only", [False, True])
def test_manifest_validates_against_the_vendored_crd(operator, cpu_only):
    params = _params(operator, cpu_only=cpu_only, image_pull_secrets=["regcred"])
    paths = tj.job_paths(params, tj.job_name("3f1c2b9e-run", 600.0), "/workspace/models/base")
    m = tj.build_manifest(params, paths, {"ipa-align/kfp-run-id": "3f1c2b9e-run"})
    assert _errors(m) == []
    assert m["kind"] == tj.KINDS[operator].kind and m["metadata"]["namespace"] == NS


def test_validation_catches_typos_and_wrong_types():
    m = tj.build_manifest(_params(), tj.job_paths(_params(), "ipa-train-x"))
    bad = copy.deepcopy(m)
    bad["spec"]["trainer"]["numNode"] = bad["spec"]["trainer"].pop("numNodes")
    assert any("numNode" in e for e in _errors(bad))
    bad = copy.deepcopy(m)
    bad["spec"]["trainer"]["numNodes"] = "4"
    assert any("trainer.numNodes" in e for e in _errors(bad))
    bad = copy.deepcopy(m)
    del bad["spec"]["runtimeRef"]
    assert any("runtimeRef" in e for e in _errors(bad))
    p = tj.build_manifest(_params("pytorchjob"), tj.job_paths(_params("pytorchjob"), "ipa-train-x"))
    p["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["resources"]["limit"] = {}
    assert any("limit" in e for e in _errors(p))


def test_job_name_follows_the_crd_name_rules():
    """The TrainJob CRD's CEL rules on metadata.name (jsonschema does not evaluate CEL)."""
    rules = [r["rule"] for r in _crd("trainjob")["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["x-kubernetes-validations"]]
    pattern = next(re.search(r"matches\('(.+)'\)", r).group(1) for r in rules if "matches" in r)
    limit = int(next(re.search(r"<= (\d+)", r).group(1) for r in rules if "size(" in r))
    names = {tj.job_name(run, beta) for run in ("", "run-1", "x" * 300) for beta in (200.0, 600.0)}
    assert len(names) == 6  # one job per run and beta
    for name in names:
        assert re.fullmatch(pattern, name) and len(name) <= limit, name
    assert tj.job_name("run-1", 600.0) == tj.job_name("run-1", 600.0)  # a retry finds its job


def test_manifest_carries_the_pipeline_settings():
    params = _params("trainjob", nodes=3, accelerator_limit=8, pvc_name="ws", mount_path="/ws")
    paths = tj.job_paths(params, "ipa-train-abc", "/ws/models/base")
    spec = tj.build_manifest(params, paths)["spec"]
    trainer = spec["trainer"]
    assert trainer["numNodes"] == 3 and trainer["numProcPerNode"] == 8
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "8"
    assert trainer["image"] == params.pipeline.gpu_image
    cmd = trainer["command"]
    assert cmd[:4] == ["torchrun", "-m", "ipa_lib.cli", "train"]
    assert cmd[cmd.index("--params") + 1] == "/ws/.ipa-jobs/ipa-train-abc/params.json"
    assert cmd[cmd.index("--base-model") + 1] == "/ws/models/base"
    assert {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in trainer["env"]} == {
        "MLFLOW_TRACKING_URI": "ipa-mlflow", "MLFLOW_TRACKING_USERNAME": "ipa-mlflow", "MLFLOW_TRACKING_PASSWORD": "ipa-mlflow"}
    assert spec["runtimeRef"] == {"name": "torch-distributed", "apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime"}
    pod = spec["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == params.pipeline.node_selector
    assert {"key": "nvidia.com/gpu", "operator": "Exists"} in pod["tolerations"]
    assert {"name": "workspace", "persistentVolumeClaim": {"claimName": "ws"}} in pod["volumes"]
    assert {"name": "workspace", "mountPath": "/ws"} in pod["containers"][0]["volumeMounts"]
    assert pod["containers"][0]["name"] == "node"  # the container of Kubeflow's torch-distributed runtime
    py = tj.build_manifest(_params("pytorchjob", nodes=3), paths)["spec"]
    assert py["pytorchReplicaSpecs"]["Master"]["replicas"] == 1 and py["pytorchReplicaSpecs"]["Worker"]["replicas"] == 2
    assert py["nprocPerNode"] == "1"
    c = py["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    assert c["name"] == "pytorch" and "--master-addr=$(MASTER_ADDR)" in c["command"]


# --------------------------------------------------------------------------- loopback API server


class _Api(BaseHTTPRequestHandler):
    gets: dict[str, list] = {}  # path -> [(status, recorded file | dict)], replayed in order (the last repeats)
    post_status: list = []  # [(status, file)] for successive POSTs; default: 201 echo
    seen: list = []  # (method, path, query, body)
    controller = None  # called with the created object (runs the job)

    def _reply(self, status: int, body: bytes):
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _recorded(self, recorded, name: str) -> bytes:
        if callable(recorded):
            recorded = recorded()
        text = json.dumps(recorded) if isinstance(recorded, dict) else (DATA / recorded).read_text()
        return text.replace("{name}", name).encode()

    def _split(self):
        path, _, query = self.path.partition("?")
        return path, query

    def do_GET(self):
        path, query = self._split()
        self.seen.append(("GET", path, query, None))
        queue = self.gets.get(path)
        if not queue:
            return self._reply(404, json.dumps({"kind": "Status", "code": 404, "reason": "NotFound",
                                                "message": f"{path} not found"}).encode())
        status, recorded = queue.pop(0) if len(queue) > 1 else queue[0]
        self._reply(status, self._recorded(recorded, path.rsplit("/", 1)[-1]))

    def do_POST(self):
        path, query = self._split()
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.seen.append(("POST", path, query, body))
        if self.post_status:
            status, recorded = self.post_status.pop(0)
            if status != 201:
                return self._reply(status, self._recorded(recorded, body["metadata"]["name"]))
        created = {**body, "metadata": {**body["metadata"], "uid": "6f0c8a52-3a1e-4d4b-9b7e-2c1f4e0d9a17",
                                        "resourceVersion": "48211907", "generation": 1,
                                        "creationTimestamp": "2026-11-30T09:12:04Z"}}
        if self.controller:
            type(self).controller(created)
        self._reply(201, json.dumps(created).encode())

    def do_DELETE(self):
        path, query = self._split()
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        self.seen.append(("DELETE", path, query, body))
        self._reply(200, json.dumps({"kind": "Status", "apiVersion": "v1", "status": "Success"}).encode())

    def log_message(self, *args):
        pass


@pytest.fixture
def jobserver():
    class Handler(_Api):
        gets, post_status, seen, controller = {}, [], [], None

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    Handler.host = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield Handler
    finally:
        server.shutdown()
        server.server_close()


def _job_path(kind, name: str = "") -> str:
    base = f"/apis/{kind.group}/{kind.version}/namespaces/{NS}/{kind.plural}"
    return f"{base}/{name}" if name else base


def _calls(server, method: str) -> list:
    return [s for s in server.seen if s[0] == method]


# --------------------------------------------------------------------------- submit and wait


def test_trainjob_create_running_succeeded_trains_on_the_staged_inputs(jobserver, tiny, tmp_path):
    """The real train command from the manifest, run by a stand-in controller while the
    client polls: the adapter comes back into the task's output."""
    from ipa_lib.stages.gate import gate
    from ipa_lib.stages.sample import sample

    params, work = tiny
    sample(params, work / "samples", progress=False)
    gate(params, work / "samples", work / "gated", progress=False)
    params.pipeline.train_nodes, params.pipeline.train_job_poll_s = 2, 0.1
    params.pipeline.mount_path = str(tmp_path / "pvc")
    params.train.beta = 600.0
    name = tj.job_name("run-ok", 600.0)
    done: dict = {}

    def controller(created):  # what the operator + torchrun would do: run the command on each node
        cmd = created["spec"]["trainer"]["command"]
        argv = [sys.executable, *cmd[cmd.index("-m"):]]

        def run():
            done["proc"] = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False)

        done["thread"] = threading.Thread(target=run)
        done["thread"].start()

    def state():
        t = done.get("thread")
        if t is None or t.is_alive():
            return "trainjob_running.json"
        assert done["proc"].returncode == 0, done["proc"].stderr[-3000:]
        return "trainjob_complete.json"

    jobserver.controller = controller
    jobserver.gets[_job_path(tj.TRAINJOB, name)] = [(200, lambda: json.loads((DATA / state()).read_text()))]
    lines: list[str] = []
    out = tmp_path / "adapter-artifact"
    result = tj.run_train_job(params, work / "gated", out, str(params.backend.base_model), "run-ok",
                              api_client=_client(jobserver.host), log=lines.append)
    posts = _calls(jobserver, "POST")
    assert [p[1] for p in posts] == [_job_path(tj.TRAINJOB)]
    body = posts[0][3]
    assert body == tj.build_manifest(params, tj.job_paths(params, name, str(params.backend.base_model)),
                                     {"ipa-align/kfp-run-id": "run-ok"})
    assert _errors(body) == []  # what reached the server validates against the CRD
    assert (out / "pytorch_lora_weights.safetensors").exists() and (out / "train_summary.json").exists()
    assert result["steps"] == params.train.steps and result["beta"] == 600.0 and len(result["log"]) == params.train.steps
    staged = json.loads((tmp_path / "pvc" / ".ipa-jobs" / name / "params.json").read_text())
    assert staged["train"]["beta"] == 600.0
    assert any("running" in line for line in lines) and "succeeded" in lines[-1]
    assert not _calls(jobserver, "DELETE")


def test_trainjob_failure_is_surfaced_with_the_jobs_message(jobserver):
    params = _params(train_job_poll_s=0.01)
    name = tj.job_name("run-fail", 600.0)
    jobserver.gets[_job_path(tj.TRAINJOB, name)] = [(200, "trainjob_pending.json"), (200, "trainjob_running.json"),
                                                    (200, "trainjob_failed.json")]
    manifest = tj.build_manifest(params, tj.job_paths(params, name))
    with pytest.raises(tj.TrainJobFailed) as info:
        tj.submit_and_wait(params, manifest, _client(jobserver.host), log=lambda _: None)
    msg = str(info.value)
    assert f"TrainJob ipa-align/{name} failed: FailedJobs: jobset failed due to one or more job failures" in msg
    assert f"jobset.sigs.k8s.io/jobset-name={name}" in msg  # where the logs are
    assert exit_code(info.value) == 1
    assert not _calls(jobserver, "DELETE")  # kept for kubectl logs


def test_pytorchjob_running_succeeded_and_failed(jobserver):
    params = _params("pytorchjob", train_job_poll_s=0.01)
    ok, bad = tj.job_name("run-a", 200.0), tj.job_name("run-b", 200.0)
    jobserver.gets[_job_path(tj.PYTORCHJOB, ok)] = [(200, "pytorchjob_running.json"), (200, "pytorchjob_succeeded.json")]
    jobserver.gets[_job_path(tj.PYTORCHJOB, bad)] = [(200, "pytorchjob_running.json"), (200, "pytorchjob_failed.json")]
    result = tj.submit_and_wait(params, tj.build_manifest(params, tj.job_paths(params, ok)), _client(jobserver.host),
                                log=lambda _: None)
    assert result.state == "succeeded" and result.polls == 2 and "successfully completed" in result.detail
    with pytest.raises(tj.TrainJobFailed, match=f"PyTorchJobFailed: PyTorchJob {bad} is failed because 1 Worker replica"):
        tj.submit_and_wait(params, tj.build_manifest(params, tj.job_paths(params, bad)), _client(jobserver.host),
                           log=lambda _: None)
    assert [p[1] for p in _calls(jobserver, "POST")] == [_job_path(tj.PYTORCHJOB)] * 2


def test_timeout_deletes_the_job_and_fails(jobserver):
    params = _params(train_job_timeout_s=1, train_job_poll_s=0.05)
    name = tj.job_name("run-slow", 600.0)
    jobserver.gets[_job_path(tj.TRAINJOB, name)] = [(200, "trainjob_running.json")]  # never finishes
    with pytest.raises(tj.TrainJobTimeout) as info:
        tj.submit_and_wait(params, tj.build_manifest(params, tj.job_paths(params, name)), _client(jobserver.host),
                           log=lambda _: None)
    assert "did not finish within pipeline.train_job_timeout_s=1s (last state: running); deleted it" in str(info.value)
    deletes = _calls(jobserver, "DELETE")
    assert [d[1] for d in deletes] == [_job_path(tj.TRAINJOB, name)]
    assert (deletes[0][3] or {}).get("propagationPolicy") == "Background" or "propagationPolicy=Background" in deletes[0][2]
    assert exit_code(info.value) == 1


def test_retry_replaces_a_failed_job_and_adopts_a_running_one(jobserver):
    params = _params(train_job_poll_s=0.01)
    name = tj.job_name("run-retry", 600.0)
    path = _job_path(tj.TRAINJOB, name)
    manifest = tj.build_manifest(params, tj.job_paths(params, name))
    exists = (409, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "AlreadyExists", "code": 409,
                    "message": f'trainjobs.trainer.kubeflow.org "{name}" already exists'})
    jobserver.post_status = [exists]  # first POST: an earlier attempt's job
    jobserver.gets[path] = [(200, "trainjob_failed.json"), (404, {"kind": "Status", "code": 404}),
                            (200, "trainjob_running.json"), (200, "trainjob_complete.json")]
    assert tj.submit_and_wait(params, manifest, _client(jobserver.host), log=lambda _: None).state == "succeeded"
    assert [s[0] for s in jobserver.seen if s[0] != "GET"] == ["POST", "DELETE", "POST"]
    jobserver.seen.clear()
    jobserver.post_status = [exists]
    jobserver.gets[path] = [(200, "trainjob_running.json"), (200, "trainjob_complete.json")]
    assert tj.submit_and_wait(params, manifest, _client(jobserver.host), log=lambda _: None).state == "succeeded"
    assert [s[0] for s in jobserver.seen if s[0] != "GET"] == ["POST"]  # adopted, not deleted


def test_forbidden_create_points_at_the_overlay(jobserver):
    params = _params()
    jobserver.post_status = [(403, "status_403_create_trainjobs.json")]
    with pytest.raises(RuntimeFailure, match=r"create TrainJob: HTTP 403: .*cannot create resource \"trainjobs\".*k8s/overlays/multinode"):
        tj.submit_and_wait(params, tj.build_manifest(params, tj.job_paths(params, "ipa-train-x")),
                           _client(jobserver.host), log=lambda _: None)


# --------------------------------------------------------------------------- preflight


CRD_PATH = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
RUNTIME = "/apis/trainer.kubeflow.org/v1alpha1/clustertrainingruntimes/torch-distributed"


def _preflight(apiserver, params):  # noqa: F811 (the fixture from test_preflight)
    return preflight(params, api_client=_client(apiserver.host), timeout=(2.0, 5.0))


def test_preflight_reports_the_trainjob_crd_and_runtime(apiserver):  # noqa: F811
    apiserver.set(**{f"{CRD_PATH}/trainjobs.trainer.kubeflow.org": (200, "crd_trainjobs.trainer.kubeflow.org.json"),
                     RUNTIME: (200, "clustertrainingruntime_torch-distributed.json")})
    report = _preflight(apiserver, _params(nodes=2))
    assert report.ok, report.failed
    crd = report.get(CRD_CHECK)
    assert "trainjobs.trainer.kubeflow.org v1alpha1 installed" in crd.detail and "torch-distributed present" in crd.detail
    assert CRD_CHECK not in [c.name for c in _preflight(apiserver, _params(nodes=1)).checks]  # single node: not asked


def test_preflight_fails_when_the_crd_or_runtime_is_absent(apiserver):  # noqa: F811
    apiserver.set(**{f"{CRD_PATH}/trainjobs.trainer.kubeflow.org": (404, "status_404_crd_trainjobs.trainer.kubeflow.org.json")})
    report = _preflight(apiserver, _params(nodes=2))
    crd = report.get(CRD_CHECK)
    assert not crd.ok and "trainjobs.trainer.kubeflow.org: not installed (install Kubeflow Trainer" in crd.detail
    assert [c.name for c in report.failed] == [CRD_CHECK]
    apiserver.set(**{f"{CRD_PATH}/trainjobs.trainer.kubeflow.org": (200, "crd_trainjobs.trainer.kubeflow.org.json")})
    crd = _preflight(apiserver, _params(nodes=2)).get(CRD_CHECK)
    assert not crd.ok and "ClusterTrainingRuntime torch-distributed not found" in crd.detail


def test_preflight_pytorchjob_operator_checks_its_crd(apiserver):  # noqa: F811
    params = _params("pytorchjob", nodes=2)
    assert not _preflight(apiserver, params).get(CRD_CHECK).ok
    apiserver.set(**{f"{CRD_PATH}/pytorchjobs.kubeflow.org": (200, "crd_pytorchjobs.kubeflow.org.json")})
    crd = _preflight(apiserver, params).get(CRD_CHECK)
    assert crd.ok and "pytorchjobs.kubeflow.org v1 installed (PyTorchJob, 2 nodes)" in crd.detail
    assert RUNTIME not in apiserver.paths  # PyTorchJobs reference no runtime


# --------------------------------------------------------------------------- k8s/overlays/multinode


def test_multinode_overlay_grants_exactly_the_job_calls():
    """The rendered overlay (also validated with the others in test_k8s_manifests.py) lets
    the pipeline service account make the calls trainjob.py makes, and the preflight role
    read the CRD and runtime it checks."""
    import shutil

    if shutil.which("kubectl") is None:
        pytest.skip("kubectl (with kustomize) is not installed")
    from test_k8s_manifests import K8S, _kustomize

    docs = [d for d in yaml.safe_load_all(_kustomize(K8S / "overlays" / "multinode")) if d]
    pc = _params().pipeline
    by = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    role = by[("Role", "ipa-pipeline-trainjobs")]
    binding = by[("RoleBinding", "ipa-pipeline-trainjobs")]
    assert binding["roleRef"]["name"] == "ipa-pipeline-trainjobs"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": pc.service_account, "namespace": pc.namespace}]
    for kind in tj.KINDS.values():
        rule = next(r for r in role["rules"] if r["apiGroups"] == [kind.group])
        assert rule["resources"] == [kind.plural] and {"create", "get", "delete"} <= set(rule["verbs"])
        assert "list" not in rule["verbs"] and "update" not in rule["verbs"]
    pre = by[("ClusterRole", "ipa-preflight-multinode")]["rules"]
    assert {c[0] for c in TRAINING_CRDS.values()} == set(next(r for r in pre if r["resources"] == ["customresourcedefinitions"])["resourceNames"])
    assert next(r for r in pre if r["resources"] == ["clustertrainingruntimes"])["resourceNames"] == [pc.train_runtime]
    assert ("Role", "ipa-pipeline") in by and ("Job", "ipa-gpu-smoke") in by  # the gpu overlay underneath
