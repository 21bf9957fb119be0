"""`interp reproduce circuits`: attribution graphs on zoo:grammar-4l checked against the real model.

The helpers are checked on hand-built graphs; the fast reproduction must pass on the shipped
checkpoints and fail on a randomly initialised model (the checks can fail)."""

from __future__ import annotations

import pytest
import torch

from interp import reproductions
from interp.models import zoo
from interp.models.zoo import grammar as g
from interp.reproductions import circuits

graphs = pytest.importorskip("interp.graphs")


def test_reachable_finds_exactly_the_nodes_on_a_path() -> None:
    # 0 -> 1 -> 3, 0 -> 2 (dead end), 4 -> 3 (not from 0); A[target, source]
    a = torch.zeros(5, 5)
    a[1, 0] = a[3, 1] = a[2, 0] = a[3, 4] = 1.0
    assert circuits.reachable(a, 0, 3) == {0, 1, 3}
    assert circuits.reachable(a, 2, 3) == set()
    a[3, 1] = 0.0  # cut the only path
    assert circuits.reachable(a, 0, 3) == set()


def test_top_features_rank_by_influence_on_a_hand_graph() -> None:
    # two features feeding one logit: the one with the larger edge is more influential
    a = torch.zeros(4, 4, dtype=torch.float64)
    a[3, 0], a[3, 1] = 3.0, 1.0  # logit <- f0, f1
    a[0, 2] = a[1, 2] = 1.0  # both features <- token
    graph = graphs.Graph.from_adjacency(a, ["feature", "feature", "token", "logit"], [1.0])
    for i, (layer, pos, feature) in enumerate([(0, 1, 7), (1, 1, 9)]):
        graph.nodes[i].layer, graph.nodes[i].pos, graph.nodes[i].feature = layer, pos, feature
    assert circuits.top_features(graph, 2) == [(0, 1, 7), (1, 1, 9)]
    assert circuits.top_features(graph, 1) == [(0, 1, 7)]


def test_corrupt_ioi_replaces_only_the_indirect_object() -> None:
    for e in g.task_prompts("ioi", 20, seed=2):
        bad = circuits.corrupt_ioi(e)
        diff = [i for i, (x, y) in enumerate(zip(e.words, bad.words, strict=True)) if x != y]
        assert diff == [e.words.index(e.info["io"])]
        assert bad.words[diff[0]] not in (e.info["io"], e.info["s"])


@pytest.fixture(scope="module")
def fast_report():
    return reproductions.run("circuits", fast=True, quiet=True, out_dir="/tmp/interp-test-circuits-fast")


def test_fast_reproduction_passes(fast_report) -> None:
    assert fast_report.passed, fast_report.table()
    assert fast_report.timings["total"] < 120


@pytest.mark.slow  # a random model's transcoder features are dense: ~17 min on the loaded 2-core box
def test_reproduction_fails_on_a_random_model() -> None:
    report = circuits.reproduce(fast=True, models={"grammar-4l": zoo.build("grammar-4l")})
    assert not report.passed
    failed = {c.quantity.split(":")[0] for c in report.failures}
    assert "agreement" in failed or "ioi" in failed


@pytest.mark.slow
def test_faithful_reproduction_passes(tmp_path) -> None:
    report = reproductions.run("circuits", fast=False, quiet=True, out_dir=tmp_path)
    assert report.passed, report.table()


def test_cli_reproduce_circuits_exits_by_verdict(tmp_path, fast_report, monkeypatch) -> None:
    from interp import cli

    monkeypatch.setattr(circuits, "reproduce", lambda fast=False: fast_report)
    assert cli.main(["reproduce", "circuits", "--fast", "--out", str(tmp_path)]) == (
        0 if fast_report.passed else 1
    )
    failing = reproductions.Report("circuits", fast=True)
    failing.add(reproductions.Check.at_least("q", "p", 0.1, 0.5))
    monkeypatch.setattr(circuits, "reproduce", lambda fast=False: failing)
    assert cli.main(["reproduce", "circuits", "--fast", "--out", str(tmp_path)]) == 1
