"""Weights and circuits in TransformerLens shapes, checked against TL 4.3's bridge on the same
weights and, independently, by recomputing hook activations from them."""

from __future__ import annotations

import pytest
import torch
from einops import einsum, rearrange

import interp
from interp.errors import InputError
from interp.methods.circuits import composition_baseline

WEIGHTS = ["W_E", "W_pos", "W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O"]
WEIGHTS += ["W_in", "b_in", "W_out", "b_out"]


@pytest.fixture(scope="module")
def gpt2_bridge(gpt2_dir):
    from transformer_lens.model_bridge import TransformerBridge

    return TransformerBridge.boot_transformers(gpt2_dir).eval()


@pytest.fixture(scope="module")
def induction():
    return interp.load("zoo:induction-2l")


def _heads(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """q/k/v/z as [batch, pos, head, d_head], whether the backend flattens the heads or not."""
    return rearrange(t, "b p (n h) -> b p n h", n=n_heads) if t.ndim == 3 else t


def test_hf_weights_equal_the_bridges_unprocessed_weights(gpt2_model, gpt2_bridge, one_thread):
    """boot_transformers does not process weights, so its accessors are the checkpoint's weights."""
    for name in [*WEIGHTS, "W_U", "b_U"]:
        ours, theirs = getattr(gpt2_model, name), getattr(gpt2_bridge, name).detach()
        assert ours.shape == theirs.shape, name
        assert torch.equal(ours, theirs), name
    assert gpt2_model.W_Q.shape == (2, 4, 32, 8) and gpt2_model.W_O.shape == (2, 4, 8, 32)
    assert gpt2_model.all_head_labels == gpt2_bridge.all_head_labels
    assert gpt2_model.all_head_labels[:5] == ["L0H0", "L0H1", "L0H2", "L0H3", "L1H0"]


def test_factored_circuits_equal_tl(gpt2_model, gpt2_bridge, one_thread):
    from transformer_lens import FactoredMatrix

    for name in ("QK", "OV"):
        ours, theirs = getattr(gpt2_model, name), getattr(gpt2_bridge, name)
        assert isinstance(ours, FactoredMatrix) and ours.shape == (2, 4, 32, 32)
        assert torch.allclose(ours.AB, theirs.AB.detach(), atol=1e-6)
        assert torch.allclose(ours.norm(), theirs.norm().detach(), atol=1e-5)
    w_q, w_k = gpt2_model.W_Q[1, 2], gpt2_model.W_K[1, 2]
    assert torch.allclose(gpt2_model.QK.AB[1, 2], w_q @ w_k.T, atol=1e-6)


def test_composition_scores_equal_tl_and_the_formula(gpt2_model, gpt2_bridge, one_thread):
    ov = gpt2_model.W_V @ gpt2_model.W_O  # dense [layer, head, d_model, d_model]
    qk = gpt2_model.W_Q @ gpt2_model.W_K.transpose(-1, -2)
    for mode, second in (("Q", qk), ("K", qk.transpose(-1, -2)), ("V", ov)):
        scores = gpt2_model.all_composition_scores(mode)
        assert scores.shape == (2, 4, 2, 4)
        assert torch.allclose(
            scores.scores, gpt2_bridge.all_composition_scores(mode).scores.detach(), atol=1e-6
        )
        for h1, h2 in ((0, 0), (1, 3), (3, 2)):
            left, right = ov[0, h1], second[1, h2]
            expected = (left @ right).norm() / (left.norm() * right.norm())
            assert torch.allclose(scores[0, h1, 1, h2], expected, atol=1e-6)
        assert torch.all(scores[1, :, 1, :] == 0) and torch.all(scores[1, :, 0, :] == 0)  # l1 >= l2 masked
    with pytest.raises(InputError, match="mode"):
        gpt2_model.all_composition_scores("X")


def test_weights_recompute_the_hooked_activations(gpt2_model, one_thread):
    tokens = gpt2_model.prepare(["the cat sat on the mat", "a dog ran"]).input_ids
    logits, cache = gpt2_model.run_with_cache(tokens)
    _check_recompute(gpt2_model, cache, tokens, logits)


def test_native_weights_recompute_and_match_its_bridge(induction, one_thread):
    tokens = torch.randint(0, induction.d_vocab, (2, 12), generator=torch.Generator().manual_seed(0))
    logits, cache = induction.run_with_cache(
        tokens, names=[n for n in induction.hook_names if induction.hook_shapes[n]]
    )
    _check_recompute(induction, cache, tokens, logits)
    for mode in "QKV":
        theirs = induction.bridge.all_composition_scores(mode).scores.detach()
        assert torch.allclose(induction.all_composition_scores(mode).scores, theirs, atol=1e-6)


def _check_recompute(model, cache, tokens, logits) -> None:
    n_heads, pos = model.cfg.n_heads, tokens.shape[1]
    assert torch.allclose(model.W_E[tokens], cache["hook_embed"], atol=1e-6)
    assert torch.allclose(model.W_pos[:pos], cache["hook_pos_embed"][0], atol=1e-6)
    for layer in range(model.n_layers):
        x = cache[f"blocks.{layer}.attn.hook_in"]
        for kind in "qkv":
            want = _heads(cache[f"blocks.{layer}.attn.hook_{kind}"], n_heads)
            w, b = getattr(model, f"W_{kind.upper()}")[layer], getattr(model, f"b_{kind.upper()}")[layer]
            got = einsum(x, w, "b p d, n d h -> b p n h") + b
            assert torch.allclose(got, want, atol=1e-5), (layer, kind)
        z = _heads(cache[f"blocks.{layer}.attn.hook_z"], n_heads)
        out = einsum(z, model.W_O[layer], "b p n h, n h d -> b p d") + model.b_O[layer]
        assert torch.allclose(out, cache[f"blocks.{layer}.hook_attn_out"], atol=1e-5)
        if f"blocks.{layer}.mlp.hook_post" in cache:
            post = cache[f"blocks.{layer}.mlp.hook_post"]
            mlp = post @ model.W_out[layer] + model.b_out[layer]
            assert torch.allclose(mlp, cache[f"blocks.{layer}.hook_mlp_out"], atol=1e-5)
            pre = cache[f"blocks.{layer}.mlp.hook_in"] @ model.W_in[layer] + model.b_in[layer]
            assert torch.allclose(pre, cache[f"blocks.{layer}.mlp.hook_pre"], atol=1e-5)
    assert torch.allclose(cache["ln_final.hook_out"] @ model.W_U + model.b_U, logits, atol=1e-5)


def test_minilm_weights_equal_its_bridge_and_recompute_q(minilm, one_thread):
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(minilm.source)
    for name in WEIGHTS:
        assert torch.equal(getattr(minilm, name), getattr(bridge, name).detach()), name
    _, cache = minilm.run_with_cache("the cat sat", names=["blocks.2.attn.hook_in", "blocks.2.attn.hook_q"])
    q = einsum(cache["blocks.2.attn.hook_in"], minilm.W_Q[2], "b p d, n d h -> b p n h") + minilm.b_Q[2]
    assert torch.allclose(q, cache["blocks.2.attn.hook_q"], atol=1e-5)
    with pytest.raises(InputError, match="no unembedding"):
        minilm.W_U  # noqa: B018


def test_grouped_query_attention_follows_the_bridge(tmp_path, one_thread):
    """K/V keep n_key_value_heads; QK and OV repeat each kv head for its query heads, as TL's bridge."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=20, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    _tokenizer(tmp_path)
    model, bridge = interp.load(str(tmp_path)), TransformerBridge.boot_transformers(str(tmp_path))
    assert model.W_K.shape == (2, 2, 32, 8) and model.W_Q.shape == (2, 4, 32, 8)
    for name in ("W_Q", "W_K", "W_V", "W_O", "W_in", "W_gate", "W_out", "W_U"):
        assert torch.equal(getattr(model, name), getattr(bridge, name).detach()), name
    assert torch.allclose(model.QK.AB, bridge.QK.AB.detach(), atol=1e-6)
    assert torch.allclose(model.OV.AB, bridge.OV.AB.detach(), atol=1e-6)
    assert torch.equal(model.QK.B[:, 1], model.QK.B[:, 0])  # query heads 0 and 1 share kv head 0
    assert torch.count_nonzero(model.b_Q) == 0  # bias-free projections read as zero biases
    with pytest.raises(InputError, match="W_pos"):
        model.W_pos  # noqa: B018


def _tokenizer(directory) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={"<s>": 0, "<unk>": 1, "a": 2, "b": 3}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="<s>", unk_token="<unk>"
    ).save_pretrained(directory)


def test_composition_baseline_is_the_score_of_random_matrices(one_thread):
    """Independent estimate: random Gaussian factors of the same shapes, scored by TL's own formula."""
    from transformer_lens import FactoredMatrix
    from transformer_lens.utilities import composition_scores

    d_model, d_head = 64, 16
    baseline = composition_baseline(d_model, d_head, n_samples=400, seed=0)
    g = torch.Generator().manual_seed(123)
    factors = [torch.randn(400, *shape, generator=g) for shape in [(d_model, d_head), (d_head, d_model)] * 2]
    ov, qk = FactoredMatrix(factors[0], factors[1]), FactoredMatrix(factors[2], factors[3])
    reference = composition_scores(ov, qk, broadcast_dims=False)
    assert abs(baseline - reference.mean().item()) < 4 * reference.std().item() / 20
    assert 0.5 / d_model**0.5 < baseline < 2 / d_model**0.5  # about 1/sqrt(d_model)
    assert baseline == composition_baseline(d_model, d_head, n_samples=400, seed=0)
    with pytest.raises(InputError, match="d_head"):
        composition_baseline(64, 0)


def test_tokens_to_residual_directions_equal_tl(gpt2_model, gpt2_bridge, one_thread):
    batch = torch.tensor([[4, 5], [6, 7]])
    expected = gpt2_bridge.tokens_to_residual_directions(batch).detach()
    assert torch.equal(gpt2_model.tokens_to_residual_directions(batch), expected)
    assert torch.equal(gpt2_model.tokens_to_residual_directions("cat"), gpt2_model.W_U[:, 4])
    assert torch.equal(gpt2_model.tokens_to_residual_directions(torch.tensor(5)), gpt2_model.W_U[:, 5])
    with pytest.raises(InputError):
        gpt2_model.tokens_to_residual_directions("the cat")
