"""``interp``: the command line, a thin layer over the library.

interp models                               what can be loaded
interp hooks MODEL [--filter GLOB]          hook names and shapes
interp capture --model M --hooks PATTERN --input FILE --out DIR
interp explore                              the Streamlit explorer at http://localhost:8501
interp zoo list | interp zoo train NAME     the models trained here
interp reproduce FINDING                    published findings, paper vs ours
interp sae train ... | interp sae eval ...  sparse dictionaries (SAELens format)
interp attack --model M --attack A --eps E  an adversarial attack, or its curve over eps (--curve)
interp attribute --model M --method ig      attribution maps (captum's methods), to input or a layer
interp visualize --model M --objective L:U  feature visualization: optimized images or tokens
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from interp.errors import InputError, InterpError

REPO_ROOT = Path(__file__).resolve().parents[2]


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = sys.argv[1:] if argv is None else list(argv)
    # `interp explore` only starts streamlit: importing the sae commands (torch) first would add
    # seconds to the explorer's cold start
    parser = _parser(with_sae=argv[:1] != ["explore"])
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 0
    try:
        return args.run(args) or 0
    except InterpError as err:
        return _fail(in_flags(str(err), getattr(args, "flags", {})))
    except (
        PermissionError,
        FileExistsError,
        NotADirectoryError,
        IsADirectoryError,
        FileNotFoundError,
    ) as err:
        # a path the user gave that cannot be used (read-only, a file where a folder belongs, ...)
        where = f" {err.filename!r}" if getattr(err, "filename", None) else ""
        return _fail(f"cannot use the path{where}: {err.strerror or err}. Pass a path you can write to.")
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def in_flags(message: str, flags: dict[str, str]) -> str:
    """A library message in the command's terms: each ``keyword=`` the command has a flag for
    becomes that flag (``layer=`` -> ``--layer``), and ``model.hook_names`` the command that lists them."""
    import re

    for keyword, flag in flags.items():
        # a bare ``keyword=`` names the option; ``keyword=value`` (a setting quoted) is left alone
        message = re.sub(rf"\b{re.escape(keyword)}=(?![\w(\[{{'\"-])", flag, message)
    listed = "`interp hooks MODEL`"
    return message.replace("`model.hook_names`", listed).replace("model.hook_names", listed)


def _fail(message: str) -> int:
    """Print one line (the first of the message, so nothing multi-line reads like a traceback); exit 2."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    print(f"error: {' '.join(lines) if lines else 'failed'}", file=sys.stderr)
    return 2


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (argparse reports anything else with exit 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (a learning rate, a scale)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return value


def check_output_file(flag: str, path: str | None) -> None:
    """A file path the command will write (``--html``, ``--out``): its folder must exist and it must
    not be a folder itself. Checked before the work starts, so none of it is lost."""
    if path is None:
        return
    if Path(path).is_dir():
        raise InputError(f"--{flag} {path!r} is a folder; give a file path in it instead")
    if not Path(path).resolve().parent.is_dir():
        raise InputError(f"--{flag} {path!r}: its folder does not exist. Create it or pick another path.")


def _port(text: str) -> int:
    value = positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"a port is at most 65535, got {value}")
    return value


