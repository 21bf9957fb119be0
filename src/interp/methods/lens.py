"""Direct logit attribution and the logit lens, on any pre-LN transformer with an unembedding.

Both read the model's own final norm and unembedding modules (found through the hook sites
``ln_final`` and ``unembed``), so they work the same on plain HF models, native bridges, and bridges
in TransformerLens compatibility mode (folded LN: the norm then has no weights and the unembedding
carries them; nothing here assumes either way).

DLA: with the final norm's scale frozen at its value on the run, the logit difference is linear in
the residual stream ``x = embed + pos_embed + sum(attn_out) + sum(mlp_out)``:
``logit_diff = x . g + c`` with ``g = center(w * u) / scale`` and ``c = u . b + bias``
(``u`` = unembedding direction, ``w, b`` = norm weight and bias). Each component contributes
``component . g``; heads and neurons go through the output projection's own module (linear), so the
per-head/per-neuron values plus each layer's bias term sum back to the layer's contribution, and
everything sums to the logit difference exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from einops import einsum, rearrange

from interp.errors import InputError
from interp.methods.patching import (
    PatchResult,
    _check_vocab,
    _last_index,
    _token_ids,
    component,
    n_heads,
    unit_view,
)
from interp.models.base import HookedModel

By = Literal["component", "layer", "head", "neuron"]


# ------------------------------------------------------------------------------------------------
# The final norm and the unembedding
# ------------------------------------------------------------------------------------------------


def _module(model: HookedModel, path: str) -> torch.nn.Module:
    if f"{path}.hook_in" in model._sites or f"{path}.hook_out" in model._sites:
        return component(model, path)
    raise InputError(
        f"{model.name} has no unembedding ({path}): it outputs hidden states, not logits over a "
        "vocabulary, so the logit lens and direct logit attribution do not apply. Use activation patching "
        "with a hidden-state metric (patching.cosine()) instead."
    )


@dataclass
class FinalNorm:
    """The final norm as ``(x - mean?) / scale * w + b``, checked against the module itself."""

    weight: torch.Tensor | None
    bias: torch.Tensor | None
    eps: float
    centered: bool

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        x = x - x.mean(-1, keepdim=True) if self.centered else x
        return (x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = (x - x.mean(-1, keepdim=True) if self.centered else x) / self.scale(x)
        y = y * self.weight if self.weight is not None else y
        return y + self.bias if self.bias is not None else y


def final_norm(model: HookedModel, sample: torch.Tensor) -> FinalNorm:
    """Read the final norm's parameters and verify them on ``sample`` (raises if they do not match)."""
    module = _module(model, "ln_final")
    weight = _param(module, "weight", "w")
    bias = _param(module, "bias", "b")
    eps = getattr(module, "eps", None) or getattr(module, "variance_epsilon", None)
    if eps is None:
        eps = getattr(getattr(module, "config", None), "eps", 1e-5)
    rms = "rms" in type(module).__name__.lower() or getattr(
        getattr(model, "cfg", None), "uses_rms_norm", False
    )
    norm = FinalNorm(weight, bias, float(eps), centered=not rms)
    with torch.no_grad(), model._internal():  # a readout probe: the user's hooks must not run on it
        if (norm(sample) - module(sample)).abs().max() > 1e-4 * (1 + sample.abs().max()):
            raise InputError(
                f"cannot express the final norm of {model.name} ({type(module).__name__}) as a LayerNorm or "
                "RMSNorm, so direct logit attribution would be wrong; it is not supported for this model"
            )
    return norm


def _param(module: torch.nn.Module, *names: str) -> torch.Tensor | None:
    for name in names:
        value = getattr(module, name, None)
        if isinstance(value, torch.Tensor):
            return value.detach()
    return None


