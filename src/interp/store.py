"""Streaming capture to disk: activations over a dataset, written batch by batch as Arrow shards.

    >>> ds = interp.capture_to_disk(model, texts, "blocks.*.hook_resid_post", "acts/")
    >>> ds[0]["blocks.3.hook_resid_post"].shape        # (n_tokens_of_example_0, d_model)
    >>> ds = interp.load_capture("acts/")               # later, or in another process

Layout of ``out_dir``::

    manifest.json        model, names, shapes, dtype, batch_size, inputs fingerprint, finished shards
    shard-00000.arrow    Arrow IPC stream files with Hugging Face ``datasets`` schema metadata,
    shard-00001.arrow    so each one opens with ``datasets.Dataset.from_file`` (memory-mapped)
    .lock                held (``flock``) while a capture writes, so two runs cannot interleave
    parts/part-00000/    only while a data-parallel capture runs: one capture of each rank's range
                         (manifest with "range", shards, lock), merged into the layout above at the end

One row per example: ``example`` (its index in the inputs), ``input_ids`` and ``str_tokens`` for
transformers (the real tokens only, no padding), and one column per hook name holding that
example's activation without the batch axis, trimmed to the example's real tokens on every ``pos``
axis (a pattern of an example with 7 tokens is ``[head, 7, 7]``).

Crash safety: a shard is written under a temporary name, flushed, fsynced and renamed into place;
only then does the manifest (itself replaced atomically) list it. A rerun of the same call resumes
after the last listed shard and deletes anything not listed (a half-written temp file, a shard
renamed just before a kill), so nothing is lost and nothing is duplicated. A kill loses only the
open shard, and a shard is closed after ``shard_mb`` MB, ``shard_rows`` rows or ``shard_seconds``
seconds (default 60), whichever comes first, so a kill costs at most about a minute of work.

Integrity: each shard's checksum (``xxh3_128`` of the file's bytes, computed while it is written)
is recorded in the manifest. Resume and ``load_capture`` check the manifest against the shards
before using anything: entries named in order, ranges contiguous from 0 and within the inputs,
each file present with the recorded size and checksum, its row count and ``example`` column equal
to its range, its schema equal to the manifest's features, and ``complete`` true only when the
shards cover every input. Resume keeps the shards before the first one that fails (with a warning)
and captures the rest again; ``load_capture`` refuses with an error naming the shard or field.
``verify=False`` skips only the checksums (reading every byte), for speed on trusted data.
xxh3_128 is not cryptographic: it catches corruption and edits, not a forger who rewrites the
manifest too (nothing short of a signature would). It was chosen over sha256 because it hashes
at ~30 GB/s against ~1.8 GB/s: all the checks together cost 0.3-1.2% of MiniLM capture time, where
sha256 alone would cost 2-9% (``benchmarks/bench_store.py --integrity``). Captures recorded with
``sha256:`` checksums verify as well. A verified ``load_capture`` reads every byte once (~2 GB/s
from the page cache, disk speed otherwise).

Memory: only one batch's activations are alive at a time. A shard may span several batches;
each batch is appended to the open shard file as one Arrow record batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import math
import os
import re
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from interp.errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    import datasets
    import pyarrow as pa

    from interp.hooks import Names
    from interp.models.base import HookedModel

MANIFEST = "manifest.json"
LOCK = ".lock"
FORMAT = "interp.capture"
VERSION = 2  # 2: shard checksums
PARTS = "parts"  # a data-parallel capture's per-part directories while it runs (see capture_to_disk)
_OURS_RE = re.compile(r"^(shard-\d{5,}\.arrow|manifest\.json)(\.tmp.*)?$|^\.lock$|^parts$")
_STORABLE = {
    torch.float16: "float16",
    torch.float32: "float32",
    torch.float64: "float64",
    torch.int8: "int8",
    torch.int16: "int16",
    torch.int32: "int32",
    torch.int64: "int64",
    torch.uint8: "uint8",
    torch.bool: "bool",
}
_DTYPE_ALIASES = {
    "fp16": "float16",
    "half": "float16",
    "fp32": "float32",
    "float": "float32",
    "fp64": "float64",
}


# ------------------------------------------------------------------------------------------------
# Public API
# ------------------------------------------------------------------------------------------------


def capture_to_disk(
    model: HookedModel,
    inputs: Any,
    names: Names,
    out_dir: str | os.PathLike,
    *,
    batch_size: int = 16,
    resume: bool = True,
    progress: bool = True,
    dtype: str | torch.dtype | None = None,
    shard_mb: float = 256.0,
    shard_rows: int | None = None,
    shard_seconds: float = 60.0,
    verify: bool = True,
    timeout: float | None = None,
) -> datasets.Dataset:
    """Capture the named activations over ``inputs`` into Arrow shards in ``out_dir``.

    Args:
        model: any ``HookedModel``.
        inputs: a list of texts, a ``datasets.Dataset`` with a ``"text"`` column, a token-id tensor
            ``[N, pos]`` (transformers), or a float tensor / array ``[N, ...]`` (module models).
        names: hook names, globs or regexes (as for ``run_with_cache``).
        out_dir: the capture directory (created if missing).
        batch_size: examples per forward pass; memory holds one batch of activations at a time.
        resume: continue an interrupted capture of the same model, names and inputs in ``out_dir``.
            ``False`` deletes a previous capture there and starts over.
        progress: show a tqdm bar.
        dtype: store floating activations as this dtype (``"float16"``, ``"float32"``,
            ``"float64"``); None keeps the model's dtype (bfloat16 is stored as float32, since Arrow
            has no bfloat16).
        shard_mb, shard_rows, shard_seconds: close the open shard file (at a batch boundary) once
            it holds ``shard_mb`` MB or ``shard_rows`` rows (None: no row limit), or once
            ``shard_seconds`` seconds have passed since its first batch began, whichever comes
            first. An interruption loses at most the open shard: by default about a minute of work.
            ``0`` for any of them gives one shard per batch.
        verify: on resume, check the checksum of every shard already on disk before trusting it
            (the other manifest checks always run). ``False`` skips that read, for trusted data.
        timeout: data-parallel runs only: seconds without a heartbeat from another rank before
            this one gives up on it (default ``interp.distributed.DEFAULT_TIMEOUT``).

    Data parallel (inside a ``torch.distributed`` process group, e.g. under ``torchrun``), the
    call is collective: every rank calls it with the same arguments. The inputs are split into
    one contiguous part per rank, cut on ``batch_size`` boundaries so every forward pass sees the
    same examples as in one process (the dataset is the same, row for row). Each rank writes its
    part's shards under ``out_dir/parts/part-NNNNN/`` (each a capture of its range, with its own
    manifest, checksums and resume); rank 0 then hard-links them, in input order, into
    ``out_dir`` as ``shard-NNNNN.arrow`` and writes the one manifest, so the finished directory is
    exactly what one process writes. Rerunning after a kill resumes every part. The split is
    fixed by the first run: a resume on another number of processes (one included) handles it,
    part ``p`` going to rank ``p % world_size`` (a warning says so). A capture begun by one
    process and resumed by several is finished by rank 0 alone while the others wait.

    Returns:
        The whole capture as a ``datasets.Dataset`` in torch format (see ``load_capture``).
    """
    from tqdm.auto import tqdm

    if not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
    limits = _ShardLimits.checked(shard_mb, shard_rows, shard_seconds)
    from interp import distributed

    if timeout is not None:
        distributed.check_timeout(timeout)
    source = _as_source(model, inputs)
    chosen = model.resolve(names)  # UnknownHookError with suggestions for a typo
    store_dtype = _normalize_dtype(dtype)
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    _refuse_foreign(out)
    ctx = distributed.current()
    job = _Job(model, source, chosen, store_dtype, batch_size, out, resume, verify, limits)
    if ctx.distributed or (resume and _is_parts(_read_manifest(out))):
        _capture_parts(job, ctx, progress, distributed.DEFAULT_TIMEOUT if timeout is None else timeout)
    else:
        with _locked(out):
            bar = tqdm(total=source.n, unit="ex", desc=f"capture {out.name}", disable=not progress)
            try:
                job.single(bar, progress)
            finally:
                bar.close()
    # Every shard was checksummed as it was written or verified above: skip reading them again.
    return load_capture(out, verify=False)


@dataclass
class _Job:
    """One capture_to_disk call's arguments, checked."""

    model: HookedModel
    source: _Source
    chosen: list[str]
    store_dtype: str | None
    batch_size: int
    out: Path
    resume: bool
    verify: bool
    limits: _ShardLimits
    _header: dict[str, Any] | None = dataclasses.field(default=None, init=False, repr=False)

    def header(self) -> dict[str, Any]:
        """The capture's identity (a copy), computed once per call: it fingerprints every weight
        and input (~10 ms for MiniLM), and a data-parallel rank asks for it once, then per part."""
        if self._header is None:
            self._header = _header(self.model, self.chosen, self.store_dtype, self.batch_size, self.source)
        return dict(self._header)

    def single(self, bar: Any, progress: bool) -> None:
        """The whole capture in this process, into ``out`` itself (the caller holds its lock)."""
        manifest = _open_manifest(self.out, self.header(), self.resume, self.verify)
        start = manifest["shards"][-1]["stop"] if manifest["shards"] else 0
        bar.update(start)
        if start and progress:
            bar.write(f"resuming {self.out}: {start} of {self.source.n} examples already on disk")
        self.run(self.out, manifest, start, self.source.n, bar)

    def part(self, index: int, lo: int, hi: int, bar: Any, tick: Any) -> None:
        """Examples ``[lo, hi)`` into ``out/parts/part-NNNNN`` (a capture of that range), resumed."""
        directory = self.out / PARTS / f"part-{index:05d}"
        directory.mkdir(parents=True, exist_ok=True)
        with _locked(directory):
            header = {**self.header(), "range": [lo, hi], "part": index}
            manifest = _open_manifest(directory, header, True, self.verify)
            start = manifest["shards"][-1]["stop"] if manifest["shards"] else lo
            bar.update(start - lo)
            self.run(directory, manifest, start, hi, bar, tick)

    def run(
        self, out: Path, manifest: dict[str, Any], start: int, stop: int, bar: Any, tick: Any = None
    ) -> None:
        if start < stop:
            _run(self.model, self.source, self.chosen, self.store_dtype, self.batch_size, out, manifest,
                 start, self.limits, bar, stop=stop, tick=tick)  # fmt: skip
        manifest["complete"] = True
        _write_manifest(out, manifest)