def _parser(with_sae: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="interp", description="A mechanistic-interpretability workbench.")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")

    models = sub.add_parser("models", help="list the models that can be loaded by name")
    models.set_defaults(run=_models)

    hooks = sub.add_parser("hooks", help="list a model's hook names with their shapes")
    hooks.add_argument("model", help="minilm, zoo:NAME, or a local model directory")
    hooks.add_argument(
        "--filter", default=None, help="a glob over hook names, e.g. 'blocks.*.hook_resid_post'"
    )
    hooks.set_defaults(run=_hooks)

    capture = sub.add_parser("capture", help="stream named activations over a dataset to Arrow shards")
    capture.add_argument("--model", required=True, help="minilm, zoo:NAME, or a local model directory")
    capture.add_argument(
        "--hooks", required=True, action="append", help="hook name, glob or re:REGEX (repeatable)"
    )
    capture.add_argument(
        "--input", required=True, help=".txt (one text per line), .jsonl (text field), .npy or .safetensors"
    )
    capture.add_argument(
        "--out", required=True, help="output directory (resumes if it holds a partial capture)"
    )
    capture.add_argument("--batch-size", type=positive_int, default=16)
    capture.add_argument(
        "--no-resume", action="store_true", help="overwrite an existing capture instead of resuming"
    )
    capture.add_argument(
        "--device",
        default="cpu",
        help="where the model runs: cpu, cuda (under torchrun: each rank's cuda:LOCAL_RANK), cuda:N",
    )
    capture.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="under torchrun: seconds to reach MASTER_ADDR, and without a heartbeat from another rank, "
        "before giving up (default 600)",
    )
    capture.set_defaults(run=_capture)

    explore = sub.add_parser("explore", help="open the Streamlit explorer")
    explore.add_argument("--port", type=_port, default=8501)
    explore.set_defaults(run=_explore)

    zoo = sub.add_parser("zoo", help="the models trained here")
    zoo_sub = zoo.add_subparsers(title="zoo commands", metavar="ZOO_COMMAND")
    zoo.set_defaults(run=lambda _args: zoo.print_help() or 0)  # `interp zoo` alone: its own help
    zoo_list = zoo_sub.add_parser("list", help="list zoo models and their recorded metrics")
    zoo_list.set_defaults(run=_zoo_list)
    zoo_train = zoo_sub.add_parser(
        "train", help="retrain a zoo model from scratch (writes safetensors + JSON)"
    )
    zoo_train.add_argument("name")
    zoo_train.add_argument(
        "--out", default=None, help="directory for the checkpoint (default: the shipped one)"
    )
    zoo_train.add_argument("--fast", action="store_true", help="the small-budget variant used by the tests")
    zoo_train.add_argument(
        "--restart",
        action="store_true",
        help="ignore a saved training state (long recipes save one every minute) and start from scratch",
    )
    zoo_train.set_defaults(run=_zoo_train)

    reproduce = sub.add_parser(
        "reproduce", help="reproduce a published finding: paper vs ours, exit 1 on a miss"
    )
    reproduce.add_argument("finding", help="induction, grokking, superposition, ...")
    reproduce.add_argument("--fast", action="store_true", help="small budgets, same checks, looser bounds")
    reproduce.add_argument("--out", default=None, help="report directory (default: reports/FINDING)")
    reproduce.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="worker processes for a finding that retrains independent models (clock-pizza); default: one per core",
    )
    reproduce.set_defaults(run=_reproduce)

    if with_sae:
        from interp.sae.cli import add_commands as add_sae_commands  # interp sae train | eval

        add_sae_commands(sub)
        from interp.commands.attack import add_commands as add_attack_commands  # interp attack

        add_attack_commands(sub)
        from interp.commands.attribute import add_commands as add_attribute_commands  # interp attribute

        add_attribute_commands(sub)
        from interp.commands.visualize import add_commands as add_visualize_commands  # interp visualize

        add_visualize_commands(sub)
    return parser


def _models(args: argparse.Namespace) -> int:
    from interp.models import available_models

    rows = available_models()
    width = max(len(r["name"]) for r in rows)
    for row in rows:
        print(f"{row['name']:<{width}}  {row['kind']:<11}  {row['description']}")
    print("\nLoad any of them with interp.load(NAME) or --model NAME.")
    return 0


def _hooks(args: argparse.Namespace) -> int:
    import interp

    model = interp.load(args.model)
    names = model.resolve(args.filter) if args.filter else model.hook_names
    shapes = model.hook_shapes
    width = max(len(n) for n in names)
    for name in names:
        shape = shapes[name]
        print(f"{name:<{width}}  {'?' if shape is None else '(' + ', '.join(map(str, shape)) + ')'}")
    return 0


