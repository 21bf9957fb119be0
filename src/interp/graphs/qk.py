"""Attention (QK) attribution: which pairs of components make one attention score.

For one attention edge (layer, head, query position q, key position k), the pre-softmax score is
``score = (LN1(x_q) W_Q + b_Q) · (LN1(x_k) W_K + b_K) / scale`` (rotary: the query and key
vectors are rotated for their positions first). With LN1's scales frozen at their values on the
prompt, ``LN1(x) = (centre(x) / s) * w + b`` is linear in the stream plus a constant, and the
stream at a position is the sum of what every earlier component wrote there:

- the token node (``W_E[tok] + W_pos[pos]``);
- each earlier attention head's output (``pattern @ (LN1(x) W_V + b_V) @ W_O``, for that head)
  and each layer's ``b_O``;
- with transcoders, each active feature ``a · W_dec[f]``, each layer's error node, ``b_dec``
  and (skip transcoders) the skip term; without, each layer's whole MLP output.

So ``score = Σ_i Σ_j u_i · v_j / scale`` exactly, where ``u_i`` are the query-side components
through the frozen LN and ``W_Q`` (plus the constants ``LN1 bias`` and ``b_Q``) and ``v_j`` the
key-side ones through ``W_K``. ``QKAttribution.scores[i, j]`` is that pair's term, and the sum of
all terms is the model's score (checked against the model's ``hook_attn_scores``).

How far it goes: this is the exact bilinear split of one score into pairs of *direct* writers,
one hop back. An attention-head component is not decomposed further (its own inputs would need
its OV circuit and pattern); the softmax over keys is not linearized (this explains the score, not
the pattern: removing a component also changes the other keys' scores); and LN1's scale is held at
its clean value, as in the attribution graph. Circuit-tracer has no QK attribution (issue #53).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from einops import einsum

from interp.errors import InputError
from interp.graphs.replacement import (
    _attention,
    _encode,
    _mlp,
    check_transcoders,
    freeze_norm,
    native_core,
    transcoder_input,
    unwrap,
)


@dataclass
class QKAttribution:
    """Pair terms of one attention score.

    Attributes:
        scores: ``[n_query_components, n_key_components]``; ``scores.sum()`` is the score.
        query_labels, key_labels: what each component is (``"token@3"``, ``"L0H2"``, ``"L1/F17"``,
            ``"err L1"``, ``"b_O L0"``, ``"LN1 bias"``, ``"b_Q"``...).
        score: the model's pre-softmax score for this edge (from the same forward).
        pattern: the attention weight of this edge.
    """

    scores: torch.Tensor
    query_labels: list[str]
    key_labels: list[str]
    score: float
    pattern: float
    layer: int
    head: int
    query: int
    key: int

    def top(self, n: int = 10) -> list[tuple[str, str, float]]:
        """The ``n`` largest pair terms by magnitude: (query component, key component, term)."""
        flat = self.scores.flatten()
        order = flat.abs().argsort(descending=True)[:n].tolist()
        n_k = self.scores.shape[1]
        return [(self.query_labels[i // n_k], self.key_labels[i % n_k], float(flat[i])) for i in order]

    def query_totals(self) -> dict[str, float]:
        """Each query-side component's total (its row sum): the score change if it were removed
        from the query's stream (frozen LN scale), everything else fixed."""
        return dict(zip(self.query_labels, self.scores.sum(1).tolist(), strict=True))

    def key_totals(self) -> dict[str, float]:
        """Each key-side component's total (its column sum)."""
        return dict(zip(self.key_labels, self.scores.sum(0).tolist(), strict=True))


