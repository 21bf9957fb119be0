"""``interp sae train`` and ``interp sae eval``: the dictionary layer on the command line.

interp sae train --model M --hook H --data FILE|CAPTURE_DIR --arch topk --k 32 --d-sae 4096 --tokens N --out DIR
interp sae eval  --model M --sae DIR --data FILE [--json OUT]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``interp sae ...`` on the main parser's subcommands."""
    sae = sub.add_parser("sae", help="train and evaluate sparse dictionaries (SAELens format)")
    sae_sub = sae.add_subparsers(title="sae commands", metavar="SAE_COMMAND")

    train = sae_sub.add_parser("train", help="train an SAE or transcoder on a model's activations")
    train.add_argument("--model", required=True, help="model name or path (as for interp.load)")
    train.add_argument("--hook", required=True, help="hook to read (e.g. blocks.0.hook_resid_post)")
    train.add_argument("--hook-out", default=None, help="transcoders: the hook to predict")
    train.add_argument("--data", required=True, help="a capture dir, or a text/jsonl/npy/safetensors file")
    train.add_argument(
        "--arch", default="topk", help="standard, topk, batchtopk, transcoder, skip_transcoder"
    )
    train.add_argument("--d-sae", type=int, default=1024)
    train.add_argument("--k", type=int, default=32)
    train.add_argument("--tokens", type=int, default=1_000_000)
    train.add_argument("--batch-size", type=int, default=4096)
    train.add_argument("--lr", type=float, default=3e-4)
    train.add_argument("--l1-coefficient", type=float, default=5.0)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--checkpoint-every", type=int, default=100)
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
        sae = S.train(
            model,
            args.hook,
            _data(args.data),
            arch=args.arch,
            d_sae=args.d_sae,
            k=args.k,
            out=args.out,
            tokens=args.tokens,
            batch_size=args.batch_size,
            lr=args.lr,
            l1_coefficient=args.l1_coefficient,
            seed=args.seed,
            checkpoint_every=args.checkpoint_every,
            **options,
        )
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
