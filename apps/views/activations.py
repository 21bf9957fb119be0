"""Activations: every hook point with its shape; pick one and see it for the text."""

from __future__ import annotations

import common
import streamlit as st

from interp import viz

st.title("Activations")
model, text = common.model_and_text()
st.markdown(common.model_summary(model))

shapes = model.hook_shapes
with st.expander(f"All {len(shapes)} hook points, in forward order", expanded=False):
    st.dataframe(
        {"hook name": list(shapes), "shape": [common.format_shape(s) for s in shapes.values()]},
        hide_index=True,
    )

if model.kind != "transformer":
    st.info(
        "This model takes tensor inputs, not text. Capture its activations from a script: "
        "`model.run_with_cache(batch)`."
    )
    st.stop()

names = model.hook_names
preferred = next((n for n in ("blocks.0.hook_resid_post", "hook_embed") if n in names), names[0])
name = st.selectbox("Hook point", names, index=names.index(preferred), key=f"activation_hook::{model.name}")
shape = shapes.get(name)

with common.guard():
    activations, tokens = common.capture(text, [name])
    array = activations[name]  # batch row already taken
    dims = list(shape[1:]) if shape is not None and len(shape) == array.ndim + 1 else list(array.shape)
    keep = viz.display_axes(dims)
    index: dict[int, int] = {}
    fixed = [axis for axis in range(array.ndim) if axis not in keep]
    if fixed:
        columns = st.columns(len(fixed))
        n_heads = getattr(getattr(model, "cfg", None), "n_heads", None)
        for column, axis in zip(columns, fixed, strict=True):
            size = array.shape[axis]
            label = "head" if ".attn." in name and size == n_heads else f"index along axis {axis}"
            index[axis] = column.number_input(
                f"{label} (0-{size - 1})", 0, size - 1, 0, key=f"activation_axis::{name}::{axis}"
            )
    view = viz.take_slice(array, keep, index)
    token_axes = [
        i for i, axis in enumerate(keep) if dims[axis] == "pos" and array.shape[axis] == len(tokens)
    ]
    where = ", ".join(f"[{index[a]}] on axis {a}" for a in fixed)
    st.caption(
        f"`{name}`: shape {common.format_shape(shape)}; drawing {tuple(view.shape)}"
        + (f" at {where}" if where else "")
        + f"; min {view.min():.4g}, max {view.max():.4g}, mean {view.mean():.4g}"
    )
    st.plotly_chart(viz.activation_figure(view, name, tokens, token_axes=token_axes))
