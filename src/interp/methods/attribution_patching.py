"""Attribution patching (AtP): every patch of a sweep estimated from one forward and one backward.

Patching unit ``u`` from clean into corrupted changes the metric by about
``(a_clean[u] - a_corrupted[u]) . d metric / d a[u]``, the gradient taken on the corrupted run
(Nanda 2023; Kramár et al. 2024). That linear estimate is good for small activations (head
outputs) and known to be poor for the residual stream and early MLPs, and it misses effects through
attention saturation; so the result reports its Pearson correlation with exact patching whenever an
exact result is given (``exact=``, or ``check=True`` to compute it).

Edges (EAP, Syed et al. 2023): ``attribution_patch_edges`` scores every sender -> receiver edge of
the residual graph (embeddings, heads and MLPs -> later heads' q/k/v, MLPs and the logits):
``(out_clean[s] - out_corrupted[s]) . d metric / d x_r``, where ``x_r`` is the residual stream as
receiver ``r`` alone reads it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
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
    run_pair,
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
    clean_out, corrupt_out, clean_cache = run_pair(model, clean_t, corrupt_t, hooks)
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
# Edge attribution patching over the residual graph
# ------------------------------------------------------------------------------------------------


def attribution_patch_edges(
    model: HookedModel,
    clean: Any,
    corrupted: Any,
    metric: Metric | Callable[[torch.Tensor], Any] | None = None,
    *,
    inputs: Sequence[str] = ("q", "k", "v"),
) -> PatchResult:
    """EAP scores for every edge of the residual graph, from one forward and one backward pass.

    Senders write into the residual stream: the embeddings (``embed``), each head (``L1H3``) and
    each MLP (``MLP1``). Receivers read it: each head through its ``inputs`` (query, key, value),
    each MLP, and the unembedding (``logits``). ``values[sender, receiver]`` is
    ``(out_clean[s] - out_corrupted[s]) . d metric / d x_r``, where ``x_r`` is the residual stream
    as receiver ``r`` alone reads it; 0 where ``r`` does not read ``s``'s output. Summed over its
    receivers, a sender's row is its node AtP estimate (``attribution_patch``). Needs a pre-LN
    model (the residual stream is the sum of the senders' outputs).
    """
    clean_t, corrupt_t = check_pair(model, clean, corrupted)
    graph = _ResidualGraph.of(model, inputs)
    _check_head_outputs_unhooked(model)
    clean_out, corrupt_out, clean_cache = run_pair(model, clean_t, corrupt_t, graph.sender_hooks)
    metric_ = (default_metric(model) if metric is None else as_metric(metric)).bind(
        clean_out, corrupt_out, clean_t.attention_mask
    )
    store: dict[str, torch.Tensor] = {}

    def keep(act: torch.Tensor, ctx) -> None:
        store[ctx.name] = act

    with torch.enable_grad():
        output = model.run_with_hooks(corrupt_t, [(n, keep) for n in graph.all_hooks], grad=True)
        value = metric_(output)
        read = graph.read_hooks
        grads = dict(
            zip(read, torch.autograd.grad(value, [store[n] for n in read], retain_graph=True), strict=True)
        )
        receivers = graph.receiver_grads(store, grads)  # [b, p, receiver, d_model]
    senders = graph.sender_deltas(model, clean_cache, store)  # [b, p, sender, d_model]
    values = einsum(senders, receivers, "b p s d, b p r d -> s r").float().cpu() * graph.reads
    return PatchResult(
        values,
        ("sender", "receiver"),
        {"sender": graph.senders, "receiver": graph.receivers},
        metric_clean=float(metric_(clean_out)),
        metric_corrupted=float(value.detach()),
        method="edge attribution patching (EAP)",
        site="residual graph",
        metric=metric_.name,
    )


@dataclass
class _ResidualGraph:
    """The nodes of a pre-LN transformer's residual graph and the hooks that carry them."""

    n_layers: int
    heads: int
    mlps: bool
    inputs: Sequence[str]

    @classmethod
    def of(cls, model: HookedModel, inputs: Sequence[str]) -> _ResidualGraph:
        sites = model._sites
        n_layers = model.n_layers
        mlps = "blocks.0.hook_mlp_out" in sites
        graph = cls(n_layers, n_heads(model), mlps, tuple(inputs))
        missing = [n for n in graph.all_hooks if n not in sites]
        if missing:
            raise InputError(
                f"edge attribution needs hooks {missing[:3]}..., which {model.name} does not have"
            )
        order = {name: i for i, name in enumerate(model.hook_names)}
        attn_written = order.get("blocks.0.attn.o.hook_out", order["blocks.0.hook_attn_out"])
        if attn_written < order.get("blocks.0.ln1.hook_in", -1):  # ln1 normalizes what attention wrote
            raise InputError(
                f"{model.name} normalizes after each sublayer (post-LN, like BERT), so its residual stream is "
                "not a sum of node outputs and edges have no additive scores; use attribution_patch for nodes"
            )
        return graph

    # --- names ----------------------------------------------------------------------------------

    @property
    def senders(self) -> list[str]:
        names = ["embed"]
        for layer in range(self.n_layers):
            names += [f"L{layer}H{h}" for h in range(self.heads)] + ([f"MLP{layer}"] if self.mlps else [])
        return names

    @property
    def receivers(self) -> list[str]:
        return self.senders[1:] + ["logits"]

    @property
    def reads(self) -> torch.Tensor:
        """``[sender, receiver]``: 1 where the receiver reads the stream after the sender wrote it.

        Stages: the embeddings write at 0; layer l's heads read and write at 2l + 1 (so heads of one
        layer do not read each other), its MLP at 2l + 2; the logits read at 2 n_layers + 1.
        """
        per_layer = [
            [2 * layer + 1] * self.heads + ([2 * layer + 2] if self.mlps else [])
            for layer in range(self.n_layers)
        ]
        stages = torch.tensor(
            [0] + [stage for layer in per_layer for stage in layer] + [2 * self.n_layers + 1]
        )
        return (stages[None, 1:] > stages[:-1, None]).float()

    @property
    def sender_hooks(self) -> list[str]:
        hooks = ["blocks.0.hook_resid_pre"]
        for layer in range(self.n_layers):
            hooks.append(f"blocks.{layer}.attn.hook_z")
            hooks += [f"blocks.{layer}.hook_mlp_out"] if self.mlps else []
        return hooks

    @property
    def read_hooks(self) -> list[str]:
        """Where receivers read: each head's q/k/v, each MLP's normalized input, the final stream."""
        hooks = []
        for layer in range(self.n_layers):
            hooks += [f"blocks.{layer}.attn.hook_{x}" for x in self.inputs]
            hooks += [f"blocks.{layer}.ln2.hook_out"] if self.mlps else []
        return hooks + [f"blocks.{self.n_layers - 1}.hook_resid_post"]

    @property
    def all_hooks(self) -> list[str]:
        streams = [f"blocks.{layer}.hook_resid_pre" for layer in range(self.n_layers)]
        streams += [f"blocks.{layer}.hook_resid_mid" for layer in range(self.n_layers)] if self.mlps else []
        return list(dict.fromkeys([*self.sender_hooks, *streams, *self.read_hooks]))

    # --- tensors --------------------------------------------------------------------------------

    def sender_deltas(self, model: HookedModel, clean_cache, store) -> torch.Tensor:
        """Each sender's clean - corrupted output in the residual stream, ``[b, p, sender, d]``."""

        def delta(name: str) -> torch.Tensor:
            return clean_cache[name] - store[name].detach()

        outs = [delta("blocks.0.hook_resid_pre")[:, :, None]]
        for layer in range(self.n_layers):
            outs.append(_head_results(model, layer, delta(f"blocks.{layer}.attn.hook_z"), self.heads))
            outs += [delta(f"blocks.{layer}.hook_mlp_out")[:, :, None]] if self.mlps else []
        return torch.cat(outs, dim=2)

    def receiver_grads(self, store, grads) -> torch.Tensor:
        """d metric / d residual stream along each receiver's own read, ``[b, p, receiver, d]``."""
        outs = []
        for layer in range(self.n_layers):
            outs.append(_receiver_grads(store, grads, layer, self.inputs, self.heads))
            if self.mlps:
                mlp_in = f"blocks.{layer}.ln2.hook_out"
                (g,) = torch.autograd.grad(
                    store[mlp_in], store[f"blocks.{layer}.hook_resid_mid"], grads[mlp_in], retain_graph=True
                )
                outs.append(g[:, :, None])
        outs.append(grads[f"blocks.{self.n_layers - 1}.hook_resid_post"][:, :, None])
        return torch.cat(outs, dim=2).detach()


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


def _check_head_outputs_unhooked(model: HookedModel) -> None:
    """Head results are read out through the unhooked output projection, so no user hook may sit
    between ``hook_z`` and ``hook_attn_out``: there the heads' outputs are not what reaches the stream."""
    sites = model._sites
    for name in sorted(model._user_hooked):
        layer = name.split(".")[1] if name.startswith("blocks.") else None
        z = sites.get(f"blocks.{layer}.attn.hook_z")
        if z is None:
            continue
        between = [
            f"blocks.{layer}.attn.o.hook_in",
            f"blocks.{layer}.attn.o.hook_out",
            f"blocks.{layer}.hook_attn_out",
        ]
        spots = {(id(sites[b].module), sites[b].side) for b in between if b in sites}
        spots.discard((id(z.module), z.side))
        if (id(sites[name].module), sites[name].side) in spots:
            raise InputError(
                f"edge attribution reads each head's output through the output projection, but a hook on "
                f"{name} changes what the heads of layer {layer} add to the residual stream; hook the heads "
                "themselves (hook_z) or use attribution_patch for nodes"
            )


def _head_results(model: HookedModel, layer: int, delta_z: torch.Tensor, heads: int) -> torch.Tensor:
    """Each head's change of output in the residual stream, ``[b, p, head, d_model]``, through the
    attention output projection (bias removed): linear, so ``o(dz_h) - o(0)``."""
    proj = component(model, f"blocks.{layer}.attn.o")
    z = unit_view(delta_z, heads)
    b, p, _, d_head = z.shape
    eye = torch.eye(heads, dtype=z.dtype, device=z.device)
    per_head = einsum(z, eye, "b p h d, h g -> b p g h d")  # head g keeps only its own slice
    flat = rearrange(per_head, "b p g h d -> (b p g) (h d)")
    with torch.no_grad(), model._internal():  # a readout probe: the user's hooks must not run on it
        out = proj(flat) - proj(torch.zeros_like(flat[:1]))
    return rearrange(out, "(b p g) m -> b p g m", b=b, p=p)
