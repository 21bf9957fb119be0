"""Auto-PGD (Croce & Hein 2020): APGD-CE, APGD-DLR and the targeted APGD-T.

PGD with a step size that adapts per image: momentum 0.75, and at checkpoints (after 22% of the
steps, then shrinking by 3% down to 6%) the step is halved, and the image sent back to its best
point, wherever the loss rose in fewer than ``rho`` of the steps since the last checkpoint or the
best loss did not improve. It follows torchattacks' ``APGD`` / ``APGDT`` operation for operation
(same random start from a generator seeded with ``seed``, same checkpoints, same order of draws),
so on the same model and batch the adversarial images are identical; the per-image bookkeeping is
done with masks in torch instead of index lists in numpy.

As in AutoAttack, only the images the model classifies correctly are attacked, and an image the
attack does not break is returned clean: ``x_adv`` differs from ``x`` only where it succeeds.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from interp.errors import InputError
from interp.methods.adversarial import (
    Attack,
    _eval,
    _logits,
    _stats,
    check_class_range,
    check_inputs,
    check_n_targets,
    check_number,
    n_classes,
)
from interp.models.base import HookedModel

LOSSES = ("ce", "dlr")


def dlr_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Difference of logits ratio: ``-(z_y - max_{i != y} z_i) / (z_π1 - z_π3)`` (needs >= 3 classes)."""
    z_sorted, ind_sorted = logits.sort(dim=1)
    ind = (ind_sorted[:, -1] == y).float()
    b = torch.arange(len(y), device=y.device)
    return -(logits[b, y] - z_sorted[:, -2] * ind - z_sorted[:, -1] * (1.0 - ind)) / (
        z_sorted[:, -1] - z_sorted[:, -3] + 1e-12
    )


def dlr_loss_targeted(logits: torch.Tensor, y: torch.Tensor, y_target: torch.Tensor) -> torch.Tensor:
    """Targeted DLR: ``-(z_y - z_t) / (z_π1 - (z_π3 + z_π4) / 2)`` (needs >= 4 classes)."""
    z_sorted, _ = logits.sort(dim=1)
    b = torch.arange(len(y), device=y.device)
    return -(logits[b, y] - logits[b, y_target]) / (
        z_sorted[:, -1] - 0.5 * z_sorted[:, -3] - 0.5 * z_sorted[:, -4] + 1e-12
    )


def apgd(
    model: HookedModel | nn.Module,
    x: Any,
    y: Any,
    eps: float,
    steps: int = 10,
    *,
    loss: str = "ce",
    norm: str = "linf",
    restarts: int = 1,
    rho: float = 0.75,
    seed: int = 0,
    bounds: tuple[float, float] | None = None,
    normalize: tuple[Any, Any] | None = None,
) -> Attack:
    """APGD with the cross-entropy (``loss="ce"``, APGD-CE) or DLR loss (``"dlr"``, APGD-DLR).

    Args:
        steps: iterations per restart (torchattacks' default 10; AutoAttack's paper uses 100).
        restarts: further random starts for the images still robust.
        rho: the share of loss increases below which a checkpoint halves the step.
    """
    if loss not in LOSSES:
        raise InputError(f"loss must be one of {LOSSES}, got {loss!r}")
    module, xt, yt, bounds_, norm = _checked(model, x, y, eps, steps, restarts, rho, norm, bounds, normalize)
    n_classes = _n_classes(module, xt, yt)
    if loss == "dlr" and n_classes < 3:
        raise InputError(f"the DLR loss needs at least 3 classes, the model has {n_classes}; use loss='ce'")
    criterion = (lambda z, t: F.cross_entropy(z, t, reduction="none")) if loss == "ce" else dlr_loss
    gen = torch.Generator(device=xt.device).manual_seed(int(seed))
    with _eval(module), torch.no_grad():
        acc = _logits(module, xt).argmax(1) == yt
        adv = xt.clone()
        for _ in range(int(restarts)):
            _restart(module, xt, yt, acc, adv, lambda z, t, idx: criterion(z, t),
                     float(eps), int(steps), norm, bounds_, float(rho), gen)  # fmt: skip
    config = {"attack": f"apgd-{loss}", "eps": eps, "steps": int(steps), "norm": norm, "loss": loss,
              "restarts": int(restarts), "rho": rho, "seed": seed, "bounds": bounds_, "targeted": False,
              "normalize": _stats(normalize)}  # fmt: skip
    return Attack(xt, adv, yt, None, config, module)