def load_capture(
    out_dir: str | os.PathLike, *, partial: bool = False, verify: bool = True
) -> datasets.Dataset:
    """Open a capture written by ``capture_to_disk`` as one ``datasets.Dataset`` in torch format.

    The shards are memory-mapped and concatenated in order (nothing is copied into RAM). Rows of
    text captures have different lengths, so a slice gives a list of tensors, one per example.
    Note that datasets' torch format hands every floating column back as float32, whatever dtype
    the files hold (use ``ds.with_format("numpy")`` to read float16 or float64 as stored).

    The manifest is checked against the shards first (see the module docstring); a capture that
    fails any check is refused with an error naming the shard or field, never opened in part.
    ``verify=False`` skips the checksums, which read every byte (the other checks are cheap).
    ``partial=True`` opens an unfinished capture's finished shards; otherwise an unfinished
    capture is an error that says how to finish it.
    """
    out = Path(out_dir).expanduser()
    manifest = _manifest_or_error(out)
    report = _inspect(out, manifest, verify=verify)
    if report.problem is not None:
        raise InputError(f"the capture in {out} cannot be trusted: {report.problem}. {report.fix}")
    done = report.shards[-1]["stop"] if report.shards else 0
    if _is_parts(manifest):
        raise InputError(
            f"the capture in {out} is a data-parallel capture that has not finished (its parts are in "
            f"{out / PARTS}). Rerun the same command, with torchrun or without (any number of processes "
            "finishes it), to complete and merge it."
        )
    if not manifest["complete"] and not partial:
        raise InputError(
            f"the capture in {out} is unfinished ({done} of {manifest['n_examples']} examples). "
            "Rerun the same capture_to_disk call (or `interp capture` command) to finish it, "
            "or open what is there with load_capture(out_dir, partial=True)."
        )
    if not report.parts:
        raise InputError(f"the capture in {out} has no finished shard yet; rerun the capture to write one")
    import datasets

    parts = report.parts
    ds = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    return ds.with_format("torch")


