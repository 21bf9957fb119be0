"""Time of a probe sweep over every layer of digits-cnn (with control tasks), next to sklearn.

For each of the 7 leaf-module outputs: capture the activations of the 1,437 training images, fit a
multinomial logistic probe (and a control-task probe) and score it on a stratified held-out quarter.
The sklearn column fits ``LogisticRegression(C=1)`` on the same features and split, with the same
standardisation; both sides are timed interleaved, on 1 thread. Held-out accuracies must agree
within 0.02 per layer. One interleaved round per side (a full sweep is heavy on a shared machine).

    python benchmarks/bench_probes.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_attacks import trained_cnn  # noqa: E402
from common import interleaved, machine, report  # noqa: E402

import interp  # noqa: E402
from interp.methods import probing as P  # noqa: E402
from interp.models import zoo  # noqa: E402


def sklearn_sweep(feats: P.Features, control: bool) -> list[float]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    y = feats.labels
    train, test = P.split(y, "classification", 0.25, 0)
    ys = [y] + ([P.control_labels(y, feats.types, "classification", 0)] if control else [])
    accs = []
    for x in feats.values.values():
        scaler = StandardScaler().fit(x[train].numpy())
        xs = scaler.transform(x.numpy())
        for i, labels in enumerate(ys):
            clf = LogisticRegression(C=1.0, max_iter=100).fit(xs[train], labels[train].numpy())
            if i == 0:
                accs.append(clf.score(xs[test], labels[test].numpy()))
    return accs


def main() -> int:
    torch.set_num_threads(1)
    model = interp.load(trained_cnn(), input_shape=(1, 8, 8), input_range=(0.0, 1.0), name="digits-cnn")
    x, y, _, _ = zoo.digits_data(0)
    print(f"# probe sweep over every layer of digits-cnn ({len(x)} images, control tasks on); {machine()}")
    feats = P.collect_features(model, x, y)
    results: dict[str, object] = {}
    medians = interleaved(  # one round each: a full sweep is ~10 s unloaded, minutes on a busy machine
        {
            "ours: probe_sweep (capture + 14 probes)": lambda: results.__setitem__(
                "ours", P.probe_sweep(model, x, y, control=True)
            ),
            "sklearn: same features, 14 probes (capture excluded)": lambda: results.__setitem__(
                "sklearn", sklearn_sweep(feats, control=True)
            ),
        },
        rounds=1,
        warmup=0,
    )
    ours, theirs = results["ours"], results["sklearn"]
    for name, a, b, c in zip(
        ours.names, ours.accuracy.tolist(), theirs, ours.control_accuracy.tolist(), strict=True
    ):
        print(f"  {name:<18} ours {a:.3f}  sklearn {b:.3f}  control {c:.3f}  selectivity {a - c:.3f}")
    agree = all(abs(a - b) <= 0.02 for a, b in zip(ours.accuracy.tolist(), theirs, strict=True))
    report("probe sweep over 7 layers with control tasks", medians, [])
    print(f"held-out accuracies agree with sklearn within 0.02: {agree}")
    return 0 if agree else 1


if __name__ == "__main__":
    raise SystemExit(main())
