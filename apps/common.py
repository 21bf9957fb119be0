"""What every explorer page shares: the sidebar, cached model loading and capture, error display.

The explorer only calls the library. A page gets its inputs with ``model_and_text()``, runs library
calls inside ``with guard():`` and draws what comes back; bad input becomes an ``st.error`` with
the library's own message, never a traceback.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import streamlit as st

import interp
from interp import viz
from interp.errors import InterpError

DEFAULT_MODEL = "minilm"
DEFAULT_TEXT = "When Mary and John went to the store, John gave a drink to Mary."
MODEL_KEY = "model_spec"
TEXT_KEY = "text"


def sidebar() -> None:
    """The model picker, the input box and what each page uses; drawn once by the entry script, so
    they hold across pages. A zoo transformer that reads token ids gets its own input box, filled
    with an input of the kind it was trained on (``viz.sample_text``) and editable as id names."""
    with st.sidebar:
        st.text_input(
            "Model",
            value=DEFAULT_MODEL,
            key=MODEL_KEY,
            help=f"'{DEFAULT_MODEL}' (embedded, works offline), a zoo model ('zoo:NAME'), "
            "or the path of a local Hugging Face model directory (config.json + weights + tokenizer).",
        )
        model = _sidebar_model()
        if model is not None and viz.is_id_vocabulary(model):
            key = text_key(model)
            if key not in st.session_state:
                st.session_state[key] = viz.sample_text(model, seed=0)
            st.text_area(
                "Input (token names)",
                key=key,
                height=110,
                help="This model reads token ids, named t0, t1, ... (and BOS or = where it has them), "
                "separated by spaces. Edit them, or draw a new input of the kind it was trained on.",
            )
            st.button("New random input", on_click=_new_sample, args=(model,), key="sample_input")
        else:
            st.text_area(
                "Text", value=DEFAULT_TEXT, key=TEXT_KEY, height=110, help="The input every page analyses."
            )
        st.caption(pages_note(model))


def _sidebar_model() -> interp.HookedModel | None:
    """The sidebar's model, or None when it does not load (the page then shows why)."""
    spec = current_spec()
    if not spec:
        return None
    try:
        with st.spinner(f"Loading {spec}..."):
            return load_model(spec)
    except Exception:  # the page's current_model() reports the error
        return None


def text_key(model: interp.HookedModel | None) -> str:
    """The session key of the input box: one per id-vocabulary model, one shared by text models."""
    return f"{TEXT_KEY}::{current_spec()}" if viz.is_id_vocabulary(model) else TEXT_KEY


def _new_sample(model: interp.HookedModel) -> None:
    seed = st.session_state.get("sample_seed", 0) + 1
    st.session_state["sample_seed"] = seed
    st.session_state[text_key(model)] = viz.sample_text(model, seed=seed)