def apgd_t(
    model: HookedModel | nn.Module,
    x: Any,
    y: Any,
    eps: float,
    steps: int = 10,
    *,
    n_targets: int | None = None,
    norm: str = "linf",
    restarts: int = 1,
    rho: float = 0.75,
    seed: int = 0,
    bounds: tuple[float, float] | None = None,
    normalize: tuple[Any, Any] | None = None,
) -> Attack:
    """APGD-T: the targeted DLR loss against each of the ``n_targets`` most likely other classes in
    turn (default: all ``classes - 1``), each run on the images still robust.

    The returned attack is untargeted in meaning (``target`` is None): success is misclassification.
    L∞ is identical to torchattacks' ``APGDT``; for L2, torchattacks steps every image by the first
    image's step size (``step_size[0]``), where this steps each by its own, as APGD does.
    """
    module, xt, yt, bounds_, norm = _checked(model, x, y, eps, steps, restarts, rho, norm, bounds, normalize)
    n_classes = _n_classes(module, xt, yt)
    if n_classes < 4:
        raise InputError(f"APGD-T's targeted DLR loss needs at least 4 classes, the model has {n_classes}")
    n_targets = check_n_targets(n_targets, n_classes)
    gen = torch.Generator(device=xt.device).manual_seed(int(seed))
    with _eval(module), torch.no_grad():
        clean = _logits(module, xt)
        acc = clean.argmax(1) == yt
        adv = xt.clone()
        order = clean.sort(dim=1)[1]
        for rank in range(2, int(n_targets) + 2):

            def criterion(z, t, idx, rank=rank):
                return dlr_loss_targeted(z, t, order[idx, -rank])

            for _ in range(int(restarts)):
                _restart(module, xt, yt, acc, adv, criterion, float(eps), int(steps), norm, bounds_,
                         float(rho), gen)  # fmt: skip
    config = {"attack": "apgd-t", "eps": eps, "steps": int(steps), "norm": norm, "n_targets": int(n_targets),
              "restarts": int(restarts), "rho": rho, "seed": seed, "bounds": bounds_, "targeted": False,
              "normalize": _stats(normalize)}  # fmt: skip
    return Attack(xt, adv, yt, None, config, module)


def _checked(model, x, y, eps, steps, restarts, rho, norm, bounds, normalize):
    if norm not in ("linf", "l2"):
        raise InputError(f"norm must be one of ('linf', 'l2'), got {norm!r}")
    check_number("steps", steps, minimum=1, integer=True, why="APGD iterations")
    check_number("restarts", restarts, minimum=1, integer=True)
    check_number("rho", rho, minimum=0.0, why="the share of loss increases a checkpoint expects")
    # the labels are checked against the classes by _n_classes' forward (one forward, not two)
    module, xt, yt, bounds_ = check_inputs(
        model, x, y, eps, bounds, norm=norm, normalize=normalize, classes=False
    )
    return module, xt, yt, bounds_, norm


