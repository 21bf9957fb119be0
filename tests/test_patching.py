"""Batched activation patching, ablation, path patching and AtP against independent references:
TransformerLens 4.3's ``patching`` functions on the same bridge, and naive one-forward-per-patch
loops through ``run_with_hooks``."""

from __future__ import annotations

import pytest
import torch

import interp
from interp.errors import CaptureTooLargeError, InputError, UnknownHookError
from interp.methods import ablation, attribution_patching, path_patching
from interp.methods import patching as P

TOY = dict(
    n_layers=2, d_model=32, n_heads=4, d_head=8, n_ctx=24, d_vocab=40, attn_only=True, act_fn=None,
    normalization_type="LN", positional_embedding_type="standard", seed=0,
)  # fmt: skip


@pytest.fixture(scope="module")
def toy():
    return interp.load(TOY)


def tl_metric(clean):
    def metric(logits):
        rows = torch.arange(clean.shape[0])
        return (logits[rows, -1, clean[:, -1]] - logits[rows, -1, 3]).mean()

    return metric


def naive(model, base, source_cache, hook, index_sets, metric):
    """One forward per patch: write source[:, *index] into the activation, like TL's loop."""
    out = []
    for index in index_sets:

        def fn(act, ctx, index=index):
            act = act.clone()
            view = act if act.ndim != 3 or "hook_z" not in hook else act.view(*act.shape[:2], 4, -1)
            src = source_cache if source_cache.ndim == view.ndim else source_cache.view(view.shape)
            view[(slice(None), *index)] = src[(slice(None), *index)]
            return act

        out.append(float(metric(model.run_with_hooks(base, [(hook, fn)]))))
    return torch.tensor(out)


# --- exactness --------------------------------------------------------------------------------


def test_head_pos_head_and_resid_match_transformer_lens(toy, pair):
    import transformer_lens.patching as tlp

    clean, corrupted = pair
    bridge = toy.bridge.eval()
    _, clean_cache = bridge.run_with_cache(clean)
    metric = tl_metric(clean)
    ours = P.patch(toy, clean, corrupted, "head_pos", P.logit_diff(clean[:, -1], 3))
    assert ours.dims == ("layer", "pos", "head") and ours.values.shape == (2, 6, 4)
    ref = tlp.get_act_patch_attn_head_out_by_pos(bridge, corrupted, clean_cache, metric)
    assert (ours.values - ref).abs().max() <= 1e-4
    ref = tlp.get_act_patch_resid_pre(bridge, corrupted, clean_cache, metric)
    assert (P.patch(toy, clean, corrupted, "resid_pre", metric).values - ref).abs().max() <= 1e-4
    ref = tlp.get_act_patch_attn_head_out_all_pos(bridge, corrupted, clean_cache, metric)
    assert (P.patch(toy, clean, corrupted, "head", metric).values - ref).abs().max() <= 1e-4


def test_hf_model_sites_match_a_naive_loop(gpt2_model):
    torch.manual_seed(1)
    clean = torch.randint(2, 20, (2, 6))
    corrupted = clean.flip(1)
    metric = P.prob(clean[:, -1])
    _, cache = gpt2_model.run_with_cache(clean, names=["blocks.1.hook_mlp_out", "blocks.0.attn.hook_z"])
    ours = P.patch(gpt2_model, clean, corrupted, "mlp_out", metric, layers=[1])
    ref = naive(
        gpt2_model,
        corrupted,
        cache["blocks.1.hook_mlp_out"],
        "blocks.1.hook_mlp_out",
        [(p,) for p in range(6)],
        metric,
    )
    assert (ours.values[0] - ref).abs().max() <= 1e-5
    ours = P.patch(gpt2_model, clean, corrupted, "head_pos", metric, layers=[0], positions=[1, 4], heads=[2])
    ref = naive(
        gpt2_model, corrupted, cache["blocks.0.attn.hook_z"], "blocks.0.attn.hook_z", [(1, 2), (4, 2)], metric
    )
    assert ours.values.shape == (1, 2, 1) and (ours.values.flatten() - ref).abs().max() <= 1e-5
    # neurons and raw hook names
    assert P.patch(gpt2_model, clean, corrupted, "neuron", metric, neurons=[0, 5]).values.shape == (2, 2)
    raw = P.patch(gpt2_model, clean, corrupted, "blocks.1.hook_mlp_out", metric)
    assert raw.dims == ("hook", "pos") and torch.allclose(
        raw.values[0], P.patch(gpt2_model, clean, corrupted, "mlp_out", metric).values[1]
    )


