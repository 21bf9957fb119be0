"""Input attribution: analytic values on a linear model, agreement with captum, IG completeness,
the model-randomization sanity check, token attributions through the embedding, input errors."""

from __future__ import annotations

import pytest
import torch

from interp.errors import InputError
from interp.methods import attribution as at

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: 1 thread is fastest


@pytest.fixture(scope="module")
def digits():
    from interp.models.zoo import digits_data

    _, _, x, y = digits_data()
    return x[:8], y[:8]


def test_every_method_is_analytic_on_a_linear_model(softmax, digits):
    """f(x) = w_c . x + b: IG = (x - b) w_c for any n_steps, x*grad = x w_c, |grad| = |w_c|,
    1-pixel occlusion against baseline b = (x - b) w_c."""
    x, y = digits
    w = softmax.module.fc.weight.detach()[y].view(-1, 1, 8, 8)
    base = torch.full_like(x, 0.25)
    ig = at.attribute(softmax, x, target=y, method="ig", baseline=base, n_steps=3)
    torch.testing.assert_close(ig.values, (x - base) * w, atol=1e-5, rtol=1e-4)
    assert ig.delta.abs().max() < 1e-4
    torch.testing.assert_close(at.attribute(softmax, x, y, "grad_x_input").values, x * w)
    torch.testing.assert_close(at.attribute(softmax, x, y, "saliency").values, w.abs())
    occ = at.attribute(softmax, x, y, "occlusion", baseline=base, window=(1, 1, 1))
    torch.testing.assert_close(occ.values, (x - base) * w, atol=1e-5, rtol=1e-4)
    assert occ.config["window"] == [1, 1, 1]


