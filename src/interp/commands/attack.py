"""``interp attack``: any attack, or its robustness curve, on an image classifier from the command line.

interp attack --model zoo:digits-cnn --attack pgd --eps 0.1 --steps 40 --out adv.safetensors
interp attack --model zoo:digits-cnn --attack apgd-ce --curve 0,0.05,0.1,0.2 --html curve.html
interp attack --model DIR --input images.safetensors --attack deepfool     # x and y tensors
interp attack --model zoo:digits-cnn --attack square --eps 0.1 --where --html where.html

The images default to the digits test split for the digits zoo models; ``--input`` takes a
safetensors (or .npz) file with ``x`` (images in the model's input range) and ``y`` (labels), or an
adversarial set saved by ``--out`` (its clean images and labels). Every result line names the
attack's config and seed; ``--out`` keeps both in the file (``interp.load_attack`` reads it).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from interp.errors import InputError

DIGITS_MODELS = ("zoo:digits-cnn", "zoo:digits-softmax")
TRAIN_IMAGES = 400  # --where on the digits: its probes fit on this many clean training images
# command-line flag -> the attack option it sets (only the ones given are passed)
FLAG_OPTIONS = {"steps": "steps", "alpha": "alpha", "norm": "norm", "restarts": "restarts",
                "target": "target", "seed": "seed", "queries": "n_queries", "c": "c", "lr": "lr",
                "n_targets": "n_targets"}  # fmt: skip
OPTION_FLAGS = {option: "--" + flag.replace("_", "-") for flag, option in FLAG_OPTIONS.items()}  # and back


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``interp attack`` on the main parser's subcommands."""
    from interp.cli import positive_int as _count  # (loaded: it is what calls this)
    from interp.methods.adversarial import ATTACK_NAMES

    attack = sub.add_parser(
        "attack",
        help="attack an image classifier (any attack), or its accuracy over eps",
        description="Run an adversarial attack and print clean and adversarial accuracy, the "
        "perturbation's size and the config with its seed; or, with --curve, accuracy at each eps.",
    )
    attack.add_argument(
        "--model", required=True, help="zoo:digits-cnn, zoo:digits-softmax, or a model interp.load reads"
    )
    attack.add_argument("--attack", required=True, choices=ATTACK_NAMES, help="the attack")
    attack.add_argument(
        "--eps", type=float, default=None, help="the budget (not for cw and deepfool: minimal attacks)"
    )
    attack.add_argument(
        "--input", default=None, help="safetensors or .npz with x and y (default: the digits test split)"
    )
    attack.add_argument("--n", type=_count, default=None, help="attack only the first N images")
    attack.add_argument(
        "--steps", type=_count, default=None, help="iterations (the attack's default if not given)"
    )
    attack.add_argument("--alpha", type=float, default=None, help="pgd: step size (default eps / 4)")
    attack.add_argument(
        "--norm",
        choices=("linf", "l2"),
        default=None,
        help="the budget's norm, where the attack has a choice",
    )
    attack.add_argument("--restarts", type=_count, default=None, help="random restarts")
    attack.add_argument("--target", type=_target, default=None,
                        help="targeted attacks: a class, 'random' or 'least-likely'")  # fmt: skip
    attack.add_argument(
        "--seed", type=int, default=None, help="seeds the random starts and target='random' (default 0)"
    )
    attack.add_argument("--queries", type=_count, default=None, help="square, autoattack: the query budget")
    attack.add_argument("--c", type=float, default=None, help="cw: the weight of the misclassification term")
    attack.add_argument("--lr", type=float, default=None, help="cw: Adam's learning rate")
    attack.add_argument("--n-targets", type=_count, default=None, help="apgd-t, fab-t: target classes tried")
    attack.add_argument(
        "--out", default=None, help="save the adversarial set (safetensors, config and seed inside)"
    )
    attack.add_argument("--curve", type=_budgets, default=None, help="comma-separated eps: accuracy at each")
    attack.add_argument("--where", action="store_true",
                        help="where inside the model the attack bites: per hook point, the activations' "
                        "divergence, linear-probe accuracy clean vs adversarial, and the accuracy that "
                        "patching in that layer's clean activations restores")  # fmt: skip
    attack.add_argument("--html", default=None, help="write the plots of --where and --curve to this page")
    # library messages name keywords; the command's errors name its flags (cli.in_flags)
    attack.set_defaults(run=run, flags=OPTION_FLAGS)


def _target(text: str) -> int | str:
    if text in ("random", "least-likely"):
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a class index, 'random' or 'least-likely', got {text!r}"
        ) from None


def _budgets(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers such as 0,0.05,0.1, got {text!r}"
        ) from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one eps, such as 0,0.05,0.1")
    return values


