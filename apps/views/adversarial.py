"""Adversarial: attack a digit (test set or upload), see the perturbation, the predictions, and which
layers carry the damage (divergence, probes clean vs adversarial, restoration by patching)."""

from __future__ import annotations

import io

import common
import numpy as np
import streamlit as st
import torch

import interp
from interp.errors import InputError
from interp.methods import adversarial as A

MODELS = ("digits-cnn", "digits-softmax")
ATTACKS = {"FGSM": ("fgsm", None), "PGD (L∞)": ("pgd", "linf"), "PGD (L2)": ("pgd", "l2")}
N_LAYER_IMAGES = 100  # test images attacked for the per-layer analysis


@st.cache_resource(show_spinner=False)
def digits_model(name: str) -> interp.HookedModel:
    """The zoo checkpoint, or (none shipped yet) the recipe trained once into the cache (~30 s)."""
    from interp.reproductions.adversarial import load_digits_model

    return load_digits_model(name)


@st.cache_data(show_spinner=False)
def digits() -> tuple[torch.Tensor, ...]:
    from interp.models import zoo

    return zoo.digits_data(0)


def read_upload(data: bytes, invert: bool) -> torch.Tensor:
    """An uploaded image as a [1, 8, 8] tensor in [0, 1] (grey, resized like sklearn's digits)."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data)).convert("L").resize((8, 8), Image.Resampling.LANCZOS)
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise InputError(
            "the uploaded file is not an image PIL can read; upload a PNG or JPEG of a digit."
        ) from err
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(1.0 - pixels if invert else pixels)[None]


def attack(model: interp.HookedModel, x, y, kind: str, eps: float, steps: int, target):
    name, norm = ATTACKS[kind]
    if name == "fgsm":
        return A.fgsm(model, x, y, eps, target=target)
    return A.pgd(model, x, y, eps, eps / 4, steps, norm=norm, target=target, seed=0)


@st.cache_data(show_spinner=False, max_entries=16)
def layer_analysis(model_name: str, kind: str, eps: float, steps: int):
    model = digits_model(model_name)
    x_tr, y_tr, x_te, y_te = digits()
    x, y = x_te[:N_LAYER_IMAGES], y_te[:N_LAYER_IMAGES]
    adv = attack(model, x, y, kind, eps, steps, None).x_adv
    return A.attack_probe(model, x, adv, y, train=(x_tr[:400], y_tr[:400]), C=0.1)


st.title("Adversarial")
st.caption(
    "Attack an image, then see which layer and channel carries the damage. This page uses its own "
    "digit classifiers and images, not the sidebar's model and text."
)
left, right = st.columns(2)
model_name = left.selectbox("Model", MODELS, key="adv_model")
kind = left.selectbox("Attack", list(ATTACKS), key="adv_attack")
eps = left.slider("eps (L∞ budget; L2 radius for PGD L2)", 0.0, 1.0, 0.1, 0.01, key="adv_eps")
steps = left.number_input("PGD steps", 1, 200, 20, key="adv_steps")
source = right.radio("Image", ["test set", "upload"], horizontal=True, key="adv_source")
# Drawn before anything can stop the page, so the toggle keeps its state (and shows it) whatever
# image source is picked; the analysis below runs only while it is on.
layers_on = left.toggle(
    f"Layer-by-layer analysis (first {N_LAYER_IMAGES} test images)", value=False, key="adv_layers"
)
x_tr, y_tr, x_te, y_te = digits()
with st.spinner("Loading the model..."):
    model = None
    with common.guard():
        model = digits_model(model_name)
if model is None:
    st.stop()

image, label = None, None
if source == "test set":
    index = right.number_input(f"test image (0-{len(x_te) - 1})", 0, len(x_te) - 1, 0, key="adv_index")
    image, label = x_te[index : index + 1], int(y_te[index])
else:
    upload = right.file_uploader("An image of a digit (PNG, JPEG)", key="adv_upload")
    invert = right.checkbox("dark digit on a light background (invert)", value=True, key="adv_invert")
    label = right.number_input("its true label", 0, 9, 0, key="adv_label")
    if upload is None:
        st.info("Upload an image to attack it.")
    else:
        with common.guard():
            image = read_upload(upload.getvalue(), invert)[None]
target = right.selectbox("Target class (targeted attack)", ["none", *range(10)], key="adv_target")

if image is not None:
    with common.guard():
        result = attack(
            model, image, [label], kind, eps, int(steps), None if target == "none" else int(target)
        )
        st.plotly_chart(result.figure(0))
        import plotly.graph_objects as go

        fig = go.Figure()
        fig.add_bar(x=list(range(10)), y=result.logits_clean[0].softmax(-1).tolist(), name="original")
        fig.add_bar(x=list(range(10)), y=result.logits_adv[0].softmax(-1).tolist(), name="adversarial")
        fig.update_layout(title="Predicted probabilities", xaxis_title="class", barmode="group", height=320)
        st.plotly_chart(fig)
        norms = result.norms()
        st.caption(f"|δ|∞ = {norms['linf'][0]:.3f}, |δ|₂ = {norms['l2'][0]:.3f}; true label {label}")

st.subheader(f"Layer by layer, over the first {N_LAYER_IMAGES} test images")
st.caption(
    "Per-layer divergence of clean vs adversarial activations, linear probes (fitted on clean training "
    "images) scored on both, and how much accuracy returns when clean activations are patched in."
)
if not layers_on:
    st.info("Turn on the layer-by-layer analysis above to run it.")
    st.stop()
with common.guard(), st.spinner("Attacking and probing every layer..."):
    probe = layer_analysis(model_name, kind, float(eps), int(steps))
    st.plotly_chart(probe.figure())
    st.dataframe(
        {
            "hook point": probe.names,
            "divergence": probe.divergence.numpy(),
            "probe acc clean": probe.probe_acc_clean.numpy(),
            "probe acc adversarial": probe.probe_acc_adv.numpy(),
            "restored (top 25% units)": probe.restoration_topk.numpy(),
        },
        hide_index=True,
    )
