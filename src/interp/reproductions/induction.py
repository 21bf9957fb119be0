"""Induction heads (Elhage et al. 2021; Olsson et al. 2022), paper vs ours, through the public API.

Models (zoo): ``induction-2l`` (2-layer attention-only) and the 1-layer control ``induction-1l``,
evaluated on ``[BOS, r, r]`` with r 20 uniform tokens over 64 symbols.

Checks:

* head scores (ARENA diagonal definitions): a layer-1 induction head (score >= 0.5), no layer-0 head
  with an induction score above 0.1, a layer-0 previous-token head (score >= 0.5);
* TransformerLens's ``mul`` score of the same head stays under its ceiling n/(2n+1) ≈ 0.49 (only
  second-half queries have an induction target), and equals the diagonal score times that ceiling;
* loss: the first copy is at chance (ln 64 = 4.16), the repeated copy is cheap (<= 0.3 ln V), the
  1-layer control is not (>= 0.8 ln V);
* ablations (``run_with_hooks`` on ``blocks.L.attn.hook_z``): zeroing the top induction head costs
  >= 1 nat on the repeated copy; zeroing the top previous-token head cuts the top induction score by
  >= 80%;
* K-composition from the weights (W_OV of each layer-0 head into W_QKᵀ of each layer-1 head, LN
  scales folded in): the argmax pair is (previous-token head, induction head), >= 3x the mean of the
  other pairs;
* phase change, from the training curves in the checkpoint's JSON: the steepest loss drop lies within
  10% of training of the step where the max induction score crosses 0.3.

Variants: both analyse the **shipped checkpoints** (every check is analysis of a trained model; the
phase change is read from the curves recorded while it trained). Fast uses 64 evaluation sequences
instead of 256 and the same bounds.
"""

from __future__ import annotations

import math
import time
from typing import Any

import einops
import torch
from torch import nn

import interp
from interp.reproductions._models import zoo_model
from interp.reproductions.report import Check, Report

HALF = 20  # r has 20 tokens; sequences are [BOS, r, r] (41 positions)
VOCAB = 64
EVAL_SEED = 20_211


# ----------------------------------------------------------------------------------------------
# Scores from attention patterns
# ----------------------------------------------------------------------------------------------


def patterns(model: Any, tokens: torch.Tensor, hooks: list | tuple = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, patterns [layer, batch, head, query, key])`` via ``run_with_cache``."""
    logits, cache = model.run_with_cache(tokens, names="blocks.*.attn.hook_pattern", hooks=hooks)
    return logits, cache.stack("blocks.*.attn.hook_pattern")


def induction_scores(pattern: torch.Tensor, n: int) -> torch.Tensor:
    """ARENA induction score ``[layer, head]``: mean attention from second-copy query q to key q - n + 1."""
    q = torch.arange(n + 1, 2 * n + 1)
    return pattern[..., q, q - n + 1].mean(dim=(1, 3))


def prev_token_scores(pattern: torch.Tensor) -> torch.Tensor:
    """ARENA previous-token score ``[layer, head]``: mean attention from every query q >= 1 to q - 1."""
    q = torch.arange(1, pattern.shape[-1])
    return pattern[..., q, q - 1].mean(dim=(1, 3))


def induction_target(tokens: torch.Tensor) -> torch.Tensor:
    """TransformerLens's induction pattern ``[batch, q, k]``: the duplicate-token matrix shifted right by one.

    dup[q, k] = 1 if token k equals token q and k < q; induction[q, k] = dup[q, k - 1].
    """
    same = tokens[:, :, None] == tokens[:, None, :]
    dup = torch.tril(same, diagonal=-1).float()
    return torch.nn.functional.pad(dup[:, :, :-1], (1, 0))


def mul_scores(pattern: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """TransformerLens ``head_detector`` ``mul`` score ``[layer, head]``: Σ(A ⊙ P) / Σ A over the whole matrix."""
    target = induction_target(tokens)
    hit = einops.einsum(pattern, target, "l b h q k, b q k -> l b h")
    return (hit / pattern.sum(dim=(-2, -1))).mean(dim=1)


def half_losses(logits: torch.Tensor, tokens: torch.Tensor, n: int) -> tuple[float, float]:
    """Mean next-token loss on the first copy (targets r_1..r_n) and the repeated copy (targets r_2..r_n)."""
    nll = -logits.log_softmax(-1)[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0]
    return nll[:, :n].mean().item(), nll[:, n + 1 :].mean().item()


def argmax_head(scores: torch.Tensor, layer: int) -> int:
    return int(scores[layer].argmax())


# ----------------------------------------------------------------------------------------------
# Ablation (kept small and local; a patching toolkit comes later)
# ----------------------------------------------------------------------------------------------


def zero_head(head: int, n_heads: int):
    """A hook for ``blocks.L.attn.hook_z`` (``[batch, pos, head*d_head]``) that zeroes one head's output."""

    def hook(z: torch.Tensor, ctx: Any) -> torch.Tensor:
        split = einops.rearrange(z, "b p (h d) -> b p h d", h=n_heads).clone()
        split[:, :, head] = 0.0
        return einops.rearrange(split, "b p h d -> b p (h d)")

    return hook