class _Parts:
    """Components written at two positions (query and key), kept only where they are nonzero."""

    def __init__(self, q: int, k: int) -> None:
        self.q, self.k = q, k
        self.labels: dict[str, list[str]] = {"q": [], "k": []}
        self.vecs: dict[str, list[torch.Tensor]] = {"q": [], "k": []}

    def add(self, label: str, rows: torch.Tensor) -> None:
        """``rows`` is ``[pos, d]`` (or ``[d]`` for a constant written at every position)."""
        for side, pos in (("q", self.q), ("k", self.k)):
            vec = rows if rows.ndim == 1 else rows[pos]
            if vec.abs().max() > 0:
                self.labels[side].append(label.replace("@pos", f"@{pos}"))
                self.vecs[side].append(vec)


def _check(core: Any, layer: int, head: int, query: int, key: int, n_pos: int) -> None:
    n_layers, n_heads = core.cfg.n_layers, core.cfg.n_heads
    if not 0 <= layer < n_layers or not 0 <= head < n_heads:
        raise InputError(
            f"layer {layer}, head {head} out of range: the model has {n_layers} layers of {n_heads} heads"
        )
    if not 0 <= key <= query < n_pos:
        raise InputError(
            f"query {query} / key {key} must satisfy 0 <= key <= query < {n_pos} (causal attention on this prompt)"
        )


def qk_attribution(
    model: Any,
    transcoders: Sequence[Any] | None,
    prompt: Any,
    *,
    layer: int,
    head: int,
    query: int,
    key: int,
) -> QKAttribution:
    """Attribute one attention score to pairs of query-side and key-side components (module docs).

    ``transcoders``: one per layer (features become components), or None (each MLP output is one
    component; attention-only models need None).
    """
    from interp.graphs.attribution import _tokens

    core = native_core(model, allow_attn_only=transcoders is None)
    reads = None if transcoders is None else check_transcoders(core, transcoders)
    tokens = _tokens(model, prompt, int(core.cfg.n_ctx))
    n_pos = len(tokens)
    _check(core, layer, head, query, key, n_pos)
    with torch.no_grad():
        return _attribute_qk(core, transcoders, reads, tokens, layer, head, query, key)


def _attribute_qk(
    core: Any,
    transcoders: Sequence[Any] | None,
    reads: Sequence[str] | None,
    tokens: torch.Tensor,
    layer: int,
    head: int,
    query: int,
    key: int,
) -> QKAttribution:
    n_pos = len(tokens)
    positions = torch.arange(n_pos)
    parts = _Parts(query, key)
    x = unwrap(core.tok_embed)(tokens)
    if core.pos is not None:
        x = x + unwrap(core.pos)(positions)
    parts.add("token@pos", x)
    for index in range(layer):
        block = unwrap(core.layers[index])
        attn, ln1 = unwrap(block.attn), unwrap(block.ln1)
        _, pattern = _attention(attn, ln1(x), positions[None])
        h = ln1(x)
        v = einsum(h, unwrap(attn.v).weight, "p d, e d -> p e") + unwrap(attn.v).bias
        v = v.view(n_pos, attn.n_kv_heads, attn.d_head).repeat_interleave(attn.kv_repeats, dim=1)
        w_o = unwrap(attn.o).weight.view(core.cfg.d_model, attn.n_heads, attn.d_head)
        heads = einsum(pattern, v, w_o, "h q k, k h e, d h e -> h q d")
        for hh in range(attn.n_heads):
            parts.add(f"L{index}H{hh}", heads[hh])
        b_o = unwrap(attn.o).bias
        parts.add(f"b_O L{index}", b_o)
        mid = x + heads.sum(0) + b_o
        if getattr(core.cfg, "attn_only", False) or not hasattr(block, "mlp"):
            x = mid
            continue
        ln2 = unwrap(block.ln2)
        mlp_out = _mlp(unwrap(block.mlp), ln2(mid))
        if transcoders is None:
            parts.add(f"MLP L{index}", mlp_out)
        else:
            _add_features(
                parts,
                transcoders[index],
                reads[index],
                index,
                transcoder_input(reads[index], ln2, mid),
                mlp_out,
            )
        x = mid + mlp_out
    return _split(core, parts, x, layer, head, query, key)