def _n_classes(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """The model's number of classes (one forward of one image); InputError for a label outside."""
    with _eval(module), torch.no_grad():
        classes = n_classes(module(x[:1]))
    check_class_range(classes, y, "labels")
    return classes


def _restart(module, x, y, acc, adv, criterion, eps, steps, norm, bounds, rho, gen) -> None:
    """One APGD run on the images still robust (``acc``), updating ``acc`` and ``adv`` in place."""
    idx = acc.nonzero().flatten()
    if not len(idx):
        return
    acc_curr, adv_curr = _single_run(
        module, x[idx], y[idx], idx, criterion, eps, steps, norm, bounds, rho, gen
    )
    broken = ~acc_curr
    acc[idx[broken]] = False
    adv[idx[broken]] = adv_curr[broken]


def _grad(module, x_adv, y, idx, criterion, need_grad=True):
    """Logits, per-image loss and (``need_grad``) the loss's gradient at ``x_adv``."""
    if not need_grad:
        logits = module(x_adv)
        return logits, criterion(logits, y, idx), None
    x_adv.requires_grad_()
    with torch.enable_grad():
        logits = module(x_adv)
        loss_indiv = criterion(logits, y, idx)
        grad = torch.autograd.grad(loss_indiv.sum(), [x_adv])[0].detach()
    return logits.detach(), loss_indiv.detach(), grad


def _l2(t: torch.Tensor) -> torch.Tensor:
    return (t**2).sum(dim=tuple(range(1, t.ndim)), keepdim=True).sqrt()


def _project(x, x_adv, grad, grad2, step_size, a, eps, low, high, norm, lo, hi):
    """torchattacks' APGD update: a step, projection, momentum, projection (op for op)."""
    if norm == "linf":
        x_1 = x_adv + step_size * torch.sign(grad)
        x_1 = torch.clamp(torch.min(torch.max(x_1, lo), hi), low, high)
        return torch.clamp(
            torch.min(torch.max(x_adv + (x_1 - x_adv) * a + grad2 * (1 - a), lo), hi), low, high
        )
    x_1 = x_adv + step_size * grad / (_l2(grad) + 1e-12)
    d = x_1 - x
    x_1 = torch.clamp(x + d / (_l2(d) + 1e-12) * torch.min(eps * torch.ones_like(x), _l2(d)), low, high)
    x_1 = x_adv + (x_1 - x_adv) * a + grad2 * (1 - a)
    d = x_1 - x
    return torch.clamp(
        x + d / (_l2(d) + 1e-12) * torch.min(eps * torch.ones_like(x), _l2(d) + 1e-12), low, high
    )


def _single_run(module, x, y, idx, criterion, eps, steps, norm, bounds, rho, gen):
    low, high = bounds
    shape = (-1, *[1] * (x.ndim - 1))
    steps_2, steps_min, size_decr = (
        max(int(0.22 * steps), 1),
        max(int(0.06 * steps), 1),
        max(int(0.03 * steps), 1),
    )
    ones = torch.ones([x.shape[0], *[1] * (x.ndim - 1)], device=x.device)
    if norm == "linf":
        t = 2 * torch.rand(x.shape, generator=gen, device=x.device) - 1
        x_adv = x + eps * ones * t / t.reshape([t.shape[0], -1]).abs().max(dim=1, keepdim=True)[0].reshape(
            shape
        )
    else:
        t = torch.randn(x.shape, generator=gen, device=x.device)
        x_adv = x + eps * ones * t / (_l2(t) + 1e-12)
    x_adv = x_adv.clamp(low, high)
    x_best, x_best_adv = x_adv.clone(), x_adv.clone()
    loss_steps = torch.zeros([steps, x.shape[0]])
    logits, loss_indiv, grad = _grad(module, x_adv, y, idx, criterion)
    grad_best = grad.clone()
    acc = logits.argmax(1) == y
    loss_best = loss_indiv.clone()
    step_size = eps * ones * 2.0
    x_adv_old = x_adv.clone()
    k = steps_2
    counter3 = 0
    loss_best_last_check = loss_best.clone()
    reduced_last_check = torch.ones(x.shape[0], dtype=torch.bool)
    lo, hi = x - eps, x + eps
    for i in range(steps):
        x_adv = x_adv.detach()
        grad2 = x_adv - x_adv_old
        x_adv_old = x_adv.clone()
        a = 0.75 if i > 0 else 1.0
        x_adv = _project(x, x_adv, grad, grad2, step_size, a, eps, low, high, norm, lo, hi) + 0.0
        # the last step's gradient would only feed a step that never comes: torchattacks
        # computes it anyway; skipping its backward pass leaves every result the same
        last = i == steps - 1
        logits, loss_indiv, grad = _grad(module, x_adv, y, idx, criterion, need_grad=not last)
        x_adv = x_adv.detach()
        pred = logits.argmax(1) == y
        acc = acc & pred
        x_best_adv[~pred] = x_adv[~pred]
        loss_steps[i] = loss_indiv.cpu()
        better = loss_indiv > loss_best
        x_best[better] = x_adv[better]
        if not last:
            grad_best[better] = grad[better]
        loss_best[better] = loss_indiv[better]
        counter3 += 1
        if counter3 == k:
            rises = sum((loss_steps[i - c] > loss_steps[i - c - 1]).double() for c in range(k))
            oscillating = rises <= k * rho
            no_improvement = ~reduced_last_check & (loss_best_last_check.cpu() >= loss_best.cpu())
            reduce = (oscillating | no_improvement).to(x.device)
            reduced_last_check = reduce.cpu().clone()
            loss_best_last_check = loss_best.clone()
            if bool(reduce.any()) and not last:  # (after the last step nothing reads them)
                step_size[reduce] /= 2.0
                x_adv[reduce] = x_best[reduce]
                grad[reduce] = grad_best[reduce]
            counter3 = 0
            k = max(k - size_decr, steps_min)
    return acc, x_best_adv
