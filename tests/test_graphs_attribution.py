"""attribute(): exactness against the real model (TransformerLens's bridge hooks are the oracle) and
against finite differences in the frozen replacement model; interventions; bad input.

The model is a tiny random float64 decoder (3 layers, d_model 32, LayerNorm, GELU MLP) with every
parameter perturbed so that no bias is zero; the transcoders are random: a plain one reading
``mlp.hook_in``, a skip transcoder reading the stream before ``ln2`` (``ln2.hook_in``) and a plain one
reading ``ln2.hook_normalized`` (before ln2's affine), so every input site and the skip path are
exercised. Exactness holds for any weights.
"""

from __future__ import annotations

import pytest
import torch

import interp
from interp import graphs
from interp.errors import InputError
from interp.sae import SAE, SAEConfig

TOKENS = torch.tensor([1, 5, 7, 3, 9, 2, 11, 4])

# The width, context and vocabulary of the tiny native bridges (here and in test_capture); each test
# adds its depth, MLP (or none) and seed.
TINY_BRIDGE = dict(
    d_model=32,
    n_heads=4,
    d_head=8,
    n_ctx=16,
    d_vocab=20,
    normalization_type="LN",
    positional_embedding_type="standard",
)


def tiny_model(seed: int = 0, double: bool = True, **overrides):
    from transformer_lens.config import TransformerBridgeConfig

    kw = dict(TINY_BRIDGE, n_layers=3, d_mlp=64, act_fn="gelu", seed=seed)
    kw.update(overrides)
    model = interp.load(TransformerBridgeConfig(**kw))
    if double:
        model.bridge.double()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.bridge.original_model.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) * 0.3)
    return model


SITES = ("mlp.hook_in", "ln2.hook_in", "ln2.hook_normalized")


def tiny_transcoders(seed: int = 0, d_sae: int = 48, n_layers: int = 3, dtype: str = "float64"):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for layer in range(n_layers):
        skip = layer % 2 == 1
        cfg = SAEConfig(
            d_in=32,
            d_sae=d_sae,
            architecture="skip_transcoder" if skip else "transcoder",
            hook_name=f"blocks.{layer}.{SITES[layer % 3]}",
            hook_name_out=f"blocks.{layer}.mlp.hook_out",
            dtype=dtype,
            apply_b_dec_to_input=False,
        )
        tc = SAE(cfg)
        with torch.no_grad():
            for p, std in ((tc.W_enc, 0.3), (tc.W_dec, 0.3), (tc.b_enc, 0.5), (tc.b_dec, 0.1)):
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) * std)
            if skip:
                tc.W_skip.copy_(
                    torch.randn(tc.W_skip.shape, generator=gen, dtype=torch.float64).to(tc.dtype) * 0.1
                )
        out.append(tc)
    return out


@pytest.fixture(scope="module")
def setup():
    model, tcs = tiny_model(), tiny_transcoders()
    graph = graphs.attribute(model, tcs, TOKENS, progress=False)
    rep = graphs.record(model, tcs, TOKENS)
    return model, tcs, graph, rep


def node_values(graph) -> torch.Tensor:
    return torch.tensor([n.activation for n in graph.nodes], dtype=torch.float64)


def test_the_recorded_forward_is_the_models(setup):
    """The replacement's forward (from the weights, no hooks) carries what TL's hooks carry."""
    model, tcs, _, rep = setup
    names = [
        f"blocks.{i}.{s}" for i in range(3) for s in ("ln1.hook_scale", "attn.hook_pattern", "hook_mlp_out")
    ]
    names += [tc.cfg.hook_name for tc in tcs]
    logits, cache = model.run_with_cache(TOKENS[None], names=names + ["ln_final.hook_scale"])
    torch.testing.assert_close(rep.logits, logits[0], rtol=0, atol=1e-10)
    for i, layer in enumerate(rep.layers):
        torch.testing.assert_close(
            layer.ln1.scale[:, 0], cache[f"blocks.{i}.ln1.hook_scale"][0].flatten(), atol=1e-10, rtol=0
        )
        torch.testing.assert_close(
            layer.pattern, cache[f"blocks.{i}.attn.hook_pattern"][0], atol=1e-12, rtol=0
        )
        torch.testing.assert_close(layer.mlp_out, cache[f"blocks.{i}.hook_mlp_out"][0], atol=1e-10, rtol=0)
        torch.testing.assert_close(layer.mlp_in, cache[tcs[i].cfg.hook_name][0], atol=1e-10, rtol=0)
    torch.testing.assert_close(
        rep.ln_final.scale[:, 0], cache["ln_final.hook_scale"][0].flatten(), atol=1e-10, rtol=0
    )


