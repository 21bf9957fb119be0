"""FGSM and PGD: ours vs torchattacks on the same weights and batch, checked for agreement, then timed.

torchattacks pins an old ``requests`` that clashes with streamlit, so it never enters the main
environment: this script makes its own venv (``$TA_VENV``, default ``/tmp/ta-venv``) on first run —
``python -m venv``, then ``pip install torch==<our version> safetensors numpy scipy`` and
``pip install --no-deps torchattacks`` — and runs torchattacks there as a worker subprocess.
Model weights and the batch go to the worker as safetensors files; its adversarial examples come
back the same way. Our side runs in a worker of the same shape (main environment), so both are
fresh single-thread processes; timing is interleaved round by round, each worker timing its own
call.

    python benchmarks/bench_attacks.py            # digits-cnn, 360 test images

Checks: FGSM identical bit for bit; PGD (no random start) within 1e-6; time ratio ours/theirs <= 1.0.
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
ROUNDS = 21

WORKER = textwrap.dedent(
    """
    import json, sys, time
    import torch
    import statistics

    from safetensors.torch import load_file, save_file
    from interp_bench_model import build
    torch.set_num_threads(1)
    side, work = sys.argv[1], sys.argv[2]
    eps, alpha, steps = (float(a) for a in sys.argv[3:6])
    model = build()
    model.load_state_dict(load_file(f"{work}/weights.safetensors"))
    model.eval()
    batch = load_file(f"{work}/batch.safetensors")
    x, y = batch["x"], batch["y"]
    if side == "torchattacks":
        import torchattacks
        fgsm = torchattacks.FGSM(model, eps=eps)
        pgd = torchattacks.PGD(model, eps=eps, alpha=alpha, steps=int(steps), random_start=False)
        attacks = {"fgsm": lambda: fgsm(x, y), "pgd": lambda: pgd(x, y)}
    else:
        from interp.methods import adversarial as A
        attacks = {
            "fgsm": lambda: A.fgsm(model, x, y, eps).x_adv,
            "pgd": lambda: A.pgd(model, x, y, eps, alpha, int(steps), random_start=False).x_adv,
        }
    save_file({k: a().contiguous() for k, a in attacks.items()}, f"{work}/{side}.safetensors")
    print("ready", flush=True)
    for line in sys.stdin:
        name = line.strip()
        start = time.perf_counter()
        attacks[name]()
        print(json.dumps({"name": name, "s": time.perf_counter() - start}), flush=True)
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
    worker = subprocess.Popen([str(python), str(work / "worker.py"), side, str(work), str(EPS), str(ALPHA), str(STEPS)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)  # fmt: skip
    if worker.stdout.readline().strip() != "ready":
        raise RuntimeError(f"the {side} worker failed to start (see its stderr above)")
    return worker


def main() -> int:
    import statistics

    from safetensors.torch import load_file, save_file

    torch.set_num_threads(1)
    python = ensure_venv()
    model = trained_cnn().eval()
    _, _, x, y = zoo.digits_data(0)
    work = Path(tempfile.mkdtemp(prefix="bench-attacks-"))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, work / "weights.safetensors")
    save_file({"x": x.contiguous(), "y": y}, work / "batch.safetensors")
    (work / "interp_bench_model.py").write_text(MODEL_SRC)
    (work / "worker.py").write_text(WORKER)
    workers = {
        side: _start(exe, side, work) for side, exe in (("ours", sys.executable), ("torchattacks", python))
    }
    ours = load_file(work / "ours.safetensors")
    theirs = load_file(work / "torchattacks.safetensors")
    fgsm_equal = torch.equal(ours["fgsm"], theirs["fgsm"])
    pgd_diff = (ours["pgd"] - theirs["pgd"]).abs().max().item()
    print(
        f"# attacks: ours vs torchattacks on digits-cnn, {len(x)} images, each in its own worker process; {machine()}"
    )
    print(f"FGSM eps={EPS}: identical bit for bit: {fgsm_equal}")
    print(f"PGD eps={EPS} alpha={ALPHA} steps={STEPS}, no random start: max |ours - theirs| = {pgd_diff:.2e}")

    times: dict[str, list[float]] = {f"{side} {k}": [] for k in ("fgsm", "pgd") for side in workers}
    for r in range(ROUNDS + 1):  # round 0 is the warm-up
        for name in ("fgsm", "pgd"):
            for side in ("ours", "torchattacks") if r % 2 == 0 else ("torchattacks", "ours"):
                worker = workers[side]
                worker.stdin.write(name + "\n")
                worker.stdin.flush()
                seconds = json.loads(worker.stdout.readline())["s"]
                if r:
                    times[f"{side} {name}"].append(seconds)
    for worker in workers.values():
        worker.stdin.close()
        worker.wait()
    medians = {k: statistics.median(v) for k, v in times.items()}
    ok = report(
        "time per attack (median of interleaved rounds)",
        medians,
        [
            ("FGSM ours/torchattacks", "ours fgsm", "torchattacks fgsm", 1.0, "max"),
            ("PGD ours/torchattacks", "ours pgd", "torchattacks pgd", 1.0, "max"),
        ],
    )
    best = {k: min(v) for k, v in times.items()}
    print("  fastest round (least disturbed by background load):")
    for kind in ("fgsm", "pgd"):
        ratio = best[f"ours {kind}"] / best[f"torchattacks {kind}"]
        print(f"    {kind}: ours {best[f'ours {kind}'] * 1e3:.1f} ms, torchattacks "
              f"{best[f'torchattacks {kind}'] * 1e3:.1f} ms, ratio {ratio:.3f}x")  # fmt: skip
    ok = ok and fgsm_equal and pgd_diff <= 1e-6
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
