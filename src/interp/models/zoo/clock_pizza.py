"""clock-pizza: one-layer transformers on ``(a + b) mod 59`` whose attention rate α picks the algorithm.

Zhong, Liu, Tegmark & Andreas (NeurIPS 2023), "The Clock and the Pizza". The model is the authors'
(``code/train-main.py`` in github.com/fjzzq2002/pizza, read, not copied): inputs are the two tokens
``(a, b)`` (no ``=`` token), learned token and position embeddings, one attention layer whose pattern is

    A = α · softmax(q·k / sqrt(d_head)) + (1 - α) · J       (J: all ones, the authors' "constant attention")

then a ReLU MLP (width 4·d_model, with biases), residual connections, no LayerNorm, an unembedding
without bias, logits read at the last position. α = 1 is standard attention (it learns Clock), α = 0
is constant attention (it learns Pizza). Note the constant part is ``J`` (weight 1 on each of the two
positions), as in the authors' code, not the normalised ``J / 2``; at α = 0 the two differ by a factor
of 2 that W_O absorbs.

Training follows the authors' configs (``code/save/config_*.json``): p = 59, 80% of the 59² pairs for
training (split by a seeded permutation), full-batch AdamW, lr 1e-3, weight decay 2.0, betas
0.9/0.98, 10-epoch linear warm-up, float64 cross-entropy. The authors train d_model 128 for 20,000
epochs on a GPU; to keep each model to about a minute of one CPU core the zoo uses d_model 64
(4 heads of 16, MLP 256) and 2,000 epochs, which is well past the point where test accuracy reaches 100%
for both α = 0 and α = 1 (recorded in each checkpoint's history).

Module paths name the hook points (``interp.load("zoo:clock-pizza-a1")`` exposes them as
``PATH.hook_in`` / ``PATH.hook_out``): ``embed`` (token embeddings, ``[batch, 2, d_model]``; gradient
symmetricity differentiates with respect to them), ``attn.pattern`` (``[batch, head, query, key]``),
``attn.z``, ``mlp.post`` (the ReLU output) and ``resid_post``. ``interp.load`` feeds module models
float tensors, so float token ids are accepted if they are whole numbers in 0..p-1.
"""

from __future__ import annotations

import math
from typing import Any

import einops
import torch
from torch import nn
from tqdm.auto import tqdm

from interp.models.zoo.recipe import Config, FitResult, Recipe