def pages_note(model: interp.HookedModel | None) -> str:
    """What each page will analyse with the sidebar's current model."""
    own = (
        "**Own models** (the sidebar is not used): Probing (digits-cnn, or MiniLM on templated "
        "sentences), Adversarial and the Features image tabs (digits CNNs), Reproductions (zoo checkpoints), "
        "Circuits (grammar-4l and its transcoders)."
    )
    if model is None:
        return own
    if model.kind != "transformer":
        return (
            f"**{model.name}** takes tensors, not text: Home and Activations list its hook points; "
            "the text pages do not apply. " + own
        )
    what = "the input above" if viz.is_id_vocabulary(model) else "the text above"
    causal = "generated repeated tokens" if viz.is_id_vocabulary(model) else "its own prompt pair"
    return (
        f"**{model.name} on {what}**: Home, Activations, Attention, Features (token tabs), Dictionary; "
        f"Causal uses {causal}. " + own
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


# Streamlit's height="content" sizes an iframe to the largest of several heights, one of them the
# document's scrollHeight, which never drops below the iframe's own height: once a view is drawn
# taller for a moment (circuitsvis lays out before its canvases are sized), the iframe stays that
# tall (2,152 px for 1,073 px of attention view). This script reports the height of what the body
# actually draws, with the same message Streamlit's own script sends, so the iframe shrinks to it.
# It answers the same events as Streamlit's script (load, DOM changes, resize, a sub-resource
# loading) and a ResizeObserver, and sends a task later, so its height comes after Streamlit's and
# wins. (Fixed fallback timers at 0.3 and 1.5 s resized the iframe late and set every re-render
# of a page with a view to ~1.5 s.)
FIT_SCRIPT = """<script>
(function () {
  var pending = false;
  function send() {
    pending = false;
    if (!document.body) return;
    var bottom = document.body.getBoundingClientRect().bottom;
    for (var e of document.body.children) bottom = Math.max(bottom, e.getBoundingClientRect().bottom);
    bottom += window.scrollY + parseFloat(getComputedStyle(document.body).marginBottom || 0);
    // the root's own box: what it draws with collapsed margins, but not the viewport's height
    var h = Math.ceil(Math.max(bottom, document.documentElement.getBoundingClientRect().height));
    var w = Math.ceil(document.documentElement.scrollWidth);
    window.parent.postMessage({type: "streamlit:iframe:setSize", width: w, height: h}, "*");
  }
  function later() {
    if (!pending) { pending = true; setTimeout(send, 0); }
  }
  window.addEventListener("load", later);
  window.addEventListener("resize", later);
  document.addEventListener("load", later, true);
  if (document.readyState === "complete") later();
  if (typeof ResizeObserver !== "undefined") new ResizeObserver(later).observe(document.body);
  if (typeof MutationObserver !== "undefined") {
    new MutationObserver(later).observe(document.body, {childList: true, subtree: true, attributes: true, characterData: true});
  }
})();
</script>"""


def embed(html: str, alt: str, key: str | None = None) -> None:
    """A self-contained HTML view (circuitsvis...) exactly as tall as what it draws.

    With a ``key``, a circuitsvis view is drawn by the ``circuitsvis_view`` component: its page
    and circuitsvis's bundle load once, and a re-run with new data (another layer, text or
    finding) only draws the new view, in place (~0.1 s instead of a fresh iframe running the
    1.3 MB bundle again, ~1.5 s). The key keeps that iframe across re-runs: give each view on a
    page its own key that stays the same when its data changes. Other HTML, and circuitsvis views
    where the component's files cannot be written, go into an ``st.iframe`` as before.
    """
    call = circuitsvis_call(html) if key is not None else None
    viewer = _circuitsvis_component() if call is not None else None
    if call is None or viewer is None:
        st.iframe(shared_scripts(html) + FIT_SCRIPT, height="content", alt=alt)
        return
    name, props = call
    viewer(name=name, props=props, alt=alt, key=key, default=None)


def view_slot(key: str) -> None:
    """An empty (0 px) place for a keyed circuitsvis view: a page that shows a view for some
    inputs and none for others keeps the view's iframe, and circuitsvis's loaded bundle, while
    the view is away, so the next view is drawn in place instead of in a fresh iframe."""
    viewer = _circuitsvis_component()
    if viewer is not None:
        viewer(name="", props="", alt="", key=key, default=None)


# The end of circuitsvis's render_local HTML (circuitsvis/utils/render.py): the call that draws
# the view, with the React component's name and its props as JSON.
CIRCUITSVIS_CALL = re.compile(
    r'CircuitsVis\.render\(\s*"[^"]*",\s*CircuitsVis\.(\w+),\s*(\{.*\})\s*\)\s*</script>\s*$', re.S
)
COMPONENT_DIR = Path(__file__).resolve().parent / "components" / "circuitsvis"


def circuitsvis_call(html: str) -> tuple[str, str] | None:
    """The React component name (``AttentionHeads``...) and JSON props of a circuitsvis view's
    self-contained HTML; None for any other HTML."""
    match = CIRCUITSVIS_CALL.search(html)
    return None if match is None else (match.group(1), match.group(2))


def _circuitsvis_component() -> Callable[..., Any] | None:
    """The ``circuitsvis_view`` component (apps/components/circuitsvis/); None where circuitsvis's
    bundle cannot be copied beside its page. Declared (registered with the runtime) on each call."""
    import streamlit.components.v1 as components

    if not _component_bundle():
        return None
    return components.declare_component("circuitsvis_view", path=str(COMPONENT_DIR))


@cache
def _component_bundle() -> bool:
    """Whether circuitsvis.js beside the component's page is (now) the installed circuitsvis's
    bundle, written once per process (atomically) from circuitsvis/dist/cdn/iife.js."""
    import circuitsvis

    bundle = Path(circuitsvis.__file__).parent / "dist" / "cdn" / "iife.js"
    target = COMPONENT_DIR / "circuitsvis.js"
    try:
        script = bundle.read_bytes()
        if not target.is_file() or target.read_bytes() != script:
            partial = target.with_suffix(f".{os.getpid()}.tmp")
            partial.write_bytes(script)
            partial.replace(target)
    except OSError:
        return False
    return True


# circuitsvis inlines its whole 1.3 MB JavaScript bundle in every view, so each re-render made the
# browser parse and compile it again (about a second on this box). Served once as a static file
# (server.enableStaticServing, apps/.streamlit/config.toml), it is fetched and compiled once and
# then comes from the browser's cache. Without static serving, or where apps/static/ cannot be
# written, views stay self-contained.
STATIC_DIR = Path(__file__).resolve().parent / "static"
CIRCUITSVIS_BUNDLE = re.compile(
    r'(<script crossorigin type="module">)\s*("use strict";var CircuitsVis=.*?//# sourceMappingURL=iife\.js\.map)',
    re.S,
)


def shared_scripts(html: str) -> str:
    """``html`` with circuitsvis's inlined bundle replaced by a script tag for its static copy."""
    match = CIRCUITSVIS_BUNDLE.search(html)
    if match is None or not st.get_option("server.enableStaticServing"):
        return html
    url = _static_copy(match.group(2))
    if url is None:
        return html
    return f'{html[: match.start()]}<script src="{url}"></script>\n{match.group(1)}{html[match.end() :]}'


@cache
def _static_copy(script: str) -> str | None:
    """The app-relative URL of ``script`` written once (atomically) under apps/static/."""
    name = f"circuitsvis-{hashlib.sha256(script.encode()).hexdigest()[:16]}.js"
    path = STATIC_DIR / name
    try:
        if not path.is_file():
            STATIC_DIR.mkdir(exist_ok=True)
            partial = path.with_suffix(f".{os.getpid()}.tmp")
            partial.write_text(script)
            partial.replace(path)
    except OSError:
        return None
    return f"app/static/{name}"  # relative: resolves against the page (and any server.baseUrlPath)


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


@contextmanager
def progress(label: str) -> Iterator[Callable[[int, int], None]]:
    """A ``callback(done, total)`` for the library that drives an ``st.progress`` bar; the bar is
    removed when the block ends, finished or failed, so none is left standing at 100%."""
    bar = st.progress(0.0, text=label)

    def update(done: int, total: int) -> None:
        if done == total or done % 8 == 0:
            bar.progress(min(1.0, done / max(total, 1)), text=f"{label}: {done}/{total}")

    try:
        yield update
    finally:
        bar.empty()


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
    key = text_key(_sidebar_model())
    text = str(st.session_state.get(key, DEFAULT_TEXT if key == TEXT_KEY else ""))
    if not text.strip():
        st.error("The text is empty. Type some text (or token names) in the sidebar to analyse.")
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
