"""modadd-113: the grokking transformer of Nanda et al. (2023), "Progress measures for grokking".

A one-layer transformer (d_model 128, 4 heads of 32, ReLU MLP of 512, no LayerNorm, untied
embed/unembed) learns ``(a + b) mod 113`` from 30% of all pairs. It first memorizes the training set
(test loss rises to ~30), then slowly forms a Fourier-multiplication circuit, and finally "groks":
test loss collapses once weight decay cleans up the memorizing weights.

The recipe follows the TransformerLens ``Grokking_Demo`` notebook: inputs ``(a, b, =)`` with ``=``
the token 113, split by ``torch.manual_seed(598); randperm(113**2)``, full-batch AdamW
(lr 1e-3, weight decay 1.0, betas 0.9/0.98), float64 cross-entropy at the last position, all
biases frozen at zero, model seed 999. It runs the demo's full 25,000 epochs. Stopping once test loss
is low is not enough: measured on this recipe, test loss falls below 1 at epoch 16,440 and below
1e-3 at 17,660, but the MLP neurons are still being cleaned up then. The share of neurons that one
frequency explains (>= 85% of their variance; the paper reports 84.6%) is 10% at epoch 16,400, 32% at
17,700 and 46% at 18,160, still rising.

Training speed-up (numerically the same model): only the final position's logits enter the loss
and attention is causal, so :func:`last_position_logits` runs the query, MLP and unembedding for that
position only. :func:`evaluate` uses the model's own full forward, so the recorded metrics are an
independent check of the fast path.

Snapshots: every ``snapshot_every`` epochs the trainable weights are kept in memory; at the end a
dozen epochs spanning memorization, circuit formation and cleanup are written to
``modadd-113.snapshots-K.safetensors`` (keys ``epoch{E:05d}/{param}``) for progress measures.
Read them back with :func:`load_snapshots`.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import einops
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from interp.models.zoo.bridge import native_bridge_config
from interp.models.zoo.recipe import Config, FitResult, Recipe, ResumeState

NAME = "modadd-113"

CONFIG: Config = {
    "p": 113,
    "frac_train": 0.3,
    "data_seed": 598,
    "seed": 999,
    "n_layers": 1,
    "d_model": 128,
    "n_heads": 4,
    "d_head": 32,
    "d_mlp": 512,
    "act_fn": "relu",
    "lr": 1e-3,
    "weight_decay": 1.0,
    "betas": [0.9, 0.98],
    "max_epochs": 25_000,
    "stop_test_loss": None,  # no early stop: the circuit keeps cleaning up after test loss collapses
    "stop_patience": None,
    "log_every": 20,
    "snapshot_every": 100,
    "n_snapshots": 12,
    "snapshots_per_file": 6,
    "num_threads": 1,
}

# Quick variant for the test-suite: a smaller prime, more of the pairs as training data (more data ->
# faster generalisation, Power et al. 2022), a half-width model and a larger learning rate. Same as
# the fast config of interp.reproductions.grokking, so both paths analyse the same kind of run.
FAST_OVERRIDES: Config = {
    "p": 53,
    "frac_train": 0.6,
    "d_model": 64,
    "d_mlp": 256,
    "d_head": 16,
    "lr": 3e-3,
    "max_epochs": 1_500,
    "log_every": 10,
    "snapshot_every": 50,
    "stop_test_loss": 1e-2,
    "stop_patience": 300,
    "n_snapshots": 6,
    "num_threads": 1,  # a tiny model: one thread is fastest, and a busy second core cannot stall it
}


def bridge_config(cfg: Config) -> Any:
    """The TransformerBridgeConfig for ``cfg`` (the TL grokking-demo fields)."""
    p = int(cfg["p"])
    return native_bridge_config(
        cfg,
        "d_mlp",
        "act_fn",
        normalization_type=None,
        d_vocab=p + 1,
        d_vocab_out=p,
        n_ctx=3,
        positional_embedding_type="standard",
    )


def build(cfg: Config) -> nn.Module:
    """A fresh TransformerBridge with the grokking architecture and every bias frozen at zero."""
    from transformer_lens.model_bridge import TransformerBridge

    model = TransformerBridge.boot_native(bridge_config(cfg))
    freeze_biases(model)
    return model


def freeze_biases(model: nn.Module) -> None:
    """As in the TL demo: biases stay at their zero init and are not trained (nor decayed)."""
    for name, param in model.named_parameters():
        if name.endswith("bias"):
            param.requires_grad_(False)


def all_pairs(p: int) -> torch.Tensor:
    """Every input ``(a, b, =)`` as a ``[p*p, 3]`` token tensor, row ``a*p + b``."""
    a = einops.repeat(torch.arange(p), "i -> (i j)", j=p)
    b = einops.repeat(torch.arange(p), "j -> (i j)", i=p)
    eq = torch.full_like(a, p)
    return torch.stack([a, b, eq], dim=1)


def dataset(cfg: Config) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(train_tokens, train_labels, test_tokens, test_labels)`` with the demo's seeded split."""
    p = int(cfg["p"])
    tokens = all_pairs(p)
    labels = (tokens[:, 0] + tokens[:, 1]) % p
    gen = torch.Generator().manual_seed(int(cfg["data_seed"]))
    perm = torch.randperm(p * p, generator=gen)
    cut = int(p * p * cfg["frac_train"])
    train_idx, test_idx = perm[:cut], perm[cut:]
    return tokens[train_idx], labels[train_idx], tokens[test_idx], labels[test_idx]


