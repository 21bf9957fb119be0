"""Adversarial: attack a digit (test set or upload) with any attack, see the perturbation, the
predictions, which layers carry the damage (divergence, probes clean vs adversarial, restoration by
patching), and the accuracy over a range of budgets."""

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
# label -> (attack name for adversarial.run_attack, norm of its budget)
ATTACKS = {
    "FGSM": ("fgsm", "linf"),
    "PGD (L∞)": ("pgd", "linf"),
    "PGD (L2)": ("pgd", "l2"),
    "APGD-CE (L∞)": ("apgd-ce", "linf"),
    "APGD-DLR (L∞)": ("apgd-dlr", "linf"),
    "APGD-T (L∞)": ("apgd-t", "linf"),
    "Square (L∞, no gradients)": ("square", "linf"),
    "FAB (L∞, smallest within eps)": ("fab", "linf"),
    "FAB (L2, smallest within eps)": ("fab", "l2"),
    "FAB-T (L∞)": ("fab-t", "linf"),
    "AutoAttack-style: APGD-CE + APGD-T + FAB-T + Square": ("autoattack", "linf"),
    "CW (L2, minimal)": ("cw", "l2"),
    "DeepFool (L2, minimal)": ("deepfool", "l2"),
}
TARGETED = {"fgsm", "pgd", "square", "cw", "fab"}  # the attacks that take a target
MINIMAL = {"cw", "deepfool"}  # no budget: they look for the smallest perturbation
N_LAYER_IMAGES = 100  # test images attacked for the per-layer analysis and the robustness curve


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


def attack(model: interp.HookedModel, x, y, kind: str, eps: float, steps: int, target, progress=None):
    """``kind`` (a label of ATTACKS) on the batch; ``steps`` is iterations, or queries for Square."""
    name, norm = ATTACKS[kind]
    kw: dict = {}
    if name in ("pgd", "apgd-ce", "apgd-dlr", "apgd-t", "cw", "deepfool", "fab", "fab-t"):
        kw["steps"] = steps
    if name == "pgd":
        kw |= {"alpha": eps / 4, "norm": norm, "seed": 0}
    if name in ("apgd-ce", "apgd-dlr", "fab"):
        kw["norm"] = norm
    if name == "cw":  # torchattacks' c=1, lr=0.01 barely move 8x8 digits in 50 steps
        kw |= {"c": 10.0, "lr": 0.05}
    if name == "square":
        kw["n_queries"] = steps
    if name == "autoattack":
        kw |= {"steps": min(steps, 100), "n_queries": 10 * steps}
    if name in TARGETED and target is not None:
        kw["target"] = target
    if name in ("square", "autoattack", "cw", "deepfool", "fab", "fab-t") and progress is not None:
        kw["progress"] = progress
    return A.run_attack(name, model, x, y, None if name in MINIMAL else eps, **kw)


@st.cache_resource(show_spinner=False)
def _runs() -> dict:
    """Long runs by their settings: a plain store, so a miss can drive a progress bar (a cached
    function may not draw)."""
    return {}


def with_progress(key: tuple, label: str, compute):
    """``compute(progress)`` once per ``key``, with a progress bar while it runs; the 16 latest kept."""
    store = _runs()
    if key not in store:
        with common.progress(label) as update:
            store[key] = compute(update)
        while len(store) > 16:
            store.pop(next(iter(store)))
    return store[key]


def layer_adversarials(model_name: str, kind: str, eps: float, steps: int) -> torch.Tensor:
    """The first N_LAYER_IMAGES test images attacked."""
    _, _, x_te, y_te = digits()
    x, y = x_te[:N_LAYER_IMAGES], y_te[:N_LAYER_IMAGES]
    return with_progress(("adv", model_name, kind, eps, steps), f"Attacking {N_LAYER_IMAGES} images with {kind}",
                         lambda update: attack(digits_model(model_name), x, y, kind, eps, steps, None, update).x_adv)  # fmt: skip


@st.cache_data(show_spinner=False, max_entries=16)
def layer_analysis(model_name: str, kind: str, eps: float, steps: int, _adv: torch.Tensor):
    """Probes of the clean and adversarial batch (``_adv`` is determined by the other arguments)."""
    model = digits_model(model_name)
    x_tr, y_tr, x_te, y_te = digits()
    x, y = x_te[:N_LAYER_IMAGES], y_te[:N_LAYER_IMAGES]
    return A.attack_probe(model, x, _adv, y, train=(x_tr[:400], y_tr[:400]), C=0.1)


def curve(model_name: str, kind: str, top: float, steps: int):
    """Accuracy at 6 budgets from 0 to ``top`` (L2 for the minimal attacks: one run read at each)."""
    name, norm = ATTACKS[kind]
    _, _, x_te, y_te = digits()
    x, y = x_te[:N_LAYER_IMAGES], y_te[:N_LAYER_IMAGES]
    budgets = [round(top * i / 5, 4) for i in range(6)]
    model = digits_model(model_name)

    def compute(update):
        if name in MINIMAL:
            from interp.methods.attacks import min_norm_accuracy

            run = attack(model, x, y, kind, 0.0, steps, None, update)
            return A.RobustnessCurve(budgets, [min_norm_accuracy(run, e, "l2") for e in budgets], name,
                                     {"norm": "l2", "steps": steps})  # fmt: skip
        acc = []
        for i, e in enumerate(budgets):
            acc.append(attack(model, x, y, kind, e, steps, None).accuracy_adv)
            update(i + 1, len(budgets))
        return A.RobustnessCurve(budgets, acc, name, {"norm": norm, "steps": steps})

    return with_progress(("curve", model_name, kind, top, steps), f"Robustness curve of {kind}", compute)


