"""Multi-node training: the round's train step as a Kubeflow Trainer `TrainJob` or a
training-operator `PyTorchJob`, submitted and watched through the official kubernetes client.

When `pipeline.train_nodes > 1` the KFP train task does not train in-process; it calls
`run_train_job`, which

1. stages the task's inputs on the workspace PVC (`<mount_path>/.ipa-jobs/<job name>/`:
   `params.json` with this beta, `gated/`), where every node of the job mounts them;
2. builds the manifest (`build_manifest`): `pipeline.train_nodes` nodes, `accelerator_limit`
   GPUs and as many `torchrun` processes per node, each running `python -m ipa_lib.cli train`
   on the staged inputs; the pipeline's image, node selector, toleration, resources, PVC,
   /dev/shm, non-root security context and MLflow secret env;
3. creates it (`CustomObjectsApi`), polls it every `train_job_poll_s` until it succeeds,
   fails (`TrainJobFailed`: its Failed condition's reason and message, exit 1) or runs past
   `train_job_timeout_s` (`TrainJobTimeout`: the job is deleted first, its pods with it);
4. copies the adapter back into the task's output and returns the training summary.

A failed job is kept for `kubectl logs`; a retried task (same KFP run, same beta, same job
name) deletes it and submits again, and adopts a job of its name that is still running or
has succeeded. The CRD schemas these manifests validate against are vendored in k8s/crds/
(versions pinned there). `kubernetes` is imported inside the functions.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from ipa_lib.core.config import Params
from ipa_lib.core.errors import RuntimeFailure
from ipa_lib.core.extras import require
from ipa_lib.orchestration.cluster import make_api_client

DEFAULT_TIMEOUT: tuple[float, float] = (5.0, 30.0)  # (connect, read) seconds per API call
JOBS_DIR = ".ipa-jobs"  # under pipeline.mount_path: one folder per job
PATCH_MANAGER = "ipa-align.io/train"  # owner of the TrainJob's runtime patch
UID = 10001  # the runtime image's user (components/Dockerfile)


@dataclass(frozen=True)
class JobKind:
    group: str
    version: str
    plural: str
    kind: str
    container: str  # the container the operator runs the trainer in

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}"

    @property
    def crd(self) -> str:
        return f"{self.plural}.{self.group}"


TRAINJOB = JobKind("trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob", "node")
PYTORCHJOB = JobKind("kubeflow.org", "v1", "pytorchjobs", "PyTorchJob", "pytorch")
KINDS = {"trainjob": TRAINJOB, "pytorchjob": PYTORCHJOB}


class TrainJobFailed(RuntimeFailure):
    """The job reached its Failed condition (the message is the job's)."""


class TrainJobTimeout(RuntimeFailure):
    """The job did not finish in `pipeline.train_job_timeout_s`; it was deleted."""


@dataclass(frozen=True)
class JobPaths:
    """Where the job reads and writes, as the job's pods see the workspace PVC."""

    name: str
    params: str
    gated: str
    out: str
    base_model: str | None = None


def kind_of(params: Params) -> JobKind:
    return KINDS[params.pipeline.train_operator]


def job_name(kfp_run_id: str, beta: float) -> str:
    """`ipa-train-<10 hex>`: the same for every retry of one KFP run's train task at `beta`
    (an RFC 1035 label, as TrainJob names must be)."""
    digest = hashlib.sha256(f"{kfp_run_id}|{beta!r}".encode()).hexdigest()[:10]
    return f"ipa-train-{digest}"


def job_paths(params: Params, name: str, base_model: str | None = None) -> JobPaths:
    root = PurePosixPath(params.pipeline.mount_path) / JOBS_DIR / name
    return JobPaths(name, str(root / "params.json"), str(root / "gated"), str(root / "adapter"), base_model)


def train_command(params: Params, paths: JobPaths) -> list[str]:
    """`torchrun ... -m ipa_lib.cli train` on the staged inputs. torchrun takes the node count,
    node rank and processes per node from the PET_* variables both operators set; the
    PyTorchJob operator names the master in MASTER_ADDR/MASTER_PORT (kubelet expands $(VAR)).
    Tracking is off in the job: the KFP task logs the stage run once, not once per node."""
    cmd = ["torchrun"]
    if params.pipeline.train_operator == "pytorchjob":
        cmd += ["--master-addr=$(MASTER_ADDR)", "--master-port=$(MASTER_PORT)"]
    cmd += ["-m", "ipa_lib.cli", "train", "--params", paths.params, "--gated", paths.gated, "--out", paths.out,
            "--quiet", "--set", "tracking.enabled=false"]
    if paths.base_model:
        cmd += ["--base-model", paths.base_model]
    return cmd


def _mlflow_env(params: Params) -> list[dict]:
    """The MLflow secret as env vars, as the pipeline tasks get it (credentials optional)."""
    secret = params.pipeline.mlflow_secret
    env = [{"name": "MLFLOW_TRACKING_URI", "valueFrom": {"secretKeyRef": {"name": secret, "key": "MLFLOW_TRACKING_URI"}}}]
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        env.append({"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key, "optional": True}}})
    return env


def _gpus(params: Params) -> int:
    return 0 if params.pipeline.cpu_only else params.pipeline.accelerator_limit


def _resources(params: Params) -> dict:
    pc = params.pipeline
    requests = {"cpu": pc.cpu_request, "memory": pc.memory_request}
    limits = {"cpu": pc.cpu_limit, "memory": pc.memory_limit}
    if gpus := _gpus(params):
        requests[pc.accelerator_type] = limits[pc.accelerator_type] = str(gpus)
    return {"requests": requests, "limits": limits}


def _pod_settings(params: Params) -> dict:
    """Pod-level settings of every node: scheduling, security, volumes."""
    pc = params.pipeline
    spec: dict[str, Any] = {
        "securityContext": {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID, "fsGroup": UID,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "volumes": [
            {"name": "workspace", "persistentVolumeClaim": {"claimName": pc.pvc_name}},
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": pc.shm_size_limit}},
            {"name": "tmp", "emptyDir": {"sizeLimit": "8Gi"}},
        ],
    }
    if not pc.cpu_only:
        spec["nodeSelector"] = dict(pc.node_selector)
        spec["tolerations"] = [{"key": pc.gpu_toleration_key, "operator": "Exists"}]
    if pc.image_pull_secrets:
        spec["imagePullSecrets"] = [{"name": s} for s in pc.image_pull_secrets]
    return spec


def _container_settings() -> dict:
    return {
        "securityContext": {"runAsNonRoot": True, "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": [],  # filled by the caller (mount path from params)
    }


def _mounts(params: Params) -> list[dict]:
    return [{"name": "workspace", "mountPath": params.pipeline.mount_path},
            {"name": "dshm", "mountPath": "/dev/shm"}, {"name": "tmp", "mountPath": "/tmp"}]


def _metadata(params: Params, paths: JobPaths, labels: dict[str, str] | None) -> dict:
    return {"name": paths.name, "namespace": params.pipeline.namespace,
            "labels": {"app.kubernetes.io/part-of": "ipa-align", "app.kubernetes.io/component": "train",
                       **(labels or {})}}


def build_trainjob(params: Params, paths: JobPaths, labels: dict[str, str] | None = None) -> dict:
    """A trainer.kubeflow.org/v1alpha1 TrainJob on `pipeline.train_runtime` (ClusterTrainingRuntime,
    Kubeflow's `torch-distributed` by default); pod settings go in through a runtime patch."""
    pc = params.pipeline
    pod = _pod_settings(params)
    container = {"name": TRAINJOB.container, **_container_settings(), "volumeMounts": _mounts(params)}
    return {
        "apiVersion": TRAINJOB.api_version,
        "kind": TRAINJOB.kind,
        "metadata": _metadata(params, paths, labels),
        "spec": {
            "runtimeRef": {"name": pc.train_runtime, "apiGroup": TRAINJOB.group, "kind": "ClusterTrainingRuntime"},
            "activeDeadlineSeconds": pc.train_job_timeout_s,
            "trainer": {
                "image": pc.image if pc.cpu_only else pc.gpu_image,
                "command": train_command(params, paths),
                "env": _mlflow_env(params),
                "numNodes": pc.train_nodes,
                "numProcPerNode": max(_gpus(params), 1),
                "resourcesPerNode": _resources(params),
            },
            "runtimePatches": [{
                "manager": PATCH_MANAGER,
                "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [{
                    "name": "node",
                    "template": {"spec": {"template": {"spec": {**pod, "containers": [container]}}}},
                }]}}},
            }],
        },
    }


