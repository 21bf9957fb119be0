"""In-context linear regression by one step of gradient descent (von Oswald et al., ICML 2023).

A walk-through in the style of a TransformerLens demo, with interp's public API only: load the zoo's
trained linear self-attention layer, cache its activations on fresh regression tasks, read its weights
(as TransformerLens ``FactoredMatrix`` circuits too), compare them with the paper's construction of one
GD step, swap the layer's attention scores for GD's inner products with a hook, and finish with the
full paper-vs-ours table. Exits 1 if any check misses.

    python analyses/icl_gd.py            # faithful: the shipped checkpoint, plus 2 retrained seeds
    python analyses/icl_gd.py --fast     # one fast retrain, looser stated bounds
    python analyses/icl_gd.py --out DIR  # where results.json and report.html go (default reports/icl-gd)
"""

from __future__ import annotations

import argparse
import sys

import torch
from transformer_lens import FactoredMatrix

import interp
import interp.reproductions
from interp.models.zoo import icl_gd


def walk_through() -> None:
    # 1. The model: one linear self-attention layer over tokens e_i = (x_i, y_i); hook names are module paths.
    model = interp.load("zoo:icl-gd")
    print(model)
    print("hook points:", model.hook_names)

    # 2. Fresh tasks: 10 context points and a query (x_q, 0); w ~ N(0, I), x ~ U(-1, 1)^10.
    gen = torch.Generator().manual_seed(0)
    tokens, y_query, _ = icl_gd.sample_tasks(2000, generator=gen)
    out, cache = model.run_with_cache(tokens)
    y_hat = -out[:, -1, -1]  # the paper's read-out: the query's y entry, sign flipped
    print(f"test loss 0.5·mean (y - ŷ)²: {icl_gd.loss(y_hat, y_query):.4f}")
    print("attention scores (linear, no softmax):", tuple(cache["scores.hook_out"].shape))

    # 3. The GD-1 baseline: η by line search (the loss is a parabola in η, so check the closed form too).
    eta, gd_loss = icl_gd.line_search_gd_lr(tokens, y_query)
    print(
        f"GD-1: η* = {eta:.3f} (closed form {icl_gd.optimal_gd_lr(tokens, y_query):.3f}), loss {gd_loss:.4f}"
    )

    # 4. The weights, as TransformerLens circuits: QK = W_Q W_K^T and OV = W_V W_O in TL's [in, out] layout.
    layer = model.module
    qk = FactoredMatrix(layer.W_Q.weight.T.detach(), layer.W_K.weight.detach())
    ov = FactoredMatrix(layer.W_V.weight.T.detach(), layer.P.weight.T.detach())
    d = layer.d
    scale = qk.AB[:d, :d].diagonal().mean()
    print("QK x-block / its mean diagonal (GD: identity), first 4x4:")
    torch.set_printoptions(precision=3, sci_mode=False)
    print((qk.AB[:d, :d] / scale)[:4, :4])
    print(f"OV (y -> y) × scale: {float(ov.AB[d, d] * scale):.4f}   (GD: -η/N = {-eta / 10:.4f})")

    # 5. Intervene: replace the layer's scores by GD's inner products x_i·x_q (times the learned scale).
    def gd_scores(scores: torch.Tensor, hook) -> torch.Tensor:
        x = tokens[:, :, :-1]
        return scale * torch.einsum("bqd,bkd->bqk", x, x[:, :-1])

    patched = model.run_with_hooks(tokens, [("scores.hook_out", gd_scores)])
    print(f"loss with GD's attention scores patched in: {icl_gd.loss(-patched[:, -1, -1], y_query):.4f}")

    # 6. Sensitivity to the query: ∂ŷ/∂x_q of the layer against GD's W_1.
    print("alignment with GD-1:", {k: round(v, 4) for k, v in icl_gd.alignment(layer, tokens, eta).items()})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="one fast retrain, looser bounds")
    parser.add_argument("--out", default=None, help="report directory")
    args = parser.parse_args(argv)
    walk_through()
    report = interp.reproductions.run("icl-gd", fast=args.fast, out_dir=args.out)
    for check in report.failures:
        print(f"MISS: {check.quantity}: ours {check.ours}, wanted {check.tolerance} (paper: {check.paper})")
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