st.title("Adversarial")
st.caption(
    "Attack an image, then see which layer and channel carries the damage. This page uses its own "
    "digit classifiers and images, not the sidebar's model and text."
)
left, right = st.columns(2)
model_name = left.selectbox("Model", MODELS, key="adv_model")
kind = left.selectbox("Attack", list(ATTACKS), key="adv_attack")
name, norm = ATTACKS[kind]
minimal = name in MINIMAL
eps = left.slider(
    "eps (L∞ budget; L2 radius for PGD L2 and FAB L2)", 0.0, 1.0, 0.1, 0.01, key="adv_eps", disabled=minimal,
    help="CW and DeepFool take no budget: they search for the smallest L2 perturbation that flips the class.",
)  # fmt: skip
STEPS_LABELS = {"fgsm": "Steps (FGSM takes one)", "square": "Queries (Square)",
                "autoattack": "APGD and FAB-T steps (Square gets 10x as many queries)"}  # fmt: skip
DEFAULT_STEPS = {"square": 100, "deepfool": 50, "cw": 50}
steps = left.number_input(STEPS_LABELS.get(name, "Steps"), 1, 2000, DEFAULT_STEPS.get(name, 20),
                          key=f"adv_steps::{name}", disabled=name == "fgsm")  # fmt: skip
if minimal:
    left.caption(
        "Minimal-perturbation attack: the eps slider does not apply; see |δ|₂ below."
        + (" CW runs with c=10, lr=0.05 here." if name == "cw" else "")
    )
source = right.radio("Image", ["test set", "upload"], horizontal=True, key="adv_source")
# Drawn before anything can stop the page, so the toggle keeps its state (and shows it) whatever
# image source is picked; the analysis below runs only while it is on.
layers_on = left.toggle(
    f"Layer-by-layer analysis (first {N_LAYER_IMAGES} test images)", value=False, key="adv_layers"
)
curve_on = left.toggle(f"Robustness curve (first {N_LAYER_IMAGES} test images)", value=False, key="adv_curve")
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
TARGETS = ["none", "random", "least-likely", *range(10)]
target = right.selectbox("Target (targeted attack)", TARGETS, key="adv_target", disabled=name not in TARGETED,
                         help="FGSM, PGD, Square, CW and FAB take a target: a class, a random other class, or the "
                         "least likely one. The other attacks are untargeted.")  # fmt: skip
goal = None if target == "none" or name not in TARGETED else target

if image is not None:
    with common.guard():
        if name in ("square", "autoattack", "cw", "deepfool", "fab", "fab-t"):
            with common.progress(f"Running {kind}") as update:
                result = attack(model, image, [label], kind, eps, int(steps), goal, update)
        else:
            result = attack(model, image, [label], kind, eps, int(steps), goal)
        st.plotly_chart(result.figure(0))
        import plotly.graph_objects as go

        fig = go.Figure()
        fig.add_bar(x=list(range(10)), y=result.logits_clean[0].softmax(-1).tolist(), name="original")
        fig.add_bar(x=list(range(10)), y=result.logits_adv[0].softmax(-1).tolist(), name="adversarial")
        fig.update_layout(title="Predicted probabilities", xaxis_title="class", barmode="group", height=320)
        st.plotly_chart(fig)
        norms = result.norms()
        st.caption(f"|δ|∞ = {norms['linf'][0]:.3f}, |δ|₂ = {norms['l2'][0]:.3f}; true label {label}")
        if float(norms["linf"][0]) == 0 and name not in ("fgsm", "pgd"):
            st.caption(
                f"{kind} found no adversarial within its steps and returns the image unchanged (as torchattacks "
                "does): raise the steps."
                if minimal
                else f"{kind} did not break this image within its budget "
                "and returns it unchanged (as AutoAttack and torchattacks do): raise eps or the steps."
            )

st.subheader(f"Layer by layer, over the first {N_LAYER_IMAGES} test images")
st.caption(
    "Per-layer divergence of clean vs adversarial activations, linear probes (fitted on clean training "
    "images) scored on both, and how much accuracy returns when clean activations are patched in."
)
if not layers_on:
    st.info("Turn on the layer-by-layer analysis above to run it.")
else:
    with common.guard():
        adversarials = layer_adversarials(model_name, kind, float(eps), int(steps))
        with st.spinner("Probing every layer..."):
            probe = layer_analysis(model_name, kind, float(eps), int(steps), adversarials)
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

st.subheader("Robustness curve")
top = 2.0 if minimal else max(float(eps), 0.05)
st.caption(
    f"Accuracy of the first {N_LAYER_IMAGES} test images under {kind} at six budgets from 0 to "
    + (
        f"{top:g} in L2 (one run, read at each budget)."
        if minimal
        else f"{top:g} (the eps slider), one run each."
    )
)
if not curve_on:
    st.info("Turn on the robustness curve above to run it.")
else:
    with common.guard():
        result_curve = curve(model_name, kind, top, int(steps))
        from interp.viz import robustness_figure

        st.plotly_chart(robustness_figure([result_curve], title=f"Accuracy under {kind}"))
