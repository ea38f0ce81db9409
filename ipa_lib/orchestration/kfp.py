"""`ipa pipeline compile | submit | run-local`: the KFP driver of one alignment round.

All three start from the same place: `params.yaml` (+ `--set key=value`), validated by
`ipa_lib.core.config`, becomes the pipeline's arguments

    params_json  the whole parameter set as canonical JSON (every component parses it)
    betas        the beta sweep (`pipeline.betas`)
    base_model   the base model folder (on the workspace PVC in the cluster)

- compile:   IR YAML with these as defaults and the cluster settings of `params.pipeline`
             baked in (images, GPU pool, PVC, secret, retries, caching);
- submit:    `kfp.Client` run of a compiled package; `--param` overrides an argument
             (`betas=[200,600]`, `base_model=...`) or a dotted params key
             (`train.steps=100`), and the result is validated before anything is sent;
- run-local: the same DAG through `kfp.local` (SubprocessRunner(use_venv=False): every
             task is a subprocess of this Python, no network, no cluster).

kfp is imported inside the functions so `ipa --help` stays fast. Errors (bad params, bad
overrides, an unreachable or failing KFP API, a failed local task) print one readable
line and return a non-zero exit code.
"""

from __future__ import annotations

from ipa_lib.core.errors import RuntimeFailure

import contextlib
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

PARAMETERS = ("params_json", "betas", "base_model")
HTTP_TIMEOUT_S = 10.0  # per request to the KFP API: connect + read


class PipelineError(RuntimeFailure):
    """The pipeline could not be compiled, submitted or run; the message says why."""


# ----------------------------------------------------------------------------- imports


def repo_root() -> Path:
    """The checkout holding `pipelines/` and `components/` (they are not part of the wheel)."""
    for root in (Path(__file__).resolve().parents[2], Path.cwd()):
        if (root / "pipelines" / "ipa_round.py").is_file() and (root / "components" / "stages.py").is_file():
            return root
    raise PipelineError("pipelines/ipa_round.py not found: run `ipa pipeline` from a checkout of the ipa-align repository")


def _pipeline_module():
    root = str(repo_root())
    if root not in sys.path:
        sys.path.insert(0, root)
    from pipelines import ipa_round

    return ipa_round


# ----------------------------------------------------------------------------- arguments


def pipeline_arguments(params: Params, overrides: list[str] | None = None, *, local: bool = False) -> tuple[Params, dict]:
    """Apply `--param` overrides and return (validated params, pipeline arguments).

    An override is `params_json=<JSON object>` (replaces the parameter set),
    `betas=<list>`, `base_model=<path>`, or a dotted params key (`train.steps=100`).
    Values are YAML (so `[200, 600]`, `true`, `1e-3` work). Unknown names are errors.
    """
    import yaml

    data = params.model_dump(mode="json")
    base_model = None
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--param {item!r} must look like NAME=VALUE (NAME: {', '.join(PARAMETERS)} or a dotted params key)")
        key, raw = (s.strip() for s in item.split("=", 1))
        if key == "params_json":
            data = _parse_value(key, raw, json.loads, "JSON", dict, "a JSON object")
        elif key == "betas":
            data.setdefault("pipeline", {})["betas"] = _parse_value(key, raw, yaml.safe_load, "YAML", list, "a list of positive numbers like [200, 600]")
        elif key == "base_model":
            if not raw:
                raise ConfigError("--param base_model: empty path")
            base_model = raw
        elif "." in key:
            apply_override(data, item, "--param")
        else:
            raise ConfigError(f"--param {key!r}: unknown pipeline parameter (valid: {', '.join(PARAMETERS)}, or a dotted params key like train.steps)")
    params = parse_params(data, "pipeline parameters")
    ipa_round = _pipeline_module()
    if base_model is None:
        base_model = local_base_model(params) if local else ipa_round.cluster_base_model(params)
    return params, {
        "params_json": ipa_round.params_json(params),
        "betas": list(params.pipeline.betas),
        "base_model": base_model,
    }


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
        raise ConfigError(f"backend.base_model: {path} is not a folder (run `ipa pretrain` or `dvc pull models/base`)")
    return params.backend.base_model


# ----------------------------------------------------------------------------- compile


def compile_package(params: Params, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        _pipeline_module().compile_pipeline(params, str(out))
    return out


# ----------------------------------------------------------------------------- submit


def check_host(host: str, timeout_s: float = HTTP_TIMEOUT_S) -> dict:
    """GET `<host>/apis/v2beta1/healthz` once with a short timeout and return its JSON.

    Anything but a JSON answer with status 2xx raises PipelineError: a refused connection,
    a timeout, a bad URL, an HTTP error (kfp.Client would retry healthz for 25 s on those),
    or an HTML page from an authentication proxy.
    """
    parts = urllib.parse.urlsplit(host)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise PipelineError(f"--host {host!r}: expected an http(s) URL like http://127.0.0.1:8888 "
                            "(kubectl -n kubeflow port-forward svc/ml-pipeline 8888)")
    url = host.rstrip("/") + "/apis/v2beta1/healthz"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 (http(s) only, checked above)
            body = resp.read()
    except urllib.error.HTTPError as err:
        hint = " (is this the KFP v2 API?)" if err.code == 404 else " (authentication needed? port-forward svc/ml-pipeline)" if err.code in (401, 403) else ""
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
                            f"(got {body[:80]!r}); an authentication proxy in front of it?")
    return data


