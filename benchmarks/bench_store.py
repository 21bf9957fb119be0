"""Streaming capture to disk: throughput, and peak memory as the number of batches grows.

Each size runs in a fresh subprocess, so its peak RSS (ru_maxrss) is its own. Peak memory must stay
flat as batches grow: only one batch of activations is alive at a time.

    python benchmarks/bench_store.py [--batches 4 8 16 32] [--batch-size 16] [--seq 128]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

from common import machine

CHILD = r"""
import json, os, resource, shutil, sys, tempfile, time
os.environ.setdefault("HF_HUB_OFFLINE", "1"); os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
import torch, interp
n_batches, batch_size, seq = map(int, sys.argv[1:4])
model = interp.load("minilm")
torch.manual_seed(0)
tokens = torch.randint(1000, 30000, (n_batches * batch_size, seq))
names = ["blocks.*.hook_resid_post"]
out = tempfile.mkdtemp()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
dataset = interp.capture_to_disk(model, tokens, names, out, batch_size=batch_size, progress=False)
seconds = time.perf_counter() - start
written = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
shutil.rmtree(out)
print(json.dumps({"batches": n_batches, "rows": len(dataset), "seconds": seconds, "tokens": tokens.numel(),
                  "bytes": written, "peak_mib": peak / 1024, "before_mib": base / 1024}))
"""


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    print(
        f"MiniLM, every resid_post (6 x 384 floats per token), batch {args.batch_size} x {args.seq} tokens\n"
    )
    print(
        f"{'batches':>8} {'rows':>6} {'s':>7} {'tokens/s':>9} {'MB/s':>7} {'MB written':>11} {'peak RSS MiB':>13}"
    )
    rows = []
    with tempfile.TemporaryDirectory():
        for n in args.batches:
            result = subprocess.run(
                [sys.executable, "-c", CHILD, str(n), str(args.batch_size), str(args.seq)],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            row = json.loads(result.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(
                f"{row['batches']:>8} {row['rows']:>6} {row['seconds']:>7.1f} {row['tokens'] / row['seconds']:>9.0f} "
                f"{row['bytes'] / 1e6 / row['seconds']:>7.1f} {row['bytes'] / 1e6:>11.1f} {row['peak_mib']:>13.0f}"
            )
    growth = rows[-1]["peak_mib"] - rows[0]["peak_mib"]
    data_growth = (rows[-1]["bytes"] - rows[0]["bytes"]) / 2**20
    flat = growth < 0.1 * data_growth
    print(
        f"\npeak RSS grew {growth:.0f} MiB while the data written grew {data_growth:.0f} MiB "
        f"({'flat: memory is bounded' if flat else 'NOT flat'})"
    )
    return 0 if flat else 1


if __name__ == "__main__":
    sys.exit(main())
