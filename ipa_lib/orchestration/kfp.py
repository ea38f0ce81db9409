"""`ipa pipeline compile | submit | run-local`: the KFP driver of one alignment round.

All three start from the same place: `params.yaml` (+ `--set key=value`), validated by
`ipa_lib.core.config`, becomes the pipeline's arguments

    params_json  the whole parameter set as canonical JSON
    betas        the beta sweep (`pipeline.betas`)
    train_steps, train_lr, hand_weight, num_clips, gate_threshold, gate_top_k, init_adapter
                 typed knobs (TYPED_PARAMETERS), applied onto params_json by the first task
    base_model   the base model folder (on the workspace PVC in the cluster)

- compile:   IR YAML with these as defaults and the cluster settings of `params.pipeline`
             baked in (images, GPU pool, PVC, secret, retries, timeouts, caching);
- submit:    `kfp.Client` run of a compiled package; `--param` overrides an argument
             (`betas=[200,600]`, `train_steps=100`, `base_model=...`) or a dotted params
             key (`train.steps=100`), and the result is validated before anything is sent;
             cluster settings (`pipeline.*`) are refused: they need a recompile;
- run-local: the same DAG through `kfp.local` (SubprocessRunner(use_venv=False): every
             task is a subprocess of this Python, no network, no cluster).

kfp is imported inside the functions so `ipa --help` stays fast. Errors (bad params, bad
overrides, an unreachable or failing KFP API, a failed local task) print one readable
line and return a non-zero exit code.
"""

from __future__ import annotations

import json
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from pathlib import Path

from ipa_lib.core.config import ConfigError, Params, apply_override, load_params, parse_params
from ipa_lib.core.errors import RuntimeFailure
from ipa_lib.core.extras import require

# typed pipeline parameters -> the params key each sets (the knobs users change per run);
# the pipeline's first task applies them onto `params_json` (`resolve_params`)
TYPED_PARAMETERS = {
    "train_steps": "train.steps", "train_lr": "train.lr", "hand_weight": "train.hand_weight",
    "num_clips": "sample.num_clips", "gate_threshold": "gate.threshold", "gate_top_k": "gate.top_k",
    "init_adapter": "backend.init_adapter",
}
PARAMETERS = ("params_json", "betas", *TYPED_PARAMETERS, "base_model")
RUNTIME_PIPELINE_KEYS = ("betas",)  # the only `pipeline.*` setting that is a run argument
HTTP_TIMEOUT_S = 10.0  # per request to the KFP API: connect + read


class PipelineError(RuntimeFailure):
    """The pipeline could not be compiled, submitted or run; the message says why."""


# ----------------------------------------------------------------------------- imports


PIPELINE_MODULES = ("pipelines.ipa_round", "components.stages")


def _pipeline_module():
    """`pipelines.ipa_round`, installed next to ipa_lib (pyproject.toml ships the top-level
    `pipelines` and `components` packages); an install without them is a PipelineError."""
    import importlib.util

    for name in PIPELINE_MODULES:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:  # its package is missing
            found = False
        if not found:
            raise PipelineError(f"module {name} is not installed: this ipa-align install lacks pipelines/ and "
                                "components/ (reinstall from a checkout: `pip install .`, or `pip install -e .`)")
    from pipelines import ipa_round

    return ipa_round


# ----------------------------------------------------------------------------- arguments


