"""The `ipa` flags are consistent: every flag explains itself, `--params/--set` work after the
subcommand wherever params are read, flags that would do nothing are refused, and
`--log-level`/`-v` set up one stderr handler."""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys

import pytest
import yaml

from conftest import REPO
from hands_fixtures import PHOTOS, hand_model, real_dir  # noqa: F401

from ipa_lib.cli import build_parser, main as ipa
from ipa_lib.cli.report import add_arguments as report_arguments


def _parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ("ipa",)):
    """(command path, parser) for `parser` and every subcommand under it."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, (*path, name))


def _all_parsers():
    yield from _parsers(build_parser())
    yield ("ipa", "report"), report_arguments(argparse.ArgumentParser(prog="ipa report"))


def test_every_flag_and_subcommand_has_help():
    missing = []
    for path, parser in _all_parsers():
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            if isinstance(action, argparse._SubParsersAction):
                missing += [f"{' '.join(path)} {c.dest}" for c in action._choices_actions if not c.help]
            elif not action.help:
                missing.append(f"{' '.join(path)} {'/'.join(action.option_strings) or action.dest}")
    assert not missing, f"flags without help text: {missing}"


def test_params_and_set_come_together_after_every_subcommand():
    """Wherever `--params` is taken, `--set` is too, on the (leaf) command itself."""
    readers = []
    for path, parser in _all_parsers():
        flags = {s for a in parser._actions for s in a.option_strings}
        assert ("--params" in flags) == ("--set" in flags), path
        if "--params" in flags and not any(isinstance(a, argparse._SubParsersAction) for a in parser._actions):
            readers.append(path[1:])
    assert {("pretrain",), ("promote",), ("cluster", "preflight"), ("features",), ("report",),
            ("pipeline", "compile"), ("pipeline", "submit"), ("pipeline", "run-local")} <= set(readers)


@pytest.mark.parametrize("argv", [["smoke", "--set", "train.steps=1"], ["smoke", "--params", "p.yaml"], ["smoke", "--quiet"],
                                  ["register", "--quiet"], ["promote", "--quiet"]])
def test_flags_that_would_do_nothing_are_refused(argv, capsys):
    with pytest.raises(SystemExit) as err:
        ipa(argv)
    assert err.value.code == 2
    assert f"unrecognized arguments: {argv[1]}" in capsys.readouterr().err


def _params_json(package) -> dict:
    spec = next(yaml.safe_load_all(package.read_text()))
    return json.loads(spec["root"]["inputDefinitions"]["parameters"]["params_json"]["defaultValue"])


def test_pipeline_set_before_and_after_the_subcommand_merge(tmp_path):
    out = tmp_path / "ipa_round.yaml"
    params = str(REPO / "params.yaml")
    assert ipa(["pipeline", "--set", "train.steps=7", "--set", "train.lr=0.01", "compile", "--params", params,
                "--set", "train.beta=123", "--set", "train.lr=0.02", "--out", str(out)]) == 0
    train = _params_json(out)["train"]
    assert (train["steps"], train["beta"], train["lr"]) == (7, 123.0, 0.02)  # after the subcommand wins


def test_pipeline_params_after_the_subcommand_are_read(tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    assert ipa(["pipeline", "compile", "--params", str(missing), "--out", str(tmp_path / "x.yaml")]) == 2
    assert str(missing) in capsys.readouterr().err
    assert ipa(["pipeline", "compile", "--set", "train.no_such_key=1", "--out", str(tmp_path / "x.yaml")]) == 2
    assert "train.no_such_key" in capsys.readouterr().err


def test_cluster_preflight_takes_set_after_the_subcommand(capsys):
    assert ipa(["cluster", "preflight", "--set", "pipeline.no_such_key=1"]) == 2
    assert "pipeline.no_such_key" in capsys.readouterr().err


def test_log_level_sets_up_one_stderr_handler(tmp_path, capsys):
    from rich.logging import RichHandler

    log = logging.getLogger("ipa_lib.test_cli_flags")
    missing = str(tmp_path / "eval.json")
    try:
        assert ipa(["-v", "show", "--metrics", missing]) == 2
        log.info("info shown")
        log.debug("debug hidden")
        assert ipa(["--log-level", "debug", "show", "--metrics", missing]) == 2
        log.debug("debug shown")
        assert ipa(["show", "--metrics", missing]) == 2  # default: WARNING
        log.info("info hidden")
        log.warning("warning shown")
        err = capsys.readouterr().err
        assert len([h for h in logging.getLogger().handlers if isinstance(h, RichHandler)]) == 1
    finally:
        ipa(["show", "--metrics", missing])  # leave the default levels for the next test
    assert "info shown" in err and "debug shown" in err and "warning shown" in err
    assert "hidden" not in err
    with pytest.raises(SystemExit):
        ipa(["--log-level", "LOUD", "show"])
    assert "invalid choice: 'LOUD'" in capsys.readouterr().err


def test_hands_detect_keeps_mediapipe_log_lines_off_stderr(hand_model):  # noqa: F811 (the fixture)
    """MediaPipe's native INFO/W0000 lines (LiteRT, XNNPACK, absl) only show with -vv, as DEBUG records."""
    cmd = [sys.executable, "-m", "ipa_lib.cli", "hands", "detect", str(real_dir() / PHOTOS["294"]), "--json", "--model", hand_model]
    quiet = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert quiet.returncode == 0 and json.loads(quiet.stdout)["summary"]["failed"] == 0
    assert quiet.stderr == ""
    loud = subprocess.run([*cmd[:3], "-vv", *cmd[3:]], capture_output=True, text=True, timeout=300, check=False)
    assert loud.returncode == 0 and loud.stdout == quiet.stdout
    assert "mediapipe: INFO:" in loud.stderr and "XNNPACK" in loud.stderr


def test_native_log_filter_keeps_errors(capfd):
    """Only MediaPipe's INFO/WARNING lines are held back: an error line still reaches stderr."""
    from ipa_lib.data.hands.landmarker import native_logs_to_debug

    for _ in range(2):  # the scratch file is reused: the second round must not replay the first
        with native_logs_to_debug():
            os.write(2, b"INFO: [environment.cc:36] Creating LiteRT environment\nW0000 00:00:1.0 1 a.cc:1] aligned\n"
                        b"E0000 00:00:1.0 1 b.cc:2] a real error\n")
        assert capfd.readouterr().err == "E0000 00:00:1.0 1 b.cc:2] a real error\n"
