"""What a zoo recipe is: one small trained model, described completely enough to retrain it.

A :class:`Recipe` bundles the architecture (``build``), the training loop (``fit``) and the
metrics that summarise a trained model (``evaluate``), together with the exact config and seed.
The public functions in :mod:`interp.models.zoo` only ever talk to recipes through this shape, so
adding a model to the zoo means writing one module that returns ``Recipe`` objects.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

Config = dict[str, Any]


@dataclass
class FitResult:
    """What a training loop hands back besides the (trained in place) model.

    ``history`` is a column-oriented log (e.g. ``{"step": [...], "loss": [...]}``) that ends up in the
    JSON; ``training`` holds scalar facts about the run (steps taken, epoch of a phase change, ...);
    ``extra_tensors`` maps a file suffix to a dict of tensors written next to the checkpoint as
    ``NAME.SUFFIX.safetensors`` (e.g. intermediate snapshots of the grokking run).
    """

    history: dict[str, list[Any]] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    extra_tensors: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)


@dataclass(frozen=True)
class Recipe:
    """One zoo model: name, what it is, what it eats, and how to build, train and score it.

    ``config`` is the faithful recipe; ``fast_overrides`` are merged on top of it for the quick
    variant used by the test-suite (same code path, smaller budget).
    """

    name: str
    kind: Literal["transformer", "module"]
    description: str
    input: str
    config: Mapping[str, Any]
    build: Callable[[Config], nn.Module]
    fit: Callable[[nn.Module, Config, bool], FitResult]
    evaluate: Callable[[nn.Module, Config], dict[str, Any]]
    fast_overrides: Mapping[str, Any] = field(default_factory=dict)
    input_shape: tuple[int, ...] | None = None  # one example, for module models (shape checks, hook shapes)
    input_range: tuple[float, float] | None = None  # the range inputs must lie in

    def resolved_config(self, fast: bool = False) -> Config:
        """The config to build/train/evaluate with (a fresh, mutable copy)."""
        cfg = dict(self.config)
        if fast:
            cfg.update(self.fast_overrides)
            cfg["fast"] = True
        return cfg

    @property
    def seed(self) -> int:
        return int(self.config["seed"])
