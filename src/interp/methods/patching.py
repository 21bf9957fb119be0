"""Batched activation patching: many patches per forward pass, one result type for every method.

TransformerLens 4.3's ``patching`` runs one full forward per patched (layer, position, head). Here the
clean and corrupted runs share one forward, then each forward carries K copies of the base input
along the batch axis; copy ``k`` replaces exactly one unit (a position, a head, a neuron...) through
a boolean mask in the hook of its layer. The copies are identical until that hook, so the model
runs once up to it and the copies are stacked there (``HookedModel.run_copies``; on a head sweep,
the q/k/v projections and attention pattern of the patched layer also run once). On causal models
a forward whose patches all lie at positions >= s runs positions s.. only, the earlier ones taken
from the corrupted run's keys and values (``interp.models.suffix``, checked on the model first), and
a forward of patches in the last block, after which nothing mixes positions (head outputs,
queries, pattern rows), runs only each copy's patched position from the residual stream on
(``_local_stream``, checked too). K comes from the memory budget, so a sweep of any size runs in
bounded memory.

    >>> from interp.methods import patching as P
    >>> result = P.patch(model, clean, corrupted, site="head_pos", metric=P.logit_diff(7, 3))
    >>> result.values.shape, result.dims          # (n_layers, n_pos, n_heads), ("layer", "pos", "head")
    >>> result.normalized().figure()
    >>> P.patch(model, clean, corrupted, "head_q_pos", metric)          # also head_k/v_pos, head_pattern_pos
    >>> P.patch_every(model, clean, corrupted, "head_pos", metric)      # [component, layer, pos, head]
    >>> P.patch_subspace(model, clean, corrupted, "blocks.1.hook_resid_pre", basis, metric)  # basis [d, k]

TransformerLens 4.3 names: ``get_act_patch_attn_head_{out,q,k,v}_all_pos`` = sites ``head``,
``head_q``, ``head_k``, ``head_v``; ``..._by_pos`` = ``head_pos``, ``head_q_pos``...;
``get_act_patch_attn_head_pattern_all_pos`` / ``_by_pos`` / ``_dest_src_pos`` = ``head_pattern`` /
``head_pattern_pos`` ([layer, head, dest_pos]) / ``head_pattern_dest_src``; ``get_act_patch_block_every``,
``..._attn_head_all_pos_every``, ``..._by_pos_every`` = ``patch_every(family="block" | "head" | "head_pos")``.

The same engine runs ablations (:mod:`interp.methods.ablation`) and path patching
(:mod:`interp.methods.path_patching`); attribution patching and DLA return the same ``PatchResult``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from itertools import product
from typing import Any

import torch
from einops import rearrange
from torch import nn
from tqdm.auto import tqdm

from interp.checks import finite_checks_on, require_finite
from interp.errors import CaptureTooLargeError, InputError, UnknownHookError, closest
from interp.hooks import HookPoint, concrete_numel, default_memory_budget, layer_of
from interp.models.base import HookedModel

Progress = Callable[[int, int], None]  # (done, total): e.g. the explorer's st.progress
MAX_COPIES = 256  # more copies per forward stop paying off on CPU and only cost memory
UNEMBED_INPUT = "unembed.hook_in"  # where a sweep keeps only the positions its metric reads


# ------------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------------


class Metric:
    """A number computed from a forward's output, for patched and unpatched runs alike.

    ``__call__(output[batch, ...]) -> scalar`` is the per-run form (what TransformerLens's
    ``patching_metric`` is); ``batched(output[copies, batch, ...]) -> [copies]`` evaluates K patched
    copies at once. ``bind`` gives a metric the clean and corrupted outputs before a sweep (KL and
    cosine compare against the clean run).
    """

    name = "metric"

    def bind(self, clean: torch.Tensor, corrupted: torch.Tensor, mask: torch.Tensor | None) -> Metric:
        return self

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        return self.batched(output.unsqueeze(0))[0]

    def batched(self, output: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def positions_read(self) -> torch.Tensor | None:
        """``[batch]``: the one output position per prompt the metric reads, if it reads only that
        (then sweeps compute the unembedding there alone); None if it may read any position."""
        return None

    def at_kept_positions(self) -> Metric:
        """The same metric on outputs that keep only ``positions_read()`` (one position per prompt)."""
        raise NotImplementedError

    def vocab_read(self) -> list[int] | None:
        """The logit columns (vocabulary ids) the metric reads at ``positions_read()``, if only a few:
        sweeps then compute the unembedding for those columns alone (``at_vocab``). None: any."""
        return None

    def at_vocab(self, ids: list[int]) -> Metric:
        """The same metric on logits that hold only the columns ``ids``, in that order."""
        raise NotImplementedError

    def positions_used(self) -> list[int] | None:
        """The output positions (the same for every prompt) the metric may read, or None for any.
        A sweep takes the unpatched run's value for a patch that changes no other position (checked:
        ``_local_stream``) at a position outside them, without running it."""
        kept = self.positions_read()
        return None if kept is None else sorted(set(kept.tolist()))


def _last_index(
    pos: int | Sequence[int] | torch.Tensor, mask: torch.Tensor | None, batch: int
) -> torch.Tensor:
    """Per-prompt position; ``-1`` means each prompt's last real (unpadded) token."""
    if isinstance(pos, int) and pos == -1 and mask is not None:
        return mask.long().sum(-1).cpu() - 1
    return torch.as_tensor(pos).long().expand(batch).cpu()


def _token_ids(tokens: int | Sequence[int] | torch.Tensor, batch: int) -> torch.Tensor:
    ids = torch.as_tensor(tokens).long().reshape(-1)
    if ids.numel() not in (1, batch):
        raise InputError(f"answer tokens: give one id or one per prompt ({batch}), got {ids.numel()}")
    return ids.expand(batch) if ids.numel() == 1 else ids


def _check_vocab(ids: torch.Tensor, vocab: int, what: str) -> None:
    """InputError for a token id the logits have no entry for (before torch's IndexError)."""
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise InputError(
            f"{what} token id(s) {sorted({int(i) for i in ids if not 0 <= int(i) < vocab})[:5]} are outside "
            f"the vocabulary [0, {vocab}); use model.to_tokens(...) to get valid ids"
        )


@dataclass
class _AtPosition(Metric):
    """Shared by the logit metrics: read the output at one position per prompt."""

    pos: int | Sequence[int] | torch.Tensor = -1
    _index: torch.Tensor | None = field(default=None, repr=False)

    def bind(self, clean, corrupted, mask):
        return replace(self, _index=_last_index(self.pos, mask, clean.shape[0]))

    def positions_read(self) -> torch.Tensor | None:
        return self._index

    def at_kept_positions(self) -> Metric:
        return replace(self, pos=0, _index=torch.zeros_like(self._index))

    def _at(self, output: torch.Tensor) -> torch.Tensor:
        """``output[copies, batch, pos, vocab]`` -> ``[copies, batch, vocab]``."""
        if output.ndim != 4:
            raise InputError(
                f"{self.name} reads logits [batch, pos, vocab]; this model outputs shape "
                f"{tuple(output.shape[1:])}. Use a metric for hidden states (e.g. cosine()) or your own function."
            )
        index = self._index if self._index is not None else _last_index(self.pos, None, output.shape[1])
        n_pos = output.shape[2]
        if index.numel() and (int(index.min()) < -n_pos or int(index.max()) >= n_pos):
            raise InputError(
                f"{self.name} reads position {self.pos} but the prompts have {n_pos} tokens; "
                f"pass pos in [-{n_pos}, {n_pos})"
            )
        rows = torch.arange(output.shape[1])
        return output[:, rows, index.to(output.device)]


@dataclass
class LogitDiff(_AtPosition):
    """logit[correct] - logit[incorrect] at ``pos``, averaged over prompts."""

    correct: Any = 0
    incorrect: Any = 0
    name = "logit diff"

    def batched(self, output):
        logits = self._at(output)
        batch = logits.shape[1]
        rows = torch.arange(batch)
        good, bad = _token_ids(self.correct, batch), _token_ids(self.incorrect, batch)
        _check_vocab(good, logits.shape[-1], "correct")
        _check_vocab(bad, logits.shape[-1], "incorrect")
        return (logits[:, rows, good] - logits[:, rows, bad]).mean(-1)

    def vocab_read(self) -> list[int] | None:
        if self._index is None:
            return None
        batch = len(self._index)
        ids = torch.cat([_token_ids(self.correct, batch), _token_ids(self.incorrect, batch)])
        return sorted(set(ids.tolist()))

    def at_vocab(self, ids: list[int]) -> Metric:
        column = {token: i for i, token in enumerate(ids)}
        batch = len(self._index)
        good, bad = _token_ids(self.correct, batch), _token_ids(self.incorrect, batch)
        return replace(self, correct=[column[int(t)] for t in good], incorrect=[column[int(t)] for t in bad])


@dataclass
class Prob(_AtPosition):
    """Probability of ``token`` at ``pos``, averaged over prompts."""

    token: Any = 0
    name = "probability"

    def batched(self, output):
        probs = self._at(output).softmax(-1)
        rows = torch.arange(probs.shape[1])
        ids = _token_ids(self.token, probs.shape[1])
        _check_vocab(ids, probs.shape[-1], "token")
        return probs[:, rows, ids].mean(-1)


