"""A real `mlflow server` for tests: 127.0.0.1, a free port, SQLite backend and artifact root
in a temp folder, one worker. Started once per test session and shared by every module that
imports the fixture (the process is cached here), stopped at session end.

    from mlflow_server import mlflow_server  # noqa: F401  (pytest fixture)

    def test_x(mlflow_server):
        uri = mlflow_server.uri

`start_postgres()` starts a throwaway PostgreSQL cluster (Debian's `postgresql` package) on
127.0.0.1 for `start_server(backend_store_uri=pg.uri, env=pg.env)`, the store users deploy
(k8s/components/mlflow-postgres, docs/mlflow.md).
"""

from __future__ import annotations

import atexit
import glob
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")

START_TIMEOUT_S = 150.0  # cold start on 2 busy cores takes ~20 s


@dataclass
class MlflowServer:
    uri: str
    port: int
    root: Path  # holds mlflow.db, artifacts/ and server.log
    proc: subprocess.Popen

    @property
    def log(self) -> str:
        p = self.root / "server.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:  # the server runs uvicorn and a job runner as children: stop its whole group
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        shutil.rmtree(self.root, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tmp_dir() -> str | None:
    # tmpfs when there is one: fsyncs dominate request latency on a busy disk
    return "/dev/shm" if os.access("/dev/shm", os.W_OK) else None


def start_server(
    root: Path | None = None,
    timeout_s: float = START_TIMEOUT_S,
    backend_store_uri: str | None = None,
    env: dict[str, str] | None = None,
) -> MlflowServer:
    """`mlflow server --serve-artifacts`; backend: SQLite under `root` unless `backend_store_uri`;
    `env`: extra environment (e.g. a database's PGUSER/PGPASSWORD)."""
    root = Path(root or tempfile.mkdtemp(prefix="ipa-mlflow-", dir=_tmp_dir()))
    port = free_port()
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", **(env or {})}
    env.pop("MLFLOW_TRACKING_URI", None)
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    cmd = [
        str(mlflow_bin) if mlflow_bin.exists() else "mlflow",
        "server",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--workers", "1",
        "--backend-store-uri", backend_store_uri or f"sqlite:///{root / 'mlflow.db'}",
        "--serve-artifacts",
        "--artifacts-destination", str(root / "artifacts"),
    ]  # fmt: skip
    logf = open(root / "server.log", "wb")  # noqa: SIM115 (kept open for the server's life)
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
    server = MlflowServer(f"http://127.0.0.1:{port}", port, root, proc)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log = server.log
            server.stop()
            raise RuntimeError(f"mlflow server exited with {proc.returncode}:\n{log[-3000:]}")
        try:
            with urllib.request.urlopen(f"{server.uri}/health", timeout=2) as r:
                if r.status == 200:
                    return server
        except OSError:
            pass
        time.sleep(0.5)
    log = server.log
    server.stop()
    raise RuntimeError(f"mlflow server not healthy after {timeout_s:.0f} s:\n{log[-3000:]}")


# --------------------------------------------------------------------------- PostgreSQL


POSTGRES_MISSING = (
    "PostgreSQL server binaries (initdb, pg_ctl) not found: install Debian's `postgresql` package "
    "(apt-get update && apt-get install -y postgresql) or set IPA_PG_BINDIR"
)


def postgres_bindir() -> Path | None:
    """Folder with initdb/pg_ctl: $IPA_PG_BINDIR, else the newest /usr/lib/postgresql/*/bin, else PATH."""
    debian = glob.glob("/usr/lib/postgresql/*/bin")  # Debian keeps them off PATH, one folder per major
    debian.sort(key=lambda p: int(v) if (v := Path(p).parent.name).isdigit() else 0, reverse=True)
    on_path = shutil.which("initdb")
    for c in [os.environ.get("IPA_PG_BINDIR", ""), *debian, str(Path(on_path).parent) if on_path else ""]:
        if c and (Path(c) / "initdb").is_file() and (Path(c) / "pg_ctl").is_file():
            return Path(c)
    return None


@dataclass
class Postgres:
    """A running cluster. `uri` carries no credentials: libpq reads them from `env` (PGUSER,
    PGPASSWORD), as the k8s Deployment passes them from its Secret."""

    uri: str  # postgresql+psycopg2://127.0.0.1:PORT/mlflow
    env: dict[str, str]
    port: int
    root: Path  # data/, postgres.log, the Unix socket
    bindir: Path
    run_as: list[str]  # ["runuser", "-u", "postgres", "--"] when we are root, else []

    @property
    def log(self) -> str:
        p = self.root / "postgres.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def stop(self) -> None:
        if (self.root / "data" / "postmaster.pid").exists():
            subprocess.run(
                [*self.run_as, str(self.bindir / "pg_ctl"), "-D", str(self.root / "data"), "-m", "fast", "-w", "-t", "60", "stop"],
                capture_output=True, timeout=90,
            )  # fmt: skip
        shutil.rmtree(self.root, ignore_errors=True)


def start_postgres(bindir: Path | None = None, timeout_s: float = START_TIMEOUT_S) -> Postgres:
    """A fresh cluster on 127.0.0.1:<free port> with database and user `mlflow` (password auth).

    `initdb` refuses to run as root, so as root it runs as the `postgres` user (`runuser`). The
    cluster is a test fixture: fsync off, no Unix socket outside its own folder.
    """
    bindir = bindir or postgres_bindir()
    if bindir is None:
        raise RuntimeError(POSTGRES_MISSING)
    run_as: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="ipa-pg-", dir=_tmp_dir()))
    data, pwfile = root / "data", root / "pwfile"
    password = secrets.token_hex(12)
    pwfile.write_text(password + "\n")
    if os.geteuid() == 0:
        import pwd

        try:
            pg = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(root, ignore_errors=True)
            raise RuntimeError("running as root and there is no `postgres` user to run initdb as (install `postgresql`)") from None
        run_as = [shutil.which("runuser") or "runuser", "-u", "postgres", "--"]
        for path in (root, pwfile):  # the cluster's folder (data/, log, socket) belongs to postgres
            os.chown(path, pg.pw_uid, pg.pw_gid)
    server = Postgres("", {"PGUSER": "mlflow", "PGPASSWORD": password}, free_port(), root, bindir, run_as)

    def run(cmd: list[str], what: str, **kw) -> None:
        res = subprocess.run(cmd, capture_output=True, text=True, **kw)
        if res.returncode != 0:
            log = server.log
            server.stop()
            raise RuntimeError(f"{what} failed ({res.returncode}): {' '.join(cmd)}\n{res.stdout}{res.stderr}\n{log[-3000:]}")

    run([*run_as, str(bindir / "initdb"), "-D", str(data), "-U", "mlflow", f"--pwfile={pwfile}",
         "--auth-host=scram-sha-256", "--auth-local=peer", "-E", "UTF8", "--locale=C.UTF-8", "--no-sync"],
        "initdb", timeout=timeout_s)  # fmt: skip
    pwfile.unlink()
    opts = (
        f"-c listen_addresses=127.0.0.1 -p {server.port} -c unix_socket_directories={root} "
        "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=50"
    )
    run([*run_as, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "postgres.log"), "-o", opts,
         "-w", "-t", str(int(timeout_s)), "start"], "pg_ctl start", timeout=timeout_s + 30)  # fmt: skip
    run([str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(server.port), "mlflow"],
        "createdb", env=dict(os.environ, **server.env), timeout=60)  # fmt: skip
    # the driver named: SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3, not psycopg2
    server.uri = f"postgresql+psycopg2://127.0.0.1:{server.port}/mlflow"
    return server


_SERVER: MlflowServer | None = None


def shared_server() -> MlflowServer:
    """One server per process, whichever module asks first."""
    global _SERVER
    if _SERVER is None or _SERVER.proc.poll() is not None:
        _SERVER = start_server()
        atexit.register(_SERVER.stop)
    return _SERVER


@pytest.fixture(scope="session")
def mlflow_server():
    server = shared_server()
    yield server
    server.stop()
