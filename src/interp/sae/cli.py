"""``interp sae train`` and ``interp sae eval``: the dictionary layer on the command line.

interp sae train --model M --hook H --data FILE|CAPTURE_DIR --arch topk --k 32 --d-sae 4096 --tokens N --out DIR
interp sae eval  --model M --sae DIR --data FILE [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import typing
from dataclasses import MISSING, fields
from pathlib import Path

from interp.sae.training import TRAINABLE, TrainConfig

# TrainConfig fields declared as flags of their own (with their own help), not generated
OWN_FLAGS = ("hook", "hook_out", "arch")
# what each TrainConfig field's flag means (the training module's docstring has the recipes)
FLAG_HELP = {
    "d_sae": "dictionary size",
    "k": "latents per token (topk, batchtopk)",
    "l1_coefficient": "sparsity penalty's weight (standard: L1, jumprelu: L0)",
    "lr": "Adam's learning rate",
    "tokens": "activations to train on (steps = tokens // batch size)",
    "batch_size": "activations per step, all the processes' together",
    "seed": "seeds the initialisation and the shuffle",
    "lr_warmup_steps": "steps over which the learning rate warms up from 0",
    "lr_decay_steps": "last steps over which the learning rate decays to 0",
    "l1_warmup_steps": "steps over which the sparsity penalty warms up from 0",
    "aux_k": "dead latents in the AuxK loss (topk, batchtopk)",
    "aux_coefficient": "the AuxK loss's weight",
    "dead_after_tokens": "a latent that fires on none of this many tokens is dead",
    "resample_every": "steps between resamplings of dead latents (all but topk and batchtopk; 0: never)",
    "checkpoint_every": "steps between checkpoints in --out (0: none); rerun the command to resume",
    "buffer_batches": "batches in the shuffle buffer",
    "model_batch_size": "inputs per forward pass, when --data holds model inputs",
    "threshold_lr": "batchtopk: rate of the inference threshold's moving average",
    "b_dec_init": "decoder bias' start: mean (of the first batch) or zeros",
    "jumprelu_bandwidth": "jumprelu: width of the threshold's straight-through kernel",
    "jumprelu_init_threshold": "jumprelu: the threshold's initial value",
    "data_lanes": "parts the data is read in (a resume keeps its run's); the same seed, batch size "
    "and lanes give the same weights on any number of processes up to it",
}


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``interp sae ...`` on the main parser's subcommands."""
    sae = sub.add_parser("sae", help="train and evaluate sparse dictionaries (SAELens format)")
    sae_sub = sae.add_subparsers(title="sae commands", metavar="SAE_COMMAND")

    train = sae_sub.add_parser("train", help="train an SAE or transcoder on a model's activations")
    train.add_argument("--model", required=True, help="model name or path (as for interp.load)")
    train.add_argument("--hook", required=True, help="hook to read (e.g. blocks.0.hook_resid_post)")
    train.add_argument("--hook-out", default=None, help="transcoders: the hook to predict")
    train.add_argument("--data", required=True, help="a capture dir, or a text/jsonl/npy/safetensors file")
    train.add_argument("--arch", default="topk", choices=TRAINABLE, help="the dictionary (default: topk)")
    _add_config_flags(train)
    train.add_argument("--out", required=True, help="run directory (checkpoint/, final/, history.json)")
    train.set_defaults(run=_train)

    evaluate = sae_sub.add_parser("eval", help="SAELens's run_evals metrics for a dictionary on a model")
    evaluate.add_argument("--model", required=True)
    evaluate.add_argument(
        "--sae", required=True, help="an SAE directory (cfg.json + sae_weights.safetensors)"
    )
    evaluate.add_argument("--data", required=True, help="a text/jsonl file or token ids")
    evaluate.add_argument(
        "--unverified", action="store_true", help="load a dir with no sha256 sidecar (written by SAELens)"
    )
    evaluate.add_argument("--ablation", default="zero", choices=["zero", "mean"])
    evaluate.add_argument("--json", default=None, help="also write the full result here")
    evaluate.set_defaults(run=_eval)


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per ``TrainConfig`` field (``--name-with-dashes``), typed as the field is. A flag
    left out passes nothing, so the library's default (shown in the help) applies."""
    types = typing.get_type_hints(TrainConfig)
    for field in fields(TrainConfig):
        assert types[field.name] is not bool, f"{field.name}: a bool field needs a store_true flag"
        if field.name in OWN_FLAGS:
            continue
        kind = next(
            t for t in typing.get_args(types[field.name]) or (types[field.name],) if t is not type(None)
        )
        assert field.default is not MISSING, field.name
        default = {"data_lanes": "the number of processes", "aux_k": "d_in // 2"}.get(
            field.name, field.default
        )
        parser.add_argument(
            "--" + field.name.replace("_", "-"),
            type=kind,
            default=None,
            metavar=kind.__name__.upper(),
            help=f"{FLAG_HELP[field.name]} (default: {default})",
        )


def _config_options(args: argparse.Namespace) -> dict:
    """The ``TrainConfig`` fields given on the command line."""
    names = [f.name for f in fields(TrainConfig) if f.name not in OWN_FLAGS]
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def _data(path: str):
    if (Path(path) / "manifest.json").is_file():
        return path
    from interp.store import read_inputs

    return read_inputs(path)


def _train(args: argparse.Namespace) -> int:
    import interp
    from interp import sae as S
    from interp.distributed import process_group

    with process_group() as ctx:  # under torchrun: one rank of a data-parallel (DDP) run
        model = interp.load(args.model)
        options = {"hook_out": args.hook_out} if args.hook_out else {}
        sae = S.train(model, args.hook, _data(args.data), arch=args.arch, out=args.out,
                      **options, **_config_options(args))  # fmt: skip
    last = sae.history[-1] if sae.history else {}
    if ctx.is_main:
        print(
            f"wrote {Path(args.out) / 'final'}: {sae.cfg.architecture}, d_sae={sae.cfg.d_sae}, last step {last}"
        )
    return 0


def _eval(args: argparse.Namespace) -> int:
    import interp
    from interp import sae as S

    model = interp.load(args.model)
    sae = S.load(args.sae, verify=not args.unverified)
    result = S.evaluate(model, sae, _data(args.data), ablation=args.ablation)
    width = max(len(k) for k in result)
    for key, value in result.items():
        print(f"{key:<{width}}  {value:.6g}")
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_dict(), indent=1) + "\n", encoding="utf-8")
    return 0
