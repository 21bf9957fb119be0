"""interp.sae: SAELens-format dictionaries, splicing with latents as hook points, evaluation.

Oracles: hand computations (identity and mean-predicting dictionaries, the EV example from
SAELens's tests, a steering edit equal to adding the decoder row at the site), the unspliced
model (error-term exactness), and SAELens 6.54 itself in its own venv (skipped when absent).

The SAELens venv (SAELens pins transformer-lens<4, so it cannot share our environment):
    python -m venv /work/venvs/saelens
    /work/venvs/saelens/bin/pip install torch==2.13.0 && /work/venvs/saelens/bin/pip install sae-lens
(sae-lens 6.54.12 with transformer-lens 3.9.0 here; point $INTERP_SAELENS_VENV elsewhere to move it).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch
from einops import rearrange
from safetensors.torch import load_file, save_file
from torch import nn

import interp
from interp import sae as S
from interp.errors import CheckpointError, InputError, UnknownHookError
from interp.methods import ablation as AB
from interp.methods import attribution_patching as A
from interp.methods import patching as P
from interp.sae.evaluation import _Stats

SAELENS_PY = Path(os.environ.get("INTERP_SAELENS_VENV", "/work/venvs/saelens")) / "bin" / "python"
INTEROP = Path(__file__).parent / "interop" / "saelens_roundtrip.py"
SITE = "blocks.0.hook_resid_post"
TEXTS = ["the cat sat on the mat", "a dog ran under the rug and then it was big", "the red cat"]


def _random_sae(arch: str = "standard", d_in: int = 32, d_sae: int = 48, seed: int = 0, **kw) -> S.SAE:
    extra = {"k": 6} if arch in ("topk", "batchtopk") else {}
    if arch in ("transcoder", "skip_transcoder"):
        extra = {"hook_name_out": "blocks.0.hook_mlp_out", "apply_b_dec_to_input": False}
    cfg = S.SAEConfig(
        d_in=d_in, d_sae=d_sae, architecture=arch, hook_name=kw.pop("hook", SITE), **extra, **kw
    )
    sae = S.SAE(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        if hasattr(sae, "threshold"):
            sae.threshold.copy_(torch.rand(d_sae, generator=gen) * 0.3)
    return sae


def _identity_sae(d_in: int, hook: str) -> S.SAE:
    """W_dec = [I; -I], W_enc = W_decᵀ, zero biases: relu(x) - relu(-x) = x exactly."""
    sae = S.SAE(S.SAEConfig(d_in=d_in, d_sae=2 * d_in, hook_name=hook))
    eye = torch.eye(d_in)
    with torch.no_grad():
        sae.W_dec.copy_(torch.cat([eye, -eye]))
        sae.W_enc.copy_(sae.W_dec.T)
    return sae


# --- format ----------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu", "transcoder", "skip_transcoder"])
def test_save_load_roundtrip_keeps_weights_and_outputs(tmp_path, arch):
    sae = _random_sae(arch)
    sae.save(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["architecture"] == arch and cfg["metadata"]["hook_name"] == SITE
    assert set(load_file(str(tmp_path / "sae_weights.safetensors"))) == set(sae.state_dict())
    assert tuple(sae.W_enc.shape) == (32, 48) and tuple(sae.W_dec.shape[:1]) == (48,)
    back = S.load(tmp_path)
    x = torch.randn(5, 32)
    assert back.cfg.to_dict() == sae.cfg.to_dict()
    assert torch.equal(back.encode(x), sae.encode(x))
    assert torch.equal(back.reconstruct(x), sae.reconstruct(x))


def test_batchtopk_is_saved_as_jumprelu_with_its_threshold(tmp_path):
    sae = _random_sae("batchtopk")
    x = torch.randn(7, 32)
    sae.save(tmp_path)
    back = S.load(tmp_path)
    assert back.cfg.architecture == "jumprelu" and back.cfg.metadata["trained_as"] == "batchtopk"
    pre = sae.pre_acts(x)
    expected = torch.relu(pre) * (pre > sae.threshold)
    assert torch.equal(back.encode(x), expected) and torch.equal(sae.encode(x), expected)
    sae.train()  # training: k * tokens latents kept over the whole batch
    assert int((sae.encode(x) > 0).sum()) <= 6 * 7


def test_hand_explained_variance_and_mean_prediction():
    sae = S.SAE(S.SAEConfig(d_in=2, d_sae=2))
    stats = _Stats(sae)
    x = torch.tensor([[2.0, 0.0], [0.0, 4.0]])
    stats.add(x, torch.tensor([[2.0, 1.0], [0.0, 3.0]]), torch.zeros(2, 2))
    assert stats.metrics(0.1)[0]["explained_variance"] == pytest.approx(0.8, abs=1e-12)
    stats = _Stats(sae)
    stats.add(x, x.mean(0).expand(2, 2), torch.zeros(2, 2))
    assert stats.metrics(0.1)[0]["explained_variance"] == pytest.approx(0.0, abs=1e-12)


# --- bad input -------------------------------------------------------------------------------


def test_unknown_architecture_is_refused_with_a_suggestion():
    with pytest.raises(InputError, match="unknown SAE architecture 'top_k'.*'topk'"):
        S.SAEConfig(d_in=4, d_sae=8, architecture="top_k")


def test_corrupt_partial_and_unverified_checkpoints(tmp_path):
    sae = _random_sae()
    good = tmp_path / "good"
    sae.save(good)
    weights = good / "sae_weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF  # one flipped bit in the weights
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match the hash recorded in its sidecar"):
        S.load(good)
    weights.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="corrupt"):
        S.load(good, verify=False)
    weights.unlink()
    with pytest.raises(CheckpointError, match="partial SAE checkpoint.*sae_weights.safetensors is missing"):
        S.load(good)
    other = tmp_path / "other"
    sae.save(other)
    (other / "sae_weights.safetensors.sha256").unlink()
    with pytest.raises(CheckpointError, match="verify=False"):
        S.load(other)
    assert torch.equal(S.load(other, verify=False).W_enc, sae.W_enc)
    cfg = json.loads((other / "cfg.json").read_text())
    (other / "cfg.json").write_text(json.dumps({**cfg, "d_sae": 40}))
    with pytest.raises(CheckpointError, match="W_enc: file \\(32, 48\\) vs cfg \\(32, 40\\)"):
        S.load(other, verify=False)


def test_width_mismatch_names_both_widths(gpt2_model):
    sae = _random_sae(d_in=16)
    with pytest.raises(InputError, match="d_in=16 but blocks.0.hook_resid_post .* has width 32"):
        gpt2_model.saes([sae]).__enter__()


def test_unknown_hook_suggests_the_closest(gpt2_model):
    sae = _random_sae(hook="blocks.0.hook_resid_pots")
    with pytest.raises(UnknownHookError, match="Did you mean: blocks.0.hook_resid_post"):
        gpt2_model.run_with_saes(TEXTS[0], [sae])


def test_sae_at_a_hook_the_forward_never_reaches():
    class WithUnused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.unused = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.used(x)

    model = interp.load(WithUnused())
    sae = _random_sae(d_in=4, d_sae=8, hook="unused.hook_out")
    with pytest.raises(InputError, match="never reached that hook"):
        model.run_with_saes(torch.randn(2, 4), [sae])
    assert "unused.hook_out.hook_sae_acts_post" not in model.hook_names


# --- splicing: latents as hook points --------------------------------------------------------


def test_error_term_keeps_the_output_exactly(gpt2_model):
    sae = _random_sae()
    base = gpt2_model(TEXTS)
    assert torch.equal(gpt2_model.run_with_saes(TEXTS, [sae], use_error_term=True), base)
    assert not torch.allclose(gpt2_model.run_with_saes(TEXTS, [sae]), base, atol=1e-3)
    before = list(gpt2_model.hook_names)
    with pytest.raises(RuntimeError, match="boom"), gpt2_model.saes([sae]):
        assert f"{SITE}.hook_sae_acts_post" in gpt2_model.hook_names
        raise RuntimeError("boom")
    assert gpt2_model.hook_names == before  # the site table is restored
    other = _random_sae("topk", hook="blocks.1.hook_resid_post")
    with gpt2_model.saes([sae], use_error_term=True), gpt2_model.saes([other], use_error_term=True):
        assert torch.equal(gpt2_model(TEXTS), base)  # nested splices stack
        assert "blocks.1.hook_resid_post.hook_sae_acts_post" in gpt2_model.hook_names
        with pytest.raises(InputError, match="already spliced"):
            gpt2_model.saes([sae]).__enter__()
    assert gpt2_model.hook_names == before


def test_hooks_on_the_host_see_the_spliced_value(gpt2_model):
    sae = _random_sae()
    _, plain = gpt2_model.run_with_cache(TEXTS, names=SITE)
    _, spliced = gpt2_model.run_with_cache_with_saes(TEXTS, [sae], names=SITE)
    assert torch.allclose(spliced[SITE], sae.reconstruct(plain[SITE]), atol=1e-6)


def test_an_sae_at_resid_mid_feeds_both_the_mlp_and_the_residual_add(gpt2_model):
    mid = "blocks.0.hook_resid_mid"
    assert gpt2_model._write_through.get(mid) == SITE  # resid_mid is read at ln2's input
    sae = _random_sae(hook=mid)
    base = gpt2_model(TEXTS)
    assert torch.equal(gpt2_model.run_with_saes(TEXTS, [sae], use_error_term=True), base)
    names = [mid, "blocks.0.hook_mlp_out", SITE]
    _, cache = gpt2_model.run_with_cache_with_saes(TEXTS, [sae], names=names)
    assert torch.allclose(cache[SITE], cache[mid] + cache["blocks.0.hook_mlp_out"], atol=1e-5)


def test_hook_z_sae_reads_heads_flattened(gpt2_model):
    z = "blocks.0.attn.hook_z"
    assert gpt2_model.hook_shapes[z] == ("batch", "pos", 4, 8)
    sae = _random_sae(hook=z, reshape_activations="hook_z")
    base = gpt2_model.run_with_hooks(TEXTS, [(z, lambda act, hook: None)])  # eager attention, as hooked
    assert torch.equal(gpt2_model.run_with_saes(TEXTS, [sae], use_error_term=True), base)
    _, plain = gpt2_model.run_with_cache(TEXTS, names=z)
    names = [f"{z}.hook_sae_acts_post", z]
    _, cache = gpt2_model.run_with_cache_with_saes(TEXTS, [sae], names=names)
    flat = rearrange(plain[z], "b p h d -> b p (h d)")
    assert torch.equal(cache[f"{z}.hook_sae_acts_post"], sae.encode(flat))
    assert torch.allclose(cache[z], rearrange(sae.reconstruct(flat), "b p (h d) -> b p h d", h=4), atol=1e-6)
    assert S.evaluate(gpt2_model, sae, TEXTS)["l0"] > 0
    with pytest.raises(InputError, match="d_in=32 but blocks.0.attn.hook_z .* has width 8"):
        gpt2_model.saes([_random_sae(hook=z)]).__enter__()  # without hook_z reshaping


def test_latent_capture_equals_encode_of_the_site(gpt2_model):
    sae = _random_sae("topk")
    _, plain = gpt2_model.run_with_cache(TEXTS, names=SITE)
    names = [f"{SITE}.{p}" for p in S.HOOK_POINTS]
    _, cache = gpt2_model.run_with_cache_with_saes(TEXTS, [sae], names=names, use_error_term=True)
    assert torch.equal(cache[f"{SITE}.hook_sae_acts_post"], sae.encode(plain[SITE]))
    assert torch.equal(cache[f"{SITE}.hook_sae_input"], plain[SITE])
    recons, error = cache[f"{SITE}.hook_sae_recons"], cache[f"{SITE}.hook_sae_error"]
    assert torch.allclose(recons + error, plain[SITE], atol=1e-6)
    assert gpt2_model.hook_shapes.get(f"{SITE}.hook_sae_acts_post") is None  # gone after the run
    with gpt2_model.saes(sae):
        assert gpt2_model.hook_shapes[f"{SITE}.hook_sae_acts_post"] == ("batch", "pos", 48)


def test_steering_a_latent_adds_its_decoder_row(gpt2_model):
    sae = _random_sae()
    latent, alpha = 5, 2.5
    steered = gpt2_model.run_with_saes(
        TEXTS[1],
        [sae],
        use_error_term=True,
        hooks=[(f"{SITE}.hook_sae_acts_post", S.steering_hook(latent, alpha))],
    )
    direction = sae.W_dec[latent].detach()
    by_hand = gpt2_model.run_with_hooks(TEXTS[1], [(SITE, lambda act, hook: act + alpha * direction)])
    assert torch.allclose(steered, by_hand, atol=1e-5)
    assert not torch.allclose(steered, gpt2_model(TEXTS[1]), atol=1e-3)


def test_transcoder_replaces_the_mlp_output(gpt2_model):
    tc = _random_sae("skip_transcoder", hook="blocks.0.mlp.hook_in")
    base = gpt2_model(TEXTS)
    assert torch.equal(gpt2_model.run_with_saes(TEXTS, [tc], use_error_term=True), base)
    _, plain = gpt2_model.run_with_cache(TEXTS, names="blocks.0.mlp.hook_in")
    _, cache = gpt2_model.run_with_cache_with_saes(TEXTS, [tc], names="blocks.0.hook_mlp_out")
    assert torch.allclose(
        cache["blocks.0.hook_mlp_out"], tc.reconstruct(plain["blocks.0.mlp.hook_in"]), atol=1e-6
    )


def test_patching_engine_sweeps_latent_hooks(gpt2_model):
    sae = _random_sae()
    clean, corrupt = "the cat sat on the mat", "the dog ran on the rug"
    hook = f"{SITE}.hook_sae_acts_post"
    metric = P.logit_diff(gpt2_model.tokenizer.convert_tokens_to_ids("mat"), 3)
    with gpt2_model.saes([sae], use_error_term=True):
        # the splice is part of the model in the engine's own plan checks: a tiling plan verifies
        assert gpt2_model.shares_prefix(gpt2_model.prepare(corrupt), hook)
        result = P.patch(gpt2_model, clean, corrupt, site=hook, metric=metric)
        _, cache = gpt2_model.run_with_cache(clean, names=hook)
        for pos in (0, 3):

            def put(act, ctx, pos=pos):
                act = act.clone()
                act[:, pos] = cache[hook][:, pos]
                return act

            by_hand = float(metric(gpt2_model.run_with_hooks(corrupt, [(hook, put)])))
            assert result.values[0, pos].item() == pytest.approx(by_hand, abs=1e-4)


def test_sae_latent_site_patches_one_latent_at_one_position(gpt2_model):
    sae = _random_sae()
    clean, corrupt = "the cat sat on the mat", "the dog ran on the rug"
    hook = f"{SITE}.hook_sae_acts_post"
    metric = P.logit_diff(gpt2_model.tokenizer.convert_tokens_to_ids("mat"), 3)
    with pytest.raises(InputError, match="none is spliced"):
        P.patch(gpt2_model, clean, corrupt, site="sae_latent", metric=metric)
    with gpt2_model.saes([sae], use_error_term=True):
        result = P.patch(
            gpt2_model, clean, corrupt, site="sae_latent", metric=metric, positions=[1, 4], neurons=[0, 7]
        )
        assert result.dims == ("sae", "pos", "latent") and result.values.shape == (1, 2, 2)
        _, cache = gpt2_model.run_with_cache(clean, names=hook)
        _, base = gpt2_model.run_with_cache(corrupt, names=hook)

        def put(act, ctx):
            act = act.clone()
            act[:, 4, 7] = cache[hook][:, 4, 7]
            return act

        by_hand = float(metric(gpt2_model.run_with_hooks(corrupt, [(hook, put)])))
        assert result.values[0, 1, 1].item() == pytest.approx(by_hand, abs=1e-4)
        ablated = AB.ablate(
            gpt2_model, corrupt, site="sae_latent", kind="zero", metric=metric, positions=[4], neurons=[7]
        )

        def zero(act, ctx):
            act = act.clone()
            act[:, 4, 7] = 0.0
            return act

        assert ablated.values[0, 0, 0].item() == pytest.approx(
            float(metric(gpt2_model.run_with_hooks(corrupt, [(hook, zero)]))), abs=1e-4
        )
        atp = A.attribution_patch(gpt2_model, clean, corrupt, site="sae_latent", metric=metric, neurons=[7])
        leaf = base[hook].clone().requires_grad_(True)  # the gradient by hand, through a leaf
        out = gpt2_model.run_with_hooks(corrupt, [(hook, lambda act, ctx: leaf)], grad=True)
        (grad,) = torch.autograd.grad(metric(out), leaf)
        expected = atp.metric_corrupted + (grad[0, :, 7] * (cache[hook][0, :, 7] - base[hook][0, :, 7]))
        assert torch.allclose(atp.values[0, :, 0], expected.float(), atol=1e-5)


def test_top_k_examples_and_logit_effects_of_a_latent(gpt2_model, corpus):
    from interp.methods.examples import top_k

    texts, _ = corpus
    texts = texts[:12]
    sae = _random_sae()
    hook = f"{SITE}.hook_sae_acts_post"
    with gpt2_model.saes([sae], use_error_term=True):
        top = top_k(gpt2_model, texts, hook, units=[3], k=2, batch_size=4)
    _, cache = gpt2_model.run_with_cache(texts, names=SITE)
    best = sae.encode(cache[SITE])[..., 3].amax(dim=1)
    assert list(top.indices[0]) == torch.argsort(best, descending=True)[:2].tolist()
    assert torch.allclose(torch.as_tensor(top.scores[0]), best.sort(descending=True).values[:2], atol=1e-5)
    effects = S.logit_effects(gpt2_model, sae, 3, k=4)
    by_hand = torch.einsum(
        "d,vd->v", sae.W_dec[3].detach(), gpt2_model.tokens_to_residual_directions(torch.arange(20))
    )
    assert torch.allclose(effects.values, by_hand, atol=1e-5)
    assert effects.top_ids == torch.argsort(by_hand, descending=True)[:4].tolist()
    assert effects.bottom_values[0] == pytest.approx(float(by_hand.min()), abs=1e-5)


# --- evaluation ------------------------------------------------------------------------------


def test_identity_sae_evaluates_perfectly(gpt2_model):
    result = S.evaluate(gpt2_model, _identity_sae(32, SITE), TEXTS, batch_size=2)
    assert result["explained_variance"] == 1.0 and result["mse"] == 0.0
    assert result["l0"] == 32.0 and result["cossim"] == pytest.approx(1.0, abs=1e-12)
    assert result["ce_loss_score"] == 1.0 and result["kl_div_score"] == pytest.approx(1.0, abs=1e-6)
    assert result["ce_loss_with_sae"] == result["ce_loss_without_sae"]
    assert result["ce_loss_with_ablation"] != result["ce_loss_without_sae"]
    assert result.nested()["sparsity"]["l0"] == 32.0
    real = sum(len(t.split()) for t in TEXTS)
    assert result["total_tokens_evaluated"] == real  # padding excluded


def test_mean_predicting_sae_explains_no_variance(gpt2_model):
    _, cache = gpt2_model.run_with_cache(TEXTS, names=SITE)
    mask = cache.meta["attention_mask"].bool()
    mean = cache[SITE][mask].double().mean(0).float()
    sae = S.SAE(S.SAEConfig(d_in=32, d_sae=4, hook_name=SITE, apply_b_dec_to_input=False))
    with torch.no_grad():
        sae.b_dec.copy_(mean)
    result = S.evaluate(gpt2_model, sae, TEXTS, ablation="mean")
    assert result["explained_variance"] == pytest.approx(0.0, abs=1e-6)
    assert result["l0"] == 0.0 and result["dead_fraction"] == 1.0
    assert result["ce_loss_with_sae"] == pytest.approx(result["ce_loss_with_ablation"], abs=1e-5)


# --- SAELens interop (its own venv) ----------------------------------------------------------

needs_saelens = pytest.mark.skipif(not SAELENS_PY.exists(), reason="no SAELens venv (see tests/interop/)")
ARCHS = ["standard", "topk", "jumprelu", "transcoder", "skip_transcoder"]


def _run_saelens(*args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    done = subprocess.run(
        [str(SAELENS_PY), str(INTEROP), *args], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]


def _compare(sae: S.SAE, directory: Path) -> None:
    x = load_file(str(directory / "x.safetensors"))["x"]
    ref = load_file(str(directory / "saelens_out.safetensors"))
    with torch.no_grad():
        acts = sae.encode(x)
        assert torch.equal(acts, ref["acts"])
        assert torch.equal(sae.decode(acts, x), ref["decoded"])
        assert torch.equal(sae(x), ref["forward"])


@needs_saelens
def test_saelens_reads_ours_and_we_read_theirs(tmp_path):
    ours = []
    for arch in ARCHS:
        d = tmp_path / "ours" / arch
        _random_sae(arch, d_in=8, d_sae=24).save(d)
        save_file({"x": torch.randn(16, 8)}, str(d / "x.safetensors"))
        ours.append(str(d))
    _run_saelens("both", str(tmp_path / "theirs"), *ours)
    for arch, d in zip(ARCHS, ours, strict=True):
        _compare(S.load(d), Path(d))
        theirs = tmp_path / "theirs" / arch
        loaded = S.load(theirs, verify=False)
        assert loaded.cfg.architecture == arch
        _compare(loaded, theirs)


# --- training --------------------------------------------------------------------------------

WORDS = ["the", "a", "cat", "dog", "sat", "ran", "on", "under", "mat", "rug", "and", "then", "it", "big"]


@pytest.fixture(scope="module")
def corpus(gpt2_model):
    gen = torch.Generator().manual_seed(0)
    texts = [
        " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (10,), generator=gen)) for _ in range(96)
    ]
    _, cache = gpt2_model.run_with_cache(texts, names=SITE)
    return texts, cache[SITE].reshape(-1, 32)  # no padding: every text has 10 tokens


def _fit(model, data, **kw):
    opts = {
        "arch": "topk",
        "d_sae": 64,
        "k": 4,
        "tokens": 64 * 60,
        "batch_size": 64,
        "lr": 3e-3,
        "progress": False,
    }
    return S.train(model, SITE, data, **{**opts, **kw})


def test_topk_training_fits_and_records_its_config(gpt2_model, corpus, tmp_path):
    texts, acts = corpus
    sae = _fit(gpt2_model, acts, seed=3, out=tmp_path, tokens=64 * 150)
    result = S.evaluate(gpt2_model, sae, texts)
    assert result["explained_variance"] > 0.8 and result["l0"] == 4.0
    assert sae.history[0]["mse"] > 3 * sae.history[-1]["mse"]
    record = sae.cfg.metadata["training"]
    assert record["seed"] == 3 and record["k"] == 4 and record["steps_done"] == 150
    assert record["data"].startswith("activations")
    final = S.load(tmp_path / "final")  # verified against its checksum
    assert torch.equal(final.W_dec, sae.W_dec) and final.cfg.metadata["training"]["seed"] == 3
    assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(64), atol=1e-5)  # unit decoder rows
    again, other = _fit(gpt2_model, acts, seed=3, tokens=64 * 150), _fit(gpt2_model, acts, seed=4)
    assert torch.equal(again.W_enc, sae.W_enc) and not torch.equal(other.W_enc[:, :4], sae.W_enc[:, :4])


def _shuffled_batches(rows: torch.Tensor, size: int, buffer_batches: int, seed: int, n: int) -> list:
    """The shuffle buffer by hand: fill it to ``buffer_batches`` batches from the rows (looped
    over), permute it (seeded), hand out its first half, keep the rest."""
    gen = torch.Generator().manual_seed(seed)
    cap, emit = size * buffer_batches, size * max(1, buffer_batches // 2)
    source = torch.cat([rows] * (2 + n * size // len(rows)))
    out, buffer, at = [], rows[:0], 0
    while len(out) < n:
        need = cap - len(buffer)
        buffer = torch.cat([buffer, source[at : at + need]])[torch.randperm(cap, generator=gen)]
        at += need
        out += [buffer[i : i + size] for i in range(0, emit, size)]
        buffer = buffer[emit:]
    return out[:n]


@pytest.mark.parametrize(("size", "buffer_batches", "chunk"), [(64, 4, 40), (48, 5, 64), (32, 1, 7)])
def test_the_shuffle_buffer_hands_out_the_hand_computed_batches(size, buffer_batches, chunk, monkeypatch):
    """``stream`` (which fills a buffer it keeps across fills) gives the hand-computed batches,
    from chunks of any size (a capture's reads, or a tensor's batch-sized slices); and batches
    handed out earlier and kept are not overwritten by later fills."""
    from interp.sae import training as T

    rows = torch.randn(300, 5)
    cfg = T.TrainConfig(hook=SITE, batch_size=size, buffer_batches=buffer_batches, seed=2)
    expected = _shuffled_batches(rows, size, buffer_batches, cfg.seed + 1, 30)
    plain = T.stream(None, rows, [SITE], cfg, "activations")
    kept = [next(plain)[0] for _ in range(30)]
    assert all(torch.equal(k, e) for k, e in zip(kept, expected, strict=True))
    monkeypatch.setattr(T, "_rows", lambda *args: iter([(c,) for c in rows.split(chunk)]))
    chunked = T.stream(None, rows, [SITE], cfg, "activations")
    assert all(torch.equal(next(chunked)[0], e) for e in expected)


def test_capture_tensor_and_model_inputs_train_the_same_sae(gpt2_model, corpus, tmp_path):
    texts, acts = corpus
    interp.capture_to_disk(gpt2_model, texts, SITE, tmp_path / "cap", batch_size=8, progress=False)
    from_tensor = _fit(gpt2_model, acts)
    from_capture = _fit(gpt2_model, tmp_path / "cap")
    from_model = _fit(gpt2_model, texts, model_batch_size=8)
    assert torch.equal(from_capture.W_enc, from_tensor.W_enc)
    assert torch.allclose(from_model.W_enc, from_tensor.W_enc, atol=1e-5)
    assert from_capture.cfg.metadata["training"]["data"].startswith("capture:")


@pytest.mark.parametrize("dead_after_tokens", [10**9, 0])  # no dead latent / every latent dead (AuxK on)
def test_sparse_topk_step_equals_the_dense_step(gpt2_model, corpus, monkeypatch, dead_after_tokens):
    """The TopK loss that decodes only the k kept latents gives the dense path's loss, metrics and gradients."""
    from interp.sae import training as T

    _, acts = corpus
    cfg = T.TrainConfig(hook=SITE, d_sae=96, k=6, dead_after_tokens=dead_after_tokens, seed=1)
    x = acts[:128] * 3  # away from the init, so the loss and its gradients are far from zero
    results = []
    for sparse in (True, False):
        if not sparse:
            monkeypatch.setattr(T, "SPARSE_TOPK", False)
        trainer = T._Trainer(gpt2_model, cfg, T._sae_config(gpt2_model, cfg), acts, "auto", None, False)
        trainer.since_fired += 1
        loss, metrics = trainer.loss(x, x)
        trainer._backward(loss)  # the sparse path's W_enc and W_dec gradients are settled there
        results.append((metrics, {n: p.grad for n, p in trainer.sae.named_parameters()}, trainer.since_fired))
    (m_sparse, g_sparse, fired_sparse), (m_dense, g_dense, fired_dense) = results
    assert (m_sparse["aux"] > 0) == (dead_after_tokens == 0)
    assert m_sparse == pytest.approx(m_dense, rel=1e-5)
    assert torch.equal(fired_sparse, fired_dense)
    for name, grad in g_dense.items():
        if grad is not None:
            assert torch.allclose(g_sparse[name], grad, rtol=1e-4, atol=1e-6), name


