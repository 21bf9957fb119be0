"""Interventions on graph features, run in the REAL model (not the replacement).

Each transcoder is spliced in with its error term (``interp.sae.splice(use_error_term=True)``): an
untouched layer computes exactly the model's MLP output, and an edited layer outputs its edited
reconstruction plus the unchanged error, i.e. the real MLP output plus ``Δa · W_dec[f]``. Every
later layer (attention patterns, norms, MLPs) is recomputed by the real model, so the logits and
the downstream feature activations returned are the real model's response to the edit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from interp.errors import InputError
from interp.graphs.replacement import check_transcoders, native_core


@dataclass
class InterventionResult:
    """Logits ``[pos, d_vocab]`` and each layer's feature activations ``[pos, d_sae]``, edited and clean."""

    logits: torch.Tensor
    activations: list[torch.Tensor]
    clean_logits: torch.Tensor
    clean_activations: list[torch.Tensor]

    def logit_diff(self, token: int) -> float:
        """Change of one token's last-position logit."""
        return float(self.logits[-1, token] - self.clean_logits[-1, token])


def _check(interventions: Sequence[tuple], transcoders: Sequence[Any], n_pos: int, mode: str) -> None:
    if mode not in ("set", "scale"):
        raise InputError(f"mode={mode!r}: use 'set' (value is the new activation) or 'scale' (multiply it)")
    for item in interventions:
        if len(item) != 4:
            raise InputError(f"each intervention is (layer, pos, feature, value), got {item!r}")
        layer, pos, feature, _ = item
        if not 0 <= int(layer) < len(transcoders):
            raise InputError(f"intervention layer {layer} is out of range [0, {len(transcoders)})")
        if not -n_pos <= int(pos) < n_pos:
            raise InputError(f"intervention position {pos} is out of range for a {n_pos}-token prompt")
        if not 0 <= int(feature) < transcoders[int(layer)].cfg.d_sae:
            raise InputError(
                f"feature {feature} is out of range for the layer-{layer} transcoder (d_sae={transcoders[int(layer)].cfg.d_sae})"
            )


def _run(
    model: Any, transcoders: Sequence[Any], tokens: torch.Tensor, edits: dict[int, list[tuple]], mode: str
):
    from interp.sae.splicing import latent_hook, splice

    seen: list[torch.Tensor | None] = [None] * len(transcoders)

    def make(layer: int):
        def hook(acts: torch.Tensor, ctx: Any) -> torch.Tensor:
            out = acts
            if layer in edits:
                out = acts.clone()
                for _, pos, feature, value in edits[layer]:
                    if mode == "set":
                        out[:, pos, feature] = value
                    else:
                        out[:, pos, feature] = out[:, pos, feature] * value
            seen[layer] = out[0].detach().clone()
            return out

        return hook

    hooks = [(latent_hook(tc), make(i)) for i, tc in enumerate(transcoders)]
    with splice(model, list(transcoders), use_error_term=True):
        logits = model.run_with_hooks(tokens[None], hooks)
    return logits[0].detach(), [s for s in seen if s is not None]


def intervene(
    model: Any,
    transcoders: Sequence[Any],
    prompt: Any,
    interventions: Sequence[tuple[int, int, int, float]],
    *,
    mode: str = "set",
) -> InterventionResult:
    """Set (``mode="set"``) or scale (``mode="scale"``) feature activations and run the real model.

    Args:
        interventions: ``(layer, pos, feature, value)``; all edits apply together in one forward.
        prompt: token ids (or text, with a tokenizer), as for ``attribute``.
    """
    from interp.graphs.attribution import _tokens

    core = native_core(model)
    check_transcoders(core, transcoders)
    tokens = _tokens(model, prompt, int(core.cfg.n_ctx), int(core.cfg.d_vocab))
    _check(interventions, transcoders, len(tokens), mode)
    edits: dict[int, list[tuple]] = {}
    for layer, pos, feature, value in interventions:
        edits.setdefault(int(layer), []).append((int(layer), int(pos), int(feature), float(value)))
    clean_logits, clean_acts = _run(model, transcoders, tokens, {}, mode)
    logits, acts = _run(model, transcoders, tokens, edits, mode)
    return InterventionResult(logits, acts, clean_logits, clean_acts)
