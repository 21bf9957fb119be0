"""Ablations of heads, neurons and layers (zero, mean, resample), batched like patching.

An ablation is a patch whose source is not a second prompt: zeros, the mean activation over a
reference distribution, or the activation on a randomly drawn reference prompt (resampling,
Chan et al. 2022). :func:`ablate` ablates each unit on its own, many per forward, with the same
engine and ``PatchResult`` as :func:`interp.methods.patching.patch`. :func:`ablation_hooks` ablates
a *group* of units together (say, every induction head), as hooks for any forward:

    >>> hooks = ablation_hooks(model, tokens, [(1, 0), (1, 3)], "head", "mean")
    >>> logits = model.run_with_hooks(tokens, hooks)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from einops import reduce

from interp.errors import InputError
from interp.methods.patching import (
    SITES,
    Metric,
    PatchResult,
    Progress,
    as_metric,
    cached_bytes,
    copies_per_forward,
    default_metric,
    plan,
    splice,
    sweep,
    unit_view,
)
from interp.models.base import HookedModel

Kind = Literal["zero", "mean", "resample"]


def ablate(
    model: HookedModel,
    inputs: Any,
    site: str = "head",
    kind: Kind = "zero",
    metric: Metric | Callable[[torch.Tensor], Any] | None = None,
    *,
    reference: Any = None,
    seed: int = 0,
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    neurons: Sequence[int] | None = None,
    batch_size: int | None = None,
    memory_budget: int | None = None,
    progress: Progress | None = None,
) -> PatchResult:
    """Ablate each unit of ``site`` in turn on ``inputs`` and measure ``metric``.

    Args:
        site: ``head``, ``head_pos``, ``neuron``, ``attn`` / ``mlp`` (whole layers), ``attn_out``,
            ``resid_pre``... (see ``patching.SITES``).
        kind: ``"zero"``; ``"mean"`` over ``reference`` (per position when it has the same length as
            ``inputs``, else over all positions; default reference: ``inputs`` itself); ``"resample"``:
            each prompt takes the activation of a random ``reference`` prompt (same length, seeded).
        metric: default KL from the unablated run (language models) or cosine to it (encoders).

    Returns:
        ``PatchResult`` with the metric after each ablation; ``metric_clean`` is the unablated run and
        ``normalized()`` gives the change from it.
    """
    if kind not in ("zero", "mean", "resample"):
        raise InputError(f"unknown ablation kind {kind!r}; use 'zero', 'mean' or 'resample'")
    base = model.prepare(inputs)
    str_tokens = (base.str_tokens or [None])[0]
    units = heads if SITES.get(site) is not None and SITES[site].unit == "head" else neurons
    plan_ = plan(
        model, site, base.input_ids.shape[1], str_tokens, layers=layers, positions=positions, units=units
    )
    hooks = sorted(set(plan_.hooks), key=model.hook_names.index)
    held = cached_bytes(model, hooks, base)
    copies = copies_per_forward(
        model, base, len(plan_.patches), held, memory_budget, batch_size, "ablation sweep"
    )
    output, cache = model.run_with_cache(base, names=hooks, memory_budget=max(held, 1) * 2)
    metric_ = (default_metric(model) if metric is None else as_metric(metric)).bind(
        output, output, base.attention_mask
    )
    sources = _sources(model, base, cache, hooks, plan_.units, kind, reference, seed)
    values = sweep(
        model, base, sources, plan_, metric_, copies=copies, progress=progress, desc=f"{kind} ablation"
    )
    return PatchResult(
        values,
        plan_.dims,
        plan_.labels,
        metric_clean=float(metric_(output)),
        method=f"{kind} ablation",
        site=site,
        metric=metric_.name,
    )


def ablation_hooks(
    model: HookedModel,
    inputs: Any,
    units: Sequence[tuple[int, int | None]],
    site: str = "head",
    kind: Kind = "zero",
    *,
    reference: Any = None,
    seed: int = 0,
) -> list[tuple[str, Callable]]:
    """Hooks that ablate every unit in ``units`` at once, for ``run_with_hooks`` / ``run_with_cache``.

    Redundant units (several heads doing one job) each look harmless when ablated alone; their joint
    ablation shows what the group does. The replacement values are those :func:`ablate` uses.

    Args:
        units: ``(layer, index)`` pairs: heads for ``site="head"``, neurons for ``"neuron"``; for a
            whole-layer site (``"attn"``, ``"mlp"``) the index is ignored (give ``None``).
        kind, reference, seed: as in :func:`ablate`.

    Returns:
        ``[(hook_name, fn), ...]`` valid for forwards on ``inputs`` (same prompts, same length).
    """
    if kind not in ("zero", "mean", "resample"):
        raise InputError(f"unknown ablation kind {kind!r}; use 'zero', 'mean' or 'resample'")
    spec = SITES.get(site)
    if spec is None or spec.per_pos or not spec.layers:
        whole = [name for name, s in SITES.items() if s.layers and not s.per_pos]
        raise InputError(f"ablation_hooks ablates whole units; use one of the sites {whole} (got {site!r})")
    if not units:
        raise InputError("ablation_hooks needs at least one (layer, index) unit to ablate")
    base = model.prepare(inputs)
    layers = sorted({int(layer) for layer, _ in units})
    plan_ = plan(model, site, base.input_ids.shape[1], layers=layers)
    hooks = sorted(set(plan_.hooks), key=model.hook_names.index)
    if kind == "zero":  # nothing to read from a forward pass: a zero broadcasts into any unit
        sources = {h: torch.zeros(1, 1, 1, 1, device=base.input_ids.device) for h in hooks}
    else:
        _, cache = model.run_with_cache(base, names=hooks)
        sources = _sources(model, base, cache, hooks, plan_.units, kind, reference, seed)
    masks = {h: torch.zeros(1, base.input_ids.shape[1], plan_.units[h], dtype=torch.bool) for h in hooks}
    for layer, index in units:
        hook = spec.hook.format(layer=int(layer))
        n_units = plan_.units[hook]
        if spec.unit is None:
            masks[hook][:] = True
            continue
        if index is None or not 0 <= int(index) < n_units:
            raise InputError(
                f"{spec.unit} index {index} of layer {layer} is out of range: valid 0..{n_units - 1}"
            )
        masks[hook][:, :, int(index)] = True
    device = base.input_ids.device
    return [(h, splice(masks[h].to(device), sources[h], plan_.units[h])) for h in hooks]


def _sources(model, base, cache, hooks, units, kind, reference, seed) -> dict[str, torch.Tensor]:
    """The ``[batch|1, pos, unit, rest]`` replacement values per hook."""
    views = {h: unit_view(cache[h], units[h]) for h in hooks}
    if kind == "zero":
        return {h: torch.zeros_like(v[:1]) for h, v in views.items()}
    ref = base if reference is None else model.prepare(reference)
    _, ref_cache = model.run_with_cache(ref, names=hooks)
    ref_views = {h: unit_view(ref_cache[h], units[h]) for h in hooks}
    n_pos, ref_pos = base.input_ids.shape[1], ref.input_ids.shape[1]
    if kind == "mean":
        if ref_pos == n_pos:
            return {h: reduce(v, "b p u r -> 1 p u r", "mean") for h, v in ref_views.items()}
        return {
            h: reduce(v, "b p u r -> 1 1 u r", "mean").expand(1, n_pos, -1, -1) for h, v in ref_views.items()
        }
    if ref_pos != n_pos:
        raise InputError(
            f"resample ablation takes each activation from a reference prompt at the same position, so the "
            f"reference prompts need {n_pos} tokens like the inputs (they have {ref_pos}). Use kind='mean' "
            "for references of another length."
        )
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(ref.input_ids.shape[0], (base.input_ids.shape[0],), generator=generator)
    return {h: v[picks.to(v.device)] for h, v in ref_views.items()}
