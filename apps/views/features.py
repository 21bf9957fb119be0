"""Features: what the channels of a digits CNN layer respond to (optimized images beside their top
test-set examples; pixel, Fourier or CPPN parameterization, standard or lucent transforms), pixel or
layer attribution maps for a chosen digit (every captum method, with a noise tunnel), token
attributions for the text (optionally split by embedding layer), and the top-activating contexts of
a transformer's MLP neurons and attention heads, with an optimized-embedding input beside them."""

from __future__ import annotations

import common
import streamlit as st
import torch

import interp
from interp.methods import attribution as at
from interp.methods import examples as ex
from interp.methods import featureviz as fv

MODELS = ("digits-cnn", "digits-softmax")
CONTEXTS = 10  # contexts collected per unit; the view shows the first k of them
NOUNS = {"MLP neurons": "Neuron", "Heads: output norm": "Head", "Heads: max attention": "Head"}
# A causal head's first query attends only to itself (weight 1), so the max over tokens would tie
# every context at 1; the mean ranks heads and contexts by how sharply they attend overall.
REDUCE = {"Heads: max attention": "mean"}
METHODS = {
    "Integrated gradients": "ig",
    "Saliency": "saliency",
    "Gradient × input": "grad_x_input",
    "Occlusion": "occlusion",
    "DeepLift": "deeplift",
    "DeepLift SHAP": "deeplift_shap",
    "Gradient SHAP": "gradient_shap",
    "Guided backprop": "guided_backprop",
    "Deconvolution": "deconvolution",
    "LIME": "lime",
    "Kernel SHAP": "kernel_shap",
    "Feature ablation": "feature_ablation",
}
LAYER_METHODS = {
    "Layer integrated gradients": "ig",
    "Layer conductance": "conductance",
    "Grad-CAM": "gradcam",
}
TOKEN_METHODS = {  # the methods that run through a transformer's embedding
    k: v
    for k, v in METHODS.items()
    if v not in ("deeplift", "deeplift_shap", "guided_backprop", "deconvolution")
}
NOISE = {"none": None, "SmoothGrad": "smoothgrad", "SmoothGrad²": "smoothgrad_sq", "VarGrad": "vargrad"}
PARAMS = {"pixel (clipped box)": "pixel", "Fourier (1/f)": "fourier", "CPPN": "cppn"}
TRANSFORMS = {"standard (8 px)": "standard", "lucent's list (scaled to 8 px)": "lucent", "none": None}
EMBEDDINGS = ["embed.hook_out", "pos_embed.hook_out", "token_type_embed.hook_out"]


@st.cache_resource(show_spinner=False)
def digits_model(name: str) -> interp.HookedModel:
    """The zoo checkpoint, or the recipe trained once into the cache when none ships (~30 s)."""
    from interp.reproductions.adversarial import load_digits_model

    model = load_digits_model(name)
    if getattr(model, "input_shape", None) is None:
        model = interp.load(model.module, input_shape=(1, 8, 8), input_range=(0.0, 1.0), name=model.name)
    return model


@st.cache_data(show_spinner=False)
def test_set() -> tuple[torch.Tensor, torch.Tensor]:
    from interp.models import zoo

    _, _, x, y = zoo.digits_data(0)
    return x, y


@st.cache_resource(show_spinner=False)
def shared_results() -> dict:
    """Results computed once per server process and shared by every session: the optimized
    images and top examples are deterministic in their settings (fixed seeds)."""
    return {}


@st.cache_resource(show_spinner=False, max_entries=32)
def image_attribution(
    name: str, index: int, target: int | None, method: str, noise: str | None, layer: str | None
) -> at.AttributionResult:
    """A digit's attribution map, once per every choice it depends on (shared by all sessions)."""
    x, _ = test_set()
    kwargs: dict = {}
    if noise is not None:
        kwargs.update(noise_tunnel=noise, nt_samples=8, stdevs=0.1)
    if method in ("deeplift_shap", "gradient_shap") and layer is None:
        kwargs["baselines"] = x[-16:]  # a reference distribution: the last 16 test images
    if layer is not None:
        kwargs["layer"] = layer
    return at.attribute(digits_model(name), x[index : index + 1], target=target, method=method, **kwargs)


