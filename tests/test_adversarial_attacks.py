"""CW, DeepFool, APGD, Square and the ensemble against their papers' invariants; target modes,
input normalisation, saved adversarial sets, robustness curves for every attack, bad input.
(Agreement with torchattacks itself: test_adversarial_torchattacks.py.)"""

from __future__ import annotations

import copy

import pytest
import torch

from interp.errors import InputError
from interp.methods import adversarial as A
from interp.methods import attacks

pytest_plugins = ["adversarial_fixtures"]  # digits_split, quick_cnn, digits_batch, quick_softmax


def test_public_names_stay_importable_from_adversarial():
    for name in ("cw", "deepfool", "apgd", "apgd_t", "square", "autoattack", "fab", "fab_t"):
        assert getattr(A, name) is getattr(attacks, name)


def test_deepfool_lands_on_the_nearest_boundary_of_a_linear_model(quick_softmax, digits_batch):
    """For logits W x + b DeepFool's one step is the analytic minimal L2 perturbation:
    min_k |f_k - f_y| / |w_k - w_y| (wide bounds, so no clamping); with overshoot it crosses."""
    x, y = digits_batch
    w, b = quick_softmax.fc.weight.double(), quick_softmax.fc.bias.double()
    flat = x.reshape(len(x), -1).double()
    f = flat @ w.T + b
    correct = f.argmax(1) == y
    f_y = f.gather(1, y[:, None])
    dist = (f - f_y).abs() / (w[None] - w[y][:, None]).norm(dim=2)
    dist[torch.arange(len(y)), y] = torch.inf
    expected = dist.min(1).values
    exact = attacks.deepfool(quick_softmax, x, y, steps=1, overshoot=0.0, bounds=(-50.0, 50.0))
    l2 = exact.norms()["l2"].double()
    torch.testing.assert_close(l2[correct], expected[correct], rtol=1e-4, atol=1e-5)
    assert torch.all(l2[~correct] == 0)  # already misclassified: untouched
    over = attacks.deepfool(quick_softmax, x, y, steps=5, overshoot=0.02, bounds=(-50.0, 50.0))
    assert over.accuracy_adv == 0.0
    torch.testing.assert_close(
        over.norms()["l2"].double()[correct], 1.02 * expected[correct], rtol=1e-3, atol=1e-5
    )


def test_deepfool_reaches_the_boundary_in_a_few_steps(quick_cnn, digits_batch):
    """Without a pixel box, DeepFool crosses every boundary within ~2-3 linearisations (the paper's
    observation), each image stopping at the step after it is broken; inside [0, 1] the clamping
    slows it, but more steps still break more images."""
    x, y = digits_batch
    wide = [attacks.deepfool(quick_cnn, x, y, steps=s, bounds=(-5.0, 5.0)) for s in (1, 3)]
    assert wide[0].accuracy_adv > wide[1].accuracy_adv == 0.0
    assert max(wide[1].config["steps_used"]) <= 3
    boxed = [attacks.deepfool(quick_cnn, x, y, steps=s).accuracy_adv for s in (1, 50)]
    assert boxed[1] < boxed[0]


def test_cw_keeps_only_adversarials_and_finds_more_with_larger_c(quick_cnn, digits_batch):
    x, y = digits_batch
    weak = attacks.cw(quick_cnn, x, y, c=0.1, steps=30, lr=0.05)
    strong = attacks.cw(quick_cnn, x, y, c=10.0, steps=30, lr=0.05)
    assert strong.success_rate > weak.success_rate
    for run in (weak, strong):
        changed = (run.x_adv != run.x).flatten(1).any(1)
        assert torch.all(run.logits_adv.argmax(-1)[changed] != y[changed])  # kept only when adversarial
        assert run.x_adv.min() >= 0 and run.x_adv.max() <= 1


