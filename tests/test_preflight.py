"""`ipa cluster preflight` against recorded API responses, through the real kubernetes client.

A loopback HTTP server (127.0.0.1, random port) replays the JSON bodies in tests/data/k8s/
for the paths the client calls; a real `kubernetes.client.ApiClient` (or a kubeconfig file)
points at it. No API server exists here.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from ipa_lib.cli import main as ipa
from ipa_lib.orchestration.cluster import CHECK_NAMES, preflight
from ipa_lib.core.config import Params, parse_params

DATA = Path(__file__).parent / "data" / "k8s"
NS = "/api/v1/namespaces/ipa-align"
P_NS, P_NODES = NS, "/api/v1/nodes"
P_PVC, P_SECRET, P_SVC = f"{NS}/persistentvolumeclaims/ipa-workspace", f"{NS}/secrets/ipa-mlflow", f"{NS}/services/mlflow"
SECRET_VALUE = "http://mlflow.ipa-align:5000"  # what secret_ipa-mlflow.json holds (base64)

HEALTHY = {
    P_NS: (200, "namespace_ipa-align.json"),
    P_NODES: (200, "nodes_gpu_pool.json"),
    P_PVC: (200, "pvc_ipa-workspace_bound.json"),
    P_SECRET: (200, "secret_ipa-mlflow.json"),
    P_SVC: (200, "service_mlflow.json"),
}


class _Replay(BaseHTTPRequestHandler):
    routes: dict[str, tuple[int, str | dict]] = {}
    seen: list[tuple[str, str, str | None]] = []

    def do_GET(self):  # noqa: N802 (http.server API)
        path = self.path.split("?", 1)[0]
        self.seen.append(("GET", path, self.headers.get("Authorization")))
        status, recorded = self.routes.get(path, (404, None))
        if recorded is None:
            body = json.dumps({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404,
                               "reason": "NotFound", "message": f"the server could not find {path}"}).encode()
        elif isinstance(recorded, dict):  # a recorded body edited by the test
            body = json.dumps(recorded).encode()
        else:
            body = (DATA / recorded).read_bytes()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):  # keep pytest output clean
        pass


@pytest.fixture
def apiserver():
    """Start a replaying server; `set(routes)` chooses the recorded cluster."""

    class Handler(_Replay):
        routes = dict(HEALTHY)
        seen = []

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()

    class Server:
        host = f"http://127.0.0.1:{server.server_address[1]}"
        handler = Handler

        def set(self, **changes):
            for path, value in changes.items():
                Handler.routes[path] = value

        @property
        def paths(self):
            return [p for _, p, _ in Handler.seen]

    try:
        yield Server()
    finally:
        server.shutdown()
        server.server_close()


def _client(host: str):
    from kubernetes import client

    cfg = client.Configuration()
    cfg.host = host
    cfg.retries = 0
    return client.ApiClient(cfg)


def _run(apiserver, params: Params | None = None, **routes):
    for key, value in routes.items():
        apiserver.set(**{{"ns": P_NS, "nodes": P_NODES, "pvc": P_PVC, "secret": P_SECRET, "svc": P_SVC}[key]: value})
    return preflight(params or Params(), api_client=_client(apiserver.host), timeout=(2.0, 5.0))


# --------------------------------------------------------------------------- passing cluster


def test_healthy_cluster_passes_every_check(apiserver):
    report = _run(apiserver)
    assert report.ok, report.failed
    assert [c.name for c in report.checks] == list(CHECK_NAMES)
    assert sorted(apiserver.paths) == sorted(HEALTHY)  # exactly the recorded read-only calls
    assert "Active" in report.get("namespace").detail
    assert "gke-ipa-h100-pool-8e02-7mfr" in report.get("GPU nodes").detail
    assert "gke-ipa-default-pool" not in report.get("GPU nodes").detail
    assert "nvidia.com/gpu:NoSchedule tolerated" in report.get("GPU taints").detail
    assert "Bound" in report.get("workspace PVC").detail
    assert "not ReadWriteMany" in report.get("workspace PVC").detail  # RWO + 3 betas: a warning, not a failure
    assert "MLFLOW_TRACKING_URI" in report.get("MLflow secret").detail
    assert "34.118.231.40:5000" in report.get("MLflow service").detail
    assert all(SECRET_VALUE not in c.detail for c in report.checks)  # values never shown


# --------------------------------------------------------------------------- failing clusters


def test_no_gpu_nodes_fails(apiserver):
    report = _run(apiserver, nodes=(200, "nodes_cpu_only.json"))
    assert not report.ok
    gpu = report.get("GPU nodes")
    assert not gpu.ok and "no node has labels cloud.google.com/gke-accelerator=nvidia-h100-80gb" in gpu.detail
    assert report.get("GPU allocatable").skipped and report.get("GPU taints").skipped
    assert report.get("workspace PVC").ok and report.get("MLflow secret").ok  # the rest still checked


def test_pvc_pending_fails(apiserver):
    report = _run(apiserver, pvc=(200, "pvc_ipa-workspace_pending.json"))
    assert [c.name for c in report.failed] == ["workspace PVC"]
    assert "Pending, not Bound" in report.get("workspace PVC").detail
    assert "standard-rwo" in report.get("workspace PVC").detail


def test_secret_missing_fails_with_the_command_to_create_it(apiserver):
    report = _run(apiserver, secret=(404, "status_404_secret_ipa-mlflow.json"))
    assert [c.name for c in report.failed] == ["MLflow secret"]
    detail = report.get("MLflow secret").detail
    assert "not found" in detail and "kubectl -n ipa-align create secret generic ipa-mlflow" in detail


def test_secret_forbidden_points_at_the_preflight_role(apiserver):
    report = _run(apiserver, secret=(403, "status_403_secret_ipa-mlflow.json"))
    detail = report.get("MLflow secret").detail
    assert not report.ok and "HTTP 403" in detail and "ipa-preflight" in detail


def test_secret_without_required_key_fails(apiserver):
    body = json.loads((DATA / "secret_ipa-mlflow.json").read_text())
    body["data"] = {"MLFLOW_TRACKING_USERNAME": "dXNlcg==", "MLFLOW_TRACKING_URI": ""}
    report = _run(apiserver, secret=(200, body))
    detail = report.get("MLflow secret").detail
    assert not report.ok and "missing or empty MLFLOW_TRACKING_URI" in detail and "dXNlcg==" not in detail


def test_untolerated_taints_and_cordoned_nodes_fail(apiserver):
    report = _run(apiserver, nodes=(200, "nodes_gpu_dedicated.json"))
    assert report.get("GPU nodes").ok  # one node is still Ready and schedulable
    assert "cordoned" in report.get("GPU nodes").detail
    taints = report.get("GPU taints")
    assert not taints.ok and "dedicated=inference:NoSchedule" in taints.detail


def test_not_enough_allocatable_gpus_fails(apiserver):
    params = parse_params({"pipeline": {"accelerator_limit": 16}})
    report = _run(apiserver, params)
    alloc = report.get("GPU allocatable")
    assert not alloc.ok and "no node allocates 16" in alloc.detail
    assert report.get("GPU taints").skipped


def test_node_selector_and_toleration_come_from_params(apiserver):
    params = parse_params({"pipeline": {"gpu_toleration_key": "example.com/gpu"}})
    report = _run(apiserver, params)
    assert not report.get("GPU taints").ok and "nvidia.com/gpu=present:NoSchedule" in report.get("GPU taints").detail
    params = parse_params({"pipeline": {"node_selector": {"cloud.google.com/gke-accelerator": "nvidia-a100-80gb"}}})
    assert not _run(apiserver, params).get("GPU nodes").ok


def test_missing_namespace_skips_namespaced_checks(apiserver):
    report = _run(apiserver, ns=(404, "status_404_namespace_ipa-align.json"))
    assert not report.get("namespace").ok and "not found" in report.get("namespace").detail
    for name in ("workspace PVC", "MLflow secret", "MLflow service"):
        assert report.get(name).skipped
    assert P_PVC not in apiserver.paths


# --------------------------------------------------------------------------- unreachable


def test_unreachable_host_fails_fast_with_clear_error(free_port):
    host = f"http://127.0.0.1:{free_port}"  # nothing listens there
    report = preflight(Params(), api_client=_client(host), timeout=(1.0, 1.0))
    api = report.get("API server")
    assert not api.ok and f"cannot reach {host}" in api.detail and "refused" in api.detail.lower()
    assert all(c.skipped for c in report.checks[1:]) and len(report.checks) == len(CHECK_NAMES)


def test_server_that_never_answers_times_out(silent_port):
    host = f"http://127.0.0.1:{silent_port}"  # accepts the TCP handshake (backlog) but never replies
    report = preflight(Params(), api_client=_client(host), timeout=(0.5, 0.5))
    assert not report.ok and "no answer within 0.5s" in report.get("API server").detail


# --------------------------------------------------------------------------- CLI entry (kubeconfig)


def _kubeconfig(tmp_path: Path, host: str, other: str) -> Path:
    path = tmp_path / "kubeconfig"
    path.write_text(
        "apiVersion: v1\nkind: Config\n"
        f"clusters:\n- name: recorded\n  cluster: {{server: '{host}'}}\n"
        f"- name: down\n  cluster: {{server: '{other}'}}\n"
        "users:\n- name: tester\n  user: {token: recorded-token}\n"
        "contexts:\n- name: recorded\n  context: {cluster: recorded, user: tester}\n"
        "- name: down\n  context: {cluster: down, user: tester}\n"
        "current-context: recorded\n"
    )
    return path


@pytest.fixture
def cli_env(apiserver, tmp_path, monkeypatch, free_port, params_file):
    monkeypatch.setenv("KUBECONFIG", str(_kubeconfig(tmp_path, apiserver.host, f"http://127.0.0.1:{free_port}")))
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    return params_file(["pipeline.betas=[600.0]"])


def test_main_prints_table_and_exits_zero(cli_env, apiserver, capsys):
    assert ipa(["cluster", "preflight", "--params", str(cli_env)]) == 0
    out = capsys.readouterr().out
    assert "ipa cluster preflight" in out and apiserver.host in out
    for name in CHECK_NAMES:
        assert name in out
    assert "FAIL" not in out and "All 8 checks passed" in out
    assert SECRET_VALUE not in out
    assert {auth for _, _, auth in apiserver.handler.seen} == {"Bearer recorded-token"}  # kubeconfig credentials used


def test_main_exits_nonzero_on_failing_cluster(cli_env, apiserver, capsys):
    apiserver.set(**{P_SECRET: (404, "status_404_secret_ipa-mlflow.json")})
    assert ipa(["cluster", "preflight", "--params", str(cli_env)]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "1 of 8 checks failed, 0 not checked" in out


def test_main_context_selects_cluster_and_unreachable_is_nonzero(cli_env, capsys):
    assert ipa(["cluster", "preflight", "--params", str(cli_env), "--context", "down"]) == 1
    out = capsys.readouterr().out
    assert "cannot reach" in out and "SKIP" in out and "1 of 8 checks failed, 7 not checked" in out


def test_main_unknown_context_and_missing_kubeconfig(cli_env, tmp_path, monkeypatch, capsys):
    assert ipa(["cluster", "preflight", "--params", str(cli_env), "--context", "nope"]) == 1
    assert "no usable kubeconfig (context 'nope')" in capsys.readouterr().out
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "absent"))
    assert ipa(["cluster", "preflight", "--params", str(cli_env)]) == 1
    assert "no usable kubeconfig" in capsys.readouterr().out


def test_main_bad_params_exit_2(tmp_path, capsys):
    bad = tmp_path / "params.yaml"
    bad.write_text("pipeline:\n  accelerator_limit: 0\n")
    assert ipa(["cluster", "preflight", "--params", str(bad)]) == 2
    assert "pipeline.accelerator_limit" in capsys.readouterr().err  # the CLI's one error policy: stderr, exit 2