def _capture(args: argparse.Namespace) -> int:
    import interp
    from interp.checks import writable_dir
    from interp.store import capture_to_disk, read_inputs

    writable_dir(args.out, "--out directory")  # the cheap checks first: before loading the model
    if not Path(args.input).is_file():
        raise InterpError(f"--input {args.input!r} is not a file. Check the path.")
    from interp.distributed import DEFAULT_TIMEOUT, process_group

    timeout = DEFAULT_TIMEOUT if args.timeout is None else args.timeout
    with process_group(timeout) as ctx:  # under torchrun: one rank of a data-parallel capture
        device = f"cuda:{ctx.local_rank}" if args.device == "cuda" and ctx.distributed else args.device
        model = interp.load(args.model, device=device)
        hooks = model.resolve(args.hooks)  # a bad pattern fails before the inputs are read
        dataset = capture_to_disk(
            model,
            read_inputs(args.input),
            hooks,
            args.out,
            batch_size=args.batch_size,
            resume=not args.no_resume,
            timeout=timeout,
        )
    if ctx.is_main:
        print(f"wrote {len(dataset)} rows with {len(dataset.column_names)} columns to {args.out}")
    return 0


def _explore(args: argparse.Namespace) -> int:
    home = REPO_ROOT / "apps" / "Home.py"
    serve = REPO_ROOT / "apps" / "serve.py"  # streamlit run Home.py, loading the default model meanwhile
    if not home.exists() or not serve.exists():
        raise InterpError(
            f"the explorer's pages are not at {home}; run `interp explore` from a source checkout"
        )
    command = [
        sys.executable, str(serve),
        "--server.port", str(args.port), "--server.headless", "true", "--browser.gatherUsageStats", "false",
    ]  # fmt: skip
    print(f"interp explorer: http://localhost:{args.port}")
    return subprocess.call(command)


def _zoo_list(args: argparse.Namespace) -> int:
    from interp.models import zoo

    for entry in zoo.describe():
        mark = (
            ""
            if entry.get("has_checkpoint")
            else "  (no checkpoint: run `interp zoo train " + entry["name"] + "`)"
        )
        print(f"zoo:{entry['name']:<18} {entry['kind']:<11} {entry['description']}{mark}")
        if entry["metrics"]:
            print("    recorded: " + ", ".join(f"{k} {v:.4g}" for k, v in entry["metrics"].items()))
    _zoo_list_dictionaries()
    return 0


def _zoo_list_dictionaries() -> None:
    from interp.sae import zoo_recipes

    for entry in zoo_recipes.describe():
        mark = "" if entry["has_checkpoint"] else f"  (no checkpoint: run `interp zoo train {entry['name']}`)"
        print(f"zoo:{entry['name']:<18} {'dictionary':<11} {entry['description']}{mark}")
        if entry["metrics"]:
            print("    recorded: " + ", ".join(f"{k} {v:.4g}" for k, v in entry["metrics"].items()))


def _zoo_train(args: argparse.Namespace) -> int:
    import json

    from interp.models import zoo
    from interp.sae import zoo_recipes

    if args.name in zoo_recipes.DICTIONARY_NAMES:  # a zoo dictionary (src/interp/sae/zoo/NAME)
        record = zoo_recipes.train_dictionary(args.name, args.out, fast=args.fast, progress=True)
        print(json.dumps(record["metrics"], indent=2, default=str))
        return 0
    # zoo.train checks the name and that the output directory is writable before it trains
    meta = zoo.train(args.name, args.out, fast=args.fast, progress=True, resume=not args.restart)
    print(json.dumps(meta.get("metrics", meta), indent=2, default=str))
    return 0


def _reproduce(args: argparse.Namespace) -> int:
    from interp import reproductions
    from interp.checks import writable_dir

    if args.out is not None:
        writable_dir(args.out, "--out directory")
    report = reproductions.run(args.finding, fast=args.fast, out_dir=args.out, jobs=args.jobs)
    return 0 if report.passed else 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
