"""DVC remotes (docs/dvc.md): a round's outputs pushed to a local remote come back byte for byte
in a fresh clone after `dvc pull`; `dvc repro` shows the stages' progress bars on stderr."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import sh

pytestmark = pytest.mark.slow

ROUND_OUTS = ("data/samples", "data/gated", "models/adapter")


def _files(folder: Path) -> dict[str, bytes]:
    """Every file under `folder`, by relative path, with its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_round_outputs_round_trip_through_a_local_remote(scratch_dvc_repo, tmp_path):
    """sample -> gate -> train in a scratch repo, pushed to a local remote; a fresh clone pulls the
    same bytes. Evaluate and later stages are left out: they add time and no folder to check."""
    repo, env = scratch_dvc_repo()
    first = sh(["dvc", "repro", "train"], repo, env)
    assert "Running stage 'train'" in first.stdout
    # the stages' bars reach stderr (dvc.yaml passes no --quiet), in ASCII since stderr is a pipe here
    assert "train[ipa]: 100%|##########| 6/6" in first.stderr, first.stderr[-2000:]
    assert "train[ipa]" not in first.stdout

    remote = tmp_path / "remote"
    sh(["dvc", "remote", "add", "-d", "local", str(remote)], repo, env)
    assert json.loads(sh(["dvc", "status", "-c", "--json"], repo, env).stdout)  # not pushed yet: "new"
    sh(["dvc", "push"], repo, env)
    sh(["git", "add", "-A"], repo, env)
    sh(["git", "commit", "-qm", "round 1"], repo, env)
    assert json.loads(sh(["dvc", "status", "-c", "--json"], repo, env).stdout) == {}

    clone = tmp_path / "clone"
    sh(["git", "clone", "-q", str(repo), str(clone)], tmp_path, env)
    assert not any((clone / out).exists() for out in ROUND_OUTS)  # cached outputs are not in git
    assert _files(clone / "models" / "base") == _files(repo / "models" / "base")  # cache: false, in git
    sh(["dvc", "pull", "--with-deps", "train"], clone, env)  # a plain `dvc pull` wants every stage's outs
    for out in ROUND_OUTS:
        pulled, original = _files(clone / out), _files(repo / out)
        assert pulled and pulled.keys() == original.keys(), out
        assert pulled == original, out
    assert json.loads(sh(["dvc", "status", "-c", "--json"], clone, env).stdout) == {}
    assert json.loads(sh(["dvc", "status", "--json", "train"], clone, env).stdout) == {}