@st.cache_resource(show_spinner=False, max_entries=32)
def token_attribution(
    spec: str, text: str, method: str, target: int | None, layers: tuple[str, ...]
) -> at.AttributionResult:
    """The text's token attributions, once per (model, text, method, target, embedding layers)."""
    kwargs: dict = {"n_steps": 32}
    if layers:
        kwargs["layer"] = list(layers)
    return at.attribute(common.load_model(spec), text, target=target, method=method, **kwargs)


@st.fragment  # a widget of this tab re-runs only this tab
def gallery(model: interp.HookedModel, name: str) -> None:
    x, _ = test_set()
    layers = [
        n for n, s in model.hook_shapes.items() if s is not None and len(s) == 4 and n.endswith("hook_out")
    ]
    if not layers:
        st.info(f"{name} has no convolutional layer; pick digits-cnn for the channel gallery.")
        return
    columns = st.columns(4)
    convs = [i for i, n in enumerate(layers) if n.startswith("conv")]
    default = convs[-1] if convs else len(layers) - 1
    layer = columns[0].selectbox("Layer", layers, index=default, key=f"features_layer::{name}")
    steps = columns[1].slider("Optimization steps", 16, 512, 128, step=16, key="features_steps")
    param_label = columns[2].selectbox("Parameterization", list(PARAMS), key="features_param")
    tf_label = columns[3].selectbox("Transforms", list(TRANSFORMS), key="features_transforms")
    param, tf_name = PARAMS[param_label], TRANSFORMS[tf_label]
    key = (name, layer, steps, param, tf_name)
    store = shared_results()
    if key not in store:
        with common.guard():
            transforms = fv.lucent_transforms() if tf_name == "lucent" else tf_name
            with common.progress("Optimizing") as callback:
                vis = fv.visualize(
                    model, layer, steps=steps, param=param, transforms=transforms, callback=callback
                )
            with common.progress("Dataset examples") as callback:
                top = ex.top_k(model, x, layer, k=6, callback=callback)
            store[key] = (vis, top)
    if key not in store:
        return
    vis, top = store[key]
    figures = store.setdefault((*key, "figures"), {})  # plotly figures take ~0.5 s each to build
    box = {"clip": "pixels clipped to [0, 1]", "sigmoid": "sigmoid onto [0, 1]"}.get(
        vis.config["box_map"], ""
    )
    st.caption(
        f"{len(top.units)} channels of `{layer}` optimized together in one batch ({steps} Adam steps, "
        f"lr {vis.config['lr']:g}, {param}, {box}, seed {vis.config['seed']}, transforms: {tf_label}). "
        "Titles: the channel's mean activation."
    )
    if "all" not in figures:
        figures["all"] = vis.figure(
            [f"ch {u}: {s:.2g}" for u, s in zip(top.units, vis.scores.tolist(), strict=True)]
        )
    st.plotly_chart(figures["all"], key="features_all")
    unit = st.number_input(
        f"Channel (0-{len(top.units) - 1})", 0, len(top.units) - 1, 0, key=f"features_unit::{name}"
    )
    unit = int(unit)
    if unit not in figures:
        figures[unit] = (
            fv.image_grid_figure(
                [vis.images[unit, 0]], [f"channel {unit}"], value_range=vis.config.get("box")
            ),
            top.figure(unit),
        )
    optimized, examples = figures[unit]
    left, right = st.columns([1, 5])
    with left:
        st.markdown("**Optimized**")
        st.plotly_chart(optimized, key="features_opt")
    with right:
        st.markdown("**Top test images and their activation maps**")
        st.plotly_chart(examples, key="features_top")


