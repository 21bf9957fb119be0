"""Attacks and attack probes: analytic FGSM, PGD invariants, embedding attacks, bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import interp
from interp.errors import InputError
from interp.methods import adversarial as A
from interp.models import zoo

pytest_plugins = ["adversarial_fixtures"]  # digits_split, quick_cnn, quick_softmax


def test_fgsm_equals_the_analytic_softmax_regression_attack(quick_softmax, digits_split):
    """For logits W x + b, d CE / d x = Wᵀ(p - onehot): FGSM is x + eps sign of that, clamped."""
    _, _, x, y = digits_split
    eps = 0.25
    w, b = quick_softmax.fc.weight.double(), quick_softmax.fc.bias.double()
    flat = x.reshape(len(x), -1).double()
    p = (flat @ w.T + b).softmax(-1)
    grad = (p - F.one_hot(y, 10).double()) @ w  # [N, 64], by hand
    expected = (flat + eps * grad.sign()).clamp(0, 1).reshape(x.shape).float()
    attack = A.fgsm(quick_softmax, x, y, eps)
    clear = grad.abs().reshape(x.shape) > 1e-6  # float32 vs float64 can disagree on the sign of ~0
    assert clear.float().mean() > 0.9
    torch.testing.assert_close(attack.x_adv[clear], expected[clear], atol=1e-6, rtol=0)
    assert 1 - attack.accuracy_adv >= 0.9  # Goodfellow's shallow softmax: 99.9% error on MNIST


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_stays_within_eps_and_pixel_range(quick_cnn, digits_split, norm):
    _, _, x, y = digits_split
    x, y = x[:120], y[:120]
    eps = 0.2 if norm == "linf" else 1.0
    atk = A.pgd(quick_cnn, x, y, eps, eps / 4, 10, norm=norm, random_start=True, restarts=2)
    assert atk.norms()[norm].max() <= eps + 1e-5
    assert atk.x_adv.min() >= 0 and atk.x_adv.max() <= 1
    assert atk.accuracy_adv < atk.accuracy_clean - 0.2


def test_eps_zero_gives_clean_accuracy(quick_cnn, digits_split):
    _, _, x, y = digits_split
    clean = (quick_cnn(x).argmax(-1) == y).double().mean().item()
    assert A.fgsm(quick_cnn, x, y, 0.0).accuracy_adv == clean
    assert A.pgd(quick_cnn, x, y, 0.0, 0.0, 5, restarts=2).accuracy_adv == clean
    assert torch.equal(A.pgd(quick_cnn, x, y, 0.0, 0.1, 3).x_adv, x)


def test_accuracy_falls_with_eps_and_pgd_beats_fgsm(quick_cnn, digits_split):
    _, _, x, y = digits_split
    x, y = x[:200], y[:200]
    curve_f = A.robustness_curve(quick_cnn, x, y, [0.0, 0.05, 0.1, 0.2], "fgsm")
    curve_p = A.robustness_curve(quick_cnn, x, y, [0.0, 0.05, 0.1, 0.2], "pgd", steps=8, seed=0)
    assert all(b <= a for a, b in zip(curve_f.accuracy, curve_f.accuracy[1:], strict=False))
    assert all(b <= a for a, b in zip(curve_p.accuracy, curve_p.accuracy[1:], strict=False))
    assert all(p <= f + 0.01 for p, f in zip(curve_p.accuracy, curve_f.accuracy, strict=True))
    assert curve_p.figure().data


def test_restarts_keep_the_worst_case_per_example(quick_cnn, digits_split):
    _, _, x, y = digits_split
    x, y = x[:100], y[:100]
    one = A.pgd(quick_cnn, x, y, 0.1, 0.025, 5, restarts=1, seed=3)
    many = A.pgd(quick_cnn, x, y, 0.1, 0.025, 5, restarts=3, seed=3)
    loss = lambda a: F.cross_entropy(a.logits_adv, y, reduction="none")  # noqa: E731
    assert (loss(many) >= loss(one) - 1e-6).all()  # the first restart is the single run


def test_targeted_attack_reaches_the_target(quick_cnn, digits_split):
    _, _, x, y = digits_split
    keep = y != 3
    atk = A.pgd(quick_cnn, x[keep][:60], y[keep][:60], 0.3, 0.05, 20, target=3)
    assert atk.success_rate >= 0.9
    assert (atk.logits_adv.argmax(-1) == 3).double().mean().item() == atk.success_rate


def test_success_rate_counts_only_the_images_the_attack_had_to_change(quick_cnn, digits_split):
    _, _, x, y = digits_split
    x, y = x[:40], y[:40]
    nothing = A.pgd(quick_cnn, x, y, 0.0, 0.0, 1, target=3)  # eps 0: no image moves
    assert (nothing.x_adv == x).all() and nothing.success_rate == 0.0
    already = (nothing.logits_clean.argmax(-1) == 3).sum()
    assert 0 < already < len(x) and nothing.n_attackable == len(x) - already  # the 3s are left out
    untargeted = A.pgd(quick_cnn, x, y, 0.0, 0.0, 1)
    correct = int((untargeted.logits_clean.argmax(-1) == y).sum())
    assert untargeted.success_rate == 0.0 and untargeted.n_attackable == correct
    strong = A.pgd(quick_cnn, x, y, 0.3, 0.05, 10)
    wrong_after = strong.logits_adv.argmax(-1) != y
    was_right = strong.logits_clean.argmax(-1) == y
    assert strong.success_rate == pytest.approx(
        (wrong_after & was_right).sum().item() / was_right.sum().item()
    )


def test_bad_inputs_are_input_errors(quick_cnn, digits_split):
    _, _, x, y = digits_split
    with pytest.raises(InputError, match=r"expects one input of shape \(1, 8, 8\)"):
        A.fgsm(quick_cnn, torch.rand(4, 1, 9, 9), y[:4], 0.1)
    with pytest.raises(InputError, match=r"expects inputs in \[0.0, 1.0\]"):
        A.fgsm(quick_cnn, x[:4] * 16, y[:4], 0.1)
    with pytest.raises(InputError, match="eps must be a number >= 0"):
        A.pgd(quick_cnn, x[:4], y[:4], -0.1)
    with pytest.raises(InputError, match="got 3 labels for 4 images"):
        A.fgsm(quick_cnn, x[:4], y[:3], 0.1)
    with pytest.raises(InputError, match=r"images must lie in \[0.0, 1.0\]"):
        A.fgsm(quick_cnn.module, x[:4] - 1, y[:4], 0.1)  # a plain nn.Module: checked against bounds
    with pytest.raises(InputError, match="norm must be one of"):
        A.pgd(quick_cnn, x[:4], y[:4], 0.1, norm="l1")
    with pytest.raises(InputError, match="targeted=True needs target="):
        A.fgsm(quick_cnn, x[:4], y[:4], 0.1, targeted=True)


def test_attack_probe_layers_and_restoration(quick_cnn, digits_split):
    x_tr, y_tr, x, y = digits_split
    x, y = x[:200], y[:200]
    adv = A.pgd(quick_cnn, x, y, 0.15, 0.04, 10).x_adv
    probe = A.attack_probe(
        quick_cnn, x, adv, y, names=["relu1.hook_out", "pool.hook_out", "fc.hook_out"], C=0.1
    )
    assert probe.names[-1] == "fc.hook_out" and len(probe.divergence) == len(probe.names) == 3
    # patching the clean logits (the last layer) restores everything; so does any full layer of a chain
    assert probe.restoration[-1] == 1.0
    assert (probe.divergence > 0).all()
    assert probe.accuracy_adv < probe.accuracy_clean
    assert probe.probe_acc_adv.mean() < probe.probe_acc_clean.mean()
    assert probe.figure().data
    units = A.restoration_by_unit(quick_cnn, x, adv, y, "relu2.hook_out", dim=1)
    assert units.shape == (32,) and units.max() <= 1.0
    same = A.attack_probe(
        quick_cnn, x[:80], x[:80], y[:80], names="pool.hook_out", train=(x_tr[:200], y_tr[:200]), C=0.1
    )
    assert same.divergence[0] == 0 and math.isnan(same.restoration[0])


def test_attack_figure_shows_three_panels(quick_cnn, digits_split):
    _, _, x, y = digits_split
    fig = A.fgsm(quick_cnn, x[:5], y[:5], 0.1).figure(2)
    assert len(fig.data) == 3
    with pytest.raises(InputError, match="outside the batch"):
        A.fgsm(quick_cnn, x[:5], y[:5], 0.1).figure(7)


def test_adversarial_training_makes_pgd_weaker(quick_cnn, digits_split):
    x_tr, y_tr, x, y = digits_split
    x, y = x[:200], y[:200]
    natural = A.pgd(quick_cnn, x, y, 0.1, 0.025, 8).accuracy_adv
    robust = A.adversarial_train(
        quick_cnn.module, x_tr[:600], y_tr[:600], epochs=3, steps=3, alpha=0.04, lr=1e-3
    ).module
    assert A.pgd(robust, x, y, 0.1, 0.025, 8).accuracy_adv > natural + 0.05
    assert robust is not quick_cnn.module


def _curves(pgd_at: dict[float, float], clean: float = 0.98, gap: float = 0.02) -> dict:
    """Accuracy curves in the reproduction's ``_curves`` layout (FGSM a little above PGD)."""
    from interp.reproductions.adversarial import EPS

    pgd = [clean if e == 0 else pgd_at[e] for e in EPS]
    return {"clean": clean, "pgd": pgd, "fgsm": [min(clean, p + gap) for p in pgd]}


