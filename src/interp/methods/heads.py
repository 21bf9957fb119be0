"""Head detectors: how much each attention head looks like a previous-token, duplicate-token,
induction or first-token head, with TransformerLens's ``detect_head`` semantics, on every backend.

A detection pattern ``P`` is a lower-triangular ``[pos, pos]`` matrix of where such a head attends
from each query (TransformerLens's ``get_*_detection_pattern``):

* ``previous_token_head``: ``P[q, q - 1] = 1``;
* ``duplicate_token_head``: ``P[q, k] = 1`` for earlier ``k`` holding the same token as ``q``;
* ``induction_head``: the duplicate pattern shifted right by one (attend to the token after an
  earlier copy of the current one);
* ``first_token_head``: ``P[q, 0] = 1`` (an attention sink on the first token, BOS), interp's own
  addition to TransformerLens's three.

A head's score compares its pattern ``A`` with ``P`` (``error_measure``):

* ``"mul"`` (default): ``sum(A * P) / sum(A)``, the share of attention on the predicted entries;
* ``"abs"``: ``1 - sum|A - P| / pos`` rounded to 3 decimals, as TL does (1 = a perfect match).

``exclude_bos`` zeroes attention to position 0 and ``exclude_current_token`` the diagonal before
scoring (in ``"mul"`` the denominator then counts only what is left). Several sequences (a list of
strings, or ids ``[batch, pos]``) give the mean of their scores, each run on its own, unpadded.
TransformerLens's own ``detect_head`` asserts on bridges; this one reads the patterns from
``run_with_cache`` (one forward per sequence; active hooks apply) on any transformer.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import torch

from interp.errors import InputError
from interp.models.base import HookedModel

HEAD_NAMES = ("previous_token_head", "duplicate_token_head", "induction_head", "first_token_head")
ERROR_MEASURES = ("mul", "abs")
PATTERN = "blocks.*.attn.hook_pattern"


# ------------------------------------------------------------------------------------------------
# Detection patterns
# ------------------------------------------------------------------------------------------------


def previous_token_pattern(tokens: torch.Tensor) -> torch.Tensor:
    """``[pos, pos]``: 1 one below the diagonal."""
    n = tokens.shape[-1]
    return torch.diag(torch.ones(n - 1), diagonal=-1)


def duplicate_token_pattern(tokens: torch.Tensor) -> torch.Tensor:
    """``[pos, pos]``: 1 where an earlier key holds the query's token."""
    row = tokens.reshape(-1).cpu()
    return torch.tril((row[:, None] == row[None, :]).float(), diagonal=-1)


def induction_pattern(tokens: torch.Tensor) -> torch.Tensor:
    """``[pos, pos]``: the duplicate pattern shifted one key to the right."""
    dup = duplicate_token_pattern(tokens)
    return torch.tril(torch.nn.functional.pad(dup[:, :-1], (1, 0)))


def first_token_pattern(tokens: torch.Tensor) -> torch.Tensor:
    """``[pos, pos]``: 1 in the first column."""
    n = tokens.shape[-1]
    out = torch.zeros(n, n)
    out[:, 0] = 1.0
    return out


_PATTERNS = {
    "previous_token_head": previous_token_pattern,
    "duplicate_token_head": duplicate_token_pattern,
    "induction_head": induction_pattern,
    "first_token_head": first_token_pattern,
}


def detection_pattern(name: str, tokens: torch.Tensor) -> torch.Tensor:
    """The ``[pos, pos]`` detection pattern ``name`` (one of ``HEAD_NAMES``) for one sequence of ids."""
    if name not in _PATTERNS:
        raise InputError(
            f"unknown head type {name!r}; use one of {HEAD_NAMES} or pass a [pos, pos] pattern tensor"
        )
    return _PATTERNS[name](tokens)


# ------------------------------------------------------------------------------------------------
# Scores
# ------------------------------------------------------------------------------------------------


