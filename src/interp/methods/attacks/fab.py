"""FAB, the fast adaptive boundary attack (Croce & Hein 2020), L∞ and L2: FAB and the targeted FAB-T.

FAB looks for the smallest perturbation that changes the prediction. Each step linearises the
model at the current point ``x1``, picks the class boundary nearest in the attack's norm
(``|f_k - f_y| / ||∇f_k - ∇f_y||_dual``), and projects both ``x1`` and the clean image ``x0`` onto
that hyperplane inside the pixel box (an exact minimal-norm projection: sorting plus a binary
search). The next point is the convex mix ``(1 - α)(x1 + η d1) + α (x0 + η d2)``, with
``α = |d1| / (|d1| + |d2|)`` capped at ``alpha_max``: it leans toward the clean image when that one
is closer to the boundary. ``η`` overshoots the boundary; once a point is adversarial it is kept if
it is the smallest found, and pulled back toward the clean image by ``β``.

It follows torchattacks' ``FAB`` (norm Linf / L2) operation for operation: the same steps and
projections, the same restarts (the first from the clean image, the others from a random point at
``eps / 2``, drawn on the CPU from a generator seeded with ``seed`` in torchattacks' order), so the
adversarial images are identical on the same model, batch and seed (the tests check it). The
one-hot Jacobian is taken with ``autograd.grad`` instead of repeated ``backward`` calls.

As in AutoAttack, only the images the model classifies correctly are attacked, and an image is
returned clean unless FAB found an adversarial within ``eps``: FAB's iterations do not depend on
``eps`` (except the random restarts), which only decides what counts as broken.

Bounds other than [0, 1] are handled by running the attack on ``(x - low) / (high - low)`` (the
projections assume the unit box); the minimal-norm problem is the same up to that scale.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from interp.errors import InputError
from interp.methods.adversarial import (
    Attack,
    _eval,
    _logits,
    _stats,
    _target,
    _target_mode,
    check_inputs,
    check_n_targets,
    check_number,
)
from interp.models.base import HookedModel

NORMS = ("linf", "l2")
FAR = 1e10  # torchattacks' "no adversarial found yet" distance


def fab(
    model: HookedModel | nn.Module,
    x: Any,
    y: Any,
    eps: float,
    steps: int = 10,
    *,
    norm: str = "linf",
    restarts: int = 1,
    alpha_max: float = 0.1,
    eta: float = 1.05,
    beta: float = 0.9,
    target: Any = None,
    seed: int = 0,
    bounds: tuple[float, float] | None = None,
    normalize: tuple[Any, Any] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Attack:
    """FAB: the smallest L∞ or L2 perturbation it finds that changes the class, kept if within ``eps``.

    Args:
        steps: iterations per restart (torchattacks' default 10; AutoAttack uses 100).
        norm: ``"linf"`` or ``"l2"``: the norm minimised and the one ``eps`` bounds.
        restarts: the first run starts at the clean image, each further one at a random point at
            ``eps / 2`` (on the images still robust).
        alpha_max: the cap on the step's pull toward the clean image's projection.
        eta: overshoot past the linearised boundary (> 1).
        beta: the backward step toward the clean image after an adversarial is found (< 1).
        target: a targeted attack (see ``resolve_target``): the boundary stepped to is the one
            between the label and the target, and success is being classified as the target.
            (torchattacks' targeted FAB steps to that boundary but counts any misclassification.)
        seed: seeds the random restarts and ``target="random"``.
        progress: optional ``progress(done, total)`` called after each step.
    """
    module, xt, yt, bounds_, norm = _checked(model, x, y, eps, steps, restarts, alpha_max, eta, beta, seed, norm,
                                             bounds, normalize)  # fmt: skip
    goal = _target(target, False, yt, module, xt, seed)
    run = _Fab(module, xt, yt, float(eps), int(steps), norm, float(alpha_max), float(eta), float(beta),
               bounds_, int(restarts), seed, progress)  # fmt: skip
    with _eval(module), torch.no_grad():
        adv = run.attack([goal], goal is not None)
    config = {"attack": "fab", "eps": eps, "steps": int(steps), "norm": norm, "restarts": int(restarts),
              "alpha_max": alpha_max, "eta": eta, "beta": beta, "seed": seed, "bounds": bounds_,
              "targeted": goal is not None, "target_mode": _target_mode(target),
              "normalize": _stats(normalize)}  # fmt: skip
    return Attack(xt, adv, yt, goal, config, module)


def fab_t(
    model: HookedModel | nn.Module,
    x: Any,
    y: Any,
    eps: float,
    steps: int = 10,
    *,
    n_targets: int | None = None,
    norm: str = "linf",
    restarts: int = 1,
    alpha_max: float = 0.1,
    eta: float = 1.05,
    beta: float = 0.9,
    seed: int = 0,
    bounds: tuple[float, float] | None = None,
    normalize: tuple[Any, Any] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Attack:
    """FAB-T, as AutoAttack runs it: FAB toward the boundary with each of the ``n_targets`` most
    likely other classes in turn (default: all ``classes - 1``), each on the images still robust.

    One backward per step instead of one per class, so it is cheaper than :func:`fab`. The returned
    attack is untargeted in meaning (``target`` is None): success is misclassification within
    ``eps``. Identical to torchattacks' ``FAB(multi_targeted=True)``.
    """
    module, xt, yt, bounds_, norm = _checked(model, x, y, eps, steps, restarts, alpha_max, eta, beta, seed, norm,
                                             bounds, normalize)  # fmt: skip
    with _eval(module), torch.no_grad():
        clean = _logits(module, xt)
    n_classes = clean.shape[-1]
    n_targets = check_n_targets(n_targets, n_classes)
    order = clean.sort(dim=-1)[1]
    goals = [order[:, -rank] for rank in range(2, int(n_targets) + 2)]
    run = _Fab(module, xt, yt, float(eps), int(steps), norm, float(alpha_max), float(eta), float(beta),
               bounds_, int(restarts), seed, progress)  # fmt: skip
    with _eval(module), torch.no_grad():
        adv = run.attack(goals, False)
    config = {"attack": "fab-t", "eps": eps, "steps": int(steps), "norm": norm, "n_targets": int(n_targets),
              "restarts": int(restarts), "alpha_max": alpha_max, "eta": eta, "beta": beta, "seed": seed,
              "bounds": bounds_, "targeted": False, "normalize": _stats(normalize)}  # fmt: skip
    return Attack(xt, adv, yt, None, config, module)


def _checked(model, x, y, eps, steps, restarts, alpha_max, eta, beta, seed, norm, bounds, normalize):
    if norm not in NORMS:
        raise InputError(f"norm must be one of {NORMS} for FAB, got {norm!r}")
    check_number("steps", steps, minimum=1, integer=True, why="FAB iterations per restart")
    check_number("restarts", restarts, minimum=1, integer=True, why="the first run plus random restarts")
    check_number("seed", seed, minimum=0, integer=True, why="seeds the random restarts")
    check_number(
        "alpha_max", alpha_max, minimum=0.0, why="the cap on the pull toward the clean image, in [0, 1]"
    )
    if alpha_max > 1:
        raise InputError(f"alpha_max must be in [0, 1] (a convex weight), got {alpha_max!r}")
    check_number("eta", eta, minimum=1.0, why="the overshoot past the boundary, e.g. 1.05")
    check_number("beta", beta, minimum=0.0, strict=True, why="the backward step, in (0, 1], e.g. 0.9")
    if beta > 1:
        raise InputError(f"beta must be in (0, 1] (a shrink toward the clean image), got {beta!r}")
    module, xt, yt, bounds_ = check_inputs(model, x, y, eps, bounds, norm=norm, normalize=normalize)
    return module, xt, yt, bounds_, norm


class _Unit(nn.Module):
    """The model on the unit box: ``module(low + width * u)`` for ``u`` in [0, 1]."""

    def __init__(self, module: nn.Module, low: float, width: float) -> None:
        super().__init__()
        self.module, self.low, self.width = module, low, width

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.module(u * self.width + self.low)


class _Fab:
    """One FAB configuration on one batch; :meth:`attack` runs it for a list of goals."""

    def __init__(
        self, module, x, y, eps, steps, norm, alpha_max, eta, beta, bounds, restarts, seed, progress
    ):
        low, high = bounds
        self.unit = (low, high) == (0.0, 1.0)
        self.width = high - low
        self.module = module if self.unit else _Unit(module, low, self.width)
        self.x, self.y, self.bounds = x, y, bounds
        self.u = x if self.unit else (x - low) / self.width
        self.eps = eps if self.unit else eps / self.width
        self.steps, self.norm, self.restarts = steps, norm, restarts
        self.alpha_max, self.eta, self.beta = alpha_max, eta, beta
        self.gen = torch.Generator().manual_seed(int(seed))  # CPU draws, as torchattacks' global RNG
        self.progress, self.done, self.total = progress, 0, 0
        self.targeted = False

    def attack(self, goals: list[torch.Tensor | None], targeted: bool) -> torch.Tensor:
        """Run every goal (None: untargeted) with its restarts on the images not yet broken; the
        adversarial batch in pixel space (clean where nothing was found within eps).

        ``targeted``: success is reaching the goal class; otherwise misclassification."""
        u, y = self.u, self.y
        self.targeted, self.total = targeted, len(goals) * self.restarts * self.steps
        robust = _logits(self.module, u).argmax(1) == y  # only correct images are attacked (AutoAttack)
        adv = u.clone()
        if self.eps == 0:  # a correct image is no adversarial of itself: nothing to find
            goals = []
        for goal in goals:
            for restart in range(self.restarts):
                idx = robust.nonzero().flatten()
                if not len(idx):
                    break
                found = self._run(u[idx], y[idx], None if goal is None else goal[idx], restart > 0)
                pred = _logits(self.module, found).argmax(1)
                hit = pred == goal[idx] if targeted else pred != y[idx]
                broken = hit & (_norm(u[idx] - found, self.norm) <= self.eps)
                robust[idx[broken]] = False
                adv[idx[broken]] = found[broken]
        self._tick(self.total - self.done)  # runs skipped (every image broken) count as done
        return adv if self.unit else self._to_pixels(adv)

    def _to_pixels(self, adv: torch.Tensor) -> torch.Tensor:
        """Unit-box results back to pixels; unchanged images exactly as given."""
        low, high = self.bounds
        changed = rearrange((adv != self.u).flatten(1).any(1), "b -> b" + " 1" * (adv.ndim - 1))
        pixels = torch.where(changed, adv * self.width + low, self.x)
        if self.norm == "linf":  # the rescaling's float rounding must not leave the ball
            radius = self.eps * self.width
            pixels = torch.min(torch.max(pixels, self.x - radius), self.x + radius)
        return pixels.clamp(low, high)

    def _tick(self, n: int) -> None:
        self.done += n
        if self.progress is not None and n:
            self.progress(self.done, self.total)

    def _start(self, x0: torch.Tensor) -> torch.Tensor:
        """A random point at eps / 2 (L∞: a scaled uniform draw, L2: a scaled Gaussian), in the box."""
        shape = (-1, *[1] * (x0.ndim - 1))
        scale = torch.full((len(x0),), self.eps, device=x0.device).reshape(shape)
        if self.norm == "linf":
            t = (2 * torch.rand(x0.shape, generator=self.gen) - 1).to(x0.device)
            size = t.reshape([len(t), -1]).abs().max(dim=1, keepdim=True)[0].reshape(shape)
        else:
            t = torch.randn(x0.shape, generator=self.gen).to(x0.device)
            size = (t**2).reshape(len(t), -1).sum(dim=-1).sqrt().reshape(shape)
        return (x0 + scale * t / size * 0.5).clamp(0.0, 1.0)

    def _run(
        self, x0: torch.Tensor, y: torch.Tensor, goal: torch.Tensor | None, random_start: bool
    ) -> torch.Tensor:
        """One FAB run; per image the smallest adversarial found (``x0`` where none was)."""
        n = len(x0)
        shape = (-1, *[1] * (x0.ndim - 1))
        flat0 = x0.reshape([n, -1])
        x1 = self._start(x0) if random_start else x0.clone()
        best, best_norm = x0.clone(), torch.full((n,), FAR, device=x0.device)
        rows = torch.arange(n, device=x0.device)
        for _ in range(self.steps):
            df, dg = self._boundaries(x1, y, goal)
            dual = _dual_norm(rearrange(dg, "b k ... -> b k (...)"), self.norm)
            nearest = (df.abs() / (1e-12 + dual)).min(dim=1)[1]
            w = dg[rows, nearest]
            offset = -df[rows, nearest] + (w * x1).reshape(n, -1).sum(dim=-1)
            w = w.reshape([n, -1])
            # x1 and the clean image projected onto the same hyperplane, in one call
            both = _project(torch.cat((x1.reshape([n, -1]), flat0)), torch.cat((w, w)),
                            torch.cat((offset, offset)), self.norm)  # fmt: skip
            d1, d2 = both[:n].reshape(x1.shape), both[n:].reshape(x1.shape)
            size = torch.clamp_min(_norm(both, self.norm, keepdim=True), 1e-8).reshape(shape)
            a1, a2 = size[:n], size[n:]
            alpha = torch.clamp(a1 / (a1 + a2), 0.0, self.alpha_max)
            x1 = ((x1 + self.eta * d1) * (1 - alpha) + (x0 + d2 * self.eta) * alpha).clamp(0.0, 1.0)
            pred = self.module(x1).argmax(1)
            adversarial = pred == goal if self.targeted else pred != y
            dist = _norm(x1 - x0, self.norm)  # masks throughout: no host sync per step
            smaller = adversarial & (dist < best_norm)
            best = torch.where(smaller.reshape(shape), x1, best)
            best_norm = torch.where(smaller, dist, best_norm)
            x1 = torch.where(adversarial.reshape(shape), x0 + (x1 - x0) * self.beta, x1)
            self._tick(1)
        return best

    def _boundaries(
        self, x1: torch.Tensor, y: torch.Tensor, goal: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``f_k - f_y`` ``[b, k]`` and its input gradient ``[b, k, ...]``: for every class
        (untargeted; the label's own entry set far), or for the goal alone (``k = 1``)."""
        point = x1.clone().requires_grad_()
        rows = torch.arange(len(y), device=y.device)
        with torch.enable_grad():
            logits = self.module(point)
            if goal is not None:
                gap = -(logits[rows, y] - logits[rows, goal])
                grad = torch.autograd.grad(gap.sum(), point)[0]
                return gap.detach()[:, None], grad[:, None]
            jac = _jacobian(logits, point)
        logits = logits.detach()
        df = logits - logits[rows, y][:, None]
        dg = jac - jac[rows, y][:, None]
        df[rows, y] = FAR
        return df, dg


def _jacobian(logits: torch.Tensor, point: torch.Tensor) -> torch.Tensor:
    """``[batch, classes, ...]``: the input gradient of each logit, one backward per class."""
    n = logits.shape[-1]
    rows = []
    for k in range(n):
        onehot = torch.zeros_like(logits)
        onehot[:, k] = 1.0
        rows.append(torch.autograd.grad(logits, point, onehot, retain_graph=k + 1 < n)[0])
    return torch.stack(rows, dim=1)


def _norm(t: torch.Tensor, norm: str, keepdim: bool = False) -> torch.Tensor:
    """Per-row L∞ or L2 norm of ``[b, ...]`` (torchattacks' reductions, for identical rounding)."""
    flat = t.reshape(len(t), -1)
    if norm == "linf":
        return flat.abs().max(dim=1, keepdim=keepdim)[0]
    return (flat**2).sum(dim=1, keepdim=keepdim).sqrt()


def _dual_norm(g: torch.Tensor, norm: str) -> torch.Tensor:
    """The dual norm over the last axis: L1 for an L∞ attack, L2 for L2 (the distance to a
    linearised boundary is ``|f| / ||∇f||_dual``)."""
    return g.abs().sum(dim=-1) if norm == "linf" else (g**2).sum(dim=-1).sqrt()


def _project(t: torch.Tensor, w: torch.Tensor, b: torch.Tensor, norm: str) -> torch.Tensor:
    """Per row, the smallest ``d`` (in the norm) with ``w · (t + d) = b`` and ``t + d`` in [0, 1]."""
    return _project_linf(t, w, b) if norm == "linf" else _project_l2(t, w, b)


def _flip_to_positive_side(t: torch.Tensor, w: torch.Tensor, b: torch.Tensor):
    """``w``, ``b`` with each row's sign flipped so that ``w · t - b >= 0`` (copies)."""
    sign = 2 * ((w * t).sum(1) - b >= 0) - 1
    return w * sign.unsqueeze(1), b * sign


def _project_linf(t: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Minimal-L∞ projection onto ``{z : w · z = b} ∩ [0, 1]^D`` (FAB's Prop. 2): each coordinate
    moves toward the box corner that lowers ``w · z`` (1 where ``w < 0``, else 0) by at most ``λ``;
    ``λ`` is found by a binary search over the coordinates sorted by their room to that corner. Rows
    where even the corners cannot reach the plane move to the corners."""
    w, b = _flip_to_positive_side(t, w, b)
    live = (w != 0).float()
    corner = (w < 0).float()
    d = (corner - t) * live  # every coordinate all the way to its corner
    room = corner - t * (2 * corner - 1)  # |corner - t|
    order = torch.argsort(room, dim=1)
    need = b - (w * t).sum(1)  # the change of w · z the step must make (<= 0)
    at_corners = (w * d).sum(1)  # the change with every coordinate at its corner
    desc = order.flip((1,))  # most room first
    w_desc = w.gather(1, desc)
    weight = torch.cumsum(w_desc.abs(), dim=1)  # |w| of the coordinates not yet at their corner
    change = torch.cumsum(-w_desc * d.gather(1, desc), dim=1) + at_corners.unsqueeze(1)
    smallest = change[:, -1] - weight[:, -1] * room.gather(1, order[:, 0:1]).squeeze(1)
    unclipped = need - smallest > 0  # λ below every coordinate's room: nothing reaches a corner
    search = (need - at_corners > 0) & ~unclipped
    # the search runs on every row (the same arithmetic per row); torch.where keeps it where it applies
    lb = torch.zeros(len(t), device=t.device)
    ub = torch.full_like(lb, w.shape[1] - 1)
    for _ in range(math.ceil(math.log2(w.shape[1]))):
        mid = torch.floor((lb + ub) / 2)
        k = mid.long().unsqueeze(1)
        coord = order.gather(1, order.size(1) - 1 - k)
        reached = (change.gather(1, k) - weight.gather(1, k) * room.gather(1, coord)).squeeze(1)
        below = need - reached > 0
        lb = torch.where(below, mid, lb)
        ub = torch.where(below, ub, mid)
    k = lb.long().unsqueeze(1)
    lam = torch.clamp_min((need - change.gather(1, k).squeeze(1)) / (-weight.gather(1, k).squeeze(1)), min=0)
    lam = lam.unsqueeze(-1)
    clipped = torch.min(lam, d) * corner + torch.max(-lam, d) * (1 - corner)
    lam_free = torch.clamp_min((need - change[:, -1]) / (-weight[:, -1]), min=0).unsqueeze(-1)
    d = torch.where(search[:, None], clipped, d)
    d = torch.where(unclipped[:, None], (2 * corner - 1) * lam_free, d)
    return d * live


def _project_l2(t: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Minimal-L2 projection onto ``{z : w · z = b} ∩ [0, 1]^D`` (FAB's Prop. 1): ``d = -λ w``
    clipped to the box per coordinate; ``λ`` is found by a binary search over the values at which
    the coordinates reach the box (sorted). Rows where the box stops the plane from being reached
    move as far as the box allows."""
    gap = (w * t).sum(1) - b
    sign = 2 * (gap >= 0) - 1
    w, gap = w * sign.unsqueeze(1), gap * sign
    live = w.abs() > 1e-8
    hits = torch.max(t / w, (t - 1) / w).clamp(min=-1e12, max=1e12)  # λ where each coordinate hits the box
    hits.masked_fill_(w.abs() < 1e-8, 1e12)
    hits[hits == -1e12] *= -1
    hits_sorted, order = torch.sort(hits, dim=1)
    hits_next = F.pad(hits_sorted[:, 1:], (0, 1))
    hits_sorted.masked_fill_(hits_sorted == 1e12, 0)
    hits_next.masked_fill_(hits_next == 1e12, 0)
    w2 = (w**2).gather(1, order)
    w2_total = w2.sum(dim=1, keepdim=True)
    w2_free = w2_total - torch.cumsum(w2, dim=1)  # |w|² of the coordinates not yet at the box
    d = -(hits * w)
    d.mul_(live.float())
    reached = torch.cat((-w2_total * hits_sorted[:, 0:1],
                         torch.cumsum((-hits_next + hits_sorted) * w2_free, dim=1) - w2_total * hits_sorted[:, 0:1]),
                        1)  # fmt: skip
    unclipped = reached[:, 0] + gap < 0  # the plain projection stays inside the box
    beyond = (d * w).sum(dim=1) + gap > 0  # even the box's corners fall short
    search = ~(unclipped | beyond)
    lb = torch.zeros(len(t), device=t.device)  # searched on every row, kept where it applies
    ub = torch.full_like(lb, w.shape[1] - 1)
    for _ in range(math.ceil(math.log2(w.shape[1]))):
        mid = torch.floor((lb + ub) / 2)
        short = reached.gather(1, mid.long().unsqueeze(1)).squeeze(1) + gap > 0
        lb = torch.where(short, mid, lb)
        ub = torch.where(short, ub, mid)
    k = lb.long().unsqueeze(1)
    free = w2_free.gather(1, k).squeeze(1)
    lam = (reached.gather(1, k).squeeze(1) + gap) / free + hits_sorted.gather(1, k).squeeze(1)
    lam = torch.where(free == 0, 0.0, lam)
    clipped = (lam.unsqueeze(-1) > hits).float()
    d_search = d * clipped - lam.unsqueeze(-1) * w * (1 - clipped)
    d_free = -(gap / w2_total.squeeze(-1)).unsqueeze(-1) * w
    d = torch.where(search[:, None], d_search, d)
    d = torch.where(unclipped[:, None], d_free, d)
    return d * live.float()