def _add_features(
    parts: _Parts, tc: Any, read: str, index: int, tc_in: torch.Tensor, mlp_out: torch.Tensor
) -> None:
    mid = tc_in
    acts = tc.activation(_encode(tc, tc_in).to(tc.dtype)).to(mid.dtype)
    w_dec = tc.W_dec.to(mid.dtype)
    recons = acts @ w_dec + tc.b_dec.to(mid.dtype)
    for pos in sorted({parts.q, parts.k}):
        for feat in acts[pos].nonzero().flatten().tolist():
            rows = torch.zeros_like(mid)
            rows[pos] = acts[pos, feat] * w_dec[feat]
            parts.add(f"L{index}/F{feat}@pos", rows)
    parts.add(f"b_dec L{index}", tc.b_dec.to(mid.dtype))
    if tc.cfg.architecture == "skip_transcoder":
        skip = tc_in @ tc.W_skip.T.to(mid.dtype)
        recons = recons + skip
        parts.add(f"skip L{index}", skip)
    parts.add(f"err L{index}", mlp_out - recons)


def _split(
    core: Any, parts: _Parts, x: torch.Tensor, layer: int, head: int, query: int, key: int
) -> QKAttribution:
    block = unwrap(core.layers[layer])
    attn, ln1_mod = unwrap(block.attn), unwrap(block.ln1)
    norm = freeze_norm(ln1_mod, x)
    q_lin, k_lin = unwrap(attn.q), unwrap(attn.k)
    kv = head // attn.kv_repeats
    w_q = q_lin.weight.view(attn.n_heads, attn.d_head, -1)[head]
    b_q = q_lin.bias.view(attn.n_heads, attn.d_head)[head]
    w_k = k_lin.weight.view(attn.n_kv_heads, attn.d_head, -1)[kv]
    b_k = k_lin.bias.view(attn.n_kv_heads, attn.d_head)[kv]

    def side(
        name: str, pos: int, w: torch.Tensor, b: torch.Tensor, bias_label: str
    ) -> tuple[torch.Tensor, list[str]]:
        stack = torch.stack(parts.vecs[name])
        normed = norm.__class__(norm.center, norm.scale[pos], norm.weight, None)(stack)
        rows = [normed @ w.T]
        labels = list(parts.labels[name])
        if norm.bias is not None:
            rows.append((norm.bias @ w.T)[None])
            labels.append("LN1 bias")
        rows.append(b[None])
        labels.append(bias_label)
        return torch.cat(rows), labels

    u, q_labels = side("q", query, w_q, b_q, "b_Q")
    v, k_labels = side("k", key, w_k, b_k, "b_K")
    if attn.rotary is not None:
        rope = unwrap(attn.rotary)
        u = rope.apply_rope(u[None, None], u[None, None], position_ids=torch.full((1, len(u)), query))[0][
            0, 0
        ]
        v = rope.apply_rope(v[None, None], v[None, None], position_ids=torch.full((1, len(v)), key))[1][0, 0]
    scores = u @ v.T / attn.scale
    positions = torch.arange(x.shape[0])
    _, pattern = _attention(attn, ln1_mod(x), positions[None])
    q_full = (ln1_mod(x)[query] @ w_q.T + b_q)[None, None, None]
    k_full = (ln1_mod(x)[key] @ w_k.T + b_k)[None, None, None]
    if attn.rotary is not None:
        q_full = rope.apply_rope(q_full, q_full, position_ids=torch.tensor([[query]]))[0]
        k_full = rope.apply_rope(k_full, k_full, position_ids=torch.tensor([[key]]))[1]
    score = float((q_full.flatten() @ k_full.flatten()) / attn.scale)
    return QKAttribution(
        scores=scores,
        query_labels=q_labels,
        key_labels=k_labels,
        score=score,
        pattern=float(pattern[head, query, key]),
        layer=layer,
        head=head,
        query=query,
        key=key,
    )
