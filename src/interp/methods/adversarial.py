"""Adversarial attacks (FGSM, PGD) and adversarial-attack probes: where the damage is carried.

Attacks take any image classifier, a ``HookedModel`` from ``interp.load`` (its ``input_shape`` and
``input_range`` are checked) or a plain ``nn.Module``, and return an :class:`Attack` holding the
adversarial batch, its perturbation and (lazily) the predictions.

    >>> from interp.methods import adversarial as A
    >>> atk = A.pgd(model, x, y, eps=0.3, alpha=0.075, steps=40, random_start=True, restarts=5)
    >>> atk.accuracy_clean, atk.accuracy_adv
    >>> probe = A.attack_probe(model, x, atk.x_adv, y, train=(x_train, y_train))
    >>> probe.figure()        # per-layer divergence, probe accuracy clean vs adversarial, restoration

FGSM and PGD follow torchattacks' arithmetic step for step (mean cross-entropy, ``sign`` of the
gradient, clamp of the perturbation then of the image), so on the same model and batch FGSM is
bit-identical and PGD without random start matches to float rounding; the benchmark checks both.
``embedding_pgd`` attacks a transformer in its input-embedding space through a replacement hook.
``adversarial_train`` is Madry et al.'s PGD training.

The other attacks live in ``interp.methods.attacks`` and are importable from here too: ``cw``
(L2), ``deepfool``, ``apgd`` (CE or DLR loss), ``apgd_t``, ``square`` (L∞), ``fab`` and ``fab_t``
(L∞ or L2, minimal-norm within eps) and ``autoattack`` (APGD-CE + APGD-T + FAB-T + Square). ``run_attack(name, ...)`` runs any of :data:`ATTACK_NAMES`, and
``robustness_curve`` takes every one. Every attack takes ``normalize=(mean, std)`` for a model that
expects normalised inputs (the attack stays in pixel space); the targeted ones take ``target=`` as
a class, ``"random"``, ``"least-likely"`` or a function (``resolve_target``). ``Attack.save`` and
``load_attack`` keep an adversarial set with its config and seed in a safetensors file.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from interp.checks import require_finite
from interp.errors import InputError
from interp.models.base import HookedModel

NORMS = ("linf", "l2")
EPS_DIVISION = 1e-10  # torchattacks' guard when normalising L2 gradients


# ------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------


def _module_and_bounds(
    model: HookedModel | nn.Module, bounds: tuple[float, float] | None
) -> tuple[nn.Module, tuple[float, float]]:
    module = model.module if isinstance(model, HookedModel) else model
    if bounds is None:
        bounds = getattr(model, "input_range", None) or (0.0, 1.0)
    try:
        low, high = (float(b) for b in bounds)
    except (TypeError, ValueError):
        raise InputError(f"bounds must be (low, high), two numbers, got {bounds!r}") from None
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise InputError(f"bounds must be finite with low < high (the valid pixel range), got {bounds!r}")
    return module, (low, high)


def check_inputs(
    model: HookedModel | nn.Module,
    x: Any,
    y: Any,
    eps: float,
    bounds: tuple[float, float] | None = None,
    *,
    norm: str = "linf",
    normalize: tuple[Any, Any] | None = None,
    classes: bool = True,
) -> tuple[nn.Module, torch.Tensor, torch.Tensor, tuple[float, float]]:
    """Validate an attack's inputs; InputError with the fix for each way they can be wrong.

    ``normalize=(mean, std)`` (one value per channel) wraps the model so it sees ``(x - mean) / std``
    while the attack, its budget and its result stay in pixel space. ``classes=False`` leaves the
    label-range check to the caller (an attack that checks it on its own first forward).
    """
    check_number("eps", eps, minimum=0.0, why="the perturbation budget")
    if isinstance(model, HookedModel) and model.kind == "transformer":
        raise InputError(
            f"{model.name} takes tokens, and these attacks perturb images (pixels in a box); attack a "
            "transformer's input embeddings with embedding_pgd instead"
        )
    module, (low, high) = _module_and_bounds(model, bounds)
    # a loaded model checks shape, range and finiteness itself
    xt = model.prepare(x) if isinstance(model, HookedModel) else torch.as_tensor(x).float()
    if xt.numel() == 0:
        raise InputError("got an empty batch of images; pass at least one image")
    lo, hi = (v.item() for v in torch.aminmax(xt.detach()))  # one pass: a NaN/inf shows in min or max
    if not (math.isfinite(lo) and math.isfinite(hi)):
        require_finite(xt, "the images", "Replace or drop the NaN/inf images.")
    if lo < low or hi > high:
        raise InputError(
            f"images must lie in [{low}, {high}], got values in [{lo:.3g}, {hi:.3g}]. "
            "Rescale them (e.g. pixels / 255) or pass bounds=(low, high)."
        )
    check_eps_range(eps, norm, (low, high), xt)
    yt = class_labels(y, "labels", xt.device)
    if len(yt) != len(xt):
        raise InputError(f"got {len(yt)} labels for {len(xt)} images; pass exactly one label per image")
    if normalize is not None:
        if not isinstance(normalize, tuple | list) or len(normalize) != 2:
            raise InputError(f"normalize must be (mean, std), one value per channel each, got {normalize!r}")
        module = Normalized(module, *normalize, channels=xt.shape[1] if xt.ndim > 1 else 1)
    if classes:
        check_classes(module, xt, yt, "labels")
    return module, xt.detach(), yt, (low, high)


def check_eps_range(eps: float, norm: str, bounds: tuple[float, float], x: torch.Tensor) -> None:
    """InputError for a budget wider than the pixel range allows (L∞: ``high - low``; L2: that times
    the square root of the pixels per image): such an eps is in the wrong units (0-255 pixels for
    images in [0, 1]), and every image in the ball would be reachable."""
    width = bounds[1] - bounds[0]
    limit = width if norm == "linf" else width * math.sqrt(max(1, x[0].numel()))
    if eps > limit * (1 + 1e-6):
        raise InputError(
            f"eps={eps:g} is larger than the input range allows ({norm} at most {limit:g} for pixels in "
            f"[{bounds[0]:g}, {bounds[1]:g}]); give eps in the images' own units (e.g. 8/255, not 8)"
        )


class Normalized(nn.Module):
    """``module((x - mean) / std)``: a model that expects normalised inputs, attacked in pixel space
    (torchattacks' ``set_normalization_used``: the budget and bounds are in pixels)."""

    def __init__(self, module: nn.Module, mean: Any, std: Any, *, channels: int) -> None:
        super().__init__()
        stats = []
        for what, value in (("mean", mean), ("std", std)):
            try:
                t = torch.as_tensor(value, dtype=torch.float32).reshape(-1)
            except (TypeError, ValueError, RuntimeError):
                raise InputError(
                    f"normalize {what} must be numbers, one per channel, got {value!r}"
                ) from None
            if len(t) != channels:
                raise InputError(
                    f"normalize {what} has {len(t)} values but the images have {channels} channel(s) "
                    f"(dim 1); pass one {what} per channel"
                )
            if not bool(torch.isfinite(t).all()):
                raise InputError(f"normalize {what} must be finite, got {value!r}")
            stats.append(t)
        if bool((stats[1] <= 0).any()):
            raise InputError(f"normalize std must be > 0 for every channel, got {std!r}")
        self.module = module
        self.register_buffer("mean", stats[0], persistent=False)
        self.register_buffer("std", stats[1], persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1, *[1] * (x.ndim - 2))
        return self.module((x - self.mean.view(shape).to(x)) / self.std.view(shape).to(x))


def check_number(
    name: str, value: Any, *, minimum: float, strict: bool = False, integer: bool = False, why: str = ""
) -> None:
    """InputError unless ``value`` is a finite real number ``>= minimum`` (``> minimum`` if strict),
    and an integer if ``integer``: a negative step or a NaN budget would attack in reverse or not at all."""
    try:
        number = operator.index(value) if integer else float(value)
    except (TypeError, ValueError):
        number = None
    ok = number is not None and not isinstance(value, bool | str) and math.isfinite(number)
    ok = ok and (number > minimum if strict else number >= minimum)
    if not ok:
        kind = "a whole number" if integer else "a number"
        bound = f"{'>' if strict else '>='} {minimum:g}"
        raise InputError(
            f"{name} must be {kind} {bound} and finite{f' ({why})' if why else ''}, got {value!r}"
        )


def check_n_targets(n_targets: int | None, n_classes: int) -> int:
    """How many of the most likely other classes a multi-targeted attack (APGD-T, FAB-T) targets in
    turn: all ``n_classes - 1`` by default; InputError outside [1, n_classes - 1]."""
    n_targets = n_classes - 1 if n_targets is None else n_targets
    check_number("n_targets", n_targets, minimum=1, integer=True, why="how many other classes to target")
    if n_targets > n_classes - 1:
        raise InputError(f"n_targets must be at most classes - 1 = {n_classes - 1}, got {n_targets}")
    return int(n_targets)


def class_labels(values: Any, what: str, device: torch.device) -> torch.Tensor:
    """``values`` as a flat LongTensor of class indices (InputError for fractional or non-numeric ones)."""
    try:
        t = torch.as_tensor(values)
    except (TypeError, ValueError, RuntimeError):
        raise InputError(f"{what} must be integer class indices, got a {type(values).__name__}") from None
    if t.is_floating_point() and not bool((t == t.round()).all()):
        raise InputError(f"{what} must be integer class indices, got fractional or NaN values")
    if t.is_complex() or t.dtype == torch.bool:
        raise InputError(f"{what} must be integer class indices, got {t.dtype}")
    return t.long().reshape(-1).to(device)


def check_classes(module: nn.Module, x: torch.Tensor, labels: torch.Tensor, what: str) -> None:
    """InputError if a label is not one of the model's classes (one forward of one image)."""
    with _eval(module), torch.no_grad():
        out = module(x[:1])
    check_class_range(n_classes(out), labels, what)


def n_classes(logits: torch.Tensor) -> int:
    """The number of classes of a classifier's output ``[batch, classes]`` (InputError otherwise)."""
    if logits.ndim != 2:
        raise InputError(
            "attacks need a classifier whose output is [batch, classes] logits; this model gives "
            f"{list(logits.shape)} for a batch of {len(logits)}"
        )
    return logits.shape[-1]


def check_class_range(n_classes: int, labels: torch.Tensor, what: str) -> None:
    """InputError if a label is outside ``[0, n_classes)``."""
    if not labels.numel():
        return
    low, high = (int(v) for v in torch.aminmax(labels))  # one pass, one sync (this runs every call)
    if low < 0 or high >= n_classes:
        raise InputError(
            f"{what} must be classes in [0, {n_classes}) for this model (it outputs {n_classes} logits), "
            f"got values in [{low}, {high}]"
        )


# ------------------------------------------------------------------------------------------------
# Results
# ------------------------------------------------------------------------------------------------


@dataclass
class Attack:
    """An adversarial batch and what it did.

    Attributes:
        x: the clean images.
        x_adv: the adversarial images (same shape, within ``eps`` and the pixel bounds).
        labels: the true labels.
        target: the target labels of a targeted attack, else None.
        config: attack name, eps, alpha, steps, norm, random_start, restarts, seed.
        module: the attacked model (predictions are computed from it on first access).
    """

    x: torch.Tensor
    x_adv: torch.Tensor
    labels: torch.Tensor
    target: torch.Tensor | None
    config: dict[str, Any]
    module: nn.Module | None = field(repr=False)

    @property
    def delta(self) -> torch.Tensor:
        """The perturbation ``x_adv - x``."""
        return self.x_adv - self.x

    @cached_property
    def logits_clean(self) -> torch.Tensor:
        return _logits(self._model(), self.x)

    @cached_property
    def logits_adv(self) -> torch.Tensor:
        return _logits(self._model(), self.x_adv)

    def _model(self) -> nn.Module:
        if self.module is None:
            raise InputError("this adversarial set was loaded without a model; pass model= to load_attack")
        return self.module

    @property
    def accuracy_clean(self) -> float:
        return (self.logits_clean.argmax(-1) == self.labels).double().mean().item()

    @property
    def accuracy_adv(self) -> float:
        return (self.logits_adv.argmax(-1) == self.labels).double().mean().item()

    @property
    def success_rate(self) -> float:
        """The share of the images the attack had to change that it changed (nan if none had to).

        Targeted: of the images the model did not already assign to their target, the share it
        assigns to the target after the attack. Untargeted: of the images it classified correctly,
        the share it misclassifies after. Images the attack had nothing to do on (already the
        target, already wrong) are left out, so an attack that changes nothing scores 0, not
        the share of such images."""
        eligible, hit = self._attackable()
        if not eligible.any():
            return float("nan")
        return hit[eligible].double().mean().item()

    @property
    def n_attackable(self) -> int:
        """How many images ``success_rate`` is over."""
        return int(self._attackable()[0].sum())

    def _attackable(self) -> tuple[torch.Tensor, torch.Tensor]:
        before, after = self.logits_clean.argmax(-1), self.logits_adv.argmax(-1)
        if self.target is not None:
            return before != self.target, after == self.target
        return before == self.labels, after != self.labels

    def norms(self) -> dict[str, torch.Tensor]:
        """Per-example L∞ and L2 norms of the perturbation."""
        flat = rearrange(self.delta, "b ... -> b (...)")
        return {"linf": flat.abs().amax(1), "l2": flat.norm(dim=1)}

    def figure(self, index: int = 0):
        """Original, adversarial and perturbation images of one example, with both predictions."""
        return attack_figure(self, index)

    def save(self, path: str | Path) -> Path:
        """Write the adversarial set to a safetensors file: clean and adversarial images, labels, the
        target (if any), and the attack's config (with its seed) as JSON metadata."""
        from safetensors import SafetensorError
        from safetensors.torch import save_file

        tensors = {"x": self.x, "x_adv": self.x_adv, "labels": self.labels}
        if self.target is not None:
            tensors["target"] = self.target
        meta = {"format": "interp-adversarial-set/1", "config": json.dumps(self.config, default=_jsonable)}
        path = Path(path)
        if path.is_dir():
            raise InputError(f"{path} is a folder; give a file path such as {path / 'adv.safetensors'}")
        try:
            save_file(
                {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path), metadata=meta
            )
        except SafetensorError as err:  # an I/O error as safetensors reports it (read-only place, disk full)
            raise InputError(f"could not write {path} ({err}); pass a path you can write to") from err
        return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, tuple | set):
        return list(value)
    return repr(value)


