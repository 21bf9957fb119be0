"""Attention: circuitsvis's interactive view of every head's pattern in one layer."""

from __future__ import annotations

import common
import streamlit as st

from interp import viz
from interp.errors import UnknownHookError
from interp.hooks import layer_of

PATTERN_HOOKS = "blocks.*.attn.hook_pattern"

st.title("Attention")
model, text = common.model_and_text()
st.markdown(common.model_summary(model))

try:
    pattern_names = model.resolve(PATTERN_HOOKS)
except UnknownHookError:
    st.info(f"{model.name} has no attention patterns (no hook point matches `{PATTERN_HOOKS}`).")
    st.stop()

by_layer = {layer_of(name): name for name in pattern_names}
layer = st.selectbox("Layer", list(by_layer), key=f"attention_layer::{model.name}")
name = by_layer[layer]

with common.guard():
    activations, tokens = common.capture(text, [name])
    pattern = activations[name]  # [head, query, key]
    n_heads = pattern.shape[0]
    if len(tokens) <= viz.MAX_ATTENTION_VIEW_TOKENS:
        st.caption(
            f"`{name}`: {n_heads} heads over {len(tokens)} tokens. Hover a head to preview it, "
            "click it to pin it; hover a token in the pinned view to see where it attends."
        )
        html = viz.attention_heads_html(pattern, tokens, layer=layer)
        common.embed(html, alt=f"attention patterns of layer {layer}", key="attention_view")
    else:  # every head at every position would freeze the browser: one head, as a heatmap
        st.info(
            f"{len(tokens)} tokens is more than the {viz.MAX_ATTENTION_VIEW_TOKENS} the interactive "
            "all-heads view draws without freezing the browser, so this shows one head at a time as "
            "a heatmap of every position (hover a cell for its weight; shorten the text for the "
            "interactive view)."
        )
        head = st.selectbox("Head", list(range(n_heads)), key=f"attention_head::{model.name}")
        st.plotly_chart(
            viz.activation_figure(pattern[head], f"{name}, head {head}", tokens, token_axes=[0, 1]),
            key="attention_heatmap",
        )
