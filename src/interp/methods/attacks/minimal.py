"""Minimal-perturbation attacks: Carlini-Wagner L2 and DeepFool.

Both search for the smallest L2 perturbation that changes the prediction rather than the strongest
one within a budget, so they take no eps; ``Attack.norms()["l2"]`` is what they minimise.

CW follows torchattacks' ``CW`` step for step (Adam on ``w`` with ``x = (tanh(w) + 1) / 2``, the
same early stop every ``steps // 10`` steps), with one deliberate difference: the margin
``f = max(Z_true - max_{i != true} Z_i, -kappa)`` reads the true logit and the best other logit
directly, where torchattacks takes ``max(onehot * Z)`` and ``max((1 - onehot) * Z)``, which read
0 instead of a negative logit. Where the logits that matter are positive (the usual case, and the
digits-cnn test batch) the two are identical; the model's parameters are frozen during the attack,
so no weight gradients are computed (torchattacks' ``cost.backward()`` fills them every step).

DeepFool follows torchattacks' ``DeepFool`` (per image: linearise, step to the nearest class
boundary times ``1 + overshoot``, clamp; stop once misclassified) but batches the images: one
backward per class for the whole batch instead of one per class per image.
"""

from __future__ import annotations

from typing import Any

import torch
from einops import rearrange
from torch import nn

from interp.errors import InputError
from interp.methods.adversarial import (
    Attack,
    _eval,
    _stats,
    _target,
    _target_mode,
    check_class_range,
    check_inputs,
    check_number,
    n_classes,
)
from interp.models.base import HookedModel


def cw(
    model: HookedModel | nn.Module,
    x: Any,
    y: Any,
    c: float = 1.0,
    kappa: float = 0.0,
    steps: int = 50,
    lr: float = 0.01,
    *,
    target: Any = None,
    bounds: tuple[float, float] | None = None,
    normalize: tuple[Any, Any] | None = None,
    seed: int | None = 0,
    progress: Any = None,
) -> Attack:
    """Carlini-Wagner L2 (2017): minimise ``|x' - x|² + c · f(x')`` over ``x' = box(tanh(w))`` with Adam.

    Args:
        c: weight of the misclassification term against the squared L2 distance.
        kappa: confidence: the margin the adversarial class must win by.
        steps, lr: Adam iterations and learning rate (torchattacks' defaults).
        target: a targeted attack's goal (see ``resolve_target``); ``seed`` seeds ``"random"``.
        progress: optional ``progress(done, total)`` called after each step.

    Each image keeps the smallest-L2 adversarial found (the clean image where none was found).
    """
    check_number("c", c, minimum=0.0, strict=True, why="the weight of the misclassification term")
    check_number("kappa", kappa, minimum=0.0, why="the confidence margin")
    check_number("steps", steps, minimum=1, integer=True, why="Adam iterations")
    check_number("lr", lr, minimum=0.0, strict=True, why="Adam's learning rate")
    module, images, labels, (low, high) = check_inputs(model, x, y, 0.0, bounds, normalize=normalize)
    goal = _target(target, False, labels, module, images, seed)
    classes = labels if goal is None else goal
    width = high - low
    with _eval(module), torch.enable_grad():
        best = _cw_loop(module, images, classes, goal is not None, float(c), float(kappa), int(steps),
                        float(lr), low, width, progress)  # fmt: skip
    config = {"attack": "cw", "c": c, "kappa": kappa, "steps": int(steps), "lr": lr, "norm": "l2",
              "bounds": (low, high), "targeted": goal is not None, "target_mode": _target_mode(target),
              "normalize": _stats(normalize), "seed": seed}  # fmt: skip
    return Attack(images, best, labels, goal, config, module)


