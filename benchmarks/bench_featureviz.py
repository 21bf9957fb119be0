"""Batched feature visualization: time per unit with every unit in one optimization vs one unit
per optimization (lucent's way), same steps, interleaved; goal >= 8x. Then the default box map
(clipped pixels, projected Adam) against the earlier sigmoid box: the fraction of the analytic
optimum reached on random linear units at the default steps and lr (goal >= 0.99), and the time
per unit at the default 256 steps on the CNN (goal <= 1.2x the sigmoid's), interleaved.

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
    ok &= box_maps(model, layer, units, args.rounds)
    return 0 if ok else 1


def linear_optimum_fraction(constraint: str) -> float:
    """The lowest a(x)/a(x*) over 3 seeds x 2 boxes x 16 random linear units, default settings
    without transforms; a(x*) = sum |w| (high - low)/2 + sum w (high + low)/2 + b."""
    from torch import nn

    worst = 1.0
    for seed in range(3):
        for low, high in ((0.0, 1.0), (-1.0, 1.0)):
            torch.manual_seed(seed)
            module = nn.Sequential(nn.Flatten(), nn.Linear(64, 16)).eval()
            linear = ModuleModel(module, "linear", input_shape=(1, 8, 8), input_range=(low, high))
            w, b = module[1].weight.detach(), module[1].bias.detach()
            best = w.abs().sum(-1) * (high - low) / 2 + w.sum(-1) * (high + low) / 2 + b
            vis = fv.render(
                linear, fv.neuron("1.hook_out", range(16)), transforms=None, constraint=constraint
            )
            worst = min(worst, float((vis.scores / best).min()))
    return worst


def box_maps(model: ModuleModel, layer: str, units: list[int], rounds: int) -> bool:
    ok = True
    print("\n## box map: clipped pixels (default) vs sigmoid (before)")
    for constraint in ("box", "sigmoid"):
        fraction = linear_optimum_fraction(constraint)
        met = fraction >= 0.99
        ok &= met if constraint == "box" else True
        print(
            f"  random linear units, {constraint:<8} min a(x)/a(x*) {fraction:.4f}"
            + (f"  (goal >= 0.99: {'met' if met else 'MISSED'})" if constraint == "box" else "")
        )
    medians = interleaved(
        {
            "clipped box (default), 256 steps": lambda: fv.render(model, fv.channel(layer, units)),
            "sigmoid box (before), 256 steps": lambda: fv.render(
                model, fv.channel(layer, units), constraint="sigmoid"
            ),
        },
        rounds=rounds,
    )
    return ok & report(
        f"time per unit at the defaults, {len(units)} channels batched",
        medians,
        [
            (
                "time: clipped / sigmoid",
                "clipped box (default), 256 steps",
                "sigmoid box (before), 256 steps",
                1.2,
                "max",
            )
        ],
    )


if __name__ == "__main__":
    raise SystemExit(main())
