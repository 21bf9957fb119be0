"""The Causal explorer page, run headless with AppTest on the tiny GPT-2 directory: patching with
the AtP estimate beside it, DLA bars and the logit-lens table, and errors as messages."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

APPS = Path(__file__).resolve().parents[1] / "apps"
PAGE = APPS / "views" / "causal.py"


@pytest.fixture
def page(gpt2_dir):
    if str(APPS) not in sys.path:
        sys.path.insert(0, str(APPS))
    at = AppTest.from_file(str(PAGE), default_timeout=180)
    at.session_state["model_spec"] = gpt2_dir
    return at


def test_patching_atp_dla_and_lens_render(page):
    at = page.run()
    assert not at.exception, [e.value for e in at.exception]
    at.radio(key="causal_source::" + at.session_state["model_spec"]).set_value("Repeated tokens").run()
    at.button(key="causal_run").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    charts = at.get("plotly_chart")
    assert len(charts) >= 4  # exact, AtP, EAP edges, DLA bars
    assert any("Pearson r" in c.value for c in at.caption)
    assert len(at.dataframe) >= 3  # top patches, top edges, logit lens
    edges = at.dataframe[1].value
    assert edges["edge"].str.startswith("sender=").all()


def test_mismatched_prompts_show_the_library_message(page):
    at = page.run()
    at.text_input(key="causal_clean").set_value("the cat sat").run()
    at.text_input(key="causal_corrupted").set_value("the cat sat on the mat").run()
    at.button(key="causal_run").click().run()
    assert not at.exception
    assert any("different token lengths" in e.value for e in at.error)


def test_post_ln_encoder_explains_why_it_has_no_edges(page):
    """MiniLM (BERT, post-LN): patching and AtP render; the edge section says why there are no edge scores."""
    page.session_state["model_spec"] = "minilm"
    at = page.run()
    at.selectbox(key="causal_site::minilm").set_value("resid_pre").run()
    at.button(key="causal_run").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    assert any("post-LN" in i.value for i in at.info)
    assert len(at.get("plotly_chart")) >= 2


def test_an_error_clears_the_old_results_and_the_progress_bar(page):
    at = page.run()
    at.button(key="causal_run").click().run()
    assert any("Pearson r" in c.value for c in at.caption)  # a first, good run
    at.text_input(key="causal_corrupted").set_value("a much longer corrupted prompt than before").run()
    at.button(key="causal_run").click().run()
    assert not at.exception
    assert any("different token lengths" in e.value for e in at.error)
    assert not any("Pearson r" in c.value for c in at.caption)  # the old plots are gone
    assert not at.get("progress")


def test_modadd_takes_id_prompts_and_never_raises():
    """zoo:modadd-113 reads 3 tokens: no repeated-token input fits, so it patches id prompts."""
    if str(APPS) not in sys.path:
        sys.path.insert(0, str(APPS))
    at = AppTest.from_file(str(PAGE), default_timeout=180)
    at.session_state["model_spec"] = "zoo:modadd-113"
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.radio(key="causal_source::zoo:modadd-113").options == ["Prompts"]
    at.button(key="causal_run").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("Pearson r" in c.value for c in at.caption)