@dataclass
class KL(_AtPosition):
    """KL(clean || patched) of the next-token distribution at ``pos``, averaged over prompts."""

    name = "KL from clean"
    _clean: torch.Tensor | None = field(default=None, repr=False)

    def bind(self, clean, corrupted, mask):
        bound = super().bind(clean, corrupted, mask)
        bound._clean = bound._at(clean.unsqueeze(0))[0].log_softmax(-1)
        return bound

    def batched(self, output):
        if self._clean is None:
            raise InputError(
                "kl() compares against the clean run; call it through patch()/attribution_patch()"
            )
        logp = self._at(output).log_softmax(-1)
        return (self._clean.exp() * (self._clean - logp)).sum(-1).mean(-1)


@dataclass
class Cosine(Metric):
    """Cosine similarity of the mean-pooled output (e.g. a sentence embedding) to the clean run's."""

    name = "cosine to clean"
    _clean: torch.Tensor | None = field(default=None, repr=False)
    _mask: torch.Tensor | None = field(default=None, repr=False)

    def _pool(self, output: torch.Tensor) -> torch.Tensor:
        """``[copies, batch, pos, d]`` -> ``[copies, batch, d]`` (mean over real tokens)."""
        if self._mask is None:
            return output.mean(-2)
        weights = self._mask.to(output.dtype).to(output.device)[None, :, :, None]
        return (output * weights).sum(-2) / weights.sum(-2)

    def bind(self, clean, corrupted, mask):
        bound = replace(self, _mask=mask)
        bound._clean = bound._pool(clean.unsqueeze(0))[0]
        return bound

    def batched(self, output):
        if self._clean is None:
            raise InputError("cosine() compares against the clean run; call it through patch()")
        return torch.nn.functional.cosine_similarity(self._pool(output), self._clean, dim=-1).mean(-1)


class UserMetric(Metric):
    """Your function ``fn(output[batch, ...]) -> scalar``, called once per patch."""

    def __init__(self, fn: Callable[[torch.Tensor], Any]) -> None:
        self.fn = fn
        self.name = getattr(fn, "__name__", "metric")

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        value = self.fn(output)
        try:
            value = value if isinstance(value, torch.Tensor) else torch.tensor(float(value))
        except (TypeError, ValueError):
            raise InputError(
                f"the metric {self.name!r} returned a {type(value).__name__}; it must return one number"
            ) from None
        if value.numel() != 1:
            raise InputError(
                f"the metric {self.name!r} returned shape {tuple(value.shape)}; it must return a scalar "
                f"(shape () — one number for the whole batch of {output.shape[0]} prompt(s)). "
                "Reduce over the batch, e.g. `.mean()`."
            )
        if not bool(torch.isfinite(value.detach()).all()) and finite_checks_on():
            raise InputError(
                f"the metric {self.name!r} returned {value.item()}: not a finite number, so no effect can "
                "be measured against it. Check it for a division by zero (e.g. normalising by a clean - "
                "corrupted difference that is 0) or a log of 0."
            )
        return value.reshape(())

    def batched(self, output):
        return torch.stack([self(copy) for copy in output])


def logit_diff(correct: Any, incorrect: Any, pos: int | Sequence[int] = -1) -> Metric:
    """logit[correct] - logit[incorrect] at ``pos`` (default: each prompt's last token); ids per prompt or one."""
    return LogitDiff(pos=pos, correct=correct, incorrect=incorrect)


def prob(token: Any, pos: int | Sequence[int] = -1) -> Metric:
    """Softmax probability of ``token`` at ``pos``."""
    return Prob(pos=pos, token=token)


def kl(pos: int | Sequence[int] = -1) -> Metric:
    """KL divergence from the clean run's next-token distribution at ``pos`` (0 = fully restored)."""
    return KL(pos=pos)


def cosine() -> Metric:
    """Cosine similarity of the mean-pooled output to the clean run's (for encoders such as MiniLM)."""
    return Cosine()


def as_metric(metric: Metric | Callable[[torch.Tensor], Any]) -> Metric:
    """A ``Metric`` from a built-in one or any ``fn(output) -> scalar``."""
    if isinstance(metric, Metric):
        return metric
    if callable(metric):
        return UserMetric(metric)
    raise InputError(f"metric must be a Metric or a function output -> scalar, got {type(metric).__name__}")


# ------------------------------------------------------------------------------------------------
# The result
# ------------------------------------------------------------------------------------------------


@dataclass
class PatchResult:
    """One labelled tensor of effects, the same for patching, ablation, AtP, path patching and DLA.

    Attributes:
        values: the metric after each patch (or each component's contribution for DLA), one axis per dim.
        dims: axis names, e.g. ``("layer", "pos", "head")``.
        labels: tick labels per dim.
        metric_clean / metric_corrupted: the metric on the unpatched clean and corrupted runs
            (``nan`` where a method has no such run).
        method, site, metric: what produced it.
        agreement: for estimates (AtP), Pearson correlation with exact patching where it was computed.
        extras: named scalars that belong with the values (DLA: embeddings and biases).
    """

    values: torch.Tensor
    dims: tuple[str, ...]
    labels: dict[str, list[str]]
    metric_clean: float = math.nan
    metric_corrupted: float = math.nan
    method: str = "activation patching"
    site: str = ""
    metric: str = ""
    agreement: float | None = None
    extras: dict[str, float] = field(default_factory=dict)

    def normalized(self) -> PatchResult:
        """0 = the corrupted run, 1 = the clean run: ``(v - corrupted) / (clean - corrupted)``.

        With no corrupted run (ablations), the effect relative to the clean run: ``v - clean``.
        """
        if math.isnan(self.metric_corrupted):
            values = self.values - self.metric_clean
        else:
            gap = self.metric_clean - self.metric_corrupted
            if abs(gap) < 1e-12:
                raise InputError(
                    "the clean and corrupted runs give the same metric, so the effect cannot be normalized; "
                    "check that the corrupted prompt actually changes the answer"
                )
            values = (self.values - self.metric_corrupted) / gap
        return replace(self, values=values, metric=f"{self.metric} (normalized)")

    def top(self, k: int = 5) -> list[tuple[str, float]]:
        """The ``k`` entries of largest absolute value, labelled like ``"layer=1 pos=3:B head=2"``."""
        flat = self.values.flatten()
        order = flat.abs().argsort(descending=True)[:k]
        out = []
        for i in order.tolist():
            index = torch.unravel_index(torch.tensor(i), self.values.shape)
            name = " ".join(f"{d}={self.labels[d][int(j)]}" for d, j in zip(self.dims, index, strict=True))
            out.append((name, flat[i].item()))
        return out

    def figure(self, title: str | None = None):
        """A plotly heatmap; a third dim (heads) is folded into the rows (``L0 H3``)."""
        import plotly.graph_objects as go

        grid, rows, cols, row_dim, col_dim = self._grid()
        scale = float(grid.abs().max()) if grid.numel() else 1.0
        fig = go.Figure(
            go.Heatmap(
                z=grid.cpu().numpy(),
                x=cols,
                y=rows,
                colorscale="RdBu",
                zmid=0.0 if self.values.min() < 0 < self.values.max() else None,
                zmin=-scale if self.values.min() < 0 < self.values.max() else None,
                zmax=scale if self.values.min() < 0 < self.values.max() else None,
                colorbar={"title": self.metric},
            )
        )
        fig.update_layout(
            title=title or f"{self.method}: {self.site} ({self.metric})",
            xaxis_title=col_dim,
            yaxis_title=row_dim,
            yaxis_autorange="reversed",
            height=max(300, 22 * len(rows) + 150),
        )
        return fig

    def _grid(self) -> tuple[torch.Tensor, list[str], list[str], str, str]:
        values, dims = self.values.detach().float(), self.dims
        if len(dims) == 1:
            return values[None], [""], self.labels[dims[0]], "", dims[0]
        if len(dims) == 2:
            return values, self.labels[dims[0]], self.labels[dims[1]], dims[0], dims[1]
        if dims == ("layer", "pos", "head"):  # rows: layer x head, columns: position
            grid = rearrange(values, "layer pos head -> (layer head) pos")
            rows = [f"{layer} {head}" for layer in self.labels["layer"] for head in self.labels["head"]]
            return grid, rows, self.labels["pos"], "layer head", "pos"
        first, rest = dims[0], dims[1:]
        grid = values.reshape(values.shape[0], -1)
        cols = [" ".join(p) for p in _product([self.labels[d] for d in rest])]
        return grid, self.labels[first], cols, first, " ".join(rest)


def _product(lists: list[list[str]]) -> list[tuple[str, ...]]:
    out: list[tuple[str, ...]] = [()]
    for items in lists:
        out = [(*prefix, item) for prefix in out for item in items]
    return out