def test_replaying_the_frozen_model_gives_back_the_logits(setup):
    *_, rep = setup
    tc_inputs, final = rep.run(rep.embed[None], [w[None] for w in rep.clean_writes()])
    torch.testing.assert_close(final[0] @ rep.W_U + rep.b_U, rep.logits, atol=1e-10, rtol=0)
    for tc_in, layer in zip(tc_inputs, rep.layers, strict=True):
        torch.testing.assert_close(tc_in[0], layer.mlp_in, atol=1e-10, rtol=0)


def test_nodes_are_the_active_features_of_the_real_model(setup):
    model, tcs, graph, _ = setup
    with interp.sae.splice(model, tcs, use_error_term=True):
        _, cache = model.run_with_cache(TOKENS[None], names=[interp.sae.latent_hook(t) for t in tcs])
    expected = [
        (layer, pos, feat)
        for layer, tc in enumerate(tcs)
        for pos, feat in (cache[interp.sae.latent_hook(tc)][0] > 0).nonzero().tolist()
    ]
    got = [(n.layer, n.pos, n.feature) for n in graph.nodes if n.kind == "feature"]
    assert got == expected and len(got) > 20
    counts = {k: int(graph.kind_mask(k).sum()) for k in ("error", "token")}
    assert counts == {"error": 3 * len(TOKENS), "token": len(TOKENS)}


def test_incoming_edges_plus_bias_reconstruct_every_target(setup):
    _, _, graph, _ = setup
    targets = graph.kind_mask("feature") | graph.kind_mask("logit")
    recon = graph.adjacency.sum(1) + graph.bias
    torch.testing.assert_close(recon[targets], node_values(graph)[targets], atol=1e-9, rtol=0)


def test_logit_nodes_follow_circuit_tracers_rule(setup):
    _, _, graph, rep = setup
    probs = torch.softmax(rep.logits[-1], -1)
    order = probs.argsort(descending=True)
    cum = probs[order].cumsum(0)
    n = min(10, int((cum < 0.95).sum()) + 1)
    assert graph.logit_tokens == order[:n].tolist()
    torch.testing.assert_close(graph.logit_probs, probs[order[:n]])


def _frozen_gradient(rep, node) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """d(target value)/d(every node contribution) by autograd through the frozen forward: the
    gradient of ``node``'s value (its transcoder pre-activation, or its demeaned logit) with
    respect to the token embeddings and each layer's written output, at the clean point."""
    embed = rep.embed.clone().requires_grad_(True)
    writes = [w.clone().requires_grad_(True) for w in rep.clean_writes()]
    tc_inputs, final = rep.run(embed[None], [w[None] for w in writes])
    if node.kind == "logit":
        logits = final[0, -1] @ rep.W_U + rep.b_U
        value = logits[node.feature] - logits.mean()
    else:
        value = rep.layers[node.layer].transcoder.pre_acts(tc_inputs[node.layer][0, node.pos])[node.feature]
    g_embed, *g_writes = torch.autograd.grad(value, [embed, *writes], allow_unused=True)
    return g_embed, [torch.zeros_like(w) if g is None else g for w, g in zip(writes, g_writes, strict=True)]


def _gradient_edges(rep, graph, node) -> torch.Tensor:
    """Every source's edge into ``node`` as gradient . contribution (the frozen model is affine in
    the contributions): a token's embedding, an error vector, a feature's activation x decoder row."""
    g_embed, g_writes = _frozen_gradient(rep, node)
    row = torch.zeros(len(graph.nodes), dtype=torch.float64)
    for i, source in enumerate(graph.nodes):
        if source.kind == "token":
            row[i] = g_embed[source.pos] @ rep.embed[source.pos]
        elif source.kind == "error":
            row[i] = g_writes[source.layer][source.pos] @ rep.layers[source.layer].error[source.pos]
        elif source.kind == "feature":
            layer = rep.layers[source.layer]
            decoder = layer.transcoder.W_dec[source.feature].detach()
            row[i] = layer.acts[source.pos, source.feature] * (g_writes[source.layer][source.pos] @ decoder)
    return row