def unembed_direction(
    model: HookedModel, correct: torch.Tensor, incorrect: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``u[b, d]`` with ``unembed(y)[correct] - unembed(y)[incorrect] = y . u + bias[b]`` (linear readout)."""
    module = _module(model, "unembed")
    d_model = model.hook_shapes["ln_final.hook_in"][-1]
    with torch.no_grad(), model._internal():  # a readout probe: the user's hooks must not run on it
        basis = torch.cat([torch.zeros(1, d_model), torch.eye(d_model)]).to(model.device)
        table = module(basis)  # row 0: bias; rows 1..: W_U
    bias, w_u = table[0], table[1:] - table[0]
    _check_vocab(correct, w_u.shape[1], "correct")
    if incorrect is not None:
        _check_vocab(incorrect, w_u.shape[1], "incorrect")
    u = w_u[:, correct].T - (w_u[:, incorrect].T if incorrect is not None else 0)
    c = bias[correct] - (bias[incorrect] if incorrect is not None else 0)
    return u, c


# ------------------------------------------------------------------------------------------------
# Logit lens
# ------------------------------------------------------------------------------------------------


@dataclass
class LensResult:
    """Logits read from the residual stream after each layer.

    ``logits[layer, batch, pos, vocab]``: row 0 is the embeddings (``resid_pre`` of block 0), row
    ``i + 1`` the residual stream after block ``i``; the last row equals the model's logits.
    """

    logits: torch.Tensor
    labels: list[str]
    str_tokens: list[list[str]] | None
    tokenizer: Any = None

    def probs(self) -> torch.Tensor:
        return self.logits.softmax(-1)

    def table(self, pos: int = -1, batch: int = 0, k: int = 5) -> list[dict[str, Any]]:
        """One row per layer: the top-k tokens and their probabilities at ``pos``."""
        probs = self.probs()[:, batch, pos]
        top = probs.topk(min(k, probs.shape[-1]), dim=-1)
        rows = []
        for label, ids, ps in zip(self.labels, top.indices, top.values, strict=True):
            names = [self._token(int(i)) for i in ids]
            rows.append(
                {
                    "layer": label,
                    **{
                        f"top{j + 1}": f"{n} ({p:.2f})"
                        for j, (n, p) in enumerate(zip(names, ps.tolist(), strict=True))
                    },
                }
            )
        return rows

    def target_probs(self, token: int, pos: int = -1, batch: int = 0) -> torch.Tensor:
        """Probability of ``token`` at ``pos`` after each layer."""
        return self.probs()[:, batch, pos, token]

    def _token(self, i: int) -> str:
        if self.tokenizer is not None:
            return self.tokenizer.convert_ids_to_tokens(i)
        return str(i)


def logit_lens(model: HookedModel, inputs: Any, *, positions: Sequence[int] | None = None) -> LensResult:
    """Apply the model's real final norm and unembedding to the residual stream after every layer.

    ``positions`` restricts the positions kept (default all); the last layer's row equals the logits.
    """
    unembed = _module(model, "unembed")
    norm_module = _module(model, "ln_final")
    n_layers = model.n_layers
    names = ["blocks.0.hook_resid_pre", *[f"blocks.{i}.hook_resid_post" for i in range(n_layers)]]
    prepared = model.prepare(inputs)
    _check_positions(positions, prepared.input_ids.shape[1])
    _, cache = model.run_with_cache(prepared, names=names, stop_early=True)
    stack = torch.stack([cache[n] for n in names])  # [layer, batch, pos, d]
    if positions is not None:
        stack = stack[:, :, list(positions)]
    with torch.no_grad(), model._internal():  # the readout is the unhooked norm and unembedding
        logits = unembed(norm_module(stack))
    labels = ["embed", *[f"L{i}" for i in range(n_layers)]]
    return LensResult(
        logits.float().cpu(), labels, cache.meta.get("str_tokens"), getattr(model, "tokenizer", None)
    )


def _check_positions(positions: Sequence[int] | None, n_pos: int) -> None:
    """InputError for positions that are not ints in ``[-n_pos, n_pos)`` (before any forward)."""
    if positions is None:
        return
    listed = [positions] if hasattr(positions, "__index__") else list(positions)
    bad = [
        p
        for p in listed
        if isinstance(p, bool) or not hasattr(p, "__index__") or not -n_pos <= int(p) < n_pos
    ]
    if bad or not listed:
        raise InputError(
            f"positions {bad[:5] or listed} are not positions of these prompts ({n_pos} tokens); "
            f"pass ints in [-{n_pos}, {n_pos})"
        )


# ------------------------------------------------------------------------------------------------
# Direct logit attribution
# ------------------------------------------------------------------------------------------------


def direct_logit_attribution(
    model: HookedModel,
    inputs: Any,
    correct: Any,
    incorrect: Any = None,
    *,
    by: By = "head",
    pos: int | Sequence[int] | Literal["all"] = -1,
) -> PatchResult:
    """Each component's direct contribution to ``logit[correct] - logit[incorrect]`` at ``pos``.

    Args:
        correct, incorrect: token ids (one, or one per prompt); without ``incorrect``, the plain logit.
            With ``pos="all"`` they may also be ``[batch, pos]``, one per prompt and position.
        by: ``"component"`` (embeddings, each attention and MLP layer, biases: sums to the logit
            difference), ``"layer"`` (attention and MLP per layer), ``"head"`` or ``"neuron"``.
        pos: position read (default each prompt's last real token); ``"all"``: every position, from
            one forward, as a leading ``pos`` dim (prompts of equal length only).

    Returns a ``PatchResult`` (values averaged over prompts); ``extras`` holds the terms not in
    ``values`` (embeddings, biases, and per-layer bias terms for heads/neurons), so
    ``values.sum() + sum(extras.values()) == metric_clean``, the logit difference. With
    ``pos="all"`` the extras and each position's logit difference (``"<pos> logit diff"``) are
    keyed by position label and ``metric_clean`` is their mean.
    """
    _module(model, "unembed")
    prepared = model.prepare(inputs)
    batch = prepared.input_ids.shape[0]
    names = _dla_names(model, by)
    if isinstance(pos, str):
        if pos != "all":
            raise InputError(f"pos must be a position, one per prompt, or 'all'; got {pos!r}")
        if prepared.attention_mask is not None and not bool(prepared.attention_mask.all()):
            raise InputError("pos='all' needs prompts of equal length (no padding); run them one at a time")
        output, cache = model.run_with_cache(prepared, names=names)
        return _dla_every_position(model, by, prepared, output, cache, names, correct, incorrect)
    index = _last_index(pos, prepared.attention_mask, batch)
    _check_positions(index.tolist(), prepared.input_ids.shape[1])
    output, cache = model.run_with_cache(prepared, names=names)
    return _dla_at(model, by, batch, output, cache, names, index, correct, incorrect)


def _dla_at(model, by, batch, output, cache, names, index, correct, incorrect) -> PatchResult:
    """DLA from one run's ``output`` and ``cache``, read at position ``index[b]`` of prompt ``b``."""
    rows = torch.arange(batch)
    at = {
        n: _batched(cache[n], batch)[rows, index.to(cache[n].device)] for n in names
    }  # at the read position
    x = at["ln_final.hook_in"]
    norm = final_norm(model, x)
    good = _token_ids(correct, batch).to(x.device)
    bad = None if incorrect is None else _token_ids(incorrect, batch).to(x.device)
    u, bias = unembed_direction(model, good, bad)
    w_u = u * norm.weight if norm.weight is not None else u
    g = (w_u - w_u.mean(-1, keepdim=True) if norm.centered else w_u) / norm.scale(x)  # [batch, d]
    constant = bias + ((u * norm.bias).sum(-1) if norm.bias is not None else 0)
    parts = _components(model, at, g)
    total = sum(parts.values()) + constant
    _check_decomposition(model, parts, at, x)
    out = output[rows, index.to(output.device)]
    target = out[rows, good] - (out[rows, bad] if bad is not None else 0)
    if (total - target).abs().max() > 1e-3 * (1 + target.abs().max()):
        raise InputError(
            f"the components of {model.name}'s residual stream do not add up to its logits "
            f"(max gap {(total - target).abs().max():.3g}); direct logit attribution needs a pre-LN model "
            "whose residual stream is the sum of embeddings and block outputs"
        )
    parts["bias"] = constant
    with model._internal():  # the per-head/neuron weight readouts are probes, not the analysed run
        return _dla_result(model, by, at, g, parts, float(target.mean()))


def _dla_every_position(model, by, prepared, output, cache, names, correct, incorrect) -> PatchResult:
    """``_dla_at`` at each position of one run, stacked on a leading ``pos`` dim."""
    batch, n_pos = prepared.input_ids.shape

    def at_pos(ids: Any, p: int) -> Any:
        ids = None if ids is None else torch.as_tensor(ids)
        return ids[:, p] if ids is not None and ids.ndim == 2 and ids.shape == (batch, n_pos) else ids

    per_pos = [
        _dla_at(
            model,
            by,
            batch,
            output,
            cache,
            names,
            torch.full((batch,), p),
            at_pos(correct, p),
            at_pos(incorrect, p),
        )
        for p in range(n_pos)
    ]
    tokens = (prepared.str_tokens or [None])[0]
    pos_labels = [f"{p}:{tokens[p]}" if tokens and p < len(tokens) else str(p) for p in range(n_pos)]
    extras = {}
    for label, result in zip(pos_labels, per_pos, strict=True):
        extras |= {f"{label} {k}": v for k, v in result.extras.items()}
        extras[f"{label} logit diff"] = result.metric_clean
    first = per_pos[0]
    values = torch.stack([r.values for r in per_pos])
    labels = {"pos": pos_labels, **first.labels}
    target = sum(r.metric_clean for r in per_pos) / n_pos
    return _result(values, ("pos", *first.dims), labels, target, by, extras)


def _batched(t: torch.Tensor, batch: int) -> torch.Tensor:
    """Broadcast activations computed once for the batch (GPT-2's position embeddings: [1, pos, d])."""
    return t.expand(batch, *t.shape[1:]) if t.shape[0] == 1 else t


def _dla_names(model: HookedModel, by: By) -> list[str]:
    n = model.n_layers
    names = [
        "ln_final.hook_in",
        *[e for e in ("hook_embed", "hook_pos_embed", "hook_token_type_embed") if e in model._sites],
    ]
    names += [f"blocks.{i}.hook_attn_out" for i in range(n)]
    names += [f"blocks.{i}.hook_mlp_out" for i in range(n) if f"blocks.{i}.hook_mlp_out" in model._sites]
    if by == "head":
        names += [f"blocks.{i}.attn.hook_z" for i in range(n)]
    if by == "neuron":
        if "blocks.0.mlp.hook_post" not in model._sites:
            raise InputError(
                f"{model.name} has no MLP neurons (blocks.N.mlp.hook_post); use by='head' or 'layer'"
            )
        names += [f"blocks.{i}.mlp.hook_post" for i in range(n)]
    if by not in ("component", "layer", "head", "neuron"):
        raise InputError(f"by must be 'component', 'layer', 'head' or 'neuron', got {by!r}")
    return names


def _components(model: HookedModel, at: dict[str, torch.Tensor], g: torch.Tensor) -> dict[str, torch.Tensor]:
    """Direct contribution per residual component, ``[batch]`` each, in stream order."""
    parts = {}
    for name in ("hook_embed", "hook_pos_embed", "hook_token_type_embed"):
        if name in at:
            parts[name.removeprefix("hook_")] = (at[name] * g).sum(-1)
    for i in range(model.n_layers):
        parts[f"L{i} attn"] = (at[f"blocks.{i}.hook_attn_out"] * g).sum(-1)
        if f"blocks.{i}.hook_mlp_out" in at:
            parts[f"L{i} mlp"] = (at[f"blocks.{i}.hook_mlp_out"] * g).sum(-1)
    return parts


def _check_decomposition(model: HookedModel, parts, at, x) -> None:
    names = [
        n for n in at if n != "ln_final.hook_in" and ("embed" in n or n.endswith(("attn_out", "mlp_out")))
    ]
    rebuilt = sum(at[n] for n in names)
    if (rebuilt - x).abs().max() > 1e-3 * (1 + x.abs().max()):
        raise InputError(
            f"{model.name}'s final residual stream is not the sum of its embeddings and block outputs (a post-LN "
            "model such as BERT normalizes after each block), so direct logit attribution does not apply. "
            "Use activation patching or ablation instead."
        )


def _linear_readout(module: torch.nn.Module, act: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``grad_act (module(act) . g)``: each input coordinate's weight in the direct contribution.

    ``module`` is linear (an output projection), so this is ``W g``, exact and independent of ``act``.
    """
    probe = act.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad((module(probe) * g).sum(), probe)
    return grad


def _dla_result(model, by, at, g, parts, target) -> PatchResult:
    n = model.n_layers
    layer_labels = [f"L{i}" for i in range(n)]
    mean = {k: float(v.mean()) for k, v in parts.items()}
    if by == "component":
        labels = list(mean)
        values = torch.tensor([mean[k] for k in labels])
        return _result(values, ("component",), {"component": labels}, target, by, {})
    if by == "layer":
        kinds = ["attn", "mlp"] if "L0 mlp" in mean else ["attn"]
        values = torch.tensor([[mean[f"L{i} {k}"] for k in kinds] for i in range(n)])
        extras = {k: v for k, v in mean.items() if not k.startswith("L")}
        return _result(
            values, ("layer", "sublayer"), {"layer": layer_labels, "sublayer": kinds}, target, by, extras
        )
    extras = {k: v for k, v in mean.items() if not k.startswith("L")}
    if by == "head":
        heads = n_heads(model)
        rows = []
        for i in range(n):
            z = unit_view(at[f"blocks.{i}.attn.hook_z"][:, None], heads)[:, 0]  # [batch, head, d_head]
            proj = component(model, f"blocks.{i}.attn.o")
            weight = unit_view(_linear_readout(proj, rearrange(z, "b h d -> b (h d)"), g)[:, None], heads)[
                :, 0
            ]
            per_head = einsum(z, weight, "b h d, b h d -> b h")
            _check_units_add_up(parts[f"L{i} attn"], per_head, proj, g, f"blocks.{i}.attn.o", z[0].numel())
            rows.append(per_head.mean(0))
            extras[f"L{i} attn bias"] = mean[f"L{i} attn"] - float(per_head.sum(-1).mean())
            extras |= {f"L{i} mlp": mean[f"L{i} mlp"]} if f"L{i} mlp" in mean else {}
        labels = {"layer": layer_labels, "head": [f"H{h}" for h in range(heads)]}
        return _result(torch.stack(rows).float().cpu(), ("layer", "head"), labels, target, by, extras)
    rows = []
    for i in range(n):
        post = at[f"blocks.{i}.mlp.hook_post"]
        proj = component(model, f"blocks.{i}.mlp.out")
        per_neuron = post * _linear_readout(proj, post, g)
        _check_units_add_up(parts[f"L{i} mlp"], per_neuron, proj, g, f"blocks.{i}.mlp.out", post.shape[-1])
        rows.append(per_neuron.mean(0))
        extras[f"L{i} mlp bias"] = mean[f"L{i} mlp"] - float(per_neuron.sum(-1).mean())
        extras[f"L{i} attn"] = mean[f"L{i} attn"]
    labels = {"layer": layer_labels, "neuron": [f"N{j}" for j in range(rows[0].shape[-1])]}
    return _result(torch.stack(rows).float().cpu(), ("layer", "neuron"), labels, target, by, extras)


def _check_units_add_up(total, per_unit, proj, g, path: str, width: int) -> None:
    """Heads (or neurons) plus the projection's bias term must give the sublayer's direct contribution.

    They do whenever the output projection ``path`` (input width ``width``) is what carries the units
    into the stream; a hook that changes it (on ``{path}.hook_in`` or ``.hook_out``) makes the split
    undefined, so refuse rather than let the bias term absorb the difference.
    """
    with torch.no_grad():
        bias_term = (proj(torch.zeros(1, width, device=g.device, dtype=g.dtype)) * g).sum(-1)
    gap = (total - per_unit.sum(-1) - bias_term).abs().max()
    if gap > 1e-3 * (1 + total.abs().max()):
        raise InputError(
            f"the units of {path} do not add up to the sublayer's direct contribution (gap {gap:.3g}): "
            f"something between them and the residual stream changes it, such as a hook on {path}.hook_in "
            f"or {path}.hook_out. Hook the units themselves (hook_z, mlp.hook_post) or use by='layer'."
        )


def _result(values, dims, labels, target, by, extras) -> PatchResult:
    return PatchResult(
        values.detach().float().cpu(),
        dims,
        labels,
        metric_clean=target,
        method="direct logit attribution",
        site=by,
        metric="logit diff",
        extras=extras,
    )
