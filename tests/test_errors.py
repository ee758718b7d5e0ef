"""Errors by kind at the command line: a DiffalignError is one line (exit 2, or 3 for a run that stopped itself),
Ctrl-C is one line (exit 130), anything else is a bug with its traceback; --debug / DIFFALIGN_DEBUG=1 show the
traceback of a DiffalignError too."""

import os
import subprocess
import sys

import pytest
from conftest import ROOT

from diffalign.cli import commands, main
from diffalign.errors import ConfigError, DataError, DiffalignError, ModelError, TrainingStopped

EXPORT = ["export", "runs/none"]


def raising(error):
    def handler(args):
        raise error

    return handler


@pytest.mark.parametrize("error", [ConfigError("bad flag"), DataError("bad data"), ModelError("bad model")],
                         ids=["config", "data", "model"])
def test_a_diffalign_error_is_one_line_with_exit_code_2(monkeypatch, capsys, error):
    monkeypatch.setattr(commands, "export_command", raising(error))
    assert main(EXPORT) == 2
    assert capsys.readouterr().err == f"diffalign export: error: {error}\n"


def test_a_stopped_run_says_stopped_with_exit_code_3(monkeypatch, capsys):
    monkeypatch.setattr(commands, "train_command", raising(TrainingStopped("5 non-finite steps in a row")))
    assert main(["train", "configs/tiny_dpo.yaml"]) == 3
    assert capsys.readouterr().err == "diffalign train: stopped: 5 non-finite steps in a row\n"


def test_ctrl_c_is_one_line_with_exit_code_130(monkeypatch, capsys):
    monkeypatch.setattr(commands, "export_command", raising(KeyboardInterrupt()))
    assert main(EXPORT) == 130
    assert capsys.readouterr().err == "diffalign export: interrupted\n"


@pytest.mark.parametrize("bug", [ValueError("an internal check"), FileNotFoundError("a file we wrote"),
                                 RuntimeError("shape mismatch")], ids=["ValueError", "FileNotFoundError", "RuntimeError"])
def test_any_other_error_is_a_bug_and_propagates(monkeypatch, bug):
    monkeypatch.setattr(commands, "export_command", raising(bug))
    with pytest.raises(type(bug), match=str(bug)):
        main(EXPORT)


@pytest.mark.parametrize("argv", [["--debug", *EXPORT], [*EXPORT, "--debug"]], ids=["before", "after"])
def test_debug_flag_reraises_a_diffalign_error(monkeypatch, argv):
    monkeypatch.setattr(commands, "export_command", raising(ConfigError("bad flag")))
    with pytest.raises(ConfigError, match="bad flag"):
        main(argv)


def test_debug_environment_variable_reraises_a_diffalign_error(monkeypatch, capsys):
    monkeypatch.setattr(commands, "export_command", raising(DataError("bad data")))
    monkeypatch.setenv("DIFFALIGN_DEBUG", "1")
    with pytest.raises(DataError):
        main(EXPORT)
    monkeypatch.setenv("DIFFALIGN_DEBUG", "0")
    assert main(EXPORT) == 2 and capsys.readouterr().err == "diffalign export: error: bad data\n"


def test_bad_flags_raise_diffalign_errors_before_any_work(capsys):
    cases = {
        ("sample", "--prompt", "x", "--device", "cpu", "--dtype", "float16"): "--dtype float16 needs a GPU",
        ("pairs", "--prompt", "x", "--repeat", "0", "--out", "unused"): "--repeat must be at least 1, got 0",
        ("score", "--images", "unused", "--reward", " , "): "--reward needs at least one reward name",
        ("score", "--images", "unused", "--reward", "clip,aesthetic", "--weights", "x.pt"): "--weights 'x.pt': with",
        ("score", "--images", "unused", "--reward", "clip", "--ensemble-weights", "pick=2"): "'pick' is not one of",
    }
    for argv, message in cases.items():
        assert main(list(argv)) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith(f"diffalign {argv[0]}: error: ") and message in err and err.count("\n") == 1, err
    assert issubclass(ConfigError, DiffalignError) and issubclass(ConfigError, ValueError)


def test_in_a_fresh_process_the_error_is_one_line_and_debug_shows_the_traceback():
    argv = [sys.executable, "-m", "diffalign", "sample", "--prompt", "x", "--device", "cpu", "--dtype", "float16"]
    plain = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
    assert plain.returncode == 2 and plain.stderr == (
        "diffalign sample: error: --dtype float16 needs a GPU; use float32 or bfloat16 on CPU\n")
    debug = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "DIFFALIGN_DEBUG": "1"})
    assert debug.returncode == 1 and "Traceback" in debug.stderr
    assert debug.stderr.rstrip().endswith("diffalign.errors.ConfigError: --dtype float16 needs a GPU; use float32 or "
                                          "bfloat16 on CPU")


def test_a_reader_that_leaves_early_is_not_an_error():
    # `diffalign list | head -1` where head is gone before the list is written: no traceback, SIGPIPE's exit code
    child = subprocess.Popen([sys.executable, "-m", "diffalign", "list"], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    child.stdout.close()
    assert child.wait(timeout=300) == 141 and child.stderr.read() == ""
