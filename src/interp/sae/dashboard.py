"""Feature dashboards: what one latent of a dictionary responds to, and what it does to the output.

    >>> stats = S.latent_stats(model, sae, texts)              # every latent, one streamed pass
    >>> stats.order("density")[:10]                            # the densest latents
    >>> dash = S.dashboard(model, sae, 12, texts, k=10, context=8)
    >>> dash.density, dash.histogram, dash.examples[0].tokens, dash.logit_effects
    >>> change = S.intervene(model, sae, "The cat sat", latent=12, alpha=4.0)   # steer, before/after
    >>> change.top_before, change.top_after                    # LMs: next-token predictions

What each piece is:

- **top examples**: the ``k`` inputs whose largest activation of the latent is largest, from the
  streamed top-k of ``interp.methods.examples.top_k`` on ``<hook_name>.hook_sae_acts_post`` while
  the SAE is spliced (with its error term, so the model is unchanged). Each keeps the tokens around
  its best token (``context`` either side) and the latent's value at each of them. Examples where
  the latent never fires are left out (their order would be arbitrary).
- **density**: the fraction of tokens (of examples, for a model without a token axis) where the
  latent is non-zero, as ``S.evaluate``'s ``feature_density``; padding is never counted (the
  capture keeps each example's real tokens only). Every axis before the latent axis counts as a
  token axis: at a hook with more (a TMS model's ``[batch, instance, d]``), each instance of each
  example is one "token", all instances pooled.
- **histogram**: counts of the latent's non-zero activations over ``bins`` equal bins from 0 to its
  largest activation; the counts sum to the number of active tokens.
- **logit effects**: ``S.logit_effects``: the decoder direction through the unembedding
  (``W_dec[latent] @ W_U``, the direct path). They exist only for a model with an unembedding and a
  dictionary that writes the residual stream's width; otherwise ``logit_effects`` is None and
  ``logit_note`` says why. An encoder such as MiniLM (a sentence-embedding model, no MLM head)
  has no unembedding, so it has no logit effects: its latents are read by their examples, and by
  ``intervene``'s change of the output hidden states.

Everything streams through ``interp.capture_to_disk`` (bounded memory, resumable); pass one
``out_dir`` (and one ``batch_size``) to ``latent_stats`` and ``dashboard`` and the capture is made
once and reused for every latent.
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from einops import rearrange

from interp.errors import InputError
from interp.sae.analysis import LogitEffects, logit_effects
from interp.sae.modules import SAE
from interp.sae.splicing import check_fits, latent_hook, steering_hook

Progress = Callable[[int, int], None]
ORDERS = ("density", "max_activation", "mean_activation")


# ------------------------------------------------------------------------------------------------
# Every latent at once
# ------------------------------------------------------------------------------------------------


@dataclass
class LatentStats:
    """Per-latent statistics over a dataset, for browsing a dictionary.

    Attributes:
        density: ``[d_sae]`` fraction of tokens where the latent is non-zero.
        max_activation: ``[d_sae]`` its largest activation (0 for a latent that never fires).
        mean_activation: ``[d_sae]`` its mean over the tokens where it fires (0 if it never does).
        n_tokens: tokens seen (examples, for a model without a token axis); ``n_examples``: inputs.
        hook: the latent hook read.
    """

    density: torch.Tensor
    max_activation: torch.Tensor
    mean_activation: torch.Tensor
    n_tokens: int
    n_examples: int
    hook: str

    def order(self, by: str = "density", *, descending: bool = True) -> list[int]:
        """Latent indices sorted by ``by`` (one of ``ORDERS``), ties in index order."""
        if by not in ORDERS:
            raise InputError(f"order latents by one of {', '.join(ORDERS)}, got {by!r}")
        values = getattr(self, by)
        return torch.argsort(values, descending=descending, stable=True).tolist()

    @property
    def dead(self) -> int:
        """How many latents never fired on this data."""
        return int((self.density == 0).sum())

    def rows(self, latents: Sequence[int]) -> dict[str, list]:
        """A table (column -> values) of ``latents``, for a dataframe."""
        index = torch.as_tensor(list(latents), dtype=torch.long)
        return {
            "latent": index.tolist(),
            "density": self.density[index].tolist(),
            "max activation": self.max_activation[index].tolist(),
            "mean when active": self.mean_activation[index].tolist(),
        }


def latent_stats(
    model: Any,
    sae: SAE,
    inputs: Any,
    *,
    batch_size: int = 16,
    out_dir: str | os.PathLike | None = None,
    progress: bool = False,
    callback: Progress | None = None,
) -> LatentStats:
    """Density, max and mean activation of every latent of ``sae`` over ``inputs``, in one
    streamed pass (one capture of the latent hook, read back ``batch_size`` examples at a time).

    Args:
        model, sae: the model and a dictionary that fits it (``S.check_fits``).
        inputs: what ``interp.capture_to_disk`` takes (texts, token ids, tensors).
        batch_size: examples per forward and per read-back chunk.
        out_dir: where the capture lives, in a subfolder named by a hash of the dictionary's
            weights (reused when it already holds it, never by another dictionary); default a
            temporary folder deleted afterwards.
        progress: a tqdm bar during the capture; ``callback(done, total)`` after each chunk read.
    """
    check_fits(model, sae)
    hook = latent_hook(sae)
    with _capture(model, sae, inputs, batch_size, out_dir, progress) as (ds, _):
        d = sae.cfg.d_sae
        fires = torch.zeros(d, dtype=torch.float64)
        total = torch.zeros(d, dtype=torch.float64)
        peak = torch.zeros(d, dtype=torch.float64)
        tokens = 0
        for acts, done, n in _chunks(ds, hook, batch_size, d):
            active = acts != 0
            fires += active.sum(0)
            total += acts.sum(0, dtype=torch.float64)
            peak = torch.maximum(peak, acts.amax(0).double()) if len(acts) else peak
            tokens += len(acts)
            if callback is not None:
                callback(done, n)
        n_examples = len(ds)
    if tokens == 0:
        raise InputError("the inputs hold no tokens; give at least one non-empty example")
    mean = torch.where(fires > 0, total / fires.clamp(min=1), torch.zeros_like(total))
    return LatentStats((fires / tokens).float(), peak.float(), mean.float(), tokens, n_examples, hook)


# ------------------------------------------------------------------------------------------------
# One latent
# ------------------------------------------------------------------------------------------------


@dataclass
class Example:
    """One top example of a latent: ``tokens[j]`` is token ``offset + j`` of input ``index``,
    ``values[j]`` the latent there; ``position`` is where it peaks (``score``). For a model without
    a token axis, ``tokens``/``values`` are None and ``position`` is 0."""

    index: int
    score: float
    position: int
    offset: int
    tokens: list[str] | None
    values: list[float] | None


@dataclass
class LatentDashboard:
    """Everything a dashboard shows for one latent (see the module docstring)."""

    latent: int
    hook: str
    examples: list[Example]
    density: float
    n_active: int
    n_tokens: int
    max_activation: float
    histogram: dict[str, list[float]]
    logit_effects: LogitEffects | None
    logit_note: str | None
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def dead(self) -> bool:
        """True when the latent never fired on the data."""
        return self.n_active == 0


def dashboard(
    model: Any,
    sae: SAE,
    latent: int,
    inputs: Any,
    *,
    k: int = 10,
    context: int | None = 8,
    bins: int = 30,
    logit_k: int = 10,
    batch_size: int = 16,
    out_dir: str | os.PathLike | None = None,
    progress: bool = False,
    callback: Progress | None = None,
) -> LatentDashboard:
    """The dashboard of ``latent``: top examples with context, density, histogram, logit effects.

    Args:
        model, sae: the model and a dictionary that fits it.
        latent: the latent's index (``0 <= latent < d_sae``).
        inputs: the dataset (what ``interp.capture_to_disk`` takes).
        k: top examples; ``context``: tokens kept either side of each example's peak (None: all).
        bins: histogram bins; ``logit_k``: tokens listed each way in the logit effects.
        batch_size, out_dir, progress, callback: as for ``latent_stats`` (share ``out_dir`` and
            ``batch_size`` with it to capture once).
    """
    from interp.methods.examples import top_k

    check_fits(model, sae)
    _check_latent(sae, latent)
    _positive("k", k)
    _positive("bins", bins)
    if context is not None and (not isinstance(context, int) or context < 0):
        raise InputError(f"context must be a non-negative integer or None, got {context!r}")
    hook = latent_hook(sae)
    effects, note = _logit_effects(model, sae, latent, logit_k)
    with _capture(model, sae, inputs, batch_size, out_dir, progress) as (ds, where):
        with model.saes([sae], use_error_term=True):  # reuses the capture made just above
            top = top_k(model, inputs, hook, units=[latent], k=k, batch_size=batch_size, out_dir=where)
        peak = float(top.scores[0, 0])
        counts, n_active, n_tokens = _histogram(ds, hook, latent, peak, bins, batch_size, callback)
    edges = np.linspace(0.0, peak, bins + 1) if n_active else np.zeros(0)
    counts = counts if n_active else []  # a dead latent has no histogram
    examples = _examples(top, context)
    return LatentDashboard(
        latent,
        hook,
        examples,
        n_active / n_tokens if n_tokens else math.nan,
        n_active,
        n_tokens,
        peak if n_active else 0.0,
        {"edges": edges.tolist(), "counts": counts},
        effects,
        note,
        {"k": k, "context": context, "bins": bins, "batch_size": batch_size, "n_examples": len(ds)},
    )


def _logit_effects(model: Any, sae: SAE, latent: int, k: int) -> tuple[LogitEffects | None, str | None]:
    """The latent's logit effects, or None and why they do not exist for this model/dictionary."""
    if sae.cfg.reshape_activations == "hook_z":
        return None, (
            "this dictionary writes attention heads' z (before W_O), not the residual stream, "
            "so its decoder directions have no direct path to the logits"
        )
    try:
        return logit_effects(model, sae, latent, k=k), None
    except InputError as err:
        return None, str(err)


