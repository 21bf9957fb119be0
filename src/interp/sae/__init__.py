"""Sparse dictionaries: SAEs and transcoders in SAELens's format, spliced in as hook points.

>>> from interp import sae as S
>>> sae = S.load("path/to/sae")                      # cfg.json + sae_weights.safetensors
>>> with model.saes([sae]):                          # latents are hook names now
...     out, cache = model.run_with_cache(text, names=f"{sae.cfg.hook_name}.hook_sae_acts_post")
>>> S.evaluate(model, sae, texts)["explained_variance"]
>>> sae = S.train(model, "blocks.0.hook_resid_post", texts, arch="topk", d_sae=512, k=16)

Pieces for dashboards and analyses (all work on any spliced latent, by its hook name):

- top activating examples: ``interp.methods.examples.top_k(model, texts, S.latent_hook(sae),
  units=[i])`` inside ``with model.saes([sae]):``;
- density and its histogram: ``S.evaluate(...).feature_density`` / ``.histogram`` (``.to_dict()``
  is JSON-ready; ``.nested()`` groups the metrics as SAELens's ``run_evals``);
- logit effects: ``S.logit_effects(model, sae, i)``;
- steering: ``model.run_with_saes(x, [sae], use_error_term=True,
  hooks=[(S.latent_hook(sae), S.steering_hook(i, alpha))])``;
- patching / attribution patching / ablation per latent and position: ``site="sae_latent"``;
- what a dictionary was trained on and how: ``sae.cfg.metadata["training"]`` (seed, config, data);
- a whole dashboard: ``S.dashboard(model, sae, i, texts)`` (top examples with context, density,
  histogram, logit effects), every latent's density and max in one pass: ``S.latent_stats``, and
  the output before/after splicing or steering: ``S.intervene`` (figures in ``interp.viz``);
- the shipped dictionaries: ``S.zoo_names()``, each loading as ``S.load("zoo:NAME")``.
"""

from __future__ import annotations

from interp.sae.analysis import LogitEffects, logit_effects
from interp.sae.config import ARCHITECTURES, SAEConfig
from interp.sae.dashboard import (
    Example,
    Intervention,
    LatentDashboard,
    LatentStats,
    dashboard,
    intervene,
    latent_stats,
)
from interp.sae.evaluation import EvalResult, evaluate
from interp.sae.io import load, save, zoo_names
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
    "Example",
    "HOOK_POINTS",
    "Intervention",
    "LatentDashboard",
    "LatentStats",
    "LogitEffects",
    "SAE",
    "SAEConfig",
    "TRAINABLE",
    "TrainConfig",
    "check_fits",
    "dashboard",
    "evaluate",
    "intervene",
    "latent_hook",
    "latent_stats",
    "load",
    "logit_effects",
    "run_with_cache_with_saes",
    "run_with_saes",
    "save",
    "splice",
    "steering_hook",
    "train",
    "zoo_names",
]
