"""Dictionary dashboards (interp.sae.dashboard): every number against an independent reference.

Oracles: the SAE's own ``encode`` of the plain (unspliced) model's activation, one text per forward
(so no padding can enter), for the top examples, density, histogram and per-latent statistics;
Hugging Face's ``lm_head`` weight for the logit effects; hand-made hooks on the plain model
(``x + alpha * W_dec[i]``, ``sae(x)``) for steering and splicing.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import interp
from interp import sae as S
from interp import viz
from interp.errors import InputError
from interp.sae import io as sae_io

SITE = "blocks.0.hook_resid_post"
WORDS = ["the", "a", "cat", "dog", "sat", "ran", "on", "under", "mat", "rug", "and", "then", "it", "big"]


@pytest.fixture(scope="module")
def texts() -> list[str]:
    """Texts of 3-11 words: batches are padded, and padding must never count as a token."""
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 12, (40,), generator=gen).tolist()
    return [
        " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (n,), generator=gen)) for n in lengths
    ]


@pytest.fixture(scope="module")
def sae(gpt2_model, texts) -> S.SAE:
    return S.train(
        gpt2_model,
        SITE,
        texts,
        arch="topk",
        d_sae=64,
        k=4,
        tokens=64 * 40,
        batch_size=64,
        lr=3e-3,
        progress=False,
    )


@pytest.fixture(scope="module")
def by_hand(gpt2_model, sae, texts) -> list[torch.Tensor]:
    """Each text's latents ``[pos, d_sae]``: encode of the plain model's activation, one text at a time."""
    out = []
    for text in texts:
        _, cache = gpt2_model.run_with_cache(text, names=SITE)
        out.append(sae.encode(cache[SITE][0]).detach())
    return out


def _densest(by_hand: list[torch.Tensor]) -> int:
    return int(torch.cat(by_hand).ne(0).sum(0).argmax())


def test_top_examples_are_the_brute_force_argmax(gpt2_model, sae, texts, by_hand):
    latent = _densest(by_hand)
    dash = S.dashboard(gpt2_model, sae, latent, texts, k=5, context=2, batch_size=7)
    best = torch.stack([a[:, latent].max() for a in by_hand])
    order = torch.argsort(best, descending=True, stable=True)[:5]
    assert [e.index for e in dash.examples] == order.tolist()
    assert np.allclose([e.score for e in dash.examples], best[order].numpy(), atol=1e-5)
    for e in dash.examples:
        values = by_hand[e.index][:, latent]
        tokens = gpt2_model.prepare(texts[e.index]).str_tokens[0]
        assert e.position == int(values.argmax())
        lo, hi = max(0, e.position - 2), min(len(tokens), e.position + 3)
        assert e.offset == lo and e.tokens == list(tokens[lo:hi])
        assert np.allclose(e.values, values[lo:hi].numpy(), atol=1e-5)


def test_density_histogram_and_latent_stats_equal_hand_counts(gpt2_model, sae, texts, by_hand):
    every = torch.cat(by_hand)  # [all real tokens, d_sae]
    latent = _densest(by_hand)
    dash = S.dashboard(gpt2_model, sae, latent, texts, bins=12, batch_size=5)
    column = every[:, latent]
    active = column[column != 0]
    assert dash.n_tokens == len(every) == sum(len(t.split()) for t in texts)
    assert dash.n_active == len(active) and dash.density == pytest.approx(len(active) / len(every))
    assert sum(dash.histogram["counts"]) == dash.n_active
    expected, _ = np.histogram(active.numpy(), bins=np.asarray(dash.histogram["edges"]))
    assert dash.histogram["counts"] == expected.tolist()
    assert dash.max_activation == pytest.approx(float(column.max()), abs=1e-6)

    stats = S.latent_stats(gpt2_model, sae, texts, batch_size=6)
    fires = (every != 0).sum(0)
    assert stats.n_tokens == len(every) and stats.n_examples == len(texts)
    assert torch.allclose(stats.density, fires / len(every))
    assert torch.allclose(stats.max_activation, every.max(0).values, atol=1e-6)
    mean = torch.where(fires > 0, every.sum(0) / fires.clamp(min=1), 0.0)
    assert torch.allclose(stats.mean_activation, mean, atol=1e-5)
    assert stats.order("density")[0] == latent and stats.dead == int((fires == 0).sum())


def test_logit_effects_are_the_decoder_row_through_hf_lm_head(gpt2_model, gpt2_dir, sae):
    from transformers import GPT2LMHeadModel

    w_u = GPT2LMHeadModel.from_pretrained(gpt2_dir).lm_head.weight.detach().T  # [d_model, vocab]
    dash = S.dashboard(gpt2_model, sae, 5, ["the cat sat"], k=1, logit_k=4)
    by_hand = sae.W_dec[5].detach() @ w_u
    effects = dash.logit_effects
    assert dash.logit_note is None and torch.allclose(effects.values, by_hand, atol=1e-5)
    assert effects.top_ids == torch.argsort(by_hand, descending=True)[:4].tolist()
    assert effects.bottom_ids == torch.argsort(by_hand)[:4].tolist()
    fig = viz.logit_effects_figure(
        effects.top_tokens, effects.top_values, effects.bottom_tokens, effects.bottom_values
    )
    assert sorted(fig.data[0].x) == sorted(effects.top_values + effects.bottom_values)


def test_steering_adds_the_decoder_row_and_splicing_runs_on_the_reconstruction(gpt2_model, sae):
    text, latent, alpha = "the dog ran under the rug", 7, 3.0
    plain = gpt2_model(text)[0, -1].double()
    steered = gpt2_model.run_with_hooks(text, [(SITE, lambda x, ctx: x + alpha * sae.W_dec[latent].detach())])
    steered = steered[0, -1].double()
    change = S.intervene(gpt2_model, sae, text, latent=latent, alpha=alpha, k=3)
    assert change.mode == "steer" and change.error_term and change.kind == "logits"
    assert torch.allclose(change.after[0, -1].double(), steered, atol=1e-4)
    top = torch.topk(steered.softmax(-1), 3)
    assert [p for _, p in change.top_after] == pytest.approx(top.values.tolist(), abs=1e-6)
    assert [p for _, p in change.top_before] == pytest.approx(
        torch.topk(plain.softmax(-1), 3).values.tolist()
    )
    assert [v for _, v in change.raised] == pytest.approx(
        torch.topk(steered - plain, 3).values.tolist(), abs=1e-4
    )
    kl = (plain.softmax(-1) * (plain.log_softmax(-1) - steered.log_softmax(-1))).sum()
    assert change.kl == pytest.approx(float(kl), abs=1e-5)

    spliced = S.intervene(gpt2_model, sae, text)
    recons = gpt2_model.run_with_hooks(text, [(SITE, lambda x, ctx: sae(x).detach())])[0, -1]
    assert spliced.mode == "splice" and not spliced.error_term
    assert torch.allclose(spliced.after[0, -1], recons, atol=1e-5)
    exact = S.intervene(gpt2_model, sae, text, use_error_term=True)
    assert exact.kl == pytest.approx(0.0, abs=1e-9)


def test_minilm_has_no_logit_effects_and_its_change_is_in_the_hidden_states(minilm, minilm_sae_dir):
    from conftest import MINILM_SAE_HOOK

    sae = S.load(minilm_sae_dir)
    text, latent, alpha = "The cat sat on the mat.", 3, 5.0
    dash = S.dashboard(minilm, sae, latent, [text, "Paris is in France."], k=2)
    assert dash.logit_effects is None and "no unembedding" in dash.logit_note
    change = S.intervene(minilm, sae, text, latent=latent, alpha=alpha)
    before = minilm(text)[0].double()
    hooks = [(MINILM_SAE_HOOK, lambda x, ctx: x + alpha * sae.W_dec[latent].detach())]
    after = minilm.run_with_hooks(text, hooks)[0].double()
    assert change.kind == "hidden" and change.tokens == minilm.prepare(text).str_tokens[0]
    cos = torch.nn.functional.cosine_similarity(before, after, dim=-1)
    assert np.allclose(change.cosine, cos.numpy(), atol=1e-5)
    pooled = torch.nn.functional.cosine_similarity(before.mean(0), after.mean(0), dim=0)
    assert change.pooled_cosine == pytest.approx(float(pooled), abs=1e-5)


def test_zoo_names_lists_the_dictionaries_with_a_cfg(tmp_path, monkeypatch, sae):
    S.save(sae, tmp_path / "b-sae")
    S.save(sae, tmp_path / "a-sae")
    (tmp_path / "not-a-dictionary").mkdir()
    monkeypatch.setattr(sae_io, "ZOO_DIR", tmp_path)
    assert S.zoo_names() == ("a-sae", "b-sae")
    assert torch.equal(S.load("zoo:a-sae").W_dec, sae.W_dec)
    monkeypatch.setattr(sae_io, "ZOO_DIR", tmp_path / "missing")
    assert S.zoo_names() == ()


def test_bad_input_is_refused_before_any_forward(gpt2_model, sae, texts):
    with pytest.raises(InputError, match="out of range: this dictionary has 64 latents"):
        S.dashboard(gpt2_model, sae, 64, texts)
    with pytest.raises(InputError, match="k must be a positive integer"):
        S.dashboard(gpt2_model, sae, 0, texts, k=0)
    narrow = S.SAE(S.SAEConfig(d_in=16, d_sae=8, hook_name=SITE))
    with pytest.raises(InputError, match="d_in=16 but blocks.0.hook_resid_post"):
        S.latent_stats(gpt2_model, narrow, texts)
    with pytest.raises(InputError, match="compares one input"):
        S.intervene(gpt2_model, sae, texts[:2], latent=1, alpha=1.0)
    with pytest.raises(InputError, match="order latents by one of"):
        S.latent_stats(gpt2_model, sae, texts[:3]).order("loudness")


def test_token_rows_html_is_offline_and_escapes_tokens():
    html = viz.token_rows_html([("#3 (2.5)", ["<script>", "ok", "##ay"], [2.5, 0.0, -1.0])])
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "http" not in html and "src=" not in html  # nothing to fetch
    assert 'title="2.5"' in html and "rgba(255,140,0,1.000)" in html and "rgba(30,120,220,0.400)" in html
    assert ">ay<" in html  # a WordPiece continuation joins its word
    assert (
        html.count('class="t peak"') == 1
        and 'class="t peak" style="background:rgba(255,140,0,1.000)"' in html
    )
    fig = viz.latent_histogram_figure([3, 0, 1], [0.0, 1.0, 2.0, 3.0])
    assert list(fig.data[0].y) == [3, 0, 1] and list(fig.data[0].x) == [0.5, 1.5, 2.5]
    with pytest.raises(InputError):
        viz.latent_histogram_figure([1, 2], [0.0, 1.0])


def test_module_model_dashboard_has_examples_without_tokens():
    """A model without a token axis (a TMS-like MLP): one "token" per example."""
    net = torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.ReLU())
    model = interp.load(net, input_shape=(5,), name="mlp")
    hook = "0.hook_out"
    x = torch.randn(30, 5, generator=torch.Generator().manual_seed(0))
    sae = S.train(
        model,
        hook,
        x,
        data_kind="inputs",
        arch="standard",
        d_sae=6,
        tokens=600,
        batch_size=30,
        progress=False,
    )
    _, cache = model.run_with_cache(x, names=hook)
    acts = sae.encode(cache[hook]).detach()
    latent = int(acts.ne(0).sum(0).argmax())
    dash = S.dashboard(model, sae, latent, x, k=3)
    assert dash.n_tokens == 30 and dash.n_active == int(acts[:, latent].ne(0).sum())
    assert [e.index for e in dash.examples] == torch.argsort(acts[:, latent], descending=True)[:3].tolist()
    assert all(e.tokens is None for e in dash.examples)
    assert dash.logit_effects is None and dash.logit_note


def test_a_shared_capture_is_made_once_and_a_dead_latent_has_nothing_to_show(gpt2_model, texts, tmp_path):
    sae = S.SAE(S.SAEConfig(d_in=32, d_sae=16, hook_name=SITE))
    with torch.no_grad():
        sae.W_enc.normal_(generator=torch.Generator().manual_seed(0))
        sae.b_enc.fill_(-1e4)  # no latent can fire
    forwards = []
    handle = gpt2_model.module.register_forward_pre_hook(lambda *args: forwards.append(1))
    try:
        stats = S.latent_stats(gpt2_model, sae, texts, out_dir=tmp_path, batch_size=8)
        before = len(forwards)
        dash = S.dashboard(gpt2_model, sae, 3, texts, out_dir=tmp_path, batch_size=8)
    finally:
        handle.remove()
    assert before >= 5 and len(forwards) == before  # 40 texts in batches of 8; the dashboard reads them back
    assert stats.dead == 16 and dash.dead and dash.density == 0.0 and dash.examples == []
    assert dash.histogram == {"edges": [], "counts": []} and dash.max_activation == 0.0
    assert len(viz.latent_histogram_figure(**dash.histogram).data[0].y) == 0


def test_a_shared_out_dir_never_gives_one_dictionary_anothers_activations(gpt2_model, texts, tmp_path):
    """Two dictionaries of one shape at one hook: the second must read its own latents from a shared
    out_dir, not the first one's capture (the store's header names the hook, not the weights)."""
    first, second = (S.SAE(S.SAEConfig(d_in=32, d_sae=16, hook_name=SITE)) for _ in range(2))
    with torch.no_grad():
        for seed, sae in enumerate((first, second)):
            sae.W_enc.normal_(generator=torch.Generator().manual_seed(seed))
    S.latent_stats(gpt2_model, first, texts[:8], out_dir=tmp_path, batch_size=8)
    shared = S.latent_stats(gpt2_model, second, texts[:8], out_dir=tmp_path, batch_size=8)
    fresh = S.latent_stats(gpt2_model, second, texts[:8], batch_size=8)
    assert torch.equal(shared.max_activation, fresh.max_activation)
    dash = S.dashboard(gpt2_model, second, 0, texts[:8], out_dir=tmp_path, batch_size=8)
    assert dash.max_activation == pytest.approx(float(fresh.max_activation[0]))