# ------------------------------------------------------------------------------------------------
# Sites: what a patch replaces
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Site:
    """A family of hooks and the unit each patch replaces.

    ``hook`` is a name template with ``{layer}``; ``per_pos``: one patch per position (else all
    positions at once); ``unit``: ``"head"``, ``"neuron"`` or ``None`` (the whole vector).
    ``view``: how the activation is laid out for the patch mask (``unit_view``): ``"vector"`` for
    ``[batch, pos, ...]`` activations; ``"pattern"`` for an attention pattern ``[batch, head, dest,
    src]`` patched by (destination row, head); ``"pattern_src"`` for single (dest, src) entries.
    ``order``: the result's dims when they differ from the default (TransformerLens puts a
    pattern's head before its destination position).
    """

    hook: str
    per_pos: bool
    unit: str | None
    layers: bool = True
    description: str = ""
    view: str = "vector"
    order: tuple[str, ...] | None = None

    @property
    def dims(self) -> tuple[str, ...]:
        if self.order is not None:
            return self.order
        dims = ("layer",) if self.layers else ()
        dims += ("pos",) if self.per_pos else ()
        return dims + ((self.unit,) if self.unit else ())


def _head_sites(what: str, hook: str) -> dict[str, Site]:
    """``head_<what>`` (all positions) and ``head_<what>_pos`` (one position) for a head vector."""
    return {
        f"head_{what}": Site(hook, False, "head", description=f"one head's {what}, all positions"),
        f"head_{what}_pos": Site(hook, True, "head", description=f"one head's {what} at one position"),
    }


_PATTERN = "blocks.{layer}.attn.hook_pattern"

SITES: dict[str, Site] = {
    "resid_pre": Site(
        "blocks.{layer}.hook_resid_pre", True, None, description="residual stream before each block"
    ),
    "resid_mid": Site(
        "blocks.{layer}.hook_resid_mid", True, None, description="residual stream between attention and MLP"
    ),
    "resid_post": Site(
        "blocks.{layer}.hook_resid_post", True, None, description="residual stream after each block"
    ),
    "attn_out": Site(
        "blocks.{layer}.hook_attn_out", True, None, description="attention output, per position"
    ),
    "mlp_out": Site("blocks.{layer}.hook_mlp_out", True, None, description="MLP output, per position"),
    "attn": Site(
        "blocks.{layer}.hook_attn_out", False, None, description="a whole attention layer (all positions)"
    ),
    "mlp": Site("blocks.{layer}.hook_mlp_out", False, None, description="a whole MLP layer (all positions)"),
    "head": Site("blocks.{layer}.attn.hook_z", False, "head", description="one head's output, all positions"),
    "head_pos": Site(
        "blocks.{layer}.attn.hook_z", True, "head", description="one head's output at one position"
    ),
    **_head_sites("q", "blocks.{layer}.attn.hook_q"),
    **_head_sites("k", "blocks.{layer}.attn.hook_k"),
    **_head_sites("v", "blocks.{layer}.attn.hook_v"),
    "head_pattern": Site(
        _PATTERN, False, "head", description="one head's attention pattern, all rows", view="pattern"
    ),
    "head_pattern_pos": Site(
        _PATTERN,
        True,
        "head",
        description="one head's attention pattern row of one destination position",
        view="pattern",
        order=("layer", "head", "dest_pos"),
    ),
    "head_pattern_dest_src": Site(
        _PATTERN,
        True,
        "head",
        description="one entry (destination, source) of one head's attention pattern",
        view="pattern_src",
        order=("layer", "head", "dest_pos", "src_pos"),
    ),
    "neuron": Site(
        "blocks.{layer}.mlp.hook_post", False, "neuron", description="one MLP neuron, all positions"
    ),
    "pos": Site(
        "blocks.0.hook_resid_pre", True, None, layers=False, description="one input position (embedding)"
    ),
}


@dataclass(frozen=True)
class Patch:
    """One patch: in ``hook``, position ``pos`` (None = all) and unit ``unit`` (None = whole vector)."""

    hook: str
    pos: int | None
    unit: int | None


@dataclass
class Plan:
    """The patches of a sweep, where each lands in the result tensor, and how to view each hook."""

    site: str
    dims: tuple[str, ...]
    labels: dict[str, list[str]]
    shape: tuple[int, ...]
    patches: list[Patch]
    hooks: list[str]
    units: dict[str, int]  # hook -> number of units (1 for whole vectors)
    views: dict[str, str] = field(default_factory=dict)  # hook -> Site.view, where not "vector"


def n_heads(model: HookedModel) -> int:
    cfg = getattr(model, "cfg", None)
    if cfg is None or not getattr(cfg, "n_heads", None):
        raise InputError(f"{model.name} is not a transformer with attention heads")
    return int(cfg.n_heads)


def component(model: HookedModel, path: str) -> torch.nn.Module:
    """The module of a TransformerLens component (``"ln_final"``, ``"unembed"``, ``"blocks.0.attn.o"``).

    HF models hook the component's own module; native bridges hook ``HookPoint``s inside it, so
    there the component is looked up by path in the bridge.
    """
    for side in ("hook_in", "hook_out"):
        site = model._sites.get(f"{path}.{side}")
        if site is not None and not _is_hook_point(site.module):
            return site.module
    try:
        return model.module.get_submodule(path)
    except AttributeError:
        raise InputError(f"{model.name} has no component {path!r}") from None


def _is_hook_point(module: torch.nn.Module) -> bool:
    """interp's hook points (and views of them) or TransformerLens's: markers, not components."""
    return isinstance(module, HookPoint) or type(module).__name__ == "HookPoint"


def unit_view(act: torch.Tensor, units: int) -> torch.Tensor:
    """Any ``[batch, pos, ...]`` activation as ``[batch, pos, unit, rest]`` (a view when possible).

    Heads: ``hook_z`` is ``[b, p, head, d_head]`` on HF models and ``[b, p, head*d_head]`` on native
    bridges; both become ``[b, p, head, d_head]``. Neurons: ``[b, p, n, 1]``. Whole vectors: ``[b, p, 1, d]``.
    """
    flat = rearrange(act, "b p ... -> b p (...)") if act.ndim != 3 else act
    if act.ndim == 3 and units == act.shape[-1]:
        return flat.unsqueeze(-1)
    return rearrange(flat, "b p (u rest) -> b p u rest", u=units)


def site_view(act: torch.Tensor, units: int, view: str = "vector") -> torch.Tensor:
    """An activation as ``[batch, pos, unit, rest]`` for a site's patch mask (see ``Site.view``).

    A pattern ``[b, head, dest, src]`` becomes ``[b, dest, head, src]`` ("pattern") or
    ``[b, dest, (head src), 1]`` ("pattern_src"); every other activation goes through ``unit_view``.
    """
    if view == "pattern":
        return rearrange(act, "b h q k -> b q h k")
    if view == "pattern_src":
        return rearrange(act, "b h q k -> b q (h k) 1")
    return unit_view(act, units)


def from_site_view(viewed: torch.Tensor, view: str, shape: torch.Size) -> torch.Tensor:
    """The inverse of ``site_view``: back to the activation's own ``shape``."""
    if view == "pattern":
        return rearrange(viewed, "b q h k -> b h q k")
    if view == "pattern_src":
        return rearrange(viewed, "b q (h k) 1 -> b h q k", h=shape[1])
    return viewed.reshape(shape)


def _layers_of(model: HookedModel, template: str) -> list[int]:
    n_layers = getattr(model, "n_layers", None)
    if n_layers is None:
        raise InputError(f"{model.name} has no transformer blocks; patching sites need a transformer")
    return [i for i in range(n_layers) if template.format(layer=i) in model._sites]


def plan(
    model: HookedModel,
    site: str,
    n_pos: int,
    str_tokens: list[str] | None = None,
    *,
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    units: Sequence[int] | None = None,
    patterns: bool = False,
) -> Plan:
    """Enumerate the patches of a sweep over ``site`` (a name in ``SITES``, ``"sae_latent"``, or
    hook names / a glob).

    ``patterns``: allow the attention-pattern sites (the caller writes them through ``site_view``).
    """
    if site == SAE_LATENT:
        return _plan_latents(model, n_pos, str_tokens, positions, units)
    spec = SITES.get(site)
    if spec is None:
        return _plan_hooks(model, site, n_pos, str_tokens, positions)
    if spec.layers:
        found = _layers_of(model, spec.hook)
        if not found:
            example = spec.hook.format(layer=0)
            hint = closest(example, model.hook_names, n=3)
            raise UnknownHookError(
                f"site {site!r} needs hooks like {example!r}, which {model.name} does not have"
                f"{' (attention-only model: no MLP)' if 'mlp' in example else ''}. "
                f"Closest hook names: {', '.join(hint) or 'none'}."
            )
        chosen_layers = _subset(found, layers, "layers")
    else:
        chosen_layers = [None]
    if spec.view != "vector" and not patterns:
        raise InputError(
            f"site {site!r} patches attention patterns, which only patch() supports; "
            "use a head site (head, head_pos, head_q, ...) here"
        )
    hooks = [spec.hook.format(layer=layer) for layer in chosen_layers]
    n_units = _n_units(model, spec, hooks[0], n_pos)
    n_heads_ = n_units // n_pos if spec.view == "pattern_src" else n_units
    axes: dict[str, list] = {
        "layer": list(zip(chosen_layers, hooks, strict=True)),
        "pos": _subset(list(range(n_pos)), positions, "positions") if spec.per_pos else [None],
        "src_pos": list(range(n_pos)),
    }
    axes["dest_pos"] = axes["pos"]
    axes[spec.unit or "unit"] = (
        _subset(list(range(n_heads_)), units, f"{spec.unit}s") if spec.unit else [None]
    )
    dims = spec.dims
    if not spec.layers:  # one hook: still enumerate it, without a result dim
        dims = ("layer", *dims)
    cells = product(*(axes[d] for d in dims))
    patches = [_patch_at(dict(zip(dims, cell, strict=True)), spec, n_pos) for cell in cells]
    labels: dict[str, list[str]] = {}
    for d in spec.dims:
        if d == "layer":
            labels[d] = [f"L{layer}" for layer, _ in axes[d]]
        elif d in ("pos", "dest_pos", "src_pos"):
            labels[d] = [_pos_label(p, str_tokens) for p in axes[d]]
        else:
            labels[d] = [f"{d[0].upper()}{u}" for u in axes[d]]
    shape = tuple(len(labels[d]) for d in spec.dims)
    views = dict.fromkeys(hooks, spec.view) if spec.view != "vector" else {}
    return Plan(site, spec.dims, labels, shape, patches, hooks, dict.fromkeys(hooks, n_units), views)


