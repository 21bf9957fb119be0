"""Splicing dictionaries into a model, with their latents as ordinary hook points.

    >>> with model.saes([sae]):                       # or S.splice(model, [sae])
    ...     out, cache = model.run_with_cache(text, names="blocks.0.hook_resid_post.hook_sae_acts_post")
    >>> model.run_with_saes(text, [sae], hooks=[("blocks.0.hook_resid_post.hook_sae_acts_post", fn)])

While spliced, the activation at ``cfg.hook_name`` is replaced by the SAE's output (its
reconstruction; with ``use_error_term=True`` plus the error, so the model computes exactly what it
did without the SAE). A transcoder reads ``hook_name`` and replaces ``hook_name_out``. Each SAE's
``HookPoint`` modules join the model's site table under SAELens's names
(``<hook_name>.hook_sae_input``, ``.hook_sae_acts_pre``, ``.hook_sae_acts_post``,
``.hook_sae_recons``, ``.hook_sae_error``, ``.hook_sae_output``), listed right after the hook they
replace, so capture, ``run_with_hooks``, the patching engine and every other tool take them by name.

The activation at the host hook itself is, inside the block, what the SAE output (user hooks on
``hook_name`` see the spliced value). The splice is part of the model, not a user hook: it also
runs in the library's internal probes (plan checks, traces), which must see the model being
analysed; user hooks on the SAE's hook points are user hooks like any other. A forward that never
reaches a spliced hook is refused.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch

from interp.errors import InputError, UnknownHookError, closest
from interp.hooks import HookContext, HookSite, attach, probe_depth
from interp.sae.modules import HOOK_POINTS, SAE

_LATENT_POINTS = ("hook_sae_acts_pre", "hook_sae_acts_post")


def latent_hook(sae: SAE, point: str = "hook_sae_acts_post") -> str:
    """The hook name of one of ``sae``'s hook points while spliced (``<hook_name>.<point>``)."""
    if point not in HOOK_POINTS:
        raise InputError(f"{point!r} is not an SAE hook point; use one of {', '.join(HOOK_POINTS)}")
    return f"{sae.cfg.hook_name}.{point}"


def _as_list(saes: SAE | Sequence[SAE]) -> list[SAE]:
    items = [saes] if isinstance(saes, SAE) else list(saes)
    bad = [type(s).__name__ for s in items if not isinstance(s, SAE)]
    if bad or not items:
        raise InputError(
            f"splice takes an SAE or a list of SAEs (interp.sae.load / S.SAE), got {bad or 'an empty list'}"
        )
    return items


def _host(model: Any, name: str, role: str, sae: SAE) -> HookSite:
    sites = model._sites
    if not name:
        raise InputError(f"this SAE's cfg has no {role}; set sae.cfg.{role} to the hook it was trained on")
    if name not in sites:
        near = closest(name, list(sites), n=3)
        hint = f" Did you mean: {', '.join(near)}?" if near else ""
        raise UnknownHookError(
            f"the SAE's cfg {role} {name!r} is not a hook point of {model.name}.{hint} "
            f"Set sae.cfg.{role} to one of model.hook_names."
        )
    return sites[name]


def _width(site: HookSite, sae: SAE | None = None) -> int | None:
    """The width the dictionary sees at ``site``: the last axis (heads x d_head for hook_z SAEs)."""
    shape = site.shape
    if not shape or not isinstance(shape[-1], int):
        return None
    hook_z = sae is not None and sae.cfg.reshape_activations == "hook_z"
    if hook_z and len(shape) >= 4 and isinstance(shape[-2], int):
        return shape[-1] * shape[-2]
    return shape[-1]


