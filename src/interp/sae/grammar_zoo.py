"""The shipped transcoders of ``zoo:grammar-4l``: one per MLP, for attribution graphs.

Each ``grammar-4l-tc-l{L}`` reads the MLP's input ``blocks.L.mlp.hook_in`` (the ln2 output) and
predicts its output ``blocks.L.hook_mlp_out``, as circuit-tracer's transcoders do. They are trained
with :func:`interp.sae.train` (``arch="transcoder"``: ReLU latents, L1 penalty weighted by decoder
norms) on activations of the model on seeded grammar text (:func:`interp.models.zoo.grammar.packed_batch`
with a data seed of its own), evaluated with :func:`interp.sae.evaluate` on held-out text, and written
to ``src/interp/sae/zoo/NAME/`` with the recipe and the evaluation in ``cfg.json``'s metadata
(``metadata["training"]``, ``metadata["evaluation"]``).

Retrain them all (a few CPU-minutes)::

    OMP_NUM_THREADS=1 python -m interp.sae.grammar_zoo            # writes the shipped folders
    OMP_NUM_THREADS=1 python -m interp.sae.grammar_zoo --out /tmp/tc --fast

Load one with ``interp.sae.load("zoo:grammar-4l-tc-l0")``.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Any

import torch

MODEL = "grammar-4l"
RECIPE: dict[str, Any] = {
    "d_sae": 1024,
    "l1_coefficient": 4.0,
    "lr": 1e-3,
    "tokens": 400_000,
    "batch_size": 1024,
    "lr_warmup_steps": 20,
    "lr_decay_steps": 80,
    "l1_warmup_steps": 60,
    "resample_every": 100,
    "dead_after_tokens": 60_000,
    "seed": 0,
    "train_sequences": 2_000,
    "train_data_seed": 101,
    "eval_sequences": 200,
    "eval_data_seed": 202,
}
FAST: dict[str, Any] = {"tokens": 20_000, "train_sequences": 100, "eval_sequences": 20}


def names(n_layers: int = 4) -> list[str]:
    """The shipped transcoders' zoo names, layer by layer."""
    return [f"{MODEL}-tc-l{layer}" for layer in range(n_layers)]


def grammar_text(n: int, seed: int) -> torch.Tensor:
    """``[n, seq_len]`` token rows of packed grammar episodes (as the model was trained on)."""
    from interp.models.zoo.grammar import CONFIG, packed_batch

    return packed_batch(CONFIG, n, random.Random(seed))


def _activations(model: Any, tokens: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    hook_in, hook_out = f"blocks.{layer}.mlp.hook_in", f"blocks.{layer}.hook_mlp_out"
    xs, ys = [], []
    with torch.no_grad():
        for chunk in tokens.split(100):
            _, cache = model.run_with_cache(chunk, names=[hook_in, hook_out])
            xs.append(cache[hook_in].reshape(-1, cache[hook_in].shape[-1]))
            ys.append(cache[hook_out].reshape(-1, cache[hook_out].shape[-1]))
    return torch.cat(xs), torch.cat(ys)


def train_all(
    out_root: str | Path | None = None, *, fast: bool = False, progress: bool = False
) -> dict[str, Any]:
    """Train, evaluate and save the four transcoders; returns ``{name: evaluation metrics}``."""
    import interp
    from interp import sae as S
    from interp.sae.io import ZOO_DIR

    recipe = {**RECIPE, **(FAST if fast else {})}
    root = Path(out_root) if out_root is not None else ZOO_DIR
    model = interp.load(f"zoo:{MODEL}")
    train_tokens = grammar_text(recipe["train_sequences"], recipe["train_data_seed"])
    eval_tokens = grammar_text(recipe["eval_sequences"], recipe["eval_data_seed"])
    options = {k: recipe[k] for k in ("l1_coefficient", "lr", "tokens", "batch_size", "lr_warmup_steps",
                                      "lr_decay_steps", "l1_warmup_steps", "resample_every",
                                      "dead_after_tokens", "seed")}  # fmt: skip
    results: dict[str, Any] = {}
    for layer, name in enumerate(names(model.cfg.n_layers)):
        start, cpu = time.perf_counter(), time.process_time()
        x, y = _activations(model, train_tokens, layer)
        tc = S.train(model, f"blocks.{layer}.mlp.hook_in", (x, y), arch="transcoder", d_sae=recipe["d_sae"],
                     hook_out=f"blocks.{layer}.hook_mlp_out", progress=progress, **options)  # fmt: skip
        elapsed, cpu_s = time.perf_counter() - start, time.process_time() - cpu
        ev = S.evaluate(model, tc, eval_tokens, batch_size=50)
        metrics = {k: float(v) for k, v in ev.metrics.items()}
        tc.cfg.metadata["training"] = {
            **tc.cfg.metadata.get("training", {}),
            "recipe": recipe,
            "data": f"grammar-4l packed episodes: {recipe['train_sequences']} rows, data seed "
            f"{recipe['train_data_seed']} (interp.sae.grammar_zoo.grammar_text)",
            "time_s": round(elapsed, 2),
            "cpu_time_s": round(cpu_s, 2),
            "fast": fast,
        }
        tc.cfg.metadata["evaluation"] = {
            "data": f"{recipe['eval_sequences']} held-out rows, data seed {recipe['eval_data_seed']}",
            "metrics": metrics,
        }
        S.save(tc, root / name)
        results[name] = metrics
        print(name, json.dumps({k: round(v, 4) for k, v in metrics.items()}), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description="train the grammar-4l transcoders")
    parser.add_argument("--out", default=None, help="folder for the dictionaries (default: the shipped zoo)")
    parser.add_argument("--fast", action="store_true", help="a tiny budget, for checking the pipeline")
    args = parser.parse_args()
    if args.fast and args.out is None:
        parser.error("--fast needs --out: a fast run must not replace the shipped dictionaries")
    train_all(args.out, fast=args.fast, progress=True)


if __name__ == "__main__":
    main()