def run(args: argparse.Namespace) -> int:
    from interp.methods import adversarial as A

    _check_paths(args)
    model = _model(args.model)
    x, y, source, train = _images(args.input, args.model)
    if args.n is not None:
        x, y = x[: args.n], y[: args.n]
    if args.where and train is None:  # the probes split these images: enough of each class, checked now
        from interp.methods.probing import check_class_counts

        check_class_counts(A.class_labels(y, "labels", "cpu"))
    options = {
        option: getattr(args, flag)
        for flag, option in FLAG_OPTIONS.items()
        if getattr(args, flag) is not None
    }
    _check_flags(args.attack, options)
    minimal = args.attack in A.MIN_NORM_ATTACKS
    if args.curve is None and args.eps is None and not minimal:
        raise InputError(f"{args.attack} needs --eps, the perturbation budget (or --curve for several)")
    where = f"{args.model}, {len(x)} {source}"
    figures = []
    if args.eps is not None or minimal and args.curve is None:
        with _bar(args.attack) as progress:
            atk = A.run_attack(args.attack, model, x, y, None if minimal else args.eps, **options,
                               **_with_progress(args.attack, progress))  # fmt: skip
        _report(atk, where)
        if args.out is not None:
            print(f"wrote {atk.save(args.out)} (images, labels and the config with its seed; "
                  "interp.load_attack reads it)")  # fmt: skip
        if args.where:
            figures.append(_where(A.attack_probe(model, atk, train=train), train is not None))
    if args.curve is not None:
        with _bar(f"{args.attack} over eps") as progress:
            curve = A.robustness_curve(model, x, y, args.curve, args.attack, progress=progress, **options)
        given = curve.config or "none"
        print(f"\naccuracy under {args.attack} on {where}; options {given} (the rest: the attack's defaults)")
        for eps, acc in zip(curve.eps, curve.accuracy, strict=True):
            print(f"  eps {eps:<8g} accuracy {acc:.3f}")
        figures.append(curve.figure())
    if args.html is not None:
        from interp.viz import figures_page

        Path(args.html).write_text(figures_page(figures))
        print(f"wrote {args.html}")
    return 0


def _check_flags(attack: str, options: dict[str, Any]) -> None:
    """A flag the attack does not take, named as the flag (the library names its keyword)."""
    from interp.methods.adversarial import MIN_NORM_ATTACKS, attack_options

    takes = set(attack_options(attack))
    for option in options:
        if option not in takes:
            usable = [] if attack in MIN_NORM_ATTACKS else ["--eps"]
            usable += [flag for o, flag in OPTION_FLAGS.items() if o in takes]
            raise InputError(f"{attack} takes no {OPTION_FLAGS[option]}; its flags are {', '.join(usable)}")


def _where(probe: Any, on_train: bool) -> Any:
    """Print, per hook point, where the attack bites; return the probe's figure."""
    fit = (f"fit on {TRAIN_IMAGES} clean training images, scored on the attacked ones" if on_train
           else "fit on a seeded half of the clean images, scored on the other half")  # fmt: skip
    print(f"\nwhere it bites (linear probes {fit}):")
    width = max(len(n) for n in probe.names)
    top = f"top {probe.config['topk_frac']:.0%} units"
    print(f"  {'hook point':<{width}}  divergence  probe clean  probe adv  restored: layer  {top}")
    shown = lambda v, w: f"{'n/a':>{w}}" if math.isnan(v) else f"{v:{w}.3f}"  # noqa: E731
    for i, name in enumerate(probe.names):
        print(f"  {name:<{width}}  {probe.divergence[i].item():10.3f}  {probe.probe_acc_clean[i].item():11.3f}"
              f"  {probe.probe_acc_adv[i].item():9.3f}  {shown(probe.restoration[i].item(), 15)}"
              f"  {shown(probe.restoration_topk[i].item(), len(top))}")  # fmt: skip
    print(
        "  (restored: the share of the accuracy the attack took that patching clean activations there gives back)"
    )
    if math.isnan(probe.restoration.sum().item()):
        print("  (n/a: the attack took no accuracy, so there is none to give back; raise --eps or --steps)")
    return probe.figure()


def _check_paths(args: argparse.Namespace) -> None:
    """The cheap checks first, before the model loads."""
    from interp.cli import check_output_file

    if args.input is not None and not Path(args.input).is_file():
        raise InputError(f"--input {args.input!r} is not a file. Check the path.")
    if args.html is not None and args.curve is None and not args.where:
        raise InputError(
            "--html writes the plots of --where and --curve: pass one of them (e.g. --curve 0,0.05,0.1)"
        )
    if args.where and args.eps is None and args.attack not in ("cw", "deepfool"):
        raise InputError("--where looks inside the model under one attack: pass --eps")
    for flag in ("out", "html"):
        check_output_file(flag, getattr(args, flag))
    if args.eps is not None and args.attack in ("cw", "deepfool"):
        raise InputError(
            f"{args.attack} looks for the smallest perturbation and takes no --eps; "
            "--curve 0,0.5,1 reads its accuracy within each L2 budget"
        )
    if args.out is not None and args.eps is None and args.attack not in ("cw", "deepfool"):
        raise InputError("--out saves one attack: pass --eps (the curve's runs are not saved)")


def _model(spec: str):
    import interp

    if spec in DIGITS_MODELS:  # the shipped checkpoint, or (none shipped) the recipe trained once
        from interp.reproductions.adversarial import load_digits_model

        return load_digits_model(spec.removeprefix("zoo:"))
    return interp.load(spec)


