"""One exit-code policy for every `ipa` command (ipa_lib.core.errors): bad input or config
exits 2 with one `error:` line on stderr naming the problem, a runtime failure exits 1, and
the front end stays light (no torch/mlflow/kfp import to answer --help)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ipa_lib.cli import main as ipa
from ipa_lib.core.config import ConfigError
from ipa_lib.core.errors import EXIT_BAD_INPUT, EXIT_FAILURE, InputError, IpaError, RuntimeFailure, exit_code
from ipa_lib.data.checks import DataCheckError
from ipa_lib.data.video import VideoError
from ipa_lib.mlops.tracking import TrackingError
from ipa_lib.stages.train import TrainingDiverged

STAGES = ("pretrain", "sample", "gate", "train", "evaluate", "register", "promote")


def test_exit_code_maps_by_class():
    assert exit_code(ConfigError("x")) == exit_code(VideoError("a.mp4", "x")) == EXIT_BAD_INPUT
    assert issubclass(DataCheckError, InputError)
    assert exit_code(TrainingDiverged("x")) == exit_code(TrackingError("x")) == EXIT_FAILURE
    assert exit_code(FileNotFoundError("x")) == exit_code(ValueError("x")) == EXIT_BAD_INPUT
    assert exit_code(KeyboardInterrupt()) == 130
    assert exit_code(ZeroDivisionError()) is None  # a bug: the CLI re-raises it with its traceback
    assert issubclass(InputError, IpaError) and issubclass(RuntimeFailure, IpaError)
    assert issubclass(InputError, ValueError) and issubclass(RuntimeFailure, RuntimeError)


@pytest.mark.parametrize("argv", [[s] for s in STAGES] + [["cluster", "preflight"], ["pipeline", "compile"]])
def test_missing_params_file_exits_2_everywhere(argv, tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    where = 1 if argv[0] == "pipeline" else len(argv)  # `ipa pipeline --params F compile`
    args = argv[:where] + ["--params", str(missing)] + argv[where:]
    assert ipa(args) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(missing) in err


@pytest.mark.parametrize("stage", STAGES)
def test_unknown_param_key_exits_2_and_names_it(stage, capsys):
    assert ipa([stage, "--set", "train.no_such_key=1"]) == EXIT_BAD_INPUT
    assert "train.no_such_key" in capsys.readouterr().err


def test_missing_input_folder_exits_2(tmp_path, capsys):
    assert ipa(["gate", "--samples", str(tmp_path / "absent"), "--out", str(tmp_path / "g"), "--set", "tracking.enabled=false"]) == 2
    assert "absent" in capsys.readouterr().err
    assert ipa(["show", "--metrics", str(tmp_path / "eval.json")]) == 2
    assert "eval.json" in capsys.readouterr().err


def test_runtime_failure_exits_1(tmp_path, capsys):
    """An unreachable tracking server is not the user's input being wrong: exit 1."""
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["promote", "--candidate", "1", "--set", f"tracking.uri=http://127.0.0.1:{port}", "--set", "tracking.max_retries=0",
            "--set", f"promote.out={tmp_path / 'p.json'}"]
    assert ipa(args) == EXIT_FAILURE
    assert "unreachable" in capsys.readouterr().err


def test_front_end_stays_light():
    code = ("import sys; import ipa_lib.cli as c; c.build_parser(); "
            "print(sorted(m for m in ('torch', 'mlflow', 'kfp', 'diffusers', 'mediapipe', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