def read_inputs(path: str | os.PathLike) -> list[str] | torch.Tensor | datasets.Dataset:
    """Read capture inputs from a file, for the CLI.

    * ``.txt``: one text per line (blank lines are skipped);
    * ``.jsonl``: one JSON object per line with a ``"text"`` string;
    * ``.npy`` / ``.safetensors``: a tensor (token ids ``[N, pos]`` or model inputs ``[N, ...]``;
      a safetensors file must hold one tensor, or one named ``input_ids`` / ``inputs``);
    * a directory written by ``datasets.Dataset.save_to_disk`` with a ``"text"`` column.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise InputError(f"input file {str(p)!r} does not exist. Check the path.")
    if p.is_dir():
        return _read_dataset_dir(p)
    suffix = p.suffix.lower()
    readers = {".txt": _read_txt, ".jsonl": _read_jsonl, ".npy": _read_npy, ".safetensors": _read_safetensors}
    if suffix not in readers:
        raise InputError(
            f"cannot read {p.name!r}: unknown file type {suffix or '(none)'!r}. Use .txt (one text per "
            "line), .jsonl (a 'text' field per line), .npy or .safetensors (a tensor), or a "
            "datasets.save_to_disk directory."
        )
    try:
        result = readers[suffix](p)
    except InputError:
        raise
    except (OSError, ValueError, UnicodeDecodeError, RuntimeError) as err:
        raise InputError(f"cannot read {str(p)!r} as {suffix}: {err}") from err
    if len(result) == 0:
        what = "texts" if isinstance(result, list) else "examples (its first dimension is 0)"
        raise InputError(f"{str(p)!r} holds no {what}; nothing to capture.")
    return result


# ------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------


@dataclass
class _Source:
    """Inputs as batches: ``kind`` is "text", "tokens" or "tensor"."""

    kind: str
    n: int
    data: Any

    def batch(self, start: int, stop: int) -> Any:
        if self.kind == "text" and not isinstance(self.data, list):  # a datasets.Dataset
            return list(self.data[start:stop]["text"])
        return self.data[start:stop]

    def fingerprint(self) -> str:
        digest = hashlib.blake2b(digest_size=16)
        digest.update(f"{self.kind}:{self.n}:".encode())
        if self.kind == "text":
            for text in self._texts():
                encoded = text.encode("utf-8", "surrogatepass")
                digest.update(len(encoded).to_bytes(8, "little"))
                digest.update(encoded)
        else:
            tensor = self.data
            digest.update(f"{tensor.dtype}:{tuple(tensor.shape)}:".encode())
            step = max(1, (64 * 2**20) // max(1, tensor[:1].numel() * tensor.element_size()))
            for i in range(0, self.n, step):  # chunked, so a large tensor is never copied whole
                chunk = tensor[i : i + step].detach().cpu().contiguous()
                digest.update(chunk.view(torch.uint8).numpy())
        return digest.hexdigest()

    def _texts(self) -> Iterator[str]:
        if isinstance(self.data, list):
            yield from self.data
        else:
            for rows in self.data.iter(batch_size=1024):
                yield from rows["text"]


def _as_source(model: HookedModel, inputs: Any) -> _Source:
    kind = getattr(model, "kind", "module")
    if isinstance(inputs, str):
        raise InputError(
            "capture_to_disk takes a list of texts, not a single string. Wrap it ([text]) or, for a "
            "file, pass read_inputs(path)."
        )
    if _is_dataset(inputs):
        if "text" not in inputs.column_names:
            raise InputError(
                f"the dataset has no 'text' column (columns: {inputs.column_names}). Rename the text "
                "column (ds.rename_column(old, 'text')) or pass token ids as a tensor."
            )
        if kind != "transformer":
            raise InputError(f"{model.name} is a {kind} model; it takes tensors, not texts")
        if len(inputs) == 0:
            raise InputError("the dataset is empty; nothing to capture")
        return _Source("text", len(inputs), inputs.select_columns(["text"]))
    if isinstance(inputs, list | tuple) and inputs and all(isinstance(t, str) for t in inputs):
        if kind != "transformer":
            raise InputError(f"{model.name} is a {kind} model; it takes tensors, not texts")
        return _Source("text", len(inputs), list(inputs))
    if isinstance(inputs, list | tuple) and not inputs:
        raise InputError("inputs is empty; nothing to capture")
    try:
        tensor = inputs if isinstance(inputs, torch.Tensor) else torch.as_tensor(np.asarray(inputs))
    except (TypeError, ValueError, RuntimeError) as err:
        raise InputError(
            f"cannot use a {type(inputs).__name__} as capture inputs ({err}). Pass a list of texts, a "
            "datasets.Dataset with a 'text' column, or a tensor [N, ...]."
        ) from err
    if tensor.ndim == 0 or tensor.shape[0] == 0:
        raise InputError(
            f"inputs tensor of shape {tuple(tensor.shape)} holds no examples; nothing to capture"
        )
    if kind == "transformer":
        if torch.is_floating_point(tensor) or tensor.ndim != 2:
            raise InputError(
                f"a transformer takes token ids as an integer tensor [N, pos]; got {tensor.dtype} "
                f"{tuple(tensor.shape)}. For one sequence use ids.unsqueeze(0); for text pass a list of strings."
            )
        return _Source("tokens", tensor.shape[0], tensor)
    return _Source("tensor", tensor.shape[0], tensor)


def _is_dataset(obj: Any) -> bool:
    return type(obj).__name__ == "Dataset" and hasattr(obj, "column_names") and hasattr(obj, "select_columns")


def _read_txt(p: Path) -> list[str]:
    with open(p, encoding="utf-8") as f:
        return [line.rstrip("\r\n") for line in f if line.strip()]


def _read_jsonl(p: Path) -> list[str]:
    texts = []
    with open(p, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise InputError(f"{p.name} line {number} is not valid JSON ({err.msg}).") from err
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise InputError(
                    f'{p.name} line {number} needs a \'text\' string field, e.g. {{"text": "The cat sat."}}; '
                    f"got {line.strip()[:80]!r}"
                )
            texts.append(row["text"])
    return texts


def _read_npy(p: Path) -> torch.Tensor:
    array = np.load(p, allow_pickle=False)
    if array.ndim == 0:
        raise InputError(f"{p.name} holds a scalar; capture needs a tensor [N, ...]")
    return torch.from_numpy(np.ascontiguousarray(array))


def _read_safetensors(p: Path) -> torch.Tensor:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(p))
    except SafetensorError as err:
        raise InputError(f"cannot read {p.name} as safetensors: {err}") from err
    if not tensors:
        raise InputError(f"{p.name} holds no tensors; nothing to capture")
    if len(tensors) == 1:
        return next(iter(tensors.values()))
    for key in ("input_ids", "inputs"):
        if key in tensors:
            return tensors[key]
    raise InputError(
        f"{p.name} holds {len(tensors)} tensors ({sorted(tensors)[:6]}); name the one to capture "
        "'input_ids' or 'inputs', or save it alone."
    )


def _read_dataset_dir(p: Path) -> datasets.Dataset:
    import datasets

    try:
        ds = datasets.load_from_disk(str(p))
    except (FileNotFoundError, OSError, ValueError) as err:
        raise InputError(
            f"{str(p)!r} is a directory but not a saved datasets.Dataset ({err}). Pass a .txt, .jsonl, "
            ".npy or .safetensors file."
        ) from err
    if not _is_dataset(ds):
        raise InputError(f"{str(p)!r} holds a DatasetDict; save one split (ds['train'].save_to_disk(...))")
    if len(ds) == 0:
        raise InputError(f"the dataset in {str(p)!r} is empty; nothing to capture")
    return ds


# ------------------------------------------------------------------------------------------------
# Manifest and resume
# ------------------------------------------------------------------------------------------------


def _header(
    model: HookedModel, chosen: list[str], store_dtype: str | None, batch_size: int, source: _Source
) -> dict[str, Any]:
    shapes = model.hook_shapes
    return {
        "format": FORMAT,
        "version": VERSION,
        "model": model.name,
        "model_kind": getattr(model, "kind", "module"),
        "model_class": type(model.module).__name__,
        "n_params": sum(p.numel() for p in model.module.parameters()),
        "weights_fingerprint": weights_fingerprint(model.module),
        "names": chosen,
        "shapes": {n: (list(shapes[n]) if shapes.get(n) is not None else None) for n in chosen},
        "dtype": store_dtype,
        "batch_size": batch_size,
        "input_kind": source.kind,
        "n_examples": source.n,
        "inputs_fingerprint": source.fingerprint(),
    }


_IDENTITY = {
    "model": "model",
    "model_kind": "model kind",
    "model_class": "model class",
    "n_params": "model parameter count",
    "weights_fingerprint": "model weights (same name and size, other values: retrained?)",
    "names": "hook names",
    "dtype": "dtype",
    "input_kind": "kind of inputs",
    "n_examples": "number of examples",
    "inputs_fingerprint": "inputs (their content differs)",
    "range": "part range",
}


# Identity keys that older manifests lack: a capture written before them still resumes.
_ADDED_LATER = {"weights_fingerprint"}


def weights_fingerprint(module: Any) -> str:
    """xxh3_128 of every parameter and buffer (names, dtypes, shapes and values), so a resume or a
    reuse never mixes activations of two models that share a name and a size. Tensors offloaded to
    the meta device (``device_map`` with disk offload) count by name, dtype and shape only."""
    import xxhash

    digest = xxhash.xxh3_128()
    for name, tensor in module.state_dict(keep_vars=False).items():
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        if tensor.device.type != "meta" and tensor.numel():
            data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
            digest.update(memoryview(data.numpy()))
    return digest.hexdigest()


def _open_manifest(out: Path, header: dict[str, Any], resume: bool, verify: bool) -> dict[str, Any]:
    existing = _read_manifest(out)
    _refuse_foreign(out)
    if existing is not None and resume:
        differ = [
            label
            for key, label in _IDENTITY.items()
            if existing.get(key) != header.get(key) and (key in existing or key not in _ADDED_LATER)
        ]
        if differ:
            details = "; ".join(
                f"{label}: on disk {_short(existing.get(key))}, now {_short(header.get(key))}"
                for key, label in _IDENTITY.items()
                if label in differ
            )
            raise InputError(
                f"{out} holds a capture made with a different {', '.join(differ)} ({details}). "
                "Use a new out_dir, or pass resume=False (`interp capture --no-resume`) to delete it and start over."
            )
        report = _inspect(out, existing, verify=verify)
        kept = report.shards[-1]["stop"] if report.shards else 0
        if report.problem is not None:
            warnings.warn(
                f"{out}: {report.problem}. Keeping what verifies ({_count(len(report.shards), 'shard')}, "
                f"{_count(kept, 'example')}) and capturing the rest again.",
                stacklevel=3,
            )
        manifest = {**existing, "batch_size": header["batch_size"], "shards": report.shards}
        manifest.pop("parts", None)
        manifest["complete"] = report.problem is None and existing["complete"]
        manifest.setdefault("created", _now())
    else:
        manifest = {**header, "features": None, "shards": [], "complete": False, "created": _now()}
    keep = {s["file"] for s in manifest["shards"]}
    for p in out.iterdir():  # leftovers: temp files, partial shards, shards the manifest never listed
        if p.name == PARTS and p.is_dir():  # a data-parallel capture's parts, replaced by this one
            _rmtree(p)
        elif _OURS_RE.match(p.name) and p.name not in keep and p.name not in (MANIFEST, LOCK):
            p.unlink()
    if not manifest["shards"]:
        manifest["features"] = None  # inferred again from the first batch
    _write_manifest(out, manifest)
    return manifest


def _refuse_foreign(out: Path) -> None:
    """Never write into (or clean up) a directory that holds anything but a capture."""
    if _read_manifest(out) is not None:
        return
    foreign = sorted(p.name for p in out.iterdir() if not _OURS_RE.match(p.name))
    if foreign:
        raise InputError(
            f"{out} already holds files that are not an interp capture ({', '.join(foreign[:4])}). "
            "Choose a new or empty out_dir."
        )


# ------------------------------------------------------------------------------------------------
# Verification: the manifest is checked against the shards before anything in it is used
# ------------------------------------------------------------------------------------------------


CHECKSUM = "xxh3_128"  # for new shards; see the module docstring for why not sha256
_RERUN = (
    "Rerun the same capture_to_disk call (or `interp capture` command): it keeps the shards that "
    "verify and captures the rest again"
)


def _hasher(algorithm: str) -> Any:
    if algorithm == "xxh3_128":
        import xxhash  # a dependency of datasets

        return xxhash.xxh3_128()
    if algorithm == "sha256":
        return hashlib.sha256()
    raise KeyError(algorithm)


def _file_checksum(path: Path, algorithm: str) -> str:
    with open(path, "rb") as f:
        return f"{algorithm}:{hashlib.file_digest(f, lambda: _hasher(algorithm)).hexdigest()}"


class _Bad(Exception):
    """A manifest field or shard that fails a check: ``problem`` names it, ``fix`` says what to do."""

    def __init__(self, problem: str, fix: str = _RERUN + ".") -> None:
        super().__init__(problem)
        self.problem, self.fix = problem, fix


@dataclass
class _Report:
    """What checking a manifest against its shards found."""

    shards: list[dict[str, Any]]  # the entries that pass, in order, up to the first that does not
    parts: list[datasets.Dataset]  # those shards, opened (memory-mapped)
    problem: str | None = None  # the first field or shard that fails, and how
    fix: str = ""


def _inspect(out: Path, manifest: dict[str, Any], *, verify: bool) -> _Report:
    """Check ``manifest`` against the shard files in ``out`` (checksums too when ``verify``)."""
    report = _Report([], [])
    try:
        features = _checked_fields(manifest)
        lo, hi = _range(manifest)
        expected = lo
        for index, entry in enumerate(manifest["shards"]):  # features is not None when shards are listed
            report.parts.append(_checked_shard(out, index, entry, expected, manifest, features, verify))
            report.shards.append(entry)
            expected = entry["stop"]
        if manifest["complete"] and expected != hi:
            raise _Bad(
                f"field 'complete' in {MANIFEST} is true, but its shards cover {expected - lo:,} of the "
                f"{hi - lo:,} examples"
            )
    except _Bad as bad:
        report.problem, report.fix = bad.problem, bad.fix
        del report.parts[len(report.shards) :]
    return report


def _range(manifest: dict[str, Any]) -> tuple[int, int]:
    """The examples a manifest covers: all inputs, or one part's ``range`` (checked by _checked_fields)."""
    lo, hi = manifest.get("range", [0, manifest["n_examples"]])
    return lo, hi


