"""Every method run inside the user's hooks analyses the hooked model exactly once.

The reference for "the hooked model" is a copy whose weights bake the hook in: a hook that doubles
``blocks.1.attn.hook_z`` is the same model as doubling layer 1's output projection ``W_O`` (not its
bias), and a TransformerLens-style hook that zeroes ``z[:, :, head]`` is the same model as zeroing
that head's columns of ``W_O``. A method run on the original inside the hook must give what it gives
on the baked copy with no hook at all; a hook applied a second time by an internal probe (a weight
readout, a plan check, a shape probe) would break that equality, and a ``[:, :, head]`` hook would
crash on the probe's differently shaped input.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch

import interp
from interp.hooks import probe_depth
from interp.methods import ablation, attribution, attribution_patching, lens, path_patching, probing
from interp.methods import patching as P
from interp.methods.patching import component

LAYER, HEAD = 1, 1


@pytest.fixture(scope="module")
def zoo():
    model = interp.load("zoo:induction-2l")
    for kind in HOOKS:
        _baked(model, kind)
    return model


def _tokens(model, batch: int = 2, n: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, model.d_vocab, (batch, n), generator=torch.Generator().manual_seed(seed))


def _double(z: torch.Tensor, hook) -> torch.Tensor:
    return z * 2.0


def _zero_head(z: torch.Tensor, hook) -> torch.Tensor:
    """TransformerLens style: index the head axis, ``z[:, :, head]`` of ``[batch, pos, head, d_head]``."""
    z = z.clone()
    z.view(*z.shape[:2], 4, -1)[:, :, HEAD] = 0.0
    return z


_TWINS: dict[tuple[int, str], object] = {}


def _baked(model, kind: str):
    """A copy of ``model`` whose layer-1 output projection does what the hook does to z (made once
    per model, before any run: a bridge that ran with gradients holds graph tensors deepcopy refuses)."""
    key = (id(model), kind)
    if key not in _TWINS:
        _TWINS[key] = _bake(model, kind)
    return _TWINS[key]


def _bake(model, kind: str, twin=None):
    twin = copy.deepcopy(model) if twin is None else twin
    proj = component(twin, f"blocks.{LAYER}.attn.o")
    weight = next(p for name, p in proj.named_parameters() if name.endswith("weight"))
    conv1d = type(proj).__name__ == "Conv1D"  # HF GPT-2: [in, out]; nn.Linear: [out, in]
    d_head = weight.shape[0 if conv1d else 1] // model.cfg.n_heads
    cols = slice(HEAD * d_head, (HEAD + 1) * d_head)
    with torch.no_grad():
        if kind == "double":
            weight.mul_(2.0)
        elif conv1d:
            weight[cols] = 0.0
        else:
            weight[:, cols] = 0.0
    return twin


HOOKS = {"double": _double, "zero_head": _zero_head}


def _inside(model, kind: str, run: Callable):
    with model.hooks([(f"blocks.{LAYER}.attn.hook_z", HOOKS[kind])]):
        return run(model)


def _same(hooked: P.PatchResult, reference: P.PatchResult, atol: float = 1e-4) -> None:
    torch.testing.assert_close(hooked.values, reference.values, atol=atol, rtol=1e-4)
    for field in ("metric_clean", "metric_corrupted"):
        a, b = getattr(hooked, field), getattr(reference, field)
        assert (a != a and b != b) or abs(a - b) < atol * (1 + abs(b)), (field, a, b)


@pytest.mark.parametrize("kind", ["double", "zero_head"])
def test_dla_by_head_inside_hooks_equals_the_baked_model(zoo, kind):
    tokens = _tokens(zoo)

    def run(m):
        return lens.direct_logit_attribution(m, tokens, 3, 5, by="head")

    hooked, reference = _inside(zoo, kind, run), run(_baked(zoo, kind))
    _same(hooked, reference)
    assert hooked.extras.keys() == reference.extras.keys()
    for key, value in reference.extras.items():
        assert abs(hooked.extras[key] - value) < 1e-4, key
    if kind == "zero_head":
        assert hooked.values[LAYER, HEAD].abs() < 1e-6


def test_dla_by_head_inside_hooks_equals_a_hand_computation(zoo):
    """Per head: the hooked z_h through W_O's columns of head h, dotted with the unembedding
    direction through the final LayerNorm frozen at the hooked run's scale, at the last position."""
    tokens, correct, wrong = _tokens(zoo), 3, 5
    names = ["ln_final.hook_in", *[f"blocks.{i}.attn.hook_z" for i in range(2)]]
    _, cache = zoo.run_with_cache(tokens, names=names, hooks=[(f"blocks.{LAYER}.attn.hook_z", _double)])
    result = _inside(
        zoo, "double", lambda m: lens.direct_logit_attribution(m, tokens, correct, wrong, by="head")
    )
    ln, unembed = component(zoo, "ln_final"), component(zoo, "unembed")
    w_ln = next(p for n, p in ln.named_parameters() if n.endswith("weight")).detach()
    w_u = next(p for n, p in unembed.named_parameters() if n.endswith("weight")).detach()  # [vocab, d]
    x = cache["ln_final.hook_in"][:, -1]
    centred = x - x.mean(-1, keepdim=True)
    scale = (centred.pow(2).mean(-1, keepdim=True) + ln.eps).sqrt()
    direction = w_ln * (w_u[correct] - w_u[wrong])
    g = (direction - direction.mean()) / scale  # [batch, d]
    for layer in range(2):
        w_o = next(
            p for n, p in component(zoo, f"blocks.{layer}.attn.o").named_parameters() if n.endswith("weight")
        ).detach()  # [d_model, head * d_head]
        z = cache[f"blocks.{layer}.attn.hook_z"][:, -1].reshape(len(tokens), 4, -1)
        per_head = torch.einsum("bhd,mhd,bm->bh", z, w_o.reshape(-1, 4, z.shape[-1]), g).mean(0)
        torch.testing.assert_close(result.values[layer], per_head, atol=1e-5, rtol=1e-4)


