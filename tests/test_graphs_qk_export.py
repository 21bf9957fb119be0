"""QK attribution (exact bilinear split of one attention score; the induction head's K-composition)
and the Neuronpedia JSON export (validated against the published schema's required structure)."""

from __future__ import annotations

import json

import pytest
import torch
from test_graphs_attribution import TOKENS, tiny_model, tiny_transcoders

import interp
from interp import graphs
from interp.errors import InputError
from interp.graphs.neuronpedia import SCHEMA
from interp.graphs.qk import qk_attribution


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(), tiny_transcoders()


@pytest.mark.parametrize("with_transcoders", [True, False])
def test_pair_terms_sum_to_the_models_attention_score(tiny, with_transcoders):
    model, tcs = tiny
    names = [f"blocks.{i}.attn.{h}" for i in (1, 2) for h in ("hook_attn_scores", "hook_pattern")]
    _, cache = model.run_with_cache(TOKENS[None], names=names)
    for layer, head, query, key in [(1, 2, 6, 3), (1, 0, 7, 7), (2, 3, 4, 0), (2, 1, 7, 5)]:
        result = qk_attribution(
            model, tcs if with_transcoders else None, TOKENS, layer=layer, head=head, query=query, key=key
        )
        expected = cache[f"blocks.{layer}.attn.hook_attn_scores"][0, head, query, key].item()
        assert result.scores.sum().item() == pytest.approx(expected, abs=1e-9)
        assert result.score == pytest.approx(expected, abs=1e-9)
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"][0, head, query, key].item()
        assert result.pattern == pytest.approx(pattern, abs=1e-12)
        if with_transcoders and layer == 2:  # features, errors and the skip term of both layers below
            labels = set(result.query_labels)
            assert {"err L0", "err L1", "skip L1"} <= labels and any(lb.startswith("L1/F") for lb in labels)


def test_removing_a_query_component_changes_the_score_by_its_row(tiny):
    """Bilinearity by hand: drop one component from the query's stream (LN scale frozen) and
    recompute q·k; the change is that component's row sum."""
    model, tcs = tiny
    result = qk_attribution(model, tcs, TOKENS, layer=1, head=1, query=6, key=2)
    rep = graphs.record(model, tcs, TOKENS)
    layer = rep.layers[1]
    x = layer.resid_pre
    core = model.bridge.original_model
    from interp.graphs.replacement import unwrap

    attn = unwrap(unwrap(core.layers[1]).attn)
    w_q = unwrap(attn.q).weight.view(4, 8, 32)[1]
    b_q = unwrap(attn.q).bias.view(4, 8)[1]
    k_vec = layer.ln1(x)[2] @ unwrap(attn.k).weight.view(4, 8, 32)[1].T + unwrap(attn.k).bias.view(4, 8)[1]
    feature = next(i for i, label in enumerate(result.query_labels) if label.startswith("L0/F"))
    name = result.query_labels[feature]
    f = int(name.split("/F")[1].split("@")[0])
    removed = x[6] - rep.layers[0].acts[6, f] * tcs[0].W_dec[f].detach()
    centred = removed - removed.mean()
    q_vec = centred / layer.ln1.scale[6] * layer.ln1.weight + layer.ln1.bias
    score = float(((q_vec @ w_q.T + b_q) @ k_vec / attn.scale).detach())
    assert score == pytest.approx(result.score - result.scores[feature].sum().item(), abs=1e-9)


def test_the_induction_head_reads_the_previous_token_head_on_the_key_side():
    """zoo:induction-2l on [BOS, r, r]: for the layer-1 induction head, the largest pair term is the
    query's own token against the key-side output of the layer-0 previous-token head (K-composition)."""
    from interp.models.zoo.induction import head_scores, repeated_tokens

    model = interp.load("zoo:induction-2l")
    tokens = repeated_tokens(1, 10, 64, seed=3)[0]
    _, cache = model.run_with_cache(tokens[None], names="blocks.*.attn.hook_pattern")
    patterns = torch.stack([cache[f"blocks.{i}.attn.hook_pattern"] for i in range(2)])
    induction, previous = head_scores(patterns, 10)
    head, prev_head = int(induction[1].argmax()), int(previous[0].argmax())
    query = 15
    result = qk_attribution(model, None, tokens, layer=1, head=head, query=query, key=query - 10 + 1)
    q_label, k_label, term = result.top(1)[0]
    assert (q_label, k_label) == (f"token@{query}", f"L0H{prev_head}") and term > 0
    key_totals = result.key_totals()
    assert max(key_totals, key=lambda k: key_totals[k]) == f"L0H{prev_head}"


