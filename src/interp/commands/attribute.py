"""``interp attribute``: attribution maps (every method of ``interp.methods.attribution``) from the command line.

interp attribute --model zoo:digits-cnn --method ig --index 0,1,2 --html maps.html
interp attribute --model zoo:digits-cnn --method gradcam --layer conv2.hook_out
interp attribute --model zoo:digits-cnn --method saliency --noise-tunnel smoothgrad
interp attribute --model minilm --text "the cat sat on the mat" --method ig --target 5 --html tokens.html

Images default to the digits test split (``--index`` picks them); ``--input`` takes a safetensors
or .npz file with ``x`` (and optionally ``y``). Transformers take ``--text`` (repeatable). Each
example prints its target, the attributed output, the sum of the attributions (and IG's
completeness error), and its most attributed pixels, units or tokens.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from interp.errors import InputError

TOP = 5  # the most attributed pixels / units / tokens printed per example


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``interp attribute`` on the main parser's subcommands."""
    from interp.cli import positive_int
    from interp.methods.attribution import LAYER_METHODS, METHODS, NEURON_METHODS, NOISE_TUNNELS

    cmd = sub.add_parser(
        "attribute",
        help="attribute a model's output to its input pixels or tokens, or to a layer (captum's methods)",
        description="Attribution maps on the same hooked model, equal to captum's: input methods "
        f"{', '.join(METHODS)}; with --layer: {', '.join(LAYER_METHODS)}; with --layer and --neuron: "
        f"{', '.join(NEURON_METHODS)}.",
    )
    cmd.add_argument("--model", required=True, help="zoo:digits-cnn, minilm, or a model interp.load reads")
    cmd.add_argument("--method", default="ig", choices=sorted(set(METHODS) | set(LAYER_METHODS) | set(NEURON_METHODS)),
                     help="the attribution method (default ig)")  # fmt: skip
    cmd.add_argument(
        "--input",
        default=None,
        help="images: safetensors or .npz with x (default: the digits test split, for the digits models)",
    )
    cmd.add_argument("--index", type=_indices, default=None, help="which images, e.g. 0 or 0,5,9 (default 0)")
    cmd.add_argument(
        "--text", action="append", default=None, help="transformers: a text to attribute (repeatable)"
    )
    cmd.add_argument("--target", type=int, default=None,
                     help="the output index explained (default: each example's argmax)")  # fmt: skip
    cmd.add_argument("--layer", default=None, help="a hook name: attribute to that layer's activation")
    cmd.add_argument("--neuron", type=_neuron, default=None,
                     help="with --layer: explain that unit of the layer (3, or 3,2,2 in a conv map)")  # fmt: skip
    cmd.add_argument("--noise-tunnel", choices=NOISE_TUNNELS, default=None, help="average over noisy copies")
    cmd.add_argument(
        "--steps", type=positive_int, default=None, help="ig and conductance: integration steps (default 50)"
    )
    cmd.add_argument("--seed", type=int, default=0, help="seeds the noise tunnel and sampling methods")
    cmd.add_argument("--html", default=None, help="write each example's map to this page (opens offline)")
    # library messages name keywords; the command's errors name its flags (cli.in_flags)
    cmd.set_defaults(
        run=run,
        flags={
            "layer": "--layer",
            "neuron": "--neuron",
            "target": "--target",
            "noise_tunnel": "--noise-tunnel",
            "n_steps": "--steps",
            "seed": "--seed",
        },
    )


def _neuron(text: str) -> int | tuple[int, ...]:
    try:
        index = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a unit index such as 3, or one per axis such as 3,2,2, got {text!r}"
        ) from None
    return index[0] if len(index) == 1 else index


def _indices(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected image indices such as 0 or 0,5,9, got {text!r}") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected image indices >= 0 such as 0 or 0,5,9, got {text!r}")
    return values


