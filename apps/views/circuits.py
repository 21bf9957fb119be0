"""Circuits: the attribution graph of a prompt on zoo:grammar-4l (with its shipped transcoders), drawn
by layer and position; hover a feature for its dashboard, click it (or pick it below) to intervene
on it in the real model and see the effect on the output."""

from __future__ import annotations

import common
import pandas as pd
import plotly.graph_objects as go
import streamlit as st
import torch

from interp import graphs
from interp.models.zoo import grammar
from interp.reproductions import circuits

PROMPT_KEY = "circuits_prompt"
PICK_KEY = "circuits_feature"
MAX_EDGES = 300  # the strongest kept edges drawn; more only hide the structure
EDGE_BINS = 12  # edges are drawn as one line trace per sign and strength bin (300 traces took ~1 s)

st.title("Circuits")
st.markdown(
    "The **attribution graph** (Ameisen et al. 2025) of the next-token prediction of "
    "**zoo:grammar-4l**, a 4-layer model trained here on a toy language (agreement, brackets, IOI "
    "names, copying), with one transcoder per MLP. Nodes are active transcoder features, error nodes, "
    "input tokens and the top output logits; an edge is a direct linear effect with attention and "
    "LayerNorm frozen. The graph is pruned by influence (nodes 0.8, edges 0.98). Write words of the "
    "toy language separated by spaces."
)


@st.cache_resource(show_spinner=False)
def parts():
    """The model, its transcoders and each feature's top contexts (computed once per server)."""
    model, transcoders = circuits.load_parts()
    return model, transcoders, circuits.top_contexts(model, transcoders)


@st.cache_resource(show_spinner=False, max_entries=16)
def graph_of(prompt: str, node_threshold: float, edge_threshold: float):
    model, transcoders, _ = parts()
    full = graphs.attribute(model, transcoders, prompt, progress=False)
    return full, full.prune(node_threshold, edge_threshold)


@st.cache_resource(show_spinner=False, max_entries=16)
def graph_figure(prompt: str, node_threshold: float, edge_threshold: float) -> go.Figure:
    """The drawn graph with its hover cards, once per (prompt, thresholds): the same key as
    ``graph_of``, whose graph it draws."""
    model, transcoders, contexts = parts()
    full, pruned = graph_of(prompt, node_threshold, edge_threshold)
    tokens = pruned.prompt_str_tokens
    probs = dict(zip(pruned.logit_tokens, pruned.logit_probs.tolist(), strict=True))
    influence = full.node_influence()
    keep = pruned.prune_result.node_mask.nonzero().flatten().tolist()
    hover = [
        node_text(n, contexts, model, transcoders, float(influence[keep[i]]), tokens, probs)
        for i, n in enumerate(pruned.nodes)
    ]
    return figure(pruned, layout(pruned), hover, tokens)


def node_text(node, contexts, model, transcoders, influence: float, tokens: list[str], probs: dict) -> str:
    """The hover card: what the node is; for a feature, its logit effects and top contexts."""
    from interp import sae as S

    where = f"'{tokens[node.pos]}' (pos {node.pos})"
    if node.kind == "token":
        return f"<b>token</b> {where}"
    if node.kind == "logit":
        return f"<b>logit</b> '{node.label}' · p = {probs[node.feature]:.3f}"
    if node.kind == "error":
        return f"<b>error</b> L{node.layer} at {where} · norm {node.activation:.2f}"
    effects = S.logit_effects(model, transcoders[node.layer], node.feature, k=4)
    lines = [
        f"<b>L{node.layer} F{node.feature}</b> at {where}",
        f"activation {node.activation:.3f} · influence {influence:.3f}",
        "promotes: " + ", ".join(effects.top_tokens),
        "suppresses: " + ", ".join(effects.bottom_tokens),
        "top contexts:",
    ]
    lines += [f"  {v:.2f}  {c}" for v, c in contexts[node.layer].get(node.feature, [])]
    return "<br>".join(lines)


def layout(pruned) -> dict[int, tuple[float, float]]:
    """x = position (features at one cell spread out), y = layer (tokens below, logits on top)."""
    n_layers = pruned.metadata.get("n_layers", 4)
    cells: dict[tuple[float, int], list[int]] = {}
    for i, node in enumerate(pruned.nodes):
        y = {"token": -1.0, "logit": float(n_layers)}.get(node.kind, float(node.layer))
        if node.kind == "error":
            y += 0.3
        cells.setdefault((y, node.pos), []).append(i)
    xy = {}
    for (y, pos), members in cells.items():
        for j, i in enumerate(members):
            offset = (j - (len(members) - 1) / 2) * min(0.8 / max(len(members), 1), 0.18)
            xy[i] = (pos + offset, y)
    return xy