@st.fragment
def attribution_map(model: interp.HookedModel, name: str) -> None:
    x, y = test_set()
    columns = st.columns(4)
    index = columns[0].number_input(f"Test image (0-{len(x) - 1})", 0, len(x) - 1, 0, key="features_image")
    level = columns[1].radio("Attribute to", ["pixels", "a layer"], key="features_level", horizontal=True)
    target = columns[3].number_input("Target class (-1: predicted)", -1, 9, -1, key="features_target")
    noise, layer = None, None
    if level == "pixels":
        method_label = columns[2].selectbox("Method", list(METHODS), key="features_method")
        method = METHODS[method_label]
        noise = NOISE[st.selectbox("Noise tunnel", list(NOISE), key="features_noise")]
    else:
        layers = [
            n
            for n, s in model.hook_shapes.items()
            if s is not None and len(s) == 4 and n.endswith("hook_out")
        ]
        if not layers:
            st.info(f"{name} has no convolutional layer; pick digits-cnn for layer attribution.")
            return
        convs = [i for i, n in enumerate(layers) if n.startswith("conv")]
        method_label = columns[2].selectbox("Method", list(LAYER_METHODS), key="features_layer_method")
        method = LAYER_METHODS[method_label]
        layer = st.selectbox(
            "Layer", layers, index=convs[-1] if convs else len(layers) - 1, key=f"features_attr_layer::{name}"
        )
    with common.guard():
        with st.spinner(f"{method_label}..."):
            result = image_attribution(
                name, int(index), None if target < 0 else int(target), method, noise, layer
            )
        delta = "" if result.delta is None else f"; IG completeness error δ = {float(result.delta[0]):.2e}"
        where = f" at `{layer}` (summed over its channels)" if layer is not None else ""
        smooth = f", {noise} over 8 noisy copies (σ 0.1)" if noise is not None else ""
        st.caption(
            f"label {int(y[index])}, attributed class {int(result.target[0])}{where}{smooth}; "
            f"computed by {result.config.get('library', 'captum')}{delta}"
        )
        st.plotly_chart(result.figure(0), key="features_attr")


@st.fragment
def token_attributions() -> None:
    model = common.current_model()
    text = common.current_text()
    if model is None or text is None:
        return
    if model.kind != "transformer":
        st.info("Token attributions need a transformer: pick one in the sidebar (e.g. 'minilm').")
        return
    columns = st.columns(3)
    method_label = columns[0].selectbox("Method", list(TOKEN_METHODS), key="features_token_method")
    target = columns[1].number_input(
        "Output index at the last token (-1: the largest)", -1, None, -1, key="features_token_target"
    )
    embeddings = [n for n in EMBEDDINGS if n in model.hook_names]
    at_layers = columns[2].checkbox(
        "Split by embedding layer (layer IG)", key="features_token_layers", disabled=len(embeddings) < 2
    )
    layers: tuple[str, ...] = ()
    if at_layers:
        layers = tuple(n for n in embeddings if n != "pos_embed.hook_out")  # captum cannot hook it
        method = "ig"
    else:
        method = TOKEN_METHODS[method_label]
    with common.guard():
        with st.spinner("Attributing..."):
            result = token_attribution(
                common.current_spec(), text, method, None if target < 0 else int(target), layers
            )
        delta = "" if result.delta is None else f"; δ = {float(result.delta[0]):.2e}"
        how = " (layer IG, split by embedding table)" if result.by_layer else ""
        st.caption(f"`{model.name}`: output index {int(result.target[0])} at the last token{how}{delta}")
        common.embed(result.html(0), alt="token attributions", key="features_token_view")
        st.plotly_chart(result.figure(0), key="features_token_attr")
        if result.by_layer:
            totals = {n: float(v[0].sum()) for n, v in result.by_layer.items()}
            st.caption(
                "Per embedding layer (sum over tokens): "
                + ", ".join(f"`{n}` {t:.3g}" for n, t in totals.items())
            )


def unit_contexts(model: interp.HookedModel, layer: str, reduce_by: str) -> ex.TopExamples | None:
    """Every unit's top contexts in ``layer`` over the built-in sample set, computed once per model
    and layer (so picking another unit is instant); None after showing an error."""
    store = shared_results()
    key = (common.current_spec(), layer, reduce_by)
    if key not in store:
        with common.guard():
            inputs = ex.sample_inputs(model)
            with common.progress(f"Top contexts of every unit of {layer}") as callback:
                store[key] = ex.top_k(
                    model, inputs, layer, k=CONTEXTS, reduce_by=reduce_by, batch_size=8, callback=callback
                )
    return store.get(key)


