"""Every explorer page x every zoo transformer x (normal, empty, overlong) input, headless with
AppTest: no exception anywhere, the text pages draw the model's own input, and bad input is the
library's one-line message. Zoo transformers read token ids (named t0, t1, ...), so the sidebar
fills in an input of the kind each was trained on (``viz.sample_text``)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

import interp  # noqa: E402
from interp import viz  # noqa: E402

APPS = Path(__file__).resolve().parents[1] / "apps"
ZOO = ["zoo:induction-2l", "zoo:induction-1l", "zoo:modadd-113"]
TEXT_PAGES = ["Home", "views/activations.py", "views/attention.py", "views/features.py"]
OTHER_PAGES = ["views/causal.py", "views/probing.py", "views/adversarial.py", "views/reproductions.py"]
TIMEOUT = 300


@pytest.fixture(scope="module")
def zoo_models() -> dict[str, interp.HookedModel]:
    return {spec: interp.load(spec) for spec in ZOO}


def open_app(spec: str, page: str) -> AppTest:
    if str(APPS) not in sys.path:
        sys.path.insert(0, str(APPS))
    at = AppTest.from_file(str(APPS / "Home.py"), default_timeout=TIMEOUT)
    at.session_state["model_spec"] = spec
    at.run()
    if page != "Home":
        at.switch_page(page).run()
    return at


def unexpected(at: AppTest) -> list[str]:
    """Exceptions, and errors that are not the library's own messages."""
    return [e.value for e in at.exception] + [
        e.value for e in at.error if e.value.startswith("Something went wrong")
    ]


def drawn(at: AppTest) -> int:
    return (
        len(at.get("plotly_chart")) + len(at.get("iframe")) + len(at.get("component_instance")) + len(at.code)
    )


@pytest.mark.parametrize("spec", ZOO)
@pytest.mark.parametrize("page", TEXT_PAGES)
def test_text_pages_take_every_zoo_transformer(page, spec, zoo_models):
    model = zoo_models[spec]
    at = open_app(spec, page)
    box = at.text_area(key=f"text::{spec}")
    assert box.value == viz.sample_text(model, seed=0)  # the sidebar's generated id input
    assert not unexpected(at), unexpected(at)
    assert not at.error, [e.value for e in at.error]
    assert drawn(at) > 0
    if page == "Home":  # the tokens shown are the model's own reading of the input
        assert at.code[0].value == " | ".join(model.to_str_tokens(box.value))

    at.text_area(key=f"text::{spec}").input("   ").run()  # fetched again: each run is a new tree
    assert not unexpected(at), unexpected(at)
    assert any("empty" in e.value for e in at.error), [e.value for e in at.error]

    at.text_area(key=f"text::{spec}").input(" ".join(["t1"] * (model.n_ctx + 5))).run()
    assert not unexpected(at), unexpected(at)
    assert any(f"at most {model.n_ctx}" in e.value for e in at.error), [e.value for e in at.error]


@pytest.mark.parametrize("spec", ZOO)
@pytest.mark.parametrize("page", OTHER_PAGES)
def test_other_pages_never_raise_with_a_zoo_transformer(page, spec, zoo_models):
    """Causal patches the zoo model on its own inputs; Probing, Adversarial and Reproductions use
    their own models and say so; none of them may raise whatever the sidebar holds."""
    model = zoo_models[spec]
    at = open_app(spec, page)
    assert not unexpected(at), unexpected(at)
    key = f"text::{spec}"
    for text in ("   ", " ".join(["t1"] * (model.n_ctx + 5)), viz.sample_text(model, seed=3)):
        at.text_area(key=key).input(text).run()
        assert not unexpected(at), unexpected(at)
    if page == "views/causal.py":
        at.button(key="causal_run").click().run()
        assert not unexpected(at), unexpected(at)
        assert not [e.value for e in at.error if "patch" in e.value.lower()]
        assert len(at.get("plotly_chart")) >= 2  # exact and AtP
    else:
        notes = [m.value for m in (*at.info, *at.caption, *at.markdown)]
        assert page.endswith("reproductions.py") or any("not the sidebar" in n for n in notes), notes


def test_sample_text_fits_each_zoo_vocabulary(zoo_models):
    for model in zoo_models.values():
        for seed in range(5):
            text = viz.sample_text(model, seed=seed)
            tokens = model.to_str_tokens(text)
            assert len(tokens) <= model.n_ctx
            if "=" in model.tokenizer.ids:  # modular addition: one "a b =" question
                assert len(tokens) == 3 and tokens[-1] == "="
            else:  # repeated random tokens after BOS: the second half copies the first
                body = tokens[1:]
                assert tokens[0] == "BOS" and body[: len(body) // 2] == body[len(body) // 2 :]
    assert viz.sample_text(interp.load("minilm")) is None  # a text model types English