def figure(pruned, xy, hover: list[str], tokens: list[str]) -> go.Figure:
    a = pruned.adjacency
    targets, sources = (a != 0).nonzero(as_tuple=True)
    weights = a[targets, sources]
    order = weights.abs().argsort(descending=True)[:MAX_EDGES]
    top = float(weights.abs().max()) if len(weights) else 1.0
    fig = go.Figure()
    # one trace per (sign, strength bin): segments joined by None gaps, width and opacity of the
    # bin's middle strength (drawing each edge as its own trace made the page slow to build and draw)
    bins: dict[tuple[bool, int], tuple[list, list]] = {}
    for i in order.tolist():
        w = float(weights[i])
        strength = abs(w) / top
        xs, ys = bins.setdefault((w > 0, min(int(strength * EDGE_BINS), EDGE_BINS - 1)), ([], []))
        (x0, y0), (x1, y1) = xy[int(sources[i])], xy[int(targets[i])]
        xs += [x0, x1, None]
        ys += [y0, y1, None]
    for (positive, b), (xs, ys) in sorted(bins.items()):
        strength = (b + 0.5) / EDGE_BINS
        color = ("rgba(31,119,180,{a})" if positive else "rgba(214,39,40,{a})").format(
            a=0.15 + 0.6 * strength
        )
        fig.add_trace(
            go.Scatter(
                x=xs, y=ys, mode="lines", hoverinfo="skip", showlegend=False,
                line={"width": 0.5 + 4 * strength, "color": color},
            )
        )  # fmt: skip
    style = {"feature": ("circle", "#2ca02c"), "error": ("square", "#999999"),
             "token": ("diamond", "#1f77b4"), "logit": ("star", "#ff7f0e")}  # fmt: skip
    for kind, (symbol, color) in style.items():
        index = [i for i, n in enumerate(pruned.nodes) if n.kind == kind]
        if not index:
            continue
        fig.add_trace(
            go.Scatter(
                x=[xy[i][0] for i in index], y=[xy[i][1] for i in index], mode="markers", name=kind,
                marker={"symbol": symbol, "size": 13 if kind != "feature" else 11, "color": color,
                        "line": {"width": 1, "color": "white"}},
                customdata=index, hovertext=[hover[i] for i in index], hoverinfo="text",
            )
        )  # fmt: skip
    n_layers = pruned.metadata.get("n_layers", 4)
    fig.update_layout(
        height=560,
        margin={"l": 10, "r": 10, "t": 30, "b": 10},
        xaxis={"tickvals": list(range(len(tokens))), "ticktext": tokens, "title": "position"},
        yaxis={"tickvals": [-1, *range(n_layers), n_layers], "ticktext": ["tokens", *[f"L{i}" for i in range(n_layers)], "logits"]},
        legend={"orientation": "h", "y": 1.06},
        clickmode="event+select",
    )  # fmt: skip
    return fig


def chosen_from_click(event, feature_index: list[int]) -> int | None:
    """The node picked by a click on the chart, if it was a feature."""
    points = (getattr(event, "selection", None) or {}).get("points", []) if event else []
    for point in points:
        index = point.get("customdata")
        index = index[0] if isinstance(index, list) else index
        if index in feature_index:
            return int(index)
    return None


