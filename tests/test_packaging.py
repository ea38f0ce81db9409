"""Packaging: the optional extras, the hash-pinned locks (scripts/lock.sh), `make setup` using
them, and the error a missing extra gives. Reads files only: no network, no install."""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from ipa_lib.core.errors import EXIT_BAD_INPUT, InputError, exit_code
from ipa_lib.core.extras import missing, require

ROOT = Path(__file__).resolve().parents[1]
RUNTIME_LOCK = ROOT / "requirements.lock"
TEST_LOCK = ROOT / "requirements-test.lock"
MLFLOW_LOCK = ROOT / "requirements-mlflow.lock"  # the MLflow server image (k8s/mlflow/Dockerfile)
OPENCV = {"opencv-python", "opencv-python-headless", "opencv-contrib-python", "opencv-contrib-python-headless"}


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def lock_entries(path: Path) -> dict[str, tuple[str, list[str]]]:
    """{canonical name: (pinned version, [sha256 hashes])} of a requirements lock; `-r` lines
    are followed. Fails on an entry that is not `name==version`."""
    entries: dict[str, tuple[str, list[str]]] = {}
    text = re.sub(r"\\\n", " ", path.read_text())  # join continuation lines
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("-r "):
            entries.update(lock_entries(path.parent / line[3:].strip()))
            continue
        spec, *opts = line.split(" --hash=")
        m = re.fullmatch(r"([A-Za-z0-9._-]+)==([^\s;]+)", spec.strip())
        assert m, f"{path.name}: entry {spec!r} is not pinned with =="
        entries[canonicalize_name(m.group(1))] = (m.group(2), [o.strip() for o in opts])
    return entries


def test_every_locked_requirement_is_pinned_with_a_sha256_hash():
    for path in (RUNTIME_LOCK, TEST_LOCK, MLFLOW_LOCK):
        entries = lock_entries(path)
        assert len(entries) > 20, path
        unhashed = [name for name, (_, hashes) in entries.items()
                    if not hashes or not all(re.fullmatch(r"sha256:[0-9a-f]{64}", h) for h in hashes)]
        assert not unhashed, f"{path.name}: no sha256 hash for {unhashed}"


def test_the_test_lock_adds_to_the_runtime_lock_without_repinning_it():
    runtime = lock_entries(RUNTIME_LOCK)
    own = re.sub(r"\\\n", " ", TEST_LOCK.read_text())
    assert "-r requirements.lock" in own.splitlines()
    for line in own.splitlines():
        m = re.match(r"([A-Za-z0-9._-]+)==", line)
        if m:
            assert canonicalize_name(m.group(1)) not in runtime, f"{m.group(1)} is pinned in both locks"


def test_the_mlflow_server_lock_has_the_runtime_pins_and_no_torch():
    runtime, server = lock_entries(RUNTIME_LOCK), lock_entries(MLFLOW_LOCK)
    assert {"mlflow", "psycopg2-binary"} <= set(server) and "torch" not in server
    assert {n: v for n, (v, _) in server.items() if runtime[n][0] != v} == {}  # KeyError: not in the runtime lock


def test_one_opencv_the_one_mediapipe_requires():
    for path in (RUNTIME_LOCK, TEST_LOCK):
        found = OPENCV & set(lock_entries(path))
        assert found == {"opencv-contrib-python"}, f"{path.name}: {sorted(found)}"


def test_torch_is_left_to_the_variant_install_and_its_pin_matches_the_makefile():
    pin = next(Requirement(d) for d in project()["dependencies"] if d.startswith("torch"))
    for path in (RUNTIME_LOCK, TEST_LOCK, MLFLOW_LOCK):
        assert "torch" not in lock_entries(path), f"{path.name} pins torch (its wheel differs per variant)"
    makefile = (ROOT / "Makefile").read_text()
    assert f"--no-deps torch{pin.specifier}" in makefile


