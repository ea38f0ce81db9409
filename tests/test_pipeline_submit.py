"""`ipa pipeline submit` and the README's `kfp run create`, against a loopback server
that answers like the KFP v2beta1 API (recorded responses in tests/data/kfp/), through
the real kfp.Client and the real `kfp` CLI."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from ipa_lib.orchestration import kfp as kfp_cli
from ipa_lib.cli import main as ipa
from ipa_lib.core.config import load_params, parse_params

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data" / "kfp"
PARAMS = ROOT / "params.yaml"
PACKAGE = ROOT / "pipelines" / "ipa_round.yaml"
KFP_BIN = Path(sys.executable).parent / "kfp"


def _recorded(name: str) -> dict:
    return json.loads((DATA / name).read_text())


# what GET /apis/v2beta1/runs/{id} adds for a run whose train task failed (KFP 2.x on Argo: the
# workflow's root DAG and the for-loop DAG around train fail with it; V2beta1Run / V2beta1RunDetails /
# V2beta1PipelineTaskDetail field names)
_RUN = "0f1e2d3c-4b5a-4697-8879-6a5b4c3d2e1f"
FAILED_DETAILS = {
    "finished_at": "2026-11-25T16:40:11Z",
    "error": {"code": 2, "message": "task 'train' failed"},
    "run_details": {
        "pipeline_context_id": "11", "pipeline_run_context_id": "12",
        "task_details": [
            {"run_id": _RUN, "task_id": "ipa-round-x7k2p", "display_name": "ipa-round-x7k2p", "state": "FAILED",
             "child_tasks": [{"pod_name": "ipa-round-x7k2p-root-driver-1"}, {"task_id": "ipa-round-x7k2p-2"}]},
            {"run_id": _RUN, "task_id": "ipa-round-x7k2p-2", "display_name": "root", "state": "FAILED",
             "parent_task_id": "ipa-round-x7k2p", "child_tasks": [{"task_id": "ipa-round-x7k2p-3"}]},
            {"run_id": _RUN, "task_id": "ipa-round-x7k2p-1", "display_name": "sample", "state": "SUCCEEDED",
             "parent_task_id": "ipa-round-x7k2p-2", "pod_name": "ipa-round-x7k2p-system-container-impl-1"},
            {"run_id": _RUN, "task_id": "ipa-round-x7k2p-3", "display_name": "for-loop-2", "state": "FAILED",
             "parent_task_id": "ipa-round-x7k2p-2", "child_tasks": [{"task_id": "ipa-round-x7k2p-4"}, {"task_id": "ipa-round-x7k2p-5"}]},
            {"run_id": _RUN, "task_id": "ipa-round-x7k2p-4", "display_name": "train-driver", "state": "SUCCEEDED",
             "parent_task_id": "ipa-round-x7k2p-3", "pod_name": "ipa-round-x7k2p-system-container-driver-4"},
            {"run_id": _RUN, "task_id": "ipa-round-x7k2p-5", "display_name": "train", "state": "FAILED",
             "parent_task_id": "ipa-round-x7k2p-3", "pod_name": "ipa-round-x7k2p-system-container-impl-5",
             "error": {"code": 2, "message": "Error (exit code 1): CUDA out of memory"}},
        ],
    },
}


class FakeKFP:
    """A loopback HTTP server answering like the KFP v2beta1 API; logs every request.

    `status` maps "METHOD /path" to an HTTP status to fail with, `raw` to a raw body,
    `hang` to seconds to wait before answering. `run_states` are the states successive
    GETs of a run answer (the last one repeats); a FAILED run carries `FAILED_DETAILS`.
    """

    def __init__(self, multi_user: bool = False):
        self.multi_user = multi_user
        self.log: list[dict] = []
        self.status: dict[str, int] = {}
        self.raw: dict[str, bytes] = {}
        self.hang: dict[str, float] = {}
        self.experiments: list[dict] = []
        self.run_states: list[str] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self):
                url = urllib.parse.urlsplit(self.path)
                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(n) if n else b""
                body = json.loads(raw) if raw else None
                key = f"{self.command} {url.path}"
                fake.log.append({"method": self.command, "path": url.path, "query": urllib.parse.parse_qs(url.query),
                                 "body": body, "authorization": self.headers.get("Authorization"),
                                 "cookie": self.headers.get("Cookie")})
                if key in fake.hang:
                    time.sleep(fake.hang[key])
                code, out = fake.route(self.command, url.path, body)
                code = fake.status.get(key, code)
                if code >= 400 and key in fake.status:
                    out = _recorded("error_invalid_argument.json" if code == 400 else "error_not_found.json")
                data = fake.raw.get(key) or json.dumps(out).encode()
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client gave up (timeout tests)
                    pass

            do_GET = do_POST = do_DELETE = _answer

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def route(self, method: str, path: str, body: dict | None) -> tuple[int, dict]:
        if (method, path) == ("GET", "/apis/v2beta1/healthz"):
            return 200, _recorded("healthz_multi_user.json" if self.multi_user else "healthz.json")
        if (method, path) == ("GET", "/apis/v2beta1/experiments"):
            return 200, {"experiments": self.experiments, "total_size": len(self.experiments)} if self.experiments else _recorded("experiments_list_empty.json")
        if (method, path) == ("POST", "/apis/v2beta1/experiments"):
            exp = _recorded("experiment_created.json") | {"display_name": body["display_name"], "namespace": body.get("namespace") or ""}
            self.experiments.append(exp)
            return 200, exp
        if (method, path) == ("POST", "/apis/v2beta1/runs"):
            run = _recorded("run_created.json")
            return 200, run | {"display_name": body["display_name"], "experiment_id": body["experiment_id"],
                               "runtime_config": body.get("runtime_config")}
        if method == "GET" and path.startswith("/apis/v2beta1/runs/"):
            run = _recorded("run_created.json") | {"run_id": path.rsplit("/", 1)[-1]}
            if self.run_states:
                state = self.run_states.pop(0) if len(self.run_states) > 1 else self.run_states[0]
                run |= {"state": state, "state_history": run["state_history"] + [{"update_time": "2026-11-25T15:53:02Z", "state": state}]}
                if state == "FAILED":
                    run |= FAILED_DETAILS
            return 200, run
        return 404, _recorded("error_not_found.json")

    def calls(self) -> list[str]:
        return [f"{e['method']} {e['path']}" for e in self.log]

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def kfp_home(tmp_path, monkeypatch):
    """Keep kfp.Client away from the user's ~/.config/kfp/context.json."""
    import kfp

    monkeypatch.setattr(kfp.Client, "_LOCAL_KFP_CONTEXT", str(tmp_path / "kfp-context.json"))
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