def test_streamed_ig_equals_captum_and_is_complete(cnn, digits):
    from captum.attr import IntegratedGradients

    x, y = digits
    ref, ref_delta = IntegratedGradients(cnn.module).attribute(
        x, target=y, n_steps=40, return_convergence_delta=True
    )
    for chunk in (8, 24, None):  # 1 step per forward, 3 steps, and the default
        ours = at.attribute(cnn, x, target=y, method="ig", n_steps=40, internal_batch_size=chunk)
        torch.testing.assert_close(ours.values, ref, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(ours.delta.float(), ref_delta.float(), atol=2e-5, rtol=1e-3)
    # completeness: the attributions sum to f(x) - f(0), within the reported delta
    logits = cnn(x).gather(1, y.view(-1, 1)).squeeze(1)
    gap = logits - cnn(torch.zeros_like(x)).gather(1, y.view(-1, 1)).squeeze(1)
    total = ours.values.flatten(1).sum(1)
    torch.testing.assert_close((total - gap).double(), ours.delta, atol=1e-4, rtol=0)
    fine = at.attribute(cnn, x, target=y, method="ig", n_steps=128)
    assert fine.delta.abs().max() <= 0.01 * gap.abs().max()
    torch.testing.assert_close(ours.output, logits)
    assert ours.config["n_steps"] == 40 and ours.config["rule"] == "gausslegendre"


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over examples of the Spearman rank correlation of two flattened maps."""
    ra, rb = a.argsort(-1).argsort(-1).double(), b.argsort(-1).argsort(-1).double()
    ra, rb = ra - ra.mean(-1, keepdim=True), rb - rb.mean(-1, keepdim=True)
    return float(((ra * rb).sum(-1) / (ra.norm(dim=-1) * rb.norm(dim=-1))).mean())


@pytest.mark.parametrize("method", ["saliency", "ig", "grad_x_input", "occlusion"])
def test_model_randomization_changes_the_attributions(cnn, digits, method):
    """Adebayo et al. 2018: maps of a randomized copy must not rank pixels like the trained model's."""
    x, y = digits
    trained = at.attribute(cnn, x, y, method, n_steps=16).values.flatten(1)
    same = at.attribute(at.randomized(cnn, modules=[]), x, y, method, n_steps=16).values.flatten(1)
    assert spearman(trained, same) > 0.999  # control: an unchanged copy agrees
    random = at.attribute(at.randomized(cnn, seed=1), x, y, method, n_steps=16).values.flatten(1)
    assert spearman(trained, random) < 0.4
    top = at.attribute(at.randomized(cnn, modules=["fc"], seed=1), x, y, method, n_steps=16).values.flatten(1)
    assert spearman(trained, top) < 0.6  # randomizing the top layer alone already changes them


def test_token_ig_matches_captum_layer_ig_on_the_embedding(gpt2_model):
    from captum.attr import LayerIntegratedGradients

    text = ["the cat sat on the mat", "a dog ran"]
    ours = at.attribute(gpt2_model, text, target=5, method="ig", n_steps=20)
    tokens = gpt2_model.prepare(text)
    hf = gpt2_model.module
    last = tokens.attention_mask.sum(-1) - 1

    def forward(ids, mask, last):
        logits = hf(input_ids=ids, attention_mask=mask, use_cache=False).logits
        return logits[torch.arange(len(ids)), last, 5]

    lig = LayerIntegratedGradients(forward, hf.transformer.wte)
    ref = lig.attribute(
        tokens.input_ids,
        baselines=torch.zeros_like(tokens.input_ids),
        additional_forward_args=(tokens.attention_mask, last),
        n_steps=20,
    )
    # captum's integer baseline is token 0's embedding; redo ours with that baseline
    ours0 = at.attribute(gpt2_model, text, target=5, method="ig", n_steps=20, baseline=0)
    torch.testing.assert_close(ours0.values, ref.sum(-1) * tokens.attention_mask, atol=1e-5, rtol=1e-4)
    assert ours.values.shape == tokens.input_ids.shape
    assert ours.str_tokens == tokens.str_tokens
    assert ours.delta.abs().max() < 0.05 * ours.output.abs().max() + 1e-3
    torch.testing.assert_close(
        ours.values.sum(-1).double(),
        ours.delta + (ours.output - _at_zero(gpt2_model, text)).double(),
        atol=1e-4,
        rtol=0,
    )


def _at_zero(model, text):
    """f at zero word embeddings, computed independently with a replacement hook."""
    tokens = model.prepare(text)
    out = model.run_with_hooks(tokens, [("hook_embed", lambda act, hook: torch.zeros_like(act))])
    last = tokens.attention_mask.sum(-1) - 1
    return out[torch.arange(len(last)), last, 5]


def test_token_occlusion_and_saliency_by_hand(gpt2_model):
    text = "the cat sat on the mat"
    occ = at.attribute(gpt2_model, text, target=3, method="occlusion")
    base = gpt2_model.run_with_hooks(text, [])[0, -1, 3]
    for i in range(occ.values.shape[1]):

        def drop(act, hook, i=i):
            act = act.clone()
            act[:, i] = 0
            return act

        expected = base - gpt2_model.run_with_hooks(text, [("hook_embed", drop)])[0, -1, 3]
        assert abs(occ.values[0, i].item() - expected.item()) < 1e-5
    sal = at.attribute(gpt2_model, text, target=3, method="saliency")
    _, cache = gpt2_model.run_with_cache(text, names="hook_embed", grad_of=lambda out: out[0, -1, 3])
    torch.testing.assert_close(sal.values[0], cache.grads["hook_embed"][0].norm(dim=-1))
    html = sal.html(0)
    assert "<script" in html and "ColoredTokens" in html and "cdn" not in html.lower()
    assert len(sal.figure().data[0].x) == len(sal.str_tokens[0])


def test_image_figure_shows_input_and_map(cnn, digits):
    x, y = digits
    fig = at.attribute(cnn, x[:2], y[:2], "saliency").figure(1)
    assert len(fig.data) == 2


def test_bad_input_is_a_clear_input_error(cnn, digits, gpt2_model):
    x, _ = digits
    with pytest.raises(InputError, match=r"target index 10 is out of range: the output has 10 units"):
        at.attribute(cnn, x, target=10)
    with pytest.raises(InputError, match=r"baseline contains NaN or infinite values"):
        at.attribute(cnn, x, target=1, baseline=torch.full_like(x, float("nan")))
    with pytest.raises(InputError, match=r"baseline contains NaN or infinite values"):
        at.attribute(gpt2_model, "the cat", target=1, baseline=float("inf"))
    with pytest.raises(InputError, match=r"unknown attribution method 'lrp'"):
        at.attribute(cnn, x, method="lrp")
    with pytest.raises(InputError, match=r"does not broadcast"):
        at.attribute(cnn, x, baseline=torch.zeros(3, 3))
    with pytest.raises(InputError, match=r"occlusion window"):
        at.attribute(cnn, x, method="occlusion", window=(1, 9, 9))