def build_pytorchjob(params: Params, paths: JobPaths, labels: dict[str, str] | None = None) -> dict:
    """A kubeflow.org/v1 PyTorchJob: one Master and `train_nodes - 1` Workers, `accelerator_limit`
    processes each (nprocPerNode), the whole pod spec written out."""
    pc = params.pipeline
    container = {
        "name": PYTORCHJOB.container,
        "image": pc.image if pc.cpu_only else pc.gpu_image,
        "command": train_command(params, paths),
        "env": _mlflow_env(params),
        "resources": _resources(params),
        **_container_settings(),
        "volumeMounts": _mounts(params),
    }

    def replica(n: int) -> dict:
        return {"replicas": n, "restartPolicy": "Never",
                "template": {"spec": {**_pod_settings(params), "automountServiceAccountToken": False,
                                      "containers": [container]}}}

    specs = {"Master": replica(1)}
    if pc.train_nodes > 1:
        specs["Worker"] = replica(pc.train_nodes - 1)
    return {
        "apiVersion": PYTORCHJOB.api_version,
        "kind": PYTORCHJOB.kind,
        "metadata": _metadata(params, paths, labels),
        "spec": {
            "nprocPerNode": str(max(_gpus(params), 1)),
            "runPolicy": {"activeDeadlineSeconds": pc.train_job_timeout_s, "backoffLimit": 0,
                          "cleanPodPolicy": "None", "ttlSecondsAfterFinished": 86400},
            "pytorchReplicaSpecs": specs,
        },
    }