def _cw_loop(
    module: nn.Module,
    images: torch.Tensor,
    classes: torch.Tensor,
    targeted: bool,
    c: float,
    kappa: float,
    steps: int,
    lr: float,
    low: float,
    width: float,
    progress: Any = None,
) -> torch.Tensor:
    unit = (images - low) / width
    w = _atanh(torch.clamp(unit * 2 - 1, min=-1, max=1)).detach()
    w.requires_grad = True
    best_adv = images.clone().detach()
    best_l2 = 1e10 * torch.ones(len(images), device=images.device)
    prev_cost = 1e10
    flat_images = rearrange(images, "b ... -> b (...)")
    optimizer = torch.optim.Adam([w], lr=lr)
    check_every = max(steps // 10, 1)
    for step in range(steps):
        adv = 1 / 2 * (torch.tanh(w) + 1) * width + low
        current_l2 = ((rearrange(adv, "b ... -> b (...)") - flat_images) ** 2).sum(dim=1)
        logits = module(adv)
        if step == 0:
            check_class_range(n_classes(logits), classes, "target" if targeted else "labels")
        cost = current_l2.sum() + c * _cw_margin(logits, classes, targeted, kappa).sum()
        optimizer.zero_grad()
        cost.backward()
        optimizer.step()
        with torch.no_grad():
            pred = logits.argmax(1)
            success = pred == classes if targeted else pred != classes
            better = success & (best_l2 > current_l2)
            best_l2 = torch.where(better, current_l2, best_l2)
            best_adv = torch.where(better.view(-1, *[1] * (images.ndim - 1)), adv, best_adv)
        if progress is not None:
            progress(step + 1, steps)
        if step % check_every == 0:  # torchattacks' early stop: the cost stopped falling
            if cost.item() > prev_cost:
                break
            prev_cost = cost.item()
    return best_adv.detach()


def _atanh(t: torch.Tensor) -> torch.Tensor:
    return 0.5 * torch.log((1 + t) / (1 - t))  # torchattacks' form (±1 -> ±inf, as theirs)


def _cw_margin(logits: torch.Tensor, classes: torch.Tensor, targeted: bool, kappa: float) -> torch.Tensor:
    """CW's f: how far the class is from losing (untargeted) or winning (targeted), floored at -kappa."""
    real = logits.gather(1, classes[:, None])[:, 0]
    other = logits.scatter(1, classes[:, None], -torch.inf).amax(1)
    return torch.clamp(other - real if targeted else real - other, min=-kappa)


def deepfool(
    model: HookedModel | nn.Module,
    x: Any,
    y: Any,
    steps: int = 50,
    overshoot: float = 0.02,
    *,
    bounds: tuple[float, float] | None = None,
    normalize: tuple[Any, Any] | None = None,
    progress: Any = None,
) -> Attack:
    """DeepFool (Moosavi-Dezfooli et al. 2016): step to the nearest linearised class boundary.

    Each step, for every image still classified as its label: with ``f_k`` the logits and ``w_k``
    their input gradients, the class ``l = argmin_k |f_k - f_y| / |w_k - w_y|`` is nearest, and the
    image moves by ``(1 + overshoot) |f_l - f_y| (w_l - w_y) / |w_l - w_y|²``, then is clamped to the
    pixel bounds. An image stops once it is misclassified. For a linear model one step lands on the
    closest boundary (times ``1 + overshoot``): the minimal L2 perturbation.

    ``config["steps_used"]`` holds each image's number of steps; ``progress(done, total)``, if given,
    is called after each step.
    """
    check_number("steps", steps, minimum=1, integer=True, why="DeepFool iterations")
    check_number("overshoot", overshoot, minimum=0.0, why="how far past the boundary to step")
    module, images, labels, (low, high) = check_inputs(model, x, y, 0.0, bounds, normalize=normalize)
    adv = images.clone()
    active = torch.ones(len(images), dtype=torch.bool, device=images.device)
    used = torch.zeros(len(images), dtype=torch.long)
    with _eval(module), torch.enable_grad():
        for step in range(int(steps)):
            idx = active.nonzero().flatten()
            if not len(idx):
                break
            point = adv[idx].clone().requires_grad_(True)
            logits = module(point)
            if step == 0:
                check_class_range(n_classes(logits), labels, "labels")
            lab = labels[idx]
            done = logits.detach().argmax(1) != lab
            active[idx[done]] = False
            keep = ~done
            if not bool(keep.any()):
                break
            jac = _jacobian(logits, point)  # [classes, b, ...]
            moved = _deepfool_step(logits.detach(), jac, lab, point.detach(), float(overshoot))
            adv[idx[keep]] = torch.clamp(moved[keep], min=low, max=high)
            used[idx[keep].cpu()] += 1
            if progress is not None:
                progress(step + 1, int(steps))
    config = {"attack": "deepfool", "steps": int(steps), "overshoot": overshoot, "norm": "l2",
              "bounds": (low, high), "targeted": False, "normalize": _stats(normalize),
              "steps_used": used.tolist()}  # fmt: skip
    return Attack(images, adv.detach(), labels, None, config, module)


def _jacobian(logits: torch.Tensor, point: torch.Tensor) -> torch.Tensor:
    """``[classes, batch, ...]``: the input gradient of each logit, one backward per class for the
    whole batch (images do not interact in an eval-mode forward)."""
    n = logits.shape[-1]
    rows = [torch.autograd.grad(logits[:, k].sum(), point, retain_graph=k + 1 < n)[0] for k in range(n)]
    return torch.stack(rows)


def _deepfool_step(
    logits: torch.Tensor, jac: torch.Tensor, labels: torch.Tensor, point: torch.Tensor, overshoot: float
) -> torch.Tensor:
    b = torch.arange(len(labels), device=labels.device)
    f0 = logits[b, labels]  # [b]
    w0 = jac[labels, b]  # [b, ...]
    f_prime = logits - f0[:, None]  # [b, K] (0 at the label)
    w_prime = rearrange(jac, "k b ... -> b k (...)") - rearrange(w0, "b ... -> b 1 (...)")
    value = f_prime.abs() / w_prime.norm(dim=2)
    value[b, labels] = torch.inf  # the label itself is no boundary
    nearest = value.argmin(1)
    wl = w_prime[b, nearest]  # [b, d]
    r = f_prime[b, nearest].abs()[:, None] * wl / wl.norm(dim=1, keepdim=True) ** 2
    return point + (1 + overshoot) * r.view(point.shape)


def min_norm_accuracy(attack: Attack, eps: float, norm: str = "l2") -> float:
    """Accuracy at budget ``eps`` from one minimal-perturbation attack: an image counts as broken
    when its adversarial is misclassified and its perturbation is within ``eps``."""
    if norm not in ("linf", "l2"):
        raise InputError(f"norm must be 'linf' or 'l2', got {norm!r}")
    broken = (attack.logits_adv.argmax(-1) != attack.labels) & (attack.norms()[norm] <= eps * (1 + 1e-6))
    correct = attack.logits_clean.argmax(-1) == attack.labels
    return (correct & ~broken).double().mean().item()