SAE_LATENT = "sae_latent"  # one patch per latent and position of every spliced dictionary
LATENT_SUFFIX = ".hook_sae_acts_post"


def _plan_latents(model, n_pos, str_tokens, positions, units) -> Plan:
    """``sae_latent``: each spliced SAE's ``hook_sae_acts_post``, one patch per (latent, position)."""
    hooks = [h for h in model.hook_names if h.endswith(LATENT_SUFFIX)]
    if not hooks:
        raise InputError(
            "site 'sae_latent' patches the latents of spliced dictionaries, and none is spliced. "
            "Run it inside `with model.saes([sae]):` (see interp.sae)."
        )
    widths = {int(model.hook_shapes[h][-1]) for h in hooks}
    if len(widths) > 1:
        raise InputError(
            f"the spliced dictionaries have different sizes {sorted(widths)}; sweep one at a time "
            "(site='<hook>.hook_sae_acts_post' for whole vectors, or splice one SAE)"
        )
    n_units = widths.pop()
    pos_list = _subset(list(range(n_pos)), positions, "positions")
    unit_list = _subset(list(range(n_units)), units, "latents")
    patches = [Patch(h, p, u) for h in hooks for p in pos_list for u in unit_list]
    labels = {
        "sae": [h.removesuffix(LATENT_SUFFIX) for h in hooks],
        "pos": [_pos_label(p, str_tokens) for p in pos_list],
        "latent": [f"F{u}" for u in unit_list],
    }
    shape = (len(hooks), len(pos_list), len(unit_list))
    return Plan(
        SAE_LATENT, ("sae", "pos", "latent"), labels, shape, patches, hooks, dict.fromkeys(hooks, n_units)
    )


def _patch_at(cell: dict[str, Any], spec: Site, n_pos: int) -> Patch:
    """The patch at one cell of a site's grid (``{"layer": (layer, hook), "pos": 3, "head": 1, ...}``)."""
    unit = cell.get(spec.unit) if spec.unit else None
    if "src_pos" in cell:  # one pattern entry: unit (head, src) of destination row dest_pos
        unit = unit * n_pos + cell["src_pos"]
    return Patch(cell["layer"][1], cell.get("pos", cell.get("dest_pos")), unit)


def _n_units(model: HookedModel, spec: Site, hook: str, n_pos: int) -> int:
    """Heads (key/value heads for k and v under grouped-query attention), neurons, or 1; for single
    pattern entries, heads x source positions."""
    shape = model.hook_shapes.get(hook) or ()
    if spec.view in ("pattern", "pattern_src"):
        heads = int(shape[1]) if len(shape) == 4 and isinstance(shape[1], int) else n_heads(model)
        return heads * n_pos if spec.view == "pattern_src" else heads
    if spec.unit == "head":
        if len(shape) == 4 and isinstance(shape[2], int):
            return int(shape[2])  # [batch, pos, head, d_head]
        kv = getattr(getattr(model, "cfg", None), "n_key_value_heads", None)
        return int(kv) if kv and hook.endswith(("hook_k", "hook_v")) else n_heads(model)
    if spec.unit == "neuron":
        return int(shape[-1])
    return 1


def _plan_hooks(model, names, n_pos, str_tokens, positions) -> Plan:
    """Raw hook names or globs: one patch per (hook, position) of a ``[batch, pos, ...]`` activation."""
    try:
        hooks = model.resolve(names)
    except UnknownHookError as err:
        near = closest(names, list(SITES)) if isinstance(names, str) else []
        hint = f" Did you mean the site {near[0]!r}?" if near else ""
        raise UnknownHookError(
            f"{names!r} is neither a site ({', '.join(SITES)}) nor a hook name.{hint} {err}"
        ) from None
    bad = [h for h in hooks if not _is_pos_shaped(model.hook_shapes.get(h))]
    if bad:
        raise InputError(
            f"cannot patch {bad[:3]} position by position: their shape is not (batch, pos, ...). "
            f"Patch hooks like blocks.N.hook_resid_pre, or use a site: {', '.join(SITES)}."
        )
    pos_list = _subset(list(range(n_pos)), positions, "positions")
    patches = [Patch(h, p, None) for h in hooks for p in pos_list]
    labels = {"hook": hooks, "pos": [_pos_label(p, str_tokens) for p in pos_list]}
    return Plan(
        str(names),
        ("hook", "pos"),
        labels,
        (len(hooks), len(pos_list)),
        patches,
        hooks,
        dict.fromkeys(hooks, 1),
    )


def _is_pos_shaped(shape: tuple | None) -> bool:
    return bool(shape) and len(shape) >= 3 and shape[0] == "batch" and shape[1] == "pos"


def _subset(all_items: list[int], chosen: Sequence[int] | None, what: str) -> list[int]:
    if chosen is None:
        return all_items
    chosen = [int(c) for c in chosen]
    bad = [c for c in chosen if c not in all_items and c + len(all_items) not in all_items]
    if bad:
        raise InputError(f"{what} {bad} out of range; valid: 0..{len(all_items) - 1}")
    return [all_items[c] for c in chosen]


def _pos_label(pos: int | None, str_tokens: list[str] | None) -> str:
    if str_tokens is None or pos is None or pos >= len(str_tokens):
        return str(pos)
    return f"{pos}:{str_tokens[pos]}"


# ------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------


def check_pair(model: HookedModel, clean: Any, corrupted: Any):
    """Prepare both inputs; they must have the same token length (patching pairs positions)."""
    clean_t, corrupt_t = model.prepare(clean), model.prepare(corrupted)
    a, b = tuple(clean_t.input_ids.shape), tuple(corrupt_t.input_ids.shape)
    if a != b:
        what = "token lengths" if a[0] == b[0] else "shapes (prompts x tokens)"
        raise InputError(
            f"clean and corrupted inputs have different {what}: clean {a[0]} x {a[1]} tokens, corrupted "
            f"{b[0]} x {b[1]}. Patching pairs each clean position with the same corrupted position, so both "
            "need the same number of prompts and tokens. Reword the corrupted prompt so it tokenizes to the "
            "same length (check with model.prepare(...).str_tokens)."
        )
    masks = clean_t.attention_mask, corrupt_t.attention_mask
    if masks[0] is not None and masks[1] is not None and not torch.equal(masks[0], masks[1]):
        raise InputError(
            "clean and corrupted prompts pad differently (their attention masks differ): give each pair "
            "the same number of tokens"
        )
    return clean_t, corrupt_t


def run_pair(model: HookedModel, clean_t, corrupt_t, names: Sequence[str], memory_budget: int | None = None):
    """Clean and corrupted runs in one forward: ``(clean output, corrupted output, clean cache of names)``."""
    batch = clean_t.input_ids.shape[0]
    mask = clean_t.attention_mask
    both = type(clean_t)(
        torch.cat([clean_t.input_ids, corrupt_t.input_ids]),
        None if mask is None else torch.cat([mask, mask]),
        None,
    )
    output, cache = model.run_with_cache(both, names=names, memory_budget=memory_budget)
    clean_cache = {name: act[:batch] for name, act in cache.items()}
    return output[:batch], output[batch:], clean_cache


# ------------------------------------------------------------------------------------------------
# The batched engine
# ------------------------------------------------------------------------------------------------


def bytes_per_copy(model: HookedModel, tokens) -> int:
    """A conservative bound on the activations one extra copy of the input holds during a forward:
    every distinct hook point's tensor (aliases counted once)."""
    sizes = model.dim_sizes(tokens)
    seen: set[tuple[int, str]] = set()
    total = 0
    for site in model._sites.values():
        key = (id(site.module), site.side)
        if site.shape is None or key in seen:
            continue
        seen.add(key)
        total += concrete_numel(site.shape, sizes)
    return max(1, total * model._itemsize)


