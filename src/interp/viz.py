"""Figures for activations and attention: plotly figures and self-contained circuitsvis HTML.

Nothing here imports streamlit: the same figures serve scripts, notebooks, the CLI and the explorer.

    >>> from interp import viz
    >>> out, cache = model.run_with_cache("The cat sat.", names="blocks.0.*")
    >>> tokens = cache.meta["str_tokens"][0]
    >>> viz.activation_figure(cache["blocks.0.hook_resid_post"][0], "resid_post 0", tokens).show()
    >>> html = viz.attention_heads_html(cache["pattern", 0][0], tokens)   # works offline

Activations with more than two axes are shown one 2-D slice at a time: ``display_axes`` says which
two axes to keep (the token axes where it can) and ``take_slice`` fixes the others.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from interp.errors import InputError

MAX_TICKS = 64  # beyond this many tokens an axis labels every k-th one
# circuitsvis's all-heads view draws every head at every (query, key) pair: at 300 MiniLM tokens it
# froze the browser for 46 s (a 16 MB page). Up to this many tokens it stays interactive.
MAX_ATTENTION_VIEW_TOKENS = 128
Dim = int | str


def to_numpy(tensor: Any) -> np.ndarray:
    """A float numpy copy of a torch tensor, numpy array or nested list."""
    if hasattr(tensor, "detach"):
        tensor = tensor.detach().cpu().float().numpy()
    return np.asarray(tensor, dtype=np.float64)


# ----------------------------------------------------------------------------------------------
# Choosing a 2-D view of a larger activation
# ----------------------------------------------------------------------------------------------


def display_axes(dims: Sequence[Dim]) -> tuple[int, ...]:
    """Which axes of an activation to draw (at most two), given its dims without the batch axis.

    ``dims`` uses the symbolic names of ``model.hook_shapes`` (``"pos"``) or plain sizes. Keeps
    both token axes of an attention pattern (``[head, pos, pos]`` -> ``(1, 2)``), else the token
    axis and the last axis (``[pos, head, d_head]`` -> ``(0, 2)``), else the last two axes
    (``[channel, h, w]`` -> ``(1, 2)``).
    """
    n = len(dims)
    if n <= 2:
        return tuple(range(n))
    pos = [i for i, d in enumerate(dims) if d == "pos"]
    if len(pos) >= 2:
        return (pos[0], pos[1])
    if pos and pos[0] != n - 1:
        return (pos[0], n - 1)
    return (n - 2, n - 1)


def take_slice(tensor: Any, keep: Sequence[int], index: Mapping[int, int] | None = None) -> np.ndarray:
    """Fix every axis not in ``keep`` at ``index[axis]`` (default 0); returns the kept axes in order."""
    array = to_numpy(tensor)
    index = dict(index or {})
    if any(not 0 <= k < array.ndim for k in keep):
        raise InputError(f"axes to keep {tuple(keep)} are out of range for a {array.ndim}-D activation")
    selector: list[Any] = []
    for axis, size in enumerate(array.shape):
        if axis in keep:
            selector.append(slice(None))
            continue
        i = index.get(axis, 0)
        if not -size <= i < size:
            raise InputError(f"index {i} is out of range for axis {axis} of size {size}")
        selector.append(i)
    return array[tuple(selector)]


# ----------------------------------------------------------------------------------------------
# Plotly figures
# ----------------------------------------------------------------------------------------------


def _token_ticks(tokens: Sequence[str]) -> dict[str, Any]:
    """Tick positions and labels for a token axis (numeric, so repeated tokens stay apart)."""
    step = max(1, math.ceil(len(tokens) / MAX_TICKS))
    positions = list(range(0, len(tokens), step))
    return {
        "tickmode": "array",
        "tickvals": positions,
        "ticktext": [str(tokens[i]) for i in positions],
    }


def activation_figure(
    tensor: Any,
    title: str,
    tokens: Sequence[str] | None = None,
    *,
    token_axes: Sequence[int] | None = None,
    axis_titles: Sequence[str] | None = None,
):
    """A heatmap of a 2-D activation (``[pos, d]``, ``[q, k]``...) or a line plot of a 1-D one.

    Args:
        tensor: a torch tensor or array with one or two axes; pick a slice of larger ones first
            (``take_slice``). The heatmap's ``z`` is the tensor itself: row ``i`` is ``tensor[i]``.
        title: the figure title (e.g. the hook name).
        tokens: token strings; they label each axis listed in ``token_axes``.
        token_axes: which axes are token positions. Default: every axis as long as ``tokens``.
        axis_titles: titles for the axes in tensor order (default ``"position"``/``"dim"``...).
    """
    import plotly.graph_objects as go

    array = to_numpy(tensor)
    if array.ndim not in (1, 2):
        raise InputError(
            f"activation_figure draws 1-D or 2-D tensors; got shape {tuple(array.shape)}. "
            "Index the batch and pick a 2-D slice first (viz.display_axes / viz.take_slice)."
        )
    if tokens is not None:
        tokens = [str(t) for t in tokens]
        if token_axes is None:
            token_axes = [i for i, size in enumerate(array.shape) if size == len(tokens)]
        for axis in token_axes:
            if array.shape[axis] != len(tokens):
                raise InputError(
                    f"axis {axis} has size {array.shape[axis]} but {len(tokens)} tokens were given"
                )
    token_axes = list(token_axes or []) if tokens is not None else []
    if axis_titles is None:
        axis_titles = ["position" if i in token_axes else "dim" for i in range(array.ndim)]
        if array.ndim == 2 and axis_titles == ["position", "position"]:
            axis_titles = ["query position", "key position"]

    if array.ndim == 1:
        fig = go.Figure(go.Scatter(x=np.arange(array.shape[0]), y=array, mode="lines+markers"))
        fig.update_layout(xaxis_title=axis_titles[0], yaxis_title="value")
        if 0 in token_axes:
            fig.update_xaxes(**_token_ticks(tokens))
        height = 380
    else:
        finite = array[np.isfinite(array)]
        signed = finite.size > 0 and finite.min() < 0 < finite.max()
        fig = go.Figure(
            go.Heatmap(
                z=array,
                x=np.arange(array.shape[1]),
                y=np.arange(array.shape[0]),
                colorscale="RdBu" if signed else "Blues",
                reversescale=not signed,
                zmid=0 if signed else None,
                colorbar={"title": {"text": "value"}},
                hovertemplate="row %{y}<br>col %{x}<br>value %{z:.4g}<extra></extra>",
            )
        )
        fig.update_layout(xaxis_title=axis_titles[1], yaxis_title=axis_titles[0])
        fig.update_yaxes(autorange="reversed")  # row 0 on top, as the tensor reads
        if 0 in token_axes:
            fig.update_yaxes(**_token_ticks(tokens))
        if 1 in token_axes:
            fig.update_xaxes(**_token_ticks(tokens), tickangle=-45)
        height = int(min(900, max(320, 160 + 18 * min(array.shape[0], MAX_TICKS))))
    fig.update_layout(title={"text": title}, height=height, margin={"l": 60, "r": 20, "t": 50, "b": 60})
    return fig


# ----------------------------------------------------------------------------------------------
# circuitsvis
# ----------------------------------------------------------------------------------------------


def attention_heads_html(
    pattern: Any,
    tokens: Sequence[str],
    *,
    layer: int | None = None,
    causal: bool | None = None,
) -> str:
    """circuitsvis's interactive attention-heads view of one layer, as self-contained HTML.

    Args:
        pattern: ``[head, query, key]`` attention probabilities (index the batch first).
        tokens: the token strings, one per position.
        layer: names the heads ``L{layer}H{i}`` when given.
        causal: grey out the upper triangle (future keys). Default: detected from the pattern,
            so a bidirectional encoder such as BERT shows its full pattern.

    Returns:
        HTML with circuitsvis's JavaScript inlined (``local_src``): it renders with no network,
        in a browser, an iframe or a saved file. (``str()`` of a circuitsvis object would load the
        script from a CDN instead, and show nothing offline.)
    """
    from circuitsvis.attention import attention_heads

    array = to_numpy(pattern)
    tokens = [str(t) for t in tokens]
    if array.ndim != 3:
        raise InputError(
            f"attention pattern must be [head, query, key]; got shape {tuple(array.shape)}"
            + (" (index the batch first: pattern[0])" if array.ndim == 4 else "")
        )
    if array.shape[1] != len(tokens) or array.shape[2] != len(tokens):
        raise InputError(
            f"attention pattern is {array.shape[1]} x {array.shape[2]} positions but {len(tokens)} tokens were given"
        )
    if causal is None:
        upper = np.triu(np.ones(array.shape[1:], dtype=bool), k=1)
        causal = bool(np.all(np.abs(array[:, upper]) < 1e-6))
    names = [f"L{layer}H{h}" if layer is not None else f"Head {h}" for h in range(array.shape[0])]
    rendered = attention_heads(
        attention=np.round(array, 4).tolist(),  # 4 decimals: a smaller page, same picture
        tokens=tokens,
        attention_head_names=names,
        mask_upper_tri=causal,
    )
    return rendered.local_src


# ----------------------------------------------------------------------------------------------
# Inputs for models whose tokens are ids
# ----------------------------------------------------------------------------------------------


def is_id_vocabulary(model: Any) -> bool:
    """True when ``model`` reads token ids named ``t0, t1, ...`` (zoo transformers), not text."""
    return bool(getattr(getattr(model, "tokenizer", None), "is_id_vocabulary", False))


def sample_text(model: Any, seed: int = 0, half: int = 12) -> str | None:
    """An input in the id names of a zoo transformer, of the kind it was trained on; None for a
    model with a text tokenizer (type English for those).

    A vocabulary with an ``=`` token (modular addition) gets one ``"tA tB ="`` question; any other
    gets ``half`` random ordinary tokens repeated once (``"t5 t9 ... t5 t9 ..."``), the input on
    which induction heads show (BOS is prepended by the tokenizer where the model uses one).
    Deterministic in ``seed``; the result fits the model's context.
    """
    if not is_id_vocabulary(model):
        return None
    vocab = model.tokenizer
    if callable(getattr(vocab, "sample_text", None)):  # a word vocabulary brings its own inputs
        return vocab.sample_text(seed)
    rng = np.random.default_rng(seed)
    ordinary = [name for name in vocab.names if name[1:].isdigit() and name.startswith("t")]
    if "=" in vocab.ids:
        a, b = rng.choice(ordinary, size=2)
        return f"{a} {b} ="
    n_ctx = getattr(model, "n_ctx", None) or 2 * half + 1
    room = (n_ctx - (1 if getattr(vocab, "add_bos", False) else 0)) // 2
    half = max(1, min(half, room, len(ordinary)))
    first = list(rng.choice(ordinary, size=half, replace=False))
    return " ".join(first + first)


def share_color_range(*figures: Any) -> tuple[float, float]:
    """Give every heatmap in ``figures`` one colour range, so figures shown side by side read alike.

    The range is symmetric about 0 (``[-m, m]``, ``m`` the largest finite ``|z|`` over all of
    them) when the values have both signs, else ``[min, max]`` over all of them (patched metric
    values, all negative log-probs say, keep their contrast). Changes the figures in place and
    returns the range.
    """
    heatmaps = [trace for fig in figures for trace in fig.data if trace.type == "heatmap"]
    values = [np.asarray(t.z, dtype=np.float64) for t in heatmaps]
    finite = np.concatenate([v[np.isfinite(v)].ravel() for v in values]) if values else np.zeros(0)
    if finite.size == 0:
        return (0.0, 1.0)
    if finite.min() < 0 < finite.max():
        m = float(np.abs(finite).max())
        low, high, mid = -m, m, 0.0
    else:
        low, high, mid = float(finite.min()), float(finite.max()), None
    for trace in heatmaps:
        trace.update(zmin=low, zmax=high, zmid=mid, zauto=False)
    return (low, high)


# ----------------------------------------------------------------------------------------------
# Dictionary latents (interp.sae dashboards)
# ----------------------------------------------------------------------------------------------


def latent_histogram_figure(counts: Sequence[int], edges: Sequence[float], title: str = "Activations"):
    """Bars of a latent's non-zero activation counts per bin (``edges`` has one more entry than
    ``counts``; both empty for a latent that never fires), as ``S.dashboard(...).histogram`` holds them."""
    import plotly.graph_objects as go

    counts, edges = np.asarray(counts, dtype=np.int64), to_numpy(edges)
    if len(edges) != len(counts) + 1 and not (len(edges) == len(counts) == 0):  # a dead latent: no bins
        raise InputError(
            f"a histogram needs len(edges) = len(counts) + 1; got {len(edges)} and {len(counts)}"
        )
    fig = go.Figure(
        go.Bar(
            x=(edges[:-1] + edges[1:]) / 2,
            y=counts,
            width=np.diff(edges),
            customdata=np.stack([edges[:-1], edges[1:]], axis=-1) if len(counts) else None,
            hovertemplate="[%{customdata[0]:.3g}, %{customdata[1]:.3g}): %{y} tokens<extra></extra>",
        )
    )
    fig.update_layout(
        title={"text": title},
        xaxis_title="activation (non-zero only)",
        yaxis_title="tokens",
        height=320,
        bargap=0.05,
        margin={"l": 60, "r": 20, "t": 50, "b": 50},
    )
    return fig


def density_figure(density: Any, latent: int | None = None, bins: int = 40):
    """Every latent's density on a log10 axis (dead latents counted in the title); ``latent``'s own
    density is marked with a line, to place it among the others."""
    import plotly.graph_objects as go

    values = to_numpy(density).ravel()
    live = values[values > 0]
    fig = go.Figure(go.Histogram(x=np.log10(live), nbinsx=bins, name="latents"))
    dead = int((values == 0).sum())
    if latent is not None:
        if not 0 <= latent < len(values):
            raise InputError(f"latent {latent} is out of range for {len(values)} densities")
        if values[latent] > 0:
            fig.add_vline(
                x=float(np.log10(values[latent])),
                line_color="crimson",
                annotation_text=f"latent {latent}",
                annotation_position="top",
            )
    fig.update_layout(
        title={"text": f"Density of the {len(values)} latents ({dead} never fire)"},
        xaxis_title="log10 fraction of tokens where active",
        yaxis_title="latents",
        height=320,
        margin={"l": 60, "r": 20, "t": 50, "b": 50},
    )
    return fig


def logit_effects_figure(
    top_tokens: Sequence[str],
    top_values: Sequence[float],
    bottom_tokens: Sequence[str],
    bottom_values: Sequence[float],
    title: str = "Logit effects",
    axis: str = "logit change per unit of activation",
):
    """Horizontal bars: the tokens a direction raises most (top) and lowers most (bottom), as
    ``S.logit_effects`` lists them (or ``S.intervene``'s ``raised``/``lowered``); the largest
    effect is at the top."""
    import plotly.graph_objects as go

    tokens = [repr(str(t))[1:-1] for t in list(bottom_tokens)[::-1] + list(top_tokens)[::-1]]
    values = list(bottom_values)[::-1] + list(top_values)[::-1]
    values = [float(v) for v in values]
    # a token may be in both lists (tiny vocabularies): rows are positions, labelled by token
    fig = go.Figure(
        go.Bar(
            x=values,
            y=list(range(len(values))),
            orientation="h",
            marker_color=["crimson" if v < 0 else "steelblue" for v in values],
            customdata=tokens,
            hovertemplate="%{customdata}: %{x:.4g}<extra></extra>",
        )
    )
    fig.update_yaxes(tickmode="array", tickvals=list(range(len(values))), ticktext=tokens)
    fig.update_layout(
        title={"text": title},
        xaxis_title=axis,
        height=int(max(300, 90 + 22 * len(values))),
        margin={"l": 110, "r": 20, "t": 50, "b": 50},
    )
    return fig


def before_after_figure(
    labels: Sequence[str], before: Sequence[float], after: Sequence[float], title: str, axis: str
):
    """Grouped bars of one quantity before and after an intervention, per label (token...)."""
    import plotly.graph_objects as go

    if not len(labels) == len(before) == len(after):
        raise InputError(
            f"labels, before and after must have one entry each; got {len(labels)}, {len(before)}, {len(after)}"
        )
    names = [repr(str(t))[1:-1] for t in labels]
    x = list(range(len(names)))
    fig = go.Figure(
        [
            go.Bar(x=x, y=[float(v) for v in before], name="before", customdata=names),
            go.Bar(x=x, y=[float(v) for v in after], name="after", customdata=names),
        ]
    )
    fig.update_traces(hovertemplate="%{customdata}: %{y:.4g}")
    fig.update_xaxes(tickmode="array", tickvals=x, ticktext=names, tickangle=-45)
    fig.update_layout(
        title={"text": title},
        yaxis_title=axis,
        barmode="group",
        height=360,
        margin={"l": 60, "r": 20, "t": 50, "b": 90},
    )
    return fig


def token_rows_html(
    rows: Sequence[tuple[str, Sequence[str], Sequence[float]]], *, max_value: float | None = None
) -> str:
    """Rows of tokens, each token's background as strong as its value (one scale for all rows):
    ``rows`` is ``(label, tokens, values)`` per row. Plain HTML and CSS (no script, no network), so
    it renders offline anywhere; hovering a token shows its value, and each row's largest value is
    outlined in bold (a dashboard's peak token). Tokens are drawn as they read
    (``examples.readable_tokens``): WordPiece ``##`` pieces join their word."""
    from html import escape

    from interp.methods.examples import readable_tokens

    top = max_value
    if top is None:
        top = max((abs(float(v)) for _, _, vals in rows for v in vals), default=0.0)
    top = top if top and top > 0 else 1.0
    lines = []
    for label, tokens, values in rows:
        if len(tokens) != len(values):
            raise InputError(f"row {label!r} has {len(tokens)} tokens but {len(values)} values")
        spans = []
        peak = int(np.argmax(np.abs(np.asarray(values, dtype=float)))) if len(values) else -1
        for j, (tok, v) in enumerate(zip(readable_tokens([str(t) for t in tokens]), values, strict=True)):
            strength = min(1.0, abs(float(v)) / top)
            color = "255,140,0" if float(v) >= 0 else "30,120,220"
            word = tok.lstrip(" ")
            space = "&nbsp;" * (len(tok) - len(word))  # outside the highlight: only the token is coloured
            spans.append(
                f'{space}<span class="{"t peak" if j == peak else "t"}" style="background:rgba({color},{strength:.3f})" '
                f'title="{float(v):.4g}">{escape(word)}</span>'
            )
        lines.append(
            f'<div class="row"><span class="label">{escape(str(label))}</span>{"".join(spans)}</div>'
        )
    style = (
        "<style>body{font-family:sans-serif;font-size:14px;margin:4px}"
        ".row{padding:3px 0;border-bottom:1px solid #eee;line-height:1.9}"
        ".label{display:inline-block;min-width:9em;color:#666;font-size:12px}"
        ".t{border-radius:3px;padding:1px 0;white-space:pre}"
        ".peak{font-weight:bold;outline:1.5px solid #333}</style>"
    )
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'>{style}</head><body>{''.join(lines)}</body></html>"
    )


def robustness_figure(curves: Sequence[Any], title: str = "Accuracy under attack"):
    """Accuracy against eps, one line per robustness curve (``adversarial.robustness_curve``), so
    attacks (or models) compare on one axis; a minimal-perturbation attack's curve is its L2 budget."""
    import plotly.graph_objects as go

    if not curves:
        raise InputError("robustness_figure needs at least one curve (from adversarial.robustness_curve)")
    fig = go.Figure()
    for curve in curves:
        norm = curve.config.get("norm", "linf")
        fig.add_scatter(x=list(curve.eps), y=list(curve.accuracy), mode="lines+markers", name=curve.attack,
                        hovertemplate=f"{curve.attack}: eps %{{x}} ({norm}), accuracy %{{y:.3f}}<extra></extra>")  # fmt: skip
    fig.update_layout(title=title, xaxis_title="eps (perturbation budget)", yaxis_title="accuracy",
                      yaxis_range=[0, 1.02], height=380)  # fmt: skip
    return fig


def figures_page(figures: Sequence[Any], fragments: Sequence[str] = ()) -> str:
    """One self-contained HTML page: plotly ``figures`` (plotly's JavaScript inlined once, so the
    page opens offline) followed by HTML ``fragments`` (e.g. circuitsvis views' ``local_src``)."""
    parts = [fig.to_html(full_html=False, include_plotlyjs=i == 0) for i, fig in enumerate(figures)]
    return (
        f"<html><head><meta charset='utf-8'></head><body>{''.join(parts)}{''.join(fragments)}</body></html>"
    )
