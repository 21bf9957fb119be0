"""Influence, pruning and scores on hand-built graphs, against values computed by hand.

The graph (A[target, source], logits last, circuit-tracer's orientation):

    nodes: f0 f1 e0 t0 t1 L0 L1         logit probabilities L0 = 0.6, L1 = 0.3
    f0 <- t0: 3,  f0 <- t1: -1
    f1 <- f0: 2,  f1 <- e0: 2
    L0 <- f1: 1,  L0 <- t1: 3
    L1 <- f0: -4

Row-normalized |A|: f0 (t0 .75, t1 .25); f1 (f0 .5, e0 .5); L0 (f1 .25, t1 .75); L1 (f0 1).
Influence = wÂ + wÂ² + wÂ³ with w = (0, 0, 0, 0, 0, .6, .3):
    wÂ   : f1 .15, t1 .45, f0 .3
    wÂ²  : f0 .075, e0 .075, t0 .225, t1 .075
    wÂ³  : t0 .05625, t1 .01875
    total: f0 .375, f1 .15, e0 .075, t0 .28125, t1 .54375, logits 0.
Replacement: tokens .825 / (.825 + errors .075) = 11/12.
Completeness: only f1 has an error input (share .5); out = influence + w sums to 2.325,
    so (2.325 - .5 * .15) / 2.325 = 2.25 / 2.325.
Node pruning at 0.8: sorted t1 .54375, f0 .375, t0 .28125, f1 .15, e0 .075 (total 1.425);
    cumulative .382, .645, .842 -> the cut is t0's score; f1 and e0 go.
Edges on the node-pruned matrix: normalized f0 (t0 .75, t1 .25), L0 (t1 1), L1 (f0 1);
    influence' + w: f0 .3, t0 .225, t1 .675, L0 .6, L1 .3;
    edge scores: L0<-t1 .6, L1<-f0 .3, f0<-t0 .225, f0<-t1 .075 (total 1.2; cumulative .5, .75, .9375, 1).
"""

from __future__ import annotations

import pytest
import torch

from interp.errors import InputError
from interp.graphs import Graph

KINDS = ["feature", "feature", "error", "token", "token", "logit", "logit"]
F0, F1, E0, T0, T1, L0, L1 = range(7)


def hand_graph() -> Graph:
    a = torch.zeros(7, 7, dtype=torch.float64)
    a[F0, T0], a[F0, T1] = 3, -1
    a[F1, F0], a[F1, E0] = 2, 2
    a[L0, F1], a[L0, T1] = 1, 3
    a[L1, F0] = -4
    return Graph.from_adjacency(a, KINDS, [0.6, 0.3])


def test_node_influence_matches_the_hand_power_series():
    expected = torch.tensor([0.375, 0.15, 0.075, 0.28125, 0.54375, 0, 0], dtype=torch.float64)
    torch.testing.assert_close(hand_graph().node_influence(), expected)


def test_edge_influence_is_normalized_edge_times_target_influence():
    g = hand_graph()
    scores = g.edge_influence()
    # f1 <- f0: Â .5 times (influence(f1) .15 + w 0); L0 <- t1: .75 * (0 + .6)
    assert scores[F1, F0].item() == pytest.approx(0.075)
    assert scores[L0, T1].item() == pytest.approx(0.45)
    assert scores[L1, F0].item() == pytest.approx(0.3)
    assert scores[T0].abs().sum() == 0  # tokens have no inputs


def test_scores_match_the_hand_values():
    g = hand_graph()
    assert g.replacement_score() == pytest.approx(11 / 12)
    assert g.completeness_score() == pytest.approx(2.25 / 2.325)


def test_prune_keeps_nodes_to_the_cumulative_threshold_then_edges():
    g = hand_graph()
    result = g.prune_masks(node_threshold=0.8, edge_threshold=0.98)
    assert result.node_mask.tolist() == [True, False, False, True, True, True, True]
    kept_edges = {tuple(e) for e in result.edge_mask.nonzero().tolist()}
    assert kept_edges == {(F0, T0), (F0, T1), (L0, T1), (L1, F0)}
    pruned = g.prune(0.8, 0.98)
    assert [n.label for n in pruned.nodes] == ["feature0", "token3", "token4", "logit5", "logit6"]
    assert pruned.adjacency[0, 1].item() == 3 and pruned.adjacency[4, 0].item() == -4


def test_edge_threshold_drops_the_smallest_edges():
    result = hand_graph().prune_masks(node_threshold=0.8, edge_threshold=0.9)
    kept = {tuple(e) for e in result.edge_mask.nonzero().tolist()}
    assert kept == {(F0, T0), (L0, T1), (L1, F0)}  # .075 (f0 <- t1) is past the .9375 mark


def test_a_feature_whose_outgoing_edges_are_pruned_is_dropped():
    # at 0.5 only L0 <- t1 (.6 of 1.2) survives: f0 loses its edge to L1 and goes, tokens stay
    result = hand_graph().prune_masks(node_threshold=0.8, edge_threshold=0.5)
    assert result.node_mask.tolist() == [False, False, False, True, True, True, True]
    assert result.edge_mask.nonzero().tolist() == [[L0, T1]]


def test_top_features_rank_features_by_influence():
    top = hand_graph().top_features(5)
    assert [(node.label, round(value, 6)) for node, value in top] == [("feature0", 0.375), ("feature1", 0.15)]


def test_cumulative_scores_are_the_sorted_running_share():
    result = hand_graph().prune_masks()
    total = 1.425
    assert result.cumulative_scores[T1].item() == pytest.approx(0.54375 / total)
    assert result.cumulative_scores[F0].item() == pytest.approx((0.54375 + 0.375) / total)
    assert result.cumulative_scores[E0].item() == pytest.approx(1.0)


def test_chain_influence_multiplies_along_the_path():
    # t -> f0 -> f1 -> L with single inputs: every normalized edge is 1, so each node gets the full
    # probability once per path; a parallel error into f1 halves what flows back through it.
    a = torch.zeros(5, 5, dtype=torch.float64)
    a[1, 0], a[2, 1], a[4, 2] = 5.0, -2.0, 0.5  # f0 <- t, f1 <- f0, L <- f1
    a[2, 3] = 2.0  # f1 <- err: |2| vs |-2|
    g = Graph.from_adjacency(a, ["token", "feature", "feature", "error", "logit"], [0.5])
    torch.testing.assert_close(
        g.node_influence(), torch.tensor([0.25, 0.25, 0.5, 0.25, 0], dtype=torch.float64)
    )
    assert g.replacement_score() == pytest.approx(0.5)


def test_bad_graphs_are_refused():
    a = torch.zeros(3, 3)
    with pytest.raises(InputError, match="logit nodes must come last"):
        Graph.from_adjacency(a, ["logit", "feature", "token"], [1.0])
    with pytest.raises(InputError, match="logit_probs"):
        Graph.from_adjacency(a, ["token", "feature", "logit"], [0.5, 0.5])
    with pytest.raises(InputError, match="square"):
        Graph.from_adjacency(torch.zeros(3, 2), ["token", "feature", "logit"], [1.0])
    cyclic = torch.zeros(3, 3)
    cyclic[0, 1] = cyclic[1, 0] = 1.0
    cyclic[2, 0] = 1.0
    with pytest.raises(InputError, match="cycle"):
        Graph.from_adjacency(cyclic, ["feature", "feature", "logit"], [1.0]).node_influence()
    with pytest.raises(InputError, match="between 0 and 1"):
        hand_graph().prune(node_threshold=1.5)