# ----------------------------------------------------------------------------------------------
# K-composition from the weights
# ----------------------------------------------------------------------------------------------


def _ln_scale(bridge: nn.Module, layer: int, d_model: int) -> torch.Tensor:
    ln = getattr(bridge.blocks[layer], "ln1", None)
    weight = getattr(ln, "weight", None) if ln is not None else None
    return weight.detach() if weight is not None else torch.ones(d_model)


def k_composition(bridge: nn.Module) -> torch.Tensor:
    """``[layer-0 head, layer-1 head]`` K-composition scores ‖W_OV W_QKᵀ‖_F / (‖W_OV‖_F ‖W_QKᵀ‖_F).

    W_OV = diag(ln1₀) W_V W_O of the layer-0 head (what it writes, per unit of normalised input);
    W_QKᵀ = diag(ln1₁) W_K W_Qᵀ diag(ln1₁) of the layer-1 head (how its keys read the residual), as in
    TransformerLens's ``all_composition_scores("K")``.
    """
    W_Q, W_K, W_V, W_O = (getattr(bridge, n).detach() for n in ("W_Q", "W_K", "W_V", "W_O"))
    d_model = W_Q.shape[2]
    ln0, ln1 = _ln_scale(bridge, 0, d_model), _ln_scale(bridge, 1, d_model)
    ov = einops.einsum(ln0[:, None] * W_V[0], W_O[0], "h m d, h d n -> h m n")
    qk_t = einops.einsum(ln1[:, None] * W_K[1], ln1[:, None] * W_Q[1], "h m d, h n d -> h m n")
    prod = einops.einsum(ov, qk_t, "a m n, b n k -> a b m k")
    norms = ov.flatten(1).norm(dim=1)[:, None] * qk_t.flatten(1).norm(dim=1)[None, :]
    return prod.flatten(2).norm(dim=2) / norms


# ----------------------------------------------------------------------------------------------
# Phase change
# ----------------------------------------------------------------------------------------------


def phase_change(history: dict[str, list[float]]) -> dict[str, Any]:
    """From the training log: the step of the steepest loss drop and where max induction first exceeds 0.3.

    The loss is smoothed with a 3-point moving average first so one noisy log interval cannot win.
    """
    steps, loss, ind = (
        history.get("step", []),
        history.get("loss", []),
        history.get("max_induction_score", []),
    )
    if len(steps) < 4:
        return {
            "steepest_drop_step": None,
            "crossing_step": None,
            "total_steps": steps[-1] if steps else None,
        }
    smooth = [sum(loss[max(0, i - 1) : i + 2]) / len(loss[max(0, i - 1) : i + 2]) for i in range(len(loss))]
    drops = [smooth[i] - smooth[i + 1] for i in range(len(smooth) - 1)]
    steepest = steps[1 + max(range(len(drops)), key=drops.__getitem__)]
    crossing = next((s for s, v in zip(steps, ind, strict=True) if v > 0.3), None)
    return {"steepest_drop_step": steepest, "crossing_step": crossing, "total_steps": steps[-1]}


# ----------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------


