"""Integrated gradients: ours (streamed, a few steps per forward) vs captum's IntegratedGradients
with its defaults (internal_batch_size=None: all n_steps x batch in one forward), same n_steps and
Gauss-Legendre rule. Results are checked equal first; time is interleaved; peak memory is each
contender's own peak RSS in a fresh subprocess. Then the same for a noise tunnel over IG
(smoothgrad, ``--nt-samples`` noisy copies): ours streams the IG steps over all noisy rows, captum's
``NoiseTunnel(IntegratedGradients)`` runs nt_samples x n_steps x batch rows in one forward; the
same seeded noise, so the results are equal. Median and spread (min-max) over interleaved rounds.

    python benchmarks/bench_ig.py [--batch 64] [--steps 200] [--threads 1]
        [--nt-batch 16] [--nt-steps 50] [--nt-samples 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

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
NT = {"nt_samples": 5, "stdevs": 0.2}
def ours_nt(model, x, y, steps):
    return at.attribute(model, x, target=y, method="ig", n_steps=steps, noise_tunnel="smoothgrad", seed=0, **NT).values
def captum_nt(model, x, y, steps):
    from captum.attr import IntegratedGradients, NoiseTunnel
    torch.manual_seed(0)
    return NoiseTunnel(IntegratedGradients(model.module)).attribute(x, nt_type="smoothgrad", target=y, n_steps=steps, **NT)
"""

CHILD = SETUP + r"""
import json, os, sys, threading, time
which, batch, steps, threads, samples = sys.argv[1], *map(int, sys.argv[2:6])
NT["nt_samples"] = samples
model, x, y = setup(batch, threads)
ours(model, x[:2], y[:2], 2); captum(model, x[:2], y[:2], 2)  # imports and first-call costs
ours_nt(model, x[:2], y[:2], 2); captum_nt(model, x[:2], y[:2], 2)
page = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page
before, peak, done = rss(), [0], threading.Event()
def poll():  # current RSS every millisecond: the import-time high-water mark would hide the call's
    while not done.is_set():
        peak[0] = max(peak[0], rss()); time.sleep(0.001)
thread = threading.Thread(target=poll); thread.start()
{"ours": ours, "captum": captum, "ours_nt": ours_nt, "captum_nt": captum_nt}[which](model, x, y, steps)
done.set(); thread.join(); peak[0] = max(peak[0], rss())
print(json.dumps({"before_mib": before / 2**20, "peak_mib": peak[0] / 2**20}))
"""  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--nt-batch", type=int, default=16)
    parser.add_argument("--nt-steps", type=int, default=50)
    parser.add_argument("--nt-samples", type=int, default=5)
    parser.add_argument("--only-nt", action="store_true", help="skip the plain IG comparison")
    args = parser.parse_args()
    namespace: dict = {}
    exec(SETUP, namespace)  # the same code the memory subprocesses run
    model, x, y = namespace["setup"](args.batch, args.threads)
    print(f"machine: {machine()}")
    print(f"SmallCNN (digits), {args.batch} images, n_steps={args.steps}, Gauss-Legendre")

    ok = True
    if not args.only_nt:
        ok &= plain_ig(namespace, model, x, y, args)
    ok &= noise_tunnel(namespace, args)
    return 0 if ok else 1


def plain_ig(namespace: dict, model, x, y, args) -> bool:
    ours, captum = namespace["ours"], namespace["captum"]
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
    peaks = {w: peak_mib(w, args.batch, args.steps, args) for w in ("ours", "captum")}
    print(f"  memory: captum / ours                      {peaks['captum'] / max(peaks['ours'], 0.1):6.1f}x")
    return ok


def noise_tunnel(namespace: dict, args) -> bool:
    """Smoothgrad over IG: equal results, time with spread, and peak memory, ours vs captum."""
    namespace["NT"]["nt_samples"] = args.nt_samples
    model, x, y = namespace["setup"](args.nt_batch, args.threads)
    ours, captum = namespace["ours_nt"], namespace["captum_nt"]
    steps = args.nt_steps
    diff = (ours(model, x, y, steps) - captum(model, x, y, steps)).abs().max().item()
    print(
        f"\nnoise tunnel (smoothgrad) over IG: {args.nt_batch} images x {args.nt_samples} samples x "
        f"{steps} steps; max |ours - captum| {diff:.2e}"
    )
    assert diff < 1e-4, diff
    times: dict[str, list[float]] = {"ours": [], "captum": []}
    for r in range(args.rounds):
        for name in ("ours", "captum") if r % 2 == 0 else ("captum", "ours"):
            fn = ours if name == "ours" else captum
            start = time.perf_counter()
            fn(model, x, y, steps)
            times[name].append(time.perf_counter() - start)
    for name, ts in times.items():
        print(
            f"  {name:<7} median {statistics.median(ts) * 1e3:8.1f} ms  (min {min(ts) * 1e3:.1f}, max {max(ts) * 1e3:.1f})"
        )
    ratio = statistics.median(times["ours"]) / statistics.median(times["captum"])
    ratios = sorted(o / c for o, c in zip(times["ours"], times["captum"], strict=True))
    met = ratio <= 1.0
    print(
        f"  time: ours / captum   {ratio:6.3f}x median (per-round {ratios[0]:.3f}-{ratios[-1]:.3f}); "
        f"goal <= 1.0x: {'met' if met else 'MISSED'}"
    )
    peaks = {w: peak_mib(w, args.nt_batch, steps, args) for w in ("ours_nt", "captum_nt")}
    mem = peaks["ours_nt"] / max(peaks["captum_nt"], 0.1)
    print(f"  memory: ours / captum {mem:6.3f}x; goal <= 1.0x: {'met' if mem <= 1.0 else 'MISSED'}")
    return met and mem <= 1.0


def peak_mib(which: str, batch: int, steps: int, args) -> float:
    """Peak RSS above the start of one call, in a fresh subprocess."""
    out = subprocess.run(
        [sys.executable, "-c", CHILD, which, str(batch), str(steps), str(args.threads), str(args.nt_samples)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    row = json.loads(out.stdout.strip().splitlines()[-1])
    peak = row["peak_mib"] - row["before_mib"]
    print(
        f"  peak RSS above the start of one call, {which:<9} {peak:8.1f} MiB (process peak {row['peak_mib']:.0f} MiB)"
    )
    return peak


if __name__ == "__main__":
    raise SystemExit(main())