def test_the_user_hook_runs_once_per_analysed_forward_and_never_in_a_probe(zoo):
    """Count the hook's calls against the forwards a method runs outside internal probes: equal."""
    tokens, calls, forwards = _tokens(zoo), [], []
    inner = zoo._forward

    def counted_forward(prepared):
        if probe_depth() == 0:
            forwards.append(1)
        return inner(prepared)

    zoo._forward = counted_forward
    try:
        with zoo.hooks([(f"blocks.{LAYER}.attn.hook_z", lambda z, hook: calls.append(probe_depth()))]):
            lens.direct_logit_attribution(zoo, tokens, 3, 5, by="head")
            lens.logit_lens(zoo, tokens)
            P.patch(zoo, tokens, _tokens(zoo, seed=1), "head_pos", P.logit_diff(3, 5))
    finally:
        del zoo._forward
    assert calls == [0] * len(forwards) and len(forwards) >= 3


def test_internal_probes_skip_user_and_persistent_hooks_but_run_their_own(zoo):
    tokens, seen = _tokens(zoo), []
    zoo.add_hook("blocks.0.hook_resid_pre", lambda act, hook: seen.append("persistent"))
    try:
        with zoo.hooks([("blocks.0.hook_resid_pre", lambda act, hook: seen.append("user"))]):
            with zoo._internal():
                zoo.run_with_hooks(
                    tokens, [("blocks.0.hook_resid_pre", lambda act, hook: seen.append("probe"))]
                )
            assert seen == ["probe"]
            zoo(tokens)
            assert seen == ["probe", "persistent", "user"]
    finally:
        zoo.reset_hooks()


@pytest.mark.parametrize("kind", ["double", "zero_head"])
def test_logit_lens_inside_hooks_equals_the_baked_model(zoo, kind):
    tokens = _tokens(zoo)
    hooked = _inside(zoo, kind, lambda m: lens.logit_lens(m, tokens))
    reference = lens.logit_lens(_baked(zoo, kind), tokens)
    torch.testing.assert_close(hooked.logits, reference.logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["double", "zero_head"])
def test_patching_sweeps_inside_hooks_equal_the_baked_model(zoo, kind):
    clean, corrupted = _tokens(zoo), _tokens(zoo, seed=1)
    metric = P.logit_diff(3, 5)
    twin = _baked(zoo, kind)
    for site in ("head_pos", "resid_pre", "head"):
        hooked = _inside(zoo, kind, lambda m, site=site: P.patch(m, clean, corrupted, site, metric))
        _same(hooked, P.patch(twin, clean, corrupted, site, metric))


