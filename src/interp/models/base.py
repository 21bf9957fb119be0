"""``HookedModel``: one interface over every model kind.

A subclass says three things: which hook sites the model has (``_sites``), how raw inputs become
the model's arguments (``prepare``), and how to run it (``_forward``). Everything else — name
matching, capture, replacement hooks, early stopping, gradients, the memory check — lives here once.
"""

from __future__ import annotations

import copy
import inspect
import re
import threading
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal

import torch
from torch import nn

from interp.checks import check_device, checked_hook_value
from interp.errors import InputError, UnknownHookError
from interp.hooks import (
    ActivationCache,
    HookContext,
    HookFn,
    HookSite,
    Names,
    StopForward,
    attach,
    attach_grad,
    attached,
    check_budget,
    internal_probe,
    keep_positions,
    match_names,
    outside_probes,
    tile_batch,
    untile_batch,
)

TilingPlan = tuple[tuple[str, str], ...]  # ((hook, "tile" | "untile"), ...): see HookedModel.tiling_plans
Hooks = Sequence[tuple[Names, HookFn]]


@dataclass
class _Attached:
    """User hooks attached by one call: their torch handles and the hook names they sit on."""

    handles: list[torch.utils.hooks.RemovableHandle]
    names: list[str]
    permanent: bool = False  # add_hook(is_permanent=True): reset_hooks() keeps it

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


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
        self._persistent: list[_Attached] = []  # from add_hook
        self._open: list[_Attached] = []  # from open hooks(...) blocks

    def __getstate__(self) -> dict[str, Any]:  # copies (copy.deepcopy) get a lock of their own
        return {key: value for key, value in self.__dict__.items() if key not in ("_lock", "_open")}

    def __deepcopy__(self, memo: dict) -> HookedModel:
        """A copy with its own lock. It keeps the persistent hooks (``add_hook``) on its copy of the
        module, with handles that remove them there, as TransformerLens's copies do; the hooks of an
        open ``hooks(...)`` block stay with that block and are not copied (they would never be removed)."""
        with self._lock:
            twin = type(self).__new__(type(self))
            memo[id(self)] = twin
            twin.__setstate__(copy.deepcopy(self.__getstate__(), memo))
            for handle in (handle for block in self._open for handle in block.handles):
                for hooks in (handle.hooks_dict_ref(), *(ref() for ref in handle.extra_dict_ref or ())):
                    copied = memo.get(id(hooks)) if hooks is not None else None
                    if copied is not None:
                        copied.pop(handle.id, None)
            return twin

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()
        self._open = []

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
        with self._internal():  # tracing runs are probes: no user hook sees them
            return self._build_sites()

    @contextmanager
    def extra_sites(self, groups: dict[str, Sequence[HookSite]]):
        """Extension point: inside this block, ``groups[host]``'s sites are hook names too, listed
        right after ``host``; the previous site table comes back on exit, even on error.

        Spliced dictionaries (``interp.sae``) use it so their latents are hook points for every
        tool (capture, ``run_with_hooks``, patching). Nested blocks stack. Holds the model's lock.
        """
        with self._lock:
            before = self._sites
            clash = [s.name for sites in groups.values() for s in sites if s.name in before]
            if clash:
                raise ValueError(f"hook names already exist: {clash[:3]}")
            extended: dict[str, HookSite] = {}
            for name, site in before.items():
                extended[name] = site
                extended.update((s.name, s) for s in groups.get(name, ()))
            self.__dict__["_sites"] = extended
            try:
                yield self
            finally:
                self.__dict__["_sites"] = before

    def saes(self, saes: Any, *, use_error_term: bool | None = None):
        """``with model.saes([sae, ...]):`` splices dictionaries in, SAELens's ``model.saes``.

        The model layer knows no dictionary type: each item splices itself in through its
        ``splice_into(model, items, use_error_term=...)`` (``interp.sae.SAE`` has it), so models
        never import the dictionary layer above them.
        """
        items = list(saes) if isinstance(saes, list | tuple) else [saes]
        if not items or not all(callable(getattr(item, "splice_into", None)) for item in items):
            raise InputError(
                "model.saes takes a dictionary or a list of them (interp.sae.SAE, from S.load or S.train); "
                f"got {type(saes).__name__}"
            )
        return items[0].splice_into(self, items, use_error_term=use_error_term)

    def run_with_saes(
        self, inputs: Any, saes: Any, *, use_error_term: bool | None = None, **kwargs: Any
    ) -> Any:
        """One forward with dictionaries spliced in (SAELens's ``run_with_saes``); ``kwargs`` go to
        ``run_with_hooks`` (``hooks=`` may name latent hooks)."""
        with self.saes(saes, use_error_term=use_error_term):
            return self.run_with_hooks(inputs, **kwargs)

    def run_with_cache_with_saes(
        self,
        inputs: Any,
        saes: Any,
        names: Names = None,
        *,
        use_error_term: bool | None = None,
        **kwargs: Any,
    ) -> Any:
        """``run_with_cache`` with dictionaries spliced in; latents are cached like any hook."""
        with self.saes(saes, use_error_term=use_error_term):
            return self.run_with_cache(inputs, names, **kwargs)

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
            asked = [names] if isinstance(names, str) or callable(names) else list(names or [])
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
        """Plain forward: returns the main output (logits, or the last hidden state).

        It adds no hooks of its own; hooks from ``add_hook`` and an enclosing ``model.hooks(...)`` apply.
        """
        prepared = self.prepare(inputs)
        with self._lock, torch.no_grad():
            return self._forward(prepared)

    def run_with_hooks(
        self, inputs: Any, hooks: Hooks = (), *, bwd_hooks: Hooks = (), grad: bool = False
    ) -> Any:
        """Run with ``fn(activation, hook) -> replacement or None`` on each named hook point.

        Use it for ablation, steering and patching. Hooks are removed afterwards, even on error.
        ``grad=True`` keeps autograd on (for attacks and attribution through hooks).
        ``bwd_hooks``: ``fn(grad, hook) -> replacement or None`` on the gradient of each named
        activation, when you run backward from the returned output (autograd is then on).
        """
        prepared = self.prepare(inputs)
        with (
            self._lock,
            self.hooks(hooks, bwd_hooks=bwd_hooks),
            torch.set_grad_enabled(grad or bool(bwd_hooks)),
        ):
            return self._forward(prepared)

    def _run_library(self, prepared: Any, hooks: Hooks) -> Any:
        """One forward of an already prepared input with the library's own hooks (a sweep's patch
        splices), without autograd. They are attached like ``hooks``' (after the user's, with the
        write-through of ``_write_through``) but are not user hooks: no finite check on what they
        write (values the model itself produced; the sweep checks its metric) and no gating."""
        with self._lock:
            block = self._attach_user(hooks, (), library=True)
            try:
                with torch.no_grad():
                    return self._forward(prepared)
            finally:
                block.remove()

    @contextmanager
    def hooks(self, hooks: Hooks = (), *, bwd_hooks: Hooks = ()):
        """Context manager that keeps hooks attached for several runs; removes them on exit.

        ``hooks`` are ``(names, fn)`` pairs: a name, glob, regex or filter ``lambda name: bool``, and
        ``fn(activation, hook)`` (TransformerLens's hook signature: ``hook.name``, ``hook.layer()``,
        ``hook.ctx``). Every method run inside analyses the hooked model: these hooks apply once to
        each of its forwards and never to its internal probes (see ``_internal``). Hooks should treat
        the rows of a batch independently: batched methods stack prompts and patched copies along
        the batch axis, so a hook that mixes rows (a mean over the batch) would mix those too.
        """
        with self._lock:
            block = self._attach_user(hooks, bwd_hooks)
            self._open.append(block)
            try:
                yield self
            finally:
                block.remove()
                self._open = [other for other in self._open if other is not block]

    def add_hook(
        self, name: Names, hook: HookFn, dir: Literal["fwd", "bwd"] = "fwd", is_permanent: bool = False
    ) -> None:
        """Attach ``hook`` to every hook point ``name`` matches until ``reset_hooks()``, as
        TransformerLens's ``add_hook``: it applies to every later run (plain calls, ``run_with_hooks``,
        ``run_with_cache``, every method) and never to internal probes. ``dir="bwd"`` hooks the gradient
        (``fn(grad, hook)``) of runs with autograd on: plain calls run without it, so backpropagate
        from ``run_with_hooks(inputs, grad=True)``.
        ``is_permanent=True`` survives ``reset_hooks()`` unless ``including_permanent=True``.

        Unlike ``hooks(...)``, a persistent hook stays on the shared module between runs, so other
        threads using this model (explorer sessions) see it too.
        """
        if dir not in ("fwd", "bwd"):
            raise ValueError(f"dir must be 'fwd' or 'bwd', got {dir!r}")
        with self._lock:
            pair = [(name, hook)]
            added = self._attach_user(pair, ()) if dir == "fwd" else self._attach_user((), pair)
            added.permanent = is_permanent
            self._persistent.append(added)

    def reset_hooks(self, clear_contexts: bool = True, including_permanent: bool = False) -> None:
        """Remove the hooks ``add_hook`` attached (permanent ones only with ``including_permanent``);
        ``clear_contexts`` also empties every ``hook.ctx``. As TransformerLens's ``reset_hooks``."""
        with self._lock:
            kept = []
            for entry in self._persistent:
                if entry.permanent and not including_permanent:
                    kept.append(entry)
                    continue
                entry.remove()
            self._persistent = kept
            if clear_contexts:
                self._hook_contexts.clear()

    def _attach_user(self, hooks: Hooks, bwd_hooks: Hooks, library: bool = False) -> _Attached:
        """Attach the caller's forward and backward hooks; every name is resolved before any is attached.

        Each is bound to its name and ``hook.ctx`` and skipped inside internal probes. A forward hook
        on a write-through name also lands its edit at the partner (see ``_write_through``), ahead of
        every other hook there; backward hooks come after this call's forward hooks, so they see the
        gradient of the activation as those leave it. ``library``: the library's own forward hooks
        (see ``_run_library``), called ``fn(act, hook)`` with no finite check and no gating.
        """
        hooks, bwd_hooks = _checked_pairs(hooks, "hooks"), _checked_pairs(bwd_hooks, "bwd_hooks")
        pairs, carries, grads, names = [], [], [], []
        for pattern, fn in hooks:
            for name in self.resolve(pattern):
                names.append(name)
                if library:
                    bound = _bind_library(fn, name, self._hook_ctx(name))
                else:
                    bound = outside_probes(_bind(fn, name, self._hook_ctx(name)))
                partner = self._write_through.get(name)
                if partner is None:
                    pairs.append((self._sites[name], bound))
                else:
                    edit, carry = _written_through(self._sites[name], self._sites[partner], bound)
                    pairs.append(edit)
                    carries.append(carry)
        for pattern, fn in bwd_hooks:
            for name in self.resolve(pattern):
                names.append(name)
                grads.append((self._sites[name], _bind(fn, name, self._hook_ctx(name))))
        handles: list[torch.utils.hooks.RemovableHandle] = []
        try:
            handles += [attach(site, fn, prepend=True) for site, fn in carries]
            handles += [attach(site, fn) for site, fn in pairs]
            handles += [attach_grad(site, fn, user=True) for site, fn in grads]
        except BaseException:
            for handle in handles:
                handle.remove()
            raise
        return _Attached(handles, names)

    @property
    def _user_hooked(self) -> set[str]:
        """Hook names that carry a user hook right now (open ``hooks`` blocks and ``add_hook``)."""
        return {name for block in (*self._open, *self._persistent) for name in block.names}

    def _hook_ctx(self, name: str) -> dict[str, Any]:
        """The ``hook.ctx`` dict of the hook point ``name`` sits on (aliases share it)."""
        site = self._sites[name]
        return self._hook_contexts.setdefault((id(site.module), site.side), {})

    @cached_property
    def _hook_contexts(self) -> dict[tuple[int, str], dict[str, Any]]:
        return {}

    @contextmanager
    def _internal(self):
        """The library's own probe forwards and module calls go inside this block: readouts of weights,
        traces of the hook points, checks of tiling plans. No user hook (from ``hooks``,
        ``run_with_hooks``, ``run_with_cache(hooks=)`` or ``add_hook``) runs in it, so a method run
        inside the user's hooks analyses the hooked model exactly once; hooks made inside it run.
        Holds the model (its lock), so another thread's run cannot interleave.
        """
        with self._lock, internal_probe():
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
        library: bool = False,
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

        ``library=True``: ``hooks`` are the library's own (a sweep's splices), run as
        ``_run_library`` runs them (no autograd, no finite check of their writes).
        """
        prepared = self.prepare(inputs)
        run = self._run_library if library else self.run_with_hooks
        if suffix is not None:
            route, s = suffix
            plan = None if shared_until is None else self._verified_plan(prepared, shared_until, route)
            with self._lock, route.active(s) as tail:  # the route changes the shared module
                if plan is not None:
                    with self._tiled(plan, copies):
                        return run(tail, hooks)
                return run(self.tile_input(tail, copies), hooks)
        if shared_until is not None:
            plan = self._verified_plan(prepared, shared_until)
            if plan is not None:
                try:
                    with self._tiled(plan, copies):
                        return run(prepared, hooks)
                except (RuntimeError, ValueError, IndexError):
                    self._prefix_checks[self._plan_key(prepared, plan) + (False,)] = False
        return run(self.tile_input(prepared, copies), hooks)

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
        positions: the unembedding, when a metric reads one position per prompt. Not while a user
        hook sits at or after ``name`` (it must see every position): check ``can_keep_positions``.
        """
        if not self.can_keep_positions(name):
            raise RuntimeError(f"a user hook sits at or after {name!r}; forwards must keep every position")
        with self._lock, attached([(self._sites[name], keep_positions(index))], batch_may_change=True):
            yield self

    def can_keep_positions(self, name: str) -> bool:
        """Whether ``keeping_positions(name, ...)`` applies: no user hook at or after hook ``name``."""
        order = {hook: i for i, hook in enumerate(self.hook_names)}
        return all(order[hook] < order[name] for hook in self._user_hooked)

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
            with self._internal():  # a probe: the user's hooks must not run on it
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
            hooks: replacement hooks to apply during the same run (see ``run_with_hooks``); the cache
                holds what each hook point carries after them.
            memory_budget: bytes the capture may take; the run is refused beforehand if the
                estimate exceeds it (default: ``interp.hooks.default_memory_budget()``).
            device: move captured tensors here (e.g. ``"cpu"``) as they are produced.

        Returns:
            ``(output, cache)``.
        """
        if stop_early and grad_of is not None:
            raise ValueError("grad_of needs the full forward (the metric reads the output); drop stop_early")
        if device is not None:
            check_device(device)  # before the forward: a missing GPU is named, not an AssertionError
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
            {n: store[n] for n in chosen if n in store}, grads, self._cache_meta(prepared), model=self
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


def _checked_pairs(hooks: Hooks, what: str) -> list[tuple[Names, HookFn]]:
    """``hooks`` as a list of ``(names, fn)`` pairs, or an InputError saying what is wrong and how to fix it."""
    if isinstance(hooks, tuple) and len(hooks) == 2 and callable(hooks[1]):
        raise InputError(
            f"{what} takes a list of (names, fn) pairs: wrap the one pair in a list, [(names, fn)]"
        )
    out = []
    for item in hooks:
        if not (isinstance(item, tuple | list) and len(item) == 2 and callable(item[1])):
            raise InputError(
                f"{what} must be a list of (names, fn) pairs, e.g. [('blocks.0.hook_resid_pre', fn)] with "
                f"fn(activation, hook); got the item {item!r:.80}"
            )
        out.append((item[0], item[1]))
    return out


def _bind(
    fn: HookFn, name: str, ctx: dict[str, Any] | None = None
) -> Callable[[torch.Tensor], torch.Tensor | None]:
    """``fn(act, hook)`` as a one-argument hook body; ``hook`` goes by keyword where ``fn`` has a
    ``hook`` parameter (TransformerLens calls ``fn(act, hook=...)``, so ``partial(fn, head=3)`` works)."""
    context = HookContext(name=name, ctx={} if ctx is None else ctx)
    keyword = _takes_hook_keyword(fn)

    def bound(act: torch.Tensor) -> torch.Tensor | None:
        new = fn(act, hook=context) if keyword else fn(act, context)
        checked_hook_value(name, act, new)  # no NaN/inf left by a user's hook (interp.checks)
        return new

    return bound


def _bind_library(
    fn: HookFn, name: str, ctx: dict[str, Any]
) -> Callable[[torch.Tensor], torch.Tensor | None]:
    """A library hook ``fn(act, hook)`` as a one-argument hook body (see ``_run_library``)."""
    context = HookContext(name=name, ctx=ctx)
    return lambda act: fn(act, context)


_KEYWORD_BY_CODE: dict[Any, bool] = {}  # plain functions: the answer depends only on their code


def _takes_hook_keyword(fn: Callable) -> bool:
    """Whether ``fn`` has a ``hook`` parameter after the activation (``inspect.signature`` once per
    function code: a sweep binds a fresh closure per forward)."""
    code = getattr(fn, "__code__", None) if inspect.isfunction(fn) else None
    plain = code is not None and not hasattr(fn, "__wrapped__") and not hasattr(fn, "__signature__")
    if plain and code in _KEYWORD_BY_CODE:
        return _KEYWORD_BY_CODE[code]
    answer = _signature_has_hook(fn)
    if plain:
        _KEYWORD_BY_CODE[code] = answer
    return answer


def _signature_has_hook(fn: Callable) -> bool:
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return any(p.name == "hook" and p.kind in kinds for p in params[1:])
