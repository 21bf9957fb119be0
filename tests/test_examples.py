"""Dataset examples: the streamed top-k equals an in-memory argsort, digits logits pick their own
class, transformer neurons and heads get token contexts, and bad input is a clear error."""

from __future__ import annotations

import json
import re

import pytest
import torch

from interp.errors import InputError
from interp.methods import examples as ex

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: 1 thread is fastest


@pytest.fixture(scope="module")
def test_set():
    from interp.models.zoo import digits_data

    _, _, x, y = digits_data()
    return x, y


def brute_force(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, U] scores -> ([U, k] indices, [U, k] scores) by a full stable argsort."""
    order = torch.sort(scores, dim=0, descending=True, stable=True).indices[:k]
    return order.T, scores.gather(0, order).T


def test_streamed_top_k_equals_an_in_memory_argsort(cnn, test_set, tmp_path):
    x, _ = test_set
    top = ex.top_k(cnn, x, "conv2.hook_out", k=7, batch_size=50, out_dir=tmp_path / "cap")
    _, cache = cnn.run_with_cache(x, names="conv2.hook_out")
    act = cache["conv2.hook_out"]
    indices, scores = brute_force(act.amax(dim=(2, 3)), 7)
    torch.testing.assert_close(top.scores, scores)
    assert torch.equal(top.indices, indices)
    assert top.units == list(range(32))
    torch.testing.assert_close(torch.as_tensor(top.maps[4][0]), act[indices[4, 0], 4])
    assert (tmp_path / "cap" / "manifest.json").is_file()  # the capture store did the streaming

    mean = ex.top_k(cnn, x, "conv2.hook_out", units=[3, 30], k=5, reduce_by="mean", batch_size=64)
    indices, scores = brute_force(act[:, [3, 30]].mean(dim=(2, 3)), 5)
    assert torch.equal(mean.indices, indices)
    torch.testing.assert_close(mean.scores, scores)
    fig = mean.figure(30)
    assert len(fig.data) == 10  # 5 images above their 5 activation maps


def test_top_logit_images_are_mostly_their_class(cnn, test_set):
    x, y = test_set
    seen = []
    top = ex.top_k(cnn, x, "fc.hook_out", k=10, callback=lambda done, total: seen.append((done, total)))
    hits = [int((y[top.indices[c]] == c).sum()) for c in range(10)]
    assert min(hits) >= 9, hits  # >= 90% of the top 10 (counted: 9/10 in float32 is 0.89999998)
    assert seen[-1] == (len(x), len(x))
    assert top.maps[0][0] is None  # a linear layer has no activation map


TEXTS = ["the cat sat on the mat", "a dog ran under the rug", "it was big and red", "the small blue cat ran"]


def test_transformer_neurons_and_heads_give_token_contexts(gpt2_model):
    top = ex.top_k(gpt2_model, TEXTS, "blocks.0.mlp.hook_post", units=[0, 5, 17], k=2, batch_size=3)
    per_text = []
    for text in TEXTS:
        _, cache = gpt2_model.run_with_cache(text, names="blocks.0.mlp.hook_post")
        per_text.append(cache["blocks.0.mlp.hook_post"][0][:, [0, 5, 17]].amax(0))
    indices, scores = brute_force(torch.stack(per_text), 2)
    assert torch.equal(top.indices, indices)
    torch.testing.assert_close(top.scores, scores)
    best = top.indices[1, 0].item()
    assert top.str_tokens[1][0] == gpt2_model.prepare(TEXTS[best]).str_tokens[0]
    html = top.html(5)
    assert "ColoredTokens" in html and "<script" in html
    assert json.dumps(" ‖ ")[1:-1] in html or " ‖ " in html  # the contexts' separator token

    heads = ex.top_k(gpt2_model, TEXTS, "blocks.1.attn.hook_pattern", k=1)
    assert heads.units == [0, 1, 2, 3]
    _, cache = gpt2_model.run_with_cache(
        TEXTS[heads.indices[2, 0].item()], names="blocks.1.attn.hook_pattern"
    )
    assert abs(cache["blocks.1.attn.hook_pattern"][0, 2].max().item() - heads.scores[2, 0].item()) < 1e-5


def test_bad_units_and_layers_are_clear_input_errors(cnn, test_set):
    x, _ = test_set
    with pytest.raises(InputError, match=r"unit index 32 is out of range: conv2.hook_out has 32 units"):
        ex.top_k(cnn, x[:20], "conv2.hook_out", units=[0, 32])
    with pytest.raises(InputError, match=r"fc.hook_out has no spatial dimensions .* no channel maps"):
        ex.channel_maps(cnn, x[:2], "fc.hook_out")
    with pytest.raises(InputError, match=r"unit 3 was not collected"):
        ex.top_k(cnn, x[:20], "fc.hook_out", units=[1], k=2).figure(3)
    maps = ex.channel_maps(cnn, x[:2], "conv1.hook_out", units=[2])
    assert maps.shape == (2, 1, 8, 8)


def per_text_max(model, texts, layer: str, unit: int) -> torch.Tensor:
    """Independent reference: each text's largest activation of ``unit`` (last axis), one forward per
    text so no padding enters the max."""
    out = []
    for text in texts:
        _, cache = model.run_with_cache(text, names=layer)
        out.append(cache[layer][0, :, unit].max())
    return torch.stack(out)


def test_unit_layers_and_sample_inputs_name_neurons_and_heads(minilm):
    kinds = ex.unit_layers(minilm)
    assert list(kinds) == ["MLP neurons", "Heads: output norm", "Heads: max attention"]
    assert kinds["MLP neurons"] == [f"blocks.{i}.mlp.hook_post" for i in range(minilm.n_layers)]
    assert kinds["Heads: output norm"][2] == "blocks.2.attn.hook_z"
    texts = ex.sample_inputs(minilm)
    assert texts == list(ex.SAMPLE_TEXTS) and len(set(texts)) == len(texts) >= 40


def test_neuron_samples_view_and_strongest_units(minilm, cnn):
    layer, texts = "blocks.1.mlp.hook_post", list(ex.SAMPLE_TEXTS[:12])
    top = ex.top_k(minilm, texts, layer, k=4, batch_size=5)
    best = torch.stack([per_text_max(minilm, texts, layer, u) for u in (3, 700)], 1).amax(0)
    torch.testing.assert_close(top.scores[[3, 700], 0], best, rtol=1e-5, atol=1e-5)
    ranked = top.strongest(3)
    assert [u for u, _ in ranked] == torch.argsort(top.scores[:, 0], descending=True)[:3].tolist()

    unit = ranked[0][0]
    html = top.samples_html(unit, k=3, unit_name="Neuron")
    assert "CircuitsVis.TopkSamples" in html and not re.findall(r"<script\b[^>]*\bsrc=", html)
    shown = [json.dumps(ex.readable_tokens(t)) for t in top.str_tokens[top.row(unit)]]  # spaced words
    where = [html.index(shown[r]) for r in range(3)]
    assert where == sorted(where)  # best context first
    assert shown[3] not in html  # k=3 of the 4 collected
    with pytest.raises(InputError, match="samples_html\\(\\) shows token contexts"):
        ex.top_k(cnn, torch.rand(4, 1, 8, 8), "fc.hook_out", k=1).samples_html(0)


def test_a_model_trained_on_ids_gets_repeated_tokens_and_id_names(cnn):
    import interp

    model = interp.load("zoo:induction-2l")
    assert list(ex.unit_layers(model)) == ["Heads: output norm", "Heads: max attention"]  # attention-only
    ids = ex.sample_inputs(model, n=6, half_len=5)
    assert ids.shape == (6, 10) and torch.equal(ids[:, :5], ids[:, 5:])
    assert torch.equal(ids, ex.sample_inputs(model, n=6, half_len=5))  # seeded
    top = ex.top_k(model, ids, "blocks.1.attn.hook_pattern", k=2)
    names = [f"t{int(t)}" if t < 64 else "BOS" for t in ids[top.indices[0, 0]]]  # the zoo's id names
    assert top.str_tokens[0][0] == names
    with pytest.raises(InputError, match="not a transformer"):
        ex.unit_layers(cnn)


# ------------------------------------------------------------------------------------------------
# The explorer's Features page: neuron and head contexts (AppTest, headless)
# ------------------------------------------------------------------------------------------------


def contexts_view(page) -> str:
    """The props (JSON, as circuitsvis wrote them) of the page's top-contexts view: the one
    ``circuitsvis_view`` component that draws TopkSamples (its page loads the bundle from its own
    folder, no CDN: tests/test_app.py checks that)."""
    views = [json.loads(c.proto.json_args) for c in page.get("component_instance")]
    (props,) = [v["props"] for v in views if v["name"] == "TopkSamples"]
    return props


def test_features_page_shows_top_contexts_of_a_neuron_and_a_head(minilm):
    from pathlib import Path

    pytest.importorskip("streamlit")
    from streamlit.testing.v1 import AppTest

    app = Path(__file__).resolve().parents[1] / "apps" / "Home.py"
    page = AppTest.from_file(str(app), default_timeout=300).run()
    page.switch_page("views/features.py").run()  # sidebar model: the default, MiniLM
    assert not page.exception and not page.error, [e.value for e in page.exception or page.error]
    assert page.selectbox(key="features_ctx_kind").options == list(ex.unit_layers(minilm))
    layer = page.selectbox(key="features_ctx_layer::minilm::MLP neurons").value
    assert layer == "blocks.3.mlp.hook_post"
    assert not page.get("progress")  # the bar is removed once the contexts are in, not left at 100%

    unit = 146  # fires on prices, dates and times; its top contexts are well separated
    page.number_input(key=f"features_ctx_unit::minilm::{layer}").set_value(unit).run()
    page.slider(key="features_ctx_k").set_value(4).run()
    assert not page.exception and not page.error, [e.value for e in page.exception or page.error]
    reference = per_text_max(minilm, ex.SAMPLE_TEXTS, layer, unit).sort(descending=True)
    caption = next(c.value for c in page.caption if c.value.startswith(f"Neuron {unit} of `{layer}`"))
    assert f"best score {reference.values[0].item():.3g}" in caption and "48 built-in" in caption
    html = contexts_view(page)
    tokens = [minilm.prepare(ex.SAMPLE_TEXTS[i]).str_tokens[0] for i in reference.indices[:5].tolist()]
    where = [html.index(json.dumps(ex.readable_tokens(t))) for t in tokens[:4]]
    assert where == sorted(where)  # the reference's best four, best first
    assert json.dumps(ex.readable_tokens(tokens[4])) not in html  # k = 4

    page.selectbox(key="features_ctx_kind").set_value("Heads: max attention").run()
    page.number_input(key="features_ctx_unit::minilm::blocks.3.attn.hook_pattern").set_value(11).run()
    assert not page.exception and not page.error, [e.value for e in page.exception or page.error]
    caption = next(
        c.value for c in page.caption if c.value.startswith("Head 11 of `blocks.3.attn.hook_pattern`")
    )
    assert "ranked by the mean over tokens" in caption  # the max ties causal heads at 1
    assert '"Head"' in contexts_view(page)

    page.text_input(key="model_spec").input("zoo:induction-2l").run()  # trained on ids: id names
    assert not page.exception
    assert page.selectbox(key="features_ctx_kind").options == ["Heads: output norm", "Heads: max attention"]
    page.selectbox(key="features_ctx_layer::zoo:induction-2l::Heads: max attention").set_value(
        "blocks.0.attn.hook_pattern"
    ).run()
    assert re.search(r'\[\["(t\d+|BOS)", " (t\d+|BOS)"', contexts_view(page))  # id names, spaced apart
    assert any("Strongest heads here: 1 (" in c.value for c in page.caption)  # L0H1: previous-token head

    page.text_input(key="model_spec").input("zoo:digits-cnn").run()
    assert not page.exception
    assert any("Neuron and head contexts need a transformer" in i.value for i in page.info)


def test_readable_tokens_puts_a_space_before_each_word():
    from interp.methods.examples import readable_tokens

    assert readable_tokens(["[CLS]", "the", "walk", "##ing", "dog"]) == [
        "[CLS]",
        " the",
        " walk",
        "ing",
        " dog",
    ]
    assert readable_tokens(["BOS", "t3", "t17"]) == ["BOS", " t3", " t17"]  # ids stay apart
    assert readable_tokens(["The", " cat", " sat"]) == ["The", " cat", " sat"]  # byte-level: as is
    assert "".join(readable_tokens(["[CLS]", "un", "##believ", "##able", "!"])) == "[CLS] unbelievable !"