def load_attack(path: str | Path, model: HookedModel | nn.Module | None = None) -> Attack:
    """Read a set written by :meth:`Attack.save`. With ``model`` its predictions can be recomputed
    (``accuracy_adv``, ``figure``); the config's normalisation, if any, is applied to it again."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    path = Path(path)
    if not path.is_file():
        raise InputError(f"no adversarial set at {str(path)!r}; pass the path Attack.save wrote")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise InputError(
            f"{str(path)!r} is not a safetensors file ({err}); pass a file Attack.save wrote"
        ) from None
    if meta.get("format") != "interp-adversarial-set/1" or not {"x", "x_adv", "labels"} <= tensors.keys():
        raise InputError(f"{str(path)!r} is not an adversarial set written by Attack.save")
    config = json.loads(meta["config"])
    if "bounds" in config:
        config["bounds"] = tuple(config["bounds"])
    module = None
    if model is not None:
        module = model.module if isinstance(model, HookedModel) else model
        stats = config.get("normalize")
        if stats:
            module = Normalized(module, stats["mean"], stats["std"], channels=len(stats["mean"]))
    return Attack(tensors["x"], tensors["x_adv"], tensors["labels"], tensors.get("target"), config, module)


def _logits(module: nn.Module, x: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([module(x[i : i + batch]) for i in range(0, len(x), batch)]) if len(x) else module(x)


# ------------------------------------------------------------------------------------------------
# FGSM and PGD
# ------------------------------------------------------------------------------------------------


def _input_grad(
    module: nn.Module, x: torch.Tensor, y: torch.Tensor, targeted: bool, check: str | None = None
) -> torch.Tensor:
    """Gradient of the mean cross-entropy (negated when targeted) with respect to the images;
    ``check`` names the labels to check against the model's classes on this forward."""
    x.requires_grad_(True)
    logits = module(x)
    if check is not None:
        check_class_range(n_classes(logits), y, check)
    cost = F.cross_entropy(logits, y)
    if targeted:
        cost = -cost
    return torch.autograd.grad(cost, x)[0]


