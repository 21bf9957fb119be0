"""Reading and writing zoo checkpoints: ``NAME.safetensors`` (weights) + ``NAME.json`` (metadata).

Weights are only ever read with safetensors (no pickle). Every way a checkpoint can be unusable
(missing, not safetensors, wrong keys, wrong shapes, unreadable JSON, weights that do not match the
hash recorded in the JSON) raises :class:`~interp.errors.CheckpointError` naming the file and the fix.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from interp.errors import CheckpointError

CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoints"
FORMAT_VERSION = 1


def checkpoint_dir(directory: str | Path | None = None) -> Path:
    """The folder holding checkpoints: ``directory`` if given, else the shipped one."""
    return Path(directory) if directory is not None else CHECKPOINT_DIR


def weights_path(name: str, directory: str | Path | None = None, suffix: str | None = None) -> Path:
    stem = name if suffix is None else f"{name}.{suffix}"
    return checkpoint_dir(directory) / f"{stem}.safetensors"


def metadata_path(name: str, directory: str | Path | None = None) -> Path:
    return checkpoint_dir(directory) / f"{name}.json"


def _fix(name: str) -> str:
    return f"Run `interp zoo train {name}` to (re)create it."


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], name: str) -> None:
    """Write ``tensors`` (copied, contiguous, CPU) to ``path`` with a small header."""
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    save_file(flat, str(path), metadata={"interp_zoo": name, "format_version": str(FORMAT_VERSION)})


def read_tensors(path: Path, name: str) -> dict[str, torch.Tensor]:
    """Read a safetensors file, turning every failure into a CheckpointError."""
    if not path.is_file():
        raise CheckpointError(f"Zoo checkpoint for {name!r} not found: {path}. {_fix(name)}")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"Zoo checkpoint {path} for {name!r} is corrupt (not a readable safetensors file: {exc}). "
            f"{_fix(name)}"
        ) from exc


def read_metadata(name: str, directory: str | Path | None = None) -> dict[str, Any]:
    """Read ``NAME.json``; a missing or unparsable file is a CheckpointError."""
    path = metadata_path(name, directory)
    if not path.is_file():
        raise CheckpointError(f"Zoo metadata for {name!r} not found: {path}. {_fix(name)}")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
        raise CheckpointError(
            f"Zoo metadata {path} for {name!r} is corrupt (unreadable JSON: {exc}). {_fix(name)}"
        ) from exc
    if not isinstance(meta, dict) or meta.get("name") != name or "metrics" not in meta:
        raise CheckpointError(
            f"Zoo metadata {path} does not describe {name!r} (missing 'name'/'metrics'). {_fix(name)}"
        )
    return meta


def load_state_into(model: nn.Module, tensors: dict[str, torch.Tensor], path: Path, name: str) -> None:
    """Copy ``tensors`` into ``model`` after checking keys and shapes exactly."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"Zoo checkpoint {path} does not fit the {name!r} architecture "
            f"(missing keys: {missing[:5]}{'...' if len(missing) > 5 else ''}; "
            f"unexpected keys: {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}). {_fix(name)}"
        )
    wrong = [
        f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if tuple(tensors[k].shape) != tuple(v.shape)
    ]
    if wrong:
        raise CheckpointError(
            f"Zoo checkpoint {path} has wrong shapes for {name!r} ({'; '.join(wrong[:3])}). {_fix(name)}"
        )
    model.load_state_dict(tensors, strict=True)


def save_checkpoint(
    name: str,
    model: nn.Module,
    metadata: dict[str, Any],
    directory: str | Path | None = None,
    extra_tensors: dict[str, dict[str, torch.Tensor]] | None = None,
) -> dict[str, Any]:
    """Write weights (+ optional extra tensor files) and then the JSON, which records their hashes."""
    wpath = weights_path(name, directory)
    write_tensors(wpath, model.state_dict(), name)
    files = {wpath.name: {"sha256": sha256(wpath), "bytes": wpath.stat().st_size}}
    for suffix, tensors in (extra_tensors or {}).items():
        epath = weights_path(name, directory, suffix)
        write_tensors(epath, tensors, name)
        files[epath.name] = {"sha256": sha256(epath), "bytes": epath.stat().st_size}
    metadata = {**metadata, "format_version": FORMAT_VERSION, "files": files}
    mpath = metadata_path(name, directory)
    mpath.write_text(json.dumps(metadata, indent=1, default=_json_default) + "\n", encoding="utf-8")
    return metadata


def verify_hash(path: Path, metadata: dict[str, Any], name: str) -> None:
    """Refuse weights whose hash differs from the one the JSON recorded (mismatched pair)."""
    recorded = metadata.get("files", {}).get(path.name, {}).get("sha256")
    if recorded is not None and sha256(path) != recorded:
        raise CheckpointError(
            f"Zoo checkpoint {path} does not match the hash recorded in {name}.json "
            f"(the weights and metadata come from different runs, or the file was modified). {_fix(name)}"
        )


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    if isinstance(obj, tuple | set):
        return list(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
