"""MLflow tracking for every stage: one parent run per round, one nested run per stage.

DVC runs each stage in its own process, so the round is carried between processes by a
small `lineage.json` written next to each stage's outputs::

    {"round_run_id": "...", "round_name": "round-003", "experiment_id": "1",
     "tracking_uri": "http://mlflow:5000", "stages": {"pretrain": "<run id>", "sample": ...}}

A stage reads the lineage of the folder it consumes and nests under the same round; a
stage that already ran in that round (DVC re-ran it after a change, or the next round
samples from the champion) opens a new round linked to the previous one.

Store: `MLFLOW_TRACKING_URI` > `tracking.uri` > `sqlite:///<repo>/.ipa/mlflow.db` with
artifacts in `<repo>/.ipa/mlartifacts`, so `dvc repro` works with nothing running. A
server is probed on `/health` a bounded number of times (`tracking.max_retries`) before
any run starts; MLflow's own HTTP retries and timeout are bounded the same way
(`MLFLOW_HTTP_REQUEST_MAX_RETRIES` / `MLFLOW_HTTP_REQUEST_TIMEOUT`, user values win).

MLflow and DVC know nothing of each other (no MLflow field holds a DVC hash, and DVC does
not record runs), so each stage run is tagged with the git commit, the `dvc.lock` digest and
the DVC hashes of its inputs.

Rounds are numbered `round-001`, `round-002`, ... from a counter tag on the experiment
(`ipa.round_counter`), read and advanced under `store_lock`, so concurrent stages never get
the same number and no query grows with the number of runs.

Usage from a stage (3 lines)::

    with stage_run(params, "gate", lineage_in=read_lineage(params.sample.out),
                   lineage_out=params.gate.out) as run:
        ...                                   # the stage's work
        run.log_metrics({"gate/kept": n}, step=None)
        run.log_artifacts("reports/gate")
        run.log_dataset(params.gate.out, name="gated", context="training")

mlflow is imported inside the functions (`ipa --help` stays fast).
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import json
import logging
import math
import os
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ipa_lib.core.config import Params, TrackingConfig, flatten
from ipa_lib.core.errors import RuntimeFailure
from ipa_lib.core.io import atomic_write_json

log = logging.getLogger(__name__)

LINEAGE_FILE = "lineage.json"
STAGES = ("pretrain", "sample", "gate", "train", "evaluate", "register", "promote")
# privacy and offline clusters: MLflow 3 telemetry off unless the user says otherwise
TELEMETRY_ENV = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}

TAG_KIND = "ipa.kind"  # "round" | "stage"
TAG_STAGE = "ipa.stage"
TAG_ROUND = "ipa.round"
TAG_PARENT = "mlflow.parentRunId"
TAG_KFP_RUN = "ipa.kfp.run_id"  # round tag: the KFP run whose tasks logged into it (the exit handler finds it)
TAG_ROUND_COUNTER = "ipa.round_counter"  # experiment tag: the number of the last auto-named round
TAG_CONTEXT = "mlflow.data.context"  # dataset input tag MLflow's UI shows as the context
ROUND_LOCK_TIMEOUT_S = 180.0  # wait this long for another stage numbering a round
ROUND_LOCK_STALE_S = 120.0  # a round lock older than this was left by a crashed process


class TrackingError(RuntimeFailure):
    """Tracking cannot proceed; the message says what to change."""


class TrackingUnavailable(TrackingError):
    """The tracking server did not answer after the configured retries."""


for _k, _v in TELEMETRY_ENV.items():
    os.environ.setdefault(_k, _v)


# ----------------------------------------------------------------------------- store


def repo_root(start: str | Path | None = None) -> Path:
    """The nearest folder at or above `start` (default: cwd) holding `dvc.yaml` or `.git`."""
    here = Path(start or Path.cwd()).resolve()
    for d in (here, *here.parents):
        if (d / "dvc.yaml").exists() or (d / ".git").exists():
            return d
    return here


def default_tracking_uri(root: str | Path) -> str:
    return f"sqlite:///{(Path(root) / '.ipa' / 'mlflow.db').resolve()}"


def default_artifact_location(root: str | Path) -> str:
    return (Path(root) / ".ipa" / "mlartifacts").resolve().as_uri()


def resolve_tracking_uri(cfg: TrackingConfig, root: str | Path | None = None) -> str:
    """`MLFLOW_TRACKING_URI` > `tracking.uri` > the local SQLite store under `<repo>/.ipa/`."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or cfg.uri
    return uri if uri else default_tracking_uri(root or repo_root())