def test_cw_margin_reads_negative_logits():
    """f = max(z_y - max_{i != y} z_i, -kappa), also where every logit is negative."""
    z = torch.tensor([[-1.0, -3.0, -2.0], [-5.0, -1.0, -4.0]])
    y = torch.tensor([0, 2])
    from interp.methods.attacks.minimal import _cw_margin

    torch.testing.assert_close(_cw_margin(z, y, False, 10.0), torch.tensor([1.0, -3.0]))
    torch.testing.assert_close(_cw_margin(z, y, False, 0.0), torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(_cw_margin(z, y, True, 10.0), torch.tensor([-1.0, 3.0]))


@pytest.mark.parametrize("loss", ["ce", "dlr"])
def test_apgd_stays_in_the_ball_and_returns_unbroken_images_clean(quick_cnn, digits_batch, loss):
    x, y = digits_batch
    run = attacks.apgd(quick_cnn, x, y, 0.15, steps=10, loss=loss)
    assert run.norms()["linf"].max() <= 0.15 + 1e-6
    broken = run.logits_adv.argmax(-1) != y
    assert torch.equal(run.x_adv[~broken], x[~broken])
    assert run.accuracy_adv < run.accuracy_clean
    l2 = attacks.apgd(quick_cnn, x, y, 1.0, steps=10, loss=loss, norm="l2")
    assert l2.norms()["l2"].max() <= 1.0 + 1e-5


def test_dlr_loss_by_hand():
    z = torch.tensor([[3.0, 1.0, 0.0, 2.0], [0.0, 4.0, 1.0, 2.0]])
    y = torch.tensor([0, 2])
    # row 0: y is top, second 2, third 1 -> -(3 - 2) / (3 - 1); row 1: -(1 - 4) / (4 - 1)
    torch.testing.assert_close(attacks.dlr_loss(z, y), torch.tensor([-0.5, 1.0]))


def test_the_ensemble_is_at_least_as_strong_as_its_first_member(quick_cnn, digits_batch):
    x, y = digits_batch
    first = attacks.apgd(quick_cnn, x, y, 0.1, steps=5, loss="ce")
    ens = attacks.autoattack(quick_cnn, x, y, 0.1, steps=5, n_queries=50)
    assert ens.accuracy_adv <= first.accuracy_adv
    assert ens.config["members"] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    after = ens.config["robust_after"]
    assert after == sorted(after, reverse=True)
    assert after[-1] == round(ens.accuracy_adv * len(y))
    assert ens.norms()["linf"].max() <= 0.1 + 1e-6


class _NoBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z):
        return z.clone()

    @staticmethod
    def backward(ctx, g):
        raise AssertionError("a gradient was asked of a score-based attack")


def test_square_uses_scores_only_and_stays_in_the_ball(quick_cnn, digits_batch):
    x, y = digits_batch
    module = quick_cnn.module

    class Blind(torch.nn.Module):
        def forward(self, z):
            return module(_NoBackward.apply(z))

    run = attacks.square(Blind(), x, y, 0.2, n_queries=100)
    assert run.norms()["linf"].max() <= 0.2 + 1e-6
    assert run.accuracy_adv < run.accuracy_clean
    again = attacks.square(Blind(), x, y, 0.2, n_queries=100)
    assert torch.equal(run.x_adv, again.x_adv)  # seeded


def test_target_modes(quick_cnn, digits_batch):
    x, y = digits_batch
    logits = quick_cnn(x)
    ll = A.resolve_target("least-likely", y, quick_cnn.module, x)
    by_hand = torch.tensor(
        [min((c for c in range(10) if c != int(t)), key=lambda c: logits[i, c]) for i, t in enumerate(y)]
    )
    assert torch.equal(ll, by_hand)
    rnd = A.resolve_target("random", y, quick_cnn.module, x, seed=3)
    assert torch.all(rnd != y) and torch.equal(
        rnd, A.resolve_target("random", y, quick_cnn.module, x, seed=3)
    )
    many = A.resolve_target("random", y.repeat(50), quick_cnn.module, x.repeat(50, 1, 1, 1), seed=0)
    assert set(many.tolist()) == set(range(10))
    seen = []
    fn = A.resolve_target(lambda xs, ys: seen.append(len(xs)) or (ys + 1) % 10, y, quick_cnn.module, x)
    assert torch.equal(fn, (y + 1) % 10) and seen == [len(x)]
    run = A.pgd(quick_cnn, x, y, 0.3, steps=20, target="least-likely")
    assert torch.equal(run.target, ll) and run.config["target_mode"] == "least-likely"
    assert run.success_rate > 0.5


def test_normalize_equals_attacking_the_normalising_model(quick_cnn, digits_batch):
    x, y = digits_batch
    mean, std = torch.tensor([0.3]), torch.tensor([0.4])

    class Norm(torch.nn.Module):
        def forward(self, z):
            return (z - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)

    composed = torch.nn.Sequential(Norm(), quick_cnn.module)
    for run in (A.pgd, attacks.apgd):
        ours = run(quick_cnn.module, x, y, 0.1, steps=5, normalize=([0.3], [0.4]))
        ref = run(composed, x, y, 0.1, steps=5)
        assert torch.equal(ours.x_adv, ref.x_adv)
        assert ours.config["normalize"] == {"mean": [pytest.approx(0.3)], "std": [pytest.approx(0.4)]}
    # the model without normalisation attacked as if it had it is a different attack
    assert not torch.equal(A.pgd(quick_cnn.module, x, y, 0.1, steps=5).x_adv, ours.x_adv)