def test_sparse_topk_training_equals_dense_training(gpt2_model, corpus, monkeypatch):
    """Whole runs (Adam, unit-norm decoder, dead-latent counts, AuxK live from step 2): the sparse
    encoder/decoder step trains the dense reference's weights, to float32 summation order."""
    from interp.sae import training as T

    _, acts = corpus
    kw = {"seed": 2, "tokens": 64 * 12, "dead_after_tokens": 128}
    sparse = _fit(gpt2_model, acts * 3, **kw)
    monkeypatch.setattr(T, "SPARSE_TOPK", False)
    dense = _fit(gpt2_model, acts * 3, **kw)
    assert max(h["aux"] for h in sparse.history) > 0  # the AuxK path ran
    for (name, p), q in zip(sparse.named_parameters(), dense.parameters(), strict=True):
        assert torch.allclose(p, q, rtol=0, atol=2e-6), (name, (p - q).abs().max())


def test_selected_pre_activations_have_the_dense_gradients():
    """``_Selected`` (gather from a product computed without autograd, sparse backward) gives
    autograd's gradients through the dense ``x @ W_enc + b_enc``, repeated indices included;
    ``W_enc``'s reaches ``.grad`` through the sink, two terms adding up like autograd's."""
    from interp.sae.training import _Selected, _WeightGrads

    gen = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*shape, generator=gen, dtype=torch.float64) for shape in ((20, 7), (7, 30), (30,)))
    index = torch.randint(0, 30, (20, 5), generator=gen)  # rows repeat some latents
    weights = torch.randn(20, 5, generator=gen, dtype=torch.float64)
    grads = []
    for sparse in (True, False):
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        xs, ws, bs = leaves
        if sparse:
            with torch.no_grad():
                pre = xs @ ws + bs
            sink = _WeightGrads()
            picked = _Selected.apply(pre, index, xs, ws, bs, sink)
            (picked * weights).sum().backward()
            sink.settle()
        else:
            (xs @ ws + bs).gather(-1, index).mul(weights).sum().backward()
        grads.append([t.grad for t in leaves])
    for got, want in zip(*grads, strict=True):
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    w_only = w.clone().requires_grad_()  # the input needs no gradient: W_enc's is still autograd's
    sink = _WeightGrads()
    main, aux = (_Selected.apply(x @ w + b, index, x, w_only, b, sink) * weights for _ in range(2))
    (main.sum() + 2 * aux.sum()).backward()  # two selections (TopK's and AuxK's): two sums into the sink
    sink.settle()
    assert torch.allclose(w_only.grad, 3 * grads[1][1], rtol=1e-12, atol=1e-12)


