"""Path patching, sender heads -> receiver heads (Wang et al. 2022, the IOI paper).

For each sender head ``s``:

1. run the clean input with ``s``'s output taken from the corrupted run and every other head frozen
   to its clean output (MLPs recomputed, or frozen with ``freeze_mlps=True``); record the receivers'
   query/key/value inputs;
2. run the clean input again with only the receivers' q/k/v replaced by those recordings, and
   measure the metric.

So only the path ``s -> receivers`` carries the corrupted signal. With ``receivers="logits"`` the
metric is read from step 1 directly (the direct path to the output). Like patching, K senders of
one layer go through each forward, one per batch copy, and the clean run before that layer (before
the first receiver, in step 2) runs once for all of them (``HookedModel.run_copies``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from einops import rearrange

from interp.errors import InputError
from interp.methods.patching import (
    Metric,
    PatchResult,
    Progress,
    as_metric,
    cached_bytes,
    check_pair,
    chunks_by,
    copies_per_forward,
    default_metric,
    n_heads,
    unit_view,
)
from interp.models.base import HookedModel

Receivers = str | Sequence[tuple[int, int]]


def path_patch(
    model: HookedModel,
    clean: Any,
    corrupted: Any,
    receivers: Receivers = "logits",
    metric: Metric | Callable[[torch.Tensor], Any] | None = None,
    *,
    receiver_input: Sequence[str] = ("q", "k", "v"),
    freeze_mlps: bool = False,
    batch_size: int | None = None,
    memory_budget: int | None = None,
    progress: Progress | None = None,
) -> PatchResult:
    """Effect of each sender head's path into ``receivers`` (``"logits"`` or ``[(layer, head), ...]``).

    Returns a ``PatchResult`` with dims ``("layer", "head")`` over sender heads: the metric on the
    clean run when only that path carries the corrupted sender output. Senders in or after the first
    receiver layer have no path and keep ``metric_clean``.
    """
    clean_t, corrupt_t = check_pair(model, clean, corrupted)
    heads, n_layers = n_heads(model), model.n_layers
    receiver_list = _check_receivers(receivers, n_layers, heads)
    last = n_layers if receiver_list is None else min(layer for layer, _ in receiver_list)
    z = [f"blocks.{i}.attn.hook_z" for i in range(n_layers)]
    mlp = [f"blocks.{i}.hook_mlp_out" for i in range(n_layers) if f"blocks.{i}.hook_mlp_out" in model._sites]
    rec_hooks = _receiver_hooks(model, receiver_list, receiver_input)
    senders = [(layer, h) for layer in range(last) for h in range(heads)]
    held = cached_bytes(model, z + z + (mlp if freeze_mlps else []), clean_t, copies=2)
    copies = copies_per_forward(
        model, clean_t, max(1, len(senders)), held, memory_budget, batch_size, "path patching"
    )
    clean_out, clean_cache = model.run_with_cache(clean_t, names=z + (mlp if freeze_mlps else []))
    corrupt_out, corrupt_cache = model.run_with_cache(corrupt_t, names=z)
    metric_ = (default_metric(model) if metric is None else as_metric(metric)).bind(
        clean_out, corrupt_out, clean_t.attention_mask
    )
    base = float(metric_(clean_out))
    values = torch.full((n_layers, heads), base)
    done = 0
    for chunk in chunks_by(senders, copies, key=lambda sender: sender[0]):  # one layer per forward
        first = chunk[0][0]  # on the clean input, freezing heads and MLPs before the sender is a no-op
        frozen = _freeze_hooks(model, chunk, z[first:], clean_cache, corrupt_cache, heads, first)
        frozen += [(n, _fixed(clean_cache[n], len(chunk))) for n in (mlp[first:] if freeze_mlps else [])]
        recorded: dict[str, torch.Tensor] = {}
        record = [(name, _recorder(recorded)) for name in rec_hooks]
        output = model.run_copies(clean_t, len(chunk), frozen + record, shared_until=_entry(model, first))
        if receiver_list is not None:
            replay = _replay_hooks(recorded, receiver_list, heads)
            output = model.run_copies(clean_t, len(chunk), replay, shared_until=_entry(model, last))
        effects = metric_.batched(rearrange(output, "(k b) ... -> k b ...", k=len(chunk)))
        for (layer, h), value in zip(chunk, effects.detach().float().cpu(), strict=True):
            values[layer, h] = value
        done += len(chunk)
        if progress is not None:
            progress(done, len(senders))
    target = "logits" if receiver_list is None else ", ".join(f"L{a}H{b}" for a, b in receiver_list)
    return PatchResult(
        values,
        ("layer", "head"),
        {"layer": [f"L{i}" for i in range(n_layers)], "head": [f"H{h}" for h in range(heads)]},
        metric_clean=base,
        metric_corrupted=float(metric_(corrupt_out)),
        method="path patching",
        site=f"heads -> {target}",
        metric=metric_.name,
    )


def _check_receivers(receivers: Receivers, n_layers: int, heads: int) -> list[tuple[int, int]] | None:
    if isinstance(receivers, str):
        if receivers != "logits":
            raise InputError(
                f"receivers must be 'logits' or a list of (layer, head) pairs, got {receivers!r}"
            )
        return None
    out = [(int(a), int(b)) for a, b in receivers]
    bad = [r for r in out if not (0 <= r[0] < n_layers and 0 <= r[1] < heads)]
    if not out or bad:
        raise InputError(
            f"receiver heads {bad or out} out of range: layers 0..{n_layers - 1}, heads 0..{heads - 1}"
        )
    return out


def _receiver_hooks(model: HookedModel, receivers, inputs: Sequence[str]) -> list[str]:
    if receivers is None:
        return []
    unknown = [x for x in inputs if x not in ("q", "k", "v")]
    if unknown:
        raise InputError(f"receiver_input must be among 'q', 'k', 'v'; got {unknown}")
    names = sorted({f"blocks.{layer}.attn.hook_{x}" for layer, _ in receivers for x in inputs})
    missing = [n for n in names if n not in model._sites]
    if missing:
        raise InputError(
            f"{model.name} has no per-head query/key/value hooks ({missing[0]}); path patching needs them"
        )
    return names


def _entry(model: HookedModel, layer: int) -> str | None:
    """The residual stream entering ``layer``: every copy is the same clean run up to there."""
    name = f"blocks.{layer}.hook_resid_pre"
    return name if 0 < layer < model.n_layers and name in model._sites else None


def _freeze_hooks(model, chunk, z_names, clean_cache, corrupt_cache, heads, first_layer: int = 0) -> list:
    """Every head's output from ``first_layer`` on frozen to clean, except copy k's sender, which
    takes its corrupted output."""
    hooks = []
    for layer, name in enumerate(z_names, start=first_layer):
        mask = torch.zeros(len(chunk), 1, 1, heads, 1, dtype=torch.bool)
        for k, (s_layer, s_head) in enumerate(chunk):
            if s_layer == layer:
                mask[k, 0, 0, s_head] = True
        clean, corrupt = unit_view(clean_cache[name], heads), unit_view(corrupt_cache[name], heads)
        value = torch.where(mask.to(clean.device), corrupt[None], clean[None])  # [k, b, p, h, d]
        hooks.append((name, _replace_with(rearrange(value, "k b p h d -> (k b) p h d"))))
    return hooks


def _replace_with(value: torch.Tensor) -> Callable:
    return lambda act, ctx: value.reshape(act.shape).to(act.dtype)


def _fixed(value: torch.Tensor, copies: int) -> Callable:
    return _replace_with(value.repeat(copies, *([1] * (value.ndim - 1))))


def _recorder(store: dict[str, torch.Tensor]) -> Callable:
    def record(act: torch.Tensor, ctx) -> None:
        store[ctx.name] = act.detach()

    return record


def _replay_hooks(recorded: dict[str, torch.Tensor], receivers, heads: int) -> list:
    """Replace the receivers' q/k/v (their heads only, all positions) with the step-1 recordings."""
    hooks = []
    for name, value in recorded.items():
        layer = int(name.split(".")[1])
        mask = torch.zeros(heads, 1, dtype=torch.bool)
        for r_layer, r_head in receivers:
            if r_layer == layer:
                mask[r_head] = True

        def replay(act, ctx, value=value, mask=mask):
            view = unit_view(act, heads)
            new = torch.where(mask.to(act.device), unit_view(value, heads), view)
            return new.reshape(act.shape)

        hooks.append((name, replay))
    return hooks
