"""Checks and reports: one row per published quantity, paper value next to ours.

A reproduction produces a :class:`Report`: a list of :class:`Check` rows (quantity, the paper's value
as text, our value, the tolerance as text, pass/fail), the figures that show the finding, and the
config and seed of every model it used. ``report.write(dir)`` saves ``results.json`` (machine
readable, with the seeds and configs) and ``report.html`` (the table, the plotly figures and the
circuitsvis views, all with their JavaScript inlined so the page renders offline).
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_COLUMNS = ("quantity", "paper", "ours", "tolerance", "pass")


def _fmt(value: Any, digits: int = 3) -> str:
    """Short text for a number, a bool or anything else (lists of numbers are formatted element-wise)."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if value != 0 and (abs(value) < 10 ** -(digits - 1) or abs(value) >= 1e5):
            return f"{value:.{digits - 1}e}"
        return f"{value:.{digits}g}" if abs(value) >= 1 else f"{value:.{digits}f}".rstrip("0").rstrip(".")
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_fmt(v, digits) for v in value) + "]"
    return str(value)


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not (isinstance(value, float) and math.isnan(value))


@dataclass
class Check:
    """One row of a reproduction table.

    Attributes:
        quantity: what is measured, in words a reader of the paper recognises.
        paper: the published value (or claim) as text, e.g. ``"72°"`` or ``"84.6%"``.
        ours: our value as text.
        tolerance: the acceptance rule as text, e.g. ``">= 0.5"`` or ``"72 ± 8"``.
        passed: whether ``ours`` satisfies ``tolerance``.
        value: our raw value (for results.json), when it is a number or a list of numbers.
    """

    quantity: str
    paper: str
    ours: str
    tolerance: str
    passed: bool
    value: Any = None

    # Constructors that compute ``passed`` from a number, so every rule is written once.

    @classmethod
    def at_least(cls, quantity: str, paper: str, value: float, bound: float, *, digits: int = 3) -> Check:
        ok = _finite(value) and value >= bound
        return cls(quantity, paper, _fmt(value, digits), f">= {_fmt(bound, digits)}", bool(ok), value)

    @classmethod
    def at_most(cls, quantity: str, paper: str, value: float, bound: float, *, digits: int = 3) -> Check:
        ok = _finite(value) and value <= bound
        return cls(quantity, paper, _fmt(value, digits), f"<= {_fmt(bound, digits)}", bool(ok), value)

    @classmethod
    def within(
        cls, quantity: str, paper: str, value: float, target: float, tol: float, *, digits: int = 3
    ) -> Check:
        ok = _finite(value) and abs(value - target) <= tol
        return cls(
            quantity,
            paper,
            _fmt(value, digits),
            f"{_fmt(target, digits)} ± {_fmt(tol, digits)}",
            bool(ok),
            value,
        )

    @classmethod
    def between(
        cls, quantity: str, paper: str, value: float, low: float, high: float, *, digits: int = 3
    ) -> Check:
        ok = _finite(value) and low <= value <= high
        return cls(
            quantity,
            paper,
            _fmt(value, digits),
            f"in [{_fmt(low, digits)}, {_fmt(high, digits)}]",
            bool(ok),
            value,
        )

    @classmethod
    def equal(cls, quantity: str, paper: str, value: Any, expected: Any) -> Check:
        return cls(quantity, paper, _fmt(value), f"== {_fmt(expected)}", bool(value == expected), value)

    @classmethod
    def holds(cls, quantity: str, paper: str, ours: Any, passed: bool, tolerance: str) -> Check:
        """A rule that is not a simple bound (monotonicity, an argmax, a set): say it in ``tolerance``."""
        return cls(
            quantity, paper, _fmt(ours), tolerance, bool(passed), ours if not isinstance(ours, str) else None
        )

    def row(self) -> tuple[str, str, str, str, str]:
        return (self.quantity, self.paper, self.ours, self.tolerance, "PASS" if self.passed else "FAIL")


