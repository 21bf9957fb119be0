"""``interp visualize``: feature visualization from the command line, images or tokens.

interp visualize --model zoo:digits-cnn --objective conv2.hook_out:0-7 --html units.html
interp visualize --model zoo:digits-cnn --objective output:3 --param fourier --steps 512
interp visualize --model minilm --objective blocks.2.mlp.hook_pre:10,11 --length 6

An image model optimizes its input (``featureviz.render``: "layer:unit" objectives, the pixel,
Fourier or CPPN parameterization, lucent's transforms); a transformer optimizes input embeddings
and reads each position out as its nearest token (``featureviz.render_tokens``). Each unit prints
its score, with the seed and settings that reproduce it.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from interp.errors import InputError

STUCK = 1e-4  # a unit whose optimized score is this close to 0 is reported as stuck


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``interp visualize`` on the main parser's subcommands."""
    from interp.cli import positive_float, positive_int

    cmd = sub.add_parser(
        "visualize",
        help="optimize inputs that excite a unit: images for CNNs, tokens for transformers",
        description="Feature visualization: 'layer:unit' objectives ('conv2.hook_out:3', "
        "'conv2.hook_out:0-7', 'output:3' for a class logit).",
    )
    cmd.add_argument("--model", required=True, help="zoo:digits-cnn, minilm, or a model interp.load reads")
    cmd.add_argument("--objective", required=True, help="'layer:unit', units as 3, 0,4,9 or 0-7")
    cmd.add_argument("--param", choices=("pixel", "fourier", "cppn"), default=None,
                     help="images: the parameterization (default pixel)")  # fmt: skip
    cmd.add_argument("--transforms", choices=("standard", "lucent", "none"), default=None,
                     help="images: the random transforms each step (default standard)")  # fmt: skip
    cmd.add_argument("--steps", type=positive_int, default=None,
                     help="Adam steps (default: 256 for images, 128 for tokens)")  # fmt: skip
    cmd.add_argument(
        "--lr", type=positive_float, default=None, help="Adam's learning rate (default: the method's)"
    )
    cmd.add_argument(
        "--length", type=positive_int, default=None, help="transformers: tokens per sequence (default 8)"
    )
    cmd.add_argument("--seed", type=int, default=0, help="seeds the initialization and the transforms")
    cmd.add_argument("--html", default=None, help="images: draw them on this page (opens offline)")
    # library messages name keywords; the command's errors name its flags (cli.in_flags)
    cmd.set_defaults(
        run=run,
        flags={
            "lr": "--lr",
            "steps": "--steps",
            "length": "--length",
            "seed": "--seed",
            "param": "--param",
            "transforms": "--transforms",
        },
    )


def run(args: argparse.Namespace) -> int:
    import interp
    from interp.cli import check_output_file

    check_output_file("html", args.html)
    model = interp.load(args.model)
    tokens = getattr(model, "input_shape", None) is None  # a transformer: optimize embeddings
    result = _tokens(model, args) if tokens else _images(model, args)
    if args.html is not None:
        from interp.viz import figures_page

        Path(args.html).write_text(figures_page([result.figure()]))
        print(f"wrote {args.html}")
    return 0


def _images(model: Any, args: argparse.Namespace) -> Any:
    from interp.methods import featureviz as fv

    if args.length is not None:
        raise InputError(
            "--length sets a transformer's tokens per sequence; an image model's input has its own shape"
        )
    options: dict[str, Any] = {"param": args.param or "pixel", "seed": args.seed, "progress": True}
    options["transforms"] = {"standard": "standard", "lucent": fv.lucent_transforms(), "none": None}[
        args.transforms or "standard"
    ]
    if args.steps is not None:
        options["steps"] = args.steps
    if args.lr is not None:
        options["lr"] = args.lr
    result = fv.render(model, args.objective, **options)
    print(f"{result.objective} on {args.model}; config {_printable(result.config)}")
    for i, score in enumerate(result.scores.tolist()):
        print(f"  image {i}: objective {score:.4f}")
    return result


def _tokens(model: Any, args: argparse.Namespace) -> Any:
    from interp.methods import featureviz as fv

    if args.html is not None:
        raise InputError("--html draws optimized images; a transformer's result is tokens, printed here")
    given = [f"--{flag}" for flag in ("param", "transforms") if getattr(args, flag) is not None]
    if given:
        raise InputError(
            f"{' and '.join(given)} shape an optimized image; a transformer's units are optimized over "
            "its input embeddings (--length, --steps, --lr, --seed apply)"
        )
    layer, sep, units = args.objective.rpartition(":")
    if not sep:
        raise InputError(
            f"an objective is 'layer:unit' such as 'blocks.2.mlp.hook_post:10', got {args.objective!r}"
        )
    try:
        unit_list = fv.parse_units(units)
    except ValueError:
        raise InputError(
            f"the part after ':' must be unit indices ('3', '0,4,9' or '0-7'), got {units!r}"
        ) from None
    options: dict[str, Any] = {"length": args.length or 8, "seed": args.seed}
    if args.steps is not None:
        options["steps"] = args.steps
    if args.lr is not None:
        options["lr"] = args.lr
    result = fv.render_tokens(model, layer, unit_list, **options)
    print(f"{layer} on {args.model}; config {_printable(result.config)}")
    for i, unit in enumerate(unit_list):
        print(f"  unit {unit}: {' '.join(result.str_tokens[i])!r}  score on the embeddings "
              f"{float(result.scores[i]):.4f}, on these tokens {float(result.token_scores[i]):.4f}")  # fmt: skip
        if abs(float(result.scores[i])) < STUCK:
            print(f"    stuck at 0: the optimization ran into a flat region of the activation (GELU's "
                  f"negative tail, a dead ReLU); try the hook before it (e.g. {_before(layer)}:{unit})")  # fmt: skip
    return result


def _before(layer: str) -> str:
    """The pre-activation hook of an MLP's post-activation hook (else the layer itself)."""
    return layer.replace("hook_post", "hook_pre") if layer.endswith("mlp.hook_post") else layer


def _printable(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if v is not None}
