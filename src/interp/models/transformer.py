"""Transformers as ``HookedModel``s, with TransformerLens hook names.

Two backends share the tokenization and the names:

* ``HFTransformer`` runs the **plain Hugging Face model**. TransformerLens 4.x's architecture adapter
  tells us which HF module is ``blocks.3.attn``, ``blocks.3.mlp.out`` and so on; we put forward
  hooks on those modules, and a registered attention function exposes ``hook_q/k/v``,
  ``hook_attn_scores``, ``hook_pattern`` and ``hook_z``. The bridge's own forward costs ~2.5x the
  HF forward on CPU; this path costs the HF forward plus the hooks you attach.
* ``NativeTransformer`` wraps a ``TransformerBridge.boot_native`` toy model; its hook names are the
  bridge's ``hook_dict`` names that fire.

On both, a name TransformerLens uses carries what the bridge's hook of that name carries on the
same weights, in its layout: q/k/v/z are ``[batch, pos, head, d_head]`` (views of the flat
projections, see ``_View``), aliases come from TL's own alias tables, and every attention layer has
``attn.hook_result`` (``[batch, pos, head, d_model]``, computed only when hooked). Tested name by
name against the bridge in tests/test_tl_parity.py. One deliberate difference: where TL's bridge
fires ``hook_attn_scores`` with the softmaxed pattern (its generic attention, e.g. BERT's, and
native models), interp carries the pre-softmax scores TL documents, as its GPT-2 bridge does.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any
from weakref import WeakKeyDictionary

import torch
from einops import einsum, rearrange
from torch import nn

from interp.errors import InputError
from interp.hooks import (
    HookPoint,
    HookSite,
    _first_tensor,
    _replace_first,
    attached,
    heads_first,
    heads_last,
    layer_of,
)
from interp.models.base import HookedModel, TilingPlan
from interp.models.lm import LanguageModelMixin, _positions
from interp.models.tracing import trace_sites
from interp.models.weights import WeightsMixin

ATTENTION_IMPLEMENTATION = "interp"
ATTENTION_POINTS = ("hook_q", "hook_k", "hook_v", "hook_attn_scores", "hook_pattern", "hook_z")
_PROBE_LEN = 13  # a prime unlikely to equal any model dimension; marks the "pos" axis in traces


# (residual streams to stack before a branch, the branch's input hooks, substrings naming hooks inside it)
_BRANCHES = (
    (("hook_resid_pre",), ("ln1.hook_in", "attn.hook_in"), (".attn.", "hook_attn_out")),
    (("hook_resid_mid", "hook_resid_pre"), ("ln2.hook_in", "mlp.hook_in"), (".mlp.", "hook_mlp_out")),
)


# inside attention, what else must be stacked with a patched q/k/v/pattern for the copies to meet again
_ATTENTION_SIBLINGS = {
    "hook_q": ("hook_k", "hook_v"),
    "hook_k": ("hook_q", "hook_v"),
    "hook_v": ("hook_pattern",),
    "hook_pattern": ("hook_v",),
}


def _siblings(name: str) -> list[str]:
    """``blocks.L.attn.hook_q`` -> ``[blocks.L.attn.hook_k, blocks.L.attn.hook_v]`` (see ``tiling_plans``)."""
    stem, _, point = name.rpartition(".")
    return [f"{stem}.{other}" for other in _ATTENTION_SIBLINGS.get(point, ())] if ".attn." in name else []


def _residual_identities(
    block: str, values: dict[str, torch.Tensor]
) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """``(alias checked, left side, right side)`` of a pre-LN block's residual identities, where present."""
    pre, attn, mid, mlp, post = (
        values.get(f"{block}.{p}")
        for p in ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post")
    )
    checks = []
    if pre is not None and attn is not None and mid is not None:
        checks.append((f"{block}.hook_attn_out", pre + attn, mid))
    if mid is not None and mlp is not None and post is not None:
        checks.append((f"{block}.hook_mlp_out", mid + mlp, post))
    if mid is None and None not in (pre, attn, mlp, post):
        checks += [
            (f"{block}.hook_attn_out", pre + attn + mlp, post),
            (f"{block}.hook_mlp_out", pre + attn + mlp, post),
        ]
    return checks


