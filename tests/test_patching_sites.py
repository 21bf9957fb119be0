"""Per-head q/k/v/pattern sites, ``patch_every``, subspace patching and DLA at every position, against
independent references: TransformerLens 4.3's ``get_act_patch_*`` on the same weights, naive
one-forward hooks and hand computations."""

from __future__ import annotations

import pytest
import torch

import interp
from interp.errors import InputError
from interp.methods import lens
from interp.methods import patching as P

TOY = dict(
    n_layers=2, d_model=32, n_heads=4, d_head=8, n_ctx=24, d_vocab=40, attn_only=False, d_mlp=64,
    act_fn="gelu", normalization_type="LN", positional_embedding_type="standard", seed=0,
)  # fmt: skip
TOLERANCE = 1e-5


def tl_sweeps():
    import transformer_lens.patching as tlp

    return {
        "head_q": tlp.get_act_patch_attn_head_q_all_pos,
        "head_k": tlp.get_act_patch_attn_head_k_all_pos,
        "head_v": tlp.get_act_patch_attn_head_v_all_pos,
        "head_pattern": tlp.get_act_patch_attn_head_pattern_all_pos,
        "head_q_pos": tlp.get_act_patch_attn_head_q_by_pos,
        "head_k_pos": tlp.get_act_patch_attn_head_k_by_pos,
        "head_v_pos": tlp.get_act_patch_attn_head_v_by_pos,
        "head_pattern_pos": tlp.get_act_patch_attn_head_pattern_by_pos,
        "head_pattern_dest_src": tlp.get_act_patch_attn_head_pattern_dest_src_pos,
    }


@pytest.fixture(scope="module")
def toy():
    return interp.load(TOY)


def logit_diff(clean):
    def metric(logits):
        rows = torch.arange(clean.shape[0])
        return (logits[rows, -1, clean[:, -1]] - logits[rows, -1, 3]).mean()

    return metric


@pytest.fixture(scope="module")
def induction():
    from interp.methods.induction_patching import repeated_tokens_pair, second_half_logprob

    model = interp.load("zoo:induction-2l")
    clean, corrupted = repeated_tokens_pair(model, half_len=4, batch=2, seed=0)
    return model, clean, corrupted, second_half_logprob(clean)


# --- equal to TransformerLens -------------------------------------------------------------------


def test_head_sites_equal_transformer_lens_on_induction_2l(induction):
    """Every new per-head sweep, on the trained zoo model, equals TL's function of the same name,
    shape and axis order included (the pattern's head comes before its destination position)."""
    model, clean, corrupted, metric = induction
    bridge = model.module.eval()
    _, clean_cache = bridge.run_with_cache(clean)
    n_pos = clean.shape[1]
    for site, tl_fn in tl_sweeps().items():
        ours = P.patch(model, clean, corrupted, site, metric)
        ref = tl_fn(bridge, corrupted, clean_cache, metric)
        assert ours.values.shape == ref.shape, site
        assert (ours.values - ref).abs().max() <= TOLERANCE, site
    assert P.patch(model, clean, corrupted, "head_pattern_pos", metric).dims == ("layer", "head", "dest_pos")
    full = P.patch(model, clean, corrupted, "head_pattern_dest_src", metric)
    assert full.dims == ("layer", "head", "dest_pos", "src_pos") and full.values.shape[-1] == n_pos


def test_patch_every_equals_transformer_lens(toy, induction, pair):
    import transformer_lens.patching as tlp

    model, clean, corrupted, metric = induction
    bridge = model.module.eval()
    _, clean_cache = bridge.run_with_cache(clean)
    for family, tl_fn in (
        ("head", tlp.get_act_patch_attn_head_all_pos_every),
        ("head_pos", tlp.get_act_patch_attn_head_by_pos_every),
    ):
        ours = P.patch_every(model, clean, corrupted, family, metric)
        ref = tl_fn(bridge, corrupted, clean_cache, metric)
        assert ours.dims[0] == "component" and ours.labels["component"] == ["out", "q", "k", "v", "pattern"]
        assert ours.values.shape == ref.shape and (ours.values - ref).abs().max() <= TOLERANCE, family
    # blocks need an MLP (TL's helper fails on attention-only models; ours leaves mlp_out out)
    assert P.patch_every(model, clean, corrupted, "block", metric).labels["component"] == [
        "resid_pre",
        "attn_out",
    ]
    clean, corrupted = pair
    _, clean_cache = toy.bridge.eval().run_with_cache(clean)
    ours = P.patch_every(toy, clean, corrupted, "block", logit_diff(clean))
    ref = tlp.get_act_patch_block_every(toy.bridge, corrupted, clean_cache, logit_diff(clean))
    assert ours.labels["component"] == ["resid_pre", "attn_out", "mlp_out"] and ours.dims == (
        "component",
        "layer",
        "pos",
    )
    assert (ours.values - ref).abs().max() <= TOLERANCE
    with pytest.raises(InputError, match="unknown family"):
        P.patch_every(toy, clean, corrupted, "heads", logit_diff(clean))


