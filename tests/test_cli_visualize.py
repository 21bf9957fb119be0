"""``interp visualize``: the command line prints what ``featureviz`` computes, and bad input one clear line."""

from __future__ import annotations

import pytest
from conftest import without_loading_bars

import interp
from interp.cli import main
from interp.methods import featureviz as fv


def test_images_are_the_library_render(cnn, tmp_path, capsys):
    html = tmp_path / "units.html"
    argv = ["visualize", "--model", "zoo:digits-cnn", "--objective", "conv2.hook_out:0-2", "--steps", "16",
            "--seed", "4", "--html", str(html)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    expected = fv.render(cnn, "conv2.hook_out:0-2", steps=16, seed=4)
    for i, score in enumerate(expected.scores.tolist()):
        assert f"image {i}: objective {score:.4f}" in printed
    assert "'seed': 4" in printed and html.read_text().count("Plotly.newPlot") == 1


def test_tokens_are_the_library_readout(capsys):
    argv = ["visualize", "--model", "minilm", "--objective", "blocks.2.hook_resid_post:10", "--steps", "8",
            "--length", "4"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    expected = fv.render_tokens(interp.load("minilm"), "blocks.2.hook_resid_post", [10], steps=8, length=4)
    assert f"unit 10: {' '.join(expected.str_tokens[0])!r}" in printed
    assert f"on these tokens {float(expected.token_scores[0]):.4f}" in printed


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--objective", "conv9:1"], "No hook point matches 'conv9'"),
        (["--objective", "conv2.hook_out:99"], "unit index 99 is out of range"),
        (["--objective", "conv2.hook_out"], "a 'layer:unit' string such as"),
        (["--objective", "conv2.hook_out:a"], "the part after ':' must be unit indices"),
        (["--objective", "output:3", "--html", "/no/such/dir/a.html"], "its folder does not exist"),
        (["--objective", "output:3", "--length", "3"], "--length sets a transformer's tokens per sequence"),
        (["--objective", "conv*.hook_out:0"], "'conv*.hook_out' is a pattern (it matches 2: conv1.hook_out"),
    ],
)
def test_bad_input_is_one_clear_line_and_exit_2(args, message, capsys):
    assert main(["visualize", "--model", "zoo:digits-cnn", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_a_unit_stuck_at_zero_is_named_with_the_hook_to_try(capsys):
    """MiniLM's blocks.2 MLP unit 10 ascends into GELU's flat negative tail (score -0.0000; its
    pre-activation reaches ~19 when optimized directly): the command says so, naming hook_pre."""
    assert main(["visualize", "--model", "minilm", "--objective", "blocks.2.mlp.hook_post:10,12"]) == 0
    printed = capsys.readouterr().out
    assert "stuck at 0" in printed and "blocks.2.mlp.hook_pre:10" in printed
    assert printed.count("stuck at 0") == 1  # unit 12 reaches ~17


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--objective", "embed.hook_in:0"], "embed.hook_in does not depend on the word embeddings"),
        (
            ["--objective", "pos_embed.hook_out:0"],
            "pos_embed.hook_out does not depend on the word embeddings",
        ),
        (
            ["--objective", "blocks.0.hook_resid_post:0", "--param", "cppn"],
            "--param shape an optimized image",
        ),
    ],
)
def test_transformer_objectives_the_embeddings_cannot_move_are_refused(args, message, capsys):
    """A hook upstream of (or beside) the optimized embeddings was a traceback or a silent
    meaningless score; image-only flags were silently ignored."""
    assert main(["visualize", "--model", "minilm", "--steps", "2", *args]) == 2
    err = without_loading_bars(capsys.readouterr().err)
    assert message in err and err.count("\n") == 1


@pytest.mark.parametrize("lr", ["-1", "0", "nan", "inf"])
def test_a_learning_rate_that_is_not_positive_is_refused(lr, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["visualize", "--model", "zoo:digits-cnn", "--objective", "output:3", "--lr", lr])
    assert stop.value.code == 2 and "expected a finite number > 0" in capsys.readouterr().err