def check_fits(model: Any, sae: SAE) -> None:
    """Refuse an SAE whose hooks the model lacks or whose widths differ from the hooks' (names both)."""
    c = sae.cfg
    pairs = [("hook_name", c.hook_name, c.d_in, "d_in")]
    if c.is_transcoder:
        pairs.append(("hook_name_out", c.hook_name_out, c.width_out, "d_out"))
    for role, name, width, what in pairs:
        site = _host(model, name, role, sae)
        have = _width(site, sae)
        if have is not None and have != width:
            raise InputError(
                f"the SAE has {what}={width} but {name} of {model.name} has width {have}; "
                "use a dictionary trained on this hook (or this model)"
            )


def _sites_of(model: Any, sae: SAE) -> dict[str, list[HookSite]]:
    """The SAE's hook points as sites, keyed by the host hook they are listed after."""
    c = sae.cfg
    host = model._sites[c.hook_out]
    flat = c.reshape_activations == "hook_z" and host.shape is not None and len(host.shape) >= 4
    base = (host.shape[:-2] if flat else host.shape[:-1]) if host.shape else None
    shapes = {
        "hook_sae_input": (*base, c.d_in) if base is not None else None,
        "hook_sae_acts_pre": (*base, c.d_sae) if base is not None else None,
        "hook_sae_acts_post": (*base, c.d_sae) if base is not None else None,
    }
    out_shape = host.shape if flat else ((*base, c.width_out) if base is not None else None)
    sites = [
        HookSite(latent_hook(sae, p), getattr(sae, p), "output", shapes.get(p, out_shape))
        for p in HOOK_POINTS
    ]
    return {c.hook_out: sites}


def _cast(x: torch.Tensor, sae: SAE) -> torch.Tensor:
    return x.to(device=sae.device, dtype=sae.dtype)


@contextmanager
def splice(model: Any, saes: SAE | Sequence[SAE], *, use_error_term: bool | None = None) -> Iterator[Any]:
    """Splice ``saes`` into ``model`` for the ``with`` block (SAELens's ``model.saes(...)``).

    Args:
        model: any ``HookedModel``.
        saes: one SAE or several, at distinct hooks.
        use_error_term: override each SAE's ``use_error_term`` inside the block (None: keep theirs).

    Raises:
        UnknownHookError: a cfg hook the model does not have (with the closest names).
        InputError: a width mismatch, two SAEs at one hook, or (at the end of a forward) a spliced
            hook that forward never reached.
    """
    items = _as_list(saes)
    for sae in items:
        check_fits(model, sae)
    already = [latent_hook(s) for s in items if latent_hook(s) in model._sites]
    if already:
        raise InputError(
            f"an SAE is already spliced under {already[0].rsplit('.', 1)[0]}; splice one dictionary per hook "
            "(leave the outer `with model.saes(...)` first)"
        )
    outs = [s.cfg.hook_out for s in items]
    taken = {h for h in outs if outs.count(h) > 1}
    if taken:
        raise InputError(f"two SAEs write {sorted(taken)[0]}; splice one dictionary per hook")
    groups: dict[str, list[HookSite]] = {}
    for sae in items:
        for host, sites in _sites_of(model, sae).items():
            groups.setdefault(host, []).extend(sites)
    fired: dict[int, bool] = {}
    hooks = []
    for i, sae in enumerate(items):
        hooks.extend(_splice_hooks(sae, i, fired))
    saved = [s.use_error_term for s in items]
    with ExitStack() as stack:
        if use_error_term is not None:
            for sae in items:
                sae.use_error_term = use_error_term
            stack.callback(_restore, items, saved)
        stack.enter_context(model.extra_sites(groups))
        stack.enter_context(_attached_to_model(model, hooks))
        stack.enter_context(_reach_check(model, items, fired))
        yield model


