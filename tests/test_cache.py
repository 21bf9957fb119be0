"""ActivationCache's TransformerLens helpers, checked against TL 4.3's own ActivationCache on the same
weights: a plain HF GPT-2 directory vs the raw bridge, and a compatibility-mode bridge (folded
norms, centered weights) vs the same bridge's TL cache."""

from __future__ import annotations

import pytest
import torch

import interp
from interp.errors import InputError, UnknownHookError

TOKENS = torch.tensor([[0, 2, 4, 6, 10, 2, 4], [0, 3, 5, 7, 9, 11, 13]])


def _firing(model) -> list[str]:
    return [n for n in model.hook_names if model.hook_shapes[n] is not None]


@pytest.fixture(scope="module")
def raw_pair(gpt2_dir):
    """(interp cache of the plain HF model, TL cache of boot_transformers on the same directory)."""
    from transformer_lens.model_bridge import TransformerBridge

    model = interp.load(gpt2_dir)
    bridge = TransformerBridge.boot_transformers(gpt2_dir).eval()
    return model.run_with_cache(TOKENS)[1], bridge.run_with_cache(TOKENS)[1]


@pytest.fixture(scope="module")
def compat_pair(gpt2_dir):
    """(interp cache of a compatibility-mode bridge, TL's cache of that bridge)."""
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(gpt2_dir).eval()
    bridge.enable_compatibility_mode()
    model = interp.load(bridge)
    return model.run_with_cache(TOKENS, names=_firing(model))[1], bridge.run_with_cache(TOKENS)[1]


def _same(ours, theirs, atol: float = 2e-5) -> None:
    if isinstance(theirs, tuple):
        assert ours[1] == theirs[1]
        ours, theirs = ours[0], theirs[0]
    assert ours.shape == theirs.shape
    assert torch.allclose(ours, theirs.detach(), atol=atol), (ours - theirs).abs().max()


CALLS = [
    ("accumulated_resid", dict(return_labels=True)),
    ("accumulated_resid", dict(incl_mid=True, apply_ln=True, return_labels=True)),
    ("accumulated_resid", dict(layer=1, apply_ln=True, mlp_input=True, pos_slice=-1)),
    ("accumulated_resid", dict(layer=1, incl_mid=True, apply_ln=True, pos_slice=(1, 4))),
    ("decompose_resid", dict(apply_ln=True, return_labels=True)),
    ("decompose_resid", dict(layer=1, mlp_input=True, apply_ln=True, mode="attn", return_labels=True)),
    ("decompose_resid", dict(mode="mlp", incl_embeds=False, pos_slice=[0, 3])),
    ("stack_head_results", dict(apply_ln=True, return_labels=True, incl_remainder=True)),
    ("stack_head_results", dict(layer=1, pos_slice=-1, apply_ln=True)),
    ("stack_head_results", dict(layer=0, incl_remainder=True, return_labels=True)),
    ("stack_neuron_results", dict(layer=2, neuron_slice=(0, 16), apply_ln=True, return_labels=True)),
    (
        "stack_neuron_results",
        dict(layer=1, neuron_slice=5, incl_remainder=True, mlp_input=True, apply_ln=True),
    ),
]


@pytest.mark.parametrize("pair", ["raw_pair", "compat_pair"])
def test_helpers_equal_tl_activation_cache(pair, request, one_thread):
    ours, theirs = request.getfixturevalue(pair)
    for method, kwargs in CALLS:
        _same(getattr(ours, method)(**kwargs), getattr(theirs, method)(**kwargs))