@pytest.mark.parametrize("kind", ["double", "zero_head"])
def test_ablation_and_path_patching_inside_hooks_equal_the_baked_model(zoo, kind):
    clean, corrupted = _tokens(zoo), _tokens(zoo, seed=1)
    metric = P.logit_diff(3, 5)
    twin = _baked(zoo, kind)
    for run in (
        lambda m: ablation.ablate(m, clean, "head", "mean", metric),
        lambda m: ablation.ablate(m, clean, "head_pos", "zero", metric),
        lambda m: path_patching.path_patch(m, clean, corrupted, "logits", metric),
        lambda m: path_patching.path_patch(m, clean, corrupted, [(1, 0)], metric),
    ):
        _same(_inside(zoo, kind, run), run(twin))


@pytest.mark.parametrize("kind", ["double", "zero_head"])
def test_attribution_patching_inside_hooks_equals_the_baked_model(zoo, kind):
    clean, corrupted = _tokens(zoo), _tokens(zoo, seed=1)
    metric = P.logit_diff(3, 5)
    twin = _baked(zoo, kind)
    for run in (
        lambda m: attribution_patching.attribution_patch(m, clean, corrupted, "head_pos", metric),
        lambda m: attribution_patching.attribution_patch_edges(m, clean, corrupted, metric),
    ):
        _same(_inside(zoo, kind, run), run(twin))


def test_integrated_gradients_and_probing_inside_hooks_equal_the_baked_model(zoo):
    tokens = _tokens(zoo, batch=3)
    twin = _baked(zoo, "double")

    def ig(m):
        return attribution.attribute(m, tokens, target=3, method="ig", n_steps=8).values

    torch.testing.assert_close(_inside(zoo, "double", ig), ig(twin), atol=1e-4, rtol=1e-4)

    def features(m):
        return probing.collect_features(m, tokens, torch.tensor([0, 1, 0]), "blocks.1.hook_attn_out").values[
            "blocks.1.hook_attn_out"
        ]

    torch.testing.assert_close(_inside(zoo, "double", features), features(twin), atol=1e-5, rtol=1e-5)


def test_dla_refuses_a_hook_between_the_heads_and_the_residual_stream(gpt2_model):
    """A hook on the output projection's output changes what the heads add; splitting the layer into
    heads is then undefined, so DLA says so instead of letting the bias term absorb the difference."""
    tokens = torch.tensor([[2, 3, 4, 5, 6, 7]])
    with gpt2_model.hooks([("blocks.1.attn.o.hook_out", lambda out, hook: out * 2.0)]):
        with pytest.raises(interp.errors.InputError, match=r"blocks\.1\.attn\.o do not add up"):
            lens.direct_logit_attribution(gpt2_model, tokens, 3, 5, by="head")
        by_layer = lens.direct_logit_attribution(gpt2_model, tokens, 3, 5, by="layer")
    assert by_layer.values.shape[0] == gpt2_model.n_layers


@pytest.mark.parametrize("kind", ["double", "zero_head"])
def test_dla_on_an_hf_model_inside_hooks_equals_the_baked_model(gpt2_model, gpt2_dir, kind):
    """HF backend: hook_z is a hook point inside the attention, the readout goes through c_proj."""
    tokens = torch.tensor([[2, 3, 4, 5, 6, 7], [7, 6, 5, 4, 3, 2]])
    assert gpt2_model.cfg.n_heads == 4  # the TransformerLens-style hook's view assumes it

    def run(m):
        return lens.direct_logit_attribution(m, tokens, 3, 5, by="head")

    twin = _bake(gpt2_model, kind, twin=interp.load(gpt2_dir))  # HF models load afresh (no deepcopy)
    _same(_inside(gpt2_model, kind, run), run(twin))


