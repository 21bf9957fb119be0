"""Progress for callers that are not terminals.

The library reports long work with tqdm. ``report_progress(callback)`` routes every tqdm bar that
advances inside the block to ``callback(fraction, description)``: this is how the explorer shows
library progress in ``st.progress`` without the library ever importing streamlit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

ProgressCallback = Callable[[float, str], None]


@contextmanager
def report_progress(callback: ProgressCallback) -> Iterator[None]:
    """Call ``callback(fraction_done, bar_description)`` whenever a tqdm bar advances in the block."""
    from tqdm import std

    original = std.tqdm.update

    def update(self: std.tqdm, n: float | None = 1) -> bool | None:
        shown = original(self, n)
        if self.total:
            callback(min(float(self.n) / float(self.total), 1.0), str(self.desc or ""))
        return shown

    std.tqdm.update = update
    try:
        yield
    finally:
        std.tqdm.update = original