def _assert_pinned(reqs: list[str], entries: dict, where: str):
    for raw in reqs:
        req = Requirement(raw)
        name = canonicalize_name(req.name)
        if name in {"ipa-align", "torch"}:
            continue
        assert name in entries, f"{where}: {req.name} is not in the lock (run scripts/lock.sh)"
        assert req.specifier.contains(entries[name][0], prereleases=True), \
            f"{where}: {raw} but the lock pins {entries[name][0]} (run scripts/lock.sh)"


def test_every_declared_dependency_is_pinned_in_its_lock():
    runtime, everything = lock_entries(RUNTIME_LOCK), lock_entries(TEST_LOCK)
    extras = project()["optional-dependencies"]
    _assert_pinned(project()["dependencies"], runtime, "[project] dependencies")
    _assert_pinned(extras["cluster"] + extras["wan"], runtime, "[cluster]/[wan]")
    _assert_pinned(extras["test"], everything, "[test]")


def test_the_extras_hold_each_roles_packages():
    extras = {k: {canonicalize_name(Requirement(r).name): Requirement(r) for r in v}
              for k, v in project()["optional-dependencies"].items()}
    core = {canonicalize_name(Requirement(r).name) for r in project()["dependencies"]}
    assert {"kfp", "kfp-kubernetes", "kubernetes"} <= set(extras["cluster"])
    assert {"transformers", "ftfy"} <= set(extras["wan"])
    assert "pytest" in extras["test"] and extras["test"]["ipa-align"].extras == {"cluster", "wan"}
    assert not core & (set(extras["cluster"]) | set(extras["wan"])), "an extra's package is also a core dependency"
    assert "diffusers" in core  # the toy backend imports it


def test_make_setup_installs_from_the_locks():
    recipe = (ROOT / "Makefile").read_text().split("$(VENV)/.installed:", 1)[1].split("\n\n", 1)[0]
    assert "requirements-test.lock" in recipe.splitlines()[0]  # a lock edit re-runs setup
    assert "--require-hashes -r requirements-test.lock" in recipe
    assert "--no-deps -e ." in recipe
    assert "-c requirements.lock" not in recipe


def test_require_names_the_extra_to_install():
    require("json", "ipa_lib.core", extra="cluster")  # present: nothing
    assert missing("json", "ipa_no_such_module", "ipa_no_such_pkg.sub") == ["ipa_no_such_module", "ipa_no_such_pkg.sub"]
    with pytest.raises(InputError, match=r"^`x` needs ipa_no_such_module, which is not installed: install ipa-align\[cluster\]") as err:
        require("json", "ipa_no_such_module", extra="cluster", purpose="`x`")
    assert exit_code(err.value) == EXIT_BAD_INPUT


def test_require_reports_the_distribution_name():
    from ipa_lib.core import extras

    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "kfp.kubernetes", None)  # a blocked import reads as not installed
        with pytest.raises(InputError, match=r"needs kfp-kubernetes, which is not installed: install ipa-align\[cluster\]"):
            extras.require("kfp", "kfp.kubernetes", extra="cluster")


def test_ipa_pipeline_without_kfp_names_the_cluster_extra(monkeypatch, tmp_path, capsys):
    from ipa_lib.cli import main

    monkeypatch.chdir(ROOT)  # its params.yaml
    monkeypatch.setitem(sys.modules, "kfp", None)
    code = main(["pipeline", "compile", "--out", str(tmp_path / "p.yaml")])
    assert code == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    # kfp.kubernetes counts as missing too unless another test imported it already
    assert re.search(r"`ipa pipeline compile` needs kfp(, kfp-kubernetes)?, which (is|are) not installed: install ipa-align\[cluster\]", err), err
    assert not (tmp_path / "p.yaml").exists()


def test_wan_backend_without_ftfy_names_the_wan_extra(monkeypatch):
    from ipa_lib.models import wan_tiny

    monkeypatch.setitem(sys.modules, "ftfy", None)
    with pytest.raises(InputError, match=r"needs ftfy, which is not installed: install ipa-align\[wan\]"):
        wan_tiny.tiny_components()