def test_qk_bad_input(tiny):
    model, tcs = tiny
    with pytest.raises(InputError, match="key <= query"):
        qk_attribution(model, tcs, TOKENS, layer=1, head=0, query=2, key=5)
    with pytest.raises(InputError, match="out of range"):
        qk_attribution(model, tcs, TOKENS, layer=3, head=0, query=2, key=1)


def test_neuronpedia_export_validates_against_the_schema(tiny, tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    model, tcs = tiny
    graph = graphs.attribute(model, tcs, TOKENS, progress=False)
    path = tmp_path / "graph.json"
    data = graph.to_neuronpedia(path, slug="tiny")
    jsonschema.validate(json.loads(path.read_text()), SCHEMA)
    pruned = graph.prune()
    ids = [n["node_id"] for n in data["nodes"]]
    assert len(ids) == len(set(ids)) == len(pruned.nodes)
    assert len(data["links"]) == int((pruned.adjacency != 0).sum())
    by_id = {n["node_id"]: n for n in data["nodes"]}
    assert {link["source"] for link in data["links"]} | {link["target"] for link in data["links"]} <= set(
        by_id
    )
    kinds = {n["feature_type"] for n in data["nodes"]}
    assert {"embedding", "logit"} <= kinds
    logit = next(n for n in data["nodes"] if n["is_target_logit"])
    assert logit["token_prob"] == pytest.approx(float(graph.logit_probs[0]))
    assert data["metadata"]["prompt_tokens"] == [str(t) for t in TOKENS.tolist()]
    # link weights are the adjacency entries: check one feature -> logit edge
    link = max(data["links"], key=lambda x: abs(x["weight"]))
    src = next(i for i, n in enumerate(data["nodes"]) if n["node_id"] == link["source"])
    tgt = next(i for i, n in enumerate(data["nodes"]) if n["node_id"] == link["target"])
    assert pruned.adjacency[tgt, src].item() == pytest.approx(link["weight"])


def test_schema_rejects_a_broken_export(tiny):
    jsonschema = pytest.importorskip("jsonschema")
    model, tcs = tiny
    data = graphs.attribute(model, tcs, TOKENS, progress=False).to_neuronpedia()
    del data["nodes"][0]["jsNodeId"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(data, SCHEMA)


@pytest.mark.parametrize(
    "overrides",
    [
        {"positional_embedding_type": "rotary"},
        {"normalization_type": "RMS"},
        {"n_key_value_heads": 2},
    ],
    ids=["rotary", "rmsnorm", "gqa"],
)
def test_other_native_architectures_are_exact(overrides):
    """Rotary positions, RMSNorm and grouped-query attention: the recorded forward is the bridge's,
    edges + bias reconstruct every target, and QK pair terms sum to the model's score.

    TL's native RMSNorm computes in float32 even in a float64 model, so the real values carry
    float32 rounding that the (float64) frozen linear map does not: there the tolerance is 1e-5."""
    model, tcs = tiny_model(**overrides), tiny_transcoders()
    _, cache = model.run_with_cache(TOKENS[None], names=["blocks.2.attn.hook_attn_scores"])
    logits = model(TOKENS[None])[0]
    graph = graphs.attribute(model, tcs, TOKENS, progress=False)
    torch.testing.assert_close(graphs.record(model, tcs, TOKENS).logits, logits, atol=1e-10, rtol=0)
    targets = graph.kind_mask("feature") | graph.kind_mask("logit")
    values = torch.tensor([n.activation for n in graph.nodes], dtype=torch.float64)
    recon = graph.adjacency.sum(1) + graph.bias
    tol = 1e-5 if overrides.get("normalization_type") == "RMS" else 1e-9
    torch.testing.assert_close(recon[targets], values[targets], atol=tol, rtol=0)
    result = qk_attribution(model, tcs, TOKENS, layer=2, head=3, query=7, key=2)
    expected = cache["blocks.2.attn.hook_attn_scores"][0, 3, 7, 2].item()
    assert result.scores.sum().item() == pytest.approx(expected, abs=tol)
