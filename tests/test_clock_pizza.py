"""clock-pizza: the α-attention transformer, the paper's metrics, and the reproduction.

The forward pass is checked against a numpy loop, the metrics against per-example loops and
synthetic models whose answers are known (a logit that depends only on a - b has distance
irrelevance 0; one that ignores a - b has 1); the reproduction passes on the shipped models and fails
on untrained ones; the metrics' triple sampling equals the authors' notebook's. Retraining (the fast
α ∈ {0, 1} × d_model 64 grid, 1-3 min of CPU, and the faithful α ∈ {0, 0.5, 1} × d_model {32, 64, 96}
grid) is ``slow``; the recorded faithful run the page shows is checked to cover that grid and pass.
The grid's worker processes are checked to give bit for bit what in-process training gives, on tiny runs.
"""

from __future__ import annotations

import importlib
import inspect
import math
import random
import shutil
import time

import numpy as np
import pytest
import torch
from torch import nn

import interp
from interp import reproductions
from interp.errors import CheckpointError, InputError
from interp.models import zoo
from interp.models.zoo import clock_pizza as cp
from interp.models.zoo.checkpoint import CHECKPOINT_DIR
from interp.reproductions import clock_pizza as repro

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = {"p": 7, "d_model": 8, "n_heads": 2}


def _small(alpha: float, seed: int = 0) -> cp.ClockPizzaTransformer:
    torch.manual_seed(seed)
    model = cp.build({**cp.CONFIG, **SMALL, "alpha": alpha}).double()
    with torch.no_grad():
        model.mlp.b_in.normal_()
        model.mlp.b_out.normal_()
    return model.eval()