def test_each_edge_is_autograds_gradient_times_the_source(setup):
    """Whole rows of the adjacency (every source into a target) against autograd through the frozen
    replacement forward, independent of attribute's reverse pass and of the library's checks."""
    _, _, graph, rep = setup
    targets = (graph.kind_mask("feature") | graph.kind_mask("logit")).nonzero().flatten()
    picks = targets[torch.randperm(len(targets), generator=torch.Generator().manual_seed(1))[:12]].tolist()
    picks += graph.kind_mask("logit").nonzero().flatten()[:1].tolist()  # at least one logit
    for t in picks:
        expected = _gradient_edges(rep, graph, graph.nodes[t])
        torch.testing.assert_close(graph.adjacency[t].double(), expected, atol=1e-9, rtol=1e-7)
    assert graph.adjacency[picks].abs().max() > 0.1  # the rows compared carry real edges


@pytest.mark.parametrize("eps", [-1.0, 1e-3])
def test_each_edge_is_a_finite_difference_in_the_frozen_model(setup, eps):
    """The library's ``edge_check`` (scale one source by 1 + eps; -1 removes it, and re-run the frozen
    model) at removal and at a small step: the frozen model is affine, so both agree to rounding."""
    model, tcs, graph, _ = setup
    check = graphs.edge_check(model, tcs, graph, n_pairs=60, eps=eps, seed=1)
    assert check["n_pairs"] == 60 and check["max_edge"] > 0.1
    assert check["max_abs_error"] < 1e-9, check  # measured 5e-15 (eps -1) and 1e-11 (eps 1e-3)


def test_the_reverse_pass_is_autograds_backward(setup):
    """attribute's hand-written transpose pass against autograd through the frozen forward."""
    from interp.graphs.attribution import _Targets, reverse

    _, tcs, graph, rep = setup
    picks = [i for i, n in enumerate(graph.nodes) if n.kind in ("feature", "logit")][::7]
    nodes = [graph.nodes[i] for i in picks]
    vecs = []
    for n in nodes:
        if n.kind == "logit":
            vecs.append(rep.W_U[:, n.feature] - rep.W_U.mean(1))
        else:
            vecs.append(tcs[n.layer].W_enc[:, n.feature].detach())
    layers = torch.tensor([n.layer for n in nodes])
    positions = torch.tensor([n.pos for n in nodes])
    targets = _Targets(layers, positions, torch.stack(vecs))
    g_embed, g_writes = reverse(rep, targets)
    embed = torch.zeros(len(nodes), rep.n_pos, 32, dtype=torch.float64, requires_grad=True)
    writes = [torch.zeros_like(embed, requires_grad=True) for _ in rep.layers]
    tc_inputs, final = rep.run(embed, writes, with_bias=False)
    total = sum(
        (final if n.layer == rep.n_layers else tc_inputs[n.layer])[b, n.pos] @ vecs[b]
        for b, n in enumerate(nodes)
    )
    grads = torch.autograd.grad(total, [embed, *writes], allow_unused=True)
    torch.testing.assert_close(g_embed, grads[0], atol=1e-12, rtol=0)
    for mine, ref in zip(g_writes, grads[1:], strict=True):
        expected = torch.zeros_like(embed) if ref is None else ref
        torch.testing.assert_close(
            torch.zeros_like(embed) if mine is None else mine, expected, atol=1e-12, rtol=0
        )


def test_sources_never_follow_their_targets(setup):
    _, _, graph, _ = setup
    for t, s in graph.adjacency.nonzero().tolist():
        target, source = graph.nodes[t], graph.nodes[s]
        assert source.pos <= target.pos
        if target.kind == "feature" and source.kind in ("feature", "error"):
            assert source.layer < target.layer


def test_max_feature_nodes_keeps_a_consistent_subgraph(setup):
    model, tcs, graph, _ = setup
    small = graphs.attribute(model, tcs, TOKENS, max_feature_nodes=12, batch_size=5, progress=False)
    assert int(small.kind_mask("feature").sum()) == 12
    index = {(n.kind, n.layer, n.pos, n.feature): i for i, n in enumerate(graph.nodes)}
    rows = [index[(n.kind, n.layer, n.pos, n.feature)] for n in small.nodes]
    sub = graph.adjacency[rows][:, rows]
    feature_or_logit = small.kind_mask("feature") | small.kind_mask("logit")
    torch.testing.assert_close(small.adjacency[feature_or_logit], sub[feature_or_logit], atol=1e-10, rtol=0)
    # with 12 < update_interval * batch_size, one ranking picks them: circuit-tracer's partial
    # influence through the logit rows alone, i.e. probability-weighted normalized direct effects
    logit_rows = graph.adjacency[graph.kind_mask("logit")]
    first_hop = graph.logit_probs @ graphs.normalize_matrix(logit_rows)
    feats = graph.kind_mask("feature").nonzero().flatten()
    expected = {
        (graph.nodes[i].layer, graph.nodes[i].pos, graph.nodes[i].feature)
        for i in feats[first_hop[feats].argsort(descending=True)[:12]].tolist()
    }
    assert {(n.layer, n.pos, n.feature) for n in small.nodes if n.kind == "feature"} == expected


