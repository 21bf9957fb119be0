"""The attribution ``Graph``: nodes, the direct-effect adjacency, influence, pruning and scores.

Orientation and order follow circuit-tracer (``circuit_tracer/graph.py``, read for semantics, not
copied): ``adjacency[target, source]`` is the direct effect of ``source`` on ``target``; graphs
built by :func:`interp.graphs.attribute` order their nodes as circuit-tracer does — active features
(by layer, position, feature id), error nodes (layer-major, then position), token nodes (by
position), logit nodes (most probable first) — and any graph built with ``Graph.from_adjacency``
must at least put its logit nodes last.

What is matched, exactly (each checked on hand-built graphs in ``tests/test_graphs.py``):

- ``normalize``: ``|A|`` divided by its row sums (rows summing to 0 stay 0; clamp 1e-10).
- influence: ``w Â + w Â² + ...`` until the term is exactly zero (a DAG's ``Â`` is nilpotent),
  where ``w`` puts each logit node's probability on it and 0 elsewhere.
- ``node_influence()``: that influence on ``Â`` of the full graph.
- ``edge_influence()``: ``Â'[t, s] * (influence'(t) + w(t))`` where ``'`` is computed on the graph
  given (``prune`` passes the node-pruned matrix).
- threshold: sort scores descending, cumulative share; the cut is the first score whose cumulative
  share reaches the threshold (``searchsorted``, left), and every score ``>=`` it is kept.
- ``prune``: keep nodes by node influence, always keep tokens and logits; zero the dropped rows
  and columns; keep edges by the edge influence of that matrix; then repeatedly drop feature and
  error nodes with no kept outgoing edge and feature nodes with no kept incoming edge.
- ``replacement_score``: token influence / (token influence + error influence).
- ``completeness_score``: ``sum_t (1 - sum_{s error} Â[t,s]) (I(t) + w(t)) / sum_t (I(t) + w(t))``.

Two deliberate differences: edges into or out of a node dropped by node pruning are never kept
(circuit-tracer's first pass can keep such zero-score edges when an edge threshold lands on a zero
score, e.g. at 1.0); and a graph whose scores are all zero (nothing reaches the logits) would
make circuit-tracer divide by zero, while here the threshold is then +inf (no node is kept by
influence) instead of a NaN.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from interp.errors import InputError

NODE_KINDS = ("feature", "error", "token", "logit")


@dataclass
class Node:
    """One row of the node table.

    Attributes:
        kind: "feature", "error", "token" or "logit".
        layer: transcoder layer (features, errors); -1 for tokens; ``n_layers`` for logits.
        pos: token position.
        feature: feature id (features), vocabulary id (tokens, logits), -1 for errors.
        activation: feature activation; the node's value (demeaned logit for logits,
            norm of the error vector for errors, norm of the embedding for tokens).
        label: readable label (the token string, or ``"L{layer}/F{feature}@{pos}"``).
    """

    kind: str
    layer: int = -1
    pos: int = -1
    feature: int = -1
    activation: float = 0.0
    label: str = ""


def normalize_matrix(matrix: torch.Tensor) -> torch.Tensor:
    """``|A|`` row-normalized (each target's incoming weights sum to 1; empty rows stay 0)."""
    normalized = matrix.abs()
    return normalized / normalized.sum(dim=1, keepdim=True).clamp(min=1e-10)


def compute_influence(normalized: torch.Tensor, weights: torch.Tensor, max_iter: int = 1000) -> torch.Tensor:
    """``w Â + w Â² + ...``: the total (all-path) influence of each node on the weighted targets.

    Stops when a term is exactly zero (for an acyclic graph after at most its depth); a graph with
    a cycle never gets there, and raises after ``max_iter`` terms instead of returning a partial sum.
    """
    current = weights @ normalized
    influence = current.clone()
    for _ in range(max_iter):
        if not current.any():
            return influence
        current = current @ normalized
        influence += current
    raise InputError(
        f"influence did not converge in {max_iter} terms: the adjacency has a cycle. An attribution "
        "graph is acyclic (sources precede targets); check the matrix (A[target, source])."
    )


def find_threshold(scores: torch.Tensor, threshold: float) -> float:
    """The smallest score to keep so that the kept scores hold ``threshold`` of the total."""
    ordered = torch.sort(scores.flatten(), descending=True).values
    total = ordered.sum()
    if total <= 0:
        return float("inf")
    cumulative = torch.cumsum(ordered, dim=0) / total
    index = int(torch.searchsorted(cumulative, torch.tensor(threshold, dtype=cumulative.dtype)))
    return float(ordered[min(index, len(ordered) - 1)])


@dataclass
class PruneResult:
    """Masks over the full graph's nodes and edges, and each node's cumulative influence share."""

    node_mask: torch.Tensor
    edge_mask: torch.Tensor
    cumulative_scores: torch.Tensor


def _check_threshold(name: str, value: float) -> None:
    if not 0.0 <= float(value) <= 1.0:
        raise InputError(f"{name}={value} must be between 0 and 1 (a share of the total influence)")


@dataclass
class Graph:
    """An attribution graph: ``adjacency[target, source]`` over ``nodes``, logit nodes last.

    Built by :func:`interp.graphs.attribute` (with the prompt, the model's metadata and the
    per-target ``bias`` that, with the incoming edges, reconstructs each target's value), or from
    any raw matrix by :meth:`from_adjacency`.
    """

    adjacency: torch.Tensor
    nodes: list[Node]
    logit_probs: torch.Tensor
    logit_tokens: list[int] = field(default_factory=list)
    prompt_tokens: list[int] = field(default_factory=list)
    prompt_str_tokens: list[str] = field(default_factory=list)
    bias: torch.Tensor | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    prune_result: PruneResult | None = None

    def __post_init__(self) -> None:
        n = len(self.nodes)
        if self.adjacency.ndim != 2 or tuple(self.adjacency.shape) != (n, n):
            raise InputError(
                f"adjacency must be square [n_nodes, n_nodes] = [{n}, {n}], got {tuple(self.adjacency.shape)}"
            )
        kinds = [node.kind for node in self.nodes]
        unknown = sorted(set(kinds) - set(NODE_KINDS))
        if unknown:
            raise InputError(f"unknown node kinds {unknown}; use {list(NODE_KINDS)}")
        n_logits = kinds.count("logit")
        if n_logits == 0 or any(k != "logit" for k in kinds[n - n_logits :]):
            raise InputError(
                "logit nodes must come last (circuit-tracer's order), and there must be at least one"
            )
        if len(self.logit_probs) != n_logits:
            raise InputError(f"logit_probs has {len(self.logit_probs)} entries for {n_logits} logit nodes")

    # --- construction -------------------------------------------------------------------------

    @classmethod
    def from_adjacency(cls, adjacency: Any, node_kinds: Sequence[str], logit_probs: Any, **kw: Any) -> Graph:
        """A graph from a raw ``A[target, source]`` matrix, node kinds (logits last) and the logit
        nodes' probabilities, so influence and pruning can be checked on hand-built graphs."""
        a = torch.as_tensor(adjacency, dtype=torch.float64 if not torch.is_tensor(adjacency) else None)
        nodes = [Node(kind=str(k), label=f"{k}{i}") for i, k in enumerate(node_kinds)]
        probs = torch.as_tensor(logit_probs, dtype=a.dtype)
        return cls(adjacency=a, nodes=nodes, logit_probs=probs, **kw)

    # --- masks --------------------------------------------------------------------------------

    def kind_mask(self, kind: str) -> torch.Tensor:
        """Boolean mask of the nodes of one kind."""
        return torch.tensor([node.kind == kind for node in self.nodes], dtype=torch.bool)

    @property
    def n_logits(self) -> int:
        return len(self.logit_probs)

    def logit_weights(self) -> torch.Tensor:
        """``w``: each logit node's probability on it, 0 on every other node."""
        w = torch.zeros(len(self.nodes), dtype=self.adjacency.dtype)
        w[-self.n_logits :] = self.logit_probs.to(w.dtype)
        return w

    # --- influence ----------------------------------------------------------------------------

    def node_influence(self) -> torch.Tensor:
        """Each node's total influence on the logits, weighted by their probabilities."""
        return compute_influence(normalize_matrix(self.adjacency), self.logit_weights())

    def edge_influence(self, adjacency: torch.Tensor | None = None) -> torch.Tensor:
        """``[target, source]`` edge scores: ``Â[t, s] * (influence(t) + w(t))`` on ``adjacency``
        (default this graph's)."""
        a = self.adjacency if adjacency is None else adjacency
        normalized = normalize_matrix(a)
        w = self.logit_weights()
        influence = compute_influence(normalized, w) + w
        return normalized * influence[:, None]

    def prune_masks(self, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> PruneResult:
        """circuit-tracer's ``prune_graph``: node and edge masks over this graph (see module docs)."""
        _check_threshold("node_threshold", node_threshold)
        _check_threshold("edge_threshold", edge_threshold)
        influence = self.node_influence()
        always = self.kind_mask("token") | self.kind_mask("logit")
        feature, error = self.kind_mask("feature"), self.kind_mask("error")
        node_mask = (influence >= find_threshold(influence, node_threshold)) | always
        pruned = self.adjacency.clone()
        pruned[~node_mask] = 0
        pruned[:, ~node_mask] = 0
        scores = self.edge_influence(pruned)
        edge_mask = scores >= find_threshold(scores, edge_threshold)
        needs_out = feature | error
        while True:
            before = node_mask.clone()
            edge_mask[~node_mask] = False
            edge_mask[:, ~node_mask] = False
            node_mask &= ~needs_out | edge_mask.any(0)
            node_mask &= ~feature | edge_mask.any(1)
            if torch.equal(node_mask, before):
                break
        edge_mask[~node_mask] = False
        edge_mask[:, ~node_mask] = False
        order = torch.sort(influence, descending=True)
        total = order.values.sum()
        cumulative = torch.zeros_like(influence)
        if total > 0:
            cumulative[order.indices] = torch.cumsum(order.values, 0) / total
        return PruneResult(node_mask, edge_mask, cumulative)

    def prune(self, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> Graph:
        """The subgraph of kept nodes, with only the kept edges (others zero). Its ``prune_result``
        holds the masks over this (full) graph and the cumulative influence of every node."""
        result = self.prune_masks(node_threshold, edge_threshold)
        keep = result.node_mask.nonzero().flatten()
        kept = (self.adjacency * result.edge_mask)[keep][:, keep]
        meta = dict(self.metadata, node_threshold=node_threshold, edge_threshold=edge_threshold)
        meta["cumulative_influence"] = result.cumulative_scores[keep].tolist()
        return Graph(
            adjacency=kept,
            nodes=[self.nodes[i] for i in keep.tolist()],
            logit_probs=self.logit_probs,
            logit_tokens=list(self.logit_tokens),
            prompt_tokens=list(self.prompt_tokens),
            prompt_str_tokens=list(self.prompt_str_tokens),
            bias=None if self.bias is None else self.bias[keep],
            metadata=meta,
            prune_result=result,
        )

    # --- scores -------------------------------------------------------------------------------

    def replacement_score(self) -> float:
        """Share of the token→logit influence that does not end at an error node
        (circuit-tracer's ``compute_graph_scores``: token influence / (token + error influence))."""
        influence = self.node_influence()
        token = influence[self.kind_mask("token")].sum()
        error = influence[self.kind_mask("error")].sum()
        return float(token / (token + error)) if token + error > 0 else 0.0

    def completeness_score(self) -> float:
        """Influence-weighted share of each node's (normalized) inputs that are not error nodes."""
        normalized = normalize_matrix(self.adjacency)
        w = self.logit_weights()
        out = compute_influence(normalized, w) + w
        non_error = 1 - normalized[:, self.kind_mask("error")].sum(dim=-1)
        return float((non_error * out).sum() / out.sum()) if out.sum() > 0 else 0.0

    # --- views --------------------------------------------------------------------------------

    def top_features(self, n: int = 10) -> list[tuple[Node, float]]:
        """The ``n`` feature nodes of largest influence on the logits, with their influence."""
        influence = self.node_influence()
        index = self.kind_mask("feature").nonzero().flatten()
        order = index[influence[index].argsort(descending=True)][:n]
        return [(self.nodes[i], float(influence[i])) for i in order.tolist()]

    def node_table(self) -> list[dict[str, Any]]:
        """The nodes as plain dicts (kind, layer, pos, feature, activation, label)."""
        return [vars(node).copy() for node in self.nodes]

    def to_neuronpedia(self, path: Any = None, **kw: Any) -> dict[str, Any]:
        """Neuronpedia's attribution-graph JSON (see :mod:`interp.graphs.neuronpedia`)."""
        from interp.graphs.neuronpedia import to_neuronpedia

        return to_neuronpedia(self, path, **kw)

    def intervene(
        self, model: Any, transcoders: Sequence[Any], interventions: Sequence[tuple], **kw: Any
    ) -> Any:
        """Run the real model with feature activations set or scaled on this graph's prompt
        (see :func:`interp.graphs.intervene`)."""
        from interp.graphs.intervention import intervene

        return intervene(model, transcoders, self.prompt_tokens, interventions, **kw)

    def __repr__(self) -> str:
        counts = {k: int(self.kind_mask(k).sum()) for k in NODE_KINDS}
        return f"Graph({len(self.nodes)} nodes: {counts})"
