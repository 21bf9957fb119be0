"""Toy Models of Superposition (Elhage et al. 2022): geometry of the learned W, paper vs ours.

Models (zoo): ``tms-5-2`` (importance 0.9^i), ``tms-5-2-uniform`` (constant importance), ``tms-20-5``
and its linear twin ``tms-20-5-linear``, ``tms-200-20`` (dimensionality). Each holds one instance per
feature probability p, densest first.

Checks:

* dense (p = 1), 5 features in 2 dims: exactly the 2 most important features are represented
  (‖W_i‖ > 0.5), orthogonal;
* sparse (p = 0.05): all 5 represented, as a pentagon: norms in [0.8, 1.2], neighbour angles 72°,
  per-feature dimensionality D_i = 2/5 (``tms-5-2-uniform``, where the pentagon should be regular);
* 20 features in 5 dims: the number represented never falls as sparsity grows, the dense instance keeps
  features 0..4, the sparsest keeps most of them (>= 11; see below); the linear twin keeps exactly
  features 0..4 at every p;
* 200 features in 20 dims: dimensions per feature m/‖W‖_F² start at 1, fall (monotone up to noise)
  and stick at 1/2 over >= 3 consecutive sparsities.

Variants: the geometry is read from the **shipped checkpoints** in both variants (it is analysis of the
trained weights, and costs a second). On top, each variant **retrains** the 5 -> 2 uniform model from
four other seeds (fast: 3 instances, 3,000 steps, ~25 s; faithful: the full recipe, 10 instances, 10k
steps, ~2 min) and checks the dense geometry of every run and that at least 3 of the 4 form the
pentagon, so the result does not hinge on one seed. Measured: with the full recipe seeds 2, 3, 4 form
a regular pentagon and seed 1 stops in a local minimum (4 features on a square); with the fast one
seeds 1, 3, 4 do and seed 2 stops there.

On the p = 0.001 count of the 20 -> 5 model: reproductions.md proposed >= 15 represented features [P].
The published recipe (10k steps) gives 14 (shipped seed 0), 15, 12 and 13 (seeds 1-3): the least
important features (importance 0.7^15 ... 0.7^19 < 0.005) carry too little loss at that sparsity to be
learned in 10k steps. So the check is the paper's "most of 20" read literally, >= 11.
"""

from __future__ import annotations

import math
import time
from typing import Any

import einops
import torch
from torch import nn

from interp.reproductions._models import zoo_model
from interp.reproductions.report import Check, Report

REPRESENTED = 0.5  # a feature is represented when its column norm exceeds this (TMS-B spec)


# ----------------------------------------------------------------------------------------------
# Geometry
# ----------------------------------------------------------------------------------------------


def weights(model: nn.Module) -> torch.Tensor:
    """W as ``[instance, hidden, feature]`` in float64."""
    return model.W.detach().double()


def feature_norms(W: torch.Tensor) -> torch.Tensor:
    """‖W_i‖ per instance and feature, ``[instance, feature]``."""
    return W.norm(dim=1)


def dims_per_feature(W: torch.Tensor) -> torch.Tensor:
    """m / ‖W‖_F² per instance (the paper's "dimensions per feature")."""
    return W.shape[1] / (W**2).sum(dim=(1, 2))


def feature_dimensionality(W: torch.Tensor) -> torch.Tensor:
    """D_i = ‖W_i‖² / Σ_j (Ŵ_i · W_j)² per instance and feature (0 for a dead feature)."""
    norms = feature_norms(W)
    unit = W / norms.clamp_min(1e-12)[:, None, :]
    overlap = einops.einsum(unit, W, "inst m i, inst m j -> inst i j") ** 2
    return torch.where(norms > 1e-6, norms**2 / overlap.sum(-1).clamp_min(1e-30), torch.zeros(()))


def represented(W: torch.Tensor) -> list[list[int]]:
    """Indices of the represented features (‖W_i‖ > 0.5) of each instance."""
    return [torch.nonzero(row > REPRESENTED).flatten().tolist() for row in feature_norms(W)]