def _verdicts(nat: dict, rob: dict) -> dict[str, bool]:
    from interp.reproductions.adversarial import robustness_checks

    rows = robustness_checks(nat, rob, 360)
    return {"error 0.1": rows[2].passed, "accuracy 0.2": rows[3].passed}


def test_the_3x_ratio_is_checked_where_the_natural_model_is_broken():
    # digits as measured: natural keeps 0.44 at eps 0.1 (3x would need 1.3), 0 at eps 0.2
    nat = _curves({0.05: 0.86, 0.1: 0.44, 0.2: 0.0, 0.3: 0.0})
    rob = _curves({0.05: 0.93, 0.1: 0.84, 0.2: 0.16, 0.3: 0.02})
    assert _verdicts(nat, rob) == {"error 0.1": True, "accuracy 0.2": True}
    # Madry-like: natural broken already at eps 0.1
    madry = _curves({0.05: 0.3, 0.1: 0.0, 0.2: 0.0, 0.3: 0.0})
    assert _verdicts(madry, rob) == {"error 0.1": True, "accuracy 0.2": True}
    # adversarial training that did not help fails both
    assert _verdicts(nat, nat) == {"error 0.1": False, "accuracy 0.2": False}
    # robust at eps 0.1 only a little (error 0.56 -> 0.25: 2.2x) fails the eps 0.1 row alone
    weak = _curves({0.05: 0.9, 0.1: 0.75, 0.2: 0.16, 0.3: 0.02})
    assert _verdicts(nat, weak) == {"error 0.1": False, "accuracy 0.2": True}
    # a natural accuracy of 0 counts as one image: 2 robust images of 360 are not 3x, 3 are
    for images, passed in ((0, False), (2, False), (3, True)):
        rob_02 = _curves({0.05: 0.93, 0.1: 0.84, 0.2: images / 360, 0.3: 0.0})
        assert _verdicts(nat, rob_02)["accuracy 0.2"] is passed


