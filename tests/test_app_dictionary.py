"""The Dictionary explorer page, headless with AppTest: it draws what interp.sae computes for a
dictionary typed in as a folder (a small SAE trained on MiniLM in a fixture, so nothing depends on
the shipped zoo), and bad input (a wrong folder, a dictionary for another model) is a message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402
from test_app import decode  # noqa: E402

from interp import sae as S  # noqa: E402
from interp.methods import examples as ex  # noqa: E402

APP = Path(__file__).resolve().parents[1] / "apps" / "Home.py"
TIMEOUT = 180  # the first run loads MiniLM; the machine may be busy


def open_page(folder: str | None) -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT).run()
    at.switch_page("views/dictionary.py").run()
    if folder is not None:
        source = [r for r in at.radio if r.key == "dict_source::minilm"]  # only when a zoo one fits
        if source and source[0].value != "Directory":
            source[0].set_value("Directory").run()
        at.text_input(key="dict_path::minilm").set_value(folder).run()
    return at


def assert_clean(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def latent_box(at: AppTest):
    return next(s for s in at.selectbox if s.key.startswith("dict_latent::"))


def test_dictionary_page_browses_a_latent_and_steers(minilm, minilm_sae_dir):
    at = open_page(minilm_sae_dir)
    assert_clean(at)
    assert at.title[0].value == "Dictionary"
    sae = S.load(minilm_sae_dir)
    stats = S.latent_stats(minilm, sae, ex.sample_inputs(minilm))
    # browse by max activation (the default), then by density: the first option is the library's order
    assert latent_box(at).options[0].startswith(f"{stats.order('max_activation')[0]}:")
    at.selectbox(key="dict_order").set_value("density").run()
    assert_clean(at)
    densest = stats.order("density")[0]
    assert latent_box(at).value == densest
    assert at.subheader[0].value == f"Latent {densest}"
    assert any(m.label == "Density" and m.value == f"{float(stats.density[densest]):.3%}" for m in at.metric)
    assert any("No logit effects" in i.value and "no unembedding" in i.value for i in at.info)
    hist = json.loads(at.get("plotly_chart")[0].proto.spec)
    dash = S.dashboard(minilm, sae, densest, ex.sample_inputs(minilm), k=10)
    assert decode(hist["data"][0]["y"]).tolist() == dash.histogram["counts"]
    assert sum(dash.histogram["counts"]) == dash.n_active
    frames = at.get("iframe")
    assert frames and f"#{dash.examples[0].index} " in frames[0].proto.srcdoc

    # steer (the default action): the page's pooled cosine is the library's
    text = at.text_area(key="text").value
    alpha = at.number_input(key=f"dict_alpha::{densest}").value
    change = S.intervene(minilm, sae, text, latent=densest, alpha=alpha)
    assert any(f"**{change.pooled_cosine:.4f}**" in c.value for c in at.caption)
    at.number_input(key=f"dict_alpha::{densest}").set_value(0.0).run()
    assert any("**1.0000**" in c.value for c in at.caption)  # α = 0 with the error term: no change
    at.radio(key="dict_action").set_value("splice").run()
    assert_clean(at)
    spliced = S.intervene(minilm, sae, text)
    assert any(
        f"**{spliced.pooled_cosine:.4f}**" in c.value and "without its error term" in c.value
        for c in at.caption
    )


def test_dictionary_page_bad_input_is_a_message(minilm, tmp_path):
    at = open_page(str(tmp_path / "nowhere"))
    assert not at.exception
    assert any("not found" in e.value for e in at.error)
    assert not at.get("plotly_chart")

    wrong = S.SAE(S.SAEConfig(d_in=32, d_sae=8, hook_name="blocks.2.hook_resid_post"))  # MiniLM is 384 wide
    S.save(wrong, tmp_path / "narrow")
    at.text_input(key="dict_path::minilm").set_value(str(tmp_path / "narrow")).run()
    assert not at.exception
    assert any("d_in=32" in e.value and "width 384" in e.value for e in at.error)

    elsewhere = S.SAE(S.SAEConfig(d_in=384, d_sae=8, hook_name="blocks.2.hook_resid_pst"))
    S.save(elsewhere, tmp_path / "typo")
    at.text_input(key="dict_path::minilm").set_value(str(tmp_path / "typo")).run()
    assert not at.exception
    assert any("blocks.2.hook_resid_post" in e.value for e in at.error)  # the closest hook is named

    (tmp_path / "typo" / S.io.WEIGHTS).write_bytes(b"\x00" * 64)  # corrupt weights, same folder
    at.text_input(key="dict_path::minilm").set_value(str(tmp_path / "typo") + "/").run()
    assert not at.exception
    assert any("sha256" in e.value or "corrupt" in e.value for e in at.error)
    assert not at.get("plotly_chart")  # nothing drawn past the error


def test_dictionary_page_before_after_for_a_language_model(gpt2_dir, gpt2_model, tmp_path):
    """A causal LM (the tiny GPT-2 typed into the sidebar): logit effects and next-token predictions
    before and after steering, as the library computes them."""
    sae = S.train(
        gpt2_model,
        "blocks.0.hook_resid_post",
        ex.sample_inputs(gpt2_model),
        arch="topk",
        d_sae=32,
        k=4,
        tokens=64 * 20,
        batch_size=64,
        progress=False,
    )
    S.save(sae, tmp_path / "sae")
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT).run()
    at.text_input(key="model_spec").set_value(gpt2_dir).run()
    at.switch_page("views/dictionary.py").run()
    at.text_input(key=f"dict_path::{gpt2_dir}").set_value(str(tmp_path / "sae")).run()
    assert_clean(at)
    latent = latent_box(at).value
    charts = {
        json.loads(c.proto.spec)["layout"]["title"]["text"]: json.loads(c.proto.spec)
        for c in at.get("plotly_chart")
    }
    effects = S.logit_effects(gpt2_model, sae, latent, k=10)
    bars = decode(charts["Logit effects (W_dec row @ W_U)"]["data"][0]["x"])
    assert sorted(bars.tolist()) == pytest.approx(
        sorted(effects.top_values + effects.bottom_values), abs=1e-5
    )
    alpha = at.number_input(key=f"dict_alpha::{latent}").value
    change = S.intervene(gpt2_model, sae, at.text_area(key="text").value, latent=latent, alpha=alpha)
    table = charts["Top predictions before and after"]["data"]
    assert decode(table[0]["y"]) == pytest.approx(change.predictions["before"], abs=1e-6)
    assert decode(table[1]["y"]) == pytest.approx(change.predictions["after"], abs=1e-6)
    assert any(f"KL(before ‖ after) = {change.kl:.4g}" in c.value for c in at.caption)


def test_dictionary_page_offers_only_the_zoo_dictionaries_that_fit(
    minilm, minilm_sae_dir, tmp_path, monkeypatch
):
    import shutil

    shutil.copytree(minilm_sae_dir, tmp_path / "minilm-small")
    S.save(
        S.SAE(S.SAEConfig(d_in=64, d_sae=8, hook_name="blocks.1.hook_resid_post")), tmp_path / "other-width"
    )
    monkeypatch.setattr(S.io, "ZOO_DIR", tmp_path)  # the shipped zoo is not this test's business
    at = open_page(None)
    assert_clean(at)
    assert at.radio(key="dict_source::minilm").value == "Zoo"
    assert at.selectbox(key="dict_zoo::minilm").options == ["minilm-small"]
    assert at.subheader and at.subheader[0].value.startswith("Latent ")
    assert any("256 latents at" in m.value for m in at.markdown)


@pytest.mark.slow  # loads zoo:modadd-113 twice (here and in the app): ~40 s on a busy machine
def test_dictionary_page_reads_a_modular_addition_model_on_its_own_questions(tmp_path):
    """zoo:modadd-113 only ever sees 'a b =': the page reads its latents on such questions."""
    import interp
    from interp import viz

    model = interp.load("zoo:modadd-113")
    questions = [viz.sample_text(model, seed=i) for i in range(256)]
    _, cache = model.run_with_cache(questions, names="blocks.0.hook_resid_post")
    acts = cache["blocks.0.hook_resid_post"].reshape(-1, 128)  # every question is 3 tokens: no padding
    sae = S.train(
        model, "blocks.0.hook_resid_post", acts, arch="topk", d_sae=64, k=4, tokens=1536, progress=False
    )
    S.save(sae, tmp_path / "sae")
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT).run()
    at.text_input(key="model_spec").set_value("zoo:modadd-113").run()
    at.switch_page("views/dictionary.py").run()
    source = [r for r in at.radio if r.key == "dict_source::zoo:modadd-113"]
    if source:  # a shipped transcoder fits it
        source[0].set_value("Directory").run()
    at.text_input(key="dict_path::zoo:modadd-113").set_value(str(tmp_path / "sae")).run()
    assert_clean(at)
    stats = S.latent_stats(model, sae, questions)
    assert stats.n_tokens == 3 * 256
    assert any(
        f"{stats.n_tokens} tokens of 256 random 'a b =' questions; {stats.dead} of 64" in c.value
        for c in at.caption
    )
