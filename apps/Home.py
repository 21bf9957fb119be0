"""The interp explorer: `streamlit run apps/Home.py`, then open http://localhost:8501.

This entry script routes to the pages with ``st.navigation`` and draws the shared sidebar (model
and text) on every page, so both hold when you switch pages. To add a page, write
``apps/views/<name>.py`` (start it with ``model, text = common.model_and_text()``) and add one
``st.Page`` line to ``PAGES`` below. (The folder is not called ``pages/``: Streamlit would take
that for an old-style multipage app and run its files without this script.)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import streamlit as st

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the explorer never reaches for the hub on its own
APP_DIR = str(Path(__file__).resolve().parent)
if APP_DIR not in sys.path:  # `streamlit run` adds it; AppTest and other runners may not
    sys.path.insert(0, APP_DIR)

import common  # noqa: E402


def home() -> None:
    st.title("interp explorer")
    st.markdown(
        "Pick a model and type a text in the sidebar, then open a page: **Activations** and "
        "**Attention** show what the model computes on the text; **Causal** patches, ablates and "
        "attributes to find what matters; **Probing** and **Adversarial** train probes and attack "
        "inputs to see where an attack bites; **Features** shows what units respond to; "
        "**Dictionary** browses a sparse dictionary's latents and steers with them; "
        "**Reproductions** puts published findings next to ours; **Circuits** traces the attribution "
        "graph of a prompt on the grammar model and intervenes on its features."
    )
    model = common.current_model()
    text = common.current_text()
    if model is None or text is None:
        return
    st.markdown(common.model_summary(model))
    if model.kind != "transformer":
        st.info("This model takes tensor inputs, not text: the text pages do not apply to it.")
        return
    with common.guard():
        tokens = model.prepare(text).str_tokens[0]  # validated: too long is an error here too
        st.subheader(f"Tokens ({len(tokens)})")
        st.code(" | ".join(tokens), language=None, wrap_lines=True)
    for page in PAGES[1:]:
        st.page_link(page, label=page.title)


PAGES = [
    st.Page(home, title="Home", default=True),
    st.Page("views/activations.py", title="Activations"),
    st.Page("views/attention.py", title="Attention"),
    st.Page("views/causal.py", title="Causal"),
    st.Page("views/probing.py", title="Probing"),
    st.Page("views/adversarial.py", title="Adversarial"),
    st.Page("views/features.py", title="Features"),
    st.Page("views/dictionary.py", title="Dictionary"),
    st.Page("views/reproductions.py", title="Reproductions"),
    st.Page("views/circuits.py", title="Circuits"),
]

st.set_page_config(page_title="interp explorer", layout="wide")
page = st.navigation(PAGES)
common.sidebar()  # after st.navigation, so it is drawn as part of whichever page runs
page.run()