@contextlib.contextmanager
def bounded_kfp_requests(seconds: float):
    """Give every request of kfp's generated HTTP client a (connect, read) timeout.

    kfp_server_api passes `timeout=None` to urllib3 unless a call sets `_request_timeout`,
    and kfp.Client never does, so a server that accepts and stays silent would block
    forever. Patched on the class for the duration of the block, then restored."""
    from kfp_server_api import rest

    original = rest.RESTClientObject.request

    def request(self, method, url, *args, _request_timeout=None, **kwargs):
        return original(self, method, url, *args, _request_timeout=_request_timeout or (seconds, seconds), **kwargs)

    rest.RESTClientObject.request = request
    try:
        yield
    finally:
        rest.RESTClientObject.request = original


def submit(params: Params, arguments: dict, host: str, package: str | Path, *, experiment: str | None = None,
           run_name: str | None = None, timeout_s: float = HTTP_TIMEOUT_S) -> dict:
    """Create a run of `package` through `kfp.Client`; returns {"run_id", "experiment", ...}.

    Multi-user KFP (healthz says so) gets `pipeline.namespace`; single-user KFP rejects
    a namespace on experiments, so none is sent. Runs use `pipeline.service_account`.
    """
    package = Path(package)
    if not package.is_file():
        raise PipelineError(f"{package}: pipeline package not found (run `ipa pipeline compile --out {package}`)")
    health = check_host(host, timeout_s)
    multi_user = bool(health.get("multi_user"))
    namespace = params.pipeline.namespace if multi_user else None
    experiment = experiment or params.tracking.experiment
    run_name = run_name or f"ipa-round {time.strftime('%Y-%m-%d %H-%M-%S')}"

    import kfp
    from kfp_server_api.exceptions import ApiException

    try:
        with bounded_kfp_requests(timeout_s), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            client = kfp.Client(host=host.rstrip("/"), namespace=namespace or "kubeflow")
            result = client.create_run_from_pipeline_package(
                str(package), arguments=arguments, run_name=run_name, experiment_name=experiment,
                namespace=namespace, service_account=params.pipeline.service_account,
            )
    except ApiException as err:
        body = (err.body or "").strip() if isinstance(err.body, str) else err.body
        raise PipelineError(f"KFP API at {host} refused the request: HTTP {err.status} {err.reason}: {body}") from None
    except Exception as err:  # urllib3's timeouts and connection errors are not OSError subclasses
        if isinstance(err, OSError) or type(err).__module__.startswith("urllib3"):
            raise PipelineError(f"KFP API at {host} stopped answering while submitting ({type(err).__name__}: {err}; "
                                f"timeout {timeout_s:g} s per request); check the KFP UI before submitting again") from None
        raise
    return {
        "run_id": result.run_id,
        "run_name": run_name,
        "experiment": experiment,
        "namespace": namespace,
        "url": f"{host.rstrip('/')}/#/runs/details/{result.run_id}",
    }


def _package_is_current(params: Params, package: Path) -> bool:
    """Whether `package` is what `ipa pipeline compile` would write for `params`."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="ipa-kfp-") as tmp:
        fresh = compile_package(params, Path(tmp) / "fresh.yaml")
        return fresh.read_text() == package.read_text()


# ----------------------------------------------------------------------------- run-local


def run_local(params: Params, arguments: dict, workdir: str | Path) -> dict:
    """Run the round with `kfp.local` (every task a subprocess, outputs under `workdir`)."""
    from kfp import local

    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(workdir / "outputs"), raise_on_error=True)
    pipeline = _pipeline_module().build_pipeline(params)
    started = time.time()
    with warnings.catch_warnings():
        # the runtime image has no "python" in its name; the subprocess runner warns about it
        warnings.filterwarnings("ignore", message=".*non-Python base image.*", category=RuntimeWarning)
        try:
            task = pipeline(**arguments)
        except RuntimeError as err:
            message = re.sub(r"\x1b\[[0-9;]*m", "", str(err))  # kfp.local colours task names
            raise PipelineError(f"local run failed: {message} (task logs above; outputs under {workdir / 'outputs'})") from None
    out = task.outputs
    evaluation = Path(out["best_evaluation"].path)
    from ipa_lib.core.io import atomic_write_json, read_json

    summary = {
        "seconds": round(time.time() - started, 1),
        "pipeline_root": str(workdir / "outputs"),
        "best_beta": out["best_beta"],
        "model_version": out["model_version"],
        "best_adapter": out["best_adapter"].path,
        "best_evaluation": str(evaluation),
        "eval": read_json(evaluation / "eval.json", "evaluation metrics"),
    }
    atomic_write_json(workdir / "summary.json", summary)
    return summary


# ----------------------------------------------------------------------------- main


def main(args) -> int:
    """Entry point of `ipa pipeline ...` (argparse wiring in ipa_lib/cli.py)."""
    try:
        params = load_params(args.params, args.set)
        cmd = args.pipeline_cmd
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
            result = submit(params, arguments, args.host, package, experiment=args.experiment)
            print(json.dumps(result, indent=2, sort_keys=True))
            return 0
        if cmd == "run-local":
            params, arguments = pipeline_arguments(params, getattr(args, "param", None), local=True)
            summary = run_local(params, arguments, args.workdir)
            print(json.dumps(summary, indent=2, sort_keys=True))
            return 0
        raise PipelineError(f"unknown pipeline command {cmd!r}")
    except ConfigError as err:  # bad params, overrides or betas: exit 2, like the rest of `ipa`
        print(f"error: {err}", file=sys.stderr)
        return 2
    except PipelineError as err:  # unreachable API, refused run, failed local task
        print(f"error: {err}", file=sys.stderr)
        return 1
