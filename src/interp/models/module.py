"""Any ``torch.nn.Module`` (CNNs, MLPs, toy models) as a ``HookedModel``.

Hook names are module paths with the side they sit on: ``conv1.hook_out`` is what ``conv1``
returns, ``conv1.hook_in`` is what it receives. Names are listed in the order the forward computes
them when the input shape is known.
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np
import torch
from torch import nn

from interp.checks import require_finite
from interp.errors import InputError
from interp.hooks import HookSite
from interp.models.base import HookedModel
from interp.models.tracing import trace_sites

_ROOT_SIDES = (("hook_in", "input"), ("hook_out", "output"))
_REAL = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.uint8, torch.int8,
         torch.int16, torch.int32, torch.int64, torch.bool)  # fmt: skip


def _dims(shape: tuple[int, ...]) -> str:
    return ", ".join(map(str, shape))


def _checked_shape(shape: Any, name: str) -> tuple[int, ...] | None:
    """``input_shape`` as a tuple of positive ints (InputError naming the fix otherwise)."""
    if shape is None:
        return None
    try:
        dims = tuple(operator.index(d) for d in ((shape,) if isinstance(shape, int) else shape))
    except TypeError:
        dims = ()
    if not dims or isinstance(shape, bool) or min(dims) <= 0:
        raise InputError(
            f"input_shape for {name} must be a tuple of positive ints, the shape of one example without "
            f"the batch axis (e.g. (1, 8, 8)); got {shape!r}"
        )
    return dims


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
        self.input_shape = _checked_shape(input_shape, name)
        if input_range is not None and not (len(input_range) == 2 and input_range[0] < input_range[1]):
            raise InputError(
                f"input_range for {name} must be (low, high) with low < high, got {input_range!r}"
            )
        self.input_range = input_range

    def _build_sites(self) -> dict[str, HookSite]:
        sites: dict[str, HookSite] = {}
        for path, sub in self.module.named_modules():
            if path:
                sites[f"{path}.hook_in"] = HookSite(f"{path}.hook_in", sub, "input")
                sites[f"{path}.hook_out"] = HookSite(f"{path}.hook_out", sub, "output")
        if not sites:  # a module without submodules (nn.Identity, nn.Linear): its own input and output
            sites = {side: HookSite(side, self.module, kind) for side, kind in _ROOT_SIDES}
        if self.input_shape is None:
            return sites
        probe = torch.zeros((3, *self.input_shape), dtype=self._dtype, device=self.device)
        try:
            return trace_sites(sites, lambda: self.module(probe), {3: "batch"})
        except (RuntimeError, ValueError, TypeError, IndexError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise InputError(
                f"{self.name} cannot run a batch of input_shape={self.input_shape} ({first}). "
                "Pass the shape of one example, without the batch axis (e.g. input_shape=(1, 8, 8))."
            ) from None

    @property
    def _dtype(self) -> torch.dtype:
        param = next(self.module.parameters(), None)
        return param.dtype if param is not None else torch.float32

    def prepare(self, inputs: Any) -> torch.Tensor:
        x = self._as_tensor(inputs)
        if not torch.is_floating_point(x):
            x = x.to(self._dtype)
        require_finite(x, f"the input to {self.name}", "Replace or drop the NaN/inf examples before running.")
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

    def _as_tensor(self, inputs: Any) -> torch.Tensor:
        """A real-valued, non-empty tensor from a tensor, array or nested list (InputError otherwise)."""
        want = f"a float tensor batch{'' if self.input_shape is None else f' of shape (N, {_dims(self.input_shape)})'}"
        if inputs is None:
            raise InputError(f"{self.name} got no input (None); pass {want}")
        if isinstance(inputs, str) or (
            isinstance(inputs, list | tuple) and inputs and all(isinstance(v, str) for v in inputs)
        ):
            raise InputError(f"{self.name} is not a text model: it takes {want}, not text")
        try:
            x = inputs if isinstance(inputs, torch.Tensor) else torch.as_tensor(np.asarray(inputs))
        except (TypeError, ValueError, RuntimeError) as err:
            raise InputError(
                f"{self.name} cannot read a {type(inputs).__name__} as numbers ({err}); pass {want}"
            ) from None
        if x.is_complex() or x.dtype not in _REAL:
            raise InputError(f"{self.name} takes real numbers, got a {x.dtype} tensor; pass {want}")
        if x.numel() == 0:
            raise InputError(
                f"{self.name} got an empty input of shape {tuple(x.shape)}; pass at least one example"
            )
        return x

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
