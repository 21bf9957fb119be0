"""Replacement hooks, hook removal, early stopping, gradients and the memory budget."""

from __future__ import annotations

import copy
import re

import pytest
import torch

import interp
from interp.errors import CaptureTooLargeError, InputError, UnknownHookError
from interp.hooks import check_budget, format_bytes


def _no_hooks_left(module: torch.nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in module.modules())


def test_replacement_hook_matches_manual_computation_cnn(tiny_cnn):
    model = interp.load(tiny_cnn, input_shape=(1, 8, 8))
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    out = model.run_with_hooks(x, [("relu1.hook_out", lambda act, hook: act * 2.0)])
    with torch.no_grad():
        h = 2.0 * torch.relu(tiny_cnn.conv1(x))
        expected = tiny_cnn.fc(tiny_cnn.pool(torch.relu(tiny_cnn.conv2(h))).flatten(1))
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    assert _no_hooks_left(tiny_cnn)


def test_steering_resid_post_changes_logits_as_predicted(gpt2_model):
    """Adding v to the last residual stream must change logits by exactly W_U ln_f(resid + v) - W_U ln_f(resid)."""
    hf = gpt2_model.module
    tokens = torch.tensor([[2, 3, 4, 5, 6]])
    v = torch.randn(hf.config.n_embd, generator=torch.Generator().manual_seed(0))
    _, cache = gpt2_model.run_with_cache(tokens, names="blocks.1.hook_resid_post")
    steered = gpt2_model.run_with_hooks(tokens, [("blocks.1.hook_resid_post", lambda act, hook: act + v)])
    with torch.no_grad():
        expected = hf.lm_head(hf.transformer.ln_f(cache["resid_post", 1] + v))
    torch.testing.assert_close(steered, expected, atol=1e-5, rtol=0)


def test_zero_ablating_a_head_equals_manual_z_edit(gpt2_model):
    """Zeroing head 2's z must equal recomputing attn_out from the edited z through c_proj."""
    hf = gpt2_model.module
    tokens = torch.tensor([[2, 3, 4, 5, 6, 7]])

    def ablate(z, hook):
        z = z.clone()
        z[:, :, 2] = 0.0
        return z

    _, cache = gpt2_model.run_with_cache(tokens, names=["blocks.0.attn.hook_z"])
    _, ablated = gpt2_model.run_with_cache(
        tokens, names=["blocks.0.hook_attn_out"], hooks=[("blocks.0.attn.hook_z", ablate)]
    )
    z = cache["z", 0].clone()
    z[:, :, 2] = 0.0
    with torch.no_grad():
        expected = hf.transformer.h[0].attn.c_proj(z.flatten(-2))
    torch.testing.assert_close(ablated["attn_out", 0], expected, atol=1e-5, rtol=0)


def test_hooks_removed_even_when_a_hook_raises(gpt2_model):
    def boom(act, hook):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        gpt2_model.run_with_hooks(torch.tensor([[2, 3, 4]]), [("blocks.0.attn.hook_pattern", boom)])
    assert _no_hooks_left(gpt2_model.module)
    assert all(not p._forward_hooks for pts in gpt2_model._attention_points.values() for p in pts.values())


def test_replacement_of_wrong_shape_is_refused(tiny_cnn):
    model = interp.load(tiny_cnn, input_shape=(1, 8, 8))
    with pytest.raises(ValueError, match=r"returned shape \(4, 3\).*must keep the shape"):
        model.run_with_hooks(torch.rand(4, 1, 8, 8), [("fc.hook_out", lambda act, hook: act[:, :3])])
    assert _no_hooks_left(tiny_cnn)


def test_stop_early_skips_later_layers_and_keeps_values(gpt2_model):
    tokens = torch.tensor([[2, 3, 4, 5]])
    calls = []
    later = gpt2_model.module.transformer.h[1]
    handle = later.register_forward_hook(lambda *a: calls.append(1))
    try:
        output, early = gpt2_model.run_with_cache(tokens, names="blocks.0.hook_resid_post", stop_early=True)
    finally:
        handle.remove()
    assert output is None and calls == []
    _, full = gpt2_model.run_with_cache(tokens, names="blocks.0.hook_resid_post")
    assert torch.equal(early["resid_post", 0], full["resid_post", 0])