def test_head_sites_equal_transformer_lens_on_minilm(minilm):
    """MiniLM (BERT, HF backend, [batch, pos, head, d_head] q/k/v): all-position q/k/v sweeps in full
    and by-position sweeps on a few cells (TL's index_df), against TL on the same weights. TL 4.3
    cannot patch MiniLM's pattern (the bridge delegates attention to HF and discards the edit, with a
    warning: every value is the corrupted run's), so the pattern sweeps are checked against
    one-forward-per-patch hooks instead."""
    import pandas as pd

    bridge = minilm.to_bridge()
    clean_t, corrupt_t = P.check_pair(minilm, "The cat sat on the mat.", "The dog slept on the rug.")
    metric = P.cosine().bind(minilm(clean_t), minilm(corrupt_t), None)
    hidden: dict[str, torch.Tensor] = {}
    bridge.add_hook(f"blocks.{minilm.n_layers - 1}.hook_out", lambda act, hook: hidden.__setitem__("h", act))

    def tl_metric(_logits):
        return metric(hidden["h"])

    _, clean_cache = bridge.run_with_cache(clean_t.input_ids)
    sweeps = tl_sweeps()
    for site in ("head_q", "head_k", "head_v"):
        ours = P.patch(minilm, clean_t, corrupt_t, site, metric)
        ref = sweeps[site](bridge, corrupt_t.input_ids, clean_cache, tl_metric)
        assert (ours.values - ref).abs().max() <= TOLERANCE, site
    cells = [(0, 2, 3), (5, 4, 11)]
    for site in ("head_q_pos", "head_k_pos", "head_v_pos"):
        index_df = pd.DataFrame(cells, columns=["layer", "pos", "head"])
        ref = sweeps[site](
            bridge, corrupt_t.input_ids, clean_cache, tl_metric, index_axis_names=None, index_df=index_df
        )
        ours = P.patch(
            minilm, clean_t, corrupt_t, site, metric, layers=[0, 5], positions=[2, 4], heads=[3, 11]
        )
        got = torch.stack([ours.values[0, 0, 0], ours.values[1, 1, 1]])
        assert (got - ref).abs().max() <= TOLERANCE, site
    _, cache = minilm.run_with_cache(
        clean_t, names=["blocks.0.attn.hook_pattern", "blocks.5.attn.hook_pattern"]
    )

    def naive(layer, head, dest=slice(None)):
        source = cache[f"blocks.{layer}.attn.hook_pattern"]

        def fn(act, ctx):
            act = act.clone()
            act[:, head, dest] = source[:, head, dest]
            return act

        return float(metric(minilm.run_with_hooks(corrupt_t, [(f"blocks.{layer}.attn.hook_pattern", fn)])))

    whole = P.patch(minilm, clean_t, corrupt_t, "head_pattern", metric, layers=[0, 5], heads=[3, 11])
    rows = P.patch(
        minilm, clean_t, corrupt_t, "head_pattern_pos", metric, layers=[0, 5], positions=[2, 4], heads=[3, 11]
    )
    for i, layer in enumerate((0, 5)):
        for j, head in enumerate((3, 11)):
            assert whole.values[i, j] == pytest.approx(naive(layer, head), abs=TOLERANCE)
            assert rows.values[i, j, 1] == pytest.approx(naive(layer, head, 4), abs=TOLERANCE)
    assert (whole.values - whole.metric_corrupted).abs().max() > 1e-3  # the patches do change the output


@pytest.mark.parametrize("site", ["head_q_pos", "head_k_pos", "head_v_pos", "head_pattern_pos"])
def test_hf_head_sites_share_the_layer_and_equal_tiled_copies(site, gpt2_model):
    """On GPT-2 (HF) the patched layer's q/k/v projections run once: the branch plan stacks the
    patched tensor and the ones it meets downstream (q with k and v, v with the pattern), is
    verified on the model, and gives the values of copies tiled at the input."""
    torch.manual_seed(1)
    clean = torch.randint(2, 20, (2, 6))
    corrupted = clean.flip(1)
    metric = P.prob(clean[:, -1])
    shared = P.patch(gpt2_model, clean, corrupted, site, metric, layers=[1])
    gpt2_model.tiling_plans = lambda name: []
    try:
        tiled = P.patch(gpt2_model, clean, corrupted, site, metric, layers=[1])
    finally:
        del gpt2_model.tiling_plans
    assert (shared.values - tiled.values).abs().max() <= 1e-6
    hook = P.SITES[site].hook.format(layer=1)
    plan = next(p for p in gpt2_model.tiling_plans(hook) if len(p) > 3)
    assert gpt2_model.shares_prefix(gpt2_model.prepare(corrupted), hook)
    assert gpt2_model._verified_plan(gpt2_model.prepare(corrupted), hook) == plan


