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

For transformers, ``unit_layers(model)`` lists the hooks whose units are neurons or heads, and
``sample_inputs(model)`` is a small built-in dataset (``SAMPLE_TEXTS``, or repeated random token
sequences for a model without a tokenizer), so a unit's examples can be looked at without data:

    >>> top = top_k(lm, sample_inputs(lm), unit_layers(lm)["MLP neurons"][2], k=10)
    >>> top.strongest(5)                                                 # the units worth a look
    >>> top.samples_html(7)                                              # one row per context
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

SAMPLE_TEXTS: tuple[str, ...] = (
    "When Mary and John went to the store, John gave a drink to Mary.",
    "The cat sat on the mat, and then the cat fell asleep in the sun.",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
    "She paid $42.50 for three books on 12 March 2021.",
    "def add(a, b):\n    return a + b",
    "import numpy as np\nx = np.zeros((3, 4))",
    "The mitochondria is the powerhouse of the cell.",
    "Water boils at 100 degrees Celsius at sea level.",
    "He scored two goals in the second half, and the crowd went wild.",
    "The stock market fell sharply on Monday after the announcement.",
    "Please send the report to alice@example.com by Friday.",
    "Once upon a time, in a small village, there lived an old woman.",
    "The quick brown fox jumps over the lazy dog.",
    "I don't think that's a good idea, but let's try it anyway.",
    "The patient was given 5 mg of the drug twice a day.",
    "Photosynthesis converts light energy into chemical energy.",
    "The court ruled that the law was unconstitutional.",
    "Add two cups of flour, one egg and a pinch of salt.",
    "The train to London leaves at 9:15 from platform 4.",
    "Shakespeare wrote Hamlet, Macbeth and King Lear.",
    "The Pacific Ocean is larger than all of the land on Earth combined.",
    "Why did the chicken cross the road? To get to the other side!",
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10",
    "Monday, Tuesday, Wednesday, Thursday, Friday, Saturday, Sunday",
    "The red ball, the blue ball and the green ball rolled down the hill.",
    "Harry Potter and the Philosopher's Stone was published in 1997.",
    "The algorithm runs in O(n log n) time and uses linear memory.",
    "Tokyo, New York and London are among the largest cities in the world.",
    "The rain in Spain stays mainly in the plain.",
    "If it rains tomorrow, we will stay at home and watch a film.",
    "The committee will meet again next week to discuss the budget.",
    "A dog, a cat and a horse were standing in the field.",
    "Einstein published the theory of general relativity in 1915.",
    "The password must contain at least eight characters and one number.",
    "Click the button below to download the latest version.",
    "Bananas are yellow, apples are red, and grapes are purple.",
    "The museum is open from 10 am to 6 pm, except on Mondays.",
    "She whispered, 'Do not open the door,' and then she left.",
    "The ship sank in the storm, but all of the sailors survived.",
    "Mr. Smith said that Mr. Smith would never forget that day.",
    "The sun rises in the east and sets in the west.",
    "Our new phone has a faster chip, a better camera and a bigger battery.",
    "The war ended in 1945, and the treaty was signed two years later.",
    "To be, or not to be, that is the question.",
    "The function returns None if the key is not found in the dictionary.",
    "Green tea, black tea and coffee all contain caffeine.",
    "The children laughed and played in the snow all afternoon.",
    "Alice gave Bob the keys, and Bob gave Alice the map.",
)
"""The built-in text set for dataset examples of transformer units: 48 short texts of varied
kinds (names, places, numbers, dates, prices, code, lists, quotes, repeated names), so that
different units can show different preferences. Small enough that the top contexts of every unit
of one MiniLM layer take about 1.5 s on one CPU thread."""


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

    def strongest(self, n: int = 10) -> list[tuple[int, float]]:
        """The ``n`` units whose best example scores highest, as ``(unit, score)``: where to look
        first among a layer's many neurons."""
        best = self.scores[:, 0]
        order = torch.argsort(best, descending=True, stable=True)[:n]
        return [(self.units[i], float(best[i])) for i in order.tolist()]

    def samples_html(self, unit: int, k: int | None = None, unit_name: str = "Unit") -> str:
        """Transformers: the top ``k`` (default all) contexts of ``unit``, best first, one row of
        circuitsvis colored tokens per context on a shared color scale (circuitsvis
        ``topk_samples``, script inlined, so it renders offline). Unlike ``html()``, each context
        gets its own row, and the one JavaScript bundle serves them all."""
        from circuitsvis.topk_samples import topk_samples

        if self.str_tokens is None:
            raise InputError("samples_html() shows token contexts; for an image model use figure(unit)")
        r = self.row(unit)
        k = len(self.str_tokens[r]) if k is None else k
        if not isinstance(k, int) or k < 1:
            raise InputError(f"k must be a positive integer, got {k!r}")
        tokens = [readable_tokens([str(t) for t in strs]) for strs in self.str_tokens[r][:k]]
        values = [np.round(np.asarray(m, dtype=float), 4).tolist() for m in self.maps[r][:k]]
        view = topk_samples(
            [[tokens]],
            [[values]],
            zeroth_dimension_name="Layer",
            first_dimension_name=unit_name,
            zeroth_dimension_labels=[self.layer],
            first_dimension_labels=[str(unit)],
        )
        return view.local_src


