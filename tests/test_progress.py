"""report_progress routes tqdm bars to a callback and restores tqdm afterwards."""

from __future__ import annotations

import pytest
from tqdm import std
from tqdm.auto import tqdm

from interp.progress import report_progress


def test_fractions_reach_one_and_tqdm_is_restored():
    seen: list[tuple[float, str]] = []
    original = std.tqdm.display
    with report_progress(lambda done, what: seen.append((done, what))):
        for _ in tqdm(range(4), desc="work", mininterval=0, miniters=1):
            pass
    fractions = [round(d, 2) for d, _ in seen]
    assert fractions == sorted(fractions) and {0.25, 0.5, 0.75} <= set(fractions) and fractions[-1] == 1.0
    assert {what for _, what in seen} == {"work"}
    assert std.tqdm.display is original


def test_restored_even_when_the_work_raises():
    original = std.tqdm.display
    with pytest.raises(RuntimeError), report_progress(lambda *a: None):
        raise RuntimeError("boom")
    assert std.tqdm.display is original
