"""Hook points, name matching, activation caches and capture-size estimates.

The single mechanism under every model kind: a *hook site* is a torch module plus which side of it
carries the activation (its input or its output). Reading or replacing an activation is a torch
forward (pre-)hook on that module, registered for one run and always removed afterwards.
"""

from __future__ import annotations

import fnmatch
import inspect
import os
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from einops import rearrange
from torch import nn

from interp.cache import CacheHelpers
from interp.errors import CaptureTooLargeError, InputError, UnknownHookError, closest

NameFilter = Callable[[str], bool]  # TransformerLens's names_filter: ``lambda name: name.endswith("hook_z")``
Names = str | re.Pattern | NameFilter | Sequence[str | re.Pattern | NameFilter] | None
HookFn = Callable[[torch.Tensor, "HookContext"], torch.Tensor | None]
Dim = int | str


class HookPoint(nn.Identity):
    """An identity module that marks an activation computed inside a function (not a module output).

    Our attention function routes q, k, v, scores, pattern and z through these so they can be read
    and replaced with the same forward hooks as every module boundary.
    """


@dataclass(frozen=True)
class HookSite:
    """Where one named activation lives: ``module``'s input or output (first tensor of a tuple)."""

    name: str
    module: nn.Module
    side: Literal["input", "output"] = "output"
    shape: tuple[Dim, ...] | None = None  # symbolic: "batch", "pos" or a fixed size


class LayerIndex(int):
    """``hook.layer``: call it, ``hook.layer()``, as TransformerLens code does; older interp code that
    used it as a plain int (``hook.layer == 3``) keeps working."""

    def __call__(self) -> int:
        return int(self)


