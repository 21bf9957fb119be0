"""SAELens's on-disk format, read and written: ``cfg.json`` + ``sae_weights.safetensors``.

Weights are read with safetensors only (no pickle), through the verified checkpoint reader every
interp format uses (``interp.models.zoo.checkpoint.read_verified``): ``save`` writes the sidecar
``sae_weights.safetensors.sha256`` (``sha256sum -c`` format) and ``load`` refuses weights whose
hash differs (a modified file, or weights and cfg from different runs) or is not recorded.
Directories written by SAELens itself have no sidecar: load them with ``verify=False``, which still
checks every key, shape and value.

Each file is written under a temporary name and renamed into place, so a kill mid-save leaves the
previous file whole, and a mismatched pair is caught by the hash.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from interp.errors import CheckpointError, closest
from interp.models.zoo.checkpoint import read_verified, sha256, sidecar_path, state_mismatch
from interp.sae.config import SAEConfig
from interp.sae.modules import SAE

CFG = "cfg.json"
WEIGHTS = "sae_weights.safetensors"
ZOO_DIR = Path(__file__).resolve().parent / "zoo"


def save(sae: SAE, directory: str | os.PathLike) -> Path:
    """Write ``sae`` to ``directory`` in SAELens's format; returns the directory.

    A BatchTopK dictionary is written as ``jumprelu`` with its inference threshold, as SAELens does.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    cfg = sae.cfg.to_dict()
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in sae.state_dict().items()}
    if sae.cfg.architecture == "batchtopk":
        cfg["architecture"] = "jumprelu"
        cfg.pop("k", None)
        cfg.setdefault("metadata", {})["trained_as"] = "batchtopk"
    weights = out / WEIGHTS
    _atomic(weights, lambda tmp: save_file(tensors, str(tmp)))
    _atomic(out / CFG, lambda tmp: tmp.write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8"))
    digest = sha256(weights)
    _atomic(sidecar_path(weights), lambda tmp: tmp.write_text(f"{digest}  {WEIGHTS}\n", encoding="utf-8"))
    return out


def _atomic(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(
    source: str | os.PathLike,
    *,
    verify: bool = True,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    use_error_term: bool = False,
) -> SAE:
    """Load a dictionary from a SAELens-format directory or ``"zoo:NAME"``.

    Args:
        source: a directory holding ``cfg.json`` and ``sae_weights.safetensors``, or ``zoo:NAME``.
        verify: check the weights against the sha256 in their sidecar (written by ``save``).
            Directories saved by SAELens have no sidecar: pass ``verify=False`` for them.
        device: where to make the weights (default CPU, as SAELens's ``load_from_disk``; the
            cfg's own ``device`` may name a GPU this machine lacks).
        dtype: what to make them in (default: the cfg's ``dtype``).
        use_error_term: see ``SAE``.

    Raises:
        CheckpointError: missing or corrupt files, wrong keys or shapes, or a hash mismatch.
        InputError: a cfg that names an unknown architecture or impossible sizes.
    """
    path = _resolve(source)
    cfg = SAEConfig.from_dict(_read_cfg(path))
    cfg.device = str(device)
    if dtype is not None:
        cfg.dtype = str(dtype).removeprefix("torch.")
    weights = path / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(
            f"{path} is a partial SAE checkpoint: {CFG} is there but {WEIGHTS} is missing. "
            "Save it again (sae.save(dir)) or copy the weights file next to cfg.json."
        )
    fix = "Save the SAE again (sae.save(dir)); for a directory SAELens wrote, load it with verify=False."
    tensors = read_verified(weights, verify=verify, fix=fix)
    sae = SAE(cfg, use_error_term=use_error_term)
    _fill(sae, tensors, weights)
    return sae


def zoo_names() -> tuple[str, ...]:
    """The zoo dictionaries shipped under ``ZOO_DIR`` (folders holding a ``cfg.json``), sorted;
    each loads as ``S.load("zoo:NAME")``."""
    if not ZOO_DIR.is_dir():
        return ()
    return tuple(sorted(p.name for p in ZOO_DIR.iterdir() if (p / CFG).is_file()))


def _resolve(source: str | os.PathLike) -> Path:
    text = str(source)
    if text.startswith("zoo:"):
        name = text.removeprefix("zoo:")
        path = ZOO_DIR / name
        if not (path / CFG).is_file():
            have = list(zoo_names())
            near = closest(name, have, n=3)
            raise CheckpointError(
                f"no zoo dictionary {name!r}."
                + (f" Did you mean: {', '.join(near)}?" if near else "")
                + f" Available: {', '.join(have) or 'none yet'}."
            )
        return path
    path = Path(source)
    if not path.is_dir():
        if path.is_file() and path.name in (CFG, WEIGHTS):
            return path.parent
        raise CheckpointError(
            f"SAE directory {path} not found; pass the folder that holds {CFG} and {WEIGHTS}"
        )
    if not (path / CFG).is_file():
        what = f" ({WEIGHTS} is there)" if (path / WEIGHTS).is_file() else ""
        raise CheckpointError(
            f"{path} is not an SAE checkpoint: {CFG} is missing{what}. Save it again with sae.save(dir)."
        )
    return path


def _read_cfg(path: Path) -> dict[str, Any]:
    try:
        data = json.loads((path / CFG).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
        raise CheckpointError(
            f"{path / CFG} is corrupt (unreadable JSON: {exc}). Save the SAE again."
        ) from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path / CFG} must hold a JSON object, got {type(data).__name__}")
    return data


def _fill(sae: SAE, tensors: dict[str, torch.Tensor], weights: Path) -> None:
    expected = sae.state_dict()
    missing, unexpected, wrong = state_mismatch(expected, tensors, what="cfg")
    if missing or unexpected:
        raise CheckpointError(
            f"{weights} does not fit a {sae.cfg.architecture} SAE (missing: {missing or 'none'}; "
            f"unexpected: {unexpected or 'none'}). The cfg.json and the weights disagree: save the SAE again."
        )
    if wrong:
        raise CheckpointError(
            f"{weights} has shapes that do not match cfg.json ({'; '.join(wrong[:3])}); "
            "the cfg's d_in/d_sae and the weights come from different SAEs."
        )
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise CheckpointError(
            f"{weights} holds NaN or inf in {', '.join(bad)}; the training diverged. Retrain it."
        )
    with torch.no_grad():
        for key, value in expected.items():
            value.copy_(tensors[key].to(value.dtype))