@dataclass
class Tokens:
    """Token ids and the attention mask (1 = real token), both ``[batch, pos]``."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None = None
    str_tokens: list[list[str]] | None = None


class TransformerModel(LanguageModelMixin, WeightsMixin, HookedModel):
    """Shared input handling: text or token ids in, ``Tokens`` out, with length checks; the
    language-model surface (tokens, loss, generate) comes from ``LanguageModelMixin``."""

    kind = "transformer"
    tokenizer: Any = None
    n_ctx: int | None = None
    d_vocab: int | None = None

    def _tokenize(self, text: str | Sequence[str]) -> Tokens:
        """Tokenize text (a string or a batch of strings, right-padded) with the tokenizer's own
        special tokens, as ``prepare`` does (``to_tokens`` is TransformerLens's convention)."""
        if self.tokenizer is None:
            raise InputError(
                f"{self.name} has no tokenizer, so it cannot read text. Pass token ids instead: "
                "a LongTensor of shape (batch, pos)."
            )
        texts = [text] if isinstance(text, str) else list(text)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise InputError("text input must be a non-empty string or a list of strings")
        encoded = self.tokenizer(texts, return_tensors="pt", padding=True)
        ids, mask = encoded["input_ids"], encoded["attention_mask"]
        str_tokens = [
            self.tokenizer.convert_ids_to_tokens(row[m.bool()]) for row, m in zip(ids, mask, strict=True)
        ]
        return Tokens(ids, mask, str_tokens)

    def prepare(self, inputs: Any) -> Tokens:
        if inputs is None or (isinstance(inputs, list | tuple) and not inputs):
            raise InputError(
                f"{self.name} got no input ({inputs!r}); pass text, a list of texts, or token ids "
                "(a LongTensor of shape (batch, pos))"
            )
        if isinstance(inputs, Tokens):
            tokens = inputs
        elif isinstance(inputs, str) or (
            isinstance(inputs, list | tuple) and inputs and isinstance(inputs[0], str)
        ):
            tokens = self._tokenize(inputs)
        elif isinstance(inputs, dict) or hasattr(inputs, "keys"):
            tokens = Tokens(torch.as_tensor(inputs["input_ids"]), _maybe_tensor(inputs.get("attention_mask")))
        else:
            try:
                ids = torch.as_tensor(inputs)
            except (TypeError, ValueError, RuntimeError) as err:
                raise InputError(
                    f"{self.name} cannot read a {type(inputs).__name__} as token ids ({err}); pass text or a "
                    "LongTensor of shape (batch, pos)"
                ) from None
            tokens = Tokens(ids.unsqueeze(0) if ids.ndim == 1 else ids)
        return self._check_tokens(tokens)

    def tile_input(self, prepared: Tokens, copies: int) -> Tokens:
        """``copies`` stacked copies of the token ids and mask: row ``k * batch + b`` is prompt ``b``."""
        mask = None if prepared.attention_mask is None else prepared.attention_mask.repeat(copies, 1)
        return Tokens(prepared.input_ids.repeat(copies, 1), mask, None)

    @cached_property
    def _write_through(self) -> dict[str, str]:
        sites, out = self._sites, {}
        order = {name: i for i, name in enumerate(sites)}
        for i in range(getattr(self, "n_layers", 0) or 0):
            mid, ln2, post, mlp = (
                f"blocks.{i}.{n}"
                for n in ("hook_resid_mid", "ln2.hook_in", "hook_resid_post", "hook_mlp_out")
            )
            if mid not in sites or ln2 not in sites or post not in sites:
                continue
            # post-LN (BERT): ln2 reads the whole sum after the MLP, so nothing bypasses the hook
            pre_ln = order[mid] < order.get(mlp, len(order))
            if sites[mid].module is sites[ln2].module and pre_ln:
                out[mid] = post
        return out

    def tiling_plans(self, name: str) -> list[TilingPlan]:
        """For a hook in block L: one plan that shares more than stacking at the hook, one that shares less.

        1. Inside the attention (or MLP) branch: stack the copies on the residual stream entering
           the branch, keep one copy at the branch input (``ln1``/``attn`` ``.hook_in``), and stack
           again at ``name``. The branch up to ``name`` runs once and the residual add after it sees
           every copy; on a head sweep this skips every copy's q/k/v projections and attention
           pattern. When ``name`` is q, k, v or the pattern, this needs attention code that
           broadcasts one copy against stacked ones (the suffix route's, on native bridges); the
           next plan also stacks the tensors it meets downstream (q with k and v; v with the pattern). The stream is ``hook_resid_pre`` for attention; for the MLP it is
           ``hook_resid_mid``, or ``hook_resid_pre`` where ``hook_resid_mid`` is only the MLP's input.
        2. After the plain plan (which fails inside a branch unless the batch is one prompt): stack
           at the residual stream entering block L, so blocks < L run once.
        """
        layer = layer_of(name)
        if layer is None:
            return super().tiling_plans(name)
        order = {hook: i for i, hook in enumerate(self.hook_names)}
        plans: list[TilingPlan] = []
        for streams, inputs, markers in _BRANCHES:
            if not any(marker in name for marker in markers):
                continue
            for stream in (f"blocks.{layer}.{hook}" for hook in streams if f"blocks.{layer}.{hook}" in order):
                candidates = [f"blocks.{layer}.{hook}" for hook in inputs]
                branch_in = [h for h in candidates if order[stream] < order.get(h, -1) < order[name]]
                if branch_in:
                    plans.append(((stream, "tile"), (branch_in[0], "untile"), (name, "tile")))
                    siblings = tuple((h, "tile") for h in _siblings(name) if h in order)
                    if siblings:
                        plans.append(((stream, "tile"), (branch_in[0], "untile"), *siblings, (name, "tile")))
        plans += super().tiling_plans(name)  # exact where nothing batch-shaped is reused after name
        entry = f"blocks.{layer}.hook_resid_pre"
        if entry != name and order.get(entry, len(order)) < order[name]:
            plans.append(((entry, "tile"),))
        return plans

    def _check_tokens(self, tokens: Tokens) -> Tokens:
        ids = tokens.input_ids
        if ids.ndim != 2 or ids.dtype not in (torch.int64, torch.int32):
            raise InputError(
                f"token ids must be an integer tensor of shape (batch, pos), got {ids.dtype} {tuple(ids.shape)}"
            )
        if ids.numel() == 0:
            raise InputError(
                f"token ids of shape {tuple(ids.shape)} hold no tokens; pass at least one token per prompt"
            )
        mask = tokens.attention_mask
        if mask is not None and tuple(mask.shape) != tuple(ids.shape):
            raise InputError(
                f"attention_mask has shape {tuple(mask.shape)} but the token ids have {tuple(ids.shape)}; "
                "pass one mask entry (1 = real token, 0 = padding) per token"
            )
        if mask is not None and not bool((mask != 0).any(-1).all()):
            empty = (~(mask != 0).any(-1)).nonzero().flatten().tolist()
            raise InputError(f"prompt(s) {empty[:5]} have no real token (attention_mask all 0); drop them")
        if self.n_ctx is not None and ids.shape[1] > self.n_ctx:
            raise InputError(
                f"the input has {ids.shape[1]} tokens but {self.name} takes at most {self.n_ctx} "
                f"(its context length). Shorten the prompt or split it into windows of {self.n_ctx}."
            )
        if self.d_vocab is not None and ids.numel() and (ids.min() < 0 or ids.max() >= self.d_vocab):
            raise InputError(
                f"token ids must lie in [0, {self.d_vocab}) for {self.name}; got [{ids.min().item()}, {ids.max().item()}]"
            )
        return Tokens(ids.to(self.device).long(), tokens.attention_mask, tokens.str_tokens)

    def dim_sizes(self, prepared: Tokens) -> dict[str, int]:
        batch, pos = prepared.input_ids.shape
        return {"batch": batch, "pos": pos}

    def _cache_meta(self, prepared: Tokens) -> dict[str, Any]:
        return {
            "model": self.name,
            "input_ids": prepared.input_ids.cpu(),
            "attention_mask": None if prepared.attention_mask is None else prepared.attention_mask.cpu(),
            "str_tokens": prepared.str_tokens or self._id_names(prepared),
        }

    def _probe_tokens(self) -> Tokens:
        length = min(_PROBE_LEN, self.n_ctx or _PROBE_LEN)
        return Tokens(torch.arange(1, length + 1, device=self.device).unsqueeze(0) % (self.d_vocab or 2))


def left_padded_positions(mask: torch.Tensor | None) -> torch.Tensor | None:
    """Position ids that start at 0 on each row's first real token, for a left-padded batch (else None).

    HF models number positions 0, 1, ... from the left edge unless told otherwise, so without these a
    left-padded row is read at shifted positions (up to 0.22 in a tiny GPT-2's logits), unlike the
    same prompt alone. Pads get position 0; the mask hides them anyway.
    """
    if mask is None or bool(mask[:, 0].bool().all()):
        return None
    return _positions(mask)


def _maybe_tensor(value: Any) -> torch.Tensor | None:
    return None if value is None else torch.as_tensor(value)


# ------------------------------------------------------------------------------------------------
# Views: hook points that show TransformerLens's layout of a tensor, computed only when hooked
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _View:
    """A hook point showing a tensor that flows through ``target`` in TransformerLens's layout.

    ``q``/``k``/``v``/``z`` flow flat (``[batch, pos, head * d_head]``) through the projections;
    TL's hooks of those names carry ``[batch, pos, head, d_head]``. Users hook ``point``; while it
    has hooks, a hook on ``target`` shows ``to_view(act)`` to ``point`` and sends ``from_view`` of
    what comes back on (see ``_ViewPoint``). Unhooked forwards pay nothing.
    """

    point: HookPoint
    target: HookSite
    to_view: Callable[[torch.Tensor], torch.Tensor]
    from_view: Callable[[torch.Tensor], torch.Tensor]

    def attach(self) -> torch.utils.hooks.RemovableHandle:
        def show(act: torch.Tensor) -> torch.Tensor:
            # always sent on (a reshape), so the forward runs through the view and gradients of a
            # metric with respect to the captured view are its gradients in the model
            return self.from_view(self.point(self.to_view(act)))

        return attached_first(self.target, show)


@dataclass(frozen=True)
class _HeadResults:
    """``blocks.L.attn.hook_result``: each head's output ``z_h @ W_O[h]``, ``[batch, pos, head, d_model]``.

    As in TransformerLens (``use_attn_result``): per head, before the sum over heads and without
    ``b_O``. It is computed from the output projection's input only while ``point`` is hooked, so
    other forwards cost nothing; if a hook replaces it, the projection's output becomes
    ``sum_h result[h] + b_O`` (up to rounding), so patching a head's result changes the attention
    output as in TL.
    """

    point: HookPoint
    proj: nn.Module  # the attention output projection: nn.Linear, or HF's Conv1D (weight [in, out])
    n_heads: int

    def per_head_weight(self) -> torch.Tensor:
        """``W_O`` as ``[head, d_head, d_model]`` (loaded for the call when accelerate offloaded it)."""
        weight = self.proj.weight
        if weight.device.type == "meta":  # disk / CPU offload: only a placeholder between forwards
            from accelerate.utils import align_module_device

            with align_module_device(self.proj):
                weight = self.proj.weight.detach().clone()  # outlives the block (no gradient to W_O)
        if type(self.proj).__name__ == "Conv1D":
            return rearrange(weight, "(h d) m -> h d m", h=self.n_heads)
        return rearrange(weight, "m (h d) -> h d m", h=self.n_heads)

    def attach(self) -> torch.utils.hooks.RemovableHandle:
        def result(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            z = args[0] if args else next(iter(kwargs.values()))
            heads = rearrange(z, "b p (h d) -> b p h d", h=self.n_heads)
            per_head = einsum(heads, self.per_head_weight(), "b p h d, h d m -> b p h m")
            new = self.point(per_head)
            if new is per_head and not torch.is_grad_enabled():
                return None  # only read: the projection's output stands
            # out + sum_h (new_h - result_h): exactly the projection's output while the results are
            # only read (the change is exactly zero), sum_h new_h + b_O once replaced, and in both
            # cases a graph through the results, so their gradients are the model's
            out = _first_tensor(output)
            return _replace_first(output, out + (new - per_head).sum(dim=-2).to(out.dtype))

        return self.proj.register_forward_hook(result, with_kwargs=True, prepend=True)


class _NormInternals:
    """``X.hook_scale`` ``[batch, pos, 1]`` and ``X.hook_normalized`` ``[batch, pos, d_model]`` of a
    LayerNorm or RMSNorm ``X`` on an HF model, as TransformerLens's ``NormalizationBridge`` defines
    them: ``scale = sqrt(mean(centered ** 2) + eps)`` (``centered = x - mean(x)``, or ``x`` for RMS)
    and ``normalized = centered / scale``, the output being ``normalized * weight + bias``.

    Computed from the module's input only while either point is hooked (both points share one
    forward hook). Read without autograd, the module's own output stands (bit-identical); when a
    hook replaces the scale (e.g. frozen at a clean run's value, as attribution methods do) the
    normalized tensor is recomputed from it, and when anything was replaced, or autograd is on, the
    output is rebuilt from the hooked tensors so edits propagate and gradients reach them (equal to
    the module's output to float rounding).
    """

    def __init__(self, module: nn.Module, rms: bool, offset: bool, eps: float) -> None:
        self.module, self.rms, self.offset, self.eps = module, rms, offset, eps
        self.scale_point, self.normalized_point = _ViewPoint(), _ViewPoint()
        self.scale_point.view = self.normalized_point.view = self
        self._handle: Any = None
        self._users = 0

    @classmethod
    def of(cls, module: nn.Module, offset: bool, default_eps: float) -> _NormInternals | None:
        """The internals of ``module`` if it is a LayerNorm or an RMSNorm over the last axis, else None."""
        if isinstance(module, nn.LayerNorm):
            if len(module.normalized_shape) != 1:
                return None
            return cls(module, rms=False, offset=False, eps=module.eps)
        if "RMSNorm" not in type(module).__name__ or not isinstance(
            getattr(module, "weight", None), torch.Tensor
        ):
            return None
        eps = getattr(module, "variance_epsilon", None) or getattr(module, "eps", None) or default_eps
        return cls(module, rms=True, offset=offset, eps=float(eps))

    def internals(self, x: torch.Tensor, edit: bool) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """``(scale, normalized, replaced)`` of input ``x`` (float32 at least), through the hook points
        when ``edit``."""
        x = x.float() if x.dtype not in (torch.float32, torch.float64) else x
        centered = x if self.rms else x - x.mean(-1, keepdim=True)
        scale = (centered.pow(2).mean(-1, keepdim=True) + self.eps).sqrt()
        hooked_scale = self.scale_point(scale) if edit else scale
        normalized = centered / hooked_scale
        hooked = self.normalized_point(normalized) if edit else normalized
        return hooked_scale, hooked, hooked_scale is not scale or hooked is not normalized

    def output(self, normalized: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``normalized * weight + bias`` (``1 + weight`` for offset RMSNorms), cast to ``dtype``."""
        weight = getattr(self.module, "weight", None)
        if weight is not None and weight.device.type == "meta":  # offloaded: load it for the call
            from accelerate.utils import align_module_device

            with align_module_device(self.module):
                return self._affine(
                    normalized, self.module.weight.detach().clone(), _clone(self.module.bias), dtype
                )
        return self._affine(normalized, weight, getattr(self.module, "bias", None), dtype)

    def _affine(self, normalized: torch.Tensor, weight: Any, bias: Any, dtype: torch.dtype) -> torch.Tensor:
        out = normalized
        if weight is not None:
            out = out * ((1.0 + weight) if self.offset else weight)
        if bias is not None and not self.rms:
            out = out + bias
        return out.to(dtype)

    def reproduces(self) -> bool:
        """Whether ``output(normalized)`` is the module's own output (on a random input)."""
        weight = getattr(self.module, "weight", None)
        if weight is not None and weight.device.type == "meta":
            return True  # offloaded: TL's formula is what its bridge computes; nothing to compare here
        d = self.module.normalized_shape[0] if isinstance(self.module, nn.LayerNorm) else weight.shape[-1]
        device = weight.device if weight is not None else None
        x = torch.randn(2, 3, d, generator=torch.Generator().manual_seed(0)).to(device) * 3 + 1
        dtype = weight.dtype if weight is not None else torch.float32
        with torch.no_grad():
            theirs = self.module(x.to(dtype)).float()
            _, normalized, _ = self.internals(x.to(dtype), edit=False)
            ours = self.output(normalized, dtype).float()
        return theirs.shape == ours.shape and torch.allclose(ours, theirs, rtol=1e-3, atol=1e-3)

    def attach(self) -> _NormHandle:
        self._users += 1
        if self._handle is None:

            def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
                x = args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values())))
                out = _first_tensor(output)
                _, normalized, replaced = self.internals(x, edit=True)
                if not replaced and not torch.is_grad_enabled():
                    return None  # only read: the module's output stands
                return _replace_first(output, self.output(normalized, out.dtype))

            self._handle = self.module.register_forward_hook(hook, with_kwargs=True, prepend=True)
        return _NormHandle(self)

    def release(self) -> None:
        self._users -= 1
        if self._users == 0 and self._handle is not None:
            self._handle.remove()
            self._handle = None


