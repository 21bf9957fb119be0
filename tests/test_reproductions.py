"""Reproductions: the fast variants pass on trained models, fail on random ones; report plumbing.

The fast variants run in the default suite (they analyse the shipped zoo checkpoints; grokking
retrains a reduced model, ~1 min). The faithful variants are marked ``slow``.
"""

from __future__ import annotations

import json
import re

import pytest

from interp import reproductions
from interp.errors import InputError
from interp.reproductions import Check, Report
from interp.reproductions._models import has_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")  # overhead-bound tiny models: 1 thread is fastest


def _needs(*names: str) -> None:
    missing = [n for n in names if not has_checkpoint(n)]
    if missing:
        pytest.skip(f"zoo checkpoints not shipped yet: {missing} (interp zoo train NAME)")


def _failed(report: Report) -> set[str]:
    return {c.quantity for c in report.failures}


# ----------------------------------------------------------------------------------------------
# Report plumbing
# ----------------------------------------------------------------------------------------------


def _toy_report(passing: bool) -> Report:
    import plotly.graph_objects as go

    report = Report("toy", fast=True)
    report.add(Check.at_least("a score", "0.9", 0.95, 0.5), Check.within("an angle", "72°", 71.0, 72.0, 8.0))
    if not passing:
        report.add(Check.at_most("a loss", "≈0", 3.0, 1.0))
    report.add_model("toy-model", "made up", {"seed": 7, "config": {"width": 3}})
    report.figures.append(("a figure", go.Figure(go.Scatter(x=[0, 1], y=[1, 0]))))
    report.views.append(("a view", "<div>view</div>"))
    return report


def test_check_rules():
    assert Check.at_least("x", "", 1.0, 1.0).passed
    assert not Check.at_least("x", "", float("nan"), 0.0).passed
    assert not Check.at_most("x", "", 1.01, 1.0).passed
    assert Check.between("x", "", 4, 3, 6).passed and not Check.between("x", "", 7, 3, 6).passed
    assert not Check.within("x", "", 60.0, 72.0, 8.0).passed
    assert Check.equal("x", "", [0, 1], [0, 1]).passed and not Check.equal("x", "", [0], [0, 1]).passed
    assert not Report("empty").passed  # no checks is not a pass


def test_table_json_html(tmp_path):
    report = _toy_report(passing=False)
    table = report.table()
    assert table.splitlines()[1].split() == ["quantity", "paper", "ours", "tolerance", "pass"]
    assert "a loss" in table and "FAIL" in table and "FAILED (1 of 3" in table
    report.write(tmp_path)
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["passed"] is False
    assert [c["passed"] for c in data["checks"]] == [True, True, False]
    assert data["models"]["toy-model"]["seed"] == 7 and data["models"]["toy-model"]["config"] == {"width": 3}
    page = (tmp_path / "report.html").read_text()
    remote = re.search(r"<script[^>]*\bsrc=[\"']?https?:", page)
    assert remote is None and "Plotly" in page  # plotly.js inlined: renders with no network
    assert "srcdoc" in page and "a view" in page


def test_unknown_finding():
    with pytest.raises(InputError, match="superposition"):
        reproductions.run("superpositon")


@pytest.mark.parametrize("passing, code", [(True, 0), (False, 1)])
def test_cli_exit_code(monkeypatch, tmp_path, capsys, passing, code):
    from interp import cli
    from interp.reproductions import superposition

    monkeypatch.setattr(superposition, "reproduce", lambda fast=False: _toy_report(passing))
    assert cli.main(["reproduce", "superposition", "--fast", "--out", str(tmp_path)]) == code
    out = capsys.readouterr().out
    assert "quantity" in out and ("PASSED" if passing else "FAILED") in out
    assert (tmp_path / "results.json").is_file()


# ----------------------------------------------------------------------------------------------
# Fast reproductions pass; random models fail them
# ----------------------------------------------------------------------------------------------

TMS = ("tms-5-2", "tms-5-2-uniform", "tms-20-5", "tms-20-5-linear", "tms-200-20")


def test_superposition_fast(tmp_path):
    _needs(*TMS)
    report = reproductions.run("superposition", fast=True, out_dir=tmp_path, quiet=True)
    assert report.passed, report.table()
    assert all(report.models[n]["seed"] is not None for n in TMS)