def fgsm(
    model: HookedModel | nn.Module,
    x: Any,
    y: Any,
    eps: float,
    *,
    targeted: bool = False,
    target: Any = None,
    bounds: tuple[float, float] | None = None,
    normalize: tuple[Any, Any] | None = None,
    seed: int | None = 0,
) -> Attack:
    """Fast gradient sign method (Goodfellow et al. 2015): ``x + eps * sign(∇x CE)``, clamped.

    Untargeted it ascends the loss of the true labels ``y``; targeted (``target`` given: see
    :func:`resolve_target` for the modes) it descends the loss of the target. ``normalize=(mean, std)``
    attacks a model that expects normalised inputs, in pixel space. ``seed`` seeds ``target="random"``.
    """
    module, xt, yt, (low, high) = check_inputs(model, x, y, eps, bounds, normalize=normalize, classes=False)
    goal = _target(target, targeted, yt, module, xt, seed)
    with _eval(module), torch.enable_grad():
        images = xt.clone().detach()
        labels = yt if goal is None else goal
        # the one forward also checks the labels against the model's classes (a goal is checked already)
        grad = _input_grad(module, images, labels, goal is not None, check="labels" if goal is None else None)
        x_adv = torch.clamp(images + eps * grad.sign(), min=low, max=high).detach()
    config = {"attack": "fgsm", "eps": eps, "targeted": goal is not None, "bounds": (low, high),
              "target_mode": _target_mode(target), "normalize": _stats(normalize), "seed": seed}  # fmt: skip
    return Attack(xt, x_adv, yt, goal, config, module)


def pgd(
    model: HookedModel | nn.Module,
    x: Any,
    y: Any,
    eps: float,
    alpha: float | None = None,
    steps: int = 40,
    *,
    norm: str = "linf",
    random_start: bool = True,
    restarts: int = 1,
    targeted: bool = False,
    target: Any = None,
    bounds: tuple[float, float] | None = None,
    normalize: tuple[Any, Any] | None = None,
    seed: int | None = 0,
) -> Attack:
    """Projected gradient descent (Madry et al. 2018) in an L∞ or L2 ball of radius ``eps``.

    Args:
        alpha: step size (default ``eps / 4``); L∞ steps by ``alpha * sign(grad)``, L2 by ``alpha``
            along the normalised gradient.
        steps: iterations per restart.
        random_start: start uniformly in the L∞ ball (L2: a random direction, radius ~ U(0, eps)).
        restarts: independent random starts; per example the one with the highest loss (lowest
            for targeted) is kept.
        target: a targeted attack's goal; see :func:`resolve_target` for the modes.
        normalize: ``(mean, std)`` per channel for a model that expects normalised inputs; the
            attack, eps and the result stay in pixel space.
        seed: seeds the random starts and ``target="random"`` (None: use the global RNG).
    """
    if norm not in NORMS:
        raise InputError(f"norm must be one of {NORMS}, got {norm!r}")
    check_number("steps", steps, minimum=0, integer=True, why="PGD iterations per restart")
    check_number("restarts", restarts, minimum=1, integer=True)
    if alpha is not None:
        check_number("alpha", alpha, minimum=0.0, why="the step size; a negative one reverses the attack")
    # untargeted, the first step's forward checks the labels against the model's classes (as in
    # fgsm: no extra forward); a target's modes need valid labels before they run, so check first
    fold = target is None and int(steps) > 0
    module, xt, yt, bounds_ = check_inputs(
        model, x, y, eps, bounds, norm=norm, normalize=normalize, classes=not fold
    )
    alpha = eps / 4 if alpha is None else float(alpha)
    goal = _target(target, targeted, yt, module, xt, seed)
    labels = yt if goal is None else goal
    gen = torch.Generator(device=xt.device).manual_seed(seed) if seed is not None else None
    best, best_loss = None, None
    with _eval(module), torch.enable_grad():
        for _ in range(int(restarts)):
            start = _random_start(xt, eps, norm, bounds_, gen) if random_start else xt.clone().detach()
            check = "labels" if fold and best is None else None  # on the first step only
            adv = _pgd_loop(
                module, xt, start, labels, eps, alpha, int(steps), norm, bounds_, goal is not None, check
            )
            if restarts == 1:
                best = adv
                break
            with torch.no_grad():
                loss = F.cross_entropy(module(adv), labels, reduction="none")
                loss = -loss if goal is not None else loss
            if best is None:
                best, best_loss = adv, loss
            else:
                better = loss > best_loss
                best = torch.where(better.view(-1, *[1] * (xt.ndim - 1)), adv, best)
                best_loss = torch.maximum(loss, best_loss)
    config = {"attack": f"pgd-{norm}", "eps": eps, "alpha": alpha, "steps": int(steps), "norm": norm,
              "random_start": random_start, "restarts": int(restarts), "targeted": goal is not None,
              "bounds": bounds_, "seed": seed, "target_mode": _target_mode(target),
              "normalize": _stats(normalize)}  # fmt: skip
    return Attack(xt, best, yt, goal, config, module)


