"""Generation with interp's KV cache on native (``boot_native``) bridges (``interp.models.kvcache``).

References: the same generation recomputing the whole sequence each step (``use_past_kv_cache=False``,
the bridge's own forward), and TransformerLens 4.3's ``bridge.generate`` on the same bridge (which
keeps no cache on native models). Models: two zoo transformers (attention-only and with MLPs) and a
random native config with rotary embeddings, grouped-query attention and a soft cap. Every batch is
left-padded, so the padding mask and the positions past it are exercised at every step.
"""

from __future__ import annotations

import pytest
import torch

import interp
from interp.errors import InputError

pytestmark = pytest.mark.usefixtures("one_thread")

ROTARY = dict(
    n_layers=2, d_model=32, n_heads=4, d_head=8, n_ctx=40, d_vocab=30, attn_only=False, act_fn="gelu",
    normalization_type="LN", positional_embedding_type="rotary", n_key_value_heads=2,
    attn_scores_soft_cap=30.0, rotary_dim=8, seed=0,
)  # fmt: skip
MODELS = ["zoo:induction-2l", "zoo:grammar-4l", "rotary-gqa"]
GREEDY = {"do_sample": False, "stop_at_eos": False}


@pytest.fixture(scope="module", params=MODELS)
def model(request):
    if request.param == "rotary-gqa":
        native = interp.load(ROTARY)
        with torch.no_grad():  # large random weights, so greedy continuations vary
            gen = torch.Generator().manual_seed(1)
            for param in native.bridge.parameters():
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
        return native
    return interp.load(request.param)


def _prompts(model, batch: int = 3, pos: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids with rows 0 and 1 left-padded (3 and 1 pads)."""
    ids = torch.randint(1, model.d_vocab, (batch, pos), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[1, :1] = 0
    return ids.masked_fill(mask == 0, 0), mask


def _last_logits(model, ids, mask, use_cache: bool, new: int = 8, hooks=()) -> torch.Tensor:
    """The last position's logits at each step ``[step, batch, d_vocab]``, read at ``unembed.hook_out``."""
    seen: list[torch.Tensor] = []
    read = ("unembed.hook_out", lambda x, hook: seen.append(x[:, -1].clone()))
    model.generate(ids, new, **GREEDY, attention_mask=mask, use_past_kv_cache=use_cache, hooks=[*hooks, read])
    return torch.stack(seen)


def test_native_bridges_have_the_cache(model):
    assert model._cached_stepper() is not None


def test_cached_greedy_generation_equals_recomputing_and_the_bridge_generate(model):
    ids, mask = _prompts(model)
    cached = model.generate(ids, 12, **GREEDY, attention_mask=mask)
    recomputed = model.generate(ids, 12, **GREEDY, attention_mask=mask, use_past_kv_cache=False)
    theirs = model.bridge.generate(
        ids, 12, do_sample=False, stop_at_eos=False, verbose=False, attention_mask=mask
    )
    assert torch.equal(cached, recomputed)
    assert torch.equal(cached, theirs)
    assert len(set(map(tuple, cached[:, 9:].tolist()))) > 1  # not a degenerate constant continuation
    alone = model.generate(ids[:1, 3:], 12, **GREEDY)  # the padded row continues as the prompt alone
    assert torch.equal(cached[0, 3:], alone[0])


def test_per_step_logits_equal_recomputing(model):
    ids, mask = _prompts(model)
    cached, recomputed = (_last_logits(model, ids, mask, use_cache) for use_cache in (True, False))
    assert cached.shape == recomputed.shape == (8, 3, model.d_vocab)
    torch.testing.assert_close(cached, recomputed, rtol=1e-5, atol=1e-5)


def test_sampling_with_a_seed_is_the_same_with_and_without_cache(model):
    ids, mask = _prompts(model)
    kwargs = {"do_sample": True, "temperature": 1.5, "top_k": 10, "seed": 4, "stop_at_eos": False}
    cached = model.generate(ids, 10, attention_mask=mask, **kwargs)
    recomputed = model.generate(ids, 10, attention_mask=mask, use_past_kv_cache=False, **kwargs)
    assert torch.equal(cached, recomputed)


def test_steering_hooks_change_the_output_identically_with_and_without_cache(model):
    """A steering vector on the residual stream and a head ablation inside attention apply at every
    step; with the cache the earlier positions' keys and values were computed under the same hooks,
    so the outputs equal the recomputed ones, and differ from the unhooked generation."""
    ids, mask = _prompts(model)
    vector = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(2)) * 3
    keep = torch.tensor([1.0, 0.0, 1.0, 0.0])[:, None]  # heads 1 and 3 of hook_z [batch, pos, head, d_head]
    hooks = [
        ("blocks.0.hook_resid_post", lambda x, hook: x + vector),
        ("blocks.1.attn.hook_z", lambda z, hook: z * keep),
    ]
    plain = model.generate(ids, 10, **GREEDY, attention_mask=mask)
    steered = model.generate(ids, 10, **GREEDY, attention_mask=mask, hooks=hooks)
    recomputed = model.generate(ids, 10, **GREEDY, attention_mask=mask, hooks=hooks, use_past_kv_cache=False)
    assert torch.equal(steered, recomputed)
    assert not torch.equal(steered, plain)
    with model.hooks(hooks):  # hooks of an enclosing context apply to the cached steps too
        assert torch.equal(model.generate(ids, 10, **GREEDY, attention_mask=mask), steered)
    torch.testing.assert_close(
        _last_logits(model, ids, mask, True, hooks=hooks), _last_logits(model, ids, mask, False, hooks=hooks),
        rtol=1e-5, atol=1e-5,
    )  # fmt: skip