def test_minilm_cosine_matches_a_naive_loop(minilm):
    clean = "The cat sat on the mat."
    corrupted = "The dog sat on the rug."
    metric = P.cosine()
    result = P.patch(minilm, clean, corrupted, "resid_pre", metric, layers=[3], positions=[2, 6])
    clean_out, cache = minilm.run_with_cache(clean, names=["blocks.3.hook_resid_pre"])
    bound = metric.bind(clean_out, minilm(corrupted), None)
    ref = naive(
        minilm, corrupted, cache["blocks.3.hook_resid_pre"], "blocks.3.hook_resid_pre", [(2,), (6,)], bound
    )
    assert (result.values.flatten() - ref).abs().max() <= 1e-5
    assert result.metric_clean == pytest.approx(1.0, abs=1e-5) and result.metric_corrupted < 1


def test_chunking_progress_and_user_metrics_agree(toy, pair):
    clean, corrupted = pair
    calls = []
    builtin = P.patch(toy, clean, corrupted, "head_pos", P.logit_diff(clean[:, -1], 3))
    chunked = P.patch(
        toy,
        clean,
        corrupted,
        "head_pos",
        tl_metric(clean),
        batch_size=5,
        progress=lambda d, t: calls.append((d, t)),
    )
    assert torch.allclose(builtin.values, chunked.values, atol=1e-5)
    steps = [b[0] - a[0] for a, b in zip([(0, 48), *calls], calls, strict=False)]
    assert calls[-1] == (48, 48) and all(0 < step <= 5 for step in steps)  # one call per forward of <= 5
    assert builtin.metric_clean == pytest.approx(chunked.metric_clean, abs=1e-5)


def test_result_normalizes_and_draws(toy, pair):
    clean, corrupted = pair
    result = P.patch(toy, clean, corrupted, "resid_pre", P.logit_diff(clean[:, -1], 3))
    norm = result.normalized()
    assert norm.values.shape == (2, 6)
    fig = result.figure()
    assert fig.data[0].type == "heatmap" and len(fig.data[0].y) == 2 and len(fig.data[0].x) == 6
    heads = P.patch(toy, clean, corrupted, "head_pos", P.kl())
    assert len(heads.figure().data[0].y) == 8  # layer x head rows
    assert heads.values.min() >= -1e-6  # a KL
    assert len(heads.top(3)) == 3 and heads.top(1)[0][0].startswith("layer=")


# --- bad input --------------------------------------------------------------------------------


def test_length_mismatch_is_explained(toy):
    with pytest.raises(InputError, match=r"different token lengths: clean 1 x 6 tokens, corrupted 1 x 7"):
        P.patch(toy, torch.arange(6)[None], torch.arange(7)[None], "resid_pre", P.kl())


def test_wrong_metric_shape_names_the_required_shape(toy, pair):
    clean, corrupted = pair
    with pytest.raises(InputError, match=r"returned shape \(2,\); it must return a scalar \(shape \(\)"):
        P.patch(toy, clean, corrupted, "resid_pre", lambda logits: logits[:, -1, 0])