def _examples(top: Any, context: int | None) -> list[Example]:
    out = []
    for rank, (index, score) in enumerate(zip(top.indices[0].tolist(), top.scores[0].tolist(), strict=True)):
        if not score > 0:  # the latent never fires there: no order among such examples
            continue
        values = top.maps[0][rank]
        if top.str_tokens is None or values is None:
            out.append(Example(int(index), float(score), 0, 0, None, None))
            continue
        values = np.asarray(values, dtype=float)
        peak = int(np.argmax(values))
        lo = 0 if context is None else max(0, peak - context)
        hi = len(values) if context is None else min(len(values), peak + context + 1)
        tokens = [str(t) for t in top.str_tokens[0][rank]]
        out.append(Example(int(index), float(score), peak, lo, tokens[lo:hi], values[lo:hi].tolist()))
    return out


def _histogram(
    ds: Any, hook: str, latent: int, peak: float, bins: int, batch_size: int, callback: Progress | None
) -> tuple[list[int], int, int]:
    """Streamed counts of the latent's non-zero values over ``bins`` bins of ``[0, peak]``."""
    counts = torch.zeros(bins, dtype=torch.long)
    active = tokens = 0
    for acts, done, n in _chunks(ds, hook, batch_size, None, column=latent):
        values = acts[acts != 0].double()
        tokens += len(acts)
        active += len(values)
        if len(values) and peak > 0:
            where = (values / peak * bins).floor().long().clamp(0, bins - 1)  # the last bin is closed
            counts += torch.bincount(where, minlength=bins)
        if callback is not None:
            callback(done, n)
    return counts.tolist(), active, tokens


