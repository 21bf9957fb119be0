"""Every attack: ours vs torchattacks on the same weights and batch, checked for agreement, then timed.

torchattacks pins an old ``requests`` that clashes with streamlit, so it never enters the main
environment: this script makes its own venv (``$TA_VENV``, default ``/tmp/ta-venv``) on first run —
``python -m venv``, then ``pip install torch==<our version> safetensors numpy scipy`` and
``pip install --no-deps torchattacks`` — and runs torchattacks there as a worker subprocess.
Model weights and the batch go to the worker as safetensors files; its adversarial examples come
back the same way. Our side runs in a worker of the same shape (main environment). Each attack
gets PAIRS (3) pairs of fresh single-thread workers (the cheap ones, FGSM, PGD, APGD-CE and
APGD-DLR, 6 pairs and 48 rounds: FAST), one pair after another; each pair computes
the attack's result once (the agreement check) and then times it, interleaved round by round, each
worker timing its own calls (as many in a round as fill ROUND_SECONDS, 0.25 s: one FGSM call
takes ~13 ms, and one call a round read anywhere from 0.84x to 1.72x), the ROUNDS (12) rounds
shared between the pairs.

Why several pairs: a process's luck (where its heap and the model's buffers land) stays with it
for all of its rounds. Ours and torchattacks' APGD-CE in one process, each call alternating, read
0.91-0.95x in four fresh processes; one pair of workers per attack read anywhere from 0.90x to
1.04x from run to run. The median over several pairs no longer rests on one process's luck.
The attacks whose work is all but the same kernels on both sides (FGSM, PGD, APGD-DLR) sit at
parity, and their medians move by +-4% from run to run: one APGD-DLR call took 169-231 ms in
fresh processes of ours and 173-198 ms in torchattacks' (3 each, one after another); full runs
read FGSM 0.94x / 1.03x, PGD 0.98x / 0.97x, APGD-DLR 1.005x / 1.016x (the second with 6 pairs and
18 rounds, 17 min: more pairs did not narrow it), and 8 pairs of those three alone 0.93x, 1.00x,
0.96x. So those three are at parity, not below it: a run can read any of them above 1.0x. The
cheap ones now get 6 pairs and 48 rounds (FAST; ~30 s each): two runs read FGSM 1.018x / 0.949x,
PGD 0.996x / 0.988x, APGD-DLR 0.937x / 0.980x, APGD-CE 0.954x (rounds 0.71x to 1.18x). In one
process, alternating calls, FGSM read 1.016x and PGD 0.978x, and torch.profiler showed the same
kernel taking 1.7 ms on one side and 3.1 ms on the other within that process (convolution_backward,
pinned thresholds): where each side's buffers land moves the kernels more than the attacks differ.
On 2 images, where the per-call overhead shows, ours takes ~100 us over a bare forward and backward
(its input checks, eval mode, frozen parameters) and torchattacks ~80 us: 0.6% of a 360-image call.

    python benchmarks/bench_attacks.py            # every attack, digits-cnn, 360 test images
    python benchmarks/bench_attacks.py fgsm pgd   # only these (keys of SPECS)
    ROUNDS=6 PAIRS=2 python benchmarks/bench_attacks.py   # fewer rounds, over fewer worker pairs

Checks: the adversarial images agree (identical bit for bit, or within TOLERANCE where batching
changes float rounding); time ratio ours/theirs <= 1.0 per attack. Each worker reports wall and
thread CPU time; the CPU-time ratio is the one less disturbed by a busy machine.

Both workers run with the same fixed glibc malloc thresholds (MALLOC_TUNABLES). With glibc's
defaults the thresholds adapt: the mmap threshold rises to the largest mmap-ed block freed so far
in the process, and the trim threshold to twice that. A step that frees more than the trim
threshold at the heap's top hands the pages back, and the next step faults them in again, page by
page. So a call's page faults depend on the process's history. Measured here for FGSM/PGD
(digits-cnn, 360 images: the largest activation is 2.9 MB, a PGD step's peak ~10 MB):

- One pair of workers that first ran every attack: ours had its mmap threshold at ~2.9 MB, and
  torchattacks' (raised by a larger block in one of its other attacks) at 4-8 MB. Ours then took
  25k faults per PGD call to torchattacks' 3.9k, and read 1.33x (FGSM 2.5k vs 0.7k faults, 1.26x).
- In identical fresh processes (same imports, model and batch), one PGD call takes 7k to 22k
  faults, varying call to call and process to process, for our loop and torchattacks' alike.
- Square (200 queries, each a forward of up to 360 images, ~7 MB of activations at the heap's top)
  varies the most: torchattacks' own worker, started three times, took 1.8k, 93k and 310k faults
  per call (2.8 us a fault: 1.5 s against 2.3 s a call), and ours 25k to 310k. Whether a query's
  activations are handed back to the kernel depends on where small live blocks happen to sit in
  the heap. Under glibc's defaults, 3 pairs of workers read 1.16x and 1.21x; 8 pairs, 1.03x
  (faults 114k | 93k, rounds 0.77x to 1.32x). Pinned, both take 0 faults and ours reads 0.96-0.97x.

Running the batch a chunk at a time does not make them faster. FGSM and PGD over chunks of 128
images (each chunk through all its steps, the loss a sum over the whole batch's size) give the
whole batch's result bit for bit. Against the whole batch in one process (15 interleaved calls a
run), chunked PGD read 1.10x, 0.89x and 0.78x, and FGSM 0.79x, under glibc's defaults. With the
pinned thresholds, PGD read 1.15x and 1.13x and FGSM 1.15x, and this benchmark FGSM 1.095x and
PGD 1.110x. What chunks saved was page faults (a smaller peak), not cache misses. With no faults
to save, three forwards a step instead of one cost more than the cache gains. So the attacks run
the whole batch, as torchattacks does.

That is why each attack has its own workers: an attack is not charged for the allocations of the
attacks run before it. Pinned, both sides take ~0 faults. torch.profiler shows the same kernels on
both sides (for FGSM/PGD ~95% of the time is the model's forward and backward, a third of it
the NCHW max-pool), and on a 2-image batch, where the per-call overhead shows, ours takes no longer
than torchattacks. So the pinned ratio is the one that compares the attacks' work; the default one
adds the allocator's interaction with each process (provisional, busy 2-core box).
``BENCH_MALLOC=default python benchmarks/bench_attacks.py`` runs with glibc's defaults; the
``faults`` column shows the page faults per call either way.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, report  # noqa: E402

from interp.models import zoo  # noqa: E402

VENV = Path(os.environ.get("TA_VENV", "/tmp/ta-venv"))
EPS, ALPHA, STEPS = 0.1, 0.025, 10
ROUNDS = 12
# fresh worker pairs per attack, the rounds shared between them (see the docstring)
PAIRS = 3
# a round times as many calls as fill this many seconds (FGSM's one call, ~13 ms, is mostly noise)
ROUND_SECONDS = 0.25
# fixed (not adaptive) mmap and trim thresholds, the same for both workers: see the docstring
MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=268435456"

WORKER = textwrap.dedent(
    """
    import json, sys, time
    import torch

    from safetensors.torch import load_file, save_file
    from interp_bench_model import build
    torch.set_num_threads(1)
    side, work = sys.argv[1], sys.argv[2]
    specs = json.loads(open(f"{work}/specs.json").read())
    base = build()
    base.load_state_dict(load_file(f"{work}/weights.safetensors"))
    base.eval()
    batch = load_file(f"{work}/batch.safetensors")
    x, y = batch["x"], batch["y"]


    class Shifted(torch.nn.Module):
        # the model with every logit raised by a constant: the same predictions and margins

        def __init__(self, inner, shift):
            super().__init__()
            self.inner, self.shift = inner, shift

        def forward(self, z):
            return self.inner(z) + self.shift


    def theirs(spec):
        import torchattacks as ta
        model = Shifted(base, spec["shift"]) if spec.get("shift") else base
        x, y = batch["x"][: spec.get("n")], batch["y"][: spec.get("n")]
        a, kw = spec["attack"], spec.get("args", {})
        eps = spec.get("eps")
        make = {
            "fgsm": lambda: ta.FGSM(model, eps=eps),
            "pgd": lambda: ta.PGD(model, eps=eps, random_start=False, **kw),
            "cw": lambda: ta.CW(model, **kw),
            "deepfool": lambda: ta.DeepFool(model, **kw),
            "apgd-ce": lambda: ta.APGD(model, eps=eps, loss="ce", **kw),
            "apgd-dlr": lambda: ta.APGD(model, eps=eps, loss="dlr", **kw),
            "apgd-t": lambda: ta.APGDT(model, eps=eps, n_classes=10, **kw),
            "square": lambda: ta.Square(model, eps=eps, **kw),
            "fab": lambda: ta.FAB(model, eps=eps, n_classes=10, **kw),
            "fab-t": lambda: ta.FAB(model, eps=eps, multi_targeted=True, n_classes=10, **kw),
            "autoattack": lambda: ta.MultiAttack([
                ta.APGD(model, eps=eps, loss="ce", seed=0, steps=kw.get("steps", 10)),
                ta.APGDT(model, eps=eps, n_classes=10, seed=0, steps=kw.get("steps", 10)),
                ta.FAB(model, eps=eps, multi_targeted=True, n_classes=10, seed=0, steps=kw.get("steps", 10)),
                ta.Square(model, eps=eps, seed=0, n_queries=kw.get("n_queries", 5000))]),
        }
        atk = make[a]()
        labels = y
        mode = spec.get("mode")
        if mode == "least-likely":
            atk.set_mode_targeted_least_likely(quiet=True)
        elif mode == "label":
            atk.set_mode_targeted_by_label(quiet=True)
            labels = torch.tensor(spec["target"]).expand(len(y)).clone()
        norm = spec.get("normalize")
        if norm is None:
            return lambda: atk(x, labels)
        # the model expects normalised inputs; torchattacks takes and returns normalised images
        # (attacking in pixels inside): compare in pixels
        atk.set_normalization_used(*norm)
        mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in norm)
        return lambda: atk((x - mean) / std, labels) * std + mean


    def ours(spec):
        from interp.methods import adversarial as A
        model = Shifted(base, spec["shift"]) if spec.get("shift") else base
        x, y = batch["x"][: spec.get("n")], batch["y"][: spec.get("n")]
        a, kw, eps = spec["attack"], dict(spec.get("args", {})), spec.get("eps")
        rename = {"n_restarts": "restarts"}
        kw = {rename.get(k, k): v.lower() if k == "norm" else v for k, v in kw.items()}
        extra = {}
        if spec.get("mode") == "least-likely":
            extra["target"] = "least-likely"
        elif spec.get("mode") == "label":
            extra["target"] = spec["target"]
        if spec.get("normalize") is not None:
            extra["normalize"] = tuple(spec["normalize"])
        if a == "pgd":
            return lambda: A.pgd(model, x, y, eps, random_start=False, **kw, **extra).x_adv
        return lambda: A.run_attack(a, model, x, y, eps, **kw, **extra).x_adv


    attacks = {spec["key"]: (theirs if side == "torchattacks" else ours)(spec) for spec in specs}
    save_file({k: a().contiguous() for k, a in attacks.items()}, f"{work}/{side}.safetensors")
    print("ready", flush=True)
    import resource
    who = getattr(resource, "RUSAGE_THREAD", resource.RUSAGE_SELF)
    for line in sys.stdin:
        name, calls = line.split()
        calls = int(calls)
        faults = resource.getrusage(who).ru_minflt
        start, cpu = time.perf_counter(), time.thread_time()
        for _ in range(calls):
            attacks[name]()
        s, cpu = (time.perf_counter() - start) / calls, (time.thread_time() - cpu) / calls
        faults = (resource.getrusage(who).ru_minflt - faults) / calls
        print(json.dumps({"name": name, "s": s, "cpu": cpu, "faults": faults}), flush=True)
    """
)

MODEL_SRC = textwrap.dedent(
    """
    from collections import OrderedDict
    from torch import nn
    def build():
        return nn.Sequential(OrderedDict(
            conv1=nn.Conv2d(1, 16, 3, padding=1), relu1=nn.ReLU(), conv2=nn.Conv2d(16, 32, 3, padding=1),
            relu2=nn.ReLU(), pool=nn.MaxPool2d(2), flatten=nn.Flatten(), fc=nn.Linear(512, 10)))
    """
)


def ensure_venv() -> Path:
    """The torchattacks venv's python, created on first use (documented in the module docstring)."""
    python = VENV / "bin" / "python"
    if (
        python.exists()
        and subprocess.run([python, "-c", "import torchattacks"], capture_output=True).returncode == 0
    ):
        return python
    print(f"creating {VENV} with torch=={torch.__version__} and torchattacks (--no-deps)...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, f"torch=={torch.__version__}", "safetensors", "numpy", "scipy"], check=True)
    subprocess.run([*pip, "--no-deps", "torchattacks"], check=True)
    return python


def trained_cnn() -> torch.nn.Module:
    """The shipped digits-cnn, or the recipe trained once into a temporary cache."""
    try:
        return zoo.load_zoo("digits-cnn")[0]
    except Exception:
        cache = Path(tempfile.gettempdir()) / "interp-bench-zoo"
        try:
            return zoo.load_zoo("digits-cnn", directory=cache)[0]
        except Exception:
            zoo.train("digits-cnn", cache, progress=False)
            return zoo.load_zoo("digits-cnn", directory=cache)[0]


def _start(python: str | Path, side: str, work: Path) -> subprocess.Popen:
    """A worker process for one side, ready to time attacks on request."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(work), os.environ.get("PYTHONPATH", "")])}
    if os.environ.get("BENCH_MALLOC") != "default":  # the same allocator policy on both sides
        env["GLIBC_TUNABLES"] = ":".join(filter(None, [os.environ.get("GLIBC_TUNABLES"), MALLOC_TUNABLES]))
    worker = subprocess.Popen([str(python), str(work / "worker.py"), side, str(work)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)  # fmt: skip
    if worker.stdout.readline().strip() != "ready":
        raise RuntimeError(f"the {side} worker failed to start (see its stderr above)")
    return worker


def prepare(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, specs: list[dict]) -> Path:
    """A work folder with the weights, the batch, the attack specs and the worker script."""
    from safetensors.torch import save_file

    work = Path(tempfile.mkdtemp(prefix="bench-attacks-"))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, work / "weights.safetensors")
    save_file({"x": x.contiguous(), "y": y}, work / "batch.safetensors")
    (work / "interp_bench_model.py").write_text(MODEL_SRC)
    (work / "worker.py").write_text(WORKER)
    (work / "specs.json").write_text(json.dumps(specs))
    return work


def torchattacks_results(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    specs: list[dict],
    python: str | Path | None = None,
) -> dict[str, torch.Tensor]:
    """torchattacks' adversarial images for each spec (``key``, ``attack``, ``eps``, ``args``,
    optional ``mode`` / ``target`` / ``normalize``), computed in the venv; for the tests."""
    from safetensors.torch import load_file

    python = python or VENV / "bin" / "python"
    work = prepare(model, x, y, specs)
    worker = _start(python, "torchattacks", work)
    worker.stdin.close()
    worker.wait()
    return load_file(work / "torchattacks.safetensors")


# rounds and pairs for the attacks that take under ~0.15 s a call: 48 rounds cost them ~30 s each
FAST = {"rounds": 48, "pairs": 6}
SPECS = [
    # the cheap attacks at parity get more rounds and pairs (FAST): their medians need them
    {"key": "fgsm", "attack": "fgsm", "eps": EPS, **FAST},
    {"key": "pgd", "attack": "pgd", "eps": EPS, "args": {"alpha": ALPHA, "steps": STEPS}, **FAST},
    # torchattacks' CW margin reads max(onehot * z) and max((1 - onehot) * z), 0 in place of a
    # negative logit; on logits raised by a constant (the same predictions and margins) all are
    # positive, so the two implementations must agree
    {"key": "cw", "attack": "cw", "args": {"c": 1.0, "steps": 50, "lr": 0.01}, "shift": 100.0},
    # torchattacks' DeepFool runs one backward per class per image (~2 min for 360 images): 60 here
    {"key": "deepfool", "attack": "deepfool", "args": {"steps": 50, "overshoot": 0.02}, "n": 60},
    {"key": "apgd-ce", "attack": "apgd-ce", "eps": EPS, "args": {"steps": 10}, **FAST},
    {"key": "apgd-dlr", "attack": "apgd-dlr", "eps": EPS, "args": {"steps": 10}, **FAST},
    {"key": "apgd-t", "attack": "apgd-t", "eps": EPS, "args": {"steps": 10}},
    {"key": "square", "attack": "square", "eps": EPS, "args": {"n_queries": 200}},
    {"key": "fab", "attack": "fab", "eps": EPS, "args": {"steps": 10}},
    {"key": "fab-t", "attack": "fab-t", "eps": EPS, "args": {"steps": 10}},
    {"key": "autoattack", "attack": "autoattack", "eps": EPS, "args": {"steps": 10, "n_queries": 200}},
]
# identical bit for bit (B) or within this max |difference| (float rounding of batched vs per-image work)
TOLERANCE = {"fgsm": 0.0, "pgd": 1e-6, "cw": 1e-6, "deepfool": 1e-5}


def time_attack(spec: dict, model: torch.nn.Module, x, y, python: Path, rounds: int, pairs: int = 1) -> dict:
    """One attack in ``pairs`` fresh pairs of workers, one pair after another (see the module
    docstring), ``rounds`` timed rounds in all, shared out between the pairs: its max |ours - theirs|
    and, per side, the thread CPU seconds, wall seconds and minor page faults of each timed call
    (each pair's round 0 is its warm-up, one call, and sets the calls per round; the order of the
    two sides alternates)."""
    from safetensors.torch import load_file

    work = prepare(model, x, y, [spec])
    sides = {"ours": sys.executable, "torchattacks": python}
    k = spec["key"]
    out = {"diff": 0.0} | {f"{what} {side}": [] for what in ("s", "cpu", "faults") for side in sides}
    for pair in range(pairs):
        workers = {side: _start(exe, side, work) for side, exe in sides.items()}
        ours, theirs = (load_file(work / f"{side}.safetensors")[k] for side in sides)
        out["diff"] = max(out["diff"], (ours - theirs).abs().max().item())
        timed = len(range(pair, rounds, pairs))  # this pair's share of the rounds
        calls = 1  # per round and side; after the warm-up, enough to fill ROUND_SECONDS
        for r in range(timed + 1):
            seconds = []
            for side in ("ours", "torchattacks") if (r + pair) % 2 == 0 else ("torchattacks", "ours"):
                workers[side].stdin.write(f"{k} {calls}\n")
                workers[side].stdin.flush()
                answer = json.loads(workers[side].stdout.readline())
                seconds.append(answer["s"])
                for what in ("s", "cpu", "faults"):
                    out[f"{what} {side}"] += [answer[what]] if r else []
            if r == 0:
                calls = max(1, round(ROUND_SECONDS / max(*seconds, 1e-6)))
        for worker in workers.values():
            worker.stdin.close()
            worker.wait()
    return out


def rounds_and_pairs(spec: dict) -> tuple[int, int]:
    """An attack's timed rounds and worker pairs: its spec's (FAST) or the defaults; ROUNDS and PAIRS
    in the environment win over both."""
    rounds = max(1, int(os.environ.get("ROUNDS", spec.get("rounds", ROUNDS))))
    return rounds, min(rounds, max(1, int(os.environ.get("PAIRS", spec.get("pairs", PAIRS)))))


def main() -> int:
    import statistics

    torch.set_num_threads(1)
    python = ensure_venv()
    model = trained_cnn().eval()
    _, _, x, y = zoo.digits_data(0)
    names = sys.argv[1:] or [s["key"] for s in SPECS]
    specs = [s for s in SPECS if s["key"] in names]
    print(f"# attacks: ours vs torchattacks on digits-cnn, {len(x)} images, each attack in fresh pairs "
          f"of worker processes (pairs, rounds in all: per attack below); {machine()}")  # fmt: skip
    runs, agree = {}, {}
    for spec in specs:
        k = spec["key"]
        rounds, pairs = rounds_and_pairs(spec)
        runs[k] = time_attack(spec, model, x, y, python, rounds, pairs)
        agree[k] = runs[k]["diff"] <= TOLERANCE.get(k, 0.0)
        shown = {kk: v for kk, v in spec.items() if kk not in ("key", "rounds", "pairs")}
        print(f"{k:10s} {json.dumps(shown)}, {pairs} pairs, {rounds} rounds: max |ours - theirs| = "
              f"{runs[k]['diff']:.2e} ({'agree' if agree[k] else 'DIFFER'})", flush=True)  # fmt: skip
    goals = [(f"{s['key']} ours/torchattacks", f"ours {s['key']}", f"torchattacks {s['key']}", 1.0, "max")
             for s in specs]  # fmt: skip
    malloc = "glibc defaults" if os.environ.get("BENCH_MALLOC") == "default" else "pinned malloc thresholds"
    medians = {f"{side} {k}": statistics.median(run[f"cpu {side}"]) for k, run in runs.items()
               for side in ("ours", "torchattacks")}  # fmt: skip
    ok = report(f"thread CPU time per attack (median of interleaved rounds; {malloc})", medians, goals)
    print("  per attack: CPU ratio per round [min - max]; wall: ratio of medians [per round min - max]; "
          "minor page faults per call, median ours | torchattacks")  # fmt: skip
    for k, run in runs.items():
        per_round = {
            what: [a / b for a, b in zip(run[f"{what} ours"], run[f"{what} torchattacks"], strict=True)]
            for what in ("cpu", "s")
        }
        wall = statistics.median(run["s ours"]) / statistics.median(run["s torchattacks"])
        print(f"    {k:10s} cpu [{min(per_round['cpu']):.3f} - {max(per_round['cpu']):.3f}]x; wall {wall:.3f}x "
              f"[{min(per_round['s']):.3f} - {max(per_round['s']):.3f}]; faults "
              f"{statistics.median(run['faults ours']):.0f} | {statistics.median(run['faults torchattacks']):.0f}")  # fmt: skip
    ok = ok and all(agree.values())
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