def readable_tokens(tokens: Sequence[str]) -> list[str]:
    """Tokens as they read when drawn side by side: a space before each word.

    Byte-level tokens (GPT-2's ``" cat"``) carry their own spaces and are kept; otherwise
    (WordPiece's ``"the"``, ``"##ing"``, or id names ``"t3"``) each token gets a leading space,
    except WordPiece continuations, which join the previous token without their ``##``.
    """
    tokens = list(tokens)
    if any(t[:1].isspace() for t in tokens):
        return tokens
    out = []
    for i, t in enumerate(tokens):
        if t.startswith("##") and len(t) > 2:
            out.append(t[2:])
        else:
            out.append(t if i == 0 else " " + t)
    return out


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


def unit_layers(model: HookedModel) -> dict[str, list[str]]:
    """A transformer's hooks whose units are neurons or heads, by kind (kinds it lacks are left out).

    * ``"MLP neurons"``: ``blocks.{i}.mlp.hook_post``, one unit per neuron, its map the neuron's
      activation at each token.
    * ``"Heads: output norm"``: ``blocks.{i}.attn.hook_z`` where it has a head axis; the map is the
      norm of the head's z (its value-weighted mix, before ``W_O``) at each token: how much the
      head moves there.
    * ``"Heads: max attention"``: ``blocks.{i}.attn.hook_pattern``; the map is each query token's
      largest attention weight (how sharply the head attends from there).
    """
    if model.kind != "transformer":
        raise InputError(
            f"{model.name} is not a transformer; its units are channels (see top_k and figure())"
        )
    shapes = model.hook_shapes
    kinds = {
        "MLP neurons": [n for n in shapes if n.endswith(".mlp.hook_post")],
        "Heads: output norm": [
            n for n, s in shapes.items() if n.endswith(".attn.hook_z") and s is not None and len(s) == 4
        ],
        "Heads: max attention": [n for n in shapes if n.endswith(".attn.hook_pattern")],
    }
    return {kind: names for kind, names in kinds.items() if names}


def sample_inputs(model: HookedModel, *, n: int = 48, half_len: int = 16, seed: int = 0) -> Any:
    """A small built-in dataset for the dataset examples of a transformer's units.

    A model with a tokenizer gets the first ``n`` of ``SAMPLE_TEXTS``. One that reads token ids only
    (e.g. ``zoo:induction-2l``) gets ``n`` seeded sequences of ``half_len`` random tokens repeated
    once, ``[r, r]``: on these, previous-token and induction heads show their pattern.
    """
    if model.kind != "transformer":
        raise InputError(f"{model.name} is not a transformer; pass its own inputs (e.g. an image tensor)")
    if not isinstance(n, int) or n < 1:
        raise InputError(f"n must be a positive integer, got {n!r}")
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None and not getattr(tokenizer, "is_id_vocabulary", False):  # zoo names are not text
        return list(SAMPLE_TEXTS[:n])
    half = min(half_len, (model.n_ctx or 2 * half_len) // 2)
    gen = torch.Generator().manual_seed(seed)
    r = torch.randint(0, model.d_vocab or 2, (n, half), generator=gen)
    return torch.cat([r, r], dim=1)


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
    strs = [[_str_tokens(rows[i]) for i in indices[u].tolist()] for u in range(len(chosen))]
    return maps, strs


def _str_tokens(row: dict[str, Any]) -> list[str]:
    """One captured example's token strings; the token ids as text for a model without a tokenizer."""
    if "str_tokens" in row:
        return list(row["str_tokens"])
    return [str(int(t)) for t in row["input_ids"]]


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
