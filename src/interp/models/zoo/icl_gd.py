"""icl-gd: one linear self-attention layer trained on in-context linear regression (von Oswald et al. 2023).

Each task draws ``W ~ N(0, I)`` (one output, so ``w`` is a ``d``-vector) and ``N + 1`` inputs
``x ~ U(-r, r)^d``; the tokens are ``e_i = (x_i, y_i)`` with ``y_i = w·x_i`` for the ``N`` context points
and ``e_q = (x_q, 0)`` for the query. The layer is the paper's linear self-attention (LSA, no softmax,
no bias, one head, key size ``d + 1``)::

    e_j  <-  e_j + P · Σ_{i in context} (W_V e_i) ((W_K e_i) · (W_Q e_j))

and the prediction is read, as in the paper's construction, from the query's last entry with the sign
flipped: ``ŷ = -out[q, -1]``. Keys and values come from the ``N`` context tokens only (the authors'
``include_query=False``). Module paths are the hook names: ``W_Q``, ``W_K``, ``W_V`` and ``P`` are
``nn.Linear`` (weights ``[out, in]``, the paper's matrices), ``scores`` carries the attention scores
``[batch, query, key]`` (linear attention: no softmax), ``z`` the attention-weighted values and
``resid_post`` the output tokens.

Recipe (the authors' 1-layer notebook, ``constructed_token_setup.ipynb`` in
google-research/self-organising-systems/transformers_learn_icl_by_gd): d = 10, N = 10, batch 2,048 fresh
tasks per step, 5,000 steps of Adam (lr 1e-3, betas 0.9/0.98), weights initialised N(0, 0.002 / fan_in)
(haiku VarianceScaling(0.002), truncated), loss ``0.5 · mean (y_q - ŷ)²``. The notebook clips the
global gradient norm at 1e-3; with Adam that only rescales the moments, so it is kept for fidelity.
Inputs are U(-1, 1) as the issue specifies (the notebook's ``create_reg_data`` with ``input_range = 1``
draws U(-0.5, 0.5)); ``x_range`` in the config says which.
"""

from __future__ import annotations

import math
from typing import Any

import einops
import torch
from torch import nn
from tqdm.auto import tqdm

from interp.models.zoo.recipe import Config, FitResult, Recipe


