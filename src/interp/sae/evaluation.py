"""``evaluate``: SAELens's ``run_evals`` quantities, under its key names, for any model and dictionary.

Reconstruction and sparsity are accumulated over every real (unpadded) token in float64:

- ``explained_variance`` = 1 - Σ‖x - x̂‖² / Σ‖x - x̄‖², x̄ the mean activation over the evaluated
  tokens (variance about the mean, not about zero); ``mse`` = mean of (x - x̂)² over tokens and dims;
- ``cossim``: mean cosine(x, x̂); ``l2_norm_in`` / ``l2_norm_out``: mean ‖x‖ / ‖x̂‖;
  ``l2_ratio``: mean ‖x̂‖ / ‖x‖ (shrinkage);
- ``l0``: mean number of active latents per token; ``l1``: mean Σ|acts|;
- ``feature_density`` (per latent, fraction of tokens where it is active); ``dead_fraction``:
  density 0; ``dense_fraction``: density above ``dense_threshold``; a log10-density histogram.

For a language model it also splices the dictionary in (reconstruction, no error term), and
ablates the site (zeros, or its mean over the evaluated tokens):
``ce_loss_score = (CE_ablation - CE_sae) / (CE_ablation - CE_clean)`` and
``kl_div_score = (KL_ablation - KL_sae) / KL_ablation`` (KL from the clean run), with
``ce_loss_with_sae``, ``ce_loss_without_sae``, ``ce_loss_with_ablation``, ``kl_div_with_sae``,
``kl_div_with_ablation``. A score is NaN where ablating changes nothing (its denominator is 0).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from interp.errors import InputError
from interp.sae.modules import SAE
from interp.sae.splicing import check_fits, run_with_saes

GROUPS = {
    "reconstruction_quality": ("explained_variance", "mse", "cossim"),
    "shrinkage": ("l2_norm_in", "l2_norm_out", "l2_ratio"),
    "sparsity": ("l0", "l1"),
    "model_behavior_preservation": ("kl_div_score", "kl_div_with_ablation", "kl_div_with_sae"),
    "model_performance_preservation": (
        "ce_loss_score",
        "ce_loss_with_ablation",
        "ce_loss_with_sae",
        "ce_loss_without_sae",
    ),
    "feature_density": ("dead_fraction", "dense_fraction"),
    "token_stats": ("total_tokens_evaluated",),
}


@dataclass
class EvalResult(Mapping[str, float]):
    """Metrics by SAELens key (``result["l0"]``), per-latent density, and what was evaluated."""

    metrics: dict[str, float]
    feature_density: torch.Tensor
    histogram: dict[str, list[float]]
    config: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str) -> float:
        return self.metrics[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.metrics)

    def __len__(self) -> int:
        return len(self.metrics)

    def nested(self) -> dict[str, dict[str, float]]:
        """The metrics grouped as SAELens's ``run_evals`` output groups them."""
        return {g: {k: self.metrics[k] for k in keys if k in self.metrics} for g, keys in GROUPS.items()}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: metrics, densities, histogram and the evaluation settings."""
        return {
            "metrics": dict(self.metrics),
            "feature_density": self.feature_density.tolist(),
            "histogram": self.histogram,
            "config": self.config,
        }


class _Stats:
    """Running float64 sums over tokens."""

    def __init__(self, sae: SAE) -> None:
        d_out, d_sae = sae.cfg.width_out, sae.cfg.d_sae
        self.n = 0
        self.sse = 0.0
        self.sum_sq = 0.0
        self.sum_x = torch.zeros(d_out, dtype=torch.float64)
        self.cos = self.norm_in = self.norm_out = self.ratio = self.l0 = self.l1 = 0.0
        self.fires = torch.zeros(d_sae, dtype=torch.float64)

    def add(self, target: torch.Tensor, recons: torch.Tensor, acts: torch.Tensor) -> None:
        t, r, a = target.double().cpu(), recons.double().cpu(), acts.double().cpu()
        self.n += t.shape[0]
        self.sse += float((t - r).pow(2).sum())
        self.sum_sq += float(t.pow(2).sum())
        self.sum_x += t.sum(0)
        n_in, n_out = t.norm(dim=-1), r.norm(dim=-1)
        self.cos += float(F.cosine_similarity(t, r, dim=-1, eps=1e-12).sum())
        self.norm_in += float(n_in.sum())
        self.norm_out += float(n_out.sum())
        self.ratio += float((n_out / n_in.clamp_min(1e-12)).sum())
        active = a != 0
        self.l0 += float(active.sum())
        self.l1 += float(a.abs().sum())
        self.fires += active.sum(0)

    def metrics(self, dense_threshold: float) -> tuple[dict[str, float], torch.Tensor]:
        n, d = self.n, self.sum_x.numel()
        total_var = self.sum_sq - float(self.sum_x.pow(2).sum()) / n
        density = self.fires / n
        out = {
            "explained_variance": 1.0 - self.sse / total_var if total_var > 0 else math.nan,
            "mse": self.sse / (n * d),
            "cossim": self.cos / n,
            "l2_norm_in": self.norm_in / n,
            "l2_norm_out": self.norm_out / n,
            "l2_ratio": self.ratio / n,
            "l0": self.l0 / n,
            "l1": self.l1 / n,
            "dead_fraction": float((density == 0).double().mean()),
            "dense_fraction": float((density > dense_threshold).double().mean()),
            "total_tokens_evaluated": float(n),
        }
        return out, density


def evaluate(
    model: Any,
    sae: SAE,
    inputs: Any,
    *,
    batch_size: int = 8,
    ablation: str = "zero",
    dense_threshold: float = 0.1,
    model_metrics: bool | None = None,
    bins: int = 50,
) -> EvalResult:
    """Evaluate ``sae`` on ``model`` over ``inputs`` (texts, token ids, or tensor batches for modules).

    Args:
        batch_size: inputs per forward.
        ablation: ``"zero"`` or ``"mean"``: what replaces the site for the CE/KL baselines.
        dense_threshold: a latent active on more than this fraction of tokens counts as dense.
        model_metrics: compute the CE/KL splice scores (default: when the model outputs logits).
        bins: bins of the log10 feature-density histogram.
    """
    if ablation not in ("zero", "mean"):
        raise InputError(f"ablation must be 'zero' or 'mean', got {ablation!r}")
    check_fits(model, sae)
    batches = list(_batches(model, inputs, batch_size))
    stats = _Stats(sae)
    c = sae.cfg
    names = [c.hook_name] + ([c.hook_out] if c.hook_out != c.hook_name else [])
    was_training = sae.training
    sae.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                _, cache = model.run_with_cache(batch, names=names, stop_early=True)
                mask = _mask(cache, cache[c.hook_name])
                # one row per token (or per [batch, instance] entry of a module's activation)
                x = sae.flat(cache[c.hook_name][mask]).reshape(-1, c.d_in).to(sae.device, sae.dtype)
                target = sae.flat(cache[c.hook_out][mask]).reshape(-1, c.width_out).to(sae.device, sae.dtype)
                acts = sae.activation(sae.pre_acts(x))
                stats.add(target, sae.reconstruct(x), acts)
        if stats.n == 0:
            raise InputError("no tokens to evaluate on: pass at least one non-empty input")
        metrics, density = stats.metrics(dense_threshold)
        wants_model = _lm(model) if model_metrics is None else model_metrics
        if wants_model:
            mean = (stats.sum_x / stats.n).float() if ablation == "mean" else None
            metrics.update(_model_metrics(model, sae, batches, mean))
    finally:
        sae.train(was_training)
    histogram = _histogram(density, bins)
    config = {
        "hook_name": c.hook_name,
        "hook_name_out": c.hook_name_out,
        "architecture": c.architecture,
        "d_sae": c.d_sae,
        "ablation": ablation,
        "dense_threshold": dense_threshold,
        "batch_size": batch_size,
        "n_inputs": sum(_n_rows(b) for b in batches),
        "model": getattr(model, "name", None),
    }
    return EvalResult(metrics, density.float(), histogram, config)


def _lm(model: Any) -> bool:
    return getattr(model, "kind", None) == "transformer" and any(
        n in model._sites for n in ("unembed.hook_in", "unembed.hook_out")
    )


def _n_rows(batch: Any) -> int:
    ids = getattr(batch, "input_ids", batch)
    return len(ids)


def _batches(model: Any, inputs: Any, batch_size: int) -> Iterator[Any]:
    """Prepared batches: strings and token rows are grouped ``batch_size`` at a time."""
    if batch_size < 1:
        raise InputError(f"batch_size must be at least 1, got {batch_size}")
    if isinstance(inputs, str):
        inputs = [inputs]
    if isinstance(inputs, Sequence) and inputs and isinstance(inputs[0], str):
        for i in range(0, len(inputs), batch_size):
            yield model.prepare(list(inputs[i : i + batch_size]))
        return
    prepared = model.prepare(inputs)
    ids = getattr(prepared, "input_ids", None)
    if ids is None:  # a tensor batch for a module
        for i in range(0, len(prepared), batch_size):
            yield prepared[i : i + batch_size]
        return
    cls = type(prepared)
    for i in range(0, len(ids), batch_size):
        mask = prepared.attention_mask
        yield cls(ids[i : i + batch_size], None if mask is None else mask[i : i + batch_size])


def _mask(cache: Any, act: torch.Tensor) -> torch.Tensor:
    """Which leading entries of ``act`` are real tokens: ``[batch, pos]`` for transformers, ``[batch]`` else."""
    mask = cache.meta.get("attention_mask")
    if act.ndim >= 3 and "input_ids" in cache.meta:
        if mask is None:
            return torch.ones(act.shape[:2], dtype=torch.bool, device=act.device)
        return mask.bool().to(act.device)
    return torch.ones(act.shape[:1], dtype=torch.bool, device=act.device)


def _token_losses(logits: torch.Tensor, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position next-token CE ``[batch, pos-1]`` and which positions count (both real)."""
    ids = batch.input_ids.to(logits.device)
    logp = logits[:, :-1].float().log_softmax(-1)
    ce = -logp.gather(-1, ids[:, 1:, None])[..., 0]
    mask = batch.attention_mask
    valid = torch.ones_like(ce, dtype=torch.bool) if mask is None else (mask[:, 1:] * mask[:, :-1]).bool()
    return ce, valid.to(ce.device)


