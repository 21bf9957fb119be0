"""Integrated gradients: ours (streamed, a few steps per forward) vs captum's IntegratedGradients
with its defaults (internal_batch_size=None: all n_steps x batch in one forward), same n_steps and
Gauss-Legendre rule. Results are checked equal first; time is interleaved; peak memory is each
contender's own peak RSS in a fresh subprocess.

    python benchmarks/bench_ig.py [--batch 64] [--steps 200] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch
from common import interleaved, machine, report

SETUP = r"""
import torch
from interp.models.module import ModuleModel
from interp.models.zoo.digits import small_cnn
from interp.methods import attribution as at
def setup(batch, threads):
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = ModuleModel(small_cnn().eval(), "digits-cnn", input_shape=(1, 8, 8), input_range=(0.0, 1.0))
    x = torch.rand(batch, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.arange(batch) % 10
    return model, x, y
def ours(model, x, y, steps):
    return at.attribute(model, x, target=y, method="ig", n_steps=steps)
def captum(model, x, y, steps):
    from captum.attr import IntegratedGradients
    return IntegratedGradients(model.module).attribute(x, target=y, n_steps=steps, return_convergence_delta=True)
"""

CHILD = SETUP + r"""
import json, os, sys, threading, time
which, batch, steps, threads = sys.argv[1], *map(int, sys.argv[2:5])
model, x, y = setup(batch, threads)
ours(model, x[:2], y[:2], 2); captum(model, x[:2], y[:2], 2)  # imports and first-call costs
page = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page
before, peak, done = rss(), [0], threading.Event()
def poll():  # current RSS every millisecond: the import-time high-water mark would hide the call's
    while not done.is_set():
        peak[0] = max(peak[0], rss()); time.sleep(0.001)
thread = threading.Thread(target=poll); thread.start()
(ours if which == "ours" else captum)(model, x, y, steps)
done.set(); thread.join(); peak[0] = max(peak[0], rss())
print(json.dumps({"before_mib": before / 2**20, "peak_mib": peak[0] / 2**20}))
"""  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    namespace: dict = {}
    exec(SETUP, namespace)  # the same code the memory subprocesses run
    model, x, y = namespace["setup"](args.batch, args.threads)
    ours, captum = namespace["ours"], namespace["captum"]
    print(f"machine: {machine()}")
    print(f"SmallCNN (digits), {args.batch} images, n_steps={args.steps}, Gauss-Legendre")

    mine, (ref, ref_delta) = ours(model, x, y, args.steps), captum(model, x, y, args.steps)
    diff = (mine.values - ref).abs().max().item()
    ddiff = (mine.delta.float() - ref_delta.float()).abs().max().item()
    print(f"max |ours - captum|: attributions {diff:.2e}, delta {ddiff:.2e}")
    assert torch.allclose(mine.values, ref, atol=1e-4, rtol=1e-4), diff

    medians = interleaved(
        {
            "ours (streamed, 8 steps per forward)": lambda: ours(model, x, y, args.steps),
            "captum IG (internal_batch_size=None)": lambda: captum(model, x, y, args.steps),
        },
        rounds=args.rounds,
    )
    ok = report(
        "integrated gradients",
        medians,
        [
            (
                "time: ours / captum",
                "ours (streamed, 8 steps per forward)",
                "captum IG (internal_batch_size=None)",
                1.0,
                "max",
            )
        ],
    )
    peaks = {}
    for which in ("ours", "captum"):
        out = subprocess.run(
            [sys.executable, "-c", CHILD, which, str(args.batch), str(args.steps), str(args.threads)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        row = json.loads(out.stdout.strip().splitlines()[-1])
        peaks[which] = row["peak_mib"] - row["before_mib"]
        print(
            f"  peak RSS above the start of one call, {which:<7} {peaks[which]:8.1f} MiB (process peak {row['peak_mib']:.0f} MiB)"
        )
    print(f"  memory: captum / ours                      {peaks['captum'] / max(peaks['ours'], 0.1):6.1f}x")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
