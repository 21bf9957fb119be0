"""Weights and circuits of a transformer in TransformerLens shapes: ``W_Q``, ``QK``, composition scores.

``WeightsMixin`` gives every ``TransformerModel`` TransformerLens 4.3's weight surface, with the
bridge's shapes and names:

==========================  =======================================
``W_E``                     ``[d_vocab, d_model]``
``W_pos``                   ``[n_ctx, d_model]``
``W_Q``                     ``[n_layers, n_heads, d_model, d_head]``
``W_K``, ``W_V``            ``[n_layers, n_kv_heads, d_model, d_head]`` (``n_kv_heads = n_heads``
                            except in grouped-query attention, as on TL's bridge)
``W_O``                     ``[n_layers, n_heads, d_head, d_model]``
``b_Q`` (``b_K``, ``b_V``)  ``[n_layers, n_heads (n_kv_heads), d_head]``
``b_O``                     ``[n_layers, d_model]``
``W_in``, ``W_gate``        ``[n_layers, d_model, d_mlp]``
``b_in``                    ``[n_layers, d_mlp]``
``W_out``                   ``[n_layers, d_mlp, d_model]``
``b_out``                   ``[n_layers, d_model]``
``W_U``                     ``[d_model, d_vocab]``
``b_U``                     ``[d_vocab]``
``QK``, ``OV``              ``FactoredMatrix`` ``[n_layers, n_heads, d_model, d_model]``
==========================  =======================================

What "the same weights" means. These are the weights the model interp runs actually computes
with, never a processed copy:

* On a plain HF model (``HFTransformer``) they are the checkpoint's weights, cut into heads the way
  TL 4.3's architecture adapter cuts them. That is what ``TransformerBridge.boot_transformers(path)``
  reports before ``enable_compatibility_mode()``: the bridge does not process weights at boot.
  Compatibility mode folds the LayerNorms into the next layer, centers the writing weights and the
  unembedding and folds the value biases, so its ``W_Q`` etc. are *different* weights (same
  function, other parametrisation); interp never applies that processing to an HF model.
* On a native bridge (``NativeTransformer``, the zoo) they are read from the bridge itself, so
  they equal its accessors in whichever mode the bridge is in.

The tensors are detached: reading them never builds an autograd graph. Bias-free projections
(Llama-style) give zero biases, as ``HookedTransformer`` did (TL 4.3's bridge raises there).
"""

from __future__ import annotations

from typing import Any

import torch
from einops import rearrange
from torch import nn

from interp.errors import InputError

_STACKED = {
    # name: (component under blocks.L, which part, head layout or None)
    "W_Q": ("attn", "q", "weight"),
    "W_K": ("attn", "k", "weight"),
    "W_V": ("attn", "v", "weight"),
    "W_O": ("attn", "o", "weight"),
    "b_Q": ("attn", "q", "bias"),
    "b_K": ("attn", "k", "bias"),
    "b_V": ("attn", "v", "bias"),
    "b_O": ("attn", "o", "bias"),
    "W_in": ("mlp", "in", "weight"),
    "W_gate": ("mlp", "gate", "weight"),
    "W_out": ("mlp", "out", "weight"),
    "b_in": ("mlp", "in", "bias"),
    "b_out": ("mlp", "out", "bias"),
}