def _images(path: str | None, spec: str) -> tuple[Any, Any, str, tuple[Any, Any] | None]:
    """``(x, y, what they are, clean training images for probes)``: from ``path`` (no training
    images), or the digits test split for a digits model (with TRAIN_IMAGES of its training split)."""
    if path is None:
        if spec not in DIGITS_MODELS:
            raise InputError(f"{spec} has no default images: pass --input, a safetensors file with x and y")
        from interp.models import zoo

        x_train, y_train, x, y = zoo.digits_data(0)
        return x, y, "digits test images", (x_train[:TRAIN_IMAGES], y_train[:TRAIN_IMAGES])
    x, y = read_images(path)
    return x, y, f"images from {path}", None


def _read_npz(path: str) -> dict[str, Any]:
    """The arrays of an .npz archive as tensors; InputError for anything else (a bare .npy, pickles)."""
    import numpy as np
    import torch

    try:
        data = np.load(path, allow_pickle=False)
    except ValueError as err:  # numpy reads anything it cannot parse as a pickle, which is never loaded
        raise InputError(f"--input {path!r} is not an .npz archive of numeric arrays (numpy would need "
                         "pickle to read it, which is never used); save x and y with np.savez(path, x=..., y=...)") from err  # fmt: skip
    except (OSError, EOFError) as err:
        raise InputError(f"--input {path!r} is not a readable .npz archive ({err})") from err
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise InputError(
            f"--input {path!r} is one array, not an .npz archive; save x and y with np.savez(path, x=..., y=...)"
        )
    with data:
        try:
            return {k: torch.from_numpy(data[k]) for k in data.files}
        except (ValueError, TypeError) as err:  # object arrays inside the archive
            raise InputError(f"--input {path!r} holds non-numeric (object) arrays; save numeric x and y "
                             "with np.savez(path, x=..., y=...)") from err  # fmt: skip


def read_images(path: str, need_labels: bool = True) -> tuple[Any, Any]:
    """``(x, y)`` from a safetensors or .npz file holding ``x`` and ``y`` (or ``labels``, as a set
    saved by ``--out`` does); ``y`` is None where the file has none and ``need_labels`` is False."""
    if path.endswith((".npy", ".pt", ".pth", ".pkl", ".pickle")):
        raise InputError(
            f"--input {path!r}: {Path(path).suffix} files are not read (a .pt or pickle could run code); "
            "save x and y with safetensors.torch.save_file, or numpy.savez(path, x=..., y=...)"
        )
    if path.endswith(".npz"):
        tensors = _read_npz(path)
    else:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(path)
        except (SafetensorError, OSError) as err:
            raise InputError(f"--input {path!r} is not a safetensors file ({err}); "
                             "save x and y with safetensors.torch.save_file") from err  # fmt: skip
    labels = "y" if "y" in tensors else "labels"
    if "x" not in tensors or (need_labels and labels not in tensors):
        need = "x (images) and y (labels)" if need_labels else "x (images)"
        raise InputError(f"--input {path!r} holds {sorted(tensors)}; it needs {need}")
    return tensors["x"], tensors.get(labels)


def _with_progress(name: str, progress: Any) -> dict[str, Any]:
    from interp.methods.adversarial import attack_options

    return {"progress": progress} if "progress" in attack_options(name) else {}


class _bar:
    """A tqdm bar driven by an attack's ``progress(done, total)``; made on the first call."""

    def __init__(self, label: str) -> None:
        self.label, self.bar = label, None

    def __enter__(self):
        return self

    def __call__(self, done: int, total: int) -> None:
        from tqdm.auto import tqdm

        if self.bar is None:
            self.bar = tqdm(total=total, desc=self.label)
        self.bar.total = total
        self.bar.update(done - self.bar.n)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()


def _short(value: Any) -> Any:
    """A config value as printed: a long per-image list (DeepFool's steps_used) as its summary."""
    if isinstance(value, list | tuple) and len(value) > 8:
        return f"[{len(value)} values, {min(value)} to {max(value)}]"
    return value


def _report(atk: Any, where: str) -> None:
    norms = atk.norms()
    cfg = {k: _short(v) for k, v in atk.config.items() if v is not None}
    print(f"{atk.config['attack']} on {where}")
    print(f"  clean accuracy        {atk.accuracy_clean:.3f}")
    print(f"  adversarial accuracy  {atk.accuracy_adv:.3f}")
    of = (f"of the {atk.n_attackable} not already classified as their target, the share that reached it"
          if atk.target is not None else f"of the {atk.n_attackable} classified correctly, the share misclassified")  # fmt: skip
    print(f"  success rate          {atk.success_rate:.3f}  ({of})")
    for norm, label in (("linf", "L∞"), ("l2", "L2")):
        values = norms[norm]
        print(
            f"  perturbation {label:3s}      median {values.median().item():.4f}  max {values.max().item():.4f}"
        )
    print(f"  config {cfg}")