@st.fragment
def token_contexts() -> None:
    """One MLP neuron or attention head of the sidebar transformer: its top-k contexts in the
    built-in sample set, each as a row of circuitsvis colored tokens."""
    model = common.current_model()
    if model is None:
        return
    if model.kind != "transformer":
        st.info("Neuron and head contexts need a transformer: pick one in the sidebar (e.g. 'minilm').")
        return
    kinds: dict[str, list[str]] | None = None
    with common.guard():
        kinds = ex.unit_layers(model)
    if kinds is None:
        return
    if not kinds:
        st.info(f"{model.name} has no MLP neuron or attention-head hook to read.")
        return
    spec = common.current_spec()  # widget keys per model: layers and unit counts differ
    columns = st.columns(4)
    kind = columns[0].selectbox("Units", list(kinds), key="features_ctx_kind")
    layers = kinds[kind]
    layer = columns[1].selectbox(
        "Layer", layers, index=len(layers) // 2, key=f"features_ctx_layer::{spec}::{kind}"
    )
    top = unit_contexts(model, layer, REDUCE.get(kind, "max"))
    if top is None:
        return
    noun = NOUNS.get(kind, "Unit")
    unit = columns[2].number_input(
        f"{noun} (0-{len(top.units) - 1})",
        0,
        len(top.units) - 1,
        0,
        key=f"features_ctx_unit::{spec}::{layer}",
    )
    k = columns[3].slider("Contexts (k)", 1, CONTEXTS, 5, key="features_ctx_k")
    show_contexts(top, int(unit), int(k), noun)
    if kind == "MLP neurons" and st.checkbox(
        "Also optimize an input for this neuron (embeddings, nearest-token readout)",
        key="features_ctx_optimize",
    ):
        optimized_tokens(model, layer, int(unit))


def optimized_tokens(model: interp.HookedModel, layer: str, unit: int) -> None:
    """``render_tokens`` for one neuron: 8 word embeddings optimized for its activation at the last
    token, read out as their nearest tokens, with both scores (computed once per setting)."""
    store = shared_results()
    key = ("render_tokens", common.current_spec(), layer, unit)
    if key not in store:
        with common.guard(), common.progress(f"Optimizing embeddings for neuron {unit}") as callback:
            store[key] = fv.render_tokens(model, layer, [unit], length=8, steps=64, callback=callback)
    vis = store.get(key)
    if vis is None:
        return
    st.caption(
        f"Neuron {unit} of `{layer}` at the last of 8 positions: {float(vis.scores[0]):.3g} on the optimized "
        f"embeddings, {float(vis.token_scores[0]):.3g} on their nearest tokens run as text "
        f"(64 Adam steps, seed {vis.config['seed']})."
    )
    st.code(" ".join(vis.str_tokens[0]), language=None)


def show_contexts(top: ex.TopExamples, unit: int, k: int, noun: str) -> None:
    """The caption, the strongest units of the layer and the colored-token view of ``unit``."""
    row = top.row(unit)
    strongest = ", ".join(f"{u} ({s:.3g})" for u, s in top.strongest(8))
    st.caption(
        f"{noun} {unit} of `{top.layer}`: its {k} best of {top.config['n_examples']} built-in "
        f"sequences, ranked by the {top.config['reduce_by']} over tokens (best score "
        f"{float(top.scores[row, 0]):.3g}). Strongest {noun.lower()}s here: {strongest}."
        + (" The view pages 5 contexts at a time ('Samples per page' shows more)." if k > 5 else "")
    )
    with common.guard():
        common.embed(
            top.samples_html(unit, k=k, unit_name=noun),
            alt=f"top contexts of {noun} {unit}",
            key="features_contexts_view",
        )


st.title("Features")
name = st.selectbox("Image model", MODELS, key="features_model")
try:
    with st.spinner(f"Loading {name} (trained once if no checkpoint ships)..."):
        image_model = digits_model(name)
except Exception as err:
    common.show_error(err)
    image_model = None
tabs = st.tabs(["Channel gallery", "Attribution map", "Token attributions", "Neuron & head contexts"])
if image_model is not None:
    with tabs[0]:
        gallery(image_model, name)
    with tabs[1]:
        attribution_map(image_model, name)
with tabs[2]:
    token_attributions()
with tabs[3]:
    token_contexts()
