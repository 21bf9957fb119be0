"""Data-parallel throughput on torch.distributed (gloo, localhost): 2 processes x 1 thread against
1 process x 1 thread, for capture (MiniLM, ``capture_to_disk``) and DDP dictionary training
(``interp.sae.train`` over that capture, same global batch). Goals: capture >= 1.7x, training
>= 1.6x. Then an extrapolation of a 1B-token capture of a 1B-parameter model on 8 GPUs.

Each round launches the 1-process and the 2-process job (torchrun) in alternating order; a job
times only its collective call, from a barrier after the model has loaded (and traced its hook
sites, once per process) to the call's return on every rank (the merge and the final
``load_capture`` included), so process start and model setup are not counted. Reported: median
and spread over rounds.

Training's goal row is its throughput in the steady state: the time per step from the start of
step 5 to ``train``'s return (the ranks step in lockstep); the whole call, setup included (the
shuffle buffer's first fill, the shared-memory block, the first steps' allocations), is printed
beside it. Each job also prints its milliseconds per step by phase (reading the next batch,
forward, backward, Adam, and for the 2 ranks the waits: the step's meeting, adding the
gradients, gloo's mid-step sums) and the sum of the 6.3 MB of gradients alone.

Capture and training each get a ceiling, timed in the same rounds: two independent 1-process jobs
of one rank's work, started together (start_together: a file barrier after their setup, as the
ranks' barrier after theirs), with no process group and no communication; training's bound to a
core each, as its ranks are, capture's free, as its ranks are. That is what the two cores give two
simultaneous forwards on that run, printed with the share of it the 2-process job reached. (Binding
capture's ranks was tried: in 8 interleaved rounds bound and free read the same, 1.64x and 1.65x,
so capture leaves them free.) Unsynchronised, as before 2026-12-03, one copy's timed work overlapped
the other's model loading, and the ceiling read more than two simultaneous forwards give: for a
192-text capture, synchronised copies took 0.99-1.13 s (the slower of the two), as the 2-process
job did (1.01-1.16 s, 4 runs each, interleaved), against 1.76-2.14 s for one process.

Capture's workload is 768 texts (~25k tokens, ~8 s for one process). At 192 (1-2 s a job) the ratio
measured startup and the box's noise: 1.43x and 1.52x on 2026-12-03 (79% and 80% of the ceiling).
At 768, four runs: capture 1.86x, 1.97x, 1.71x, 1.91x (99%, 100%, 90%, 101% of ceilings of 1.88x,
1.97x, 1.90x, 1.89x); training, five: 1.47x, 1.72x, 1.48x, 1.53x, 1.52x (88%, 91%, 85%, 85%, 93% of
ceilings of 1.66x, 1.90x, 1.74x, 1.80x, 1.64x): the ceiling itself moves with the box, and on a run
where two simultaneous forwards give 1.66x the 1.6x goal needs 96% of it. Timed phase by phase
(2026-12-04, two rounds), a ceiling copy's forward took 34.8-41.4 ms a step and a rank's 35.8-40.4
ms, and their reads of the next batch 5.8-7.1 ms and 5.8-6.9 ms: the same work at the same speed.
What a rank adds is its waits, 3-7 ms a step (the meeting 1.0-4.1 ms, most of it for the slower
core), and in the same runs one ceiling copy took 48.8 ms a step and the other 56.8 ms: the cores
themselves differ by up to ~15%. The same step split differently (Adam on every rank) read 1.70x
and 1.49x in those two runs, against the split's 1.53x and 1.52x: within the noise of each other.

Six more training runs on 2026-12-04 (2-6 rounds each): 1.47x, 1.44x, 1.72x, then, after the
batch read got cheaper (a rank's read 5.5-6.2 -> 2.4-2.7 ms a step, one process's 6.8 -> 3.7-4.1),
1.49x, 1.54x, 1.55x (ceilings 1.81x, 1.84x, 1.83x, 1.64x, 1.85x, 1.68x). The cheaper read did not
move the ratio, as work that scales with the rows cannot: what the ratio pays is per-rank fixed
cost and waiting. Adam on every rank read 1.57x, 1.57x, -, 1.61x, 1.61x, 1.52x beside them ("the
split makes a step" 0.94x, 0.94x, -, 0.92x, 0.96x, 1.08x faster): no consistent winner, so the
split stays. Weights in the shared block are not what slows a rank: two bound processes running
a rank's matmul and TopK on shared and on private weights, each updating its half of the rows
between iterations, took 45.4-48.6 and 45.7-48.9 ms, 3 runs each. The ceiling's copies are now
timed phase by phase in the same rounds (printed below the ranks'): a rank's forward took 1-4 ms
more than a copy's in each of three runs (36.3/37.7 against 34.9/34.1 ms, 6 rounds), which the
2-rank job pays on top of its waits; one lead is that ranks in lockstep run their heaviest phases
at the same moment while the copies drift apart (a bare 2-process matmul + TopK loop, barrier
each iteration or none, read 48-56 and 48-57 ms: not settled by it). One step-by-step trace (60
steps, 2 ranks) had rank 0's forward and backward 2.3 ms (5.6%) slower than rank 1's throughout
and rank 1 waiting 2.3 ms a step at the meeting: balancing the rows between the ranks by their
measured speed would give back about half of that in such a run (not built: the rows would have
to go through shared memory, and the split would then depend on timing, so two runs of one job
would differ in float rounding). To test the lockstep lead, training's ceiling now has a second
row: the same two copies meeting at the start of every step through a shared counter, nothing
exchanged (meet_every_step). First try (4 interleaved rounds each, outside this script): 57.9 ms a
step in lockstep against 50.8 free, the lockstep copies' forwards 2-3 ms slower. In this script's
next run (3 rounds): 50.1 against 53.1, and the 2-process job read 1.71x (90% of the lockstep row,
96% of the free one). A third (6 rounds, a noisy box: 1-process rounds 5.2-6.4 s): lockstep 58.3
against free 53.4 ms, and the 2-process job 1.49x, 99% of the lockstep row and 90% of the free one.
Two of three read synchronising alone as 9-14% a step, which the 2-process job then all but
matches: if that holds, no scheme that meets once a step closes it, and the goal rests on the box.

    OMP_NUM_THREADS=1 python benchmarks/bench_distributed.py [--rounds 3] [--texts 768] [--steps 60]
    OMP_NUM_THREADS=1 python benchmarks/bench_distributed.py --only capture   # rows: capture train auxk

On a shared machine the ratio measures the cores the two ranks actually got: rerun it quietly.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import machine

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
HOOK = "blocks.3.hook_resid_post"
CAPTURE_BATCH = 16
PARTS = ("capture", "train", "auxk")  # the benchmark's rows: --only picks some
WARMUP = 5  # training steps before the steady-state clock starts (setup, first allocations)
# FLOPs per token of the capture: 2 per weight of the 4 blocks that run (stop_early at block 3),
# 12 d_model^2 weights per BERT block (attention 4 d^2, MLP 8 d^2); embeddings are lookups.
CAPTURE_FLOPS_PER_TOKEN = 2 * 4 * 12 * 384**2


def worker(args: argparse.Namespace) -> None:
    """One rank (or the single process) of a timed job; rank 0 prints one JSON line."""
    import random

    import torch
    import torch.distributed as dist

    import interp
    from interp import distributed
    from interp.distributed import process_group
    from interp.sae import train

    torch.set_num_threads(1)
    if args.replicated_adam:  # the row that measures the split: every rank runs all of Adam
        from interp.sae import training

        training._SharedUpdate.applies = staticmethod(lambda opt: False)
    cores = contextlib.ExitStack()
    if "BENCH_ALONE" in os.environ and args.worker == "train":  # a ceiling job: bound as a rank of train is
        cores.enter_context(distributed.bound_cores())
    with cores, process_group(timeout=300) as ctx:
        model = interp.load("minilm")
        model.hook_names  # noqa: B018 -- model setup: its hook sites are traced once per process
        barrier = dist.barrier if ctx.distributed else (lambda: None)
        start = barrier if ctx.distributed else start_together  # a ceiling's copies: at one moment
        if args.worker == "capture":
            rng = random.Random(0)
            words = ["the", "cat", "sat", "on", "a", "mat", "while", "dogs", "ran", "under", "big", "red"]
            texts = [
                " ".join(rng.choice(words) for _ in range(rng.randint(24, 40))) for _ in range(args.texts)
            ]
            if "BENCH_ALONE" in os.environ:  # a ceiling copy: the part the rank of that number captures
                from interp.store import _part_ranges  # how capture_to_disk splits the inputs

                lo, hi = _part_ranges(len(texts), CAPTURE_BATCH, 2)[int(os.environ["LOCAL_RANK"])]
                texts = texts[lo:hi]
            start()
            began = time.perf_counter()
            ds = interp.capture_to_disk(
                model, texts, HOOK, args.out, batch_size=CAPTURE_BATCH, progress=False, resume=False
            )
            barrier()
            seconds = time.perf_counter() - began
            work = {
                "tokens": int(sum(len(r) for r in ds.with_format("numpy")["input_ids"])),
                "examples": len(ds),
            }
            work["bytes"] = sum(p.stat().st_size for p in Path(args.out).glob("shard-*.arrow"))
        else:
            phases = time_phases()
            if "BENCH_LOCKSTEP" in os.environ:  # a lockstep ceiling's copy: the copies meet at every step
                meet_every_step()
            start()
            began = time.perf_counter()
            train(model, HOOK, args.data, arch="topk", d_sae=2048, k=32, tokens=args.batch * args.steps,
                  batch_size=args.batch, data_lanes=args.lanes, lr=1e-3, progress=False, checkpoint_every=0,
                  dead_after_tokens=args.dead_after_tokens)  # fmt: skip
            returned = time.perf_counter()
            barrier()
            seconds = time.perf_counter() - began
            work = {"tokens": args.batch * args.steps, "steps": args.steps}
            # steady state: from the start of step WARMUP to train's return (ranks step in lockstep)
            work["step_seconds"] = (returned - phases["step starts"][WARMUP]) / (args.steps - WARMUP)
            work["phases"] = (
                gather_phases(phases, args.steps) if ctx.distributed else [per_step(phases, args.steps)]
            )
    if ctx.is_main:
        print(json.dumps({"seconds": seconds, "world_size": ctx.world_size, **work}))


def start_together() -> None:
    """A ceiling's copies (BENCH_ALONE: the directory they share) wait for each other here, after their
    setup, so their timed work runs at the same time, as a job's ranks' does after its barrier; for
    the plain 1-process job, nothing."""
    if "BENCH_ALONE" not in os.environ:
        return
    ready = Path(os.environ["BENCH_ALONE"])
    (ready / f"ready-{os.environ['LOCAL_RANK']}").touch()
    deadline = time.monotonic() + 600  # a copy that failed its setup must not hold this one for good
    while len(list(ready.glob("ready-*"))) < int(os.environ["LOCAL_WORLD_SIZE"]):
        if time.monotonic() > deadline:
            raise SystemExit(f"the other ceiling copies never became ready in {ready} (see their errors)")
        time.sleep(0.001)


def meet_every_step() -> None:
    """A lockstep ceiling's copies wait for each other at the start of every training step (a
    counter per copy in a shared file, spun on), as a job's ranks meet once a step, but with
    nothing exchanged: what synchronising alone costs two copies of one rank's work."""
    import torch

    from interp.sae import training

    here, copies = int(os.environ["LOCAL_RANK"]), int(os.environ["LOCAL_WORLD_SIZE"])
    path = Path(os.environ["BENCH_ALONE"]) / "step-counters"
    if here == 0:
        path.write_bytes(bytes(8 * copies))
    while not path.exists() or path.stat().st_size < 8 * copies:
        time.sleep(0.001)
    counters = torch.from_file(str(path), shared=True, size=copies, dtype=torch.float64)
    step = training._Trainer.loss  # (timed by time_phases: the wait is outside the forward)
    met = [0]

    def meeting_first(*args, **kwargs):
        met[0] += 1
        counters[here] = met[0]
        while float(counters.min()) < met[0]:
            pass
        return step(*args, **kwargs)

    training._Trainer.loss = meeting_first


