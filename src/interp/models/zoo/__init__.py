"""The model zoo: small models trained here, from scratch, with shipped weights.

Each model is a recipe (architecture + data + training loop + metrics, all seeded) and a pair of
files in ``checkpoints/``: ``NAME.safetensors`` (weights, read only with safetensors) and
``NAME.json`` (config, seed, versions, training time, curves and final metrics).

    >>> from interp.models import zoo
    >>> model, meta = zoo.load_zoo("induction-2l")      # trained weights, eval mode
    >>> zoo.evaluate("induction-2l", model)              # recomputes meta["metrics"]
    >>> zoo.train("digits-cnn", out_dir="/tmp/zoo")      # retrain from the recorded seed

Models: induction heads (2-layer attention-only, plus a 1-layer control), modular-addition
grokking, toy models of superposition, and two sklearn-digits classifiers.
"""

from __future__ import annotations

import platform
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from interp.checks import writable_dir
from interp.errors import InputError
from interp.models.zoo import checkpoint as _ckpt
from interp.models.zoo.recipe import ResumeState
from interp.models.zoo.registry import ZOO_NAMES, get_recipe

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "ZOO_NAMES",
    "build",
    "describe",
    "digits_data",
    "evaluate",
    "load_snapshots",
    "load_zoo",
    "repeated_tokens",
    "train",
]


def describe() -> list[dict[str, Any]]:
    """One dict per zoo model: name, kind, description, input, has_checkpoint, and ``metrics``:
    the scalar final metrics its shipped JSON records (empty without a checkpoint)."""
    out = []
    for name in ZOO_NAMES:
        recipe = get_recipe(name)
        has = _ckpt.weights_path(name).is_file() and _ckpt.metadata_path(name).is_file()
        recorded = _ckpt.read_metadata(name).get("metrics", {}) if has else {}
        metrics = {
            k: v for k, v in recorded.items() if isinstance(v, int | float) and not isinstance(v, bool)
        }
        out.append(
            {
                "name": name,
                "kind": recipe.kind,
                "description": recipe.description,
                "input": recipe.input,
                "has_checkpoint": has,
                "metrics": metrics,
            }
        )
    return out


def build(name: str, *, fast: bool = False) -> torch.nn.Module:
    """A fresh, untrained (seeded) instance of the architecture (a TransformerBridge for transformers)."""
    import torch

    recipe = get_recipe(name)
    with torch.random.fork_rng(devices=[]):  # seeded, without disturbing the caller's RNG
        _seed_everything(recipe.seed)
        return recipe.build(recipe.resolved_config(fast))


