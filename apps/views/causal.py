"""Causal: activation patching with the attribution-patching estimate beside it, edge attribution,
DLA and logit lens.

Clean and corrupted prompts (or generated repeated-token pairs for toy models), a metric, a patching
site; the library does everything, and long sweeps report progress through its callback.
"""

from __future__ import annotations

import common
import plotly.graph_objects as go
import streamlit as st
import torch

from interp import viz
from interp.errors import InputError
from interp.methods import attribution_patching, lens
from interp.methods import patching as P
from interp.methods.induction_patching import repeated_tokens_pair, second_half_logprob

st.title("Causal")
model, text = common.model_and_text(needs_text=False)
st.markdown(common.model_summary(model))

if model.kind != "transformer":
    st.info("Causal tools patch transformer activations; this model is not a transformer.")
    st.stop()

is_lm = P.has_logits(model)
ids_only = viz.is_id_vocabulary(model)  # a zoo transformer: prompts are token names ("t3 t17 =")
spec = common.current_spec()
max_half = ((model.n_ctx or 41) - 1) // 2
sources = (["Prompts"] if getattr(model, "tokenizer", None) is not None else []) + (
    ["Repeated tokens"] if is_lm and max_half >= 2 else []
)
if ids_only and "Repeated tokens" in sources:  # what induction models were trained on
    sources.reverse()
source = st.radio("Inputs", sources, horizontal=True, key=f"causal_source::{spec}")
clean = corrupted = metric = None

if source == "Repeated tokens":
    col1, col2 = st.columns(2)
    half = col1.number_input("Half length", 2, max_half, min(10, max_half), key=f"causal_half::{spec}")
    seed = col2.number_input("Seed", 0, 10_000, 0, key="causal_seed")
    with common.guard():
        clean, corrupted = repeated_tokens_pair(model, int(half), batch=4, seed=int(seed))
        st.caption(
            "Clean `[BOS, r, r]` vs corrupted `[BOS, s, r]`; metric: mean log-prob of the second copy."
        )
        metric = second_half_logprob(clean)
elif source == "Prompts":
    suffix = f"::{spec}" if ids_only else ""  # id names differ per model; English prompts are shared
    clean = st.text_input(
        "Clean prompt",
        viz.sample_text(model, 0) if ids_only else common.DEFAULT_TEXT,
        key="causal_clean" + suffix,
    )
    corrupted = st.text_input(
        "Corrupted prompt",
        viz.sample_text(model, 1) if ids_only else common.DEFAULT_TEXT.replace("John gave", "Mary gave"),
        key="causal_corrupted" + suffix,
    )
    choices = ["logit difference", "probability", "KL from clean"] if is_lm else ["cosine to clean"]
    if ids_only and is_lm:
        choices = ["KL from clean", "logit difference", "probability"]
    kind = st.selectbox("Metric", choices, key=f"causal_metric::{spec}")
    with common.guard():
        if kind in ("logit difference", "probability"):
            tok = model.tokenizer
            correct = st.text_input(
                "Correct answer token", "t0" if ids_only else " Mary", key="causal_correct" + suffix
            )
            incorrect = st.text_input(
                "Incorrect answer token", "t1" if ids_only else " John", key="causal_incorrect" + suffix
            )
            ids = [tok.convert_tokens_to_ids(tok.tokenize(t))[:1] or [0] for t in (correct, incorrect)]
            metric = P.logit_diff(ids[0][0], ids[1][0]) if kind == "logit difference" else P.prob(ids[0][0])
        else:
            metric = P.kl() if kind == "KL from clean" else P.cosine()
else:
    st.info(f"{model.name} has no tokenizer and no logits: there is no input to patch on this page.")
    st.stop()

sites = P.describe_sites(model)
site = st.selectbox(
    "Patch site",
    list(sites),
    index=list(sites).index("head") if "head" in sites else 0,
    format_func=lambda s: f"{s}: {sites[s]}",
    key=f"causal_site::{model.name}",
)

if st.button("Run patching", type="primary", key="causal_run") and metric is not None and clean is not None:
    st.session_state.pop("causal_result", None)  # an error below must not leave the old plots up
    bar = st.progress(0.0, text="patching...")
    try:
        with common.guard():
            exact = P.patch(
                model,
                clean,
                corrupted,
                site,
                metric,
                progress=lambda done, total: bar.progress(done / total, text=f"{done}/{total} patches"),
            )
            estimate = attribution_patching.attribution_patch(
                model, clean, corrupted, site, metric, exact=exact
            )
            try:
                edges = attribution_patching.attribution_patch_edges(model, clean, corrupted, metric)
            except InputError as err:  # e.g. post-LN models: edges have no additive scores
                edges = str(err)
            st.session_state["causal_result"] = (spec, exact, estimate, edges)
    finally:
        bar.empty()

stored = st.session_state.get("causal_result")
if stored and stored[0] == spec:
    _, exact, estimate, edges = stored
    st.caption(
        f"metric clean {exact.metric_clean:.4g}, corrupted {exact.metric_corrupted:.4g}; "
        f"AtP vs exact: Pearson r = {estimate.agreement:.3f}"
    )
    left, right = st.columns(2)
    figures = (
        exact.figure(title="Activation patching (exact)"),
        estimate.figure(title="Attribution patching (estimate)"),
    )
    viz.share_color_range(*figures)  # side by side, one colour means one value
    left.plotly_chart(figures[0], key="causal_exact")
    right.plotly_chart(figures[1], key="causal_atp")
    st.dataframe(
        {"patch": [n for n, _ in exact.top(8)], "metric": [v for _, v in exact.top(8)]}, hide_index=True
    )
    st.subheader("Edges (edge attribution patching)")
    if isinstance(edges, str):
        st.info(edges)
    else:
        st.caption(
            "Estimated change of the metric when only the edge sender -> receiver carries the clean "
            "sender output; each sender's row sums to its node estimate."
        )
        st.plotly_chart(edges.figure(title="EAP: sender (rows) -> receiver (columns)"), key="causal_edges")
        top = edges.top(10)
        st.dataframe({"edge": [n for n, _ in top], "estimate": [v for _, v in top]}, hide_index=True)

if is_lm and clean is not None:
    st.subheader("Direct logit attribution and logit lens")
    dla_input = clean
    answer = st.number_input("Answer token id (DLA)", 0, (model.d_vocab or 2) - 1, 0, key="causal_answer")
    with common.guard():
        tokens = dla_input if isinstance(dla_input, torch.Tensor) else model.prepare(dla_input).input_ids
        dla = lens.direct_logit_attribution(model, tokens[:1], int(answer), by="component")
        fig = go.Figure(go.Bar(x=dla.labels["component"], y=dla.values.numpy()))
        fig.update_layout(
            title=f"Direct contribution to logit[{int(answer)}] at the last position", height=320
        )
        st.plotly_chart(fig, key="causal_dla")
        st.dataframe(lens.logit_lens(model, tokens[:1]).table(pos=-1, k=5), hide_index=True)