# What each rank of a training job spends its steps on (ms per step): wrappers on the trainer's steps.
PHASES = {
    "batch": "_fetch",  # read the next batch from the shuffle buffer (+ NaN check)
    "forward": "loss",  # pre-activations, TopK, decoder, losses
    "backward": "_backward",  # sparse backward; starts each gradient's reduction as it is ready
}  # and "adam": torch.optim.Adam.step (split: each rank over its share of the parameters)


def time_phases() -> dict[str, float]:
    """Wrap the trainer's phases and its waits for other ranks; returns the seconds they accumulate."""
    import torch

    from interp import distributed
    from interp.sae import training

    spent: dict = dict.fromkeys(
        [*PHASES, "adam", "wait: meeting", "wait: gradients", "wait: update", "wait: metrics"], 0.0
    )
    starts: list[float] = []

    def timed(owner: type, attr: str, phase: str) -> None:
        inner = getattr(owner, attr)

        def wrapper(*args, **kwargs):
            began = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                spent[phase] += time.perf_counter() - began

        setattr(owner, attr, wrapper)

    for phase, attr in PHASES.items():
        timed(training._Trainer, attr, phase)
    timed(torch.optim.Adam, "step", "adam")
    timed(distributed.GradientSync, "wait", "wait: gradients")  # + adding the peer's gradient
    timed(distributed.GradientSync, "sum_owned", "wait: gradients")  # (split Adam: its share only)
    timed(training._SharedUpdate, "barrier", "wait: update")  # every rank's share has landed
    timed(training._Sum, "result", "wait: metrics")  # small sums over gloo (AuxK's mid-step ones)
    timed(distributed.DeferredSum, "result", "wait: meeting")  # the step's meeting, in shared memory
    loss = training._Trainer.loss  # (wrapped above) each step begins with it

    def marked(*args, **kwargs):
        starts.append(time.perf_counter())
        return loss(*args, **kwargs)

    training._Trainer.loss = marked
    spent["step starts"] = starts
    return spent


