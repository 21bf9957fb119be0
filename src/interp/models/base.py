"""``HookedModel``: one interface over every model kind.

A subclass says three things: which hook sites the model has (``_sites``), how raw inputs become
the model's arguments (``prepare``), and how to run it (``_forward``). Everything else — name
matching, capture, replacement hooks, early stopping, gradients, the memory check — lives here once.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from functools import cached_property
from typing import Any

import torch
from torch import nn

from interp.errors import UnknownHookError
from interp.hooks import (
    ActivationCache,
    HookContext,
    HookFn,
    HookSite,
    Names,
    StopForward,
    attached,
    check_budget,
    keep_positions,
    layer_of,
    match_names,
    tile_batch,
    untile_batch,
)

TilingPlan = tuple[tuple[str, str], ...]  # ((hook, "tile" | "untile"), ...): see HookedModel.tiling_plans


class HookedModel:
    """A loaded model whose activations can be read and changed by name.

    Attributes:
        name: what it was loaded as (``"minilm"``, ``"zoo:digits-cnn"``, a path...).
        kind: ``"transformer"`` or ``"module"``.
        module: the underlying ``torch.nn.Module`` (plain HF model, TransformerBridge or your module).
    """

    kind: str = "module"
    _stacking: bool = False  # inside ``_tiled``: copies are stacked mid-forward

    def __init__(self, module: nn.Module, name: str) -> None:
        self.module = module.eval()
        self.name = name
        # Hooks are attached to the shared module, so a run and its hooks hold the model: a forward
        # from another thread (another explorer session) never sees them. Re-entrant for nested runs.
        self._lock = threading.RLock()

    def __getstate__(self) -> dict[str, Any]:  # copies (copy.deepcopy) get a lock of their own
        return {key: value for key, value in self.__dict__.items() if key != "_lock"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()

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
        try:
            return match_names(names, self.hook_names)
        except UnknownHookError as err:
            asked = [names] if isinstance(names, str) else list(names or [])
            why = [self.withheld[n] for n in asked if isinstance(n, str) and n in self.withheld]
            if why:
                raise UnknownHookError(f"{err} {' '.join(why)}") from None
            raise

    @property
    def withheld(self) -> dict[str, str]:
        """Hook names this model does not offer because they would not carry what they name, with why."""
        self._sites  # noqa: B018 (building the sites fills it)
        return self._withheld

    _withheld: dict[str, str] = {}  # noqa: RUF012 (instances that withhold names set their own)

    # --- running ------------------------------------------------------------------------------

    def __call__(self, inputs: Any) -> torch.Tensor:
        """Plain forward, no hooks: returns the main output (logits, or the last hidden state)."""
        prepared = self.prepare(inputs)
        with self._lock, torch.no_grad():
            return self._forward(prepared)

    def run_with_hooks(
        self, inputs: Any, hooks: Sequence[tuple[Names, HookFn]], *, grad: bool = False
    ) -> Any:
        """Run with ``fn(activation, hook) -> replacement or None`` on each named hook point.

        Use it for ablation, steering and patching. Hooks are removed afterwards, even on error.
        ``grad=True`` keeps autograd on (for attacks and attribution through hooks).
        """
        prepared = self.prepare(inputs)
        with self._lock, self.hooks(hooks), torch.set_grad_enabled(grad):
            return self._forward(prepared)

    @contextmanager
    def hooks(self, hooks: Sequence[tuple[Names, HookFn]]):
        """Context manager that keeps hooks attached for several runs; removes them on exit."""
        pairs, carries = [], []
        for pattern, fn in hooks:
            for name in self.resolve(pattern):
                bound = _bind(fn, name)
                partner = self._write_through.get(name)
                if partner is None:
                    pairs.append((self._sites[name], bound))
                else:
                    edit, carry = _written_through(self._sites[name], self._sites[partner], bound)
                    pairs.append(edit)
                    carries.append(carry)
        with self._lock, attached(carries + pairs):  # a carried edit lands before other hooks see it
            yield self

    @property
    def _write_through(self) -> dict[str, str]:
        """Hook names whose site is not the stream they name, mapped to where an edit must also land.

        A pre-LN block reads ``hook_resid_mid`` at the MLP's input (``ln2.hook_in``); the residual
        add uses the same tensor but bypasses the hook. The change an edit makes there is therefore
        also added at ``hook_resid_post``, so ``resid_post = new resid_mid + mlp(ln2(new resid_mid))``,
        as the name promises (and ``hook_mlp_out`` still reads the MLP's output).
        """
        return {}

    def tile_input(self, prepared: Any, copies: int) -> Any:
        """``copies`` stacked copies of a prepared batch: row ``k * batch + b`` is input ``b``."""
        return tile_batch(copies)(prepared)

    def run_copies(
        self,
        inputs: Any,
        copies: int,
        hooks: Sequence[tuple[Names, HookFn]],
        *,
        shared_until: str | None = None,
        suffix: tuple[Any, int] | None = None,
    ) -> Any:
        """Run ``copies`` stacked copies of ``inputs`` with ``hooks``; row ``k * batch + b`` is input ``b``.

        This is how batched patching gives each copy its own edit. With ``shared_until``, the
        computation before that hook runs once, not once per copy (see ``tiling_plans``), which is
        exact and saves the repeated work. It must be either the one hook that all ``hooks`` act on,
        or a residual-stream hook (``blocks.L.hook_resid_pre``) that every hooked activation is
        computed after. A plan is used only once ``shares_prefix`` has verified it on inputs like
        these; if such a forward still fails (say a tensor built before the hook for one prompt per
        row), the copies are rerun from a tiled input.

        ``suffix=(route, s)`` (an ``interp.models.suffix.SuffixRoute`` of ``inputs`` whose ``exact()``
        held; ``s`` may be 0): run positions ``s..`` only, the earlier ones from the route's cached run; hooks then
        see the last ``n - s`` positions and the output covers positions ``s..``. The plan is
        verified for that route too (``_check_plan``); without one, the copies are tiled at the
        tail's input.
        """
        prepared = self.prepare(inputs)
        if suffix is not None:
            route, s = suffix
            plan = None if shared_until is None else self._verified_plan(prepared, shared_until, route)
            with self._lock, route.active(s) as tail:  # the route changes the shared module
                if plan is not None:
                    with self._tiled(plan, copies):
                        return self.run_with_hooks(tail, hooks)
                return self.run_with_hooks(self.tile_input(tail, copies), hooks)
        if shared_until is not None:
            plan = self._verified_plan(prepared, shared_until)
            if plan is not None:
                try:
                    with self._tiled(plan, copies):
                        return self.run_with_hooks(prepared, hooks)
                except (RuntimeError, ValueError, IndexError):
                    self._prefix_checks[self._plan_key(prepared, plan)] = False
        return self.run_with_hooks(self.tile_input(prepared, copies), hooks)

    def tiling_plans(self, name: str) -> list[TilingPlan]:
        """Ways to run the forward once up to hook ``name`` and per copy after it, most sharing first.

        A plan is a sequence of ``(hook, "tile" | "untile")``: stack the copies at a hook, or keep
        one copy where all are still equal. The plain plan stacks them at ``name``;
        ``TransformerModel`` adds plans that keep a block's residual stream stacked while its
        attention or MLP branch runs once up to ``name``.
        """
        return [((name, "tile"),)]

    def shares_prefix(self, prepared: Any, name: str, route: Any = None) -> bool:
        """Whether some tiling plan for ``name`` is verified on inputs like ``prepared`` (under a
        suffix ``route``, if given). Call it outside ``keeping_positions``: the check compares
        whole outputs."""
        return self._verified_plan(prepared, name, route) is not None

    def _verified_plan(self, prepared: Any, name: str, route: Any = None) -> TilingPlan | None:
        """The first plan for ``name`` whose output equals tiling the input.

        Checked numerically once per (plan, batch size, padding mask or not) and remembered: both
        ways run two copies, each jittered differently right after ``name``, and must give the same
        output (so copies neither mix nor reorder). A model that computes a batch-shaped tensor
        before the plan's hooks and uses it after (e.g. a padding mask, for batches > 1) fails.
        With a suffix ``route``, the plan is checked (and remembered) separately, running from the
        middle of the input under the route against the tail of the full tiled run.
        """
        for plan in self.tiling_plans(name):
            key = self._plan_key(prepared, plan) + (route is not None,)
            if key not in self._prefix_checks:
                self._prefix_checks[key] = self._check_plan(prepared, plan, route)
            if self._prefix_checks[key]:
                return plan
        return None

    @contextmanager
    def keeping_positions(self, name: str, index: torch.Tensor):
        """Forwards inside this block keep only position ``index[b]`` of prompt ``b`` from hook ``name``
        on (for every stacked copy of it), so the work after ``name`` is done for one position.

        Exact for a position-wise computation after ``name`` whose output is read only at those
        positions: the unembedding, when a metric reads one position per prompt.
        """
        with self._lock, attached([(self._sites[name], keep_positions(index))], batch_may_change=True):
            yield self

    @contextmanager
    def _tiled(self, plan: TilingPlan, copies: int):
        """Forwards inside this block follow ``plan`` for ``copies`` copies of the batch."""
        ops = {"tile": tile_batch(copies), "untile": untile_batch(copies)}
        with self._lock:
            self._stacking = True
            try:
                with attached([(self._sites[hook], ops[op]) for hook, op in plan], batch_may_change=True):
                    yield self
            finally:
                self._stacking = False

    def _plan_key(self, prepared: Any, plan: TilingPlan) -> tuple:
        """Plans are checked per layer-free template: blocks share their structure."""
        template = tuple((re.sub(r"\.\d+\.", ".{}.", hook, count=1), op) for hook, op in plan)
        batch = self.dim_sizes(prepared).get("batch")
        return template, batch, getattr(prepared, "attention_mask", None) is None

    @cached_property
    def _prefix_checks(self) -> dict[tuple, bool]:
        return {}

    @cached_property
    def _suffix_checks(self) -> dict[tuple, bool]:
        """Whether a run from the middle (``interp.models.suffix``) is exact, per input shape."""
        return {}

    def _check_plan(self, prepared: Any, plan: TilingPlan, route: Any = None) -> bool:
        copies, noise = 2, {}
        generator = torch.Generator().manual_seed(0)
        last = plan[-1][0]
        start = 0 if route is None else route.n_pos // 2
        shape = self.hook_shapes.get(last) or ()
        axis = shape.index("pos") if "pos" in shape else None

        def jitter(act: torch.Tensor, _ctx: HookContext) -> torch.Tensor:
            if "value" not in noise:  # drawn on the full (reference) run; none before ``start``
                scale = 0.1 * act.float().std().clamp_min(1e-3)
                value = (torch.randn(act.shape, generator=generator) * scale).to(act)
                if axis is not None and start:
                    value.narrow(axis, 0, start).zero_()
                noise["value"] = value
            value = noise["value"]
            if axis is not None and act.shape[axis] != value.shape[axis]:  # a tail run: its last positions
                value = value.narrow(axis, value.shape[axis] - act.shape[axis], act.shape[axis])
            return act + value

        try:
            reference = self.run_with_hooks(self.tile_input(prepared, copies), [(last, jitter)])
            if route is None:
                with self._tiled(plan, copies):
                    shared = self.run_with_hooks(prepared, [(last, jitter)])
            else:
                reference = reference[:, start:]
                with self._lock, route.active(start) as tail, self._tiled(plan, copies):
                    shared = self.run_with_hooks(tail, [(last, jitter)])
        except (RuntimeError, ValueError, IndexError, TypeError, NotImplementedError):
            return False
        if shared.shape != reference.shape:
            return False
        scale = float(reference.abs().max().clamp_min(1.0))
        return bool(torch.allclose(shared, reference, rtol=1e-4, atol=1e-5 * scale))

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
        with self._lock, self.hooks(hooks), attached(readers), torch.set_grad_enabled(grad_of is not None):
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


def _written_through(
    site: HookSite, partner: HookSite, fn: Callable
) -> tuple[tuple[HookSite, Callable], tuple[HookSite, Callable]]:
    """``fn`` at ``site``, plus a hook at ``partner`` that adds the change ``fn`` made (see ``_write_through``)."""
    change: dict[str, torch.Tensor] = {}

    def edit(act: torch.Tensor) -> torch.Tensor | None:
        new = fn(act)
        if new is not None:
            change["delta"] = new - act
        return new

    def carry(act: torch.Tensor) -> torch.Tensor | None:
        delta = change.pop("delta", None)
        return None if delta is None else act + delta

    return (site, edit), (partner, carry)


def _bind(fn: HookFn, name: str) -> Callable[[torch.Tensor], torch.Tensor | None]:
    context = HookContext(name=name, layer=layer_of(name))
    return lambda act: fn(act, context)