def test_gradients_of_a_metric_match_autograd(tiny_cnn):
    model = interp.load(tiny_cnn, input_shape=(1, 8, 8))
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    _, cache = model.run_with_cache(
        x, names=["conv2.hook_out", "fc.hook_in"], grad_of=lambda out: out[:, 3].sum()
    )
    # Reference: a manual forward with the intermediate made a leaf.
    c2 = tiny_cnn.conv2(torch.relu(tiny_cnn.conv1(x))).detach().requires_grad_(True)
    flat = tiny_cnn.pool(torch.relu(c2)).flatten(1)
    tiny_cnn.fc(flat)[:, 3].sum().backward()
    torch.testing.assert_close(cache.grads["conv2.hook_out"], c2.grad, atol=1e-6, rtol=0)
    torch.testing.assert_close(
        cache.grads["fc.hook_in"], tiny_cnn.fc.weight[3].expand(3, -1), atol=1e-6, rtol=0
    )


def test_memory_estimate_is_exact_and_over_budget_is_refused(gpt2_model):
    texts = ["the cat sat on the mat", "a dog ran under the rug"]
    names = ["blocks.*.hook_resid_post", "blocks.*.attn.hook_pattern"]
    _, cache = gpt2_model.run_with_cache(texts, names=names)
    sites = [gpt2_model._sites[n] for n in gpt2_model.resolve(names)]
    sizes = gpt2_model.dim_sizes(gpt2_model.prepare(texts))
    assert check_budget(sites, sizes, 4, None, False) == cache.nbytes
    with pytest.raises(CaptureTooLargeError) as err:
        gpt2_model.run_with_cache(texts, names=names, memory_budget=cache.nbytes - 1)
    message = str(err.value)
    assert "smaller batches" in message and "capture_to_disk" in message
    # the numbers show in a unit that fits them (not "0.00 GiB ... budget is 0.00 GiB")
    assert f"about {format_bytes(cache.nbytes)} of" in message
    assert f"budget is {format_bytes(cache.nbytes - 1)}." in message


def test_format_bytes_picks_a_unit_that_shows_the_number():
    assert format_bytes(512) == "512 bytes"
    assert format_bytes(3 * 2**20) == "3 MiB"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(5 * 2**30) == "5 GiB"


def test_unknown_hook_name_suggests_closest(gpt2_model, tiny_cnn):
    with pytest.raises(UnknownHookError) as err:
        gpt2_model.run_with_cache("the cat", names="blocks.0.hook_resid_pots")
    assert "blocks.0.hook_resid_post" in str(err.value) and "model.hook_names" in str(err.value)
    with pytest.raises(UnknownHookError, match="conv1.hook_out"):
        interp.load(tiny_cnn, input_shape=(1, 8, 8)).run_with_cache(torch.rand(1, 1, 8, 8), names="conv1")
    with pytest.raises(UnknownHookError, match="No hook point matches 'blocks.9.\\*'"):
        gpt2_model.run_with_hooks("the cat", [("blocks.9.*", lambda a, h: None)])