def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy in float64 (train loss reaches ~1e-7, below float32 log-softmax resolution)."""
    logprobs = logits.to(torch.float64).log_softmax(dim=-1)
    return -logprobs.gather(-1, labels[:, None]).mean()


def _native(module: nn.Module) -> nn.Module:
    return getattr(module, "original_component", module)


def last_position_logits(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Logits at the final position only, computed from the bridge's own parameters.

    Equal (to float rounding) to ``model(tokens)[:, -1]`` for this 1-layer, no-LN architecture, but
    ~2.5x cheaper: keys/values need all 3 positions, everything else only the last.
    """
    native = model.original_model
    block = _native(native.layers[0])
    attn, mlp = _native(block.attn), _native(block.mlp)
    w_q, w_k, w_v, w_o = (_native(getattr(attn, n)) for n in ("q", "k", "v", "o"))
    fc_in, fc_out = _native(mlp.fc_in), _native(mlp.fc_out)
    n_heads = attn.n_heads

    x = _native(native.tok_embed)(tokens) + _native(native.pos).weight[: tokens.shape[1]]
    q = einops.rearrange(w_q(x[:, -1]), "b (h d) -> b h d", h=n_heads)
    k = einops.rearrange(w_k(x), "b s (h d) -> b h s d", h=n_heads)
    v = einops.rearrange(w_v(x), "b s (h d) -> b h s d", h=n_heads)
    scores = torch.einsum("bhd,bhsd->bhs", q, k) / attn.scale  # the last query sees every key
    z = torch.einsum("bhs,bhsd->bhd", scores.softmax(dim=-1), v)
    resid = x[:, -1] + w_o(einops.rearrange(z, "b h d -> b (h d)"))
    resid = resid + fc_out(mlp.act(fc_in(resid)))
    return _native(native.head)(resid)