def neighbour_angles(W2: torch.Tensor, features: list[int] | None = None) -> torch.Tensor:
    """Angles (degrees) between angularly adjacent columns of a 2-D ``W2 [2, feature]``, summing to 360."""
    cols = W2 if features is None else W2[:, features]
    angles = torch.atan2(cols[1], cols[0]).rad2deg().sort().values
    return torch.diff(torch.cat([angles, angles[:1] + 360.0]))


def max_abs_cos(W2: torch.Tensor, features: list[int]) -> float:
    """Largest |cos| between distinct columns among ``features`` of one instance."""
    cols = W2[:, features]
    unit = cols / cols.norm(dim=0, keepdim=True).clamp_min(1e-12)
    gram = (unit.T @ unit).abs() - torch.eye(len(features), dtype=unit.dtype)
    return float(gram.max()) if len(features) > 1 else 0.0


# ----------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------


def dense_checks(W: torch.Tensor, label: str, *, exact_pair: bool = True) -> list[Check]:
    """Densest instance of a 5 -> 2 model: two orthogonal features (the two most important ones)."""
    kept = represented(W)[0]
    checks = [
        Check.at_most(
            f"{label}: dense p=1, max |cos| between kept features",
            "0 (orthogonal)",
            max_abs_cos(W[0], kept) if len(kept) >= 2 else math.nan,
            0.1,
        ),
        Check.within(
            f"{label}: dense p=1, dims per feature m/‖W‖²", "1", float(dims_per_feature(W)[0]), 1.0, 0.05
        ),
    ]
    if exact_pair:
        checks.insert(0, Check.equal(f"{label}: dense p=1, represented features", "{0, 1}", kept, [0, 1]))
    return checks


def pentagon_checks(W: torch.Tensor, label: str, angle_tol: float) -> list[Check]:
    """Sparsest instance of a 5 -> 2 model: all five features on a (near-)regular pentagon."""
    last = W[-1]
    norms = feature_norms(W)[-1]
    gaps = neighbour_angles(last)
    dims = feature_dimensionality(W)[-1]
    return [
        Check.equal(f"{label}: sparse p=0.05, features represented", "5 of 5", len(represented(W)[-1]), 5),
        Check.between(f"{label}: sparse, min ‖W_i‖", "≈1", float(norms.min()), 0.8, 1.2),
        Check.between(f"{label}: sparse, max ‖W_i‖", "≈1", float(norms.max()), 0.8, 1.2),
        Check.within(
            f"{label}: sparse, smallest neighbour angle (deg)", "72°", float(gaps.min()), 72.0, angle_tol
        ),
        Check.within(
            f"{label}: sparse, largest neighbour angle (deg)", "72°", float(gaps.max()), 72.0, angle_tol
        ),
        Check.within(
            f"{label}: sparse, mean feature dimensionality D_i", "2/5 = 0.40", float(dims.mean()), 0.4, 0.04
        ),
    ]


def counting_checks(W_relu: torch.Tensor, W_linear: torch.Tensor, min_sparse: int) -> list[Check]:
    """20 -> 5: superposition grows with sparsity under ReLU; the linear twin never superposes."""
    kept = represented(W_relu)
    counts = [len(k) for k in kept]
    monotone = all(b >= a for a, b in zip(counts, counts[1:], strict=False))
    linear_kept = represented(W_linear)
    top5 = list(range(5))
    return [
        Check.equal("tms-20-5: dense p=1, represented features", "features 0..4", kept[0], top5),
        Check.holds(
            "tms-20-5: number represented vs sparsity", "non-decreasing", counts, monotone, "non-decreasing"
        ),
        Check.at_least("tms-20-5: represented at p=0.001", "most of 20 (> 10)", counts[-1], min_sparse),
        Check.holds(
            "tms-20-5-linear: represented at every p",
            "exactly features 0..4 (m=5)",
            [len(k) for k in linear_kept],
            all(k == top5 for k in linear_kept),
            "== features 0..4 at every p",
        ),
    ]


def plateau_length(values: list[float], target: float, tol: float) -> int:
    """Longest run of consecutive values within ``tol`` of ``target``."""
    best = run = 0
    for v in values:
        run = run + 1 if abs(v - target) <= tol else 0
        best = max(best, run)
    return best