def per_step(spent: dict, steps: int) -> dict[str, float]:
    return {k: round(v / steps * 1e3, 1) for k, v in spent.items() if k != "step starts"}


def gather_phases(spent: dict[str, float], steps: int) -> list[dict[str, float]]:
    """Every rank's ms per step by phase, and one exchange of the 6.3 MB of gradients alone."""
    import torch
    import torch.distributed as dist

    from interp.distributed import GradientSync

    grads = [torch.nn.Parameter(torch.zeros(384, 2048)) for _ in range(2)]  # W_enc and W_dec's sizes
    sync = GradientSync(grads)
    times = []
    for _ in range(6):
        dist.barrier()
        began = time.perf_counter()
        sync.start()
        for g in grads:
            g.grad = torch.ones_like(g)
        sync.finish_backward()
        sync.wait(grads)
        times.append(time.perf_counter() - began)
    sync.close()
    mine = per_step(spent, steps)
    mine["sum of 6.3 MB alone"] = round(statistics.median(times[1:]) * 1e3, 1)
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    return every


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nproc: int, kind: str, extra: list[str]) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1"}
    script = [str(Path(__file__).resolve()), "--worker", kind, *extra]
    if nproc == 1:
        command = [sys.executable, *script]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                   "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *script]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"{kind} on {nproc} process(es) failed:\n{done.stderr[-3000:]}")
    return json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])


