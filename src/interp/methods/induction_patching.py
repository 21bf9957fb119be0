"""Repeated-token prompt pairs and a patching recipe that localizes induction circuits.

Clean: ``[BOS, r, r]`` (the second copy is predictable by induction). Corrupted: ``[BOS, s, r]``
(same second half, a different first half: nothing to copy from). Patching clean into corrupted
restores the log-probability of the second half only through what carries the repeat: the
previous-token head (layer 0, on first-half positions) and the induction head (layer 1, on
second-half positions). This is what the zoo's induction reproduction calls.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from interp.errors import InputError
from interp.methods.patching import Metric, PatchResult, Progress, patch
from interp.models.base import HookedModel


def repeated_tokens_pair(
    model: HookedModel, half_len: int = 20, batch: int = 8, seed: int = 0, bos: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(clean, corrupted)`` token ids ``[batch, 1 + 2 * half_len]``: ``[BOS, r, r]`` and ``[BOS, s, r]``.

    Tokens are uniform over ``0 .. d_vocab - 2``; BOS defaults to ``d_vocab - 1`` (the zoo's convention).
    """
    d_vocab = getattr(model, "d_vocab", None)
    n_ctx = getattr(model, "n_ctx", None) or 1 + 2 * half_len
    if not d_vocab:
        raise InputError(f"{model.name} has no token vocabulary; repeated-token pairs need a language model")
    if 1 + 2 * half_len > n_ctx:
        raise InputError(f"half_len={half_len} makes {1 + 2 * half_len} tokens; {model.name} takes {n_ctx}")
    vocab = d_vocab - 1
    bos = vocab if bos is None else bos
    generator = torch.Generator().manual_seed(seed)
    r = torch.randint(vocab, (batch, half_len), generator=generator)
    s = torch.randint(vocab, (batch, half_len), generator=generator)
    start = torch.full((batch, 1), bos)
    return torch.cat([start, r, r], 1), torch.cat([start, s, r], 1)


@dataclass
class NextTokenLogProb(Metric):
    """Mean log-probability of ``targets[:, t + 1]`` predicted at positions ``t`` in ``positions``."""

    targets: torch.Tensor = field(default_factory=lambda: torch.zeros(1, 1, dtype=torch.long))
    positions: list[int] = field(default_factory=list)
    name = "log p(next token)"

    def batched(self, output: torch.Tensor) -> torch.Tensor:
        pos = torch.tensor(self.positions)
        logp = output[:, :, pos].log_softmax(-1)  # [copies, batch, n, vocab]
        wanted = self.targets[:, pos + 1].to(output.device)
        picked = logp.gather(-1, wanted[None, :, :, None].expand(logp.shape[0], -1, -1, 1))
        return picked.mean((1, 2, 3))

    def positions_used(self) -> list[int]:
        return list(self.positions)


def second_half_logprob(clean: torch.Tensor) -> Metric:
    """Mean log-prob of the second copy's tokens (each predicted from the previous position)."""
    half = (clean.shape[1] - 1) // 2
    return NextTokenLogProb(targets=clean, positions=list(range(half, 2 * half)))


@dataclass
class InductionLocalization:
    """Head-level and head-by-position patching for the repeated-token pair, plus the verdict."""

    heads: PatchResult  # [layer, head], normalized: 1 = this head alone causes the whole loss gap
    head_pos: PatchResult  # [layer, pos, head], normalized the same way
    previous_token_head: tuple[int, int]  # strongest head of the first layer on first-half positions
    induction_head: tuple[int, int]  # strongest head of later layers on second-half positions
    extras: dict[str, Any] = field(default_factory=dict)


def localize_induction(
    model: HookedModel, half_len: int = 20, batch: int = 8, seed: int = 0, progress: Progress | None = None
) -> InductionLocalization:
    """Find the previous-token head and the induction head by (noising) activation patching.

    Each head's output is taken from the corrupted run ``[BOS, s, r]`` into the clean run
    ``[BOS, r, r]``; normalized values say how much of the induction loss gap that one head causes
    (1 = all of it). Denoising (clean into corrupted) cannot single out the previous-token head: it
    restores where the induction head looks but not the first-copy tokens it copies. The
    previous-token head is the most damaging layer-0 head, the induction head the most damaging
    later head; ``head_pos`` shows where (first-half positions for the former, second half for the latter).
    """
    clean, corrupted = repeated_tokens_pair(model, half_len, batch, seed)
    metric = second_half_logprob(clean)
    heads = patch(model, corrupted, clean, "head", metric, progress=progress).normalized()
    by_pos = patch(model, corrupted, clean, "head_pos", metric, progress=progress).normalized()
    first = heads.values[0]
    later = heads.values[1:]
    prev = (0, int(first.argmax()))
    flat = int(later.argmax())
    ind = (1 + flat // later.shape[1], flat % later.shape[1])
    extras = {
        "first_half": by_pos.values[0, 1 : half_len + 1].sum(0),
        "second_half": by_pos.values[1:, half_len + 1 :].sum(1),
    }
    return InductionLocalization(heads, by_pos, prev, ind, extras)


__all__ = [
    "InductionLocalization",
    "NextTokenLogProb",
    "localize_induction",
    "repeated_tokens_pair",
    "second_half_logprob",
]