def _is_parts(manifest: dict[str, Any] | None) -> bool:
    """Whether ``manifest`` is the top manifest of a data-parallel capture still in its parts."""
    return manifest is not None and "parts" in manifest and not manifest.get("complete")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _checked_fields(manifest: dict[str, Any]) -> datasets.Features | None:
    """The manifest's own fields have the right types; its features parse and name its columns."""
    if not _is_int(manifest.get("n_examples")) or manifest["n_examples"] < 1:
        raise _Bad(
            f"field 'n_examples' in {MANIFEST} is {_short(manifest.get('n_examples'))}, not a positive integer"
        )
    names = manifest.get("names")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise _Bad(f"field 'names' in {MANIFEST} is {_short(names)}, not a list of hook names")
    if not isinstance(manifest.get("complete"), bool):
        raise _Bad(f"field 'complete' in {MANIFEST} is {_short(manifest.get('complete'))}, not true or false")
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        raise _Bad(f"field 'shards' in {MANIFEST} is {_short(shards)}, not a list")
    span = manifest.get("range", [0, manifest["n_examples"]])
    if not (isinstance(span, list) and len(span) == 2 and all(map(_is_int, span))) or not (
        0 <= span[0] < span[1] <= manifest["n_examples"]
    ):
        raise _Bad(f"field 'range' in {MANIFEST} is {_short(span)}, not [start, stop] within the inputs")
    data = manifest.get("features")
    if data is None:
        if shards:
            raise _Bad(f"field 'features' in {MANIFEST} is missing though {len(shards)} shards are listed")
        return None
    try:
        features = _features_from_dict(data)
    except Exception as err:  # hostile JSON can fail inside datasets in many ways
        raise _Bad(f"field 'features' in {MANIFEST} is not a datasets.Features dict ({err})") from err
    extra = [c for c in ("input_ids", "str_tokens") if c in features]
    if list(features) != ["example", *extra, *names]:
        raise _Bad(
            f"field 'features' in {MANIFEST} has columns {_short(list(features))}, but a capture of "
            f"field 'names' has {_short(['example', *extra, *names])}"
        )
    return features


