"""Reproductions: each published finding's paper-vs-ours table and figures, from the shipped
checkpoints (nothing retrained), and a button that re-runs the fast version with progress."""

from __future__ import annotations

import tempfile
from pathlib import Path

import common
import pandas as pd
import streamlit as st

from interp import reproductions
from interp.progress import report_progress

st.title("Reproductions")
st.markdown(
    "Published circuit findings reproduced on the zoo's models, our number next to the paper's. "
    "The table below analyses the shipped checkpoints, with nothing retrained."
)


@st.cache_resource(show_spinner=False, max_entries=8)
def checkpoint_report(finding: str) -> reproductions.Report:
    return reproductions.from_checkpoints(finding)


def _as_text(cell: object) -> object:
    """st.table renders cells as Markdown: a tolerance such as ">= 0.5" would start a block quote."""
    return "\\" + cell if isinstance(cell, str) and cell[:1] in (">", "#") else cell


def show(report: reproductions.Report) -> None:
    rows = [
        dict(zip(("quantity", "paper", "ours", "tolerance", "pass"), map(_as_text, c.row()), strict=True))
        for c in report.checks
    ]
    verdict = (
        "all checks pass"
        if report.passed
        else f"{len(report.failures)} of {len(report.checks)} checks missed"
    )
    (st.success if report.passed else st.error)(
        f"{report.finding}{' (fast)' if report.fast else ''}: {verdict}"
    )
    st.table(pd.DataFrame(rows).set_index("quantity"))  # a table wraps long cells; none is cut
    for title, figure in report.figures:
        st.plotly_chart(figure, key=f"{report.finding}-{report.fast}-{title}")
    for i, (title, html) in enumerate(report.views):
        st.caption(title)
        common.embed(html, alt=title, key=f"reproduction_view::{report.fast}::{i}")
    if not report.views:  # keeps the first view's iframe (and circuitsvis) for the next finding
        common.view_slot(f"reproduction_view::{report.fast}::0")
    with st.expander("Models, seeds and notes"):
        st.json(report.models, expanded=False)
        for note in report.notes:
            st.markdown(f"- {note}")


def session_dir() -> str:
    """A temporary folder for this browser session's report files, made on first use."""
    if "reproduction_dir" not in st.session_state:
        st.session_state["reproduction_dir"] = tempfile.mkdtemp(prefix="interp-reports-")
    return st.session_state["reproduction_dir"]


finding = st.selectbox("Finding", reproductions.FINDINGS, key="reproduction_finding")
fast_key = f"fast_report::{finding}"

left, right = st.columns([1, 3])
right.caption(
    "Runs the reproduction again with its fast budgets (fewer samples, looser bounds) and the same "
    "checks. It reuses the shipped checkpoints and trains only models that have none; to retrain "
    "a model from scratch, run `interp zoo train NAME --fast --out DIR`. The report files go to a "
    "temporary folder of this session, not into the checkout."
)
if left.button("Re-run fast version", key="reproduction_fast"):
    st.session_state.pop(fast_key, None)
    bar = st.progress(0.0, text="starting")
    try:
        with common.guard(), report_progress(lambda done, what: bar.progress(done, text=what or "working")):
            out = Path(session_dir()) / finding
            st.session_state[fast_key] = reproductions.run(finding, fast=True, out_dir=out, quiet=True)
    finally:
        bar.empty()

if fast_key in st.session_state:
    st.subheader("Fast re-run")
    show(st.session_state[fast_key])

st.subheader("From the shipped checkpoints")
with common.guard(), st.spinner(f"Analysing the shipped checkpoints for {finding}..."):
    show(checkpoint_report(finding))