def _kl(clean: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    p = clean.float().log_softmax(-1)
    q = other.float().log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1)


def _model_metrics(model: Any, sae: SAE, batches: list[Any], mean: torch.Tensor | None) -> dict[str, float]:
    site = sae.cfg.hook_out

    def ablate(act: torch.Tensor, ctx: Any) -> torch.Tensor:
        return torch.zeros_like(act) if mean is None else mean.to(act).expand_as(act).clone()

    sums = dict.fromkeys(("clean", "sae", "abl", "kl_sae", "kl_abl"), 0.0)
    count = 0
    with torch.no_grad():
        for batch in batches:
            clean = model(batch)
            spliced = run_with_saes(model, batch, [sae], use_error_term=False)
            ablated = model.run_with_hooks(batch, [(site, ablate)])
            ce_clean, valid = _token_losses(clean, batch)
            ce_sae, _ = _token_losses(spliced, batch)
            ce_abl, _ = _token_losses(ablated, batch)
            pos_mask = valid  # KL at the positions CE reads
            sums["clean"] += float(ce_clean[valid].double().sum())
            sums["sae"] += float(ce_sae[valid].double().sum())
            sums["abl"] += float(ce_abl[valid].double().sum())
            sums["kl_sae"] += float(_kl(clean[:, :-1], spliced[:, :-1])[pos_mask].double().sum())
            sums["kl_abl"] += float(_kl(clean[:, :-1], ablated[:, :-1])[pos_mask].double().sum())
            count += int(valid.sum())
    if count == 0:
        raise InputError("CE scores need inputs of at least 2 tokens")
    ce_clean, ce_sae, ce_abl = (sums[k] / count for k in ("clean", "sae", "abl"))
    kl_sae, kl_abl = sums["kl_sae"] / count, sums["kl_abl"] / count
    return {
        "ce_loss_without_sae": ce_clean,
        "ce_loss_with_sae": ce_sae,
        "ce_loss_with_ablation": ce_abl,
        "ce_loss_score": (ce_abl - ce_sae) / (ce_abl - ce_clean) if ce_abl != ce_clean else math.nan,
        "kl_div_with_sae": kl_sae,
        "kl_div_with_ablation": kl_abl,
        "kl_div_score": (kl_abl - kl_sae) / kl_abl if kl_abl != 0 else math.nan,
    }


def _histogram(density: torch.Tensor, bins: int) -> dict[str, list[float]]:
    """Counts of log10(density) for live latents, with bin edges; dead latents are counted apart."""
    live = density[density > 0]
    if live.numel() == 0:
        return {"edges": [], "counts": [], "dead": int(density.numel())}
    logs = live.log10().float()
    low, high = float(logs.min()), float(logs.max())
    if high == low:
        high = low + 1e-6
    counts = torch.histc(logs, bins=bins, min=low, max=high)
    edges = torch.linspace(low, high, bins + 1)
    return {"edges": edges.tolist(), "counts": counts.tolist(), "dead": int((density == 0).sum())}