# ------------------------------------------------------------------------------------------------
# Splice or steer: the output before and after
# ------------------------------------------------------------------------------------------------


@dataclass
class Intervention:
    """The model's output on one input without the dictionary (before) and with it (after).

    ``mode`` is ``"splice"`` (the activation replaced by the dictionary's output) or ``"steer"``
    (``alpha`` added to ``latent`` at every position, with the error term kept, so the change is
    exactly ``alpha * W_dec[latent]`` at the hook). ``error_term``: whether the error was kept.

    Language models (``kind="logits"``), at the last position: ``top_before``/``top_after`` the
    ``k`` most likely next tokens ``(token, probability)``; ``raised``/``lowered`` the tokens whose
    logit changed most each way ``(token, change)``; ``kl`` KL(before || after) in nats;
    ``predictions`` a table (``token``, ``before``, ``after`` probabilities) of the tokens in
    either top-k list, for a side-by-side view.

    Other models (``kind="hidden"``, e.g. the MiniLM encoder, whose output is the last hidden
    state): ``cosine[i]`` the cosine between the output vectors at token ``i`` before and after,
    and ``pooled_cosine`` that of their means over tokens (the sentence embedding MiniLM is
    trained to produce); ``relative_change[i]`` is ``|after - before| / |before|`` at token ``i``.
    """

    mode: str
    kind: str
    latent: int | None
    alpha: float
    error_term: bool
    tokens: list[str]
    before: torch.Tensor
    after: torch.Tensor
    top_before: list[tuple[str, float]] = field(default_factory=list)
    top_after: list[tuple[str, float]] = field(default_factory=list)
    raised: list[tuple[str, float]] = field(default_factory=list)
    lowered: list[tuple[str, float]] = field(default_factory=list)
    kl: float | None = None
    predictions: dict[str, list] = field(default_factory=dict)
    cosine: list[float] = field(default_factory=list)
    pooled_cosine: float | None = None
    relative_change: list[float] = field(default_factory=list)


