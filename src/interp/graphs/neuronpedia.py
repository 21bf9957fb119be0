"""Neuronpedia's attribution-graph JSON: ``metadata``, ``qParams``, ``nodes``, ``links``.

The format is Neuronpedia's published schema ("Anthropic Attribution Graph" 1.0.0,
``apps/webapp/app/api/graph/graph-schema.json`` in hijohnnylin/neuronpedia), which circuit-tracer's
``create_graph_files`` writes. ``SCHEMA`` below restates its required structure (keys, types,
required fields) so a test can validate exports with ``jsonschema``.

Node ids follow circuit-tracer: feature ``"{layer}_{feature}_{pos}"``, token ``"E_{token}_{pos}"``,
logit ``"{n_layers + 1}_{token}_{pos}"``. One deliberate difference: circuit-tracer names an error
node ``"0_{layer}_{pos}"``, which is the id of layer-0 feature ``layer`` at the same position (two
nodes would merge in the viewer); here it is ``"err_{layer}_{pos}"``. ``influence`` is each node's
cumulative influence share (what the viewer's dynamic pruning reads), ``activation`` the feature
activation.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from interp.graphs.graph import Graph, Node

FEATURE_TYPES = {
    "feature": "cross layer transcoder",
    "error": "mlp reconstruction error",
    "token": "embedding",
    "logit": "logit",
}

_STR_ARRAY = {"type": "array", "items": {"type": "string"}}
SCHEMA: dict[str, Any] = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "title": "Neuronpedia attribution graph (required structure of graph-schema.json 1.0.0)",
    "type": "object",
    "required": ["metadata", "qParams", "nodes", "links"],
    "properties": {
        "metadata": {
            "type": "object",
            "required": ["slug", "scan", "prompt_tokens", "prompt"],
            "properties": {
                "slug": {"type": "string"},
                "scan": {"type": "string"},
                "prompt_tokens": _STR_ARRAY,
                "prompt": {"type": "string"},
                "node_threshold": {"type": "number"},
                "info": {"type": "object"},
                "generation_settings": {"type": "object"},
                "pruning_settings": {"type": "object"},
            },
        },
        "qParams": {
            "type": "object",
            "properties": {
                "pinnedIds": _STR_ARRAY,
                "supernodes": {"type": "array"},
                "linkType": {"type": "string"},
                "clickedId": {"type": "string"},
                "sg_pos": {"type": "string"},
            },
        },
        "nodes": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["node_id", "feature", "layer", "ctx_idx", "feature_type", "jsNodeId", "clerp"],
                "properties": {
                    "node_id": {"type": "string"},
                    "feature": {"type": ["integer", "null"]},
                    "layer": {"type": ["string", "integer"]},
                    "ctx_idx": {"type": "integer"},
                    "feature_type": {"type": "string"},
                    "jsNodeId": {"type": "string"},
                    "clerp": {"type": "string"},
                    "influence": {"type": ["number", "null"]},
                    "activation": {"type": ["number", "null"]},
                },
            },
        },
        "links": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["source", "target", "weight"],
                "properties": {
                    "source": {"type": "string"},
                    "target": {"type": "string"},
                    "weight": {"type": "number"},
                },
            },
        },
    },
}


def process_token(token: str) -> str:
    """Newlines, tabs and carriage returns shown as visible symbols (as circuit-tracer does)."""
    return token.replace("\n", "⏎").replace("\t", "→").replace("\r", "↵")


def node_id(node: Node, n_layers: int) -> str:
    """The node's id in the JSON (see the module docstring)."""
    if node.kind == "feature":
        return f"{node.layer}_{node.feature}_{node.pos}"
    if node.kind == "error":
        return f"err_{node.layer}_{node.pos}"
    if node.kind == "token":
        return f"E_{node.feature}_{node.pos}"
    return f"{n_layers + 1}_{node.feature}_{node.pos}"


def _node_json(
    node: Node, n_layers: int, influence: float, prob: float | None, first_logit: bool
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "node_id": node_id(node, n_layers),
        "feature": node.feature,
        "layer": str(node.layer),
        "ctx_idx": node.pos,
        "feature_type": FEATURE_TYPES[node.kind],
        "jsNodeId": "",
        "clerp": "",
        "influence": influence,
        "activation": node.activation if node.kind == "feature" else None,
        "token_prob": 0.0,
        "is_target_logit": False,
        "reverse_ctx_idx": 0,
    }
    if node.kind == "feature":
        out["jsNodeId"] = f"{node.layer}_{node.feature}-0"
    elif node.kind == "error":
        out["feature"] = -1
        out["jsNodeId"] = f"{node.layer}_{node.pos}-0"
    elif node.kind == "token":
        out["layer"] = "E"
        out["feature"] = node.pos
        out["jsNodeId"] = f"E_{node.feature}-{node.pos}"
        out["clerp"] = process_token(node.label)
    else:
        out["layer"] = str(n_layers + 1)
        out["jsNodeId"] = f"L_{node.feature}-{node.pos}"
        out["token_prob"] = float(prob or 0.0)
        out["is_target_logit"] = first_logit
        out["clerp"] = f'Output "{process_token(node.label)}" (p={float(prob or 0.0):.3f})'
    return out


def to_neuronpedia(
    graph: Graph,
    path: Any = None,
    *,
    slug: str = "interp-graph",
    scan: str | None = None,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
) -> dict[str, Any]:
    """The graph, pruned with the thresholds (unless it already is), as Neuronpedia's JSON; written
    to ``path`` when given. Returns the dict."""
    pruned = graph if graph.prune_result is not None else graph.prune(node_threshold, edge_threshold)
    n_layers = int(graph.metadata.get("n_layers", max((n.layer for n in graph.nodes), default=0)))
    influence = pruned.metadata.get("cumulative_influence") or [None] * len(pruned.nodes)
    logit_start = len(pruned.nodes) - pruned.n_logits
    nodes = [
        _node_json(
            node,
            n_layers,
            influence[i],
            float(pruned.logit_probs[i - logit_start]) if i >= logit_start else None,
            i == logit_start,
        )
        for i, node in enumerate(pruned.nodes)
    ]
    ids = [n["node_id"] for n in nodes]
    targets, sources = pruned.adjacency.nonzero(as_tuple=True)
    links = [
        {"source": ids[s], "target": ids[t], "weight": float(pruned.adjacency[t, s])}
        for t, s in zip(targets.tolist(), sources.tolist(), strict=True)
    ]
    settings = dict(graph.metadata.get("generation_settings", {}))
    prompt_tokens = [process_token(t) for t in graph.prompt_str_tokens]
    out = {
        "metadata": {
            "slug": slug,
            "scan": scan or str(graph.metadata.get("model", "interp-model")),
            "transcoder_list": [str(t) for t in graph.metadata.get("transcoders", [])],
            "prompt_tokens": prompt_tokens,
            "prompt": "".join(graph.prompt_str_tokens),
            "node_threshold": float(pruned.metadata.get("node_threshold", node_threshold)),
            "info": {
                "generator": {
                    "name": "interp.graphs",
                    "url": "https://github.com/safety-research/circuit-tracer",
                }
            },
            "generation_settings": {k: v for k, v in settings.items() if v is not None},
            "pruning_settings": {
                "node_threshold": float(pruned.metadata.get("node_threshold", node_threshold)),
                "edge_threshold": float(pruned.metadata.get("edge_threshold", edge_threshold)),
            },
        },
        "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
        "nodes": nodes,
        "links": links,
    }
    if path is not None:
        Path(path).write_text(json.dumps(out, indent=1))
    return out