def test_dimensionality_figure_puts_each_live_feature_at_its_instances_1_over_p():
    """The faint dots (one trace for all instances): every feature with D_i > 1e-3 of instance k,
    at x = 1/p_k, binned to DOT_BIN with its count (and as dark as that many dots); a dead feature
    (zero column) is left out; the line is m / ||W||_F^2."""
    import torch

    from interp.reproductions.superposition import DOT_BIN, dimensionality_figure, dims_per_feature

    torch.manual_seed(0)
    W = torch.randn(3, 2, 4)
    W[1, :, 2] = 0.0  # instance 1's feature 2 is dead
    W[2, :, 3] = -W[2, :, 0]  # instance 2: an antipodal pair, so two features share a D_i
    probabilities = [0.5, 0.1, 0.01]
    dots, line = dimensionality_figure(W, probabilities).data[:2]
    assert len(dots.x) == len(dots.y) == len(dots.customdata)
    assert sorted(set(dots.x)) == sorted(1 / p for p in probabilities)
    for k, p in enumerate(probabilities):  # D_i = ||W_i||^4 / sum_j (W_i . W_j)^2, by hand
        cols = W[k].T
        hand = [
            float(cols[i].norm() ** 4 / ((cols @ cols[i]) ** 2).sum()) for i in range(4) if cols[i].norm() > 0
        ]
        binned = {}
        for d in hand:
            binned[round(d / DOT_BIN)] = binned.get(round(d / DOT_BIN), 0) + 1
        got = {
            round(y / DOT_BIN): n
            for x, y, n in zip(dots.x, dots.y, dots.customdata, strict=True)
            if x == 1 / p
        }
        assert got == binned
        assert sum(got.values()) == (3 if k == 1 else 4)
    assert max(dots.customdata) == 2  # the antipodal pair is one dot of two features...
    pair = list(dots.customdata).index(2)
    assert dots.marker.opacity[pair] == pytest.approx(1 - 0.75**2)  # ...as dark as two faint dots
    assert list(line.y) == pytest.approx(dims_per_feature(W).tolist())


def test_columns_figure_draws_each_column_from_its_panels_origin():
    """One trace per feature (plus the scale circles and titles), whatever the instance count: in
    instance k's panel, feature i's segment runs from the panel's centre to centre + W[k, :, i]."""
    import torch

    from interp.reproductions.superposition import PANEL, columns_figure

    torch.manual_seed(0)
    W = torch.randn(7, 2, 3)
    probabilities = [1.0, 0.5, 0.3, 0.2, 0.1, 0.05, 0.01]
    fig = columns_figure(W, probabilities, "toy")
    features = [t for t in fig.data if t.name and t.name.startswith("feature")]
    assert [t.name for t in features] == ["feature 0", "feature 1", "feature 2"]
    assert len(fig.data) == 3 + 3  # two circles and the panel titles
    for i, trace in enumerate(features):
        xs, ys = list(trace.x), list(trace.y)
        assert len(xs) == 3 * 7 and xs[2::3] == [None] * 7
        for k in range(7):
            cx, cy = PANEL * (k % 5), -PANEL * (k // 5)  # 5 panels a row
            assert (xs[3 * k], ys[3 * k]) == pytest.approx((cx, cy))
            tip = (xs[3 * k + 1] - cx, ys[3 * k + 1] - cy)
            assert tip == pytest.approx(tuple(W[k, :, i].tolist()))
            assert f"p = {probabilities[k]:.3g}, feature {i}:" in trace.text[3 * k + 1]
    titles = next(t for t in fig.data if t.mode == "text")
    assert list(titles.text) == [f"p = {p:.3g}" for p in probabilities]
    assert fig.layout.yaxis.scaleanchor == "x"  # equal aspect: angles and lengths read true


def test_superposition_fails_on_random_models():
    from interp.models import zoo
    from interp.reproductions import superposition

    report = superposition.reproduce(fast=True, models={n: zoo.build(n) for n in TMS}, retrain=False)
    assert not report.passed
    failed = _failed(report)
    assert "tms-5-2-uniform: sparse, smallest neighbour angle (deg)" in failed
    assert "tms-20-5-linear: represented at every p" in failed
    assert "tms-200-20: dims per feature, densest instance" in failed


def test_induction_fast(tmp_path):
    _needs("induction-2l", "induction-1l")
    report = reproductions.run("induction", fast=True, out_dir=tmp_path, quiet=True)
    assert report.passed, report.table()
    assert "circuits-vis" in (tmp_path / "report.html").read_text()


def test_induction_fails_on_random_models():
    from interp.models import zoo
    from interp.reproductions import induction

    given = {n: zoo.build(n) for n in ("induction-2l", "induction-1l")}
    report = induction.reproduce(fast=True, models=given)
    assert not report.passed
    failed = _failed(report)
    assert "repeated-half loss (nats)" in failed
    assert any(q.startswith("max layer-1 induction score") for q in failed)
    assert "path patching: top sender into each induction head's keys" in failed


def test_grokking_fast(tmp_path):
    report = reproductions.run("grokking", fast=True, out_dir=tmp_path, quiet=True)
    assert report.passed, report.table()
    assert report.models["modadd-fast"]["config"]["p"] == 53


def test_grokking_fails_on_random_model():
    from interp.models import zoo
    from interp.reproductions import grokking

    report = grokking.reproduce(fast=False, models={"modadd-113": zoo.build("modadd-113")})
    assert not report.passed
    failed = _failed(report)
    assert "final test accuracy" in failed
    assert "number of key frequencies" in failed
    assert failed & {"key-frequency ablations", "train loss, key freqs excluded from logits"}


# ----------------------------------------------------------------------------------------------
# Faithful reproductions (shipped checkpoints, published bounds)
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "finding, needs",
    [("superposition", TMS), ("induction", ("induction-2l", "induction-1l")), ("grokking", ("modadd-113",))],
)
def test_faithful(tmp_path, finding, needs):
    _needs(*needs)
    report = reproductions.run(finding, fast=False, out_dir=tmp_path, quiet=True)
    assert report.passed, report.table()


def test_adversarial_fast(tmp_path):
    report = reproductions.run("adversarial", fast=True, out_dir=tmp_path, quiet=True)
    assert report.passed, report.table()
    assert report.models["digits-cnn"]["seed"] is not None
