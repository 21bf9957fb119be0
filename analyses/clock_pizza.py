"""The Clock and the Pizza (Zhong, Liu, Tegmark & Andreas, NeurIPS 2023): two algorithms for one task.

A walk-through in the style of a TransformerLens demo, with interp's public API only: load the zoo's
two one-layer transformers on (a + b) mod 59 (attention rate α = 1, standard attention, and α = 0,
constant attention), cache their activations, read the embeddings in the Fourier basis (the grokking
reproduction's tools), measure the paper's gradient symmetricity and distance irrelevance, patch the
Clock model's attention to constant with a hook, and finish with the full paper-vs-ours table.
Exits 1 if any check misses.

    python analyses/clock_pizza.py            # faithful: shipped models + α ∈ {0, .5, 1} × d_model {32, 64, 96}
    python analyses/clock_pizza.py --fast     # α ∈ {0, 1} × 1 seed, fast recipe, looser stated bounds
    python analyses/clock_pizza.py --out DIR  # where results.json and report.html go
"""

from __future__ import annotations

import argparse
import sys

import torch

import interp
import interp.reproductions
from interp.models.zoo import clock_pizza
from interp.reproductions import clock_pizza as metrics
from interp.reproductions.grokking import fourier_basis


def walk_through() -> None:
    # 1. The models: hook names are module paths (attn.pattern is the α-mixed attention pattern).
    clock = interp.load("zoo:clock-pizza-a1")
    pizza = interp.load("zoo:clock-pizza-a0")
    print("hook points:", clock.hook_names)

    # 2. Every pair (a, b); the answer is read at the last position.
    tokens = clock_pizza.all_pairs(59)
    labels = tokens.sum(1) % 59
    for name, model in (("Clock (α = 1)", clock), ("Pizza (α = 0)", pizza)):
        logits, cache = model.run_with_cache(tokens)
        acc = (logits[:, -1].argmax(-1) == labels).float().mean()
        pattern = cache["attn.pattern.hook_out"]
        print(
            f"{name}: accuracy {acc:.4f}; attention on a from the last position {pattern[:, :, -1, 0].mean():.3f}"
        )

    # 3. Embeddings in the Fourier basis: both models put the tokens on a few circles (key frequencies).
    basis = fourier_basis(59)
    for name, model in (("Clock", clock), ("Pizza", pizza)):
        norms = (basis @ model.module.W_E.detach().double()).pow(2).sum(1)
        per_freq = norms[1::2] + norms[2::2]
        top = torch.topk(per_freq, 3)
        share = float(top.values.sum() / norms.sum())
        print(f"{name}: key frequencies {[k + 1 for k in top.indices.tolist()]} hold {share:.0%} of ‖W_E‖²")

    # 4. The paper's two metrics: gradient symmetricity (∂logit/∂E_a vs ∂logit/∂E_b) and distance irrelevance.
    for name, model in (("Clock", clock), ("Pizza", pizza)):
        m = metrics.metrics(model.module)
        print(
            f"{name}: gradient symmetricity {m['gradient_symmetricity']:.4f}, distance irrelevance "
            f"{m['distance_irrelevance']:.4f}, a - b explains {m['distance_r2']:.0%} of the correct logit"
        )

    # 5. Intervene: replace the Clock model's softmax pattern by uniform attention (1/2 on each token,
    #    the same total weight) with a hook: Clock multiplies through attention, so accuracy drops.
    def constant(pattern: torch.Tensor, hook) -> torch.Tensor:
        return torch.full_like(pattern, 0.5)

    patched = clock.run_with_hooks(tokens, [("attn.pattern.hook_out", constant)])
    acc = (patched[:, -1].argmax(-1) == labels).float().mean()
    print(f"Clock with uniform attention patched in: accuracy {acc:.4f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="small retrain grid, looser bounds")
    parser.add_argument("--out", default=None, help="report directory")
    args = parser.parse_args(argv)
    walk_through()
    report = interp.reproductions.run("clock-pizza", fast=args.fast, out_dir=args.out)
    for check in report.failures:
        print(f"MISS: {check.quantity}: ours {check.ours}, wanted {check.tolerance} (paper: {check.paper})")
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
