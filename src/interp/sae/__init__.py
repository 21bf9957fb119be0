"""Sparse dictionaries: SAEs and transcoders in SAELens's format, spliced in as hook points.

>>> from interp import sae as S
>>> sae = S.load("path/to/sae")                      # cfg.json + sae_weights.safetensors
>>> with model.saes([sae]):                          # latents are hook names now
...     out, cache = model.run_with_cache(text, names=f"{sae.cfg.hook_name}.hook_sae_acts_post")
>>> S.evaluate(model, sae, texts)["explained_variance"]
>>> sae = S.train(model, "blocks.0.hook_resid_post", texts, arch="topk", d_sae=512, k=16)
"""

from __future__ import annotations

from interp.sae.analysis import LogitEffects, logit_effects
from interp.sae.config import ARCHITECTURES, SAEConfig
from interp.sae.evaluation import EvalResult, evaluate
from interp.sae.io import load, save
from interp.sae.modules import HOOK_POINTS, SAE
from interp.sae.splicing import (
    check_fits,
    latent_hook,
    run_with_cache_with_saes,
    run_with_saes,
    splice,
    steering_hook,
)
from interp.sae.training import TRAINABLE, TrainConfig, train

__all__ = [
    "ARCHITECTURES",
    "EvalResult",
    "HOOK_POINTS",
    "LogitEffects",
    "SAE",
    "SAEConfig",
    "TRAINABLE",
    "TrainConfig",
    "check_fits",
    "evaluate",
    "latent_hook",
    "load",
    "logit_effects",
    "run_with_cache_with_saes",
    "run_with_saes",
    "save",
    "splice",
    "steering_hook",
    "train",
]