@pytest.fixture
def fake():
    with FakeKFP() as server:
        yield server


def _submit(host: str, *extra: str) -> int:
    return ipa(["pipeline", "--params", str(PARAMS), "submit", "--host", host, *extra])


def _run_request(server: FakeKFP) -> dict:
    (run,) = [e for e in server.log if e["method"] == "POST" and e["path"] == "/apis/v2beta1/runs"]
    return run["body"]


def test_submit_through_kfp_client(fake, kfp_home, capsys):
    assert _submit(fake.url, "--param", "train.steps=5", "--param", "betas=[200, 600]") == 0
    assert fake.calls() == [
        "GET /apis/v2beta1/healthz",  # ours, with a short timeout
        "GET /apis/v2beta1/healthz",  # kfp.Client's (single-user: no namespace given)
        "GET /apis/v2beta1/experiments",
        "POST /apis/v2beta1/experiments",
        "POST /apis/v2beta1/runs",
    ]
    lookup = fake.log[2]["query"]
    assert "ipa-align" in lookup["filter"][0] and lookup.get("namespace", [""]) == [""]
    assert fake.log[3]["body"] == {"display_name": "ipa-align", "namespace": ""}

    run = _run_request(fake)
    assert run["experiment_id"] == _recorded("experiment_created.json")["experiment_id"]
    assert run["service_account"] == "ipa-pipeline"
    args = run["runtime_config"]["parameters"]
    assert sorted(args) == sorted(kfp_cli.PARAMETERS)  # params_json, betas, the typed knobs, base_model
    assert {"params_json", "betas", "base_model", "train_steps", "gate_threshold"} <= set(args)
    assert args["betas"] == [200.0, 600.0] and args["base_model"] == "/workspace/models/base"
    sent = parse_params(json.loads(args["params_json"]))
    want = load_params(PARAMS, ["train.steps=5", "pipeline.betas=[200, 600]"])
    assert sent == want
    spec = run["pipeline_spec"]
    assert spec["pipeline_spec"]["pipelineInfo"]["name"] == "ipa-round"
    gpu = spec["platform_spec"]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-train"]
    assert gpu["nodeSelector"]["labels"] == want.pipeline.node_selector

    out = json.loads(capsys.readouterr().out.split("\n", 2)[-1])  # after kfp's two "details:" lines
    run_id = _recorded("run_created.json")["run_id"]
    assert out["run_id"] == run_id and out["url"] == f"{fake.url}/#/runs/details/{run_id}"
    assert out["experiment"] == "ipa-align" and out["namespace"] is None