def test_unknown_sites_suggest_the_closest(toy, pair):
    clean, corrupted = pair
    with pytest.raises(UnknownHookError, match=r"neither a site .* Did you mean: blocks\.0\.hook_resid_pre"):
        P.patch(toy, clean, corrupted, "blocks.0.hook_resid_pr", P.kl())
    with pytest.raises(UnknownHookError, match=r"attention-only model: no MLP"):
        P.patch(toy, clean, corrupted, "mlp_out", P.kl())
    with pytest.raises(UnknownHookError, match=r"Did you mean the site 'head_pos'\?"):
        P.patch(toy, clean, corrupted, "head_po", P.kl())


def test_too_large_sweep_says_how_to_chunk_or_filter(toy, pair):
    clean, corrupted = pair
    with pytest.raises(CaptureTooLargeError, match=r"Filter the sweep \(layers=\[\.\.\.\], positions="):
        P.patch(toy, clean, corrupted, "head_pos", P.kl(), memory_budget=1000)
    with pytest.raises(CaptureTooLargeError, match=r"use batch_size<="):
        P.patch(toy, clean, corrupted, "head_pos", P.kl(), memory_budget=2_000_000, batch_size=10_000)


# --- ablation, path patching, AtP -------------------------------------------------------------


def test_ablations_match_naive_hooks(toy, pair):
    clean, reference = pair
    metric = P.logit_diff(clean[:, -1], 3)
    zero = ablation.ablate(toy, clean, "head", "zero", metric)
    mean = ablation.ablate(toy, clean, "head", "mean", metric, reference=reference)
    _, ref_cache = toy.run_with_cache(reference, names="blocks.*.attn.hook_z")
    for layer in range(2):
        for head in range(4):
            name = f"blocks.{layer}.attn.hook_z"

            def zero_fn(act, ctx, head=head):
                act = act.clone().view(*act.shape[:2], 4, 8)
                act[:, :, head] = 0
                return act

            def mean_fn(act, ctx, head=head, name=name):
                act = act.clone().view(*act.shape[:2], 4, 8)
                act[:, :, head] = ref_cache[name].view(2, 6, 4, 8)[:, :, head].mean(0)
                return act

            assert float(metric(toy.run_with_hooks(clean, [(name, zero_fn)]))) == pytest.approx(
                float(zero.values[layer, head]), abs=1e-5
            )
            assert float(metric(toy.run_with_hooks(clean, [(name, mean_fn)]))) == pytest.approx(
                float(mean.values[layer, head]), abs=1e-5
            )
    a = ablation.ablate(toy, clean, "head", "resample", metric, reference=reference, seed=3)
    b = ablation.ablate(toy, clean, "head", "resample", metric, reference=reference, seed=3)
    assert torch.equal(a.values, b.values) and a.method == "resample ablation"
    with pytest.raises(InputError, match="same position"):
        ablation.ablate(toy, clean, "head", "resample", metric, reference=reference[:, :4])


def test_group_ablation_hooks_match_naive_hooks(toy, pair):
    """Ablating several heads together equals writing zeros / reference means into all of them."""
    clean, reference = pair
    metric = P.logit_diff(clean[:, -1], 3)
    group = [(0, 1), (1, 0), (1, 3)]
    names = ["blocks.0.attn.hook_z", "blocks.1.attn.hook_z"]
    _, ref_cache = toy.run_with_cache(reference, names=names)

    def naive_fn(kind):
        def fn(act, ctx):
            act = act.clone().view(*act.shape[:2], 4, 8)
            for layer, head in group:
                if ctx.name == names[layer]:
                    mean = ref_cache[ctx.name].view(2, 6, 4, 8)[:, :, head].mean(0)
                    act[:, :, head] = 0 if kind == "zero" else mean
            return act

        return fn

    for kind in ("zero", "mean"):
        hooks = ablation.ablation_hooks(toy, clean, group, "head", kind, reference=reference)
        want = float(metric(toy.run_with_hooks(clean, [(n, naive_fn(kind)) for n in names])))
        assert float(metric(toy.run_with_hooks(clean, hooks))) == pytest.approx(want, abs=1e-5)
    # a group of one is the single-unit sweep's entry
    single = ablation.ablate(toy, clean, "head", "zero", metric)
    one = ablation.ablation_hooks(toy, clean, [(1, 2)], "head", "zero")
    assert float(metric(toy.run_with_hooks(clean, one))) == pytest.approx(
        float(single.values[1, 2]), abs=1e-5
    )
    with pytest.raises(InputError, match="out of range"):
        ablation.ablation_hooks(toy, clean, [(1, 4)], "head")
    with pytest.raises(InputError, match="whole units"):
        ablation.ablation_hooks(toy, clean, [(1, 0)], "head_pos")