def test_decoded_rows_have_the_dense_gradients():
    """``_DecodedRows`` (the decoder on the selected rows, sparse backward) gives autograd's values and
    gradients through the dense ``scatter(values) @ W_dec``, repeated indices included."""
    from interp.sae.training import _DecodedRows, _WeightGrads

    gen = torch.Generator().manual_seed(1)
    w, values, probe = (
        torch.randn(*shape, generator=gen, dtype=torch.float64) for shape in ((30, 7), (20, 5), (20, 7))
    )
    index = torch.randint(0, 30, (20, 5), generator=gen)
    outs, grads = [], []
    for sparse in (True, False):
        ws, vs = w.clone().requires_grad_(), values.clone().requires_grad_()
        if sparse:
            sink = _WeightGrads()
            out = _DecodedRows.apply(index, vs, ws, sink)
            (out * probe).sum().backward()
            sink.settle()
        else:
            out = torch.zeros(20, 30, dtype=torch.float64).scatter_add(-1, index, vs) @ ws
            (out * probe).sum().backward()
        outs.append(out.detach())
        grads.append((ws.grad, vs.grad))
    assert torch.allclose(outs[0], outs[1], rtol=1e-12, atol=1e-12)
    for got, want in zip(*grads, strict=True):
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)


def test_nan_stops_naming_the_step_keeps_the_checkpoint_and_resume_is_exact(gpt2_model, corpus, tmp_path):
    _, acts = corpus
    bad = acts.clone()
    bad[64 * 9 + 5] = float("nan")  # in the 10th batch of the first pass
    with pytest.raises(InputError, match=r"training stopped at step \d+ .*NaN or inf") as err:
        _fit(gpt2_model, bad, out=tmp_path, checkpoint_every=4, buffer_batches=2)
    stopped, kept = (int(n) for n in re.findall(r"step (\d+)", str(err.value))[:2])
    assert 8 <= kept <= stopped and kept % 4 == 0  # the NaN row is first read in step 8 or later
    assert S.load(tmp_path / "checkpoint").cfg.metadata["training"]["steps_done"] == kept
    resumed = _fit(gpt2_model, acts, out=tmp_path, checkpoint_every=4, buffer_batches=2)
    straight = _fit(gpt2_model, acts, checkpoint_every=4, buffer_batches=2)
    assert torch.equal(resumed.W_enc, straight.W_enc) and torch.equal(resumed.b_dec, straight.b_dec)
    assert len(resumed.history) == straight.cfg.metadata["training"]["steps_done"]