def test_multi_user_kfp_gets_the_namespace(kfp_home, capsys):
    with FakeKFP(multi_user=True) as server:
        assert _submit(server.url, "--experiment", "nightly") == 0
    assert server.calls() == ["GET /apis/v2beta1/healthz", "GET /apis/v2beta1/experiments",
                              "POST /apis/v2beta1/experiments", "POST /apis/v2beta1/runs"]
    assert server.log[1]["query"]["namespace"] == ["ipa-align"]
    assert server.log[2]["body"] == {"display_name": "nightly", "namespace": "ipa-align"}
    assert json.loads(capsys.readouterr().out.split("\n", 2)[-1])["namespace"] == "ipa-align"


def test_existing_experiment_is_reused(fake, kfp_home):
    fake.experiments.append(_recorded("experiment_created.json"))
    assert _submit(fake.url) == 0
    assert "POST /apis/v2beta1/experiments" not in fake.calls()
    assert _run_request(fake)["runtime_config"]["parameters"]["betas"] == load_params(PARAMS).pipeline.betas


@pytest.mark.parametrize(("param", "needle"), [
    ("betas=[0, 600]", "pipeline.betas"),
    ("betas=[]", "pipeline.betas"),
    ("betas=[600, 600]", "must not repeat"),
    ("betas=600", "must be a list of positive numbers"),
    ("betas=[600, lots]", "pipeline.betas.1"),
    ("betas=[unclosed", "betas: not valid YAML"),
    ("learning_rate=1", "unknown pipeline parameter"),
    ("train.nope=1", "train.nope: unknown key"),
    ("train.steps=-3", "train.steps"),
    ("params_json={not json", "params_json: not valid JSON"),
    ("params_json=[1, 2]", "must be a JSON object"),
    ('params_json={"train": {"beta": -1}}', "train.beta"),
    ("base_model=", "base_model: empty path"),
    ("no-equals-sign", "must look like NAME=VALUE"),
])
def test_bad_parameters_never_reach_the_server(fake, kfp_home, capsys, param, needle):
    assert _submit(fake.url, "--param", param) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err
    assert fake.log == []


def test_malformed_params_file(fake, kfp_home, tmp_path, capsys):
    bad = tmp_path / "params.yaml"
    bad.write_text("- just\n- a list\n")
    assert ipa(["pipeline", "--params", str(bad), "submit", "--host", fake.url]) == 2
    assert "top level must be a mapping" in capsys.readouterr().err
    assert fake.log == []


def test_missing_package(fake, kfp_home, tmp_path, capsys):
    assert _submit(fake.url, "--package", str(tmp_path / "nope.yaml")) == 1
    assert "pipeline package not found" in capsys.readouterr().err
    assert fake.log == []


def test_unreachable_host_fails_fast(kfp_home, capsys, free_port):
    assert _submit(f"http://127.0.0.1:{free_port}") == 1
    err = capsys.readouterr().err
    assert "is unreachable" in err and "Connection refused" in err
    assert _submit("127.0.0.1:8888") == 1
    assert "expected an http(s) URL" in capsys.readouterr().err


def test_silent_server_times_out(silent_port):
    """A server that accepts connections and never answers: bounded by the timeout."""
    with pytest.raises(kfp_cli.PipelineError, match="unreachable .*timed out"):
        kfp_cli.check_host(f"http://127.0.0.1:{silent_port}", timeout_s=1)