def intervene(
    model: Any,
    sae: SAE,
    inputs: Any,
    *,
    latent: int | None = None,
    alpha: float = 0.0,
    use_error_term: bool | None = None,
    k: int = 10,
) -> Intervention:
    """Run one input plainly and with ``sae`` spliced (or a latent steered); compare the outputs.

    Args:
        inputs: one text (or one row of token ids).
        latent: None splices the dictionary in (default without its error term: the model then
            runs on the reconstruction, showing what the dictionary misses); an index steers that
            latent by ``alpha`` (default with the error term, so only the steering changes anything).
        use_error_term: override the default above.
        k: tokens listed in each table (language models).
    """
    from interp.methods.patching import has_logits

    check_fits(model, sae)
    _positive("k", k)
    if latent is not None:
        _check_latent(sae, latent)
    if not isinstance(alpha, int | float) or not math.isfinite(alpha):
        raise InputError(f"alpha must be a finite number, got {alpha!r}")
    prepared = model.prepare(inputs)
    ids = getattr(prepared, "input_ids", None)
    if ids is not None and ids.shape[0] != 1:
        raise InputError(f"intervene compares one input; got a batch of {ids.shape[0]}. Pass one text.")
    error_term = (latent is not None) if use_error_term is None else bool(use_error_term)
    hooks = [] if latent is None else [(latent_hook(sae), steering_hook(latent, float(alpha)))]
    before = model.run_with_hooks(inputs).detach()
    after = model.run_with_saes(inputs, [sae], use_error_term=error_term, hooks=hooks).detach()
    strs = list(getattr(prepared, "str_tokens", [[]])[0]) if ids is not None else []
    mode = "splice" if latent is None else "steer"
    result = Intervention(mode, "logits", latent, float(alpha), error_term, strs, before, after)
    if has_logits(model):
        _compare_logits(model, result, k)
    else:
        _compare_hidden(result)
    return result


