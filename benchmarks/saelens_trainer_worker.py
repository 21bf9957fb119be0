"""SAELens's own trainer on a saved activation tensor; run inside the SAELens venv by bench_sae.py.

    /work/venvs/saelens/bin/python benchmarks/saelens_trainer_worker.py ACTS.safetensors CONFIG_JSON

``ACTS.safetensors`` holds ``train`` ``[n, d]`` and ``held`` ``[m, d]``; the config gives ``d_sae``,
``k``, ``batch``, ``steps``, ``lr``, ``seed``. Trains a ``TopKTrainingSAE`` with ``SAETrainer.fit``
on the training rows in order (wrapping around, as the interp side reads them), times ``fit`` only,
and prints one JSON line: seconds, tokens/s and the held-out MSE (summed over dims, mean over rows).
Imports SAELens only.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402


def batches(acts: torch.Tensor, batch: int) -> Iterator[torch.Tensor]:
    start = 0
    while True:
        if start + batch > len(acts):
            start = 0
        yield acts[start : start + batch]
        start += batch


def main() -> None:
    from sae_lens import SAETrainer, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig

    tensors = load_file(sys.argv[1])
    cfg = json.loads(sys.argv[2])
    torch.manual_seed(cfg["seed"])
    train, held = tensors["train"], tensors["held"]
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=train.shape[1], d_sae=cfg["d_sae"], k=cfg["k"]))
    trainer_cfg = SAETrainerConfig(
        total_training_samples=cfg["steps"] * cfg["batch"],
        train_batch_size_samples=cfg["batch"],
        lr=cfg["lr"],
        lr_end=cfg["lr"] / 10,  # what LanguageModelSAERunnerConfig fills in; unused by the constant schedule
    )
    trainer = SAETrainer(trainer_cfg, sae, batches(train, cfg["batch"]))
    start = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - start
    with torch.no_grad():
        mse = float((sae.decode(sae.encode(held)) - held).pow(2).sum(-1).mean())
    print(
        json.dumps(
            {"seconds": seconds, "tokens_per_s": cfg["steps"] * cfg["batch"] / seconds, "held_mse": mse}
        )
    )


if __name__ == "__main__":
    main()