def test_hanging_api_call_is_bounded(fake, kfp_home):
    """kfp.Client sets no timeout of its own; submit bounds every request it makes (the
    server answers after 4 s: without the bound the run would be created)."""
    import kfp
    from kfp_server_api import rest

    classes = {cls: dict(vars(cls)) for cls in (kfp.Client, rest.RESTClientObject)}
    fake.hang["POST /apis/v2beta1/runs"] = 4
    params = load_params(PARAMS)
    _, arguments = kfp_cli.pipeline_arguments(params)
    with pytest.raises(kfp_cli.PipelineError, match="stopped answering while submitting .*timeout 1 s"):
        kfp_cli.submit(params, arguments, fake.url, PACKAGE, timeout_s=1)
    assert "POST /apis/v2beta1/runs" in fake.calls()
    assert {cls: dict(vars(cls)) for cls in classes} == classes  # nothing patched on kfp's classes


@pytest.mark.filterwarnings("ignore::FutureWarning")  # kfp.Client's "only works with KFP v2.0.0-beta.2 and later"
def test_timeout_is_scoped_to_one_client(fake, kfp_home):
    """The bound sits on the client `bounded_client` returns, from the healthz its __init__
    asks (no namespace given) on; a plain kfp.Client waits for a slow server as kfp ships it."""
    import kfp
    import urllib3

    fake.hang["GET /apis/v2beta1/healthz"] = 1.0
    with pytest.raises(urllib3.exceptions.MaxRetryError) as err:  # GET: urllib3 retries 3 times, each bounded
        kfp_cli.bounded_client(fake.url, "kubeflow", 0.25)
    assert isinstance(err.value.reason, urllib3.exceptions.ReadTimeoutError)
    plain = kfp.Client(host=fake.url)  # its own healthz waits the 1 s out
    del fake.hang["GET /apis/v2beta1/healthz"]

    client = kfp_cli.bounded_client(fake.url, "ipa-align", 0.25)  # a namespace: __init__ sends nothing
    fake.experiments.append(_recorded("experiment_created.json"))
    fake.hang["GET /apis/v2beta1/experiments"] = 1.0
    with pytest.raises(urllib3.exceptions.MaxRetryError):
        client.list_experiments()
    assert plain.list_experiments().total_size == 1
    assert fake.calls().count("GET /apis/v2beta1/experiments") == 5  # 4 bounded tries, 1 plain answer


@pytest.mark.parametrize(("key", "status", "raw", "needle"), [
    ("POST /apis/v2beta1/runs", 400, None, "refused the request: HTTP 400 Bad Request: "),
    ("GET /apis/v2beta1/healthz", 500, None, "answered HTTP 500"),
    ("GET /apis/v2beta1/healthz", 404, None, "is this the KFP v2 API?"),
    ("GET /apis/v2beta1/healthz", 401, None, "authentication needed; pass --existing-token or --cookies"),
    ("GET /apis/v2beta1/healthz", 200, b"<html>sign in</html>", "did not answer with KFP's healthz JSON"),
])
def test_api_errors_are_readable(fake, kfp_home, capsys, key, status, raw, needle):
    fake.status[key] = status
    if raw:
        fake.raw[key] = raw
    assert _submit(fake.url) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: KFP API at ") and needle in err
    if status == 400:
        assert "unknown pipeline parameter" in err  # the server's own message is passed on


def test_stale_package_warns(fake, kfp_home, tmp_path, capsys):
    assert _submit(fake.url, "--package", str(PACKAGE)) == 0
    assert "warning" not in capsys.readouterr().err
    other = tmp_path / "other.yaml"
    assert ipa(["pipeline", "--params", str(PARAMS), "--set", "pipeline.image=x/y:1", "compile", "--out", str(other)]) == 0
    assert _submit(fake.url, "--package", str(other)) == 0
    assert "differs from what `ipa pipeline compile` writes" in capsys.readouterr().err


# ---- auth, namespace, run name ----------------------------------------------------------------


def test_existing_token_goes_with_every_request(fake, kfp_home, capsys):
    assert _submit(fake.url, "--existing-token", "tok-123") == 0
    assert len(fake.log) == 5  # our healthz, kfp.Client's, experiment lookup + create, run
    assert {e["authorization"] for e in fake.log} == {"Bearer tok-123"}
    assert {e["cookie"] for e in fake.log} == {None}
    assert "tok-123" not in capsys.readouterr().out