def linear_in_out(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(W [d_in, d_out], b [d_out] or None)`` of a linear layer, so that ``y = x @ W + b``.

    ``nn.Linear`` stores ``[d_out, d_in]``; HF's ``Conv1D`` (GPT-2) stores ``[d_in, d_out]``.
    """
    if isinstance(module, nn.Linear):
        return module.weight.detach().T, None if module.bias is None else module.bias.detach()
    if type(module).__name__ == "Conv1D":
        return module.weight.detach(), None if module.bias is None else module.bias.detach()
    raise NotImplementedError(
        f"cannot read the weights of a {type(module).__name__} as a linear map (only nn.Linear and "
        "HF Conv1D are supported); read the module's parameters directly from model.module"
    )


class WeightsMixin:
    """TransformerLens's weight accessors, QK/OV circuits, composition scores and head labels.

    Mixed into ``TransformerModel``; see the module docstring for shapes and for which weights these are.
    """

    cfg: Any
    n_layers: int
    name: str

    # --- where the weights live -----------------------------------------------------------------

    @property
    def _bridge(self) -> nn.Module | None:
        """The TransformerBridge this model runs (native zoo models), else None (plain HF)."""
        return getattr(self, "bridge", None)

    @property
    def _hf_components(self) -> dict[str, nn.Module]:
        return {c.tl_name: c.module for c in getattr(self, "_components", [])}

    def _require(self, value: Any, what: str) -> Any:
        if value is None:
            raise InputError(f"{self.name} has no {what}, so this weight is not defined for it")
        return value

    def _hf_part(self, layer: int, group: str, part: str) -> nn.Module | None:
        """The HF linear module for ``blocks.L.{group}.{part}``; a fused QKV projection is split the
        way TL's adapter splits it (its ``split_qkv_matrix``)."""
        comps = self._hf_components
        base = f"blocks.{layer}.{group}"
        if f"{base}.{part}" in comps:
            return comps[f"{base}.{part}"]
        if group == "attn" and part in "qkv" and f"{base}.qkv" in comps:
            template = self.adapter.component_mapping["blocks"].submodules["attn"]  # type: ignore[attr-defined]
            return dict(zip("qkv", template.split_qkv_matrix(comps[base]), strict=True))[part]
        return None

    def _hf_layer_weight(self, name: str, layer: int) -> torch.Tensor | None:
        group, part, kind = _STACKED[name]
        module = self._hf_part(layer, group, part)
        if module is None:
            return None
        weight, bias = linear_in_out(module)
        d_head = self.cfg.d_head
        if kind == "bias":
            out_dim = weight.shape[0] if part == "o" else weight.shape[1]
            bias = torch.zeros(out_dim, dtype=weight.dtype, device=weight.device) if bias is None else bias
            return bias if part == "o" or group == "mlp" else rearrange(bias, "(n h) -> n h", h=d_head)
        if group == "mlp":
            return weight
        if part == "o":
            return rearrange(weight, "(n h) d_model -> n h d_model", h=d_head)
        return rearrange(weight, "d_model (n h) -> n d_model h", h=d_head)

    def _stacked(self, name: str) -> torch.Tensor:
        if self._bridge is not None:
            value = getattr(self._bridge, name)
            return self._require(value, name).detach()
        per_layer = [self._hf_layer_weight(name, layer) for layer in range(self.n_layers)]
        if any(w is None for w in per_layer):
            missing = [i for i, w in enumerate(per_layer) if w is None]
            raise InputError(
                f"{self.name} has no {name} in layers {missing} (the {_STACKED[name][0]} component "
                "has no such projection)"
            )
        return torch.stack(per_layer)

    # --- stacked per-layer weights --------------------------------------------------------------

    @property
    def W_Q(self) -> torch.Tensor:
        return self._stacked("W_Q")

    @property
    def W_K(self) -> torch.Tensor:
        return self._stacked("W_K")

    @property
    def W_V(self) -> torch.Tensor:
        return self._stacked("W_V")

    @property
    def W_O(self) -> torch.Tensor:
        return self._stacked("W_O")

    @property
    def b_Q(self) -> torch.Tensor:
        return self._stacked("b_Q")

    @property
    def b_K(self) -> torch.Tensor:
        return self._stacked("b_K")

    @property
    def b_V(self) -> torch.Tensor:
        return self._stacked("b_V")

    @property
    def b_O(self) -> torch.Tensor:
        return self._stacked("b_O")

    @property
    def W_in(self) -> torch.Tensor:
        return self._stacked("W_in")

    @property
    def W_gate(self) -> torch.Tensor | None:
        """Gated MLPs only (None otherwise, as on TL's bridge)."""
        if not getattr(self.cfg, "gated_mlp", False):
            return None
        return self._stacked("W_gate")

    @property
    def W_out(self) -> torch.Tensor:
        return self._stacked("W_out")

    @property
    def b_in(self) -> torch.Tensor:
        return self._stacked("b_in")

    @property
    def b_out(self) -> torch.Tensor:
        return self._stacked("b_out")

    # --- embeddings and unembedding -------------------------------------------------------------

    def _component(self, name: str) -> nn.Module | None:
        """The module TL calls ``name`` (``embed``, ``pos_embed``, ``unembed``, ``ln_final``,
        ``blocks.L.ln1``): the bridge's component, or the HF module it maps to."""
        if self._bridge is not None:
            try:
                return self._bridge.get_submodule(name)
            except AttributeError:
                return None
        return self._hf_components.get(name)

    @property
    def W_E(self) -> torch.Tensor:
        if self._bridge is not None:
            return self._bridge.W_E.detach()
        return self._require(self._component("embed"), "token embedding").weight.detach()

    @property
    def W_pos(self) -> torch.Tensor:
        """Learned absolute position embeddings only (rotary models have none); OPT-style tables with
        two extra leading rows are trimmed to ``n_ctx`` rows, as TL does."""
        if self._bridge is not None:
            return self._bridge.W_pos.detach()
        module = self._component("pos_embed")
        weight = getattr(module, "weight", None)
        if weight is None or weight.ndim != 2 or weight.shape[-1] != self.cfg.d_model:
            raise InputError(
                f"{self.name} has no learned absolute position embedding (W_pos); its positional "
                f"embedding type is {getattr(self.cfg, 'positional_embedding_type', 'unknown')!r}"
            )
        return weight.detach()[2:] if weight.shape[0] == self.cfg.n_ctx + 2 else weight.detach()

    @property
    def W_E_pos(self) -> torch.Tensor:
        """``[W_E; W_pos]``, ``[d_vocab + n_ctx, d_model]``: the full input basis for full circuits."""
        return torch.cat([self.W_E, self.W_pos])

    def _unembed(self) -> tuple[torch.Tensor, torch.Tensor]:
        module = self._component("unembed")
        if module is None:
            raise InputError(
                f"{self.name} has no unembedding: it outputs hidden states, not logits over a vocabulary, "
                "so W_U and b_U are not defined"
            )
        if self._bridge is not None:
            return self._bridge.W_U.detach(), self._bridge.b_U.detach()
        weight, bias = linear_in_out(module)
        zeros = torch.zeros(weight.shape[1], dtype=weight.dtype, device=weight.device)
        return weight, zeros if bias is None else bias

    @property
    def W_U(self) -> torch.Tensor:
        return self._unembed()[0]

    @property
    def b_U(self) -> torch.Tensor:
        return self._unembed()[1]

    def tokens_to_residual_directions(self, tokens: str | int | torch.Tensor) -> torch.Tensor:
        """``W_U[:, tokens]`` with ``d_model`` last: the residual direction each token's logit reads (TL's
        method of the same name). A string must be a single token. Without folded norms (plain HF
        models) this ignores the final norm's weight, as TL warns."""
        w_u = self.W_U
        if isinstance(tokens, torch.Tensor) and tokens.numel() > 1:
            return rearrange(w_u[:, tokens.to(w_u.device)], "d_model ... -> ... d_model")
        return w_u[:, self._token_index(tokens)]

    def _token_index(self, token: str | int | torch.Tensor) -> int:
        if isinstance(token, torch.Tensor) and token.numel() == 1:
            return int(token.item())
        if isinstance(token, int):
            return token
        if not isinstance(token, str):
            raise InputError(
                f"tokens must be a string, an int or an integer tensor, got {type(token).__name__}"
            )
        single = getattr(self, "to_single_token", None)
        if single is not None:
            return int(single(token))
        tokenizer = getattr(self, "tokenizer", None)
        ids = tokenizer.encode(token, add_special_tokens=False) if tokenizer is not None else []
        if len(ids) != 1:
            raise InputError(
                f"{token!r} is {len(ids)} tokens for {self.name}, not one; pass a token id instead"
            )
        return ids[0]

    # --- circuits -------------------------------------------------------------------------------

    def _expand_kv(self, w: torch.Tensor) -> torch.Tensor:
        """Grouped K/V heads repeated up to ``n_heads``: query head h reads kv head h // group (TL's bridge)."""
        heads = self.cfg.n_heads
        return w if w.shape[1] == heads else w.repeat_interleave(heads // w.shape[1], dim=1)

    @property
    def QK(self):  # -> FactoredMatrix
        """``W_Q @ W_K^T`` per head, ``FactoredMatrix [n_layers, n_heads, d_model, d_model]``."""
        from transformer_lens import FactoredMatrix

        return FactoredMatrix(self.W_Q, self._expand_kv(self.W_K).transpose(-2, -1))

    @property
    def OV(self):  # -> FactoredMatrix
        """``W_V @ W_O`` per head, ``FactoredMatrix [n_layers, n_heads, d_model, d_model]``."""
        from transformer_lens import FactoredMatrix

        return FactoredMatrix(self._expand_kv(self.W_V), self.W_O)

    def all_composition_scores(self, mode: str):  # -> CompositionScores
        """Q-, K- or V-composition score of every head pair, ``[layer, head, layer, head]``.

        TransformerLens's semantics (Elhage et al. 2021): the score of an earlier head ``(l1, h1)``
        writing into a later head ``(l2, h2)`` is ``||OV_1 M_2||_F / (||OV_1||_F ||M_2||_F)``, with
        ``M_2`` = ``QK_2`` (Q-composition), ``QK_2^T`` (K) or ``OV_2`` (V). Entries with ``l1 >= l2``
        are zero (the upper-triangular mask). Returns TL's ``CompositionScores`` (it behaves like
        the tensor and carries ``head_labels``). Compare with ``interp.methods.circuits.
        composition_baseline``: random matrices of the same shapes score about ``1/sqrt(d_model)``.
        """
        from transformer_lens.model_bridge.composition_scores import CompositionScores
        from transformer_lens.utilities import composition_scores

        if mode not in ("Q", "K", "V"):
            raise InputError(f"mode must be 'Q', 'K' or 'V', got {mode!r}")
        left = self.OV
        right = {"Q": lambda: self.QK, "K": lambda: self.QK.T, "V": lambda: left}[mode]()
        scores = composition_scores(left, right, broadcast_dims=True)
        layers = torch.arange(self.n_layers, device=scores.device)
        mask = layers[:, None, None, None] < layers[None, None, :, None]
        scores = torch.where(mask, scores, torch.zeros_like(scores))
        return CompositionScores(scores, list(range(self.n_layers)), self.all_head_labels)

    @property
    def all_head_labels(self) -> list[str]:
        """``["L0H0", "L0H1", ...]``, layer-major (a property, as on TL 4.3's bridge)."""
        return [f"L{layer}H{head}" for layer in range(self.n_layers) for head in range(self.cfg.n_heads)]

    # --- norms (used by the cache's apply_ln) -----------------------------------------------------

    def norm_module(self, layer: int | None = None, mlp_input: bool = False) -> nn.Module:
        """The norm reading the residual stream into block ``layer``'s attention (``ln1``) or MLP
        (``ln2``, ``mlp_input``), or the final norm (``layer`` None or ``n_layers``)."""
        name = (
            "ln_final"
            if layer is None or layer == self.n_layers
            else f"blocks.{layer}.ln{2 if mlp_input else 1}"
        )
        module = self._component(name)
        if module is None:
            raise InputError(f"{self.name} has no {name} (no norm reads the residual stream there)")
        return module

    def norm_scale(self, x: torch.Tensor, layer: int | None = None, mlp_input: bool = False) -> torch.Tensor:
        """What TL's ``hook_scale`` of that norm holds for input ``x``: ``sqrt(mean((x - mean x)^2) + eps)``
        for LayerNorm, ``sqrt(mean(x^2) + eps)`` for RMSNorm, shape ``[..., 1]``."""
        module = self.norm_module(layer, mlp_input)
        eps = getattr(module, "eps", None) or getattr(module, "variance_epsilon", None)
        if eps is None:
            eps = getattr(getattr(module, "config", None), "eps", None) or getattr(self.cfg, "eps", 1e-5)
        x = x - x.mean(-1, keepdim=True) if self.norm_centers(layer) else x
        return (x.pow(2).mean(-1, keepdim=True) + float(eps)).sqrt()

    def apply_norm(self, x: torch.Tensor, layer: int | None = None, mlp_input: bool = False) -> torch.Tensor:
        """That norm applied to ``x`` from its parameters (center?, divide by the scale, weight, bias).

        It never calls the module, so no hook runs. On plain HF models the formula is first checked
        against the module's own (hook-free) ``forward`` on a random sample, and an architecture
        whose norm is not of this form (Gemma's ``1 + weight``) gets a clear error instead of a wrong number.
        """
        module = self.norm_module(layer, mlp_input)
        weight, bias = (_param(module, *names) for names in (("weight", "w"), ("bias", "b")))

        def norm(v: torch.Tensor) -> torch.Tensor:
            out = (v - v.mean(-1, keepdim=True) if self.norm_centers(layer) else v) / self.norm_scale(
                v, layer, mlp_input
            )
            out = out * weight.to(v) if weight is not None else out
            return out + bias.to(v) if bias is not None else out

        if self._bridge is None:
            param = next(module.parameters(), x)
            sample = torch.randn(3, x.shape[-1], generator=torch.Generator().manual_seed(0))
            sample = sample.to(device=param.device, dtype=param.dtype)
            with torch.no_grad():
                expected = module.forward(sample)
            if not torch.allclose(norm(sample), expected, rtol=1e-4, atol=1e-5):
                raise InputError(
                    f"cannot express {self.name}'s {type(module).__name__} as a LayerNorm or RMSNorm from its "
                    "parameters, so applying it to a stack of residual components is not supported for this model"
                )
        return norm(x)

    def norm_centers(self, layer: int | None = None) -> bool:
        """Whether the norm before ``layer`` subtracts the mean (LayerNorm) or not (RMSNorm); TL's rule."""
        final = layer is None or layer == self.n_layers
        return self.cfg.normalization_type in ("LN", "LNPre") and not (
            final and getattr(self.cfg, "final_rms", False)
        )


def _param(module: nn.Module, *names: str) -> torch.Tensor | None:
    for name in names:
        value = getattr(module, name, None)
        if isinstance(value, torch.Tensor):
            return value.detach()
    return None
