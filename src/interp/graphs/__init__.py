"""Attribution graphs: circuit tracing with transcoders (Ameisen et al. 2025; circuit-tracer).

>>> from interp import graphs
>>> graph = graphs.attribute(model, transcoders, prompt)        # one transcoder per layer
>>> pruned = graph.prune(node_threshold=0.8, edge_threshold=0.98)
>>> pruned.replacement_score(), pruned.completeness_score()
>>> graph.to_neuronpedia("graph.json")                          # Neuronpedia's graph JSON
>>> graphs.intervene(model, transcoders, prompt, [(layer, pos, feature, 0.0)])   # real model
>>> graphs.qk_attribution(model, transcoders, prompt, layer=1, head=0, query=7, key=3)
>>> graphs.edge_check(model, transcoders, graph), graphs.reconstruction_check(graph)  # exactness

Layering: above ``interp.sae`` and ``interp.models``, below the viz/app layer (no streamlit).
"""

from __future__ import annotations

from interp.graphs.attribution import attribute, salient_logits
from interp.graphs.checks import edge_check, reconstruction_check
from interp.graphs.graph import Graph, Node, PruneResult, compute_influence, find_threshold, normalize_matrix
from interp.graphs.intervention import InterventionResult, intervene
from interp.graphs.qk import QKAttribution, qk_attribution
from interp.graphs.replacement import Replacement, record

__all__ = [
    "Graph",
    "InterventionResult",
    "Node",
    "PruneResult",
    "QKAttribution",
    "Replacement",
    "attribute",
    "compute_influence",
    "edge_check",
    "find_threshold",
    "intervene",
    "normalize_matrix",
    "qk_attribution",
    "reconstruction_check",
    "record",
    "salient_logits",
]