def _naive_path_patch(model, clean, corrupted, sender, receivers, metric):
    """Two forwards per sender, written out directly (Wang et al. 2022)."""
    names = [f"blocks.{i}.attn.hook_z" for i in range(2)]
    _, cc = model.run_with_cache(clean, names=names)
    _, xc = model.run_with_cache(corrupted, names=names)

    def freeze(act, ctx):
        src = cc[ctx.name].clone().view(*act.shape[:2], 4, 8)
        if ctx.layer() == sender[0]:
            src[:, :, sender[1]] = xc[ctx.name].view(*act.shape[:2], 4, 8)[:, :, sender[1]]
        return src.view(act.shape)

    if receivers == "logits":
        return float(metric(model.run_with_hooks(clean, [("blocks.*.attn.hook_z", freeze)])))
    q_names = [f"blocks.{layer}.attn.hook_{x}" for layer in {r[0] for r in receivers} for x in "qkv"]
    _, step1 = model.run_with_cache(clean, names=q_names, hooks=[("blocks.*.attn.hook_z", freeze)])

    def replay(act, ctx):
        act = act.clone().view(*act.shape[:2], 4, 8)
        for layer, head in receivers:
            if layer == ctx.layer():
                act[:, :, head] = step1[ctx.name].view(*act.shape[:2], 4, 8)[:, :, head]
        return act

    return float(metric(model.run_with_hooks(clean, [(n, replay) for n in q_names])))


def test_path_patching_matches_two_forwards_per_sender(toy, pair):
    clean, corrupted = pair
    metric = P.logit_diff(clean[:, -1], 3)
    direct = path_patching.path_patch(toy, clean, corrupted, "logits", metric)
    via = path_patching.path_patch(toy, clean, corrupted, [(1, 0), (1, 2)], metric, batch_size=3)
    for head in (0, 3):
        assert float(direct.values[0, head]) == pytest.approx(
            _naive_path_patch(toy, clean, corrupted, (0, head), "logits", metric), abs=1e-5
        )
        assert float(via.values[0, head]) == pytest.approx(
            _naive_path_patch(toy, clean, corrupted, (0, head), [(1, 0), (1, 2)], metric), abs=1e-5
        )
    for head in (1, 3):  # layer-1 senders: layer 0 runs once for the whole chunk
        assert float(direct.values[1, head]) == pytest.approx(
            _naive_path_patch(toy, clean, corrupted, (1, head), "logits", metric), abs=1e-5
        )
    assert torch.allclose(via.values[1], torch.tensor(via.metric_clean))  # no path from layer 1 to layer 1


def test_path_patching_with_frozen_mlps_matches_a_naive_forward(pair):
    """With freeze_mlps=True only the sender's direct path reaches the logits: every MLP output is
    the clean one, written here as one hooked forward per sender."""
    model = interp.load(TOY_MLP)
    clean, corrupted = pair
    metric = P.logit_diff(clean[:, -1], 3)
    result = path_patching.path_patch(model, clean, corrupted, "logits", metric, freeze_mlps=True)
    names = [f"blocks.{i}.{n}" for i in range(2) for n in ("attn.hook_z", "hook_mlp_out")]
    _, cc = model.run_with_cache(clean, names=names)
    _, xc = model.run_with_cache(corrupted, names=names)
    for layer, head in [(0, 2), (1, 1)]:

        def freeze(act, ctx, layer=layer, head=head):
            value = cc[ctx.name].clone()
            if ctx.name.endswith("hook_z") and ctx.layer() == layer:
                view, src = value.view(*value.shape[:2], 4, 8), xc[ctx.name].view(*value.shape[:2], 4, 8)
                view[:, :, head] = src[:, :, head]
            return value

        naive_value = float(metric(model.run_with_hooks(clean, [(n, freeze) for n in names])))
        assert float(result.values[layer, head]) == pytest.approx(naive_value, abs=1e-5)


