"""Head detectors against TransformerLens's head_detector functions applied to the bridge's own
attention patterns (its ``detect_head`` asserts on bridges), against a hand computation, and on the
zoo's induction model, whose induction and previous-token heads the reproduction knows."""

from __future__ import annotations

import pytest
import torch
from transformer_lens import head_detector as hd

import interp
from interp.errors import InputError
from interp.methods.heads import HEAD_NAMES, detect_head, detect_heads, detection_pattern
from interp.models import zoo
from interp.reproductions import induction as repro

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = "the cat sat on the mat and the cat ran"
TL_NAMES = ("previous_token_head", "duplicate_token_head", "induction_head")


@pytest.fixture(scope="module")
def bridge(gpt2_dir):
    from transformer_lens.model_bridge import TransformerBridge

    return TransformerBridge.boot_transformers(gpt2_dir, device="cpu").eval()


@pytest.fixture(scope="module")
def induction():
    return interp.load("zoo:induction-2l")


def _tl_scores(bridge, tokens, name, **kwargs) -> torch.Tensor:
    """TL's detection pattern and similarity score, head by head, on the bridge's patterns."""
    _, cache = bridge.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_pattern"))
    target = getattr(hd, f"get_{name}_detection_pattern")(tokens.cpu())
    out = torch.empty(bridge.cfg.n_layers, bridge.cfg.n_heads)
    for layer in range(bridge.cfg.n_layers):
        for head in range(bridge.cfg.n_heads):
            pattern = cache[f"blocks.{layer}.attn.hook_pattern"][0, head]
            out[layer, head] = hd.compute_head_attention_similarity_score(pattern, target, **kwargs)
    return out


@pytest.mark.parametrize("name", TL_NAMES)
@pytest.mark.parametrize("error_measure", ["mul", "abs"])
def test_scores_equal_tl_head_detector_on_the_bridge_patterns(gpt2_model, bridge, name, error_measure):
    tokens = gpt2_model.to_tokens(TEXT)
    assert torch.equal(tokens, bridge.to_tokens(TEXT))
    for exclude_bos in (False, True):
        for exclude_current in (False, True):
            flags = {"exclude_bos": exclude_bos, "exclude_current_token": exclude_current}
            ours = detect_head(gpt2_model, TEXT, name, error_measure=error_measure, **flags)
            theirs = _tl_scores(bridge, tokens, name, error_measure=error_measure, **flags)
            # HF's sdpa and TL's eager attention differ by ~1e-7; "abs" rounds to 3 decimals as TL does
            torch.testing.assert_close(ours, theirs, atol=1e-5 if error_measure == "mul" else 1e-3, rtol=0)


def test_patterns_equal_tl_detection_patterns():
    tokens = torch.tensor([[0, 5, 6, 5, 6, 7, 5]])
    for name in TL_NAMES:
        theirs = getattr(hd, f"get_{name}_detection_pattern")(tokens)
        assert torch.equal(detection_pattern(name, tokens), theirs.float())
    first = detection_pattern("first_token_head", tokens)
    assert torch.equal(first, torch.zeros(7, 7).index_fill_(1, torch.tensor([0]), 1.0))


def test_scores_equal_a_hand_computation_on_one_head(gpt2_model):
    tokens = gpt2_model.to_tokens(TEXT)
    _, cache = gpt2_model.run_with_cache(tokens, names="blocks.1.attn.hook_pattern")
    pattern = cache["blocks.1.attn.hook_pattern"][0, 2].double()
    n = tokens.shape[1]
    previous = sum(pattern[q, q - 1] for q in range(1, n)) / pattern.sum()
    first = pattern[:, 0].sum() / pattern.sum()
    no_bos = pattern.clone()
    no_bos[:, 0] = 0
    previous_no_bos = sum(no_bos[q, q - 1] for q in range(1, n)) / no_bos.sum()
    target = torch.diag(torch.ones(n - 1, dtype=torch.double), -1)
    absolute = 1 - round(float((pattern - target).abs().sum() / n), 3)
    scores = detect_heads(gpt2_model, TEXT)
    assert set(scores) == set(HEAD_NAMES)
    assert scores["previous_token_head"][1, 2].item() == pytest.approx(float(previous), abs=1e-6)
    assert scores["first_token_head"][1, 2].item() == pytest.approx(float(first), abs=1e-6)
    assert detect_head(gpt2_model, TEXT, "previous_token_head", exclude_bos=True)[
        1, 2
    ].item() == pytest.approx(float(previous_no_bos), abs=1e-6)
    assert detect_head(gpt2_model, TEXT, "previous_token_head", error_measure="abs")[
        1, 2
    ].item() == pytest.approx(absolute, abs=1e-6)
    # a pattern tensor, and restricting to some heads (the others get -1, as in TL)
    only = detect_head(gpt2_model, tokens, target.float(), heads=[(1, 2)])
    assert only[1, 2].item() == pytest.approx(float(previous), abs=1e-6)
    assert (only[0] == -1).all() and (only[1, [0, 1, 3]] == -1).all()