def test_pattern_sites_are_patch_only(toy, pair):
    from interp.methods import ablation

    with pytest.raises(InputError, match="only patch"):
        ablation.ablate(toy, pair[0], "head_pattern", "zero", logit_diff(pair[0]))


# --- subspace patching -----------------------------------------------------------------------------


def naive_swap(model, clean, corrupted, hook, coords, metric, positions=None):
    """Hand computation: copy the clean activation's coordinates ``coords`` (standard basis) into the
    corrupted run at ``positions``; nothing else changes."""
    _, cache = model.run_with_cache(clean, names=[hook])
    source = cache[hook]

    def fn(act, ctx):
        act = act.clone()
        pos = slice(None) if positions is None else positions
        for c in coords:
            act[:, pos, c] = source[:, pos, c]
        return act

    return float(metric(model.run_with_hooks(corrupted, [(hook, fn)])))


def test_subspace_patching_hand_computations(toy, pair):
    clean, corrupted = pair
    metric = logit_diff(clean)
    hook, d = "blocks.1.hook_resid_pre", TOY["d_model"]
    eye = torch.eye(d)
    # a full basis (any, here a random one) is full activation patching: the clean run's metric
    full = P.patch_subspace(toy, clean, corrupted, hook, torch.randn(d, d), metric)
    assert full.values.shape == (1,) and full.values[0] == pytest.approx(full.metric_clean, abs=1e-4)
    # coordinates 3 and 7: the same as copying those coordinates by hand, also from a
    # non-orthonormal basis of the same plane (the basis is orthonormalised)
    expected = naive_swap(toy, clean, corrupted, hook, [3, 7], metric)
    plane = torch.stack([eye[3] + 2 * eye[7], eye[7]], dim=1)
    for basis in (eye[:, [3, 7]], plane):
        got = P.patch_subspace(toy, clean, corrupted, hook, basis, metric).values[0]
        assert got == pytest.approx(expected, abs=1e-5)
    at_pos = P.patch_subspace(toy, clean, corrupted, hook, eye[:, [3]], metric, positions=[1, 3]).values[0]
    assert at_pos == pytest.approx(naive_swap(toy, clean, corrupted, hook, [3], metric, [1, 3]), abs=1e-5)
    # a direction in which clean and corrupted never differ changes nothing
    _, cc = toy.run_with_cache(clean, names=[hook])
    _, kc = toy.run_with_cache(corrupted, names=[hook])
    diffs = (cc[hook] - kc[hook]).reshape(-1, d)
    null = torch.linalg.svd(diffs.double(), full_matrices=True).Vh[-1].float()
    assert (diffs @ null).abs().max() < 1e-4
    none = P.patch_subspace(toy, clean, corrupted, hook, null[:, None], metric)
    assert none.values[0] == pytest.approx(none.metric_corrupted, abs=1e-4)


def test_subspace_basis_errors_name_the_problem(toy, pair):
    clean, corrupted = pair
    hook = "blocks.1.hook_resid_pre"
    with pytest.raises(InputError, match=r"d = 32.*got shape \(16, 2\)"):
        P.patch_subspace(toy, clean, corrupted, hook, torch.randn(16, 2))
    dependent = torch.randn(32, 1).repeat(1, 3)
    with pytest.raises(InputError, match="3 columns but spans only 1"):
        P.patch_subspace(toy, clean, corrupted, hook, dependent)
    with pytest.raises(InputError, match="not a \\[batch, pos"):
        P.patch_subspace(toy, clean, corrupted, "blocks.0.attn.hook_pattern", torch.randn(6, 1))


# --- DLA at every position ----------------------------------------------------------------------


