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


def _token_drops(model, text: str, target: int) -> torch.Tensor:
    """By hand: the last position's ``target`` logit minus its value with token i's embedding
    zeroed, for every token i (what occlusion and feature ablation of one token compute)."""
    base = model.run_with_hooks(text, [])[0, -1, target]
    drops = []
    for i in range(model.prepare(text).input_ids.shape[1]):

        def drop(act, hook, i=i):
            act = act.clone()
            act[:, i] = 0
            return act

        drops.append(base - model.run_with_hooks(text, [("hook_embed", drop)])[0, -1, target])
    return torch.stack(drops).detach()


def test_token_occlusion_and_saliency_by_hand(gpt2_model):
    text = "the cat sat on the mat"
    occ = at.attribute(gpt2_model, text, target=3, method="occlusion")
    torch.testing.assert_close(occ.values[0], _token_drops(gpt2_model, text, 3), atol=1e-5, rtol=0)
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


# ------------------------------------------------------------------------------------------------
# captum's other methods, noise tunnels, layer and neuron attributions: equal to captum called
# directly on the same module (the bridge passes through; IG under a noise tunnel is ours, streamed)
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def references():
    """A distribution of 4 test images for the SHAP methods and a constant baseline."""
    from interp.models.zoo import digits_data

    _, _, x, _ = digits_data()
    return x[20:24], torch.full((1, 1, 8, 8), 0.1)


def _captum_direct(method, module, x, y, dist, base):
    import captum.attr as ca

    cls = {
        "deeplift": (ca.DeepLift, {"baselines": base}),
        "deeplift_shap": (ca.DeepLiftShap, {"baselines": dist}),
        "gradient_shap": (ca.GradientShap, {"baselines": dist}),
        "guided_backprop": (ca.GuidedBackprop, {}),
        "deconvolution": (ca.Deconvolution, {}),
        "lime": (ca.Lime, {"baselines": base}),
        "kernel_shap": (ca.KernelShap, {"baselines": base}),
        "feature_ablation": (ca.FeatureAblation, {"baselines": base}),
    }
    algorithm, kwargs = cls[method]
    return algorithm(module).attribute(x.clone().requires_grad_(True), target=y, **kwargs)


@pytest.mark.parametrize(
    "method",
    [
        "deeplift",
        "deeplift_shap",
        "gradient_shap",
        "guided_backprop",
        "deconvolution",
        "lime",
        "kernel_shap",
        "feature_ablation",
    ],
)
def test_every_captum_method_equals_captum_on_the_same_module(cnn, digits, references, method):
    """Seeded (torch and numpy, as captum draws from both): the stochastic ones match draw for draw."""
    import numpy as np

    x, y = digits[0][:4], digits[1][:4]
    dist, base = references
    shap = method in ("deeplift_shap", "gradient_shap")
    ours = at.attribute(cnn, x, y, method, baselines=dist if shap else base, seed=7)
    torch.manual_seed(7)
    np.random.seed(7)
    ref = _captum_direct(method, cnn.module, x, y, dist, base)
    torch.testing.assert_close(ours.values, ref.detach(), atol=1e-5, rtol=1e-5)
    assert ours.config["method"] == method and ours.values.shape == x.shape


@pytest.mark.parametrize("nt_type", ["smoothgrad", "smoothgrad_sq", "vargrad"])
def test_noise_tunnel_over_streamed_ig_equals_captums(cnn, digits, nt_type):
    from captum.attr import IntegratedGradients, NoiseTunnel

    x, y = digits[0][:4], digits[1][:4]
    ours = at.attribute(cnn, x, y, "ig", noise_tunnel=nt_type, nt_samples=4, stdevs=0.2, n_steps=20, seed=3)
    torch.manual_seed(3)
    ref = NoiseTunnel(IntegratedGradients(cnn.module)).attribute(
        x, nt_type=nt_type, nt_samples=4, stdevs=0.2, target=y, n_steps=20
    )
    torch.testing.assert_close(ours.values, ref, atol=1e-5, rtol=1e-5)
    assert ours.config["library"] == "interp" and ours.config["noise_tunnel"] == nt_type
    if nt_type == "smoothgrad":  # noise 0: the plain IG
        plain = at.attribute(cnn, x, y, "ig", n_steps=20).values
        still = at.attribute(cnn, x, y, "ig", noise_tunnel=nt_type, stdevs=0.0, n_steps=20).values
        torch.testing.assert_close(still, plain, atol=1e-6, rtol=1e-6)


