"""The clock-pizza phase diagram, one row of the faithful grid trained sequentially and in worker
processes, and the full faithful run's wall time extrapolated from it.

The faithful grid (α ∈ {0, 0.5, 1} × d_model ∈ {32, 64, 96}, seed 1, 2,000 epochs) dominates
``interp reproduce clock-pizza``. Its models are independent, so ``phase_diagram`` trains them in
``jobs`` spawned workers, one thread each. This script trains one α row (d_model 32, 64, 96; the cost
does not depend on α, the same ops run at every α) with ``jobs=1`` and then with ``jobs=N``, checks
that every model's metrics are bit-identical, and prints the wall times. It then extrapolates the
full grid: the three rows cost the same, so the sequential time is 3x the row's, and the parallel
time is the makespan of the 9 models over N workers (widest first, the order ``phase_diagram``
submits them), from the per-model times measured in the parallel run, plus that run's start-up
overhead (process spawn and imports).

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/bench_clock_pizza_grid.py [--alpha 1] [--jobs 2]
        [--epochs 2000]

One round each, on a shared machine: provisional. A busy box (or ``nice``) gives the processes only a
share of a core, so the script also prints the idle-box estimate: the same makespan from the models'
CPU seconds in the sequential run. ``--epochs 500`` costs a quarter (the per-epoch
cost is constant, so the training part scales linearly; the overhead does not).
"""

from __future__ import annotations

import argparse
import heapq
import time

from common import machine

from interp.reproductions import clock_pizza as cpr


def makespan(seconds: list[float], workers: int) -> float:
    """Wall time of jobs taken in the given order by the first free of ``workers`` workers."""
    free = [0.0] * workers
    for s in seconds:
        heapq.heappush(free, heapq.heappop(free) + s)
    return max(free)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--jobs", type=int, default=None, help="default: one per core")
    parser.add_argument("--epochs", type=int, default=None, help="default: the faithful recipe's 2,000")
    args = parser.parse_args()
    row = [(args.alpha, w, s) for w in cpr.WIDTHS_FAITHFUL for s in cpr.SEEDS_FAITHFUL]
    jobs = args.jobs or cpr.default_jobs(len(cpr.phase_grid(False)))
    print(machine())
    walls, runs = {}, {}
    for label, n in (("sequential", 1), (f"parallel, {jobs} workers", jobs)):
        start = time.perf_counter()
        runs[label] = cpr.phase_diagram(False, jobs=n, cells=row, epochs=args.epochs, progress=False)
        walls[label] = time.perf_counter() - start
    seq, par = runs.values()
    same = all(
        {k: v for k, v in a.items() if not k.startswith("train_")}
        == {k: v for k, v in b.items() if not k.startswith("train_")}
        for a, b in zip(seq, par, strict=True)
    )
    widths = list(cpr.WIDTHS_FAITHFUL)
    print(f"\n## one row (α = {args.alpha:g}, d_model {widths}), epochs {args.epochs or 2000}")
    for label, wall in walls.items():
        per_model = ", ".join(
            f"d{r['d_model']} {r['train_s']:.0f} s wall / {r['train_cpu_s']:.0f} s CPU" for r in runs[label]
        )
        print(f"  {label:<22} {wall:7.1f} s   ({per_model})")
    speedup = walls["sequential"] / walls[f"parallel, {jobs} workers"]
    print(f"  speed-up {speedup:.2f}x; metrics identical: {same}")

    by_width = {r["d_model"]: r["train_s"] for r in par}
    row_makespan = makespan(sorted(by_width.values(), reverse=True), jobs)
    overhead = max(walls[f"parallel, {jobs} workers"] - row_makespan, 0.0)
    grid = sorted((by_width[w] for _, w, _ in cpr.phase_grid(False)), reverse=True)
    scale = 2000 / args.epochs if args.epochs else 1.0
    scaled = f" to 2,000 epochs (x{scale:g})" if scale != 1 else ""
    print(f"\n## full faithful grid (9 models), extrapolated{scaled}")
    print(f"  sequential             {3 * walls['sequential'] * scale:7.0f} s")
    parallel = makespan(grid, jobs) * scale + overhead
    print(f"  parallel, {jobs} workers     {parallel:7.0f} s (overhead {overhead:.0f} s)")
    cpu = {r["d_model"]: r["train_cpu_s"] for r in seq}
    idle = sorted((cpu[w] for _, w, _ in cpr.phase_grid(False)), reverse=True)
    print(
        f"  on an idle box (wall ≈ CPU seconds, from the sequential run's): sequential {sum(idle) * scale:.0f} s,"
        f" {jobs} workers {makespan(idle, jobs) * scale:.0f} s plus start-up"
    )
    print("  plus ~10-30 s for the shipped models' analysis and the figures")


if __name__ == "__main__":
    main()