def redact_uri(uri: str) -> str:
    """Drop `user:password@` from a URI before it is printed or stored."""
    parts = urllib.parse.urlsplit(uri)
    if not (parts.username or parts.password):
        return uri  # unchanged: urlunsplit would turn sqlite:////abs/path into sqlite://abs/path
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urllib.parse.urlunsplit(parts._replace(netloc=host))


def is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def check_server(uri: str, max_retries: int = 3, timeout_s: float = 5.0, backoff_s: float = 0.5) -> None:
    """Probe `<uri>/health`; raise `TrackingUnavailable` after `1 + max_retries` failed tries.

    Any HTTP answer below 500 proves the server is there (a proxy may hide /health);
    refused connections, timeouts and 5xx are retried with exponential backoff.
    """
    url = uri.rstrip("/") + "/health"
    last = ""
    for attempt in range(max_retries + 1):
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 (http(s) only)
                if resp.status < 500:
                    return
                last = f"HTTP {resp.status}"
        except urllib.error.HTTPError as err:
            if err.code < 500:
                return
            last = f"HTTP {err.code}"
        except (urllib.error.URLError, OSError) as err:
            last = str(getattr(err, "reason", err))
        if attempt < max_retries:
            time.sleep(backoff_s * 2**attempt)
    raise TrackingUnavailable(
        f"MLflow tracking server {redact_uri(uri)} is unreachable after {max_retries + 1} "
        f"attempt(s) (last error: {last}). Start the server, fix MLFLOW_TRACKING_URI / "
        "tracking.uri, or unset both to use the local store under .ipa/."
    )


@dataclass
class Tracker:
    """A configured tracking store: its URI, the experiment, and a client bound to both."""

    uri: str
    experiment_id: str
    experiment: str
    root: Path
    client: Any  # mlflow.MlflowClient


def configure(cfg: TrackingConfig | Params, root: str | Path | None = None, *, experiment: bool = True) -> Tracker:
    """Point MLflow at the store (tracking and registry), check it answers, get (or create)
    the experiment; `experiment=False` for registry-only work (experiment_id is then "")."""
    if isinstance(cfg, Params):
        cfg = cfg.tracking
    root = Path(root) if root else repo_root()
    for k, v in TELEMETRY_ENV.items():
        os.environ.setdefault(k, v)
    # MLflow's own retries default to 7 with backoff 2 (minutes of waiting): bound them
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(cfg.max_retries))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(cfg.request_timeout_s))

    import mlflow
    from mlflow.exceptions import MlflowException

    uri = resolve_tracking_uri(cfg, root)
    artifact_location = None
    if is_http(uri):
        check_server(uri, cfg.max_retries, timeout_s=min(cfg.request_timeout_s, 5))
    elif uri == default_tracking_uri(root):
        (root / ".ipa" / "mlartifacts").mkdir(parents=True, exist_ok=True)
        artifact_location = default_artifact_location(root)
    # mlflow.set_*_uri also export MLFLOW_*_URI, which would then outrank `tracking.uri` for every
    # later configure() in this process: keep the environment as the user set it
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    if not experiment:
        return Tracker(uri=uri, experiment_id="", experiment=cfg.experiment, root=root, client=client)
    try:
        exp = client.get_experiment_by_name(cfg.experiment)
        if exp is None:
            try:
                exp_id = client.create_experiment(cfg.experiment, artifact_location=artifact_location)
            except MlflowException as err:  # created by a concurrent stage
                if "RESOURCE_ALREADY_EXISTS" not in str(err.error_code):
                    raise
                exp_id = client.get_experiment_by_name(cfg.experiment).experiment_id
        elif exp.lifecycle_stage == "deleted":
            raise TrackingError(
                f"experiment {cfg.experiment!r} is deleted in {redact_uri(uri)}: restore it "
                "(mlflow experiments restore) or set tracking.experiment to another name"
            )
        else:
            exp_id = exp.experiment_id
    except MlflowException as err:
        raise TrackingUnavailable(f"MLflow store {redact_uri(uri)} failed: {err.message}") from None
    return Tracker(uri=uri, experiment_id=str(exp_id), experiment=cfg.experiment, root=root, client=client)


