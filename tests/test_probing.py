"""Linear probes: agreement with sklearn, control tasks, interventions, the zoo and MiniLM properties."""

from __future__ import annotations

import math

import pytest
import torch

import interp
from interp.errors import InputError
from interp.methods import probing as P
from interp.models import zoo

pytest_plugins = ["adversarial_fixtures"]  # digits_split, quick_cnn


def test_classification_probe_matches_sklearn(digits_split):
    from sklearn.linear_model import LogisticRegression

    x, y, _, _ = digits_split
    feats = x.reshape(len(x), -1)[:600]
    labels = y[:600]
    train, test = P.split(labels, "classification", 0.25, seed=0)
    probe = P.fit_probe(feats, labels, C=0.5, standardize=False, train_idx=train, test_idx=test, max_iter=500)
    ref = LogisticRegression(C=0.5, max_iter=5000, tol=1e-10).fit(feats[train].numpy(), labels[train].numpy())
    torch.testing.assert_close(
        probe.weight, torch.tensor(ref.coef_, dtype=torch.float64), atol=2e-3, rtol=1e-2
    )
    agree = (probe.predict(feats[test]) == torch.tensor(ref.predict(feats[test].numpy()))).double().mean()
    assert agree >= 0.99
    assert abs(probe.test_score - ref.score(feats[test].numpy(), labels[test].numpy())) <= 0.01


def test_regression_probe_matches_sklearn_ridge():
    from sklearn.linear_model import Ridge

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 20, generator=gen, dtype=torch.float64)
    y = torch.stack([x[:, 0] - 2 * x[:, 3], x[:, 5]], 1) + 0.1 * torch.randn(
        300, 2, generator=gen, dtype=torch.float64
    )
    train, test = P.split(y, "regression", 0.25, seed=0)
    probe = P.fit_probe(x, y, task="regression", C=0.1, standardize=False, train_idx=train, test_idx=test)
    ref = Ridge(alpha=10.0).fit(x[train].numpy(), y[train].numpy())
    torch.testing.assert_close(probe.weight, torch.tensor(ref.coef_), atol=1e-8, rtol=1e-6)
    torch.testing.assert_close(probe.bias, torch.tensor(ref.intercept_), atol=1e-8, rtol=1e-6)
    assert probe.test_score > 0.95


def test_sweep_over_cnn_layers_with_control_task(quick_cnn, digits_split):
    x, y, _, _ = digits_split
    sweep = P.probe_sweep(
        quick_cnn, x[:300], y[:300], names=["pool.hook_out", "fc.hook_out"], control=True, C=0.1
    )
    assert sweep.names == ["pool.hook_out", "fc.hook_out"]
    assert (sweep.accuracy >= 0.85).all()
    # each image is its own type: random labels cannot be learnt, so the control sits near chance
    assert (sweep.control_accuracy <= 0.3).all()
    assert (sweep.selectivity >= 0.5).all()
    assert sweep.best in sweep.names and len(sweep.figure().data) >= 4


def test_default_names_are_the_leaf_outputs(quick_cnn):
    assert P.default_names(quick_cnn) == [
        f"{m}.hook_out" for m in ("conv1", "relu1", "conv2", "relu2", "pool", "flatten", "fc")
    ]


def test_projecting_out_the_probe_subspace_is_causal(quick_cnn, digits_split):
    x, y, x_te, y_te = digits_split
    feats = P.collect_features(quick_cnn, x[:600], y[:600], names="pool.hook_out")
    probe = P.fit_probe(feats.values["pool.hook_out"], feats.labels, C=0.1, name="pool.hook_out")
    result = P.intervene(quick_cnn, x_te, probe, mode="project_out", labels=y_te)
    assert result.rank == 9  # 10 classes: 9 directions matter
    assert result.metric_clean > 0.85
    # the probe's subspace matters more than a random 9-d one, but the model reads class
    # information redundantly: removing one linear readout does not erase it (cf. INLP, LEACE)
    assert result.effect < result.random_effect - 0.02
    assert abs(result.random_effect) < 0.05
    added = P.intervene(quick_cnn, x_te, probe, mode="add", cls=4, scale=50.0,
                        metric=lambda out: (out.argmax(-1) == 4).double().mean().item())  # fmt: skip
    assert added.metric_edited > added.metric_clean + 0.3
    assert result.figure().data


def test_bad_probe_inputs(quick_cnn, digits_split):
    x, y, _, _ = digits_split
    few = y[:200].clone()
    few[:2] = 11  # class 11 has 2 examples, every other class about 20
    with pytest.raises(InputError, match="too few examples to probe \\(class 11: 2 examples\\)"):
        P.probe_sweep(quick_cnn, x[:200], few, names="pool.hook_out")
    with pytest.raises(InputError, match="got 59 labels for 60 inputs"):
        P.probe_sweep(quick_cnn, x[:60], y[:59], names="pool.hook_out")
    with pytest.raises(InputError, match="task must be 'classification' or 'regression'"):
        P.fit_probe(torch.randn(10, 3), torch.zeros(10), task="ranking")
    with pytest.raises(InputError, match="at least 2 classes"):
        P.fit_probe(torch.randn(10, 3), torch.zeros(10, dtype=torch.long))