def build_manifest(params: Params, paths: JobPaths, labels: dict[str, str] | None = None) -> dict:
    """The job for `pipeline.train_operator`."""
    build = build_trainjob if params.pipeline.train_operator == "trainjob" else build_pytorchjob
    return build(params, paths, labels)


# --------------------------------------------------------------------------- state


def _conditions(obj: dict) -> dict[str, dict]:
    return {c.get("type"): c for c in (obj.get("status") or {}).get("conditions") or [] if c.get("status") == "True"}


def job_state(kind: JobKind, obj: dict) -> tuple[str, str]:
    """("pending" | "running" | "succeeded" | "failed", detail) from the job's status."""
    conds = _conditions(obj)
    done, failed = ("Complete", "Failed") if kind is TRAINJOB else ("Succeeded", "Failed")
    if failed in conds:
        c = conds[failed]
        return "failed", f"{c.get('reason') or 'Failed'}: {c.get('message') or 'no message'}"
    if done in conds:
        return "succeeded", conds[done].get("message") or ""
    if kind is TRAINJOB:
        jobs = (obj.get("status") or {}).get("jobsStatus") or []
        if any((j.get("active") or 0) > 0 for j in jobs):
            active = sum(j.get("active") or 0 for j in jobs)
            return "running", f"{active} pod(s) active"
        if "Suspended" in conds:
            return "pending", f"suspended: {conds['Suspended'].get('message') or ''}"
    elif "Running" in conds:
        return "running", conds["Running"].get("message") or ""
    return "pending", ""


# --------------------------------------------------------------------------- API


def _api_error(err) -> str:
    try:
        return f"HTTP {err.status}: {json.loads(err.body or '{}').get('message') or err.reason}"
    except (ValueError, TypeError, AttributeError):
        return f"HTTP {err.status}: {err.reason}"


class JobClient:
    """Create/get/delete one kind of job in `namespace` through `CustomObjectsApi`."""

    def __init__(self, api_client, kind: JobKind, namespace: str, timeout: tuple[float, float] = DEFAULT_TIMEOUT):
        from kubernetes import client

        self.api = client.CustomObjectsApi(api_client)
        self.kind, self.namespace, self.timeout = kind, namespace, timeout

    def _args(self) -> tuple[str, str, str, str]:
        return self.kind.group, self.kind.version, self.namespace, self.kind.plural

    def _do(self, what: str, fn: Callable, *args, **kwargs):
        import urllib3
        from kubernetes.client.exceptions import ApiException

        try:
            return fn(*self._args(), *args, _request_timeout=self.timeout, **kwargs)
        except ApiException as err:
            if err.status == 404 and what != "create":
                return None
            if err.status == 409 and what == "create":
                raise FileExistsError(err) from None
            hint = " (the train step needs the k8s/overlays/multinode RBAC)" if err.status in (401, 403) else ""
            missing = " (is the CRD installed? `ipa cluster preflight`)" if err.status == 404 else ""
            raise RuntimeFailure(f"{what} {self.kind.kind}: {_api_error(err)}{hint}{missing}") from None
        except (urllib3.exceptions.HTTPError, OSError) as err:
            raise RuntimeFailure(f"{what} {self.kind.kind}: API server did not answer: {err}") from None

    def create(self, body: dict) -> dict:
        return self._do("create", self.api.create_namespaced_custom_object, body)

    def get(self, name: str) -> dict | None:
        return self._do("get", self.api.get_namespaced_custom_object, name)

    def delete(self, name: str) -> None:
        self._do("delete", self.api.delete_namespaced_custom_object, name, propagation_policy="Background")


@dataclass
class JobResult:
    name: str
    state: str
    detail: str
    seconds: float
    polls: int


