"""Reproductions: each published finding's paper-vs-ours table and figures, from the shipped
checkpoints (nothing retrained), and a button that re-runs the fast version with progress."""

from __future__ import annotations

import common
import pandas as pd
import streamlit as st

from interp import reproductions
from interp.progress import report_progress

st.title("Reproductions")
st.markdown(
    "Published circuit findings reproduced on the zoo's models, our number next to the paper's. "
    "The table below analyses the shipped checkpoints; **Re-run fast** retrains small versions here."
)


@st.cache_resource(show_spinner=False, max_entries=8)
def checkpoint_report(finding: str) -> reproductions.Report:
    return reproductions.from_checkpoints(finding)


def show(report: reproductions.Report) -> None:
    rows = [
        dict(zip(("quantity", "paper", "ours", "tolerance", "pass"), c.row(), strict=True))
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
    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")
    for title, figure in report.figures:
        st.plotly_chart(figure, key=f"{report.finding}-{report.fast}-{title}")
    for title, html in report.views:
        st.caption(title)
        st.iframe(html, height="content")
    with st.expander("Models, seeds and notes"):
        st.json(report.models, expanded=False)
        for note in report.notes:
            st.markdown(f"- {note}")


finding = st.selectbox("Finding", reproductions.FINDINGS, key="reproduction_finding")
fast_key = f"fast_report::{finding}"

if st.button("Re-run fast version", help="Retrains small models here; takes a minute or two on a CPU."):
    bar = st.progress(0.0, text="starting")
    with common.guard(), report_progress(lambda done, what: bar.progress(done, text=what or "working")):
        st.session_state[fast_key] = reproductions.run(finding, fast=True, quiet=True)
    bar.empty()

if fast_key in st.session_state:
    st.subheader("Fast re-run")
    show(st.session_state[fast_key])

st.subheader("From the shipped checkpoints")
with common.guard(), st.spinner(f"Analysing the shipped checkpoints for {finding}..."):
    show(checkpoint_report(finding))
