"""Reuse along the sequence axis: run only positions ``s..`` of an input, the rest from its cached run.

In a causal model a change at position ``p`` leaves every position before ``p`` as it was. A
patching sweep runs the corrupted input many times, each patch at some position ``>= s``; all its
positions before ``s`` equal the plain corrupted run. So those runs can feed the model only the
tokens ``s..n-1`` and let attention read the keys and values of positions ``< s`` from one cached run
of the same input. Every hook then holds the last ``n - s`` positions (keys and values on HF models
hold all ``n``: HF concatenates its cache before the attention hooks), and the output covers
positions ``s..n-1``.

* HF models: a ``DynamicCache`` built from that run's keys and values, passed to the HF forward
  (position ids follow from the cache length, as in generation).
* Native bridges (``boot_native``): each attention runs a copy of ``NativeAttention.forward`` that
  prepends the cached keys and values and offsets the causal mask and positions. It reads the
  number of rows from each tensor rather than from its input, and a tensor holding one copy
  broadcasts against one holding stacked copies, so copies can be stacked at q, k, v or the
  pattern alone (``TransformerModel.tiling_plans``), which the original cannot; sweeps therefore
  run through it from position 0 too. While a route is active (a sweep's forwards, no user
  hooks), a LayerNorm whose ``hook_scale``/``hook_normalized`` are unhooked runs as one
  ``layer_norm`` kernel, an attention whose pattern nobody hooks as ``scaled_dot_product_attention``,
  and unhooked q/k/v/o projections without the bridge's wrapper: the same functions (to ~1e-7),
  with the per-copy elementwise passes and per-call Python of TransformerLens's bridge left out.
  The bridge's own forward (``TransformerBridge.forward``, its driver, ``BlockBridge``) is
  replaced too: each component without a hook in it runs as plain torch ops, each one with a
  hook is called through the bridge (``_plain_bridge_forward``). Inside ``NativeSuffix.querying``
  its last block computes queries, MLP, final norm and unembedding only at the rows a metric reads.
* On HF models the route's forwards run GPT-2's ``gelu_new`` as one fused kernel (``_fused_gelu``).

A route is used only after ``SuffixRoute.exact`` has checked on the input itself that the model is
causal and that a run from the middle equals the full run's tail; anything else keeps the full
forward.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import Any

import torch
from einops import rearrange
from torch import nn

TOLERANCE = 1e-5


class SuffixRoute:
    """Runs positions ``s..`` of one prepared input (``Tokens``) with its earlier keys/values cached."""

    def __init__(self, model: Any, prepared: Any) -> None:
        self.model = model
        self.prepared = prepared
        self.n_pos = int(prepared.input_ids.shape[1])
        self.output: torch.Tensor | None = None  # the full run's output, from the capture

    def exact(self) -> bool:
        """Whether the route's full run is the model's (native: its copy of the attention), the model
        is causal (a change at the last token changes no earlier output), and a run from the middle
        reproduces the full run's tail."""
        if self.n_pos < 2:
            return False
        try:
            full = self.capture()
            with self.model._lock, torch.no_grad():
                plain = self.model._forward(self.prepared)
            s = self.n_pos // 2
            with self.model._lock, torch.no_grad(), self.active(s) as tail_input:
                tail = self.model._forward(tail_input)
            changed = self._with_last_token_changed()
        except (RuntimeError, ValueError, IndexError, TypeError, NotImplementedError):
            return False
        scale = float(full.abs().max().clamp_min(1.0))
        same_full = torch.allclose(full, plain, rtol=1e-4, atol=TOLERANCE * scale)
        causal = torch.allclose(changed[:, :-1], full[:, :-1], rtol=1e-4, atol=TOLERANCE * scale)
        same_tail = tail.shape == full[:, s:].shape and torch.allclose(
            tail, full[:, s:], rtol=1e-4, atol=TOLERANCE * scale
        )
        return bool(same_full and causal and same_tail)

    def _with_last_token_changed(self) -> torch.Tensor:
        ids = self.prepared.input_ids.clone()
        vocab = getattr(self.model, "d_vocab", None) or int(ids.max()) + 2
        ids[:, -1] = (ids[:, -1] + 1) % vocab
        with self.model._lock, torch.no_grad():
            return self.model._forward(type(self.prepared)(ids, self.prepared.attention_mask, None))

    def capture(self) -> torch.Tensor:
        """Run the full input once and keep what later positions need (keys and values)."""
        raise NotImplementedError

    @contextmanager
    def recording(self, rows: slice):
        """Let a forward inside (whose rows ``rows`` are this input) stand in for ``capture``;
        ``captured(output)`` then finishes it. Routes that cannot record capture on their own."""
        yield

    def captured(self, output: torch.Tensor) -> None:
        """After ``recording``: ``output`` is this input's output in that forward."""
        self.capture()

    @contextmanager
    def active(self, s: int):
        """Forwards inside run positions ``s..`` only; yields the input to give them. Enter it with
        the model's lock held: it changes the shared module for the duration."""
        raise NotImplementedError
        yield

    def tail_input(self, s: int) -> Any:
        ids = self.prepared.input_ids[:, s:]
        return type(self.prepared)(ids, self.prepared.attention_mask, None)


