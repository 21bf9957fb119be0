"""The Square attack (Andriushchenko et al. 2020), L∞: a score-based random search, no gradients.

Each query adds one random square of side ``s`` (shrinking on a fixed schedule) with values
``±2 eps`` per channel to the best point so far, projects back to the ball and the pixel range, and
keeps it for the images whose margin loss fell. It follows torchattacks' ``Square`` (norm Linf)
draw for draw from a generator seeded with ``seed``, so the adversarial images are identical; as in
AutoAttack, images it does not break come back clean.
"""

from __future__ import annotations

import math
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
    _target,
    _target_mode,
    check_inputs,
    check_number,
)
from interp.models.base import HookedModel

LOSSES = ("margin", "ce")


def square(
    model: HookedModel | nn.Module,
    x: Any,
    y: Any,
    eps: float,
    n_queries: int = 5000,
    *,
    p_init: float = 0.8,
    loss: str = "margin",
    restarts: int = 1,
    target: Any = None,
    seed: int = 0,
    bounds: tuple[float, float] | None = None,
    normalize: tuple[Any, Any] | None = None,
    progress: Any = None,
) -> Attack:
    """Square attack in an L∞ ball of radius ``eps`` on images ``[batch, channels, height, width]``.

    Args:
        n_queries: model queries per image at most (the search stops for an image once it is broken).
        p_init: the initial share of pixels a square covers (the schedule divides it down).
        loss: ``"margin"`` (true logit minus the best other) or ``"ce"`` to minimise.
        target: a targeted attack's goal (see ``resolve_target``).
        progress: optional ``progress(done, total)`` called after each query.
    """
    if loss not in LOSSES:
        raise InputError(f"loss must be one of {LOSSES}, got {loss!r}")
    check_number("n_queries", n_queries, minimum=1, integer=True, why="model queries per image")
    check_number("p_init", p_init, minimum=0.0, strict=True, why="a share of pixels, at most 1")
    check_number("restarts", restarts, minimum=1, integer=True)
    module, xt, yt, (low, high) = check_inputs(model, x, y, eps, bounds, normalize=normalize)
    if xt.ndim != 4:
        raise InputError(f"Square needs images [batch, channels, height, width], got shape {tuple(xt.shape)}")
    goal = _target(target, False, yt, module, xt, seed)
    classes = yt if goal is None else goal
    run = _Square(
        module, float(eps), int(n_queries), float(p_init), loss, goal is not None, low, high, progress
    )
    with _eval(module), torch.no_grad():
        pred = _logits(module, xt).argmax(1)
        acc = pred == classes if goal is None else pred != classes
        adv = xt.clone()
        gen = torch.Generator(device=xt.device).manual_seed(int(seed))
        for _ in range(int(restarts)):
            idx = acc.nonzero().flatten()
            if not len(idx):
                break
            adv_curr = run(xt[idx], classes[idx], gen)
            pred = _logits(module, adv_curr).argmax(1)
            still = pred == classes[idx] if goal is None else pred != classes[idx]
            acc[idx[~still]] = False
            adv[idx[~still]] = adv_curr[~still]
    config = {"attack": "square", "eps": eps, "n_queries": int(n_queries), "p_init": p_init, "loss": loss,
              "norm": "linf", "restarts": int(restarts), "seed": seed, "bounds": (low, high),
              "targeted": goal is not None, "target_mode": _target_mode(target),
              "normalize": _stats(normalize)}  # fmt: skip
    return Attack(xt, adv, yt, goal, config, module)


class _Square:
    def __init__(self, module, eps, n_queries, p_init, loss, targeted, low, high, progress=None) -> None:
        self.module, self.eps, self.n_queries, self.p_init = module, eps, n_queries, p_init
        self.loss, self.targeted, self.low, self.high, self.progress = loss, targeted, low, high, progress

    def margin_and_loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.module(x)
        col = y.unsqueeze(1)
        y_corr = logits.gather(1, col).squeeze(1)
        xent = F.cross_entropy(logits, y, reduction="none") if self.loss == "ce" else None
        y_others = logits.scatter_(1, col, -float("inf")).max(dim=-1)[0]
        margin = y_others - y_corr if self.targeted else y_corr - y_others
        if self.loss == "margin":
            return margin, margin
        return margin, xent if self.targeted else -1.0 * xent

    def p_selection(self, it: int) -> float:
        it = int(it / self.n_queries * 10000)
        for limit, div in ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64),
                           (6000, 128), (8000, 256)):  # fmt: skip
            if it <= limit:
                return self.p_init / div
        return self.p_init / 512

    def __call__(self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        eps, dev = self.eps, x.device
        c, h, w = x.shape[1:]
        n_features = c * h * w

        def choice(shape):
            return torch.sign(2 * torch.rand(shape, generator=gen, device=dev) - 1)

        def randint(high_):
            return int((high_ * torch.rand([1], generator=gen, device=dev)).long())

        x_best = torch.clamp(x + eps * choice([x.shape[0], c, 1, w]), self.low, self.high)
        margin_min, loss_min = self.margin_and_loss(x_best, y)
        # The ball and the pixel range as one box: x lies in the range, so the two intersect, and
        # clamping to one then the other equals clamping to their intersection, bit for bit.
        lo, hi = torch.clamp(x - eps, min=self.low), torch.clamp(x + eps, max=self.high)
        # The search works on the images still unbroken, kept compacted in batch order: each query
        # is elementwise per image, so this equals gathering them from the whole batch every query,
        # and the gathers happen only when an image breaks.
        rows = (margin_min > 0.0).nonzero().flatten()
        best, labels, margins, losses = x_best[rows], y[rows], margin_min[rows], loss_min[rows]
        lo, hi = lo[rows], hi[rows]
        for i_iter in range(self.n_queries):
            if len(rows) == 0:
                break
            p = self.p_selection(i_iter)
            s = max(int(round(math.sqrt(p * n_features / c))), 1)
            vh, vw = randint(h - s), randint(w - s)
            square = (slice(None), slice(None), slice(vh, vh + s), slice(vw, vw + s))
            # x_best lies in the box, so only the square moves: adding the square's values and
            # clamping there equals adding a zero-padded delta and clamping the whole image.
            x_new = best.clone()
            patch = x_new[square]
            patch += 2.0 * eps * choice([c, 1, 1])
            patch.clamp_(lo[square], hi[square])
            margin, loss = self.margin_and_loss(x_new, labels)
            improved = loss < losses
            losses = torch.where(improved, loss, losses)
            improved = improved | (margin <= 0.0)
            margins = torch.where(improved, margin, margins)
            best = torch.where(improved.view(-1, 1, 1, 1), x_new, best)
            if self.progress is not None:
                self.progress(i_iter + 1, self.n_queries)
            left = margins > 0.0
            if not bool(left.all()):  # some broke: write them back and drop them
                x_best[rows] = best
                rows, best, labels, margins, losses = (
                    rows[left],
                    best[left],
                    labels[left],
                    margins[left],
                    losses[left],
                )
                lo, hi = lo[left], hi[left]
        x_best[rows] = best
        return x_best