def _checked_shard(
    out: Path,
    index: int,
    entry: Any,
    expected: int,
    manifest: dict[str, Any],
    features: datasets.Features,
    verify: bool,
) -> datasets.Dataset:
    """Shard entry ``index`` against its file; the file opened. Raises ``_Bad`` naming what fails."""
    name = f"shard-{index:05d}.arrow"
    where = f"shard entry {index} in {MANIFEST}"
    if not isinstance(entry, dict):
        raise _Bad(f"{where} is {_short(entry)}, not an object")
    for key in ("start", "stop", "bytes"):
        if not _is_int(entry.get(key)):
            raise _Bad(f"{where} ({name}) has {key!r} = {_short(entry.get(key))}, not an integer")
    start, stop, (lo, n) = entry["start"], entry["stop"], _range(manifest)
    label = f"{where} ({_short(entry.get('file'))})"
    if start != expected:
        first = f"the first shard must start at {lo:,}"
        before = f"the shard before it ends at {expected:,}" if index else first
        raise _Bad(f"{label} starts at example {start:,}, but {before}: shard ranges must be contiguous")
    if not start < stop <= n:
        what = f"the {n:,} inputs" if lo == 0 else f"this part's examples {lo:,} to {n:,}"
        raise _Bad(f"{label} claims examples {start:,} to {stop:,}, not a range within {what}")
    if entry.get("file") != name:
        raise _Bad(f"{where} names file {_short(entry.get('file'))}; shard {index} must be {name!r}")
    path = out / name
    if not path.is_file():
        raise _Bad(f"{name} is listed in {MANIFEST} but missing")
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise _Bad(
            f"{name} is {size:,} bytes but {MANIFEST} records {entry['bytes']:,} (truncated or rewritten)"
        )
    if verify:
        _check_checksum(path, entry.get("checksum"))
    try:
        import datasets

        part = datasets.Dataset.from_file(str(path))
    except Exception as err:  # any bytes can be handed to the Arrow reader
        raise _Bad(
            f"{name} cannot be read as an Arrow shard ({type(err).__name__}: {_short(str(err))})"
        ) from err
    if part.features != features or not part.data.schema.remove_metadata().equals(
        features.arrow_schema.remove_metadata()
    ):
        raise _Bad(
            f"{name}'s columns do not match field 'features' in {MANIFEST} ({_schema_diff(part, features)})"
        )
    if part.num_rows != stop - start:
        raise _Bad(
            f"{name} holds {part.num_rows:,} rows, but {MANIFEST} says it holds examples {start:,} to "
            f"{stop:,} ({stop - start:,} rows)"
        )
    if not np.array_equal(part.data.column("example").to_numpy(), np.arange(start, stop)):
        raise _Bad(
            f"{name}'s 'example' column is not the examples {start:,} to {stop:,} that {MANIFEST} lists"
        )
    return part


def _check_checksum(path: Path, recorded: Any) -> None:
    if not isinstance(recorded, str) or ":" not in recorded:
        raise _Bad(
            f"{MANIFEST} records no checksum for {path.name} (an edited manifest, or one written before "
            "interp recorded checksums)",
            f"{_RERUN}, or pass verify=False if you trust these files.",
        )
    algorithm = recorded.partition(":")[0]
    try:
        computed = _file_checksum(path, algorithm)
    except KeyError:
        raise _Bad(f"{path.name}'s checksum in {MANIFEST} is of unknown kind {algorithm!r}") from None
    if computed != recorded:
        raise _Bad(
            f"{path.name} does not match its checksum in {MANIFEST}: its bytes changed after it was "
            "written (disk corruption or an edit)"
        )


def _schema_diff(part: datasets.Dataset, features: datasets.Features) -> str:
    """The first column whose type differs between a shard and the manifest, in words."""
    ours, theirs = dict(part.features), dict(features)
    for column in dict.fromkeys([*ours, *theirs]):
        if column not in ours or column not in theirs:
            side = "the manifest" if column in theirs else "the shard"
            return f"column {column!r} is only in {side}"
        if ours[column] != theirs[column]:
            return f"column {column!r} is {_short(theirs[column])} in the manifest, {_short(ours[column])} in the shard"
    return "the Arrow types differ"


def _read_manifest(out: Path) -> dict[str, Any] | None:
    try:
        return _parse_manifest(out)
    except _Bad:
        return None


def _parse_manifest(out: Path) -> dict[str, Any] | None:
    """The manifest in ``out``; None if there is none, ``_Bad`` if it is not a capture manifest."""
    path = out / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise _Bad(f"{path} is not readable JSON ({err})") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise _Bad(f'{path} is not an interp capture manifest (no "format": "{FORMAT}")')
    return manifest


def _manifest_or_error(out: Path) -> dict[str, Any]:
    try:
        manifest = _parse_manifest(out)
    except _Bad as bad:
        raise InputError(
            f"{bad.problem}. Rerun the same capture_to_disk call (or `interp capture`) to capture again."
        ) from None
    if manifest is None:
        raise InputError(
            f"{out} holds no capture (no {MANIFEST}). Write one with "
            "interp.capture_to_disk(model, inputs, names, out_dir) or `interp capture`."
        )
    return manifest


def _write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    manifest["updated"] = _now()
    tmp = out / f"{MANIFEST}.tmp"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out / MANIFEST)
    _fsync_dir(out)