def test_atp_agrees_with_exact_patching_on_heads(toy, pair):
    clean, corrupted = pair
    metric = P.logit_diff(clean[:, -1], 3)
    exact = P.patch(toy, clean, corrupted, "head_pos", metric)
    estimate = attribution_patching.attribution_patch(toy, clean, corrupted, "head_pos", metric, exact=exact)
    assert estimate.values.shape == exact.values.shape and estimate.method.startswith("attribution")
    assert estimate.agreement > 0.9
    assert estimate.metric_corrupted == pytest.approx(exact.metric_corrupted, abs=1e-5)
    checked = attribution_patching.attribution_patch(toy, clean, corrupted, "head", metric, check=True)
    assert checked.agreement is not None and checked.agreement > 0.8


@pytest.mark.parametrize("attn_only", [True, False])
def test_edge_attribution_decomposes_node_attribution(attn_only, pair):
    """Every sender's row of edge scores sums to its node AtP estimate (heads, MLPs, embeddings),
    edges to the logits equal the sender's output change dotted with the gradient at the final
    residual stream, and receivers never read senders that come after them."""
    model = interp.load(TOY if attn_only else TOY_MLP)
    clean, corrupted = pair
    metric = P.logit_diff(clean[:, -1], 3)
    edges = attribution_patching.attribution_patch_edges(model, clean, corrupted, metric)
    senders, receivers = edges.labels["sender"], edges.labels["receiver"]
    assert senders[0] == "embed" and receivers[-1] == "logits"
    assert ("MLP1" in senders) is (not attn_only)
    rows = edges.values.sum(-1)

    def node(site, **kw):
        estimate = attribution_patching.attribution_patch(model, clean, corrupted, site, metric, **kw)
        return estimate.values - estimate.metric_corrupted

    heads = node("head")  # [layer, head]
    for layer in range(2):
        got = rows[[senders.index(f"L{layer}H{h}") for h in range(4)]]
        assert torch.allclose(got, heads[layer], atol=1e-4)
    assert rows[0] == pytest.approx(float(node("pos").sum()), abs=1e-4)
    if not attn_only:
        mlps = node("mlp")
        assert torch.allclose(rows[[senders.index("MLP0"), senders.index("MLP1")]], mlps, atol=1e-4)
    # an edge into the logits, computed independently from the final stream's gradient
    _, cache = model.run_with_cache(
        corrupted,
        names=["blocks.1.hook_resid_post", "blocks.0.attn.hook_z"],
        grad_of=metric.bind(model(clean), model(corrupted), None),
    )
    _, clean_cache = model.run_with_cache(clean, names=["blocks.0.attn.hook_z"])
    delta = clean_cache["blocks.0.attn.hook_z"] - cache["blocks.0.attn.hook_z"]
    results = attribution_patching._head_results(model, 0, delta, 4)
    direct = torch.einsum("bphd,bpd->h", results, cache.grads["blocks.1.hook_resid_post"])
    assert torch.allclose(edges.values[1:5, -1], direct, atol=1e-5)
    # heads of one layer do not read each other; nothing reads layer 1 but later nodes
    l0 = [senders.index(f"L0H{h}") for h in range(4)]
    assert (edges.values[l0][:, [receivers.index(f"L0H{h}") for h in range(4)]] == 0).all()
    assert (
        edges.values[[senders.index(f"L1H{h}") for h in range(4)]][:, : receivers.index("L1H3") + 1] == 0
    ).all()


