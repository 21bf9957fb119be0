"""`interp reproduce saes`: SAEs recover ground-truth features (Sharkey et al. 2022) and TMS directions."""

from __future__ import annotations

import itertools
import os
import runpy
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from interp import reproductions
from interp.reproductions import saes as R

SAELENS_PY = Path(os.environ.get("INTERP_SAELENS_VENV", "/work/venvs/saelens")) / "bin" / "python"


def _random_rows(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def test_mmcs_and_hungarian_mcc_against_hand_computations():
    true = _random_rows(4, 6, 0)
    # a learned set holding each true row (scaled, one flipped) plus noise rows: MMCS 1, MCC 1
    learned = torch.cat([2 * true[[2, 0, 3]], -true[1:2], _random_rows(3, 6, 1)])
    assert R.mmcs(true[[0, 2, 3]], learned) == pytest.approx(1.0)
    assert R.mmcs(true, learned) < 1.0  # row 1 only appears flipped: MMCS uses signed cosines
    assert R.hungarian_mcc(learned, true) == pytest.approx(1.0)  # SAELens's MCC uses |cosine|
    # brute force over every one-to-one assignment on a small case
    a, b = _random_rows(4, 5, 2), _random_rows(4, 5, 3)
    sims = (R.cosines(a, b)).abs()
    brute = max(sum(float(sims[i, p[i]]) for i in range(4)) / 4 for p in itertools.permutations(range(4)))
    assert R.hungarian_mcc(a, b) == pytest.approx(brute)


def test_unimodal():
    assert R.unimodal([0.5, 0.8, 0.9, 0.7]) and R.unimodal([0.5, 0.9, 0.9, 0.7])
    assert not R.unimodal([0.5, 0.9, 0.6, 0.8])


def test_synthetic_data_follows_the_law():
    setup = R.ToySetup(d=8, n_features=16, samples=1000)
    feats = R.ground_truth(setup)
    assert torch.allclose(feats.norm(dim=-1), torch.ones(16))
    codes = R.sample_codes(setup, 200_000, seed=0)
    assert codes.min() >= 0 and codes.max() < 1
    freq = (codes > 0).float().mean(0)
    assert torch.allclose(freq.double(), setup.probabilities, atol=4e-3)  # p_i = (5/G) 0.99^i
    model = R.data_model(feats)
    _, cache = model.run_with_cache(codes[:10], names="hook_out")
    assert torch.allclose(cache["hook_out"], codes[:10] @ feats, atol=1e-6)


def test_fast_reproduction_passes(tmp_path):
    report = reproductions.run("saes", fast=True, out_dir=tmp_path, quiet=True)
    assert report.passed, report.table()
    quantities = [c.quantity for c in report.checks]
    assert sum(q.startswith("MMCS, dict") for q in quantities) == 3
    assert any(c.paper == "unimodal" for c in report.checks)
    assert any("Hungarian" in q for q in quantities) and any("retrained" in q for q in quantities)
    assert (tmp_path / "results.json").is_file() and (tmp_path / "report.html").is_file()


def test_checkpoint_view_trains_nothing():
    start = time.perf_counter()
    report = reproductions.from_checkpoints("saes")
    assert [c.quantity.split(": ")[0] for c in report.checks] == ["zoo:tms-20-5-hidden"]
    assert report.passed and time.perf_counter() - start < 30


@pytest.mark.slow
def test_faithful_reproduction_passes(tmp_path):
    start = time.perf_counter()
    report = reproductions.run("saes", fast=False, out_dir=tmp_path, quiet=True)
    print(report.table())
    print(f"faithful saes reproduction: {time.perf_counter() - start:.1f} s")
    assert report.passed, report.table()


@pytest.mark.slow
def test_walk_through_runs(capsys):
    script = Path(__file__).resolve().parents[1] / "analyses" / "saes.py"
    runpy.run_path(str(script), run_name="saes_demo")["walk_through"]()
    out = capsys.readouterr().out
    assert "MMCS" in out and "zoo:tms-20-5-hidden: 12 represented features" in out
    assert "fires most on" in out


@pytest.mark.slow
@pytest.mark.skipif(not SAELENS_PY.exists(), reason="no SAELens venv (see tests/test_sae.py)")
def test_hungarian_mcc_equals_saelens(tmp_path):
    a, b = _random_rows(12, 7, 4), _random_rows(9, 7, 5)
    save_file({"a": a, "b": b}, str(tmp_path / "ab.safetensors"))
    code = (
        "import sys; from safetensors.torch import load_file;"
        "from sae_lens.synthetic.evals import mean_correlation_coefficient as m;"
        "t = load_file(sys.argv[1]); print(repr(m(t['a'], t['b'])))"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    done = subprocess.run(
        [str(SAELENS_PY), "-c", code, str(tmp_path / "ab.safetensors")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert R.hungarian_mcc(a, b) == pytest.approx(float(done.stdout.split()[-1]), abs=1e-6)
