"""Toy Models of Superposition (Elhage et al. 2022): x̂ = ReLU(Wᵀ W x + b), many instances at once.

``n`` sparse features are squeezed through ``m < n`` hidden dimensions and read back out with the
transposed matrix. Each feature is ``U[0, 1]`` with probability ``p`` (else 0) and has an importance
``I_i`` in the loss. Dense features: the model keeps the ``m`` most important ones, each in its own
direction. Sparse features: it packs more than ``m`` of them into the hidden space as an
(almost-)orthogonal polytope (pentagon for n=5/m=2, antipodal pairs, ...), relying on the ReLU to
filter the interference. A linear model (no ReLU) never superposes.

Each zoo model trains several *instances* (one per sparsity level) in parallel as one module with
weights ``W: [instance, hidden, feature]``. Hook points (module paths):

* ``hidden``: h = W x, shape ``[batch, instance, m]``;
* ``out``: the reconstruction x̂ (after the ReLU, or identity for the linear twin), ``[batch, instance, n]``.

The recipe follows the Anthropic notebook: xavier-normal init, zero bias, AdamW(lr 1e-3, default weight
decay), batch 1024, 10k steps, loss Σ_instances mean_{batch, feature} I (x − x̂)².
"""

from __future__ import annotations

from typing import Any

import einops
import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from interp.models.zoo.recipe import Config, FitResult, Recipe