def cached_bytes(model: HookedModel, names: Sequence[str], tokens, copies: int = 1) -> int:
    """Bytes the cached activations of ``names`` take for ``tokens`` (times ``copies``)."""
    sizes = model.dim_sizes(tokens)
    shapes = [model.hook_shapes[n] for n in names if model.hook_shapes.get(n) is not None]
    return copies * model._itemsize * sum(concrete_numel(shape, sizes) for shape in shapes)


def copies_per_forward(
    model: HookedModel,
    tokens,
    n_patches: int,
    held_bytes: int,
    memory_budget: int | None,
    batch_size: int | None,
    what: str,
) -> int:
    """How many patched copies go through one forward, within the memory budget."""
    budget = default_memory_budget() if memory_budget is None else memory_budget
    per_copy = bytes_per_copy(model, tokens)
    room = budget - held_bytes
    fits = room // per_copy
    if fits < 1:
        raise CaptureTooLargeError(
            f"this {what} needs about {(held_bytes + per_copy) / 2**20:.0f} MiB even one patch at a time "
            f"({held_bytes / 2**20:.0f} MiB of cached activations + {per_copy / 2**20:.0f} MiB per forward copy) "
            f"but the memory budget is {budget / 2**20:.0f} MiB. Filter the sweep (layers=[...], positions=[...], "
            "heads/units=[...]), use fewer or shorter prompts, or raise memory_budget= / $INTERP_MEMORY_BUDGET."
        )
    if batch_size is not None:
        if batch_size * per_copy > room:
            raise CaptureTooLargeError(
                f"batch_size={batch_size} copies need about {batch_size * per_copy / 2**20:.0f} MiB but only "
                f"{room / 2**20:.0f} MiB of the memory budget is free; use batch_size<={fits} (or leave it "
                "unset to chunk automatically), or filter the sweep (layers=, positions=, heads=)."
            )
        return max(1, min(batch_size, n_patches))
    return int(max(1, min(fits, MAX_COPIES, n_patches)))


def _masks(chunk: list[Patch], plan_: Plan, n_pos: int, device) -> dict[str, torch.Tensor]:
    """Per hook, a ``[copies, pos, unit]`` boolean mask: True where copy k takes the source value."""
    rows: dict[str, list[int]] = {}
    for k, patch in enumerate(chunk):
        rows.setdefault(patch.hook, []).append(k)
    masks: dict[str, torch.Tensor] = {}
    for hook, ks in rows.items():
        mask = torch.zeros(len(chunk), n_pos, plan_.units[hook], dtype=torch.bool)
        patches = [chunk[k] for k in ks]
        if all(p.pos is not None and p.unit is not None for p in patches):  # one indexed write
            mask[ks, [p.pos for p in patches], [p.unit for p in patches]] = True
        else:
            for k, patch in zip(ks, patches, strict=True):
                pos = slice(None) if patch.pos is None else patch.pos
                unit = slice(None) if patch.unit is None else patch.unit
                mask[k, pos, unit] = True
        masks[hook] = mask.to(device)
    return masks


def splice(mask: torch.Tensor, source: torch.Tensor, units: int, view: str = "vector") -> Callable:
    """A hook that writes ``source[batch, pos, unit, rest]`` where ``mask[copies, pos, unit]`` is set
    (``source`` and the activation seen through ``site_view(..., view)``)."""
    copies = mask.shape[0]
    keep = mask[:, None, :, :, None]

    def hook(act: torch.Tensor, ctx: Any) -> torch.Tensor:
        viewed = rearrange(site_view(act, units, view), "(k b) p u r -> k b p u r", k=copies)
        n = viewed.shape[2]  # a run from the middle (sweep's prefix reuse) holds the last n positions
        new = torch.where(keep[:, :, -n:], source.to(act.dtype)[None, :, -n:], viewed)
        return from_site_view(rearrange(new, "k b p u r -> (k b) p u r"), view, act.shape)

    return hook


def sweep(
    model: HookedModel,
    base,
    sources: dict[str, torch.Tensor],
    plan_: Plan,
    metric: Metric,
    *,
    copies: int,
    progress: Progress | None = None,
    desc: str = "patching",
    reuse_prefix: bool = True,
    route: Any = "find",
) -> torch.Tensor:
    """Run every patch of ``plan_`` on the ``base`` input, ``copies`` patches per forward.

    ``sources[hook]`` is the ``[batch|1, pos, unit, rest]`` value a patch writes (the clean
    activation for patching; zeros, a mean or a resample for ablation). Each forward holds patches
    of one hook, and the model runs once up to that hook (``HookedModel.run_copies``). When the
    metric reads one position per prompt (``Metric.positions_read``), the unembedding is computed
    there alone (and, on an ``nn.Linear`` head, only for the logit columns it reads:
    ``Metric.vocab_read``).

    ``route``: a captured ``SuffixRoute`` of ``base`` (or None for none); by default one is found.
    On a causal model (checked, ``interp.models.suffix``) with ``reuse_prefix``, a forward whose
    patches all lie at positions ``>= s`` runs positions ``s..`` only: the earlier ones are those of
    the plain ``base`` run, whose keys and values are cached once. Patches are then grouped by
    position (``_prefix_groups`` ranges per hook) so that each forward skips its group's prefix.
    With a metric that reads known positions (``Metric.positions_used``), a last-block patch that
    changes only its own position (``_local_stream``) elsewhere takes the base run's value without
    a forward, and on native bridges other forwards run the last block's queries only there
    (``NativeSuffix.querying``). Returns the metric per patch, shaped like ``plan_.shape``.
    """
    n_pos = base.input_ids.shape[1]
    total = len(plan_.patches)
    out = torch.empty(total)
    shown = progress is None and total > copies  # a tqdm bar costs ~0.2 ms even disabled
    bar = tqdm(total=total, desc=desc, leave=False) if shown else None
    kept = metric.positions_read()
    narrow = kept is not None and UNEMBED_INPUT in model._sites and model.can_keep_positions(UNEMBED_INPUT)
    read = metric.at_kept_positions() if narrow else metric
    kept = None if kept is None else kept % n_pos  # -1: the last position
    columns = _unembed_columns(model, base, metric, kept) if narrow else None
    read = read if columns is None else read.at_vocab(columns)
    patches = plan_.patches
    reuse = reuse_prefix and PREFIX_GROUPS > 1 and any(p.pos for p in patches)
    if route == "find":  # else the caller's route of ``base`` (captured), or None
        route = _prefix_route(model, base) if reuse else None
    route = route if reuse else None
    order, key = list(range(total)), lambda i: patches[i].hook
    if route is not None:
        hook_rank = {h: r for r, h in enumerate(model.hook_names)}
        order.sort(key=lambda i: (hook_rank[patches[i].hook], patches[i].pos or 0))
        groups = _prefix_groups(model)
        by_pos = all(p.pos is not None for p in patches)
        local = {h: _local_stream(model, base, h, route) for h in plan_.hooks} if by_pos else {}
        order = _unread_to_base(order, patches, local, metric, route, n_pos, out)
        gathered = {} if narrow else local
        # patches in the last block whose copies run one position each from the stream on share one
        # forward (the attention of queries / pattern rows runs from the first patched position)
        merged = {h for h, stream in gathered.items() if stream}
        key = lambda i: (  # noqa: E731
            patches[i].hook,
            0 if patches[i].hook in merged else (patches[i].pos or 0) * groups // n_pos,
        )
    else:
        gathered = {}
    used = None if narrow or route is None else _queried_positions(model, base, route, metric, n_pos)
    done = 0
    for indices in chunks_by(order, copies, key=key):
        chunk = [patches[i] for i in indices]
        start = _prefix_length(chunk, kept if narrow else None) if route is not None else 0
        masks = _masks(chunk, plan_, n_pos, base.input_ids.device)
        hooks = [
            (h, splice(m, sources[h], plan_.units[h], plan_.views.get(h, "vector"))) for h, m in masks.items()
        ]
        suffix = None if route is None else (route, start)
        model.shares_prefix(base, chunk[0].hook, route)  # checked on whole outputs
        stream = gathered.get(chunk[0].hook)
        if stream is not None:
            output = _run_gathered(model, base, chunk, hooks, route, stream, start)
            start = 0
        else:
            rows = None if used is None else [p - start for p in used if p >= start]
            with (
                model.keeping_positions(UNEMBED_INPUT, kept - start) if narrow else nullcontext(),
                _keeping_columns(model, columns),
                route.querying(torch.tensor(rows)) if rows else nullcontext(),
            ):
                output = model.run_copies(
                    base, len(chunk), hooks, shared_until=chunk[0].hook, suffix=suffix, library=True
                )
            if rows and output.shape[1] == len(rows) < n_pos - start:  # the read positions only
                full = route.output.to(output).repeat(len(chunk), *([1] * (output.ndim - 1)))
                full[:, [start + r for r in rows]] = output
                output, start = full, 0
        if start > 0 and not narrow:  # positions before ``start``: the plain base run's
            before = route.output[:, :start].repeat(len(chunk), *([1] * (output.ndim - 1)))
            output = torch.cat([before.to(output), output], dim=1)
        output = rearrange(output, "(k b) ... -> k b ...", k=len(chunk))
        values = read.batched(output).detach().float().cpu()
        require_finite(values, f"the metric ({read.name}) after patching {chunk[0].hook}",
                       "The patched model or the metric produced NaN/inf; check the metric and the inputs.")  # fmt: skip
        out[indices] = values
        done += len(chunk)
        if bar is not None:
            bar.update(len(chunk))
        if progress is not None:
            progress(done, total)
    if bar is not None:
        bar.close()
    return out.reshape(plan_.shape)