def _pgd_loop(
    module: nn.Module,
    images: torch.Tensor,
    adv: torch.Tensor,
    labels: torch.Tensor,
    eps: float,
    alpha: float,
    steps: int,
    norm: str,
    bounds: tuple[float, float],
    targeted: bool,
    check: str | None,
) -> torch.Tensor:
    """``steps`` PGD iterations from ``adv``; ``check`` names the labels to check against the
    model's classes on the first step's forward (see :func:`_input_grad`)."""
    low, high = bounds
    for step in range(steps):
        grad = _input_grad(module, adv, labels, targeted, check=check if step == 0 else None)
        # torchattacks' arithmetic, operation for operation (so bit-identical), in place: the graph
        # of this step is freed, and reusing its buffers saves five allocations per step
        if norm == "linf":
            adv = adv.detach().add_(grad.sign_().mul_(alpha))
        else:
            grad = grad / _batch_norm(grad).add(EPS_DIVISION).view(-1, *[1] * (grad.ndim - 1))
            adv = adv.detach().add_(grad.mul_(alpha))
        delta = adv.sub_(images).clamp_(-eps, eps) if norm == "linf" else _project_l2(adv - images, eps)
        adv = delta.add_(images).clamp_(low, high)  # images + delta, then the pixel bounds
    return adv


def _batch_norm(t: torch.Tensor) -> torch.Tensor:
    return torch.norm(t.reshape(len(t), -1), p=2, dim=1)


def _project_l2(delta: torch.Tensor, eps: float) -> torch.Tensor:
    norms = _batch_norm(delta)
    factor = torch.min(eps / norms, torch.ones_like(norms))  # eps / 0 = inf -> 1: nothing to shrink
    return delta * factor.view(-1, *[1] * (delta.ndim - 1))


def _random_start(
    x: torch.Tensor, eps: float, norm: str, bounds: tuple[float, float], gen: torch.Generator | None
) -> torch.Tensor:
    if norm == "linf":
        noise = torch.empty_like(x).uniform_(-eps, eps, generator=gen)
    else:
        noise = torch.empty_like(x).normal_(generator=gen)
        radius = torch.empty(len(x), device=x.device).uniform_(0, 1, generator=gen)
        noise = noise * (radius * eps / _batch_norm(noise).clamp_min(1e-12)).view(-1, *[1] * (x.ndim - 1))
    return torch.clamp(x + noise, min=bounds[0], max=bounds[1]).detach()


TARGET_MODES = ("random", "least-likely")


def resolve_target(
    target: Any, y: torch.Tensor, module: nn.Module, x: torch.Tensor, seed: int | None = 0
) -> torch.Tensor:
    """The target class of each image, in torchattacks' ``set_mode_targeted_*`` meanings:

    - a class or one class per image: by label (``set_mode_targeted_by_label``);
    - ``"random"``: a class drawn uniformly among those other than the true label (seeded);
    - ``"least-likely"``: the class, other than the true label, with the lowest clean logit;
    - a function ``f(x, y) -> classes``: by function (``set_mode_targeted_by_function``).
    """
    if isinstance(target, str):
        if target not in TARGET_MODES:
            raise InputError(
                f"target must be a class, classes, a function f(x, y) or one of {TARGET_MODES}, got {target!r}"
            )
        with _eval(module), torch.no_grad():
            logits = _logits(module, x)
        if target == "least-likely":
            return logits.scatter(1, y[:, None], math.inf).argmin(-1)
        gen = torch.Generator(device=x.device).manual_seed(seed) if seed is not None else None
        n = logits.shape[-1]
        if n < 2:
            raise InputError("target='random' needs a model with at least 2 classes")
        draw = (torch.rand(len(y), generator=gen, device=x.device) * (n - 1)).long().clamp_max(n - 2)
        return draw + (draw >= y).long()  # skip the true label: uniform over the other n - 1
    if callable(target):
        target = target(x, y)
    t = class_labels(target, "target", y.device)
    t = t.expand(len(y)).clone() if t.numel() == 1 else t
    if len(t) != len(y):
        raise InputError(
            f"got {len(t)} target labels for {len(y)} images; pass one target per image or one for all"
        )
    check_classes(module, x, t, "target")
    return t


def _target(
    target: Any, targeted: bool, y: torch.Tensor, module: nn.Module, x: torch.Tensor, seed: int | None = 0
) -> torch.Tensor | None:
    if target is None:
        if targeted:
            raise InputError("targeted=True needs target=: the class (or one class per image) to reach")
        return None
    return resolve_target(target, y, module, x, seed)


def _target_mode(target: Any) -> str | None:
    """How the target was given, for the attack's config (and a saved set)."""
    if target is None:
        return None
    if isinstance(target, str):
        return target
    return "function" if callable(target) else "label"


def _stats(normalize: tuple[Any, Any] | None) -> dict[str, list[float]] | None:
    if normalize is None:
        return None
    return {
        k: torch.as_tensor(v, dtype=torch.float64).reshape(-1).tolist()
        for k, v in zip(("mean", "std"), normalize, strict=True)
    }


