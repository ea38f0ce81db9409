"""A real `mlflow server` for tests: 127.0.0.1, a free port, SQLite backend and artifact root
in a temp folder, one worker. Started once per test session and shared by every module that
imports the fixture (the process is cached here), stopped at session end.

    from mlflow_server import mlflow_server  # noqa: F401  (pytest fixture)

    def test_x(mlflow_server):
        uri = mlflow_server.uri
"""

from __future__ import annotations

import atexit
import os
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


def start_server(root: Path | None = None, timeout_s: float = START_TIMEOUT_S) -> MlflowServer:
    # tmpfs when there is one: SQLite's fsyncs dominate request latency on a busy disk
    shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    root = Path(root or tempfile.mkdtemp(prefix="ipa-mlflow-", dir=shm))
    port = free_port()
    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true")
    env.pop("MLFLOW_TRACKING_URI", None)
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    cmd = [
        str(mlflow_bin) if mlflow_bin.exists() else "mlflow",
        "server",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--workers", "1",
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
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