def _reference_logits(model: cp.ClockPizzaTransformer, a: int, b: int) -> np.ndarray:
    """Last-position logits for (a, b), one head and one position at a time in numpy."""
    w = {k: v.detach().numpy() for k, v in model.named_parameters()}
    x = np.stack([w["W_E"][a] + w["W_pos"][0], w["W_E"][b] + w["W_pos"][1]])
    out = x[1].copy()
    for h in range(w["attn.W_Q"].shape[0]):
        q = x[1] @ w["attn.W_Q"][h]
        k = x @ w["attn.W_K"][h]
        v = x @ w["attn.W_V"][h]
        s = k @ q / math.sqrt(q.shape[0])
        soft = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
        pattern = model.alpha * soft + (1 - model.alpha) * np.ones(2)
        out += (pattern @ v) @ w["attn.W_O"][h]
    hidden = np.maximum(out @ w["mlp.W_in"] + w["mlp.b_in"], 0)
    out = out + hidden @ w["mlp.W_out"] + w["mlp.b_out"]
    return out @ w["W_U"]


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_forward_matches_a_hand_computation(alpha):
    model = _small(alpha)
    tokens = cp.all_pairs(7)
    expected = np.stack([_reference_logits(model, int(a), int(b)) for a, b in tokens])
    with torch.no_grad():
        np.testing.assert_allclose(model.last_logits(tokens).numpy(), expected, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(model(tokens)[:, -1].numpy(), expected, rtol=1e-10, atol=1e-12)


def test_pattern_is_alpha_softmax_plus_constant():
    model = _small(0.25)
    seen = {}
    model.attn.pattern.register_forward_hook(lambda m, i, o: seen.setdefault("pattern", o))
    with torch.no_grad():
        model(cp.all_pairs(7))
    pattern = seen["pattern"]  # [batch, head, query, key]
    assert torch.allclose(pattern.sum(-1), torch.full_like(pattern[..., 0], 0.25 + 0.75 * 2))
    assert bool((pattern >= 0.75).all()) and bool((pattern <= 1.0).all())


def test_bad_tokens_and_alpha_are_clear_errors():
    model = _small(1.0)
    with pytest.raises(InputError, match="0..6"):
        model(torch.tensor([[0, 7]]))
    with pytest.raises(InputError, match="whole numbers"):
        model(torch.tensor([[0.5, 1.0]]))
    with pytest.raises(ValueError, match="alpha"):
        cp.build({**cp.CONFIG, **SMALL, "alpha": 1.5})


def test_split_is_seeded_and_disjoint():
    cfg = {**cp.CONFIG, "data_seed": 3}
    train, test = cp.split(cfg)
    assert len(train) == int(59 * 59 * 0.8) and len(train) + len(test) == 59 * 59
    assert not set(train.tolist()) & set(test.tolist())
    assert torch.equal(cp.split(cfg)[0], train) and not torch.equal(
        cp.split({**cfg, "data_seed": 4})[0], train
    )


# --------------------------------------------------------------------------------------- metrics


def test_gradient_symmetricity_matches_a_per_triple_loop():
    model = _small(1.0)
    p = model.p
    xs = [(a, b, c) for a in range(p) for b in range(p) for c in range(p)]  # eval-main.ipynb's sampling
    random.Random(5).shuffle(xs)
    assert repro.triples(p, 20, seed=5).tolist() == [list(t) for t in xs[:20]]
    cosines = []
    for a, b, c in xs[:20]:  # the authors' way: one backward per triple
        emb = model.W_E[torch.tensor([[a, b]])].detach().requires_grad_(True)
        model.from_embeddings(emb)[0, c].backward()
        g = emb.grad[0]
        cosines.append(float(g[0] @ g[1] / (g[0].norm() * g[1].norm())))
    got = repro.gradient_symmetricity(model, n_triples=20, seed=5)
    assert got == pytest.approx(float(np.mean(cosines)), abs=1e-10)


class _TableModel(nn.Module):
    """A stand-in whose correct-answer logit is ``f(a, b)`` (other logits 0)."""

    def __init__(self, p: int, f) -> None:
        super().__init__()
        self.p, self.f = p, f

    def last_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(len(tokens), self.p, dtype=torch.float64)
        a, b = tokens[:, 0], tokens[:, 1]
        out[torch.arange(len(tokens)), (a + b) % self.p] = self.f(a, b).double()
        return out


def test_distance_irrelevance_on_known_tables():
    p = 11
    only_distance = _TableModel(p, lambda a, b: torch.cos(2 * math.pi * ((a - b) % p) / p))
    no_distance = _TableModel(p, lambda a, b: torch.sin(2 * math.pi * ((a + b) % p) / p))
    assert repro.distance_irrelevance(only_distance) == pytest.approx(0.0, abs=1e-12)
    assert repro.distance_irrelevance(no_distance) == pytest.approx(1.0, abs=1e-12)
    dep = repro.distance_dependence(only_distance)
    assert dep["r2"] == pytest.approx(1.0) and dep["symmetry"] == pytest.approx(1.0)  # cos is even in a - b
    # the table layout: row (a + b) mod p, column (a - b) mod p
    table = repro.correct_logit_table(_TableModel(p, lambda a, b: (a * 100 + b).double()))
    assert table[(3 + 5) % p, (3 - 5) % p] == 305


def test_circularity_of_a_circle_and_of_noise():
    p = 59
    x = torch.arange(p, dtype=torch.float64)
    circle = torch.stack([torch.cos(2 * math.pi * 7 * x / p), torch.sin(2 * math.pi * 7 * x / p)], dim=1)
    model = _TableModel(p, None)
    model.W_E = torch.cat([circle, 1e-3 * torch.randn(p, 6, generator=torch.Generator().manual_seed(0))], 1)
    assert repro.circularity(model, n_components=2) == pytest.approx(1.0, abs=1e-4)
    model.W_E = torch.randn(p, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert repro.circularity(model) < 0.5


# ------------------------------------------------------------------------------- reproduction


def test_shipped_models_are_clock_and_pizza(tmp_path):
    """The default-suite check: the shipped α = 1 / α = 0 models, nothing retrained (seconds)."""
    start = time.perf_counter()
    report = repro.reproduce(fast=True, retrain=False)
    assert report.passed, report.table()
    by_name = {c.quantity: c.value for c in report.checks}
    assert by_name["shipped α = 0 (Pizza): gradient symmetricity"] > 0.98
    assert by_name["shipped α = 1 (Clock): gradient symmetricity"] < 0.5
    report.write(tmp_path)
    assert "Plotly" in (tmp_path / "report.html").read_text()
    # three figures of the shipped models, plus the phase diagram from the recorded faithful run
    assert len(report.figures) == 3 + (repro.load_phase_record() is not None)
    print(f"clock-pizza shipped analysis: {time.perf_counter() - start:.1f} s")


def test_shipped_checkpoints_reproduce_their_recorded_metrics():
    for name in (repro.CLOCK, repro.PIZZA):
        model, meta = zoo.load_zoo(name)
        assert zoo.evaluate(name, model) == pytest.approx(meta["metrics"], rel=1e-6)
        assert meta["metrics"]["test_acc"] == 1.0 and meta["seed"] == 0
        assert meta["config"]["alpha"] == (1.0 if name == repro.CLOCK else 0.0)


def test_untrained_models_fail():
    models = {n: zoo.build(n) for n in (repro.CLOCK, repro.PIZZA)}
    report = repro.reproduce(fast=True, models=models, retrain=False)
    assert not report.passed
    failed = {c.quantity for c in report.failures}
    assert "shipped α = 0: accuracy on all 59² pairs" in failed
    assert "shipped α = 0 (Pizza): gradient symmetricity" in failed
    assert "α = 0 (Pizza): share of correct-logit variance explained by a - b" in failed


def test_swapped_models_fail():
    """Pizza in the Clock slot (and vice versa) misses the metrics: they do tell the algorithms apart."""
    clock, pizza = zoo.load_zoo(repro.CLOCK)[0], zoo.load_zoo(repro.PIZZA)[0]
    report = repro.reproduce(fast=True, models={repro.CLOCK: pizza, repro.PIZZA: clock}, retrain=False)
    failed = {c.quantity for c in report.failures}
    assert "shipped α = 0 (Pizza): gradient symmetricity" in failed
    assert "shipped α = 1 (Clock): distance irrelevance" in failed


def test_typo_suggests_the_finding():
    with pytest.raises(InputError, match="Did you mean 'clock-pizza'"):
        reproductions.run("clock-piza")
    assert reproductions.resolve("CLOCK_PIZZA") == "clock-pizza"


def test_missing_or_corrupt_checkpoint_says_how_to_retrain(tmp_path, monkeypatch):
    monkeypatch.setenv("INTERP_ZOO_DIR", str(tmp_path))
    with pytest.raises(CheckpointError, match="interp zoo train clock-pizza-a1"):
        repro.reproduce(fast=False, retrain=False)
    for name in (repro.CLOCK, repro.PIZZA):
        shutil.copy(CHECKPOINT_DIR / f"{name}.json", tmp_path)
        shutil.copy(CHECKPOINT_DIR / f"{name}.safetensors", tmp_path)
    (tmp_path / f"{repro.PIZZA}.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="interp zoo train clock-pizza-a0"):
        repro.reproduce(fast=False, retrain=False)


def test_loads_with_hooks():
    model = interp.load("zoo:clock-pizza-a0")
    tokens = torch.tensor([[3, 5], [58, 58]])
    out, cache = model.run_with_cache(tokens)
    assert out[:, -1].argmax(-1).tolist() == [8, 57]
    assert cache["attn.pattern.hook_out"].shape == (2, 4, 2, 2)
    assert torch.allclose(cache["attn.pattern.hook_out"], torch.ones(2, 4, 2, 2))  # α = 0: constant


@pytest.mark.slow
def test_fast_reproduction_with_retrain_passes(tmp_path):
    """α ∈ {0, 1} × seed 1 retrained with the fast recipe (1,000 epochs at lr 2e-3), ~1 min of CPU."""
    start = time.perf_counter()
    report = reproductions.run("clock-pizza", fast=True, out_dir=tmp_path, quiet=True)
    assert report.passed, report.table()
    print(f"fast clock-pizza reproduction: {time.perf_counter() - start:.1f} s")


@pytest.mark.slow
def test_faithful_reproduction_passes(tmp_path):
    """Shipped models plus the α ∈ {0, 0.5, 1} × d_model ∈ {32, 64, 96} grid (seed 1), full recipe."""
    start = time.perf_counter()
    report = reproductions.run("clock-pizza", fast=False, out_dir=tmp_path, quiet=True)
    assert report.passed, report.table()
    assert sum(name.startswith("clock-pizza-alpha") for name in report.models) == len(repro.phase_grid(False))
    print(f"faithful clock-pizza reproduction: {time.perf_counter() - start:.1f} s")


def _fake_runs(grid: list[tuple[float, int, int]]) -> list[dict]:
    """Phase-diagram runs with made-up metrics: Pizza-like at α = 0, Clock-like at α = 1."""
    return [
        {
            "alpha": a,
            "d_model": w,
            "seed": s,
            "train_s": 1.0,
            "gradient_symmetricity": 0.99 - 0.6 * a + 0.001 * w / 32,
            "distance_irrelevance": 0.3 + 0.5 * a,
            "circularity": 0.99,
            "accuracy_all_pairs": 1.0,
            "distance_r2": 0.9 - 0.7 * a,
        }
        for a, w, s in grid
    ]


def test_parallel_grid_equals_the_sequential_one():
    """Workers (spawned, one thread each) give every model bit for bit what training in-process gives
    (~20 s, most of it the two workers importing torch)."""
    cells = [(1.0, 8, 2), (0.0, 16, 1)]  # submitted widest first: the results still come in this order
    seq = repro.phase_diagram(False, jobs=1, cells=cells, epochs=25, progress=False)
    par = repro.phase_diagram(False, jobs=2, cells=cells, epochs=25, progress=False)
    # the cells' order, not the order they finished in
    assert [(r["alpha"], r["d_model"], r["seed"]) for r in par] == cells
    timing = ("train_s", "train_cpu_s")
    assert [{k: v for k, v in r.items() if k not in timing} for r in par] == [
        {k: v for k, v in r.items() if k not in timing} for r in seq
    ]
    assert seq[0]["config"]["epochs"] == 25
    assert seq[0]["gradient_symmetricity"] != seq[1]["gradient_symmetricity"]
    model, _ = repro.train_one(0.0, 1, False, 16, epochs=25)  # and both are what train_one gives
    assert repro.gradient_symmetricity(model) == seq[1]["gradient_symmetricity"]


def _takes_jobs(finding: str) -> bool:
    module = importlib.import_module(reproductions._module_name(finding))
    return "jobs" in inspect.signature(module.reproduce).parameters


def test_jobs_are_checked_before_anything_trains():
    assert 1 <= repro.default_jobs(9) <= 9 and repro.default_jobs(1) == 1
    for bad in (0, -2, 1.5, "2", True):
        with pytest.raises(InputError, match="jobs must be a whole number >= 1"):
            repro.reproduce(fast=True, jobs=bad)
    with pytest.raises(InputError, match="--jobs applies to clock-pizza only"):
        reproductions.run("icl-gd", fast=True, jobs=2)
    # the findings the error names are those whose reproduce() takes jobs
    takes_jobs = {f for f in reproductions.FINDINGS if _takes_jobs(f)}
    assert takes_jobs == set(reproductions.PARALLEL_FINDINGS)


def test_cli_jobs_flag(capsys):
    from interp.cli import main

    assert main(["reproduce", "clock-pizza", "--fast", "--jobs", "0"]) == 2
    assert "jobs must be a whole number >= 1" in capsys.readouterr().err
    assert main(["reproduce", "grokking", "--jobs", "2"]) == 2
    assert "--jobs applies to clock-pizza only" in capsys.readouterr().err


def test_phase_grid_is_the_stated_one():
    assert repro.phase_grid(True) == [(0.0, 64, 1), (1.0, 64, 1)]  # the fast grid: unchanged cost
    faithful = repro.phase_grid(False)
    assert sorted({w for _, w, _ in faithful}) == [32, 64, 96] and sorted({a for a, _, _ in faithful}) == [
        0,
        0.5,
        1,
    ]
    assert len(faithful) == 9 and all(cell in repro.AUTHORS_RUNS for cell in {(a, w) for a, w, _ in faithful})


def test_phase_checks_read_every_width():
    runs = _fake_runs(repro.phase_grid(False))
    checks = repro.phase_checks(runs, fast=False)
    assert all(c.passed for c in checks)
    assert len(checks) == 6 + 1  # GS at α = 0 and α = 1 per width, plus the mean-DI gap
    assert checks[-1].value == pytest.approx(0.5)
    runs[0]["gradient_symmetricity"] = 0.5  # α = 0, d 32 turned Clock-like: its row fails, and only it
    failed = [c.quantity for c in repro.phase_checks(runs, fast=False) if not c.passed]
    assert failed == ["phase diagram α = 0, d_model 32, seed 1: gradient symmetricity"]


def test_phase_figure_shows_cell_means_and_the_authors_medians():
    grid = repro.phase_grid(False) + [(1.0, 64, 2)]  # a second seed in one cell is averaged
    runs = _fake_runs(grid)
    runs[-1]["distance_irrelevance"] = 0.0
    fig = repro.phase_figure(runs, "test")
    gs_ours, gs_theirs, di_ours, di_theirs = (np.array(t.z, dtype=float) for t in fig.data)
    assert list(fig.data[0].y) == ["d 32", "d 64", "d 96"] and list(fig.data[0].x) == [
        "α = 0",
        "α = 0.5",
        "α = 1",
    ]
    assert di_ours[1, 2] == pytest.approx((0.8 + 0.0) / 2)
    assert gs_ours[2, 0] == pytest.approx(0.99 + 0.003)
    assert gs_theirs[2, 2] == repro.AUTHORS_RUNS[(1.0, 96)]["gs"][1]
    assert di_theirs[0, 1] == repro.AUTHORS_RUNS[(0.5, 32)]["di"][1]


def test_record_from_results_round_trip_and_bad_input(tmp_path):
    from interp.reproductions.report import Report

    report = Report("clock-pizza", fast=False)
    runs = _fake_runs(repro.phase_grid(False))
    for i, run in enumerate(runs):
        report.models[f"run{i}"] = {"source": "retrained here", "phase": run}
    report.timings["total"] = 123.0
    report.write(tmp_path / "faithful")
    record = repro.record_from_results(tmp_path / "faithful" / "results.json", tmp_path / "record.json")
    assert record["runs"] == runs and record["wall_s"] == 123.0
    assert repro.load_phase_record(tmp_path / "record.json") == record
    assert repro.load_phase_record(tmp_path / "absent.json") is None
    report.fast = True
    report.write(tmp_path / "fast")
    with pytest.raises(InputError, match="fast run"):
        repro.record_from_results(tmp_path / "fast" / "results.json", tmp_path / "x.json")
    report.fast = False
    report.models.pop("run0")
    report.write(tmp_path / "short")
    with pytest.raises(InputError, match="8 phase-diagram runs"):
        repro.record_from_results(tmp_path / "short" / "results.json", tmp_path / "x.json")


def test_shipped_phase_record_is_a_passing_faithful_run():
    """The recorded diagram the page shows covers the faithful grid, and that run passed its checks."""
    record = repro.load_phase_record()
    assert record is not None, "run interp reproduce clock-pizza, then record_from_results"
    cells = sorted((r["alpha"], r["d_model"], r["seed"]) for r in record["runs"])
    assert cells == sorted(repro.phase_grid(False))
    assert all(c.passed for c in repro.phase_checks(record["runs"], fast=False))


def test_walk_through_runs(capsys):
    """analyses/clock_pizza.py's demo part (the reproduction itself is tested above)."""
    import runpy
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "analyses" / "clock_pizza.py"
    runpy.run_path(str(script), run_name="clock_pizza_demo")["walk_through"]()
    out = capsys.readouterr().out
    assert "attn.pattern.hook_out" in out and "Clock with uniform attention patched in" in out
    assert "Pizza: gradient symmetricity 0.99" in out
