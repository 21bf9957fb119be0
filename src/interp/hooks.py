"""Hook points, name matching, activation caches and capture-size estimates.

The single mechanism under every model kind: a *hook site* is a torch module plus which side of it
carries the activation (its input or its output). Reading or replacing an activation is a torch
forward (pre-)hook on that module, registered for one run and always removed afterwards.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from einops import rearrange
from torch import nn

from interp.cache import CacheHelpers
from interp.errors import CaptureTooLargeError, UnknownHookError, closest

Names = str | re.Pattern | Sequence[str | re.Pattern] | None
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


@dataclass
class HookContext:
    """Passed to every hook function, like TransformerLens's ``hook`` argument."""

    name: str
    layer: int | None = None


def layer_of(name: str) -> int | None:
    """The block index in a TransformerLens-style name (``blocks.3.attn.hook_z`` -> 3), else None."""
    match = re.search(r"(?:^|\.)(?:blocks|layers|layer|h)\.(\d+)(?:\.|$)", name)
    return int(match.group(1)) if match else None


# ----------------------------------------------------------------------------------------------
# Name matching
# ----------------------------------------------------------------------------------------------


def _is_glob(pattern: str) -> bool:
    return any(ch in pattern for ch in "*?[")


def match_names(patterns: Names, valid: Sequence[str]) -> list[str]:
    """Resolve exact names, globs (``blocks.*.hook_resid_post``) and regexes (``re.compile`` or
    ``"re:..."`` strings) to valid hook names, in model order.

    Every pattern must match at least one name; otherwise ``UnknownHookError`` lists the closest
    valid names, so a typo never silently captures nothing.
    """
    if patterns is None:
        return list(valid)
    if isinstance(patterns, str | re.Pattern):
        patterns = [patterns]
    chosen: set[str] = set()
    for pattern in patterns:
        hits = _match_one(pattern, valid)
        if not hits:
            raise UnknownHookError(_unknown_message(pattern, valid))
        chosen.update(hits)
    return [name for name in valid if name in chosen]


def _match_one(pattern: str | re.Pattern, valid: Sequence[str]) -> list[str]:
    if isinstance(pattern, re.Pattern):
        return [n for n in valid if pattern.fullmatch(n)]
    if not isinstance(pattern, str):
        raise TypeError(f"hook names must be strings or compiled regexes, got {type(pattern).__name__}")
    if pattern.startswith("re:"):
        regex = re.compile(pattern[3:])
        return [n for n in valid if regex.fullmatch(n)]
    if _is_glob(pattern):
        return [n for n in valid if fnmatch.fnmatchcase(n, pattern)]
    return [pattern] if pattern in valid else []


def _unknown_message(pattern: str | re.Pattern, valid: Sequence[str]) -> str:
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
    site: HookSite, fn: Callable[[torch.Tensor], torch.Tensor | None], *, batch_may_change: bool = False
) -> torch.utils.hooks.RemovableHandle:
    """Register ``fn(activation) -> replacement | None`` on ``site``; returns the removable handle.

    A replacement must keep the activation's shape; ``batch_may_change`` also lets it stack or drop
    copies along the batch axis (see ``tile_batch``) or keep fewer positions (``keep_positions``).
    """

    def checked(act: torch.Tensor, new: Any) -> torch.Tensor:
        return _check_replacement(site, act, new, batch_may_change)

    if site.side == "output":

        def forward_hook(module: nn.Module, args: Any, output: Any) -> Any:
            act = _first_tensor(output)
            new = fn(act)
            return None if new is None else _replace_first(output, checked(act, new))

        return site.module.register_forward_hook(forward_hook)

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

    return site.module.register_forward_pre_hook(pre_hook, with_kwargs=True)


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
            f"This capture would hold about {estimate / 2**30:.2f} GiB of activations "
            f"({len(per_site)} hook points{' plus their gradients' if with_grads else ''}; "
            f"largest: {', '.join(biggest)}) but the memory budget is {budget / 2**30:.2f} GiB. "
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