def test_noise_tunnel_over_captum_methods_equals_captum(cnn, digits):
    from captum.attr import DeepLift, NoiseTunnel, Saliency

    x, y = digits[0][:4], digits[1][:4]
    ours = at.attribute(cnn, x, y, "saliency", noise_tunnel="smoothgrad_sq", nt_samples=3, stdevs=0.1)
    torch.manual_seed(0)
    ref = NoiseTunnel(Saliency(cnn.module)).attribute(
        x, nt_type="smoothgrad_sq", nt_samples=3, stdevs=0.1, target=y, abs=True
    )
    torch.testing.assert_close(ours.values, ref, atol=1e-5, rtol=1e-5)
    ours = at.attribute(cnn, x, y, "deeplift", noise_tunnel="vargrad", nt_samples=3, stdevs=0.1)
    torch.manual_seed(0)
    ref = NoiseTunnel(DeepLift(cnn.module)).attribute(
        x, nt_type="vargrad", nt_samples=3, stdevs=0.1, target=y
    )
    torch.testing.assert_close(ours.values, ref, atol=1e-5, rtol=1e-5)


def test_layer_and_neuron_methods_at_hook_names_equal_captum(cnn, digits):
    import captum.attr as ca

    x, y = digits[0][:4], digits[1][:4]
    m = cnn.module
    cases = [
        (
            dict(method="ig", layer="conv2.hook_out"),
            ca.LayerIntegratedGradients(m, m.conv2).attribute(x, target=y, n_steps=20),
        ),
        (
            dict(method="conductance", layer="conv2.hook_out"),
            ca.LayerConductance(m, m.conv2).attribute(x, target=y, n_steps=20),
        ),
        (dict(method="gradcam", layer="conv2.hook_out"), ca.LayerGradCam(m, m.conv2).attribute(x, target=y)),
        (
            dict(method="ig", layer="relu1.hook_in"),  # a module's input: attribute_to_layer_input
            ca.LayerIntegratedGradients(m, m.relu1).attribute(
                x, target=y, n_steps=20, attribute_to_layer_input=True
            ),
        ),
    ]
    for kwargs, ref in cases:
        ours = at.attribute(cnn, x, y, n_steps=20, **kwargs)
        torch.testing.assert_close(ours.values, ref, atol=1e-5, rtol=1e-5)
        assert ours.by_layer[kwargs["layer"]] is not None and ours.config["layer"] == [kwargs["layer"]]
    neuron = at.attribute(cnn, x, method="ig", layer="conv2.hook_out", neuron=(5, 3, 3), n_steps=20)
    ref = ca.NeuronIntegratedGradients(m, m.conv2).attribute(x, (5, 3, 3), n_steps=20)
    torch.testing.assert_close(neuron.values, ref, atol=1e-5, rtol=1e-5)
    _, cache = cnn.run_with_cache(x, names="conv2.hook_out")
    torch.testing.assert_close(neuron.output, cache["conv2.hook_out"][:, 5, 3, 3])
    # completeness of layer IG: the attributions sum to f(x) - f(0) up to the IG error
    lig = at.attribute(cnn, x, y, "ig", layer="conv2.hook_out", n_steps=64)
    gap = lig.output - cnn(torch.zeros_like(x)).gather(1, y.view(-1, 1)).squeeze(1)
    torch.testing.assert_close(lig.values.flatten(1).sum(1), gap, atol=0.02 * gap.abs().max().item(), rtol=0)
    grad = at.attribute(cnn, x, method="gradient", layer="fc.hook_out", neuron=2)
    torch.testing.assert_close(grad.values, ca.NeuronGradient(m, m.fc).attribute(x, 2), atol=1e-6, rtol=0)


def test_transformer_layer_ig_over_several_embeddings_and_a_block_equals_captum(minilm):
    """MiniLM (BERT): word and token-type embeddings at once, and a block's output; captum's
    LayerIntegratedGradients on the HF modules directly, token 0 as the baseline."""
    from captum.attr import LayerIntegratedGradients

    text = ["the cat sat on the mat", "a dog ran"]
    tokens = minilm.prepare(text)
    hf = minilm.module
    last = tokens.attention_mask.sum(-1) - 1

    def forward(ids, mask, last):
        return hf(input_ids=ids, attention_mask=mask).last_hidden_state[torch.arange(len(ids)), last]

    args = {"target": 7, "additional_forward_args": (tokens.attention_mask, last), "n_steps": 8}
    zeros = torch.zeros_like(tokens.input_ids)
    names = ["embed.hook_out", "token_type_embed.hook_out"]
    ours = at.attribute(minilm, text, target=7, method="ig", layer=names, n_steps=8)
    emb = hf.embeddings
    refs = LayerIntegratedGradients(forward, [emb.word_embeddings, emb.token_type_embeddings]).attribute(
        tokens.input_ids, baselines=zeros, **args
    )
    for name, ref in zip(names, refs, strict=True):
        torch.testing.assert_close(ours.by_layer[name], ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.values, refs[0].sum(-1) * tokens.attention_mask)
    assert ours.str_tokens == tokens.str_tokens
    block = at.attribute(minilm, text, target=7, method="ig", layer="blocks.2.hook_resid_post", n_steps=8)
    ref = LayerIntegratedGradients(forward, hf.encoder.layer[2]).attribute(
        tokens.input_ids, baselines=zeros, **args
    )
    torch.testing.assert_close(block.per_dim, ref, atol=1e-5, rtol=1e-5)


