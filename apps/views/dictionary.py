"""Dictionary: a sparse dictionary (SAE or transcoder) on the sidebar's model; browse its latents by
density or activation, open a latent's dashboard, and splice or steer to see the output change.

Everything shown comes from ``interp.sae``: ``latent_stats`` (every latent over the built-in sample
set, in one streamed pass), ``dashboard`` (top examples, histogram, density, logit effects) and
``intervene`` (the sidebar input before and after).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import common
import numpy as np
import streamlit as st

import interp
from interp import sae as S
from interp import viz
from interp.methods import examples as ex

ROWS = 50  # latents listed in the browse table
K = 10  # top examples per dashboard
CONTEXT = 8  # tokens shown either side of each example's peak
QUESTIONS = 256  # 'a b =' inputs for a modular-addition model
ORDERS = {"max activation": "max_activation", "density": "density", "mean when active": "mean_activation"}
ZOO, DIRECTORY = "Zoo", "Directory"
ACTIONS = {
    "steer": "Steer this latent (add α × its decoder direction, error term kept)",
    "splice": "Splice the dictionary in (the model runs on its reconstruction)",
}


@st.cache_resource(show_spinner=False)
def shared_results() -> dict:
    """Statistics and dashboards computed once per server process (deterministic in their inputs)."""
    return {}


@st.cache_resource(show_spinner=False, max_entries=8)
def load_dictionary(source: str, verify: bool, stamp: float) -> S.SAE:
    """One dictionary per (source, verify, weights' mtime): a retrained folder is read again."""
    return S.load(source, verify=verify)


def weights_stamp(source: str) -> float:
    """The mtime of the dictionary's weights (0 when the path is not there: load reports why)."""
    if source.startswith("zoo:"):
        path = S.io.ZOO_DIR / source.removeprefix("zoo:") / S.io.WEIGHTS
    else:
        path = Path(source).expanduser() / S.io.WEIGHTS
    return path.stat().st_mtime if path.is_file() else 0.0


def fits(model: interp.HookedModel, sae: S.SAE) -> bool:
    """The dictionary reads (and writes) hooks of this model at their widths, and names no other model."""
    trained_on = sae.cfg.metadata.get("model_name")
    if trained_on not in (None, model.name):
        return False
    try:
        S.check_fits(model, sae)
    except interp.InterpError:
        return False
    return True


def zoo_choices(model: interp.HookedModel) -> list[str]:
    """The shipped dictionaries that fit the sidebar's model."""
    names = []
    for name in S.zoo_names():
        try:
            sae = load_dictionary(f"zoo:{name}", True, weights_stamp(f"zoo:{name}"))
        except Exception:  # a broken zoo entry is not offered (S.load("zoo:NAME") says why)
            continue
        if fits(model, sae):
            names.append(name)
    return names


def pick_dictionary(model: interp.HookedModel, spec: str) -> tuple[str, S.SAE] | None:
    """The source picker; the loaded dictionary that fits the model, or None after saying why."""
    zoo = zoo_choices(model)
    source = DIRECTORY
    if zoo:
        source = st.radio("Dictionary", [ZOO, DIRECTORY], horizontal=True, key=f"dict_source::{spec}")
    else:
        shipped = ", ".join(S.zoo_names()) or "none"
        st.caption(f"No shipped dictionary fits {model.name} (shipped: {shipped}); load one from a folder.")
    if source == ZOO:
        name = st.selectbox("Zoo dictionary", zoo, key=f"dict_zoo::{spec}")
        where, verify = f"zoo:{name}", True
    else:
        where = st.text_input(
            "Dictionary folder",
            key=f"dict_path::{spec}",
            placeholder="/path/to/sae (holds cfg.json and sae_weights.safetensors)",
            help="A folder in SAELens's format, written by sae.save(dir), `interp sae train` or SAELens.",
        ).strip()
        verify = st.checkbox(
            "Check the weights' sha256 sidecar",
            value=True,
            key="dict_verify",
            help="interp writes sae_weights.safetensors.sha256 beside the weights; SAELens does not: "
            "uncheck this for a folder SAELens saved.",
        )
        if not where:
            st.info("Type the folder of a dictionary trained on this model's activations.")
            return None
    try:
        with st.spinner(f"Loading {where}..."):
            sae = load_dictionary(where, verify, weights_stamp(where))
        S.check_fits(model, sae)
    except Exception as err:
        common.show_error(err)
        return None
    trained_on = sae.cfg.metadata.get("model_name")
    if trained_on not in (None, model.name):
        st.warning(
            f"This dictionary was trained on {trained_on}; its hooks fit {model.name}, but its latents may not mean much here."
        )
    return f"{where}@{verify}@{weights_stamp(where)}", sae


def sample_set(model: interp.HookedModel) -> tuple[object, str]:
    """The inputs every latent is read on, and what they are: the built-in sample set
    (``examples.sample_inputs``), except for a modular-addition vocabulary (an ``=`` token), whose
    model only ever sees ``a b =`` questions: QUESTIONS of them, as ``viz.sample_text`` draws them."""
    vocab = getattr(model, "tokenizer", None)
    if viz.is_id_vocabulary(model) and "=" in getattr(vocab, "ids", {}):
        return [
            viz.sample_text(model, seed=i) for i in range(QUESTIONS)
        ], f"{QUESTIONS} random 'a b =' questions"
    inputs = ex.sample_inputs(model)
    return inputs, f"{len(inputs)} built-in sample inputs"


def describe(sae: S.SAE) -> str:
    c = sae.cfg
    where = f"`{c.hook_name}` → `{c.hook_name_out}`" if c.is_transcoder else f"`{c.hook_name}`"
    k = f", k={c.k}" if getattr(c, "k", None) else ""
    zoo = c.metadata.get("zoo") or {}
    if zoo.get("description"):  # a shipped dictionary records what it is and how well it does
        metrics = zoo.get("metrics") or {}
        scores = [
            f"{name} {metrics[key]:.3g}"
            for key, name in (("explained_variance", "EV"), ("l0", "L0"))
            if key in metrics
        ]
        held = f" (held out: {', '.join(scores)})" if scores else ""
        return f"**{c.architecture}**{k} · {where} · {zoo['description']}{held}"
    training = c.metadata.get("training") or {}
    data = f"; trained on {training['data']}" if training.get("data") else ""
    return f"**{c.architecture}**{k} · {c.d_in} → {c.d_sae} latents at {where}{data}"


def stats_for(key: tuple, model: interp.HookedModel, sae: S.SAE, inputs) -> S.LatentStats | None:
    """Every latent's statistics, once per (model, dictionary); the capture stays on disk so each
    dashboard reuses it."""
    store = shared_results()
    if key not in store:
        folder = tempfile.mkdtemp(prefix="interp-dictionary-")
        with common.guard():
            with common.progress("Latent statistics over the sample set") as callback:
                stats = S.latent_stats(model, sae, inputs, batch_size=8, out_dir=folder, callback=callback)
            store[key] = (stats, folder)
    found = store.get(key)
    return None if found is None else found[0]


def dashboard_for(
    key: tuple, latent: int, model: interp.HookedModel, sae: S.SAE, inputs
) -> S.LatentDashboard | None:
    store = shared_results()
    dkey = (*key, "dashboard", latent)
    if dkey not in store:
        folder = store[key][1] if key in store else None
        if folder is not None and not os.path.isdir(folder):
            folder = None
        with common.guard(), common.progress(f"Dashboard of latent {latent}") as callback:
            store[dkey] = S.dashboard(
                model,
                sae,
                latent,
                inputs,
                k=K,
                context=CONTEXT,
                batch_size=8,
                out_dir=folder,
                callback=callback,
            )
    return store.get(dkey)


def browse(stats: S.LatentStats, spec: str, source_key: str, what: str) -> int:
    """The sort order, the table of the first ROWS latents, and the latent to open."""
    left, right = st.columns([1, 2])
    order_by = left.selectbox("Sort latents by", list(ORDERS), key="dict_order")
    order = stats.order(ORDERS[order_by])
    latent = right.selectbox(
        f"Open latent ({len(order)} in this order)",
        order,
        format_func=lambda i: (
            f"{i}: density {float(stats.density[i]):.3g}, max {float(stats.max_activation[i]):.3g}"
        ),
        key=f"dict_latent::{spec}::{source_key}::{order_by}",
    )
    st.caption(f"{stats.n_tokens} tokens of {what}; {stats.dead} of {len(order)} latents never fire on them.")
    with st.expander(f"The first {min(ROWS, len(order))} latents by {order_by}", expanded=False):
        st.dataframe(stats.rows(order[:ROWS]), hide_index=True)
    return int(latent)


def show_dashboard(dash: S.LatentDashboard, stats: S.LatentStats) -> None:
    st.subheader(f"Latent {dash.latent}")
    cols = st.columns(3)
    cols[0].metric(
        "Density", f"{dash.density:.3%}", help="Fraction of the sample tokens where it is non-zero."
    )
    cols[1].metric("Max activation", f"{dash.max_activation:.3g}")
    cols[2].metric("Active tokens", f"{dash.n_active} / {dash.n_tokens}")
    left, right = st.columns(2)
    if dash.dead:
        left.info("This latent never fires on the sample set: no histogram and no examples.")
    else:
        left.plotly_chart(
            viz.latent_histogram_figure(
                dash.histogram["counts"], dash.histogram["edges"], "Activation histogram"
            ),
            key="dict_hist",
        )
    right.plotly_chart(viz.density_figure(stats.density, dash.latent), key="dict_density")
    if dash.logit_effects is not None:
        e = dash.logit_effects
        st.plotly_chart(
            viz.logit_effects_figure(
                e.top_tokens,
                e.top_values,
                e.bottom_tokens,
                e.bottom_values,
                "Logit effects (W_dec row @ W_U)",
            ),
            key="dict_logits",
        )
    else:
        st.info(
            f"No logit effects: {dash.logit_note}. The examples and the steering below show what it does."
        )
    if dash.examples:
        st.markdown(
            f"**Top {len(dash.examples)} examples** ({CONTEXT} tokens either side of each peak, outlined; "
            "hover for values)"
        )
        rows = [
            (f"#{e.index} · {e.score:.3g}", e.tokens or [f"example {e.index}"], e.values or [e.score])
            for e in dash.examples
        ]
        common.embed(viz.token_rows_html(rows), alt=f"top examples of latent {dash.latent}")


@st.cache_resource(show_spinner=False, max_entries=64)
def intervention(
    key: tuple, text: str, latent: int | None, alpha: float, _model: interp.HookedModel, _sae: S.SAE
) -> S.Intervention:
    """``S.intervene`` once per (model, dictionary, text, latent, α), which ``key`` and the other
    arguments name (the model and dictionary objects are what ``key`` names, so not hashed): two
    forward passes that any other widget's re-run would repeat."""
    return S.intervene(_model, _sae, text, latent=latent, alpha=alpha)


def show_intervention(
    key: tuple, model: interp.HookedModel, sae: S.SAE, text: str, dash: S.LatentDashboard
) -> None:
    st.subheader("Splice or steer")
    action = st.radio("Intervention", list(ACTIONS), format_func=ACTIONS.get, key="dict_action")
    latent, alpha = (dash.latent if action == "steer" else None), 0.0
    if action == "steer":
        default = float(np.round(2 * dash.max_activation, 2)) or 1.0
        alpha = st.number_input("α", value=default, step=0.5, key=f"dict_alpha::{dash.latent}")
    with common.guard():
        change = intervention(key, text, latent, float(alpha), model, sae)
        what = (
            f"latent {dash.latent} steered by α = {alpha:g}"
            if change.mode == "steer"
            else "the dictionary spliced in without its error term"
        )
        if change.kind == "logits":
            st.caption(
                f"The sidebar input, next-token prediction at its last token; after: {what}. KL(before ‖ after) = {change.kl:.4g} nats."
            )
            table = change.predictions
            st.plotly_chart(
                viz.before_after_figure(
                    table["token"],
                    table["before"],
                    table["after"],
                    "Top predictions before and after",
                    "probability",
                ),
                key="dict_before_after",
            )
            st.plotly_chart(
                viz.logit_effects_figure(
                    [t for t, _ in change.raised],
                    [v for _, v in change.raised],
                    [t for t, _ in change.lowered],
                    [v for _, v in change.lowered],
                    "Logits that changed most",
                    axis="logit after − before",
                ),
                key="dict_logit_change",
            )
        else:
            st.caption(
                f"{model.name} outputs hidden states (no logits): the change is read in its output vectors "
                f"on the sidebar input; after: {what}. Cosine of the mean-pooled output (the sentence "
                f"embedding) before vs after: **{change.pooled_cosine:.4f}**."
            )
            fig = viz.activation_figure(
                np.asarray(change.cosine), "Cosine of each token's output, before vs after", change.tokens
            )
            st.plotly_chart(fig.update_layout(yaxis_title="cosine"), key="dict_cosine")


st.title("Dictionary")
model, text = common.model_and_text()
st.markdown(common.model_summary(model))
if model.kind != "transformer":
    st.info("The Dictionary page reads token contexts: pick a transformer in the sidebar (e.g. 'minilm').")
    st.stop()
spec = common.current_spec()
picked = pick_dictionary(model, spec)
if picked is None:
    st.stop()
source_key, sae = picked
st.markdown(describe(sae))
inputs, what = sample_set(model)
key = (spec, source_key)
stats = stats_for(key, model, sae, inputs)
if stats is None:
    st.stop()
latent = browse(stats, spec, source_key, what)
dash = dashboard_for(key, latent, model, sae, inputs)
if dash is None:
    st.stop()
show_dashboard(dash, stats)
show_intervention(key, model, sae, text, dash)
