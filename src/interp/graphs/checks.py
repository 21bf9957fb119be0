"""Exactness checks of an attribution graph against interventions (issue 19, item 4), as numbers
for a report table (``interp reproduce circuits``):

- ``edge_check``: each sampled edge ``A[t, s]`` against a finite difference in the frozen
  replacement model: scale source ``s`` by ``1 + eps`` (``eps = -1`` removes it), re-run the
  frozen forward with every other node held fixed, and read target ``t``'s pre-activation change
  divided by ``eps``. The frozen model is affine, so the two agree to rounding for any ``eps``.
- ``reconstruction_check``: for every target, incoming edges + bias against its value.

Both need the graph to hold every active feature (``max_feature_nodes=None``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from interp.errors import InputError
from interp.graphs.graph import Graph, Node
from interp.graphs.replacement import Replacement, record


def _value(rep: Replacement, node: Node, embed: torch.Tensor, writes: list[torch.Tensor]) -> float:
    tc_inputs, final = rep.run(embed[None], [w[None] for w in writes])
    if node.kind == "logit":
        logits = final[0, -1] @ rep.W_U + rep.b_U
        return float(logits[node.feature] - logits.mean())
    tc = rep.layers[node.layer].transcoder
    return float(tc.pre_acts(tc_inputs[node.layer][0, node.pos].to(tc.dtype))[node.feature])


def _scaled(rep: Replacement, node: Node, eps: float) -> tuple[torch.Tensor, list[torch.Tensor]]:
    embed, writes = rep.embed.clone(), [w.clone() for w in rep.clean_writes()]
    if node.kind == "token":
        embed[node.pos] += eps * rep.embed[node.pos]
    elif node.kind == "error":
        writes[node.layer][node.pos] += eps * rep.layers[node.layer].error[node.pos]
    else:
        layer = rep.layers[node.layer]
        w_dec = layer.transcoder.W_dec.detach().to(rep.dtype)
        writes[node.layer][node.pos] += eps * layer.acts[node.pos, node.feature] * w_dec[node.feature]
    return embed, writes


def _complete(graph: Graph) -> None:
    settings = graph.metadata.get("generation_settings", {})
    if graph.bias is None or settings.get("max_feature_nodes") is not None or graph.prune_result is not None:
        raise InputError(
            "exactness checks need the unpruned graph with every active feature: "
            "attribute(..., max_feature_nodes=None) and check it before prune()"
        )


@torch.no_grad()
def edge_check(
    model: Any,
    transcoders: Sequence[Any],
    graph: Graph,
    *,
    n_pairs: int = 100,
    eps: float = -1.0,
    seed: int = 0,
) -> dict[str, float]:
    """Max |A[t, s] - finite difference| over ``n_pairs`` sampled (target, source) pairs, half of
    them carrying a nonzero edge. Returns ``max_abs_error``, ``max_edge`` (largest |A| checked)
    and ``n_pairs``."""
    _complete(graph)
    rep = record(model, transcoders, torch.tensor(graph.prompt_tokens))
    gen = torch.Generator().manual_seed(seed)
    targets = (graph.kind_mask("feature") | graph.kind_mask("logit")).nonzero().flatten()
    sources = (~graph.kind_mask("logit")).nonzero().flatten()
    half = n_pairs // 2
    pairs = list(
        zip(
            targets[torch.randint(len(targets), (n_pairs - half,), generator=gen)].tolist(),
            sources[torch.randint(len(sources), (n_pairs - half,), generator=gen)].tolist(),
            strict=True,
        )
    )
    nonzero = graph.adjacency.nonzero()
    if len(nonzero):
        pairs += [tuple(p) for p in nonzero[torch.randint(len(nonzero), (half,), generator=gen)].tolist()]
    base: dict[int, float] = {}
    worst, largest = 0.0, 0.0
    for t, s in pairs:
        target, source = graph.nodes[t], graph.nodes[s]
        if t not in base:
            base[t] = _value(rep, target, rep.embed, rep.clean_writes())
        moved = _value(rep, target, *_scaled(rep, source, eps))
        edge = float(graph.adjacency[t, s])
        worst = max(worst, abs((moved - base[t]) / eps - edge))
        largest = max(largest, abs(edge))
    return {"max_abs_error": worst, "max_edge": largest, "n_pairs": float(len(pairs))}


def reconstruction_check(graph: Graph) -> dict[str, float]:
    """Max |incoming edges + bias - value| over every feature and logit target (and the largest
    |value|, for scale)."""
    _complete(graph)
    targets = graph.kind_mask("feature") | graph.kind_mask("logit")
    values = torch.tensor([n.activation for n in graph.nodes], dtype=torch.float64)
    recon = graph.adjacency.sum(1).double() + graph.bias.double()
    return {
        "max_abs_error": float((recon - values)[targets].abs().max()),
        "max_value": float(values[targets].abs().max()),
        "n_targets": float(targets.sum()),
    }
