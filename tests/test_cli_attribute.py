"""``interp attribute``: the command line prints what ``attribute`` computes, and bad input one clear line."""

from __future__ import annotations

import pytest
import torch
from conftest import without_loading_bars
from safetensors.torch import save_file

import interp
from interp.cli import main
from interp.methods.attribution import attribute
from interp.models import zoo


def _rows(printed: str) -> list[str]:
    return [line for line in printed.splitlines() if line.startswith("  ") and "target" in line]


def test_image_maps_are_the_library_maps(cnn, tmp_path, capsys):
    """Each chosen test image: the library's target, output, sum and completeness error, its top
    pixel, and one plot per image on the page."""
    html = tmp_path / "maps.html"
    assert (
        main(
            [
                "attribute",
                "--model",
                "zoo:digits-cnn",
                "--method",
                "ig",
                "--index",
                "0,5",
                "--html",
                str(html),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    _, _, x, y = zoo.digits_data(0)
    expected = attribute(cnn, x[[0, 5]], method="ig")
    rows = _rows(printed)
    assert len(rows) == 2
    for i, (row, index) in enumerate(zip(rows, (0, 5), strict=True)):
        assert row.startswith(
            f"  digits test image {index} (label {int(y[index])}): target {int(expected.target[i])}"
        )
        assert f"sum of attributions {float(expected.values[i].sum()):.4f}" in row
        assert f"completeness error {float(expected.delta[i]):.2e}" in row
        values = expected.values[i]
        top = tuple(int(v) for v in torch.unravel_index(values.abs().argmax(), values.shape))
        most = printed.split(row)[1].splitlines()[1]  # the row's "most attributed" line
        assert most.split(": ", 1)[1].startswith(f"{top} {float(values[top]):+.4f}")
    assert html.read_text().count("Plotly.newPlot") == 2


def test_layer_and_noise_tunnel_options_reach_the_library(cnn, tmp_path, capsys):
    path = tmp_path / "x.safetensors"
    _, _, x, _ = zoo.digits_data(0)
    save_file({"x": x[:3].contiguous()}, str(path))  # labels are optional here
    argv = ["attribute", "--model", "zoo:digits-cnn", "--input", str(path), "--index", "2",
            "--method", "gradcam", "--layer", "conv2.hook_out", "--target", "4"]  # fmt: skip
    assert main(argv) == 0
    expected = attribute(cnn, x[[2]], 4, "gradcam", layer="conv2.hook_out")
    assert f"sum of attributions {float(expected.values[0].sum()):.4f}" in capsys.readouterr().out
    argv = ["attribute", "--model", "zoo:digits-cnn", "--method", "saliency", "--noise-tunnel", "smoothgrad",
            "--seed", "7"]  # fmt: skip
    assert main(argv) == 0
    expected = attribute(cnn, x[[0]], method="saliency", noise_tunnel="smoothgrad", seed=7)
    other_seed = attribute(cnn, x[[0]], method="saliency", noise_tunnel="smoothgrad", seed=8)
    assert not torch.equal(expected.values, other_seed.values)  # so the seed must have reached it
    assert f"sum of attributions {float(expected.values[0].sum()):.4f}" in capsys.readouterr().out


def test_text_attributions_and_their_token_view(tmp_path, capsys):
    import interp

    html = tmp_path / "tokens.html"
    argv = ["attribute", "--model", "minilm", "--text", "the cat sat on the mat", "--target", "5",
            "--steps", "8", "--html", str(html)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    expected = attribute(interp.load("minilm"), ["the cat sat on the mat"], 5, "ig", n_steps=8)
    values = expected.token_values(0)
    best = int(values.abs().argmax())
    assert f"{expected.str_tokens[0][best]!r} {float(values[best]):+.4f}" in printed
    assert "target 5" in html.read_text()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "gradcam"], "gradcam attributes to a layer: give --layer"),
        (["--neuron", "3"], "give --layer (a hook name) as well"),
        (["--index", "400"], "--index 400 is past the 360 images"),
        (["--text", "hello"], "is not a text model"),
        (["--layer", "nosuch.hook"], "No hook point matches 'nosuch.hook'"),
        (["--target", "12"], "target index 12 is out of range"),
        (["--input", "no-such-file"], "is not a file"),
        (
            ["--method", "saliency", "--steps", "5"],
            "--steps sets the integration points of ig and conductance",
        ),
        (["--method", "gradient"], "gradient attributes one neuron: give --layer and --neuron"),
        (["--html", "."], "--html '.' is a folder"),
        (["--method", "deeplift_shap"], "deeplift_shap averages DeepLift over a set of reference inputs"),
    ],
)
def test_bad_input_is_one_clear_line_and_exit_2(args, message, capsys):
    assert main(["attribute", "--model", "zoo:digits-cnn", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--method", "gradcam", "--layer", "blocks.2.hook_resid_post"],
            "a transformer layer's dim 1 is its positions",
        ),
        (["--method", "ig", "--layer", "embed.hook_in"], "embed.hook_in carries torch.int64 values"),
        (["--index", "2"], "--index picks images; with --text every text is attributed"),
    ],
)
def test_text_model_mistakes_are_one_clear_line(args, message, capsys):
    """Grad-CAM on a transformer layer gave every token one value, and layer IG at the token-id
    hook was a captum dtype traceback: both are refused, as is --index beside --text."""
    assert main(["attribute", "--model", "minilm", "--text", "hello", *args]) == 2
    err = without_loading_bars(capsys.readouterr().err)
    assert message in err and err.count("\n") == 1


def test_a_neuron_attribution_is_labelled_with_its_neuron_not_the_argmax(capsys):
    assert main(["attribute", "--model", "zoo:digits-cnn", "--method", "ig", "--layer", "fc.hook_out",
                 "--neuron", "3"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "neuron 3 of fc.hook_out, output" in printed and "target 7" not in printed


def test_a_neuron_of_a_conv_map_is_given_one_index_per_axis(capsys):
    argv = ["attribute", "--model", "zoo:digits-cnn", "--method", "ig", "--layer", "conv2.hook_out",
            "--neuron", "3,2,2", "--index", "0,1"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    model = interp.load("zoo:digits-cnn")
    _, _, x, _ = zoo.digits_data(0)
    expected = attribute(model, x[[0, 1]], None, "ig", layer="conv2.hook_out", neuron=(3, 2, 2))
    assert printed.count("neuron (3, 2, 2) of conv2.hook_out") == 2
    assert (
        f"output {float(expected.output[1]):.4f}, sum of attributions {float(expected.values[1].sum()):.4f}"
        in printed
    )


@pytest.mark.parametrize("method", ["deeplift", "guided_backprop", "deconvolution"])
def test_captums_notices_about_its_temporary_hooks_are_not_printed(method):
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert main(["attribute", "--model", "zoo:digits-cnn", "--method", method]) == 0
    assert not [w for w in seen if "hooks" in str(w.message)], [str(w.message) for w in seen]