class NoLayer:
    """``hook.layer`` of a hook outside the blocks (``hook_embed``): calling it raises, as in
    TransformerLens; it compares equal to None and is falsy, as the old ``layer=None`` attribute was."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self) -> int:
        raise ValueError(
            f"hook {self.name!r} is not inside a block (blocks.N....), so hook.layer() has no value; "
            "check hook.name instead"
        )

    def __eq__(self, other: object) -> bool:
        return other is None or isinstance(other, NoLayer)

    def __hash__(self) -> int:
        return hash(None)

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return "None"


@dataclass
class HookContext:
    """Passed to every hook function as its second argument, like TransformerLens's ``hook``.

    ``name`` is the hook name it fired for, ``layer()`` the block index in it, and ``ctx`` a dict that
    persists across runs on that hook point (shared by its aliases) until ``model.reset_hooks()``:
    somewhere to keep state between calls, as on TransformerLens's ``HookPoint.ctx``.
    """

    name: str
    ctx: dict[str, Any] = field(default_factory=dict)

    @property
    def layer(self) -> LayerIndex | NoLayer:
        index = layer_of(self.name)
        return NoLayer(self.name) if index is None else LayerIndex(index)


def layer_of(name: str) -> int | None:
    """The block index in a TransformerLens-style name (``blocks.3.attn.hook_z`` -> 3), else None."""
    match = re.search(r"(?:^|\.)(?:blocks|layers|layer|h)\.(\d+)(?:\.|$)", name)
    return int(match.group(1)) if match else None


_LAYER_TYPE_ALIASES = {"a": "attn", "m": "mlp", "b": "", "block": "", "blocks": "", "attention": "attn"}
_ACT_ALIASES = {
    "attn": "pattern",
    "attn_logits": "attn_scores",
    "key": "k",
    "query": "q",
    "value": "v",
    "mlp_pre": "pre",
    "mlp_mid": "mid",
    "mlp_post": "post",
}
_ATTN_ACTS = ("k", "v", "q", "z", "rot_k", "rot_q", "result", "pattern", "attn_scores")
_MLP_ACTS = ("pre", "post", "mid", "pre_linear")


def get_act_name(name: str, layer: int | str | None = None, layer_type: str | None = None) -> str:
    """A full hook name from TransformerLens shorthand, as ``transformer_lens.utils.get_act_name``.

    ``get_act_name("resid_post", 3)`` -> ``"blocks.3.hook_resid_post"``, ``("pattern", 0)`` ->
    ``"blocks.0.attn.hook_pattern"``, ``("k6")`` -> ``"blocks.6.attn.hook_k"``, ``("scale4ln1")`` ->
    ``"blocks.4.ln1.hook_scale"``, ``("embed")`` -> ``"hook_embed"``; a full name comes back unchanged.
    Same rules and aliases as TransformerLens (``attn`` is the pattern, ``a``/``m`` layer types...).
    """
    if ("." in name or name.startswith("hook_")) and layer is None and layer_type is None:
        return name
    match = re.match(r"([a-z]+)(\d+)([a-z]?.*)", name)
    if match is not None:
        name, layer, layer_type = match.groups(0)
    name = _ACT_ALIASES.get(name, name)
    full = f"blocks.{layer}." if layer is not None else ""
    if name in _ATTN_ACTS:
        layer_type = "attn"
    elif name in _MLP_ACTS:
        layer_type = "mlp"
    elif layer_type in _LAYER_TYPE_ALIASES:
        layer_type = _LAYER_TYPE_ALIASES[layer_type]
    full += f"{layer_type}." if layer_type else ""
    full += f"hook_{name}"
    if name in ("scale", "normalized") and layer is None:
        full = f"ln_final.{full}"
    return full


# ----------------------------------------------------------------------------------------------
# Name matching
# ----------------------------------------------------------------------------------------------


def _is_glob(pattern: str) -> bool:
    return any(ch in pattern for ch in "*?[")


def match_names(patterns: Names, valid: Sequence[str]) -> list[str]:
    """Resolve exact names, globs (``blocks.*.hook_resid_post``), regexes (``re.compile`` or
    ``"re:..."`` strings) and name filters (``lambda name: name.endswith("hook_z")``, as
    TransformerLens's ``names_filter``) to valid hook names, in model order.

    Every pattern must match at least one name; otherwise ``UnknownHookError`` lists the closest
    valid names, so a typo never silently captures nothing.
    """
    if patterns is None:
        return list(valid)
    if isinstance(patterns, str | re.Pattern) or callable(patterns):
        patterns = [patterns]
    chosen: set[str] = set()
    for pattern in patterns:
        hits = _match_filter(pattern, valid) if callable(pattern) else _match_one(pattern, valid)
        if not hits:
            raise UnknownHookError(_unknown_message(pattern, valid))
        chosen.update(hits)
    return [name for name in valid if name in chosen]


def _match_filter(keep: NameFilter, valid: Sequence[str]) -> list[str]:
    """The names a filter function keeps; a filter that raises is reported with the name it raised on."""
    hits = []
    for name in valid:
        try:
            if keep(name):
                hits.append(name)
        except Exception as err:
            raise InputError(
                f"the hook name filter {_filter_label(keep)} raised {type(err).__name__}: {err} on the hook "
                f"name {name!r}. A filter is called with every hook name (a str) and returns True to keep it; "
                "make it handle every name (see model.hook_names)."
            ) from err
    return hits


def _filter_label(keep: NameFilter) -> str:
    try:
        where = f" ({inspect.getsourcefile(keep)}:{inspect.getsourcelines(keep)[1]})"
    except (TypeError, OSError):
        where = ""
    return f"{getattr(keep, '__qualname__', type(keep).__name__)}{where}"


def _match_one(pattern: str | re.Pattern, valid: Sequence[str]) -> list[str]:
    if isinstance(pattern, re.Pattern):
        return [n for n in valid if pattern.fullmatch(n)]
    if not isinstance(pattern, str):
        raise UnknownHookError(
            f"hook names must be strings or compiled regexes, got {type(pattern).__name__} {pattern!r}"
        )
    if pattern.startswith("re:"):
        try:
            regex = re.compile(pattern[3:])
        except re.error as err:
            raise UnknownHookError(
                f"{pattern!r} is not a valid regular expression ({err}). Fix the regex, or drop the "
                "'re:' prefix to match a glob such as 'blocks.*.hook_resid_post'."
            ) from None
        return [n for n in valid if regex.fullmatch(n)]
    if _is_glob(pattern):
        return [n for n in valid if fnmatch.fnmatchcase(n, pattern)]
    return [pattern] if pattern in valid else []


def _unknown_message(pattern: str | re.Pattern | NameFilter, valid: Sequence[str]) -> str:
    if callable(pattern):
        return (
            f"The hook name filter {_filter_label(pattern)} keeps no hook point. "
            f"List every name with `model.hook_names` (this model has {len(valid)})."
        )
    text = pattern.pattern if isinstance(pattern, re.Pattern) else pattern
    probe = text[3:] if text.startswith("re:") else text
    suggestions = closest(probe.replace("*", "0"), valid)
    hint = f" Did you mean: {', '.join(suggestions)}?" if suggestions else ""
    return (
        f"No hook point matches {text!r}.{hint} "
        f"List every name with `model.hook_names` (this model has {len(valid)})."
    )


# ----------------------------------------------------------------------------------------------
# Reading and writing the activation a site carries
# ----------------------------------------------------------------------------------------------


def _first_tensor(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, tuple | list) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    if hasattr(value, "last_hidden_state"):
        return value.last_hidden_state
    raise TypeError(f"cannot find the activation tensor in a {type(value).__name__}")


def _replace_first(value: Any, new: torch.Tensor) -> Any:
    if isinstance(value, torch.Tensor):
        return new
    if isinstance(value, tuple):
        return (new, *value[1:])
    if isinstance(value, list):
        return [new, *value[1:]]
    raise TypeError(f"cannot replace the activation inside a {type(value).__name__}")


def _check_replacement(
    site: HookSite, old: torch.Tensor, new: Any, batch_may_change: bool = False
) -> torch.Tensor:
    if not isinstance(new, torch.Tensor):
        raise TypeError(f"hook on {site.name!r} returned {type(new).__name__}; return a tensor or None")
    if batch_may_change and new.ndim == old.ndim and new.shape[2:] == old.shape[2:]:
        return new  # the library's own reshaping ops: stacked/unstacked copies, kept positions
    if new.shape != old.shape:
        raise ValueError(
            f"hook on {site.name!r} returned shape {tuple(new.shape)} but the activation has shape "
            f"{tuple(old.shape)}; a replacement must keep the shape"
        )
    return new


def attach(
    site: HookSite,
    fn: Callable[[torch.Tensor], torch.Tensor | None],
    *,
    batch_may_change: bool = False,
    prepend: bool = False,
) -> torch.utils.hooks.RemovableHandle:
    """Register ``fn(activation) -> replacement | None`` on ``site``; returns the removable handle.

    A replacement must keep the activation's shape; ``batch_may_change`` also lets it stack or drop
    copies along the batch axis (see ``tile_batch``) or keep fewer positions (``keep_positions``).
    ``prepend`` runs it before the hooks already on the site's module.
    """

    def checked(act: torch.Tensor, new: Any) -> torch.Tensor:
        return _check_replacement(site, act, new, batch_may_change)

    if site.side == "output":

        def forward_hook(module: nn.Module, args: Any, output: Any) -> Any:
            act = _first_tensor(output)
            new = fn(act)
            return None if new is None else _replace_first(output, checked(act, new))

        return site.module.register_forward_hook(forward_hook, prepend=prepend)

    def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> Any:
        if args:
            act = _first_tensor(args)
            new = fn(act)
            return None if new is None else ((checked(act, new), *args[1:]), kwargs)
        key = "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))
        new = fn(kwargs[key])
        if new is None:
            return None
        return args, {**kwargs, key: checked(kwargs[key], new)}

    return site.module.register_forward_pre_hook(pre_hook, with_kwargs=True, prepend=prepend)


def attach_grad(
    site: HookSite, fn: Callable[[torch.Tensor], torch.Tensor | None], *, user: bool = False
) -> torch.utils.hooks.RemovableHandle:
    """Call ``fn(grad) -> replacement | None`` with the gradient of the activation ``site`` carries.

    TransformerLens's backward hooks: ``grad`` is d(what backward is run on) / d(activation), summed
    over every use of it; a returned tensor replaces it and flows on to everything computed before.
    Registered on the activation of each forward run while this is attached (one that needs
    gradients); it fires when backward runs through that forward, also after the hook is removed.
    ``run_with_cache(grad_of=...)`` reports the gradient at this hook point as it arrives (before
    the replacement) and, at earlier hook points, what the replacement leads to. A ``user`` hook
    is not registered by forwards inside internal probes (``outside_probes``), wherever their
    backward later runs (on GPU, autograd runs hooks on its own threads).
    """

    def on_grad(grad: torch.Tensor) -> torch.Tensor | None:
        new = fn(grad)
        if new is None:
            return None
        if not isinstance(new, torch.Tensor) or new.shape != grad.shape:
            got = tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
            raise ValueError(
                f"backward hook on {site.name!r} returned {got} but the gradient has shape "
                f"{tuple(grad.shape)}; return a tensor of the same shape or None"
            )
        return new

    def register(act: torch.Tensor) -> None:
        if act.requires_grad:
            act.register_hook(on_grad)

    return attach(site, outside_probes(register) if user else register)


@contextmanager
def attached(
    pairs: Iterable[tuple[HookSite, Callable[[torch.Tensor], torch.Tensor | None]]],
    *,
    batch_may_change: bool = False,
) -> Iterator[None]:
    """Attach hooks for the duration of a ``with`` block; removed even when the run raises."""
    handles = []
    try:
        for site, fn in pairs:
            handles.append(attach(site, fn, batch_may_change=batch_may_change))
        yield
    finally:
        for handle in handles:
            handle.remove()


# ----------------------------------------------------------------------------------------------
# Internal probes: the library's own forwards, which user hooks must not see
# ----------------------------------------------------------------------------------------------

_PROBES = threading.local()


def probe_depth() -> int:
    """How many internal probes this thread is inside (0 = running the model the user analyses)."""
    return getattr(_PROBES, "depth", 0)


@contextmanager
def internal_probe() -> Iterator[None]:
    """Forwards and module calls in this block (in this thread) are the library's own probes
    (readouts, traces, plan checks): hooks gated by ``outside_probes`` made outside it do not run."""
    _PROBES.depth = probe_depth() + 1
    try:
        yield
    finally:
        _PROBES.depth -= 1


def outside_probes(fn: Callable[[torch.Tensor], Any]) -> Callable[[torch.Tensor], Any]:
    """``fn``, skipped (returning None) inside internal probes entered after it was made.

    Every hook given through ``HookedModel.hooks`` is wrapped so: the user's hooks run on every
    forward of the model they analyse, exactly once, and never on a method's internal probe; a
    probe's own hooks, made inside it, still run there.
    """
    depth = probe_depth()

    def gated(act: torch.Tensor) -> Any:
        return None if probe_depth() > depth else fn(act)

    return gated


def tile_batch(copies: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """A hook body that stacks ``copies`` copies of the batch: row ``k * batch + b`` is row ``b``."""
    return lambda act: act.repeat(copies, *([1] * (act.ndim - 1)))


def untile_batch(copies: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The inverse of ``tile_batch`` where all copies are still equal: keep the first copy."""
    return lambda act: act[: act.shape[0] // copies]


def keep_positions(index: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """A hook body that keeps one position per row of a ``[rows, pos, ...]`` activation: row
    ``k * batch + b`` keeps position ``index[b]`` (stacked copies share their prompt's position)."""

    def keep(act: torch.Tensor) -> torch.Tensor:
        positions = index.to(act.device).repeat(act.shape[0] // len(index))
        return act[torch.arange(act.shape[0], device=act.device), positions].unsqueeze(1)

    return keep


class StopForward(Exception):
    """Raised inside a hook once every requested activation is captured, to skip later layers."""


# ----------------------------------------------------------------------------------------------
# ActivationCache
# ----------------------------------------------------------------------------------------------


@dataclass
class ActivationCache(CacheHelpers, Mapping[str, torch.Tensor]):
    """Captured activations by hook name, plus gradients of a metric when asked for.

    Index by full name, or TransformerLens-style (``utils.get_act_name``): ``cache["resid_post", 3]``
    is ``cache["blocks.3.hook_resid_post"]``, ``cache["resid_post", -1]`` the last layer's,
    ``cache["pattern", 0, "attn"]`` is ``cache["blocks.0.attn.hook_pattern"]`` and ``cache["k6"]``
    is ``cache["blocks.6.attn.hook_k"]``. ``model`` (set by ``run_with_cache``) is what the
    TL helpers (``accumulated_resid``, ``stack_head_results``, ``logit_attrs``...; see
    ``interp.cache``) read weights and norms from.
    """

    activations: dict[str, torch.Tensor]
    grads: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    model: Any = field(default=None, repr=False, compare=False)
    has_batch_dim: bool = True

    def __getitem__(self, key: str | tuple) -> torch.Tensor:
        return self.activations[self._resolve(key)]

    def __iter__(self) -> Iterator[str]:
        return iter(self.activations)

    def __len__(self) -> int:
        return len(self.activations)

    def stack(self, pattern: str) -> torch.Tensor:
        """Stack the cached activations matching a glob along a new leading ``layer`` axis."""
        names = match_names(pattern, list(self.activations))
        return torch.stack([self.activations[n] for n in names])

    @property
    def nbytes(self) -> int:
        tensors = [*self.activations.values(), *self.grads.values()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def to(self, device: str | torch.device) -> ActivationCache:
        move = {k: v.to(device) for k, v in self.activations.items()}
        grads = {k: v.to(device) for k, v in self.grads.items()}
        return ActivationCache(move, grads, dict(self.meta), self.model, self.has_batch_dim)

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}: {tuple(v.shape)}" for k, v in list(self.activations.items())[:6])
        more = f", ... ({len(self) - 6} more)" if len(self) > 6 else ""
        grads = f", grads for {len(self.grads)}" if self.grads else ""
        return f"ActivationCache({shown}{more}{grads}; {self.nbytes / 2**20:.1f} MiB)"


# ----------------------------------------------------------------------------------------------
# Memory budget
# ----------------------------------------------------------------------------------------------


def _parse_bytes(text: str) -> int:
    match = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?i?B?)\s*", text, flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"cannot read {text!r} as a size; write e.g. '4GB' or '512MiB'")
    number, unit = float(match.group(1)), match.group(2).upper().rstrip("B").rstrip("I")
    return int(number * 1024 ** "KMGT".find(unit) * 1024) if unit else int(number)


def default_memory_budget() -> int:
    """Bytes a single in-memory capture may take: ``$INTERP_MEMORY_BUDGET``, else half of RAM (max 8 GiB)."""
    if env := os.environ.get("INTERP_MEMORY_BUDGET"):
        return _parse_bytes(env)
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        total = 16 * 2**30
    return min(8 * 2**30, total // 2)


def concrete_numel(shape: Sequence[Dim], sizes: Mapping[str, int]) -> int:
    numel = 1
    for dim in shape:
        numel *= sizes[dim] if isinstance(dim, str) else dim
    return numel


def format_bytes(n: int | float) -> str:
    """``n`` bytes in the largest binary unit that keeps it >= 1 (``"3.0 MiB"``, ``"512 bytes"``),
    so small budgets and estimates do not all read as ``0.00 GiB``."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} bytes"


def check_budget(
    sites: Sequence[HookSite], sizes: Mapping[str, int], itemsize: int, budget: int | None, with_grads: bool
) -> int:
    """Estimate the bytes a capture will hold and refuse it up front if that exceeds ``budget``."""
    budget = default_memory_budget() if budget is None else budget
    per_site = {s.name: concrete_numel(s.shape, sizes) * itemsize for s in sites if s.shape is not None}
    estimate = sum(per_site.values()) * (2 if with_grads else 1)
    if estimate > budget:
        biggest = sorted(per_site, key=per_site.get, reverse=True)[:3]
        raise CaptureTooLargeError(
            f"This capture would hold about {format_bytes(estimate)} of activations "
            f"({len(per_site)} hook points{' plus their gradients' if with_grads else ''}; "
            f"largest: {', '.join(biggest)}) but the memory budget is {format_bytes(budget)}. "
            "Ways out: capture fewer names (e.g. names='blocks.*.hook_resid_post'), run smaller batches, "
            "or stream to disk with interp.capture_to_disk(...) / `interp capture`. "
            "Raise the budget with memory_budget=... or $INTERP_MEMORY_BUDGET if you have the RAM."
        )
    return estimate


def heads_last(t: torch.Tensor) -> torch.Tensor:
    """[batch, head, pos, d_head] -> [batch, pos, head, d_head] (TransformerLens layout)."""
    return rearrange(t, "batch head pos d -> batch pos head d")


def heads_first(t: torch.Tensor) -> torch.Tensor:
    """[batch, pos, head, d_head] -> [batch, head, pos, d_head] (HF attention layout)."""
    return rearrange(t, "batch pos head d -> batch head pos d")
