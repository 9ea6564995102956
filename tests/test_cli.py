"""The command line as a user runs it: one line on stderr and exit code 2 for mistakes."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    "args,needle",
    [
        (["eval", "/nonexistent/run"], "/nonexistent/run"),
        (["profile", "resnet5O"], "Did you mean 'resnet50'"),
        (["demo", "--data-dir", "/nonexistent"], "apt-get install"),
    ],
)
def test_module_entry_point_reports_user_errors_in_one_line(args, needle):
    out = subprocess.run(
        [sys.executable, "-m", "dynaslice.cli", *args], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and needle in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_every_subcommand_has_help(capsys):
    from dynaslice.cli import build_parser

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # noqa: SLF001
    assert {
        "train",
        "eval",
        "recalibrate",
        "profile",
        "train-gate",
        "select",
        "run",
        "export",
        "demo",
    } <= set(commands)
    for name in commands:
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args([name, "--help"])
        assert exit_info.value.code == 0
        assert f"usage: dynaslice {name}" in capsys.readouterr().out