# ----------------------------------------------------------------------------- provenance


def git_info(root: str | Path) -> dict[str, str]:
    """Commit and dirty flag of the repo at `root` ("unknown" outside git)."""

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD") or "unknown"
    status = git("status", "--porcelain", "--untracked-files=no")
    dirty = "unknown" if status is None else str(bool(status)).lower()
    return {"commit": commit, "dirty": dirty}


def _outs_md5(lock: dict) -> dict[str, str]:
    """Path -> DVC hash of every output recorded in a parsed dvc.lock."""
    found: dict[str, str] = {}
    for entry in (lock.get("stages") or {}).values():
        for out in entry.get("outs") or []:
            h = out.get("md5") or out.get("hash") or out.get("etag")
            if out.get("path") and h:
                found[str(out["path"]).rstrip("/")] = str(h)
    return found


def dvc_tags(root: str | Path, stage: str) -> dict[str, str]:
    """Tags linking a run to DVC: the `dvc.lock` digest and the hash of each input of `stage`.

    DVC writes a stage's own lock entry after its command finishes, so inside the command
    only its inputs are current: each dependency of `stage` (from `dvc.yaml`, else from the
    previous lock) that another stage produces gets that stage's recorded output hash.
    """
    root = Path(root)
    lock_path, yaml_path = root / "dvc.lock", root / "dvc.yaml"
    tags: dict[str, str] = {"ipa.dvc.stage": stage}
    lock: dict = {}
    if lock_path.exists():
        raw = lock_path.read_bytes()
        tags["ipa.dvc.lock_sha256"] = hashlib.sha256(raw).hexdigest()
        lock = yaml.safe_load(raw) or {}
    deps: list[str] = []
    if yaml_path.exists():
        spec = (yaml.safe_load(yaml_path.read_text()) or {}).get("stages", {}).get(stage.split("@")[0]) or {}
        deps = [d for d in spec.get("deps") or [] if isinstance(d, str)]
    if not deps:
        deps = [d.get("path") for d in (lock.get("stages", {}).get(stage) or {}).get("deps") or []]
    outs = _outs_md5(lock)
    for dep in deps:
        if dep and dep.rstrip("/") in outs:
            tags[f"ipa.dvc.dep.{dep.rstrip('/')}"] = outs[dep.rstrip("/")]
    return tags


def tree_digest(path: str | Path, exclude: Sequence[str] = (LINEAGE_FILE,)) -> dict[str, Any]:
    """sha256 over (relative path, content) of every file under `path`; `lineage.json` skipped.

    Returns {"sha256", "files", "bytes"}. A single file hashes its content.
    """
    path = Path(path)
    if not path.exists():
        raise TrackingError(f"{path}: does not exist (nothing to hash)")
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    files = [p for p in files if p.name not in exclude]
    h, total = hashlib.sha256(), 0
    for p in files:
        rel = p.name if p == path else p.relative_to(path).as_posix()
        fh = hashlib.sha256()
        with p.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                fh.update(chunk)
        total += p.stat().st_size
        h.update(f"{rel}\0{fh.hexdigest()}\n".encode())
    return {"sha256": h.hexdigest(), "files": len(files), "bytes": total}


# ----------------------------------------------------------------------------- lineage