def pipeline_arguments(params: Params, overrides: list[str] | None = None, *, local: bool = False) -> tuple[Params, dict]:
    """Apply `--param` overrides and return (validated params, pipeline arguments).

    An override is `params_json=<JSON object>` (replaces the parameter set), `betas=<list>`,
    `base_model=<path>`, a typed parameter (`train_steps=100`, see TYPED_PARAMETERS) or a
    dotted params key (`train.steps=100`). Values are YAML (so `[200, 600]`, `true`, `1e-3`
    work). Unknown names are errors, and so are cluster settings (`pipeline.*` other than
    `pipeline.betas`): they are compiled into the package, so they need a recompile.
    """
    import yaml

    data = params.model_dump(mode="json")
    base_model = None
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--param {item!r} must look like NAME=VALUE (NAME: {', '.join(PARAMETERS)} or a dotted params key)")
        key, raw = (s.strip() for s in item.split("=", 1))
        key = TYPED_PARAMETERS.get(key, key)
        if key == "params_json":
            new = _parse_value(key, raw, json.loads, "JSON", dict, "a JSON object")
            new.setdefault("pipeline", data.get("pipeline", {}))  # cluster settings come from the package
            data = new
        elif key in ("betas", "pipeline.betas"):
            data.setdefault("pipeline", {})["betas"] = _parse_value(key, raw, yaml.safe_load, "YAML", list, "a list of positive numbers like [200, 600]")
        elif key == "base_model":
            if not raw:
                raise ConfigError("--param base_model: empty path")
            base_model = raw
        elif key.startswith("pipeline."):
            raise _compile_time(key, f"{key}={raw}")
        elif "." in key:
            apply_override(data, f"{key}={raw}", "--param")
        else:
            raise ConfigError(f"--param {key!r}: unknown pipeline parameter (valid: {', '.join(PARAMETERS)}, or a dotted params key like train.steps)")
    new_params = parse_params(data, "pipeline parameters")
    changed = [k for k in type(params.pipeline).model_fields
               if k not in RUNTIME_PIPELINE_KEYS and getattr(new_params.pipeline, k) != getattr(params.pipeline, k)]
    if changed:  # a params_json with another pipeline section
        raise _compile_time(f"params_json: pipeline.{changed[0]}", f"pipeline.{changed[0]}=...")
    params = new_params
    ipa_round = _pipeline_module()
    if base_model is None:
        base_model = local_base_model(params) if local else ipa_round.cluster_base_model(params)
    cases = (local_cases(params) if local else ipa_round.cluster_path(params, params.data.cases)) if params.on_cases \
        else params.data.cases
    if cases != params.data.cases:  # the cases folder as the tasks see it
        params = params.model_copy(update={"data": params.data.model_copy(update={"cases": cases})})
    return params, {
        "params_json": canonical_json(params),
        "betas": list(params.pipeline.betas),
        **typed_values(params),
        "base_model": base_model,
    }


def _compile_time(what: str, setting: str) -> ConfigError:
    return ConfigError(f"--param {what}: cluster settings (params.pipeline, except betas) are compiled into the "
                       f"package and cannot change per run; recompile with it: `ipa pipeline --set {setting} compile "
                       "--out <package>`, then submit that package (--package <package>)")


def canonical_json(params: Params) -> str:
    """The pipeline's `params_json`: canonical JSON of the validated params."""
    return json.dumps(params.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))


def typed_values(params: Params) -> dict:
    """The typed pipeline parameters' values in `params` (no init adapter: "")."""
    out = {}
    for name, key in TYPED_PARAMETERS.items():
        section, field = key.split(".")
        value = getattr(getattr(params, section), field)
        out[name] = "" if value is None else value
    return out


def resolve_params(params_json: str, values: dict) -> str:
    """What every task of a pipeline run uses: `params_json` with the typed parameters
    `values` applied (an `init_adapter` of "" is none), validated; canonical JSON."""
    data = json.loads(params_json)
    unknown = sorted(set(values) - set(TYPED_PARAMETERS))
    if unknown:
        raise ConfigError(f"pipeline parameters: unknown typed parameter(s) {', '.join(unknown)}")
    for name, value in values.items():
        section, field = TYPED_PARAMETERS[name].split(".")
        data.setdefault(section, {})[field] = None if name == "init_adapter" and value == "" else value
    return canonical_json(parse_params(data, "pipeline parameters (params_json + typed parameters)"))


def _parse_value(key: str, raw: str, loads, fmt: str, kind: type, what: str):
    """`--param KEY=RAW` parsed with `loads` (json/yaml) and checked to be a `kind`."""
    try:
        value = loads(raw)
    except Exception as err:  # noqa: BLE001 (json.JSONDecodeError or yaml.YAMLError)
        raise ConfigError(f"--param {key}: not valid {fmt} ({err}); expected {what}") from None
    if not isinstance(value, kind):
        raise ConfigError(f"--param {key}: must be {what}, got {raw!r}")
    return value


