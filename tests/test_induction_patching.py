"""Localizing the induction circuit by patching: the recipe the zoo reproduction calls."""

from __future__ import annotations

import pytest
import torch

import interp
from interp.methods.induction_patching import localize_induction, repeated_tokens_pair, second_half_logprob

TOY = dict(
    n_layers=2, d_model=16, n_heads=2, d_head=8, n_ctx=24, d_vocab=20, attn_only=True, act_fn=None,
    normalization_type="LN", positional_embedding_type="standard", seed=0,
)  # fmt: skip


def test_pairs_and_metric():
    model = interp.load(TOY)
    clean, corrupted = repeated_tokens_pair(model, half_len=5, batch=3, seed=1)
    assert clean.shape == corrupted.shape == (3, 11) and (clean[:, 0] == 19).all()
    assert torch.equal(clean[:, 1:6], clean[:, 6:]) and torch.equal(corrupted[:, 6:], clean[:, 6:])
    logits = model(clean)
    metric = second_half_logprob(clean)
    ref = logits.log_softmax(-1)[:, 5:10].gather(-1, clean[:, 6:11, None]).mean()
    assert float(metric(logits)) == pytest.approx(float(ref), abs=1e-5)
    found = localize_induction(model, half_len=5, batch=2)
    assert found.heads.values.shape == (2, 2) and found.head_pos.values.shape == (2, 11, 2)
    assert found.previous_token_head[0] == 0 and found.induction_head[0] == 1


def test_zoo_induction_heads_are_localized():
    from interp.models import zoo

    if not any(e["name"] == "induction-2l" and e["has_checkpoint"] for e in zoo.describe()):
        pytest.skip("zoo:induction-2l has no shipped checkpoint yet")
    model = interp.load("zoo:induction-2l")
    found = localize_induction(model, half_len=20, batch=8)
    _, meta = zoo.load_zoo("induction-2l")
    scores = meta["metrics"]
    prev = max(range(4), key=lambda h: scores["prev_token_scores"][0][h])
    assert found.previous_token_head == (0, prev)
    layer, head = found.induction_head
    assert layer == 1 and scores["induction_scores"][1][head] > 0.5
    # knocking out the previous-token head breaks most of the induction (one path for all heads)
    assert float(found.heads.values[0, prev]) > 0.5 and float(found.heads.values[1, head]) > 0.3
