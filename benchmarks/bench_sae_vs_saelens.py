"""TopK SAE training throughput: ``S.train`` vs SAELens's own ``SAETrainer``, same activations.

    OMP_NUM_THREADS=1 python benchmarks/bench_sae_vs_saelens.py

SAELens 6.54 pins ``transformer-lens<4``, so it runs in its own venv (``$SAELENS_VENV``, default
``/work/venvs/saelens``) as a worker subprocess; our side runs in a worker of the same shape in the
main environment, so both are fresh single-thread processes. SAELens's trainer needs no model:
``SAETrainer(cfg, sae, data_provider)`` takes any iterator of ``[batch, d_in]`` activation
batches, which is what its ``ActivationsStore`` would hand it.

Activations: MiniLM ``blocks.3.hook_resid_post`` over real English text (the zoo SAE's corpus,
``pydoc_data.topics``, via ``interp.sae.zoo_recipes.pydoc_split``): training chunks for training,
held-out chunks for evaluation. They are captured once and handed to both workers as safetensors.

Configuration (both sides): TopK, d_in 384, d_sae 1536, k 32, Adam lr 3e-4 (betas 0.9/0.999),
constant schedule (``lr_end = lr``), batch 1024, 30 steps, the same number of tokens, AuxK coefficient 1/32, ``torch`` seeded
with the same seed before the SAE is built. Each side keeps its own recipe details (its own
initialisation; SAELens: decoder init norm 0.1, activations rescaled by the decoder norm, grad-norm
clipping, no b_dec init; ours: unit-norm decoder rows, b_dec at the first batch's mean, a seeded
shuffle buffer). That is why the final loss is reported next to the speed: both final MSE and
explained variance on the same held-out activations, same formula (float64).

Each worker trains once to warm up, then trains from scratch on request; rounds alternate the
order of the sides; medians and [min-max] are reported. Goal: ours >= 1.5x SAELens's tokens/s at a
matching held-out explained variance (ours >= SAELens's - 0.02). Numbers on a shared machine are
provisional.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

VENV = Path(os.environ.get("SAELENS_VENV", "/work/venvs/saelens"))
HOOK = "blocks.3.hook_resid_post"
D_SAE, K, LR, BATCH, STEPS, SEED = 1536, 32, 3e-4, 1024, 30, 0
AUX = 1 / 32
TRAIN_CHUNKS, HELD_CHUNKS = 300, 60
ROUNDS = 5

WORKER = textwrap.dedent(
    """
    import json, os, sys, time
    os.environ["TQDM_DISABLE"] = "1"
    import torch
    from safetensors.torch import load_file
    torch.set_num_threads(1)
    side, work = sys.argv[1], sys.argv[2]
    cfg = json.loads(sys.argv[3])
    data = load_file(f"{work}/acts.safetensors")
    acts, held = data["train"], data["held"]
    tokens = cfg["batch"] * cfg["steps"]

    def batches():  # the activation stream SAELens's ActivationsStore would hand its trainer
        i = 0
        while True:
            if i + cfg["batch"] > len(acts):
                i = 0
            yield acts[i : i + cfg["batch"]]
            i += cfg["batch"]

    if side == "saelens":
        from sae_lens import SAETrainer, TopKTrainingSAE, TopKTrainingSAEConfig
        from sae_lens.config import SAETrainerConfig

        def train():
            torch.manual_seed(cfg["seed"])
            sae = TopKTrainingSAE(TopKTrainingSAEConfig(
                d_in=acts.shape[1], d_sae=cfg["d_sae"], k=cfg["k"], aux_loss_coefficient=cfg["aux"]))
            tcfg = SAETrainerConfig(total_training_samples=tokens, train_batch_size_samples=cfg["batch"],
                                    lr=cfg["lr"], lr_end=cfg["lr"])
            return SAETrainer(tcfg, sae, data_provider=batches()).fit()

        def reconstruct(sae, x):
            return sae(x)
    else:
        import interp
        from interp import sae as S
        model = interp.load("minilm")

        def train():
            torch.manual_seed(cfg["seed"])
            return S.train(model, cfg["hook"], acts, arch="topk", d_sae=cfg["d_sae"], k=cfg["k"],
                           tokens=tokens, batch_size=cfg["batch"], lr=cfg["lr"], seed=cfg["seed"],
                           aux_coefficient=cfg["aux"], checkpoint_every=0, progress=False)

        def reconstruct(sae, x):
            return sae.reconstruct(x)

    def held_out(sae):
        with torch.no_grad():
            r = reconstruct(sae, held).double()
        x = held.double()
        se = (x - r).pow(2).sum()
        return {"mse": float(se / len(x)), "explained_variance": float(1 - se / (x - x.mean(0)).pow(2).sum())}

    last = held_out(train())
    print("ready", flush=True)
    for line in sys.stdin:
        start = time.perf_counter()
        sae = train()
        seconds = time.perf_counter() - start
        last = held_out(sae)
        print(json.dumps({"s": seconds, **last}), flush=True)
    """
)


def capture(work: Path) -> int:
    """MiniLM activations on training and held-out pydoc chunks, saved for both workers; d_in."""
    from safetensors.torch import save_file

    import interp
    from interp.sae.zoo_recipes import capture_activations, pydoc_split

    model = interp.load("minilm")
    train, held, _ = pydoc_split(model.tokenizer)
    (acts,) = capture_activations(model, train[:TRAIN_CHUNKS], [HOOK])
    (held_acts,) = capture_activations(model, held[:HELD_CHUNKS], [HOOK])
    save_file({"train": acts.contiguous(), "held": held_acts.contiguous()}, str(work / "acts.safetensors"))
    print(f"activations: {HOOK}, {len(acts)} training tokens, {len(held_acts)} held-out tokens")
    return acts.shape[1]


def _start(python: str | Path, side: str, work: Path) -> subprocess.Popen:
    cfg = {
        "d_sae": D_SAE,
        "k": K,
        "lr": LR,
        "batch": BATCH,
        "steps": STEPS,
        "seed": SEED,
        "aux": AUX,
        "hook": HOOK,
    }
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if side == "saelens":
        env.pop("PYTHONPATH", None)
    worker = subprocess.Popen([str(python), str(work / "worker.py"), side, str(work), json.dumps(cfg)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)  # fmt: skip
    if worker.stdout.readline().strip() != "ready":
        raise RuntimeError(f"the {side} worker failed to start (see its stderr above)")
    return worker


def main() -> int:
    torch.set_num_threads(1)
    saelens_python = VENV / "bin" / "python"
    if not saelens_python.exists():
        print(f"no SAELens venv at {VENV} (set SAELENS_VENV); see benchmarks/bench_sae.py part 2 instead")
        return 1
    work = Path(tempfile.mkdtemp(prefix="bench-sae-saelens-"))
    d_in = capture(work)
    (work / "worker.py").write_text(WORKER)
    workers = {
        "ours": _start(sys.executable, "ours", work),
        "saelens": _start(saelens_python, "saelens", work),
    }
    runs: dict[str, list[dict]] = {side: [] for side in workers}
    for r in range(ROUNDS):
        for side in ("ours", "saelens") if r % 2 == 0 else ("saelens", "ours"):
            workers[side].stdin.write("train\n")
            workers[side].stdin.flush()
            runs[side].append(json.loads(workers[side].stdout.readline()))
    for worker in workers.values():
        worker.stdin.close()
        worker.wait()
    tokens = BATCH * STEPS
    print(f"\n# TopK training, ours (S.train) vs SAELens {_version(saelens_python)} SAETrainer; {machine()}")
    print(f"d_in {d_in}, d_sae {D_SAE}, k {K}, lr {LR}, batch {BATCH}, {STEPS} steps = {tokens} tokens, "
          f"{ROUNDS} interleaved rounds, one thread each")  # fmt: skip
    speed = {}
    for side, rs in runs.items():
        rates = [tokens / x["s"] for x in rs]
        speed[side] = statistics.median(rates)
        print(f"  {side:<8} {speed[side]:9.0f} tokens/s [{min(rates):.0f}-{max(rates):.0f}]   held-out "
              f"MSE {rs[-1]['mse']:.4f}  explained variance {rs[-1]['explained_variance']:.4f}")  # fmt: skip
    ratio = speed["ours"] / speed["saelens"]
    ratios = [tokens / o["s"] / (tokens / t["s"]) for o, t in zip(runs["ours"], runs["saelens"], strict=True)]
    ev_ok = runs["ours"][-1]["explained_variance"] >= runs["saelens"][-1]["explained_variance"] - 0.02
    met = ratio >= 1.5 and ev_ok
    print(f"  ours / SAELens speed {ratio:.3f}x [per round {min(ratios):.3f}-{max(ratios):.3f}] "
          f"(goal >= 1.5x: {'met' if ratio >= 1.5 else 'MISSED'}); held-out EV within 0.02 or better: "
          f"{'yes' if ev_ok else 'NO'}")  # fmt: skip
    print("PASS" if met else "FAIL")
    return 0 if met else 1


def _version(python: Path) -> str:
    done = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('sae-lens'))"],
        capture_output=True,
        text=True,
    )
    return done.stdout.strip() or "?"


if __name__ == "__main__":
    raise SystemExit(main())