def _compare_logits(model: Any, result: Intervention, k: int) -> None:
    from interp.sae.analysis import _decoder

    decode = _decoder(model)
    before, after = result.before[0, -1].double(), result.after[0, -1].double()
    k = min(k, before.numel())

    def top(logits: torch.Tensor) -> list[tuple[str, float]]:
        probs = logits.softmax(-1)
        best = torch.topk(probs, k)
        return [
            (decode(i), float(p)) for i, p in zip(best.indices.tolist(), best.values.tolist(), strict=True)
        ]

    change = after - before
    up, down = torch.topk(change, k), torch.topk(-change, k)
    result.top_before, result.top_after = top(before), top(after)
    result.raised = [
        (decode(i), float(v)) for i, v in zip(up.indices.tolist(), up.values.tolist(), strict=True)
    ]
    result.lowered = [
        (decode(i), -float(v)) for i, v in zip(down.indices.tolist(), down.values.tolist(), strict=True)
    ]
    logp, logq = before.log_softmax(-1), after.log_softmax(-1)
    result.kl = float((logp.exp() * (logp - logq)).sum())
    ids = list(dict.fromkeys(torch.topk(before, k).indices.tolist() + torch.topk(after, k).indices.tolist()))
    result.predictions = {
        "token": [decode(i) for i in ids],
        "before": logp.exp()[ids].tolist(),
        "after": logq.exp()[ids].tolist(),
    }


def _compare_hidden(result: Intervention) -> None:
    result.kind = "hidden"
    before = result.before[0].double().reshape(-1, result.before.shape[-1])
    after = result.after[0].double().reshape(-1, result.after.shape[-1])
    result.cosine = torch.nn.functional.cosine_similarity(before, after, dim=-1).tolist()
    result.relative_change = ((after - before).norm(dim=-1) / before.norm(dim=-1).clamp(min=1e-12)).tolist()
    result.pooled_cosine = float(torch.nn.functional.cosine_similarity(before.mean(0), after.mean(0), dim=0))


# ------------------------------------------------------------------------------------------------
# Internals
# ------------------------------------------------------------------------------------------------


@contextmanager
def _capture(
    model: Any, sae: SAE, inputs: Any, batch_size: int, out_dir: str | os.PathLike | None, progress: bool
) -> Iterator[tuple[Any, Path]]:
    """The latent hook captured over ``inputs`` with the SAE spliced (error term kept, so the model
    computes what it computes without it), and the folder it lives in."""
    from interp.store import capture_to_disk

    with tempfile.TemporaryDirectory(prefix="interp-sae-dash-") as tmp:
        where = Path(out_dir) / f"sae-{_weights_digest(sae)}" if out_dir is not None else Path(tmp)
        with model.saes([sae], use_error_term=True):
            ds = capture_to_disk(
                model, inputs, [latent_hook(sae)], where, batch_size=batch_size, progress=progress
            )
        yield ds, where


def _weights_digest(sae: SAE) -> str:
    """A short hash of the dictionary's weights. The store's resume check names the hook, not the
    weights, so a shared ``out_dir`` keeps each dictionary's capture in its own subfolder: another
    dictionary of the same shape at the same hook never reads this one's latents."""
    digest = hashlib.sha256()
    for name, tensor in sorted(sae.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _chunks(
    ds: Any, hook: str, batch_size: int, width: int | None, column: int | None = None
) -> Iterator[tuple[torch.Tensor, int, int]]:
    """The capture ``batch_size`` examples at a time, as ``[tokens, d_sae]`` (or ``[tokens]`` for one
    latent ``column``), with how many examples are done of how many."""
    n = len(ds)
    view = ds.select_columns([hook])
    for start in range(0, n, batch_size):
        rows = view[start : start + batch_size][hook]
        rows = list(rows) if not isinstance(rows, torch.Tensor) else list(rows.unbind(0))
        flat = [rearrange(r.float(), "... d -> (...) d") if r.ndim > 1 else r.float()[None] for r in rows]
        acts = torch.cat(flat) if flat else torch.zeros(0, width or 1)
        yield (acts if column is None else acts[:, column]), min(start + batch_size, n), n


def _check_latent(sae: SAE, latent: Any) -> None:
    d = sae.cfg.d_sae
    if isinstance(latent, bool) or not isinstance(latent, int | np.integer) or not 0 <= int(latent) < d:
        raise InputError(f"latent {latent!r} is out of range: this dictionary has {d} latents (0-{d - 1})")


def _positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name} must be a positive integer, got {value!r}")