def local_base_model(params: Params) -> str:
    """`backend.base_model` for a local run: a folder resolved against the working
    directory (must exist for the toy backend), or a hub id passed through."""
    path = Path(params.backend.base_model).expanduser()
    if path.is_dir():
        return str(path.resolve())
    if params.backend.name == "toy":
        raise ConfigError(f"backend.base_model: {path} is not a folder (models/base is committed to git: restore it with `git checkout -- models/base`, or rebuild it with `ipa pretrain`)")
    return params.backend.base_model


def local_cases(params: Params) -> str:
    """`data.cases` for a local run: resolved against the working directory (the tasks run elsewhere)."""
    path = Path(params.data.cases).expanduser()
    return str(path.resolve()) if path.exists() else params.data.cases


# ----------------------------------------------------------------------------- compile


def compile_package(params: Params, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        _pipeline_module().compile_pipeline(params, str(out))
    return out


# ----------------------------------------------------------------------------- submit


def auth_value(value: str | None, flag: str) -> str | None:
    """A `--existing-token` / `--cookies` value: the text itself, or `@FILE` for the file's
    stripped contents (keeps the secret out of the process list and the shell history)."""
    if value is None:
        return None
    if value.startswith("@"):
        path = Path(value[1:]).expanduser()
        try:
            value = path.read_text().strip()
        except OSError as err:
            raise ConfigError(f"{flag} @{path}: cannot read the file ({err.strerror or err})") from None
        if not value:
            raise ConfigError(f"{flag} @{path}: the file is empty")
    if not value.strip():
        raise ConfigError(f"{flag}: empty value")
    return value


def auth_headers(existing_token: str | None = None, cookies: str | None = None) -> dict:
    """The headers kfp.Client sends for `existing_token` (Authorization: Bearer) and `cookies` (Cookie)."""
    headers = {}
    if existing_token:
        headers["Authorization"] = f"Bearer {existing_token}"
    if cookies:
        headers["Cookie"] = cookies
    return headers


def check_host(host: str, timeout_s: float = HTTP_TIMEOUT_S, headers: dict | None = None) -> dict:
    """GET `<host>/apis/v2beta1/healthz` once with a short timeout and return its JSON.

    `headers` are the auth headers kfp.Client will send (`auth_headers`). Anything but a
    JSON answer with status 2xx raises PipelineError: a refused connection, a timeout, a
    bad URL, an HTTP error (kfp.Client would retry healthz for 25 s on those), or an HTML
    page from an authentication proxy.
    """
    parts = urllib.parse.urlsplit(host)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise PipelineError(f"--host {host!r}: expected an http(s) URL like http://127.0.0.1:8888 "
                            "(kubectl -n kubeflow port-forward svc/ml-pipeline 8888)")
    url = host.rstrip("/") + "/apis/v2beta1/healthz"
    auth = " (with the --existing-token/--cookies given: expired?)" if headers else "; pass --existing-token or --cookies"
    try:
        request = urllib.request.Request(url, headers=headers or {})
        with urllib.request.urlopen(request, timeout=timeout_s) as resp:  # noqa: S310 (http(s) only, checked above)
            body = resp.read()
    except urllib.error.HTTPError as err:
        hint = (" (is this the KFP v2 API?)" if err.code == 404 else
                f" (authentication needed{auth}, or port-forward svc/ml-pipeline)" if err.code in (401, 403) else "")
        raise PipelineError(f"KFP API at {host} is not usable: GET {url} answered HTTP {err.code}{hint}") from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise PipelineError(f"KFP API at {host} is unreachable ({reason}); check --host and that the API is "
                            f"port-forwarded (timeout {timeout_s:g} s)") from None
    try:
        data = json.loads(body or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError):
        data = None
    if not isinstance(data, dict):
        raise PipelineError(f"KFP API at {host}: GET {url} did not answer with KFP's healthz JSON "
                            f"(got {body[:80]!r}); an authentication proxy in front of it{auth}?")
    return data


def bounded_client(host: str, namespace: str, timeout_s: float, *, existing_token: str | None = None,
                   cookies: str | None = None):
    """A `kfp.Client` whose every HTTP request has a (connect, read) timeout of `timeout_s`.

    kfp_server_api passes `timeout=None` to urllib3 unless a call sets `_request_timeout`,
    and kfp.Client never does, so a server that accepts and stays silent would block
    forever. The timeout goes on this instance's REST client (its service APIs share one
    ApiClient), from the healthz request `__init__` makes on; kfp.Client, kfp_server_api
    and every other client are untouched. `existing_token` and `cookies` go to kfp.Client
    as they are (an Authorization: Bearer header, a Cookie header, on every request)."""
    import kfp

    class BoundedClient(kfp.Client):
        def get_kfp_healthz(self, sleep_duration: int = 5):
            # __init__ calls this (no namespace given) right after building its ApiClient
            _bound_requests(self._healthz_api.api_client.rest_client, timeout_s)
            return super().get_kfp_healthz(sleep_duration)

    client = BoundedClient(host=host, namespace=namespace, existing_token=existing_token, cookies=cookies)
    _bound_requests(client._healthz_api.api_client.rest_client, timeout_s)
    return client


def _bound_requests(rest_client, seconds: float) -> None:
    """Make (seconds, seconds) the default `_request_timeout` of one kfp_server_api REST client."""
    request = type(rest_client).request

    def bounded(method, url, *args, _request_timeout=None, **kwargs):
        return request(rest_client, method, url, *args, _request_timeout=_request_timeout or (seconds, seconds), **kwargs)

    rest_client.request = bounded


WAIT_POLL_S = 5.0  # seconds between GETs of the run under --wait (kfp.Client's default)
K8S_NAME = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


def submit_options(args) -> dict:
    """The keyword arguments of `submit` from `ipa pipeline submit`'s flags."""
    return {name: getattr(args, flag, None) for name, flag in (
        ("experiment", "experiment"), ("run_name", "run_name"), ("namespace", "namespace"),
        ("existing_token", "existing_token"), ("cookies", "cookies"), ("wait", "wait"), ("wait_timeout_s", "timeout"))}


def _kfp_call(host: str, timeout_s: float, doing: str, call):
    """`call()` with kfp's errors as PipelineErrors: a refusal (HTTP status and the server's
    message) or a connection that failed or stopped answering while `doing`."""
    from kfp_server_api.exceptions import ApiException

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return call()
    except ApiException as err:
        body = (err.body or "").strip() if isinstance(err.body, str) else err.body
        hint = " (pass --existing-token or --cookies?)" if err.status in (401, 403) else ""
        raise PipelineError(f"KFP API at {host} refused the request: HTTP {err.status} {err.reason}: {body}{hint}") from None
    except Exception as err:  # urllib3's timeouts and connection errors are not OSError subclasses
        if isinstance(err, OSError) or type(err).__module__.startswith("urllib3"):
            raise PipelineError(f"KFP API at {host} stopped answering while {doing} ({type(err).__name__}: {err}; "
                                f"timeout {timeout_s:g} s per request); check the KFP UI before submitting again") from None
        raise


def failed_tasks(run) -> list[str]:
    """'name: message' of the tasks in `run.run_details.task_details` whose state is FAILED,
    without the DAGs (root, loops) that failed only because a task inside them did."""
    failed = [t for t in (getattr(run.run_details, "task_details", None) or []) if str(t.state or "").upper() == "FAILED"]
    keys = {k for t in failed for k in (t.task_id, t.pod_name) if k}
    parents = {t.parent_task_id for t in failed if t.parent_task_id}

    def is_parent(task) -> bool:
        return task.task_id in parents or any({c.task_id, c.pod_name} & keys for c in task.child_tasks or [])

    names = []
    for task in [t for t in failed if not is_parent(t)] or failed:
        message = getattr(task.error, "message", None) if task.error else None
        name = task.display_name or task.task_id or "?"
        names.append(f"{name}: {message}" if message else name)
    return names


def _wait_for(client, host: str, run_id: str, url: str, wait_timeout_s: float | None, timeout_s: float) -> str:
    """Wait through `kfp.Client.wait_for_run_completion`; the final state when the run
    SUCCEEDED, else a PipelineError naming the failed tasks (or the timeout)."""
    import math

    limit = math.inf if wait_timeout_s is None else wait_timeout_s

    def wait():
        try:
            return client.wait_for_run_completion(run_id, timeout=limit, sleep_duration=min(WAIT_POLL_S, limit))
        except TimeoutError as err:  # kfp's own "Run timeout" (urllib3 wraps socket timeouts in its classes)
            if type(err) is not TimeoutError:
                raise
            raise PipelineError(f"run {run_id} did not finish within --timeout {limit:g} s; it goes on in the "
                                f"cluster: {url}") from None

    run = _kfp_call(host, timeout_s, f"waiting for run {run_id}", wait)
    state = str(run.state or "").upper()
    if state == "SUCCEEDED":
        return state
    tasks = failed_tasks(run)
    why = f"; failed task{'s' if len(tasks) > 1 else ''}: {'; '.join(tasks)}" if tasks else ""
    error = getattr(run.error, "message", None) if run.error else None
    raise PipelineError(f"run {run_id} ended {state or 'without a state'}{why}"
                        f"{f' (run error: {error})' if error else ''}; see {url}")


def submit(params: Params, arguments: dict, host: str, package: str | Path, *, experiment: str | None = None,
           run_name: str | None = None, namespace: str | None = None, existing_token: str | None = None,
           cookies: str | None = None, wait: bool = False, wait_timeout_s: float | None = None,
           timeout_s: float = HTTP_TIMEOUT_S) -> dict:
    """Create a run of `package` through `kfp.Client`; returns {"run_id", "experiment", ...}.

    Multi-user KFP (healthz says so) gets `namespace` (default `pipeline.namespace`);
    single-user KFP rejects a namespace on experiments, so none is sent (an explicit one is
    an error). Runs use `pipeline.service_account`. `existing_token` / `cookies` (text or
    `@FILE`) authenticate every request. `wait` waits for the run to finish (at most
    `wait_timeout_s`) and raises a PipelineError naming the failed tasks unless it SUCCEEDED.
    `timeout_s` bounds each HTTP request.
    """
    if wait_timeout_s is not None and not wait:
        raise ConfigError("--timeout limits --wait: add --wait, or drop --timeout")
    if wait_timeout_s is not None and not wait_timeout_s > 0:
        raise ConfigError(f"--timeout {wait_timeout_s:g}: must be a positive number of seconds")
    if namespace is not None and not K8S_NAME.fullmatch(namespace):
        raise ConfigError(f"--namespace {namespace!r}: not a Kubernetes namespace name (lowercase letters, digits, '-')")
    existing_token = auth_value(existing_token, "--existing-token")
    cookies = auth_value(cookies, "--cookies")
    package = Path(package)
    if not package.is_file():
        raise PipelineError(f"{package}: pipeline package not found (run `ipa pipeline compile --out {package}`)")
    health = check_host(host, timeout_s, auth_headers(existing_token, cookies))
    multi_user = bool(health.get("multi_user"))
    if namespace and not multi_user:
        raise PipelineError(f"--namespace {namespace}: KFP API at {host} is single-user (healthz multi_user: false) "
                            "and takes no namespace; drop --namespace")
    namespace = (namespace or params.pipeline.namespace) if multi_user else None
    experiment = experiment or params.tracking.experiment
    run_name = run_name or f"ipa-round {time.strftime('%Y-%m-%d %H-%M-%S')}"
    host = host.rstrip("/")

    def create():
        client = bounded_client(host, namespace or "kubeflow", timeout_s, existing_token=existing_token, cookies=cookies)
        return client, client.create_run_from_pipeline_package(
            str(package), arguments=arguments, run_name=run_name, experiment_name=experiment,
            namespace=namespace, service_account=params.pipeline.service_account,
        )

    client, result = _kfp_call(host, timeout_s, "submitting", create)
    out = {
        "run_id": result.run_id,
        "run_name": run_name,
        "experiment": experiment,
        "namespace": namespace,
        "url": f"{host}/#/runs/details/{result.run_id}",
    }
    if wait:
        out["state"] = _wait_for(client, host, result.run_id, out["url"], wait_timeout_s, timeout_s)
    return out


def _package_is_current(params: Params, package: Path) -> bool:
    """Whether `package` is what `ipa pipeline compile` would write for `params`."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="ipa-kfp-") as tmp:
        fresh = compile_package(params, Path(tmp) / "fresh.yaml")
        return fresh.read_text() == package.read_text()


# ----------------------------------------------------------------------------- run-local


LOCAL_IMAGE = "localhost/ipa-runtime:0.1.0"  # what `make image` builds
RUNTIME_UID = 10001  # the image's user (components/Dockerfile); every container task runs as it
PODMAN_HINT = ("start one: `apt-get install -y podman runc fuse-overlayfs`, then `scripts/podman.sh system service "
               "--time 0 unix:///tmp/ipa-podman.sock &` and `export DOCKER_HOST=unix:///tmp/ipa-podman.sock` "
               "(docs/containers.md), or use Docker")


class _TaskLog:
    """stdout tee that keeps what each task printed (from its `Executing task` line on), so a
    failed task's log can go into the error (kfp.local only says which task failed, and an
    exit handler may run after it)."""

    def __init__(self, stream):
        self.stream, self.logs, self.current = stream, {}, None

    def write(self, text: str) -> int:
        if m := re.search(r"Executing task \W*'([^']+)'", re.sub(r"\x1b\[[0-9;]*m", "", text)):
            self.current = m.group(1)
            self.logs[self.current] = []
        self.logs.setdefault(self.current, []).append(text)
        return self.stream.write(text)

    def tail(self, task: str | None, n: int = 60) -> str:
        lines = self.logs.get(task) or self.logs.get(self.current) or []
        text = re.sub(r"\x1b\[[0-9;]*m", "", "".join(lines))
        return "\n".join(line.rstrip() for line in text.splitlines()[-n:] if line.strip())

    def __getattr__(self, name):
        return getattr(self.stream, name)


def _docker_runner(params: Params, arguments: dict, pipeline_root: Path, image: str):
    """`kfp.local.DockerRunner` for the image: engine and image checked, the runtime uid,
    host folders the tasks read mounted read-only at the same path, tracking in a SQLite
    store under the pipeline root (no network) unless a tracking server is configured."""
    import os

    try:
        import docker
        from docker.types import Mount
    except ImportError:
        raise PipelineError("--runner docker needs the `docker` Python package (pip install docker)") from None
    from kfp import local

    from ipa_lib.mlops.tracking import default_tracking_uri, is_http

    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException as err:
        raise PipelineError(f"no Docker API at {host} ({err}); {PODMAN_HINT}") from None
    try:
        client.images.get(image)
    except docker.errors.ImageNotFound:
        raise PipelineError(f"image {image} is not in the engine at {host}: build it with `make image` "
                            "(docs/containers.md), or pass --image") from None
    finally:
        client.close()
    # kfp.local mounts the pipeline root at the same path; the tasks write there as RUNTIME_UID
    if os.geteuid() == 0:
        os.chown(pipeline_root, RUNTIME_UID, RUNTIME_UID)
    else:  # a rootful engine keeps uid 10001, a rootless one maps it: either way it must write here
        pipeline_root.chmod(0o777)
    reads = [arguments["base_model"], params.data.cases, params.gate.hand_landmarker, params.backend.init_adapter]
    mounts = [Mount(target=str(p), source=str(p), type="bind", read_only=True)
              for p in sorted({Path(r).resolve() for r in reads if r and Path(r).exists()})]
    env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "")}
    uri = os.environ.get("MLFLOW_TRACKING_URI") or params.tracking.uri or ""
    if is_http(uri):  # the server as this machine sees it (127.0.0.1 included): the host's network
        network = "host"
        env.update({k: os.environ[k] for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD") if k in os.environ})
    else:  # the store every task shares: `<pipeline root>/.ipa/`, the default store of that folder
        network, uri = "none", default_tracking_uri(pipeline_root)
    env["MLFLOW_TRACKING_URI"] = uri
    runner = local.DockerRunner(
        user=f"{RUNTIME_UID}:{RUNTIME_UID}", working_dir=str(pipeline_root), network_mode=network,
        environment={k: v for k, v in env.items() if v}, mounts=mounts,
        # KFP's command replaces the image's ENTRYPOINT (`ipa`), as in a pod
        entrypoint=["/usr/bin/env"],
    )
    return runner, uri


def _run_container(client, image: str, command: list[str], volumes: dict, **run_args) -> int:
    """kfp.local's `run_docker_container`, except that the exit code is read before the
    container is removed: kfp.local runs it with auto_remove, podman removes it as soon as it
    exits, `wait()` then finds no container and kfp.local reports the task as SUCCESS."""
    from kfp.local.docker_task_handler import add_latest_tag_if_not_present

    image = add_latest_tag_if_not_present(image)
    print(f"Found image {image!r}\n")  # checked by _docker_runner; kfp.local would pull it
    run_args.pop("auto_remove", None)
    container = client.containers.run(image=image, command=command, detach=True, stdout=True, stderr=True,
                                      volumes=volumes, **run_args)
    try:
        for line in container.logs(stream=True, follow=True):
            print(line.decode(errors="replace"), end="")
        return int(container.wait()["StatusCode"])
    finally:
        container.remove(force=True)


class _KeepExitCodes:
    """`_run_container` in place of kfp.local's for the duration of a run, then restored."""

    def __enter__(self):
        from kfp.local import docker_task_handler

        self.module, self.original = docker_task_handler, docker_task_handler.run_docker_container
        docker_task_handler.run_docker_container = _run_container

    def __exit__(self, *exc) -> None:
        self.module.run_docker_container = self.original