def test_edge_attribution_refuses_post_ln_models(minilm):
    with pytest.raises(InputError, match="post-LN"):
        attribution_patching.attribution_patch_edges(minilm, "The cat sat.", "The dog sat.")


def test_metrics_at_one_position_unembed_only_there(toy, pair, monkeypatch):
    """Built-in metrics read one position per prompt, so a sweep keeps only that position before the
    unembedding: the metric then sees one position, and every value equals the same metric written
    as a plain function of the full logits."""
    clean, corrupted = pair
    seen = []
    batched = P.KL.batched
    monkeypatch.setattr(P.KL, "batched", lambda self, out: seen.append(out.shape) or batched(self, out))
    result = P.patch(toy, clean, corrupted, "head_pos", P.kl(pos=3))
    sweeps = [shape for shape in seen if shape[0] > 1]  # (the unpatched runs are read in full)
    assert sweeps and all(shape[2] == 1 for shape in sweeps)  # [copies, batch, 1 position, vocab]
    reference = toy(clean)[:, 3].log_softmax(-1)

    def kl_at_3(logits):
        logp = logits[:, 3].log_softmax(-1)
        return (reference.exp() * (reference - logp)).sum(-1).mean()

    full = P.patch(toy, clean, corrupted, "head_pos", kl_at_3)
    assert (result.values - full.values).abs().max() <= 1e-5


# --- shared prefix: the forward runs once up to the patched hook -------------------------------

TOY_MLP = {**TOY, "attn_only": False, "d_mlp": 64, "act_fn": "gelu"}


def without_sharing(model):
    """The same model object with every tiling plan switched off (copies tiled at the input)."""

    class Plain:
        def __enter__(self):
            model.tiling_plans = lambda name: []

        def __exit__(self, *exc):
            del model.tiling_plans

    return Plain()


def verified(model, op_sequence):
    """Whether a plan with these ops (e.g. ("tile", "untile", "tile")) was verified and kept."""
    return any(
        ok and tuple(op for _, op in key[0]) == op_sequence for key, ok in model._prefix_checks.items()
    )


@pytest.mark.parametrize("site", ["head_pos", "attn_out", "mlp_out", "neuron", "resid_mid", "resid_post"])
def test_shared_prefix_sweeps_equal_tiled_inputs(site, pair):
    """Running the forward once up to the patched hook changes nothing: every value equals the sweep
    whose copies are tiled at the input, and the branch plan (stack the residual, keep one copy
    through attention/MLP, stack again at the hook) is the one that was verified and used."""
    model = interp.load(TOY_MLP)
    clean, corrupted = pair
    metric = P.logit_diff(clean[:, -1], 3)
    shared = P.patch(model, clean, corrupted, site, metric, neurons=[0, 7, 63])
    with without_sharing(model):
        tiled = P.patch(model, clean, corrupted, site, metric, neurons=[0, 7, 63])
    assert (shared.values - tiled.values).abs().max() <= 1e-5
    if site in ("head_pos", "attn_out", "mlp_out", "neuron"):
        assert verified(model, ("tile", "untile", "tile"))
    else:
        assert verified(model, ("tile",))


