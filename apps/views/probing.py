"""Probing: choose a model's property and hook points; see per-layer probe accuracy with its control task."""

from __future__ import annotations

import common
import streamlit as st
import torch

import interp
from interp.methods import probing as P

TASKS = {
    "digits-cnn: the digit's class": "digits",
    "MiniLM: is the subject plural? (templated sentences, probe at the final '.')": "number",
}


@st.cache_resource(show_spinner=False)
def digits_model() -> interp.HookedModel:
    from interp.reproductions.adversarial import load_digits_model

    return load_digits_model("digits-cnn")


def dataset(task: str, n: int):
    """(model, inputs, labels, probe_sweep kwargs) for a task."""
    if task == "digits":
        from interp.models import zoo

        x, y, _, _ = zoo.digits_data(0)
        return digits_model(), x[:n], y[:n], {}
    data = P.subject_number_dataset(n, seed=0)
    return (
        common.load_model("minilm"),
        data["text"],
        torch.tensor(data["label"]),
        {"position": -2, "types": data["noun"]},
    )


@st.cache_data(show_spinner=False, max_entries=16)
def run_sweep(
    task: str, names: tuple[str, ...], C: float, control: bool, n: int, labels_from: str
) -> P.ProbeSweep:
    model, inputs, labels, kwargs = dataset(task, n)
    if labels_from == "random (sanity check)":
        labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]
    return P.probe_sweep(model, inputs, labels, names=list(names), C=C, control=control, **kwargs)


st.title("Probing")
st.caption(
    "A linear probe per hook point, scored on a held-out quarter; the control task (Hewitt & Liang 2019) "
    "gives each input type a random label, and selectivity = accuracy - control accuracy."
)
st.info(
    "This page uses its own models and data (the digits CNN on its test images, or MiniLM on "
    "templated sentences), not the sidebar's model and text.",
    icon="ℹ️",
)
task = TASKS[st.selectbox("Property", list(TASKS), key="probe_task")]
model = None
with common.guard(), st.spinner("Loading the model..."):
    model = dataset(task, 8)[0]
if model is None:
    st.stop()
default = P.default_names(model)
names = st.multiselect("Hook points", model.hook_names, default=default, key=f"probe_names::{task}")
left, right = st.columns(2)
n = left.number_input(
    "examples", 40, 1437 if task == "digits" else 1000, 300 if task == "digits" else 160, key="probe_n"
)
C = left.select_slider("C (inverse L2 strength)", [0.01, 0.1, 1.0, 10.0], value=0.1, key="probe_C")
control = right.checkbox("control task", value=True, key="probe_control")
labels_from = right.radio("labels", ["the property", "random (sanity check)"], key="probe_labels")
if not names:
    st.info("Choose at least one hook point.")
    st.stop()
settings = (task, tuple(names), float(C), bool(control), int(n), labels_from)
if st.button("Fit probes", type="primary", key="probe_run"):
    st.session_state["probe_fitted"] = settings
if st.session_state.get("probe_fitted") != settings:  # fit only on the button, never on a change
    st.info(
        "Choose the property, hook points and settings, then fit the probes."
        if "probe_fitted" not in st.session_state
        else "The settings changed since the last fit: press **Fit probes** to fit them."
    )
    st.stop()
with common.guard(), st.spinner("Capturing and fitting probes..."):
    sweep = run_sweep(*settings)
    st.plotly_chart(sweep.figure())
    st.dataframe(
        {
            "hook point": sweep.names,
            "accuracy": sweep.accuracy.numpy(),
            "control": sweep.control_accuracy.numpy(),
            "selectivity": sweep.selectivity.numpy(),
            "train accuracy": sweep.train_accuracy.numpy(),
        },
        hide_index=True,
    )
    st.caption(
        f"majority-class accuracy {sweep.chance:.3f}; {sweep.config['n_train']} train / {sweep.config['n_test']} test"
    )