def launch_alone(
    copies: int, kind: str, extra: list[str], out: Path | None = None, lockstep: bool = False
) -> dict:
    """``copies`` independent 1-process jobs at once (no process group, no communication), each
    given one rank's share of the work (a capture: its own ``out``-N) and, for training, bound to
    its core as a rank is; they start their timed work together (start_together), as a job's
    ranks do; seconds (and step_seconds): the slowest copy's."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, *extra]
    ready = Path(tempfile.mkdtemp(prefix="bench-ready-"))  # where the copies meet before their work
    jobs = [
        subprocess.Popen(command + ([] if out is None else ["--out", f"{out}-{i}"]),
                         env={**env, "BENCH_ALONE": str(ready), "LOCAL_RANK": str(i), "LOCAL_WORLD_SIZE": str(copies),
                              **({"BENCH_LOCKSTEP": "1"} if lockstep else {})},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(copies)
    ]  # fmt: skip
    done = [job.communicate(timeout=1800) for job in jobs]
    shutil.rmtree(ready, ignore_errors=True)
    outs = [out for out, _ in done]
    for job, (_, err) in zip(jobs, done, strict=True):
        if job.returncode:
            raise SystemExit(f"an independent {kind} job failed:\n{err[-3000:]}")
    results = [json.loads([line for line in o.splitlines() if line.startswith("{")][-1]) for o in outs]
    slowest = {k: max(r[k] for r in results) for k in ("seconds", "step_seconds") if k in results[0]}
    if "phases" in results[0]:  # each copy's ms per step by phase, printed beside the ranks'
        slowest["phases"] = [r["phases"][0] for r in results]
    return slowest


def rounds(
    kind: str,
    n: int,
    extra: list[str],
    alone: list[str] | None = None,
    alone_out: Path | None = None,
    variant: list[str] | None = None,
    lockstep: bool = False,
) -> dict[int, list[dict]]:
    """Interleaved rounds of the 1-process and the 2-process job; with ``alone``, also two
    independent 1-process jobs at once, each given ``alone`` (results under key 0), and with
    ``lockstep`` the same two meeting at every step (key 4); with ``variant``, also the 2-process
    job given those extra arguments (key 3)."""
    results: dict[int, list[dict]] = {1: [], 2: [], 0: [], 3: [], 4: []}
    for r in range(n):
        for job in (1, 2, 3, 0, 4) if r % 2 == 0 else (4, 0, 3, 2, 1):
            if job == 0 and alone is not None:
                results[0].append(launch_alone(2, kind, alone, alone_out))
            elif job == 4 and lockstep and alone is not None:
                results[4].append(launch_alone(2, kind, alone, alone_out, lockstep=True))
            elif job == 3 and variant is not None:
                results[3].append(launch(2, kind, extra + variant))
            elif job in (1, 2):
                results[job].append(launch(job, kind, extra))
    return results


def ratio_row(what: str, results: dict[int, list[dict]], key: str, goal: float | None) -> float:
    """Print the 1-process / 2-process ratio of ``key`` (median, and its spread by round)."""
    times = {n: [r[key] for r in results[n]] for n in (1, 2)}
    ratios = sorted(a / b for a, b in zip(times[1], times[2], strict=True))  # pairs of the same round
    median = statistics.median(times[1]) / statistics.median(times[2])
    verdict = "" if goal is None else f"  (goal >= {goal}x: {'met' if median >= goal else 'MISSED'})"
    print(f"  {what:28s} {median:5.2f}x  [{ratios[0]:.2f} - {ratios[-1]:.2f} by round]{verdict}")
    return median


def summary(label: str, results: dict[int, list[dict]], goal: float) -> tuple[float, float]:
    """Print median seconds per job and the throughput ratio (1-process time / 2-process time):
    for training, of the steady-state step time (the goal's row) and of the whole call."""
    times = {n: sorted(r["seconds"] for r in rs) for n, rs in results.items() if n}
    print(f"\n## {label}")
    for n in (1, 2):
        ts = times[n]
        print(f"  {n} process(es) x 1 thread   median {statistics.median(ts):7.2f} s  [{ts[0]:.2f} - {ts[-1]:.2f}]"
              + (f"; steady state {statistics.median(r['step_seconds'] for r in results[n]) * 1e3:.1f} ms/step"
                 if "step_seconds" in results[n][0] else ""))  # fmt: skip
    if "step_seconds" in results[1][0]:
        median = ratio_row(f"throughput, from step {WARMUP} on", results, "step_seconds", goal)
        ratio_row("whole call (setup included)", results, "seconds", None)
    else:
        median = ratio_row("throughput ratio", results, "seconds", goal)
    if results[3]:  # the same 2-process job, every rank running all of Adam
        ratio_row("Adam on every rank instead", {1: results[1], 2: results[3]}, "step_seconds", None)
        gain = sorted(
            a["step_seconds"] / b["step_seconds"] for a, b in zip(results[3], results[2], strict=True)
        )
        print(
            f"    the split makes a step {statistics.median(gain):.3f}x faster [{gain[0]:.3f} - {gain[-1]:.3f} by round]"
        )
    if results[0]:
        key = "step_seconds" if "step_seconds" in results[0][0] else "seconds"
        alone = statistics.median(r[key] for r in results[0])
        one = statistics.median(r[key] for r in results[1])
        unit = f"{alone * 1e3:.1f} ms/step" if key == "step_seconds" else f"{alone:.2f} s"
        print(f"  ceiling without communication: 2 independent 1-process jobs of one rank's work, started together, "
              f"{unit} -> {one / alone:.2f}x ({median / (one / alone):.0%} of it reached)")  # fmt: skip
    if results[4]:
        lock = statistics.median(r["step_seconds"] for r in results[4])
        one = statistics.median(r["step_seconds"] for r in results[1])
        print(f"  the same 2 jobs meeting at every step's start (nothing exchanged): {lock * 1e3:.1f} ms/step -> "
              f"{one / lock:.2f}x ({median / (one / lock):.0%} of it reached)")  # fmt: skip
    labels = {0: "ceiling's copies (copy i as rank i)", 3: "2 processes, Adam on every rank",
              4: "lockstep copies"}  # fmt: skip
    for n in (1, 2, 0, 4, 3):
        phases = [r["phases"] for r in results.get(n, []) if "phases" in r]
        if phases:
            label = labels.get(n, f"{n} process(es)")
            print(f"  {label}, ms per step (median over rounds):")
            for rank in range(len(phases[0])):
                row = {k: statistics.median(p[rank][k] for p in phases) for k in phases[0][rank]}
                row = {k: v for k, v in row.items() if n in (2, 3) or not k.startswith("wait")}
                print(f"    rank {rank}: " + ", ".join(f"{k} {v:.1f}" for k, v in row.items()))
    return median, statistics.median(times[1])


def extrapolate(capture: dict, one_seconds: float) -> None:
    """1B tokens of a 1B-parameter model on 8 GPUs, from the measured per-token cost and arithmetic."""
    tokens, bytes_ = capture["tokens"], capture["bytes"]
    per_token = one_seconds / tokens  # seconds per token, 1 CPU thread, MiniLM (the store's work included)
    flops = CAPTURE_FLOPS_PER_TOKEN * tokens / one_seconds  # achieved forward FLOP/s
    print("\n## Extrapolation: capture 1B tokens of a 1B-parameter model on 8 GPUs")
    print(f"  measured: {per_token * 1e3:.3f} ms/token on 1 CPU thread (MiniLM to block 3, store included)")
    print(f"            = {flops / 1e9:.1f} GFLOP/s at {CAPTURE_FLOPS_PER_TOKEN / 1e6:.0f} MFLOP/token; "
          f"{bytes_ / tokens:.0f} B/token stored")  # fmt: skip
    cpu_hours = 2e18 / flops / 3600
    print(
        f"  a 1B model costs 2e9 FLOP/token, 1B tokens 2e18 FLOP: {cpu_hours:,.0f} CPU thread-hours at that rate"
    )
    peak, mfu, gpus = 989e12, 0.35, 8  # H100 SXM dense bf16; a forward-only capture at modest batch
    gpu_seconds = 2e18 / (gpus * peak * mfu)
    print(f"  GPU compute: 2e18 FLOP / (8 x 989 TFLOP/s bf16 x {mfu:.0%} MFU) = {gpu_seconds / 60:.1f} min "
          f"({gpus * gpu_seconds / 3600:.1f} GPU-hours)")  # fmt: skip
    d_model, layers_kept = 2048, 1  # a 1B model's residual width; one hook captured, stored as float16
    store_bytes = 1e9 * d_model * 2 * layers_kept
    disk = 2e9  # bytes/s one node's local NVMe sustains for large sequential writes
    print(f"  storage: 1 hook x d_model {d_model} x fp16 = {store_bytes / 1e12:.1f} TB; at {disk / 1e9:.0f} GB/s "
          f"per node that is {store_bytes / disk / 60:.0f} min")  # fmt: skip
    bound = max(gpu_seconds, store_bytes / disk)
    print(f"  => about {bound / 60:.0f} min wall on one 8-GPU node ({'disk' if bound > gpu_seconds else 'compute'}-bound;"
          f" {gpus * bound / 3600:.1f} GPU-hours); each rank writes its own part, so more nodes divide both terms")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--texts", type=int, default=768)  # see the docstring: 192 measured startup
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--dead-after-tokens", type=int, default=100_000)  # train's default
    parser.add_argument("--batch", type=int, default=2048)  # the global batch (the ceiling row: one rank's)
    parser.add_argument("--lanes", type=int, default=2)
    parser.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS), help="run only these rows")
    parser.add_argument("--worker", choices=["capture", "train"], default=None)
    parser.add_argument("--replicated-adam", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None)
    parser.add_argument("--data", default=None)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    print(f"# bench_distributed ({machine()}); {args.rounds} rounds, interleaved")
    root = Path(tempfile.mkdtemp(prefix="bench-dist-"))
    try:
        if "capture" in args.only:
            # the ceiling's copy i captures rank i's part of the texts (as capture_to_disk splits them)
            capture = rounds("capture", args.rounds, ["--out", str(root / "cap"), "--texts", str(args.texts)],
                             alone=["--texts", str(args.texts)], alone_out=root / "alone")  # fmt: skip
            _, one = summary(f"capture: MiniLM {HOOK}, batch {CAPTURE_BATCH}", capture, 1.7)
        data = root / "data"
        if {"train", "auxk"} & set(args.only):
            launch(1, "capture", ["--out", str(data), "--texts", str(args.texts)])
        steps = ["--data", str(data), "--steps", str(args.steps)]
        if "train" in args.only:
            training = rounds("train", args.rounds, steps, alone=[*steps, "--batch", "1024", "--lanes", "1"],
                              variant=["--replicated-adam"], lockstep=True)  # fmt: skip
            summary(
                f"DDP training: topk d_sae 2048 over that capture, global batch 2048, {args.steps} steps",
                training,
                1.6,
            )
        if "auxk" in args.only:
            # The same with AuxK live: latents silent for 2 steps count as dead, so every step selects
            # dead latents over the global batch and the ranks also meet once mid-step (not a goal row).
            live = ["--data", str(data), "--steps", str(args.steps), "--dead-after-tokens", "4096"]
            summary(
                "DDP training, AuxK live (dead_after_tokens 4096): the same, dead latents from step 2",
                rounds("train", args.rounds, live),
                1.6,
            )
        if "capture" in args.only:
            extrapolate(capture[1][0], one)
        print(
            "\nWhat limits the ratios: the two ranks share 2 cores with everything else on the box (a busy box gives"
            "\nthem less than 2 cores, and a rank descheduled at a synchronisation stalls the other); each training rank is"
            "\nbound to its own core (interp.distributed.bound_cores: unbound, the scheduler now and then ran both on"
            "\none core, ~10% slower steps). Capture's serial parts: rank 0's plan (the others wait for it), rank"
            "\n0's merge (hard links + one manifest), every rank's final load_capture, and the uneven split on"
            "\nbatch boundaries: 50-60 ms beside the forwards of a 2-rank job, timed phase by phase, against 20-30"
            "\nms for one process. Beyond those, a 2-rank capture takes as long as its ceiling: two forwards at once"
            "\nrun ~20% slower each than one alone on this box, and the ceiling's copies pay that too. Training: the ranks share"
            "\none host, so GradientSync sums through shared memory: each rank computes its gradients (W_enc + W_dec ="
            "\n2 x 384 x 2048 floats = 6.3 MB) in its slots, signals, reads its next batch, then waits for the"
            "\nothers' signals ('wait: meeting', with the step's small sums: NaN check, fired latents, metrics) and"
            "\nadds the slots in rank order ('wait: gradients'); 'sum of 6.3 MB alone' times that with nothing else"
            "\nto do. Each rank then sums, and runs Adam on, only its half of every parameter's rows, in place in"
            "\nthe shared block ('adam'), renormalises its half of the decoder's rows, and waits for the other's"
            "\nhalf ('wait: update', mostly the two ranks' shuffle-buffer refills taking different times); the row"
            "\n'Adam on every rank' is the same job with that split turned off. Not split by the ranks, so paid in"
            "\nfull by each: the backward's dense W_enc and W_dec gradients (fixed cost, whatever the batch) and"
            "\nper-process setup (opening the capture, filling the shuffle buffer). The ceiling row shows what two"
            "\nbusy cores give with no communication at all; it moves from run to run with the box (training's"
            "\n1.66-1.90x, started together), and so does the 2-process forward: the same work took 33-41 ms a step on a rank in"
            "\ndifferent quiet runs, and now and then one core ran ~15% slower than the other for a whole run, the"
            "\nother rank waiting for it at every meeting. With AuxK live, the fired latents and AuxK's normaliser"
            "\nare needed mid-step: one more meeting, over gloo ('wait: metrics')."
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
