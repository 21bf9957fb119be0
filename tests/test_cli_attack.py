"""``interp attack``: the command line gives what the library gives, and bad input one clear line."""

from __future__ import annotations

import pytest
import torch
from conftest import without_loading_bars
from safetensors.torch import save_file

import interp
from interp.cli import main
from interp.errors import InputError
from interp.methods import adversarial as A
from interp.models import zoo

N = 40


def fgsm_on(path, *extra: str) -> list[str]:
    """``interp attack`` FGSM (eps 0.1) on the digits CNN, images from ``path``."""
    return [
        "attack",
        "--model",
        "zoo:digits-cnn",
        "--attack",
        "fgsm",
        "--eps",
        "0.1",
        "--input",
        str(path),
        *extra,
    ]


@pytest.fixture(scope="module")
def digits():
    _, _, x, y = zoo.digits_data(0)
    return x[:N], y[:N]


def test_an_attack_saved_from_the_cli_is_the_library_attack(cnn, digits, tmp_path, capsys):
    """The saved set is bit for bit ``A.pgd`` on the same images, and the printed accuracies its own."""
    out = tmp_path / "adv.safetensors"
    argv = ["attack", "--model", "zoo:digits-cnn", "--attack", "pgd", "--eps", "0.1", "--steps", "5",
            "--n", str(N), "--seed", "3", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "interp.load_attack reads it" in printed
    saved = interp.load_attack(out, cnn)  # as the CLI says
    expected = A.pgd(cnn, *digits, 0.1, steps=5, seed=3)
    assert torch.equal(saved.x_adv, expected.x_adv)
    assert saved.config == expected.config
    assert f"adversarial accuracy  {expected.accuracy_adv:.3f}" in printed
    assert f"clean accuracy        {expected.accuracy_clean:.3f}" in printed
    assert "'seed': 3" in printed
    assert (
        f"success rate          {expected.success_rate:.3f}  (of the {expected.n_attackable} classified"
        in printed
    )


def test_the_curve_is_the_library_curve_and_its_plot_is_written(cnn, digits, tmp_path, capsys):
    html = tmp_path / "curve.html"
    argv = ["attack", "--model", "zoo:digits-cnn", "--attack", "fgsm", "--curve", "0,0.1,0.3", "--n", str(N),
            "--html", str(html)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    curve = A.robustness_curve(cnn, *digits, [0, 0.1, 0.3], "fgsm")
    for eps, acc in zip(curve.eps, curve.accuracy, strict=True):
        assert f"eps {eps:<8g} accuracy {acc:.3f}" in printed
    assert curve.accuracy[0] > curve.accuracy[-1]  # a real curve: fgsm at 0.3 breaks most digits
    assert "plotly" in html.read_text()[:200_000]


def test_a_minimal_attack_and_images_from_a_file(cnn, digits, tmp_path, capsys):
    """DeepFool on images given as a file; its per-image step counts print as a summary."""
    path = tmp_path / "images.safetensors"
    save_file({"x": digits[0].contiguous(), "y": digits[1].contiguous()}, str(path))
    assert main(["attack", "--model", "zoo:digits-cnn", "--attack", "deepfool", "--input", str(path)]) == 0
    printed = capsys.readouterr().out
    expected = A.run_attack("deepfool", cnn, *digits)
    assert f"adversarial accuracy  {expected.accuracy_adv:.3f}" in printed
    assert f"{N} images from {path}" in printed
    assert f"'steps_used': '[{N} values" in printed


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--attack", "pgd", "--eps", "-1"], "eps must be a number >= 0"),
        (["--attack", "pgd", "--eps", "5"], "larger than the input range"),
        (["--attack", "pgd"], "pgd needs --eps"),
        (["--attack", "cw", "--eps", "0.1"], "cw looks for the smallest perturbation and takes no --eps"),
        (
            ["--attack", "fgsm", "--eps", "0.1", "--norm", "l2"],
            "fgsm takes no --norm; its flags are --eps, --target, --seed",
        ),
        (
            ["--attack", "square", "--eps", "0.1", "--steps", "3"],
            "square takes no --steps; its flags are --eps, --restarts",
        ),
        (["--attack", "pgd", "--eps", "0.1", "--target", "12"], r"target must be classes in [0, 10)"),
        (
            ["--attack", "pgd", "--eps", "0.1", "--html", "c.html"],
            "--html writes the plots of --where and --curve",
        ),
        (["--attack", "pgd", "--eps", "0.1", "--input", "no-such-file"], "is not a file"),
        (["--attack", "pgd", "--eps", "0.1", "--out", "."], "--out '.' is a folder"),
        (["--attack", "pgd", "--curve", "0,0.1,5"], "eps=5 is larger than the input range"),
    ],
)
def test_bad_input_is_one_clear_line_and_exit_2(args, message, capsys):
    assert main(["attack", "--model", "zoo:digits-cnn", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_input_without_images_and_labels_names_what_it_holds(tmp_path, capsys):
    path = tmp_path / "wrong.safetensors"
    save_file({"images": torch.zeros(2, 1, 8, 8)}, str(path))
    assert main(fgsm_on(path)) == 2
    assert "holds ['images']; it needs x (images) and y (labels)" in capsys.readouterr().err


def test_run_attack_refuses_an_option_the_attack_does_not_take(cnn, digits):
    with pytest.raises(InputError, match=r"apgd-ce takes no option 'target'; its options are \['steps'"):
        A.run_attack("apgd-ce", cnn, *digits, 0.1, target=3)
    assert "loss" not in A.attack_options("apgd-dlr")  # the name fixes it
    assert "progress" in A.attack_options("square") and "eps" not in A.attack_options("pgd")


def test_where_prints_the_attack_probe_and_one_page_holds_both_plots(cnn, digits, tmp_path, capsys):
    """--where prints attack_probe's numbers per hook point; --html puts its plot and the curve's on one page."""
    html = tmp_path / "where.html"
    argv = ["attack", "--model", "zoo:digits-cnn", "--attack", "fgsm", "--eps", "0.2", "--n", str(N), "--where",
            "--curve", "0,0.2", "--html", str(html)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    x_train, y_train, _, _ = zoo.digits_data(0)
    probe = A.attack_probe(cnn, A.fgsm(cnn, *digits, 0.2), train=(x_train[:400], y_train[:400]))
    for i, name in enumerate(probe.names):
        row = next(line for line in printed.splitlines() if line.strip().startswith(name + " "))
        numbers = [float(v) for v in row.split()[1:]]
        expected = [probe.divergence[i], probe.probe_acc_clean[i], probe.probe_acc_adv[i],
                    probe.restoration[i], probe.restoration_topk[i]]  # fmt: skip
        assert numbers == pytest.approx([round(float(v), 3) for v in expected], abs=1e-9)
    page = html.read_text()
    assert page.count("Plotly.newPlot") == 2 and "where it bites" in printed


def test_npz_input_is_read_and_bad_npz_files_are_one_line(cnn, digits, tmp_path, capsys):
    """An .npz of x and y gives the library's attack; a bare array, garbage and object arrays are
    refused without a traceback (and nothing is unpickled)."""
    import numpy as np

    good = tmp_path / "good.npz"
    np.savez(good, x=digits[0].numpy(), y=digits[1].numpy())
    assert main(fgsm_on(good)) == 0
    expected = A.fgsm(cnn, *digits, 0.1)
    assert f"adversarial accuracy  {expected.accuracy_adv:.3f}" in capsys.readouterr().out
    bare, garbage, objects = tmp_path / "bare.npz", tmp_path / "garbage.npz", tmp_path / "objects.npz"
    with open(bare, "wb") as f:
        np.save(f, np.zeros(3))
    garbage.write_text("not numpy")
    np.savez(objects, x=np.array([{"a": 1}], dtype=object), y=np.zeros(1))
    for path, message in ((bare, "is one array, not an .npz archive"), (garbage, "is not an .npz archive"),
                          (objects, "numeric")):  # fmt: skip
        assert main(fgsm_on(path)) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1


def test_models_that_are_not_image_classifiers_are_refused_in_one_line(tmp_path, capsys):
    """Token ids into a transformer, and a model whose output is not [batch, classes] logits
    (TMS's [batch, 10, 5] reconstruction): each command names the problem (were tracebacks)."""
    tokens, tms = tmp_path / "tokens.safetensors", tmp_path / "tms.safetensors"
    save_file({"x": torch.randint(0, 100, (4, 5)), "y": torch.zeros(4, dtype=torch.long)}, str(tokens))
    save_file({"x": torch.rand(4, 10, 5), "y": torch.zeros(4, dtype=torch.long)}, str(tms))
    cases = [
        (["attack", "--model", "minilm", "--attack", "fgsm", "--eps", "0.1", "--input", str(tokens)],
         "minilm takes tokens, and these attacks perturb images"),
        (["attack", "--model", "zoo:tms-5-2", "--attack", "pgd", "--eps", "0.1", "--input", str(tms)],
         "attacks need a classifier whose output is [batch, classes] logits; this model gives [4, 10, 5]"),
        (["attack", "--model", "zoo:tms-5-2", "--attack", "apgd-ce", "--eps", "0.1", "--input", str(tms)],
         "attacks need a classifier whose output is [batch, classes] logits"),
        (["attribute", "--model", "zoo:tms-5-2", "--input", str(tms), "--method", "saliency"],
         "this model's output is [1, 10, 5], not [batch, outputs]"),
        (["attribute", "--model", "zoo:tms-5-2", "--method", "saliency"], "zoo:tms-5-2 has no default images"),
        (["visualize", "--model", "zoo:tms-5-2", "--objective", "output:3", "--transforms", "none"],
         "'output:' objectives are class logits"),
        (["visualize", "--model", "zoo:tms-5-2", "--objective", "hidden.hook_out:0"], "transforms warp images"),
    ]  # fmt: skip
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = without_loading_bars(capsys.readouterr().err)
        assert message in err and err.count("\n") == 1, (argv, err)


def test_success_rate_line_says_what_it_counts(cnn, digits, capsys):
    """Eps 0 changes nothing: 0 success, over the images not already of the target class."""
    x, y = digits
    argv = ["attack", "--model", "zoo:digits-cnn", "--attack", "pgd", "--eps", "0", "--target", "3",
            "--n", str(N)]  # fmt: skip
    assert main(argv) == 0
    already = int((cnn(x).argmax(-1) == 3).sum())
    assert f"success rate          0.000  (of the {N - already} not already classified as their target" in (
        capsys.readouterr().out
    )


def test_where_says_why_nothing_was_restored_when_the_attack_took_nothing(capsys):
    argv = ["attack", "--model", "zoo:digits-cnn", "--attack", "fgsm", "--eps", "0", "--n", str(N), "--where"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "nan" not in printed and "n/a: the attack took no accuracy" in printed


def test_a_npy_input_is_refused_pointing_to_npz(tmp_path, capsys):
    import numpy as np

    path = tmp_path / "images.npy"
    np.save(path, np.zeros((2, 1, 8, 8), dtype=np.float32))
    assert main(fgsm_on(path)) == 2
    err = capsys.readouterr().err
    assert ".npy files are not read" in err and "numpy.savez" in err and err.count("\n") == 1


def test_where_on_too_few_images_of_a_class_is_refused_before_the_attack(digits, tmp_path, capsys):
    x, y = digits
    path = tmp_path / "small.safetensors"
    save_file({"x": x[:12].contiguous(), "y": y[:12].contiguous()}, str(path))
    argv = fgsm_on(path, "--where")
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "too few examples to probe" in captured.err and "fgsm on" not in captured.out
