"""Any ``torch.nn.Module`` (CNNs, MLPs, toy models) as a ``HookedModel``.

Hook names are module paths with the side they sit on: ``conv1.hook_out`` is what ``conv1``
returns, ``conv1.hook_in`` is what it receives. Names are listed in the order the forward computes
them when the input shape is known.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from interp.errors import InputError
from interp.hooks import HookSite
from interp.models.base import HookedModel
from interp.models.tracing import trace_sites


class ModuleModel(HookedModel):
    """Wraps an ``nn.Module`` that maps a float tensor batch ``[batch, *input_shape]`` to an output.

    Args:
        module: the model.
        name: a label for reports.
        input_shape: the shape of one example (e.g. ``(1, 8, 8)``); enables shape checks, ordered
            hook names with shapes, and capture-size estimates before running.
        input_range: ``(low, high)`` that inputs must lie in (e.g. ``(0.0, 1.0)`` for images).
    """

    kind = "module"

    def __init__(
        self,
        module: nn.Module,
        name: str = "module",
        *,
        input_shape: tuple[int, ...] | None = None,
        input_range: tuple[float, float] | None = None,
    ) -> None:
        super().__init__(module, name)
        self.input_shape = tuple(input_shape) if input_shape is not None else None
        self.input_range = input_range

    def _build_sites(self) -> dict[str, HookSite]:
        sites: dict[str, HookSite] = {}
        for path, sub in self.module.named_modules():
            if path:
                sites[f"{path}.hook_in"] = HookSite(f"{path}.hook_in", sub, "input")
                sites[f"{path}.hook_out"] = HookSite(f"{path}.hook_out", sub, "output")
        if self.input_shape is None:
            return sites
        probe = torch.zeros((3, *self.input_shape), dtype=self._dtype, device=self.device)
        return trace_sites(sites, lambda: self.module(probe), {3: "batch"})

    @property
    def _dtype(self) -> torch.dtype:
        param = next(self.module.parameters(), None)
        return param.dtype if param is not None else torch.float32

    def prepare(self, inputs: Any) -> torch.Tensor:
        x = torch.as_tensor(np.asarray(inputs)) if not isinstance(inputs, torch.Tensor) else inputs
        if not torch.is_floating_point(x):
            x = x.to(self._dtype)
        if self.input_shape is not None:
            x = self._check_shape(x)
        if self.input_range is not None:
            low, high = self.input_range
            if x.numel() and (x.min() < low or x.max() > high):
                raise InputError(
                    f"{self.name} expects inputs in [{low}, {high}], got values in "
                    f"[{x.min().item():.3g}, {x.max().item():.3g}]. Rescale them (e.g. pixels / 255 or / 16)."
                )
        return x.to(self.device, self._dtype)

    def _check_shape(self, x: torch.Tensor) -> torch.Tensor:
        expected = self.input_shape
        if tuple(x.shape) == expected:
            return x.unsqueeze(0)
        if tuple(x.shape[1:]) == expected:
            return x
        raise InputError(
            f"{self.name} expects one input of shape {expected} or a batch of shape (N, {', '.join(map(str, expected))}), "
            f"got {tuple(x.shape)}. Reshape your input (e.g. x.reshape(-1, {', '.join(map(str, expected))}))."
        )

    def _forward(self, prepared: torch.Tensor) -> torch.Tensor:
        return self.module(prepared)

    def dim_sizes(self, prepared: torch.Tensor) -> dict[str, int]:
        """``{"batch": leading size}``; a 0-d input (a scalar, as in TL's HookPoint demo) is one example."""
        return {"batch": prepared.shape[0] if prepared.ndim else 1}

    def _cache_meta(self, prepared: torch.Tensor) -> dict[str, Any]:
        return {"model": self.name, "batch": self.dim_sizes(prepared)["batch"]}
