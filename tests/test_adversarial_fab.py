"""FAB and FAB-T against the paper's invariants: the result stays in the eps ball and the pixel box,
every changed image is adversarial, on a linear model the perturbation is the analytic minimal one
(times the overshoot at most), and on digits-cnn it is no larger than what PGD needs. Bad input.
(Agreement with torchattacks itself: test_adversarial_torchattacks.py.)"""

from __future__ import annotations

import pytest
import torch

from interp.errors import InputError
from interp.methods import adversarial as A
from interp.methods import attacks
from interp.models import zoo

pytest_plugins = ["adversarial_fixtures"]  # quick_cnn, digits_batch, quick_softmax


def _changed(run: A.Attack) -> torch.Tensor:
    return (run.x_adv != run.x).flatten(1).any(1)


@pytest.mark.parametrize(
    ("attack", "norm", "eps"),
    [("fab", "linf", 0.15), ("fab", "l2", 1.0), ("fab-t", "linf", 0.15), ("fab-t", "l2", 1.0)],
)
def test_fab_stays_in_the_ball_and_box_and_changes_only_what_it_breaks(
    quick_cnn, digits_batch, attack, norm, eps
):
    x, y = digits_batch
    run = A.run_attack(attack, quick_cnn, x, y, eps, steps=10, norm=norm, restarts=2)
    assert run.norms()[norm].max() <= eps * (1 + 1e-6)
    assert run.x_adv.min() >= 0 and run.x_adv.max() <= 1
    changed = _changed(run)
    assert torch.all(run.logits_adv.argmax(-1)[changed] != y[changed])  # success => misclassified
    assert torch.equal(run.x_adv[~changed], x[~changed])  # the rest come back clean
    correct = run.logits_clean.argmax(-1) == y
    assert not bool(changed[~correct].any())  # only correctly classified images are attacked
    assert run.accuracy_adv < run.accuracy_clean
    assert run.target is None and run.config["attack"] == attack and run.config["restarts"] == 2


@pytest.mark.parametrize(("attack", "norm", "eps", "restarts"),
                         [("fab", "linf", 0.3, 3), ("fab", "l2", 1.0, 3), ("fab-t", "linf", 0.2, 2)])  # fmt: skip
def test_random_restarts_change_what_the_first_run_missed(digits_batch, attack, norm, eps, restarts):
    """At one step per run, restarts from random points (seeded) change images the first run left:
    the model, batch and settings test_adversarial_torchattacks compares, so its restart comparison
    is not vacuous."""
    cnn = zoo.load_zoo("digits-cnn")[0].eval()  # the shipped weights, as the torchattacks test's
    x, y = digits_batch[0][:40], digits_batch[1][:40]
    one = A.run_attack(attack, cnn, x, y, eps, steps=1, norm=norm)
    more = A.run_attack(attack, cnn, x, y, eps, steps=1, norm=norm, restarts=restarts)
    assert (more.x_adv != one.x_adv).flatten(1).any(1).sum() >= 1
    assert more.accuracy_adv <= one.accuracy_adv
    again = A.run_attack(attack, cnn, x, y, eps, steps=1, norm=norm, restarts=restarts)
    assert torch.equal(again.x_adv, more.x_adv)  # seeded


def test_targeted_fab_reaches_the_target(quick_cnn, digits_batch):
    """With ``target``, success is the target class (not any misclassification)."""
    x, y = digits_batch
    run = attacks.fab(quick_cnn, x, y, 0.3, steps=20, target="least-likely")
    changed = _changed(run)
    assert changed.sum() >= 5
    assert torch.all(run.logits_adv.argmax(-1)[changed] == run.target[changed])
    assert run.config["targeted"] and run.config["target_mode"] == "least-likely"
    assert run.norms()["linf"].max() <= 0.3 + 1e-6


def _analytic_minimum(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, dual: float) -> torch.Tensor:
    """``min_k |f_k - f_y| / ||w_k - w_y||_dual`` for logits ``W x + b``: the distance to the nearest
    class boundary, the smallest perturbation any attack can misclassify with (box or not)."""
    w, b = model.fc.weight.double(), model.fc.bias.double()
    f = x.reshape(len(x), -1).double() @ w.T + b
    dist = (f - f.gather(1, y[:, None])).abs() / (w[None] - w[y][:, None]).norm(p=dual, dim=2)
    dist[torch.arange(len(y)), y] = torch.inf
    return dist.min(1).values


@pytest.mark.parametrize(("norm", "dual"), [("linf", 1), ("l2", 2)])
def test_fab_on_a_linear_model_finds_the_analytic_minimal_perturbation(
    quick_softmax, digits_batch, norm, dual
):
    """No adversarial is closer than the nearest boundary; FAB's first step lands on it times eta
    (wide bounds: the box does not bind), so FAB's norm lies in [d_min, eta * d_min]. In [0, 1]
    the lower bound still holds for every image FAB breaks."""
    x, y = digits_batch
    expected = _analytic_minimum(quick_softmax, x, y, dual)
    correct = quick_softmax(x).argmax(1) == y
    wide = attacks.fab(quick_softmax, x, y, 50.0, steps=10, norm=norm, bounds=(-50.0, 50.0))
    found = wide.norms()[norm].double()
    assert bool(_changed(wide)[correct].all())  # every correct image broken
    assert torch.all(found[correct] >= expected[correct] * (1 - 1e-4))
    assert torch.all(found[correct] <= 1.05 * expected[correct] * (1 + 1e-4))
    boxed = attacks.fab(quick_softmax, x, y, 1.0 if norm == "linf" else 8.0, steps=10, norm=norm)
    changed = _changed(boxed)
    assert changed.sum() >= 0.8 * correct.sum()
    assert torch.all(boxed.norms()[norm].double()[changed] >= expected[changed] * (1 - 1e-4))


