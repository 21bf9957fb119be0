"""Reading circuits off the weights: the random baseline that composition scores are judged against.

The scores themselves are ``model.all_composition_scores(mode)`` (TransformerLens's semantics, see
``interp.models.weights``). A score means little on its own: two heads of a trained model compose
if their score is well above what random matrices of the same shapes score. Elhage et al. (2021)
and TransformerLens's demo compare with that; ``composition_baseline`` estimates it.
"""

from __future__ import annotations

import torch

from interp.errors import InputError


def composition_baseline(d_model: int, d_head: int, *, n_samples: int = 200, seed: int = 0) -> float:
    """The expected composition score of random heads: ``E ||OV_1 M_2||_F / (||OV_1||_F ||M_2||_F)``.

    ``OV_1 = W_V W_O`` and ``M_2 = W_Q W_K^T`` are products of independent Gaussian factors of the
    model's shapes (``[d_model, d_head] @ [d_head, d_model]``). The score is scale-invariant and the
    Gaussian is rotation-invariant, so Q-, K- and V-composition share one baseline; it is close to
    ``1 / sqrt(d_model)``. Estimated by Monte Carlo over ``n_samples`` pairs with a fixed ``seed``
    (the standard error is about ``0.03 / sqrt(d_model * n_samples)``).
    """
    if d_model < 1 or d_head < 1 or n_samples < 1:
        raise InputError(
            f"d_model, d_head and n_samples must be positive, got {d_model}, {d_head}, {n_samples}"
        )
    from transformer_lens import FactoredMatrix
    from transformer_lens.utilities import composition_scores

    generator = torch.Generator().manual_seed(seed)
    shapes = [(d_model, d_head), (d_head, d_model)] * 2
    w_v, w_o, w_q, w_kt = (torch.randn(n_samples, *shape, generator=generator) for shape in shapes)
    scores = composition_scores(FactoredMatrix(w_v, w_o), FactoredMatrix(w_q, w_kt), broadcast_dims=False)
    return float(scores.mean())