def test_prefix_plans_are_verified_on_the_model_not_assumed(gpt2_model, minilm):
    """Which plan is exact depends on the model's code, so each is checked before use. GPT-2 (HF):
    stacking at a head's output alone breaks the residual add for two prompts and is refused; the
    branch plan and the block-entry plan pass, with a padded batch too (the attention mask built
    before the blocks is stacked to match). MiniLM (BERT) reshapes the attention output with the
    batch size read before the hook, so only the block-entry plan passes. Every sweep still gives
    the values of copies tiled at the input."""
    clean = ["the cat sat on the mat", "a dog ran"]
    corrupted = ["the dog sat on the mat", "a cat ran"]
    prepared = gpt2_model.prepare(corrupted)
    assert prepared.attention_mask is not None and not prepared.attention_mask.all()
    z = "blocks.1.attn.hook_z"
    branch = (("blocks.1.hook_resid_pre", "tile"), ("blocks.1.ln1.hook_in", "untile"), (z, "tile"))
    assert not gpt2_model._check_plan(prepared, ((z, "tile"),))
    assert gpt2_model._check_plan(prepared, branch)
    assert gpt2_model.shares_prefix(prepared, "blocks.1.hook_resid_pre")
    metric = P.prob(gpt2_model.prepare(clean).input_ids[:, 1])
    for site in ("resid_pre", "head_pos"):
        shared = P.patch(gpt2_model, clean, corrupted, site, metric, layers=[1])
        with without_sharing(gpt2_model):
            tiled = P.patch(gpt2_model, clean, corrupted, site, metric, layers=[1])
        assert (shared.values - tiled.values).abs().max() <= 1e-6

    bert = minilm.prepare(["The cat sat on the mat.", "A dog ran."])
    bert_branch = (
        ("blocks.2.hook_resid_pre", "tile"),
        ("blocks.2.attn.hook_in", "untile"),
        ("blocks.2.attn.hook_z", "tile"),
    )
    assert not minilm._check_plan(bert, bert_branch)
    assert minilm._check_plan(bert, (("blocks.2.hook_resid_pre", "tile"),))
    pair_ = ["The cat sat on the mat.", "A dog ran."], ["The dog sat on the rug.", "A cat ran."]
    shared = P.patch(minilm, *pair_, "head_pos", P.cosine(), layers=[2], heads=[0, 5])
    with without_sharing(minilm):
        tiled = P.patch(minilm, *pair_, "head_pos", P.cosine(), layers=[2], heads=[0, 5])
    assert (shared.values - tiled.values).abs().max() <= 1e-5


def test_the_check_catches_copies_that_mix(monkeypatch, pair):
    """The numerical check jitters each copy differently after the hook, so a tiling that put rows
    in the wrong order (copy-major vs prompt-major) would fail it and never be used."""
    import interp.models.base as base

    model = interp.load(TOY_MLP)
    prepared = model.prepare(pair[1])
    plan = (("blocks.1.hook_resid_pre", "tile"),)
    assert model._check_plan(prepared, plan)
    monkeypatch.setattr(base, "tile_batch", lambda copies: lambda act: act.repeat_interleave(copies, dim=0))
    assert not model._check_plan(prepared, plan)


ZEROING = {
    "returns a new tensor": lambda act, ctx: torch.zeros_like(act),
    "edits in place and returns it": lambda act, ctx: act.zero_(),
    "edits in place and returns None": lambda act, ctx: (act.zero_(), None)[1],
}


@pytest.mark.parametrize("style", list(ZEROING))
@pytest.mark.parametrize("which", ["native", "hf"])
def test_writing_resid_mid_changes_the_residual_stream(which, style, gpt2_model):
    """In pre-LN blocks ``hook_resid_mid`` is read at the MLP's input; a write there must still
    replace the residual stream, however the hook writes: with resid_mid zeroed, resid_post is
    exactly the MLP's output, and the MLP's output is the MLP applied to zeros."""
    model = interp.load(TOY_MLP) if which == "native" else gpt2_model
    tokens = torch.randint(2, 20, (2, 6))
    names = ["blocks.1.hook_resid_post", "blocks.1.hook_mlp_out", "blocks.1.ln2.hook_in"]
    zero = [("blocks.1.hook_resid_mid", ZEROING[style])]
    _, cache = model.run_with_cache(tokens, names=names, hooks=zero)
    assert torch.equal(cache["blocks.1.hook_resid_post"], cache["blocks.1.hook_mlp_out"])
    assert cache["blocks.1.ln2.hook_in"].abs().max() == 0
    _, plain = model.run_with_cache(tokens, names=names)
    assert (plain["blocks.1.hook_resid_post"] - plain["blocks.1.hook_mlp_out"]).abs().max() > 0.01