def test_a_run_with_hooks_holds_the_model_against_other_threads():
    """Hooks live on the shared module (the explorer shares one model between sessions), so while one
    thread's hooks are attached, another thread's plain forward waits instead of running through them."""
    import threading
    import time

    model = interp.load(
        dict(n_layers=1, d_model=16, n_heads=2, d_head=8, n_ctx=8, d_vocab=10, attn_only=True, act_fn=None,
             normalization_type="LN", positional_embedding_type="standard", seed=0)
    )  # fmt: skip
    tokens = torch.arange(6).unsqueeze(0)
    reference = model(tokens)
    attached, seen = threading.Event(), {}

    def hooked():
        with model.hooks([("blocks.0.hook_attn_out", lambda act, ctx: torch.zeros_like(act) + 100.0)]):
            attached.set()
            time.sleep(0.5)

    def plain():
        attached.wait()
        seen["out"] = model(tokens)

    threads = [threading.Thread(target=hooked), threading.Thread(target=plain)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert torch.equal(seen["out"], reference)
    clone = copy.deepcopy(model)  # a copy gets its own lock
    assert clone._lock is not model._lock and torch.equal(clone(tokens), reference)


# ------------------------------------------------------------------------------------------------
# TransformerLens hook ergonomics: name filters, get_act_name, persistent and backward hooks, ctx
# ------------------------------------------------------------------------------------------------


def test_a_callable_name_filter_selects_what_the_equivalent_glob_selects(gpt2_model):
    tokens = torch.tensor([[2, 3, 4, 5]])
    _, by_filter = gpt2_model.run_with_cache(tokens, names=lambda name: name.endswith("attn.hook_z"))
    _, by_glob = gpt2_model.run_with_cache(tokens, names="blocks.*.attn.hook_z")
    assert list(by_filter) == list(by_glob) == ["blocks.0.attn.hook_z", "blocks.1.attn.hook_z"]
    assert all(torch.equal(by_filter[n], by_glob[n]) for n in by_glob)
    _, mixed = gpt2_model.run_with_cache(
        tokens, names=["hook_embed", lambda n: n.endswith("hook_resid_post")]
    )
    assert list(mixed) == ["hook_embed", "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]

    def steer(act, hook):
        return act + 1.0

    filtered = gpt2_model.run_with_hooks(tokens, [(lambda n: n.endswith("hook_resid_post"), steer)])
    globbed = gpt2_model.run_with_hooks(tokens, [("blocks.*.hook_resid_post", steer)])
    assert torch.equal(filtered, globbed) and not torch.equal(filtered, gpt2_model(tokens))


def test_a_name_filter_that_raises_or_keeps_nothing_gets_a_clear_error(gpt2_model):
    def block_zero(name: str) -> bool:
        return int(name.split(".")[1]) == 0  # "hook_embed"-like names have no block index

    first = next(n for n in gpt2_model.hook_names if not n.split(".")[1].isdigit())
    with pytest.raises(InputError, match=rf"block_zero.*raised ValueError.*{re.escape(repr(first))}"):
        gpt2_model.run_with_cache("the cat", names=block_zero)
    with pytest.raises(UnknownHookError, match="keeps no hook point"):
        gpt2_model.run_with_hooks("the cat", [(lambda n: n.endswith("hook_zz"), lambda a, h: None)])
    assert _no_hooks_left(gpt2_model.module)


def test_get_act_name_equals_transformer_lens_for_all_its_names(gpt2_model):
    from transformer_lens.utilities import get_act_name as tl_get_act_name

    names = [
        *[
            "k",
            "v",
            "q",
            "z",
            "rot_k",
            "rot_q",
            "result",
            "pattern",
            "attn_scores",
            "pre",
            "post",
            "mid",
            "pre_linear",
            "scale",
            "normalized",
        ],
        *["attn", "attn_logits", "key", "query", "value", "mlp_pre", "mlp_mid", "mlp_post"],  # TL's aliases
        *[
            "embed",
            "pos_embed",
            "resid_pre",
            "resid_mid",
            "resid_post",
            "attn_out",
            "mlp_out",
            "attn_in",
            "q_input",
        ],
    ]
    layer_types = [None, "a", "m", "b", "block", "blocks", "attention", "attn", "mlp", "ln1", "ln2"]
    cases = [(n, layer, t) for n in names for layer in (None, 0, 3, "5") for t in layer_types]
    cases += [(s, None, None) for s in ("k6", "scale4ln1", "pre5", "normalized27ln2", "resid_pre2", "z0a")]
    cases += [(s, None, None) for s in ("hook_embed", "blocks.0.attn.hook_z", "ln_final.hook_scale")]
    for case in cases:
        assert interp.get_act_name(*case) == tl_get_act_name(*case), case
    for short in ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "z", "pattern", "q"):
        assert interp.get_act_name(short, 1) in gpt2_model.hook_names
    assert interp.get_act_name("resid_post", 3) == "blocks.3.hook_resid_post"


def test_persistent_hooks_apply_to_every_run_until_reset(tiny_cnn):
    model = interp.load(tiny_cnn, input_shape=(1, 8, 8))
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    plain = model(x)
    doubled = model.run_with_hooks(x, [("relu1.hook_out", lambda act, hook: act * 2.0)])
    model.add_hook("relu1.hook_out", lambda act, hook: act * 2.0)
    model.add_hook(lambda n: n == "fc.hook_out", lambda act, hook: act + 1.0, is_permanent=True)
    torch.testing.assert_close(model(x), doubled + 1.0)
    torch.testing.assert_close(
        model.run_with_hooks(x, [("fc.hook_out", lambda act, hook: act * 0.5)]), (doubled + 1.0) * 0.5
    )
    _, cache = model.run_with_cache(x, names=["relu1.hook_out", "fc.hook_out"])
    torch.testing.assert_close(cache["fc.hook_out"], doubled + 1.0)
    with torch.no_grad():
        torch.testing.assert_close(cache["relu1.hook_out"], 2.0 * torch.relu(tiny_cnn.conv1(x)))
    model.reset_hooks()  # the permanent one stays
    torch.testing.assert_close(model(x), plain + 1.0)
    model.reset_hooks(including_permanent=True)
    assert torch.equal(model(x), plain) and _no_hooks_left(tiny_cnn)
    with pytest.raises(ValueError, match="dir must be 'fwd' or 'bwd'"):
        model.add_hook("fc.hook_out", lambda act, hook: None, dir="backward")


def test_backward_hooks_read_the_gradient_of_the_activation(tiny_cnn):
    model = interp.load(tiny_cnn, input_shape=(1, 8, 8))
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    seen = {}

    def read(grad, hook):
        seen[hook.name] = grad.clone()

    out = model.run_with_hooks(x, bwd_hooks=[("conv2.hook_out", read)])
    out[:, 3].sum().backward()
    _, cache = model.run_with_cache(x, names="conv2.hook_out", grad_of=lambda o: o[:, 3].sum())
    torch.testing.assert_close(seen["conv2.hook_out"], cache.grads["conv2.hook_out"], atol=1e-6, rtol=0)
    assert _no_hooks_left(tiny_cnn)
    seen.clear()
    model.add_hook("conv2.hook_out", read, dir="bwd")
    with model._internal():  # a library probe's forward does not register the user's backward hook
        probe = model.run_with_hooks(x, grad=True)
    probe.sum().backward()
    assert seen == {}
    model.run_with_hooks(x, grad=True).sum().backward()
    assert set(seen) == {"conv2.hook_out"}
    model.reset_hooks()


def test_a_backward_hook_that_edits_the_gradient_changes_the_input_gradient_as_predicted(tiny_cnn):
    """Zeroing the gradient of conv2's channel 0 equals detaching that channel in the forward."""
    model = interp.load(tiny_cnn, input_shape=(1, 8, 8))
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))

    def cut_channel_0(grad, hook):
        grad = grad.clone()
        grad[:, 0] = 0.0
        return grad

    def metric(out):
        return out.logsumexp(-1).sum()

    leaf = x.clone().requires_grad_(True)
    c2 = tiny_cnn.conv2(torch.relu(tiny_cnn.conv1(leaf)))
    c2 = torch.cat([c2[:, :1].detach(), c2[:, 1:]], dim=1)
    metric(tiny_cnn.fc(tiny_cnn.pool(torch.relu(c2)).flatten(1))).backward()
    expected = leaf.grad

    for run in ("run_with_hooks", "add_hook"):
        x_run = x.clone().requires_grad_(True)
        if run == "run_with_hooks":
            out = model.run_with_hooks(x_run, bwd_hooks=[("conv2.hook_out", cut_channel_0)])
        else:
            model.add_hook("conv2.hook_out", cut_channel_0, dir="bwd")
            out = model.run_with_hooks(x_run, grad=True)
            model.reset_hooks()
        metric(out).backward()
        torch.testing.assert_close(x_run.grad, expected, atol=1e-6, rtol=1e-5)
        plain = x.clone().requires_grad_(True)
        metric(model.run_with_hooks(plain, grad=True)).backward()
        assert not torch.allclose(plain.grad, expected)  # the edit mattered
    assert _no_hooks_left(tiny_cnn)