def read_lineage(path: str | Path | None) -> dict | None:
    """The lineage of a stage output: `<folder>/lineage.json`, a json file, or None if absent."""
    if path is None:
        return None
    path = Path(path)
    if path.is_dir():
        path = path / LINEAGE_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise TrackingError(f"{path}: not valid JSON: {err}") from None
    if isinstance(data, dict) and "lineage" in data and "round_run_id" not in data:
        data = data["lineage"]  # a record (e.g. models/registered.json) that embeds lineage
    return data if isinstance(data, dict) else None


def write_lineage(folder: str | Path, lineage: Mapping[str, Any]) -> Path:
    """Write `<folder>/lineage.json` (or the json file itself if `folder` ends in .json)."""
    folder = Path(folder)
    path = folder if folder.suffix == ".json" else folder / LINEAGE_FILE
    return atomic_write_json(path, dict(lineage))


def _pick_lineage(lineage_in: Mapping | Sequence[Mapping | None] | None) -> dict | None:
    """Several inputs (e.g. train reads gated data and the base model): the furthest along wins."""
    if lineage_in is None or isinstance(lineage_in, Mapping):
        return dict(lineage_in) if lineage_in else None
    found = [dict(x) for x in lineage_in if x and x.get("round_run_id")]
    return max(found, key=lambda x: len(x.get("stages") or {}), default=None)


# ----------------------------------------------------------------------------- runs


def _param_items(params: Params | Mapping[str, Any]) -> dict[str, str]:
    flat = flatten(params) if isinstance(params, Params) else dict(params)
    return {k: (json.dumps(v) if isinstance(v, (list, dict)) else str(v))[:6000] for k, v in flat.items()}


def _floats(metrics: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        try:
            out[k] = float(v)
        except (TypeError, ValueError):
            raise TrackingError(f"metric {k!r} is not a number: {v!r}") from None
    return out


@dataclass
class StageRun:
    """What a stage logs through; every method is a no-op when tracking is disabled."""

    stage: str
    run_id: str | None
    round_run_id: str | None
    lineage: dict
    tracker: Tracker | None = None

    @property
    def enabled(self) -> bool:
        return self.tracker is not None and self.run_id is not None

    def log_params(self, params: Params | Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in _param_items(params).items()]
        for i in range(0, len(items), 100):  # log_batch takes at most 100 params
            self.tracker.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None, *, to_round: bool = False) -> None:
        """Log `{key: number}` at `step` (training curves) or once (step None -> 0)."""
        if not self.enabled or not metrics:
            return
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        values = _floats(metrics)
        bad = [k for k, v in values.items() if not math.isfinite(v)]
        if bad:
            log.warning("non-finite metrics logged as-is: %s", bad)
        batch = [Metric(k, v, ts, int(step or 0)) for k, v in values.items()]
        targets = [self.run_id] + ([self.round_run_id] if to_round and self.round_run_id else [])
        for run_id in targets:
            for i in range(0, len(batch), 1000):
                self.tracker.client.log_batch(run_id, metrics=batch[i : i + 1000])

    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None) -> None:
        if self.enabled:
            self.tracker.client.log_artifacts(self.run_id, str(local_dir), artifact_path)

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        if self.enabled:
            self.tracker.client.log_artifact(self.run_id, str(local_path), artifact_path)

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        if self.enabled:
            self.tracker.client.log_dict(self.run_id, obj, artifact_file)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        from mlflow.entities import RunTag

        self.tracker.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_dataset(
        self, path: str | Path, name: str, context: str = "training", tags: Mapping[str, str] | None = None
    ) -> str | None:
        """Record a dataset folder/file as an input of this run (`MlflowClient.log_inputs`).

        The digest is a sha256 over the files' paths and contents (lineage.json excluded),
        so the same data logged by two stages links the runs. Returns the full digest.
        """
        if not self.enabled:
            return None
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.data.sources import LocalArtifactDatasetSource
        from mlflow.entities import Dataset, DatasetInput, InputTag

        path = Path(path).resolve()
        info = tree_digest(path)
        meta = MetaDataset(LocalArtifactDatasetSource(str(path)), name=name, digest=info["sha256"][:32])  # column: 36 chars
        input_tags = {"ipa.sha256": info["sha256"], "ipa.files": str(info["files"]), "ipa.bytes": str(info["bytes"])}
        input_tags.update(tags or {})
        input_tags[TAG_CONTEXT] = context
        dataset = DatasetInput(Dataset(**meta.to_dict()), [InputTag(k, str(v)) for k, v in input_tags.items()])
        self.tracker.client.log_inputs(self.run_id, datasets=[dataset])
        return info["sha256"]

    def log_outputs(self, *paths: str | Path) -> dict[str, str]:
        """Tag `ipa.outs.<path>.sha256` for each output (paths relative to the repo root)."""
        if not self.enabled:
            return {}
        tags = {}
        root = self.tracker.root.resolve()
        for p in map(Path, paths):
            full = p.resolve()
            key = full.relative_to(root).as_posix() if full.is_relative_to(root) else p.as_posix()
            tags[f"ipa.outs.{key}.sha256"] = tree_digest(full)["sha256"]
        self.set_tags(tags)
        return tags


