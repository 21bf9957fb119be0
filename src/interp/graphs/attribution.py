"""``attribute``: the attribution graph of one prompt (Ameisen et al. 2025, "Circuit Tracing").

Method, as circuit-tracer implements it (``circuit_tracer/attribution.py``, read for semantics):

1. the local replacement model of the prompt (:mod:`interp.graphs.replacement`): transcoders for
   MLPs with an error node per (layer, position), attention patterns and norm scales frozen;
2. nodes: every active transcoder feature (activation > 0 at a layer and position), the error
   nodes, one token node per position and the logit nodes;
3. logit nodes: the most probable next tokens at the last position, at most ``max_n_logits``,
   stopping at the first whose cumulative probability reaches ``desired_logit_prob``; each logit
   node's value and readout direction are *demeaned* over the vocabulary (``W_U[:, t] - mean_j
   W_U[:, j]``, and the same for ``b_U``), as circuit-tracer's ``compute_salient_logits`` does;
4. edges: one batched backward pass per chunk of targets through the frozen model. A target's
   gradient is injected at its readout (a feature's encoder column ``W_enc[:, f]`` at its
   transcoder input, or a logit's demeaned unembedding at the final normed stream), and each
   source's edge is the gradient at the source's write site dotted with what the source writes
   (``a_s W_dec[s]`` for a feature at its MLP output, the error vector, ``W_E[tok] + W_pos[pos]``
   for a token). Targets' values are pre-activations (for an active ReLU feature, its activation).

So ``A[t, s]`` is the direct effect: the change of target ``t``'s pre-activation when source ``s``
is removed, everything else (other features included) held fixed, in the frozen model.
``graph.bias[t]`` is the target's value with every node removed (norm and attention biases,
``b_dec``, ``b_enc``, ``b_U``), so ``A[t].sum() + bias[t]`` is the target's value exactly when every
active feature is a node (``max_feature_nodes=None``).

With ``max_feature_nodes``, only that many features get rows and columns, chosen as circuit-tracer
does: by their influence on the logits in the rows computed so far, re-ranked every
``update_interval`` batches. The dropped features' contributions are then absent from the graph.

Deviation, said: circuit-tracer's token node is the token embedding only (its models have no
learned position embedding); here the token node at position p is ``W_E[tok_p] + W_pos[p]`` (for
rotary models, ``W_E[tok_p]``), so the graph's inputs are the whole embedding.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from einops import einsum
from tqdm.auto import tqdm

from interp.errors import InputError
from interp.graphs.graph import Graph, Node, normalize_matrix
from interp.graphs.replacement import Replacement, check_transcoders, native_core, record


def _tokens(model: Any, prompt: Any, n_ctx: int, d_vocab: int) -> torch.Tensor:
    """The prompt as a 1-D LongTensor, checked against the context length and the vocabulary
    before any work (an id outside it would surface as an embedding's raw IndexError)."""
    if isinstance(prompt, str):
        tokenizer = getattr(model, "tokenizer", None)
        if tokenizer is None:
            raise InputError(
                f"{getattr(model, 'name', 'this model')} has no tokenizer, so a text prompt cannot be read: pass "
                "token ids (a list of ints or a 1-D LongTensor)."
            )
        ids = torch.as_tensor(tokenizer(prompt, return_tensors="pt")["input_ids"][0])
    else:
        try:
            ids = torch.as_tensor(prompt)
        except (TypeError, ValueError, RuntimeError) as err:
            raise InputError(
                f"cannot read the prompt as token ids ({err}); pass text or a list of ints"
            ) from None
        if ids.ndim == 2 and ids.shape[0] == 1:
            ids = ids[0]
        if ids.ndim != 1 or ids.dtype in (torch.float16, torch.float32, torch.float64, torch.bool):
            raise InputError(
                f"the prompt must be one sequence of token ids (1-D integers), got shape {tuple(ids.shape)} "
                f"{ids.dtype}; attribute one prompt at a time."
            )
    if ids.numel() == 0:
        raise InputError("the prompt is empty: pass at least one token")
    if ids.numel() > n_ctx:
        raise InputError(
            f"the prompt has {ids.numel()} tokens but the model's context is n_ctx={n_ctx}: shorten the prompt "
            f"to at most {n_ctx} tokens."
        )
    outside = ids[(ids < 0) | (ids >= d_vocab)]
    if outside.numel():
        raise InputError(
            f"token ids {outside.tolist()[:5]} are outside the vocabulary [0, {d_vocab}): pass ids the model "
            "embeds (or text, read by its tokenizer)."
        )
    return ids.long()


def _is_id(value: Any) -> bool:
    """An integer token id: a Python, numpy or 0-d torch integer (a bool is not one)."""
    if torch.is_tensor(value):
        return value.ndim == 0 and not value.is_floating_point() and value.dtype != torch.bool
    return isinstance(value, numbers.Integral) and not isinstance(value, bool | np.bool_)


def _target_ids(model: Any, targets: Sequence[Any], d_vocab: int) -> list[int]:
    """Token ids of explicitly requested logit targets; each must be one token."""
    ids: list[int] = []
    for target in targets:
        if isinstance(target, str):
            tokenizer = getattr(model, "tokenizer", None)
            if tokenizer is None:
                raise InputError(
                    f"target {target!r} is text but the model has no tokenizer: pass its token id"
                )
            encoded = tokenizer(target, add_special_tokens=False)["input_ids"]
            if len(encoded) != 1:
                raise InputError(
                    f"target {target!r} is {len(encoded)} tokens ({encoded}), not one: a logit node is one token. "
                    "Pass a single-token string (mind the leading space) or a token id."
                )
            ids.append(int(encoded[0]))
        elif _is_id(target) and 0 <= int(target) < d_vocab:
            ids.append(int(target))
        else:
            raise InputError(
                f"target {target!r} is not a token id in [0, {d_vocab}) nor a single-token string"
            )
    return ids


@torch.no_grad()
def salient_logits(
    logits: torch.Tensor, W_U: torch.Tensor, b_U: torch.Tensor, max_n_logits: int, desired_logit_prob: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """circuit-tracer's rule: the top ``max_n_logits`` tokens, cut after the first whose cumulative
    probability reaches ``desired_logit_prob``. Returns (token ids, probabilities)."""
    probs = torch.softmax(logits, dim=-1)
    top_p, top_idx = torch.topk(probs, min(max_n_logits, probs.numel()))
    cutoff = (
        int(torch.searchsorted(torch.cumsum(top_p, 0), torch.tensor(desired_logit_prob, dtype=top_p.dtype)))
        + 1
    )
    return top_idx[:cutoff], top_p[:cutoff]


class _Targets:
    """Readouts to inject: (layer, position, direction); ``layer == n_layers`` is the final stream."""

    def __init__(self, layers: torch.Tensor, positions: torch.Tensor, vectors: torch.Tensor) -> None:
        self.layers, self.positions, self.vectors = layers, positions, vectors

    def __len__(self) -> int:
        return len(self.layers)

    def take(self, index: torch.Tensor) -> _Targets:
        return _Targets(self.layers[index], self.positions[index], self.vectors[index])


class _Sources:
    """What every source writes: active features (at their layer's MLP output), errors, tokens."""

    def __init__(self, rep: Replacement, features: torch.Tensor) -> None:
        self.features = features  # [n, 3]: layer, pos, feature id
        dtype = rep.dtype
        vecs = []
        for layer_idx, layer in enumerate(rep.layers):
            sel = features[features[:, 0] == layer_idx]
            w_dec = layer.transcoder.W_dec.detach().to(dtype)
            vecs.append(layer.acts[sel[:, 1], sel[:, 2], None] * w_dec[sel[:, 2]])
        self.feature_vecs = torch.cat(vecs) if vecs else torch.zeros(0, rep.embed.shape[1], dtype=dtype)
        self.bounds = [0, *torch.bincount(features[:, 0], minlength=rep.n_layers).cumsum(0).tolist()]
        self.runs = [
            _runs(features, lo, hi) for lo, hi in zip(self.bounds[:-1], self.bounds[1:], strict=True)
        ]
        self.errors = [layer.error for layer in rep.layers]
        self.embed = rep.embed

    def row_size(self, n_layers: int, n_pos: int) -> int:
        return len(self.features) + (n_layers + 1) * n_pos


def _runs(features: torch.Tensor, lo: int, hi: int) -> list[tuple[int, int, int]]:
    """(position, start, end) of each run of equal positions in ``features[lo:hi]``."""
    positions, counts = torch.unique_consecutive(features[lo:hi, 1], return_counts=True)
    ends = (lo + counts.cumsum(0)).tolist()
    return [(p, e - c, e) for p, c, e in zip(positions.tolist(), counts.tolist(), ends, strict=True)]


def _rows(rep: Replacement, sources: _Sources, targets: _Targets) -> torch.Tensor:
    """Direct effects ``[len(targets), row_size]`` of every source on each target: one reverse pass."""
    batch, n_pos, dtype = len(targets), rep.n_pos, rep.dtype
    g_embed, g_writes = reverse(rep, targets)
    pieces = []
    for layer_idx, g in enumerate(g_writes):
        lo, hi = sources.bounds[layer_idx], sources.bounds[layer_idx + 1]
        if hi == lo:
            continue
        out = torch.zeros(batch, hi - lo, dtype=dtype)
        if g is not None:
            # features are sorted by position within a layer: one [batch, d] x [d, n_p] per position
            for pos, start, end in sources.runs[layer_idx]:
                out[:, start - lo : end - lo] = g[:, pos] @ sources.feature_vecs[start:end].T
        pieces.append(out)
    for layer_idx, g in enumerate(g_writes):
        if g is None:
            pieces.append(torch.zeros(batch, n_pos, dtype=dtype))
        else:
            pieces.append(einsum(g, sources.errors[layer_idx], "b p d, p d -> b p"))
    pieces.append(einsum(g_embed, sources.embed, "b p d, p d -> b p"))
    return torch.cat(pieces, dim=1)


def _norm_t(norm: Any, g: torch.Tensor, scale: torch.Tensor, affine: bool = True) -> torch.Tensor:
    """Transpose of a frozen norm's linear part ``C(x) / s * w`` (C: centring, symmetric)."""
    if affine and norm.weight is not None:
        g = g * norm.weight
    g = g / scale
    return g - g.mean(dim=-1, keepdim=True) if norm.center else g


def _tc_input_t(layer: Any, g: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Transpose of ``Layer.tc_input``'s linear part."""
    if layer.reads == "pre":
        return g
    return _norm_t(layer.ln2, g, scale, affine=layer.reads == "post")


def _attention_t(layer: Any, g: torch.Tensor) -> torch.Tensor:
    """Transpose of the frozen attention's linear part: ``[b, q, d]`` -> ``[b, k, d]``."""
    gz = einsum(g, layer.W_O, "b q d, h e d -> b h q e")
    gv = einsum(layer.pattern, gz, "h q k, b h q e -> b h k e")
    gh = einsum(gv, layer.W_V, "b h k e, h d e -> b k d")
    return _norm_t(layer.ln1, gh, layer.ln1.scale)


@torch.no_grad()
def reverse(rep: Replacement, targets: _Targets) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """Gradients of each target's readout w.r.t. the embedding ``[b, pos, d]`` and each layer's MLP
    write (``None`` where a target cannot see it): the frozen model's linear map transposed,
    layer by layer from the top, as autograd's backward would compute it (the tests check both)."""
    batch, n_pos, d_model = len(targets), rep.n_pos, rep.embed.shape[1]
    n_layers, stop = rep.n_layers, int(targets.layers.max())
    arange = torch.arange(batch)
    g = torch.zeros(batch, n_pos, d_model, dtype=rep.dtype)
    final = arange[targets.layers == n_layers]
    if len(final):
        pos = targets.positions[final]
        g[final, pos] = _norm_t(rep.ln_final, targets.vectors[final], rep.ln_final.scale[pos])
    g_writes: list[torch.Tensor | None] = [None] * n_layers
    for index in reversed(range(min(stop, n_layers - 1) + 1)):
        layer = rep.layers[index]
        visible = stop == n_layers or index < stop
        g_writes[index] = g if visible else None
        g_mid = g.clone()
        if visible and layer.transcoder.cfg.architecture == "skip_transcoder":
            skip = g @ layer.transcoder.W_skip.detach().to(g.dtype)
            g_mid += _tc_input_t(layer, skip, layer.ln2.scale)
        here = arange[targets.layers == index]
        if len(here):
            pos = targets.positions[here]
            g_mid[here, pos] += _tc_input_t(layer, targets.vectors[here], layer.ln2.scale[pos])
        g = g_mid + _attention_t(layer, g_mid)
    return g, g_writes


@torch.no_grad()
def _biases(
    rep: Replacement, targets: _Targets, features: torch.Tensor, logit_ids: torch.Tensor
) -> torch.Tensor:
    """Each target's value with every node removed: the frozen forward on zero embeddings and
    MLP writes of ``b_dec`` only, read through the (affine) encoder / demeaned unembedding."""
    zeros = torch.zeros(1, rep.n_pos, rep.embed.shape[1], dtype=rep.dtype)
    writes = [zeros + layer.transcoder.b_dec.detach().to(rep.dtype) for layer in rep.layers]
    tc_inputs, final = rep.run(zeros, writes, with_bias=True)
    out = torch.zeros(len(features), dtype=rep.dtype)
    for layer in features[:, 0].unique().tolist():
        sel = features[:, 0] == layer
        tc = rep.layers[layer].transcoder
        pre = tc.pre_acts(tc_inputs[layer][0].to(tc.dtype)).to(rep.dtype)
        out[sel] = pre[features[sel, 1], features[sel, 2]]
    b_logit = rep.b_U[logit_ids] - rep.b_U.mean()
    return torch.cat([out, final[0, -1] @ targets.vectors[-len(logit_ids) :].T + b_logit])


def _memory_plan(
    rep: Replacement, n_total: int, n_kept: int, n_logits: int, batch_size: int, budget: int
) -> int:
    """Batch size that keeps the graph and one backward pass within ``budget`` bytes, or an InputError."""
    item = torch.finfo(rep.dtype).bits // 8
    n_cols = n_total + (rep.n_layers + 1) * rep.n_pos
    n_nodes = n_kept + (rep.n_layers + 1) * rep.n_pos + n_logits
    # the adjacency; when capped, also the row buffer and up to three copies of it while ranking
    fixed = (n_nodes * n_nodes + (4 * (n_kept + n_logits) * n_cols if n_kept < n_total else 0)) * item
    # one reverse pass keeps n_layers + 1 gradients of [pos, d] and makes transients (the head
    # mixing, the norm transposes, the error contractions' copies); with the allocator's caching
    # that is ~4 per layer + 12 of them in RSS (measured with benchmarks/bench_graphs.py); each row
    # is built in pieces, concatenated, then stored
    per_target = ((4 * rep.n_layers + 12) * rep.n_pos * rep.embed.shape[1] + 4 * n_cols) * item
    if fixed + per_target > budget:
        need = fixed + per_target
        raise InputError(
            f"this graph needs about {need / 2**20:.1f} MiB ({n_kept} feature nodes of {n_total} active, "
            f"{n_nodes} nodes) but memory_budget is {budget / 2**20:.1f} MiB: lower max_feature_nodes "
            f"(e.g. max_feature_nodes={max(1, n_kept // 4)}) or raise memory_budget= / $INTERP_MEMORY_BUDGET."
        )
    return max(1, min(batch_size, int((budget - fixed) // per_target)))


def _partial_influence(
    rows: torch.Tensor, row_nodes: torch.Tensor, logit_probs: torch.Tensor, n_cols: int
) -> torch.Tensor:
    """circuit-tracer's ``compute_partial_influences``: influence on the logits through the rows
    computed so far (``rows[i]`` is node ``row_nodes[i]``'s incoming row; logit nodes numbered
    from ``n_cols``)."""
    normalized = normalize_matrix(rows)
    prod = torch.zeros(n_cols + len(logit_probs), dtype=rows.dtype)
    prod[n_cols:] = logit_probs.to(rows.dtype)
    influence = torch.zeros(n_cols, dtype=rows.dtype)
    for _ in range(1000):
        prod_cols = prod[row_nodes] @ normalized
        if not prod_cols.any():
            break
        influence += prod_cols
        prod = torch.cat([prod_cols, torch.zeros(len(logit_probs), dtype=rows.dtype)])
    return influence


def _capped_rows(
    rep: Replacement,
    sources: _Sources,
    targets: _Targets,
    logit_rows: torch.Tensor,
    logit_probs: torch.Tensor,
    adjacency: torch.Tensor,
    n_kept: int,
    batch: int,
    update_interval: int,
    bar: Any,
) -> torch.Tensor:
    """Rows of the ``n_kept`` most influential features (ranked as circuit-tracer: partial influence
    through the rows so far, re-ranked every ``update_interval`` batches), written into
    ``adjacency`` with only the kept features' columns. Returns the kept feature indices (sorted)."""
    n_total, n_cols, n_logits = len(targets), logit_rows.shape[1], len(logit_rows)
    rows = torch.zeros(n_kept, n_cols, dtype=rep.dtype)
    chosen = torch.zeros(n_kept, dtype=torch.long)
    visited = torch.zeros(n_total, dtype=torch.bool)
    done = 0
    while done < n_kept:
        row_nodes = torch.cat([chosen[:done], torch.arange(n_cols, n_cols + n_logits)])
        so_far = torch.cat([rows[:done], logit_rows])
        influence = _partial_influence(so_far, row_nodes, logit_probs, n_cols)[:n_total]
        del so_far
        rank = torch.argsort(influence, descending=True)
        pending = rank[~visited[rank]][: min(update_interval * batch, n_kept - done)]
        for start in range(0, len(pending), batch):
            index = pending[start : start + batch]
            rows[done : done + len(index)] = _rows(rep, sources, targets.take(index))
            chosen[done : done + len(index)] = index
            visited[index] = True
            done += len(index)
            bar.update(len(index))
    order = torch.argsort(chosen)
    kept = chosen[order]
    cols = torch.cat([kept, torch.arange(n_total, n_cols)])
    for start in range(0, n_kept, batch):
        end = min(start + batch, n_kept)
        adjacency[start:end, : len(cols)] = rows[order[start:end]][:, cols]
    adjacency[len(adjacency) - n_logits :, : len(cols)] = logit_rows[:, cols]
    return kept


def attribute(
    model: Any,
    transcoders: Sequence[Any],
    prompt: Any,
    *,
    max_n_logits: int = 10,
    desired_logit_prob: float = 0.95,
    max_feature_nodes: int | None = None,
    batch_size: int = 256,
    memory_budget: int | None = None,
    progress: bool = True,
    targets: Sequence[str | int] | None = None,
    update_interval: int = 4,
) -> Graph:
    """The attribution graph of ``prompt``'s next-token prediction (see the module docstring).

    Args:
        model: an interp ``NativeTransformer`` (``interp.load("zoo:...")``).
        transcoders: one interp.sae transcoder per layer, in layer order, reading
            ``blocks.L.mlp.hook_in`` (or ``ln2.hook_in``) and writing ``blocks.L.mlp.hook_out``.
        prompt: text (needs a tokenizer) or token ids; at most ``n_ctx`` tokens. Text is
            tokenized as everywhere in interp, with the tokenizer's own special tokens (the zoo's
            word vocabulary adds BOS; GPT-2's tokenizer adds none, unlike circuit-tracer, which
            always prepends BOS): pass ids to control it.
        max_n_logits, desired_logit_prob: which next tokens become logit nodes (circuit-tracer's).
        max_feature_nodes: cap on feature nodes (the most influential, ranked as circuit-tracer).
        batch_size: targets per backward pass (lowered to fit ``memory_budget``).
        memory_budget: bytes for the graph and one backward pass (default as for captures:
            ``$INTERP_MEMORY_BUDGET``, else half of RAM up to 8 GiB).
        progress: show a tqdm bar over feature rows.
        targets: explicit logit targets (single-token strings or ids) instead of the top tokens.

    Returns:
        The unpruned ``Graph``; ``graph.prune()`` keeps what matters.
    """
    from interp.hooks import default_memory_budget

    core = native_core(model)
    check_transcoders(core, transcoders)
    tokens = _tokens(model, prompt, int(core.cfg.n_ctx), int(core.cfg.d_vocab))
    explicit = None if targets is None else _target_ids(model, targets, int(core.cfg.d_vocab))
    if max_n_logits < 1 or not 0 < desired_logit_prob <= 1:
        raise InputError("max_n_logits must be >= 1 and desired_logit_prob in (0, 1]")
    if max_feature_nodes is not None and (isinstance(max_feature_nodes, bool) or int(max_feature_nodes) < 1):
        raise InputError(
            f"max_feature_nodes must be a positive number of features, or None for every active one; "
            f"got {max_feature_nodes!r}"
        )
    param = next(core.parameters())
    rep = record(model, transcoders, tokens.to(param.device))
    probs_all = torch.softmax(rep.logits[-1], dim=-1)
    if explicit is None:
        logit_ids, logit_probs = salient_logits(
            rep.logits[-1], rep.W_U, rep.b_U, max_n_logits, desired_logit_prob
        )
    else:
        logit_ids = torch.tensor(explicit, dtype=torch.long)
        logit_probs = probs_all[logit_ids]
    features = torch.cat(
        [
            torch.cat([torch.full((len(nz), 1), index), nz], dim=1)
            for index, layer in enumerate(rep.layers)
            for nz in [(layer.acts > 0).nonzero()]
        ]
    )
    n_total = len(features)
    n_kept = n_total if max_feature_nodes is None else min(int(max_feature_nodes), n_total)
    budget = default_memory_budget() if memory_budget is None else int(memory_budget)
    batch = _memory_plan(rep, n_total, n_kept, len(logit_ids), batch_size, budget)

    sources = _Sources(rep, features)
    n_cols = sources.row_size(rep.n_layers, rep.n_pos)
    demeaned = (rep.W_U[:, logit_ids] - rep.W_U.mean(dim=1, keepdim=True)).T
    enc = torch.zeros(n_total, rep.embed.shape[1], dtype=rep.dtype)
    for index, layer in enumerate(rep.layers):
        sel = features[:, 0] == index
        enc[sel] = layer.transcoder.W_enc.detach()[:, features[sel, 2]].T.to(rep.dtype)
    feature_targets = _Targets(features[:, 0], features[:, 1], enc)
    logit_targets = _Targets(
        torch.full((len(logit_ids),), rep.n_layers), torch.full((len(logit_ids),), rep.n_pos - 1), demeaned
    )

    logit_rows = torch.cat(
        [
            _rows(rep, sources, logit_targets.take(torch.arange(i, min(i + batch, len(logit_ids)))))
            for i in range(0, len(logit_ids), batch)
        ]
    )
    n_nodes = n_kept + (rep.n_layers + 1) * rep.n_pos + len(logit_ids)
    adjacency = torch.zeros(n_nodes, n_nodes, dtype=rep.dtype)
    bar = tqdm(total=n_kept, desc="attribution graph: feature rows", disable=not progress)
    if n_kept == n_total:  # the columns are the graph's: rows go straight into the adjacency
        for start in range(0, n_total, batch):
            index = torch.arange(start, min(start + batch, n_total))
            adjacency[index, :n_cols] = _rows(rep, sources, feature_targets.take(index))
            bar.update(len(index))
        kept = torch.arange(n_total)
        adjacency[n_nodes - len(logit_ids) :, :n_cols] = logit_rows
    else:
        kept = _capped_rows(
            rep,
            sources,
            feature_targets,
            logit_rows,
            logit_probs,
            adjacency,
            n_kept,
            batch,
            update_interval,
            bar,
        )
    bar.close()
    kept_features = features[kept]
    bias = torch.zeros(n_nodes, dtype=rep.dtype)
    all_targets = _Targets(
        torch.cat([kept_features[:, 0], logit_targets.layers]),
        torch.cat([kept_features[:, 1], logit_targets.positions]),
        torch.cat([enc[kept], demeaned]),
    )
    b = _biases(rep, all_targets, kept_features, logit_ids)
    bias[:n_kept] = b[:n_kept]
    bias[n_nodes - len(logit_ids) :] = b[n_kept:]
    return _package(
        model,
        transcoders,
        rep,
        kept_features,
        logit_ids,
        logit_probs,
        adjacency,
        bias,
        {
            "max_n_logits": max_n_logits,
            "desired_logit_prob": desired_logit_prob,
            "batch_size": batch,
            "max_feature_nodes": max_feature_nodes,
            "n_active_features": n_total,
        },
    )


def _str_tokens(model: Any, ids: Sequence[int]) -> list[str]:
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        return [str(int(i)) for i in ids]
    return [tokenizer.decode([int(i)]) for i in ids]


def _package(
    model: Any,
    transcoders: Sequence[Any],
    rep: Replacement,
    features: torch.Tensor,
    logit_ids: torch.Tensor,
    logit_probs: torch.Tensor,
    adjacency: torch.Tensor,
    bias: torch.Tensor,
    settings: dict[str, Any],
) -> Graph:
    strs = _str_tokens(model, rep.tokens.tolist())
    logit_strs = _str_tokens(model, logit_ids.tolist())
    nodes = [
        Node("feature", layer, pos, feat, float(rep.layers[layer].acts[pos, feat]), f"L{layer}/F{feat}@{pos}")
        for layer, pos, feat in features.tolist()
    ]
    nodes += [
        Node("error", layer, pos, -1, float(rep.layers[layer].error[pos].norm()), f"err L{layer}@{pos}")
        for layer in range(rep.n_layers)
        for pos in range(rep.n_pos)
    ]
    nodes += [
        Node("token", -1, pos, int(t), float(rep.embed[pos].norm()), strs[pos])
        for pos, t in enumerate(rep.tokens.tolist())
    ]
    last = rep.logits[-1]
    nodes += [
        Node("logit", rep.n_layers, rep.n_pos - 1, int(t), float(last[t] - last.mean()), logit_strs[i])
        for i, t in enumerate(logit_ids.tolist())
    ]
    meta = {
        "model": getattr(model, "name", "model"),
        "n_layers": rep.n_layers,
        "d_model": int(rep.embed.shape[1]),
        "transcoders": [
            tc.cfg.metadata.get("name", tc.cfg.hook_name)
            if isinstance(tc.cfg.metadata, dict)
            else tc.cfg.hook_name
            for tc in transcoders
        ],
        "d_transcoder": [int(tc.cfg.d_sae) for tc in transcoders],
        "generation_settings": settings,
    }
    return Graph(
        adjacency=adjacency,
        nodes=nodes,
        logit_probs=logit_probs.detach().clone(),
        logit_tokens=logit_ids.tolist(),
        prompt_tokens=rep.tokens.tolist(),
        prompt_str_tokens=strs,
        bias=bias,
        metadata=meta,
    )


def demeaned_logit(rep: Replacement, token: int) -> float:
    """The value a logit node carries: ``logit_t - mean_j logit_j`` at the last position."""
    last = rep.logits[-1]
    return float(last[token] - last.mean())


__all__ = ["attribute", "salient_logits", "demeaned_logit"]