def test_hook_ctx_persists_across_runs_until_reset_and_layer_is_tl_style(gpt2_model):
    tokens = torch.tensor([[2, 3, 4, 5]])
    seen = []

    def count(act, hook):
        hook.ctx["calls"] = hook.ctx.get("calls", 0) + 1
        seen.append((hook.name, hook.layer(), hook.layer == 1, hook.ctx["calls"]))

    gpt2_model.run_with_hooks(tokens, [("blocks.1.hook_resid_post", count)])
    gpt2_model.run_with_hooks(tokens, [("blocks.1.hook_out", count)])  # an alias: same hook point, same ctx
    assert seen == [("blocks.1.hook_resid_post", 1, True, 1), ("blocks.1.hook_out", 1, True, 2)]
    gpt2_model.reset_hooks()  # clears every ctx, as TransformerLens's reset_hooks
    gpt2_model.run_with_hooks(tokens, [("blocks.1.hook_resid_post", count)])
    assert seen[-1][-1] == 1

    def embed_layer(act, hook):
        hook.layer()

    with pytest.raises(ValueError, match=r"'hook_embed' is not inside a block"):
        gpt2_model.run_with_hooks(tokens, [("hook_embed", embed_layer)])


def test_a_transformer_lens_style_partial_hook_gets_hook_by_keyword(gpt2_model):
    """TL calls hooks as fn(activation, hook=...), so partial(fn, head=2) with fn(z, head, hook) works."""
    from functools import partial

    tokens = torch.tensor([[2, 3, 4, 5, 6]])

    def ablate_head(z, head, hook):
        assert hook.name == "blocks.0.attn.hook_z"
        z[:, :, head] = 0.0
        return z

    def by_hand(z, hook):
        z = z.clone()
        z[:, :, 2] = 0.0
        return z

    tl_style = gpt2_model.run_with_hooks(tokens, [("blocks.0.attn.hook_z", partial(ablate_head, head=2))])
    assert torch.equal(tl_style, gpt2_model.run_with_hooks(tokens, [("blocks.0.attn.hook_z", by_hand)]))
    assert not torch.equal(tl_style, gpt2_model(tokens))