def _reference_pgd_accuracy(module, x, y, eps, alpha, steps, restarts, seed) -> float:
    """Independent PGD: an image counts as robust only if no iterate of any restart fools the model."""
    gen = torch.Generator().manual_seed(seed)
    robust = torch.ones(len(y), dtype=torch.bool)
    for _ in range(restarts):
        adv = (x + torch.empty_like(x).uniform_(-eps, eps, generator=gen)).clamp(0, 1)
        for _ in range(steps):
            adv.requires_grad_(True)
            (grad,) = torch.autograd.grad(F.cross_entropy(module(adv), y, reduction="sum"), adv)
            adv = (x + (adv.detach() + alpha * grad.sign() - x).clamp(-eps, eps)).clamp(0, 1)
            with torch.no_grad():
                robust &= module(adv).argmax(-1) == y
    return robust.double().mean().item()


def test_the_shipped_cnn_keeps_its_pgd_accuracy_under_a_stronger_attack(digits_split):
    """The reproduction's PGD (40 steps, 5 restarts, alpha eps/4) is near converged on the shipped
    digits-cnn at eps 0.1: an independent PGD with 2.5x the steps at a smaller alpha, counting any
    fooling iterate, finds at most 2 more of 120 images. What is left (over a third) is why the
    reproduction does not check a 3x accuracy ratio at eps 0.1."""
    model = interp.load("zoo:digits-cnn")
    _, _, x, y = digits_split
    x, y = x[:120], y[:120]
    ours = A.pgd(model, x, y, 0.1, 0.025, 40, restarts=5, seed=0).accuracy_adv
    module = model.module.eval().requires_grad_(False)
    try:
        reference = _reference_pgd_accuracy(module, x, y, 0.1, 0.01, 100, 4, seed=1)
    finally:
        module.requires_grad_(True)
    assert reference >= ours - 2 / 120
    assert reference > 1 / 3 and module(x).argmax(-1).eq(y).double().mean().item() >= 0.95


def test_embedding_pgd_flips_a_transformer_prediction():
    torch.manual_seed(0)
    model = interp.load(zoo.build("induction-2l"))
    tokens = zoo.repeated_tokens(4, 6, seed=1)
    atk = A.embedding_pgd(model, tokens, eps=2.0, alpha=0.5, steps=15, norm="l2")
    assert atk.hook in ("hook_embed", "embed.hook_out")
    assert atk.delta.norm(dim=-1).max() <= 2.0 + 1e-5
    assert atk.flipped().all()
    assert (atk.loss_adv < atk.loss_clean).all()
    only_last = A.embedding_pgd(model, tokens, eps=0.5, steps=3, norm="linf", positions=[-1])
    assert only_last.delta[:, :-1].abs().max() == 0 and only_last.delta.abs().max() <= 0.5 + 1e-6