def _unembed_columns(model: HookedModel, base, metric: Metric, kept: torch.Tensor) -> list[int] | None:
    """The logit columns the (narrowed) metric reads, where the unembedding can compute only those.

    Only for an unembedding that is a plain ``nn.Linear`` (Hugging Face's ``lm_head``; GPT-2's is
    50,257 wide, ~1/4 of a sweep's forward on a 15-token prompt), nothing hooked at or after its
    input (``can_keep_positions``), and checked once per input shape: the narrowed forward of
    ``base`` equals the full one's columns at the kept positions (what follows the head must be
    elementwise, e.g. a logit soft cap)."""
    ids = metric.vocab_read()
    site = model._sites.get(UNEMBED_INPUT)
    if ids is None or site is None or type(site.module) is not nn.Linear or site.side != "input":
        return None
    if len(ids) * 8 > site.module.out_features:
        return None
    key = ("unembed columns", tuple(base.input_ids.shape))
    checks = model._suffix_checks
    if key not in checks:
        try:
            with model._internal(), torch.no_grad():
                full = model._forward(base)
                with model.keeping_positions(UNEMBED_INPUT, kept), _keeping_columns(model, ids):
                    narrowed = model._forward(base)
            rows = torch.arange(full.shape[0])
            reference = full[rows, kept.to(full.device)][:, ids].unsqueeze(1)
            checks[key] = _same_output(narrowed, reference)
        except (RuntimeError, ValueError, IndexError, TypeError, NotImplementedError):
            checks[key] = False
    return ids if checks[key] else None


def _same_output(shortcut: torch.Tensor, reference: torch.Tensor) -> bool:
    """Whether a shortcut's output equals the full run's (same shape; 1e-5 of its scale, at least 1)."""
    scale = float(reference.abs().max().clamp_min(1.0))
    return shortcut.shape == reference.shape and bool(
        torch.allclose(shortcut, reference, rtol=1e-4, atol=1e-5 * scale)
    )


@contextmanager
def _keeping_columns(model: HookedModel, ids: list[int] | None):
    """Forwards inside compute only the logit columns ``ids`` (see ``_unembed_columns``; None: all)."""
    if ids is None:
        yield
        return
    head = model._sites[UNEMBED_INPUT].module
    index = torch.as_tensor(ids, device=head.weight.device)
    weight = head.weight.index_select(0, index)
    bias = None if head.bias is None else head.bias.index_select(0, index)
    head.forward = lambda x: nn.functional.linear(x, weight, bias)
    try:
        yield
    finally:
        del head.forward


def _queried_positions(model: HookedModel, base, route: Any, metric: Metric, n_pos: int) -> list[int] | None:
    """The positions a metric reads (``Metric.positions_used``) where the route can run the last
    block's queries there alone (``NativeSuffix.querying``), or None. Checked once per input shape:
    a tail run of ``base`` from the middle, queried there, equals the full run at those positions."""
    used = metric.positions_used()
    if used is None or not hasattr(route, "querying"):
        return None
    used = sorted({p % n_pos for p in used})
    if len(used) == n_pos:
        return None
    key = ("query rows", tuple(base.input_ids.shape), tuple(used))
    checks = model._suffix_checks
    if key not in checks:
        s = n_pos // 2
        rows = [p - s for p in used if p >= s] or [n_pos - 1 - s]
        try:
            with (
                model._internal(),
                torch.no_grad(),
                route.active(s) as tail,
                route.querying(torch.tensor(rows)),
            ):
                queried = model._forward(tail)
            checks[key] = _same_output(queried, route.output[:, [s + r for r in rows]])
        except (RuntimeError, ValueError, IndexError, TypeError, NotImplementedError):
            checks[key] = False
    return used if checks[key] else None


def _unread_to_base(
    order: list[int],
    patches: list[Patch],
    local: dict[str, str | None],
    metric: Metric,
    route: Any,
    n_pos: int,
    out: torch.Tensor,
) -> list[int]:
    """``order`` less the patches that cannot change what the metric reads: at a hook after which
    nothing mixes positions (``local``, checked) and at a position the metric does not read
    (``Metric.positions_used``). Their value is the unpatched run's (``route.output``), written to ``out``."""
    used = metric.positions_used()
    if used is None or not any(local.values()):
        return order
    used_set = {p % n_pos for p in used}
    unread = [i for i in order if local.get(patches[i].hook) and patches[i].pos % n_pos not in used_set]
    if not unread:
        return order
    value = metric.batched(route.output.unsqueeze(0)).detach().float().cpu()
    require_finite(
        value, f"the metric ({metric.name}) of the unpatched run", "Check the metric and the inputs."
    )
    out[unread] = float(value[0])
    skipped = set(unread)
    return [i for i in order if i not in skipped]


def _row_positions(positions: Sequence[int], batch: int) -> torch.Tensor:
    """Row ``k * batch + b`` of stacked copies -> ``positions[k]``."""
    return torch.as_tensor(list(positions), dtype=torch.long).repeat_interleave(batch)


def _scatter_rows(route: Any, rows_out: torch.Tensor, rows_pos: torch.Tensor) -> torch.Tensor:
    """The full output of stacked copies that each differ from the base run at one position:
    the base run's output (``route.output``) with row ``r``'s position ``rows_pos[r]`` from ``rows_out``."""
    copies = rows_out.shape[0] // route.output.shape[0]
    full = route.output.to(rows_out).repeat(copies, *([1] * (route.output.ndim - 1)))
    full[torch.arange(full.shape[0], device=full.device), rows_pos.to(full.device)] = rows_out[:, 0]
    return full


def _run_gathered(
    model: HookedModel, base, chunk: list[Patch], hooks, route: Any, stream: str, start: int = 0
) -> torch.Tensor:
    """``run_copies`` for patches at one position each, where nothing after the patched hook mixes
    positions (``_local_stream``): positions ``start..`` run (the route's tail), from the residual
    stream ``stream`` on copy ``k`` runs only its position, and every other position is the base run's."""
    rows_pos = _row_positions([p.pos for p in chunk], base.input_ids.shape[0])
    with model.keeping_positions(stream, rows_pos - start):
        rows_out = model.run_copies(
            base, len(chunk), hooks, shared_until=chunk[0].hook, suffix=(route, start), library=True
        )
    return _scatter_rows(route, rows_out, rows_pos)


def _local_stream(model: HookedModel, base, hook: str, route: Any) -> str | None:
    """The residual-stream hook from which a patch at ``hook`` can run one position per copy, or None.

    A patch at one position of a hook in the last block (its head outputs, queries or pattern
    rows) changes nothing but that position downstream when no attention follows. Checked on
    ``base`` once per hook and input shape: two copies, each jittered at a different position at
    ``hook``, give the same full output run whole and run from the last block's
    ``hook_resid_post`` (else ``ln_final.hook_in``, else the unembedding's input) one position per copy.
    """
    n_layers = getattr(model, "n_layers", None)
    if route is None or n_layers is None or layer_of(hook) != n_layers - 1:
        return None
    order = {name: i for i, name in enumerate(model.hook_names)}
    streams = (f"blocks.{n_layers - 1}.hook_resid_post", "ln_final.hook_in", UNEMBED_INPUT)
    for stream in streams:  # the earliest that works (HF's GPT-2 reshapes its stream before ln_f)
        if order.get(stream, -1) <= order[hook] or not model.can_keep_positions(stream):
            continue
        key = ("one position per copy", hook, stream, tuple(base.input_ids.shape))
        checks = model._suffix_checks
        if key not in checks:
            try:
                checks[key] = _check_local(model, base, hook, route, stream)
            except (RuntimeError, ValueError, IndexError, TypeError, NotImplementedError):
                checks[key] = False
        if checks[key]:
            return stream
    return None