def test_token_methods_through_the_embedding(gpt2_model):
    """Feature ablation of one token equals the hand-computed drop with its embedding zeroed; every
    stochastic and noise-tunnel method runs per token on a transformer."""
    text = "the cat sat on the mat"
    ablation = at.attribute(gpt2_model, text, target=3, method="feature_ablation")
    torch.testing.assert_close(ablation.values[0], _token_drops(gpt2_model, text, 3), atol=1e-5, rtol=0)
    for method in ("lime", "kernel_shap", "gradient_shap"):
        result = at.attribute(gpt2_model, text, target=3, method=method)
        assert result.values.shape == ablation.values.shape and torch.isfinite(result.values).all()
    smooth = at.attribute(
        gpt2_model, text, target=3, method="ig", noise_tunnel="smoothgrad", stdevs=0.0, n_steps=8
    )
    torch.testing.assert_close(
        smooth.values, at.attribute(gpt2_model, text, target=3, method="ig", n_steps=8).values
    )


def test_the_default_position_is_the_last_real_token_under_left_padding(gpt2_model):
    """With a left-padded batch the last real token is the last column, not mask.sum() - 1 (which
    there is a padding position); the explained scalar is the model's output at that token."""
    tokenizer = gpt2_model.tokenizer
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        texts = ["the cat sat on the mat", "a dog"]
        prepared = gpt2_model.prepare(texts)
        result = at.attribute(gpt2_model, texts, target=3, method="saliency")
    finally:
        tokenizer.padding_side = side
    assert prepared.attention_mask[1, 0] == 0  # the batch really is left-padded
    last = prepared.input_ids.shape[1] - 1
    assert result.config["position"] == [last, last]
    logits = gpt2_model.run_with_hooks(prepared, [])
    torch.testing.assert_close(result.output, logits[:, last, 3])
    # the bars line up with the real tokens (was values[:len(tokens)]: the padding, then cut short)
    bars = result.figure(1).data[0].y
    real = prepared.attention_mask[1].bool()
    assert len(bars) == len(result.str_tokens[1]) == int(real.sum())
    assert list(bars) == result.values[1][real].tolist() and bars[-1] == result.values[1, -1].item()


@pytest.mark.parametrize("method", at.METHODS)
def test_model_randomization_is_available_for_every_method(cnn, digits, references, method):
    """Adebayo et al. 2018, reproduced: randomizing every layer decorrelates every method's maps;
    randomizing only the top layer decorrelates the gradient methods' maps, while guided backprop
    and deconvolution stay close to the trained maps (the paper's finding for guided backprop)."""
    x, y = digits
    kwargs = {"baselines": references[0]} if method == "deeplift_shap" else {}
    every = at.model_randomization(cnn, x, y, method, seed=1, n_steps=16, **kwargs)
    top = at.model_randomization(cnn, x, y, method, modules=["fc"], seed=1, n_steps=16, **kwargs)
    same = at.model_randomization(cnn, x, y, method, modules=[], n_steps=16, **kwargs)
    assert same.min() > 0.999  # control: an unchanged copy agrees
    if method == "ig":  # the rank correlation itself, against scipy's
        from scipy.stats import spearmanr

        a, b = torch.randn(2, 3, 50, generator=torch.Generator().manual_seed(0)).double()
        expected = [spearmanr(u, v).statistic for u, v in zip(a, b, strict=True)]
        torch.testing.assert_close(at._spearman(a, b), torch.tensor(expected, dtype=torch.float64))
    if method in ("guided_backprop", "deconvolution"):
        assert every.mean() < 0.6, every
        assert top.mean() > 0.6, top  # insensitive to the top layer
    else:
        assert every.mean() < 0.4, every
        assert top.mean() < 0.4, top