def similarity_scores(
    patterns: torch.Tensor,
    target: torch.Tensor,
    *,
    exclude_bos: bool = False,
    exclude_current_token: bool = False,
    error_measure: str = "mul",
) -> torch.Tensor:
    """Scores ``[...]`` of attention patterns ``[..., pos, pos]`` against one detection pattern
    (TL's ``compute_head_attention_similarity_score``, for all heads at once)."""
    pattern = patterns.float()
    target = target.to(pattern)
    keep = torch.ones(pattern.shape[-2:], dtype=torch.bool, device=pattern.device)
    if exclude_bos:
        keep[:, 0] = False
    if exclude_current_token:
        keep.fill_diagonal_(False)
    if error_measure == "mul":
        masked = pattern * keep
        return (masked * target).sum(dim=(-2, -1)) / masked.sum(dim=(-2, -1))
    diff = (pattern - target).abs() * keep
    size = pattern.shape[-1]
    return 1 - torch.round(diff.sum(dim=(-2, -1)) / size, decimals=3)


def detect_head(
    model: HookedModel,
    seq: str | Sequence[str] | torch.Tensor,
    detection_pattern: str | torch.Tensor,
    heads: Sequence[tuple[int, int]] | dict[int, Sequence[int]] | None = None,
    cache: Any = None,
    *,
    exclude_bos: bool = False,
    exclude_current_token: bool = False,
    error_measure: str = "mul",
) -> torch.Tensor:
    """Scores ``[layer, head]`` of every head for one kind of head (see the module docstring).

    Args:
        model: a transformer (HF model, MiniLM, zoo / native bridge).
        seq: text (tokenized with ``model.to_tokens``, BOS first by default), a list of texts, or
            ids ``[pos]`` / ``[batch, pos]``. Several sequences give the mean score.
        detection_pattern: one of ``HEAD_NAMES``, or a lower-triangular ``[pos, pos]`` tensor (one
            sequence only).
        heads: score only these ``(layer, head)`` pairs (or ``{layer: [heads]}``); others get -1.
        cache: an ``ActivationCache`` of ``seq`` with its ``hook_pattern``s, to skip the forward.
        exclude_bos, exclude_current_token, error_measure: see the module docstring.
    """
    if error_measure not in ERROR_MEASURES:
        raise InputError(f"error_measure must be one of {ERROR_MEASURES}, got {error_measure!r}")
    if isinstance(detection_pattern, str) and detection_pattern not in HEAD_NAMES:
        raise InputError(
            f"unknown head type {detection_pattern!r}; use one of {HEAD_NAMES} or a pattern tensor"
        )
    sequences = _sequences(model, seq)
    if cache is not None and len(sequences) != 1:
        raise InputError(
            "a cache holds one sequence's patterns: pass one sequence with cache=, or omit cache"
        )
    chosen = _chosen_heads(model, heads)
    targets = {"pattern": lambda tokens: _target(detection_pattern, tokens, len(sequences))}
    options = {"exclude_bos": exclude_bos, "exclude_current_token": exclude_current_token}
    mean = _mean_scores(model, sequences, targets, cache, error_measure=error_measure, **options)["pattern"]
    return torch.where(chosen, mean, torch.full_like(mean, -1.0))


def detect_heads(
    model: HookedModel,
    seq: str | Sequence[str] | torch.Tensor,
    *,
    exclude_bos: bool = False,
    exclude_current_token: bool = False,
    error_measure: str = "mul",
) -> dict[str, torch.Tensor]:
    """All four detectors at once: ``{head type: scores [layer, head]}``, one forward per sequence."""
    if error_measure not in ERROR_MEASURES:
        raise InputError(f"error_measure must be one of {ERROR_MEASURES}, got {error_measure!r}")
    targets = {name: (lambda tokens, name=name: detection_pattern(name, tokens)) for name in HEAD_NAMES}
    options = {"exclude_bos": exclude_bos, "exclude_current_token": exclude_current_token}
    return _mean_scores(model, _sequences(model, seq), targets, None, error_measure=error_measure, **options)


def _mean_scores(
    model: HookedModel,
    sequences: list[torch.Tensor],
    targets: dict[str, Callable[[torch.Tensor], torch.Tensor]],
    cache: Any,
    **options: Any,
) -> dict[str, torch.Tensor]:
    """``{name: mean over sequences of similarity_scores(patterns, targets[name](tokens))}``, one
    forward per sequence whatever the number of targets."""
    totals: dict[str, list[torch.Tensor]] = defaultdict(list)
    for tokens in sequences:
        patterns = _patterns(model, tokens, cache)  # [layer, head, pos, pos]
        for name, target in targets.items():
            totals[name].append(similarity_scores(patterns, target(tokens), **options))
    return {name: torch.stack(values).mean(0).cpu() for name, values in totals.items()}


