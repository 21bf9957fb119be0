"""Batched feature visualization: time per unit with every unit in one optimization vs one unit
per optimization (lucent's way), same steps, interleaved; goal >= 8x.

    python benchmarks/bench_featureviz.py [--units 32] [--steps 32] [--threads 1]
"""

from __future__ import annotations

import argparse

import torch
from common import interleaved, machine, report

from interp.methods import featureviz as fv
from interp.models.module import ModuleModel
from interp.models.zoo.digits import small_cnn


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--units", type=int, default=32)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)  # the cost does not depend on the weights; no checkpoint needed
    model = ModuleModel(small_cnn().eval(), "digits-cnn", input_shape=(1, 8, 8), input_range=(0.0, 1.0))
    units = list(range(args.units))
    layer = "conv2.hook_out"
    print(f"machine: {machine()}")
    print(f"SmallCNN (digits), {layer}: {args.units} channels, {args.steps} Adam steps, standard transforms")

    # agreement first: a unit's batched image and its own run optimize the same objective
    batched = fv.render(model, fv.channel(layer, units), steps=args.steps)
    alone = fv.render(model, fv.channel(layer, units[:1]), steps=args.steps)
    print(f"unit 0 score: batched {batched.scores[0]:.4f}, alone {alone.scores[0]:.4f} (seeded draws differ)")

    medians = interleaved(
        {
            "batched (all units, one run)": lambda: fv.render(
                model, fv.channel(layer, units), steps=args.steps
            ),
            "one unit per run (all units)": lambda: [
                fv.render(model, fv.channel(layer, [u]), steps=args.steps) for u in units
            ],
        },
        rounds=args.rounds,
        warmup=0,
    )
    ok = report(
        f"feature visualization, {args.units} units x {args.steps} steps",
        medians,
        [
            (
                "time per unit: one-at-a-time / batched",
                "one unit per run (all units)",
                "batched (all units, one run)",
                8.0,
                "min",
            )
        ],
    )
    per_unit = {k: v / args.units * 1e3 for k, v in medians.items()}
    print("  ms per unit: " + ", ".join(f"{k}: {v:.1f}" for k, v in per_unit.items()))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
