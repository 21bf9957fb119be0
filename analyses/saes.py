"""Sparse autoencoders take features out of superposition (Sharkey, Braun & Millidge 2022).

A researcher's walk with interp's public API only: make ground-truth features in superposition,
train an SAE on them with ``S.train``, score it against the truth (MMCS and SAELens's Hungarian MCC),
splice it in and read its latents as hook points; then the zoo's SAE on a toy model of superposition
(``zoo:tms-20-5-hidden``) against the model's own feature directions, and the zoo's SAE on MiniLM's
residual stream on real text (``zoo:minilm-l3-resid-topk``). It ends with the full paper-vs-ours
table (``interp reproduce saes``) and exits 1 if any check misses.

    python analyses/saes.py            # faithful: d=64, G=128, L1 sweep, TMS retrain (~5-10 min)
    python analyses/saes.py --fast     # d=32, G=64, fewer steps, looser stated bounds
    python analyses/saes.py --out DIR  # where results.json and report.html go
"""

from __future__ import annotations

import argparse
import sys

import torch

import interp.reproductions
from interp import sae as S
from interp.reproductions import saes as toy
from interp.sae import zoo_recipes as Z


def walk_through() -> None:
    # 1. Ground truth: G unit directions in d < G dims; each sample a sparse non-negative mix of them.
    setup = toy.ToySetup(d=32, n_features=64, samples=50_000, steps=1000)
    features = toy.ground_truth(setup)  # [G, d]
    codes = toy.sample_codes(setup, setup.samples, seed=1)  # [n, G], about 3.7 features per sample
    model = toy.data_model(features)  # codes -> codes @ features, hook "hook_out"
    print(f"{setup.n_features} features in {setup.d} dims; true L0 {(codes > 0).float().sum(-1).mean():.2f}")
    print(f"max |cos| between two true features: {(features @ features.T).fill_diagonal_(0).abs().max():.2f}")

    # 2. Train a standard SAE (ReLU + L1) with twice as many latents as features.
    acts = model.run_with_cache(codes, names="hook_out")[1]["hook_out"]
    sae = toy.train_toy_sae(model, acts, setup, d_sae=2 * setup.n_features, l1=0.3)
    held = toy.sample_codes(setup, 4096, seed=2)
    result = S.evaluate(model, sae, held)
    print(
        f"SAE: EV {result['explained_variance']:.3f}, L0 {result['l0']:.2f}, dead {result['dead_fraction']:.0%}"
    )

    # 3. Against the truth: MMCS (each true feature's best decoder row) and SAELens's one-to-one MCC.
    print(
        f"MMCS {toy.mmcs(features, sae.W_dec):.3f}, Hungarian MCC {toy.hungarian_mcc(sae.W_dec, features):.3f}"
    )

    # 4. Latents are hook points once spliced: the latent matched to feature 0 fires when feature 0 is on.
    best = int(toy.cosines(features[:1], sae.W_dec).argmax())
    with model.saes([sae]):
        _, cache = model.run_with_cache(held, names="hook_out.hook_sae_acts_post")
    latent = cache["hook_out.hook_sae_acts_post"][:, best]
    corr = torch.corrcoef(torch.stack([latent, held[:, 0]]))[0, 1]
    print(f"feature 0 <-> latent {best}: correlation of latent activation with the true code {corr:.3f}")

    # 5. A toy model of superposition: 12 of 20 features packed into 5 dims (zoo:tms-20-5, instance 4).
    tms = Z.tms_instance()
    found = toy.tms_recovery(S.load("zoo:tms-20-5-hidden"), tms.module.W[0])
    print(
        f"zoo:tms-20-5-hidden: {len(found['represented'])} represented features, "
        f"cosines with their latents {min(found['cosine']):.4f}..{max(found['cosine']):.4f}"
    )

    # 6. Real text: the zoo's MiniLM SAE on held-out Python documentation; one latent's top tokens.
    minilm = Z.source_model("minilm-l3-resid-topk")
    text_sae = S.load("zoo:minilm-l3-resid-topk")
    texts = Z.eval_inputs("minilm-l3-resid-topk", minilm)[:24]
    metrics = S.evaluate(minilm, text_sae, texts)
    print(f"zoo:minilm-l3-resid-topk on 24 held-out chunks: EV {metrics['explained_variance']:.3f}")
    hook = S.latent_hook(text_sae)
    prepared = minilm.prepare(texts)
    _, cache = S.run_with_cache_with_saes(minilm, prepared, [text_sae], names=hook)
    latents = cache[hook].masked_fill(~prepared.attention_mask.bool()[..., None], 0.0)  # [batch, pos, d_sae]
    unit = int(latents.amax(dim=(0, 1)).argmax())
    top = latents[..., unit].flatten().topk(5).indices.tolist()
    width = latents.shape[1]
    words = [prepared.str_tokens[i // width][i % width] for i in top]
    print(f"latent {unit} fires most on: {words}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="small budgets, same checks, looser bounds")
    parser.add_argument("--out", default=None, help="report directory")
    args = parser.parse_args(argv)
    walk_through()
    report = interp.reproductions.run("saes", fast=args.fast, out_dir=args.out)
    for check in report.failures:
        print(f"MISS: {check.quantity}: ours {check.ours}, wanted {check.tolerance} (paper: {check.paper})")
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
