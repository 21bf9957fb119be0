"""interp.viz: the figures hold the activations they claim to, and the attention view works offline."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from interp import viz
from interp.errors import InputError


def render_props(html: str) -> dict:
    """The props object circuitsvis passes to its React component (the data the page draws)."""
    match = re.search(
        r"CircuitsVis\.render\(\s*\"[^\"]+\",\s*CircuitsVis\.AttentionHeads,\s*(\{.*\})\s*\)", html, re.S
    )
    assert match, "no CircuitsVis.render(...) call of AttentionHeads in the HTML"
    return json.loads(match.group(1))


# ---------------------------------------------------------------------------------------------
# activation_figure
# ---------------------------------------------------------------------------------------------


def test_heatmap_z_is_the_tensor_and_rows_are_labelled_with_tokens():
    torch.manual_seed(0)
    tensor = torch.randn(5, 7)
    tokens = ["the", "cat", "sat", "the", "mat"]  # a repeated token must keep its own row
    fig = viz.activation_figure(tensor, "resid", tokens)
    (trace,) = fig.data
    assert trace.type == "heatmap"
    np.testing.assert_allclose(np.asarray(trace.z), tensor.numpy(), rtol=1e-6)
    assert list(fig.layout.yaxis.tickvals) == list(range(5))
    assert list(fig.layout.yaxis.ticktext) == tokens
    assert fig.layout.xaxis.ticktext is None  # 7 columns are not token positions
    assert fig.layout.yaxis.autorange == "reversed"  # row 0 (the first token) on top
    assert fig.layout.title.text == "resid"
    assert trace.zmid == 0  # signed data: diverging scale centred at zero


def test_square_pattern_labels_both_axes_and_uses_a_sequential_scale():
    pattern = torch.rand(4, 4).softmax(-1)
    tokens = list("abcd")
    fig = viz.activation_figure(pattern, "pattern", tokens)
    assert list(fig.layout.xaxis.ticktext) == tokens
    assert list(fig.layout.yaxis.ticktext) == tokens
    assert fig.data[0].zmid is None


def test_explicit_token_axes_override_size_matching():
    tensor = torch.randn(3, 3)  # [pos, d] that happens to be square
    fig = viz.activation_figure(tensor, "t", ["a", "b", "c"], token_axes=[0])
    assert list(fig.layout.yaxis.ticktext) == ["a", "b", "c"]
    assert fig.layout.xaxis.ticktext is None


def test_one_dimensional_tensor_is_a_line_plot_over_tokens():
    values = torch.tensor([0.5, -1.0, 2.0])
    fig = viz.activation_figure(values, "norm", ["x", "y", "z"])
    (trace,) = fig.data
    assert trace.type == "scatter"
    np.testing.assert_allclose(np.asarray(trace.y), values.numpy())
    assert list(fig.layout.xaxis.ticktext) == ["x", "y", "z"]


def test_long_token_axes_thin_their_ticks():
    tokens = [f"t{i}" for i in range(300)]
    fig = viz.activation_figure(np.zeros((300, 8)), "long", tokens)
    ticks = list(fig.layout.yaxis.tickvals)
    assert len(ticks) <= viz.MAX_TICKS
    assert list(fig.layout.yaxis.ticktext) == [tokens[i] for i in ticks]


def test_activation_figure_rejects_what_it_cannot_draw():
    with pytest.raises(InputError, match="pick a 2-D slice"):
        viz.activation_figure(torch.zeros(2, 3, 4), "3-D")
    with pytest.raises(InputError, match="tokens"):
        viz.activation_figure(torch.zeros(3, 4), "t", ["a", "b"], token_axes=[0])


def test_activation_figure_on_a_real_capture(gpt2_model):
    _, cache = gpt2_model.run_with_cache("the cat sat on the mat", names="blocks.1.hook_resid_post")
    act = cache["blocks.1.hook_resid_post"][0]
    tokens = cache.meta["str_tokens"][0]
    fig = viz.activation_figure(act, "blocks.1.hook_resid_post", tokens)
    np.testing.assert_allclose(np.asarray(fig.data[0].z), act.numpy(), rtol=1e-6)
    assert list(fig.layout.yaxis.ticktext) == tokens


# ---------------------------------------------------------------------------------------------
# Choosing a slice
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dims", "kept"),
    [
        (("pos", 384), (0, 1)),
        (("pos",), (0,)),
        ((12, "pos", "pos"), (1, 2)),  # attention pattern: query x key
        (("pos", 12, 32), (0, 2)),  # hook_q: position x d_head, head chosen
        ((16, 8, 8), (1, 2)),  # conv feature map: spatial, channel chosen
    ],
)
def test_display_axes(dims, kept):
    assert viz.display_axes(dims) == kept


def test_take_slice_matches_indexing():
    tensor = torch.randn(6, 12, 32)
    np.testing.assert_allclose(viz.take_slice(tensor, (0, 2), {1: 5}), tensor[:, 5, :].numpy())
    np.testing.assert_allclose(viz.take_slice(tensor, (1, 2)), tensor[0].numpy())
    with pytest.raises(InputError, match="out of range"):
        viz.take_slice(tensor, (0, 2), {1: 12})


# ---------------------------------------------------------------------------------------------
# attention_heads_html
# ---------------------------------------------------------------------------------------------


def test_attention_html_is_self_contained_and_carries_the_pattern(gpt2_model):
    _, cache = gpt2_model.run_with_cache("the cat sat on the mat", names="blocks.0.attn.hook_pattern")
    pattern = cache["pattern", 0][0]
    tokens = cache.meta["str_tokens"][0]
    html = viz.attention_heads_html(pattern, tokens, layer=0)

    # The JavaScript is inlined: no <script src=...> at all, so nothing is fetched from a CDN.
    script_tags = re.findall(r"<script\b[^>]*>", html)
    assert script_tags, "no script in the HTML"
    assert not [tag for tag in script_tags if "src=" in tag]
    assert "unpkg.com" not in html and "cdn.jsdelivr" not in html
    assert "CircuitsVis" in html  # the bundle itself

    props = render_props(html)
    assert props["tokens"] == tokens
    np.testing.assert_allclose(np.asarray(props["attention"]), pattern.numpy(), atol=1e-4)
    assert props["attentionHeadNames"] == [f"L0H{h}" for h in range(pattern.shape[0])]
    assert props["maskUpperTri"] is True  # GPT-2 is causal: detected from the pattern


def test_attention_html_keeps_a_bidirectional_pattern_unmasked():
    pattern = torch.rand(2, 3, 3).softmax(-1)  # every key attended: an encoder like BERT
    props = render_props(viz.attention_heads_html(pattern, ["[CLS]", "hi", "[SEP]"]))
    assert props["maskUpperTri"] is False
    assert props["tokens"] == ["[CLS]", "hi", "[SEP]"]


def test_attention_html_rejects_wrong_shapes():
    with pytest.raises(InputError, match="index the batch"):
        viz.attention_heads_html(torch.rand(1, 2, 3, 3), list("abc"))
    with pytest.raises(InputError, match="tokens"):
        viz.attention_heads_html(torch.rand(2, 3, 3), list("ab"))


def test_share_color_range_gives_side_by_side_heatmaps_one_scale():
    import plotly.graph_objects as go

    small = go.Figure(go.Heatmap(z=[[-0.5, 0.2], [0.1, 0.0]]))
    large = go.Figure(go.Heatmap(z=[[3.0, -1.0], [float("nan"), 0.5]]))
    assert viz.share_color_range(small, large) == (-3.0, 3.0)  # both signs: symmetric, max |z|
    for fig in (small, large):
        assert (fig.data[0].zmin, fig.data[0].zmax, fig.data[0].zmid) == (-3.0, 3.0, 0.0)

    a = go.Figure(go.Heatmap(z=[[-4.2, -4.1]]))
    b = go.Figure(go.Heatmap(z=[[-4.0, -2.5]]))
    assert viz.share_color_range(a, b) == (-4.2, -2.5)  # one sign: the joint [min, max]
    assert a.data[0].zmax == b.data[0].zmax == -2.5