def local_round_outputs(pipeline_root: str | Path) -> dict:
    """The results of the newest kfp.local run under `pipeline_root`, as kfp artifacts and
    values: best_beta, best_adapter, best_evaluation (select-best's), model_version
    (register's). The pipeline returns none itself: KFP allows no outputs from inside its
    ExitHandler."""
    from kfp import dsl

    from ipa_lib.core.io import read_json

    runs = sorted(p for p in Path(pipeline_root).glob(f"{_pipeline_module().PIPELINE_NAME}-*") if p.is_dir())
    if not runs:
        raise PipelineError(f"no kfp.local run under {pipeline_root}")
    run = runs[-1]  # kfp.local names runs <pipeline>-<YYYY-mm-dd-HH-MM-SS-ffffff>

    def value(task: str, key: str):
        return read_json(run / task / "executor_output.json", f"{task} outputs")["parameterValues"][key]

    return {
        "best_beta": value("select-best", "beta"),
        "best_adapter": dsl.Model(name="best_adapter", uri=str(run / "select-best" / "best_adapter")),
        "best_evaluation": dsl.Artifact(name="best_evaluation", uri=str(run / "select-best" / "best_evaluation")),
        "model_version": value("register", "Output"),
    }


def run_local(params: Params, arguments: dict, workdir: str | Path, runner: str = "subprocess",
              image: str = LOCAL_IMAGE) -> dict:
    """Run the round with `kfp.local`, outputs under `workdir`: every task a subprocess of this
    Python (`runner="subprocess"`), or a container of `image` (`"docker"`: a Docker API at
    `DOCKER_HOST`, e.g. podman's; `pipeline.image` and `pipeline.gpu_image` become `image`)."""
    import contextlib

    from kfp import local

    workdir = Path(workdir).resolve()
    pipeline_root = workdir / "outputs"
    pipeline_root.mkdir(parents=True, exist_ok=True)
    extra = {"runner": runner}
    if runner == "docker":
        params = params.model_copy(deep=True)
        params.pipeline.image = params.pipeline.gpu_image = image  # kfp.local would pull the public tags
        kfp_runner, uri = _docker_runner(params, arguments, pipeline_root, image)
        extra.update(image=image, tracking_uri=uri)
    elif runner == "subprocess":
        kfp_runner = local.SubprocessRunner(use_venv=False)
    else:
        raise PipelineError(f"--runner {runner!r}: expected subprocess or docker")
    local.init(runner=kfp_runner, pipeline_root=str(pipeline_root), raise_on_error=True)
    pipeline = _pipeline_module().build_pipeline(params)
    started = time.time()
    log = _TaskLog(sys.stdout)
    containers = _KeepExitCodes() if runner == "docker" else contextlib.nullcontext()
    with warnings.catch_warnings(), contextlib.redirect_stdout(log), containers:
        # the runtime image has no "python" in its name; the subprocess runner warns about it
        warnings.filterwarnings("ignore", message=".*non-Python base image.*", category=RuntimeWarning)
        try:
            pipeline(**arguments)
        except RuntimeError as err:
            message = re.sub(r"\x1b\[[0-9;]*m", "", str(err))  # kfp.local colours task names
            if runner == "subprocess":
                raise PipelineError(f"local run failed: {message} (task logs above; outputs under {pipeline_root})") from None
            failed = re.search(r"Inner task failed: '([^']+)'", message)
            raise PipelineError(f"local run failed: {message} (outputs under {pipeline_root}); "
                                f"the failed task's log in its container ends with:\n"
                                f"{log.tail(failed.group(1) if failed else None)}") from None
    out = local_round_outputs(pipeline_root)  # the pipeline has no outputs (ExitHandler)
    evaluation = Path(out["best_evaluation"].path)
    from ipa_lib.core.io import atomic_write_json, read_json

    summary = {
        "seconds": round(time.time() - started, 1),
        "pipeline_root": str(pipeline_root),
        "best_beta": out["best_beta"],
        "model_version": out["model_version"],
        "best_adapter": out["best_adapter"].path,
        "best_evaluation": str(evaluation),
        "eval": read_json(evaluation / "eval.json", "evaluation metrics"),
        **extra,
    }
    atomic_write_json(workdir / "summary.json", summary)
    return summary