def _fsync_dir(out: Path) -> None:
    """Make renames in ``out`` durable (a power cut after this cannot undo them)."""
    try:
        fd = os.open(out, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms that cannot open a directory
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - filesystems without directory fsync
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``out/.lock`` (released by the OS if the process dies)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX: no cross-process lock
        yield
        return
    with open(out / LOCK, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held = True
            if os.fstat(handle.fileno()).st_ino != _inode(out / LOCK):  # a writer unlinked it as we opened
                raise OSError(errno.EWOULDBLOCK, "the lock file was replaced")
        except OSError as err:
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise InputError(
                    f"another capture is writing to {out} right now. Wait for it, or use another out_dir."
                ) from err
            warnings.warn(  # e.g. a network filesystem without locks
                f"cannot lock {out} ({err}); make sure no other capture writes there at the same time",
                stacklevel=3,
            )
            held = False
        try:
            yield
        finally:
            if held:  # remove the file while still holding it, so no 0-byte .lock is left behind
                (out / LOCK).unlink(missing_ok=True)
                fcntl.flock(handle, fcntl.LOCK_UN)


def _inode(path: Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}" + ("" if n == 1 else "s")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# ------------------------------------------------------------------------------------------------
# The capture loop
# ------------------------------------------------------------------------------------------------


_clock = time.monotonic  # a seam for tests that make time pass


@dataclass(frozen=True)
class _ShardLimits:
    """When the open shard is closed: after this many bytes, rows or seconds, whichever first."""

    bytes: float
    rows: float
    seconds: float

    @classmethod
    def checked(cls, shard_mb: Any, shard_rows: Any, shard_seconds: Any) -> _ShardLimits:
        for name, value in (("shard_mb", shard_mb), ("shard_seconds", shard_seconds)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
                raise InputError(f"{name} must be a number >= 0, got {value!r}")
        if shard_rows is not None and (not _is_int(shard_rows) or shard_rows < 0):
            raise InputError(f"shard_rows must be an integer >= 0 or None (no row limit), got {shard_rows!r}")
        rows = math.inf if shard_rows is None else shard_rows
        return cls(shard_mb * 1e6, rows, shard_seconds)

    def reached(self, writer: _ShardWriter) -> bool:
        return (
            writer.nbytes >= self.bytes
            or writer.stop - writer.start >= self.rows
            or _clock() - writer.began >= self.seconds
        )


class _HashingSink:
    """The file a shard is written to: every byte Arrow writes goes to the file and the checksum,
    so committing a shard never reads it back."""

    def __init__(self, path: Path, algorithm: str) -> None:
        self.raw = open(path, "wb")  # noqa: SIM115 - closed in close(), via Arrow's PythonFile
        self.algorithm, self.hash, self.position = algorithm, _hasher(algorithm), 0

    @property
    def closed(self) -> bool:
        return self.raw.closed

    def write(self, data: Any) -> int:
        self.hash.update(data)
        self.position += len(data)
        return self.raw.write(data)

    def flush(self) -> None:
        self.raw.flush()

    def tell(self) -> int:
        return self.position

    def close(self) -> None:
        if not self.raw.closed:
            self.raw.flush()
            os.fsync(self.raw.fileno())  # on disk before it is renamed into place
            self.raw.close()

    def checksum(self) -> str:
        return f"{self.algorithm}:{self.hash.hexdigest()}"


class _ShardWriter:
    """One shard file being written under a temporary name; ``commit`` makes it durable and visible."""

    def __init__(self, out: Path, index: int, start: int, schema: pa.Schema, tag: str, began: float) -> None:
        import pyarrow as pa

        self.name = f"shard-{index:05d}.arrow"
        # A fingerprint in the schema metadata spares datasets from hashing the table on every open.
        meta = json.loads(schema.metadata[b"huggingface"])
        meta["fingerprint"] = hashlib.blake2b(f"{tag}:{index}:{start}".encode(), digest_size=8).hexdigest()
        schema = schema.with_metadata({**schema.metadata, b"huggingface": json.dumps(meta).encode()})
        self.out, self.start, self.stop, self.began = out, start, start, began
        self.tmp = out / f"{self.name}.tmp-{os.getpid()}"
        self.sink = _HashingSink(self.tmp, CHECKSUM)
        self.file = pa.PythonFile(self.sink, mode="w")  # closed in commit/abort
        self.writer = pa.ipc.new_stream(self.file, schema)
        self.clean = True  # False while a record batch is half-written

    @property
    def nbytes(self) -> int:
        return self.sink.tell()

    def write(self, table: pa.Table, stop: int) -> None:
        self.clean = False
        self.writer.write_table(table)
        self.clean = True
        self.stop = stop

    def commit(self) -> dict[str, Any]:
        self.writer.close()
        self.file.close()  # flushes and fsyncs (the sink's close)
        final = self.out / self.name
        os.replace(self.tmp, final)  # made durable by the manifest write that lists it (its dir fsync)
        return {
            "file": self.name,
            "start": self.start,
            "stop": self.stop,
            "bytes": final.stat().st_size,
            "checksum": self.sink.checksum(),
        }

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()
        with contextlib.suppress(Exception):
            self.file.close()
        with contextlib.suppress(FileNotFoundError):
            self.tmp.unlink()


def _run(
    model: HookedModel,
    source: _Source,
    chosen: list[str],
    store_dtype: str | None,
    batch_size: int,
    out: Path,
    manifest: dict[str, Any],
    start: int,
    limits: _ShardLimits,
    bar: Any,
    *,
    stop: int | None = None,
    tick: Any = None,
) -> None:
    """Capture examples ``[start, stop)`` (stop: all) into ``out``, shard by shard; ``tick()`` runs
    before each batch (a data-parallel job's check that no other rank has failed)."""
    stop = source.n if stop is None else stop
    features = _features_from_dict(manifest["features"]) if manifest.get("features") else None
    shapes = model.hook_shapes
    ragged = {n for n in chosen if source.kind == "text" and "pos" in (shapes.get(n) or ())}
    writer: _ShardWriter | None = None
    tokens = written = 0
    began = time.perf_counter()
    try:
        for lo in range(start, stop, batch_size):
            hi = min(lo + batch_size, stop)
            if tick is not None:
                tick()
            batch_began = _clock()
            _, cache = model.run_with_cache(source.batch(lo, hi), names=chosen, stop_early=True)
            columns, n_tokens = _rows(model, source, cache, chosen, store_dtype, lo, hi)
            del cache
            if features is None:
                features = _infer_features(columns, ragged)
                manifest["features"] = features.to_dict()
            table = _to_table(columns, features)
            del columns
            if writer is None:
                tag = f"{manifest['inputs_fingerprint']}:{manifest['names']}:{manifest['created']}"
                index = len(manifest["shards"])
                writer = _ShardWriter(out, index, lo, features.arrow_schema, tag, batch_began)
            _write_batch(writer, table, hi)
            del table
            tokens += n_tokens
            if hi == stop or limits.reached(writer):
                written += writer.nbytes
                manifest["shards"].append(writer.commit())
                writer = None
                _write_manifest(out, manifest)
            elapsed = max(time.perf_counter() - began, 1e-9)
            current = written + (writer.nbytes if writer is not None else 0)
            rates = f"{tokens / elapsed:,.0f} tok/s, " if tokens else ""
            bar.set_postfix_str(f"{rates}{current / 1e6 / elapsed:,.1f} MB/s", refresh=False)
            bar.update(hi - lo)
    except BaseException:
        # Keep every whole batch already in the open shard: close it and list it, then re-raise.
        if writer is not None and writer.clean and writer.stop > writer.start:
            try:
                manifest["shards"].append(writer.commit())
                _write_manifest(out, manifest)
            except Exception:
                writer.abort()
        elif writer is not None:
            writer.abort()
        raise


def _write_batch(writer: _ShardWriter, table: pa.Table, stop: int) -> None:
    """Append one batch to the open shard (a seam for tests that simulate crashes)."""
    writer.write(table, stop)


def _rows(
    model: HookedModel,
    source: _Source,
    cache: Any,
    chosen: list[str],
    store_dtype: str | None,
    lo: int,
    hi: int,
) -> tuple[dict[str, Any], int]:
    """One batch as columns: a list of per-example arrays, or one ``[n, ...]`` array when every
    example has the same shape; plus the number of real tokens."""
    n = hi - lo
    columns: dict[str, Any] = {"example": list(range(lo, hi))}
    keep: list[torch.Tensor | None] = [None] * n
    n_tokens = 0
    if source.kind in ("text", "tokens"):
        ids = cache.meta["input_ids"]
        mask = cache.meta.get("attention_mask")
        if mask is not None and not bool(mask.bool().all()):
            keep = [row.bool().nonzero().squeeze(1) for row in mask]
        columns["input_ids"] = [
            (ids[i] if keep[i] is None else ids[i, keep[i]]).numpy().astype(np.int64) for i in range(n)
        ]
        n_tokens = sum(len(r) for r in columns["input_ids"])
        str_tokens = cache.meta.get("str_tokens")
        tokenizer = getattr(model, "tokenizer", None)
        if str_tokens is None and tokenizer is not None:
            str_tokens = [tokenizer.convert_ids_to_tokens(r.tolist()) for r in columns["input_ids"]]
        if str_tokens is not None:
            columns["str_tokens"] = [list(map(str, t)) for t in str_tokens]
    shapes = model.hook_shapes
    for name in chosen:
        act = cache[name]
        symbolic = shapes.get(name)
        if symbolic is None or len(symbolic) != act.ndim or "batch" not in symbolic:
            symbolic = ("batch", *[None] * (act.ndim - 1))
        act = act.movedim(symbolic.index("batch"), 0)
        rest = [d for d in symbolic if d != "batch"]
        pos_axes = [i for i, d in enumerate(rest) if d == "pos"]
        if act.shape[0] != n:
            raise InputError(
                f"hook {name!r} gave a tensor of shape {tuple(act.shape)} whose first axis is not the "
                f"batch of {n}; it cannot be split per example. Capture a different hook point."
            )
        act = _cast(act.detach(), store_dtype)
        if not pos_axes or all(k is None for k in keep):  # nothing to trim: the batch as one array
            columns[name] = act.cpu().contiguous().numpy()
        else:
            per_example = []
            for i in range(n):
                row = act[i]
                for axis in pos_axes if keep[i] is not None else ():
                    row = row.index_select(axis, keep[i].to(row.device))
                per_example.append(row.cpu().contiguous().numpy())
            columns[name] = per_example
        del act
    return columns, n_tokens


def _cast(act: torch.Tensor, store_dtype: str | None) -> torch.Tensor:
    if act.is_floating_point():
        if store_dtype is not None:
            return act.to(getattr(torch, store_dtype))
        if act.dtype not in _STORABLE:  # bfloat16 and friends: Arrow has no such type
            return act.float()
    elif act.dtype not in _STORABLE:
        return act.long()
    return act


def _normalize_dtype(dtype: str | torch.dtype | None) -> str | None:
    if dtype is None:
        return None
    text = str(dtype).removeprefix("torch.").lower()
    text = _DTYPE_ALIASES.get(text, text)
    if text not in ("float16", "float32", "float64"):
        hint = " (Arrow has no bfloat16; use float16 or float32)" if "bf" in text else ""
        raise InputError(f"dtype must be float16, float32 or float64, got {dtype!r}{hint}")
    return text


# ------------------------------------------------------------------------------------------------
# Arrow
# ------------------------------------------------------------------------------------------------


def _value(dtype: str) -> Any:
    from datasets import Value

    return Value(dtype)


def _infer_features(columns: dict[str, Any], ragged: set[str]) -> datasets.Features:
    """Column types from the first batch: fixed-shape arrays as ``ArrayND`` (fast reads), arrays
    whose ``pos`` axes vary per example (text) as nested lists of the same depth."""
    from datasets import Array2D, Array3D, Array4D, Array5D, Features, List

    fixed_types = {2: Array2D, 3: Array3D, 4: Array4D, 5: Array5D}
    features: dict[str, Any] = {"example": _value("int64")}
    if "input_ids" in columns:
        features["input_ids"] = List(_value("int64"))
    if "str_tokens" in columns:
        features["str_tokens"] = List(_value("string"))
    for name, rows in columns.items():
        if name in features:
            continue
        first = rows[0]
        dtype = str(first.dtype)
        varies = name in ragged or len({r.shape for r in rows}) > 1
        if first.ndim == 0:
            features[name] = _value(dtype)
        elif first.ndim in fixed_types and not varies:
            features[name] = fixed_types[first.ndim](shape=tuple(first.shape), dtype=dtype)
        else:
            feature: Any = _value(dtype)
            for _ in range(first.ndim):
                feature = List(feature)
            features[name] = feature
    return Features(features)


def _features_from_dict(data: dict[str, Any]) -> datasets.Features:
    from datasets import Features

    return Features.from_dict(data)


def _to_table(columns: dict[str, Any], features: datasets.Features) -> pa.Table:
    import pyarrow as pa

    schema = features.arrow_schema
    arrays = []
    for field in schema:
        rows = columns.get(field.name)
        if rows is None:
            raise InputError(
                f"column {field.name!r} is missing from this batch though the capture has it; "
                "rerun with resume=False"
            )
        arrays.append(_column(rows, field.type, field.name))
    return pa.Table.from_arrays(arrays, schema=schema)


def _column(rows: Any, pa_type: pa.DataType, name: str) -> pa.Array:
    import pyarrow as pa

    if name == "example":
        return pa.array(np.asarray(rows, dtype=np.int64), type=pa_type)
    if name == "str_tokens":
        return pa.array(rows, type=pa_type)
    if isinstance(pa_type, pa.ExtensionType):
        expected = tuple(pa_type.shape)
        bad = next((shape for shape in _shapes(rows) if shape != expected), None)
        if bad is not None:
            raise InputError(
                f"hook {name!r} has per-example shape {bad} in this batch but {expected} before; "
                "a capture's fixed-shape columns must keep their shape"
            )
        return pa.ExtensionArray.from_storage(pa_type, _nested(rows, pa_type.storage_type))
    depth, leaf = 0, pa_type
    while pa.types.is_list(leaf):
        depth, leaf = depth + 1, leaf.value_type
    if depth == 0:
        return pa.array(np.asarray(rows), type=pa_type)
    bad = next((shape for shape in _shapes(rows) if len(shape) != depth), None)
    if bad is not None:
        raise InputError(f"hook {name!r} has per-example shape {bad}, expected {depth} dims")
    return _nested(rows, pa_type)


def _shapes(rows: Any) -> set[tuple[int, ...]]:
    return {tuple(rows.shape[1:])} if isinstance(rows, np.ndarray) else {r.shape for r in rows}


def _nested(rows: Any, pa_type: pa.DataType) -> pa.Array:
    """Nested Arrow lists from per-example arrays (any shapes of one rank) or one ``[n, ...]``
    array, without Python loops over elements: one flat buffer plus one offsets array per level."""
    import pyarrow as pa

    leaf = pa_type
    while pa.types.is_list(leaf):
        leaf = leaf.value_type
    uniform = isinstance(rows, np.ndarray)
    flat = rows.reshape(-1) if uniform else np.concatenate([r.reshape(-1) for r in rows])
    if flat.size >= 2**31:
        raise InputError(
            "one batch of one hook holds more than 2**31 values, beyond what a shard column can index; "
            "use a smaller batch_size"
        )
    values = pa.array(flat, type=leaf)
    if uniform:
        n, shape = rows.shape[0], rows.shape[1:]
        for level in reversed(range(len(shape))):
            count = n * math.prod(shape[:level])
            offsets = np.arange(count + 1, dtype=np.int32) * np.int32(shape[level])
            values = pa.ListArray.from_arrays(pa.array(offsets), values)
        return values.cast(pa_type) if values.type != pa_type else values
    for level in reversed(range(rows[0].ndim)):
        counts = [math.prod(r.shape[:level]) for r in rows]
        lengths = np.repeat([r.shape[level] for r in rows], counts)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
        np.cumsum(lengths, out=offsets[1:])
        values = pa.ListArray.from_arrays(pa.array(offsets), values)
    return values.cast(pa_type) if values.type != pa_type else values


# ------------------------------------------------------------------------------------------------
# Data parallel: one part per rank, merged by rank 0
# ------------------------------------------------------------------------------------------------


def _capture_parts(job: _Job, ctx: Any, progress: bool, timeout: float) -> None:
    """The collective capture (see capture_to_disk): check that every rank was given the same
    capture, let rank 0 prepare the directory, capture this rank's parts, let rank 0 merge."""
    from tqdm.auto import tqdm

    from interp import distributed

    header = job.header()
    with distributed.coordinator(ctx, "capture", timeout) as co, contextlib.ExitStack() as held:
        identities = co.phase("identity", lambda: _identity(header))
        differ = [rank for rank, value in enumerate(identities) if value != identities[0]]
        if differ:
            raise InputError(
                f"rank {differ[0]} was given a different capture than rank 0 (model, hook names, dtype, "
                "batch size or inputs). Every rank must call capture_to_disk with the same arguments."
            )

        def prepare() -> dict[str, Any]:
            held.enter_context(_locked(job.out))  # rank 0 holds the directory until the merge
            return _prepare_parts(job, header, ctx.world_size)

        plan = co.phase("prepare", prepare if ctx.is_main else lambda: None)[0]
        show = progress and ctx.is_main
        bar = _JobBar(
            co, tqdm(total=job.source.n, unit="ex", desc=f"capture {job.out.name}", disable=not show)
        )
        if show and plan["note"]:
            bar.write(plan["note"])
        try:
            if plan["ranges"] is None:  # one process's capture: rank 0 finishes (or checks) it
                co.phase("capture", lambda: job.single(bar, show) if ctx.is_main else None, bar.poll)
            else:
                mine = [
                    (p, lo, hi) for p, (lo, hi) in enumerate(plan["ranges"]) if p % ctx.world_size == ctx.rank
                ]
                co.phase(
                    "capture",
                    lambda: [job.part(p, lo, hi, bar, co.check_abort) for p, lo, hi in mine],
                    bar.poll,
                )
                co.phase("merge", lambda: _merge_parts(job.out, plan["ranges"]) if ctx.is_main else None)
        finally:
            bar.close()


def _identity(header: dict[str, Any]) -> str:
    """What every rank of one capture must agree on, as one string."""
    keys = [*_IDENTITY, "batch_size"]
    return json.dumps({k: header.get(k) for k in keys}, sort_keys=True, default=str)


def _prepare_parts(job: _Job, header: dict[str, Any], world_size: int) -> dict[str, Any]:
    """Rank 0, holding the lock: start or resume a data-parallel capture. Returns the plan:
    ``ranges`` (one ``[lo, hi)`` per part, or None for a one-process capture that rank 0 finishes)
    and a ``note`` for the user."""
    out = job.out
    existing = _read_manifest(out) if job.resume else None
    if existing is not None and not _is_parts(existing):
        note = None
        if not existing.get("complete"):
            note = (
                f"{out} holds a capture begun by one process: rank 0 finishes it alone while the other "
                f"{world_size - 1} wait (rerun with resume=False / --no-resume to split it across ranks)"
            )
        return {"ranges": None, "note": note}
    if existing is not None:
        differ = [
            label
            for key, label in _IDENTITY.items()
            if key != "range" and existing.get(key) != header.get(key)
        ]
        if differ:
            raise InputError(
                f"{out} holds a capture made with a different {', '.join(differ)}. Use a new out_dir, or "
                "pass resume=False (`interp capture --no-resume`) to delete it and start over."
            )
        ranges = existing["parts"]
        if not _valid_ranges(ranges, header["n_examples"]):
            raise InputError(
                f"field 'parts' in {out / MANIFEST} is {_short(ranges)}, not contiguous ranges over the inputs. "
                "Rerun with resume=False (`--no-resume`) to capture again."
            )
        for p in out.iterdir():  # shards left by a merge that was killed before its manifest
            if _OURS_RE.match(p.name) and p.name not in (MANIFEST, LOCK, PARTS):
                p.unlink()
        was = existing.get("world_size")
        note = None
        if was != world_size:
            note = (
                f"resuming a capture split into {len(ranges)} parts (by {was} processes) on {world_size}: "
                f"part p runs on rank p % {world_size}; the dataset is the same"
            )
        return {"ranges": ranges, "note": note}
    for p in out.iterdir():  # a fresh start: nothing of ours survives (the caller refused foreign files)
        if p.name == PARTS and p.is_dir():
            _rmtree(p)
        elif _OURS_RE.match(p.name) and p.name != LOCK:
            p.unlink()
    ranges = _part_ranges(header["n_examples"], job.batch_size, world_size)
    manifest = {**header, "parts": ranges, "world_size": world_size, "features": None, "shards": [],
                "complete": False, "created": _now()}  # fmt: skip
    _write_manifest(out, manifest)
    return {"ranges": ranges, "note": None}


def _part_ranges(n: int, batch_size: int, parts: int) -> list[list[int]]:
    """``parts`` contiguous ranges over ``n`` examples, cut on ``batch_size`` boundaries (so each
    forward pass holds the same examples as in one process), as even as that allows."""
    batches = math.ceil(n / batch_size)
    parts = min(parts, batches)
    cuts = [min(n, (p * batches // parts) * batch_size) for p in range(parts + 1)]
    return [[cuts[p], cuts[p + 1]] for p in range(parts)]


def _valid_ranges(ranges: Any, n: int) -> bool:
    if not isinstance(ranges, list) or not ranges:
        return False
    expected = 0
    for span in ranges:
        if not (
            isinstance(span, list)
            and len(span) == 2
            and all(map(_is_int, span))
            and span[0] == expected < span[1]
        ):
            return False
        expected = span[1]
    return expected == n


def _merge_parts(out: Path, ranges: list[list[int]]) -> None:
    """Rank 0: every part checked and complete, their shards linked into ``out`` in input order,
    then the one manifest written, then the parts removed. Each step can be killed and rerun: shards
    linked before the manifest are unlisted (removed on rerun), parts left after it are ignored."""
    top = _parse_manifest(out)
    assert top is not None
    features: Any = None
    shards: list[dict[str, Any]] = []
    for index, (lo, hi) in enumerate(ranges):
        directory = out / PARTS / f"part-{index:05d}"
        manifest = _read_manifest(directory)
        if manifest is None or manifest.get("range") != [lo, hi]:
            raise InputError(
                f"part {index} of {out} (examples {lo:,} to {hi:,}) has no manifest where rank 0 can read it. "
                "The output directory must be one that every node shares (NFS, Lustre, a shared volume); "
                f"then {_RERUN[0].lower()}{_RERUN[1:]}."
            )
        report = _inspect(directory, manifest, verify=False)  # checksummed as written or verified on resume
        if report.problem is not None or not manifest["complete"]:
            raise InputError(
                f"part {index} of {out} is not finished ({report.problem or 'incomplete'}). {_RERUN}."
            )
        if features is None:
            features = manifest["features"]
        elif manifest["features"] != features:
            raise InputError(
                f"part {index} of {out} has other columns than part 0 ({_short(manifest['features'])}); a hook "
                "changed its shape between examples. Capture the parts' hooks separately."
            )
        for entry in report.shards:
            name = f"shard-{len(shards):05d}.arrow"
            _link(directory / entry["file"], out / name)
            shards.append({**entry, "file": name})
    merged = {k: v for k, v in top.items() if k != "parts"}
    merged.update(features=features, shards=shards, complete=True, parts_merged=len(ranges))
    _write_manifest(out, merged)
    _rmtree(out / PARTS)


def _link(source: Path, target: Path) -> None:
    """``target`` becomes the same file as ``source`` (a hard link; a copy where links fail)."""
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:
        import shutil

        shutil.copyfile(source, target)
        with open(target, "rb+") as f:
            os.fsync(f.fileno())


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


class _JobBar:
    """Rank 0's one bar for the whole job: every rank adds its examples to the job's counter."""

    def __init__(self, co: Any, bar: Any) -> None:
        self.co, self.bar = co, bar

    def update(self, n: int) -> None:
        self._show(self.co.add_progress(n))

    def poll(self) -> None:
        self._show(self.co.add_progress(0))

    def _show(self, done: int) -> None:
        if done > self.bar.n:
            self.bar.update(done - self.bar.n)

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        pass  # per-rank rates would mislead; tqdm's own rate is the job's

    def write(self, text: str) -> None:
        self.bar.write(text)

    def close(self) -> None:
        self.bar.close()


def shard_files(out_dir: str | os.PathLike, *, verify: bool = True) -> list[str]:
    """Finished shard files of a capture, in order (for tools that read the Arrow files directly).

    The same checks as ``load_capture`` run first, so a listed file is one that verifies; an
    unfinished capture lists its finished shards, and a directory with no capture lists none."""
    out = Path(out_dir).expanduser()
    if not (out / MANIFEST).is_file():
        return []
    report = _inspect(out, _manifest_or_error(out), verify=verify)
    if report.problem is not None:
        raise InputError(f"the capture in {out} cannot be trusted: {report.problem}. {report.fix}")
    return [str(out / s["file"]) for s in report.shards]


__all__: Sequence[str] = ["capture_to_disk", "load_capture", "read_inputs", "shard_files"]
