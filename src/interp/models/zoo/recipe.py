"""What a zoo recipe is: one small trained model, described completely enough to retrain it.

A :class:`Recipe` bundles the architecture (``build``), the training loop (``fit``) and the
metrics that summarise a trained model (``evaluate``), together with the exact config and seed.
The public functions in :mod:`interp.models.zoo` only ever talk to recipes through this shape, so
adding a model to the zoo means writing one module that returns ``Recipe`` objects.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
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


@dataclass
class ResumeState:
    """Where a long training loop keeps its full state, so a killed run continues where it stopped.

    ``path`` holds weights, optimizer state, logs and counters (``torch.save`` of tensors and plain
    Python values, read back with ``weights_only=True``); ``snapshot_dir`` holds one safetensors
    file per in-training snapshot, so they survive a crash without living in memory. The state is
    written atomically every ``every_s`` seconds; the config is stored with it, and a state written
    under a different config is refused rather than silently continued.
    """

    path: Path
    every_s: float = 60.0
    _last_save: float = field(default_factory=time.monotonic, repr=False)

    @property
    def snapshot_dir(self) -> Path:
        return self.path.with_suffix(".snapshots")

    def load(self, cfg: Config) -> dict[str, Any] | None:
        """The saved state, or None if there is none; a state from another config is an error."""
        from interp.errors import CheckpointError

        if not self.path.is_file():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same advice
            raise CheckpointError(
                f"Training state {self.path} is unreadable ({exc}). Delete it to start the run from scratch."
            ) from exc
        if state.get("config") != _comparable(cfg):
            raise CheckpointError(
                f"Training state {self.path} was written with a different config; delete it (and "
                f"{self.snapshot_dir}) to start from scratch, or train with the config it was written with."
            )
        return state

    def due(self) -> bool:
        return time.monotonic() - self._last_save >= self.every_s

    def save(self, cfg: Config, state: dict[str, Any]) -> None:
        """Write ``state`` (plus the config) atomically: a kill mid-write leaves the previous state."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        torch.save({**state, "config": _comparable(cfg)}, tmp)
        os.replace(tmp, self.path)
        self._last_save = time.monotonic()

    def clear(self) -> None:
        """Remove the state and its snapshots once the finished checkpoint has been written."""
        self.path.unlink(missing_ok=True)
        if self.snapshot_dir.is_dir():
            for f in self.snapshot_dir.iterdir():
                f.unlink()
            self.snapshot_dir.rmdir()


def _comparable(cfg: Config) -> dict[str, Any]:
    """The config as plain values (lists for tuples), so a saved copy compares equal to a fresh one."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in sorted(cfg.items())}


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
    fit: Callable[..., FitResult]  # fit(model, cfg, progress[, resume=ResumeState]) if resumable
    evaluate: Callable[[nn.Module, Config], dict[str, Any]]
    fast_overrides: Mapping[str, Any] = field(default_factory=dict)
    input_shape: tuple[int, ...] | None = None  # one example, for module models (shape checks, hook shapes)
    input_range: tuple[float, float] | None = None  # the range inputs must lie in
    resumable: bool = False  # fit accepts resume=ResumeState and continues a killed run

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
