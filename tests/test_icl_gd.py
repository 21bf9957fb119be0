"""icl-gd: the linear self-attention layer, GD-1 and the paper's construction, and the reproduction.

The layer and the baseline are checked against hand computations (numpy loops over tokens); the
construction against one explicit GD step; the reproduction passes on the shipped layer (plus a fast
retrain from seed 1, bounds stated in ``interp.reproductions.icl_gd``) and fails on an untrained one.
The faithful run (two full retrains) is ``slow``.
"""

from __future__ import annotations

import shutil
import time

import numpy as np
import pytest
import torch

import interp
from interp import reproductions
from interp.errors import CheckpointError, InputError
from interp.models import zoo
from interp.models.zoo import icl_gd as lsa
from interp.models.zoo.checkpoint import CHECKPOINT_DIR
from interp.models.zoo.registry import get_recipe
from interp.reproductions import icl_gd as repro

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tasks() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return lsa.sample_tasks(64, generator=torch.Generator().manual_seed(7), dtype=torch.float64)


def _reference_layer(tokens: np.ndarray, wq, wk, wv, p) -> np.ndarray:
    """e_j + P Σ_{i < N} (W_V e_i) ((W_K e_i)·(W_Q e_j)), one token at a time."""
    out = tokens.copy()
    for b in range(tokens.shape[0]):
        for j in range(tokens.shape[1]):
            acc = np.zeros(wv.shape[0])
            for i in range(tokens.shape[1] - 1):  # context tokens only
                acc += (wv @ tokens[b, i]) * float((wk @ tokens[b, i]) @ (wq @ tokens[b, j]))
            out[b, j] += p @ acc
    return out


def test_task_distribution(tasks):
    tokens, y_query, w = tasks
    assert tokens.shape == (64, 11, 11) and y_query.shape == (64,) and w.shape == (64, 10)
    x = tokens[..., :-1]
    assert x.abs().max() <= 1.0 and x.abs().max() > 0.9  # U(-1, 1)
    assert torch.allclose(tokens[:, :-1, -1], torch.einsum("ntd,nd->nt", x[:, :-1], w))
    assert torch.all(tokens[:, -1, -1] == 0)  # the query's y slot is empty
    assert torch.allclose(y_query, (x[:, -1] * w).sum(-1))