def test_dla_at_every_position_equals_per_position_calls(toy, pair):
    clean, _ = pair
    n_pos = clean.shape[1]
    for by in ("head", "layer", "component"):
        every = lens.direct_logit_attribution(toy, clean, clean[:, -1], 3, by=by, pos="all")
        assert every.dims[0] == "pos" and every.values.shape[0] == n_pos
        for p in (0, 3, n_pos - 1):
            one = lens.direct_logit_attribution(toy, clean, clean[:, -1], 3, by=by, pos=p)
            assert torch.allclose(every.values[p], one.values, atol=1e-6)
    # hand computation: at each position the components plus the extras are that position's logit
    # difference in the model's own output; next-token targets per (prompt, position)
    targets = torch.roll(clean, -1, dims=1)
    every = lens.direct_logit_attribution(toy, clean, targets, by="component", pos="all")
    logits = toy(clean)
    for p in range(n_pos):
        want = logits[torch.arange(2), p, targets[:, p]].mean()
        assert float(every.values[p].sum()) == pytest.approx(float(want), abs=1e-4)
        assert every.extras[f"{every.labels['pos'][p]} logit diff"] == pytest.approx(float(want), abs=1e-4)
    with pytest.raises(InputError, match="'all'"):
        lens.direct_logit_attribution(toy, clean, 1, 3, pos="every")


# --- reuse along the sequence axis ----------------------------------------------------------------


def no_prefix_reuse(monkeypatch):
    monkeypatch.setattr(P, "PREFIX_GROUPS", 1)


@pytest.mark.parametrize("which", ["native", "hf"])
def test_runs_from_the_middle_equal_full_runs(which, toy, gpt2_model, monkeypatch):
    """On causal models a forward whose patches lie at positions >= s runs positions s.. only, with
    the earlier keys and values from the corrupted run's cache. Every sweep equals the one that runs
    whole sequences, for metrics that read one position (unembedding narrowed there too) and for a
    user metric that reads every position (the skipped positions come from the corrupted run)."""
    model = toy if which == "native" else gpt2_model
    torch.manual_seed(2)
    clean = torch.randint(2, 18, (2, 9))  # the tiny GPT-2's vocabulary has 20 tokens
    corrupted = clean.clone()
    corrupted[:, 2] = (clean[:, 2] + 3) % 16 + 2
    corrupted[:, 6] = (clean[:, 6] + 5) % 16 + 2

    def every_position(logits):  # reads all positions: catches a wrong prefix
        return logits.log_softmax(-1)[..., 1].mean()

    metrics = {"logit diff": P.logit_diff(clean[:, -1], 3), "every position": every_position}
    sites = ["head_pos", "head_q_pos", "head_k_pos", "head_v_pos", "head_pattern_pos", "resid_pre", "mlp_out"]
    results = {}
    for name, metric in metrics.items():
        for site in sites:
            results[name, site] = P.patch(model, clean, corrupted, site, metric).values
    assert model._suffix_checks[tuple(clean.shape)] is True
    assert any(key[-1] and ok for key, ok in model._prefix_checks.items())  # a plan verified under the route
    if which == "native":  # last-block head outputs run one position per copy after the patch; k does not
        local = {key[1]: ok for key, ok in model._suffix_checks.items() if key[0] == "one position per copy"}
        last = model.n_layers - 1
        assert local[f"blocks.{last}.attn.hook_z"] and not local[f"blocks.{last}.attn.hook_k"]
    with monkeypatch.context() as m:
        no_prefix_reuse(m)
        for (name, site), values in results.items():
            full = P.patch(model, clean, corrupted, site, metrics[name]).values
            assert (values - full).abs().max() <= 1e-5, (name, site)


def test_bidirectional_models_and_user_hooks_keep_whole_sequences(minilm, toy, pair):
    """MiniLM attends both ways, so the check refuses the route; with a user's hooks attached (which
    see whole sequences) no route is tried, and the sweep analyses the hooked model."""
    prepared = minilm.prepare("The cat sat on the mat.")
    assert P._prefix_route(minilm, prepared) is None
    assert minilm._suffix_checks[tuple(prepared.input_ids.shape)] is False
    clean, corrupted = pair
    metric = logit_diff(clean)
    assert P._prefix_route(toy, toy.prepare(corrupted)) is not None

    def halve_first(act, ctx):
        act = act.clone()
        act[:, 0] = act[:, 0] / 2
        return act

    with toy.hooks([("blocks.0.hook_resid_pre", halve_first)]):
        assert P._prefix_route(toy, toy.prepare(corrupted)) is None
        hooked = P.patch(toy, clean, corrupted, "resid_pre", metric, layers=[1], positions=[4])
        _, cache = toy.run_with_cache(clean, names=["blocks.1.hook_resid_pre"])

        def put(act, ctx):
            act = act.clone()
            act[:, 4] = cache["blocks.1.hook_resid_pre"][:, 4]
            return act

        want = float(metric(toy.run_with_hooks(corrupted, [("blocks.1.hook_resid_pre", put)])))
    assert hooked.values.flatten()[0] == pytest.approx(want, abs=1e-5)
