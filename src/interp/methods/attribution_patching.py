"""Attribution patching (AtP): every patch of a sweep estimated from one forward and one backward.

Patching unit ``u`` from clean into corrupted changes the metric by about
``(a_clean[u] - a_corrupted[u]) . d metric / d a[u]``, the gradient taken on the corrupted run
(Nanda 2023; Kramár et al. 2024). That linear estimate is good for small activations (head
outputs) and known to be poor for the residual stream and early MLPs, and it misses effects through
attention saturation; so the result reports its Pearson correlation with exact patching whenever an
exact result is given (``exact=``, or ``check=True`` to compute it).

Edges (EAP, Syed et al. 2023): ``attribution_patch_edges`` scores sender head -> receiver head
(q, k or v input) pairs: ``(result_clean[s] - result_corrupted[s]) . d metric / d x_r``, where
``x_r`` is the residual stream entering receiver ``r``'s query/key/value path only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch
from einops import einsum, rearrange, reduce

from interp.errors import InputError
from interp.methods.patching import (
    SITES,
    Metric,
    PatchResult,
    Progress,
    as_metric,
    check_pair,
    component,
    default_metric,
    n_heads,
    patch,
    plan,
    unit_view,
)
from interp.models.base import HookedModel


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of two same-shaped tensors (flattened)."""
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    denom = a.norm() * b.norm()
    return float((a @ b) / denom) if denom > 0 else float("nan")


def attribution_patch(
    model: HookedModel,
    clean: Any,
    corrupted: Any,
    site: str = "head_pos",
    metric: Metric | Callable[[torch.Tensor], Any] | None = None,
    *,
    exact: PatchResult | None = None,
    check: bool = False,
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    neurons: Sequence[int] | None = None,
    progress: Progress | None = None,
) -> PatchResult:
    """Estimate ``patch(model, clean, corrupted, site, metric)`` with one forward/backward pass.

    ``values`` are estimated metric values after each patch (``metric_corrupted + attribution``),
    so they compare one to one with exact patching. ``agreement`` is the Pearson correlation with
    ``exact`` (or with a fresh exact sweep when ``check=True``), else None.
    """
    clean_t, corrupt_t = check_pair(model, clean, corrupted)
    str_tokens = (clean_t.str_tokens or [None])[0]
    units = heads if SITES.get(site) is not None and SITES[site].unit == "head" else neurons
    plan_ = plan(
        model, site, clean_t.input_ids.shape[1], str_tokens, layers=layers, positions=positions, units=units
    )
    hooks = sorted(set(plan_.hooks), key=model.hook_names.index)
    clean_out, clean_cache = model.run_with_cache(clean_t, names=hooks)
    corrupt_out = model(corrupt_t)
    metric_ = (default_metric(model) if metric is None else as_metric(metric)).bind(
        clean_out, corrupt_out, clean_t.attention_mask
    )
    _, cache = model.run_with_cache(corrupt_t, names=hooks, grad_of=metric_)
    attributions = [
        _unit_attribution(clean_cache[h], cache[h], cache.grads[h], plan_.units[h]) for h in hooks
    ]
    values = _gather(plan_, dict(zip(hooks, attributions, strict=True)))
    base = float(metric_(corrupt_out))
    result = PatchResult(
        values + base,
        plan_.dims,
        plan_.labels,
        metric_clean=float(metric_(clean_out)),
        metric_corrupted=base,
        method="attribution patching (AtP)",
        site=site,
        metric=metric_.name,
    )
    if check and exact is None:
        exact = patch(
            model, clean_t, corrupt_t, site, metric_, layers=layers, positions=positions,
            heads=heads, neurons=neurons, progress=progress,
        )  # fmt: skip
    return with_agreement(result, exact)


def with_agreement(estimate: PatchResult, exact: PatchResult | None) -> PatchResult:
    """``estimate`` with ``agreement`` = Pearson correlation with ``exact`` (same shape required)."""
    if exact is None:
        return estimate
    if exact.values.shape != estimate.values.shape:
        raise InputError(
            f"exact result has shape {tuple(exact.values.shape)} {exact.dims}, the estimate "
            f"{tuple(estimate.values.shape)} {estimate.dims}: compare results of the same site and filters"
        )
    return replace(estimate, agreement=pearson(estimate.values, exact.values))


def _unit_attribution(
    clean: torch.Tensor, corrupt: torch.Tensor, grad: torch.Tensor, units: int
) -> torch.Tensor:
    """``(clean - corrupted) . grad`` per ``[pos, unit]``, summed over prompts and the vector dims.

    The metric averages over prompts, so the gradient already carries the ``1/batch`` factor.
    """
    delta = unit_view(clean - corrupt, units) * unit_view(grad, units)
    return reduce(delta, "b p u r -> p u", "sum").detach().float().cpu()


def _gather(plan_, attributions: dict[str, torch.Tensor]) -> torch.Tensor:
    """Pick each planned patch's estimate: a position/unit entry, or a sum over all of them."""
    out = torch.empty(len(plan_.patches))
    for i, p in enumerate(plan_.patches):
        table = attributions[p.hook]
        rows = table if p.pos is None else table[p.pos : p.pos + 1]
        out[i] = rows.sum() if p.unit is None else rows[:, p.unit].sum()
    return out.reshape(plan_.shape)