def test_a_cache_of_the_sequence_gives_the_same_scores(gpt2_model):
    tokens = gpt2_model.to_tokens(TEXT)
    _, cache = gpt2_model.run_with_cache(tokens, names="blocks.*.attn.hook_pattern")
    fresh = detect_head(gpt2_model, tokens, "induction_head", exclude_current_token=True)
    assert torch.equal(
        detect_head(gpt2_model, tokens, "induction_head", cache=cache, exclude_current_token=True), fresh
    )
    with pytest.raises(InputError, match="one sequence"):
        detect_head(gpt2_model, [TEXT, TEXT], "induction_head", cache=cache)


def test_several_sequences_give_the_mean_score(gpt2_model):
    texts = [TEXT, "a dog ran on the rug"]
    mean = detect_head(gpt2_model, texts, "duplicate_token_head")
    each = torch.stack([detect_head(gpt2_model, t, "duplicate_token_head") for t in texts]).mean(0)
    torch.testing.assert_close(mean, each)


def test_the_known_induction_and_previous_token_heads_score_highest(induction):
    tokens = zoo.repeated_tokens(8, 20, 64, seed=repro.EVAL_SEED)  # [BOS, r, r]
    scores = detect_heads(induction, tokens)
    _, patterns = repro.patterns(induction, tokens)
    ind_reference = repro.induction_scores(patterns, 20)  # the reproduction's (ARENA's) definitions
    prev_reference = repro.prev_token_scores(patterns)
    top_induction = divmod(int(scores["induction_head"].argmax()), induction.cfg.n_heads)
    top_previous = divmod(int(scores["previous_token_head"].argmax()), induction.cfg.n_heads)
    assert top_induction == (1, int(ind_reference[1].argmax())) and top_induction[0] == 1
    assert top_previous == (0, int(prev_reference[0].argmax()))
    # TL's "mul" induction score is the diagonal score times its ceiling n / (2n + 1) (see the reproduction)
    torch.testing.assert_close(
        scores["induction_head"], repro.mul_scores(patterns, tokens), atol=1e-5, rtol=0
    )
    assert scores["induction_head"][0].max() < 0.1 < scores["induction_head"][1].max()
    flags = {"exclude_bos": True, "exclude_current_token": False, "error_measure": "abs"}
    for name in TL_NAMES:  # TL's functions on the zoo bridge's own patterns
        theirs = _tl_scores(induction.bridge, tokens[:1], name, **flags)
        torch.testing.assert_close(
            detect_head(induction, tokens[:1], name, **flags), theirs, atol=1e-3, rtol=0
        )


def test_bad_input_is_refused_with_a_clear_error(gpt2_model, tiny_cnn):
    for kwargs, match in (
        ({"detection_pattern": "induction"}, "unknown head type"),
        ({"detection_pattern": "induction_head", "error_measure": "l2"}, "error_measure"),
        ({"detection_pattern": torch.ones(3, 3)}, "lower-triangular"),
        ({"detection_pattern": "induction_head", "heads": [(5, 0)]}, "does not exist"),
    ):
        with pytest.raises(InputError, match=match):
            detect_head(gpt2_model, TEXT, **kwargs)
    with pytest.raises(InputError, match="2 to"):
        detect_head(gpt2_model, torch.tensor([[3]]), "previous_token_head")
    with pytest.raises(InputError, match="not one"):
        detect_head(interp.load(tiny_cnn), TEXT, "previous_token_head")


def test_detectors_run_on_an_encoder(minilm):
    """MiniLM attends both ways; the scores are still the share of attention on the predicted keys."""
    tokens = minilm.to_tokens("the cat sat on the mat")
    _, cache = minilm.run_with_cache(tokens, names="blocks.4.attn.hook_pattern")
    pattern = cache["blocks.4.attn.hook_pattern"][0, 7]
    n = tokens.shape[1]
    previous = pattern[torch.arange(1, n), torch.arange(n - 1)].sum() / pattern.sum()
    scores = detect_heads(minilm, tokens)
    assert scores["previous_token_head"].shape == (6, 12)
    assert scores["previous_token_head"][4, 7].item() == pytest.approx(float(previous), abs=1e-6)
