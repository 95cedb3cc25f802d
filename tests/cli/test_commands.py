"""The command table of sinkhole.cli: every entry loads its command, `--help` lists each with the summary its own
help starts with, and listing them loads none of their modules (a mistyped module path, a summary left behind
after a docstring changed, or a noun module imported at start-up fails here)."""

from __future__ import annotations

import inspect
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from sinkhole.cli import COMMANDS, cli
from tests.conftest import ROOT


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_each_entry_loads_its_command_with_the_summary_listed(name: str) -> None:
    command = cli.get_command(click.Context(cli), name)
    assert command is not None and command.name == name
    first_paragraph = inspect.cleandoc(command.help or "").split("\n\n")[0].replace("\n", " ")
    assert COMMANDS[name][1] == first_paragraph
    result = CliRunner().invoke(cli, [name, "--help"], prog_name="sinkhole")
    assert result.exit_code == 0 and result.output.startswith(f"Usage: sinkhole {name} ")


def test_help_lists_every_command_and_imports_none() -> None:
    code = ("import sys\nfrom sinkhole.cli import main\nsys.argv = ['sinkhole', '--help']\ntry:\n    main()\n"
            "except SystemExit:\n    pass\n"
            "print('LOADED', sorted(m for m in sys.modules if m.startswith('sinkhole.cli.')"
            " and m != 'sinkhole.cli.common' or m in ('sinkhole.service.process', 'sinkhole.web.front')))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    listed = [line.split()[0] for line in out.split("Commands:\n")[1].splitlines() if line.startswith("  ")]
    assert listed == sorted(COMMANDS)
    assert out.rstrip().endswith("LOADED []")


def test_an_unknown_command_is_a_usage_error() -> None:
    result = CliRunner().invoke(cli, ["nope"])
    assert result.exit_code == 2 and "No such command 'nope'" in result.output
