"""Getting the zoo models a reproduction analyses, and saying where each one came from.

The faithful reproductions analyse the shipped checkpoints (``zoo.load_zoo``). A fast run uses a
shipped checkpoint when there is one; when there is none (a fresh clone before the zoo is trained)
it trains the zoo's own fast variant once into a cache folder and says so in the report.
Tests pass ``given`` models (e.g. a randomly initialised ``zoo.build(name)``) to show the checks fail.
``$INTERP_ZOO_DIR`` points every reproduction at another folder of zoo checkpoints (e.g. a fresh
``interp zoo train`` output) instead of the shipped ones.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from interp.reproductions.report import Report


def cache_dir() -> Path:
    """Where fast fallbacks are trained: ``$INTERP_REPRO_CACHE`` or ``~/.cache/interp/reproductions``."""
    env = os.environ.get("INTERP_REPRO_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "interp" / "reproductions"


def zoo_dir() -> Path | None:
    """``$INTERP_ZOO_DIR`` if set: a folder of NAME.safetensors/NAME.json to use instead of the shipped ones."""
    env = os.environ.get("INTERP_ZOO_DIR")
    return Path(env) if env else None


def has_checkpoint(name: str) -> bool:
    """Whether the checkpoint folder in use (``$INTERP_ZOO_DIR`` or the shipped one) holds ``name``."""
    from interp.models.zoo import checkpoint

    directory = zoo_dir()
    return (
        checkpoint.weights_path(name, directory).is_file()
        and checkpoint.metadata_path(name, directory).is_file()
    )


def zoo_model(
    name: str, report: Report, *, fast: bool, given: dict[str, nn.Module] | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """``(module, meta)`` for zoo model ``name``; records its source, config and seed in ``report``.

    Order: ``given[name]`` (tests), the shipped checkpoint, and, for fast runs only, the zoo's fast
    variant trained here once and cached. A faithful run with no checkpoint raises the zoo's
    CheckpointError, which names the ``interp zoo train`` command that makes it.
    """
    from interp.models import zoo
    from interp.models.zoo.registry import get_recipe

    if given is not None and name in given:
        recipe = get_recipe(name)
        meta = {"config": recipe.resolved_config(fast), "seed": recipe.seed, "history": {}, "training": {}}
        report.add_model(name, "given by the caller (not a zoo checkpoint)", meta)
        return given[name].eval(), meta
    if has_checkpoint(name) or not fast:
        module, meta = zoo.load_zoo(name, directory=zoo_dir())
        where = f"zoo checkpoint from $INTERP_ZOO_DIR={zoo_dir()}" if zoo_dir() else "shipped zoo checkpoint"
        report.add_model(name, where, meta)
        return module, meta
    directory = cache_dir() / "zoo-fast"
    try:
        module, meta = zoo.load_zoo(name, directory=directory)
    except Exception:  # not cached yet (or stale): train the fast variant once
        zoo.train(name, directory, fast=True, progress=False)
        module, meta = zoo.load_zoo(name, directory=directory)
    report.add_model(name, f"no shipped checkpoint: zoo fast variant trained here ({directory})", meta)
    report.notes.append(f"{name}: no shipped checkpoint, so the zoo's fast variant was trained and cached.")
    return module, meta
