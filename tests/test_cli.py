"""The command line shell: help, version, and one-line errors instead of tracebacks."""

from __future__ import annotations

import subprocess
import sys

import pytest

from medmtl.cli import build_parser, main


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert "medmtl" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["synth", "check-data", "series", "ui", "infer"])
def test_every_command_has_help(command):
    out = subprocess.run(
        [sys.executable, "-m", "medmtl.cli", command, "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "usage: medmtl " + command in out


def test_parser_lists_commands():
    choices = build_parser()._subparsers._group_actions[0].choices  # noqa: SLF001
    assert {"synth", "check-data", "series", "ui", "infer"} <= set(choices)
