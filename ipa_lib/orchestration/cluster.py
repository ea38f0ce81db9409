"""Cluster preflight: does the Kubernetes cluster have what a pipeline run needs?

`ipa cluster preflight [--context NAME]` asks the API server, through the official
`kubernetes` client, for exactly the objects a run uses (all named in params.yaml
`pipeline`), and prints a checklist:

    API server       the kubeconfig's server answers (short timeouts, no retries)
    namespace        pipeline.namespace exists and is Active
    GPU nodes        nodes carrying every pipeline.node_selector label, Ready and schedulable
    GPU allocatable  one of them allocates >= pipeline.accelerator_limit of accelerator_type
    GPU taints       its NoSchedule/NoExecute taints are tolerated by gpu_toleration_key
    workspace PVC    pipeline.pvc_name is Bound
    MLflow secret    pipeline.mlflow_secret exists with non-empty MLFLOW_TRACKING_URI
    MLflow service   pipeline.mlflow_service exists and exposes a port
    training CRD     only when pipeline.train_nodes > 1: the TrainJob (trainer.kubeflow.org) or
                     PyTorchJob (kubeflow.org) CRD is installed and serves the version the train
                     step submits; for a TrainJob, the ClusterTrainingRuntime pipeline.train_runtime exists

Secret values are never printed, only key names. The API calls are the read-only ones the
`ipa-preflight` Role/ClusterRole in k8s/base/rbac.yaml grants. `kubernetes` is imported
inside the functions so `ipa --help` stays fast.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from ipa_lib.core.config import ConfigError, Params
from ipa_lib.core.errors import RuntimeFailure
from ipa_lib.core.extras import require

# (connect, read) seconds for every API call: an unreachable or hung server fails fast.
DEFAULT_TIMEOUT: tuple[float, float] = (3.0, 10.0)
# Keys pipeline steps read from the MLflow secret (as env vars).
REQUIRED_SECRET_KEYS: tuple[str, ...] = ("MLFLOW_TRACKING_URI",)
CHECK_NAMES: tuple[str, ...] = (
    "API server",
    "namespace",
    "GPU nodes",
    "GPU allocatable",
    "GPU taints",
    "workspace PVC",
    "MLflow secret",
    "MLflow service",
)
_BLOCKING_EFFECTS = ("NoSchedule", "NoExecute")
CRD_CHECK = "training CRD"  # only for multi-node training (pipeline.train_nodes > 1)
# pipeline.train_operator -> (CRD, served version, kind): what orchestration/trainjob.py submits
TRAINING_CRDS: dict[str, tuple[str, str, str]] = {
    "trainjob": ("trainjobs.trainer.kubeflow.org", "v1alpha1", "TrainJob"),
    "pytorchjob": ("pytorchjobs.kubeflow.org", "v1", "PyTorchJob"),
}


def check_names(params: Params) -> tuple[str, ...]:
    """The checks `preflight` reports for `params`, in order."""
    if params.pipeline.train_nodes > 1:
        i = CHECK_NAMES.index("GPU taints") + 1
        return (*CHECK_NAMES[:i], CRD_CHECK, *CHECK_NAMES[i:])
    return CHECK_NAMES


@dataclass(frozen=True)
class Check:
    """One line of the checklist. `skipped` checks could not run (and count as not ok)."""

    name: str
    ok: bool
    detail: str
    skipped: bool = False


@dataclass
class PreflightReport:
    host: str
    namespace: str
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def get(self, name: str) -> Check:
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(f"no check named {name!r}; have {[c.name for c in self.checks]}")


class PreflightError(RuntimeFailure):
    """No usable client configuration (kubeconfig/context/in-cluster)."""


# --------------------------------------------------------------------------- client


def make_api_client(context: str | None = None):
    """ApiClient from the kubeconfig (`KUBECONFIG` or ~/.kube/config) or, inside a pod, the
    in-cluster service account. No urllib3 retries: one attempt per call, bounded by timeouts."""
    from kubernetes import client, config

    cfg = client.Configuration()
    try:
        # KUBECONFIG read now (the client reads it once, at import); may list several files
        config.load_kube_config(
            config_file=os.environ.get("KUBECONFIG") or None, context=context, client_configuration=cfg
        )
    except (config.ConfigException, OSError, TypeError, ValueError) as err:
        if context is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
            try:
                config.load_incluster_config(client_configuration=cfg)
            except config.ConfigException as err2:
                raise PreflightError(f"in-cluster config unusable: {err2}") from None
        else:
            where = f"context {context!r}" if context else "current context"
            raise PreflightError(f"no usable kubeconfig ({where}): {err}") from None
    cfg.retries = 0
    return client.ApiClient(cfg)


@dataclass
class _Outcome:
    value: Any = None
    status: int | None = None  # HTTP status of an API error (404, 403, ...)
    error: str | None = None  # readable reason when the call did not return a value
    transport: bool = False  # the server could not be reached / did not answer in time

    @property
    def ok(self) -> bool:
        return self.error is None


def _api_message(err) -> str:
    import json

    try:
        body = json.loads(err.body or "{}")
        msg = body.get("message") or err.reason
    except (ValueError, TypeError, AttributeError):
        msg = err.reason
    return f"HTTP {err.status}: {msg}"


def _transport_message(err: BaseException, timeout: tuple[float, float]) -> str:
    import urllib3

    reason = getattr(err, "reason", None) or err
    # NewConnectionError subclasses ConnectTimeoutError: test it first ("refused" is not a timeout)
    if isinstance(reason, urllib3.exceptions.NewConnectionError):
        return re.sub(r"<[^>]+>:\s*", "", str(reason))
    if isinstance(reason, urllib3.exceptions.ConnectTimeoutError):
        return f"connect timed out after {timeout[0]:g}s"
    if isinstance(reason, (urllib3.exceptions.ReadTimeoutError, TimeoutError)):
        return f"no answer within {timeout[1]:g}s"
    text = str(reason)
    # urllib3 wraps errno text as "<obj at 0x..>: Failed to establish ...: [Errno 111] ..."
    text = re.sub(r"<[^>]+>:\s*", "", text)
    return text


def _call(fn: Callable, *args, timeout: tuple[float, float]) -> _Outcome:
    import urllib3
    from kubernetes.client.exceptions import ApiException

    try:
        return _Outcome(value=fn(*args, _request_timeout=timeout))
    except ApiException as err:
        if err.status == 0 or err.status is None:  # raised by the client for transport problems
            return _Outcome(error=str(err.reason), transport=True)
        return _Outcome(status=err.status, error=_api_message(err))
    except (urllib3.exceptions.HTTPError, OSError) as err:
        return _Outcome(error=_transport_message(err, timeout), transport=True)


def _denied_hint(out: _Outcome) -> str:
    if out.status in (401, 403):
        return f"{out.error} (preflight needs the ipa-preflight Role/ClusterRole, k8s/README.md)"
    return out.error or ""


# --------------------------------------------------------------------------- checks


def _quantity(value: Any) -> float:
    from kubernetes.utils import parse_quantity

    try:
        return float(parse_quantity(value))
    except (ValueError, TypeError):
        return 0.0


def _node_ready(node) -> bool:
    for cond in (node.status.conditions or []) if node.status else []:
        if cond.type == "Ready":
            return cond.status == "True"
    return False


def _untolerated(node, toleration_key: str) -> list[str]:
    bad = []
    for t in (node.spec.taints or []) if node.spec else []:
        if t.effect in _BLOCKING_EFFECTS and t.key != toleration_key:
            bad.append(f"{t.key}={t.value or ''}:{t.effect}")
    return bad


def _gpu_checks(nodes: list, params: Params) -> list[Check]:
    pc = params.pipeline
    selector = ",".join(f"{k}={v}" for k, v in pc.node_selector.items()) or "<no node_selector>"
    matching = [
        n for n in nodes if all((n.metadata.labels or {}).get(k) == v for k, v in pc.node_selector.items())
    ]
    if not matching:
        names = ", ".join(sorted(n.metadata.name for n in nodes)[:8]) or "none"
        skip = "not checked: no GPU nodes"
        return [
            Check(
                "GPU nodes",
                False,
                f"no node has labels {selector} ({len(nodes)} nodes in cluster: {names}); "
                "label/taint the GPU pool as in k8s/README.md",
            ),
            Check("GPU allocatable", False, skip, skipped=True),
            Check("GPU taints", False, skip, skipped=True),
        ]

    usable = [n for n in matching if _node_ready(n) and not (n.spec and n.spec.unschedulable)]
    listing = ", ".join(
        f"{n.metadata.name}{'' if n in usable else ' (NotReady/cordoned)'}" for n in matching
    )
    checks = [
        Check(
            "GPU nodes",
            bool(usable),
            f"{len(matching)} node(s) with {selector}: {listing}"
            + ("" if usable else "; none Ready and schedulable"),
        )
    ]
    if not usable:
        skip = "not checked: no Ready GPU node"
        return checks + [Check("GPU allocatable", False, skip, True), Check("GPU taints", False, skip, True)]

    need = pc.accelerator_limit
    alloc = {n.metadata.name: _quantity((n.status.allocatable or {}).get(pc.accelerator_type, "0")) for n in usable}
    fitting = [n for n in usable if alloc[n.metadata.name] >= need]
    per_node = ", ".join(f"{k}={v:g}" for k, v in alloc.items())
    total = sum(alloc.values())
    want = need * len(pc.betas)
    detail = f"{pc.accelerator_type}: {per_node}; need {need} per train pod"
    if fitting and total < want:
        detail += f" ({want} for all {len(pc.betas)} betas at once: {total:g} available, the rest queue)"
    if not fitting:
        detail += f"; no node allocates {need} (is the device plugin running?)"
    checks.append(Check("GPU allocatable", bool(fitting), detail))
    if not fitting:
        return checks + [Check("GPU taints", False, "not checked: no node with enough GPUs", True)]

    tolerated, blocked = [], []
    for n in fitting:
        bad = _untolerated(n, pc.gpu_toleration_key)
        (blocked if bad else tolerated).append((n, bad))
    if tolerated:
        gpu_taints = sorted(
            {
                f"{t.key}:{t.effect}"
                for n, _ in tolerated
                for t in (n.spec.taints or [])
                if t.effect in _BLOCKING_EFFECTS
            }
        )
        if gpu_taints:
            detail = f"{', '.join(gpu_taints)} tolerated (toleration key {pc.gpu_toleration_key})"
        else:
            detail = "no NoSchedule taint: other pods may take the GPU nodes (taint the pool, k8s/README.md)"
        checks.append(Check("GPU taints", True, detail))
    else:
        why = "; ".join(f"{n.metadata.name}: {', '.join(bad)}" for n, bad in blocked)
        checks.append(
            Check("GPU taints", False, f"not tolerated (pipeline tolerates only {pc.gpu_toleration_key}): {why}")
        )
    return checks


def _pvc_check(out: _Outcome, params: Params) -> Check:
    pc = params.pipeline
    if not out.ok:
        if out.status == 404:
            return Check("workspace PVC", False, f"{pc.pvc_name}: not found (kubectl apply -k k8s/overlays/<env>)")
        return Check("workspace PVC", False, f"{pc.pvc_name}: {_denied_hint(out)}")
    pvc = out.value
    phase = (pvc.status.phase if pvc.status else None) or "Unknown"
    modes = ",".join(pvc.spec.access_modes or []) if pvc.spec else ""
    size = ((pvc.status.capacity or {}) if pvc.status else {}).get("storage") or (
        (pvc.spec.resources.requests or {}).get("storage") if pvc.spec and pvc.spec.resources else "?"
    )
    if phase != "Bound":
        sc = pvc.spec.storage_class_name if pvc.spec else None
        return Check(
            "workspace PVC",
            False,
            f"{pc.pvc_name}: {phase}, not Bound (StorageClass {sc or 'default'}, {modes}, {size}); "
            "check `kubectl describe pvc` events; a WaitForFirstConsumer class binds only once a pod mounts it",
        )
    detail = f"{pc.pvc_name}: Bound to {pvc.spec.volume_name}, {size}, {modes}"
    if "ReadWriteMany" not in modes and len(pc.betas) > 1:
        detail += " (not ReadWriteMany: parallel train pods must share one node)"
    return Check("workspace PVC", True, detail)


def _secret_check(out: _Outcome, params: Params) -> Check:
    pc = params.pipeline
    if not out.ok:
        if out.status == 404:
            return Check(
                "MLflow secret",
                False,
                f"{pc.mlflow_secret}: not found; kubectl -n {pc.namespace} create secret generic "
                f"{pc.mlflow_secret} --from-literal=MLFLOW_TRACKING_URI=http://{pc.mlflow_service}."
                f"{pc.namespace}.svc.cluster.local:5000",
            )
        return Check("MLflow secret", False, f"{pc.mlflow_secret}: {_denied_hint(out)}")
    secret = out.value
    data = {k: v for k, v in (secret.data or {}).items()}
    data.update({k: v for k, v in (getattr(secret, "string_data", None) or {}).items()})
    present = sorted(k for k, v in data.items() if v)
    missing = [k for k in REQUIRED_SECRET_KEYS if k not in present]
    keys = ", ".join(present) or "none"
    if missing:
        return Check(
            "MLflow secret", False, f"{pc.mlflow_secret}: missing or empty {', '.join(missing)} (has: {keys})"
        )
    return Check("MLflow secret", True, f"{pc.mlflow_secret}: keys {keys} (values not shown)")


def _service_check(out: _Outcome, params: Params) -> Check:
    pc = params.pipeline
    if not out.ok:
        if out.status == 404:
            return Check(
                "MLflow service", False, f"{pc.mlflow_service}: not found (kubectl apply -k k8s/overlays/<env>)"
            )
        return Check("MLflow service", False, f"{pc.mlflow_service}: {_denied_hint(out)}")
    svc = out.value
    ports = [p.port for p in (svc.spec.ports or [])] if svc.spec else []
    if not ports:
        return Check("MLflow service", False, f"{pc.mlflow_service}: exposes no port")
    url = f"http://{pc.mlflow_service}.{pc.namespace}.svc.cluster.local:{ports[0]}"
    detail = f"{pc.mlflow_service}: {svc.spec.type} {svc.spec.cluster_ip}:{ports[0]} -> {url}"
    return Check("MLflow service", True, detail)


def _raw(fn: Callable) -> Callable:
    """`fn` returning the decoded JSON body (no model classes: any CRD shape reads)."""
    import json

    def call(*args, **kwargs):
        return json.loads(fn(*args, _preload_content=False, **kwargs).data)

    return call


def _crd_check(api_client, params: Params, timeout: tuple[float, float]) -> tuple[Check, bool]:
    """(the training CRD check, whether the server stopped answering)."""
    from kubernetes import client

    operator = params.pipeline.train_operator
    crd_name, version, kind = TRAINING_CRDS[operator]
    trainjob = operator == "trainjob"
    hint = ("install Kubeflow Trainer (k8s/README.md, Multi-node)" if trainjob
            else "install the Kubeflow training-operator v1 (k8s/README.md, Multi-node)")
    out = _call(_raw(client.ApiextensionsV1Api(api_client).read_custom_resource_definition), crd_name, timeout=timeout)
    if out.transport:
        return Check(CRD_CHECK, False, f"not checked: API server stopped answering ({out.error})", True), True
    if not out.ok:
        if out.status == 404:
            return Check(CRD_CHECK, False, f"{crd_name}: not installed ({hint})"), False
        return Check(CRD_CHECK, False, f"{crd_name}: {_denied_hint(out)}"), False
    crd = out.value
    served = [v.get("name") for v in (crd.get("spec") or {}).get("versions") or [] if v.get("served")]
    established = any(c.get("type") == "Established" and c.get("status") == "True"
                      for c in (crd.get("status") or {}).get("conditions") or [])
    if version not in served:
        return Check(CRD_CHECK, False, f"{crd_name}: serves {', '.join(served) or 'no version'}, "
                                       f"the train step submits {version}"), False
    if not established:
        return Check(CRD_CHECK, False, f"{crd_name}: installed but not Established"), False
    detail = f"{crd_name} {version} installed ({kind}, {params.pipeline.train_nodes} nodes)"
    if not trainjob:
        return Check(CRD_CHECK, True, detail), False
    name = params.pipeline.train_runtime
    rt = _call(_raw(client.CustomObjectsApi(api_client).get_cluster_custom_object),
               crd_name.split(".", 1)[1], version, "clustertrainingruntimes", name, timeout=timeout)
    if rt.transport:
        return Check(CRD_CHECK, False, f"{detail}; runtime not checked ({rt.error})", True), True
    if rt.status == 404:
        return Check(CRD_CHECK, False, f"{detail}; ClusterTrainingRuntime {name} not found "
                                       "(pipeline.train_runtime; Kubeflow Trainer's runtimes install it)"), False
    if not rt.ok:
        return Check(CRD_CHECK, False, f"{detail}; ClusterTrainingRuntime {name}: {_denied_hint(rt)}"), False
    return Check(CRD_CHECK, True, f"{detail}; ClusterTrainingRuntime {name} present"), False


def preflight(
    params: Params,
    context: str | None = None,
    api_client=None,
    timeout: tuple[float, float] = DEFAULT_TIMEOUT,
) -> PreflightReport:
    """Check the cluster against `params.pipeline`; never raises for cluster problems.

    `api_client`: a ready `kubernetes.client.ApiClient` (tests point one at a loopback
    server); otherwise one is built from the kubeconfig `context` (None = current).
    """
    require("kubernetes", extra="cluster", purpose="`ipa cluster preflight`")
    from kubernetes import client

    pc = params.pipeline
    report = PreflightReport(host="?", namespace=pc.namespace)
    if api_client is None:
        try:
            api_client = make_api_client(context)
        except PreflightError as err:
            report.checks.append(Check("API server", False, str(err)))
            skip = "not checked: no cluster configuration"
            report.checks += [Check(n, False, skip, True) for n in check_names(params)[1:]]
            return report
    report.host = api_client.configuration.host
    core = client.CoreV1Api(api_client)
    checks = report.checks

    names = check_names(params)

    def unreachable(first: str, reason: str) -> PreflightReport:
        remaining = names[names.index(first) :]
        checks.extend(Check(n, False, f"not checked: {reason}", True) for n in remaining)
        return report

    # 1. reachability + namespace (one call)
    ns = _call(core.read_namespace, pc.namespace, timeout=timeout)
    if ns.transport:
        checks.append(Check("API server", False, f"cannot reach {report.host}: {ns.error}"))
        return unreachable("namespace", "API server unreachable")
    checks.append(Check("API server", True, f"{report.host} answered"))
    ns_exists = ns.ok
    if ns.ok:
        phase = (ns.value.status.phase if ns.value.status else None) or "Unknown"
        checks.append(Check("namespace", phase == "Active", f"{pc.namespace}: {phase}"))
    elif ns.status == 404:
        checks.append(Check("namespace", False, f"{pc.namespace}: not found (kubectl apply -k k8s/overlays/<env>)"))
    else:
        ns_exists = True  # cannot tell (e.g. forbidden); still try the namespaced objects
        checks.append(Check("namespace", False, f"{pc.namespace}: {_denied_hint(ns)}"))

    # 2. GPU node pool
    nodes = _call(core.list_node, timeout=timeout)
    if nodes.transport:
        return unreachable("GPU nodes", f"API server stopped answering ({nodes.error})")
    if nodes.ok:
        checks.extend(_gpu_checks(list(nodes.value.items or []), params))
    else:
        checks.append(Check("GPU nodes", False, f"cannot list nodes: {_denied_hint(nodes)}"))
        skip = "not checked: nodes not listed"
        checks.extend(Check(n, False, skip, True) for n in ("GPU allocatable", "GPU taints"))
    if CRD_CHECK in names:  # multi-node training: the job's CRD (cluster-scoped)
        crd, stopped = _crd_check(api_client, params, timeout)
        checks.append(crd)
        if stopped:
            return unreachable("workspace PVC", "API server stopped answering")

    # 3. namespaced objects
    if not ns_exists:
        return unreachable("workspace PVC", f"namespace {pc.namespace} missing")
    for name, fn, obj, judge in (
        ("workspace PVC", core.read_namespaced_persistent_volume_claim, pc.pvc_name, _pvc_check),
        ("MLflow secret", core.read_namespaced_secret, pc.mlflow_secret, _secret_check),
        ("MLflow service", core.read_namespaced_service, pc.mlflow_service, _service_check),
    ):
        out = _call(fn, obj, pc.namespace, timeout=timeout)
        if out.transport:
            return unreachable(name, f"API server stopped answering ({out.error})")
        checks.append(judge(out, params))
    return report


# --------------------------------------------------------------------------- CLI


def render(report: PreflightReport, console=None) -> None:
    """Print the checklist as a rich table plus a one-line verdict."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = console or Console()
    table = Table(title=f"ipa cluster preflight: {report.host} (namespace {report.namespace})")
    table.add_column("", no_wrap=True)
    table.add_column("check", no_wrap=True)
    table.add_column("detail", overflow="fold")
    for c in report.checks:
        if c.skipped:
            mark = Text("SKIP", style="yellow")
        else:
            mark = Text("PASS", style="green") if c.ok else Text("FAIL", style="bold red")
        table.add_row(mark, Text(c.name), Text(c.detail))
    console.print(table)
    if report.ok:
        n = len(report.checks)
        console.print(Text(f"All {n} checks passed: the cluster is ready for a run.", style="green"))
    else:
        n_skip = sum(c.skipped for c in report.checks)
        n_fail = len(report.failed) - n_skip
        console.print(
            Text(
                f"{n_fail} of {len(report.checks)} checks failed, {n_skip} not checked: "
                "fix them before submitting a run.",
                style="bold red",
            )
        )


# --------------------------------------------------------------------------- image


def image_problem(ref: str) -> str | None:
    """Why an image reference is not pinned (None when it is): needs an exact tag or digest."""
    if "@sha256:" in ref:
        return None
    name, _, tag = ref.rpartition(":")
    if not name or "/" in tag:
        return f"{ref}: no tag (would mean latest)"
    if tag == "latest":
        return f"{ref}: 'latest' is not a pinned tag"
    return None


def image_build_commands(params: Params) -> list[str]:
    """`docker build` lines for the CPU and CUDA runtime images, tagged from params.yaml."""
    pc = params.pipeline
    for ref in (pc.image, pc.gpu_image):
        if problem := image_problem(ref):
            raise ConfigError(f"pipeline image: {problem}")
    m = re.search(r"cuda(\d+)\.(\d+)", pc.gpu_image.rpartition(":")[2])
    variant = f"cu{m.group(1)}{m.group(2)}" if m else "cu128"
    return [
        f"docker build -f components/Dockerfile -t {pc.image} .",
        f"docker build -f components/Dockerfile --build-arg TORCH_VARIANT={variant} -t {pc.gpu_image} .",
    ]
