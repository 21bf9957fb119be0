"""Errors that name the problem and the fix.

Every error the workbench raises on bad input is an ``InterpError`` (also a ``ValueError`` where the
input itself is wrong), so scripts can catch one family and the explorer can show the message instead
of a traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class InterpError(Exception):
    """Base class: the message always says what went wrong and what to do instead."""


class InputError(InterpError, ValueError):
    """The caller's input is malformed: wrong shape, range, length or type."""


class UnknownHookError(InterpError, KeyError):
    """A hook name (or pattern) matches no hook point of the model."""

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return str(self.args[0]) if self.args else ""


class CaptureTooLargeError(InterpError, MemoryError):
    """A capture would exceed the memory budget; refused before anything runs."""


class ModelLoadError(InterpError, OSError):
    """A model spec could not be turned into a model (missing, offline, corrupt)."""


class CheckpointError(ModelLoadError):
    """A zoo checkpoint is missing or corrupt."""


def closest(name: str, candidates: Iterable[str], n: int = 5) -> list[str]:
    """The valid names most similar to ``name``, best first (for 'did you mean' messages)."""
    candidates = list(candidates)
    matches = difflib.get_close_matches(name, candidates, n=n, cutoff=0.5)
    if len(matches) < n:
        # Also offer names sharing the final component (e.g. 'hook_pattern' asked without its block).
        tail = name.rsplit(".", 1)[-1]
        matches += [c for c in candidates if c.endswith(tail) and c not in matches][: n - len(matches)]
    return matches
