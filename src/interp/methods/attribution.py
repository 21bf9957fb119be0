"""Input attribution: which pixels or tokens drive one output, by four methods with one result type.

    >>> a = attribute(model, images, target=3, method="ig")          # pixels of an image model
    >>> a.values.shape, a.delta                                        # [B, 1, 8, 8], IG's error
    >>> a = attribute(lm, "The cat sat on the", method="saliency")    # tokens of a transformer
    >>> a.values.shape                                                 # [B, pos]

Methods (all attribute one scalar per example: ``target`` picks it from the output):

* ``"saliency"``: |d out / d x| (Simonyan et al. 2014), through captum's ``Saliency``.
* ``"grad_x_input"``: x * d out / d x, through captum's ``InputXGradient``.
* ``"occlusion"``: out(x) - out(x with a window set to the baseline), captum's ``Occlusion``.
* ``"ig"``: integrated gradients (Sundararajan et al. 2017) with captum's Gauss-Legendre rule,
  computed here *streamed*: a few interpolation steps per forward, gradients summed as they come,
  so memory holds ``internal_batch_size`` steps instead of all ``n_steps`` x batch (captum's
  default, the cause of its OOM reports). ``delta`` = sum(attributions) - (out(x) - out(baseline)),
  the completeness error, per example.

Image models are attributed per pixel. Transformers are attributed per token through the
embedding: the word embeddings (hook ``hook_embed``) are replaced by the tensor being attributed,
so IG interpolates embeddings, occlusion replaces one token's embedding by the baseline's, and each
token's score is the sum (saliency: L2 norm) over the embedding dimension.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from einops import rearrange, reduce, repeat

from interp.errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    import plotly.graph_objects as go

    from interp.models.base import HookedModel

METHODS = ("saliency", "ig", "grad_x_input", "occlusion")
EMBED_HOOK = "hook_embed"
Target = int | Sequence[int] | torch.Tensor | None


@dataclass
class Attribution:
    """Attributions of one scalar output per example, captum style.

    Attributes:
        values: image models ``[B, *input_shape]`` (per pixel); transformers ``[B, pos]`` (per
            token; padding positions are 0).
        method: one of ``METHODS``.
        target: ``[B]`` output index attributed for each example.
        delta: ``[B]`` IG completeness error ``sum(values) - (f(x) - f(baseline))``; None otherwise.
        inputs: the images, or the token ids ``[B, pos]``.
        baseline: the baseline (images, or embeddings ``[B, pos, d_model]``), None for saliency.
        output: ``[B]`` the attributed scalar ``f(x)``.
        str_tokens: token strings per example (transformers).
        per_dim: transformers: attributions per embedding dimension ``[B, pos, d_model]``.
        config: method settings (n_steps, window, ...), recorded for reports.
    """

    values: torch.Tensor
    method: str
    target: torch.Tensor
    delta: torch.Tensor | None
    inputs: torch.Tensor
    baseline: torch.Tensor | None
    output: torch.Tensor
    str_tokens: list[list[str]] | None = None
    per_dim: torch.Tensor | None = None
    config: dict[str, Any] = field(default_factory=dict)

    def figure(self, index: int = 0) -> go.Figure:
        """Image models: the input beside its attribution map; transformers: a bar per token."""
        from interp.methods.featureviz import image_grid_figure

        title = f"{self.method} attribution, target {int(self.target[index])}"
        if self.str_tokens is None:
            image = self.inputs[index]
            panels = [image.mean(0), self.values[index].sum(0)]
            return image_grid_figure(panels, ["input", title], diverging=[False, True])
        import plotly.graph_objects as go

        tokens = self.str_tokens[index]
        values = self.values[index, : len(tokens)].tolist()
        labels = [f"{i}:{t}" for i, t in enumerate(tokens)]
        fig = go.Figure(
            go.Bar(x=labels, y=values, marker_color=["#d62728" if v < 0 else "#1f77b4" for v in values])
        )
        fig.update_layout(title=title, xaxis_title="token", yaxis_title="attribution", height=360)
        return fig

    def html(self, index: int = 0) -> str:
        """Transformers: circuitsvis colored tokens (self-contained HTML, script inlined)."""
        if self.str_tokens is None:
            raise InputError("html() shows token attributions; this is an image model, use figure()")
        from circuitsvis.tokens import colored_tokens

        tokens = self.str_tokens[index]
        values = self.values[index, : len(tokens)].float()
        bound = float(values.abs().max().clamp_min(1e-12))
        return colored_tokens(tokens, values.tolist(), min_value=-bound, max_value=bound).local_src


# ------------------------------------------------------------------------------------------------
# Public API
# ------------------------------------------------------------------------------------------------


def attribute(
    model: HookedModel,
    inputs: Any,
    target: Target = None,
    method: str = "ig",
    baseline: Any = None,
    *,
    n_steps: int = 50,
    internal_batch_size: int | None = None,
    window: Sequence[int] | None = None,
    position: int | None = None,
) -> Attribution:
    """Attribute ``model``'s output for ``target`` to the input pixels or tokens.

    Args:
        model: an image model (``ModuleModel``) or a transformer (needs ``hook_embed``).
        inputs: an image batch ``[B, *input_shape]`` (or one image), or text / token ids.
        target: the output index per example (an int for all, or one per example). Image models:
            a class logit. Transformers: an index into the last output axis (a vocabulary logit, or a
            hidden unit for encoders) at ``position``. None: each example's argmax.
        method: ``"ig"``, ``"saliency"``, ``"grad_x_input"`` or ``"occlusion"``.
        baseline: IG's starting point / occlusion's fill. Images: a number or a tensor broadcastable
            to the input (default 0). Transformers: None (zero embeddings), a token id (its
            embedding at every position), or an embedding tensor.
        n_steps: IG's number of Gauss-Legendre points.
        internal_batch_size: IG: examples x steps per forward (default: 8 steps at a time).
        window: occlusion window over one example (images default ``(C, 2, 2)``, stride 1;
            transformers always one token).
        position: transformers: the output position attributed (default: each example's last
            real token).
    """
    if method not in METHODS:
        raise InputError(f"unknown attribution method {method!r}; choose one of {', '.join(METHODS)}")
    if not isinstance(n_steps, int) or n_steps < 1:
        raise InputError(f"n_steps must be a positive integer, got {n_steps!r}")
    space = (
        _image_space(model, inputs, baseline)
        if model.kind != "transformer"
        else _token_space(model, inputs, baseline, position)
    )
    with torch.no_grad():
        out = space.forward(space.x, *space.extra)
    targets = _targets(target, out, space.x.shape[0])
    extra = (*space.extra, targets)
    config: dict[str, Any] = {"method": method}
    delta = None
    if method == "ig":
        chunk = _steps_per_chunk(internal_batch_size, space.x.shape[0], n_steps)
        values, delta = integrated_gradients(space.forward, space.x, space.baseline, extra, n_steps, chunk)
        config.update(n_steps=n_steps, rule="gausslegendre", steps_per_forward=chunk)
    else:
        values, extra_config = _captum(method, space, extra, window)
        config.update(extra_config)
    scalar = _select(out, targets)
    return space.finish(values.detach(), method, targets, delta, scalar, config)


def integrated_gradients(
    forward: Callable[..., torch.Tensor],
    x: torch.Tensor,
    baseline: torch.Tensor,
    extra: tuple[torch.Tensor, ...],
    n_steps: int,
    steps_per_chunk: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """IG with the Gauss-Legendre rule, ``steps_per_chunk`` interpolation steps per forward.

    ``forward(x_batch, *extra_batch) -> [N]`` (one scalar per row); the per-example tensors in
    ``extra`` are repeated alongside. Returns ``(attributions, delta)``, delta per example. The
    gradient sum is accumulated in float64 so chunking does not change the result.
    """
    alphas, weights = _gauss_legendre(n_steps)
    diff = x - baseline
    total = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
    for start in range(0, n_steps, steps_per_chunk):
        a = alphas[start : start + steps_per_chunk].to(x)
        w = weights[start : start + steps_per_chunk].to(torch.float64)
        shape = (-1,) + (1,) * x.ndim
        points = rearrange(baseline + a.view(shape) * diff, "s b ... -> (s b) ...").requires_grad_(True)
        rows = [repeat(e, "b ... -> (s b) ...", s=len(a)) for e in extra]
        with torch.enable_grad():
            (grads,) = torch.autograd.grad(forward(points, *rows).sum(), points)
        grads = rearrange(grads, "(s b) ... -> s b ...", s=len(a)).to(torch.float64)
        total += torch.einsum("s,s...->...", w, grads)
    attributions = (total * diff.to(torch.float64)).to(x.dtype)
    with torch.no_grad():
        gap = forward(x, *extra) - forward(baseline, *extra)
    delta = reduce(attributions.double(), "b ... -> b", "sum") - gap.double()
    return attributions, delta


def randomized(model: HookedModel, modules: Sequence[str] | None = None, seed: int = 0) -> HookedModel:
    """A copy of ``model`` whose ``modules`` (paths; default all) are re-initialized, seeded.

    The model-randomization sanity check (Adebayo et al. 2018): an attribution method that explains
    the model must give different maps for the randomized copy.
    """
    clone = copy.deepcopy(model)
    chosen = dict(clone.module.named_modules())
    names = list(modules) if modules is not None else [n for n in chosen if n]
    unknown = [n for n in names if n not in chosen]
    if unknown:
        raise InputError(f"no module named {unknown[0]!r}; modules: {', '.join(n for n in chosen if n)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name in names:
            if hasattr(chosen[name], "reset_parameters"):
                chosen[name].reset_parameters()
    return clone


# ------------------------------------------------------------------------------------------------
# Input spaces: what is attributed, and the forward from it to one scalar per row
# ------------------------------------------------------------------------------------------------


@dataclass
class _Space:
    """``x`` is attributed; ``forward(x_rows, *extra_rows, target_rows) -> [N]``."""

    x: torch.Tensor
    baseline: torch.Tensor
    forward: Callable[..., torch.Tensor]
    extra: tuple[torch.Tensor, ...]
    finish: Callable[..., Attribution]
    window: tuple[int, ...]
    stride: tuple[int, ...]
    window_free: bool = True  # False: the occlusion window is fixed (one token)


def _image_space(model: HookedModel, inputs: Any, baseline: Any) -> _Space:
    x = model.prepare(inputs).detach()
    base = _check_baseline(baseline, x)

    def forward(rows: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        out = model._forward(rows)
        return out if targets is None else _select(out, targets)

    def finish(values, method, targets, delta, scalar, config) -> Attribution:
        kept = None if method == "saliency" else base
        return Attribution(values, method, targets, delta, x, kept, scalar, config=config)

    window = (x.shape[1], *([2] * (x.ndim - 2)))
    return _Space(x, base, forward, (), finish, window, (x.shape[1], *([1] * (x.ndim - 2))))


def _token_space(model: HookedModel, inputs: Any, baseline: Any, position: int | None) -> _Space:
    if EMBED_HOOK not in model.hook_names:
        raise InputError(f"{model.name} has no {EMBED_HOOK!r} hook, so its tokens cannot be attributed")
    tokens = model.prepare(inputs)
    ids = tokens.input_ids
    mask = tokens.attention_mask if tokens.attention_mask is not None else torch.ones_like(ids)
    mask = mask.to(ids.device)
    pos = _positions(mask, position)
    embed = _embed(model, ids, mask)
    if isinstance(baseline, int) and not isinstance(baseline, bool):
        base = _embed(model, torch.full_like(ids, baseline), mask)
    else:
        base = _check_baseline(baseline, embed)

    def forward(rows, ids_rows, mask_rows, pos_rows, targets=None) -> torch.Tensor:
        from interp.models.transformer import Tokens

        with model.hooks([(EMBED_HOOK, lambda act, hook: rows)]):
            out = model._forward(Tokens(ids_rows, mask_rows))
        picked = out[torch.arange(out.shape[0], device=out.device), pos_rows]
        return picked if targets is None else _select(picked, targets)

    def finish(values, method, targets, delta, scalar, config) -> Attribution:
        # saliency: gradient norm; occlusion: every dim of a token carries the token's output drop
        per_token = {"saliency": values.norm(dim=-1), "occlusion": values.mean(-1)}.get(
            method, values.sum(-1)
        )
        per_token = per_token * mask
        strs = tokens.str_tokens or _str_tokens(model, ids, mask)
        kept = None if method == "saliency" else base
        config = {**config, "position": pos.tolist(), "embedding": EMBED_HOOK}
        return Attribution(per_token, method, targets, delta, ids, kept, scalar, strs, values, config)

    d = embed.shape[-1]
    return _Space(embed, base, forward, (ids, mask, pos), finish, (1, d), (1, d), window_free=False)


def _embed(model: HookedModel, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    from interp.models.transformer import Tokens

    _, cache = model.run_with_cache(Tokens(ids, mask), names=EMBED_HOOK, stop_early=True)
    return cache[EMBED_HOOK].detach()


def _str_tokens(model: HookedModel, ids: torch.Tensor, mask: torch.Tensor) -> list[list[str]]:
    """Token strings of the real tokens (ids as text when the model has no tokenizer)."""
    tok = getattr(model, "tokenizer", None)
    rows = [row[m.bool()] for row, m in zip(ids, mask, strict=True)]
    return [tok.convert_ids_to_tokens(r) if tok is not None else [str(int(i)) for i in r] for r in rows]


def _positions(mask: torch.Tensor, position: int | None) -> torch.Tensor:
    last = mask.sum(-1).long() - 1
    if position is None:
        return last
    if not -mask.shape[1] <= position < mask.shape[1]:
        raise InputError(f"position {position} is out of range for {mask.shape[1]} tokens")
    return torch.full_like(last, position % mask.shape[1])


def _check_baseline(baseline: Any, x: torch.Tensor) -> torch.Tensor:
    """Baseline as a tensor shaped like ``x``: finite and broadcastable, else an InputError."""
    if baseline is None:
        return torch.zeros_like(x)
    base = torch.as_tensor(np.asarray(baseline) if not isinstance(baseline, torch.Tensor) else baseline)
    base = base.to(x.device, x.dtype)
    if not torch.isfinite(base).all():
        raise InputError("the baseline contains NaN or infinite values; give a finite baseline (e.g. zeros)")
    try:
        return torch.broadcast_to(base, x.shape).clone()
    except RuntimeError:
        raise InputError(
            f"the baseline has shape {tuple(base.shape)}, which does not broadcast to the input's "
            f"{tuple(x.shape)}; give a number, one example's shape or the batch's shape"
        ) from None


def _targets(target: Target, out: torch.Tensor, batch: int) -> torch.Tensor:
    """Per-example output indices, checked against the output's last axis."""
    size = out.shape[-1]
    if target is None:
        return out.argmax(-1)
    t = torch.as_tensor(target).long().to(out.device).flatten()
    if t.numel() == 1:
        t = t.expand(batch).clone()
    if t.numel() != batch:
        raise InputError(
            f"target has {t.numel()} entries for {batch} examples; give one int or one per example"
        )
    bad = t[(t < 0) | (t >= size)]
    if bad.numel():
        raise InputError(
            f"target index {int(bad[0])} is out of range: the output has {size} units (0-{size - 1})"
        )
    return t