def test_l1_training_with_resampling_and_warmups(gpt2_model, corpus):
    _, acts = corpus
    opts = {"arch": "standard", "l1_coefficient": 0.05, "l1_warmup_steps": 20, "lr_warmup_steps": 10}
    sae = _fit(gpt2_model, acts, resample_every=15, dead_after_tokens=64 * 10, lr_decay_steps=20, **opts)
    lrs = [h["lr"] for h in sae.history]
    assert (
        lrs[0] == pytest.approx(3e-4)
        and max(lrs) == pytest.approx(3e-3)
        and lrs[-1] == pytest.approx(3e-3 / 20)
    )
    assert sae.history[-1]["l1"] > 0
    trainer_sae = _fit(gpt2_model, acts, tokens=64 * 15, resample_every=0, dead_after_tokens=64 * 10, **opts)
    from interp.sae.training import TrainConfig, _Trainer

    cfg = TrainConfig(hook=SITE, arch="standard", d_sae=64, batch_size=64, dead_after_tokens=1)
    trainer = _Trainer(gpt2_model, cfg, trainer_sae.cfg, acts, "auto", None, False)
    trainer.sae.load_state_dict(trainer_sae.state_dict())
    trainer.since_fired[:5] = 10  # five dead latents
    trainer.resample(acts[:64], acts[:64])
    rows = trainer.sae.W_dec[:5]
    directions = acts[:64] / acts[:64].norm(dim=-1, keepdim=True)
    assert torch.allclose(rows.norm(dim=-1), torch.ones(5), atol=1e-5)
    assert ((rows @ directions.T).max(dim=-1).values > 1 - 1e-5).all()  # each is a data direction
    assert torch.equal(trainer.sae.W_dec[5:], trainer_sae.W_dec[5:])