class ToyModel(nn.Module):
    """``n_instances`` independent copies of x̂ = act(Wᵀ W x + b).

    Input ``[batch, n_instances, n_features]``; output of the same shape. ``importance`` and
    ``feature_probability`` are stored as buffers so a loaded model knows how it was trained.
    """

    def __init__(
        self,
        n_instances: int,
        n_features: int,
        n_hidden: int,
        importance: torch.Tensor,
        feature_probability: torch.Tensor,
        relu: bool = True,
    ) -> None:
        super().__init__()
        self.n_instances, self.n_features, self.n_hidden = n_instances, n_features, n_hidden
        self.W = nn.Parameter(torch.empty(n_instances, n_hidden, n_features))
        nn.init.xavier_normal_(self.W)
        self.b_final = nn.Parameter(torch.zeros(n_instances, n_features))
        self.register_buffer("importance", importance.float().expand(n_instances, n_features).clone())
        self.register_buffer(
            "feature_probability", feature_probability.float().reshape(n_instances, 1).clone()
        )
        self.hidden = nn.Identity()  # hook point for h = W x
        self.out = nn.ReLU() if relu else nn.Identity()  # hook point for x̂

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.hidden(einops.einsum(self.W, x, "inst m n, batch inst n -> batch inst m"))
        pre = einops.einsum(self.W, h, "inst m n, batch inst m -> batch inst n") + self.b_final
        return self.out(pre)

    def generate_batch(self, batch: int, rng: np.random.Generator | None = None) -> torch.Tensor:
        """Sparse features: U[0,1] with each instance's probability p, else 0.

        One uniform draw u per entry serves both choices: the feature is present iff u < p, and then
        u / p is uniform on [0, 1) and independent of the presence event. ``rng`` is a numpy
        Generator (PCG64 is faster than torch's CPU generator; the 200-feature model is data-bound).
        """
        rng = rng if rng is not None else np.random.default_rng()
        u = torch.from_numpy(rng.random((batch, self.n_instances, self.n_features), dtype=np.float32))
        p = self.feature_probability
        return torch.where(u < p, u / p, torch.zeros(()))

    def loss(self, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        """Per-instance importance-weighted MSE, ``[n_instances]`` (the training loss is its sum)."""
        return einops.reduce(self.importance * (x - x_hat) ** 2, "batch inst n -> inst", "mean")


def build(cfg: Config) -> nn.Module:
    n_inst, n, m = int(cfg["n_instances"]), int(cfg["n_features"]), int(cfg["n_hidden"])
    importance = (
        torch.tensor(cfg["importance_base"]) ** torch.arange(n) if cfg["importance_base"] else torch.ones(n)
    )
    probability = torch.tensor(cfg["feature_probability"], dtype=torch.float64)
    return ToyModel(n_inst, n, m, importance, probability, relu=bool(cfg["relu"]))


def fit(model: nn.Module, cfg: Config, progress: bool = True) -> FitResult:
    rng = np.random.default_rng(int(cfg["data_seed"]))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    history: dict[str, list[Any]] = {"step": [], "loss": []}
    model.train()
    bar = tqdm(range(1, int(cfg["steps"]) + 1), desc=cfg["name"], disable=not progress, mininterval=1.0)
    for step in bar:
        x = model.generate_batch(int(cfg["batch_size"]), rng)
        loss = model.loss(x, model(x)).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % cfg["log_every"] == 0 or step == 1:
            history["step"].append(step)
            history["loss"].append(loss.item())
            bar.set_postfix(loss=f"{loss.item():.4g}", refresh=False)
    bar.close()
    model.eval()
    return FitResult(history=history, training={"steps": int(cfg["steps"])})


@torch.no_grad()
def geometry(model: ToyModel) -> dict[str, torch.Tensor]:
    """Per-instance geometry: feature norms, Frobenius norm², dims/feature, per-feature dimensionality.

    Per-feature dimensionality D_i = ‖W_i‖² / Σ_j (Ŵ_i · W_j)²  (Elhage et al. 2022), 0 for a dead feature.
    """
    W = model.W.detach().double()  # [inst, m, n]
    norms = W.norm(dim=1)  # [inst, n]
    frob2 = (W**2).sum(dim=(1, 2))
    unit = W / norms.clamp_min(1e-12)[:, None, :]
    overlaps = einops.einsum(unit, W, "inst m i, inst m j -> inst i j") ** 2
    dim = torch.where(norms > 1e-6, norms**2 / overlaps.sum(-1).clamp_min(1e-30), torch.zeros(()))
    return {
        "feature_norms": norms,
        "frobenius_sq": frob2,
        "dims_per_feature": model.n_hidden / frob2,
        "feature_dimensionality": dim,
        "n_represented": (norms > 0.5).sum(dim=-1),
    }


@torch.no_grad()
def evaluate(model: nn.Module, cfg: Config) -> dict[str, Any]:
    """Per-instance loss on a fixed 10k-sample batch plus the weight geometry."""
    x = model.generate_batch(int(cfg["eval_batch"]), np.random.default_rng(int(cfg["eval_seed"])))
    loss = model.loss(x, model(x))
    geo = geometry(model)
    return {
        "loss_per_instance": loss.tolist(),
        "loss_total": loss.sum().item(),
        "n_represented": geo["n_represented"].tolist(),
        "dims_per_feature": geo["dims_per_feature"].tolist(),
        "feature_norms": geo["feature_norms"].tolist(),
        "bias": model.b_final.detach().tolist(),
    }


BASE: Config = {
    "lr": 1e-3,
    "weight_decay": 0.01,  # torch AdamW default, as in the notebook
    "batch_size": 1024,
    "steps": 10_000,
    "log_every": 100,
    "seed": 0,
    "data_seed": 1,
    "eval_seed": 2,
    "eval_batch": 10_000,
    "relu": True,
}


def _geometric(start_over: float, n: int) -> list[float]:
    """p = start_over ** -linspace(0, 1, n) (1 -> 1/start_over), as floats."""
    return [start_over ** -(i / (n - 1)) for i in range(n)]


def _recipe(name: str, description: str, **cfg: Any) -> Recipe:
    full = {**BASE, "name": name, **cfg}
    return Recipe(
        name=name,
        kind="module",
        description=description,
        input=(
            f"features [batch, {full['n_instances']}, {full['n_features']}] in [0, 1] "
            f"(one row per instance; model.generate_batch(batch) samples the training distribution)"
        ),
        config=full,
        build=build,
        fit=fit,
        evaluate=evaluate,
        fast_overrides={"steps": 2_000} if full["n_features"] > 50 else {},
        input_shape=(full["n_instances"], full["n_features"]),
        input_range=(0.0, 1.0),
    )


_P_20_5 = [1.0, 0.3, 0.1, 0.03, 0.01, 0.003, 0.001]

RECIPES = [
    _recipe(
        "tms-5-2",
        "TMS n=5 features in m=2 dims, 10 sparsity levels (p 1 -> 0.05), importance 0.9^i: "
        "2 orthogonal features when dense, a pentagon when sparse.",
        n_instances=10,
        n_features=5,
        n_hidden=2,
        importance_base=0.9,
        feature_probability=_geometric(20, 10),
    ),
    _recipe(
        "tms-5-2-uniform",
        "Twin of tms-5-2 with constant importance: the sparse instances form a near-regular pentagon.",
        n_instances=10,
        n_features=5,
        n_hidden=2,
        importance_base=None,
        feature_probability=_geometric(20, 10),
    ),
    _recipe(
        "tms-20-5",
        "TMS intro figure: n=20 in m=5, importance 0.7^i, p in (1, .3, .1, .03, .01, .003, .001): "
        "more features are superposed as sparsity grows.",
        n_instances=7,
        n_features=20,
        n_hidden=5,
        importance_base=0.7,
        feature_probability=_P_20_5,
    ),
    _recipe(
        "tms-20-5-linear",
        "Linear twin of tms-20-5 (no ReLU): keeps only the 5 most important features at every sparsity.",
        n_instances=7,
        n_features=20,
        n_hidden=5,
        importance_base=0.7,
        feature_probability=_P_20_5,
        relu=False,
    ),
    _recipe(
        "tms-200-20",
        "TMS feature dimensionality: n=200 in m=20, constant importance, 20 sparsity levels (p 1 -> 0.05): "
        "dims/feature is sticky at 1 and 1/2.",
        n_instances=20,
        n_features=200,
        n_hidden=20,
        importance_base=None,
        feature_probability=_geometric(20, 20),
    ),
]