def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state-dict entries that training changes (frozen zero biases are left out)."""
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    return {
        k: v.detach().clone()
        for k, v in model.state_dict(keep_vars=True).items()
        if isinstance(v, nn.Parameter) and id(v) in trainable
    }


def _pick_snapshot_epochs(history: dict[str, list[Any]], available: list[int], n: int) -> list[int]:
    """~``n`` epochs spanning the run: init, memorized, test-loss peak, grokked, clean, final + fill."""
    epochs, train_loss, test_loss = history["epoch"], history["train_loss"], history["test_loss"]

    def snap(epoch: int) -> int:
        return min(available, key=lambda e: abs(e - epoch))

    anchors = {available[0], available[-1]}
    first = [e for e, tl in zip(epochs, train_loss, strict=True) if tl < 0.05]
    if first:
        anchors.add(snap(first[0]))
    anchors.add(snap(epochs[max(range(len(test_loss)), key=test_loss.__getitem__)]))
    for threshold in (1.0, 1e-3):
        hit = [e for e, tl in zip(epochs, test_loss, strict=True) if tl < threshold]
        if hit:
            anchors.add(snap(hit[0]))
    chosen = sorted(anchors)
    while len(chosen) < min(n, len(available)):
        gaps = [(chosen[i + 1] - chosen[i], i) for i in range(len(chosen) - 1)]
        _, i = max(gaps)
        mid = snap((chosen[i] + chosen[i + 1]) // 2)
        if mid in chosen:
            break
        chosen = sorted({*chosen, mid})
    return chosen


class _Snapshots:
    """Trainable weights every ``snapshot_every`` epochs: in memory, or one file each when resumable."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        self.memory: dict[int, dict[str, torch.Tensor]] = {}

    def add(self, epoch: int, tensors: dict[str, torch.Tensor]) -> None:
        if self.directory is None:
            self.memory[epoch] = tensors
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.directory / f"epoch{epoch:05d}.tmp"
        save_file({k: t.contiguous() for k, t in tensors.items()}, str(tmp))
        tmp.replace(self.directory / f"epoch{epoch:05d}.safetensors")

    def epochs(self) -> list[int]:
        if self.directory is None:
            return sorted(self.memory)
        return sorted(int(f.stem.removeprefix("epoch")) for f in self.directory.glob("epoch*.safetensors"))

    def get(self, epoch: int) -> dict[str, torch.Tensor]:
        if self.directory is None:
            return self.memory[epoch]
        return load_file(str(self.directory / f"epoch{epoch:05d}.safetensors"))