def _select(out: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return out.gather(-1, targets.view(-1, 1)).squeeze(-1)


def _steps_per_chunk(internal_batch_size: int | None, batch: int, n_steps: int) -> int:
    if internal_batch_size is None:
        return min(n_steps, 8)
    if internal_batch_size < 1:
        raise InputError(f"internal_batch_size must be positive, got {internal_batch_size}")
    return max(1, min(n_steps, internal_batch_size // batch))


def _gauss_legendre(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Points in [0, 1] and weights summing to 1 (captum's ``gausslegendre`` rule)."""
    nodes, weights = np.polynomial.legendre.leggauss(n)
    return torch.tensor(0.5 * (nodes + 1)), torch.tensor(0.5 * weights)


def _captum(
    method: str, space: _Space, extra: tuple[torch.Tensor, ...], window: Sequence[int] | None
) -> tuple[torch.Tensor, dict[str, Any]]:
    from captum.attr import InputXGradient, Occlusion, Saliency

    x = space.x.clone().requires_grad_(method != "occlusion")
    if method == "saliency":
        return Saliency(space.forward).attribute(x, additional_forward_args=extra, abs=True), {}
    if method == "grad_x_input":
        return InputXGradient(space.forward).attribute(x, additional_forward_args=extra), {}
    shape = tuple(window) if window is not None and space.window_free else space.window
    if len(shape) != x.ndim - 1 or any(w < 1 or w > s for w, s in zip(shape, x.shape[1:], strict=True)):
        raise InputError(
            f"occlusion window {shape} must have one size in 1..n per input axis {tuple(x.shape[1:])}"
        )
    with torch.no_grad():
        values = Occlusion(space.forward).attribute(
            x,
            sliding_window_shapes=shape,
            strides=space.stride,
            baselines=space.baseline,
            additional_forward_args=extra,
            perturbations_per_eval=16,
        )
    return values, {"window": list(shape), "stride": list(space.stride)}
