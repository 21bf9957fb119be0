"""``hook_scale`` and ``hook_normalized`` of each LayerNorm on HF backends, against TransformerLens 4.3.

TL is the oracle: ``TransformerBridge.boot_transformers`` of the same directory (a local
GPT-2-architecture one, MiniLM, and a Llama-architecture one for RMSNorm) gives the names, shapes and values, and runs the same edits
(freezing the scale at another prompt's value; detaching it, as attribution methods do) for the
logits and gradients to compare with.
"""

from __future__ import annotations

import pytest
import torch

import interp

pytestmark = pytest.mark.usefixtures("one_thread")

POINTS = ("hook_scale", "hook_normalized")


def _bridge(source: str):
    from transformer_lens.model_bridge import TransformerBridge

    return TransformerBridge.boot_transformers(source, device="cpu").eval()


@pytest.fixture(scope="module")
def gpt2_pair(gpt2_model):
    return gpt2_model, _bridge(gpt2_model.source)


@pytest.fixture(scope="module")
def minilm_pair(minilm):
    return minilm, _bridge(minilm.source)


@pytest.fixture(scope="module")
def llama_pair(gpt2_dir, tmp_path_factory):
    """A tiny Llama-architecture directory (RMSNorm, no centering, no bias) and its bridge."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=20, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(out)
    for file in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{gpt2_dir}/{file}", out / file)
    return interp.load(str(out)), _bridge(str(out))


def _is_rms(model) -> bool:
    return (
        "RMSNorm" in type(next(c.module for c in model._components if c.tl_name == "blocks.0.ln1")).__name__
    )


@pytest.fixture(scope="module", params=["gpt2", "minilm", "llama"])
def pair(request):
    return request.getfixturevalue(f"{request.param}_pair")


def _tokens(model, seed: int = 0) -> torch.Tensor:
    vocab = min(model.d_vocab, 1000)
    return torch.randint(1, vocab, (2, 7), generator=torch.Generator().manual_seed(seed))


def _norm_names(names) -> list[str]:
    return [n for n in names if n.endswith(POINTS)]


def _close(ours: torch.Tensor, theirs: torch.Tensor, atol: float = 1e-5) -> None:
    assert ours.shape == theirs.shape
    scale = float(theirs.abs().max().clamp_min(1.0))
    assert float((ours - theirs).abs().max()) <= atol * scale


def test_names_shapes_and_order_are_transformer_lens(pair):
    """Every TL ``X.hook_scale``/``X.hook_normalized`` of a component interp has is offered, firing
    between ``X.hook_in`` and ``X.hook_out``, with TL's shapes."""
    model, bridge = pair
    theirs = {
        n for n in _norm_names(bridge.hook_dict) if n.rsplit(".", 1)[0] + ".hook_in" in model.hook_names
    }
    assert set(_norm_names(model.hook_names)) == theirs
    assert {n.rsplit(".", 1)[0] for n in theirs} >= {"blocks.0.ln1", "blocks.0.ln2"}
    names = model.hook_names
    for stem in {n.rsplit(".", 1)[0] for n in theirs}:
        order = [names.index(f"{stem}.{p}") for p in ("hook_in", *POINTS, "hook_out")]
        assert order == sorted(order), stem  # aliases (hook_resid_mid = ln2.hook_in) may sit between
        assert model.hook_shapes[f"{stem}.hook_scale"] == ("batch", "pos", 1)
        assert model.hook_shapes[f"{stem}.hook_normalized"] == ("batch", "pos", model.cfg.d_model)


def test_values_equal_the_bridge_and_capture_leaves_the_output_bit_identical(pair):
    model, bridge = pair
    names = _norm_names(model.hook_names)
    tokens = _tokens(model)
    output, cache = model.run_with_cache(tokens, names=names)
    assert torch.equal(output, model(tokens))
    with torch.no_grad():
        _, theirs = bridge.run_with_cache(tokens, names_filter=lambda n: n in names)
    for name in names:
        _close(cache[name], theirs[name])
    ln = model.cfg.eps if hasattr(model.cfg, "eps") else 1e-5
    x = model.run_with_cache(tokens, names="blocks.0.ln2.hook_in")[1]["blocks.0.ln2.hook_in"]
    centered = x if _is_rms(model) else x - x.mean(-1, keepdim=True)  # by hand, TL's definition
    torch.testing.assert_close(
        cache["blocks.0.ln2.hook_scale"], (centered.pow(2).mean(-1, keepdim=True) + ln).sqrt()
    )