def test_batch_size_does_not_change_the_graph(setup):
    model, tcs, graph, _ = setup
    other = graphs.attribute(model, tcs, TOKENS, batch_size=7, progress=False)
    torch.testing.assert_close(other.adjacency, graph.adjacency, atol=1e-12, rtol=0)


def test_pruned_graph_scores_are_fractions(setup):
    _, _, graph, _ = setup
    pruned = graph.prune()
    assert 0 < len(pruned.nodes) < len(graph.nodes)
    for score in (graph.replacement_score(), graph.completeness_score(), pruned.completeness_score()):
        assert 0 < score <= 1


# --- interventions in the real model -----------------------------------------------------------------


def test_intervention_equals_adding_the_decoder_row_in_the_real_model(setup):
    model, tcs, graph, rep = setup
    node = next(n for n in graph.nodes if n.kind == "feature" and n.layer == 0)
    result = graphs.intervene(model, tcs, TOKENS, [(0, node.pos, node.feature, 0.0)])
    delta = -node.activation * tcs[0].W_dec[node.feature].detach()

    def edit(act, hook):
        out = act.clone()
        out[:, node.pos] += delta
        return out

    expected = model.run_with_hooks(TOKENS[None], [("blocks.0.hook_mlp_out", edit)])[0]
    torch.testing.assert_close(result.logits, expected, atol=1e-10, rtol=0)
    torch.testing.assert_close(result.clean_logits, rep.logits, atol=1e-10, rtol=0)
    # the edited layer keeps its other features; a later layer responds only from the edited position on
    assert result.activations[0][node.pos, node.feature] == 0
    others = torch.ones_like(result.activations[0], dtype=torch.bool)
    others[node.pos, node.feature] = False
    assert torch.equal(result.activations[0][others], result.clean_activations[0][others])
    changed = (result.activations[1] - result.clean_activations[1]).abs().sum(-1) > 0
    assert not changed[: node.pos].any() and changed[node.pos :].any()


def test_scaling_a_feature_by_one_changes_nothing(setup):
    model, tcs, graph, _ = setup
    node = next(n for n in graph.nodes if n.kind == "feature")
    result = graph.intervene(model, tcs, [(node.layer, node.pos, node.feature, 1.0)], mode="scale")
    torch.testing.assert_close(result.logits, result.clean_logits, atol=1e-12, rtol=0)


# --- bad input ----------------------------------------------------------------------------------------


def test_transcoders_that_do_not_fit_are_refused(setup):
    model, tcs, *_ = setup
    with pytest.raises(InputError, match="one transcoder per layer"):
        graphs.attribute(model, tcs[:1], TOKENS)
    with pytest.raises(InputError, match="in layer order"):
        graphs.attribute(model, tcs[::-1], TOKENS)
    wide = SAE(
        SAEConfig(
            d_in=16,
            d_sae=8,
            architecture="transcoder",
            hook_name="blocks.1.mlp.hook_in",
            hook_name_out="blocks.1.mlp.hook_out",
            dtype="float64",
            apply_b_dec_to_input=False,
        )
    )
    with pytest.raises(InputError, match="d_model is 32"):
        graphs.attribute(model, [tcs[0], wide, tcs[2]], TOKENS)
    sae = SAE(SAEConfig(d_in=32, d_sae=8, hook_name="blocks.1.mlp.hook_in", dtype="float64"))
    with pytest.raises(InputError, match="not a transcoder"):
        graphs.attribute(model, [tcs[0], sae, tcs[2]], TOKENS)


def test_prompts_longer_than_the_context_are_refused_before_work(setup):
    model, tcs, *_ = setup
    with pytest.raises(InputError, match="n_ctx=16"):
        graphs.attribute(model, tcs, torch.arange(17) % 20)
    with pytest.raises(InputError, match="no tokenizer"):
        graphs.attribute(model, tcs, "some text")


@pytest.mark.parametrize("cap", [0, -1, True])
def test_a_feature_cap_below_one_is_refused(setup, cap):
    """max_feature_nodes=0 used to give a graph with no features at all, silently."""
    model, tcs, *_ = setup
    with pytest.raises(InputError, match="max_feature_nodes must be a positive number"):
        graphs.attribute(model, tcs, torch.arange(6) % 20, max_feature_nodes=cap, progress=False)