def run(args: argparse.Namespace) -> int:
    import interp
    from interp.cli import check_output_file
    from interp.methods.attribution import INTEGRATING, attribute

    check_output_file("html", args.html)
    if args.input is not None and args.text is not None:
        raise InputError("pass images (--input, --index) or texts (--text), not both")
    if args.input is not None and not Path(args.input).is_file():
        raise InputError(f"--input {args.input!r} is not a file. Check the path.")
    if args.text is not None and args.index is not None:
        raise InputError("--index picks images; with --text every text is attributed")
    if args.method == "deeplift_shap":
        raise InputError(
            "deeplift_shap averages DeepLift over a set of reference inputs, which the command line does "
            "not take: call interp.methods.attribution.attribute(..., baselines=refs), or use deeplift"
        )
    if args.steps is not None and args.method not in INTEGRATING:
        raise InputError(
            f"--steps sets the integration points of {' and '.join(INTEGRATING)}; {args.method} takes none"
        )
    model = interp.load(args.model)
    inputs, what = (args.text, [repr(t) for t in args.text]) if args.text else _images(args, model)
    options: dict[str, Any] = {"seed": args.seed}
    if args.steps is not None:
        options["n_steps"] = args.steps
    result = attribute(model, inputs, args.target, args.method, layer=args.layer, neuron=args.neuron,
                       noise_tunnel=args.noise_tunnel, **options)  # fmt: skip
    print(f"{args.method} attribution on {args.model}; config {result.config}")
    for i, name in enumerate(what):
        _report(result, i, name)
    if args.html is not None:
        from interp.viz import figures_page

        tokens = result.str_tokens is not None and args.layer is None
        page = figures_page([] if tokens else [result.figure(i) for i in range(len(what))],
                            [_token_view(result, i, name) for i, name in enumerate(what)] if tokens else [])  # fmt: skip
        Path(args.html).write_text(page)
        print(f"wrote {args.html}")
    return 0


def _token_view(result: Any, i: int, name: str) -> str:
    """A text's circuitsvis colored tokens under a heading naming it and its target."""
    from html import escape

    heading = f"<h3>{escape(name)}: {escape(result.method)}, {escape(_explained(result, i))}</h3>"
    return heading + result.html(i)


def _images(args: argparse.Namespace, model: Any) -> tuple[Any, list[str]]:
    """The chosen images and a name for each: from --input, or the digits test split."""
    if args.input is None:
        if getattr(model, "input_shape", None) is None:
            raise InputError(
                f"{args.model} takes text: pass --text (or --input with images for an image model)"
            )
        from interp.commands.attack import DIGITS_MODELS
        from interp.models import zoo

        if args.model not in DIGITS_MODELS:
            raise InputError(
                f"{args.model} has no default images (the digits test split is for "
                f"{' and '.join(DIGITS_MODELS)}): pass --input, a safetensors or .npz file with x"
            )
        _, _, x, y = zoo.digits_data(0)
        source, labels = "digits test image", y
    else:
        from interp.commands.attack import read_images

        x, labels = read_images(args.input, need_labels=False)
        source = f"image of {args.input},"
    index = args.index or [0]
    if max(index) >= len(x):
        raise InputError(f"--index {max(index)} is past the {len(x)} images; pick indices below {len(x)}")
    names = [f"{source} {i}" + ("" if labels is None else f" (label {int(labels[i])})") for i in index]
    return x[index], names


def _report(result: Any, i: int, name: str) -> None:
    values = result.values[i]
    line = f"  {name}: {_explained(result, i)}, output {float(result.output[i]):.4f}, "
    line += f"sum of attributions {float(values.sum()):.4f}"
    if result.delta is not None:
        line += f", completeness error {float(result.delta[i]):.2e}"
    print(line)
    flat = values.reshape(-1)
    top = flat.abs().argsort(descending=True)[: min(TOP, len(flat))]
    if result.str_tokens is not None and result.mask is not None and values.ndim == 1:
        tokens = result.str_tokens[i]
        shown = result.token_values(i)
        order = shown.abs().argsort(descending=True)[:TOP]
        cells = [f"{tokens[j]!r} {float(shown[j]):+.4f}" for j in order]
    else:
        shape = tuple(values.shape)
        cells = [f"{_unravel(int(j), shape)} {float(flat[j]):+.4f}" for j in top]
    print(f"    most attributed: {', '.join(cells)}")


def _explained(result: Any, i: int) -> str:
    """What the attribution explains: the target output, or (``--neuron``) that unit of the layer."""
    neuron = result.config.get("neuron")  # the unit's index, one entry per axis of the layer
    if neuron is None:
        return f"target {int(result.target[i])}"
    unit = neuron[0] if len(neuron) == 1 else tuple(neuron)
    return f"neuron {unit} of {result.config['layer'][0]}"


def _unravel(index: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    out = []
    for size in reversed(shape):
        out.append(index % size)
        index //= size
    return tuple(reversed(out))
