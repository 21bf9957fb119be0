"""The Circuits page: the graph it draws is the library's pruned graph, an intervention shows what
``interp.graphs.intervene`` computes, and bad prompts are messages, not tracebacks."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

APPS = Path(__file__).resolve().parents[1] / "apps"
graphs = pytest.importorskip("interp.graphs")


def _page(prompt: str | None = None) -> AppTest:
    if str(APPS) not in sys.path:
        sys.path.insert(0, str(APPS))
    at = AppTest.from_file(str(APPS / "views" / "circuits.py"), default_timeout=300)
    if prompt is not None:
        at.session_state["circuits_prompt"] = prompt
    return at


@pytest.fixture(scope="module")
def library():
    from interp.reproductions import circuits

    return circuits.load_parts()


def test_page_draws_the_pruned_graph_and_intervenes(library) -> None:
    model, transcoders = library
    prompt = "the dog that the cats chase"
    at = _page(prompt)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    pruned = graphs.attribute(model, transcoders, prompt, progress=False).prune(0.8, 0.98)
    chart = json.loads(at.get("plotly_chart")[0].proto.spec)
    drawn = sum(len(t["x"]) for t in chart["data"] if t.get("mode") == "markers")
    assert drawn == len(pruned.nodes)
    hovers = [h for t in chart["data"] if t.get("name") == "feature" for h in t["hovertext"]]
    assert hovers and all("promotes:" in h and "top contexts:" in h for h in hovers)

    # the default edit ablates the most influential kept feature; the table shows the real model's answer
    pick = at.selectbox(key="circuits_feature").value
    node = pruned.nodes[pick]
    result = graphs.intervene(model, transcoders, prompt, [(node.layer, node.pos, node.feature, 0.0)])
    table = at.dataframe[0].value
    want = model.tokenizer.names[int(result.logits[-1].argmax())]
    assert table.iloc[0]["token"] == want
    assert table.iloc[0]["p after"] == pytest.approx(float(result.logits[-1].softmax(-1).max()), abs=1e-5)
    assert not at.get("progress")  # the progress bar is gone once the graph is drawn


def test_unknown_word_and_too_long_prompt_are_messages() -> None:
    for prompt, message in (
        ("when Mary, and John", "not a word of this model"),
        (" ".join(["the dog"] * 40), "n_ctx"),
    ):
        at = _page(prompt)
        at.run()
        assert not at.exception, [e.value for e in at.exception]
        assert any(message in e.value for e in at.error), [e.value for e in at.error]
        assert not at.get("plotly_chart")


def test_sidebar_pages_read_the_grammar_model_in_words() -> None:
    """zoo:grammar-4l in the sidebar: its input box holds a prompt of the toy language, read as words."""
    from interp.models.zoo import grammar

    if str(APPS) not in sys.path:
        sys.path.insert(0, str(APPS))
    at = AppTest.from_file(str(APPS / "Home.py"), default_timeout=300)
    at.session_state["model_spec"] = "zoo:grammar-4l"
    at.run()
    assert not at.exception and not at.error, [e.value for e in (*at.exception, *at.error)]
    assert at.text_area(key="text::zoo:grammar-4l").value == grammar.SAMPLES[0]
    assert at.code[0].value == " | ".join(["BOS", *grammar.SAMPLES[0].split()])
