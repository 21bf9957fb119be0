"""Dataset examples: the top-k activating inputs of each unit, streamed with bounded memory.

    >>> top = top_k(model, x_test, "conv2.hook_out", k=10)             # every channel of conv2
    >>> top.indices[5], top.scores[5]                                   # channel 5's best images
    >>> top.figure(5)                                                    # images + activation maps
    >>> top = top_k(lm, texts, "blocks.0.mlp.hook_post", units=[7, 9])
    >>> top.html(7)                                                      # circuitsvis colored tokens

The activations are written once to Arrow shards with ``interp.capture_to_disk`` (resumable, and
reusable by passing the same ``out_dir``), then read back ``batch_size`` examples at a time; only
the running top-k scores stay in memory, and the activation maps are read for the k winners only.

A *unit* and its *map* per kind of activation (one example, no batch axis):

* image models ``[C, *spatial]`` (conv channels): unit = channel, map = the channel's spatial map;
  ``[F]`` (linear layers): unit = feature, no map.
* transformers ``[pos, d]`` (MLP neurons, residual dims): unit = dim, map over tokens;
  ``[pos, head, d_head]`` (``hook_z``, ``hook_q``...): unit = head, map = the vector norm per token;
  ``[head, query, key]`` (``hook_pattern``): unit = head, map = each query's largest weight.

A unit's score for an example is the max (or mean) of its map.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from einops import rearrange, reduce

from interp.errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    import plotly.graph_objects as go

    from interp.models.base import HookedModel

Progress = Callable[[int, int], None]


@dataclass
class TopExamples:
    """The top-k examples per unit, best first.

    Attributes:
        layer: the hook name; ``units``: the unit indices, in the order of the rows below.
        indices: ``[U, k]`` example indices into the inputs; ``scores``: ``[U, k]`` their scores.
        maps: ``maps[u][r]``: unit row u's activation map on its r-th example (None for ``[F]`` layers).
        str_tokens: transformers: ``str_tokens[u][r]`` the tokens of that example.
        inputs: the inputs (kept by reference, to draw images).
        config: k, reduce, batch_size, out_dir.
    """

    layer: str
    units: list[int]
    indices: torch.Tensor
    scores: torch.Tensor
    maps: list[list[np.ndarray | None]]
    str_tokens: list[list[list[str]]] | None
    inputs: Any
    config: dict[str, Any]

    def row(self, unit: int) -> int:
        """The row of ``unit`` in ``indices``/``scores``."""
        if unit not in self.units:
            raise InputError(f"unit {unit} was not collected; collected units: {_fmt(self.units)}")
        return self.units.index(unit)

    def figure(self, unit: int) -> go.Figure:
        """Image models: each top image above its activation map (upsampled to the image size)."""
        from interp.methods.featureviz import image_grid_figure

        if self.str_tokens is not None:
            raise InputError("figure() draws images; for a transformer use html(unit)")
        r = self.row(unit)
        images = torch.as_tensor(
            np.asarray(self.inputs) if not isinstance(self.inputs, torch.Tensor) else self.inputs
        )
        panels, titles = [], []
        for rank, (i, s) in enumerate(zip(self.indices[r].tolist(), self.scores[r].tolist(), strict=True)):
            panels.append(images[i].float().mean(0))
            titles.append(f"#{i} ({s:.3g})")
            if self.maps[r][rank] is not None:
                panels.append(self.maps[r][rank])
                titles.append("map")
        per_row = len(panels) // len(self.indices[r])
        grid = [panels[j * per_row + p] for p in range(per_row) for j in range(len(self.indices[r]))]
        names = [titles[j * per_row + p] for p in range(per_row) for j in range(len(self.indices[r]))]
        return image_grid_figure(grid, names, columns=len(self.indices[r]))

    def html(self, unit: int) -> str:
        """Transformers: the top contexts of ``unit`` as circuitsvis colored tokens (one view, the
        contexts separated by a marker token; script inlined, so it renders offline)."""
        from circuitsvis.tokens import colored_tokens

        if self.str_tokens is None:
            raise InputError("html() shows token contexts; for an image model use figure(unit)")
        r = self.row(unit)
        tokens: list[str] = []
        values: list[float] = []
        for rank, strs in enumerate(self.str_tokens[r]):
            if rank:
                tokens.append(" ‖ ")
                values.append(0.0)
            tokens += [str(t) for t in strs]
            values += np.asarray(self.maps[r][rank], dtype=float).tolist()
        top = max(max(abs(v) for v in values), 1e-12)
        return colored_tokens(tokens, values, min_value=-top, max_value=top).local_src


def top_k(
    model: HookedModel,
    inputs: Any,
    layer: str,
    *,
    units: Sequence[int] | None = None,
    k: int = 10,
    reduce_by: str = "max",
    batch_size: int = 64,
    out_dir: str | os.PathLike | None = None,
    progress: bool = False,
    callback: Progress | None = None,
) -> TopExamples:
    """The ``k`` examples of ``inputs`` that activate each unit of ``layer`` most.

    Args:
        model: any ``HookedModel``.
        inputs: what ``interp.capture_to_disk`` takes (image tensor ``[N, ...]``, texts, token ids).
        layer: one hook name.
        units: unit indices (default: all units of the layer).
        k: examples per unit.
        reduce_by: ``"max"`` or ``"mean"`` of the unit's map.
        batch_size: examples per forward and per read-back chunk.
        out_dir: where the capture lives (reused if it already holds this capture); default a
            temporary folder deleted afterwards.
        progress: tqdm bar during the capture; ``callback(done, total)`` after each read-back chunk.
    """
    from interp.store import capture_to_disk

    (name,) = _one_name(model, layer)
    if reduce_by not in ("max", "mean"):
        raise InputError(f"reduce_by must be 'max' or 'mean', got {reduce_by!r}")
    if not isinstance(k, int) or k < 1:
        raise InputError(f"k must be a positive integer, got {k!r}")
    with tempfile.TemporaryDirectory(prefix="interp-examples-") as tmp:
        ds = capture_to_disk(model, inputs, [name], out_dir or tmp, batch_size=batch_size, progress=progress)
        result = _scan(model, ds, name, units, k, reduce_by, batch_size, inputs, callback)
    result.config["out_dir"] = None if out_dir is None else str(out_dir)
    return result


def channel_maps(
    model: HookedModel, inputs: Any, layer: str, units: Sequence[int] | None = None
) -> torch.Tensor:
    """Spatial activation maps ``[B, U, *spatial]`` of channels of ``layer`` (in memory, small batches)."""
    (name,) = _one_name(model, layer)
    _, cache = model.run_with_cache(inputs, names=name, stop_early=True)
    act = cache[name]
    if act.ndim < 3:
        raise InputError(
            f"{name} has no spatial dimensions (shape {tuple(act.shape)}), so it has no channel maps; "
            "pick a convolutional layer (e.g. conv1.hook_out)"
        )
    chosen = _check_units(units, act.shape[1], name)
    return act[:, chosen]


# ------------------------------------------------------------------------------------------------
# Internals
# ------------------------------------------------------------------------------------------------


def _one_name(model: HookedModel, layer: str) -> list[str]:
    names = model.resolve(layer)
    if len(names) != 1:
        raise InputError(f"{layer!r} matches {len(names)} hook points; give one name (e.g. {names[0]!r})")
    return names


def _scan(
    model: HookedModel,
    ds: Any,
    name: str,
    units: Sequence[int] | None,
    k: int,
    reduce_by: str,
    batch_size: int,
    inputs: Any,
    callback: Progress | None,
) -> TopExamples:
    transformer = model.kind == "transformer"
    n = len(ds)
    best_scores: torch.Tensor | None = None
    best_index: torch.Tensor | None = None
    chosen: torch.Tensor | None = None
    column = ds.select_columns([name])
    for start in range(0, n, batch_size):
        rows = column[start : start + batch_size][name]
        rows = list(rows) if not isinstance(rows, torch.Tensor) else rows
        if chosen is None:
            size = _unit_maps(rows[0], name, transformer).shape[0]
            chosen = _check_units(units, size, name)
        scores = torch.stack([_score(_unit_maps(r, name, transformer)[chosen], reduce_by) for r in rows])
        index = torch.arange(start, start + len(rows)).unsqueeze(1).expand_as(scores)
        if best_scores is not None:
            scores, index = torch.cat([best_scores, scores]), torch.cat([best_index, index])
        top = torch.topk(scores, min(k, len(scores)), dim=0)
        best_scores, best_index = top.values, index.gather(0, top.indices)
        if callback is not None:
            callback(min(start + batch_size, n), n)
    assert best_scores is not None and best_index is not None and chosen is not None
    indices, scores = best_index.T.contiguous(), best_scores.T.contiguous()
    maps, strs = _winners(ds, name, chosen, indices, transformer)
    config = {"k": k, "reduce_by": reduce_by, "batch_size": batch_size, "n_examples": n}
    return TopExamples(name, chosen.tolist(), indices, scores, maps, strs, inputs, config)


def _winners(
    ds: Any, name: str, chosen: torch.Tensor, indices: torch.Tensor, transformer: bool
) -> tuple[list[list[np.ndarray | None]], list[list[list[str]]] | None]:
    """Read the activation maps (and tokens) of the winning examples only."""
    rows = {i: ds[i] for i in sorted(set(indices.flatten().tolist()))}
    maps: list[list[np.ndarray | None]] = []
    for u_row, unit in enumerate(chosen.tolist()):
        per_rank = []
        for i in indices[u_row].tolist():
            m = _unit_maps(rows[i][name], name, transformer)[unit]
            per_rank.append(m.numpy() if m.ndim else None)
        maps.append(per_rank)
    if not transformer:
        return maps, None
    strs = [[list(rows[i]["str_tokens"]) for i in indices[u].tolist()] for u in range(len(chosen))]
    return maps, strs


def _unit_maps(act: torch.Tensor, name: str, transformer: bool) -> torch.Tensor:
    """One example's activation as ``[unit, *map]`` (see the module docstring)."""
    act = act.float()
    if not transformer:
        return act
    if name.endswith(("hook_pattern", "hook_attn_scores")) and act.ndim == 3:
        return reduce(act, "head q k -> head q", "max")
    if act.ndim == 3:
        return rearrange(act.norm(dim=-1), "pos head -> head pos")
    if act.ndim == 2:
        return rearrange(act, "pos d -> d pos")
    raise InputError(f"cannot read units of {name} with per-example shape {tuple(act.shape)}")


def _score(maps: torch.Tensor, reduce_by: str) -> torch.Tensor:
    flat = maps.reshape(maps.shape[0], -1)
    return flat.amax(-1) if reduce_by == "max" else flat.mean(-1)


def _check_units(units: Sequence[int] | None, size: int, name: str) -> torch.Tensor:
    if units is None:
        return torch.arange(size)
    chosen = torch.as_tensor(list(units)).long().flatten()
    if chosen.numel() == 0:
        raise InputError("units is empty; give unit indices or None for all")
    bad = chosen[(chosen < 0) | (chosen >= size)]
    if bad.numel():
        raise InputError(
            f"unit index {int(bad[0])} is out of range: {name} has {size} units (valid: 0-{size - 1})"
        )
    return chosen


def _fmt(units: Sequence[int]) -> str:
    return ", ".join(map(str, list(units)[:10])) + (" ..." if len(units) > 10 else "")