def test_fab_needs_no_more_than_pgd(quick_cnn, digits_batch):
    """FAB's minimal-norm property against PGD: per image, the smallest budget on a 0.03 grid at
    which PGD (10 steps) misclassifies it is what PGD needs; FAB's L∞ perturbation is at most that
    for nearly every image (measured: 43 of 45 on a 0.02 grid), and well below eps at the same eps,
    where PGD spends the whole budget."""
    x, y = digits_batch
    run = attacks.fab(quick_cnn, x, y, 1.0, steps=20)
    correct = run.logits_clean.argmax(-1) == y
    found = run.norms()["linf"]
    needed = torch.full((len(y),), torch.inf)
    for eps in [0.03 * i for i in range(10, 0, -1)]:
        pgd = A.pgd(quick_cnn, x, y, eps, steps=10, random_start=False)
        needed[pgd.logits_adv.argmax(-1) != y] = eps
    both = correct & torch.isfinite(needed)
    assert both.sum() >= 30 and bool(_changed(run)[both].all())
    assert (found[both] <= needed[both] + 1e-6).double().mean() >= 0.9
    assert found[both].median() <= needed[both].median()
    eps = 0.15
    fab, pgd = attacks.fab(quick_cnn, x, y, eps, steps=20), A.pgd(quick_cnn, x, y, eps, steps=20)
    assert fab.accuracy_adv <= pgd.accuracy_adv + 2 / len(y)
    broken = _changed(fab)
    assert fab.norms()["linf"][broken].median() < 0.8 * eps <= pgd.norms()["linf"].median()


def test_fab_with_normalize_and_other_bounds_is_the_same_attack(quick_cnn, digits_batch):
    """``normalize`` equals attacking the normalising model; images in [0, 2] (model and budget
    rescaled) give twice the [0, 1] result (float rounding of the rescaling aside)."""
    x, y = digits_batch
    mean, std = torch.tensor([0.3]), torch.tensor([0.4])

    class Norm(torch.nn.Module):
        def forward(self, z):
            return (z - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)

    composed = torch.nn.Sequential(Norm(), quick_cnn.module)
    ours = attacks.fab(quick_cnn.module, x, y, 0.15, normalize=([0.3], [0.4]))
    assert torch.equal(ours.x_adv, attacks.fab(composed, x, y, 0.15).x_adv)
    assert ours.config["normalize"] == {"mean": [pytest.approx(0.3)], "std": [pytest.approx(0.4)]}

    class Halve(torch.nn.Module):
        def forward(self, z):
            return quick_cnn.module(z / 2)

    unit = attacks.fab(quick_cnn.module, x, y, 0.15)
    double = attacks.fab(Halve(), 2 * x, y, 0.3, bounds=(0.0, 2.0))
    assert torch.equal(_changed(double), _changed(unit))
    torch.testing.assert_close(double.x_adv, 2 * unit.x_adv, atol=1e-5, rtol=0)


def test_fab_progress_and_saved_sets(quick_cnn, digits_batch, tmp_path):
    x, y = digits_batch
    calls = []
    run = attacks.fab_t(
        quick_cnn, x, y, 0.1, steps=3, n_targets=2, progress=lambda d, t: calls.append((d, t))
    )
    assert calls[-1] == (6, 6) and [d for d, _ in calls] == sorted(d for d, _ in calls)
    back = A.load_attack(run.save(tmp_path / "fab.safetensors"), quick_cnn)
    assert torch.equal(back.x_adv, run.x_adv) and back.config == run.config
    assert back.config["n_targets"] == 2 and back.accuracy_adv == run.accuracy_adv


def test_fab_bad_inputs_name_the_fix(quick_cnn, digits_batch):
    x, y = digits_batch
    cases = [
        (lambda: attacks.fab(quick_cnn, x, y, -0.1), "eps must be a number >= 0"),
        (
            lambda: attacks.fab(quick_cnn, x, y, 0.1, norm="l1"),
            r"norm must be one of \('linf', 'l2'\) for FAB",
        ),
        (lambda: attacks.fab(quick_cnn, x, y, 0.1, restarts=0), "restarts must be a whole number >= 1"),
        (lambda: attacks.fab(quick_cnn, x, y, 0.1, steps=0), "steps must be a whole number >= 1"),
        (lambda: attacks.fab(quick_cnn, x, y, 0.1, seed=None), "seed must be a whole number >= 0"),
        (lambda: attacks.fab(quick_cnn, x, y, 0.1, alpha_max=2.0), r"alpha_max must be in \[0, 1\]"),
        (lambda: attacks.fab(quick_cnn, x, y, 0.1, eta=0.5), "eta must be a number >= 1"),
        (lambda: attacks.fab(quick_cnn, x, y, 0.1, beta=0.0), "beta must be a number > 0"),
        (lambda: attacks.fab(quick_cnn, x, y, 0.1, beta=1.5), r"beta must be in \(0, 1\]"),
        (lambda: attacks.fab(quick_cnn, x, y, 0.1, target=10), r"target must be classes in \[0, 10\)"),
        (lambda: attacks.fab(quick_cnn, x, y, 2.0), "larger than the input range"),
        (
            lambda: attacks.fab_t(quick_cnn, x, y, 0.1, n_targets=10),
            "n_targets must be at most classes - 1 = 9",
        ),
        (lambda: attacks.fab_t(quick_cnn, x, y, 0.1, n_targets=0), "n_targets must be a whole number >= 1"),
    ]
    for call, message in cases:
        with pytest.raises(InputError, match=message):
            call()
