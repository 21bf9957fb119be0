"""Order hook sites as the forward computes them and read their shapes, from one tiny run."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from interp.hooks import Dim, HookSite, attached


def trace_sites(
    sites: dict[str, HookSite], run: Callable[[], Any], symbolic: dict[int, str] | None = None
) -> dict[str, HookSite]:
    """Run ``run()`` once with readers on every site; return the sites in firing order with shapes.

    ``symbolic`` maps sizes used in the probe input to dim names: axis 0 of size ``batch`` becomes
    ``"batch"``, and any axis whose size equals the probe's (prime) sequence length becomes
    ``"pos"``. Sites that never fire keep ``shape=None`` and go last.
    """
    symbolic = symbolic or {}
    order: list[str] = []
    shapes: dict[str, tuple[Dim, ...]] = {}

    def reader(name: str) -> Callable[[torch.Tensor], None]:
        def read(act: torch.Tensor) -> None:
            if name not in shapes:
                order.append(name)
                shapes[name] = _symbolic_shape(tuple(act.shape), symbolic)

        return read

    with attached((site, reader(name)) for name, site in sites.items()), torch.no_grad():
        run()
    traced = {name: replace(sites[name], shape=shapes[name]) for name in order}
    traced.update({name: site for name, site in sites.items() if name not in traced})
    return traced


def _symbolic_shape(shape: tuple[int, ...], symbolic: dict[int, str]) -> tuple[Dim, ...]:
    out: list[Dim] = []
    for axis, size in enumerate(shape):
        name = symbolic.get(size)
        if name == "batch" and axis != 0:
            name = None
        out.append(name or size)
    return tuple(out)