def test_saved_sets_round_trip_with_config_and_seed(quick_cnn, digits_batch, tmp_path):
    x, y = digits_batch
    run = A.pgd(quick_cnn, x, y, 0.1, steps=3, target=2, seed=7)
    path = run.save(tmp_path / "set.safetensors")
    back = A.load_attack(path, quick_cnn)
    assert (
        torch.equal(back.x_adv, run.x_adv)
        and torch.equal(back.x, run.x)
        and torch.equal(back.target, run.target)
    )
    assert back.config == run.config and back.config["seed"] == 7
    assert back.accuracy_adv == run.accuracy_adv
    bare = A.load_attack(path)
    with pytest.raises(InputError, match="loaded without a model"):
        _ = bare.accuracy_adv
    (tmp_path / "bad.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(InputError, match="not a safetensors file"):
        A.load_attack(tmp_path / "bad.safetensors")


@pytest.mark.parametrize("name", A.ATTACK_NAMES)
def test_robustness_curve_for_every_attack(quick_cnn, digits_batch, name):
    x, y = digits_batch[0][:24], digits_batch[1][:24]
    kw = {"steps": 3} if name in ("pgd", "apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t") else {}
    kw |= {"n_queries": 30} if name == "square" else {}
    kw |= {"steps": 2, "n_queries": 20} if name == "autoattack" else {}
    kw |= {"c": 10.0, "steps": 30, "lr": 0.05} if name == "cw" else {}
    calls = []
    budgets = [0.0, 0.5, 2.0] if name in A.MIN_NORM_ATTACKS else [0.0, 0.1, 0.3]  # L2 vs L∞ units
    curve = A.robustness_curve(
        quick_cnn, x, y, budgets, name, progress=lambda d, t: calls.append((d, t)), **kw
    )
    clean = (quick_cnn(x).argmax(-1) == y).double().mean().item()
    assert curve.accuracy[0] == pytest.approx(clean)
    assert curve.accuracy[-1] < clean
    if name in A.MIN_NORM_ATTACKS:  # one run read at each budget: never rises
        assert curve.accuracy == sorted(curve.accuracy, reverse=True) and calls == [(1, 1)]
    else:
        assert calls[-1] == (3, 3)
    assert len(curve.figure().data) == 1


def test_robustness_figure_overlays_curves(quick_cnn, digits_batch):
    from interp.viz import robustness_figure

    x, y = digits_batch
    curves = [
        A.robustness_curve(quick_cnn, x, y, [0.0, 0.1], "fgsm"),
        A.robustness_curve(quick_cnn, x, y, [0.0, 0.1], "pgd", steps=2),
    ]
    fig = robustness_figure(curves)
    assert [t.name for t in fig.data] == ["fgsm", "pgd"]
    assert list(fig.data[1].y) == curves[1].accuracy


def test_bad_inputs_name_the_fix(quick_cnn, digits_batch):
    x, y = digits_batch
    for name in A.EPS_ATTACKS:
        with pytest.raises(InputError, match="eps must be a number >= 0"):
            A.run_attack(name, quick_cnn, x, y, -0.1)
    with pytest.raises(InputError, match=r"eps=8 is larger than the input range allows .*8/255"):
        A.pgd(quick_cnn, x, y, 8)
    with pytest.raises(InputError, match="larger than the input range"):
        attacks.apgd(quick_cnn, x, y, 9.0, norm="l2")  # L2: at most 1 * sqrt(64) = 8
    attacks.apgd(quick_cnn, x[:2], y[:2], 7.9, norm="l2", steps=1)  # within the L2 range: fine
    with pytest.raises(InputError, match=r"target must be classes in \[0, 10\)"):
        A.pgd(quick_cnn, x, y, 0.1, target=10)
    with pytest.raises(InputError, match=r"target must be classes in \[0, 10\)"):
        attacks.cw(quick_cnn, x, y, target=-1)
    with pytest.raises(InputError, match=r"labels must be classes in \[0, 10\)"):
        A.fgsm(quick_cnn, x, y + 10, 0.1)  # checked on FGSM's own forward
    with pytest.raises(InputError, match="target must be a class, classes, a function"):
        A.pgd(quick_cnn, x, y, 0.1, target="most-likely")
    with pytest.raises(InputError, match=r"normalize mean has 3 values but the images have 1 channel"):
        A.pgd(quick_cnn, x, y, 0.1, normalize=([0.5, 0.5, 0.5], [0.2, 0.2, 0.2]))
    with pytest.raises(InputError, match="normalize std must be > 0"):
        attacks.square(quick_cnn, x, y, 0.1, normalize=([0.5], [0.0]))
    with pytest.raises(InputError, match="attack must be one of"):
        A.robustness_curve(quick_cnn, x, y, [0.1], "jsma")
    with pytest.raises(InputError, match="APGD-T's targeted DLR loss needs at least 4 classes"):
        attacks.apgd_t(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3)), x, y % 3, 0.1)
    with pytest.raises(InputError, match="n_targets must be at most classes - 1 = 9"):
        attacks.apgd_t(quick_cnn, x, y, 0.1, n_targets=10)  # the rule FAB-T's n_targets follows too


