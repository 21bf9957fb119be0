"""The Streamlit explorer, run headless with AppTest: every page renders what the library computes,
and bad input shows an error message, never an exception."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import circuitsvis
import numpy as np
import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

APP = Path(__file__).resolve().parents[1] / "apps" / "Home.py"
PAGES = ["Home", "views/activations.py", "views/attention.py"]
TIMEOUT = 180  # the first run loads MiniLM; the machine may be busy


def open_page(page: str = "Home") -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT).run()
    if page != "Home":
        at.switch_page(page).run()
    return at


def assert_clean(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def default_text(at: AppTest) -> str:
    return at.text_area(key="text").value


def figure_of(at: AppTest, index: int = 0) -> dict:
    return json.loads(at.get("plotly_chart")[index].proto.spec)


def decode(array) -> np.ndarray:
    """Plotly serializes numpy arrays as base64 typed arrays ({dtype, bdata, shape})."""
    if isinstance(array, dict) and "bdata" in array:
        data = np.frombuffer(base64.b64decode(array["bdata"]), dtype=np.dtype(array["dtype"]))
        shape = [int(s) for s in str(array.get("shape", len(data))).split(",")]
        return data.reshape(shape)
    return np.asarray(array)


def test_home_shows_the_model_and_the_tokens(minilm):
    at = open_page()
    assert_clean(at)
    assert at.title[0].value == "interp explorer"
    assert any(f"{minilm.n_layers} layers" in m.value and "minilm" in m.value for m in at.markdown)
    tokens = minilm.prepare(default_text(at)).str_tokens[0]
    assert at.code[0].value == " | ".join(tokens)
    pages = (Path(__file__).parents[1] / "apps" / "Home.py").read_text().count("st.Page(")
    assert len(at.get("page_link")) == pages - 1  # a link to every page but Home itself


def test_activations_page_draws_the_captured_activation(minilm):
    at = open_page("views/activations.py")
    assert_clean(at)
    assert at.title[0].value == "Activations"
    hook = at.selectbox[0]
    assert hook.value == "blocks.0.hook_resid_post"
    assert hook.options == minilm.hook_names
    assert at.get("dataframe")  # the table of hook names and shapes

    _, cache = minilm.run_with_cache(default_text(at), names=hook.value)
    figure = figure_of(at)
    z = decode(figure["data"][0]["z"])
    np.testing.assert_allclose(z, cache[hook.value][0].numpy(), rtol=1e-5, atol=1e-6)
    assert figure["layout"]["yaxis"]["ticktext"] == cache.meta["str_tokens"][0]


def test_activations_page_slices_a_four_dimensional_hook(minilm):
    at = open_page("views/activations.py")
    at.selectbox[0].set_value("blocks.1.attn.hook_pattern").run()
    assert_clean(at)
    (head,) = at.number_input
    assert head.label.startswith("head")
    head.set_value(3).run()
    assert_clean(at)
    _, cache = minilm.run_with_cache(default_text(at), names="blocks.1.attn.hook_pattern")
    z = decode(figure_of(at)["data"][0]["z"])
    np.testing.assert_allclose(z, cache["pattern", 1][0, 3].numpy(), rtol=1e-5, atol=1e-6)


def circuitsvis_views(at: AppTest) -> list[tuple[str, dict]]:
    """The (circuitsvis component name, props) of each view the page drew with the
    ``circuitsvis_view`` component (apps/components/circuitsvis/: served from the checkout, no url)."""
    views = []
    for element in at.get("component_instance"):
        assert element.proto.component_name.endswith("circuitsvis_view") and not element.proto.url
        args = json.loads(element.proto.json_args)
        views.append((args["name"], json.loads(args["props"])))
    return views


def test_attention_page_embeds_circuitsvis_offline(minilm):
    at = open_page("views/attention.py")
    assert_clean(at)
    assert at.title[0].value == "Attention"
    layer = at.selectbox[0]
    assert [int(o) for o in layer.options] == list(range(minilm.n_layers))

    layer.set_value(2).run()
    assert_clean(at)
    assert not at.get("iframe")
    ((name, props),) = circuitsvis_views(at)
    assert name == "AttentionHeads"
    assert props["attentionHeadNames"] == [f"L2H{h}" for h in range(minilm.cfg.n_heads)]
    text = default_text(at)
    assert props["tokens"] == minilm.prepare(text).str_tokens[0]
    _, cache = minilm.run_with_cache(text, names="blocks.2.attn.hook_pattern")
    np.testing.assert_allclose(np.array(props["attention"]), cache["pattern", 2][0].numpy(), atol=5.1e-5)
    # the component's page loads circuitsvis from its own folder (a copy of the installed bundle)
    page = (APP.parent / "components" / "circuitsvis" / "index.html").read_text()
    assert re.findall(r"<script\b[^>]*\bsrc=[^>]*>", page) == ['<script src="circuitsvis.js">']
    bundle = Path(circuitsvis.__file__).parent / "dist" / "cdn" / "iife.js"
    assert (APP.parent / "components" / "circuitsvis" / "circuitsvis.js").read_bytes() == bundle.read_bytes()


def test_a_local_model_directory_loads(gpt2_dir, gpt2_model):
    at = open_page("views/activations.py")
    at.text_input(key="model_spec").input(gpt2_dir).run()
    at.text_area(key="text").input("the cat sat on the mat").run()
    assert_clean(at)
    assert at.selectbox[0].options == gpt2_model.hook_names
    assert any(f"{gpt2_model.n_layers} layers" in m.value for m in at.markdown)
    assert at.get("plotly_chart")


@pytest.mark.parametrize("page", PAGES)
def test_bad_model_path_shows_the_library_message(page, tmp_path):
    at = open_page(page)
    missing = str(tmp_path / "no-such-model")
    at.text_input(key="model_spec").input(missing).run()
    assert not at.exception
    assert any(missing in e.value and "config.json" in e.value for e in at.error), [e.value for e in at.error]


@pytest.mark.parametrize("page", PAGES)
def test_empty_text_shows_an_error(page):
    at = open_page(page)
    at.text_area(key="text").input("   ").run()
    assert not at.exception
    assert any("empty" in e.value for e in at.error)
    assert not at.get("plotly_chart") and not at.get("iframe") and not at.get("component_instance")


@pytest.mark.parametrize("page", PAGES)
def test_too_long_text_shows_the_library_message(page, gpt2_dir, gpt2_model):
    at = open_page(page)
    at.text_input(key="model_spec").input(gpt2_dir).run()
    at.text_area(key="text").input(" ".join(["cat"] * (gpt2_model.n_ctx + 5))).run()
    assert not at.exception
    assert any(f"at most {gpt2_model.n_ctx}" in e.value for e in at.error), [e.value for e in at.error]


def test_attention_at_full_context_draws_one_head_not_every_head(minilm):
    """Past viz.MAX_ATTENTION_VIEW_TOKENS the all-heads view froze the browser (46 s at 300 words):
    the page says so and draws the chosen head's full pattern as a heatmap instead."""
    from interp import viz

    at = open_page("views/attention.py")
    text = " ".join(["the cat sat on the mat"] * 80)  # ~480 words, within MiniLM's 512 tokens
    at.text_area(key="text").input(text).run()
    assert_clean(at)
    assert not at.get("iframe") and not at.get("component_instance")
    assert any(f"more than the {viz.MAX_ATTENTION_VIEW_TOKENS}" in i.value for i in at.info)
    at.selectbox(key="attention_head::minilm").set_value(5).run()
    _, cache = minilm.run_with_cache(text, names="blocks.0.attn.hook_pattern")
    z = decode(figure_of(at)["data"][0]["z"])
    np.testing.assert_allclose(z, cache["pattern", 0][0, 5].numpy(), rtol=1e-5, atol=1e-6)