# ------------------------------------------------------------------------------------------------
# Internals
# ------------------------------------------------------------------------------------------------


def _sequences(model: HookedModel, seq: Any) -> list[torch.Tensor]:
    """Each sequence as ids ``[1, pos]``, checked: 1 < pos <= n_ctx."""
    if getattr(model, "kind", None) != "transformer" or not hasattr(model, "to_tokens"):
        raise InputError(
            f"head detectors need a transformer with attention patterns; {model.name} is not one"
        )
    if isinstance(seq, str):
        rows = [model.to_tokens(seq)]
    elif isinstance(seq, list | tuple) and seq and all(isinstance(s, str) for s in seq):
        rows = [model.to_tokens(s) for s in seq]
    elif isinstance(seq, torch.Tensor) and seq.ndim in (1, 2) and not seq.is_floating_point():
        ids = seq.reshape(1, -1) if seq.ndim == 1 else seq
        rows = [row[None] for row in ids]
    else:
        raise InputError("seq must be a string, a list of strings, or token ids [pos] / [batch, pos]")
    n_ctx = getattr(model, "n_ctx", None)
    for row in rows:
        if row.shape[-1] < 2 or (n_ctx is not None and row.shape[-1] > n_ctx):
            raise InputError(
                f"each sequence needs 2 to {n_ctx} tokens (the model's context length) to score heads on; "
                f"got {row.shape[-1]}"
            )
    return rows


def _target(pattern: str | torch.Tensor, tokens: torch.Tensor, n_sequences: int) -> torch.Tensor:
    if isinstance(pattern, str):
        return detection_pattern(pattern, tokens)
    pos = tokens.shape[-1]
    if n_sequences != 1:
        raise InputError(
            "a detection pattern tensor fits one sequence; pass one sequence, or a head type name"
        )
    if pattern.shape != (pos, pos) or not torch.equal(pattern, torch.tril(pattern)):
        raise InputError(
            f"the detection pattern must be a lower-triangular [{pos}, {pos}] tensor for this {pos}-token "
            f"sequence; got shape {tuple(pattern.shape)}{'' if pattern.shape != (pos, pos) else ' (not lower-triangular)'}"
        )
    return pattern.float()


def _patterns(model: HookedModel, tokens: torch.Tensor, cache: Any) -> torch.Tensor:
    """Attention patterns ``[layer, head, pos, pos]`` of one sequence."""
    if cache is None:
        _, cache = model.run_with_cache(tokens, names=PATTERN, stop_early=True)
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(model.n_layers)]
    missing = [n for n in names if n not in cache]
    if missing:
        raise InputError(
            f"the cache lacks attention patterns {missing[:3]}; capture {PATTERN!r} (or omit cache)"
        )
    stacked = torch.stack([cache[n] for n in names])  # [layer, batch=1, head, q, k]
    if stacked.ndim != 5 or stacked.shape[1] != 1 or stacked.shape[-1] != tokens.shape[-1]:
        raise InputError(
            f"the cache's patterns have shape {tuple(stacked.shape[1:])}, not [1, head, {tokens.shape[-1]}, "
            f"{tokens.shape[-1]}]: the cache must be of this one sequence"
        )
    return stacked[:, 0]


def _chosen_heads(model: HookedModel, heads: Any) -> torch.Tensor:
    n_layers, n_heads = model.n_layers, model.cfg.n_heads
    if heads is None:
        return torch.ones(n_layers, n_heads, dtype=torch.bool)
    pairs = (
        [(layer, h) for layer, hs in heads.items() for h in hs] if isinstance(heads, dict) else list(heads)
    )
    chosen = torch.zeros(n_layers, n_heads, dtype=torch.bool)
    for layer, head in pairs:
        if not (0 <= layer < n_layers and 0 <= head < n_heads):
            raise InputError(f"head ({layer}, {head}) does not exist: {n_layers} layers x {n_heads} heads")
        chosen[layer, head] = True
    return chosen
