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
    """Call ``callback(fraction_done, bar_description)`` whenever a tqdm bar redraws in the block
    (as often as tqdm itself redraws: throttled by its ``mininterval``, and once more on close)."""
    from tqdm import std

    original = std.tqdm.display

    def display(self: std.tqdm, *args, **kwargs):
        shown = original(self, *args, **kwargs)
        if self.total:
            callback(min(float(self.n) / float(self.total), 1.0), str(self.desc or ""))
        return shown

    std.tqdm.display = display
    try:
        yield
    finally:
        std.tqdm.display = original