def test_token_from_a_file(fake, kfp_home, tmp_path, capsys):
    token = tmp_path / "token"
    token.write_text("tok-from-file\n")
    assert _submit(fake.url, "--existing-token", f"@{token}") == 0
    assert {e["authorization"] for e in fake.log} == {"Bearer tok-from-file"}
    assert _submit(fake.url, "--existing-token", f"@{tmp_path / 'nope'}") == 2
    assert "--existing-token @" in (err := capsys.readouterr().err) and "nope: cannot read the file" in err
    assert len(fake.log) == 5  # the second submit sent nothing


def test_cookies_go_with_every_request(kfp_home):
    with FakeKFP(multi_user=True) as server:
        assert _submit(server.url, "--cookies", "authservice_session=abc; other=1") == 0
    assert len(server.log) == 4
    assert {e["cookie"] for e in server.log} == {"authservice_session=abc; other=1"}
    assert {e["authorization"] for e in server.log} == {None}


def test_namespace_flag_on_multi_user_kfp(kfp_home, capsys):
    with FakeKFP(multi_user=True) as server:
        assert _submit(server.url, "--namespace", "team-a", "--run-name", "nightly-7") == 0
    assert server.log[1]["query"]["namespace"] == ["team-a"]
    assert server.log[2]["body"] == {"display_name": "ipa-align", "namespace": "team-a"}
    assert _run_request(server)["display_name"] == "nightly-7"
    out = json.loads(capsys.readouterr().out.split("\n", 2)[-1])
    assert out["namespace"] == "team-a" and out["run_name"] == "nightly-7"


def test_namespace_flag_on_single_user_kfp_is_refused(fake, kfp_home, capsys):
    assert _submit(fake.url, "--namespace", "team-a") == 1
    assert "is single-user" in capsys.readouterr().err
    assert fake.calls() == ["GET /apis/v2beta1/healthz"]  # ours only: no experiment, no run


@pytest.mark.parametrize(("extra", "needle"), [
    (("--namespace", "Team_A"), "not a Kubernetes namespace name"),
    (("--timeout", "5"), "--timeout limits --wait"),
    (("--wait", "--timeout", "0"), "must be a positive number"),
    (("--existing-token", ""), "--existing-token: empty value"),
])
def test_bad_submit_flags_never_reach_the_server(fake, kfp_home, capsys, extra, needle):
    assert _submit(fake.url, *extra) == 2
    assert needle in capsys.readouterr().err
    assert fake.log == []


def test_unauthenticated_multi_user_kfp_asks_for_a_token(fake, kfp_home, capsys):
    fake.status["GET /apis/v2beta1/healthz"] = 401
    assert _submit(fake.url) == 1
    assert "pass --existing-token or --cookies" in capsys.readouterr().err


# ---- --wait -----------------------------------------------------------------------------------


@pytest.fixture
def fast_poll(monkeypatch):
    """Poll the run every 20 ms instead of kfp.Client's 5 s."""
    monkeypatch.setattr(kfp_cli, "WAIT_POLL_S", 0.02)


def _run_gets(server: FakeKFP) -> int:
    return server.calls().count(f"GET /apis/v2beta1/runs/{_RUN}")


def test_wait_for_a_failed_run_names_the_task(fake, kfp_home, fast_poll, capsys):
    fake.run_states = ["PENDING", "RUNNING", "FAILED"]
    assert _submit(fake.url, "--wait", "--existing-token", "tok-9") == 1
    err = capsys.readouterr().err
    assert f"run {_RUN} ended FAILED; failed task: train: Error (exit code 1): CUDA out of memory" in err
    assert "(run error: task 'train' failed)" in err and f"{fake.url}/#/runs/details/{_RUN}" in err
    assert _run_gets(fake) == 3
    assert {e["authorization"] for e in fake.log} == {"Bearer tok-9"}  # the GETs of the run too