def suffix_route(model: Any, prepared: Any) -> SuffixRoute | None:
    """The route for this model kind, if there is one (and the input is unpadded)."""
    mask = getattr(prepared, "attention_mask", None)
    if mask is not None and not bool(mask.all()):
        return None
    kind = type(model).__name__
    if kind == "HFTransformer":
        return HFSuffix(model, prepared)
    if kind == "NativeTransformer":
        return NativeSuffix(model, prepared)
    return None


# ------------------------------------------------------------------------------------------------
# Hugging Face: a DynamicCache of the cached keys and values
# ------------------------------------------------------------------------------------------------


def _prefix_cache_class():
    from transformers import DynamicCache

    class PrefixCache(DynamicCache):
        """A cache of one run's prefix that also serves copies stacked mid-forward (batch k * b):
        a layer's cached rows are repeated to the batch that reaches it."""

        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            layer = self.layers[layer_idx] if layer_idx < len(self.layers) else None
            if layer is not None and layer.keys is not None and layer.keys.shape[0] != key_states.shape[0]:
                copies = key_states.shape[0] // layer.keys.shape[0]
                layer.keys = layer.keys.repeat(copies, 1, 1, 1)
                layer.values = layer.values.repeat(copies, 1, 1, 1)
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    return PrefixCache