@pytest.mark.parametrize("bad", [20, -3])
def test_token_ids_outside_the_vocabulary_are_refused(setup, bad):
    """attribute, intervene and qk_attribution all name the vocabulary (was torch's IndexError)."""
    model, tcs, *_ = setup
    prompt = torch.tensor([1, 5, bad, 3])
    with pytest.raises(InputError, match=r"outside the vocabulary \[0, 20\)"):
        graphs.attribute(model, tcs, prompt, progress=False)
    with pytest.raises(InputError, match="outside the vocabulary"):
        graphs.intervene(model, tcs, prompt, [(0, 0, 0, 1.0)])
    with pytest.raises(InputError, match="outside the vocabulary"):
        graphs.qk_attribution(model, tcs, prompt, layer=1, head=0, query=3, key=1)


def test_explicit_targets_take_numpy_and_torch_integers_but_not_bools(setup):
    """An id from a tensor or an array is an id (was refused as 'not a token id'); True is not."""
    import numpy as np

    model, tcs, *_ = setup
    graph = graphs.attribute(model, tcs, TOKENS, targets=[np.int64(3), torch.tensor(7)], progress=False)
    assert graph.logit_tokens == [3, 7]
    with pytest.raises(InputError, match="not a token id"):
        graphs.attribute(model, tcs, TOKENS, targets=[True], progress=False)


def test_a_graph_over_the_memory_budget_names_the_fix(setup):
    model, tcs, *_ = setup
    with pytest.raises(InputError, match="lower max_feature_nodes .* or raise memory_budget"):
        graphs.attribute(model, tcs, TOKENS, memory_budget=10_000, progress=False)


def test_multi_token_targets_are_refused(gpt2_dir):
    from transformers import AutoTokenizer

    model = tiny_model()
    model.tokenizer = AutoTokenizer.from_pretrained(gpt2_dir)  # word-level, 20 tokens
    tcs = tiny_transcoders()
    with pytest.raises(InputError, match="2 tokens"):
        graphs.attribute(model, tcs, "the cat sat on the", targets=["the mat"], progress=False)
    graph = graphs.attribute(model, tcs, "the cat sat on the", targets=["mat", "rug"], progress=False)
    expected = [model.tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in ("mat", "rug")]
    assert graph.logit_tokens == expected and graph.nodes[-2].label == "mat"


def test_models_without_mlp_decoders_are_refused(gpt2_model):
    induction = interp.load("zoo:induction-1l")
    with pytest.raises(InputError, match="attention-only"):
        graphs.attribute(induction, [], torch.tensor([1, 2, 3]))
    with pytest.raises(InputError, match="boot_native"):
        graphs.attribute(gpt2_model, [], torch.tensor([1, 2, 3]))


def test_encoder_only_models_are_refused(minilm):
    with pytest.raises(InputError, match="encoder-only"):
        graphs.attribute(minilm, [], "the cat sat")


def test_the_library_checks_pass_on_the_graph_and_catch_a_corrupted_one(setup):
    model, tcs, graph, _ = setup
    edges = graphs.edge_check(model, tcs, graph, n_pairs=30)
    assert edges["max_abs_error"] < 1e-9 and edges["max_edge"] > 0.1
    assert graphs.reconstruction_check(graph)["max_abs_error"] < 1e-9
    broken = graphs.Graph(
        adjacency=graph.adjacency * 1.01,
        nodes=graph.nodes,
        logit_probs=graph.logit_probs,
        prompt_tokens=graph.prompt_tokens,
        bias=graph.bias,
        metadata=graph.metadata,
    )
    assert graphs.edge_check(model, tcs, broken, n_pairs=30)["max_abs_error"] > 1e-3
    assert graphs.reconstruction_check(broken)["max_abs_error"] > 1e-3
    with pytest.raises(InputError, match="before prune"):
        graphs.reconstruction_check(graph.prune())


def test_float32_models_give_float32_graphs_that_reconstruct_to_rounding():
    from interp.progress import report_progress

    model, tcs = tiny_model(double=False), tiny_transcoders(dtype="float32")
    seen: list[float] = []
    with report_progress(lambda fraction, _desc: seen.append(fraction)):
        graph = graphs.attribute(model, tcs, TOKENS, progress=True)
    assert graph.adjacency.dtype == torch.float32 and seen and seen[-1] == 1.0
    check = graphs.reconstruction_check(graph)
    assert check["max_abs_error"] < 1e-4 * max(1.0, check["max_value"])