def test_failed_tasks_without_parent_links_are_all_named():
    """A task list with no parent/child links: every FAILED task is named, DAGs included."""
    from kfp_server_api import ApiClient

    run = ApiClient().deserialize(_Response({"run_id": _RUN, "state": "FAILED", "run_details": {"task_details": [
        {"display_name": "gate", "state": "FAILED"}, {"display_name": "root", "state": "FAILED"},
        {"display_name": "sample", "state": "SUCCEEDED"}]}}), "V2beta1Run")
    assert kfp_cli.failed_tasks(run) == ["gate", "root"]
    run = ApiClient().deserialize(_Response(_recorded("run_created.json") | FAILED_DETAILS), "V2beta1Run")
    assert kfp_cli.failed_tasks(run) == ["train: Error (exit code 1): CUDA out of memory"]


class _Response:
    """What kfp_server_api's ApiClient.deserialize reads: `.data`."""

    def __init__(self, data: dict):
        self.data = json.dumps(data)


def test_wait_for_a_run_that_succeeds(fake, kfp_home, fast_poll, capsys):
    fake.run_states = ["PENDING", "RUNNING", "RUNNING", "SUCCEEDED"]
    assert _submit(fake.url, "--wait") == 0
    out = json.loads(capsys.readouterr().out.split("\n", 2)[-1])
    assert out["state"] == "SUCCEEDED" and out["run_id"] == _RUN
    assert _run_gets(fake) == 4


def test_wait_timeout_on_a_run_that_keeps_running(fake, kfp_home, fast_poll, capsys):
    fake.run_states = ["RUNNING"]
    assert _submit(fake.url, "--wait", "--timeout", "0.2") == 1
    err = capsys.readouterr().err
    assert f"run {_RUN} did not finish within --timeout 0.2 s" in err and f"/#/runs/details/{_RUN}" in err
    assert _run_gets(fake) >= 2  # it polled, then gave up


def test_without_wait_the_run_is_not_polled(fake, kfp_home, capsys):
    fake.run_states = ["FAILED"]
    assert _submit(fake.url) == 0
    assert _run_gets(fake) == 0
    assert "state" not in json.loads(capsys.readouterr().out.split("\n", 2)[-1])


def test_api_stops_answering_while_waiting(fake, kfp_home, fast_poll):
    fake.run_states = ["RUNNING"]
    fake.hang[f"GET /apis/v2beta1/runs/{_RUN}"] = 3
    params = load_params(PARAMS)
    _, arguments = kfp_cli.pipeline_arguments(params)
    with pytest.raises(kfp_cli.PipelineError, match=f"stopped answering while waiting for run {_RUN} .*timeout 0.5 s"):
        kfp_cli.submit(params, arguments, fake.url, PACKAGE, wait=True, timeout_s=0.5)


# ---- the KFP CLI -------------------------------------------------------------------------------


def _kfp_env(tmp_path: Path) -> dict:
    return {**os.environ, "HOME": str(tmp_path), "PATH": f"{KFP_BIN.parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def test_kfp_cli_help_contacts_the_endpoint(fake, tmp_path):
    proc = subprocess.run([str(KFP_BIN), "--endpoint", fake.url, "run", "create", "--help"], capture_output=True,
                          text=True, timeout=120, env=_kfp_env(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "Submit a pipeline run." in proc.stdout
    assert fake.calls() == ["GET /apis/v2beta1/healthz"]


def _readme_kfp_block() -> str:
    text = (ROOT / "pipelines" / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    (block,) = [b for b in blocks if "kfp --endpoint" in b and "run create" in b]
    return block


def test_readme_kfp_run_create_reaches_the_api(fake, tmp_path):
    block = _readme_kfp_block()
    assert "--package-file pipelines/ipa_round.yaml" in block and "kfp run submit" not in block
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=_kfp_env(tmp_path) | {"KFP_HOST": fake.url})
    assert proc.returncode == 0, proc.stderr
    assert fake.calls() == ["GET /apis/v2beta1/healthz", "GET /apis/v2beta1/experiments", "POST /apis/v2beta1/experiments",
                            "POST /apis/v2beta1/runs", f"GET /apis/v2beta1/runs/{_recorded('run_created.json')['run_id']}"]
    run = _run_request(fake)
    assert run["display_name"] == "ipa-round-cli"
    assert run["pipeline_spec"]["pipeline_spec"]["pipelineInfo"]["name"] == "ipa-round"
    assert run["runtime_config"]["parameters"] == {"betas": [200.0, 600.0]}  # the rest: the package's defaults
    assert _recorded("run_created.json")["run_id"] in proc.stdout