class HFSuffix(SuffixRoute):
    def capture(self) -> torch.Tensor:
        n_layers = self.model.n_layers
        names = [f"blocks.{i}.attn.hook_{kv}" for i in range(n_layers) for kv in ("k", "v")]
        output, cache = self.model.run_with_cache(self.prepared, names=names)
        self.keys = [
            rearrange(cache[f"blocks.{i}.attn.hook_k"], "b p h d -> b h p d") for i in range(n_layers)
        ]
        self.values = [
            rearrange(cache[f"blocks.{i}.attn.hook_v"], "b p h d -> b h p d") for i in range(n_layers)
        ]
        self.output = output
        params = inspect.signature(self.model.module.forward).parameters
        self.cache_kwarg = "cache" if "cache" in params else "past_key_values"
        return output

    @contextmanager
    def active(self, s: int):
        with _fused_gelu(self.model.module):
            if s == 0:  # nothing to reuse: HF's own forward
                yield self.prepared
                return
            with self._cached_prefix(s):
                yield self.tail_input(s)

    @contextmanager
    def _cached_prefix(self, s: int):
        cache_class = _prefix_cache_class()

        def add_cache(module: nn.Module, args: tuple, kwargs: dict):
            cache = cache_class()
            for layer, (k, v) in enumerate(zip(self.keys, self.values, strict=True)):
                cache.update(k[:, :, :s], v[:, :, :s], layer)
            return args, {**kwargs, self.cache_kwarg: cache}

        handle = self.model.module.register_forward_pre_hook(add_cache, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()


def _tanh_gelu(x: torch.Tensor) -> torch.Tensor:
    return nn.functional.gelu(x, approximate="tanh")


@contextmanager
def _fused_gelu(module: nn.Module):
    """Inside: each HF ``NewGELUActivation`` (GPT-2's ``gelu_new``, the tanh-approximated GELU in
    five elementwise passes, ~12% of a GPT-2 small forward on CPU) runs as one
    ``gelu(approximate="tanh")`` kernel: the same function, equal to ~1e-7. Module hooks on the
    activation still fire (they wrap ``forward``); ``SuffixRoute.exact`` compares the route's runs
    with the model's own forward."""
    from transformers.activations import NewGELUActivation

    acts = [m for m in module.modules() if type(m) is NewGELUActivation and "forward" not in m.__dict__]
    for act in acts:
        act.forward = _tanh_gelu
    try:
        yield
    finally:
        for act in acts:
            del act.forward


# ------------------------------------------------------------------------------------------------
# Native bridges: NativeAttention with cached keys and values in front
# ------------------------------------------------------------------------------------------------


class NativeSuffix(SuffixRoute):
    _structure: tuple[list[nn.Module], Any] | None = None  # (fast norms, plain forward), built once

    def __init__(self, model: Any, prepared: Any) -> None:
        super().__init__(model, prepared)
        # "rows": set by ``querying``; "now": set by the plain forward around the last attention
        self._queries: dict[str, torch.Tensor | None] = {"rows": None, "now": None}

    @contextmanager
    def querying(self, rows: torch.Tensor):
        """Inside ``active``: the last block computes queries, its MLP, the final norm and the
        unembedding only at the tail's rows ``rows`` (keys and values at every position, where
        hooks on them see every position), where nothing else is hooked from the last block's
        attention on; the output then holds those positions. Exact for a metric that reads only
        them (``Metric.positions_used``)."""
        self._queries["rows"] = rows
        try:
            yield
        finally:
            self._queries["rows"] = None

    def _attentions(self) -> list[nn.Module]:
        return [block.attn.original_component for block in self.model.bridge.blocks]

    def capture(self) -> torch.Tensor:
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        with self.model._lock, self._replaced(0, record=True), torch.no_grad():
            self.output = self.model._forward(self.prepared)
        return self.output

    @contextmanager
    def recording(self, rows: slice):
        self.keys, self.values = [], []
        with self.model._lock, self._replaced(0, record=True):
            yield
        self.keys = [k[rows] for k in self.keys]
        self.values = [v[rows] for v in self.values]

    def captured(self, output: torch.Tensor) -> None:
        self.output = output

    @contextmanager
    def active(self, s: int):
        tail = self.tail_input(s)
        positions = torch.arange(s, self.n_pos, device=tail.input_ids.device)
        with self._replaced(s, record=False), _with_position_ids(self.model, positions):
            yield tail

    def _norms(self) -> list[nn.Module]:
        """The bridge's LayerNorm components that ``_fast_norm`` can run (others keep their forward)."""
        bridge = self.model.bridge
        norms = [getattr(block, name, None) for block in bridge.blocks for name in ("ln1", "ln2")]
        norms.append(getattr(bridge, "ln_final", None))
        return [norm for norm in norms if norm is not None and _fast_norm_applies(norm)]

    @contextmanager
    def _replaced(self, s: int, record: bool):
        attentions = self._attentions()
        if self._structure is None:  # one sweep's forwards share the modules
            norms = self._norms()
            self._structure = norms, _plain_bridge_forward(self.model.bridge, norms, self._queries)
        norms, plain = self._structure
        for layer, attention in enumerate(attentions):
            attention.forward = self._forward_for(attention, layer, s, record)
        for norm in norms:  # past GeneralizedComponent.__setattr__, which passes names to the wrapped module
            object.__setattr__(norm, "forward", _fast_norm(norm))
        bridge = self.model.bridge
        if plain is not None:
            object.__setattr__(bridge, "forward", plain)
        try:
            yield
        finally:
            for attention in attentions:
                del attention.forward
            for norm in norms:
                norm.__dict__.pop("forward", None)
            bridge.__dict__.pop("forward", None)

    def _forward_for(self, att: nn.Module, layer: int, s: int, record: bool):
        """``NativeAttention.forward`` (TransformerLens 4.3) with positions ``< s`` from the cache."""
        from transformer_lens.model_bridge.sources.native.model import apply_softcap

        bridges = self.model.bridge.blocks  # the attention bridge of each layer: ``bridges[layer].attn``

        last = layer == len(bridges) - 1

        def forward(hidden_states, attention_mask=None, position_ids=None, pattern_fn=None, **kwargs):
            if attention_mask is not None and not bool(attention_mask.all()):
                raise NotImplementedError("padded inputs keep the full forward")
            seq = hidden_states.shape[1]  # rows are read from each tensor: copies may be stacked at q/k/v
            # the plain forward's last block under ``querying``: queries at these tail rows only
            rows = self._queries["now"] if last else None
            queried = hidden_states if rows is None else hidden_states[:, rows]
            q = _linear(att.q, queried).unflatten(-1, (att.n_heads, att.d_head)).transpose(1, 2)
            k = _linear(att.k, hidden_states).unflatten(-1, (att.n_kv_heads, att.d_head)).transpose(1, 2)
            v = _linear(att.v, hidden_states).unflatten(-1, (att.n_kv_heads, att.d_head)).transpose(1, 2)
            if att.rotary is not None:
                q, k = att.rotary.apply_rope(q, k, position_ids=position_ids)
            if record:
                self.keys.append(k.detach())
                self.values.append(v.detach())
            elif s > 0:
                k = _prepend(self.keys[layer][:, :, :s], k)
                v = _prepend(self.values[layer][:, :, :s], v)
            if att.kv_repeats > 1:
                k = k.repeat_interleave(att.kv_repeats, dim=1)
                v = v.repeat_interleave(att.kv_repeats, dim=1)
            if not att.causal:
                raise NotImplementedError("bidirectional attention: every position depends on every other")
            masked = (
                att.causal_mask[s : s + seq, : s + seq]
                if rows is None
                else att.causal_mask[s + rows, : s + seq]
            )
            if _fused_attention_applies(att, bridges[layer], pattern_fn, q, k):
                # nothing reads the pattern: one fused kernel (equal to the steps below to ~1e-7)
                visible = ~masked
                z = nn.functional.scaled_dot_product_attention(
                    q, k, v, attn_mask=visible, scale=1 / att.scale
                )
                return _linear(att.o, z.transpose(1, 2).flatten(-2)), None
            scores = apply_softcap(_rows_matmul(q, k.transpose(-2, -1)) / att.scale, att.attn_scores_soft_cap)
            # no padding (checked above), so every row keeps its diagonal and softmax leaves masked
            # entries at exactly 0: the original's second masked_fill is a no-op here
            pattern = torch.softmax(scores.masked_fill_(masked, float("-inf")), -1)
            if pattern_fn is not None:
                pattern = pattern_fn(pattern)
            z = _rows_matmul(pattern, v).transpose(1, 2).flatten(-2)
            return _linear(att.o, z), pattern

        return forward


def _plain_bridge_forward(bridge: nn.Module, norms: list[nn.Module], queries: dict | None = None):
    """The bridge's forward as plain torch ops around its hooked parts, or None where it does not apply.

    TransformerLens's bridge spends ~1-2 ms of Python per forward (``TransformerBridge.forward``,
    its driver, ``BlockBridge``'s kwarg filtering, every component's wrapper) on top of ~0.2-0.4 ms
    of arithmetic for a small model, and a sweep pays it once per forward. This forward runs
    ``NativeModel.forward``'s steps itself: each component (embedding, positional embedding, a
    block's norms, attention and MLP, final norm, unembedding) whose subtree carries no hook runs
    as the torch ops it computes, and each one that carries any (a splice, a tiling hook, a
    capture, a view's) is called through the bridge as before, so every hook fires where and how
    it does there; a block's ``hook_in``/``hook_out`` fire when hooked. Any other call (kwargs,
    embeddings as input, padding, a global hook) takes the bridge's own forward. Used only inside
    a route (``SuffixRoute.exact`` compares the route's full run with the model's forward)."""
    from transformer_lens.model_bridge.sources.native.model import NativeBlock, apply_softcap

    driver = getattr(bridge, "_driver", None)
    native = getattr(driver, "underlying_model", None)
    if type(native).__name__ != "NativeModel" or not hasattr(bridge, "blocks"):
        return None
    blocks = list(bridge.blocks)
    if (
        native.tok_embed is not bridge.embed
        or getattr(bridge.embed, "_output_contribution_scale", 1.0) != 1.0
        or type(bridge.embed._modules.get("_original_component")) is not nn.Embedding
        or (native.pos is not None and native.pos is not bridge.pos_embed)
        or native.ln_out is not bridge.ln_final
        or native.head is not bridge.unembed
        or len(blocks) != len(native.layers)
        or any(type(block._modules.get("_original_component")) is not NativeBlock for block in blocks)
    ):
        return None
    fast = set(map(id, norms))
    subtree = {
        id(m): list(m.modules()) for m in (bridge.embed, bridge.pos_embed, bridge.ln_final, bridge.unembed)
    }
    for block in blocks:
        inner = block.original_component
        for part in (inner.ln1, inner.attn, getattr(inner, "ln2", None), getattr(inner, "mlp", None)):
            if part is not None:
                subtree[id(part)] = list(part.modules())
    original = type(bridge).forward
    embed = bridge.embed.original_component
    pos = None if native.pos is None else native.pos.original_component
    unembed = bridge.unembed.original_component
    cap = native.output_logits_soft_cap

    def hooked(component: nn.Module) -> bool:
        return any(map(_has_hooks, subtree[id(component)]))

    def norm(component: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if id(component) in fast and x.dtype == torch.float32 and not hooked(component):
            inner = component._modules["_original_component"]
            return nn.functional.layer_norm(x, (x.shape[-1],), inner.weight, inner.bias, component.config.eps)
        return component(x)

    def block_forward(block: nn.Module, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        inner = block.original_component
        if _has_hooks(block) or _has_hooks(inner):  # module hooks on the block itself: its own call
            return block(x, attention_mask=None, position_ids=position_ids)[0]
        x = _point(block.hook_in, x)
        attention = inner.attn
        h = norm(inner.ln1, x)
        if hooked(attention):
            out, _ = attention(h, attention_mask=None, position_ids=position_ids)
        else:  # the route's NativeAttention.forward, as AttentionBridge would call it, minus its hooks
            out, _ = attention.original_component(h, attention_mask=None, position_ids=position_ids)
        x = x + out
        if not inner.cfg.attn_only:
            mlp = inner.mlp
            x = x + (mlp(norm(inner.ln2, x)) if hooked(mlp) else mlp.original_component(norm(inner.ln2, x)))
        return _point(block.hook_out, x)

    def narrowable(block: nn.Module) -> bool:
        """Nothing that sees the last block's query side hooked (its attention's queries, scores,
        pattern, z, output; MLP; block output; final norm; unembedding): hooks on its input, first
        norm, keys and values see every position as ever. No rotary embeddings or soft cap."""
        from transformer_lens.utilities.activation_functions import softcap_enabled

        inner = block.original_component
        bridge_attn = inner.attn
        att = bridge_attn.original_component
        if not all(hasattr(getattr(att, n, None), "original_component") for n in ("q", "k", "v", "o")):
            return False
        full_rows = {id(m) for part in (att.k, att.v) for m in part.modules()} | {id(bridge_attn.hook_in)}
        attention_query_side = [m for m in bridge_attn.modules() if id(m) not in full_rows]
        later = (getattr(inner, "ln2", None), getattr(inner, "mlp", None), bridge.ln_final, bridge.unembed)
        return (
            not any(map(_has_hooks, attention_query_side))
            and not any(hooked(part) for part in later if part is not None)
            and not any(map(_has_hooks, (block, inner, block.hook_out)))
            and getattr(att, "rotary", None) is None
            and att.causal
            and not softcap_enabled(att.attn_scores_soft_cap)
        )

    def last_block_at(block: nn.Module, x: torch.Tensor, position_ids: torch.Tensor, rows: torch.Tensor):
        inner = block.original_component
        x = _point(block.hook_in, x)
        h = norm(inner.ln1, x)
        attention = inner.attn
        queries["now"] = rows
        try:
            if hooked(attention):  # its input or keys/values: through the bridge, which fires them
                out, _ = attention(h, attention_mask=None, position_ids=position_ids)
            else:
                out, _ = attention.original_component(h, attention_mask=None, position_ids=position_ids)
        finally:
            queries["now"] = None
        x = x[:, rows] + out
        if not inner.cfg.attn_only:
            x = x + inner.mlp.original_component(norm(inner.ln2, x))
        return x

    def forward(input=None, attention_mask=None, position_ids=None, **kwargs):
        plain = (
            not kwargs
            and isinstance(input, torch.Tensor)
            and input.ndim == 2
            and not input.is_floating_point()
            and (attention_mask is None or bool(attention_mask.all()))
            and not _global_hooks()
            and not _has_hooks(native)
        )
        if not plain:
            return original(bridge, input, attention_mask=attention_mask, position_ids=position_ids, **kwargs)
        batch, seq = input.shape
        if position_ids is None:
            position_ids = torch.arange(seq, device=input.device).unsqueeze(0).expand(batch, -1)
        x = bridge.embed(input) if hooked(bridge.embed) else embed(input)
        if pos is not None:
            if hooked(bridge.pos_embed):
                bridge.pos_embed._current_batch_size = batch
                x = x + bridge.pos_embed(position_ids)
            else:
                x = x + pos(position_ids)
        rows = None if queries is None else queries["rows"]
        for block in blocks[:-1]:
            x = block_forward(block, x, position_ids)
        if rows is not None and narrowable(blocks[-1]):
            x = last_block_at(blocks[-1], x, position_ids, rows.to(x.device))
        else:
            x = block_forward(blocks[-1], x, position_ids)
        x = norm(bridge.ln_final, x)
        logits = bridge.unembed(x) if hooked(bridge.unembed) else unembed(x)
        return apply_softcap(logits, cap)

    return forward


def _point(point: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A hook point's output: ``x`` itself while nothing hooks it (what its call returns then)."""
    return point(x) if _has_hooks(point) else x


def _fused_attention_applies(
    att: nn.Module, block: nn.Module, pattern_fn: Any, q: torch.Tensor, k: torch.Tensor
) -> bool:
    """Whether the attention can run as ``scaled_dot_product_attention``: no one reads or edits its
    pattern (the bridge's ``hook_pattern`` and ``hook_attn_scores`` are unhooked), no soft cap, and
    the copies are stacked on both sides (q and k have the same rows)."""
    from transformer_lens.utilities.activation_functions import softcap_enabled

    bridge = block.attn
    points = [bridge._modules.get("hook_pattern"), bridge._modules.get("hook_attn_scores")]
    if pattern_fn is not None and pattern_fn is not points[0]:
        return False
    return (
        None not in points
        and not any(_has_hooks(point) for point in points)
        and not softcap_enabled(att.attn_scores_soft_cap)
        and q.shape[0] == k.shape[0]
        and not _global_hooks()
    )


def _fast_norm_applies(norm: nn.Module) -> bool:
    """A TransformerLens ``NormalizationBridge`` over ``nn.LayerNorm`` that runs its from-scratch
    LayerNorm (not RMS, no weight offset, no folding, not HF's autograd path)."""
    inner = norm._modules.get("_original_component")
    config = getattr(norm, "config", None)
    return (
        type(norm).__name__ == "NormalizationBridge"
        and type(inner) is nn.LayerNorm
        and inner.elementwise_affine
        and not hasattr(inner, "_hf_hook")  # accelerate offload: weights load only around its own call
        and inner.weight.device.type != "meta"
        and not norm.uses_rms_norm
        and not norm.uses_weight_offset
        and not getattr(norm, "use_native_layernorm_autograd", False)
        and not getattr(config, "layer_norm_folding", False)
    )


def _fast_norm(norm: nn.Module):
    """``norm.forward`` as one ``layer_norm`` kernel while its ``hook_scale`` and ``hook_normalized``
    are unhooked (TL's from-scratch LayerNorm: the same function in 9 elementwise passes, equal to
    ~1e-7); ``hook_in`` and ``hook_out`` fire as in the bridge. Anything hooked inside, or another
    dtype, runs the bridge's own forward."""
    inner = norm._modules["_original_component"]
    inside = (norm._modules["hook_scale"], norm._modules["hook_normalized"])
    eps = getattr(norm.config, "eps", 1e-05)
    original = type(norm).forward

    def forward(hidden_states: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if kwargs or hidden_states.dtype != torch.float32 or any(map(_has_hooks, inside)) or _global_hooks():
            return original(norm, hidden_states, **kwargs)
        x = norm.hook_in(hidden_states)
        out = nn.functional.layer_norm(x, (x.shape[-1],), inner.weight, inner.bias, eps)
        return norm.hook_out(out)

    return forward


def _global_hooks() -> bool:
    return bool(nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks)


def _has_hooks(module: nn.Module) -> bool:
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
    )


def _linear(bridge: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``bridge(x)`` for a TransformerLens ``LinearBridge``: its wrapped ``nn.Linear`` called directly
    while nothing hooks the bridge or its hook points (they are identities then), which skips the
    bridge's per-call Python (~50 us, 8 calls a forward on induction-2l). The same module computes
    the same tensor; any hook, module hook, global hook or offloading keeps the bridge's own call."""
    inner = bridge._modules.get("_original_component")
    points = [bridge._modules.get("hook_in"), bridge._modules.get("hook_out")]
    if (
        inner is None
        or None in points
        or any(_has_hooks(m) for m in (bridge, *points))
        or hasattr(inner, "_hf_hook")
        or _global_hooks()
    ):
        return bridge(x)
    return inner(x)


def _rows_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` where one side may hold copies stacked along the rows (``k * batch``) and the other
    one copy (``batch``): the single copy broadcasts over the stacked ones, never repeated."""
    rows_a, rows_b = a.shape[0], b.shape[0]
    if rows_a == rows_b:
        return torch.matmul(a, b)
    if rows_a % rows_b == 0:
        return torch.matmul(a.unflatten(0, (rows_a // rows_b, rows_b)), b).flatten(0, 1)
    if rows_b % rows_a == 0:
        return torch.matmul(a, b.unflatten(0, (rows_b // rows_a, rows_a))).flatten(0, 1)
    raise RuntimeError(f"rows {rows_a} and {rows_b} are not copies of one batch")


def _prepend(cached: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """``[cached; new]`` along positions, ``cached`` repeated to ``new``'s rows if copies are stacked."""
    if cached.shape[0] != new.shape[0]:
        cached = cached.repeat(new.shape[0] // cached.shape[0], 1, 1, 1)
    return torch.cat([cached, new], dim=2)


@contextmanager
def _with_position_ids(model: Any, positions: torch.Tensor):
    """The bridge's forward gets ``position_ids`` (positions ``s..n-1``), for every batch size."""

    def add(module: nn.Module, args: tuple, kwargs: dict):
        ids = args[0] if args else kwargs["input"]
        return args, {**kwargs, "position_ids": positions[None].expand(ids.shape[0], -1)}

    handle = model.bridge.register_forward_pre_hook(add, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


__all__ = ["HFSuffix", "NativeSuffix", "SuffixRoute", "suffix_route"]