def test_a_copy_keeps_persistent_hooks_but_not_those_of_an_open_hooks_block(tiny_cnn):
    model = interp.load(tiny_cnn, input_shape=(1, 8, 8))
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    plain = model(x)
    model.add_hook("fc.hook_out", lambda act, hook: act + 1.0)
    with model.hooks([("fc.hook_out", lambda act, hook: act * 0.0)]):
        assert torch.equal(model(x), torch.zeros_like(plain))
        twin = copy.deepcopy(model)  # e.g. attribution.randomized(model) inside the block
    torch.testing.assert_close(twin(x), plain + 1.0)
    twin.reset_hooks()  # removes the copy's persistent hook from the copy only
    assert torch.equal(twin(x), plain) and _no_hooks_left(twin.module)
    torch.testing.assert_close(model(x), plain + 1.0)
    model.reset_hooks()
    assert _no_hooks_left(tiny_cnn)


def test_malformed_hook_lists_get_a_clear_error(tiny_cnn):
    model = interp.load(tiny_cnn, input_shape=(1, 8, 8))
    x = torch.rand(1, 1, 8, 8)
    with pytest.raises(InputError, match=r"hooks must be a list of \(names, fn\) pairs"):
        model.run_with_hooks(x, [lambda act, hook: act])  # the name is missing
    with pytest.raises(InputError, match=r"bwd_hooks must be a list of \(names, fn\) pairs"):
        model.run_with_hooks(x, bwd_hooks=[("fc.hook_out", "not a function")])
    with pytest.raises(InputError, match=r"wrap the one pair in a list"):
        model.run_with_hooks(x, ("fc.hook_out", lambda act, hook: act * 0.0))
    assert _no_hooks_left(tiny_cnn)