def dimensionality_checks(W: torch.Tensor, plateau_tol: float, min_run: int) -> list[Check]:
    """200 -> 20: dims per feature starts at 1, falls, and sticks at 1/2."""
    dpf = dims_per_feature(W).tolist()
    rises = [b - a for a, b in zip(dpf, dpf[1:], strict=False)]
    return [
        Check.within("tms-200-20: dims per feature, densest instance", "1", dpf[0], 1.0, 0.05),
        Check.at_least(
            f"tms-200-20: consecutive instances at 1/2 ± {plateau_tol}",
            "sticky at 1/2 (antipodal pairs)",
            plateau_length(dpf, 0.5, plateau_tol),
            min_run,
        ),
        Check.at_most(
            "tms-200-20: largest rise of dims per feature with sparsity",
            "monotone non-increasing",
            max(rises),
            0.03,
        ),
    ]


# ----------------------------------------------------------------------------------------------
# Retraining the 5 -> 2 model from another seed
# ----------------------------------------------------------------------------------------------


def retrain_uniform(fast: bool, seed: int = 1) -> tuple[nn.Module, dict[str, Any]]:
    """Train the constant-importance 5 -> 2 recipe from ``seed`` (not the zoo's); returns (model, config)."""
    from interp.models.zoo import tms
    from interp.models.zoo.registry import get_recipe

    cfg = get_recipe("tms-5-2-uniform").resolved_config()
    cfg.update(seed=seed, data_seed=seed + 10, name="tms-5-2-uniform-reseeded")
    if fast:
        cfg.update(steps=3_000, n_instances=3, feature_probability=[1.0, 0.3, 0.05])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = tms.build(cfg)
        tms.fit(model, cfg, progress=False)
    return model.eval(), cfg


# ----------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------


PANEL = 3.0  # distance between the centres of two instances' panels, in W's units (‖W_i‖ <= ~1.2)