def test_hooked_attention_scores_compose_with_the_cache(model):
    """``hook_attn_scores`` runs interp's own copy of the attention (``_NativeScores``); under the
    cache it still reads the cached keys: halving the scores gives the same output either way."""
    ids, mask = _prompts(model)
    hooks = [("blocks.0.attn.hook_attn_scores", lambda s, hook: s * 0.5)]
    steered = model.generate(ids, 8, **GREEDY, attention_mask=mask, hooks=hooks)
    assert torch.equal(
        steered, model.generate(ids, 8, **GREEDY, attention_mask=mask, hooks=hooks, use_past_kv_cache=False)
    )
    torch.testing.assert_close(
        _last_logits(model, ids, mask, True, hooks=hooks), _last_logits(model, ids, mask, False, hooks=hooks),
        rtol=1e-5, atol=1e-5,
    )  # fmt: skip


def test_hooks_see_one_new_position_per_cached_step_as_in_transformer_lens(model):
    """TransformerLens's cached semantics: after the prompt, a step feeds one position, so residual,
    q/k/v/z and LayerNorm hooks hold ``pos == 1``; keys and values at ``hook_k``/``hook_v`` are the new
    position's (the cache is appended after the hook); scores and pattern span every position so far."""
    ids, mask = _prompts(model)
    names = ["blocks.0.hook_resid_pre", "blocks.1.attn.hook_k", "blocks.1.attn.hook_z", "blocks.0.ln1.hook_scale",
             "blocks.1.attn.hook_pattern", "blocks.1.attn.hook_attn_scores", "blocks.0.attn.hook_result"]  # fmt: skip
    shapes: dict[str, list[tuple[int, ...]]] = {name: [] for name in names}
    hooks = [(name, lambda x, hook: shapes[hook.name].append(tuple(x.shape))) for name in names]
    model.generate(ids, 3, **GREEDY, attention_mask=mask, hooks=hooks)
    b, p, h, d, m = 3, 9, model.cfg.n_heads, model.cfg.d_head, model.cfg.d_model
    assert shapes["blocks.0.hook_resid_pre"] == [(b, p, m), (b, 1, m), (b, 1, m)]
    assert shapes["blocks.1.attn.hook_k"][1:] == [(b, 1, model.cfg.n_key_value_heads or h, d)] * 2
    assert shapes["blocks.1.attn.hook_z"][1:] == [(b, 1, h, d)] * 2
    assert shapes["blocks.0.ln1.hook_scale"][1:] == [(b, 1, 1)] * 2
    assert shapes["blocks.0.attn.hook_result"][1:] == [(b, 1, h, m)] * 2
    for name in ("blocks.1.attn.hook_pattern", "blocks.1.attn.hook_attn_scores"):
        assert shapes[name] == [(b, h, p, p), (b, h, 1, p + 1), (b, h, 1, p + 2)]


def test_the_cache_leaves_later_forwards_untouched(model):
    """After generation (or an error inside it) the attention modules run TransformerLens's own forward."""
    ids, mask = _prompts(model)
    before = model(ids, attention_mask=mask)

    def fail(x, hook):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        model.generate(ids, 3, **GREEDY, attention_mask=mask, hooks=[("blocks.0.hook_resid_post", fail)])
    model.generate(ids, 3, **GREEDY, attention_mask=mask)
    assert all("forward" not in block.attn.original_component.__dict__ for block in model.bridge.blocks)
    assert torch.equal(model(ids, attention_mask=mask), before)


def test_generate_on_a_bidirectional_native_model_is_a_clear_error():
    encoder = interp.load({**ROTARY, "attention_dir": "bidirectional"})
    with pytest.raises(InputError, match="needs a causal language model"):
        encoder.generate(torch.tensor([[1, 2, 3]]), 2)


def test_loading_a_zoo_bridge_prints_nothing(capsys):
    """TransformerLens's ``bridge.to`` prints "Moving model to device"; a zoo load moved the bridge
    twice, so it printed twice."""
    interp.load("zoo:induction-1l")
    interp.load(dict(ROTARY))
    assert "Moving model to device" not in capsys.readouterr().out