def submit_and_wait(params: Params, manifest: dict, api_client=None, *, log: Callable[[str], None] = print,
                    sleep: Callable[[float], None] = time.sleep) -> JobResult:
    """Create `manifest` (adopting a running or succeeded job of its name, replacing a failed
    one), poll it until it finishes; raise TrainJobFailed / TrainJobTimeout (after deleting it)."""
    require("kubernetes", extra="cluster", purpose="multi-node training (pipeline.train_nodes > 1)")
    pc = params.pipeline
    kind, name = kind_of(params), manifest["metadata"]["name"]
    if api_client is None:
        api_client = make_api_client()  # in the task's pod: its service account
    jobs = JobClient(api_client, kind, pc.namespace)
    started = time.monotonic()
    try:
        jobs.create(manifest)
        log(f"{kind.kind} {pc.namespace}/{name} created: {pc.train_nodes} node(s)")
    except FileExistsError:
        existing = jobs.get(name) or {}
        state, detail = job_state(kind, existing)
        if state == "failed":  # an earlier attempt's job: replace it
            log(f"{kind.kind} {name} exists and failed ({detail}); deleting it and submitting again")
            jobs.delete(name)
            _wait_gone(jobs, name, started, pc, sleep)
            jobs.create(manifest)
        else:
            log(f"{kind.kind} {name} exists ({state}): waiting for it")
    polls, last = 0, None
    while True:
        obj = jobs.get(name)
        polls += 1
        if obj is None:
            raise TrainJobFailed(f"{kind.kind} {pc.namespace}/{name} disappeared while waiting for it")
        state, detail = job_state(kind, obj)
        elapsed = time.monotonic() - started
        if state != last:
            log(f"{kind.kind} {name}: {state}{f' ({detail})' if detail else ''}")
            last = state
        if state == "succeeded":
            return JobResult(name, state, detail, elapsed, polls)
        if state == "failed":
            raise TrainJobFailed(f"{kind.kind} {pc.namespace}/{name} failed: {detail} "
                                 f"(kept for `kubectl -n {pc.namespace} logs -l {_pod_label(kind, name)}`)")
        if elapsed >= pc.train_job_timeout_s:
            jobs.delete(name)
            raise TrainJobTimeout(f"{kind.kind} {pc.namespace}/{name} did not finish within "
                                  f"pipeline.train_job_timeout_s={pc.train_job_timeout_s}s (last state: {state}); deleted it")
        sleep(pc.train_job_poll_s)


def _wait_gone(jobs: JobClient, name: str, started: float, pc, sleep) -> None:
    while jobs.get(name) is not None:
        if time.monotonic() - started >= pc.train_job_timeout_s:
            raise TrainJobTimeout(f"{jobs.kind.kind} {name} still exists after deletion "
                                  f"(pipeline.train_job_timeout_s={pc.train_job_timeout_s}s)")
        sleep(pc.train_job_poll_s)


def _pod_label(kind: JobKind, name: str) -> str:
    if kind is TRAINJOB:
        return f"jobset.sigs.k8s.io/jobset-name={name}"
    return f"training.kubeflow.org/job-name={name}"


# --------------------------------------------------------------------------- the train step


def stage_inputs(params: Params, paths: JobPaths, gated: str | Path) -> None:
    """Write the job's params and a copy of the gated samples where the job reads them."""
    root = Path(paths.params).parent
    if root.exists():  # a retry: stale inputs of the earlier attempt
        shutil.rmtree(root / "gated", ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    Path(paths.params).write_text(json.dumps(params.model_dump(mode="json"), indent=1, sort_keys=True))
    shutil.copytree(gated, paths.gated)


def read_result(paths: JobPaths) -> dict:
    """The job's training summary plus its log (what `stages.train.train` returns)."""
    from ipa_lib.core.io import read_json

    out = Path(paths.out)
    summary = read_json(out / "train_summary.json", "the train job's summary")
    log_path = out / "train_log.jsonl"
    log = [json.loads(line) for line in log_path.read_text().splitlines() if line] if log_path.exists() else []
    return {**summary, "log": log}


def run_train_job(params: Params, gated: str | Path, out: str | Path, base_model: str | None, kfp_run_id: str,
                  api_client=None, labels: dict[str, str] | None = None, **kwargs) -> dict:
    """The train step on `pipeline.train_nodes` nodes: stage inputs on the PVC, submit, wait,
    copy the adapter to `out`; returns the training result."""
    name = job_name(kfp_run_id, params.train.beta)
    paths = job_paths(params, name, base_model)
    stage_inputs(params, paths, gated)
    run_label = re.sub(r"[^A-Za-z0-9_.-]", "-", kfp_run_id)[:63].strip("-_.") or "none"  # a label value
    manifest = build_manifest(params, paths, {"ipa-align/kfp-run-id": run_label, **(labels or {})})
    submit_and_wait(params, manifest, api_client, **kwargs)
    shutil.copytree(paths.out, out, dirs_exist_ok=True)
    return read_result(paths)