def _check_local(model: HookedModel, base, hook: str, route: Any, stream: str) -> bool:
    batch, n_pos = base.input_ids.shape
    positions = [n_pos // 2, n_pos - 1]
    generator = torch.Generator().manual_seed(0)
    noise: dict[str, torch.Tensor] = {}

    shape = model.hook_shapes.get(hook) or ("batch", "pos")
    axis = shape.index("pos")  # a pattern's destination position comes first

    def jitter(act: torch.Tensor, _ctx: Any) -> torch.Tensor:  # copy k: noise at positions[k] only
        if "value" not in noise:
            scale = act.float().std().clamp_min(1e-3)  # a change well above float noise
            noise["value"] = (torch.randn(act.shape, generator=generator) * scale).to(act)
        at = torch.zeros(act.shape[0], act.shape[axis], dtype=torch.bool, device=act.device)
        at[torch.arange(act.shape[0]), _row_positions(positions, batch).to(act.device)] = True
        at = at.reshape(act.shape[0], *([1] * (axis - 1)), act.shape[axis], *([1] * (act.ndim - axis - 1)))
        return torch.where(at, act + noise["value"], act)

    with model._internal(), torch.no_grad():
        whole = model.run_copies(base, 2, [(hook, jitter)], suffix=(route, 0), library=True)
        rows_pos = _row_positions(positions, batch)
        with model.keeping_positions(stream, rows_pos):
            rows_out = model.run_copies(base, 2, [(hook, jitter)], suffix=(route, 0), library=True)
    gathered = _scatter_rows(route, rows_out, rows_pos)
    scale = float(whole.abs().max().clamp_min(1.0))
    effect = float((whole - route.output.repeat(2, *([1] * (whole.ndim - 1)))).abs().max())
    # the jitter's effect elsewhere must be float noise next to its effect, not merely small (keys
    # of a near-uniform attention move later positions by less than any absolute tolerance)
    missed = float((gathered - whole).abs().max())
    return (
        effect > 0
        and missed <= 1e-3 * effect
        and torch.allclose(gathered, whole, rtol=1e-4, atol=1e-5 * scale)
    )


PREFIX_GROUPS = 4  # position ranges per hook when the prefix is reused (more: less work, more forwards)
SMALL_D_MODEL = 256  # below it a forward costs mostly its fixed overhead: half as many groups pay off


def _prefix_groups(model: HookedModel) -> int:
    """Position ranges per hook. Measured (CPU time, one thread): induction-2l (d_model 64) is
    fastest with 2, GPT-2 small (768) gains down to 4-5 (10.9 s -> 7.9 s at 3, 7.5 s at 5, 3 layers);
    one range for induction-2l's last block costs more than two (CPU time, head_pos 38-41 ms vs 37-38)."""
    d_model = getattr(getattr(model, "cfg", None), "d_model", SMALL_D_MODEL)
    return max(1, PREFIX_GROUPS // 2) if d_model < SMALL_D_MODEL and PREFIX_GROUPS > 1 else PREFIX_GROUPS


def _prefix_length(chunk: list[Patch], kept: torch.Tensor | None) -> int:
    """How many leading positions a forward of ``chunk`` can take from the base run: those before
    its first patched position (and before every position the narrowed metric reads)."""
    start = min(patch.pos or 0 for patch in chunk)
    return start if kept is None else min(start, int(kept.min()))


def _hooks_attached(model: HookedModel) -> bool:
    """Whether any hook other than Hugging Face's own bookkeeping (output capture) sits on a hook site."""
    for site in model._sites.values():
        for fn in (*site.module._forward_hooks.values(), *site.module._forward_pre_hooks.values()):
            owner = getattr(fn, "__module__", None) or getattr(getattr(fn, "func", None), "__module__", "")
            if not str(owner).startswith(("transformers", "accelerate")):
                return True
    return False


def _prefix_route(model: HookedModel, base, capture: bool = True) -> Any:
    """A verified ``SuffixRoute`` of ``base`` (its keys and values cached), or None.

    None while any hook is attached (a user's hooks see whole sequences; a tail run would shift
    them) and on models where the route is not exact (bidirectional encoders, other attention
    code). The verdict is remembered per model kind, batch size and length. ``capture=False``:
    the caller captures (``SuffixRoute.recording`` around a forward of ``base``).
    """
    from interp.models.suffix import suffix_route

    if _hooks_attached(model):
        return None
    route = suffix_route(model, base)
    if route is None:
        return None
    key, checks = tuple(base.input_ids.shape), model._suffix_checks
    try:
        if key not in checks:
            checks[key] = route.exact()
        elif checks[key] and capture:
            route.capture()
    except (RuntimeError, ValueError, IndexError, TypeError, NotImplementedError):
        checks[key] = False
    return route if checks[key] else None


def chunks_by(items: Sequence, copies: int, key: Callable[[Any], Any]) -> list[list]:
    """Consecutive ``items`` in runs of at most ``copies`` that share ``key``: one forward each, so
    that the model runs once up to where they differ (``HookedModel.run_copies``)."""
    chunks: list[list] = []
    for item in items:
        if chunks and len(chunks[-1]) < copies and key(chunks[-1][0]) == key(item):
            chunks[-1].append(item)
        else:
            chunks.append([item])
    return chunks


# ------------------------------------------------------------------------------------------------
# Activation patching
# ------------------------------------------------------------------------------------------------


def patch(
    model: HookedModel,
    clean: Any,
    corrupted: Any,
    site: str = "resid_pre",
    metric: Metric | Callable[[torch.Tensor], Any] | None = None,
    *,
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    neurons: Sequence[int] | None = None,
    batch_size: int | None = None,
    memory_budget: int | None = None,
    progress: Progress | None = None,
) -> PatchResult:
    """Patch clean activations into the corrupted run, one unit at a time, and measure ``metric``.

    Args:
        model: any transformer from ``interp.load`` (toy, zoo, MiniLM, HF directory).
        clean, corrupted: inputs of the same token length (text, token ids, or batches of them).
        site: one of ``SITES`` (``resid_pre``, ``attn_out``, ``mlp_out``, ``head``, ``head_pos``,
            ``pos``, ...), ``"sae_latent"`` (each latent at each position of the dictionaries
            spliced with ``model.saes``; ``neurons`` then picks latents), or hook names / a glob
            (then one patch per hook and position).
        metric: ``logit_diff(...)``, ``prob(...)``, ``kl()``, ``cosine()`` or ``fn(output) -> scalar``.
            Default: KL from clean for language models, cosine for encoders.
        layers, positions, heads, neurons: restrict the sweep to these indices.
        batch_size: patched copies per forward (default: as many as the memory budget allows, <= 256).
        memory_budget: bytes the sweep may use (default ``interp.hooks.default_memory_budget()``).
        progress: ``fn(done, total)`` called after each forward (the library itself shows tqdm).

    Returns:
        ``PatchResult`` with ``values`` shaped like ``dims`` (e.g. layer x pos x head), the metric
        after each patch, plus ``metric_clean`` and ``metric_corrupted``.
    """
    clean_t, corrupt_t = check_pair(model, clean, corrupted)
    plan_ = _site_plan(model, clean_t, site, layers, positions, heads, neurons)
    (values,), bound, clean_out, corrupt_out = _sweep_plans(
        model, clean_t, corrupt_t, [plan_], metric, batch_size, memory_budget, progress
    )
    return PatchResult(
        values,
        plan_.dims,
        plan_.labels,
        metric_clean=float(bound(clean_out)),
        metric_corrupted=float(bound(corrupt_out)),
        site=site,
        metric=bound.name,
    )


def _site_plan(model, clean_t, site, layers, positions, heads, neurons) -> Plan:
    str_tokens = (clean_t.str_tokens or [None])[0]
    units = heads if SITES.get(site, Site("", False, None)).unit == "head" else neurons
    n_pos = clean_t.input_ids.shape[1]
    return plan(
        model, site, n_pos, str_tokens, layers=layers, positions=positions, units=units, patterns=True
    )


def _sweep_plans(model, clean_t, corrupt_t, plans, metric, batch_size, memory_budget, progress):
    """Every plan's sweep on the corrupted input, from one shared clean + corrupted forward.

    Returns ``(values per plan, bound metric, clean output, corrupted output)``.
    """
    needed = sorted({h for plan_ in plans for h in plan_.hooks}, key=model.hook_names.index)
    held = cached_bytes(model, needed, clean_t, copies=2)  # captured from the clean + corrupted forward
    n_patches = max(len(plan_.patches) for plan_ in plans)
    copies = copies_per_forward(
        model, corrupt_t, n_patches, held, memory_budget, batch_size, "patching sweep"
    )
    per_pos = PREFIX_GROUPS > 1 and any(p.pos for plan_ in plans for p in plan_.patches)
    route = _prefix_route(model, corrupt_t, capture=False) if per_pos else None
    batch = clean_t.input_ids.shape[0]
    with route.recording(slice(batch, None)) if route is not None else nullcontext():  # one forward fewer
        clean_out, corrupt_out, cache = run_pair(
            model, clean_t, corrupt_t, needed, memory_budget=max(held, 1) * 4
        )
    if route is not None:
        route.captured(corrupt_out)
    metric_ = default_metric(model) if metric is None else as_metric(metric)
    metric_ = metric_.bind(clean_out, corrupt_out, clean_t.attention_mask)
    # the unpatched runs first: a metric that fails or is not finite there fails before the sweep
    _finite_metric(metric_, clean_out), _finite_metric(metric_, corrupt_out)
    results = []
    for plan_ in plans:
        sources = {h: site_view(cache[h], plan_.units[h], plan_.views.get(h, "vector")) for h in plan_.hooks}
        values = sweep(
            model, corrupt_t, sources, plan_, metric_, copies=copies, progress=progress, route=route
        )
        results.append(values)
    return results, metric_, clean_out, corrupt_out


# TransformerLens's get_act_patch_*_every: (family) -> the sites stacked on a leading "component" dim
EVERY: dict[str, tuple[str, ...]] = {
    "block": ("resid_pre", "attn_out", "mlp_out"),
    "head": ("head", "head_q", "head_k", "head_v", "head_pattern"),
    "head_pos": ("head_pos", "head_q_pos", "head_k_pos", "head_v_pos", "head_pattern_pos"),
}
_COMPONENT_LABELS = {"head": "out", "head_pos": "out"}


def patch_every(
    model: HookedModel,
    clean: Any,
    corrupted: Any,
    family: str = "block",
    metric: Metric | Callable[[torch.Tensor], Any] | None = None,
    *,
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    batch_size: int | None = None,
    memory_budget: int | None = None,
    progress: Progress | None = None,
) -> PatchResult:
    """Several sites' sweeps stacked on a leading ``component`` dim, like TransformerLens's
    ``get_act_patch_block_every`` / ``get_act_patch_attn_head_all_pos_every`` / ``..._by_pos_every``.

    Args:
        family: ``"block"``: resid_pre, attn_out, mlp_out -> ``[component, layer, pos]`` (an
            attention-only model has no mlp_out; its component labels say so by leaving it out);
            ``"head"``: each head's output, q, k, v and pattern, all positions -> ``[component,
            layer, head]``; ``"head_pos"``: the same by position -> ``[component, layer, pos, head]``
            (the pattern by destination position, moved to the same axis order, as TL does).
            Under grouped-query attention, k and v have fewer heads; the missing cells are NaN
            (TransformerLens pads them with zeros).
        the rest: as in ``patch``.

    One clean + corrupted forward serves every component.
    """
    if family not in EVERY:
        raise InputError(f"unknown family {family!r}; use one of {', '.join(EVERY)}")
    sites = [site for site in EVERY[family] if SITES[site].hook.format(layer=0) in model._sites]
    if not sites:
        raise UnknownHookError(
            f"{model.name} has none of the hooks of the {family!r} family ({EVERY[family]})"
        )
    clean_t, corrupt_t = check_pair(model, clean, corrupted)
    plans = [_site_plan(model, clean_t, site, layers, positions, heads, None) for site in sites]
    values, bound, clean_out, corrupt_out = _sweep_plans(
        model, clean_t, corrupt_t, plans, metric, batch_size, memory_budget, progress
    )
    first = plans[0]
    stacked = [_as_dims(v, plan_, first) for v, plan_ in zip(values, plans, strict=True)]
    labels = {
        "component": [
            _COMPONENT_LABELS.get(site, site.removeprefix("head_").removesuffix("_pos")) for site in sites
        ]
    }
    return PatchResult(
        torch.stack(stacked),
        ("component", *first.dims),
        {**labels, **first.labels},
        metric_clean=float(bound(clean_out)),
        metric_corrupted=float(bound(corrupt_out)),
        site=f"every {family}",
        metric=bound.name,
    )


def _as_dims(values: torch.Tensor, plan_: Plan, like: Plan) -> torch.Tensor:
    """``values`` of ``plan_`` in the dims of ``like`` (a pattern's head/dest_pos axes moved, missing
    key/value heads padded with NaN)."""
    names = [{"dest_pos": "pos"}.get(d, d) for d in plan_.dims]
    values = values.permute(*[names.index(d) for d in like.dims])
    if "head" in like.dims:
        axis = like.dims.index("head")
        missing = len(like.labels["head"]) - values.shape[axis]
        if missing > 0:
            pad = list(values.shape)
            pad[axis] = missing
            values = torch.cat([values, values.new_full(pad, math.nan)], dim=axis)
    return values


# ------------------------------------------------------------------------------------------------
# Subspace (interchange) patching
# ------------------------------------------------------------------------------------------------


def orthonormal_basis(basis: torch.Tensor, width: int, hook: str) -> torch.Tensor:
    """``basis [width, k]`` -> an orthonormal ``Q [width, k]`` spanning the same subspace (QR).

    Raises for a basis of the wrong width or one whose columns are linearly dependent.
    """
    basis = torch.as_tensor(basis)
    if basis.ndim == 1:
        basis = basis[:, None]
    if basis.ndim != 2 or basis.shape[0] != width:
        raise InputError(
            f"the basis for {hook} must be [d, k] with d = {width} (the activation's width per position); "
            f"got shape {tuple(basis.shape)}. Give one column per direction (transpose a [k, d] basis)."
        )
    if basis.shape[1] == 0:
        raise InputError(f"the basis for {hook} has no columns; give at least one direction [d, k >= 1]")
    double = basis.double().cpu()
    rank = int(torch.linalg.matrix_rank(double))
    if rank < basis.shape[1]:
        raise InputError(
            f"the basis for {hook} has {basis.shape[1]} columns but spans only {rank} dimensions (its columns "
            "are linearly dependent); drop the redundant directions"
        )
    return torch.linalg.qr(double).Q


def patch_subspace(
    model: HookedModel,
    clean: Any,
    corrupted: Any,
    hook_name: str,
    basis: torch.Tensor,
    metric: Metric | Callable[[torch.Tensor], Any] | None = None,
    *,
    positions: Sequence[int] | None = None,
) -> PatchResult:
    """Interchange intervention on a subspace (pyvene / DAS): in the corrupted run, at ``hook_name``,
    the component along ``span(basis)`` is replaced by the clean run's; the rest stays corrupted.

    ``act <- act + (clean - act) Q Q^T`` where ``Q`` is an orthonormal basis of ``span(basis)``:
    the columns are orthonormalised (QR), so any basis of the subspace gives the same result, and a
    full basis equals patching the whole activation. Dependent columns or a wrong width raise.

    Args:
        hook_name: a ``[batch, pos, ...]`` hook (``blocks.1.hook_resid_pre``, ``blocks.0.attn.hook_z``...);
            the subspace lives in its per-position vector (``d`` = every dim after pos, flattened).
        basis: ``[d, k]``, one direction per column.
        metric: as in ``patch``.
        positions: the positions intervened on (default: all), all in the same forward.

    Returns:
        ``PatchResult`` with one value (dim ``subspace``) and ``metric_clean`` / ``metric_corrupted``.
    """
    clean_t, corrupt_t = check_pair(model, clean, corrupted)
    hooks = model.resolve(hook_name)
    if len(hooks) != 1:
        raise InputError(f"patch_subspace patches one hook; {hook_name!r} names {len(hooks)}: {hooks[:3]}")
    hook = hooks[0]
    shape = model.hook_shapes.get(hook)
    if not _is_pos_shaped(shape) or not all(isinstance(d, int) for d in shape[2:]):
        raise InputError(
            f"{hook} is not a [batch, pos, ...] activation (shape {shape}); use e.g. blocks.0.hook_resid_pre"
        )
    width = math.prod(shape[2:])
    n_pos = clean_t.input_ids.shape[1]
    pos_list = _subset(list(range(n_pos)), positions, "positions")
    q = orthonormal_basis(basis, width, hook)
    clean_out, corrupt_out, cache = run_pair(model, clean_t, corrupt_t, [hook])
    metric_ = default_metric(model) if metric is None else as_metric(metric)
    metric_ = metric_.bind(clean_out, corrupt_out, clean_t.attention_mask)
    at = torch.zeros(n_pos, dtype=torch.bool)
    at[pos_list] = True

    def swap(act: torch.Tensor, ctx: Any) -> torch.Tensor:
        flat = rearrange(act, "b p ... -> b p (...)")
        delta = rearrange(cache[hook], "b p ... -> b p (...)").to(flat) - flat
        proj = q.to(flat)
        moved = flat + (delta @ proj) @ proj.T
        return torch.where(at.to(act.device)[None, :, None], moved, flat).reshape(act.shape)

    output = model.run_with_hooks(corrupt_t, [(hook, swap)])
    return PatchResult(
        torch.tensor([float(metric_(output))]),
        ("subspace",),
        {"subspace": [f"{hook} span of {q.shape[1]}"]},
        metric_clean=float(metric_(clean_out)),
        metric_corrupted=float(metric_(corrupt_out)),
        method="subspace patching",
        site=hook,
        metric=metric_.name,
    )


def _finite_metric(metric: Metric, output: torch.Tensor) -> float:
    """``float(metric(output))`` for an unpatched run, refused when not finite (a baseline of NaN
    makes every patched value meaningless)."""
    value = metric(output)
    require_finite(value.detach().float().reshape(-1), f"the metric ({metric.name}) of an unpatched run",
                   "Check the metric and the inputs.")  # fmt: skip
    return float(value)


def has_logits(model: HookedModel) -> bool:
    """True when the model ends in an unembedding (its output is logits over a vocabulary)."""
    return any(name in model._sites for name in ("unembed.hook_in", "unembed.hook_out"))


def default_metric(model: HookedModel) -> Metric:
    """KL from clean for language models; cosine similarity to clean for encoders."""
    return kl() if has_logits(model) else cosine()


def describe_sites(model: HookedModel) -> dict[str, str]:
    """The sites this model supports, with what each patch replaces."""
    out = {}
    for name, spec in SITES.items():
        if spec.hook.format(layer=0) in model._sites:
            out[name] = spec.description
    return out


__all__ = [
    "SAE_LATENT",
    "SITES",
    "Metric",
    "Patch",
    "PatchResult",
    "as_metric",
    "cosine",
    "describe_sites",
    "kl",
    "has_logits",
    "plan",
    "sweep",
    "logit_diff",
    "orthonormal_basis",
    "patch",
    "patch_every",
    "patch_subspace",
    "prob",
]
