"""Sparse autoencoders recover ground-truth features (Sharkey, Braun & Millidge 2022), paper vs ours.

Source: *[Interim research report] Taking features out of superposition with sparse autoencoders*
(Conjecture, AF/LessWrong, Dec 2022). Two findings, each with ``interp.sae``'s public API:

1. **Synthetic features in superposition.** ``G`` ground-truth directions in ``d < G`` dimensions;
   each sample is a sparse non-negative combination of them. A standard SAE (ReLU + L1) with at
   least ``G`` latents, at the best L1 coefficient, finds every direction: the mean max cosine
   similarity (MMCS: for each true feature, the best cosine with any decoder row, averaged) is near
   1. With fewer latents than features it is clearly lower, and MMCS rises then falls as the L1
   coefficient grows (too little: dense codes; too much: dead and merged latents). Also reported:
   SAELens's synthetic-feature MCC (``sae_lens.synthetic.evals.mean_correlation_coefficient``: the
   one-to-one Hungarian matching of decoder rows to true features by |cosine|, mean matched |cosine|),
   computed here with ``scipy.optimize.linear_sum_assignment``.
2. **A TMS model's hidden layer.** An SAE on the 5-d hidden activations of ``zoo:tms-20-5``'s
   instance 4 (p = 0.01, 12 of 20 features represented, in superposition) recovers each represented
   feature's direction W_i with cosine >= 0.99 ("represented": ‖W_i‖ > 0.5, as in the superposition
   reproduction). Checked on the shipped zoo dictionary ``zoo:tms-20-5-hidden`` and on a fresh run of
   its recipe.

Setup figures and where they come from. The report's own text (figures 3, 4, 10) could not be read
here: only its opening survives in the stored pages. The data law is the one of the public replication
of the report's toy section (Cunningham et al., ``replicate_toy_models.py``, defaults in ``ToyArgs``):
``activation_dim = 256``, ``n_ground_truth_components = 512``, directions standard Gaussian then
normalised, feature ``i`` present with probability ``(5 / G) · 0.99^i`` with strength ``U[0, 1]``,
batch 4096, Adam lr 1e-3; dictionary ratios 0.5-32 x G swept against the L1 coefficient.
``/work/shared/reference/reproductions.md`` (7a) has the same setup and the expectation "MMCS >= 0.95
at dict >= G and the best L1 (published ≈ 0.99)" [recalled, not re-checked against the figure].

What we run (a CPU budget, stated): the same law scaled by 1/4 (faithful: ``d = 64``, ``G = 128``, so
G/d = 2 as in the report) or 1/8 (fast: ``d = 32``, ``G = 64``); dictionaries of 0.5, 1 and 2 x G; an
L1 sweep at 2 x G. The loss is interp's standard recipe (MSE summed over dimensions + λ·Σ a_j ‖d_j‖),
not the replication's (MSE averaged, λ·‖a‖₁ / n_dict), so our λ values are on another scale than the
report's; decoder rows are not constrained to unit norm (the L1 term is weighted by their norms,
which makes the objective norm-free, as SAELens's standard SAE). Measured numbers: see the
docstring of :func:`reproduce` and the report table.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from interp.reproductions.report import Check, Report

REPRESENTED = 0.5  # a TMS feature is represented when ‖W_i‖ exceeds this (as the superposition reproduction)


# ----------------------------------------------------------------------------------------------
# Synthetic data: ground-truth features in superposition
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToySetup:
    """The synthetic data law and the sweep (see the module docstring for where each number comes from)."""

    d: int
    n_features: int
    num_nonzero: float = 5.0  # sets the base probability num_nonzero / G
    decay: float = 0.99  # feature i is present with probability (num_nonzero / G) * decay**i
    samples: int = 200_000
    steps: int = 3000
    batch_size: int = 1024
    lr: float = 1e-3
    ratios: tuple[float, ...] = (0.5, 1.0, 2.0)  # dictionary sizes as multiples of G
    l1_sweep: tuple[float, ...] = (0.03, 0.1, 0.2, 0.4, 0.8, 1.6)
    retune: bool = True  # give each smaller dictionary its own best L1 among the peak's neighbours
    seed: int = 0

    @property
    def probabilities(self) -> torch.Tensor:
        i = torch.arange(self.n_features, dtype=torch.float64)
        return (self.num_nonzero / self.n_features) * self.decay**i


FAITHFUL = ToySetup(d=64, n_features=128, samples=400_000, steps=5000)
FAST = ToySetup(
    d=32, n_features=64, samples=100_000, steps=1500, l1_sweep=(0.05, 0.15, 0.4, 1.2), retune=False
)


def ground_truth(setup: ToySetup) -> torch.Tensor:
    """``[G, d]`` unit directions (standard Gaussian, normalised), seeded."""
    gen = torch.Generator().manual_seed(setup.seed)
    feats = torch.randn(setup.n_features, setup.d, generator=gen, dtype=torch.float64)
    return (feats / feats.norm(dim=-1, keepdim=True)).float()


def sample_codes(setup: ToySetup, n: int, seed: int) -> torch.Tensor:
    """``[n, G]`` sparse codes: feature i present with its probability, strength U[0, 1]."""
    rng = np.random.default_rng(seed)
    present = rng.random((n, setup.n_features)) < setup.probabilities.numpy()
    strength = rng.random((n, setup.n_features))
    return torch.from_numpy(np.where(present, strength, 0.0)).float()


def data_model(features: torch.Tensor) -> Any:
    """The data law as a model: codes ``[batch, G]`` -> activations ``codes @ features`` (hook ``hook_out``)."""
    import interp

    G, d = features.shape
    linear = nn.Linear(G, d, bias=False)
    with torch.no_grad():
        linear.weight.copy_(features.T)
    return interp.load(linear.eval(), name=f"toy features {G} in {d}", input_shape=(G,))


# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------


def _unit(rows: torch.Tensor) -> torch.Tensor:
    rows = rows.detach().double()
    return rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def cosines(true: torch.Tensor, learned: torch.Tensor) -> torch.Tensor:
    """``[n_true, n_learned]`` cosine similarities between two sets of row vectors."""
    return _unit(true) @ _unit(learned).T


def mmcs(true: torch.Tensor, learned: torch.Tensor) -> float:
    """Mean over true features of the max cosine with any learned direction (Sharkey et al.)."""
    return float(cosines(true, learned).max(dim=1).values.mean())


def hungarian_mcc(learned: torch.Tensor, true: torch.Tensor) -> float:
    """SAELens's MCC: one-to-one matching by |cosine| (Hungarian), mean matched |cosine|.

    With more learned rows than true features, each true feature gets its own row (and vice versa).
    """
    from scipy.optimize import linear_sum_assignment

    sims = cosines(learned, true).abs().numpy()
    rows, cols = linear_sum_assignment(1.0 - sims)
    return float(sims[rows, cols].mean())


def unimodal(values: list[float], tol: float = 0.005) -> bool:
    """Rises (up to ``tol``) to its maximum, then falls (up to ``tol``): one peak."""
    peak = int(np.argmax(values))
    rising = all(values[i + 1] >= values[i] - tol for i in range(peak))
    falling = all(values[i + 1] <= values[i] + tol for i in range(peak, len(values) - 1))
    return rising and falling


# ----------------------------------------------------------------------------------------------
# The synthetic experiment
# ----------------------------------------------------------------------------------------------


def train_toy_sae(
    model: Any, acts: torch.Tensor, setup: ToySetup, d_sae: int, l1: float, *, seed: int = 0
) -> Any:
    """A standard SAE on the toy activations with the setup's budget (interp's recipe, L1 warm-up)."""
    from interp import sae as S

    return S.train(
        model,
        "hook_out",
        acts,
        arch="standard",
        d_sae=d_sae,
        k=None,
        tokens=setup.steps * setup.batch_size,
        batch_size=setup.batch_size,
        lr=setup.lr,
        l1_coefficient=l1,
        l1_warmup_steps=setup.steps // 10,
        lr_decay_steps=setup.steps // 5,
        resample_every=setup.steps // 6,
        dead_after_tokens=20 * setup.batch_size,
        seed=seed,
        progress=False,
        data_kind="activations",
    )


def synthetic_sweep(setup: ToySetup) -> dict[str, Any]:
    """Train the sweep; return every run's MMCS, MCC, EV, L0 and dead fraction.

    ``runs[(ratio, l1)]``; the L1 sweep runs at the largest ratio, and the other ratios at the L1
    that is best for it (a dictionary smaller than G gets its own best L1 from the same grid, so
    "lower" is not an artefact of a mistuned coefficient).
    """
    from interp import sae as S

    feats = ground_truth(setup)
    model = data_model(feats)
    codes = sample_codes(setup, setup.samples, setup.seed + 1)
    acts = codes @ feats
    held = sample_codes(setup, 8192, setup.seed + 2)
    runs: dict[tuple[float, float], dict[str, float]] = {}

    def run(ratio: float, l1: float) -> dict[str, float]:
        if (ratio, l1) not in runs:
            sae = train_toy_sae(model, acts, setup, int(ratio * setup.n_features), l1, seed=setup.seed)
            ev = S.evaluate(model, sae, held, batch_size=4096)
            runs[(ratio, l1)] = {
                "mmcs": mmcs(feats, sae.W_dec),
                "mcc": hungarian_mcc(sae.W_dec, feats),
                "explained_variance": ev["explained_variance"],
                "l0": ev["l0"],
                "dead_fraction": ev["dead_fraction"],
            }
        return runs[(ratio, l1)]

    big = max(setup.ratios)
    sweep = [run(big, l1)["mmcs"] for l1 in setup.l1_sweep]
    best_l1 = setup.l1_sweep[int(np.argmax(sweep))]
    best_by_ratio = {}
    for ratio in setup.ratios:
        if ratio == big or not setup.retune:
            best_by_ratio[ratio] = best_l1
            run(ratio, best_l1)
            continue
        # the best L1 of this size among the sweep's middle values (the peak and its neighbours)
        i = setup.l1_sweep.index(best_l1)
        near = setup.l1_sweep[max(0, i - 1) : i + 2]
        best_by_ratio[ratio] = max(near, key=lambda l1, r=ratio: run(r, l1)["mmcs"])
    return {
        "features": feats,
        "runs": runs,
        "sweep": sweep,
        "best_l1": best_l1,
        "best_by_ratio": best_by_ratio,
        "true_l0": float((held > 0).float().sum(-1).mean()),
    }


def synthetic_checks(result: dict[str, Any], setup: ToySetup, fast: bool) -> list[Check]:
    """MMCS >= 0.95 at dict >= G; clearly lower below G; unimodal in L1; the Hungarian MCC."""
    runs, best = result["runs"], result["best_by_ratio"]
    G = setup.n_features
    bound = 0.9 if fast else 0.95
    checks = []
    at_least_g = [r for r in setup.ratios if r >= 1.0]
    for ratio in at_least_g:
        value = runs[(ratio, best[ratio])]["mmcs"]
        checks.append(
            Check.at_least(
                f"MMCS, dict {int(ratio * G)} >= G={G}, best L1 ({best[ratio]:g})",
                "≈ 0.99 (>= 0.95)",
                value,
                bound,
            )
        )
    small = min(setup.ratios)
    low = runs[(small, best[small])]["mmcs"]
    high = min(runs[(r, best[r])]["mmcs"] for r in at_least_g)
    gap = 0.05
    checks.append(
        Check.holds(
            f"MMCS, dict {int(small * G)} < G, its best L1 ({best[small]:g})",
            "clearly lower",
            round(low, 4),
            low <= high - gap,
            f"<= min over dict >= G ({high:.3f}) - {gap}",
        )
    )
    sweep = result["sweep"]
    checks.append(
        Check.holds(
            f"MMCS vs L1 {list(setup.l1_sweep)} (dict {int(max(setup.ratios) * G)})",
            "unimodal",
            [round(v, 3) for v in sweep],
            unimodal(sweep) and int(np.argmax(sweep)) not in (0, len(sweep) - 1),
            "one interior peak (ties within 0.005)",
        )
    )
    mcc = runs[(1.0, best[1.0])]["mcc"] if 1.0 in setup.ratios else float("nan")
    checks.append(
        Check.at_least(
            f"SAELens MCC (Hungarian), dict = G={G}, best L1",
            "not reported (SAELens metric)",
            mcc,
            0.85 if fast else 0.9,
        )
    )
    return checks


# ----------------------------------------------------------------------------------------------
# TMS: an SAE on a toy model's hidden layer
# ----------------------------------------------------------------------------------------------

TMS_DICTIONARY = "tms-20-5-hidden"


def tms_recovery(sae: Any, W: torch.Tensor) -> dict[str, Any]:
    """For each represented feature of the one-instance ``W [m, n]``: its best cosine with a decoder row."""
    norms = W.detach().double().norm(dim=0)
    kept = torch.nonzero(norms > REPRESENTED).flatten()
    best = cosines(W.T[kept], sae.W_dec).max(dim=1)
    return {
        "represented": kept.tolist(),
        "cosine": best.values.tolist(),
        "latent": best.indices.tolist(),
        "min_cosine": float(best.values.min()),
    }


def tms_checks(report: Report, fast: bool, retrain: bool = True) -> None:
    """The shipped zoo dictionary, and a fresh run of its recipe (fast: half the tokens)."""
    from interp import sae as S
    from interp.sae import zoo_recipes as Z

    model = Z.tms_instance()
    W = model.module.W[0]
    shipped = tms_recovery(S.load(f"zoo:{TMS_DICTIONARY}"), W)
    n = len(shipped["represented"])
    report.add(
        Check.at_least(
            f"zoo:{TMS_DICTIONARY}: min cosine over the {n} represented features",
            ">= 0.99 each",
            shipped["min_cosine"],
            0.99,
            digits=4,
        )
    )
    report.models[TMS_DICTIONARY] = {"source": f"zoo:{TMS_DICTIONARY}", "shipped": shipped}
    if not retrain:
        return
    recipe = Z.get_dictionary_recipe(TMS_DICTIONARY)
    options = recipe.resolved_options()
    if fast:
        options = {**options, "tokens": options["tokens"] // 2, "lr_decay_steps": 400}
    h, record = recipe.train_data(model, False)
    start = time.perf_counter()
    fresh = S.train(model, recipe.hook, h, progress=False, data_kind="activations", **options)
    report.timings["tms_train"] = time.perf_counter() - start
    again = tms_recovery(fresh, W)
    report.add(
        Check.at_least(
            f"retrained ({options['tokens']:,} tokens): min cosine over represented features",
            ">= 0.99 each",
            again["min_cosine"],
            0.98 if fast else 0.99,
            digits=4,
        )
    )
    report.models[TMS_DICTIONARY] = {
        "source": f"zoo:{TMS_DICTIONARY} and a fresh run of its recipe",
        "seed": options["seed"],
        "config": options,
        "data": record,
        "shipped": shipped,
        "retrained": again,
    }


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------


def reproduce(fast: bool = False, *, setup: ToySetup | None = None, retrain: bool = True) -> Report:
    """Both findings; ``setup`` replaces the synthetic sweep's (tests).

    ``retrain=False`` (the explorer's checkpoint view) checks the shipped ``zoo:tms-20-5-hidden``
    only: the synthetic sweep and the TMS retrain both train dictionaries.

    Fast: d=32, G=64, 1,500 steps per SAE, MMCS bound 0.9 (not 0.95), MCC >= 0.85, the TMS retrain on
    half the tokens with cosine >= 0.98. Faithful: d=64, G=128, 5,000 steps, the stated bounds.

    Measured (shared 2-core box, load ~8). Faithful, 7/7 in 1,151 s wall: MMCS 0.986 (dict 128 = G,
    L1 0.2) and 1.000 (dict 256, L1 0.4), 0.703 at dict 64; MMCS over L1 (0.03 ... 1.6) at dict 256
    [0.969, 0.999, 1.000, 1.000, 0.985, 0.779]; Hungarian MCC 0.972 at dict = G; TMS min cosine 0.9997
    shipped and retrained. Fast, 7/7 (~35 s CPU): MMCS 0.950 / 0.961 at 1x / 2x G, 0.761 at 0.5x, sweep
    [0.639, 0.837, 0.961, 0.685], MCC 0.915.
    """
    setup = setup or (FAST if fast else FAITHFUL)
    report = Report("saes", fast=fast)
    if not retrain:
        tms_checks(report, fast, retrain=False)
        return report
    start = time.perf_counter()
    result = synthetic_sweep(setup)
    report.timings["synthetic"] = time.perf_counter() - start
    report.add(*synthetic_checks(result, setup, fast))
    report.models["synthetic"] = {
        "source": "trained here",
        "seed": setup.seed,
        "config": {k: getattr(setup, k) for k in setup.__dataclass_fields__},
        "true_l0": result["true_l0"],
        "runs": {f"ratio {r} l1 {l1}": v for (r, l1), v in result["runs"].items()},
    }
    report.notes.append(
        f"Synthetic: {setup.n_features} features in {setup.d} dims, mean true L0 {result['true_l0']:.2f}; "
        f"best L1 {result['best_l1']:g}. Setup scaled from the report's 512 in 256 for CPU (see docstring)."
    )
    start = time.perf_counter()
    tms_checks(report, fast)
    report.timings["tms"] = time.perf_counter() - start
    _figures(report, result, setup)
    return report


def _figures(report: Report, result: dict[str, Any], setup: ToySetup) -> None:
    import plotly.graph_objects as go

    fig = go.Figure()
    fig.add_scatter(x=list(setup.l1_sweep), y=result["sweep"], mode="lines+markers", name="MMCS")
    fig.update_layout(
        title=f"MMCS vs L1 coefficient (dict {int(max(setup.ratios) * setup.n_features)}, G={setup.n_features})",
        xaxis={"type": "log", "title": "L1 coefficient"},
        yaxis={"title": "MMCS"},
    )
    report.figures.append(("MMCS vs L1", fig))