def test_embedding_pgd_top_k_and_induction_patching_inside_hooks_equal_the_baked_model(zoo):
    from interp.methods import adversarial, examples, induction_patching

    tokens = _tokens(zoo, batch=2, n=8)
    twin = _baked(zoo, "zero_head")
    hooked = _inside(zoo, "zero_head", lambda m: adversarial.embedding_pgd(m, tokens, eps=0.5, steps=3))
    reference = adversarial.embedding_pgd(twin, tokens, eps=0.5, steps=3)
    torch.testing.assert_close(hooked.delta, reference.delta, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(hooked.logits_adv, reference.logits_adv, atol=1e-4, rtol=1e-4)

    many = _tokens(zoo, batch=12, n=8, seed=2)
    top = _inside(
        zoo, "zero_head", lambda m: examples.top_k(m, many, "blocks.1.hook_attn_out", units=[0, 5], k=3)
    )
    ref = examples.top_k(twin, many, "blocks.1.hook_attn_out", units=[0, 5], k=3)
    assert torch.equal(top.indices, ref.indices)
    torch.testing.assert_close(top.scores, ref.scores, atol=1e-5, rtol=1e-5)

    def localize(m):
        return induction_patching.localize_induction(m, half_len=6, batch=2)

    found, expected = _inside(zoo, "zero_head", localize), localize(twin)
    _same(found.heads, expected.heads)
    assert found.induction_head == expected.induction_head


@pytest.fixture(scope="module")
def cnn_pair():
    """A CNN inside a hook doubling relu1's output, and its twin with conv2's weight doubled."""
    from conftest import TinyCNN

    torch.manual_seed(0)
    module = TinyCNN().eval()
    twin = copy.deepcopy(module)
    with torch.no_grad():
        twin.conv2.weight.mul_(2.0)
    return interp.load(module, input_shape=(1, 8, 8), input_range=(0.0, 1.0)), interp.load(
        twin, input_shape=(1, 8, 8), input_range=(0.0, 1.0)
    )


def test_image_methods_inside_hooks_equal_the_baked_model(cnn_pair):
    from interp.methods import adversarial, featureviz

    model, twin = cnn_pair
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 3])
    hook = [("relu1.hook_out", lambda act, h: act * 2.0)]
    with model.hooks(hook):
        fgsm = adversarial.fgsm(model, x, y, eps=0.1)
        pgd = adversarial.pgd(model, x, y, eps=0.1, steps=3)
        ig = attribution.attribute(model, x, target=y, method="ig", n_steps=8)
        art = featureviz.render(model, featureviz.channel("conv2.hook_out", [0, 1]), steps=8, transforms=None)
    torch.testing.assert_close(fgsm.x_adv, adversarial.fgsm(twin, x, y, eps=0.1).x_adv)
    torch.testing.assert_close(pgd.x_adv, adversarial.pgd(twin, x, y, eps=0.1, steps=3).x_adv)
    torch.testing.assert_close(
        ig.values, attribution.attribute(twin, x, target=y, method="ig", n_steps=8).values
    )
    reference = featureviz.render(
        twin, featureviz.channel("conv2.hook_out", [0, 1]), steps=8, transforms=None
    )
    torch.testing.assert_close(art.images, reference.images, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(art.scores, reference.scores, atol=1e-5, rtol=1e-4)


def test_a_user_hook_on_the_logits_sees_every_position_in_a_patching_sweep(zoo):
    """Sweeps compute the unembedding only at the position the metric reads, unless a user hook sits
    there: one that edits position 0's logits cannot change a logit difference read at the last
    position, so the sweep inside it equals the sweep without it (narrowed, it would see +5)."""
    clean, corrupted = _tokens(zoo), _tokens(zoo, seed=1)
    metric = P.logit_diff(3, 5)

    def bump_first_position(logits, hook):
        logits = logits.clone()
        logits[:, 0, 3] += 5.0
        return logits

    with zoo.hooks([("unembed.hook_out", bump_first_position)]):
        assert not zoo.can_keep_positions("unembed.hook_in")
        hooked = P.patch(zoo, clean, corrupted, "resid_pre", metric)
    assert zoo.can_keep_positions("unembed.hook_in")
    _same(hooked, P.patch(zoo, clean, corrupted, "resid_pre", metric))


def test_edge_attribution_refuses_a_hook_between_the_heads_and_the_residual_stream(gpt2_model):
    """Its head results go through the unhooked output projection: with a hook on that projection's
    output the scores would silently describe another model, so it says so."""
    tokens, other = torch.tensor([[2, 3, 4, 5, 6, 7]]), torch.tensor([[7, 3, 4, 5, 6, 2]])
    doubled = [("blocks.1.attn.o.hook_out", lambda out, hook: out * 2.0)]
    refused = pytest.raises(interp.errors.InputError, match=r"a hook on blocks\.1\.attn\.o\.hook_out")
    with gpt2_model.hooks(doubled), refused:
        attribution_patching.attribution_patch_edges(gpt2_model, tokens, other, P.logit_diff(3, 5))
    with gpt2_model.hooks([("blocks.1.attn.hook_z", _double)]):  # on the heads themselves: fine
        attribution_patching.attribution_patch_edges(gpt2_model, tokens, other, P.logit_diff(3, 5))
