"""The TransformerBridgeConfig of a zoo transformer recipe (induction, modadd, grammar).

Each of those recipes boots a native TransformerBridge from its flat config dict. The fields every
one of them reads from that dict under TL's own names are listed once here, so a recipe states only
what is particular to it: which further fields it copies and which it derives or fixes.
"""

from __future__ import annotations

from typing import Any

from interp.models.zoo.recipe import Config

# Read from every zoo transformer's config under TL's names.
SHARED_FIELDS: tuple[str, ...] = ("n_layers", "d_model", "n_heads", "d_head", "seed")


def native_bridge_config(cfg: Config, *copied: str, **fields: Any) -> Any:
    """The ``TransformerBridgeConfig`` of ``cfg``.

    ``SHARED_FIELDS`` and the names in ``copied`` are read from ``cfg`` as ``cfg[name]``; ``fields``
    are passed as given (the values a recipe derives, e.g. ``d_vocab=p + 1``, or fixes). A name given
    both ways is a TypeError, so no field can be set twice by accident.
    """
    from transformer_lens.config import TransformerBridgeConfig

    read = {name: cfg[name] for name in (*SHARED_FIELDS, *copied)}
    return TransformerBridgeConfig(**read, **fields)


__all__ = ["SHARED_FIELDS", "native_bridge_config"]
