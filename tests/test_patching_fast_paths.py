"""The sweep's shortcuts for metrics that read little of the output, against TransformerLens 4.3's
``get_act_patch_*_by_pos`` on the same weights (one full forward per patch, no shortcut):

* a patch in the last block after which nothing mixes positions (head outputs, queries, pattern
  rows), at a position the metric does not read, takes the unpatched run's value without a forward;
* on a native bridge, earlier patches run the last block's queries (and its MLP and the unembedding)
  only at the positions the metric reads;
* on a Hugging Face model, a logit difference computes only its two logit columns;
* GPT-2's ``gelu_new`` runs as one fused kernel inside the sweep's forwards.
"""

from __future__ import annotations

import pytest
import torch
import transformer_lens.patching as tlp

import interp
from interp.methods import patching as P
from interp.methods.induction_patching import repeated_tokens_pair, second_half_logprob
from interp.models import suffix

TOY = dict(
    n_layers=2, d_model=32, n_heads=4, d_head=8, n_ctx=24, d_vocab=40, attn_only=True, act_fn=None,
    normalization_type="LN", positional_embedding_type="standard", seed=0,
)  # fmt: skip

BY_POS = {
    "head_pos": tlp.get_act_patch_attn_head_out_by_pos,
    "head_q_pos": tlp.get_act_patch_attn_head_q_by_pos,
    "head_pattern_pos": tlp.get_act_patch_attn_head_pattern_by_pos,
    "head_k_pos": tlp.get_act_patch_attn_head_k_by_pos,
}


def forwards_of(model, monkeypatch) -> list[int]:
    """Records the number of copies of each patched forward of a sweep."""
    copies: list[int] = []
    run = type(model).run_copies

    def counting(self, inputs, n, hooks, **kwargs):
        copies.append(n)
        return run(self, inputs, n, hooks, **kwargs)

    monkeypatch.setattr(type(model), "run_copies", counting)
    return copies


@pytest.mark.parametrize("site", list(BY_POS))
def test_unread_positions_of_the_last_block_equal_transformer_lens(site, monkeypatch):
    """Induction's metric reads positions 5..9 of 11: last-block head outputs, queries and pattern
    rows elsewhere are not run, and every cell still equals TL's forward; keys (which later
    positions read) are all run."""
    model = interp.load(TOY)
    bridge = model.module.eval()
    clean, corrupted = repeated_tokens_pair(model, half_len=5, batch=2, seed=1)
    metric = second_half_logprob(clean)
    _, clean_cache = bridge.run_with_cache(clean)
    P.patch(model, clean, corrupted, site, metric)  # the checks of the shortcuts run (once) here
    copies = forwards_of(model, monkeypatch)
    ours = P.patch(model, clean, corrupted, site, metric)
    ref = BY_POS[site](bridge, corrupted, clean_cache, metric)
    assert (ours.values.flatten() - ref.flatten()).abs().max() <= 1e-5
    n_pos, heads = clean.shape[1], model.cfg.n_heads
    last_layer_run = n_pos * heads if site == "head_k_pos" else len(metric.positions) * heads
    assert sum(copies) == n_pos * heads + last_layer_run
    # layer-0 patches ran the last block's queries at the read positions only (checked, then used)
    assert any(ok for key, ok in model._suffix_checks.items() if key[0] == "query rows")


@pytest.mark.parametrize("site", ["head_pos", "head_q_pos"])
def test_logit_diff_on_hf_reads_two_columns_and_equals_transformer_lens(site, gpt2_model, monkeypatch):
    """GPT-2 (HF, gelu_new): a logit difference at the last position. The patched forwards end in
    two logit columns, the last block runs only its last position's patches, and every cell equals
    TL's full forward."""
    torch.manual_seed(3)
    clean = torch.randint(2, 20, (1, 7))
    corrupted = clean.clone()
    corrupted[0, [1, 3]] = corrupted[0, [3, 1]]
    metric = P.logit_diff(int(clean[0, 1]), int(clean[0, 3]))
    bridge = gpt2_model.to_bridge()
    _, clean_cache = bridge.run_with_cache(clean)

    def tl_metric(logits):
        return logits[0, -1, int(clean[0, 1])] - logits[0, -1, int(clean[0, 3])]

    widths: list[int] = []
    batched = P.LogitDiff.batched
    monkeypatch.setattr(
        P.LogitDiff, "batched", lambda self, out: widths.append(out.shape[-1]) or batched(self, out)
    )
    P.patch(gpt2_model, clean, corrupted, site, metric)  # the checks of the shortcuts run (once) here
    widths.clear()
    copies = forwards_of(gpt2_model, monkeypatch)
    ours = P.patch(gpt2_model, clean, corrupted, site, metric)
    ref = BY_POS[site](bridge, corrupted, clean_cache, tl_metric)
    assert (ours.values.flatten() - ref.flatten()).abs().max() <= 1e-5
    heads = gpt2_model.cfg.n_heads
    assert sum(copies) == clean.shape[1] * heads + heads  # last block: the last position's heads only
    assert widths.count(2) == len(copies)  # each patched forward: two columns (unpatched runs: all)


def test_fused_gelu_is_hf_gelu_new_and_is_restored(gpt2_model):
    from transformers.activations import NewGELUActivation

    act = next(m for m in gpt2_model.module.modules() if type(m) is NewGELUActivation)
    x = torch.randn(4, 7, 128) * 3
    reference = act(x)
    with suffix._fused_gelu(gpt2_model.module):
        fused = act(x)
        assert "forward" in act.__dict__
    assert "forward" not in act.__dict__
    assert (fused - reference).abs().max() <= 1e-6