class AlphaAttention(nn.Module):
    """Multi-head attention with pattern ``α softmax(scores) + (1 - α) J`` (no mask: every position sees both)."""

    def __init__(self, d_model: int, n_heads: int, d_head: int, alpha: float) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"attention rate alpha must be in [0, 1], got {alpha}")
        self.alpha = float(alpha)
        self.d_head = d_head
        scale = 1 / math.sqrt(d_model)
        self.W_Q = nn.Parameter(torch.randn(n_heads, d_model, d_head) * scale)
        self.W_K = nn.Parameter(torch.randn(n_heads, d_model, d_head) * scale)
        self.W_V = nn.Parameter(torch.randn(n_heads, d_model, d_head) * scale)
        self.W_O = nn.Parameter(torch.randn(n_heads, d_head, d_model) * scale)
        self.pattern = nn.Identity()  # hook point: [batch, head, query, key]
        self.z = nn.Identity()  # hook point: [batch, query, head, d_head]

    def forward(self, x: torch.Tensor, queries: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` [batch, pos, d_model] gives keys and values; ``queries`` (default ``x``) the query rows."""
        queries = x if queries is None else queries
        q = einops.einsum(queries, self.W_Q, "b q d, h d e -> b h q e")
        k = einops.einsum(x, self.W_K, "b k d, h d e -> b h k e")
        v = einops.einsum(x, self.W_V, "b k d, h d e -> b h k e")
        scores = einops.einsum(q, k, "b h q e, b h k e -> b h q k") / math.sqrt(self.d_head)
        pattern = self.pattern(self.alpha * scores.softmax(dim=-1) + (1.0 - self.alpha))
        z = self.z(einops.einsum(pattern, v, "b h q k, b h k e -> b q h e"))
        return einops.einsum(z, self.W_O, "b q h e, h e d -> b q d")


class MLP(nn.Module):
    """ReLU MLP with biases (the authors' ``MLP``)."""

    def __init__(self, d_model: int, d_mlp: int) -> None:
        super().__init__()
        self.W_in = nn.Parameter(torch.randn(d_model, d_mlp) / math.sqrt(d_mlp))
        self.b_in = nn.Parameter(torch.zeros(d_mlp))
        self.W_out = nn.Parameter(torch.randn(d_mlp, d_model) / math.sqrt(d_model))
        self.b_out = nn.Parameter(torch.zeros(d_model))
        self.post = nn.Identity()  # hook point: ReLU output [batch, pos, d_mlp]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.post(torch.relu(x @ self.W_in + self.b_in))
        return hidden @ self.W_out + self.b_out


def _token_ids(tokens: torch.Tensor, p: int) -> torch.Tensor:
    """Integer token ids; a float tensor (``interp.load`` wraps module models with float inputs) must hold
    whole numbers. Out-of-range or fractional ids are an InputError naming the valid range."""
    from interp.errors import InputError

    if tokens.is_floating_point():
        if not bool((tokens == tokens.round()).all()):
            raise InputError(f"clock-pizza tokens must be whole numbers in 0..{p - 1}, got fractional values")
        tokens = tokens.long()
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= p):
        raise InputError(
            f"clock-pizza tokens must lie in 0..{p - 1}, got values in {int(tokens.min())}..{int(tokens.max())}"
        )
    return tokens


class ClockPizzaTransformer(nn.Module):
    """One-layer, no-LayerNorm transformer on ``(a, b)`` with attention rate ``alpha``.

    ``forward(tokens [batch, 2])`` returns logits ``[batch, 2, p]``; :meth:`last_logits` the last
    position's only (what the loss and every metric use); :meth:`from_embeddings` runs the model on
    given token embeddings (for gradients with respect to them).
    """

    def __init__(self, p: int, d_model: int, n_heads: int, d_head: int, d_mlp: int, alpha: float) -> None:
        super().__init__()
        self.p = p
        self.W_E = nn.Parameter(torch.randn(p, d_model) / math.sqrt(d_model))
        self.W_pos = nn.Parameter(torch.randn(2, d_model) / math.sqrt(d_model))
        self.attn = AlphaAttention(d_model, n_heads, d_head, alpha)
        self.mlp = MLP(d_model, d_mlp)
        self.W_U = nn.Parameter(torch.randn(d_model, p) / math.sqrt(p))
        self.embed = nn.Identity()  # hook point: token embeddings [batch, 2, d_model]
        self.resid_post = nn.Identity()  # hook point: [batch, pos, d_model]

    @property
    def alpha(self) -> float:
        return self.attn.alpha

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._run(self.embed(self.W_E[_token_ids(tokens, self.p)]), last_only=False)

    def last_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits at the last position ``[batch, p]`` (only that row is computed: same numbers, half the cost)."""
        return self._run(self.embed(self.W_E[_token_ids(tokens, self.p)]), last_only=True)[:, -1]

    def from_embeddings(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Last-position logits ``[batch, p]`` from token embeddings ``[batch, 2, d_model]``."""
        return self._run(embeddings, last_only=True)[:, -1]

    def _run(self, embeddings: torch.Tensor, last_only: bool) -> torch.Tensor:
        x = embeddings + self.W_pos
        rows = x[:, -1:] if last_only else x
        resid = rows + self.attn(x, rows)
        resid = self.resid_post(resid + self.mlp(resid))
        return resid @ self.W_U


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


def all_pairs(p: int) -> torch.Tensor:
    """Every input ``(a, b)`` as ``[p*p, 2]`` tokens, row ``a*p + b``."""
    a = einops.repeat(torch.arange(p), "i -> (i j)", j=p)
    b = einops.repeat(torch.arange(p), "j -> (i j)", i=p)
    return torch.stack([a, b], dim=1)


def split(cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train_idx, test_idx)`` into :func:`all_pairs`, from a permutation seeded by ``data_seed``."""
    p = int(cfg["p"])
    perm = torch.randperm(p * p, generator=torch.Generator().manual_seed(int(cfg["data_seed"])))
    cut = int(p * p * float(cfg["frac_train"]))
    return perm[:cut], perm[cut:]


def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy in float64 (the authors' ``cross_entropy_high_precision``)."""
    logprobs = logits.to(torch.float64).log_softmax(dim=-1)
    return -logprobs.gather(-1, labels[:, None]).mean()


# ----------------------------------------------------------------------------------------------
# Recipe
# ----------------------------------------------------------------------------------------------


def build(cfg: Config) -> nn.Module:
    return ClockPizzaTransformer(
        int(cfg["p"]),
        int(cfg["d_model"]),
        int(cfg["n_heads"]),
        int(cfg["d_model"]) // int(cfg["n_heads"]),
        4 * int(cfg["d_model"]),
        float(cfg["alpha"]),
    )


def fit(model: nn.Module, cfg: Config, progress: bool = True) -> FitResult:
    """Full-batch AdamW with a 10-epoch linear warm-up for ``epochs`` epochs."""
    p = int(cfg["p"])
    tokens = all_pairs(p)
    labels = tokens.sum(dim=1) % p
    train_idx, test_idx = split(cfg)
    train_x, train_y, test_x, test_y = (
        tokens[train_idx],
        labels[train_idx],
        tokens[test_idx],
        labels[test_idx],
    )
    opt = torch.optim.AdamW(
        model.parameters(),
        lr=float(cfg["lr"]),
        weight_decay=float(cfg["weight_decay"]),
        betas=tuple(cfg["betas"]),
    )
    warmup = int(cfg["warmup"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(step / warmup, 1.0))
    history: dict[str, list[Any]] = {k: [] for k in ("epoch", "train_loss", "test_loss", "test_acc")}
    model.train()
    epochs = int(cfg["epochs"])
    for epoch in tqdm(range(1, epochs + 1), desc=cfg["name"], disable=not progress, mininterval=2.0):
        loss = loss_fn(model.last_logits(train_x), train_y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if epoch % int(cfg["log_every"]) == 0 or epoch in (1, epochs):
            with torch.no_grad():
                test_logits = model.last_logits(test_x)
            history["epoch"].append(epoch)
            history["train_loss"].append(loss.item())
            history["test_loss"].append(loss_fn(test_logits, test_y).item())
            history["test_acc"].append((test_logits.argmax(-1) == test_y).double().mean().item())
    model.eval()
    hits = [e for e, a in zip(history["epoch"], history["test_acc"], strict=True) if a >= 0.999]
    return FitResult(
        history=history,
        training={"epochs": epochs, "first_logged_epoch_test_acc_1": hits[0] if hits else None},
    )


@torch.no_grad()
def evaluate(model: nn.Module, cfg: Config) -> dict[str, Any]:
    """Train/test loss and accuracy from the full forward pass (an independent check of ``last_logits``)."""
    p = int(cfg["p"])
    tokens = all_pairs(p)
    labels = tokens.sum(dim=1) % p
    logits = model(tokens)[:, -1]
    metrics: dict[str, Any] = {}
    for name, idx in zip(("train", "test"), split(cfg), strict=True):
        metrics[f"{name}_loss"] = loss_fn(logits[idx], labels[idx]).item()
        metrics[f"{name}_acc"] = (logits[idx].argmax(-1) == labels[idx]).double().mean().item()
    return metrics


CONFIG: Config = {
    "p": 59,
    "frac_train": 0.8,
    "d_model": 64,
    "n_heads": 4,
    "lr": 1e-3,
    "weight_decay": 2.0,
    "betas": (0.9, 0.98),
    "warmup": 10,
    "epochs": 2000,
    "log_every": 50,
    "data_seed": 0,
}

# Fast variant for the test-suite: a quarter of the epochs at twice the learning rate (same width:
# at d_model 32 an alpha = 1 model measured here learned Pizza, the paper's width dependence).
FAST_OVERRIDES: Config = {"epochs": 1000, "lr": 2e-3, "log_every": 50}


def _recipe(name: str, alpha: float, seed: int, what: str) -> Recipe:
    return Recipe(
        name=name,
        kind="module",
        description=(
            f"Clock and Pizza (Zhong et al. 2023): 1-layer transformer on (a + b) mod 59, attention rate "
            f"alpha = {alpha:g} ({what}); d_model 64, 4 heads, ReLU MLP 256, no LN."
        ),
        input="tokens [batch, 2] = (a, b) with a, b in 0..58; model.last_logits(tokens) gives (a+b) mod 59",
        config={**CONFIG, "name": name, "alpha": alpha, "seed": seed},
        build=build,
        fit=fit,
        evaluate=evaluate,
        fast_overrides=FAST_OVERRIDES,
        input_shape=(2,),
    )


RECIPES = [
    _recipe("clock-pizza-a1", 1.0, 0, "standard attention: the paper's Clock model"),
    _recipe("clock-pizza-a0", 0.0, 0, "constant attention: the paper's Pizza model"),
]

__all__ = ["RECIPES", "ClockPizzaTransformer", "all_pairs", "build", "fit", "loss_fn", "split"]