class LinearSelfAttention(nn.Module):
    """One head of linear self-attention over in-context regression tokens ``[batch, N + 1, d + 1]``.

    Returns the updated tokens (same shape). :meth:`predict` reads ``ŷ = -out[:, -1, -1]``.
    """

    def __init__(self, d: int, key_size: int | None = None) -> None:
        super().__init__()
        width = d + 1
        key_size = key_size or width
        self.d = d
        self.W_Q = nn.Linear(width, key_size, bias=False)
        self.W_K = nn.Linear(width, key_size, bias=False)
        self.W_V = nn.Linear(width, key_size, bias=False)
        self.P = nn.Linear(key_size, width, bias=False)
        self.scores = nn.Identity()  # hook point: (W_K e_i)·(W_Q e_j), [batch, query, key]
        self.z = nn.Identity()  # hook point: Σ_i scores_ji W_V e_i, [batch, query, key_size]
        self.resid_post = nn.Identity()  # hook point: the output tokens

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._attend(tokens, tokens)

    def predict(self, tokens: torch.Tensor) -> torch.Tensor:
        """``ŷ = -out[:, -1, -1]`` for each task's query, ``[batch]``.

        Only the query row is computed (the context rows do not reach ŷ), so the hook points see a
        query axis of length 1 here; ``forward`` computes every row.
        """
        return -self._attend(tokens, tokens[:, -1:])[:, -1, -1]

    def _attend(self, tokens: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        context = tokens[:, :-1]  # keys and values: the N context tokens, never the query
        q, k, v = self.W_Q(queries), self.W_K(context), self.W_V(context)
        scores = self.scores(einops.einsum(q, k, "b tq h, b tk h -> b tq tk"))
        z = self.z(einops.einsum(scores, v, "b tq tk, b tk h -> b tq h"))
        return self.resid_post(queries + self.P(z))


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


def sample_tasks(
    n_tasks: int,
    d: int = 10,
    n_context: int = 10,
    x_range: float = 1.0,
    w_scale: float = 1.0,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(tokens [n, N+1, d+1], y_query [n], w [n, d])``: x ~ U(-x_range, x_range), w ~ N(0, w_scale² I).

    The query token's y entry is 0; ``y_query = w·x_q`` is the target.
    """
    x = (torch.rand(n_tasks, n_context + 1, d, generator=generator, dtype=torch.float64) * 2 - 1) * x_range
    w = torch.randn(n_tasks, d, generator=generator, dtype=torch.float64) * w_scale
    y = einops.einsum(x, w, "n t d, n d -> n t")
    y_query = y[:, -1].clone()
    y[:, -1] = 0.0
    tokens = torch.cat([x, y[..., None]], dim=-1)
    return tokens.to(dtype), y_query.to(dtype), w.to(dtype)


def task_batch(cfg: Config, n_tasks: int, seed: int, dtype: torch.dtype = torch.float32) -> tuple:
    """A fixed, seeded set of ``n_tasks`` tasks from the recipe's distribution."""
    gen = torch.Generator().manual_seed(int(seed))
    return sample_tasks(n_tasks, int(cfg["d"]), int(cfg["n_context"]), float(cfg["x_range"]), 1.0, gen, dtype)


def loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The paper's in-context loss: ``0.5 · mean (y - ŷ)²``."""
    return 0.5 * ((target - prediction) ** 2).mean()


# ----------------------------------------------------------------------------------------------
# One step of gradient descent, and the paper's weight construction of it
# ----------------------------------------------------------------------------------------------


def gd_one_step(tokens: torch.Tensor, lr: float) -> torch.Tensor:
    """ŷ of one GD step from W = 0 on L(W) = 1/(2N) Σ_i (W x_i - y_i)²: ``ŷ = (η/N) Σ_i y_i x_i·x_q``."""
    x, y = tokens[:, :-1, :-1], tokens[:, :-1, -1]
    x_q = tokens[:, -1, :-1]
    w1 = einops.einsum(y, x, "n t, n t d -> n d") * (lr / x.shape[1])
    return einops.einsum(w1, x_q, "n d, n d -> n")


def optimal_gd_lr(tokens: torch.Tensor, target: torch.Tensor) -> float:
    """The η minimising the GD-1 loss on these tasks (the loss is a parabola in η: closed form)."""
    a = gd_one_step(tokens.double(), 1.0)
    return float((a * target.double()).sum() / (a * a).sum())


def line_search_gd_lr(
    tokens: torch.Tensor, target: torch.Tensor, grid: torch.Tensor | None = None
) -> tuple[float, float]:
    """The authors' brute-force line search (``np.arange(0.001, 25, 0.1)``): ``(best η, its loss)``."""
    grid = torch.arange(0.001, 25, 0.1, dtype=torch.float64) if grid is None else grid
    a = gd_one_step(tokens.double(), 1.0)
    losses = 0.5 * ((target.double()[None] - grid[:, None] * a[None]) ** 2).mean(dim=1)
    best = int(losses.argmin())
    return float(grid[best]), float(losses[best])


def gd_construction(d: int, n_context: int, lr: float, dtype: torch.dtype = torch.float32) -> dict:
    """The paper's weights (Prop. 1, W_0 = 0) as a state dict of :class:`LinearSelfAttention`.

    ``W_K = W_Q = [[I_d, 0], [0, 0]]``, ``W_V = [[0, 0], [0, -1]]``, ``P = (η/N) [[0, 0], [0, 1]]``: the query's
    y entry becomes ``-(η/N) Σ_i y_i x_i·x_q = -ŷ_GD``.
    """
    width = d + 1
    kq = torch.zeros(width, width, dtype=dtype)
    kq[:d, :d] = torch.eye(d, dtype=dtype)
    value = torch.zeros(width, width, dtype=dtype)
    value[d, d] = -1.0
    proj = torch.zeros(width, width, dtype=dtype)
    proj[d, d] = lr / n_context
    return {"W_Q.weight": kq.clone(), "W_K.weight": kq.clone(), "W_V.weight": value, "P.weight": proj}


def constructed_model(d: int, n_context: int, lr: float, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A :class:`LinearSelfAttention` carrying :func:`gd_construction` (eval mode)."""
    model = LinearSelfAttention(d).to(dtype)
    model.load_state_dict(gd_construction(d, n_context, lr, dtype))
    return model.eval()


# ----------------------------------------------------------------------------------------------
# Alignment with GD: predictions and their sensitivity to the query
# ----------------------------------------------------------------------------------------------


def query_sensitivity(model: nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ŷ [n], ∂ŷ/∂x_q [n, d])`` per task (tasks are independent, so one backward of Σŷ suffices)."""
    tokens = tokens.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        pred = model.predict(tokens) if hasattr(model, "predict") else -model(tokens)[:, -1, -1]
        (grad,) = torch.autograd.grad(pred.sum(), tokens)
    return pred.detach(), grad[:, -1, :-1]


def gd_sensitivity(tokens: torch.Tensor, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ŷ_GD, ∂ŷ_GD/∂x_q = W_1)`` in closed form."""
    x, y = tokens[:, :-1, :-1], tokens[:, :-1, -1]
    w1 = einops.einsum(y, x, "n t, n t d -> n d") * (lr / x.shape[1])
    return einops.einsum(w1, tokens[:, -1, :-1], "n d, n d -> n"), w1


def alignment(model: nn.Module, tokens: torch.Tensor, lr: float) -> dict[str, float]:
    """The authors' alignment measures against GD-1 (their ``analyse``), averaged over tasks.

    ``cos``: mean cosine of the sensitivities ∂ŷ/∂x_q; ``sens_l2``: mean ‖∂ŷ_TF/∂x_q - ∂ŷ_GD/∂x_q‖;
    ``pred_l2``: mean |ŷ_TF - ŷ_GD|. The last two are also given relative to the GD norms.
    """
    pred, grad = query_sensitivity(model, tokens)
    pred_gd, grad_gd = gd_sensitivity(tokens.to(pred.dtype), lr)
    cos = torch.nn.functional.cosine_similarity(grad, grad_gd, dim=-1, eps=1e-12)
    sens = (grad - grad_gd).norm(dim=-1)
    preds = (pred - pred_gd).abs()
    return {
        "cos": float(cos.mean()),
        "sens_l2": float(sens.mean()),
        "sens_l2_rel": float(sens.mean() / grad_gd.norm(dim=-1).mean()),
        "pred_l2": float(preds.mean()),
        "pred_l2_rel": float(preds.mean() / pred_gd.abs().mean()),
    }


# ----------------------------------------------------------------------------------------------
# Recipe
# ----------------------------------------------------------------------------------------------


def build(cfg: Config) -> nn.Module:
    model = LinearSelfAttention(int(cfg["d"]), int(cfg["key_size"]))
    scale = float(cfg["init_scale"])
    with torch.no_grad():
        for lin in (model.W_Q, model.W_K, model.W_V, model.P):
            std = math.sqrt(scale / lin.in_features)  # haiku VarianceScaling(scale), fan_in, truncated at 2σ
            nn.init.trunc_normal_(lin.weight, std=std / 0.87962566103423978, a=-2 * std, b=2 * std)
    return model


def _reference_lr(cfg: Config) -> float:
    """η* of GD-1 from the authors' grid line search on the recipe's line-search tasks."""
    tokens, target, _ = task_batch(cfg, int(cfg["eval_tasks"]), int(cfg["lr_seed"]), torch.float64)
    return line_search_gd_lr(tokens, target)[0]


def fit(model: nn.Module, cfg: Config, progress: bool = True) -> FitResult:
    gen = torch.Generator().manual_seed(int(cfg["data_seed"]))
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"], betas=tuple(cfg["betas"]))
    eval_tokens, eval_target, _ = task_batch(cfg, int(cfg["log_tasks"]), int(cfg["eval_seed"]))
    lr_gd = _reference_lr(cfg)
    gd_loss = float(loss(gd_one_step(eval_tokens, lr_gd), eval_target))
    # logged every log_every steps: test loss and alignment on log_tasks fixed tasks, and the mean
    # training-batch loss since the previous log point
    history: dict[str, list[Any]] = {k: [] for k in ("step", "train_loss", "test_loss", "cos", "sens_l2")}
    since_log: list[float] = []  # training-batch losses since the last log point
    model.train()
    bar = tqdm(range(int(cfg["steps"]) + 1), desc=cfg["name"], disable=not progress, mininterval=1.0)
    for step in bar:
        if step % int(cfg["log_every"]) == 0 or step == int(cfg["steps"]):
            model.eval()
            with torch.no_grad():
                test = float(loss(model.predict(eval_tokens), eval_target))
            align = alignment(model, eval_tokens, lr_gd)
            model.train()
            history["step"].append(step)
            history["train_loss"].append(sum(since_log) / len(since_log) if since_log else None)
            history["test_loss"].append(test)
            history["cos"].append(align["cos"])
            history["sens_l2"].append(align["sens_l2"])
            since_log = []
            bar.set_postfix(test=f"{test:.4f}", gd=f"{gd_loss:.4f}", refresh=False)
        if step == int(cfg["steps"]):
            break
        tokens, target, _ = sample_tasks(
            int(cfg["batch_size"]), int(cfg["d"]), int(cfg["n_context"]), float(cfg["x_range"]), 1.0, gen
        )
        batch_loss = loss(model.predict(tokens), target)
        opt.zero_grad(set_to_none=True)
        batch_loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), float(cfg["grad_clip"]))
        opt.step()
        since_log.append(batch_loss.item())
    bar.close()
    model.eval()
    return FitResult(
        history={**history, "gd_loss": [gd_loss] * len(history["step"])},
        training={"steps": int(cfg["steps"]), "gd_lr": lr_gd},
    )


@torch.no_grad()
def evaluate(model: nn.Module, cfg: Config) -> dict[str, Any]:
    """Test loss of the layer and of GD-1 (η from the line search) on a fixed set of tasks, and alignment.

    Computed in float64 on a copy, so the numbers do not depend on the float32 summation order.
    """
    import copy

    twin = copy.deepcopy(model).double().eval()
    tokens, target, _ = task_batch(cfg, int(cfg["eval_tasks"]), int(cfg["eval_seed"]), torch.float64)
    lr_gd = _reference_lr(cfg)
    return {
        "test_loss": float(loss(twin.predict(tokens), target)),
        "gd_loss": float(loss(gd_one_step(tokens, lr_gd), target)),
        "gd_lr": lr_gd,
        **alignment(twin, tokens, lr_gd),
    }


CONFIG: Config = {
    "name": "icl-gd",
    "d": 10,
    "n_context": 10,
    "key_size": 11,
    "x_range": 1.0,
    "init_scale": 0.002,
    "lr": 1e-3,
    "betas": (0.9, 0.98),
    "grad_clip": 1e-3,
    "batch_size": 2048,
    "steps": 5000,
    "log_every": 100,
    "log_tasks": 2048,
    "eval_tasks": 10_000,
    "seed": 0,
    "data_seed": 1,
    "eval_seed": 2,
    "lr_seed": 3,
}

RECIPE = Recipe(
    name="icl-gd",
    kind="module",
    description=(
        "One linear self-attention layer trained on in-context linear regression (d=10, N=10; von Oswald "
        "et al. 2023): it learns one step of gradient descent."
    ),
    input=(
        "tokens [batch, 11, 11]: rows e_i = (x_i, y_i) for 10 context points and (x_q, 0) for the query; "
        "icl_gd.sample_tasks(n) draws them. The prediction is -output[:, -1, -1] (model.predict)."
    ),
    config=CONFIG,
    build=build,
    fit=fit,
    evaluate=evaluate,
    fast_overrides={"steps": 1500, "batch_size": 1024, "log_every": 250, "eval_tasks": 4000},
    input_shape=(11, 11),
)