# ----------------------------------------------------------------------------- main


def main(args) -> int:
    """Entry point of `ipa pipeline ...` (argparse wiring in ipa_lib/cli.py)."""
    try:
        params = load_params(args.params, args.set)
        cmd = args.pipeline_cmd
        require("kfp", "kfp.kubernetes", extra="cluster", purpose=f"`ipa pipeline {cmd}`")
        if cmd == "compile":
            pipeline_arguments(params)  # validates betas etc. the same way submit does
            out = compile_package(params, args.out)
            print(f"wrote {out}")
            return 0
        if cmd == "submit":
            params, arguments = pipeline_arguments(params, args.param)
            package = Path(args.package)
            if package.is_file() and not _package_is_current(load_params(args.params, args.set), package):
                print(f"warning: {package} differs from what `ipa pipeline compile` writes for {args.params}; "
                      "its compile-time settings (images, GPU pool, defaults) are the ones submitted", file=sys.stderr)
            result = submit(params, arguments, args.host, package, **submit_options(args))
            print(json.dumps(result, indent=2, sort_keys=True))
            return 0
        if cmd == "run-local":
            params, arguments = pipeline_arguments(params, getattr(args, "param", None), local=True)
            summary = run_local(params, arguments, args.workdir, getattr(args, "runner", "subprocess"),
                                getattr(args, "image", None) or LOCAL_IMAGE)
            print(json.dumps(summary, indent=2, sort_keys=True))
            return 0
        raise PipelineError(f"unknown pipeline command {cmd!r}")
    except ConfigError as err:  # bad params, overrides or betas: exit 2, like the rest of `ipa`
        print(f"error: {err}", file=sys.stderr)
        return 2
    except PipelineError as err:  # unreachable API, refused run, failed local task
        print(f"error: {err}", file=sys.stderr)
        return 1