@pytest.mark.parametrize("pair", ["raw_pair", "compat_pair"])
def test_apply_ln_and_logit_attrs_equal_tl(pair, request, one_thread):
    ours, theirs = request.getfixturevalue(pair)
    stack, t_stack = ours.decompose_resid(pos_slice=-1), theirs.decompose_resid(pos_slice=-1)
    for kwargs in (
        dict(layer=-1, pos_slice=-1),
        dict(layer=1, pos_slice=-1, batch_slice=[1]),
        dict(layer=0, pos_slice=-1),
    ):
        _same(ours.apply_ln_to_stack(stack, **kwargs), theirs.apply_ln_to_stack(t_stack, **kwargs))
    correct, wrong = torch.tensor([4, 9]), torch.tensor([5, 8])
    _same(
        ours.logit_attrs(stack, correct, wrong, pos_slice=-1),
        theirs.logit_attrs(t_stack, correct, wrong, pos_slice=-1),
    )
    full, t_full = ours.stack_head_results(), theirs.stack_head_results()
    per_pos = torch.randint(0, 20, (2, 7), generator=torch.Generator().manual_seed(1))
    _same(ours.logit_attrs(full, per_pos), theirs.logit_attrs(t_full, per_pos))
    _same(ours.logit_attrs(full, 7), theirs.logit_attrs(t_full, 7))
    with pytest.raises(InputError, match="same shape"):
        ours.logit_attrs(stack, correct, torch.tensor([1, 2, 3]), pos_slice=-1)


def test_logit_attrs_of_the_full_decomposition_sum_to_the_logit_difference(compat_pair, one_thread):
    """Invariant: with the final norm folded into W_U (compatibility mode), the components' attributions
    plus the b_U difference add up to the model's logit difference."""
    ours, _ = compat_pair
    model = ours.model
    stack = ours.decompose_resid(pos_slice=-1)
    attrs = ours.logit_attrs(stack, torch.tensor([4, 9]), torch.tensor([5, 8]), pos_slice=-1)
    logits = model(TOKENS)[:, -1]
    diff = logits[[0, 1], [4, 9]] - logits[[0, 1], [5, 8]]
    bias = model.b_U[[4, 9]] - model.b_U[[5, 8]]
    assert torch.allclose(attrs.sum(0) + bias, diff, atol=1e-4)


def test_keys_negative_layers_three_parts_and_clear_errors(raw_pair, one_thread):
    ours, theirs = raw_pair
    for key in [
        ("resid_post", -1),
        ("pattern", 0, "attn"),
        ("q", -2),
        "k1",
        ("scale",),
        ("normalized", 1, "ln2"),
    ]:
        _same(ours[key], theirs[key], atol=1e-5)  # LN scale / normalized included (TL's semantics)
    assert torch.equal(ours["resid_post", -1], ours["blocks.1.hook_resid_post"])
    with pytest.raises(UnknownHookError, match="layer 2 does not exist.*has 2 layers"):
        ours["resid_post", 2]
    with pytest.raises(UnknownHookError, match="layer -3 does not exist.*has 2 layers"):
        ours["resid_post", -3]
    with pytest.raises(UnknownHookError, match="hook_nothing"):
        ours["nothing", 0]
    assert "blocks.0.hook_resid_post" in ours and ("resid_post", 9) not in ours


def test_partial_cache_names_the_missing_layer_and_the_missing_scale(gpt2_model, one_thread):
    _, cache = gpt2_model.run_with_cache(
        TOKENS, names=["blocks.0.hook_resid_post", "blocks.*.hook_resid_pre"]
    )
    with pytest.raises(UnknownHookError, match=r"cached for layers \[0\] only"):
        cache["resid_post", 1]
    with pytest.raises(InputError, match="ln1.hook_in"):
        cache.accumulated_resid(layer=1, apply_ln=True)


def test_remove_batch_dim_equals_tl(gpt2_dir, gpt2_model, one_thread):
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(gpt2_dir).eval()
    ours = gpt2_model.run_with_cache(TOKENS[:1])[1].remove_batch_dim()
    theirs = bridge.run_with_cache(TOKENS[:1])[1].remove_batch_dim()
    assert ours["blocks.0.hook_resid_pre"].shape == (7, 32) and not ours.has_batch_dim
    _same(
        ours.accumulated_resid(apply_ln=True, return_labels=True),
        theirs.accumulated_resid(apply_ln=True, return_labels=True),
    )
    heads, t_heads = ours.stack_head_results(apply_ln=True), theirs.stack_head_results(apply_ln=True)
    _same(heads, t_heads)
    _same(
        ours.logit_attrs(heads, 4, has_batch_dim=False), theirs.logit_attrs(t_heads, 4, has_batch_dim=False)
    )
    with pytest.raises(InputError, match="already"):
        ours.remove_batch_dim()
    _, batch_of_two = gpt2_model.run_with_cache(TOKENS)
    with pytest.raises(InputError, match="one prompt"):
        batch_of_two.remove_batch_dim()