def _who() -> str:
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 (no passwd entry in some containers)
        user = "unknown"
    return f"{user}@{socket.gethostname()}:{os.getpid()}"


def _err_code(err: Exception) -> str:
    return str(getattr(err, "error_code", ""))


def _release_lock(client, lock: str, token: str | None) -> None:
    from mlflow.exceptions import MlflowException

    try:
        holder = client.get_registered_model(lock)
        if holder.tags.get("ipa.lock.token") == token:
            client.delete_registered_model(lock)
    except MlflowException:
        pass  # already gone


@contextlib.contextmanager
def store_lock(client, lock: str, what: str, timeout_s: float = 60.0, stale_s: float = 600.0,
               poll_s: float = 0.25) -> Iterator[str]:
    """Mutual exclusion between processes sharing an MLflow store, for `what` (a phrase for
    the error message), through an atomic registry create: registered model `lock` is created
    with a random token, an owner and a timestamp, and deleted on exit. Yields the token.

    MLflow has no compare-and-set, but creating a registered model is atomic (its name is
    unique in the registry database: a second creator gets RESOURCE_ALREADY_EXISTS). Others
    wait up to `timeout_s` (then TrackingError); a lock older than `stale_s` was left by a
    crashed process and is removed.
    """
    import random
    from datetime import UTC, datetime

    from mlflow.exceptions import MlflowException

    token = uuid.uuid4().hex
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.create_registered_model(
                lock,
                tags={"ipa.lock.token": token, "ipa.lock.owner": _who(), "ipa.lock.acquired_at": repr(time.time())},
                description=f"lock held during {what}; safe to delete if its owner died",
            )
            break
        except MlflowException as err:
            # DOES_NOT_EXIST: the server's create raced a release of the same name (seen under
            # concurrent promoters on one tracking server); look at who holds it, then retry
            if not any(code in _err_code(err) for code in ("ALREADY_EXISTS", "DOES_NOT_EXIST")):
                raise
        try:
            holder = client.get_registered_model(lock)
        except MlflowException:
            continue  # released in between: try again
        if holder.tags.get("ipa.lock.token") == token:
            break  # our create went through and a retry saw it
        since = float(holder.tags.get("ipa.lock.acquired_at") or (holder.creation_timestamp or 0) / 1000)
        if time.time() - since > stale_s:
            _release_lock(client, lock, holder.tags.get("ipa.lock.token"))  # left by a crashed process
            continue
        if time.monotonic() > deadline:
            raise TrackingError(
                f"another {what} holds the lock {lock!r} (owner {holder.tags.get('ipa.lock.owner')}, "
                f"since {datetime.fromtimestamp(since, UTC).isoformat(timespec='seconds')}); "
                f"retry later, or delete that registered model if its owner died"
            )
        time.sleep(poll_s * (0.5 + random.random()))
    try:
        yield token
    finally:
        _release_lock(client, lock, token)


