"""The README's "Coming from TransformerLens" table names calls that exist.

Each row pairs a TransformerLens call with interp's. Every ``model.X``, ``cache.X``, ``interp.X``,
``P.X``, ``atp.X`` and ``lens.X`` on the interp side (or on the TL side, where the interp side says
"same") must exist, and every site string given to ``P.patch``/``P.patch_every`` must be a site or
a family, so the table cannot drift from the code.
"""

from __future__ import annotations

import importlib
import re
import types
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
MODULES = {
    "interp": "interp",
    "P": "interp.methods.patching",
    "atp": "interp.methods.attribution_patching",
    "lens": "interp.methods.lens",
}


def _table_rows() -> list[tuple[str, str]]:
    text = README.read_text()
    section = text.split("## Coming from TransformerLens", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if len(cells) == 2 and not set(cells[0]) <= {"-"} and cells[0] != "TransformerLens":
            rows.append((cells[0], cells[1]))
    return rows


def _calls(cell: str) -> list[tuple[str, str]]:
    """``(owner, dotted attribute path)`` for each ``owner.a.b`` in the cell's code spans."""
    found = []
    for span in re.findall(r"`([^`]+)`", cell):
        for owner, path in re.findall(r"\b(model|cache|interp|P|atp|lens)\.([\w.]*\w)", span):
            found.append((owner, path))
    return found


def _bare_names(cell: str) -> list[str]:
    """Code spans that are a bare identifier (``to_string`` in "`model.to_str_tokens`, `to_string`")."""
    outside_brackets = re.sub(r"\([^)]*\)", "", cell)
    return [span for span in re.findall(r"`([^`]+)`", outside_brackets) if span.isidentifier()]


def _resolve(root: object, path: str) -> bool:
    obj = root
    for part in path.split("."):
        if not hasattr(obj, part):
            if not isinstance(obj, types.ModuleType):
                return False
            name = f"{getattr(obj, '__name__', '')}.{part}"
            try:  # a submodule not imported yet (interp.methods.heads)
                obj = importlib.import_module(name)
            except ImportError:
                return False
            continue
        obj = getattr(obj, part)
    return True


def test_the_table_is_there_and_substantial():
    assert len(_table_rows()) >= 25


@pytest.fixture(scope="module")
def objects(gpt2_model):
    from interp.hooks import ActivationCache

    return {"model": gpt2_model, "cache": ActivationCache} | {
        key: importlib.import_module(path) for key, path in MODULES.items()
    }


def test_every_interp_call_in_the_table_exists(objects):
    missing = []
    for tl_cell, interp_cell in _table_rows():
        cell = tl_cell if interp_cell.startswith("same") else interp_cell
        calls = _calls(cell)
        owners = {owner for owner, _ in calls}
        if len(owners) == 1:  # bare names after `model.X` belong to the same owner
            owner = next(iter(owners))
            calls += [(owner, name) for name in _bare_names(cell)]
        missing += [f"{owner}.{path}" for owner, path in calls if not _resolve(objects[owner], path)]
    assert not missing, f"README names calls that do not exist: {sorted(set(missing))}"


def test_every_patching_site_in_the_table_is_offered():
    from interp.methods import patching as P

    families = getattr(P, "EVERY", None) or getattr(P, "_EVERY", None) or {}
    offered = set(P.SITES) | set(families) | {"block", "head", "head_pos"}
    named = set()
    for _, interp_cell in _table_rows():
        if "P.patch" in interp_cell:
            named.update(re.findall(r'"(\w+)"', interp_cell))
    assert named, "the table names no patching sites"
    assert named <= offered, f"sites in the README that P does not offer: {sorted(named - offered)}"