def test_head_results_from_flattened_z_rebuild_attn_out(one_thread):
    """Zoo bridges cache z flattened today ([batch, pos, head * d_head]); heads + b_O must still be attn_out."""
    model = interp.load("zoo:induction-2l")
    _, cache = model.run_with_cache(TOKENS, names=_firing(model))
    heads = cache.stack_head_results(return_labels=True)
    assert heads[1] == model.all_head_labels and heads[0].shape == (8, 2, 7, 64)
    per_layer = heads[0].reshape(2, 4, 2, 7, 64).sum(1) + model.b_O[:, None, None]
    assert torch.allclose(per_layer, torch.stack([cache["attn_out", i] for i in range(2)]), atol=1e-5)
    _, theirs = model.bridge.run_with_cache(TOKENS)
    _same(heads, theirs.stack_head_results(return_labels=True))
    _same(cache.decompose_resid(apply_ln=True), theirs.decompose_resid(apply_ln=True))


def test_cached_hook_result_is_used_when_present(raw_pair, one_thread):
    ours, _ = raw_pair
    marked = {**ours.activations, "blocks.1.attn.hook_result": torch.ones(2, 7, 4, 32)}
    cache = type(ours)(marked, model=ours.model)
    assert torch.equal(cache.stack_head_results()[4:], torch.ones(4, 2, 7, 32))


def test_apply_ln_refuses_post_ln_models(minilm, one_thread):
    _, cache = minilm.run_with_cache("the cat sat", names=["blocks.*.hook_resid_pre", "blocks.*.ln1.hook_in"])
    with pytest.raises(InputError, match="post-LN"):
        cache.accumulated_resid(layer=2, apply_ln=True)


def test_a_norm_not_of_layernorm_form_is_refused_not_misapplied(tmp_path, one_thread):
    """Gemma's RMSNorm multiplies by (1 + weight): applying it from its parameters would be silently wrong."""
    from test_weights import _tokenizer
    from transformers import GemmaConfig, GemmaForCausalLM

    torch.manual_seed(0)
    config = GemmaConfig(
        vocab_size=20, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=32,
    )  # fmt: skip
    GemmaForCausalLM(config).save_pretrained(tmp_path)
    _tokenizer(tmp_path)
    _, cache = interp.load(str(tmp_path)).run_with_cache(torch.tensor([[0, 2, 3, 2]]))
    with pytest.raises(InputError, match="GemmaRMSNorm"):
        cache.accumulated_resid(apply_ln=True)
    assert cache.accumulated_resid(layer=1, apply_ln=True).shape == (2, 1, 4, 32)  # scale only: defined


def test_logit_attrs_reads_a_string_token(raw_pair, one_thread):
    ours, theirs = raw_pair
    stack, t_stack = ours.decompose_resid(pos_slice=-1), theirs.decompose_resid(pos_slice=-1)
    _same(
        ours.logit_attrs(stack, "cat", "dog", pos_slice=-1),
        theirs.logit_attrs(t_stack, "cat", "dog", pos_slice=-1),
    )
    _same(ours.logit_attrs(stack, "cat", pos_slice=-1), ours.logit_attrs(stack, 4, pos_slice=-1))


def test_compute_head_results_and_stack_activation_equal_tl(raw_pair, one_thread):
    ours, theirs = raw_pair
    cache = type(ours)(dict(ours.activations), model=ours.model)
    cache.compute_head_results()
    theirs.compute_head_results()
    _same(cache["result", 1], theirs["result", 1])
    _same(cache.stack_activation("pattern"), theirs.stack_activation("pattern"))
    _same(cache.stack_activation("post", 1, "mlp"), theirs.stack_activation("post", 1, "mlp"))