@contextmanager
def _attached_to_model(model: Any, hooks: list[tuple[str, Callable]]) -> Iterator[None]:
    """Attach the splice as part of the model, not as a user hook: it runs in every forward,
    internal probes included (they must see the model being analysed), ahead of any user hook at
    the same hook point. An edit at a write-through name also lands at its partner (``_write_through``).
    """
    from interp.models.base import _written_through

    handles = []
    try:
        with model._lock:
            for name, fn in hooks:
                site, partner = model._sites[name], model._write_through.get(name)
                if partner is None:
                    handles.append(attach(site, fn, prepend=True))
                    continue
                edit, carry = _written_through(site, model._sites[partner], fn)
                handles.append(attach(*carry, prepend=True))
                handles.append(attach(*edit, prepend=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _restore(items: list[SAE], saved: list[bool]) -> None:
    for sae, flag in zip(items, saved, strict=True):
        sae.use_error_term = flag


def _splice_hooks(sae: SAE, index: int, fired: dict[int, bool]) -> list[tuple[str, Callable]]:
    c = sae.cfg
    if not c.is_transcoder:

        def replace(act: torch.Tensor) -> torch.Tensor:
            fired[index] = True
            return sae(_cast(act, sae)).to(act.dtype)

        return [(c.hook_name, replace)]
    read: dict[str, torch.Tensor] = {}

    def take_input(act: torch.Tensor) -> None:
        read["x"] = act

    def write_output(act: torch.Tensor) -> torch.Tensor:
        if "x" not in read:
            raise InputError(
                f"the transcoder reads {c.hook_name}, but the forward reached {c.hook_name_out} first; "
                "hook_name must be computed before hook_name_out"
            )
        fired[index] = True
        x = read.pop("x")
        return sae(_cast(x, sae), _cast(act, sae)).to(act.dtype)

    return [(c.hook_name, take_input), (c.hook_name_out, write_output)]


@contextmanager
def _reach_check(model: Any, items: list[SAE], fired: dict[int, bool]) -> Iterator[None]:
    """After every complete forward of the model, each spliced SAE must have run."""

    def reset(module: Any, args: Any) -> None:
        fired.clear()

    def check(module: Any, args: Any, output: Any) -> None:
        if probe_depth():  # the library's own probe forwards are not the user's runs
            return
        missed = [s.cfg.hook_out for i, s in enumerate(items) if not fired.get(i)]
        if missed:
            raise InputError(
                f"an SAE is spliced at {missed[0]}, but the forward of {model.name} never reached that hook "
                "(so the SAE did nothing). Splice it at a hook this model computes on this input."
            )

    handles = [model.module.register_forward_pre_hook(reset), model.module.register_forward_hook(check)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def run_with_saes(
    model: Any,
    inputs: Any,
    saes: SAE | Sequence[SAE],
    *,
    hooks: Sequence[tuple[Any, Callable]] = (),
    use_error_term: bool | None = None,
    grad: bool = False,
) -> Any:
    """One forward with ``saes`` spliced in and optional ``hooks`` (which may name latent hooks)."""
    with splice(model, saes, use_error_term=use_error_term):
        return model.run_with_hooks(inputs, hooks, grad=grad)


def run_with_cache_with_saes(
    model: Any,
    inputs: Any,
    saes: SAE | Sequence[SAE],
    names: Any = None,
    *,
    use_error_term: bool | None = None,
    **kwargs: Any,
) -> tuple[Any, Any]:
    """``model.run_with_cache(inputs, names, **kwargs)`` with ``saes`` spliced in."""
    with splice(model, saes, use_error_term=use_error_term):
        return model.run_with_cache(inputs, names, **kwargs)


def steering_hook(latent: int, alpha: float) -> Callable[[torch.Tensor, HookContext], torch.Tensor]:
    """A hook for ``<hook>.hook_sae_acts_post`` adding ``alpha`` to one latent at every position.

    With the error term kept, this adds ``alpha * W_dec[latent]`` to the spliced activation.
    """

    def steer(acts: torch.Tensor, ctx: HookContext) -> torch.Tensor:
        out = acts.clone()
        out[..., latent] += alpha
        return out

    return steer
