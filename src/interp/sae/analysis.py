"""Per-latent readouts for dashboards: logit effects (a latent's decoder row through the unembedding).

    >>> effects = S.logit_effects(model, sae, latent=12, k=10)
    >>> effects.top_tokens, effects.bottom_tokens        # what the latent promotes / suppresses

This is the direct path only (``W_dec[latent] @ W_U``), ignoring the final norm, as Neuronpedia's
and SAELens's "logit weight" tables do; it is meaningful for dictionaries that write the residual
stream (or an output the stream adds, like ``hook_mlp_out``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from interp.errors import InputError
from interp.sae.modules import SAE


@dataclass
class LogitEffects:
    """``values[v]`` = the logit of token ``v`` added per unit of the latent (direct path)."""

    latent: int
    values: torch.Tensor
    top_ids: list[int]
    top_values: list[float]
    top_tokens: list[str]
    bottom_ids: list[int]
    bottom_values: list[float]
    bottom_tokens: list[str]


def logit_effects(model: Any, sae: SAE, latent: int, *, k: int = 10) -> LogitEffects:
    """The ``k`` tokens whose logits the latent's decoder direction raises most, and lowers most."""
    w_u = getattr(model, "W_U", None)
    if w_u is None:
        raise InputError(
            f"{getattr(model, 'name', 'this model')} has no unembedding, so latents have no logit effects"
        )
    direction = sae.decoder_direction(latent)
    if direction.shape[-1] != w_u.shape[0]:
        raise InputError(
            f"the SAE writes width {direction.shape[-1]} but the unembedding reads d_model={w_u.shape[0]}; "
            "logit effects need a dictionary that writes the residual stream"
        )
    values = (direction.to(w_u) @ w_u).detach().float().cpu()
    k = min(k, values.numel())
    top = torch.topk(values, k)
    bottom = torch.topk(-values, k)
    decode = _decoder(model)
    return LogitEffects(
        latent,
        values,
        top.indices.tolist(),
        top.values.tolist(),
        [decode(i) for i in top.indices.tolist()],
        bottom.indices.tolist(),
        (-bottom.values).tolist(),
        [decode(i) for i in bottom.indices.tolist()],
    )


def _decoder(model: Any):
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        return str
    return lambda i: tokenizer.convert_ids_to_tokens(int(i))
