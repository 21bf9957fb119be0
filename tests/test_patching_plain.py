"""The sweep's plain forward on native bridges (``interp.models.suffix._plain_bridge_forward``) and the
sweeps that run through it, against independent references: the bridge's own forward with the same
hooks, and one forward per patch with a hand-written hook (positions 0 and last, several prompts, a
user's hook present, a broadcast ablation source)."""

from __future__ import annotations

import pytest
import torch

import interp
from interp.methods import patching as P

TOY = dict(
    n_layers=2, d_model=32, n_heads=4, d_head=8, n_ctx=24, d_vocab=40, attn_only=False, d_mlp=64,
    act_fn="gelu", normalization_type="LN", positional_embedding_type="standard", seed=0,
)  # fmt: skip
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def toy():
    return interp.load(TOY)


@pytest.fixture(scope="module")
def prompts():
    torch.manual_seed(3)
    clean = torch.randint(1, 40, (3, 7))
    corrupted = clean.clone()
    corrupted[:, 0] = (clean[:, 0] + 7) % 39 + 1
    corrupted[:, 3] = (clean[:, 3] + 11) % 39 + 1
    corrupted[:, -1] = (clean[:, -1] + 5) % 39 + 1
    return clean, corrupted


def _run(model, tail, hooks, plain: bool):
    """One library forward of ``tail`` inside the active route, through the plain forward or
    (``plain=False``) the bridge's own forward; returns the output and what the hooks captured."""
    seen: dict[str, torch.Tensor] = {}

    def capture(name):
        return lambda act, ctx: seen.__setitem__(name, act.clone())

    hooks = [*hooks, *((n, capture(n)) for n in CAPTURED)]
    bridge = model.bridge
    own = bridge.__dict__.pop("forward") if not plain else None
    try:
        output = model._run_library(tail, hooks)
    finally:
        if own is not None:
            object.__setattr__(bridge, "forward", own)
    return output, seen


CAPTURED = [
    "hook_pos_embed",
    "blocks.0.hook_resid_pre",
    "blocks.0.mlp.hook_post",
    "blocks.1.attn.hook_pattern",
    "blocks.1.hook_resid_post",
    "unembed.hook_in",
]


@pytest.mark.parametrize("start", [0, 3])
def test_plain_forward_fires_hooks_as_the_bridge(toy, prompts, start):
    """Inside a route the bridge's forward is plain torch around hooked components; with hooks on
    components of every kind (embeddings, a block's stream, the MLP, the pattern, the unembedding)
    and an edit at one head's output, every captured activation and the output equal the bridge's
    own forward, from position 0 and from the middle; unhooked, both equal the model's forward."""
    _, corrupted = prompts
    prepared = toy.prepare(corrupted)
    route = P._prefix_route(toy, prepared)
    assert route is not None

    def halve_head(act, ctx):  # [batch, pos, head, d_head]
        act = act.clone()
        act[:, :, 2] = act[:, :, 2] / 2
        return act

    edits = [("blocks.0.attn.hook_z", halve_head)]
    with toy._lock, route.active(start) as tail:
        assert "forward" in toy.bridge.__dict__  # the plain forward is what the route runs
        plain_out, plain_seen = _run(toy, tail, edits, plain=True)
        own_out, own_seen = _run(toy, tail, edits, plain=False)
        bare = toy._run_library(tail, [])
    assert "forward" not in toy.bridge.__dict__
    assert set(plain_seen) == set(own_seen) == set(CAPTURED)
    for name in CAPTURED:
        assert plain_seen[name].shape == own_seen[name].shape, name
        assert (plain_seen[name] - own_seen[name]).abs().max() <= TOLERANCE, name
    assert (plain_out - own_out).abs().max() <= TOLERANCE
    assert (plain_out - bare).abs().max() > 1e-4  # the edit changed the output
    with torch.no_grad():
        full = toy._forward(prepared)
    assert (bare - full[:, start:]).abs().max() <= TOLERANCE