def columns_figure(W: torch.Tensor, probabilities: list[float], title: str) -> Any:
    """One panel per instance: each feature's column W_i drawn as a segment from the panel's origin.

    Every panel shares one pair of axes (equal aspect, so angles and lengths read true), shifted
    by ``PANEL``: one trace per feature holds its segments in all panels (None-separated), and a
    faint circle of radius 1 and a dotted one at ``REPRESENTED`` give each panel its scale. That
    is 7 SVG paths and one axis pair instead of a trace per (instance, feature) and 10 subplots,
    which made Streamlit's plotly take ~1 s of the browser to draw. Hovering a tip gives W_i.
    """
    import plotly.graph_objects as go

    n_inst, n_feat = W.shape[0], W.shape[2]
    cols = min(n_inst, 5)
    rows = math.ceil(n_inst / cols)
    centres = [(PANEL * (k % cols), -PANEL * (k // cols)) for k in range(n_inst)]
    fig = go.Figure()
    circle = torch.linspace(0, 2 * math.pi, 61, dtype=torch.float64)
    for radius, dash in ((1.0, "solid"), (REPRESENTED, "dot")):
        xs, ys = [], []
        for cx, cy in centres:
            xs += (cx + radius * circle.cos()).round(decimals=3).tolist() + [None]
            ys += (cy + radius * circle.sin()).round(decimals=3).tolist() + [None]
        fig.add_scatter(
            x=xs,
            y=ys,
            mode="lines",
            line={"color": "lightgrey", "width": 1, "dash": dash},
            hoverinfo="skip",
            showlegend=False,
        )
    for i in range(n_feat):
        xs, ys, text = [], [], []
        for k, (cx, cy) in enumerate(centres):
            x, y = W[k, 0, i].item(), W[k, 1, i].item()
            xs += [cx, cx + x, None]
            ys += [cy, cy + y, None]
            label = f"p = {probabilities[k]:.3g}, feature {i}: W_i = ({x:.2f}, {y:.2f}), ‖W_i‖ = {math.hypot(x, y):.2f}"
            text += [label, label, None]
        fig.add_scatter(
            x=xs,
            y=ys,
            text=text,
            mode="lines+markers",
            name=f"feature {i}",
            marker={"color": _COLORS[i % len(_COLORS)], "size": [0, 6, 0] * n_inst},
            line={"color": _COLORS[i % len(_COLORS)]},
            hovertemplate="%{text}<extra></extra>",
        )
    fig.add_scatter(  # the panel titles
        x=[cx for cx, _ in centres],
        y=[cy + 1.45 for _, cy in centres],
        text=[f"p = {p:.3g}" for p in probabilities],
        mode="text",
        textfont={"color": "grey"},
        hoverinfo="skip",
        showlegend=False,
    )
    # constrain="domain": the equal aspect shrinks the drawn area instead of widening the ranges,
    # which would stick when Streamlit re-lays the figure out at its container's width
    fig.update_xaxes(range=[-1.4, PANEL * (cols - 1) + 1.4], visible=False, constrain="domain")
    fig.update_yaxes(
        range=[-PANEL * (rows - 1) - 1.3, 1.7], visible=False, scaleanchor="x", constrain="domain"
    )
    fig.update_layout(
        title=f"{title} (circles: ‖W_i‖ = 1, dotted: {REPRESENTED}, the represented threshold)",
        height=100 + 190 * rows,
        width=1200,
        margin={"l": 10, "r": 10, "t": 90, "b": 10},
        legend={"orientation": "h", "x": 0, "y": 1, "yanchor": "bottom"},  # the panels get the width
    )
    return fig


# D_i is drawn to this resolution (under a pixel of the figure's 0-1.1 axis): the features of one
# instance that share a bin are one dot, as dark as the stack of faint dots it replaces, so the
# browser draws ~270 SVG markers instead of ~2,700 (tms-200-20), the same picture.
DOT_BIN = 0.005


def dimensionality_figure(W: torch.Tensor, probabilities: list[float]) -> Any:
    """Dims per feature m/‖W‖_F² against 1/p, with every feature's D_i as faint dots (binned to
    ``DOT_BIN``; a dot's opacity and hover say how many features it holds)."""
    import plotly.graph_objects as go

    inv_p = [1 / p for p in probabilities]
    dims = feature_dimensionality(W)
    fig = go.Figure()
    xs, ys, counts = [], [], []
    for x, row in zip(inv_p, dims, strict=True):
        binned = torch.round(row[row > 1e-3] / DOT_BIN).unique(return_counts=True)
        xs += [x] * len(binned[0])
        ys += (binned[0] * DOT_BIN).tolist()
        counts += binned[1].tolist()
    fig.add_scatter(  # one dot per (instance, D_i bin), as opaque as `count` dots of opacity 0.25
        x=xs,
        y=ys,
        customdata=counts,
        mode="markers",
        name="feature dimensionality D_i",
        marker={"size": 4, "opacity": [1 - 0.75**n for n in counts], "color": "grey"},
        hovertemplate="1/p = %{x:.3g}: %{customdata} features at D_i ≈ %{y:.3f}<extra></extra>",
    )
    fig.add_scatter(x=inv_p, y=dims_per_feature(W).tolist(), mode="lines+markers", name="m / ‖W‖_F²")
    for level in (1.0, 0.5, 0.4, 1 / 3):
        fig.add_hline(y=level, line_dash="dot", line_color="lightgrey")
    fig.update_xaxes(type="log", title="1 / feature probability")
    fig.update_yaxes(title="dimensions per feature", range=[0, 1.1])
    fig.update_layout(
        title="tms-200-20: dimensions per feature are sticky at 1 and 1/2", width=900, height=500
    )
    return fig


_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]


# ----------------------------------------------------------------------------------------------
# The reproduction
# ----------------------------------------------------------------------------------------------

MODELS = ("tms-5-2", "tms-5-2-uniform", "tms-20-5", "tms-20-5-linear", "tms-200-20")


def reproduce(
    fast: bool = False, *, models: dict[str, nn.Module] | None = None, retrain: bool = True
) -> Report:
    """Run every superposition check.

    ``models`` replaces zoo models by name and ``retrain=False`` skips the reseeded 5 -> 2 run (tests).
    """
    report = Report("superposition", fast=fast)
    start = time.perf_counter()
    W = {}
    probabilities = {}
    for name in MODELS:
        module, meta = zoo_model(name, report, fast=fast, given=models)
        W[name] = weights(module)
        probabilities[name] = list(meta["config"]["feature_probability"])
    report.timings["load"] = time.perf_counter() - start

    report.add(*dense_checks(W["tms-5-2"], "tms-5-2"))
    report.add(*pentagon_checks(W["tms-5-2-uniform"], "tms-5-2-uniform", angle_tol=8.0))
    report.add(
        Check.equal(
            "tms-5-2: sparse p=0.05, features represented", "5 of 5", len(represented(W["tms-5-2"])[-1]), 5
        )
    )
    report.add(*counting_checks(W["tms-20-5"], W["tms-20-5-linear"], min_sparse=11))
    report.add(*dimensionality_checks(W["tms-200-20"], plateau_tol=0.03, min_run=3))

    if retrain:
        _retrain_checks(report, fast)
    _figures_and_notes(report, W, probabilities, fast)
    return report


RESEEDS = (1, 2, 3, 4)  # retrained 5 -> 2 uniform runs, none of them the zoo's seed
MIN_PENTAGONS = 3  # of the four: some sparse runs stop in a local minimum (4 features on a square)


def _retrain_checks(report: Report, fast: bool) -> None:
    """Train the 5 -> 2 uniform model from seeds 1-4 and check how many form the dense pair and the pentagon."""
    start = time.perf_counter()
    runs = {}
    for seed in RESEEDS:
        fresh, cfg = retrain_uniform(fast, seed)
        runs[seed] = weights(fresh)
        report.models[f"tms-5-2-uniform-seed{seed}"] = {
            "source": "retrained here",
            "seed": seed,
            "config": cfg,
        }
    report.timings["retrain"] = time.perf_counter() - start
    angle_tol = 10.0 if fast else 8.0
    verdicts = {seed: pentagon_checks(W, f"seed {seed}", angle_tol) for seed, W in runs.items()}
    formed = [seed for seed, checks in verdicts.items() if all(c.passed for c in checks)]
    dense = [float(dims_per_feature(W)[0]) for W in runs.values()]
    seeds = f"seeds {RESEEDS[0]}-{RESEEDS[-1]}"
    report.add(
        Check.holds(
            f"retrained 5->2 ({seeds}): dense p=1, dims per feature m/‖W‖²",
            "1",
            dense,
            all(abs(d - 1.0) <= 0.05 for d in dense),
            "1 ± 0.05 for every seed",
        ),
        Check.at_least(
            f"retrained 5->2 ({seeds}): runs whose p=0.05 instance is a regular pentagon",
            "pentagon (sparse runs can stop in a local minimum)",
            len(formed),
            MIN_PENTAGONS,
        ),
    )
    for seed, checks in verdicts.items():
        summary = ", ".join(f"{c.quantity.split(': ', 1)[1]} {c.ours}" for c in checks)
        state = "pentagon" if seed in formed else "no pentagon"
        report.notes.append(f"Retrained 5->2, seed {seed} ({state}): {summary}.")


def _figures_and_notes(
    report: Report, W: dict[str, torch.Tensor], probabilities: dict[str, list[float]], fast: bool
) -> None:
    sparse = W["tms-5-2"][-1]
    report.notes.append(
        "m/‖W‖_F² of the sparsest tms-5-2 instance is "
        f"{float(dims_per_feature(W['tms-5-2'])[-1]):.3f}: the pentagon's columns have norm "
        f"{float(sparse.norm(dim=0).mean()):.2f} (> 1, offsetting the negative bias), so the norm-free "
        "per-feature dimensionality D_i is the quantity compared with 2/5."
    )
    report.notes.append(
        "Geometry is read from the checkpoints listed under Models; the retrained 5->2 models use seeds "
        f"{', '.join(map(str, RESEEDS))} "
        + ("(fast: 3 instances p = 1, 0.3, 0.05, 3,000 steps)." if fast else "(the full recipe, 10k steps).")
    )
    report.figures.append(
        (
            "W columns per instance: tms-5-2 (importance 0.9^i)",
            columns_figure(W["tms-5-2"], probabilities["tms-5-2"], "tms-5-2: W columns"),
        )
    )
    report.figures.append(
        (
            "W columns per instance: tms-5-2-uniform",
            columns_figure(
                W["tms-5-2-uniform"], probabilities["tms-5-2-uniform"], "tms-5-2-uniform: W columns"
            ),
        )
    )
    report.figures.append(
        ("Dimensions per feature vs 1/p", dimensionality_figure(W["tms-200-20"], probabilities["tms-200-20"]))
    )