def test_bad_layer_and_method_inputs_are_clear_input_errors(cnn, digits, gpt2_model, minilm):
    from torch import nn

    from interp.models.module import ModuleModel

    class Unused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.spare = nn.Linear(4, 3), nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x)

    model = ModuleModel(Unused(), "unused", input_shape=(4,))
    with pytest.raises(InputError, match=r"the forward never reaches 'spare.hook_out'"):
        at.attribute(model, torch.rand(2, 4), 0, "ig", layer="spare.hook_out")
    x, _ = digits
    with pytest.raises(InputError, match=r"target index 10 is out of range: the output has 10 units"):
        at.attribute(cnn, x, target=10, method="ig", layer="conv2.hook_out")
    with pytest.raises(InputError, match=r"target index 12 is out of range"):
        at.attribute(cnn, x, target=12, method="kernel_shap")
    with pytest.raises(InputError, match=r"unknown layer method 'lime'"):
        at.attribute(cnn, x, method="lime", layer="conv2.hook_out")
    with pytest.raises(InputError, match=r"neuron=\(5, 3\) does not index one unit of conv2.hook_out"):
        at.attribute(cnn, x, layer="conv2.hook_out", neuron=(5, 3))
    with pytest.raises(InputError, match=r"explains the neuron= itself; drop target="):
        at.attribute(cnn, x, target=1, layer="conv2.hook_out", neuron=(5, 3, 3))
    with pytest.raises(InputError, match=r"give layer="):
        at.attribute(cnn, x, neuron=3)
    with pytest.raises(InputError, match=r"deeplift_shap .* at least 2 reference inputs"):
        at.attribute(cnn, x, method="deeplift_shap")
    with pytest.raises(InputError, match=r"unknown noise_tunnel 'smooth'"):
        at.attribute(cnn, x, noise_tunnel="smooth")
    with pytest.raises(InputError, match=r"baseline= or baselines="):
        at.attribute(cnn, x, baseline=0.0, baselines=0.0)
    with pytest.raises(InputError, match=r"'deeplift' replaces the backward .* needs an image model"):
        at.attribute(gpt2_model, "the cat", target=1, method="deeplift")
    with pytest.raises(InputError, match=r"passes by keyword or beside non-tensor arguments"):
        at.attribute(minilm, "the cat", target=1, method="ig", layer="blocks.1.hook_resid_pre")


@pytest.mark.parametrize("method", ["lime", "kernel_shap", "gradient_shap"])
def test_a_sample_count_below_one_is_refused_before_captum_runs(cnn, digits, method):
    """n_samples=0 was captum's ZeroDivisionError (gradient_shap) or torch.cat's ValueError (lime)."""
    x, _ = digits
    with pytest.raises(InputError, match=r"n_samples must be a positive integer, got 0"):
        at.attribute(cnn, x[:1], target=1, method=method, n_samples=0)


def test_zoo_lm_layer_ig_over_token_and_position_embeddings_equals_captum():
    """zoo:induction-2l (a TransformerLens bridge): hook_embed and hook_pos_embed at once, and a
    head-split hook, against captum on the bridge's own hook_dict modules (TL's names)."""
    from captum.attr import LayerIntegratedGradients

    import interp

    model = interp.load("zoo:induction-2l")
    bridge = model.module
    ids = torch.randint(0, 40, (2, 10), generator=torch.Generator().manual_seed(0))

    def forward(rows):
        return bridge(rows)[:, -1]

    names = ["hook_embed", "hook_pos_embed"]
    ours = at.attribute(model, ids, target=3, method="ig", layer=names, n_steps=8)
    refs = LayerIntegratedGradients(forward, [bridge.hook_dict[n] for n in names]).attribute(
        ids, baselines=torch.zeros_like(ids), target=3, n_steps=8
    )
    for name, ref in zip(names, refs, strict=True):
        torch.testing.assert_close(ours.by_layer[name], ref, atol=1e-5, rtol=1e-5)
    z = at.attribute(model, ids, target=3, method="ig", layer="blocks.1.attn.hook_z", n_steps=8)
    ref = LayerIntegratedGradients(forward, bridge.hook_dict["blocks.1.attn.hook_z"]).attribute(
        ids, baselines=torch.zeros_like(ids), target=3, n_steps=8
    )
    # interp's hook_z is TL's [batch, pos, head, d_head]; the bridge's HookPoint carries it flat
    torch.testing.assert_close(z.by_layer["blocks.1.attn.hook_z"].flatten(2), ref, atol=1e-5, rtol=1e-5)
    assert z.values.shape == (2, 10)