@dataclass
class Report:
    """The outcome of one reproduction: checks, figures, and what models (config, seed) produced it.

    Attributes:
        finding: the finding's name (``"induction"``, ``"grokking"``, ``"superposition"``).
        fast: whether this was the reduced-budget variant.
        checks: the table rows.
        figures: ``(title, plotly Figure)`` pairs.
        views: ``(title, self-contained HTML)`` pairs (circuitsvis ``local_src``).
        models: ``{name: {"source": ..., "config": ..., "seed": ...}}`` for every model used.
        notes: free text lines for the report (what was retrained, what came from checkpoints).
        timings: seconds per stage.
    """

    finding: str
    fast: bool = False
    checks: list[Check] = field(default_factory=list)
    figures: list[tuple[str, Any]] = field(default_factory=list)
    views: list[tuple[str, str]] = field(default_factory=list)
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    out_dir: Path | None = None

    @property
    def passed(self) -> bool:
        """True only if there is at least one check and every check passed."""
        return bool(self.checks) and all(c.passed for c in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def add(self, *checks: Check) -> None:
        self.checks.extend(checks)

    def add_model(self, name: str, source: str, meta: dict[str, Any]) -> None:
        """Record where a model came from and the config and seed it was trained with."""
        self.models[name] = {
            "source": source,
            "seed": meta.get("seed"),
            "config": meta.get("config"),
            "fast": meta.get("fast"),
            "metrics": meta.get("metrics"),
        }

    # --- output -------------------------------------------------------------------------------

    def table(self) -> str:
        """The checks as a fixed-width text table, with a one-line verdict underneath."""
        rows = [_COLUMNS, *(c.row() for c in self.checks)]
        widths = [max(len(r[i]) for r in rows) for i in range(len(_COLUMNS))]
        line = "  ".join("-" * w for w in widths)
        text = [f"{self.finding} ({'fast' if self.fast else 'faithful'})"]
        for i, row in enumerate(rows):
            text.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
            if i == 0:
                text.append(line)
        n_fail = len(self.failures)
        verdict = "PASSED" if self.passed else f"FAILED ({n_fail} of {len(self.checks)} checks missed)"
        text.append(f"{verdict}: {len(self.checks) - n_fail}/{len(self.checks)} checks")
        return "\n".join(text)

    def to_dict(self) -> dict[str, Any]:
        return {
            "finding": self.finding,
            "fast": self.fast,
            "passed": self.passed,
            "checks": [
                {
                    "quantity": c.quantity,
                    "paper": c.paper,
                    "ours": c.ours,
                    "value": c.value,
                    "tolerance": c.tolerance,
                    "passed": c.passed,
                }
                for c in self.checks
            ],
            "models": self.models,
            "notes": self.notes,
            "timings_s": {k: round(v, 2) for k, v in self.timings.items()},
            "figures": [title for title, _ in self.figures],
            "views": [title for title, _ in self.views],
        }

    def write(self, out_dir: str | Path) -> Path:
        """Write ``results.json`` and ``report.html`` into ``out_dir`` (created); returns the directory."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(self.to_dict(), indent=2, default=_json_default))
        (out / "report.html").write_text(self.html())
        self.out_dir = out
        return out

    def html(self) -> str:
        """A single offline HTML page: the table, notes, models, figures and circuitsvis views."""
        parts = [
            "<!doctype html><html><head><meta charset='utf-8'>",
            f"<title>interp reproduction: {html.escape(self.finding)}</title>",
            _STYLE,
        ]
        if self.figures:
            from plotly.offline import get_plotlyjs

            parts.append(f"<script type='text/javascript'>{get_plotlyjs()}</script>")
        parts.append("</head><body>")
        verdict = "PASSED" if self.passed else "FAILED"
        parts.append(
            f"<h1>{html.escape(self.finding)} ({'fast' if self.fast else 'faithful'}): "
            f"<span class='{verdict.lower()}'>{verdict}</span></h1>"
        )
        parts.append(_html_table(self.checks))
        if self.notes:
            parts.append("<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in self.notes) + "</ul>")
        for title, fig in self.figures:
            parts.append(f"<h2>{html.escape(title)}</h2>")
            parts.append(fig.to_html(full_html=False, include_plotlyjs=False))
        for title, view in self.views:
            parts.append(f"<h2>{html.escape(title)}</h2>")
            doc = f"<!doctype html><html><head><meta charset='utf-8'></head><body>{view}</body></html>"
            parts.append(f"<iframe class='view' srcdoc=\"{html.escape(doc, quote=True)}\"></iframe>")
        parts.append("<h2>Models</h2><pre>")
        parts.append(html.escape(json.dumps(self.models, indent=1, default=_json_default)))
        parts.append("</pre></body></html>")
        return "\n".join(parts)


def _html_table(checks: Sequence[Check]) -> str:
    head = "".join(f"<th>{c}</th>" for c in _COLUMNS)
    rows = []
    for c in checks:
        cells = "".join(f"<td>{html.escape(v)}</td>" for v in c.row()[:4])
        status = "pass" if c.passed else "fail"
        rows.append(f"<tr>{cells}<td class='{status}ed'>{status.upper()}</td></tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


_STYLE = """<style>
body { font-family: system-ui, sans-serif; margin: 2em; }
table { border-collapse: collapse; } td, th { border: 1px solid #ccc; padding: 4px 8px; text-align: left; }
.passed, .pass { color: #167516; font-weight: bold; } .failed, .fail { color: #b00020; font-weight: bold; }
iframe.view { width: 100%; height: 720px; border: 1px solid #ddd; }
</style>"""
