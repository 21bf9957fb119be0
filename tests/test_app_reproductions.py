"""The Reproductions page: the checkpoint table equals the library's, and problems are messages."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("streamlit")
import streamlit as st  # noqa: E402
from streamlit.testing.v1 import AppTest  # noqa: E402

from interp import reproductions  # noqa: E402
from interp.errors import CheckpointError  # noqa: E402

APPS = Path(__file__).resolve().parents[1] / "apps"


def _page() -> AppTest:
    if str(APPS) not in sys.path:
        sys.path.insert(0, str(APPS))
    return AppTest.from_file(str(APPS / "views" / "reproductions.py"), default_timeout=300)


def test_superposition_table_from_checkpoints_matches_the_library():
    try:
        expected = reproductions.from_checkpoints("superposition")
    except CheckpointError as err:
        pytest.skip(f"superposition checkpoints not shipped: {err}")
    at = _page()
    at.session_state["reproduction_finding"] = "superposition"
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    table = at.table[-1].value  # st.table: long cells wrap instead of being cut
    assert list(table.index) == [c.quantity for c in expected.checks]
    assert list(table["ours"]) == [c.row()[2] for c in expected.checks]
    verdicts = [m.value for m in (at.success if expected.passed else at.error)]
    assert any(v.startswith("superposition") for v in verdicts)


def test_missing_checkpoint_is_a_message_not_a_traceback(monkeypatch, tmp_path):
    monkeypatch.setenv("INTERP_ZOO_DIR", str(tmp_path))  # an empty checkpoint folder
    # the page's cached reports outlive an AppTest: one from the real checkpoints (an earlier test
    # that opened Reproductions, e.g. test_app_zoo_matrix) would hide the missing checkpoint
    st.cache_resource.clear()
    at = _page()
    at.session_state["reproduction_finding"] = "induction"
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("interp zoo train" in e.value for e in at.error)


def test_fast_rerun_writes_its_report_outside_the_checkout(monkeypatch):
    """The page hands the library a per-session temporary folder; nothing lands in reports/."""
    import tempfile

    calls = []

    def run(finding, fast=False, out_dir=None, quiet=False):
        calls.append((finding, fast, out_dir))
        return reproductions.from_checkpoints(finding)

    try:
        reproductions.from_checkpoints("superposition")
    except CheckpointError as err:
        pytest.skip(f"superposition checkpoints not shipped: {err}")
    monkeypatch.setattr(reproductions, "run", run)
    at = _page()
    at.session_state["reproduction_finding"] = "superposition"
    at.run()
    at.button(key="reproduction_fast").click().run()
    assert not at.exception, [e.value for e in at.exception]
    ((finding, fast, out_dir),) = calls
    assert finding == "superposition" and fast
    root = Path(__file__).resolve().parents[1]
    assert Path(out_dir).resolve().is_relative_to(Path(tempfile.gettempdir()).resolve())
    assert not Path(out_dir).resolve().is_relative_to(root)
    assert any("Fast re-run" in s.value for s in at.subheader)
    assert not at.get("progress")


@pytest.mark.parametrize(
    ("finding", "retrained_prefix", "n_figures"),
    [("icl-gd", "icl-gd-seed", 4), ("clock-pizza", "clock-pizza-alpha", 4)],  # + recorded phase diagram
)
def test_page_shows_a_findings_checkpoint_table_and_figures(finding, retrained_prefix, n_figures):
    """The page shows the finding's checkpoint table (= from_checkpoints, nothing retrained) and its figures."""
    at = _page()
    at.session_state["reproduction_finding"] = finding
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    expected = reproductions.from_checkpoints(finding)
    assert expected.passed, expected.table()
    assert not any(name.startswith(retrained_prefix) for name in expected.models)
    assert list(at.table[-1].value.index) == [c.quantity for c in expected.checks]
    assert len(at.get("plotly_chart")) == len(expected.figures) == n_figures
    assert any(m.value.startswith(finding) for m in at.success)


def test_tolerances_starting_with_a_comparison_are_not_markdown_quotes():
    """st.table renders cells as Markdown, where a leading '>' ('>= 0.5') starts a block quote and the
    browser shows '| = 0.5'; such cells are escaped."""
    expected = reproductions.from_checkpoints("induction")
    raw = [c.row()[3] for c in expected.checks]
    assert any(t.startswith(">") for t in raw)  # the case exists in this finding
    at = _page()
    at.session_state["reproduction_finding"] = "induction"
    at.run()
    shown = list(at.table[-1].value["tolerance"])
    assert not any(str(t).startswith(">") for t in shown)
    assert [str(t).removeprefix("\\") for t in shown] == raw