def intervention_panel(model, transcoders, pruned, node_index: int) -> None:
    node = pruned.nodes[node_index]
    st.subheader(f"Intervene on L{node.layer} F{node.feature} at '{graph_tokens[node.pos]}' (pos {node.pos})")
    st.caption(f"Its activation on this prompt is {node.activation:.3f}. The edit runs in the real model.")
    mode = st.radio("Edit", ["ablate (set to 0)", "scale", "set to"], horizontal=True, key="circuits_mode")
    if mode == "scale":
        factor = st.number_input("factor", value=-2.0, step=0.5, key="circuits_factor")
        edit, how = (node.layer, node.pos, node.feature, float(factor)), "scale"
    elif mode == "set to":
        value = st.number_input("value", value=float(2 * node.activation), key="circuits_value")
        edit, how = (node.layer, node.pos, node.feature, float(value)), "set"
    else:
        edit, how = (node.layer, node.pos, node.feature, 0.0), "set"
    with common.guard():
        result = graphs.intervene(model, transcoders, pruned.prompt_tokens, [edit], mode=how)
        before = torch.softmax(result.clean_logits[-1], -1)
        after = torch.softmax(result.logits[-1], -1)
        ids = list(dict.fromkeys(before.topk(5).indices.tolist() + after.topk(5).indices.tolist()))
        table = pd.DataFrame(
            {
                "token": [model.tokenizer.names[i] for i in ids],
                "p before": [float(before[i]) for i in ids],
                "p after": [float(after[i]) for i in ids],
                "logit change": [float(result.logits[-1, i] - result.clean_logits[-1, i]) for i in ids],
            }
        ).sort_values("p after", ascending=False)
        top_before, top_after = int(before.argmax()), int(after.argmax())
        names = model.tokenizer.names
        verdict = (
            f"The prediction changes: **{names[top_before]}** → **{names[top_after]}**."
            if top_before != top_after
            else f"The prediction stays **{names[top_after]}**."
        )
        st.markdown(verdict)
        st.dataframe(table, hide_index=True, use_container_width=True)


prompt = st.text_input("Prompt", value=grammar.SAMPLES[0], key=PROMPT_KEY)
left, right = st.columns(2)
node_threshold = left.slider("Node threshold", 0.5, 0.99, 0.8, 0.01, key="circuits_node_threshold")
edge_threshold = right.slider("Edge threshold", 0.5, 0.999, 0.98, 0.001, key="circuits_edge_threshold")
st.caption("Examples: " + " · ".join(f"`{s}`" for s in grammar.SAMPLES[:4]))

pruned = None
with common.guard():
    bar = st.progress(0.0, text="Loading grammar-4l and its transcoders")
    try:
        model, transcoders, contexts = parts()
        bar.progress(0.3, text="Computing the attribution graph (frozen attention and norms)")
        key = (" ".join(prompt.split()), node_threshold, edge_threshold)
        full, pruned = graph_of(*key)
        bar.progress(1.0, text="Done")
    finally:
        bar.empty()

if pruned is not None:
    graph_tokens = pruned.prompt_str_tokens
    counts = {k: sum(n.kind == k for n in pruned.nodes) for k in ("feature", "error", "token", "logit")}
    st.markdown(
        f"**{len(full.nodes)}** nodes before pruning, **{len(pruned.nodes)}** kept "
        f"({counts['feature']} features, {counts['error']} error nodes) · replacement score "
        f"{full.replacement_score():.3f} · completeness {full.completeness_score():.3f} · top prediction "
        f"**{pruned.nodes[-pruned.n_logits].label}** (p = {float(pruned.logit_probs[0]):.3f})"
    )
    influence = full.node_influence()
    keep = pruned.prune_result.node_mask.nonzero().flatten().tolist()
    event = st.plotly_chart(
        graph_figure(*key), on_select="rerun", selection_mode="points", key="circuits_chart"
    )
    feature_index = [i for i, n in enumerate(pruned.nodes) if n.kind == "feature"]
    if not feature_index:
        st.info("No feature survives pruning for this prompt: lower the node threshold.")
    else:
        clicked = chosen_from_click(event, feature_index)
        if clicked is not None and clicked != st.session_state.get("circuits_last_click"):
            st.session_state[PICK_KEY] = clicked  # a new click wins over the selectbox, once
        st.session_state["circuits_last_click"] = clicked
        labels = {i: f"L{pruned.nodes[i].layer} F{pruned.nodes[i].feature} at '{graph_tokens[pruned.nodes[i].pos]}' "
                     f"(pos {pruned.nodes[i].pos}, act {pruned.nodes[i].activation:.2f})" for i in feature_index}  # fmt: skip
        ranked = sorted(feature_index, key=lambda i: -float(influence[keep[i]]))
        if st.session_state.get(PICK_KEY) not in ranked:
            st.session_state[PICK_KEY] = ranked[0]
        pick = st.selectbox(
            "Feature (or click one in the graph)", ranked, format_func=labels.get, key=PICK_KEY
        )
        intervention_panel(model, transcoders, pruned, pick)