# ------------------------------------------------------------------------------------------------
# Edge attribution patching, head -> head
# ------------------------------------------------------------------------------------------------


def attribution_patch_edges(
    model: HookedModel,
    clean: Any,
    corrupted: Any,
    metric: Metric | Callable[[torch.Tensor], Any] | None = None,
    *,
    inputs: Sequence[str] = ("q", "k", "v"),
) -> PatchResult:
    """EAP scores for every sender head -> later receiver head edge, summed over q/k/v inputs.

    ``values[sender_layer, sender_head, receiver_layer, receiver_head]`` is the estimated change
    of the metric when only that edge carries the clean sender output (0 where the receiver is not
    later than the sender). Needs per-head q/k/v hooks and a pre-LN residual stream.
    """
    clean_t, corrupt_t = check_pair(model, clean, corrupted)
    heads, n_layers = n_heads(model), model.n_layers
    z_names = [f"blocks.{i}.attn.hook_z" for i in range(n_layers)]
    in_names = [f"blocks.{i}.hook_resid_pre" for i in range(n_layers)]
    qkv = [f"blocks.{i}.attn.hook_{x}" for i in range(n_layers) for x in inputs]
    missing = [n for n in [*z_names, *in_names, *qkv] if n not in model._sites]
    if missing:
        raise InputError(f"edge attribution needs hooks {missing[:3]}..., which {model.name} does not have")
    clean_out, clean_cache = model.run_with_cache(clean_t, names=z_names)
    corrupt_out = model(corrupt_t)
    metric_ = (default_metric(model) if metric is None else as_metric(metric)).bind(
        clean_out, corrupt_out, clean_t.attention_mask
    )
    store: dict[str, torch.Tensor] = {}

    def keep(act: torch.Tensor, ctx) -> None:
        store[ctx.name] = act

    with torch.enable_grad():
        output = model.run_with_hooks(corrupt_t, [(n, keep) for n in [*z_names, *in_names, *qkv]], grad=True)
        value = metric_(output)
        grads = dict(
            zip(qkv, torch.autograd.grad(value, [store[n] for n in qkv], retain_graph=True), strict=True)
        )
        receiver_grads = [_receiver_grads(store, grads, layer, inputs, heads) for layer in range(n_layers)]
    results = [
        _head_results(model, layer, clean_cache[z_names[layer]] - store[z_names[layer]].detach(), heads)
        for layer in range(n_layers)
    ]
    values = torch.zeros(n_layers, heads, n_layers, heads)
    for s in range(n_layers):
        for r in range(s + 1, n_layers):
            values[s, :, r, :] = (
                einsum(results[s], receiver_grads[r], "b p hs d, b p hr d -> hs hr").float().cpu()
            )
    labels = {
        "sender_layer": [f"L{i}" for i in range(n_layers)],
        "sender_head": [f"H{h}" for h in range(heads)],
    }
    labels |= {"receiver_layer": labels["sender_layer"], "receiver_head": labels["sender_head"]}
    return PatchResult(
        values,
        ("sender_layer", "sender_head", "receiver_layer", "receiver_head"),
        labels,
        metric_clean=float(metric_(clean_out)),
        metric_corrupted=float(value.detach()),
        method="edge attribution patching (EAP)",
        site="head->head",
        metric=metric_.name,
    )


def _receiver_grads(store, grads, layer: int, inputs: Sequence[str], heads: int) -> torch.Tensor:
    """d metric / d (residual entering layer ``layer``) through each head's q/k/v only: ``[b, p, head, d]``."""
    resid = store[f"blocks.{layer}.hook_resid_pre"]
    per_head = []
    for h in range(heads):
        outs, vecs = [], []
        for x in inputs:
            name = f"blocks.{layer}.attn.hook_{x}"
            g = unit_view(grads[name], heads)
            mask = torch.zeros_like(g)
            mask[:, :, h] = g[:, :, h]
            outs.append(store[name])
            vecs.append(mask.reshape(store[name].shape))
        (g_resid,) = torch.autograd.grad(outs, [resid], vecs, retain_graph=True)
        per_head.append(g_resid)
    return torch.stack(per_head, dim=2).detach()


def _head_results(model: HookedModel, layer: int, delta_z: torch.Tensor, heads: int) -> torch.Tensor:
    """Each head's change of output in the residual stream, ``[b, p, head, d_model]``, through the
    attention output projection (bias removed): linear, so ``o(dz_h) - o(0)``."""
    proj = component(model, f"blocks.{layer}.attn.o")
    z = unit_view(delta_z, heads)
    b, p, _, d_head = z.shape
    eye = torch.eye(heads, dtype=z.dtype, device=z.device)
    per_head = einsum(z, eye, "b p h d, h g -> b p g h d")  # head g keeps only its own slice
    flat = rearrange(per_head, "b p g h d -> (b p g) (h d)")
    with torch.no_grad():
        out = proj(flat) - proj(torch.zeros_like(flat[:1]))
    return rearrange(out, "(b p g) m -> b p g m", b=b, p=p)
