"""TransformerLens's ``ActivationCache`` helpers on interp's cache: stacks of residual components.

``CacheHelpers`` is mixed into ``interp.hooks.ActivationCache``. Each method has the name,
arguments and semantics of TL 4.3's method of the same name (``accumulated_resid``,
``decompose_resid``, ``stack_head_results``, ``stack_neuron_results``, ``apply_ln_to_stack``,
``logit_attrs``, ``remove_batch_dim``), and the tests check each against TL's cache on the same
weights. They need the model the cache came from (``cache.model``, set by ``run_with_cache``) for
``n_layers``, the weights (``W_O``, ``W_out``, ``W_U``) and the norms.

Where interp differs from TL, it is because a hook TL reads is missing on a backend:

* **LayerNorm scales.** TL divides by the cached ``hook_scale`` of the norm (``ln_final``,
  ``blocks.L.ln1``/``ln2``) and raises when it is missing. interp uses the cached ``hook_scale``
  (every backend has it); when only the norm's input was captured (``blocks.L.ln1.hook_in``,
  ``ln2.hook_in``, ``ln_final.hook_in``), the scale is recomputed from it with the norm's own
  ``eps``: the same number TL's hook holds, to float rounding.
* **Per-head results.** ``blocks.L.attn.hook_result`` is used when cached; otherwise each head's
  output is computed as ``z @ W_O`` from the cached ``hook_z`` (as TL's ``compute_head_results``),
  with ``z`` either ``[batch, pos, head, d_head]`` or flattened ``[batch, pos, head * d_head]``.
* **The final norm** (``accumulated_resid(apply_ln=True)`` at the last layer) is applied from its
  parameters, never by calling the module, so no user hook runs inside a cache helper.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from einops import rearrange

from interp.errors import InputError, UnknownHookError

SliceLike = Any  # None, int, (start, stop[, step]), list/tensor of indices, slice, or TL's Slice


def _slice(value: SliceLike):
    """TL's ``Slice``: the exact slicing semantics of TL's ``pos_slice`` / ``batch_slice`` arguments."""
    from transformer_lens.utilities import Slice

    return value if isinstance(value, Slice) else Slice(value)


class CacheHelpers:
    """The residual-stream helpers of TL's ``ActivationCache`` (see the module docstring)."""

    activations: dict[str, torch.Tensor]
    grads: dict[str, torch.Tensor]
    model: Any
    has_batch_dim: bool

    # --- keys ---------------------------------------------------------------------------------

    def _model(self) -> Any:
        if self.model is None:
            raise InputError(
                "this cache does not know its model (it was built by hand); these helpers need the model's "
                "weights and norms: make it with model.run_with_cache(...) or set cache.model = model"
            )
        return self.model

    def _n_layers(self) -> int:
        return self._model().n_layers

    def _resolve(self, key: str | tuple) -> str:
        """A full hook name for ``key``: a full name, TL shorthand (``"k6"``), or TL's tuples
        ``(name, layer)`` / ``(name, layer, layer_type)`` with negative layers counted from the end,
        exactly as TL's ``utils.get_act_name``."""
        if isinstance(key, str) and key in self.activations:
            return key
        from transformer_lens.utilities import get_act_name

        if isinstance(key, str):
            full = get_act_name(key)
            if full in self.activations:
                return full
            return self._unknown(key)
        if not isinstance(key, tuple) or not key or not isinstance(key[0], str) or len(key) > 3:
            raise InputError(
                f"cache keys are names or (name, layer[, layer_type]) tuples, got {key!r}; e.g. cache['resid_post', -1]"
            )
        name, layer, *rest = (*key, None) if len(key) == 1 else key
        asked = layer
        if isinstance(layer, int) and layer < 0:
            layer += self._n_layers()
        full = get_act_name(name, layer, rest[0] if rest else None)
        if full in self.activations:
            return full
        suffix = name if name.startswith("hook_") else f"hook_{name}"
        hits = [n for n in self.activations if n.endswith(suffix) and _layer_of(n) == layer]
        if len(hits) == 1:
            return hits[0]
        return self._unknown(full, layer, asked)

    def _unknown(self, full: str, layer: int | None = None, asked: Any = None) -> str:
        from interp.hooks import _unknown_message

        n_layers = getattr(self.model, "n_layers", None)
        if layer is not None and n_layers is not None and not 0 <= layer < n_layers:
            raise UnknownHookError(
                f"layer {asked} does not exist: "
                f"{getattr(self.model, 'name', 'the model')} has {n_layers} layers (0..{n_layers - 1}, or -1..-{n_layers})"
            )
        template = _template(full)
        layers = sorted({_layer_of(n) for n in self.activations if _template(n) == template} - {None})
        if layers:
            raise UnknownHookError(
                f"{full!r} is not in this cache; {template!r} is cached for layers {layers} only"
            )
        raise UnknownHookError(
            _unknown_message(full, list(self.activations))
            + " If the model has it, capture it with names=[...]."
        )

    # --- batch --------------------------------------------------------------------------------

    def remove_batch_dim(self) -> CacheHelpers:
        """Drop the leading batch axis of a one-prompt cache, in place (returns the cache, as TL).

        Entries whose first axis is not 1 (none in interp's caches) are left alone.
        """
        if not self.has_batch_dim:
            raise InputError(
                "this cache has no batch dimension any more (remove_batch_dim was already called)"
            )
        sizes = {t.shape[0] for t in self.activations.values() if t.ndim > 0}
        if sizes - {1}:
            raise InputError(
                f"remove_batch_dim needs a cache of one prompt, but it holds batch sizes {sorted(sizes)}; "
                "index the prompt first, e.g. run_with_cache(tokens[:1])"
            )
        for store in (self.activations, self.grads):
            for name, value in store.items():
                if value.ndim > 0 and value.shape[0] == 1:
                    store[name] = value[0]
        self.has_batch_dim = False
        return self

    # --- the residual stream --------------------------------------------------------------------

    def accumulated_resid(
        self,
        layer: int | None = None,
        incl_mid: bool = False,
        apply_ln: bool = False,
        pos_slice: SliceLike = None,
        mlp_input: bool = False,
        return_labels: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, list[str]]:
        """The residual stream before each layer up to ``layer`` (default: all, plus the final one),
        ``[component, *batch_and_pos, d_model]`` with labels ``"0_pre"``, ``"0_mid"``, ``"final_post"``.

        ``apply_ln`` at the last layer applies the final norm to each entry with its own statistics
        (the logit lens, TL's ``recompute_ln``); at an earlier layer it divides by that layer's ln1
        (``mlp_input``: ln2) scale, as TL.
        """
        n_layers = self._n_layers()
        layer = n_layers if layer is None or layer == -1 else layer
        pos = _slice(pos_slice)
        parts, labels = [], []
        for i in range(layer + 1):
            if i == n_layers:
                parts.append(self["resid_post", n_layers - 1])
                labels.append("final_post")
                continue
            parts.append(self["resid_pre", i])
            labels.append(f"{i}_pre")
            if (incl_mid and i < layer) or (mlp_input and i == layer):
                parts.append(self["resid_mid", i])
                labels.append(f"{i}_mid")
        stack = torch.stack([pos.apply(p, dim=-2) for p in parts])
        if apply_ln:
            stack = self.apply_ln_to_stack(
                stack,
                layer,
                pos_slice=pos,
                mlp_input=mlp_input,
                has_batch_dim=self.has_batch_dim,
                recompute_ln=layer == n_layers,
            )
        return (stack, labels) if return_labels else stack

    def decompose_resid(
        self,
        layer: int | None = None,
        mlp_input: bool = False,
        mode: Literal["all", "mlp", "attn"] = "all",
        apply_ln: bool = False,
        pos_slice: SliceLike = None,
        incl_embeds: bool = True,
        return_labels: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, list[str]]:
        """The residual stream into ``layer`` as the stack of what wrote it: ``embed``, ``pos_embed``,
        then ``"{L}_attn_out"`` and ``"{L}_mlp_out"`` per layer (``mode`` keeps one kind)."""
        if mode not in ("all", "mlp", "attn"):
            raise InputError(f"mode must be 'all', 'mlp' or 'attn', got {mode!r}")
        model = self._model()
        layer = model.n_layers if layer is None or layer == -1 else layer
        pos = _slice(pos_slice)
        incl_attn = mode != "mlp"
        incl_mlp = mode != "attn" and not getattr(model.cfg, "attn_only", False)
        parts, labels = [], []
        if incl_embeds:
            for name, label in (("hook_embed", "embed"), ("hook_pos_embed", "pos_embed")):
                if name in self.activations:
                    parts.append(self[name])
                    labels.append(label)
        for i in range(layer):
            if incl_attn:
                parts.append(self["attn_out", i])
                labels.append(f"{i}_attn_out")
            if incl_mlp:
                parts.append(self["mlp_out", i])
                labels.append(f"{i}_mlp_out")
        if mlp_input and incl_attn:
            parts.append(self["attn_out", layer])
            labels.append(f"{layer}_attn_out")
        # broadcast: HF GPT-2 computes its position embeddings once for the batch ([1, pos, d_model])
        stack = torch.stack(torch.broadcast_tensors(*[pos.apply(p, dim=-2) for p in parts]))
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos, mlp_input=mlp_input)
        return (stack, labels) if return_labels else stack

    def head_results(self, layer: int) -> torch.Tensor:
        """Each head's write into the residual stream at ``layer``, ``[*batch, pos, head, d_model]``:
        the cached ``hook_result`` if present, else ``z @ W_O`` per head (no ``b_O``, as TL)."""
        model = self._model()
        n_heads, want_ndim = model.cfg.n_heads, 4 if self.has_batch_dim else 3
        cached = self.activations.get(f"blocks.{layer}.attn.hook_result")
        if cached is not None and cached.ndim == want_ndim and cached.shape[-2] == n_heads:
            return cached
        z = self["z", layer, "attn"]
        if z.ndim == want_ndim - 1:  # flattened heads: [..., pos, head * d_head]
            z = rearrange(z, "... (head d_head) -> ... head d_head", head=n_heads)
        w_o = model.W_O[layer].to(z.device)
        dtype = torch.promote_types(z.dtype, w_o.dtype)
        return torch.einsum("...hd,hdm->...hm", z.to(dtype), w_o.to(dtype))

    def compute_head_results(self) -> None:
        """Store every layer's per-head output under ``blocks.L.attn.hook_result`` (TL's method): after
        it, ``cache["result", L]`` works as in TL. Existing entries are kept."""
        for layer in range(self._n_layers()):
            self.activations[f"blocks.{layer}.attn.hook_result"] = self.head_results(layer)

    def stack_activation(
        self, activation_name: str, layer: int = -1, sublayer_type: str | None = None
    ) -> torch.Tensor:
        """``cache[activation_name, l, sublayer_type]`` for every layer before ``layer`` (default all),
        stacked on a new leading axis (TL's method)."""
        layer = self._n_layers() if layer is None or layer == -1 else layer
        return torch.stack([self[activation_name, i, sublayer_type] for i in range(layer)])

    def stack_head_results(
        self,
        layer: int = -1,
        return_labels: bool = False,
        incl_remainder: bool = False,
        pos_slice: SliceLike = None,
        apply_ln: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, list[str]]:
        """Every head's output in layers before ``layer`` (default: all), ``[layer*head, *batch_and_pos,
        d_model]`` labelled ``"L0H0"``...; ``incl_remainder`` appends the rest of ``resid_post``."""
        model = self._model()
        layer = model.n_layers if layer is None or layer == -1 else layer
        pos = _slice(pos_slice)
        labels = [f"L{i}H{h}" for i in range(layer) for h in range(model.cfg.n_heads)]
        heads = [pos.apply(self.head_results(i), dim=-3) for i in range(layer)]
        if heads:
            stack = rearrange(torch.cat(heads, dim=-2), "... component d_model -> component ... d_model")
        else:
            stack = self._empty_stack(pos)
        if incl_remainder:
            stack, labels = self._with_remainder(
                stack, labels, pos.apply(self["resid_post", layer - 1], dim=-2)
            )
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos)
        return (stack, labels) if return_labels else stack

    def stack_neuron_results(
        self,
        layer: int,
        pos_slice: SliceLike = None,
        neuron_slice: SliceLike = None,
        return_labels: bool = False,
        incl_remainder: bool = False,
        apply_ln: bool = False,
        mlp_input: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, list[str]]:
        """Every MLP neuron's write (``post[n] * W_out[n]``) in layers before ``layer``,
        ``[layer*neuron, *batch_and_pos, d_model]`` labelled ``"L0N0"``...

        ``incl_remainder`` appends the rest of the stream the stack feeds: ``resid_mid`` of
        ``layer`` with ``mlp_input``, else ``resid_post`` of ``layer - 1`` (TL's rule).
        """
        from transformer_lens.utilities import Slice

        model = self._model()
        layer = model.n_layers if layer is None or layer == -1 else layer
        if incl_remainder and layer < 0:
            raise InputError(
                f"layer must be >= 0 with incl_remainder=True (-1/None mean all layers); got {layer}"
            )
        neurons = Slice.unwrap(neuron_slice)
        neurons = Slice([neurons.slice]) if neurons.mode == "int" else neurons  # never collapse the axis
        pos = _slice(pos_slice)
        d_mlp = model.cfg.d_mlp
        labels = [
            f"L{i}N{n}" for i in range(layer) for n in neurons.apply(torch.arange(d_mlp), dim=0).tolist()
        ]
        parts = []
        for i in range(layer):
            post = neurons.apply(pos.apply(self["post", i, "mlp"], dim=-2), dim=-1)
            w_out = neurons.apply(model.W_out[i].to(post.device), dim=0)
            parts.append(post[..., None] * w_out)
        if parts:
            stack = rearrange(torch.cat(parts, dim=-2), "... component d_model -> component ... d_model")
        else:
            stack = self._empty_stack(pos)
        if incl_remainder:
            target = self["resid_mid", layer] if mlp_input else self["resid_post", layer - 1]
            stack, labels = self._with_remainder(stack, labels, pos.apply(target, dim=-2))
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos, mlp_input=mlp_input)
        return (stack, labels) if return_labels else stack

    def _empty_stack(self, pos) -> torch.Tensor:
        """A stack of no components, shaped like one residual entry (TL: from ``hook_embed``)."""
        embed = pos.apply(self["hook_embed"], dim=-2)
        return torch.zeros(0, *embed.shape, dtype=embed.dtype, device=embed.device)

    @staticmethod
    def _with_remainder(
        stack: torch.Tensor, labels: list[str], total: torch.Tensor
    ) -> tuple[torch.Tensor, list[str]]:
        remainder = total - stack.sum(0) if len(stack) else total
        return torch.cat([stack, remainder[None]]), [*labels, "remainder"]

    # --- norms and logits -----------------------------------------------------------------------

    def apply_ln_to_stack(
        self,
        residual_stack: torch.Tensor,
        layer: int | None = None,
        mlp_input: bool = False,
        pos_slice: SliceLike = None,
        batch_slice: SliceLike = None,
        has_batch_dim: bool = True,
        recompute_ln: bool = False,
    ) -> torch.Tensor:
        """Treat each component of ``residual_stack`` as input to the norm before ``layer``
        (``n_layers``/None/-1: the final norm; ``mlp_input``: ln2) and scale it as that norm scaled
        the whole stream: center (LayerNorm) and divide by the stream's scale. Like TL this applies
        no norm weight or bias (TL assumes they are folded into the next weights); ``recompute_ln``
        at the final layer instead applies the full final norm to each component on its own.

        ``pos_slice`` / ``batch_slice`` say which positions / prompts the stack holds; the scale is
        sliced to match. See the module docstring for where the scale comes from.
        """
        model = self._model()
        layer = model.n_layers if layer is None or layer == -1 else layer
        pos, batch = _slice(pos_slice), _slice(batch_slice)
        if has_batch_dim:
            residual_stack = batch.apply(residual_stack, dim=1)
        if model.cfg.normalization_type not in ("LN", "LNPre", "RMS", "RMSPre"):
            return residual_stack
        self._check_pre_norm(layer)
        if recompute_ln and layer == model.n_layers:
            return self._final_norm(residual_stack)
        if model.norm_centers(layer):
            residual_stack = residual_stack - residual_stack.mean(-1, keepdim=True)
        scale = pos.apply(self._norm_scale(layer, mlp_input), dim=-2)
        if self.has_batch_dim:
            scale = batch.apply(scale)
        return residual_stack / scale

    def _norm_scale(self, layer: int, mlp_input: bool) -> torch.Tensor:
        """The norm's ``hook_scale``: cached, else recomputed from the norm's cached input."""
        model = self._model()
        norm = "ln_final" if layer == model.n_layers else f"blocks.{layer}.ln{2 if mlp_input else 1}"
        if f"{norm}.hook_scale" in self.activations:
            return self.activations[f"{norm}.hook_scale"]
        if f"{norm}.hook_in" in self.activations:
            return model.norm_scale(self.activations[f"{norm}.hook_in"], layer, mlp_input)
        raise InputError(
            f"apply_ln needs the scale of {norm}: capture {norm}.hook_scale or {norm}.hook_in "
            "(run_with_cache with no names captures both where they exist)"
        )

    def _check_pre_norm(self, layer: int) -> None:
        model = self._model()
        order = {name: i for i, name in enumerate(model.hook_names)}
        ln1, attn = order.get("blocks.0.ln1.hook_in"), order.get("blocks.0.attn.hook_in")
        post_norm = ln1 is not None and attn is not None and ln1 > attn
        if post_norm or (layer == model.n_layers and "ln_final.hook_in" not in order):
            raise InputError(
                f"{model.name} normalizes after each sublayer (post-LN, like BERT) or has no final norm, so no "
                "norm reads a sum of residual components and apply_ln is not defined; use apply_ln=False"
            )

    def _final_norm(self, stack: torch.Tensor) -> torch.Tensor:
        """The final norm applied to each component with its own statistics (from its parameters:
        no hook runs)."""
        return self._model().apply_norm(stack, None)

    def logit_attrs(
        self,
        residual_stack: torch.Tensor,
        tokens: Any,
        incorrect_tokens: Any = None,
        pos_slice: SliceLike = None,
        batch_slice: SliceLike = None,
        has_batch_dim: bool = True,
    ) -> torch.Tensor:
        """Each component's direct contribution to the logit of ``tokens`` (minus ``incorrect_tokens``):
        the final-norm-scaled component (``apply_ln_to_stack(layer=-1)``) dotted with ``W_U[:, token]``.

        ``tokens``: a string or id, a ``[batch]`` tensor (one per prompt), a 1-d tensor of another
        length (one per position), or ``[batch, pos]``, as TL. Like TL, no ``b_U`` and no norm weight.
        """
        model = self._model()
        correct = model.tokens_to_residual_directions(tokens)
        if incorrect_tokens is not None:
            shape = _token_shape(tokens, model._token_index)
            if shape != _token_shape(incorrect_tokens, model._token_index):
                raise InputError(
                    f"tokens and incorrect_tokens must have the same shape, got {tuple(shape)} and "
                    f"{tuple(_token_shape(incorrect_tokens, model._token_index))}"
                )
            correct = correct - model.tokens_to_residual_directions(incorrect_tokens)
        scaled = self.apply_ln_to_stack(
            residual_stack,
            layer=-1,
            pos_slice=pos_slice,
            batch_slice=batch_slice,
            has_batch_dim=has_batch_dim,
        )
        if (
            has_batch_dim
            and _slice(batch_slice).mode != "int"
            and scaled.ndim == 4
            and correct.ndim == 2
            and correct.shape[0] == scaled.shape[1]
        ):
            correct = correct.unsqueeze(-2)  # one direction per prompt, broadcast over positions
        return (scaled * correct.to(scaled.device)).sum(-1)


def _token_shape(tokens: Any, to_id) -> torch.Size:
    if isinstance(tokens, torch.Tensor):
        return tokens.shape
    return torch.as_tensor(to_id(tokens)).shape


def _layer_of(name: str) -> int | None:
    from interp.hooks import layer_of

    return layer_of(name)


def _template(name: str) -> str:
    import re

    return re.sub(r"^blocks\.\d+\.", "blocks.{L}.", name)