def scores_figure(induction: torch.Tensor, previous: torch.Tensor, mul: torch.Tensor) -> Any:
    from plotly.subplots import make_subplots

    fig = make_subplots(
        rows=1, cols=3, subplot_titles=["induction (ARENA)", "previous token", "induction (TL mul)"]
    )
    for col, scores in enumerate((induction, previous, mul), start=1):
        fig.add_heatmap(
            z=scores.tolist(),
            zmin=0,
            zmax=1,
            colorscale="Blues",
            showscale=col == 1,
            x=[f"H{h}" for h in range(scores.shape[1])],
            y=[f"L{i}" for i in range(scores.shape[0])],
            texttemplate="%{z:.2f}",
            row=1,
            col=col,
        )
    fig.update_layout(title="induction-2l: head scores on [BOS, r(20), r(20)]", height=320, width=1100)
    return fig


def composition_figure(scores: torch.Tensor) -> Any:
    import plotly.graph_objects as go

    fig = go.Figure(
        go.Heatmap(
            z=scores.tolist(),
            x=[f"L1H{h}" for h in range(scores.shape[1])],
            y=[f"L0H{h}" for h in range(scores.shape[0])],
            colorscale="Reds",
            texttemplate="%{z:.3f}",
        )
    )
    fig.update_layout(title="K-composition: layer-0 W_OV into layer-1 W_QKᵀ", height=380, width=520)
    return fig


def curves_figure(history: dict[str, list[float]], phase: dict[str, Any]) -> Any:
    from plotly.subplots import make_subplots

    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_scatter(x=history["step"], y=history["loss"], name="training loss", secondary_y=False)
    fig.add_scatter(
        x=history["step"], y=history["max_induction_score"], name="max induction score", secondary_y=True
    )
    for key, color in (("steepest_drop_step", "red"), ("crossing_step", "green")):
        if phase.get(key) is not None:
            fig.add_vline(x=phase[key], line_dash="dot", line_color=color, annotation_text=key)
    fig.update_xaxes(title="step")
    fig.update_yaxes(title="loss (nats)", secondary_y=False)
    fig.update_yaxes(title="max induction score", range=[0, 1], secondary_y=True)
    fig.update_layout(title="induction-2l training: the phase change", width=900, height=450)
    return fig


def attention_view(
    pattern_l0: torch.Tensor, pattern_l1: torch.Tensor, prev: int, ind: int, tokens: torch.Tensor
) -> str:
    """circuitsvis attention view (inlined JS) of the previous-token and induction heads on one sequence."""
    from circuitsvis.attention import attention_heads

    names = ["BOS" if t == VOCAB else str(t) for t in tokens.tolist()]
    stacked = torch.stack([pattern_l0[prev], pattern_l1[ind]])
    view = attention_heads(
        attention=stacked.numpy().round(4).tolist(),
        tokens=names,
        attention_head_names=[f"L0H{prev} previous-token", f"L1H{ind} induction"],
    )
    return view.local_src


# ----------------------------------------------------------------------------------------------
# The reproduction
# ----------------------------------------------------------------------------------------------


