"""Direct logit attribution and the logit lens: invariants (DLA sums to the logit difference, the
lens's last layer is the logits) and agreement with TransformerLens 4.3's own implementations on a
bridge in compatibility mode (folded LN)."""

from __future__ import annotations

import copy

import pytest
import torch
from test_patching import TOY  # the patching suite's toy: the same 2-layer attention-only bridge

import interp
from interp.errors import InputError
from interp.methods import lens


@pytest.fixture(scope="module")
def toy():
    model = interp.load(TOY)
    with torch.no_grad():  # non-trivial LN weights, so folding them matters
        generator = torch.Generator().manual_seed(0)
        for name, param in model.bridge.named_parameters():
            if "ln" in name:
                param.add_(0.3 * torch.randn(param.shape, generator=generator))
    return model


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 39, (3, 7), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("by", ["component", "layer", "head"])
def test_dla_sums_to_the_logit_difference_on_a_native_model(toy, tokens, by):
    result = lens.direct_logit_attribution(toy, tokens, tokens[:, -1], 5, by=by)
    logits = toy(tokens)[:, -1]
    target = (logits[torch.arange(3), tokens[:, -1]] - logits[:, 5]).mean()
    assert result.metric_clean == pytest.approx(float(target), abs=1e-5)
    assert float(result.values.sum()) + sum(result.extras.values()) == pytest.approx(float(target), abs=1e-4)


@pytest.mark.parametrize("by", ["component", "head", "neuron"])
def test_dla_sums_to_the_logit_difference_on_an_hf_model(gpt2_model, by):
    tokens = torch.randint(2, 20, (2, 5), generator=torch.Generator().manual_seed(2))
    result = lens.direct_logit_attribution(gpt2_model, tokens, 4, 7, by=by)
    logits = gpt2_model(tokens)[:, -1]
    target = float((logits[:, 4] - logits[:, 7]).mean())
    assert float(result.values.sum()) + sum(result.extras.values()) == pytest.approx(target, abs=1e-4)
    if by == "neuron":
        assert result.dims == ("layer", "neuron") and result.values.shape == (2, 128)


def test_dla_agrees_with_transformer_lens_in_compatibility_mode(toy, tokens):
    from transformer_lens.tools.analysis import direct_logit_attribution

    bridge = copy.deepcopy(toy.bridge)
    bridge.enable_compatibility_mode()
    folded = interp.load(bridge.eval())
    ours = lens.direct_logit_attribution(folded, tokens, 3, 5, by="head")
    ref = direct_logit_attribution(bridge, tokens, 3, 5, unit="head")
    assert ref.labels[:8] == [f"L{layer}H{h}" for layer in range(2) for h in range(4)]
    assert (ours.values.flatten() - ref.attribution[:8].mean(-1)).abs().max() <= 1e-4
    # the total is the same logit difference with or without folding
    raw = lens.direct_logit_attribution(toy, tokens, 3, 5, by="component")
    assert ours.metric_clean == pytest.approx(raw.metric_clean, abs=1e-4)


def test_logit_lens_ends_at_the_logits_and_matches_transformer_lens(toy, tokens):
    from transformer_lens.tools.analysis import logit_lens

    result = lens.logit_lens(toy, tokens)
    assert result.logits.shape == (3, 3, 7, 40) and result.labels == ["embed", "L0", "L1"]
    assert (result.logits[-1] - toy(tokens)).abs().max() <= 1e-5
    bridge = copy.deepcopy(toy.bridge)
    bridge.enable_compatibility_mode()
    ref = logit_lens(bridge.eval(), tokens, positions=-1)  # rows: 0_pre, 1_pre, final_post
    ours = lens.logit_lens(interp.load(bridge), tokens).logits[:, :, -1]
    assert (ours - ref.values).abs().max() <= 1e-4
    rows = result.table(pos=-1, k=3)
    assert len(rows) == 3 and set(rows[0]) == {"layer", "top1", "top2", "top3"}


def test_logit_lens_on_an_hf_model(gpt2_model):
    tokens = torch.randint(2, 20, (1, 6), generator=torch.Generator().manual_seed(3))
    result = lens.logit_lens(gpt2_model, tokens)
    assert (result.logits[-1] - gpt2_model(tokens)).abs().max() <= 1e-5


def test_encoders_have_no_logit_lens(minilm):
    with pytest.raises(InputError, match="no unembedding"):
        lens.logit_lens(minilm, "The cat sat.")
    with pytest.raises(InputError, match="no unembedding"):
        lens.direct_logit_attribution(minilm, "The cat sat.", 3, 4)