def test_freezing_the_scale_at_another_prompts_value_equals_the_bridge(pair):
    """Patch every ``hook_scale`` with a clean run's: the logits equal TL's bridge under the same
    hooks, and each LayerNorm's output is ``(x - mean) / clean_scale * w + b``."""
    model, bridge = pair
    clean, corrupt = _tokens(model, 0), _tokens(model, 1)
    scales = [n for n in model.hook_names if n.endswith("hook_scale")]
    _, clean_cache = model.run_with_cache(clean, names=scales)
    hooks = [(name, lambda s, hook: clean_cache[hook.name]) for name in scales]
    last = f"blocks.{model.n_layers - 1}.hook_out"  # MiniLM's bridge adds an MLM head; compare the stream
    ours = model.run_with_cache(corrupt, names=last, hooks=hooks)[1][last]
    with torch.no_grad(), bridge.hooks(fwd_hooks=hooks):
        theirs = bridge.run_with_cache(corrupt, names_filter=lambda n: n == last)[1][last]
    _close(ours, theirs, atol=1e-4)
    plain = model.run_with_cache(corrupt, names=last)[1][last]
    assert not torch.allclose(ours, plain, atol=1e-3)  # the patch changes the output
    names = ["blocks.0.ln1.hook_in", "blocks.0.ln1.hook_out"]
    _, cache = model.run_with_cache(corrupt, names=names, hooks=hooks)
    x, out = (cache[n] for n in names)
    ln = model.module.get_submodule(_module_path(model, "blocks.0.ln1"))
    if _is_rms(model):
        by_hand = x / clean_cache["blocks.0.ln1.hook_scale"] * ln.weight
    else:
        by_hand = (x - x.mean(-1, keepdim=True)) / clean_cache[
            "blocks.0.ln1.hook_scale"
        ] * ln.weight + ln.bias
    torch.testing.assert_close(out, by_hand)


def _module_path(model, tl_name: str) -> str:
    module = next(c.module for c in model._components if c.tl_name == tl_name)
    return next(path for path, m in model.module.named_modules() if m is module)


def _resid_grad(model_or_bridge, tokens, fwd_hooks, is_bridge: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient of one logit at ``blocks.0.hook_resid_pre`` and at ``blocks.0.ln1.hook_scale``."""
    grads: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(grad, hook):  # keyed by the name asked for (TL's hook.name of an alias is its target)
            grads[name] = grad.detach().clone()

        return hook

    bwd = [(name, keep(name)) for name in ("blocks.0.hook_resid_pre", "blocks.0.ln1.hook_scale")]
    if is_bridge:
        with model_or_bridge.hooks(fwd_hooks=fwd_hooks, bwd_hooks=bwd):
            model_or_bridge(tokens)[0, -1, 3].backward()
    else:
        model_or_bridge.run_with_hooks(tokens, fwd_hooks, bwd_hooks=bwd)[0, -1, 3].backward()
    return grads["blocks.0.hook_resid_pre"], grads.get("blocks.0.ln1.hook_scale")


def test_gradients_through_the_scale_and_with_it_frozen_equal_the_bridge(gpt2_pair):
    """Backward hooks on ``hook_scale`` read TL's gradient; detaching every scale (LayerNorm frozen,
    as attribution methods linearise it) changes the residual gradient exactly as in TL."""
    model, bridge = gpt2_pair
    tokens = _tokens(model)
    freeze = [(n, lambda s, hook: s.detach()) for n in model.hook_names if n.endswith("hook_scale")]
    ours_live, ours_scale = _resid_grad(model, tokens, [], is_bridge=False)
    theirs_live, theirs_scale = _resid_grad(bridge, tokens, [], is_bridge=True)
    _close(ours_live, theirs_live)
    assert ours_scale is not None and ours_scale.shape == (2, 7, 1)
    _close(ours_scale, theirs_scale)
    ours_frozen, _ = _resid_grad(model, tokens, freeze, is_bridge=False)
    theirs_frozen, _ = _resid_grad(bridge, tokens, freeze, is_bridge=True)
    _close(ours_frozen, theirs_frozen)
    assert not torch.allclose(ours_frozen, ours_live, atol=1e-4)


def test_hooks_are_gone_after_the_run(gpt2_model):
    """The shared forward hook of a LayerNorm's internals is removed with the last of its hooks."""
    ln = next(c.module for c in gpt2_model._components if c.tl_name == "blocks.0.ln1")
    before = len(ln._forward_hooks)
    names = ["blocks.0.ln1.hook_scale", "blocks.0.ln1.hook_normalized"]
    with gpt2_model.hooks([(n, lambda x, hook: None) for n in names]):
        assert len(ln._forward_hooks) == before + 1
    assert len(ln._forward_hooks) == before


def test_a_patching_sweep_over_the_scale_equals_patching_one_position_at_a_time(gpt2_model):
    """``patch`` (the batched engine) at ``hook_scale``, position by position, equals hand-written
    ``run_with_hooks`` patches of the clean scale into the corrupted run."""
    from interp.methods import patching as P

    clean, corrupt = _tokens(gpt2_model, 0), _tokens(gpt2_model, 1)
    name = "blocks.1.ln1.hook_scale"
    metric = lambda out: out[:, -1, 3].mean()  # noqa: E731
    swept = P.patch(gpt2_model, clean, corrupt, site=name, metric=metric)
    clean_scale = gpt2_model.run_with_cache(clean, names=name)[1][name]

    def at(p: int):
        def hook(s, hook):
            s = s.clone()
            s[:, p] = clean_scale[:, p]
            return s

        return hook

    by_hand = [float(metric(gpt2_model.run_with_hooks(corrupt, [(name, at(p))]))) for p in range(7)]
    torch.testing.assert_close(swept.values.flatten(), torch.tensor(by_hand), rtol=1e-5, atol=1e-6)
    assert len({round(v, 6) for v in by_hand}) > 1  # the positions differ: a real patch