def _last_round_number(tracker: Tracker) -> int:
    """The number of the newest auto-named round, for an experiment from before the counter tag."""
    runs = tracker.client.search_runs(
        [tracker.experiment_id],
        f"tags.`{TAG_KIND}` = 'round' and tags.`{TAG_ROUND}` LIKE 'round-%'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    suffix = runs[0].data.tags[TAG_ROUND][len("round-") :] if runs else ""
    return int(suffix) if suffix.isdigit() else 0


def next_round_number(tracker: Tracker) -> int:
    """Advance the experiment's round counter (tag `ipa.round_counter`) under `store_lock`; a
    constant number of requests however many runs the experiment holds."""
    client = tracker.client
    lock = f"ipa-experiment-{tracker.experiment_id}.round-lock"
    with store_lock(client, lock, f"round numbering in experiment {tracker.experiment!r}",
                    ROUND_LOCK_TIMEOUT_S, ROUND_LOCK_STALE_S):
        last = client.get_experiment(tracker.experiment_id).tags.get(TAG_ROUND_COUNTER, "")
        n = (int(last) if last.isdigit() else _last_round_number(tracker)) + 1
        client.set_experiment_tag(tracker.experiment_id, TAG_ROUND_COUNTER, str(n))
    return n


def _create_round(tracker: Tracker, params: Params | None, name: str | None, previous: str | None) -> tuple[str, str]:
    client = tracker.client
    if name is None:
        name = f"round-{next_round_number(tracker):03d}"
    git = git_info(tracker.root)
    tags = {
        TAG_KIND: "round",
        TAG_ROUND: name,
        "mlflow.runName": name,
        "mlflow.source.git.commit": git["commit"],
        "ipa.git.commit": git["commit"],
        "ipa.git.dirty": git["dirty"],
        "ipa.started_by": _who(),
    }
    if previous:
        tags["ipa.previous_round"] = previous
    run = client.create_run(tracker.experiment_id, tags=tags, run_name=name)
    if params is not None:
        StageRun("round", run.info.run_id, run.info.run_id, {}, tracker).log_params(params)
    return run.info.run_id, name


def _round_has_stage(tracker: Tracker, round_id: str, stage: str) -> bool:
    runs = tracker.client.search_runs(
        [tracker.experiment_id],
        f"tags.`{TAG_PARENT}` = '{round_id}' and tags.`{TAG_STAGE}` = '{stage}'",
        max_results=1,
    )
    return bool(runs)


def _disabled_run(stage: str, lineage: dict | None) -> StageRun:
    lin = {"round_run_id": None, "stages": dict((lineage or {}).get("stages") or {}), "tracking": "disabled"}
    return StageRun(stage, None, None, lin)


@contextlib.contextmanager
def round_run(params: Params, name: str | None = None, *, root: str | Path | None = None) -> Iterator[StageRun]:
    """An explicit round for single-process drivers (KFP launcher, tests); pass its `.lineage`
    as `lineage_in` to each `stage_run`. DVC stages don't need it (the first stage opens one)."""
    if not params.tracking.enabled:
        yield _disabled_run("round", None)
        return
    tracker = configure(params, root)
    round_id, rname = _create_round(tracker, params, name, None)
    lineage = _lineage(tracker, round_id, rname, {})
    status = "FAILED"
    try:
        yield StageRun("round", round_id, round_id, lineage, tracker)
        status = "FINISHED"
    finally:
        _terminate(tracker, round_id, status)


def _lineage(tracker: Tracker, round_id: str, round_name: str, stages: dict) -> dict:
    return {
        "round_run_id": round_id,
        "round_name": round_name,
        "experiment_id": tracker.experiment_id,
        "tracking_uri": redact_uri(tracker.uri) if is_http(tracker.uri) else "local",
        "stages": dict(stages),
    }


def _terminate(tracker: Tracker, run_id: str, status: str) -> None:
    try:
        tracker.client.set_terminated(run_id, status)
    except Exception as err:  # noqa: BLE001 (never hide the stage's own error)
        log.warning("could not mark run %s %s: %s", run_id, status, err)


@contextlib.contextmanager
def stage_run(
    params: Params,
    stage: str,
    lineage_in: Mapping | Sequence[Mapping | None] | None = None,
    *,
    lineage_out: str | Path | None = None,
    dvc_stage: str | None = None,
    run_name: str | None = None,
    root: str | Path | None = None,
    round_tags: Mapping[str, str] | None = None,
) -> Iterator[StageRun]:
    """A nested MLflow run for one stage of a round; yields a `StageRun`.

    lineage_in: the `read_lineage(...)` of the stage's input folder(s); None (or a round
        that already has this stage, or one missing from this store) opens a new round.
    lineage_out: folder (or .json path) where the lineage for downstream stages is
        written when the block succeeds; it is also `run.lineage`.
    dvc_stage: the DVC stage name if it differs from `stage` (e.g. "train@600").
    round_tags: tags set on the round run (e.g. `ipa.kfp.run_id`).

    The run is active for fluent calls (`mlflow.log_*`, `log_model`) inside the block, logs
    the flattened params, git/DVC tags and upstream stage runs, and ends FINISHED or FAILED
    (the round too, so a failed stage shows on the round).
    """
    upstream = _pick_lineage(lineage_in)
    if not params.tracking.enabled:
        run = _disabled_run(stage, upstream)
        yield run
        if lineage_out is not None:
            write_lineage(lineage_out, run.lineage)
        return

    import mlflow

    tracker = configure(params, root)
    client = tracker.client
    dvc_stage = dvc_stage or stage

    # 1. find or open the round
    round_id = (upstream or {}).get("round_run_id")
    round_name = (upstream or {}).get("round_name")
    previous = None
    if round_id:
        try:
            r = client.get_run(round_id)
            if r.info.experiment_id != tracker.experiment_id or r.info.lifecycle_stage != "active":
                raise LookupError
            round_name = r.data.tags.get(TAG_ROUND, round_name)
        except Exception:  # noqa: BLE001 (not in this store: lineage from another store)
            log.warning("round %s of the input's lineage is not in experiment %r of %s; opening a new round",
                        round_id, tracker.experiment, redact_uri(tracker.uri))
            previous, round_id = round_id, None
    if round_id and _round_has_stage(tracker, round_id, dvc_stage):
        previous, round_id = round_id, None  # this stage re-ran: a new round
    if not round_id:
        round_id, round_name = _create_round(tracker, params, None, previous)
    else:
        client.update_run(round_id, status="RUNNING")
    for key, value in (round_tags or {}).items():
        client.set_tag(round_id, key, str(value))

    # 2. the stage run, nested under the round
    git = git_info(tracker.root)
    tags = {
        TAG_KIND: "stage",
        TAG_STAGE: dvc_stage,
        TAG_PARENT: round_id,
        TAG_ROUND: round_name or "",
        "mlflow.source.git.commit": git["commit"],
        "ipa.git.commit": git["commit"],
        "ipa.git.dirty": git["dirty"],
        "ipa.started_by": _who(),
        **dvc_tags(tracker.root, dvc_stage),
    }
    for up_stage, up_run in ((upstream or {}).get("stages") or {}).items():
        tags[f"ipa.upstream.{up_stage}"] = str(up_run)
    if previous:
        tags["ipa.previous_round"] = previous
    child = client.create_run(tracker.experiment_id, tags=tags, run_name=run_name or dvc_stage)
    run_id = child.info.run_id
    stages = dict((upstream or {}).get("stages") or {}) if (upstream or {}).get("round_run_id") == round_id else {}
    stages[dvc_stage] = run_id
    run = StageRun(dvc_stage, run_id, round_id, _lineage(tracker, round_id, round_name or "", stages), tracker)
    run.log_params(params)

    # 3. run the stage with its run active for fluent calls
    mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None)
    status = "FAILED"
    try:
        yield run
        status = "FINISHED"
    finally:
        try:
            mlflow.end_run(status)
        except Exception as err:  # noqa: BLE001
            log.warning("could not end run %s: %s", run_id, err)
        _terminate(tracker, round_id, status)
    if lineage_out is not None:
        write_lineage(lineage_out, run.lineage)


