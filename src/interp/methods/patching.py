"""Batched activation patching: many patches per forward pass, one result type for every method.

TransformerLens 4.3's ``patching`` runs one full forward per patched (layer, position, head). Here the
clean and corrupted runs share one forward, then each forward carries K copies of the base input
along the batch axis; copy ``k`` replaces exactly one unit (a position, a head, a neuron...) through
a boolean mask in the hook of its layer. The copies are identical until that hook, so the model
runs once up to it and the copies are stacked there (``HookedModel.run_copies``; on a head sweep,
the q/k/v projections and attention pattern of the patched layer also run once). K comes from the
memory budget, so a sweep of any size runs in bounded memory.

    >>> from interp.methods import patching as P
    >>> result = P.patch(model, clean, corrupted, site="head_pos", metric=P.logit_diff(7, 3))
    >>> result.values.shape, result.dims          # (n_layers, n_pos, n_heads), ("layer", "pos", "head")
    >>> result.normalized().figure()

The same engine runs ablations (:mod:`interp.methods.ablation`) and path patching
(:mod:`interp.methods.path_patching`); attribution patching and DLA return the same ``PatchResult``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from einops import rearrange
from tqdm.auto import tqdm

from interp.checks import finite_checks_on, require_finite
from interp.errors import CaptureTooLargeError, InputError, UnknownHookError, closest
from interp.hooks import HookPoint, concrete_numel, default_memory_budget
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
    """

    hook: str
    per_pos: bool
    unit: str | None
    layers: bool = True
    description: str = ""

    @property
    def dims(self) -> tuple[str, ...]:
        dims = ("layer",) if self.layers else ()
        dims += ("pos",) if self.per_pos else ()
        return dims + ((self.unit,) if self.unit else ())


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
) -> Plan:
    """Enumerate the patches of a sweep over ``site`` (a name in ``SITES``, ``"sae_latent"``, or
    hook names / a glob)."""
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
    pos_list = _subset(list(range(n_pos)), positions, "positions") if spec.per_pos else [None]
    hooks = [spec.hook.format(layer=layer) for layer in chosen_layers]
    n_units = _n_units(model, spec, hooks[0])
    unit_list = _subset(list(range(n_units)), units, f"{spec.unit}s") if spec.unit else [None]
    patches = [Patch(h, p, u) for h in hooks for p in pos_list for u in unit_list]
    labels: dict[str, list[str]] = {}
    if spec.layers:
        labels["layer"] = [f"L{layer}" for layer in chosen_layers]
    if spec.per_pos:
        labels["pos"] = [_pos_label(p, str_tokens) for p in pos_list]
    if spec.unit:
        labels[spec.unit] = [f"{spec.unit[0].upper()}{u}" for u in unit_list]
    shape = tuple(len(labels[d]) for d in spec.dims)
    return Plan(site, spec.dims, labels, shape, patches, hooks, dict.fromkeys(hooks, n_units))


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


def _n_units(model: HookedModel, spec: Site, hook: str) -> int:
    if spec.unit == "head":
        return n_heads(model)
    if spec.unit == "neuron":
        return int(model.hook_shapes[hook][-1])
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
    masks: dict[str, torch.Tensor] = {}
    for k, patch in enumerate(chunk):
        if patch.hook not in masks:
            masks[patch.hook] = torch.zeros(len(chunk), n_pos, plan_.units[patch.hook], dtype=torch.bool)
        pos = slice(None) if patch.pos is None else patch.pos
        unit = slice(None) if patch.unit is None else patch.unit
        masks[patch.hook][k, pos, unit] = True
    return {h: m.to(device) for h, m in masks.items()}