def test_layer_matches_a_hand_computation(tasks):
    tokens = tasks[0][:4]
    torch.manual_seed(0)
    layer = lsa.LinearSelfAttention(10).double()
    for lin in (layer.W_Q, layer.W_K, layer.W_V, layer.P):
        torch.nn.init.normal_(lin.weight, std=0.3)
    ws = [getattr(layer, n).weight.detach().numpy() for n in ("W_Q", "W_K", "W_V", "P")]
    expected = _reference_layer(tokens.numpy(), *ws)
    np.testing.assert_allclose(layer(tokens).detach().numpy(), expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(layer.predict(tokens).detach().numpy(), -expected[:, -1, -1], rtol=1e-10)


def test_construction_is_one_gd_step(tasks):
    tokens, _, _ = tasks
    eta = 1.37
    x, y, x_q = tokens[:, :-1, :-1].numpy(), tokens[:, :-1, -1].numpy(), tokens[:, -1, :-1].numpy()
    # ∇ 1/(2N) Σ (w·x - y)² at w = 0
    grad = np.stack([-(y[n, :, None] * x[n]).mean(0) for n in range(len(x))])
    w1 = -eta * grad
    expected = (w1 * x_q).sum(-1)
    model = lsa.constructed_model(10, 10, eta, torch.float64)
    np.testing.assert_allclose(model.predict(tokens).detach().numpy(), expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(lsa.gd_one_step(tokens, eta).numpy(), expected, rtol=1e-10, atol=1e-12)
    pred, sens = lsa.query_sensitivity(model, tokens)
    np.testing.assert_allclose(sens.numpy(), w1, rtol=1e-10, atol=1e-12)  # ∂ŷ/∂x_q = W_1
    align = lsa.alignment(model, tokens, eta)
    assert align["cos"] == pytest.approx(1.0) and align["pred_l2"] < 1e-12


def test_line_search_finds_the_parabola_minimum():
    tokens, target, _ = lsa.sample_tasks(
        4000, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    eta, best = lsa.line_search_gd_lr(tokens, target)
    exact = lsa.optimal_gd_lr(tokens, target)
    assert abs(eta - exact) <= 0.05  # half the authors' grid step
    for other in (exact - 0.2, exact + 0.2):
        assert float(lsa.loss(lsa.gd_one_step(tokens, other), target)) > float(
            lsa.loss(lsa.gd_one_step(tokens, exact), target)
        )
    assert best == pytest.approx(float(lsa.loss(lsa.gd_one_step(tokens, eta), target)))


def test_loaded_model_hooks_carry_the_scores(tasks):
    model = interp.load("zoo:icl-gd")
    assert {"scores.hook_out", "z.hook_out", "W_Q.hook_out", "P.hook_out"} <= set(model.hook_names)
    tokens = tasks[0].float()
    out, cache = model.run_with_cache(tokens, ["W_Q.hook_out", "W_K.hook_out", "scores.hook_out"])
    q, k = cache["W_Q.hook_out"], cache["W_K.hook_out"]
    assert torch.allclose(cache["scores.hook_out"], q @ k.transpose(1, 2), atol=1e-5)
    assert cache["scores.hook_out"].shape == (64, 11, 10)  # queries attend to the 10 context tokens
    zeroed = model.run_with_hooks(tokens, [("scores.hook_out", lambda act, hook: torch.zeros_like(act))])
    assert torch.equal(zeroed, tokens)  # no scores, no update: the residual stream passes through


def test_weight_tools_on_the_construction():
    model = lsa.constructed_model(10, 10, 1.5, torch.float64)
    kq, pv = repro.normalised(model)
    assert torch.equal(kq[:10, :10], torch.eye(10, dtype=torch.float64)) and pv[10, 10] == -0.15
    # rescaling W_Q by c and P by 1/c leaves the function, the normalised weights and S unchanged
    twin = lsa.constructed_model(10, 10, 1.5, torch.float64)
    with torch.no_grad():
        twin.W_Q.weight.mul_(4.0)
        twin.P.weight.div_(4.0)
    kq2, pv2 = repro.normalised(twin)
    assert torch.allclose(kq, kq2) and torch.allclose(pv, pv2)
    assert torch.allclose(repro.effective_tensor(model), repro.effective_tensor(twin))
    for alpha in (0.0, 0.5, 1.0):  # interpolating a model with itself is that model
        mixed = repro.interpolated(model, twin, alpha)
        tokens = lsa.sample_tasks(8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)[0]
        assert torch.allclose(mixed.predict(tokens), model.predict(tokens))


def test_construction_is_stationary_and_gd_is_not_beaten():
    """Mahankali et al.: GD-1 with the best η is the optimum of the class, so its gradient is noise."""
    cfg = get_recipe("icl-gd").resolved_config()
    norms = {}
    for n in (5_000, 80_000):
        tokens, target, _ = lsa.task_batch(cfg, n, 11, torch.float64)
        eta = lsa.optimal_gd_lr(tokens, target)
        norms[n] = repro.loss_gradient_norm(lsa.constructed_model(10, 10, eta, torch.float64), tokens, target)
        detuned = repro.loss_gradient_norm(
            lsa.constructed_model(10, 10, 1.5 * eta, torch.float64), tokens, target
        )
        assert norms[n] < 0.2 * detuned
    assert norms[80_000] < 0.5 * norms[5_000]  # shrinks like 1/sqrt(n) (4x here): sampling noise only


def test_paper_scale_gd_loss():
    """GD-1's loss scales as x_range² (η as 1/x_range²): sampled directly at the authors' U(-0.5, 0.5)
    with its own line search, it is ours × 1/4, and near the paper's 0.2; the unscaled loss is not."""
    losses = {}
    for x_range in (1.0, 0.5):
        gen = torch.Generator().manual_seed(11)
        tokens, target, _ = lsa.sample_tasks(20_000, 10, 10, x_range, 1.0, gen)
        eta = lsa.optimal_gd_lr(tokens, target)
        losses[x_range] = float(lsa.loss(lsa.gd_one_step(tokens, eta), target))
    assert losses[0.5] == pytest.approx(losses[1.0] / 4, rel=1e-9)  # same draws, rescaled: exact
    (check,) = repro.paper_scale_checks(losses[1.0], x_range=1.0)
    assert check.passed and check.value == pytest.approx(losses[0.5])
    assert not repro.paper_scale_checks(losses[1.0], x_range=0.5)[0].passed  # scale forgotten: 0.83


def test_fast_reproduction_passes(tmp_path):
    start = time.perf_counter()
    report = reproductions.run("icl-gd", fast=True, out_dir=tmp_path, quiet=True)
    assert report.passed, report.table()
    assert report.models["icl-gd"]["seed"] == 0 and report.models["icl-gd-seed1"]["config"]["steps"] == 1500
    titles = [t for t, _ in report.figures]
    assert any(t.startswith("Weights") for t in titles) and any("Interpolating" in t for t in titles)
    assert "Plotly" in (tmp_path / "report.html").read_text()
    print(f"fast icl-gd reproduction: {time.perf_counter() - start:.1f} s")


def test_untrained_layer_fails():
    report = repro.reproduce(fast=True, models={"icl-gd": zoo.build("icl-gd")}, retrain=False)
    assert not report.passed
    failed = {c.quantity for c in report.failures}
    assert "shipped: mean cosine of ∂ŷ/∂x_q, layer vs GD-1" in failed
    assert "cosine of the effective tensor u_a M_bc, trained vs constructed" in failed
    assert "shipped: |L_TF / L_GD - 1| (test loss, 10k tasks)" in failed


def test_typo_suggests_the_finding():
    with pytest.raises(InputError, match="Did you mean 'icl-gd'"):
        reproductions.run("icl-dg")
    assert reproductions.resolve("ICL_GD") == "icl-gd"


def test_missing_or_corrupt_checkpoint_says_how_to_retrain(tmp_path, monkeypatch):
    monkeypatch.setenv("INTERP_ZOO_DIR", str(tmp_path))
    with pytest.raises(CheckpointError, match="interp zoo train icl-gd"):
        repro.reproduce(fast=False, retrain=False)
    shutil.copy(CHECKPOINT_DIR / "icl-gd.json", tmp_path)
    (tmp_path / "icl-gd.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="corrupt.*interp zoo train icl-gd"):
        repro.reproduce(fast=False, retrain=False)


@pytest.mark.slow
def test_faithful_reproduction_passes(tmp_path):
    """Shipped layer plus seeds 1 and 2 retrained with the full recipe (5,000 steps at batch 2,048)."""
    start = time.perf_counter()
    report = reproductions.run("icl-gd", fast=False, out_dir=tmp_path, quiet=True)
    assert report.passed, report.table()
    assert {"icl-gd-seed1", "icl-gd-seed2"} <= set(report.models)
    print(f"faithful icl-gd reproduction: {time.perf_counter() - start:.1f} s")


@pytest.mark.slow
def test_retrain_reproduces_the_shipped_metrics(tmp_path):
    meta = zoo.train("icl-gd", tmp_path, progress=False)
    shipped = zoo.load_zoo("icl-gd")[1]["metrics"]
    for key in ("test_loss", "gd_loss", "cos", "sens_l2_rel", "pred_l2_rel"):
        assert meta["metrics"][key] == pytest.approx(shipped[key], rel=1e-3), key


def test_walk_through_runs(capsys):
    """analyses/icl_gd.py's demo part (the reproduction itself is tested above)."""
    import runpy
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "analyses" / "icl_gd.py"
    runpy.run_path(str(script), run_name="icl_gd_demo")["walk_through"]()
    out = capsys.readouterr().out
    assert "scores.hook_out" in out and "loss with GD's attention scores patched in" in out
