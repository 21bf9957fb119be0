"""A key/value cache for generation on native (``boot_native``) bridges.

TransformerLens's bridge passes ``use_cache`` to the model it wraps, but ``NativeModel`` keeps no
cache, so the bridge's own ``generate`` (and interp's, before this module) recomputed the whole
sequence at every step: O(n^2) work for n tokens. This is interp's own cache, in the spirit of
TransformerLens's ``HookedTransformerKeyValueCache``: per layer, the keys and values (after
rotary embeddings, before grouped-query repeats) of every position seen so far.

While a cache is attached, each ``NativeAttention`` runs ``_native_attention`` (TransformerLens
4.3's forward, step for step) which prepends the cached keys and values, offsets the causal mask by
the cached length, and appends the new ones. The rest of the bridge is untouched, so every hook
point fires at every step with TransformerLens's cached semantics: a step after the prompt feeds
only the new position, so hooks on the residual stream, q/k/v/z and the MLP see ``pos == 1``
(``hook_k``/``hook_v`` hold the new position's keys and values only, as in TransformerLens, where
the cache is appended after them), and ``hook_attn_scores``/``hook_pattern`` are
``[batch, head, 1, cached + 1]``. Callers pass each new token's ``position_ids`` (skipping left
padding) and the full ``[batch, cached + 1]`` padding mask.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from weakref import WeakKeyDictionary

import torch
from torch import nn

# attention module -> (the cache it reads and extends, its layer); set only while a cache is attached
_ATTACHED: WeakKeyDictionary[nn.Module, tuple[NativeKVCache, int]] = WeakKeyDictionary()


@dataclass
class NativeKVCache:
    """Keys and values ``[batch, kv_head, pos, d_head]`` of the positions seen so far, per layer."""

    keys: dict[int, torch.Tensor] = field(default_factory=dict)
    values: dict[int, torch.Tensor] = field(default_factory=dict)

    def length(self, layer: int) -> int:
        """How many positions ``layer``'s cache holds (0 before its first forward)."""
        return self.keys[layer].shape[2] if layer in self.keys else 0

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new positions' ``k``/``v`` to ``layer``'s and return all of them."""
        if layer in self.keys:
            k = torch.cat([self.keys[layer], k], dim=2)
            v = torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k.detach(), v.detach()
        return k, v


def cache_of(attention: nn.Module) -> tuple[NativeKVCache, int] | None:
    """The cache attached to ``attention`` (a ``NativeAttention``) and its layer, or None."""
    return _ATTACHED.get(attention)


def native_attentions(bridge: nn.Module) -> list[nn.Module] | None:
    """Each block's ``NativeAttention`` (TransformerLens 4.3), or None if any block has another kind
    (a bridge over a Hugging Face model), which this cache cannot serve."""
    from interp.models.transformer import _is_native_attention

    blocks = getattr(bridge, "blocks", None)
    if not blocks:
        return None
    attentions = [getattr(block, "attn", None) for block in blocks]
    if not all(_is_native_attention(att) for att in attentions):
        return None
    return [att.original_component for att in attentions]


@contextmanager
def attached(attentions: list[nn.Module], cache: NativeKVCache) -> Iterator[NativeKVCache]:
    """Run ``attentions`` (layer order) with ``cache`` for the duration of the block.

    An attention whose forward interp already replaced (``_NativeScores``, while
    ``hook_attn_scores`` is hooked) keeps it: that forward is ``_native_attention`` too, which reads
    the cache from ``cache_of``.
    """
    from interp.models.transformer import _native_attention

    installed = []
    for layer, attention in enumerate(attentions):
        _ATTACHED[attention] = (cache, layer)
        if "forward" not in attention.__dict__:
            forward = partial(_native_attention, attention)
            attention.forward = forward
            installed.append((attention, forward))
    try:
        yield cache
    finally:
        for attention in attentions:
            _ATTACHED.pop(attention, None)
        for attention, forward in installed:
            if attention.__dict__.get("forward") is forward:
                del attention.forward
