"""Serving: the registered champion loads and serves from outside this checkout. `ipa_lib`
travels as the model's code (`code_paths`); the processes here run from a temp folder with
this checkout's editable install hidden, so only the model's copy of `ipa_lib` can load.
`mlflow models serve --env-manager local` answers /invocations with the same clip as the
in-process pyfunc, against a real `mlflow server` on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, tiny_params
from test_registry import M, _write_eval

from ipa_lib.core.config import TrackingConfig
from ipa_lib.mlops.registry import input_example, promote, register_model

pytestmark = pytest.mark.slow  # register, a loader process, a serving process: ~2 min on 2 busy cores

MODEL = "ipa-animator"
PREDICT_PARAMS = {"seed": 0, "num_inference_steps": 2}
SERVE_TIMEOUT_S = 300.0  # bound on the wait for /ping

# sitecustomize for the outside processes: runs after site-packages' .pth files, so it drops
# the editable finder they install and any sys.path entry naming this checkout
HIDE_CHECKOUT = f"""import sys
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
sys.path[:] = [p for p in sys.path if p.rstrip("/") != {str(REPO)!r}]
"""

LOADER = """import json, sys
import numpy as np
import mlflow
local = mlflow.artifacts.download_artifacts(artifact_uri=sys.argv[1], dst_path=sys.argv[2])
model = mlflow.pyfunc.load_model(local)
import ipa_lib
ex = dict(np.load(sys.argv[3]))
clip = model.predict(ex, params=json.loads(sys.argv[4]))
np.save(sys.argv[5], clip)
print(json.dumps({"ipa_lib": ipa_lib.__file__, "model_dir": local, "sys_path": sys.path}))
"""


@pytest.fixture(scope="module")
def champion(mlflow_server, tiny_base, tmp_path_factory):
    """`ipa-animator@champion` on the test server: the tiny toy base with a LoRA adapter that
    changes its output; returns (params, the input example, the in-process clip)."""
    import mlflow
    import torch

    from ipa_lib.models.lora import lora_parameters
    from ipa_lib.models.toy import ToyBackend

    work = tmp_path_factory.mktemp("serve")
    params = tiny_params()
    params.tracking = TrackingConfig(uri=mlflow_server.uri, experiment=f"serve-{uuid.uuid4().hex[:8]}",
                                     registered_model=MODEL, max_retries=1)
    params.backend.base_model, params.backend.device = str(tiny_base), "cpu"
    params.promote.primary_metric = "hand_pass_rate"  # the numbers this fixture registers (M(0.7) vs M(0.5))
    backend = ToyBackend.from_pretrained(tiny_base)
    backend.add_lora(params.train.lora_rank, params.train.lora_alpha, params.train.lora_targets)
    torch.manual_seed(1)
    for p in lora_parameters(backend.transformer):
        p.data.normal_(0.0, 0.05)
    backend.save_adapter(work / "adapter")

    old = os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        version = register_model(params, work / "adapter", tiny_base, _write_eval(work / "eval.json", M(0.7), M(0.5)),
                                 root=work)
        assert promote(params, version, root=work).champion == version
        model = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    finally:
        if old is not None:
            os.environ["MLFLOW_TRACKING_URI"] = old
    ex = input_example(params)
    clip = model.predict(ex, params=PREDICT_PARAMS)
    assert clip.shape == ex["pose_video"].shape and clip.dtype == np.uint8 and clip.any()
    return params, ex, clip


@pytest.fixture()
def outside(mlflow_server, tmp_path):
    """(env, cwd) for a process outside this checkout: this venv's python and tools, the
    tracking URI of the test server, a temp cwd, and the checkout hidden (see HIDE_CHECKOUT)."""
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(HIDE_CHECKOUT)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "MLFLOW_"))}
    env |= {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PYTHONPATH": str(hide),
            "MLFLOW_TRACKING_URI": mlflow_server.uri, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true",
            "OMP_NUM_THREADS": "1"}
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    probe = subprocess.run([sys.executable, "-c", "import importlib.util; print(importlib.util.find_spec('ipa_lib'))"],
                           cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert probe.stdout.strip() == "None", f"ipa_lib is still importable outside the model:\n{probe.stdout}{probe.stderr}"
    return env, cwd


def test_champion_loads_outside_the_checkout(champion, outside, tmp_path):
    """A fresh process that cannot import this checkout loads the champion: ipa_lib comes from
    the model's code folder, and the clip equals the in-process one."""
    _, ex, want = champion
    env, cwd = outside
    np.savez(tmp_path / "example.npz", **ex)
    r = subprocess.run(
        [sys.executable, "-c", LOADER, f"models:/{MODEL}@champion", str(tmp_path / "model"), str(tmp_path / "example.npz"),
         json.dumps(PREDICT_PARAMS), str(tmp_path / "clip.npy")],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-4000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    code = Path(out["model_dir"]) / "code"
    assert Path(out["ipa_lib"]).is_relative_to(code), out["ipa_lib"]
    assert (code / "ipa_lib" / "mlops" / "registry.py").is_file()
    # the requirements name no package missing from an index (ipa-align), and this venv has them
    reqs = dict(line.split("==") for line in (Path(out["model_dir"]) / "requirements.txt").read_text().split())
    assert "ipa-align" not in reqs and {"mlflow", "torch", "diffusers", "peft"} <= set(reqs)
    assert all(version(dist).split("+")[0] == v for dist, v in reqs.items()), reqs
    assert not any(p.rstrip("/") == str(REPO) for p in out["sys_path"])
    assert np.array_equal(np.load(tmp_path / "clip.npy"), want)


def _post(url: str, body: dict, timeout: float = 300) -> tuple[int, dict]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


@pytest.fixture()
def served(outside, free_port, tmp_path):
    """`mlflow models serve -m models:/ipa-animator@champion --env-manager local` on 127.0.0.1,
    run outside the checkout; yields its base URL once /ping answers; stopped at teardown."""
    env, cwd = outside
    log = tmp_path / "serve.log"
    cmd = [str(Path(sys.executable).with_name("mlflow")), "models", "serve", "-m", f"models:/{MODEL}@champion",
           "--env-manager", "local", "--host", "127.0.0.1", "--port", str(free_port)]
    with open(log, "wb") as logf:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{free_port}"
    try:
        deadline = time.monotonic() + SERVE_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow models serve exited with {proc.returncode}:\n{log.read_text(errors='replace')[-4000:]}")
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=5) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"no /ping answer after {SERVE_TIMEOUT_S:.0f} s:\n{log.read_text(errors='replace')[-4000:]}")
            time.sleep(1.0)
        yield url
    finally:
        if proc.poll() is None:  # mlflow execs uvicorn in its own session: stop the whole group
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


def test_mlflow_models_serve_returns_the_clip(champion, served):
    """POST the registry's input example to /invocations in MLflow's tensor JSON format."""
    _, ex, want = champion
    body = {"inputs": {k: v.tolist() for k, v in ex.items()}, "params": PREDICT_PARAMS}
    status, answer = _post(f"{served}/invocations", body)
    assert status == 200, answer
    clip = np.asarray(answer["predictions"])
    assert clip.shape == ex["pose_video"].shape
    assert np.array_equal(clip.astype(np.uint8), want) and np.array_equal(clip, want)

    # a bad request is refused with MLflow's error, naming the missing input
    status, answer = _post(f"{served}/invocations", {"inputs": {"reference": ex["reference"].tolist()}})
    assert status == 400 and "pose_video" in answer["message"]
