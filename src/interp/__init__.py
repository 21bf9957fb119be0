"""interp: a mechanistic-interpretability workbench.

One hooked-model interface over transformers (TransformerLens-style hook names) and any torch
``nn.Module`` (hook names are module paths), with activation capture to memory or disk.

    >>> import interp
    >>> model = interp.load("minilm")
    >>> out, cache = model.run_with_cache("The cat sat.", names="blocks.*.hook_resid_post")

Importing ``interp`` is cheap: heavy modules (torch, transformers) load on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "load": "interp.models",
    "available_models": "interp.models",
    "HookedModel": "interp.models.base",
    "ActivationCache": "interp.hooks",
    "get_act_name": "interp.hooks",
    "InterpError": "interp.errors",
    "capture_to_disk": "interp.store",
    "load_capture": "interp.store",
    "load_attack": "interp.methods.adversarial",
    "loss_fn": "interp.models.lm",
    "test_prompt": "interp.models.lm",
}

__all__ = sorted(_LAZY)

if TYPE_CHECKING:  # pragma: no cover
    from interp.errors import InterpError  # noqa: F401
    from interp.hooks import ActivationCache, get_act_name  # noqa: F401
    from interp.methods.adversarial import load_attack  # noqa: F401
    from interp.models import available_models, load  # noqa: F401
    from interp.models.base import HookedModel  # noqa: F401
    from interp.models.lm import loss_fn, test_prompt  # noqa: F401
    from interp.store import capture_to_disk, load_capture  # noqa: F401


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'interp' has no attribute {name!r}")
