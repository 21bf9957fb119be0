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


# ------------------------------------------------------------------------------------------------
# Verified tensor files: any checkpoint format interp writes (zoo weights, SAEs, ...)
# ------------------------------------------------------------------------------------------------


def sidecar_path(path: str | Path) -> Path:
    """``weights.safetensors`` -> ``weights.safetensors.sha256`` (``sha256sum -c`` format)."""
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def write_verified(
    path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> str:
    """Write ``tensors`` as safetensors plus a sha256 sidecar; returns the hex digest.

    Readers check the digest with ``read_verified`` before trusting a byte of the file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    save_file(flat, str(path), metadata=dict(metadata or {}))
    digest = sha256(path)
    sidecar_path(path).write_text(f"{digest}  {path.name}\n", encoding="utf-8")
    return digest


def read_verified(
    path: str | Path, *, expected: str | None = None, verify: bool = True, fix: str = ""
) -> dict[str, torch.Tensor]:
    """Read a safetensors file only if its sha256 matches ``expected`` or its sidecar.

    A file with no recorded hash (``expected`` None and no sidecar) is refused: it cannot be told
    apart from a modified one. ``verify=False`` reads it unverified, on the caller's explicit word.
    Raises CheckpointError naming the file, the cause and ``fix``.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found. {fix}".strip())
    if verify:
        check_digest(path, expected, fix=fix)
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"checkpoint {path} is corrupt (not a readable safetensors file: {_line(exc)}). {fix}".strip()
        ) from None


def check_digest(path: Path, expected: str | None, recorded_in: str | None = None, fix: str = "") -> None:
    """CheckpointError unless ``path``'s sha256 equals ``expected``, the hash recorded in
    ``recorded_in`` (e.g. a JSON file); with neither given, the hash in the file's sidecar.
    No recorded hash is refused like a wrong one: the two cannot be told apart."""
    if recorded_in is None and expected is not None:
        recorded_in = "the expected= argument"
    if recorded_in is None:
        sidecar = sidecar_path(path)
        recorded_in = f"its sidecar {sidecar.name}"
        if expected is None and sidecar.is_file():
            expected = (sidecar.read_text(encoding="utf-8").split() or [""])[0]
    if not isinstance(expected, str) or not expected:
        raise CheckpointError(
            f"checkpoint {path} has no sha256 recorded in {recorded_in}, so it cannot be verified and "
            f"may have been modified. {fix} To load it anyway, unverified, pass verify=False.".replace(
                "  ", " "
            )
        )
    if sha256(path) != expected.lower():
        raise CheckpointError(
            f"checkpoint {path} does not match the hash recorded in {recorded_in} (the file was modified, "
            f"or the file and its hash come from different runs). {fix}".strip()
        )


def _line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


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


def state_mismatch(
    expected: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], what: str = "model"
) -> tuple[list[str], list[str], list[str]]:
    """How ``tensors`` fail to fit a module's ``expected`` state dict: missing keys, unexpected keys,
    and ``"key: file (shape) vs <what> (shape)"`` for each shape that differs (all empty: it fits)."""
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [
        f"{k}: file {tuple(tensors[k].shape)} vs {what} {tuple(v.shape)}"
        for k, v in expected.items()
        if k in tensors and tuple(tensors[k].shape) != tuple(v.shape)
    ]
    return missing, unexpected, wrong


def load_state_into(model: nn.Module, tensors: dict[str, torch.Tensor], path: Path, name: str) -> None:
    """Copy ``tensors`` into ``model`` after checking keys and shapes exactly."""
    missing, unexpected, wrong = state_mismatch(model.state_dict(), tensors)
    if missing or unexpected:
        raise CheckpointError(
            f"Zoo checkpoint {path} does not fit the {name!r} architecture "
            f"(missing keys: {missing[:5]}{'...' if len(missing) > 5 else ''}; "
            f"unexpected keys: {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}). {_fix(name)}"
        )
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


def verify_hash(path: Path, metadata: dict[str, Any], name: str, *, verify: bool = True) -> None:
    """Refuse weights whose sha256 differs from the one ``NAME.json`` records, or that it records
    none for (unless ``verify=False``: the caller's explicit choice to load them unverified)."""
    if not verify:
        return
    entry = (metadata.get("files") or {}).get(path.name)
    recorded = entry.get("sha256") if isinstance(entry, dict) else None
    fix = f"{_fix(name)} (Or interp.load('zoo:{name}', verify=False) / zoo.load_zoo({name!r}, verify=False).)"
    check_digest(path, recorded, f"{name}.json (files.{path.name}.sha256)", fix)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    if isinstance(obj, tuple | set):
        return list(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