def test_repeat_labels_and_per_token_probe_on_induction_model():
    tokens = torch.tensor([[64, 5, 6, 5, 7, 6]])
    assert P.repeat_labels(tokens).tolist() == [[-1, 0, 0, 1, 0, 1]]
    torch.manual_seed(0)
    model = interp.load(zoo.build("induction-2l"))
    seqs = zoo.repeated_tokens(24, 8, seed=0)
    labels = P.repeat_labels(seqs)
    feats = P.collect_features(model, seqs, labels, names=P.default_names(model)[:2])
    assert len(feats.labels) == int((labels >= 0).sum())
    assert torch.equal(feats.types, seqs[labels >= 0])  # control types are the token ids
    sweep = P.sweep_features(feats, control=True, C=0.1)
    assert sweep.accuracy.isfinite().all() and sweep.control_accuracy.isfinite().all()


def test_modadd_fourier_probe_targets():
    p, k = 13, 3
    tokens = torch.tensor([[2, 4, p], [10, 5, p]])
    target = P.fourier_targets(tokens, p, k)
    assert torch.allclose(target[0], torch.tensor([math.cos(2 * math.pi * 18 / 13), math.sin(2 * math.pi * 18 / 13)],
                                                  dtype=torch.float64))  # fmt: skip
    model = interp.load(zoo.build("modadd-113"))
    w = P._embedding_matrix(model)
    a = torch.arange(113, dtype=torch.float64)
    with torch.no_grad():  # plant frequency 7 in the embedding: key_frequency must find it
        w[:113] += 5 * torch.cos(2 * math.pi * 7 * a / 113)[:, None].float()
    assert P.key_frequency(model, 113) == 7


@pytest.mark.usefixtures("one_thread")
def test_induction_2l_knows_a_repeat_only_after_its_induction_layer():
    """Repeats at a random offset (not readable from position): chance from the token embedding and
    after layer 0, high only after layer 1, where the induction heads are."""
    model = interp.load("zoo:induction-2l")
    seqs = P.copied_span_tokens(64, seed=3)
    labels = P.repeat_labels(seqs)
    assert int(labels.eq(1).sum()) == 64 * 10  # exactly the copied span repeats
    names = ["hook_embed", "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    sweep = P.probe_sweep(model, seqs, labels, names=names, position=None, C=0.1)
    embed, layer0, layer1 = sweep.accuracy.tolist()
    assert embed <= sweep.chance + 0.02 and layer0 <= sweep.chance + 0.1  # measured 0.75, 0.78 (chance 0.75)
    assert layer1 >= 0.9 and layer1 - layer0 >= 0.1  # measured 0.96


@pytest.mark.usefixtures("one_thread")
def test_modadd_113_mlp_computes_cos_sin_of_the_sum():
    """Nanda et al. 2023: the MLP neurons compute cos/sin(w_k (a + b)) for the key frequencies; a linear
    probe reads them from the MLP output but not from the token embedding."""
    from interp.models.zoo import modadd

    model = interp.load("zoo:modadd-113")
    k = P.key_frequency(model, 113)
    grid = modadd.all_pairs(113)
    names = ["hook_embed", "blocks.0.hook_resid_mid", "blocks.0.mlp.hook_post"]
    sweep = P.probe_sweep(model, grid, P.fourier_targets(grid, 113, k), names=names, task="regression",
                          control=False)  # fmt: skip
    embed, before_mlp, mlp = sweep.accuracy.tolist()  # R^2 on held-out pairs
    assert abs(embed) <= 0.01  # the '=' token's embedding is the same for every pair
    assert mlp >= 0.99 and mlp - before_mlp >= 0.1  # measured 0.998 vs 0.77 after attention


def test_minilm_subject_number_is_read_from_context(minilm):
    data = P.subject_number_dataset(160, seed=0)
    assert set(data.column_names) == {"text", "label", "noun"}
    names = ["hook_embed", "blocks.2.hook_resid_post", "blocks.5.hook_resid_post"]
    sweep = P.probe_sweep(minilm, data["text"], data["label"], names=names, position=-2,
                          types=data["noun"], control=True, C=0.1)  # fmt: skip
    # at the final '.', the token embedding knows nothing of the subject; later layers have read it
    assert sweep.accuracy[0] <= 0.7 and sweep.control_accuracy[0] <= 0.7
    assert (sweep.accuracy[1:] >= 0.9).all()
    # the control (a random label per noun lemma) is learnable too: the lemma is also encoded there,
    # so selectivity is small but not negative (Hewitt & Liang's point about expressive probes)
    assert (sweep.selectivity[1:] >= 0).all()