def load_zoo(
    name: str, *, directory: str | Path | None = None, verify: bool = True
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The shipped (or ``directory``'s) weights of ``name`` in eval mode, and the metadata dict.

    Raises CheckpointError (naming the file and ``interp zoo train NAME``) if the weights or the JSON
    are missing or corrupt, or the JSON records no sha256 for the weights; ``verify=False`` loads
    such weights anyway, unverified.
    """
    import torch

    recipe = get_recipe(name)
    meta = _ckpt.read_metadata(name, directory)
    wpath = _ckpt.weights_path(name, directory)
    tensors = _ckpt.read_tensors(wpath, name)
    _ckpt.verify_hash(wpath, meta, name, verify=verify)
    with torch.random.fork_rng(devices=[]):  # the init is overwritten; keep the caller's RNG intact
        model = recipe.build(dict(meta.get("config") or recipe.resolved_config()))
    _ckpt.load_state_into(model, tensors, wpath, name)
    model.eval()
    return model, meta


def load_snapshots(
    name: str, *, directory: str | Path | None = None, verify: bool = True
) -> dict[int, dict[str, torch.Tensor]]:
    """Intermediate training snapshots ``{epoch: state_dict}`` (modadd-113 ships them).

    Each state dict holds the trainable parameters only; load it with
    ``model.load_state_dict(sd, strict=False)`` into ``build(name)`` (frozen biases stay zero).
    """
    from interp.models.zoo.modadd import split_snapshots

    get_recipe(name)
    meta = _ckpt.read_metadata(name, directory)
    suffixes = sorted(
        f.removeprefix(f"{name}.").removesuffix(".safetensors")
        for f in meta.get("files", {})
        if f.startswith(f"{name}.snapshots")
    )
    if not suffixes:
        raise InputError(f"Zoo model {name!r} ships no training snapshots.")
    tensors: dict[str, torch.Tensor] = {}
    for suffix in suffixes:
        path = _ckpt.weights_path(name, directory, suffix)
        tensors.update(_ckpt.read_tensors(path, name))
        _ckpt.verify_hash(path, meta, name, verify=verify)
    return dict(sorted(split_snapshots(tensors).items()))


def train(
    name: str,
    out_dir: str | Path | None = None,
    *,
    fast: bool = False,
    progress: bool = True,
    resume: bool = True,
) -> dict[str, Any]:
    """Retrain ``name`` from scratch with its recorded seed and config; write NAME.safetensors/.json.

    ``out_dir`` defaults to the package's checkpoints folder. ``fast=True`` runs the reduced-budget
    variant used by the tests; it must be given an explicit ``out_dir`` so it can never replace a
    shipped checkpoint. Long recipes (``recipe.resumable``, e.g. modadd-113) save their training
    state to ``out_dir/NAME.resume.pt`` every minute; with ``resume=True`` a run that was killed
    continues from there (bit-identical to an uninterrupted run), and the state is deleted once the
    checkpoint is written. Returns the metadata dict that was written.
    """
    import torch

    recipe = get_recipe(name)
    if fast and out_dir is None:
        raise InputError(
            f"train({name!r}, fast=True) needs an explicit out_dir: fast variants are for tests and must "
            "not replace the shipped checkpoint."
        )
    writable_dir(_ckpt.checkpoint_dir(out_dir), "zoo output directory")  # before, not after, training
    cfg = recipe.resolved_config(fast)
    threads_before = torch.get_num_threads()
    _seed_everything(recipe.seed)
    model = recipe.build(cfg)
    state = None
    if recipe.resumable:
        state = ResumeState(_ckpt.checkpoint_dir(out_dir) / f"{name}.resume.pt")
        if not resume:
            state.clear()
    start, cpu_start = time.perf_counter(), time.process_time()
    try:
        result = recipe.fit(model, cfg, progress, resume=state) if state else recipe.fit(model, cfg, progress)
        threads_used = torch.get_num_threads()
    finally:
        torch.set_num_threads(threads_before)
    elapsed = time.perf_counter() - start + result.training.pop("time_before_resume_s", 0.0)
    cpu = time.process_time() - cpu_start + result.training.pop("cpu_time_before_resume_s", 0.0)
    model.eval()
    metrics = recipe.evaluate(model, cfg)
    meta: dict[str, Any] = {
        "name": name,
        "kind": recipe.kind,
        "description": recipe.description,
        "input": recipe.input,
        "fast": fast,
        "config": cfg,
        "seed": recipe.seed,
        "metrics": metrics,
        # wall-clock and CPU seconds: on a shared machine the wall time mostly measures the neighbours
        "training": {**result.training, "time_s": round(elapsed, 2), "cpu_time_s": round(cpu, 2)},
        "history": result.history,
        "environment": {**_environment(), "num_threads": threads_used},
        "trained_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    written = _ckpt.save_checkpoint(name, model, meta, out_dir, result.extra_tensors)
    if state is not None:
        state.clear()
    return written


def evaluate(name: str, model: torch.nn.Module, *, fast: bool = False) -> dict[str, Any]:
    """Recompute the recorded final metrics of ``name`` from ``model`` (any weights, same architecture)."""
    import torch

    recipe = get_recipe(name)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return recipe.evaluate(model, recipe.resolved_config(fast))
    finally:
        model.train(was_training)


def repeated_tokens(batch: int, half_len: int, vocab: int = 64, seed: int = 0) -> torch.Tensor:
    """``[BOS, r, r]`` sequences (BOS = ``vocab``), r uniform over ``vocab`` symbols: induction eval data."""
    from interp.models.zoo.induction import repeated_tokens as _rt

    return _rt(batch, half_len, vocab, seed)


def digits_data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """sklearn digits as ``(x_train, y_train, x_test, y_test)``; x is ``[N, 1, 8, 8]`` in [0, 1]."""
    from interp.models.zoo.digits import digits_data as _dd

    return _dd(seed)


def _seed_everything(seed: int) -> None:
    import random

    import torch

    random.seed(seed)
    torch.manual_seed(seed)


def _environment() -> dict[str, Any]:
    import torch

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "num_threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("transformer-lens", "safetensors"):
        try:
            env[dist.replace("-", "_")] = version(dist)
        except PackageNotFoundError:  # pragma: no cover
            env[dist.replace("-", "_")] = None
    return env
