"""An AutoAttack-style ensemble (Croce & Hein 2020): APGD-CE, then APGD-T, then FAB-T, then
Square, each run on the images the ones before left robust; an image counts as broken by the first
that breaks it.

AutoAttack's standard version (L∞), with torchattacks' defaults for the iterations (``steps=10``
for the APGDs and FAB-T; the paper uses 100). The order, the seeds and the hand-over of the
still-robust images follow torchattacks' ``MultiAttack([APGD, APGDT, FAB(multi_targeted=True),
Square])``, so the result is identical to that on the same model, batch and seed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from interp.methods.adversarial import Attack, _eval, _logits, _stats, check_inputs, check_number
from interp.methods.attacks.apgd import apgd, apgd_t
from interp.methods.attacks.fab import fab_t
from interp.methods.attacks.square import square
from interp.models.base import HookedModel

MEMBERS = ("apgd-ce", "apgd-t", "fab-t", "square")


def autoattack(
    model: HookedModel | nn.Module,
    x: Any,
    y: Any,
    eps: float,
    *,
    steps: int = 10,
    n_queries: int = 5000,
    seed: int = 0,
    bounds: tuple[float, float] | None = None,
    normalize: tuple[Any, Any] | None = None,
    progress: Any = None,
) -> Attack:
    """APGD-CE, APGD-T, FAB-T and Square (L∞, radius ``eps``) in sequence on the still-robust images.

    Args:
        steps: APGD and FAB-T iterations (torchattacks' default 10; AutoAttack's paper uses 100).
        n_queries: Square's query budget.
        progress: optional ``progress(done, total)`` called after each member (of :data:`MEMBERS`).

    ``config["robust_after"]`` counts the images still classified correctly after each member.
    """
    check_number("steps", steps, minimum=1, integer=True, why="APGD iterations")
    check_number("n_queries", n_queries, minimum=1, integer=True, why="Square's queries per image")
    module, xt, yt, bounds_ = check_inputs(model, x, y, eps, bounds, normalize=normalize)
    kw = {"seed": seed, "bounds": bounds_}
    members = (
        lambda a, b: apgd(module, a, b, eps, steps, loss="ce", **kw),
        lambda a, b: apgd_t(module, a, b, eps, steps, **kw),
        lambda a, b: fab_t(module, a, b, eps, steps, **kw),
        lambda a, b: square(module, a, b, eps, n_queries, **kw),
    )
    final = xt.clone()
    fails = torch.arange(len(xt), device=xt.device)
    robust_after = []
    with _eval(module), torch.no_grad():
        for i, member in enumerate(members):
            adv = member(xt[fails], yt[fails]).x_adv
            wrong = _logits(module, adv).argmax(1) != yt[fails]
            final[fails[wrong]] = adv[wrong]
            fails = fails[~wrong]
            robust_after.append(len(fails))
            if progress is not None:
                progress(i + 1, len(members))
            if not len(fails):
                break
    config = {"attack": "autoattack", "members": list(MEMBERS), "eps": eps, "steps": int(steps),
              "n_queries": int(n_queries), "norm": "linf", "seed": seed, "bounds": bounds_, "targeted": False,
              "normalize": _stats(normalize), "robust_after": robust_after}  # fmt: skip
    return Attack(xt, final, yt, None, config, module)