@dataclass(frozen=True)
class _NormHandle:
    """One ``_ViewPoint``'s use of a ``_NormInternals`` hook (the hook goes with the last one)."""

    internals: _NormInternals

    def remove(self) -> None:
        self.internals.release()


def _clone(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().clone()


@dataclass(frozen=True)
class _NativeScores:
    """``blocks.L.attn.hook_attn_scores`` on a native bridge: the pre-softmax scores, masked with
    ``-inf`` (TransformerLens's semantics), ``[batch, head, pos, pos]``.

    TL's native attention computes them inside its forward and exposes none; the bridge fires its
    ``hook_attn_scores`` afterwards with the softmaxed pattern (so it equals ``hook_pattern`` and a
    replacement changes nothing). While ``point`` is hooked, the attention module runs
    ``_native_attention`` instead: TL's ``NativeAttention.forward`` step for step, with the scores
    routed through ``point``, so reading them leaves the output bit-identical and replacing them
    changes the pattern.
    """

    point: HookPoint
    attention: nn.Module  # transformer_lens ... native.model.NativeAttention

    def attach(self) -> Any:
        module = self.attention

        def forward(*args: Any, **kwargs: Any) -> Any:
            return _native_attention(module, *args, scores_fn=self.point, **kwargs)

        module.forward = forward
        return _Restore(module)


@dataclass(frozen=True)
class _Restore:
    """Handle that puts a module's class ``forward`` back."""

    module: nn.Module

    def remove(self) -> None:
        self.module.__dict__.pop("forward", None)


def _native_attention(
    self: nn.Module,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    pattern_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    scores_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformer_lens 4.3's ``NativeAttention.forward``, with ``scores_fn`` applied to the masked scores.

    Kept step for step equal (tests/test_tl_parity.py checks the output bit for bit, with rotary
    embeddings, grouped-query attention, a soft cap and padding). While a generation KV cache is
    attached (``interp.models.kvcache``), the cached keys and values come first and the causal mask
    is offset by their length; ``attention_mask`` then spans the cached and the new positions."""
    from transformer_lens.utilities.activation_functions import apply_softcap

    from interp.models.kvcache import cache_of

    batch, seq, _ = hidden_states.shape
    q = self.q(hidden_states).view(batch, seq, self.n_heads, self.d_head).transpose(1, 2)
    k = self.k(hidden_states).view(batch, seq, self.n_kv_heads, self.d_head).transpose(1, 2)
    v = self.v(hidden_states).view(batch, seq, self.n_kv_heads, self.d_head).transpose(1, 2)
    if self.rotary is not None:
        q, k = self.rotary.apply_rope(q, k, position_ids=position_ids)
    cached = cache_of(self)
    past = 0
    if cached is not None:
        cache, layer = cached
        past = cache.length(layer)
        k, v = cache.extend(layer, k, v)
    if self.kv_repeats > 1:
        k = k.repeat_interleave(self.kv_repeats, dim=1)
        v = v.repeat_interleave(self.kv_repeats, dim=1)
    scores = torch.matmul(q, k.transpose(-2, -1)) / self.scale
    scores = apply_softcap(scores, self.attn_scores_soft_cap)
    if self.causal:
        block_mask = self.causal_mask[past : past + seq, : past + seq]
    else:
        block_mask = torch.zeros(seq, past + seq, dtype=torch.bool, device=scores.device)
    if attention_mask is not None:
        block_mask = self._combine_attention_mask(block_mask, attention_mask, batch=batch)
    scores = scores.masked_fill(block_mask, float("-inf"))
    if scores_fn is not None:
        scores = scores_fn(scores)
    pattern = torch.nn.functional.softmax(scores, dim=-1)
    pattern = pattern.masked_fill(block_mask, 0.0)
    if pattern_fn is not None:
        pattern = pattern_fn(pattern)
    attn = torch.matmul(pattern, v).transpose(1, 2).contiguous().view(batch, seq, -1)
    return self.o(attn), pattern


def attached_first(
    site: HookSite, fn: Callable[[torch.Tensor], torch.Tensor | None]
) -> torch.utils.hooks.RemovableHandle:
    """Like ``interp.hooks.attach``, but runs before every other hook on the module, so the
    module's other hook points see what a view's hooks wrote."""
    if site.side == "output":

        def forward_hook(module: nn.Module, args: Any, output: Any) -> Any:
            new = fn(_first_tensor(output))
            return None if new is None else _replace_first(output, new)

        return site.module.register_forward_hook(forward_hook, prepend=True)

    def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> Any:
        if args:
            new = fn(_first_tensor(args))
            return None if new is None else ((new, *args[1:]), kwargs)
        key = "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))
        new = fn(kwargs[key])
        return None if new is None else (args, {**kwargs, key: new})

    return site.module.register_forward_pre_hook(pre_hook, with_kwargs=True, prepend=True)


def heads_view(d_head: int) -> tuple[Callable, Callable]:
    """``[batch, pos, head * d_head]`` <-> ``[batch, pos, head, d_head]`` (TL's hook_q/k/v/z layout)."""
    return (
        lambda t: rearrange(t, "b p (h d) -> b p h d", d=d_head),
        lambda t: rearrange(t, "b p h d -> b p (h d)"),
    )


class _ViewPoint(HookPoint):
    """The hook point users hook for a view (``_View``, ``_HeadResults``, ``_NativeScores``).

    Its first hook puts the view into the model (``view.attach()``) and removing its last hook
    takes it out again, so the view fires in every forward while hooked, whoever runs it
    (``_forward``, generation, the bridge called directly), and costs nothing otherwise.
    """

    def __init__(self) -> None:
        super().__init__()
        self.view: Any = None  # set once the view exists (it holds this point)
        self._bridge: Any = None

    def register_forward_hook(self, hook: Callable, *args: Any, **kwargs: Any) -> _ViewHandle:
        handle = super().register_forward_hook(hook, *args, **kwargs)
        if self._bridge is None and self.view is not None:
            self._bridge = self.view.attach()
        return _ViewHandle(self, handle)

    def _release(self) -> None:
        if not self._forward_hooks and self._bridge is not None:
            self._bridge.remove()
            self._bridge = None


@dataclass(frozen=True)
class _ViewHandle:
    """Removes one hook from a ``_ViewPoint``, and the view with the last one."""

    point: _ViewPoint
    handle: Any

    def remove(self) -> None:
        self.handle.remove()
        self.point._release()


def _point_for(view: Any) -> Any:
    """Wire ``view.point`` (a fresh ``_ViewPoint``) to the view it shows; returns the view."""
    view.point.view = view
    return view


def _is_native_attention(attention: nn.Module | None) -> bool:
    """Whether ``attention`` wraps transformer_lens 4.3's NativeAttention (see ``_native_attention``)."""
    inner = getattr(attention, "original_component", None)
    return type(inner).__name__ == "NativeAttention" and hasattr(inner, "_combine_attention_mask")


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def _fired(sites: dict[str, HookSite]) -> dict[str, HookSite]:
    """Traced sites that fired on the probe forward: a name that never fires is not offered."""
    return {name: site for name, site in sites.items() if site.shape is not None}


# ------------------------------------------------------------------------------------------------
# Plain Hugging Face models
# ------------------------------------------------------------------------------------------------

_ATTENTION_POINTS: WeakKeyDictionary[nn.Module, nn.ModuleDict] = WeakKeyDictionary()


def _hooked_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """HF attention with hook points on q, k, v, scores, pattern and z.

    It computes attention eagerly, exactly as HF's eager path does, routing each intermediate
    through its hook point so it can be read or replaced. ``HFTransformer`` selects it only for
    forwards that hook attention internals; every other forward runs HF's own SDPA path.
    """
    points = _ATTENTION_POINTS[module]
    unsupported = [k for k in ("softcap", "sliding_window", "s_aux") if kwargs.get(k) is not None]
    if unsupported:
        raise NotImplementedError(
            f"hooks inside this model's attention are not supported yet (it uses {unsupported}); "
            "hook the attention output (blocks.N.hook_attn_out) instead"
        )
    query = heads_first(points["hook_q"](heads_last(query)))
    key = heads_first(points["hook_k"](heads_last(key)))
    value = heads_first(points["hook_v"](heads_last(value)))
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention: share each key/value head across its query heads
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        mask = attention_mask[..., : key.shape[-2]]
        if mask.shape[0] not in (1, scores.shape[0]):  # copies stacked after the mask was built
            mask = mask.repeat(scores.shape[0] // mask.shape[0], *([1] * (mask.ndim - 1)))
        scores = scores + mask
    scores = points["hook_attn_scores"](scores)
    pattern = points["hook_pattern"](nn.functional.softmax(scores, dim=-1).to(value.dtype))
    weights = nn.functional.dropout(pattern, p=dropout, training=module.training)
    z = points["hook_z"](heads_last(torch.matmul(weights, value)))
    return z.contiguous(), pattern


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(ATTENTION_IMPLEMENTATION, _hooked_attention)
    AttentionMaskInterface.register(ATTENTION_IMPLEMENTATION, ALL_MASK_ATTENTION_FUNCTIONS["eager"])


def _tl_alias_table(adapter: Any) -> dict[str, tuple[str, ...]]:
    """TransformerLens's hook aliases for this architecture: ``alias -> target candidates``, in
    priority order, with ``blocks.`` standing for every block (as TL's bridge resolves them)."""
    from transformer_lens.model_bridge.bridge_core import BridgeCore

    table: dict[str, tuple[str, ...]] = {}

    def walk(comp: Any, prefix: str) -> None:
        for alias, target in (getattr(comp, "hook_aliases", None) or {}).items():
            targets = target if isinstance(target, list | tuple) else [target]
            table[f"{prefix}.{alias}"] = tuple(f"{prefix}.{t}" for t in targets)
        for sub_name, sub in (getattr(comp, "submodules", None) or {}).items():
            walk(sub, f"{prefix}.{sub_name}")

    for key, comp in adapter.component_mapping.items():
        walk(comp, key)
    for alias, target in BridgeCore.hook_aliases.items():
        targets = target if isinstance(target, list | tuple) else (target,)
        # not rotary_emb.hook_out for hook_pos_embed: TL's bridge never fires it, and the rotary
        # module's (cos, sin) is no residual-stream term (DLA would count it as one)
        table[alias] = tuple(t for t in targets if not t.startswith("rotary_emb."))
    for alias, targets in _SUBLAYER_OUTPUTS.items():  # TL made them hook points of their own here
        table.setdefault(alias, targets)
    return table


# Where TL's bridge defines hook_attn_out / hook_mlp_out as hook points of its own (Granite scales
# each sublayer's output before the add), the module outputs stand in; ``_non_additive`` then
# withholds them, with why, unless they are what the block adds to its stream.
_SUBLAYER_OUTPUTS = {
    "blocks.hook_attn_out": ("blocks.attn.o.hook_out", "blocks.attn.hook_out"),
    "blocks.hook_mlp_out": ("blocks.mlp.out.hook_out", "blocks.mlp.hook_out"),
}


@dataclass(frozen=True)
class _Component:
    """One TransformerLens component name and the HF module it maps to."""

    tl_name: str
    module: nn.Module
    template: Any = None  # the adapter's bridge component (e.g. a NormalizationBridge)


class HFTransformer(TransformerModel):
    """A plain HF model with TransformerLens-named hook points (see module docstring)."""

    def __init__(self, hf_model: nn.Module, tokenizer: Any, adapter: Any, name: str, source: str) -> None:
        super().__init__(hf_model, name)
        self.source = source
        self.tokenizer = tokenizer
        self.adapter = adapter
        self.cfg = adapter.cfg
        self.n_layers: int = self.cfg.n_layers
        self.n_ctx = getattr(self.cfg, "n_ctx", None)
        self.d_vocab = getattr(self.cfg, "d_vocab", None)
        if tokenizer is not None and tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self._components = self._map_components()
        self._attention_points = self._install_attention_points()
        self._views: list[_View | _HeadResults] = []  # filled when the sites are built
        self._norm_views: list[_NormInternals] = []  # each LayerNorm's hook_scale / hook_normalized
        self._batch = 1

    # --- name map -------------------------------------------------------------------------------

    def _module_at(self, path: str | None) -> nn.Module | None:
        if not path:
            return None
        prefix = getattr(self.module, "base_model_prefix", "")
        for candidate in (path, path.removeprefix(f"{prefix}.")):
            try:
                return self.module.get_submodule(candidate)
            except AttributeError:
                continue
        return None

    def _map_components(self) -> list[_Component]:
        """Walk the adapter's component mapping; keep every component present in this HF model."""
        found: list[_Component] = []
        for key, comp in self.adapter.component_mapping.items():
            if key == "blocks":
                for i in range(self.n_layers):
                    found += self._walk(f"blocks.{i}", f"{comp.name}.{i}", comp)
            else:
                found += self._walk(key, comp.name, comp)
        return found

    def _walk(self, tl_name: str, path: str | None, comp: Any) -> list[_Component]:
        """``path`` is the component's HF module path, or None for a grouping with no module of its
        own (BERT's MLP), whose submodules are then named relative to the enclosing module."""
        module = self._module_at(path)
        out = [_Component(tl_name, module, comp)] if module is not None else []
        for sub_key, sub in (getattr(comp, "submodules", None) or {}).items():
            if sub.name is None:
                sub_path, sub_comp = None, sub
                out += self._walk_group(f"{tl_name}.{sub_key}", path, sub_comp)
            else:
                sub_path = f"{path}.{sub.name}" if path else sub.name
                out += self._walk(f"{tl_name}.{sub_key}", sub_path, sub)
        return out

    def _walk_group(self, tl_name: str, parent_path: str | None, comp: Any) -> list[_Component]:
        out = []
        for sub_key, sub in (getattr(comp, "submodules", None) or {}).items():
            sub_path = f"{parent_path}.{sub.name}" if parent_path and sub.name else sub.name
            out += self._walk(f"{tl_name}.{sub_key}", sub_path, sub)
        return out

    def _install_attention_points(self) -> dict[int, nn.ModuleDict]:
        _register_attention()
        points: dict[int, nn.ModuleDict] = {}
        for comp in self._components:
            parts = comp.tl_name.split(".")
            if len(parts) == 3 and parts[2] == "attn":
                points[int(parts[1])] = nn.ModuleDict({p: HookPoint() for p in ATTENTION_POINTS})
        self._route_attention(points)
        try:
            self.module.set_attn_implementation("sdpa")
            self._fast_attention = "sdpa"
        except (ValueError, ImportError):
            self._fast_attention = "eager"
        return points

    def _route_attention(self, points: dict[int, nn.ModuleDict]) -> None:
        """Tell ``_hooked_attention`` which hook points belong to each attention module."""
        for comp in self._components:
            parts = comp.tl_name.split(".")
            if len(parts) == 3 and parts[2] == "attn":
                for sub in comp.module.modules():
                    _ATTENTION_POINTS[sub] = points[int(parts[1])]

    def __setstate__(self, state: dict[str, Any]) -> None:  # a copy's attention modules are new
        super().__setstate__(state)
        self._route_attention(self._attention_points)

    def _build_sites(self) -> dict[str, HookSite]:
        sites: dict[str, HookSite] = {}
        for comp in self._components:
            for side, suffix in (("input", "hook_in"), ("output", "hook_out")):
                name = f"{comp.tl_name}.{suffix}"
                sites[name] = HookSite(name, comp.module, side)
        # HF's attention function receives q and k after rotary embeddings: TL's hook_rot_q/k; its
        # hook_q/k are the projections' outputs (the attn.q/k.hook_out views), before rotation
        rotated = {"hook_q": "hook_rot_q", "hook_k": "hook_rot_k"} if self._rotary else {}
        for layer, points in self._attention_points.items():
            for point_name, point in points.items():
                name = f"blocks.{layer}.attn.{rotated.get(point_name, point_name)}"
                sites[name] = HookSite(name, point, "output")
        sites = self._with_views(sites)
        sites = _fired(
            trace_sites(sites, lambda: self._forward(self._probe_tokens()), {1: "batch", _PROBE_LEN: "pos"})
        )
        aliases = self._aliases(list(sites))
        ordered: dict[str, HookSite] = {}
        for name, site in sites.items():  # each alias sits right after the site it names
            ordered[name] = site
            for alias in aliases.get(name, []):
                ordered[alias] = HookSite(alias, site.module, site.side, site.shape)
        self._withheld = self._non_additive(ordered)
        return {name: site for name, site in ordered.items() if name not in self._withheld}

    @property
    def _rotary(self) -> bool:
        return getattr(self.cfg, "positional_embedding_type", None) == "rotary"

    def _with_views(self, sites: dict[str, HookSite]) -> dict[str, HookSite]:
        """Sites whose TL hook carries another layout become views (see ``_View``), and each
        attention layer gets ``attn.hook_result`` (see ``_HeadResults``):

        * ``attn.q/k/v.hook_out`` and ``attn.o.hook_in``: ``[batch, pos, head, d_head]``;
        * ``pos_embed.hook_out``: ``[batch, pos, d_model]`` (HF computes it once, ``[1, pos, d]``).
        """
        split = heads_view(self.cfg.d_head)
        wanted = {"pos_embed.hook_out": (self._batched, _identity)}
        for layer in range(self.n_layers):
            b = f"blocks.{layer}.attn"
            wanted.update({f"{b}.{x}.hook_out": split for x in ("q", "k", "v")} | {f"{b}.o.hook_in": split})
        out: dict[str, HookSite] = {}
        self._views: list[_View | _HeadResults] = []
        norms = self._norm_internals()
        self._norm_views = list(norms.values())
        for name, site in sites.items():
            if name in wanted:
                view = _point_for(_View(_ViewPoint(), site, *wanted[name]))
                self._views.append(view)
                site = HookSite(name, view.point, "output")
            out[name] = site
            norm = norms.get(name.removesuffix(".hook_in")) if name.endswith(".hook_in") else None
            if norm is not None:
                stem = name.removesuffix(".hook_in")
                out[f"{stem}.hook_scale"] = HookSite(f"{stem}.hook_scale", norm.scale_point, "output")
                out[f"{stem}.hook_normalized"] = HookSite(
                    f"{stem}.hook_normalized", norm.normalized_point, "output"
                )
            if name.endswith(".attn.o.hook_out") and type(site.module).__name__ in ("Linear", "Conv1D"):
                result = _point_for(_HeadResults(_ViewPoint(), site.module, self.cfg.n_heads))
                self._views.append(result)
                result_name = name.replace(".o.hook_out", ".hook_result")
                out[result_name] = HookSite(result_name, result.point, "output")
        return out

    def _norm_internals(self) -> dict[str, _NormInternals]:
        """``hook_scale`` / ``hook_normalized`` for each normalization TransformerLens's bridge gives
        them (its ``NormalizationBridge`` components), keyed by component name; only where the
        module's output is ``normalized * weight + bias`` exactly as TL computes it (checked on a
        random input, see ``_NormInternals.reproduces``), so an edited scale means what it says."""
        from transformer_lens.model_bridge.generalized_components import NormalizationBridge

        offset = bool(getattr(self.cfg, "rmsnorm_uses_offset", False))
        found: dict[str, _NormInternals] = {}
        for comp in self._components:
            if not isinstance(comp.template, NormalizationBridge):
                continue
            internals = _NormInternals.of(comp.module, offset, getattr(self.cfg, "eps", 1e-5))
            if internals is not None and internals.reproduces():
                found[comp.tl_name] = internals
        return found

    def _batched(self, t: torch.Tensor) -> torch.Tensor:
        """A ``[1, pos, d]`` tensor computed once for the batch, shown per row (as TL's bridge does)."""
        return t.expand(self._batch, *t.shape[1:]) if t.shape[0] == 1 else t

    def _non_additive(self, sites: dict[str, HookSite]) -> dict[str, str]:
        """``hook_attn_out`` / ``hook_mlp_out`` aliases that are not what the block adds to its residual
        stream, with why. Some architectures scale or normalize a sublayer's output before the add
        (Granite's residual multiplier, OLMo 2's post-sublayer norm); there the module output is not
        the additive contribution that patching, DLA and edge attribution assume. Checked on one
        forward in pre-LN blocks: resid_pre + attn_out = resid_mid, resid_mid + mlp_out = resid_post
        (resid_pre + attn_out + mlp_out = resid_post without a resid_mid)."""
        parts = ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post")
        names = [f"blocks.{i}.{p}" for i in range(self.n_layers) for p in parts if f"blocks.{i}.{p}" in sites]
        values: dict[str, torch.Tensor] = {}
        readers = [(sites[n], lambda act, n=n: values.setdefault(n, act.detach().clone())) for n in names]
        with attached(readers), torch.no_grad():
            self._forward(self._probe_tokens())
        order = {name: i for i, name in enumerate(sites)}
        withheld: dict[str, str] = {}
        for i in range(self.n_layers):
            b = f"blocks.{i}"
            if order.get(f"{b}.attn.o.hook_out", -1) < order.get(f"{b}.ln1.hook_in", -1):
                continue  # post-LN (BERT): the stream is normalized after each add by design
            for name, lhs, rhs in _residual_identities(b, values):
                if not torch.allclose(lhs, rhs, rtol=1e-4, atol=1e-5 * float(rhs.abs().max().clamp_min(1.0))):
                    module = name.replace("hook_attn_out", "attn.hook_out").replace(
                        "hook_mlp_out", "mlp.hook_out"
                    )
                    withheld[name] = (
                        f"{name} is not offered on {self.name}: the {name.split('_')[-2]} output it would name is "
                        "not what the block adds to its residual stream (the residual identities fail on a test "
                        f"input; the architecture scales or normalizes it first). The module's own output is {module}."
                    )
        return withheld

    def _aliases(self, order: list[str]) -> dict[str, list[str]]:
        """TransformerLens's alias names, keyed by the site each one points at.

        Read from TL's own tables (the bridge's ``hook_aliases`` and those of the adapter's
        component templates, with their per-architecture overrides), so each alias names what the
        bridge's alias of that name names: on BERT, ``hook_attn_out`` is the attention block's
        post-LayerNorm output and ``hook_resid_mid`` the stream entering the second LayerNorm.
        """
        index = set(order)
        aliases: dict[str, list[str]] = {}
        for alias, targets in _tl_alias_table(self.adapter).items():
            layers = range(self.n_layers) if alias.startswith("blocks.") else [None]
            for layer in layers:
                name, candidates = alias, targets
                if layer is not None:
                    name = alias.replace("blocks.", f"blocks.{layer}.", 1)
                    candidates = tuple(t.replace("blocks.", f"blocks.{layer}.", 1) for t in targets)
                target = next((t for t in candidates if t in index), None)
                if target is not None and name not in index:
                    aliases.setdefault(target, []).append(name)
        return aliases

    # --- running --------------------------------------------------------------------------------

    def _select_attention(self, prepared: Tokens) -> None:
        """Eager attention with hook points when any is hooked, or when copies of a padded batch
        are stacked mid-forward (it stacks the attention mask to match); else the fast default."""
        hooked = any(p._forward_hooks for points in self._attention_points.values() for p in points.values())
        stacked_mask = self._stacking and prepared.attention_mask is not None and len(prepared.input_ids) > 1
        wanted = ATTENTION_IMPLEMENTATION if hooked or stacked_mask else self._fast_attention
        if self.module.config._attn_implementation != wanted:
            self.module.set_attn_implementation(wanted)

    def _forward(self, prepared: Tokens) -> torch.Tensor:
        self._select_attention(prepared)
        self._batch = len(prepared.input_ids)
        extra = {}
        position_ids = left_padded_positions(prepared.attention_mask)
        if position_ids is not None and self._takes_position_ids:
            extra["position_ids"] = position_ids
        out = self.module(
            input_ids=prepared.input_ids, attention_mask=prepared.attention_mask, use_cache=False, **extra
        )
        return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state

    @cached_property
    def _takes_position_ids(self) -> bool:
        import inspect

        return "position_ids" in inspect.signature(self.module.forward).parameters

    def to_bridge(self):
        """A TransformerLens ``TransformerBridge`` of the same weights (a separate copy), for TL's tools."""
        from transformer_lens.model_bridge import TransformerBridge

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        return TransformerBridge.boot_transformers(self.source, device=str(self.device)).eval()


# ------------------------------------------------------------------------------------------------
# Native (boot_native) toy transformers
# ------------------------------------------------------------------------------------------------


class NativeTransformer(TransformerModel):
    """A ``TransformerBridge.boot_native`` model; hook names are its ``hook_dict``."""

    def __init__(self, bridge: nn.Module, name: str, tokenizer: Any = None) -> None:
        super().__init__(bridge, name)
        self.bridge = bridge
        self.cfg = bridge.cfg
        self.tokenizer = tokenizer
        self.n_layers = self.cfg.n_layers
        self.n_ctx = self.cfg.n_ctx
        self.d_vocab = self.cfg.d_vocab
        self._views: list[_View | _HeadResults | _NativeScores] = []  # filled when the sites are built

    def _build_sites(self) -> dict[str, HookSite]:
        """The bridge's ``hook_dict``, as TL's own hooks see it, less the names that never fire.

        A bridge hook point with a ``hook_conversion`` (q/k/v/z: flat in the forward) is a view
        showing the converted layout, ``[batch, pos, head, d_head]``, which is what TL hands its
        hook functions and caches. ``attn.hook_result`` (per-head output, which TL's bridge only
        computes for some attention classes, not for native models) is computed when hooked, and
        ``attn.hook_attn_scores`` carries the pre-softmax scores (see ``_NativeScores``; the bridge's
        own hook of that name fires the pattern). Names
        that do not fire here are dropped: the split q/k/v inputs and ``hook_attn_in`` (TL fires
        them only with ``use_split_qkv_input``/``use_attn_in``, which native models refuse),
        ``hook_mlp_in`` (only with ``use_hook_mlp_in``, and attention-only models have no MLP)
        and ``attn.hook_hidden_states``.
        """
        sites: dict[str, HookSite] = {}
        self._views = []
        shown: dict[int, _View] = {}  # one view per bridge hook point (its aliases share it)
        for name, point in self.bridge.hook_dict.items():
            conversion = getattr(point, "hook_conversion", None)
            attention = self.bridge.get_submodule(name.rsplit(".", 1)[0]) if ".attn." in name else None
            if name.endswith(".attn.hook_result"):
                proj = self.bridge.get_submodule(name.replace(".hook_result", ".o")).original_component
                view = _point_for(_HeadResults(_ViewPoint(), proj, self.cfg.n_heads))
                self._views.append(view)
                point = view.point
            elif name.endswith(".attn.hook_attn_scores") and _is_native_attention(attention):
                view = _point_for(_NativeScores(_ViewPoint(), attention.original_component))
                self._views.append(view)
                point = view.point
            elif conversion is not None:
                if id(point) not in shown:
                    shown[id(point)] = _point_for(
                        _View(
                            _ViewPoint(),
                            HookSite(name, point, "output"),
                            conversion.convert,
                            conversion.revert,
                        )
                    )
                    self._views.append(shown[id(point)])
                point = shown[id(point)].point
            sites[name] = HookSite(name, point, "output")
        return _fired(
            trace_sites(sites, lambda: self._forward(self._probe_tokens()), {1: "batch", _PROBE_LEN: "pos"})
        )

    def _forward(self, prepared: Tokens) -> torch.Tensor:
        return self.bridge(prepared.input_ids, attention_mask=prepared.attention_mask)

    def _cached_stepper(self) -> Callable | None:
        """``step(ids, mask, cache) -> (last logits, cache)`` with interp's KV cache
        (``interp.models.kvcache``): the prompt runs whole, each later step only its new token, at its
        position past any left padding. None when a block's attention is not TransformerLens's
        ``NativeAttention`` (then generation recomputes the sequence)."""
        from interp.models.kvcache import NativeKVCache, attached, native_attentions

        attentions = native_attentions(self.bridge)
        if attentions is None:
            return None

        def step(ids: torch.Tensor, mask: torch.Tensor, cache: Any) -> tuple[torch.Tensor, Any]:
            padded = not bool(mask.all())
            kwargs: dict[str, Any] = {"attention_mask": mask if padded else None}
            if cache is None:
                cache, new = NativeKVCache(), ids
            else:
                new = ids[:, -1:]
                kwargs["position_ids"] = _positions(mask)[:, -1:]
            with attached(attentions, cache):
                logits = self.bridge(new, **kwargs)
            return logits[:, -1], cache

        return step
