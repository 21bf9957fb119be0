"""``HookedModel``: one interface over every model kind.

A subclass says three things: which hook sites the model has (``_sites``), how raw inputs become
the model's arguments (``prepare``), and how to run it (``_forward``). Everything else — name
matching, capture, replacement hooks, early stopping, gradients, the memory check — lives here once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager
from functools import cached_property
from typing import Any

import torch
from torch import nn

from interp.hooks import (
    ActivationCache,
    HookContext,
    HookFn,
    HookSite,
    Names,
    StopForward,
    attached,
    check_budget,
    layer_of,
    match_names,
)


class HookedModel:
    """A loaded model whose activations can be read and changed by name.

    Attributes:
        name: what it was loaded as (``"minilm"``, ``"zoo:digits-cnn"``, a path...).
        kind: ``"transformer"`` or ``"module"``.
        module: the underlying ``torch.nn.Module`` (plain HF model, TransformerBridge or your module).
    """

    kind: str = "module"

    def __init__(self, module: nn.Module, name: str) -> None:
        self.module = module.eval()
        self.name = name

    # --- what a subclass provides -------------------------------------------------------------

    def _build_sites(self) -> dict[str, HookSite]:
        raise NotImplementedError

    def prepare(self, inputs: Any) -> Any:
        """Validate and convert user inputs into what ``_forward`` takes."""
        raise NotImplementedError

    def _forward(self, prepared: Any) -> Any:
        raise NotImplementedError

    def dim_sizes(self, prepared: Any) -> dict[str, int]:
        """Sizes of the symbolic dims ("batch", "pos") for a prepared input."""
        raise NotImplementedError

    # --- hook names ---------------------------------------------------------------------------

    @cached_property
    def _sites(self) -> dict[str, HookSite]:
        return self._build_sites()

    @property
    def hook_names(self) -> list[str]:
        """Every hook name, in the order activations are computed."""
        return list(self._sites)

    @property
    def hook_shapes(self) -> dict[str, tuple | None]:
        """Shape of each hook point; symbolic dims are ``"batch"`` and ``"pos"`` (None if unknown)."""
        return {name: site.shape for name, site in self._sites.items()}

    def resolve(self, names: Names) -> list[str]:
        """Exact names, globs or regexes -> valid hook names (raises with suggestions if unknown)."""
        return match_names(names, self.hook_names)

    # --- running ------------------------------------------------------------------------------

    def __call__(self, inputs: Any) -> torch.Tensor:
        """Plain forward, no hooks: returns the main output (logits, or the last hidden state)."""
        with torch.no_grad():
            return self._forward(self.prepare(inputs))

    def run_with_hooks(
        self, inputs: Any, hooks: Sequence[tuple[Names, HookFn]], *, grad: bool = False
    ) -> Any:
        """Run with ``fn(activation, hook) -> replacement or None`` on each named hook point.

        Use it for ablation, steering and patching. Hooks are removed afterwards, even on error.
        ``grad=True`` keeps autograd on (for attacks and attribution through hooks).
        """
        prepared = self.prepare(inputs)
        with self.hooks(hooks), torch.set_grad_enabled(grad):
            return self._forward(prepared)

    @contextmanager
    def hooks(self, hooks: Sequence[tuple[Names, HookFn]]):
        """Context manager that keeps hooks attached for several runs; removes them on exit."""
        pairs = []
        for pattern, fn in hooks:
            for name in self.resolve(pattern):
                pairs.append((self._sites[name], _bind(fn, name)))
        with attached(pairs):
            yield self

    def run_with_cache(
        self,
        inputs: Any,
        names: Names = None,
        *,
        stop_early: bool = False,
        grad_of: Callable[[torch.Tensor], torch.Tensor] | None = None,
        hooks: Sequence[tuple[Names, HookFn]] = (),
        memory_budget: int | None = None,
        device: str | torch.device | None = None,
    ) -> tuple[torch.Tensor | None, ActivationCache]:
        """Run forward and capture the named activations.

        Args:
            inputs: text(s) or token ids for transformers, a tensor batch for modules.
            names: exact names, globs (``"blocks.*.hook_resid_post"``) or regexes; None = all.
            stop_early: stop the forward right after the last requested activation is computed.
                The output is then ``None``: use it when only the cache matters (probes, stores).
            grad_of: ``metric(output) -> scalar``; if given, ``cache.grads[name]`` holds
                d metric / d activation for every captured name.
            hooks: replacement hooks to apply during the same run (see ``run_with_hooks``).
            memory_budget: bytes the capture may take; the run is refused beforehand if the
                estimate exceeds it (default: ``interp.hooks.default_memory_budget()``).
            device: move captured tensors here (e.g. ``"cpu"``) as they are produced.

        Returns:
            ``(output, cache)``.
        """
        if stop_early and grad_of is not None:
            raise ValueError("grad_of needs the full forward (the metric reads the output); drop stop_early")
        chosen = self.resolve(names)
        prepared = self.prepare(inputs)
        sites = [self._sites[n] for n in chosen]
        check_budget(sites, self.dim_sizes(prepared), self._itemsize, memory_budget, grad_of is not None)

        store: dict[str, torch.Tensor] = {}
        pending = {(id(s.module), s.side) for s in sites}
        fired: set[tuple[int, str]] = set()
        keep = self._keeper(grad_of is not None, device)

        def make_reader(site: HookSite) -> Callable[[torch.Tensor], None]:
            def read(act: torch.Tensor) -> None:
                store[site.name] = keep(act)
                fired.add((id(site.module), site.side))
                if stop_early and fired >= pending:
                    raise StopForward

            return read

        output = None
        readers = [(site, make_reader(site)) for site in sites]
        with self.hooks(hooks), attached(readers), torch.set_grad_enabled(grad_of is not None):
            try:
                output = self._forward(prepared)
            except StopForward:
                output = None
        grads: dict[str, torch.Tensor] = {}
        if grad_of is not None:
            metric = grad_of(output)
            if metric.numel() != 1:
                raise ValueError(f"grad_of must return a scalar, got shape {tuple(metric.shape)}")
            tensors = [store[n] for n in chosen]
            values = torch.autograd.grad(metric, tensors, allow_unused=True)
            grads = {
                n: (g if g is not None else torch.zeros_like(t))
                for n, t, g in zip(chosen, tensors, values, strict=True)
            }
            store = {n: t.detach() for n, t in store.items()}
            output = output.detach()
        missing = [n for n in chosen if n not in store]
        if missing and output is not None:
            raise RuntimeError(f"hook points never fired during the forward: {missing[:5]}")
        cache = ActivationCache(
            {n: store[n] for n in chosen if n in store}, grads, self._cache_meta(prepared)
        )
        return output, cache

    # --- helpers ------------------------------------------------------------------------------

    def _keeper(
        self, for_grad: bool, device: str | torch.device | None
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        """How a captured activation is kept: detached (cloned if a later in-place op could change
        it), or still attached to the graph when gradients are wanted."""
        if for_grad:
            return lambda act: act if act.requires_grad else act.requires_grad_(True)
        clone = self._has_inplace_ops
        return lambda act: (act.detach().clone() if clone else act.detach()).to(device or act.device)

    @cached_property
    def _has_inplace_ops(self) -> bool:
        return any(getattr(m, "inplace", False) is True for m in self.module.modules())

    @property
    def _itemsize(self) -> int:
        param = next(self.module.parameters(), None)
        return param.element_size() if param is not None else 4

    @property
    def device(self) -> torch.device:
        param = next(self.module.parameters(), None)
        return param.device if param is not None else torch.device("cpu")

    def _cache_meta(self, prepared: Any) -> dict[str, Any]:
        return {"model": self.name}

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}: {len(self._sites)} hook points>"


def _bind(fn: HookFn, name: str) -> Callable[[torch.Tensor], torch.Tensor | None]:
    context = HookContext(name=name, layer=layer_of(name))
    return lambda act: fn(act, context)