def numeric_leaves(prefix: str, d: Mapping[str, Any]) -> dict[str, float]:
    """Flatten the numeric leaves of a stage result into `prefix/key` metrics."""
    out = {}
    for k, v in d.items():
        if isinstance(v, bool) or v is None:
            continue
        if isinstance(v, (int, float)):
            out[f"{prefix}/{k}"] = float(v)
        elif isinstance(v, Mapping):
            out.update(numeric_leaves(f"{prefix}/{k}", v))
    return out


def tracked_stage(params: Params, stage: str, fn, *, inputs: Sequence[tuple[str | Path, str]], output: str | Path,
                  dvc_stage: str | None = None, round_tags: Mapping[str, str] | None = None) -> dict:
    """Run `fn(params)` (a stage function returning its result dict) inside the stage's MLflow
    run: params, tags, the input folders as datasets (their lineage picks the round), the
    result's numbers as `<stage>/...` metrics (`log` entries as curves), the output folder as
    artifacts, and the lineage written into `output` for the next stage. The one wrapper for
    DVC stages (`ipa <stage>`) and KFP components alike; `dvc_stage` names a sweep member
    (e.g. "train@600") so parallel members of one round do not open new rounds."""
    lineage = [read_lineage(path) for path, _ in inputs]
    name = dvc_stage or stage
    with stage_run(params, stage, lineage, lineage_out=output, dvc_stage=dvc_stage, round_tags=round_tags) as run:
        for path, dataset in inputs:
            run.log_dataset(path, name=dataset, context=name)
        result = fn(params)
        for entry in result.get("log", []):  # training curves, one point per logged step
            run.log_metrics({f"{stage}/{k}": v for k, v in entry.items() if k != "step"}, step=entry["step"])
        run.log_metrics(numeric_leaves(stage, {k: v for k, v in result.items() if k != "log"}))
        if Path(output).is_dir():
            run.log_artifacts(output, stage)
        run.log_outputs(output)
    return result