def test_fgsm_checks_labels_without_an_extra_forward(quick_cnn, digits_batch):
    """FGSM's class check rides on its one forward: the model runs once per call."""
    x, y = digits_batch
    calls = []
    handle = quick_cnn.module.register_forward_hook(lambda *_: calls.append(1))
    try:
        A.fgsm(quick_cnn.module, x, y, 0.1)
    finally:
        handle.remove()
    assert len(calls) == 1
    assert all(p.requires_grad for p in quick_cnn.module.parameters())  # the attack's freeze is undone


def test_pgd_checks_labels_on_its_first_step(quick_cnn, digits_batch):
    """Untargeted PGD's class check rides on its first step's forward: ``steps`` batch forwards per
    call and no one-image probe; a bad label is still an InputError, with or without steps or a target."""
    x, y = digits_batch
    sizes = []
    handle = quick_cnn.module.register_forward_hook(lambda _m, inp, _o: sizes.append(len(inp[0])))
    try:
        A.pgd(quick_cnn.module, x, y, 0.1, steps=3)
    finally:
        handle.remove()
    assert sizes == [len(x)] * 3
    for kwargs in ({"steps": 3}, {"steps": 0}, {"steps": 3, "target": 3}, {"restarts": 2, "steps": 1}):
        with pytest.raises(InputError, match=r"labels must be classes in \[0, 10\)"):
            A.pgd(quick_cnn, x, y + 10, 0.1, **kwargs)
    assert all(p.requires_grad for p in quick_cnn.module.parameters())  # undone after the error too


@pytest.mark.parametrize("name", ["apgd-ce", "deepfool", "fab"])
def test_attack_probes_take_any_attack(quick_cnn, digits_split, name):
    """The probe reads an Attack from any attack and equals the probe of its tensors."""
    x_tr, y_tr, x, y = digits_split
    run = A.run_attack(name, quick_cnn, x[:60], y[:60], 0.2)
    probe = A.attack_probe(
        quick_cnn, run, names=["pool.hook_out", "fc.hook_out"], train=(x_tr[:200], y_tr[:200])
    )
    ref = A.attack_probe(quick_cnn, run.x, run.x_adv, run.labels, names=["pool.hook_out", "fc.hook_out"],
                         train=(x_tr[:200], y_tr[:200]))  # fmt: skip
    assert probe.accuracy_adv == ref.accuracy_adv == pytest.approx(run.accuracy_adv)
    torch.testing.assert_close(probe.divergence, ref.divergence)
    assert probe.divergence[-1] > 0
    with pytest.raises(InputError, match="either an Attack or"):
        A.attack_probe(quick_cnn, run, run.x_adv)


@pytest.mark.parametrize("name", ["apgd-ce", "apgd-dlr", "apgd-t"])
def test_apgd_checks_labels_on_its_class_count_forward(quick_cnn, digits_batch, name):
    """APGD's label check shares the forward that counts the classes: a bad label is still an
    InputError, raised before the attack, and a call runs one probe forward, not two."""
    x, y = digits_batch
    with pytest.raises(InputError, match=r"labels must be classes in \[0, 10\)"):
        A.run_attack(name, quick_cnn, x, y + 10, 0.1)
    sizes = []
    handle = quick_cnn.module.register_forward_hook(lambda _m, inp, _o: sizes.append(len(inp[0])))
    try:
        A.run_attack(name, quick_cnn.module, x, y, 0.1, steps=1)
    finally:
        handle.remove()
    assert sizes.count(1) == 1  # the one-image probe (the rest are batch forwards)


def test_attacks_restore_each_submodules_mode(quick_cnn, digits_batch):
    """An attack runs the model in eval mode and hands it back as it found it, submodule by
    submodule: a training model with a frozen (eval) dropout inside keeps that dropout in eval."""
    x, y = digits_batch
    inner = copy.deepcopy(quick_cnn.module)
    module = torch.nn.Sequential(inner, torch.nn.Dropout(0.5))
    module.train()
    module[1].eval()
    seen = []
    handle = inner.fc.register_forward_hook(lambda m, *_: seen.append(m.training))
    try:
        adv = A.pgd(module, x, y, 0.1, steps=2).x_adv
    finally:
        handle.remove()
    assert seen and not any(seen)  # eval throughout
    assert [m.training for m in module.modules()] == [True, *[True] * len(list(inner.modules())), False]
    assert all(p.requires_grad for p in module.parameters())
    torch.testing.assert_close(adv, A.pgd(inner.eval(), x, y, 0.1, steps=2).x_adv, rtol=0, atol=0)
