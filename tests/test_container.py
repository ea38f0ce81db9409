"""Containers for real: the runtime image of `make image` runs the KFP DAG and the gate.

Marker `container`: skipped (with the reason) unless podman is installed and the image is
in its store. The module starts its own `podman system service` (scripts/podman.sh: the
store `make image` builds into, runc, no rlimits; docs/containers.md) on a socket in a temp
folder and stops it afterwards. The DAG runs
through `ipa pipeline run-local --runner docker` on the small params of
test_pipeline_local.py; its metrics must equal the subprocess run's, and every file the
tasks wrote must belong to the image's uid 10001.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hands_fixtures import PHOTOS, real_dir
from test_pipeline_local import BASE, BETA, _small_params

from ipa_lib.orchestration.kfp import LOCAL_IMAGE, RUNTIME_UID

ROOT = Path(__file__).resolve().parents[1]
IMAGE = os.environ.get("IPA_TEST_IMAGE", LOCAL_IMAGE)
needs_base = pytest.mark.skipif(not (BASE / "toy_backend.json").is_file(), reason="models/base missing (committed to git: git checkout -- models/base)")


@pytest.fixture(scope="module")
def podman(tmp_path_factory):
    """(podman command, env) once podman and the image are there; skips otherwise."""
    if shutil.which("podman") is None:
        pytest.skip("podman not installed (apt-get install -y podman runc fuse-overlayfs; docs/containers.md)")
    env = {**os.environ, "CONTAINERS_CONF": str(tmp_path_factory.mktemp("podman") / "containers.conf")}
    cmd = ["bash", str(ROOT / "scripts" / "podman.sh")]
    found = subprocess.run([*cmd, "image", "exists", IMAGE], env=env, check=False, capture_output=True, text=True)
    if found.returncode != 0:
        pytest.skip(f"image {IMAGE} not built (make image; docs/containers.md) {found.stderr.strip()}")
    built = subprocess.run([*cmd, "image", "inspect", "--format", '{{index .Labels "ipa.source-digest"}}', IMAGE],
                           env=env, check=True, capture_output=True, text=True).stdout.strip()
    here = subprocess.run(["bash", "-c", f"source {ROOT / 'scripts' / 'containers.sh'} && source_digest"], cwd=ROOT,
                          env=env, check=True, capture_output=True, text=True).stdout.strip()
    if built != here:
        pytest.skip(f"image {IMAGE} was built from other sources (label {built or 'none'}, checkout {here}): make image")
    return cmd, env


@pytest.fixture(scope="module")
def docker_host(podman, tmp_path_factory):
    """A Docker API (podman system service) on a socket of this module; stopped afterwards."""
    import docker

    cmd, env = podman
    sock = tmp_path_factory.mktemp("sock") / "podman.sock"
    url = f"unix://{sock}"
    with open(sock.parent / "service.log", "w") as log:
        service = subprocess.Popen([*cmd, "system", "service", "--time", "0", url], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(100):  # readiness: the socket answers /_ping
            if service.poll() is not None:
                raise RuntimeError(f"podman system service exited {service.returncode}: {(sock.parent / 'service.log').read_text()}")
            try:
                docker.DockerClient(base_url=url).ping()
                break
            except docker.errors.DockerException:
                time.sleep(0.2)
        else:
            raise RuntimeError(f"podman system service at {url} never answered")
        yield url
    finally:
        service.terminate()
        try:
            service.wait(timeout=30)
        except subprocess.TimeoutExpired:
            service.kill()
            service.wait()


def _run_local(params: Path, workdir: Path, *extra: str, env: dict, sets: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    set_args = [a for s in sets for a in ("--set", s)]
    return subprocess.run(
        [sys.executable, "-m", "ipa_lib.cli", "pipeline", "--params", str(params), *set_args, "run-local",
         "--workdir", str(workdir), *extra],
        cwd=workdir.parent, env=env, check=False, capture_output=True, text=True, timeout=1200,
    )


def _env(**extra: str) -> dict:
    import torch

    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "DOCKER_HOST")}
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())  # the same arithmetic in both runs
    return {**env, **extra}


# ---- the DAG in containers ---------------------------------------------------------------------


@pytest.mark.container
@pytest.mark.slow
@needs_base
def test_dag_in_containers_matches_the_subprocess_run(tmp_path, docker_host):
    params = _small_params(tmp_path)
    (tmp_path / "sub").mkdir()
    (tmp_path / "ctr").mkdir()
    sub = _run_local(params, tmp_path / "sub" / "kfp", env=_env())
    assert sub.returncode == 0, sub.stdout[-3000:] + sub.stderr[-3000:]
    started = time.monotonic()
    ctr = _run_local(params, tmp_path / "ctr" / "kfp", "--runner", "docker", "--image", IMAGE, env=_env(DOCKER_HOST=docker_host))
    print(f"run-local --runner docker took {time.monotonic() - started:.0f} s")
    assert ctr.returncode == 0, ctr.stdout[-3000:] + ctr.stderr[-3000:]

    want = json.loads((tmp_path / "sub" / "kfp" / "summary.json").read_text())
    got = json.loads((tmp_path / "ctr" / "kfp" / "summary.json").read_text())
    assert got["runner"] == "docker" and got["image"] == IMAGE
    assert (got["best_beta"], got["model_version"]) == (want["best_beta"], want["model_version"]) == (BETA, 1)
    for model in ("base", "ipa"):
        for k, v in want["eval"][model].items():
            assert got["eval"][model][k] == pytest.approx(v, abs=1e-6, rel=0), f"{model}.{k}"

    # every task ran as the image's user: all it wrote belongs to uid 10001
    root = Path(got["pipeline_root"])
    run_root = Path(got["best_evaluation"]).parents[1]
    tasks = {p.name for p in run_root.iterdir()}
    assert {"sample", "gate", "select-best", "register", "decide-promotion", "promote"} <= tasks
    written = [p for p in run_root.rglob("*")]
    assert len(written) > 20
    assert {p.stat().st_uid for p in written} == {RUNTIME_UID}, [str(p) for p in written if p.stat().st_uid != RUNTIME_UID][:5]
    assert "Found image" in ctr.stdout and "Pulling image" not in ctr.stdout

    # tracking: the SQLite store under the mounted pipeline root, written by the containers
    store = root / ".ipa" / "mlflow.db"
    assert got["tracking_uri"] == f"sqlite:///{store}" and store.stat().st_uid == RUNTIME_UID
    from mlflow.tracking import MlflowClient

    registration = json.loads((run_root / "register" / "registration").read_text())
    client = MlflowClient(got["tracking_uri"], registry_uri=got["tracking_uri"])
    for stage, run_id in registration["lineage"]["stages"].items():
        assert client.get_run(run_id).info.status == "FINISHED", stage
    from ipa_lib.core.config import load_params

    version = client.get_model_version(load_params(params).tracking.registered_model, "1")
    assert version.status == "READY"


@pytest.mark.container
@pytest.mark.slow
@needs_base
def test_failed_task_in_a_container_puts_its_log_in_the_error(tmp_path, docker_host):
    """The gate's data checks fail (nothing reaches threshold 1.0): exit 1, the gate's log in the error."""
    params = _small_params(tmp_path)
    proc = _run_local(params, tmp_path / "kfp", "--runner", "docker", "--image", IMAGE,
                      env=_env(DOCKER_HOST=docker_host), sets=("gate.threshold=1.0", "sample.num_clips=4"))
    assert proc.returncode == 1, proc.stderr[-2000:]
    err = proc.stderr[proc.stderr.index("error: local run failed"):]
    assert "Inner task failed: 'gate'" in err, err[-3000:]
    assert "the failed task's log in its container ends with:" in err
    assert "DataCheckError" in err  # the task's own log, in the error itself
    assert not (tmp_path / "kfp" / "summary.json").exists()


@pytest.mark.container
@needs_base
def test_missing_image_says_to_build_it(tmp_path, docker_host):
    proc = _run_local(_small_params(tmp_path), tmp_path / "kfp", "--runner", "docker", "--image", "localhost/ipa-no-such-image:0.0.1",
                      env=_env(DOCKER_HOST=docker_host))
    assert proc.returncode == 1
    assert "image localhost/ipa-no-such-image:0.0.1 is not in the engine" in proc.stderr and "make image" in proc.stderr


@needs_base
def test_missing_engine_names_what_to_install(tmp_path):
    """No container engine at DOCKER_HOST (runs everywhere: no podman needed)."""
    proc = _run_local(_small_params(tmp_path), tmp_path / "kfp", "--runner", "docker",
                      env=_env(DOCKER_HOST=f"unix://{tmp_path / 'nothing.sock'}"))
    assert proc.returncode == 1
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: no Docker API at unix://{tmp_path / 'nothing.sock'}")
    assert "apt-get install -y podman runc" in line and "scripts/podman.sh system service" in line


# ---- the gate in the image ---------------------------------------------------------------------


@pytest.mark.container
def test_the_image_detects_hands_on_real_photos(podman):
    """`ipa hands detect` in the image (uid 10001, no network) finds what the host finds."""
    from ipa_lib.data.hands.detect import detect

    real = real_dir()
    photos = sorted(PHOTOS.values())
    cmd, env = podman
    proc = subprocess.run([*cmd, "run", "--rm", "--network", "none", "-v", f"{real}:/data:ro", IMAGE,
                           "hands", "detect", "--json", *(f"/data/{p}" for p in photos)],
                          env=env, check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout)
    want = detect([str(real / p) for p in photos])
    assert got["summary"] == want["summary"] == {"given": len(photos), "processed": len(photos), "failed": 0}
    for g, w in zip(got["inputs"], want["inputs"]):
        hands = g["frames"][0]["hands"]
        assert len(hands) == len(w["frames"][0]["hands"]) >= 1, g["path"]
        for gh, wh in zip(hands, w["frames"][0]["hands"]):
            assert gh["handedness"] == wh["handedness"]
            assert gh["box"] == pytest.approx(wh["box"], abs=2.0)  # pixels