class _eval:
    """For the attack: eval mode, and parameters frozen so autograd records only what the input
    gradient needs (no activations kept for weight gradients). Both are restored afterwards.

    Cheap on the common path, since every attack call (and its label check) enters one: a model
    already in eval mode is left alone (``module.eval()`` walks and sets every submodule, ~60 µs on
    a small CNN); otherwise only the submodules that were training are switched back, so a model
    with, say, a frozen batch norm inside comes back exactly as it was."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        modules = list(module.modules())
        self.training = [m for m in modules if m.training]
        # each module's own parameters, in one walk (``module.parameters()`` walks the tree again
        # and costs as much as the rest of the call's checks); a shared one is listed twice, which
        # freezing and unfreezing tolerate
        self.params = [
            p for m in modules for p in m._parameters.values() if p is not None and p.requires_grad
        ]

    def __enter__(self) -> nn.Module:
        for p in self.params:
            p.requires_grad_(False)
        return self.module.eval() if self.training else self.module

    def __exit__(self, *exc: object) -> None:
        for p in self.params:
            p.requires_grad_(True)
        for m in self.training:
            m.training = True


# ------------------------------------------------------------------------------------------------
# Robustness curves and adversarial training
# ------------------------------------------------------------------------------------------------


@dataclass
class RobustnessCurve:
    """Accuracy under an attack as a function of eps."""

    eps: list[float]
    accuracy: list[float]
    attack: str
    config: dict[str, Any]

    def figure(self):
        import plotly.graph_objects as go

        fig = go.Figure(go.Scatter(x=self.eps, y=self.accuracy, mode="lines+markers", name=self.attack))
        fig.update_layout(title=f"Accuracy under {self.attack}", xaxis_title="eps", yaxis_title="accuracy",
                          yaxis_range=[0, 1.02], height=380)  # fmt: skip
        return fig


EPS_ATTACKS = ("fgsm", "pgd", "apgd-ce", "apgd-dlr", "apgd-t", "square", "autoattack", "fab", "fab-t")
MIN_NORM_ATTACKS = ("cw", "deepfool")  # one run gives the whole curve (accuracy at each budget)
ATTACK_NAMES = EPS_ATTACKS + MIN_NORM_ATTACKS


def _attack_table() -> dict[str, tuple[Callable[..., Attack], dict[str, Any]]]:
    """Each attack name: its function and the options the name fixes (apgd-ce is apgd's loss="ce")."""
    from interp.methods import attacks

    return {"fgsm": (fgsm, {}), "pgd": (pgd, {}), "apgd-ce": (attacks.apgd, {"loss": "ce"}),
            "apgd-dlr": (attacks.apgd, {"loss": "dlr"}), "apgd-t": (attacks.apgd_t, {}),
            "square": (attacks.square, {}), "autoattack": (attacks.autoattack, {}), "fab": (attacks.fab, {}),
            "fab-t": (attacks.fab_t, {}), "cw": (attacks.cw, {}), "deepfool": (attacks.deepfool, {})}  # fmt: skip


def attack_options(name: str) -> list[str]:
    """The keyword options ``run_attack(name, ...)`` takes besides the model, ``x``, ``y`` and ``eps``."""
    table = _attack_table()
    if name not in table:
        raise InputError(f"attack must be one of {ATTACK_NAMES}, got {name!r}")
    function, fixed = table[name]
    return [p for p in inspect.signature(function).parameters if p not in ("model", "x", "y", "eps", *fixed)]


def run_attack(name: str, model: HookedModel | nn.Module, x: Any, y: Any, eps: float | None = None,
               **kwargs: Any) -> Attack:  # fmt: skip
    """Any attack by name (:data:`ATTACK_NAMES`) with its options (:func:`attack_options`); ``eps``
    is ignored by the minimal-perturbation attacks (cw, deepfool), required by the others."""
    options = attack_options(name)
    unknown = [k for k in kwargs if k not in options]
    if unknown:
        raise InputError(f"{name} takes no option {unknown[0]!r}; its options are {options}")
    function, fixed = _attack_table()[name]
    if name in MIN_NORM_ATTACKS:
        return function(model, x, y, **fixed, **kwargs)
    if eps is None:
        raise InputError(f"{name} needs eps=, the perturbation budget")
    return function(model, x, y, eps, **fixed, **kwargs)


def robustness_curve(
    model: HookedModel | nn.Module,
    x: Any,
    y: Any,
    eps: Sequence[float],
    attack: str = "fgsm",
    *,
    progress: Callable[[int, int], None] | None = None,
    **kwargs: Any,
) -> RobustnessCurve:
    """Adversarial accuracy at each eps, for any attack in :data:`ATTACK_NAMES` (kwargs go to it; a
    PGD ``alpha`` not given is ``eps / 4`` at each eps).

    An eps attack runs once per eps. A minimal-perturbation attack (cw, deepfool) runs once: the
    accuracy at eps counts the images it did not break within L2 distance eps (``min_norm_accuracy``).
    ``progress(done, total)`` is called after each run.
    """
    if attack not in ATTACK_NAMES:
        raise InputError(f"attack must be one of {ATTACK_NAMES}, got {attack!r}")
    eps = [float(e) for e in eps]
    for e in eps:
        check_number("eps", e, minimum=0.0, why="each budget of the curve")
    if attack in MIN_NORM_ATTACKS:
        from interp.methods.attacks import min_norm_accuracy

        run = run_attack(attack, model, x, y, **kwargs)
        acc = [min_norm_accuracy(run, e, "l2") for e in eps]
        if progress is not None:
            progress(1, 1)
        return RobustnessCurve(eps, acc, attack, {**kwargs, "norm": "l2", "one_run": True})
    # every budget checked against the input range before the first run (not at the run that fails)
    norm_option = inspect.signature(_attack_table()[attack][0]).parameters.get("norm")
    norm = kwargs.get("norm", norm_option.default if norm_option is not None else "linf")
    check_inputs(model, x, y, max(eps), kwargs.get("bounds"), norm=norm, normalize=kwargs.get("normalize"))
    acc = []
    for i, e in enumerate(eps):
        acc.append(run_attack(attack, model, x, y, e, **kwargs).accuracy_adv)
        if progress is not None:
            progress(i + 1, len(eps))
    return RobustnessCurve(eps, acc, attack, dict(kwargs))


@dataclass
class AdversarialTraining:
    """A model trained on PGD examples (Madry et al. 2018), with its history and config."""

    module: nn.Module
    history: dict[str, list[float]]
    config: dict[str, Any]


def adversarial_train(
    module: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float = 0.1,
    alpha: float = 0.025,
    steps: int = 10,
    epochs: int = 40,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    bounds: tuple[float, float] = (0.0, 1.0),
    eval_data: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> AdversarialTraining:
    """Train a copy of ``module`` on PGD (L∞, random start) adversarial examples of every batch.

    Training starts from ``module``'s weights (the argument itself is left untouched): pass a freshly
    built model for Madry's from-scratch training, or a trained one to fine-tune. Adam, seeded
    shuffling, a fresh seed for every batch's random start.
    """
    check_number("alpha", alpha, minimum=0.0, why="the PGD step size")
    check_number("steps", steps, minimum=0, integer=True)
    check_number("epochs", epochs, minimum=1, integer=True)
    check_number("batch_size", batch_size, minimum=1, integer=True)
    check_number("lr", lr, minimum=0.0, strict=True, why="the learning rate")
    _, xt, yt, _ = check_inputs(module, x, y, eps, bounds)
    model = copy.deepcopy(module)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    history: dict[str, list[float]] = {"epoch": [], "train_loss": [], "test_acc": []}
    for epoch in range(1, epochs + 1):
        perm = torch.randperm(len(yt), generator=gen)
        total = 0.0
        for start in range(0, len(perm), batch_size):
            idx = perm[start : start + batch_size]
            adv = pgd(model, xt[idx], yt[idx], eps, alpha, steps, bounds=bounds,
                      seed=int(torch.randint(2**31, (1,), generator=gen))).x_adv  # fmt: skip
            model.train()
            loss = F.cross_entropy(model(adv), yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        model.eval()
        history["epoch"].append(epoch)
        history["train_loss"].append(total / len(yt))
        if eval_data is not None:
            history["test_acc"].append(
                (_logits(model, eval_data[0]).argmax(-1) == eval_data[1]).double().mean().item()
            )
    config = {"eps": eps, "alpha": alpha, "steps": steps, "epochs": epochs, "lr": lr,
              "batch_size": batch_size, "seed": seed}  # fmt: skip
    return AdversarialTraining(model.eval(), history, config)


# ------------------------------------------------------------------------------------------------
# Embedding-space attacks on transformers
# ------------------------------------------------------------------------------------------------


@dataclass
class EmbeddingAttack:
    """A continuous perturbation of a transformer's input embeddings.

    Attributes:
        hook: the embedding hook point perturbed.
        delta: ``[batch, pos, d_model]`` perturbation (within eps per position).
        loss_clean, loss_adv: ``[batch]`` the attack loss before and after.
        logits_clean, logits_adv: the model output before and after.
        config: eps, alpha, steps, norm, positions.
    """

    hook: str
    delta: torch.Tensor
    loss_clean: torch.Tensor
    loss_adv: torch.Tensor
    logits_clean: torch.Tensor
    logits_adv: torch.Tensor
    config: dict[str, Any]

    def flipped(self, position: int = -1) -> torch.Tensor:
        """``[batch]`` whether the top prediction at ``position`` changed."""
        return self.logits_clean[:, position].argmax(-1) != self.logits_adv[:, position].argmax(-1)

    def figure(self):
        import plotly.graph_objects as go

        fig = go.Figure()
        fig.add_bar(name="clean", y=self.loss_clean.tolist())
        fig.add_bar(name="adversarial", y=self.loss_adv.tolist())
        fig.update_layout(title=f"Embedding attack at {self.hook}", xaxis_title="example",
                          yaxis_title="attack loss", barmode="group", height=360)  # fmt: skip
        return fig


def flip_loss(
    clean_logits: torch.Tensor, position: int = -1, target: Any = None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """An attack loss (lower = more successful) on the prediction at ``position``: with ``target``, the
    cross-entropy of the target token; without, minus the cross-entropy of the clean top token."""
    top = clean_logits[:, position].argmax(-1)
    if target is not None:
        goal = torch.as_tensor(target).long().expand(len(top)).to(top.device)
        return lambda logits: F.cross_entropy(logits[:, position], goal, reduction="none")
    return lambda logits: -F.cross_entropy(logits[:, position], top, reduction="none")


def embedding_hook(model: HookedModel) -> str:
    """The token-embedding hook point of a transformer (``hook_embed`` or ``embed.hook_out``)."""
    for name in ("hook_embed", "embed.hook_out", "embeddings.word_embeddings.hook_out"):
        if name in model.hook_names:
            return name
    raise InputError(
        f"{model.name} has no token-embedding hook point (looked for hook_embed, embed.hook_out)"
    )


def embedding_pgd(
    model: HookedModel,
    inputs: Any,
    loss: Callable[[torch.Tensor], torch.Tensor] | None = None,
    eps: float = 1.0,
    alpha: float | None = None,
    steps: int = 20,
    *,
    norm: str = "l2",
    hook: str | None = None,
    positions: Sequence[int] | None = None,
    random_start: bool = False,
    seed: int = 0,
) -> EmbeddingAttack:
    """PGD on the input embeddings of a transformer, minimising ``loss(logits) -> [batch]``.

    The perturbation enters through a replacement hook on the embedding (``act + delta``), so any
    transformer ``interp.load`` gives can be attacked. The budget is per position: ``|delta|_∞ <= eps``
    or ``|delta[b, p]|_2 <= eps``. ``positions`` restricts which tokens may be perturbed; the
    default loss (``flip_loss``) flips the final position's top prediction.
    """
    if norm not in NORMS:
        raise InputError(f"norm must be one of {NORMS}, got {norm!r}")
    check_number("eps", eps, minimum=0.0, why="the perturbation budget per position")
    check_number("steps", steps, minimum=0, integer=True)
    if alpha is not None:
        check_number("alpha", alpha, minimum=0.0, why="the step size; a negative one reverses the attack")
    hook = hook or embedding_hook(model)
    prepared = model.prepare(inputs)
    with torch.no_grad():
        clean_logits = model(prepared)
    loss = loss or flip_loss(clean_logits)
    alpha = eps / 4 if alpha is None else alpha
    with model._internal():  # a shape probe: the user's hooks must not run on it
        shape = tuple(model.run_with_cache(prepared, names=hook, stop_early=True)[1][hook].shape)
    if positions is not None:
        positions = list(positions)
        bad = [p for p in positions if not isinstance(p, int) or not -shape[1] <= p < shape[1]]
        if bad or not positions:
            raise InputError(
                f"positions {bad[:5] or positions} are not token positions of these prompts ({shape[1]} tokens); "
                f"pass ints in [-{shape[1]}, {shape[1]})"
            )
    mask = torch.zeros(shape[:2] + (1,), device=model.device)
    mask[:, list(positions) if positions is not None else slice(None)] = 1.0
    gen = torch.Generator(device=model.device).manual_seed(seed)
    delta = torch.zeros(shape, device=model.device)
    if random_start:
        delta = _project_positions(
            torch.empty(shape, device=model.device).uniform_(-eps, eps, generator=gen), eps, norm
        )
    delta = delta * mask

    def run(d: torch.Tensor) -> torch.Tensor:
        return model.run_with_hooks(prepared, [(hook, lambda act, _: act + d)], grad=d.requires_grad)

    for _ in range(steps):
        delta.requires_grad_(True)
        grad = torch.autograd.grad(loss(run(delta)).sum(), delta)[0]
        if norm == "linf":
            step = grad.sign()
        else:
            step = grad / grad.norm(dim=-1, keepdim=True).clamp_min(EPS_DIVISION)
        delta = _project_positions(delta.detach() - alpha * step, eps, norm) * mask
    with torch.no_grad():
        adv_logits = run(delta)
        return EmbeddingAttack(hook, delta, loss(clean_logits), loss(adv_logits), clean_logits, adv_logits,
                               {"eps": eps, "alpha": alpha, "steps": steps, "norm": norm,
                                "positions": positions, "random_start": random_start, "seed": seed})  # fmt: skip


def _project_positions(delta: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    if norm == "linf":
        return delta.clamp(-eps, eps)
    norms = delta.norm(dim=-1, keepdim=True)
    return delta * torch.clamp(eps / norms.clamp_min(1e-12), max=1.0)


# ------------------------------------------------------------------------------------------------
# Adversarial-attack probes
# ------------------------------------------------------------------------------------------------


@dataclass
class AttackProbe:
    """Clean vs adversarial, layer by layer.

    Attributes:
        names: the hook points compared, in forward order.
        divergence: ``[layers]`` mean relative L2 distance ``|a_adv - a_clean| / |a_clean|``.
        cosine: ``[layers]`` mean cosine similarity of clean and adversarial activations.
        probe_acc_clean: ``[layers]`` accuracy of a linear probe (trained on clean data) on clean inputs.
        probe_acc_adv: ``[layers]`` the same probes on the adversarial inputs.
        restoration: ``[layers]`` share of the accuracy lost to the attack that returns when that
            layer's clean activation is patched into the adversarial run (1 = all, 0 = none).
        restoration_topk: ``[layers]`` the same, patching only the ``topk_frac`` most divergent units.
        accuracy_clean, accuracy_adv: the model's accuracy on the two batches.
        config: unit dim, topk_frac, probe C, seed.
    """

    names: list[str]
    divergence: torch.Tensor
    cosine: torch.Tensor
    probe_acc_clean: torch.Tensor
    probe_acc_adv: torch.Tensor
    restoration: torch.Tensor
    restoration_topk: torch.Tensor
    accuracy_clean: float
    accuracy_adv: float
    config: dict[str, Any]

    def figure(self):
        """Three panels: divergence, probe accuracy clean vs adversarial, restoration."""
        from plotly.subplots import make_subplots

        fig = make_subplots(rows=1, cols=3, subplot_titles=(
            "activation divergence", "probe accuracy", "restoration by patching clean"))  # fmt: skip
        # Three panels side by side leave ~1/3 of the width per axis: the common ".hook_out" suffix
        # goes into the axis title, and the labels are tilted, so they do not overlap.
        suffix = ".hook_out" if all(n.endswith(".hook_out") for n in self.names) else ""
        x = [n.removesuffix(suffix) for n in self.names] if suffix else list(self.names)
        fig.add_scatter(
            x=x, y=self.divergence.tolist(), mode="lines+markers", name="relative L2", row=1, col=1
        )
        fig.add_scatter(
            x=x, y=self.probe_acc_clean.tolist(), mode="lines+markers", name="probe, clean", row=1, col=2
        )
        fig.add_scatter(
            x=x, y=self.probe_acc_adv.tolist(), mode="lines+markers", name="probe, adversarial", row=1, col=2
        )
        fig.add_scatter(
            x=x, y=self.restoration.tolist(), mode="lines+markers", name="patch whole layer", row=1, col=3
        )
        frac = self.config.get("topk_frac")
        fig.add_scatter(x=x, y=self.restoration_topk.tolist(), mode="lines+markers",
                        name=f"patch top {frac:.0%} units", row=1, col=3)  # fmt: skip
        fig.update_layout(height=460, title=f"Clean vs adversarial: accuracy {self.accuracy_clean:.2f} -> "
                          f"{self.accuracy_adv:.2f}")  # fmt: skip
        fig.update_xaxes(
            tickangle=-45,
            tickfont_size=11,
            title_text=f"hook point (name{suffix})" if suffix else "hook point",
        )
        return fig


def _as_hooked(model: HookedModel | nn.Module) -> HookedModel:
    if isinstance(model, HookedModel):
        return model
    from interp.models.module import ModuleModel

    return ModuleModel(model, type(model).__name__)


def _acts(model: HookedModel, x: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    _, cache = model.run_with_cache(x, names=names)
    return {n: cache[n] for n in names}


def divergence(clean: torch.Tensor, adv: torch.Tensor) -> tuple[float, float]:
    """Mean relative L2 distance and mean cosine similarity between paired activations ``[b, ...]``."""
    c, a = rearrange(clean.double(), "b ... -> b (...)"), rearrange(adv.double(), "b ... -> b (...)")
    rel = (a - c).norm(dim=1) / c.norm(dim=1).clamp_min(1e-12)
    return rel.mean().item(), F.cosine_similarity(a, c, dim=1, eps=1e-12).mean().item()


def _unit_scores(clean: torch.Tensor, adv: torch.Tensor, dim: int) -> torch.Tensor:
    """Mean squared clean-vs-adversarial difference per unit along ``dim`` (for ranking units)."""
    diff = (adv - clean).double() ** 2
    other = [d for d in range(diff.ndim) if d != dim % diff.ndim]
    return diff.mean(dim=other)


def _patch_hook(
    clean: torch.Tensor, dim: int, units: torch.Tensor | None
) -> Callable[[torch.Tensor, Any], torch.Tensor]:
    def patch(act: torch.Tensor, hook: Any) -> torch.Tensor:
        if units is None:
            return clean
        out = act.clone()
        index = [slice(None)] * act.ndim
        index[dim % act.ndim] = units
        out[tuple(index)] = clean[tuple(index)]
        return out

    return patch


def _restored(
    model: HookedModel, adv: torch.Tensor, y: torch.Tensor, hook: tuple, acc_clean: float, acc_adv: float
) -> float:
    out = model.run_with_hooks(adv, [hook])
    acc = (out.argmax(-1) == y).double().mean().item()
    gap = acc_clean - acc_adv
    return (acc - acc_adv) / gap if gap > 0 else math.nan


def restoration_by_unit(
    model: HookedModel | nn.Module, clean: Any, adversarial: Any, labels: Any, name: str, dim: int = 1
) -> torch.Tensor:
    """``[units]``: the share of lost accuracy restored by patching one unit (a channel along ``dim``
    of a conv activation, a head along ``dim=2`` of ``hook_z``) of the clean activation at ``name``."""
    hooked = _as_hooked(model)
    x, xa, y = _pair(hooked, clean, adversarial, labels)
    act = _acts(hooked, x, [name])[name]
    acc_clean = (hooked(x).argmax(-1) == y).double().mean().item()
    acc_adv = (hooked(xa).argmax(-1) == y).double().mean().item()
    units = range(act.shape[dim % act.ndim])
    return torch.tensor([
        _restored(hooked, xa, y, (name, _patch_hook(act, dim, torch.tensor([u]))), acc_clean, acc_adv) for u in units
    ])  # fmt: skip


def _pair(
    model: HookedModel, clean: Any, adversarial: Any, labels: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x, xa = model.prepare(clean), model.prepare(adversarial)
    if x.shape != xa.shape:
        raise InputError(
            f"clean and adversarial batches differ in shape: {tuple(x.shape)} vs {tuple(xa.shape)}"
        )
    y = torch.as_tensor(labels).long().reshape(-1).to(x.device)
    if len(y) != len(x):
        raise InputError(f"got {len(y)} labels for {len(x)} images; pass exactly one label per image")
    return x, xa, y


def attack_probe(
    model: HookedModel | nn.Module,
    clean: Any,
    adversarial: Any = None,
    labels: Any = None,
    names: str | Sequence[str] | None = None,
    *,
    train: tuple[Any, Any] | None = None,
    unit_dim: int = 1,
    topk_frac: float = 0.25,
    C: float = 1.0,
    seed: int = 0,
) -> AttackProbe:
    """Compare a clean batch and its adversarial twin at every hook point.

    ``clean`` may be an :class:`Attack` from any attack (then ``adversarial`` and ``labels`` come
    from it): ``attack_probe(model, A.square(model, x, y, 0.1))``.

    Args:
        names: hook points (default: every leaf module's output, or the residual stream).
        train: ``(inputs, labels)`` clean data to fit the probes on; default: a seeded half of
            ``clean`` (the other half scores both clean and adversarial).
        unit_dim: the axis whose units (channels, features, heads) ``restoration_topk`` patches.
        topk_frac: the share of most divergent units patched for ``restoration_topk``.
    """
    from interp.methods import probing

    check_number("topk_frac", topk_frac, minimum=0.0, strict=True, why="a share of units, at most 1")
    if topk_frac > 1:
        raise InputError(f"topk_frac must be a share of units in (0, 1], got {topk_frac!r}")
    if isinstance(clean, Attack):
        if adversarial is not None or labels is not None:
            raise InputError("pass either an Attack or (clean, adversarial, labels), not both")
        clean, adversarial, labels = clean.x, clean.x_adv, clean.labels
    if adversarial is None or labels is None:
        raise InputError("attack_probe needs the adversarial batch and the labels (or an Attack as clean=)")
    hooked = _as_hooked(model)
    x, xa, y = _pair(hooked, clean, adversarial, labels)
    chosen = hooked.resolve(names) if names is not None else probing.default_names(hooked)
    acts_c, acts_a = _acts(hooked, x, chosen), _acts(hooked, xa, chosen)
    acc_clean = (hooked(x).argmax(-1) == y).double().mean().item()
    acc_adv = (hooked(xa).argmax(-1) == y).double().mean().item()
    probe_c, probe_a = _probe_accuracies(hooked, x, y, acts_c, acts_a, chosen, train, C, seed)
    div, cos, full, topk = [], [], [], []
    for name in chosen:
        d, c = divergence(acts_c[name], acts_a[name])
        div.append(d)
        cos.append(c)
        full.append(
            _restored(hooked, xa, y, (name, _patch_hook(acts_c[name], unit_dim, None)), acc_clean, acc_adv)
        )
        scores = _unit_scores(acts_c[name], acts_a[name], unit_dim)
        k = max(1, round(topk_frac * len(scores)))
        units = scores.topk(k).indices
        topk.append(
            _restored(hooked, xa, y, (name, _patch_hook(acts_c[name], unit_dim, units)), acc_clean, acc_adv)
        )
    as_t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    return AttackProbe(chosen, as_t(div), as_t(cos), as_t(probe_c), as_t(probe_a), as_t(full), as_t(topk),
                       acc_clean, acc_adv, {"unit_dim": unit_dim, "topk_frac": topk_frac, "C": C, "seed": seed,
                                            "probe_data": "train" if train is not None else "half of clean"})  # fmt: skip


def _probe_accuracies(
    model: HookedModel,
    x: torch.Tensor,
    y: torch.Tensor,
    acts_c: dict[str, torch.Tensor],
    acts_a: dict[str, torch.Tensor],
    names: list[str],
    train: tuple[Any, Any] | None,
    C: float,
    seed: int,
) -> tuple[list[float], list[float]]:
    """Probes fitted on clean activations, scored on held-out clean and adversarial activations."""
    from interp.methods import probing

    flat = lambda t: rearrange(t, "b ... -> b (...)")  # noqa: E731
    if train is not None:
        feats = probing.collect_features(model, train[0], train[1], names)
        fit = {n: (feats.values[n], feats.labels) for n in names}
        eval_idx = torch.arange(len(y))
    else:
        train_idx, eval_idx = probing.split(y.cpu(), "classification", 0.5, seed)
        fit = {n: (flat(acts_c[n])[train_idx].cpu(), y[train_idx].cpu()) for n in names}
    clean_acc, adv_acc = [], []
    for n in names:
        feats_n, labels_n = fit[n]
        idx = torch.arange(len(labels_n))
        probe = probing.fit_probe(feats_n, labels_n, C=C, train_idx=idx, test_idx=idx, name=n)
        clean_acc.append(probe.score(flat(acts_c[n])[eval_idx].cpu(), y[eval_idx].cpu()))
        adv_acc.append(probe.score(flat(acts_a[n])[eval_idx].cpu(), y[eval_idx].cpu()))
    return clean_acc, adv_acc


# ------------------------------------------------------------------------------------------------
# Figures
# ------------------------------------------------------------------------------------------------


def attack_figure(attack: Attack, index: int = 0):
    """Original | adversarial | perturbation heatmaps for one example, titled with the predictions."""
    from plotly.subplots import make_subplots

    if not 0 <= index < len(attack.x):
        raise InputError(f"index {index} is outside the batch of {len(attack.x)} images")
    p_clean = attack.logits_clean[index].softmax(-1)
    p_adv = attack.logits_adv[index].softmax(-1)
    c, a = int(p_clean.argmax()), int(p_adv.argmax())

    def img(t: torch.Tensor):  # an image per row, as numpy
        return (
            t[index].reshape(-1, t.shape[-1]).cpu().numpy() if t.ndim >= 3 else t[index][None].cpu().numpy()
        )

    peak = float(attack.delta[index].abs().max())
    # an image the attack left unchanged (APGD, Square and the ensemble return those clean): say so,
    # and scale the empty panel by the budget rather than by ~0 (which labels the colour bar in pico)
    third = "perturbation" if peak > 0 else "perturbation: none (image unchanged)"
    fig = make_subplots(rows=1, cols=3, subplot_titles=(
        f"original: {c} ({p_clean[c]:.2f})", f"adversarial: {a} ({p_adv[a]:.2f})", third))  # fmt: skip
    low, high = attack.config.get("bounds", (0.0, 1.0))
    fig.add_heatmap(
        z=img(attack.x)[::-1], colorscale="gray", zmin=low, zmax=high, showscale=False, row=1, col=1
    )
    fig.add_heatmap(
        z=img(attack.x_adv)[::-1], colorscale="gray", zmin=low, zmax=high, showscale=False, row=1, col=2
    )
    bound = peak if peak > 0 else float(attack.config.get("eps") or 1.0) or 1.0
    fig.add_heatmap(
        z=img(attack.delta)[::-1], colorscale="RdBu", zmid=0, zmin=-bound, zmax=bound, row=1, col=3
    )
    fig.update_xaxes(showticklabels=False)
    fig.update_yaxes(showticklabels=False, scaleanchor="x")
    budget = f"eps={attack.config['eps']}" if "eps" in attack.config else "minimal perturbation"
    fig.update_layout(height=320, title=f"{attack.config['attack']} {budget}")
    return fig


_FROM_ATTACKS = ("apgd", "apgd_t", "autoattack", "cw", "deepfool", "dlr_loss", "dlr_loss_targeted",
                 "min_norm_accuracy", "square", "fab", "fab_t")  # fmt: skip


def __getattr__(name: str) -> Any:
    """The attacks of ``interp.methods.attacks`` are importable from here too (lazily: that package
    imports this module's helpers)."""
    if name in _FROM_ATTACKS:
        from interp.methods import attacks

        return getattr(attacks, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