def fail_round(params: Params, kfp_run_id: str, reason: str = "") -> list[dict]:
    """Mark the round run(s) of KFP run `kfp_run_id` (tag `ipa.kfp.run_id`) FAILED: the KFP
    exit handler's record of a failed pipeline. Stage runs left RUNNING (a killed pod) end
    FAILED; the round gets `ipa.failed_task` (its stage runs that did not finish, or `reason`
    when the failed task has no stage run) and `ipa.failure` (`reason`). One
    {"round_run_id", "round", "failed_task"} per round; none when no stage opened a round."""
    if not params.tracking.enabled or not kfp_run_id:
        return []
    tracker = configure(params)
    client, exp = tracker.client, [tracker.experiment_id]
    rounds = client.search_runs(exp, f"tags.`{TAG_KIND}` = 'round' and tags.`{TAG_KFP_RUN}` = '{kfp_run_id}'",
                                max_results=100)
    out = []
    for r in rounds:
        round_id = r.info.run_id
        stages = client.search_runs(exp, f"tags.`{TAG_PARENT}` = '{round_id}'", max_results=1000)
        unfinished = [s for s in stages if s.info.status != "FINISHED"]
        for s in unfinished:
            if s.info.status in ("RUNNING", "SCHEDULED"):
                _terminate(tracker, s.info.run_id, "FAILED")
        task = ", ".join(sorted(s.data.tags.get(TAG_STAGE, s.info.run_name) for s in unfinished))
        task = task or f"a task without a stage run ({reason or 'no reason given'})"
        client.set_tag(round_id, "ipa.failed_task", task)
        client.set_tag(round_id, "ipa.failure", reason[:4000])
        _terminate(tracker, round_id, "FAILED")
        out.append({"round_run_id": round_id, "round": r.data.tags.get(TAG_ROUND, ""), "failed_task": task})
    return out
