"""Cheap integrity checks shared by every layer: finite values, writable output directories.

Finite checks (on by default; each costs one pass over a tensor that was just computed):

* model inputs: a float batch with NaN or inf is refused by ``ModuleModel.prepare`` (InputError);
* probe features: ``fit_probe`` refuses NaN or inf features (InputError);
* hook outputs: the value a replacement hook leaves at its hook point (the tensor it returns, or the
  activation it edited in place when it returns None) must hold no NaN, and a returned tensor no
  inf where the incoming activation was finite (``-inf`` on ``hook_attn_scores`` is allowed: it is
  how a causal mask or an attention knockout is written, and softmax maps it to 0);
* metric values: patching refuses a metric that returns NaN or inf.

They raise :class:`~interp.errors.InputError`. Turn them off for one block with
``with interp.checks.check_finite(False): ...`` (e.g. to study a model that produces inf on purpose);
``benchmarks/bench_checks.py`` measures what they cost.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import torch

from interp.errors import InputError

SCORE_HOOKS = ("hook_attn_scores",)  # pre-softmax: -inf is how a position is masked or knocked out
_FINITE: ContextVar[bool] = ContextVar("interp_check_finite", default=True)


@contextmanager
def check_finite(enabled: bool = True) -> Iterator[None]:
    """Within the block, finite checks are on (default) or off (``check_finite(False)``)."""
    token = _FINITE.set(bool(enabled))
    try:
        yield
    finally:
        _FINITE.reset(token)


def finite_checks_on() -> bool:
    """Whether finite checks run here (see ``check_finite``)."""
    return _FINITE.get()


def require_finite(values: torch.Tensor, what: str, fix: str) -> None:
    """InputError if the float tensor ``values`` holds NaN or inf (no-op when checks are off)."""
    if not finite_checks_on() or not torch.is_floating_point(values) or values.numel() == 0:
        return
    if all_finite(values):
        return
    n_nan = int(torch.isnan(values).sum())
    n_inf = int(torch.isinf(values).sum())
    raise InputError(
        f"{what} holds {n_nan} NaN and {n_inf} inf value(s) out of {values.numel()}. {fix} "
        "(To allow them on purpose: `with interp.checks.check_finite(False): ...`.)"
    )


def all_finite(values: torch.Tensor) -> bool:
    """True when no element is NaN or inf: one sum (a NaN or inf element makes it non-finite), ~15x
    cheaper than ``isfinite(values).all()``; only a non-finite sum (or an overflow) gets the full scan."""
    with torch.no_grad():
        return bool(torch.isfinite(values.sum())) or bool(torch.isfinite(values).all())


def checked_hook_value(name: str, old: torch.Tensor, new: Any) -> None:
    """InputError if a replacement hook at ``name`` left NaN (or new inf) at its hook point."""
    if not finite_checks_on():
        return
    value = old if new is None else new
    if not isinstance(value, torch.Tensor):
        return  # a wrong type is reported by the shape/type check of the hook mechanism
    if torch.is_floating_point(old) and not torch.is_floating_point(value):
        raise InputError(
            f"the hook on {name!r} returned a {value.dtype} tensor for a {old.dtype} activation, which "
            "would drop its fractions; return a float tensor (e.g. new.to(act.dtype))"
        )
    if not torch.is_floating_point(value):
        return
    if all_finite(value):
        return
    if new is None or new is old:  # edited in place: the incoming values are gone, so NaN only
        bad = bool(torch.isnan(value).any())
    else:
        introduced = ~torch.isfinite(value)
        if name.endswith(SCORE_HOOKS):
            introduced &= ~(value == -torch.inf)  # -inf scores are an attention knockout: softmax -> 0
        if value.shape == old.shape:
            introduced &= ~(value == old)  # the same ±inf as the incoming activation is not new
        bad = bool(introduced.any())
    if bad:
        raise InputError(
            f"the hook on {name!r} left NaN or inf in the activation (it was finite before, or the NaN "
            "is the hook's). Check the hook function for a division by zero or a NaN fill; "
            "to allow it on purpose: `with interp.checks.check_finite(False): ...`."
        )


def writable_dir(path: str | os.PathLike, what: str = "output directory") -> Path:
    """``path`` as a Path after checking it is (or can be made) a directory a file can be written in.

    Called before any expensive work (training, model loading) so a run never crashes on its last
    step. Nothing is created: a temporary file is written and removed in ``path`` or, if it does not
    exist yet, in its nearest existing parent. InputError if that is a file or not writable.
    """
    target = Path(path).expanduser()
    existing = target
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "is a file" if existing == target else f"is inside {str(existing)!r}, which is a file"
        raise InputError(f"the {what} {str(target)!r} {where}, not a directory; pass a directory path")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise InputError(
            f"the {what} {str(target)!r} is not writable ({reason} in {str(existing)!r}); "
            "pass a directory you can write to"
        ) from None
    return target


def check_device(device: Any) -> None:
    """InputError before any loading when ``device`` is not a device this machine has."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InputError(
            f"device={device!r} is not a torch device; use 'cpu', 'cuda', 'cuda:0' or 'mps'"
        ) from None
    if dev.type == "meta":
        raise InputError(
            "device='meta' holds no values, so nothing could be read or measured; use device='cpu'"
        )
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(
            f"device={device!r} but CUDA is not available here (no GPU, or torch built without CUDA); "
            "use device='cpu'"
        )
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise InputError(
            f"device={device!r} but this machine has {torch.cuda.device_count()} CUDA device(s); "
            "use device='cuda:0' or 'cpu'"
        )
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"device={device!r} but MPS (Apple GPU) is not available here; use device='cpu'")