def fit(model: nn.Module, cfg: Config, progress: bool = True, resume: ResumeState | None = None) -> FitResult:
    """Full-batch AdamW for ``max_epochs``, or until test loss < ``stop_test_loss`` for ``stop_patience``
    epochs when ``stop_test_loss`` is set (the fast variant).

    With ``resume``, the full training state is saved every ``resume.every_s`` seconds and a saved
    state is picked up where it stopped; the continued run is bit-identical to an uninterrupted one.
    """
    if cfg.get("num_threads"):
        torch.set_num_threads(int(cfg["num_threads"]))
    train_x, train_y, test_x, test_y = dataset(cfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"], betas=tuple(cfg["betas"]))
    history: dict[str, list[Any]] = {
        k: [] for k in ("epoch", "train_loss", "test_loss", "train_acc", "test_acc")
    }
    snapshots = _Snapshots(resume.snapshot_dir if resume is not None else None)
    below_since: int | None = None
    start_epoch, earlier = 1, {"time_s": 0.0, "cpu_time_s": 0.0}
    saved = resume.load(cfg) if resume is not None else None
    if saved is not None:
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        history, below_since = saved["history"], saved["below_since"]
        start_epoch, earlier = saved["epoch"] + 1, saved["elapsed"]
    else:
        snapshots.add(0, _trainable_state(model))
    clock, cpu_clock = time.perf_counter(), time.process_time()

    def save_state(epoch: int) -> None:
        assert resume is not None
        elapsed = {
            "time_s": earlier["time_s"] + time.perf_counter() - clock,
            "cpu_time_s": earlier["cpu_time_s"] + time.process_time() - cpu_clock,
        }
        state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "history": history}
        resume.save(cfg, {**state, "below_since": below_since, "epoch": epoch, "elapsed": elapsed})

    epoch = start_epoch - 1
    max_epochs = int(cfg["max_epochs"])
    bar = tqdm(
        range(start_epoch, max_epochs + 1),
        desc=NAME,
        disable=not progress,
        mininterval=2.0,
        initial=start_epoch - 1,
        total=max_epochs,
    )
    for epoch in bar:
        logits = last_position_logits(model, train_x)
        loss = loss_fn(logits, train_y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if epoch % cfg["snapshot_every"] == 0:
            snapshots.add(epoch, _trainable_state(model))
        if epoch % cfg["log_every"] == 0 or epoch == 1:
            with torch.no_grad():
                test_logits = last_position_logits(model, test_x)
                test_loss = loss_fn(test_logits, test_y).item()
                history["epoch"].append(epoch)
                history["train_loss"].append(loss.item())  # loss before this epoch's step
                history["test_loss"].append(test_loss)
                history["train_acc"].append((logits.argmax(-1) == train_y).float().mean().item())
                history["test_acc"].append((test_logits.argmax(-1) == test_y).float().mean().item())
            bar.set_postfix(train=f"{loss.item():.2e}", test=f"{test_loss:.2e}", refresh=False)
            if cfg["stop_test_loss"] is not None and test_loss < cfg["stop_test_loss"]:
                below_since = epoch if below_since is None else below_since
                if epoch - below_since >= cfg["stop_patience"]:
                    break
            else:
                below_since = None
            if resume is not None and resume.due():
                save_state(epoch)
    bar.close()
    model.eval()
    if epoch not in snapshots.epochs():
        snapshots.add(epoch, _trainable_state(model))

    chosen = _pick_snapshot_epochs(history, snapshots.epochs(), int(cfg["n_snapshots"]))
    extra: dict[str, dict[str, torch.Tensor]] = {}
    per_file = int(cfg["snapshots_per_file"])
    for k in range(math.ceil(len(chosen) / per_file)):
        extra[f"snapshots-{k}"] = {
            f"epoch{e:05d}/{key}": t
            for e in chosen[k * per_file : (k + 1) * per_file]
            for key, t in snapshots.get(e).items()
        }

    def first_epoch(column: str, pred: Any) -> int | None:
        hits = [e for e, v in zip(history["epoch"], history[column], strict=True) if pred(v)]
        return hits[0] if hits else None

    peak = max(range(len(history["test_loss"])), key=history["test_loss"].__getitem__)
    training = {
        "epochs": epoch,
        "stopped_early": epoch < int(cfg["max_epochs"]),
        "first_epoch_train_loss_below_0.05": first_epoch("train_loss", lambda v: v < 0.05),
        "test_loss_peak_epoch": history["epoch"][peak],
        "test_loss_peak": history["test_loss"][peak],
        "first_epoch_test_loss_below_1": first_epoch("test_loss", lambda v: v < 1.0),
        "first_epoch_test_acc_above_0.99": first_epoch("test_acc", lambda v: v > 0.99),
        "first_epoch_test_loss_below_1e-3": first_epoch("test_loss", lambda v: v < 1e-3),
        "snapshot_epochs": chosen,
        "n_train": len(train_y),
        "n_test": len(test_y),
        "resumed_at_epoch": start_epoch if saved is not None else None,
        "time_before_resume_s": round(earlier["time_s"], 2),
        "cpu_time_before_resume_s": round(earlier["cpu_time_s"], 2),
    }
    return FitResult(history=history, training=training, extra_tensors=extra)


@torch.no_grad()
def evaluate(model: nn.Module, cfg: Config) -> dict[str, Any]:
    """Train/test loss (float64) and accuracy from the model's full forward pass."""
    train_x, train_y, test_x, test_y = dataset(cfg)
    metrics: dict[str, Any] = {}
    for split, x, y in (("train", train_x, train_y), ("test", test_x, test_y)):
        logits = model(x)[:, -1]
        metrics[f"{split}_loss"] = loss_fn(logits, y).item()
        metrics[f"{split}_acc"] = (logits.argmax(-1) == y).double().mean().item()
    metrics["sum_sq_weights"] = float(sum((p.double() ** 2).sum() for p in model.parameters()))
    return metrics


def split_snapshots(tensors: dict[str, torch.Tensor]) -> dict[int, dict[str, torch.Tensor]]:
    """``{"epoch00100/embed.weight": t, ...}`` -> ``{100: {"embed.weight": t, ...}}``."""
    out: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        prefix, _, param = key.partition("/")
        out.setdefault(int(prefix.removeprefix("epoch")), {})[param] = t
    return out


RECIPE = Recipe(
    name=NAME,
    kind="transformer",
    description=(
        "Grokking (Nanda et al. 2023): 1-layer transformer, d_model 128, 4 heads, ReLU MLP 512, no LN, "
        "trained full-batch on 30% of (a + b) mod 113 for 25,000 epochs, past grokking; snapshots for progress measures."
    ),
    input="tokens [batch, 3] = (a, b, 113) with a, b in 0..112; logits at the last position give (a+b) mod 113",
    config=CONFIG,
    build=build,
    fit=fit,
    evaluate=evaluate,
    fast_overrides=FAST_OVERRIDES,
    resumable=True,
)

__all__ = ["RECIPE", "all_pairs", "dataset", "last_position_logits", "loss_fn", "split_snapshots"]