def test_training_bad_input(gpt2_model, corpus):
    _, acts = corpus
    with pytest.raises(InputError, match="cannot train arch 'gated'"):
        _fit(gpt2_model, acts, arch="gated")
    with pytest.raises(InputError, match="unknown training option"):
        _fit(gpt2_model, acts, learning_rate=1e-3)
    with pytest.raises(UnknownHookError, match="Did you mean"):
        S.train(gpt2_model, "blocks.0.hook_resid_pst", acts, d_sae=8, k=2, progress=False)


def test_cli_sae_train_and_eval(gpt2_dir, corpus, tmp_path, capsys):
    from interp.cli import main

    texts, _ = corpus
    data = tmp_path / "texts.txt"
    data.write_text("\n".join(texts) + "\n")
    args = ["--model", gpt2_dir, "--hook", SITE, "--data", str(data), "--out", str(tmp_path / "run")]
    sizes = ["--arch", "topk", "--k", "4", "--d-sae", "64", "--tokens", "640", "--batch-size", "64"]
    # any TrainConfig field is a flag: these reach the run's recorded config as given
    extra = ["--data-lanes", "2", "--b-dec-init", "zeros", "--aux-k", "8", "--buffer-batches", "4"]
    assert main(["sae", "train", *args, *sizes, "--lr", "3e-3", *extra]) == 0
    sae = S.load(tmp_path / "run" / "final")
    recorded = sae.cfg.metadata["training"]
    assert sae.cfg.k == 4 and recorded["steps_done"] == 10
    assert (recorded["lr"], recorded["data_lanes"], recorded["b_dec_init"]) == (3e-3, 2, "zeros")
    assert (recorded["aux_k"], recorded["buffer_batches"], recorded["seed"]) == (8, 4, 0)  # seed: default
    out_json = tmp_path / "eval.json"
    assert (
        main(
            [
                "sae",
                "eval",
                "--model",
                gpt2_dir,
                "--sae",
                str(tmp_path / "run" / "final"),
                "--data",
                str(data),
                "--json",
                str(out_json),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "explained_variance" in printed and "ce_loss_score" in printed
    assert json.loads(out_json.read_text())["metrics"]["l0"] == 4.0
    bad = ["sae", "train", "--model", gpt2_dir, "--hook", "blocks.0.hook_resid_pots", "--data", str(data)]
    assert main([*bad, "--out", str(tmp_path / "x")]) == 2
    assert "Did you mean: blocks.0.hook_resid_post" in capsys.readouterr().err


def test_cli_sae_train_has_a_flag_for_every_training_option(capsys):
    """Every TrainConfig field can be set from the command line, with its default in the help."""
    from dataclasses import fields

    from interp.cli import main
    from interp.sae.training import TrainConfig

    with pytest.raises(SystemExit):
        main(["sae", "train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for field in fields(TrainConfig):
        assert f"--{field.name.replace('_', '-')}" in text, field.name
    assert "--arch {standard,topk,batchtopk,jumprelu,transcoder,skip_transcoder}" in text
    assert "(default: the number of processes)" in text and "(default: 0.0003)" in text


def test_a_cfg_saved_on_a_gpu_loads_on_cpu(tmp_path):
    sae = _random_sae()
    sae.save(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "device": "cuda:0", "dtype": "torch.float32"}))
    loaded = S.load(tmp_path)
    assert loaded.device.type == "cpu" and loaded.dtype == torch.float32
    assert torch.equal(loaded.W_dec, sae.W_dec)


def test_evaluate_and_train_on_a_module_model():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    model = interp.load(net, input_shape=(6,))
    x = torch.randn(40, 6)
    result = S.evaluate(model, _identity_sae(8, "0.hook_out"), x, batch_size=16)
    assert result["explained_variance"] == 1.0 and result["total_tokens_evaluated"] == 40
    assert "ce_loss_score" not in result  # no logits: no splice scores
    sae = S.train(
        model,
        "1.hook_out",
        x,
        data_kind="inputs",
        arch="topk",
        d_sae=16,
        k=8,
        tokens=640,
        batch_size=32,
        lr=1e-2,
        progress=False,
    )
    assert sae.cfg.d_in == 8 and sae.cfg.metadata["training"]["data"] == "model inputs (40 rows)"
    assert S.evaluate(model, sae, x)["explained_variance"] > 0.5


def test_jumprelu_training_learns_thresholds_and_sparsity(gpt2_model, corpus, tmp_path):
    texts, acts = corpus
    opts = {
        "arch": "jumprelu",
        "tokens": 64 * 80,
        "jumprelu_bandwidth": 0.05,
        "jumprelu_init_threshold": 0.05,
    }
    light = _fit(gpt2_model, acts, l1_coefficient=1e-4, **opts)
    heavy = _fit(gpt2_model, acts, l1_coefficient=3e-2, **opts)
    assert heavy.history[-1]["l0"] < light.history[-1]["l0"]
    assert not torch.allclose(heavy.threshold, torch.full((64,), 0.05))  # the thresholds moved
    assert (heavy.threshold >= 0).all()
    light.save(tmp_path)
    back = S.load(tmp_path)
    assert back.cfg.architecture == "jumprelu" and torch.equal(back.threshold, light.threshold)
    assert S.evaluate(gpt2_model, light, texts)["explained_variance"] > 0.5
