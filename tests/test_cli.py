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
    for command in (
        "models",
        "hooks",
        "capture",
        "explore",
        "zoo",
        "reproduce",
        "sae",
        "attack",
        "attribute",
        "visualize",
    ):
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


def test_capture_writes_a_dataset_equal_to_in_memory(tmp_path, gpt2_dir, gpt2_model):
    import interp

    texts = ["the cat sat on the mat", "a dog ran", "it was big and red"]
    source = tmp_path / "texts.txt"
    source.write_text("\n".join(texts) + "\n")
    out = tmp_path / "acts"
    args = ["capture", "--model", gpt2_dir, "--hooks", "blocks.*.hook_resid_post", "--input", str(source)]
    assert main([*args, "--out", str(out), "--batch-size", "2"]) == 0
    dataset = interp.load_capture(out)
    assert len(dataset) == 3
    for i, text in enumerate(texts):
        _, cache = gpt2_model.run_with_cache(text, names="blocks.1.hook_resid_post")
        assert (dataset[i]["blocks.1.hook_resid_post"] - cache["resid_post", 1][0]).abs().max() < 1e-5


def test_capture_of_missing_input_file_fails_clearly(tmp_path):
    result = _run("capture", "--model", "minilm", "--hooks", "blocks.0.hook_resid_post",
                  "--input", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o"))  # fmt: skip
    assert result.returncode == 2 and "missing.txt" in result.stderr and "Traceback" not in result.stderr


def test_library_keywords_in_an_error_become_the_commands_flags():
    from interp.cli import in_flags

    flags = {"layer": "--layer", "noise_tunnel": "--noise-tunnel", "seed": "--seed"}
    message = "noise_tunnel= does not combine with layer=; give layer= (a hook name), see model.hook_names"
    assert in_flags(message, flags) == (
        "--noise-tunnel does not combine with --layer; give --layer (a hook name), see `interp hooks MODEL`"
    )
    assert in_flags("ran with seed=3 and seed='a'", flags) == "ran with seed=3 and seed='a'"  # settings stay