def splice(mask: torch.Tensor, source: torch.Tensor, units: int) -> Callable:
    """A hook that writes ``source[batch, pos, unit, rest]`` where ``mask[copies, pos, unit]`` is set."""
    copies = mask.shape[0]
    keep = mask[:, None, :, :, None]

    def hook(act: torch.Tensor, ctx: Any) -> torch.Tensor:
        view = rearrange(unit_view(act, units), "(k b) p u r -> k b p u r", k=copies)
        src = source.to(act.dtype)
        return torch.where(keep, src[None], view).reshape(act.shape)

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
) -> torch.Tensor:
    """Run every patch of ``plan_`` on the ``base`` input, ``copies`` patches per forward.

    ``sources[hook]`` is the ``[batch|1, pos, unit, rest]`` value a patch writes (the clean
    activation for patching; zeros, a mean or a resample for ablation). Each forward holds patches
    of one hook, and the model runs once up to that hook (``HookedModel.run_copies``). When the
    metric reads one position per prompt (``Metric.positions_read``), the unembedding is computed
    there alone. Returns the metric per patch, shaped like ``plan_.shape``.
    """
    n_pos = base.input_ids.shape[1]
    out = torch.empty(len(plan_.patches))
    total = len(plan_.patches)
    bar = tqdm(total=total, desc=desc, disable=progress is not None or total <= copies, leave=False)
    kept = metric.positions_read()
    narrow = kept is not None and UNEMBED_INPUT in model._sites and model.can_keep_positions(UNEMBED_INPUT)
    read = metric.at_kept_positions() if narrow else metric
    start = 0
    for chunk in chunks_by(plan_.patches, copies, key=lambda patch: patch.hook):
        masks = _masks(chunk, plan_, n_pos, base.input_ids.device)
        hooks = [(h, splice(m, sources[h], plan_.units[h])) for h, m in masks.items()]
        with model.keeping_positions(UNEMBED_INPUT, kept) if narrow else nullcontext():
            output = model.run_copies(base, len(chunk), hooks, shared_until=chunk[0].hook)
        output = rearrange(output, "(k b) ... -> k b ...", k=len(chunk))
        values = read.batched(output).detach().float().cpu()
        require_finite(values, f"the metric ({read.name}) after patching {chunk[0].hook}",
                       "The patched model or the metric produced NaN/inf; check the metric and the inputs.")  # fmt: skip
        out[start : start + len(chunk)] = values
        start += len(chunk)
        bar.update(len(chunk))
        if progress is not None:
            progress(start, total)
    bar.close()
    return out.reshape(plan_.shape)


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
    str_tokens = (clean_t.str_tokens or [None])[0]
    units = heads if SITES.get(site, Site("", False, None)).unit == "head" else neurons
    plan_ = plan(
        model, site, clean_t.input_ids.shape[1], str_tokens, layers=layers, positions=positions, units=units
    )
    needed = sorted(set(plan_.hooks), key=model.hook_names.index)
    held = cached_bytes(model, needed, clean_t, copies=2)  # captured from the clean + corrupted forward
    copies = copies_per_forward(
        model, corrupt_t, len(plan_.patches), held, memory_budget, batch_size, "patching sweep"
    )
    clean_out, corrupt_out, cache = run_pair(
        model, clean_t, corrupt_t, needed, memory_budget=max(held, 1) * 4
    )
    metric_ = default_metric(model) if metric is None else as_metric(metric)
    metric_ = metric_.bind(clean_out, corrupt_out, clean_t.attention_mask)
    # the unpatched runs first: a metric that fails or is not finite there fails before the sweep
    metric_clean, metric_corrupted = _finite_metric(metric_, clean_out), _finite_metric(metric_, corrupt_out)
    sources = {h: unit_view(cache[h], plan_.units[h]) for h in needed}
    values = sweep(model, corrupt_t, sources, plan_, metric_, copies=copies, progress=progress)
    return PatchResult(
        values,
        plan_.dims,
        plan_.labels,
        metric_clean=metric_clean,
        metric_corrupted=metric_corrupted,
        site=site,
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
    "patch",
    "prob",
]
