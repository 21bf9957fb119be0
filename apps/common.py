"""What every explorer page shares: the sidebar, cached model loading and capture, error display.

The explorer only calls the library. A page gets its inputs with ``model_and_text()``, runs library
calls inside ``with guard():`` and draws what comes back; bad input becomes an ``st.error`` with
the library's own message, never a traceback.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import streamlit as st

import interp
from interp.errors import InterpError

DEFAULT_MODEL = "minilm"
DEFAULT_TEXT = "When Mary and John went to the store, John gave a drink to Mary."
MODEL_KEY = "model_spec"
TEXT_KEY = "text"


def sidebar() -> None:
    """The model picker and the text box; drawn once by the entry script, so they hold across pages."""
    with st.sidebar:
        st.text_input(
            "Model",
            value=DEFAULT_MODEL,
            key=MODEL_KEY,
            help=f"'{DEFAULT_MODEL}' (embedded, works offline), a zoo model ('zoo:NAME'), "
            "or the path of a local Hugging Face model directory (config.json + weights + tokenizer).",
        )
        st.text_area(
            "Text", value=DEFAULT_TEXT, key=TEXT_KEY, height=110, help="The input every page analyses."
        )


@st.cache_resource(show_spinner=False, max_entries=4)
def load_model(spec: str) -> interp.HookedModel:
    """Load a model once per server process (shared by every session and page)."""
    return interp.load(spec)


def current_spec() -> str:
    return str(st.session_state.get(MODEL_KEY, DEFAULT_MODEL)).strip()


def capture(text: str, names: list[str] | tuple[str, ...]) -> tuple[dict[str, np.ndarray], list[str]]:
    """The named activations of the sidebar model for ``text`` (batch row 0, as numpy arrays) and
    its token strings; cached per (model, text, names)."""
    return _capture(current_spec(), text, tuple(names))


@st.cache_data(show_spinner=False, max_entries=64)
def _capture(spec: str, text: str, names: tuple[str, ...]) -> tuple[dict[str, np.ndarray], list[str]]:
    model = load_model(spec)
    _, cache = model.run_with_cache(text, names=list(names), stop_early=True)
    activations = {name: cache[name][0].float().cpu().numpy() for name in cache}
    return activations, list(cache.meta["str_tokens"][0])


def show_error(err: BaseException) -> None:
    """The library's message for its own errors; a one-line summary for anything else."""
    if isinstance(err, InterpError):
        st.error(str(err))
    else:
        first_line = (str(err).strip().splitlines() or [""])[0][:300]
        st.error(f"Something went wrong ({type(err).__name__}): {first_line}")


@contextmanager
def guard() -> Iterator[None]:
    """Run library calls; show any error as a message and end the block instead of raising."""
    try:
        yield
    except Exception as err:  # st.stop()/rerun are BaseExceptions and pass through
        show_error(err)


def current_model() -> interp.HookedModel | None:
    """The model named in the sidebar, or None after showing why it could not be loaded."""
    spec = current_spec()
    if not spec:
        st.error("Enter a model in the sidebar: 'minilm' or the path of a local model directory.")
        return None
    try:
        with st.spinner(f"Loading {spec}..."):
            return load_model(spec)
    except Exception as err:
        show_error(err)
        return None


def current_text() -> str | None:
    """The sidebar text, or None after showing an error when it is empty."""
    text = str(st.session_state.get(TEXT_KEY, DEFAULT_TEXT))
    if not text.strip():
        st.error("The text is empty. Type some text in the sidebar to analyse.")
        return None
    return text


def model_and_text(needs_text: bool = True) -> tuple[interp.HookedModel, str]:
    """Both inputs of a page, or stop the page after showing what is wrong with them."""
    model = current_model()
    text = current_text() if needs_text else ""
    if model is None or text is None:
        st.stop()
    return model, text


def model_summary(model: interp.HookedModel) -> str:
    """One line about the loaded model for a page header."""
    parts = [f"**{model.name}**", model.kind]
    if model.kind == "transformer":
        cfg = getattr(model, "cfg", None)
        parts += [
            f"{model.n_layers} layers",
            f"{getattr(cfg, 'n_heads', '?')} heads",
            f"d_model {getattr(cfg, 'd_model', '?')}",
        ]
    parts.append(f"{len(model.hook_names)} hook points")
    return " · ".join(parts)


def format_shape(shape: tuple | None) -> str:
    return "unknown" if shape is None else "(" + ", ".join(str(d) for d in shape) + ")"
