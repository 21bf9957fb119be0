"""The command line, run as a user runs it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from interp.cli import main


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "interp.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_help_lists_every_command():
    result = _run("--help")
    assert result.returncode == 0
    for command in ("models", "hooks", "capture", "explore", "zoo"):
        assert command in result.stdout


def test_models_lists_default_and_how_to_name_a_directory(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("minilm") and "/path/to/dir" in out


def test_hooks_with_filter_prints_shapes(capsys, gpt2_dir):
    assert main(["hooks", gpt2_dir, "--filter", "blocks.1.attn.hook_*"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(
        line.startswith("blocks.1.attn.hook_pattern") and "(batch, 4, pos, pos)" in line for line in lines
    )
    assert all(line.startswith("blocks.1.attn.hook_") for line in lines)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["hooks", "/no/such/dir"], "no model directory at '/no/such/dir'"),
        (
            ["hooks", "minilm", "--filter", "blocks.0.hook_resid_pots"],
            "Did you mean: blocks.0.hook_resid_post",
        ),
    ],
)
def test_errors_are_one_clear_line_and_exit_2(args, message):
    result = _run(*args)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
