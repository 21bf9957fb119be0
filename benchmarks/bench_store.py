"""Streaming capture to disk: throughput, peak memory as the number of batches grows, and what
the integrity checks cost.

Default mode: each size runs in a fresh subprocess, so its peak RSS (ru_maxrss) is its own. Peak
memory must stay flat as batches grow: only one batch of activations is alive at a time.

``--integrity``: in one process, one torch thread, interleaved rounds (median and spread), MiniLM
captures with the previous store's writer (no checksums, the manifest trusted as written), against
the checksummed store: xxh3_128 (the default) and sha256 (for comparison). Goal: the checks cost
<= 2% of capture time. Then ``load_capture`` with ``verify=True`` / ``verify=False``.

    OMP_NUM_THREADS=1 python benchmarks/bench_store.py [--batches 4 8 16 32] [--batch-size 16] [--seq 128]
    OMP_NUM_THREADS=1 python benchmarks/bench_store.py --integrity [--rounds 5]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

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


def memory(args: argparse.Namespace) -> int:
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


# ------------------------------------------------------------------------------------------------
# --integrity: the cost of checksums and manifest checks
# ------------------------------------------------------------------------------------------------


def previous_writer() -> type:
    """The store's shard writer before checksums (native pa.OSFile writes, nothing hashed)."""
    import pyarrow as pa

    from interp import store

    class PreviousWriter(store._ShardWriter):
        def __init__(self, out, index, start, schema, tag, began) -> None:
            import hashlib

            self.name = f"shard-{index:05d}.arrow"
            meta = json.loads(schema.metadata[b"huggingface"])
            meta["fingerprint"] = hashlib.blake2b(
                f"{tag}:{index}:{start}".encode(), digest_size=8
            ).hexdigest()
            schema = schema.with_metadata({**schema.metadata, b"huggingface": json.dumps(meta).encode()})
            self.out, self.start, self.stop, self.began = out, start, start, began
            self.tmp = out / f"{self.name}.tmp-{os.getpid()}"
            self.file = pa.OSFile(str(self.tmp), "wb")
            self.writer = pa.ipc.new_stream(self.file, schema)
            self.clean = True

        @property
        def nbytes(self) -> int:
            return self.file.tell()

        def commit(self) -> dict[str, Any]:
            self.writer.close()
            self.file.close()
            fd = os.open(self.tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            final = self.out / self.name
            os.replace(self.tmp, final)
            return {"file": self.name, "start": self.start, "stop": self.stop, "bytes": final.stat().st_size}

    return PreviousWriter


@contextlib.contextmanager
def checks_off() -> Iterator[None]:
    """The previous store: no checksums, no directory fsync, the manifest's shards opened as listed."""
    import datasets

    from interp import store

    def trusting(out: Path, manifest: dict, *, verify: bool) -> Any:
        parts = [datasets.Dataset.from_file(str(out / s["file"])) for s in manifest["shards"]]
        return store._Report(list(manifest["shards"]), parts)

    saved = store._ShardWriter, store._inspect, store._fsync_dir
    store._ShardWriter, store._inspect, store._fsync_dir = previous_writer(), trusting, lambda out: None
    try:
        yield
    finally:
        store._ShardWriter, store._inspect, store._fsync_dir = saved


@contextlib.contextmanager
def checksum(algorithm: str) -> Iterator[None]:
    from interp import store

    saved, store.CHECKSUM = store.CHECKSUM, algorithm
    try:
        yield
    finally:
        store.CHECKSUM = saved


def timed_rounds(
    contenders: dict[str, Callable[[], object]], rounds: int
) -> dict[str, dict[str, list[float]]]:
    """Wall and CPU seconds per call of each contender, in alternating order each round (after one
    warm-up). CPU time (this process only) is what other users of a busy machine disturb least."""
    for fn in contenders.values():
        fn()
    times = {name: {"wall": [], "cpu": []} for name in contenders}
    names = list(contenders)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            wall, cpu = time.perf_counter(), time.process_time()
            contenders[name]()
            times[name]["cpu"].append(time.process_time() - cpu)
            times[name]["wall"].append(time.perf_counter() - wall)
    return times


def show(times: dict[str, dict[str, list[float]]], baseline: str, goal: float | None) -> bool:
    """Medians with their spread, and each contender's ratio to the baseline: the median of the
    per-round ratios (a round's calls run back to back, so a slow spell hits both alike)."""
    ok = True
    print(f"  {'':<48} {'wall ms (min-max)':>24} {'cpu ms':>9} {'wall ratio':>11} {'cpu ratio':>10}")
    for name, t in times.items():
        wall, cpu = t["wall"], t["cpu"]
        line = (
            f"  {name:<48} {statistics.median(wall) * 1e3:>8.1f} ({min(wall) * 1e3:.0f}-{max(wall) * 1e3:.0f})"
            f"{'':>4}{statistics.median(cpu) * 1e3:>9.1f}"
        )
        if name != baseline:
            ratios = {
                k: statistics.median(a / b for a, b in zip(t[k], times[baseline][k], strict=True)) for k in t
            }
            spread = [a / b for a, b in zip(wall, times[baseline]["wall"], strict=True)]
            line += f" {ratios['wall']:>10.3f}x {ratios['cpu']:>9.3f}x  (wall ratios {min(spread):.2f}-{max(spread):.2f})"
            if goal is not None and "default" in name:
                met = ratios["wall"] <= goal
                ok &= met
                line += f"  goal <= {goal}x: {'met' if met else 'MISSED'}"
        print(line)
    return ok


@contextlib.contextmanager
def replayed(model: Any, tokens: Any, names: list[str], batch_size: int) -> Iterator[None]:
    """The model's forward replaced by the caches it gave on these batches (recorded first), so a
    capture times only the store's own work: rows, Arrow tables, writing, checksums, checks."""
    chosen = model.resolve(names)
    recorded = {
        lo: model.run_with_cache(tokens[lo : lo + batch_size], names=chosen, stop_early=True)
        for lo in range(0, len(tokens), batch_size)
    }
    seq = tokens.shape[1]
    cls, real = type(model), type(model).run_with_cache
    cls.run_with_cache = lambda self, inputs, *a, **k: recorded[inputs.storage_offset() // seq]
    try:
        yield
    finally:
        cls.run_with_cache = real


def paired_cost(times: dict[str, dict[str, list[float]]], name: str, baseline: str, clock: str) -> float:
    """Median over rounds of (contender - baseline) seconds on ``clock`` ("wall" or "cpu")."""
    return statistics.median(a - b for a, b in zip(times[name][clock], times[baseline][clock], strict=True))


def integrity(args: argparse.Namespace) -> int:
    import torch

    import interp
    from interp import store

    torch.set_num_threads(1)
    print(f"machine: {machine()}")
    model = interp.load("minilm")
    torch.manual_seed(0)
    tokens = torch.randint(1000, 30000, (args.batches[0] * args.batch_size, args.seq))
    root = Path(tempfile.mkdtemp(prefix="bench-store-"))
    out = root / "cap"
    previous_name, default_name = (
        "previous store (no checksums, no checks)",
        "checksummed, xxh3_128 (default)",
    )
    ok = True
    workloads = {
        "every resid_post": ["blocks.*.hook_resid_post"],
        "every resid_post + attention pattern": ["blocks.*.hook_resid_post", "blocks.*.attn.hook_pattern"],
    }
    try:
        for label, names in workloads.items():

            def capture(names: list[str] = names) -> None:
                shutil.rmtree(out, ignore_errors=True)
                store.capture_to_disk(model, tokens, names, out, batch_size=args.batch_size, progress=False)

            def previous() -> None:
                with checks_off():
                    capture()

            def with_checksum(algorithm: str) -> Callable[[], None]:
                def run() -> None:
                    with checksum(algorithm):
                        capture()

                return run

            contenders = {
                previous_name: previous,
                default_name: with_checksum("xxh3_128"),
                "checksummed, sha256": with_checksum("sha256"),
            }
            capture()
            mb = sum(f.stat().st_size for f in out.iterdir()) / 1e6
            print(f"\n## capture, MiniLM {label}: {len(tokens)} x {args.seq} tokens, {mb:.0f} MB written")
            times = timed_rounds(contenders, args.rounds)
            ok &= show(times, previous_name, 1.02)
            capture_s = {clock: statistics.median(times[previous_name][clock]) for clock in ("wall", "cpu")}

            print("\n   the same, the model's forward replayed from memory (the store's own work only)")
            with replayed(model, tokens, names, args.batch_size):
                store_times = timed_rounds(contenders, 4 * args.rounds)
            show(store_times, previous_name, None)
            for name in contenders:
                if name != previous_name:
                    wall, cpu = (paired_cost(store_times, name, previous_name, c) for c in ("wall", "cpu"))
                    share = wall / capture_s["wall"]
                    line = (
                        f"  {name}: +{wall * 1e3:.1f} ms wall = {share:.2%} of capture wall time; "
                        f"+{cpu * 1e3:.1f} ms cpu = {cpu / capture_s['cpu']:.2%} of capture cpu time"
                    )
                    if name == default_name:
                        ok &= share <= 0.02
                        line += f"  (goal <= 2% of wall: {'met' if share <= 0.02 else 'MISSED'})"
                    print(line)

            with_checksum("xxh3_128")()  # the directory now holds a capture made by the default

            def load_previous() -> None:
                with checks_off():
                    store.load_capture(out)

            print(f"\n## load_capture of that capture ({mb:.0f} MB, in the page cache)")
            verify_name = "verify=True (default: + xxh3_128 of every byte)"
            loads = timed_rounds(
                {"previous store (no checks)": load_previous,
                 "verify=False (manifest checks only)": lambda: store.load_capture(out, verify=False),
                 verify_name: lambda: store.load_capture(out)},
                args.rounds,
            )  # fmt: skip
            show(loads, "previous store (no checks)", None)
            verify_s = statistics.median(loads[verify_name]["wall"])
            print(f"  a verified load takes {verify_s / capture_s['wall']:.1%} of the time the capture took")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print("\nall goals met" if ok else "\nsome goals missed")
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--batches", type=int, nargs="+", default=None, help="default 4 8 16 32; --integrity: 4"
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--integrity", action="store_true", help="the cost of checksums and manifest checks")
    parser.add_argument("--rounds", type=int, default=5, help="--integrity: interleaved rounds")
    args = parser.parse_args()
    args.batches = args.batches or ([4] if args.integrity else [4, 8, 16, 32])
    return integrity(args) if args.integrity else memory(args)


if __name__ == "__main__":
    sys.exit(main())
