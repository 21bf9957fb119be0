"""TransformerLens is the oracle: each hook name interp shares with TL 4.3 carries what TL's bridge
carries under that name, on the same weights, in TL's layout.

Backends: the zoo transformers (native bridges: the bridge is the model, so its own
``run_with_cache`` is the reference), MiniLM and a local GPT-2-architecture directory
(``TransformerBridge.boot_transformers`` of the same directory). Also here: ``attn.hook_result``
on every backend, ``run_with_cache()`` with no names on every zoo transformer, and scalar inputs on
plain modules (TL's HookPoint demo).

Where TL's bridge itself departs from TL's documented semantics the test says so and checks
interp against a hand computation instead (BERT's ``hook_attn_scores``, see below).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import interp
from interp.methods import patching as P

ZOO = ["induction-2l", "induction-1l", "modadd-113"]


@pytest.fixture(scope="module")
def minilm_bridge(minilm):
    from transformer_lens.model_bridge import TransformerBridge

    return TransformerBridge.boot_transformers(minilm.source, device="cpu").eval()


@pytest.fixture(scope="module")
def gpt2_bridge(gpt2_dir):
    from transformer_lens.model_bridge import TransformerBridge

    return TransformerBridge.boot_transformers(gpt2_dir, device="cpu").eval()


def _zoo_tokens(model, batch: int = 3) -> torch.Tensor:
    pos = min(model.n_ctx, 9)
    return torch.randint(0, model.d_vocab, (batch, pos), generator=torch.Generator().manual_seed(0))


def _assert_same(name: str, ours: torch.Tensor, theirs: torch.Tensor, mask=None, atol=1e-5) -> None:
    assert ours.shape == theirs.shape, f"{name}: interp {tuple(ours.shape)} vs TL {tuple(theirs.shape)}"
    if mask is not None and ours.ndim >= 2 and ours.shape[:2] == mask.shape:
        ours, theirs = ours[mask], theirs[mask]  # real (unpadded) positions only
    scale = float(theirs.abs().max().clamp_min(1.0))
    diff = float((ours - theirs).abs().max()) if ours.numel() else 0.0
    assert diff <= atol * scale, f"{name}: max |interp - TL| = {diff:.3g} (scale {scale:.3g})"


# ------------------------------------------------------------------------------------------------
# Zoo transformers (native bridges)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ZOO)
def test_zoo_caches_every_name_with_tl_values_and_layouts(name, one_thread):
    """``run_with_cache(tokens)`` with no names caches every listed name, and every name the bridge
    itself fires carries the bridge's own tensor, in the layout TL's hook functions see
    (q/k/v/z ``[batch, pos, head, d_head]``)."""
    model = interp.load(f"zoo:{name}")
    tokens = _zoo_tokens(model)
    output, cache = model.run_with_cache(tokens)
    assert list(cache) == model.hook_names
    sizes = {"batch": tokens.shape[0], "pos": tokens.shape[1]}
    for hook, shape in model.hook_shapes.items():
        assert tuple(cache[hook].shape) == tuple(sizes.get(d, d) for d in shape), hook

    with torch.no_grad():
        theirs_out, theirs = model.bridge.run_with_cache(tokens)
    torch.testing.assert_close(output, theirs_out, atol=1e-6, rtol=0)
    # names interp lists = names the bridge fires + the per-head results TL computes only for some
    # attention classes; the bridge's gated names (split q/k/v inputs, hook_attn_in, hook_mlp_in)
    # never fire on it and are not listed
    results = {f"blocks.{i}.attn.hook_result" for i in range(model.n_layers)}
    assert set(model.hook_names) == set(theirs) | results
    for hook in theirs:
        if hook.endswith("hook_attn_scores"):  # see test_native_attention_scores_are_pre_softmax
            torch.testing.assert_close(theirs[hook], theirs[hook.replace("attn_scores", "pattern")])
            torch.testing.assert_close(cache[hook].softmax(-1), cache[hook.replace("attn_scores", "pattern")])
            continue
        _assert_same(hook, cache[hook], theirs[hook], atol=1e-6)
    cfg = model.cfg
    assert cache["blocks.0.attn.hook_z"].shape[2:] == (cfg.n_heads, cfg.d_head)
    assert cache["blocks.0.attn.hook_result"].shape[2:] == (cfg.n_heads, cfg.d_model)


def test_zoo_single_gated_names_are_refused_not_silent(one_thread):
    """A name the bridge lists but never fires is not offered: asking for it fails before running."""
    model = interp.load("zoo:induction-2l")
    assert "blocks.0.attn.hook_q_input" in model.bridge.hook_dict
    with pytest.raises(interp.errors.UnknownHookError):
        model.run_with_cache(_zoo_tokens(model), names="blocks.0.attn.hook_q_input")
    _, cache = model.run_with_cache(_zoo_tokens(model), names="blocks.0.attn.hook_result")
    assert list(cache) == ["blocks.0.attn.hook_result"]


def test_zoo_hook_functions_see_tl_layouts(one_thread):
    """A TL-style hook ``z[:, :, head] = 0`` works on the zoo (4-d z) and equals TL's own run of the
    same hook on the bridge."""
    model = interp.load("zoo:induction-2l")
    tokens = _zoo_tokens(model)

    def ablate(z, hook):
        z = z.clone()
        z[:, :, 1] = 0.0
        return z

    ours = model.run_with_hooks(tokens, [("blocks.1.attn.hook_z", ablate)])
    with torch.no_grad():
        theirs = model.bridge.run_with_hooks(tokens, fwd_hooks=[("blocks.1.attn.hook_z", ablate)])
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    assert not torch.allclose(ours, model(tokens), atol=1e-3)  # the ablation did something


NATIVE_VARIANTS = {
    "standard": {},
    "rotary, GQA, soft cap": dict(
        positional_embedding_type="rotary", n_key_value_heads=2, attn_scores_soft_cap=30.0, rotary_dim=8
    ),
}


@pytest.mark.parametrize("variant", list(NATIVE_VARIANTS))
def test_native_attention_scores_are_pre_softmax(variant, one_thread):
    """TL's native attention exposes no scores: its bridge fires ``hook_attn_scores`` after the fact
    with the softmaxed pattern. interp carries TL's documented semantics instead: the scaled scores,
    ``-inf`` where masked; reading them leaves the output bit-identical (interp runs a copy of TL's
    attention with the scores routed through the hook), and replacing them changes the pattern:
    all-zero scores give a uniform causal pattern, 1 / (query position + 1)."""
    cfg = dict(
        n_layers=2, d_model=32, n_heads=4, d_head=8, n_ctx=16, d_vocab=20, attn_only=True, act_fn=None,
        normalization_type="LN", positional_embedding_type="standard", seed=0,
    )  # fmt: skip
    model = interp.load({**cfg, **NATIVE_VARIANTS[variant]})
    tokens = torch.randint(0, 20, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])  # padding exercised
    for inputs in (tokens, {"input_ids": tokens, "attention_mask": mask}):
        plain = model(inputs)
        output, cache = model.run_with_cache(inputs, names="re:blocks.*attn.hook_(attn_scores|pattern|q|k)")
        assert torch.equal(output, plain)
        for layer in range(2):
            scores, pattern = cache["attn_scores", layer], cache["pattern", layer]
            assert torch.isinf(scores[..., 0, 1:]).all() and not torch.isinf(scores[0, :, -1]).any()
            torch.testing.assert_close(scores.softmax(-1)[0], pattern[0])
    if NATIVE_VARIANTS[variant]:
        return
    q, k = (cache[f"blocks.1.attn.hook_{x}"] for x in "qk")
    by_hand = torch.einsum("bqhd,bkhd->bhqk", q, k) / 8**0.5
    causal = torch.ones(7, 7, dtype=torch.bool).tril()
    torch.testing.assert_close(cache["attn_scores", 1][0][:, causal], by_hand[0][:, causal])
    flat = lambda s, hook: torch.zeros_like(s).masked_fill(torch.isinf(s), float("-inf"))  # noqa: E731
    _, edited = model.run_with_cache(
        tokens, names="blocks.0.attn.hook_pattern", hooks=[("blocks.0.attn.hook_attn_scores", flat)]
    )
    uniform = causal / torch.arange(1, 8)[:, None]
    torch.testing.assert_close(edited["pattern", 0], uniform.expand(2, 4, 7, 7))


# ------------------------------------------------------------------------------------------------
# attn.hook_result on every backend
# ------------------------------------------------------------------------------------------------


def _projection(model, layer: int) -> nn.Module:
    module = model.module.get_submodule(f"blocks.{layer}.attn.o") if hasattr(model, "bridge") else None
    if module is not None:
        return module.original_component
    return P.component(model, f"blocks.{layer}.attn.o")


def _check_head_results(model, tokens) -> None:
    """Each head's result is the output projection of that head's z alone (bias removed), the
    results sum to the projection's output less b_O, reading them leaves the output bit-identical,
    and zeroing a head's result equals zeroing its z (as in TL, where the output is their sum)."""
    layer, head = model.n_layers - 1, 1
    names = [f"blocks.{layer}.attn.{n}" for n in ("hook_result", "o.hook_out")]
    plain = model(tokens)
    output, cache = model.run_with_cache(tokens, names=names)
    assert torch.equal(output, plain)
    result, o_out = (cache[n] for n in names)
    # (hooking z on an HF model runs attention eagerly, not through SDPA: rounding-level differences)
    z = model.run_with_cache(tokens, names=f"blocks.{layer}.attn.o.hook_in")[1][
        f"blocks.{layer}.attn.o.hook_in"
    ]
    proj = _projection(model, layer)
    with torch.no_grad():
        for h in range(z.shape[2]):
            alone = torch.zeros_like(z)
            alone[:, :, h] = z[:, :, h]
            flat = alone.flatten(2)
            expected = proj(flat) - proj(torch.zeros_like(flat))
            torch.testing.assert_close(result[:, :, h], expected, atol=1e-5, rtol=1e-5)
    bias = proj.bias if proj.bias is not None else 0.0
    torch.testing.assert_close(result.sum(2) + bias, o_out, atol=1e-5, rtol=1e-5)

    def zero(act, ctx):
        act = act.clone()
        act[:, :, head] = 0.0
        return act

    via_result = model.run_with_hooks(tokens, [(f"blocks.{layer}.attn.hook_result", zero)])
    via_z = model.run_with_hooks(tokens, [(f"blocks.{layer}.attn.hook_z", zero)])
    torch.testing.assert_close(via_result, via_z, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(via_result, plain, atol=1e-4)


@pytest.mark.parametrize("name", ["induction-2l", "modadd-113"])
def test_head_results_on_the_zoo(name, one_thread):
    model = interp.load(f"zoo:{name}")
    _check_head_results(model, _zoo_tokens(model))


def test_head_results_on_minilm(minilm, one_thread):
    _check_head_results(minilm, minilm.prepare(["the cat sat on the mat", "a dog ran far"]))


def test_head_results_on_gpt2_equal_tl(gpt2_model, gpt2_bridge, one_thread):
    """TL's bridge computes hook_result for GPT-2 (``set_use_attn_result``): the same tensor."""
    _check_head_results(gpt2_model, gpt2_model.prepare(["the cat sat on the mat", "a dog ran"]))
    tokens = torch.randint(2, 20, (2, 7), generator=torch.Generator().manual_seed(1))
    gpt2_bridge.set_use_attn_result(True)
    try:
        with torch.no_grad():
            _, theirs = gpt2_bridge.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_result"))
    finally:
        gpt2_bridge.set_use_attn_result(False)
    _, ours = gpt2_model.run_with_cache(tokens, names="blocks.*.attn.hook_result")
    assert set(ours) == set(theirs) and len(ours) == 2
    for hook in ours:
        _assert_same(hook, ours[hook], theirs[hook])


# ------------------------------------------------------------------------------------------------
# HF directories: every shared name against TransformerBridge.boot_transformers
# ------------------------------------------------------------------------------------------------

TEXTS = ["the cat sat on the mat and then it ran", "a dog ran"]  # unequal lengths: padding


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> str:
    """A random-init Llama-architecture model (rotary embeddings, grouped-query attention, gated MLP)."""
    from conftest import WORDS
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    directory = str(tmp_path_factory.mktemp("tiny-llama"))
    vocab = {"<s>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<s>", unk_token="<unk>", pad_token="<s>")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(directory)
    fast.save_pretrained(directory)
    return directory


# TL's generic AttentionBridge (BERT's) fires hook_attn_scores after HF's attention returns, with
# the attention *weights* (post-softmax): there it equals hook_pattern, unlike TL's documented
# pre-softmax scores. interp carries the scores (checked by hand below).
_TL_SCORES_ARE_PATTERN = {"minilm": True, "gpt2": False, "llama": False}


def _shared_names_match(model, bridge, key: str) -> set[str]:
    tokens = model.prepare(TEXTS)
    mask = tokens.attention_mask
    with torch.no_grad():
        _, theirs = bridge.run_with_cache(tokens.input_ids, attention_mask=mask)
    _, ours = model.run_with_cache(tokens)  # everything: attention runs eagerly, through interp's points
    shared = [n for n in model.hook_names if n in bridge.hook_dict]
    unfired = [n for n in shared if n not in theirs]
    # TL fires neither GPT-2's fused qkv projection, nor the rotary module's output (it fires
    # hook_cos/hook_sin instead), nor, by default, hook_result (checked above)
    assert all(".qkv." in n or n.endswith("hook_result") or n == "rotary_emb.hook_out" for n in unfired), (
        unfired
    )
    assert "hook_pos_embed" not in model.hook_names or "hook_pos_embed" in theirs
    real = mask.bool()
    for hook in shared:
        if hook in unfired:
            continue
        if hook.endswith("hook_attn_scores") and _TL_SCORES_ARE_PATTERN[key]:
            layer = hook.split(".")[1]
            torch.testing.assert_close(theirs[hook], theirs[f"blocks.{layer}.attn.hook_pattern"])
            q, k = theirs[f"blocks.{layer}.attn.hook_q"], theirs[f"blocks.{layer}.attn.hook_k"]
            by_hand = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5
            keys = real[:, None, None, :].expand_as(by_hand)
            _assert_same(hook, ours[hook][keys], by_hand[keys])
            continue
        _assert_same(hook, ours[hook], theirs[hook])
    # module-boundary names alone: HF's SDPA attention instead of eager; the two differ by float
    # rounding (measured on MiniLM: <= 3e-6 at real tokens, up to 2e-4 at padding positions, whose
    # queries see only padding keys' rounding), so those are compared at real tokens, to 1e-5 x scale
    boundary = [n for n in shared if ".attn.hook_" not in n and "hook_result" not in n and n in theirs]
    _, fast = model.run_with_cache(tokens, names=boundary)
    assert model.module.config._attn_implementation == model._fast_attention
    for hook in boundary:
        _assert_same(hook, fast[hook], theirs[hook], mask=real)
    return set(theirs)


def test_minilm_shared_names_match_tl(minilm, minilm_bridge, one_thread):
    fired = _shared_names_match(minilm, minilm_bridge, "minilm")
    # the names this change made TL's: the post-LN block's attention output, the stream into ln2
    # (attention block output + MLP output), embed_ln's output, and the MLP input
    for name in ("blocks.0.hook_attn_out", "blocks.0.hook_resid_mid", "hook_embed", "blocks.0.hook_mlp_in"):
        assert name in minilm.hook_names and name in fired
    # TL names interp does not offer on MiniLM: gated (never fire), or the MLM head TL bolts onto
    # the checkpoint (interp loads the BertModel it was saved as); LayerNorm internals are offered
    missing = {n for n in minilm_bridge.hook_dict if n not in minilm.hook_names}
    assert all(
        any(part in n for part in ("_input", "attn_in", "hidden_states"))
        or n.startswith(("ln_final", "mlm_head", "unembed", "hook_unembed"))
        or n.endswith(("mlp.hook_in", "mlp.hook_out"))
        for n in missing
    ), sorted(missing)
    assert all(n in minilm_bridge.hook_dict for n in minilm.hook_names if not n.endswith("hook_result"))


def test_gpt2_shared_names_match_tl(gpt2_model, gpt2_bridge, one_thread):
    _shared_names_match(gpt2_model, gpt2_bridge, "gpt2")
    assert all(n in gpt2_bridge.hook_dict for n in gpt2_model.hook_names)


def test_llama_shared_names_match_tl(llama_dir, one_thread):
    """Rotary embeddings: TL's hook_q/hook_k are the projections' outputs, before rotation, and
    hook_rot_q/hook_rot_k the rotated ones that HF's attention receives; grouped-query k/v have
    n_key_value_heads heads."""
    from transformer_lens.model_bridge import TransformerBridge

    model = interp.load(llama_dir)
    bridge = TransformerBridge.boot_transformers(llama_dir, device="cpu").eval()
    fired = _shared_names_match(model, bridge, "llama")
    assert {"blocks.0.attn.hook_rot_q", "blocks.0.attn.hook_rot_k"} <= fired & set(model.hook_names)
    assert model.hook_shapes["blocks.0.attn.hook_k"] == ("batch", "pos", 2, 8)
    assert all(n in bridge.hook_dict for n in model.hook_names if not n.endswith("hook_result"))


def test_minilm_attn_out_patching_equals_tl(minilm, minilm_bridge, one_thread):
    """``patch(..., "attn_out")`` equals TL's ``get_act_patch_attn_out`` on MiniLM. The metric reads
    the final residual stream (a fixed direction at the last token): MiniLM's output in interp; on
    the bridge (whose output is an MLM head's logits) it is read by a permanent hook."""
    from transformer_lens.patching import get_act_patch_attn_out

    clean, corrupted = "the cat sat on the mat", "the dog ran under the rug"
    clean_t, corrupt_t = minilm.prepare(clean), minilm.prepare(corrupted)
    assert clean_t.input_ids.shape == corrupt_t.input_ids.shape
    direction = torch.randn(384, generator=torch.Generator().manual_seed(0))

    def read(final: torch.Tensor) -> torch.Tensor:
        return final[:, -1] @ direction

    ours = P.patch(minilm, clean, corrupted, "attn_out", lambda out: read(out).sum())
    final = {}
    last = minilm_bridge.blocks[5].hook_out
    last.add_perma_hook(lambda act, hook: final.__setitem__("x", act))
    try:
        with torch.no_grad():
            _, clean_cache = minilm_bridge.run_with_cache(clean_t.input_ids)
            theirs = get_act_patch_attn_out(
                minilm_bridge, corrupt_t.input_ids, clean_cache, lambda logits: read(final["x"]).sum()
            )
    finally:
        minilm_bridge.reset_hooks(including_permanent=True)
    assert ours.values.shape == theirs.shape
    torch.testing.assert_close(ours.values, theirs, atol=1e-4, rtol=1e-4)
    assert float(ours.values.std()) > 1e-3  # the sweep is not flat


# ------------------------------------------------------------------------------------------------
# Plain modules: TL's HookPoint demo input
# ------------------------------------------------------------------------------------------------


def test_scalar_input_on_a_module_matches_tl_hookpoint_demo():
    """TL's HookPoint demo runs ``run_with_cache(torch.tensor(5.0))`` on a two-layer module of
    HookPoints; interp caches the same values under ``<path>.hook_out``."""
    from transformer_lens import HookedRootModule
    from transformer_lens.hook_points import HookPoint

    class SquareThenAdd(nn.Module):
        def __init__(self, offset: float) -> None:
            super().__init__()
            self.offset = nn.Parameter(torch.tensor(offset))
            self.hook_square = HookPoint()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.offset + self.hook_square(x * x)

    class TwoLayerModel(HookedRootModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer1, self.layer2 = SquareThenAdd(3.0), SquareThenAdd(-4.0)
            self.hook_in, self.hook_mid, self.hook_out = HookPoint(), HookPoint(), HookPoint()
            self.setup()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            mid = self.hook_mid(self.layer1(self.hook_in(x)))
            return self.hook_out(self.layer2(mid))

    tl_model = TwoLayerModel()
    tl_out, tl_cache = tl_model.run_with_cache(torch.tensor(5.0))
    model = interp.load(tl_model)
    out, cache = model.run_with_cache(torch.tensor(5.0))
    assert float(out) == float(tl_out.detach()) == (5.0**2 + 3.0) ** 2 - 4.0
    for name, value in tl_cache.items():
        torch.testing.assert_close(cache[f"{name}.hook_out"], value)
    _, one_d = model.run_with_cache(torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(one_d["hook_mid.hook_out"], torch.tensor([4.0, 7.0]))


def test_copies_hook_their_own_modules(gpt2_model, one_thread):
    """``copy.deepcopy`` (as ``attribution.randomized`` does): the copy's views, head results and
    attention hook points read the copy's modules. Doubling the copy's W_O doubles its results only."""
    import copy

    for model in (gpt2_model, interp.load("zoo:induction-2l")):
        clone = copy.deepcopy(model)
        with torch.no_grad():
            _projection(clone, 1).weight.mul_(2.0)
        tokens = torch.randint(2, 20, (2, 6), generator=torch.Generator().manual_seed(2))
        names = ["blocks.1.attn.hook_result", "blocks.1.attn.hook_z", "blocks.1.attn.hook_pattern"]
        _, ours = model.run_with_cache(tokens, names=names)
        _, theirs = clone.run_with_cache(tokens, names=names)
        torch.testing.assert_close(theirs[names[0]], 2 * ours[names[0]])
        torch.testing.assert_close(theirs[names[1]], ours[names[1]])
        torch.testing.assert_close(theirs[names[2]], ours[names[2]])


@pytest.mark.parametrize("key", ["minilm", "gpt2"])
def test_hf_replacements_equal_tl(key, request, one_thread):
    """TL-style hooks that edit q/v/z per head change the model as the same hooks do on TL's bridge
    (checked at the last block's output); so does an edit of hook_resid_mid on post-LN MiniLM.

    One deliberate difference, on pre-LN blocks: TL 4.3's bridge aliases hook_resid_mid to ln2's
    input, so an edit there reaches only the MLP and the residual add keeps the old stream. interp
    writes the edit through (``HookedModel._write_through``): resid_post = new resid_mid +
    mlp(ln2(new resid_mid)), as in HookedTransformer, where hook_resid_mid is the stream itself.
    Checked exactly: interp's resid_post = TL's + (new - old resid_mid)."""
    model = request.getfixturevalue("minilm" if key == "minilm" else "gpt2_model")
    bridge = request.getfixturevalue(f"{key}_bridge")

    def zero_head(act, hook):
        act = act.clone()
        act[:, :, 1] = 0.0
        return act

    def double(act, hook):
        return act * 2.0

    def run_both(hooks, name):
        _, ours = model.run_with_cache(tokens, names=name, hooks=hooks)
        with torch.no_grad(), bridge.hooks(fwd_hooks=hooks):
            _, theirs = bridge.run_with_cache(tokens.input_ids, names_filter=lambda n: n == name)
        return ours[name], theirs[name]

    tokens = model.prepare("the cat sat on the mat")
    last = f"blocks.{model.n_layers - 1}.hook_resid_post"
    heads = [
        ("blocks.0.attn.hook_v", double),
        ("blocks.1.attn.hook_q", zero_head),
        ("blocks.1.attn.hook_z", zero_head),
    ]
    ours, theirs = run_both(heads, last)
    _assert_same(last, ours, theirs)
    assert not torch.allclose(ours, model.run_with_cache(tokens, names=last)[1][last], atol=1e-3)

    ours, theirs = run_both([("blocks.0.hook_resid_mid", double)], "blocks.0.hook_resid_post")
    if key == "minilm":  # post-LN: resid_mid is ln2's input, and nothing bypasses it
        _assert_same("blocks.0.hook_resid_post", ours, theirs)
    else:
        mid = model.run_with_cache(tokens, names="blocks.0.hook_resid_mid")[1]["blocks.0.hook_resid_mid"]
        _assert_same("blocks.0.hook_resid_post", ours, theirs + mid)


def test_views_fire_in_any_forward(gpt2_model, one_thread):
    """Views (4-d q/k/v/z at the projections, head results, native scores) fire in forwards interp
    does not run itself (a generation loop calling the module), and leave nothing attached once the
    hooks are removed. (HF's attention-function points, hook_pattern etc., also need the forward to
    select interp's attention implementation, as ``_forward`` does.)"""
    for model in (gpt2_model, interp.load("zoo:induction-2l")):
        seen: dict[str, tuple] = {}
        names = ["blocks.1.attn.o.hook_in", "blocks.1.attn.hook_result"]
        names += (
            ["blocks.1.attn.hook_attn_scores", "blocks.1.attn.hook_q"] if hasattr(model, "bridge") else []
        )
        tokens = torch.randint(2, 20, (2, 5), generator=torch.Generator().manual_seed(3))
        record = lambda act, ctx, seen=seen: seen.__setitem__(ctx.name, tuple(act.shape))  # noqa: E731
        with model.hooks([(n, record) for n in names]):
            model.module(tokens) if hasattr(model, "bridge") else model.module(input_ids=tokens)
        assert set(seen) == set(names) and seen["blocks.1.attn.o.hook_in"][2] == model.cfg.n_heads
        assert all(view.point._bridge is None and not view.point._forward_hooks for view in model._views)