def reproduce(fast: bool = False, *, models: dict[str, nn.Module] | None = None) -> Report:
    """Run every induction check; ``models`` replaces zoo models by name (used by the tests)."""
    from interp.models import zoo

    report = Report("induction", fast=fast)
    start = time.perf_counter()
    bridge, meta = zoo_model("induction-2l", report, fast=fast, given=models)
    control_bridge, _ = zoo_model("induction-1l", report, fast=fast, given=models)
    model = interp.load(bridge, name="zoo:induction-2l")
    control = interp.load(control_bridge, name="zoo:induction-1l")
    batch = 64 if fast else 256
    tokens = zoo.repeated_tokens(batch, HALF, VOCAB, seed=EVAL_SEED)
    ln_v = math.log(VOCAB)
    n_heads = bridge.cfg.n_heads

    logits, pat = patterns(model, tokens)
    ind, prev, mul = induction_scores(pat, HALF), prev_token_scores(pat), mul_scores(pat, tokens)
    top_ind, top_prev = argmax_head(ind, 1), argmax_head(prev, 0)
    first, repeated = half_losses(logits, tokens, HALF)
    control_first, control_repeated = half_losses(control(tokens), tokens, HALF)
    report.timings["scores"] = time.perf_counter() - start

    ceiling = HALF / (2 * HALF + 1)
    report.add(
        Check.at_least(
            f"max layer-1 induction score (L1H{top_ind})",
            "0.67 / 0.87 (ARENA 1.4 / 1.10)",
            float(ind[1].max()),
            0.5,
        ),
        Check.at_most(
            "max layer-0 induction score", "≈0 (≤ 0.062 for non-induction heads)", float(ind[0].max()), 0.1
        ),
        Check.at_least(
            f"max layer-0 previous-token score (L0H{top_prev})",
            "high (ARENA 0.7 > 0.4)",
            float(prev[0].max()),
            0.5,
        ),
        Check.at_most(
            f"TL mul induction score of L1H{top_ind}",
            f"ceiling n/(2n+1) = {ceiling:.2f}",
            float(mul[1, top_ind]),
            0.5,
        ),
        Check.within(
            f"TL mul / ARENA score of L1H{top_ind}",
            f"n/(2n+1) = {ceiling:.3f}",
            float(mul[1, top_ind] / ind[1, top_ind].clamp_min(1e-9)),
            ceiling,
            0.05,
        ),
        Check.within("first-half loss (nats)", f"ln V = {ln_v:.2f}", first, ln_v, 0.15),
        Check.at_most(
            "repeated-half loss (nats)", "≈0 (ARENA: 10.12 nats lower than first half)", repeated, 0.3 * ln_v
        ),
        Check.at_least(
            "1-layer control: repeated-half loss (nats)",
            "no induction in 1 layer",
            control_repeated,
            0.8 * ln_v,
        ),
    )

    start = time.perf_counter()
    _, ablated_ind = half_losses(
        model.run_with_hooks(tokens, hooks=[("blocks.1.attn.hook_z", zero_head(top_ind, n_heads))]),
        tokens,
        HALF,
    )
    _, pat_no_prev = patterns(model, tokens, hooks=[("blocks.0.attn.hook_z", zero_head(top_prev, n_heads))])
    after = float(induction_scores(pat_no_prev, HALF)[1, top_ind])
    before = float(ind[1, top_ind])
    report.timings["ablations"] = time.perf_counter() - start
    report.add(
        Check.at_least(
            f"zero-ablate L1H{top_ind}: repeated-half loss increase (nats)",
            "+2.44 / +5.63 (1.4 / 1.10)",
            ablated_ind - repeated,
            1.0,
        ),
        Check.at_least(
            f"zero-ablate L0H{top_prev}: cut in L1H{top_ind} induction score",
            "0.87 -> 0.01 (99%)",
            1 - after / max(before, 1e-9),
            0.8,
        ),
    )

    comp = k_composition(bridge)
    flat = int(comp.argmax())
    pair = (flat // comp.shape[1], flat % comp.shape[1])
    others = comp.flatten()[torch.arange(comp.numel()) != flat].mean()
    report.add(
        Check.equal(
            "argmax K-composition (L0 head, L1 head)",
            "(prev-token head, induction head)",
            list(pair),
            [top_prev, top_ind],
        ),
        Check.at_least(
            "top K-composition / mean of other pairs", "stands out", float(comp.max() / others), 3.0
        ),
    )

    history = meta.get("history") or {}
    phase = phase_change(history)
    gap = (
        abs(phase["steepest_drop_step"] - phase["crossing_step"]) / phase["total_steps"]
        if phase["crossing_step"] is not None and phase["steepest_drop_step"] is not None
        else math.nan
    )
    report.add(
        Check.at_most(
            "phase change: |steepest loss drop - induction > 0.3| / steps",
            "coincide (Olsson: loss bump as heads form)",
            gap,
            0.10,
        )
    )

    report.notes.append(
        f"Evaluated on {batch} sequences [BOS, r(20), r(20)], seed {EVAL_SEED}. First-half loss at chance, repeated "
        f"{repeated:.3f} nats; control first/repeated {control_first:.3f}/{control_repeated:.3f}. "
        f"Phase: steepest loss drop at step {phase['steepest_drop_step']}, max induction > 0.3 at step "
        f"{phase['crossing_step']} of {phase['total_steps']}. Ablating L0H{top_prev}: L1H{top_ind} induction "
        f"{before:.3f} -> {after:.3f}."
    )
    report.figures.append(("Head scores", scores_figure(ind, prev, mul)))
    report.figures.append(("K-composition", composition_figure(comp)))
    if phase["total_steps"]:
        report.figures.append(("Training curves", curves_figure(history, phase)))
    report.views.append(
        (
            f"Attention of L0H{top_prev} and L1H{top_ind} (circuitsvis)",
            attention_view(pat[0, 0], pat[1, 0], top_prev, top_ind, tokens[0]),
        )
    )
    return report