def test_module_hooks_on_a_block_or_the_model_keep_their_own_calls(toy, prompts):
    """A torch module hook on a block or on the underlying NativeModel (not a hook point) still fires,
    once per forward, inside a route: the plain forward calls those modules themselves."""
    _, corrupted = prompts
    prepared = toy.prepare(corrupted)
    route = P._prefix_route(toy, prepared)
    assert route is not None
    with torch.no_grad():
        full = toy._forward(prepared)
    native = toy.bridge._driver.underlying_model
    for module in (toy.bridge.blocks[1], native):
        calls = []
        handle = module.register_forward_hook(lambda mod, args, out, calls=calls: calls.append(1))
        try:
            with toy._lock, route.active(0) as tail:
                out = toy._run_library(tail, [])
        finally:
            handle.remove()
        assert calls == [1], type(module).__name__
        assert (out - full).abs().max() <= TOLERANCE


def _naive(model, clean, corrupted, hook, pos, head, metric):
    """One forward per patch: the clean value of ``head`` at ``pos`` written into the corrupted run."""
    _, cache = model.run_with_cache(clean, names=[hook])
    source = cache[hook]

    def put(act, ctx):
        act = act.clone()
        if head is None:
            act[:, pos] = source[:, pos]
        else:
            act[:, pos, head] = source[:, pos, head]
        return act

    return float(metric(model.run_with_hooks(corrupted, [(hook, put)])))


@pytest.mark.parametrize(("site", "hook", "by_head"), [
    ("head_pos", "blocks.{layer}.attn.hook_z", True),
    ("head_v_pos", "blocks.{layer}.attn.hook_v", True),
    ("resid_pre", "blocks.{layer}.hook_resid_pre", False),
])  # fmt: skip
def test_sweeps_equal_one_forward_per_patch_at_first_and_last_position(toy, prompts, site, hook, by_head):
    """Patches at position 0 (nothing to reuse) and at the last position (the tail is one token),
    in both layers (the last block runs one position per copy), on a batch of three prompts, equal
    one forward per patch; inside a user's hook that scales one position of the stream they equal
    the same hand computation with that hook applied once (the route is off, every forward whole)."""
    clean, corrupted = prompts
    n_pos = clean.shape[1]
    positions = [0, n_pos - 1]
    heads = [1, 3] if by_head else None
    metric = P.logit_diff(clean[:, -1], 5)
    cells = [(i, layer, j, pos) for i, layer in enumerate((0, 1)) for j, pos in enumerate(positions)]

    def check(result):
        for i, layer, j, pos in cells:
            for h, head in enumerate(heads or [None]):
                value = result.values[i, j, h] if by_head else result.values[i, j]
                want = _naive(toy, clean, corrupted, hook.format(layer=layer), pos, head, metric)
                assert float(value) == pytest.approx(want, abs=TOLERANCE), (layer, pos, head)

    sweep = P.patch(toy, clean, corrupted, site, metric, positions=positions, heads=heads)
    check(sweep)
    assert (sweep.values - sweep.metric_corrupted).abs().max() > 1e-4  # the patches change the metric

    calls = []

    def scale_second(act, ctx):
        calls.append(act.shape[0])
        act = act.clone()
        act[:, 1] = act[:, 1] * 0.5
        return act

    with toy.hooks([("blocks.1.hook_resid_pre", scale_second)]):
        hooked = P.patch(toy, clean, corrupted, site, metric, positions=positions, heads=heads)
        calls.clear()
        check(hooked)  # each naive forward runs the user's hook once
        assert calls and all(rows == clean.shape[0] for rows in calls)
    assert (hooked.values - sweep.values).abs().max() > 1e-5  # the user's hook is analysed


def test_zero_ablation_broadcasts_one_value_into_each_unit(toy, prompts):
    """Zero ablation's source is one broadcast zero; the splice writes it into every position of
    the ablated head only (equal to a hand-written hook that zeroes that head)."""
    from interp.methods import ablation

    _, corrupted = prompts
    hooks = ablation.ablation_hooks(toy, corrupted, [(1, 2)], site="head", kind="zero")
    ours = toy.run_with_hooks(corrupted, hooks)

    def zero_head(act, ctx):
        act = act.clone()
        act[:, :, 2] = 0
        return act

    want = toy.run_with_hooks(corrupted, [("blocks.1.attn.hook_z", zero_head)])
    assert (ours - want).abs().max() <= TOLERANCE
    assert (ours - toy(corrupted)).abs().max() > 1e-4
