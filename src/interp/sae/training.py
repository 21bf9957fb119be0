"""``train``: fit a dictionary to a model's activations, streamed with bounded memory.

    >>> sae = S.train(model, "blocks.0.hook_resid_post", texts, arch="topk", d_sae=512, k=16,
    ...               tokens=200_000, out="runs/sae0")

Data (``data``), in any of three forms, read in ``batch_size``-token batches through a bounded
shuffle buffer (``buffer_batches`` batches), looping over the data until ``tokens`` are seen:

- a capture directory written by ``interp.capture_to_disk`` (Arrow shards, read row by row);
- a float tensor ``[..., d_in]`` (for a transcoder, a pair ``(x, y)``);
- model inputs (texts, token ids, or a module's input batch), run through the model
  ``model_batch_size`` at a time; padding positions are dropped.

Recipes (SAELens / Anthropic / OpenAI conventions):

- ``standard`` (and transcoders): MSE + ``l1_coefficient`` · Σ acts·‖W_dec row‖, the coefficient
  warmed up linearly over ``l1_warmup_steps``; latents dead for ``dead_after_tokens`` tokens are
  resampled every ``resample_every`` steps (towards badly reconstructed inputs, fresh Adam state);
- ``jumprelu``: MSE + ``l1_coefficient`` · L0, with straight-through gradients to the threshold
  (rectangle kernel of width ``jumprelu_bandwidth``; Rajamanoharan et al. 2024);
- ``topk`` / ``batchtopk``: MSE + ``aux_coefficient`` · the AuxK loss (the ``aux_k`` dead latents
  with the largest pre-activations reconstruct the residual); decoder rows kept at unit norm;
  BatchTopK learns its inference threshold (EMA of the smallest kept activation) and is saved as
  JumpReLU;
- ``b_dec`` starts at the mean of the first batch (``b_dec_init="mean"``; or ``"zeros"``);
- Adam; the learning rate warms up over ``lr_warmup_steps`` and decays linearly to 0 over the last
  ``lr_decay_steps``.

With ``out``, the run writes ``out/checkpoint`` (an SAE dir + ``trainer_state.safetensors``) every
``checkpoint_every`` steps and ``out/final`` at the end; rerunning the same call resumes from the
checkpoint and gives the same result as an uninterrupted run. NaN or inf in a batch of activations
(or in the loss) stops the run with an error naming the step; the last good checkpoint is kept.
The config, seed and data description go to ``sae.cfg.metadata["training"]``; per-step metrics to
``sae.history`` (and ``out/history.json``).

Data parallel (inside a ``torch.distributed`` group, e.g. under ``torchrun``; every rank calls
``train`` with the same arguments): the data is split into ``data_lanes`` contiguous lanes
(default: the world size of the run's first start), each with its own seeded shuffle buffer
giving ``batch_size / data_lanes`` tokens per step; a step's global batch is every lane's batch,
and rank ``r`` reads only lanes ``p % world_size == r`` (its share of a capture's rows, hence of
its shards). Each rank's loss is weighted by its share of the global batch and the gradients are
summed over the ranks (``distributed.GradientSync``: through shared memory between ranks on one
host, else DistributedDataParallel's all-reduce, each parameter's sum started as the backward pass
finishes its gradient; the next batch is read meanwhile, and Adam updates the decoder while the
encoder's sum, ready last, is still in flight). Ranks on one host also split the update: the
parameters and Adam's state live in the shared block, and each rank sums the gradients of, and
runs Adam on, its own share of every parameter's rows (``_SharedUpdate``), instead of every rank
repeating all of it.
Everything that looks at the whole batch (dead-latent counts, the AuxK normaliser, ``b_dec``'s
initial mean, resampling, the metrics) is reduced across ranks too; those reductions run
asynchronously and are read after the backward pass, so the ranks meet once per step (twice
while AuxK has dead latents to select mid-step).
So the same seed, ``batch_size`` and ``data_lanes`` give the same weights on any number of
processes up to ``data_lanes`` (a one-process run with ``data_lanes=N`` equals an N-process run,
to float rounding). Rank 0 writes the checkpoints; a run resumes on any such number of processes.
BatchTopK's batch-level top-k needs the whole batch on one process and is refused there.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from interp import distributed
from interp.errors import InputError
from interp.models.zoo.checkpoint import read_verified, write_verified
from interp.sae.config import SAEConfig
from interp.sae.io import load as load_sae
from interp.sae.io import save as save_sae
from interp.sae.modules import SAE

# TopK steps back-propagate and decode through the kept latents only (``_Trainer.sparse_topk_loss``);
# False: the dense reference.
SPARSE_TOPK = True

TRAINABLE = ("standard", "topk", "batchtopk", "jumprelu", "transcoder", "skip_transcoder")


@dataclass
class TrainConfig:
    """Everything that determines a run (recorded in the SAE's metadata and the checkpoint)."""

    hook: str
    arch: str = "topk"
    d_sae: int = 1024
    k: int | None = 32
    hook_out: str | None = None
    l1_coefficient: float = 5.0
    lr: float = 3e-4
    tokens: int = 1_000_000
    batch_size: int = 4096
    seed: int = 0
    lr_warmup_steps: int = 0
    lr_decay_steps: int = 0
    l1_warmup_steps: int = 0
    aux_k: int | None = None
    aux_coefficient: float = 1 / 32
    dead_after_tokens: int = 100_000
    resample_every: int = 0
    checkpoint_every: int = 100
    buffer_batches: int = 8
    model_batch_size: int = 8
    threshold_lr: float = 0.01
    b_dec_init: str = "mean"
    jumprelu_bandwidth: float = 0.001
    jumprelu_init_threshold: float = 0.001
    data_lanes: int = 1

    @property
    def steps(self) -> int:
        return max(1, self.tokens // self.batch_size)


def train(
    model: Any,
    hook: str,
    data: Any,
    *,
    arch: str = "topk",
    d_sae: int = 1024,
    k: int | None = 32,
    out: str | os.PathLike | None = None,
    progress: bool = True,
    data_kind: str = "auto",
    **options: Any,
) -> SAE:
    """Train a dictionary on ``model``'s activations at ``hook`` (see the module docstring).

    Args:
        model: the ``HookedModel`` the activations come from (its name and the hook are recorded;
            needed to compute activations from inputs and to check the hook's width).
        hook: the hook to read; a transcoder also needs ``hook_out=`` (the hook it predicts).
        data: a capture directory, an activation tensor (or ``(x, y)`` pair), or model inputs.
        arch: one of ``TRAINABLE`` (``jumprelu`` trains its threshold; ``batchtopk`` is saved as JumpReLU).
        d_sae, k: dictionary size and, for TopK/BatchTopK, latents per token.
        out: run directory for checkpoints, resume and the final SAE (None: in memory only).
        data_kind: ``"auto"`` (a capture dir, float tensors = activations, else model inputs), or
            force ``"capture"``, ``"activations"`` or ``"inputs"`` (e.g. float inputs of a module model).
        options: any ``TrainConfig`` field (``lr``, ``tokens``, ``batch_size``, ``seed``,
            ``l1_coefficient``, ``lr_warmup_steps``, ``lr_decay_steps``, ``l1_warmup_steps``, ...).
    """
    unknown = sorted(set(options) - set(TrainConfig.__dataclass_fields__))
    if unknown:
        raise InputError(
            f"unknown training option(s) {unknown}; valid: {', '.join(TrainConfig.__dataclass_fields__)}"
        )
    ctx = distributed.current()
    if options.get("data_lanes") is None:
        options["data_lanes"] = _saved_lanes(out) or ctx.world_size
    cfg = TrainConfig(
        hook=hook, arch=arch, d_sae=d_sae, k=k if arch in ("topk", "batchtopk") else None, **options
    )
    _check_config(cfg)
    _check_parallel(cfg, ctx)
    sae_cfg = _sae_config(model, cfg)
    return _Trainer(model, cfg, sae_cfg, data, data_kind, out, progress).run()


def _check_config(cfg: TrainConfig) -> None:
    if cfg.arch not in TRAINABLE:
        raise InputError(f"cannot train arch {cfg.arch!r}. Trainable: {', '.join(TRAINABLE)}")
    for name in ("tokens", "batch_size", "d_sae", "model_batch_size", "buffer_batches"):
        if getattr(cfg, name) < 1:
            raise InputError(f"{name} must be at least 1, got {getattr(cfg, name)}")
    if cfg.b_dec_init not in ("mean", "zeros"):
        raise InputError(f"b_dec_init must be 'mean' or 'zeros', got {cfg.b_dec_init!r}")
    if cfg.lr <= 0:
        raise InputError(f"lr must be positive, got {cfg.lr}")


def _saved_lanes(out: Any) -> int | None:
    """The ``data_lanes`` of the checkpoint in ``out`` (a resume keeps its split of the data)."""
    meta = Path(out) / "checkpoint" / "trainer.json" if out is not None else None
    if meta is None or not meta.is_file():
        return None
    try:
        return int(json.loads(meta.read_text())["config"].get("data_lanes", 1))
    except (ValueError, KeyError, TypeError):
        return None  # the resume itself reports the damaged checkpoint


def _check_parallel(cfg: TrainConfig, ctx: distributed.Context) -> None:
    if not isinstance(cfg.data_lanes, int) or cfg.data_lanes < 1:
        raise InputError(f"data_lanes must be a whole number >= 1, got {cfg.data_lanes!r}")
    if cfg.batch_size % cfg.data_lanes:
        raise InputError(
            f"batch_size {cfg.batch_size} is not a multiple of data_lanes {cfg.data_lanes}; every lane gives "
            "the same number of tokens to a step. Pick a batch_size divisible by data_lanes."
        )
    if ctx.world_size > cfg.data_lanes:
        raise InputError(
            f"this run splits its data into {cfg.data_lanes} lane(s) (data_lanes), fewer than the "
            f"{ctx.world_size} processes; each process needs at least one. Resume on at most "
            f"{cfg.data_lanes} processes, or start a new run (another out=) with data_lanes={ctx.world_size}."
        )
    if ctx.distributed and cfg.arch == "batchtopk":
        raise InputError(
            "BatchTopK keeps the k*batch largest activations of the whole batch, which no single process of "
            "a data-parallel run sees. Train it on one process, or use arch='topk'."
        )


def _sae_config(model: Any, cfg: TrainConfig) -> SAEConfig:
    from interp.sae.splicing import _host, _width

    transcoder = cfg.arch in ("transcoder", "skip_transcoder")
    probe = SAEConfig(d_in=1, d_sae=1, hook_name=cfg.hook)
    site = _host(model, cfg.hook, "hook_name", SAE(probe))
    d_in = _width(site)
    d_out = None
    if transcoder:
        if not cfg.hook_out:
            raise InputError(f"a {cfg.arch} predicts one hook from another: pass hook_out=")
        d_out = _width(_host(model, cfg.hook_out, "hook_name_out", SAE(probe)))
    if d_in is None:
        raise InputError(f"the width of {cfg.hook} is unknown on {model.name}; give the model an input_shape")
    return SAEConfig(
        d_in=d_in,
        d_sae=cfg.d_sae,
        architecture=cfg.arch,
        hook_name=cfg.hook,
        hook_name_out=cfg.hook_out if transcoder else None,
        d_out=d_out if transcoder else None,
        k=cfg.k,
        apply_b_dec_to_input=not transcoder,
        metadata={"model_name": getattr(model, "name", None)},
    )


# ------------------------------------------------------------------------------------------------
# Data: an endless, seeded stream of [batch_size, d] batches with a bounded shuffle buffer
# ------------------------------------------------------------------------------------------------


def _kind(data: Any, data_kind: str) -> str:
    if data_kind != "auto":
        return data_kind
    if isinstance(data, str | os.PathLike) and (Path(data) / "manifest.json").is_file():
        return "capture"
    if isinstance(data, torch.Tensor) and data.is_floating_point():
        return "activations"
    if isinstance(data, tuple) and data and all(isinstance(t, torch.Tensor) for t in data):
        return "activations"
    return "inputs"


def describe_data(data: Any, data_kind: str) -> str:
    """What the run trained on, for the record."""
    kind = _kind(data, data_kind)
    if kind == "capture":
        return f"capture:{Path(data).resolve()}"
    if kind == "activations":
        shapes = [tuple(t.shape) for t in (data if isinstance(data, tuple) else (data,))]
        return f"activations{shapes}"
    try:
        return f"model inputs ({len(data)} rows)"
    except TypeError:
        return "model inputs"


def _rows(
    model: Any, data: Any, names: list[str], cfg: TrainConfig, data_kind: str, lane: tuple[int, int] = (0, 1)
) -> Iterator[tuple[torch.Tensor, ...]]:
    """One pass over lane ``lane[0]`` of ``lane[1]`` (a contiguous share of the examples or token
    rows; all of them for one lane) as chunks of token rows, one tensor per hook name."""
    kind = _kind(data, data_kind)
    if kind == "capture":
        return _capture_rows(_open_capture(Path(data), names), names, lane)
    if kind == "opened":  # a capture opened once by ``stream``
        return _capture_rows(data, names, lane)
    if kind == "activations":
        return _tensor_rows(data if isinstance(data, tuple) else (data,), cfg.batch_size, lane)
    if kind == "inputs":
        return _model_rows(model, _lane_inputs(data, lane), names, cfg.model_batch_size)
    raise InputError(f"data_kind must be 'auto', 'capture', 'activations' or 'inputs', got {data_kind!r}")


def _span(n: int, lane: tuple[int, int]) -> tuple[int, int]:
    """Lane ``index`` of ``lanes``: its contiguous share of ``n`` items."""
    index, lanes = lane
    return index * n // lanes, (index + 1) * n // lanes


def _lane_inputs(data: Any, lane: tuple[int, int]) -> Any:
    if lane[1] == 1:
        return data
    lo, hi = _span(len(data), lane)
    if hasattr(data, "select") and hasattr(data, "column_names"):  # a datasets.Dataset
        return data.select(range(lo, hi))
    return data[lo:hi]


def _tensor_rows(
    data: tuple[torch.Tensor, ...], chunk: int, lane: tuple[int, int] = (0, 1)
) -> Iterator[tuple[torch.Tensor, ...]]:
    flat = [t.reshape(-1, t.shape[-1]) for t in data]
    if len({len(t) for t in flat}) != 1:
        raise InputError(f"the (x, y) tensors hold different numbers of tokens: {[len(t) for t in flat]}")
    lo, hi = _span(len(flat[0]), lane)
    flat = [t[lo:hi] for t in flat]
    for i in range(0, len(flat[0]), chunk):
        yield tuple(t[i : i + chunk] for t in flat)


def _open_capture(path: Path, names: list[str]) -> Any:
    """The capture's Dataset, checked (checksums included) and its columns named in ``names``."""
    from interp.store import load_capture

    ds = load_capture(path)
    missing = [n for n in names if n not in ds.column_names]
    if missing:
        have = [c for c in ds.column_names if c not in ("example", "input_ids", "str_tokens")]
        raise InputError(f"the capture in {path} has no column {missing[0]!r}; it holds {have}")
    return ds


def _capture_rows(
    ds: Any, names: list[str], lane: tuple[int, int] = (0, 1)
) -> Iterator[tuple[torch.Tensor, ...]]:
    table = getattr(ds.data, "table", ds.data)  # the memory-mapped Arrow table under the Dataset
    step = 64  # examples per read: one Arrow slice, flattened to [tokens, d] without Python objects
    lo, hi = _span(len(ds), lane)
    for start in range(lo, hi, step):
        count = min(step, hi - start)
        part = table.slice(start, count)
        yield tuple(_flat_rows(part.column(n), ds, n, start, count) for n in names)


def _flat_rows(column: Any, ds: Any, name: str, start: int, step: int) -> torch.Tensor:
    """A column of nested lists (one ``[tokens, d]`` or ``[d]`` row per example) as ``[tokens, d]``."""
    import pyarrow as pa

    values = column.combine_chunks()
    inner = values
    while pa.types.is_list(values.type) or pa.types.is_large_list(values.type):
        inner, values = values, values.flatten()
    if not pa.types.is_floating(values.type):  # not a plain float capture: let datasets convert it
        rows = ds[start : start + step][name]
        return torch.cat([torch.as_tensor(r).reshape(-1, torch.as_tensor(r).shape[-1]) for r in rows])
    width = len(values) // max(1, len(inner))
    array = values.to_numpy(zero_copy_only=False)  # a view of the memory-mapped shard where it can be
    with warnings.catch_warnings():  # read-only: the rows are only ever copied from (``stream``'s pool)
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array).reshape(-1, width)


def _model_rows(
    model: Any, data: Any, names: list[str], batch_size: int
) -> Iterator[tuple[torch.Tensor, ...]]:
    from interp.sae.evaluation import _batches, _mask

    for batch in _batches(model, data, batch_size):
        _, cache = model.run_with_cache(batch, names=names, stop_early=True)
        mask = _mask(cache, cache[names[0]])
        yield tuple(cache[n][mask].reshape(-1, cache[n].shape[-1]) for n in names)


def stream(
    model: Any,
    data: Any,
    names: list[str],
    cfg: TrainConfig,
    data_kind: str = "auto",
    lane: tuple[int, int] = (0, 1),
) -> Iterator[tuple[torch.Tensor, ...]]:
    """Endless ``batch_size`` batches over repeated passes of the data.

    A buffer of ``buffer_batches`` batches is filled, shuffled (seeded), and its first half
    emitted; the rest stays mixed with what comes next. Memory: the buffer plus one chunk. The
    batches depend only on the order of tokens (not on how the source chunks them), so a capture,
    a tensor and the model's own forward over the same inputs give the same run.

    ``lane=(index, lanes)``: the stream of one lane of the data (see the module docstring), in
    ``batch_size / lanes`` batches with its own seed; ``(0, 1)`` is the whole data.
    """
    if _kind(data, data_kind) == "capture":  # open and verify once, not on every pass over the data
        data, data_kind = _open_capture(Path(data), names), "opened"
    index, lanes = lane
    size = cfg.batch_size // lanes
    gen = torch.Generator().manual_seed(cfg.seed + 1 + 7919 * index)
    cap = size * max(1, cfg.buffer_batches)
    emit = size * max(1, cfg.buffer_batches // 2)
    # The buffer's rows live in one pool (per name), allocated once and refilled in place: a fill
    # writes the new rows into the slots the last fill emitted, and a batch is gathered from the
    # pool as it is handed out. The kept rows stay where they are (``kept``: their slots, in the
    # order the shuffled buffer holds them), so a row is copied twice on its way to a batch
    # (into the pool, out of it) and a fill allocates no rows. Concatenating the kept and new
    # rows into fresh tensors made three cap-sized blocks a fill, which malloc handed back to the
    # OS and faulted in again (fills then took 7-40 ms for the same work, and under DDP every
    # rank waited at each step's meeting for the slowest one); copying them into a reused staging
    # buffer and shuffling that into another still moved every row of the buffer twice a fill.
    pool: list[torch.Tensor] = []
    kept = torch.empty(0, dtype=torch.long)  # slots of the rows kept from the last fill
    free = torch.arange(cap)  # slots the next fill writes its new rows into, in order
    pending: list[tuple[torch.Tensor, ...]] = []
    n_pending = 0
    while True:
        seen = 0
        for chunk in _rows(model, data, names, cfg, data_kind, lane):
            seen += len(chunk[0])
            pending.append(chunk)
            n_pending += len(chunk[0])
            while len(kept) + n_pending >= cap:
                if not pool:
                    pool = [part.new_empty((cap, *part.shape[1:])) for part in chunk]
                _fill(pool, free, pending)
                pending = _after(pending, len(free))
                n_pending = sum(len(part[0]) for part in pending)
                # the shuffled buffer: position i holds the row in slot order[i] (kept rows first,
                # then the new ones, permuted: what shuffling their concatenation would give)
                order = torch.cat([kept, free])[torch.randperm(cap, generator=gen)]
                for start in range(0, emit, size):
                    slots = order[start : start + size]
                    yield tuple(p.index_select(0, slots) for p in pool)
                kept, free = order[emit:], order[:emit]
        if seen == 0:
            where = f" (lane {index} of {lanes}: use fewer data_lanes)" if lanes > 1 else ""
            raise InputError(f"the training data holds no activations{where}")


def _fill(pool: list[torch.Tensor], slots: torch.Tensor, pending: list[tuple[torch.Tensor, ...]]) -> None:
    """The first ``len(slots)`` pending rows, in order, into those slots of the pool."""
    at = 0
    for chunk in pending:
        use = min(len(chunk[0]), len(slots) - at)
        for p, part in zip(pool, chunk, strict=True):
            p.index_copy_(0, slots[at : at + use], part[:use])
        at += use
        if at == len(slots):
            return


def _after(pending: list[tuple[torch.Tensor, ...]], need: int) -> list[tuple[torch.Tensor, ...]]:
    """The pending chunks less their first ``need`` rows (views)."""
    rest = []
    for chunk in pending:
        n = len(chunk[0])
        if need < n:
            rest.append(tuple(part[need:] for part in chunk))
        need = max(0, need - n)
    return rest


# ------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------


class _Trainer:
    def __init__(
        self,
        model: Any,
        cfg: TrainConfig,
        sae_cfg: SAEConfig,
        data: Any,
        data_kind: str,
        out: Any,
        progress: bool,
    ) -> None:
        self.model, self.cfg, self.data, self.data_kind, self.progress = model, cfg, data, data_kind, progress
        self.data_desc = describe_data(data, data_kind)
        self.out = Path(out) if out is not None else None
        self.names = [cfg.hook] + ([cfg.hook_out] if sae_cfg.is_transcoder else [])
        self.ctx = distributed.current()
        world, rank = self.ctx.world_size, self.ctx.rank
        self.lanes = [lane for lane in range(cfg.data_lanes) if lane % world == rank]  # this rank's data
        self.n_local = len(self.lanes) * (cfg.batch_size // cfg.data_lanes)  # its tokens per step
        # its loss weight: the ranks' gradients are summed, which is then the global batch's mean
        self.share = self.n_local / cfg.batch_size
        self.sae = SAE.init(sae_cfg, seed=cfg.seed)
        self.comm_device = torch.device("cpu")
        if self.ctx.distributed and distributed.backend() == "nccl":
            self.comm_device = torch.device("cuda", self.ctx.local_rank)
            self.sae.to(self.comm_device)
        self.sae.train()
        # fused: one vectorised pass per parameter (~1 ms a step here instead of 6+ for the
        # per-tensor loop; the same update to float rounding). Ranks on one host split it
        # (_SharedUpdate); elsewhere every rank runs all of it.
        fused = all(p.device.type in ("cpu", "cuda") for p in self.sae.parameters())
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=cfg.lr, fused=fused or None)
        if self.ctx.distributed:  # every rank starts from rank 0's weights (as DDP would)
            import torch.distributed as dist

            for param in self.sae.parameters():
                dist.broadcast(param.data, 0)
        self.sync: distributed.GradientSync | None = None  # under DDP, while ``run`` runs
        self.shared: _SharedUpdate | None = None  # ranks on one host: Adam split over them
        self.parallel: dict[str, str] = {}  # under DDP: how the gradients were summed, who ran Adam
        self.step = 0
        self.since_fired = torch.zeros(sae_cfg.d_sae, dtype=torch.long)
        # under DDP: this step's fired latents, being summed
        self._fired: _Sum | distributed.DeferredSum | None = None
        self.gen = torch.Generator().manual_seed(cfg.seed + 2)
        self.history: list[dict[str, float]] = []
        self._buffers: dict[str, torch.Tensor] = {}  # see _workspace
        self.weight_grads = _WeightGrads()  # the sparse TopK path's W_enc and W_dec gradients
        if self.sae.cfg.architecture == "batchtopk":
            self.sae.threshold.requires_grad_(False)
        if self.sae.cfg.architecture == "jumprelu":
            with torch.no_grad():
                self.sae.threshold.fill_(cfg.jumprelu_init_threshold)

    # --- schedule ---

    def lr_at(self, step: int) -> float:
        c = self.cfg
        scale = 1.0
        if c.lr_warmup_steps and step < c.lr_warmup_steps:
            scale = (step + 1) / c.lr_warmup_steps
        decay_start = c.steps - c.lr_decay_steps
        if c.lr_decay_steps and step >= decay_start:
            scale = min(scale, (c.steps - step) / c.lr_decay_steps)
        return c.lr * scale

    def l1_at(self, step: int) -> float:
        c = self.cfg
        return c.l1_coefficient * (min(1.0, (step + 1) / c.l1_warmup_steps) if c.l1_warmup_steps else 1.0)

    # --- one step ---

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        sae, arch = self.sae, self.sae.cfg.architecture
        if arch == "topk" and SPARSE_TOPK and not sae.cfg.rescale_acts_by_decoder_norm:
            return self.sparse_topk_loss(x, y)
        pre = sae.pre_acts(x)
        if arch == "jumprelu":
            acts = _JumpReLU.apply(pre, sae.threshold, self.cfg.jumprelu_bandwidth)
        else:
            acts = sae.activation(pre)
        recons = acts @ sae.W_dec + sae.b_dec + sae._skip(x)
        err = recons - y
        mse = err.pow(2).sum(-1).mean()
        self.mark_fired((acts > 0).any(0), len(x))
        metrics = {"mse": float(mse.detach()), "l0": float((acts > 0).float().sum(-1).mean())}
        loss = mse
        if arch in ("topk", "batchtopk"):
            aux = self.aux_loss(pre, y - recons.detach())
            loss = loss + self.cfg.aux_coefficient * aux
            metrics["aux"] = float(aux.detach())
            if arch == "batchtopk":
                self.update_threshold(acts)
        elif arch == "jumprelu":
            l0 = _Step.apply(pre, sae.threshold, self.cfg.jumprelu_bandwidth).sum(-1).mean()
            loss = loss + self.l1_at(self.step) * l0
            metrics["l0_loss"] = float(l0.detach())
        else:
            l1 = (acts * sae.W_dec.norm(dim=-1)).sum(-1).mean()
            loss = loss + self.l1_at(self.step) * l1
            metrics["l1"] = float(l1.detach())
        metrics["loss"] = float(loss.detach())
        return loss, self._mean_metrics(metrics)

    def sparse_topk_loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """The TopK loss touching only the selected latents: the dense path's values (up to float
        summation order) without its ``[batch, d_in] x [d_in, d_sae]`` encoder backward matmuls
        and its two ``[batch, d_sae] x [d_sae, d_in]`` decoder matmuls.

        The pre-activations are one dense matmul (TopK must see all of them) without autograd;
        the gradient reaches them only at the k kept (and the AuxK) entries per token, so
        ``_Selected`` takes it from there to ``W_enc``, ``b_enc`` and the input in
        O(batch·k·d_in). The decoder is ``_DecodedRows``, an ``embedding_bag`` over the k kept
        rows per token with a sparse backward (both O(batch·k·d_in)); so is the AuxK term's.
        """
        sae = self.sae
        x_in = sae._encoder_input(x)
        # x_in = x' - b_dec: its one parameter is b_dec, whose gradient from this side,
        # -W_enc @ (b_enc's gradient), the sink adds (no per-token input gradient is formed)
        credit = sae.cfg.apply_b_dec_to_input and sae.b_dec.requires_grad and not x.requires_grad
        self.weight_grads.input_bias = sae.b_dec if credit else None
        if credit:
            x_in = x_in.detach()
        with torch.no_grad():  # pre_acts' formula, so the same values and selection
            pre = torch.matmul(x_in, sae.W_enc, out=self._workspace("pre", (len(x_in), sae.cfg.d_sae), x_in))
            pre.add_(sae.b_enc)
        index = pre.topk(sae.cfg.k, dim=-1, sorted=False).indices

        def select(chosen: torch.Tensor) -> torch.Tensor:
            return _Selected.apply(pre, chosen, x_in, sae.W_enc, sae.b_enc, self.weight_grads)

        values = select(index).relu()
        recons = _decode_rows(sae, index, values, self.weight_grads) + sae.b_dec + sae._skip(x)
        mse = (recons - y).pow(2).sum(-1).mean()
        on = values > 0
        fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool, device=x.device)
        fired[index[on]] = True
        self.mark_fired(fired, len(x))
        aux = self.sparse_aux_loss(pre, y - recons.detach(), select)
        loss = mse + self.cfg.aux_coefficient * aux
        metrics = {
            "mse": float(mse.detach()),
            "l0": float(on.sum(-1).float().mean()),
            "aux": float(aux.detach()),
        }
        metrics["loss"] = float(loss.detach())
        return loss, self._mean_metrics(metrics)

    def _workspace(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """A buffer kept from step to step for a large intermediate of the step (the ``[batch,
        d_sae]`` pre-activations: 8 MB at batch 1024 and d_sae 2048). A fresh one each step is
        handed back to the OS by malloc and faulted in again page by page: measured here, that
        was the largest part of each step's page faults, and two ranks faulting at once slow
        each other. Nothing holds it past the step (the backward pass never reads it)."""
        held = self._buffers.get(name)
        if held is None or held.shape != shape or held.dtype != like.dtype or held.device != like.device:
            held = self._buffers[name] = like.new_empty(shape)
        return held

    def mark_fired(self, fired: torch.Tensor, n_rows: int) -> None:
        """Count tokens since each latent last fired; under DDP, fired anywhere in the global batch.

        Under DDP the count over the ranks is started here and settled where it is first needed
        (``dead_topk``, when a latent may be dead after this step; else after the backward pass),
        so the ranks do not wait for each other in the middle of the step."""
        if self.ctx.distributed:  # needed mid-step (dead_topk) only if a latent may die
            self._fired = self._start_sum(fired.to(torch.int32), after_backward=not self._may_die())
            return
        self.since_fired = torch.where(fired.cpu(), 0, self.since_fired + n_rows)

    def settle_fired(self) -> None:
        """Apply the global batch's fired latents to ``since_fired`` (waits for the reduction)."""
        if self._fired is not None:
            fired = self._fired.result() > 0
            self._fired = None
            self.since_fired = torch.where(fired.cpu(), 0, self.since_fired + self.cfg.batch_size)

    def dead_topk(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """AuxK's selection: the ``aux_k`` largest pre-activations among dead latents, or None if none is dead."""
        if self._fired is not None:
            if not self._may_die():
                return None  # none can be dead after this step, whatever fired: no need to wait
            self.settle_fired()
        dead = (self.since_fired >= self.cfg.dead_after_tokens).to(pre.device)
        n_dead = int(dead.sum())
        if n_dead == 0:
            return None
        k_aux = min(n_dead, self.cfg.aux_k or self.sae.cfg.d_in // 2)
        return torch.where(dead, pre, torch.full_like(pre, -torch.inf)).topk(k_aux, dim=-1)

    def _may_die(self) -> bool:
        """Whether a latent can be dead after this step, whatever fired in it (DDP, before settling)."""
        return bool((self.since_fired + self.cfg.batch_size >= self.cfg.dead_after_tokens).any())

    def aux_scale(self, residual: torch.Tensor) -> Callable[[], torch.Tensor]:
        """AuxK's normaliser, the residual's mean squared norm over the (global) batch, to call
        once a latent is known dead. Under DDP, when one may be, its sum over the ranks starts
        here, before ``dead_topk`` waits for the fired latents' (the ranks wait once for both;
        a sum nobody reads, when no latent turns out dead, is left to finish on its own)."""
        if not self.ctx.distributed:
            return lambda: residual.pow(2).sum(-1).mean().clamp_min(1e-12)
        if self._may_die():
            total = self._start_sum(residual.pow(2).sum()).result
        else:  # not called this step (no latent is dead): the plain sum, if it ever were
            total = lambda: self._sum(residual.pow(2).sum())  # noqa: E731
        return lambda: (total() / self.cfg.batch_size).clamp_min(1e-12)

    def sparse_aux_loss(self, pre: torch.Tensor, residual: torch.Tensor, select: Any) -> torch.Tensor:
        """``aux_loss`` on the ``aux_k`` kept dead latents only: ``pre`` has no autograd, and
        ``select(index)`` gives its entries at ``index`` with their gradient (``_Selected``)."""
        scale = self.aux_scale(residual)
        kept = self.dead_topk(pre)
        if kept is None:
            return pre.new_zeros(())
        index = kept[1]
        aux_recons = _decode_rows(self.sae, index, select(index).relu(), self.weight_grads)
        return (aux_recons - residual).pow(2).sum(-1).mean() / scale()

    def aux_loss(self, pre: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        scale = self.aux_scale(residual)
        kept = self.dead_topk(pre)
        if kept is None:
            return pre.new_zeros(())
        values, index = kept
        aux_acts = torch.zeros_like(pre).scatter(-1, index, torch.relu(values))
        aux_recons = aux_acts @ self.sae.W_dec
        return (aux_recons - residual).pow(2).sum(-1).mean() / scale()

    @torch.no_grad()
    def update_threshold(self, acts: torch.Tensor) -> None:
        positive = acts[acts > 0]
        if positive.numel():
            t = self.sae.threshold
            t.copy_((1 - self.cfg.threshold_lr) * t + self.cfg.threshold_lr * positive.min())

    @torch.no_grad()
    def after_step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """The in-place steps after Adam's (each rank on its own rows where the ranks share the
        parameters), then resampling."""
        sae = self.sae
        mine = self.shared.rows if self.shared is not None else (lambda param: slice(None))
        if sae.cfg.architecture == "jumprelu":
            sae.threshold[mine(sae.threshold)].clamp_(min=0.0)  # inference: relu(pre) * (pre > threshold)
        if sae.cfg.architecture in ("topk", "batchtopk"):
            rows = sae.W_dec[mine(sae.W_dec)]
            rows.div_(rows.norm(dim=-1, keepdim=True).clamp_min(1e-12))
        if self.shared is not None:
            self.shared.barrier()  # every rank's rows have landed before anyone reads them
        every = self.cfg.resample_every
        last = self.step + 1 >= self.cfg.steps  # never leave freshly resampled latents untrained
        if (
            every
            and sae.cfg.architecture not in ("topk", "batchtopk")
            and (self.step + 1) % every == 0
            and not last
        ):
            batch = self._global_batch(x, y)
            with self.shared.private() if self.shared is not None else contextlib.nullcontext():
                self.resample(*batch)

    @torch.no_grad()
    def resample(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Re-initialise dead latents towards inputs the dictionary reconstructs worst."""
        sae = self.sae
        dead = (self.since_fired >= self.cfg.dead_after_tokens).nonzero().flatten()
        if dead.numel() == 0:
            return
        err = (sae.reconstruct(x) - y).pow(2).sum(-1)
        if float(err.sum()) <= 0:
            return
        pick = torch.multinomial(err.cpu().double(), dead.numel(), replacement=True, generator=self.gen)
        inputs = x[pick.to(x.device)]
        direction = y[pick.to(x.device)] if sae.cfg.is_transcoder else inputs
        direction = direction / direction.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        alive = torch.ones(sae.cfg.d_sae, dtype=torch.bool)
        alive[dead] = False
        enc_norm = sae.W_enc[:, alive].norm(dim=0).mean() if alive.any() else torch.tensor(1.0)
        sae.W_dec[dead] = direction
        enc_dir = inputs / inputs.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        sae.W_enc[:, dead] = (enc_dir * enc_norm * 0.2).T
        sae.b_enc[dead] = 0.0
        for param in (sae.W_enc, sae.W_dec, sae.b_enc):
            state = self.opt.state.get(param, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    if param is sae.W_enc:
                        state[key][:, dead] = 0.0
                    else:
                        state[key][dead] = 0.0
        self.since_fired[dead] = 0

    # --- data parallel: reductions over the ranks (identity on one process) ---

    def _sum(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` summed over the ranks (no gradient)."""
        return self._start_sum(value).result()

    def _start_sum(self, value: torch.Tensor, after_backward: bool = False) -> _Sum | distributed.DeferredSum:
        """``value`` summed over the ranks, started now and read with ``result()``. One read only
        after the backward pass (``after_backward``) rides the step's meeting of the ranks when
        they share memory (``GradientSync.defer_sum``: no collective of its own)."""
        if after_backward and self.sync is not None:
            deferred = self.sync.defer_sum(value)
            if deferred is not None:
                return deferred
        return _Sum(value, self.comm_device if self.ctx.distributed else None)

    def _mean_metrics(self, metrics: dict[str, float]) -> dict[str, float] | _Metrics:
        """Per-rank means weighted by each rank's tokens: the global batch's means (under DDP,
        ``_Metrics``: the reduction is started here and read after the backward pass)."""
        if not self.ctx.distributed:
            return metrics
        local = torch.tensor(list(metrics.values()), dtype=torch.float64) * self.n_local
        return _Metrics(list(metrics), self._start_sum(local, after_backward=True), self.cfg.batch_size)

    def _global_batch(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole step's batch, lanes in order, on every rank (for resampling)."""
        if not self.ctx.distributed:
            return x, y
        import torch.distributed as dist

        pieces: list[Any] = [None] * self.ctx.world_size
        dist.all_gather_object(pieces, (self.lanes, x.cpu(), y.cpu()))
        size = self.cfg.batch_size // self.cfg.data_lanes
        by_lane = {}
        for lanes, px, py in pieces:
            for i, lane in enumerate(lanes):
                by_lane[lane] = (px[i * size : (i + 1) * size], py[i * size : (i + 1) * size])
        order = range(self.cfg.data_lanes)
        return (
            torch.cat([by_lane[lane][0] for lane in order]).to(x.device),
            torch.cat([by_lane[lane][1] for lane in order]).to(y.device),
        )

    def batches(self) -> Iterator[tuple[torch.Tensor, ...]]:
        """This rank's part of every step's batch: its lanes' batches, concatenated."""
        streams = [
            stream(self.model, self.data, self.names, self.cfg, self.data_kind, (lane, self.cfg.data_lanes))
            for lane in self.lanes
        ]
        while True:
            parts = [next(s) for s in streams]
            yield parts[0] if len(parts) == 1 else tuple(torch.cat(p) for p in zip(*parts, strict=True))

    # --- checkpoints ---

    def _checkpoint_dir(self) -> Path:
        assert self.out is not None
        return self.out / "checkpoint"

    def save_checkpoint(self) -> None:
        if self.out is None:
            return
        ckpt = self._checkpoint_dir()
        tmp = self.out / "checkpoint.tmp"
        self._write(tmp)
        if ckpt.exists():
            old = self.out / "checkpoint.old"
            if old.exists():
                _rmtree(old)
            os.replace(ckpt, old)
            os.replace(tmp, ckpt)
            _rmtree(old)
        else:
            os.replace(tmp, ckpt)

    def _write(self, directory: Path) -> None:
        if directory.exists():
            _rmtree(directory)
        self.sae.cfg.metadata["training"] = self.record()
        save_sae(self.sae, directory)
        state: dict[str, torch.Tensor] = {
            "since_fired": self.since_fired.clone(),
            "gen": self.gen.get_state(),
        }
        for i, param in enumerate(self.sae.parameters()):
            for key, value in self.opt.state.get(param, {}).items():
                state[f"opt.{i}.{key}"] = torch.as_tensor(value).clone()
        write_verified(directory / "trainer_state.safetensors", state)
        (directory / "trainer.json").write_text(
            json.dumps({"step": self.step, "config": asdict(self.cfg), "history": self.history}) + "\n"
        )

    def try_resume(self) -> int:
        if self.out is None or not (self._checkpoint_dir() / "trainer.json").is_file():
            return 0
        ckpt = self._checkpoint_dir()
        meta = json.loads((ckpt / "trainer.json").read_text())
        saved = {"data_lanes": 1, **meta["config"]}  # checkpoints from before data lanes had one
        if saved != json.loads(json.dumps(asdict(self.cfg))):
            raise InputError(
                f"{ckpt} holds a run with a different config; pass another out= or delete {ckpt} to start over"
            )
        loaded = load_sae(ckpt)
        self.sae.load_state_dict(loaded.state_dict())
        state = read_verified(ckpt / "trainer_state.safetensors", fix=f"Delete {ckpt} to start over.")
        self.since_fired = state["since_fired"]
        self.gen.set_state(state["gen"])
        for i, param in enumerate(self.sae.parameters()):
            keys = {k.split(".", 2)[2]: v for k, v in state.items() if k.startswith(f"opt.{i}.")}
            if self.opt.defaults.get("fused"):  # its state, step included, lives on the parameter's device
                keys = {k: v.to(param.device) for k, v in keys.items()}
            if keys:
                self.opt.state[param] = keys
        self.history = meta["history"]
        self.step = meta["step"]
        return self.step

    def record(self) -> dict[str, Any]:
        return {
            **asdict(self.cfg),
            "steps_done": self.step,
            "tokens_seen": self.step * self.cfg.batch_size,
            "data": self.data_desc,
            "model_name": getattr(self.model, "name", None),
            "torch": torch.__version__,
            "world_size": self.ctx.world_size,
            **({"parallel": self.parallel} if self.parallel else {}),
        }

    # --- run ---

    def run(self) -> SAE:
        from tqdm.auto import tqdm

        c = self.cfg
        start = self.try_resume()
        batches = self.batches()
        for _ in range(start):  # a resumed run sees the same batches as an uninterrupted one
            next(batches)
        show = self.progress and self.ctx.is_main  # one bar for the job
        bar = tqdm(total=c.steps, initial=start, unit="step", desc=f"train {c.arch}", disable=not show)
        cores = contextlib.ExitStack()
        try:  # (the setup too: a rank whose setup fails leaves no hooks, binding or block behind)
            if self.ctx.distributed:
                self._start_parallel(cores)
            batch = self._fetch(batches) if self.step < c.steps else None
            while self.step < c.steps:
                assert batch is not None
                x, y, bad = batch
                if self.step == 0 and c.b_dec_init == "mean":
                    with torch.no_grad():
                        mean = self._sum(y.sum(0)) / c.batch_size if self.ctx.distributed else y.mean(0)
                        self.sae.b_dec.copy_(mean)
                for group in self.opt.param_groups:
                    group["lr"] = self.lr_at(self.step)
                loss, metrics = self.loss(x, y)
                if self.share != 1:
                    loss = loss * self.share
                self.opt.zero_grad(set_to_none=True)
                self._backward(loss)
                # the next batch is read while the ranks meet (its check rides the next meeting)
                batch = None if self.step + 1 >= c.steps else self._fetch(batches)
                metrics = self._settle(bad, metrics)
                self._update()
                self.after_step(x, y)
                self.history.append({"step": self.step, **metrics, "lr": self.lr_at(self.step)})
                self.step += 1
                bar.update(1)
                bar.set_postfix(mse=f"{metrics['mse']:.4g}", l0=f"{metrics['l0']:.1f}", refresh=False)
                due = c.checkpoint_every and self.step % c.checkpoint_every == 0 and self.step < c.steps
                if due and self.ctx.is_main:  # every rank holds the same state: rank 0 writes it
                    self.save_checkpoint()
        finally:
            bar.close()
            if self.shared is not None:  # the SAE and Adam's state go back to this process's memory
                self.shared.unshare()
                self.shared = None
            if self.sync is not None:
                self.sync.close()
                self.sync = None
                self.weight_grads.destination = None
            cores.close()
        self.sae.eval()
        self.sae.cfg.metadata["training"] = self.record()
        self.sae.history = self.history
        if self.out is not None and self.ctx.is_main:
            save_sae(self.sae, self.out / "final")
            (self.out / "history.json").write_text(json.dumps(self.history) + "\n")
        if self.ctx.distributed:  # when train returns on any rank, the final SAE is on disk
            import torch.distributed as dist

            dist.barrier()
        return self.sae

    def _fetch(
        self, batches: Iterator[tuple[torch.Tensor, ...]]
    ) -> tuple[torch.Tensor, torch.Tensor, _Sum | distributed.DeferredSum]:
        """The next step's ``x``, ``y`` (on the SAE's device) and its NaN/inf check (being summed)."""
        batch = next(batches)
        x = batch[0].to(self.sae.device, self.sae.dtype)
        y = x if len(batch) == 1 else batch[-1].to(self.sae.device, self.sae.dtype)
        return x, y, self._check_finite(x, y)

    def _start_parallel(self, cores: contextlib.ExitStack) -> None:
        """Bind this rank to its cores, start summing gradients over the ranks and, on one host,
        split Adam over them (``run`` undoes all of it when it ends)."""
        cores.enter_context(distributed.bound_cores())  # each rank on its own share of the cores
        # a step's small sums (NaN check, fired latents, metrics) ride its meeting
        self.sync = distributed.GradientSync(
            self._ready_order(), small=self.sae.cfg.d_sae + 16, shared_state=_SharedUpdate.applies(self.opt)
        )
        self.weight_grads.destination = self.sync.slot
        if self.sync.shares_state:  # one host: the ranks split Adam (see _SharedUpdate)
            self.shared = _SharedUpdate(self.sync, self.opt)
        self.parallel = {
            "gradients": self.sync.transport,
            "adam": "split over the ranks" if self.shared is not None else "every rank, all of it",
        }

    def _ready_order(self) -> list[torch.nn.Parameter]:
        """The trainable parameters in the order the backward pass finishes their gradients: the
        decoder side first, the encoder (``W_enc``, whose gradient comes last) at the end.

        On the sparse TopK path ``W_dec``'s gradient is set only after the backward pass (by
        ``_WeightGrads.settle``, which also adds to ``b_dec``'s), and GradientSync launches in this
        order: so nothing after ``W_dec`` starts its sum before the sink has settled it."""
        sae = self.sae
        late = [
            getattr(sae, n)
            for n in ("W_skip", "W_dec", "b_dec", "threshold", "b_enc", "W_enc")
            if hasattr(sae, n)
        ]
        rest = [p for p in sae.parameters() if all(p is not q for q in late)]
        return [p for p in rest + late if p.requires_grad]

    def _backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``; under DDP, each gradient's sum over the ranks starts as it is ready."""
        if self.sync is not None:
            self.sync.start()
        loss.backward()
        if self.sync is not None and any(self.sync.launched(p) for p in self.weight_grads.params()):
            raise RuntimeError(
                "internal: a gradient's sum over the ranks started before the sparse path settled it"
            )
        self.weight_grads.settle()
        if self.sync is not None:
            self.sync.finish_backward()

    def _update(self) -> None:
        """The optimizer step (after ``_settle``'s checks).

        Under DDP, Adam first updates the parameters whose summed gradients have landed (all but
        the encoder's ``W_enc``, summed last), then ``W_enc``: over gloo or nccl its sum is still
        in flight meanwhile. Adam is elementwise, so two calls give the same values as one."""
        if self.sync is None:
            self.opt.step()
            return
        if self.shared is not None:
            self.shared.step(self.opt.param_groups[0]["lr"])
            return
        early, late = self.sync.params[:-1], self.sync.params[-1:]
        self.sync.wait(early)
        self._step_only(early)
        self.sync.wait(late)
        self._step_only(late)

    def _step_only(self, params: list[torch.nn.Parameter]) -> None:
        """``opt.step()`` on ``params`` alone (Adam skips a parameter whose gradient is None)."""
        held = [
            (p, p.grad) for g in self.opt.param_groups for p in g["params"] if all(p is not q for q in params)
        ]
        for p, _ in held:
            p.grad = None
        try:
            self.opt.step()
        finally:
            for p, grad in held:
                p.grad = grad

    def _check_finite(self, x: torch.Tensor, y: torch.Tensor) -> _Sum:
        """How many ranks' batches hold NaN or inf (being summed; ``_settle`` reads it)."""
        finite = _all_finite(x) and (y is x or _all_finite(y))  # an SAE: y is x
        return self._start_sum(torch.tensor(int(not finite)), after_backward=True)

    def _settle(
        self, bad: _Sum | distributed.DeferredSum, metrics: dict[str, float] | _Metrics
    ) -> dict[str, float]:
        """The step's checks and global metrics, before the optimizer step changes anything.

        Under DDP they wait for the reductions started during the step (the ranks meet here),
        and every rank stops together on NaN or inf in any rank's batch or loss."""
        if int(bad.result()):
            self._stop("NaN or inf in the batch of activations")
        if isinstance(metrics, _Metrics):
            metrics = metrics.result()
        if not math.isfinite(metrics["loss"]):
            self._stop(f"the loss became {metrics['loss']}")
        self.settle_fired()
        return metrics

    def _stop(self, why: str) -> None:
        where = (
            f"The last good checkpoint (step {self._saved_step()}) is kept in {self._checkpoint_dir()}."
            if self.out is not None and (self._checkpoint_dir() / "trainer.json").is_file()
            else "No checkpoint was written yet (pass out= and checkpoint_every= to keep one)."
        )
        raise InputError(
            f"training stopped at step {self.step} (tokens {self.step * self.cfg.batch_size}-"
            f"{(self.step + 1) * self.cfg.batch_size}): {why}. {where} "
            "Check the activations for that range (a diverged model, fp16 overflow), or lower lr."
        )

    def _saved_step(self) -> int:
        return json.loads((self._checkpoint_dir() / "trainer.json").read_text())["step"]


def _all_finite(t: torch.Tensor) -> bool:
    """Whether every element of ``t`` is finite. A NaN or inf element makes the sum NaN or inf,
    so a finite sum settles it in one pass with no temporary (``isfinite(t).all()`` writes a mask
    first: 1 ms of a 1024-row batch's 3.3 ms read); only a sum that overflowed, or a batch that
    is not finite, takes the exact check."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


class _SharedUpdate:
    """Adam split over ranks that share one host, instead of every rank repeating all of it.

    The SAE's trainable parameters and Adam's two moment buffers live in ``GradientSync``'s
    shared-memory block (``shared_state``); every rank's parameters are views of the same
    memory. Rank ``r`` owns about 1/world of every parameter's rows (``GradientSync.owned``):
    after the step's meeting it adds the ranks' gradients of its rows only, runs one fused Adam
    step over them, and does the rest of the update on them (a decoder row's renormalisation);
    a barrier then lets every rank read the new values. Each element gets the same update
    formula as in a one-process run (Adam is elementwise), so the weights agree to float
    rounding (the fused kernel need not round an element the same way in every position of its
    vectorised chunks, and the shards move the chunks: measured, within 1e-7); the work and
    memory traffic of the sum and of Adam are divided by the world size.

    The full optimizer (``opt``) never steps here, but its state entries are views of the same
    buffers (and step counters), so checkpoints and resampling read and write the
    state as on one process. Whatever changes many rows at once (resampling) runs in
    ``private``: every rank on its own copy, as without sharing, then rank 0's result is shared.
    """

    def __init__(self, sync: distributed.GradientSync, opt: torch.optim.Adam) -> None:
        self.sync, self.opt, self.params = sync, opt, sync.params
        self.values, self.exp_avg, self.exp_avg_sq = sync.shared_state()
        # fused Adam's step counters, one per shard (it counts each tensor's own steps)
        self.steps = [torch.zeros((), dtype=torch.float32) for _ in self.params]
        spans = [sync.owned_span(p) for p in self.params]
        self.shards = [self.values[span] for span in spans]  # this rank's rows: views, leaves
        self.grads = [shard.new_empty(shard.shape) for shard in self.shards]
        self.shard_opt = torch.optim.Adam(self.shards, **opt.defaults)
        for shard, span, steps in zip(self.shards, spans, self.steps, strict=True):
            self.shard_opt.state[shard] = {
                "step": steps,
                "exp_avg": self.exp_avg[span],
                "exp_avg_sq": self.exp_avg_sq[span],
            }
        self.share()

    @staticmethod
    def applies(opt: torch.optim.Adam) -> bool:
        """Whether the optimizer's update can be split this way (fused CPU Adam, no AMSGrad)."""
        return bool(opt.defaults.get("fused")) and not opt.defaults.get("amsgrad")

    def _span(self, param: torch.nn.Parameter) -> slice:
        at = self.sync.offset(param)
        return slice(at, at + param.numel())

    def share(self) -> None:
        """Rank 0's parameters and Adam state (every rank holds the same) into the shared
        buffers; then every rank's parameters and state entries become views of them."""
        for p, steps in zip(self.params, self.steps, strict=True):
            steps.fill_(float(self.opt.state.get(p, {}).get("step", 0.0)))
        if distributed.current().is_main:
            for p in self.params:
                span, state = self._span(p), self.opt.state.get(p, {})
                self.values[span].copy_(p.detach().reshape(-1))
                for key, buffer in (("exp_avg", self.exp_avg), ("exp_avg_sq", self.exp_avg_sq)):
                    buffer[span].copy_(state[key].reshape(-1)) if key in state else buffer[span].zero_()
        self.sync.barrier()
        for p, steps in zip(self.params, self.steps, strict=True):
            span = self._span(p)
            p.data = self.values[span].view_as(p)
            self.opt.state[p] = {
                "step": steps,
                "exp_avg": self.exp_avg[span].view_as(p),
                "exp_avg_sq": self.exp_avg_sq[span].view_as(p),
            }

    def unshare(self) -> None:
        """Every parameter and state entry back to memory of this process's own (a copy). The
        gradients are dropped: on the sparse path they are views of this rank's slots in the
        block (its own share of the batch, not the sum), and would keep the block mapped."""
        for p in self.params:
            p.data = p.data.clone()
            p.grad = None
            self.opt.state[p] = {key: value.clone() for key, value in self.opt.state[p].items()}

    @contextlib.contextmanager
    def private(self) -> Iterator[None]:
        """Run a change of many rows on every rank's own copy (they all compute the same), then
        share rank 0's result. Call it on every rank, between barriers."""
        self.unshare()
        yield
        self.sync.barrier()  # nobody still reads the shared values that rank 0 is about to write
        self.share()

    def step(self, lr: float) -> None:
        """This rank's rows: the ranks' gradients summed (waits for the step's meeting), then Adam."""
        self.shard_opt.param_groups[0]["lr"] = lr
        for param, shard, grad in zip(self.params, self.shards, self.grads, strict=True):
            shard.grad = self.sync.sum_owned(param, grad)
        self.shard_opt.step()

    def rows(self, param: torch.nn.Parameter) -> slice:
        """The rows (along dim 0) of ``param`` that this rank updates."""
        return slice(*self.sync.owned(param))

    def barrier(self) -> None:
        self.sync.barrier()


class _Sum:
    """A tensor summed over the ranks: the all-reduce starts here and ``result()`` waits for it,
    so its latency overlaps the work in between; waited for after the backward pass, it is the
    step's one meeting of the ranks (the gradients' reductions are in flight by then).
    ``comm_device`` None (one process): the value itself."""

    def __init__(self, value: torch.Tensor, comm_device: torch.device | None) -> None:
        import torch.distributed as dist

        self.device = value.device
        self.total = value.detach() if comm_device is None else value.detach().to(comm_device).clone()
        self.work: Any = None if comm_device is None else dist.all_reduce(self.total, async_op=True)

    def result(self) -> torch.Tensor:
        if self.work is not None:
            self.work.wait()
            self.work = None
        return self.total.to(self.device)


@dataclass
class _Metrics:
    """A step's metrics under DDP: token-weighted sums over the ranks, in flight."""

    names: list[str]
    sums: _Sum | distributed.DeferredSum
    tokens: int

    def result(self) -> dict[str, float]:
        return dict(zip(self.names, (self.sums.result() / self.tokens).tolist(), strict=True))


def _decode_rows(sae: SAE, index: torch.Tensor, values: torch.Tensor, sink: _WeightGrads) -> torch.Tensor:
    """``Σ_j values[b, j] · W_dec[index[b, j]]``: the decoder on ``k`` latents per token (``W_dec``'s
    gradient goes to ``sink``)."""
    return _DecodedRows.apply(index, values, sae.W_dec, sink)


class _WeightGrads:
    """The sparse path's ``W_enc`` and ``W_dec`` gradients, summed in place into buffers kept from
    step to step, and handed to ``.grad`` by ``settle`` after the backward pass.

    Through autograd each of them was a fresh 3 MB tensor (d_sae 2048 x d_in 384) per step,
    zero-filled, then copied (``torch.sparse.mm`` copies its zero start), and ``W_enc``'s copied
    once more into the parameter's layout, every pass on memory malloc had just handed back to
    the OS, so page faults dominated. That cost is the same whatever the batch size, so each rank
    of a data-parallel job pays all of it. Here each is one ``addmm_`` into a warm buffer (bitwise
    the same values) and ``W_enc``'s one transposing copy; a second term (AuxK's) adds into the
    same buffer. Measured at batch 64 (with b_dec's credit, see ``_Selected``): the backward
    went from 8.3 to 4.3 ms. Under DDP the buffer of ``W_dec`` and the transposing copy of
    ``W_enc`` are the rank's shared-memory slots (``destination``), so GradientSync need not
    copy them there."""

    def __init__(self) -> None:
        self._sums: dict[int, tuple[torch.nn.Parameter, torch.Tensor, bool]] = {}
        self._kept: dict[int, torch.Tensor] = {}  # the sums' buffers, kept across steps
        self._grads: dict[int, torch.Tensor] = {}  # the .grad handed out for a transposed sum
        # under DDP, GradientSync.slot: where a parameter's gradient goes for its sum over the
        # ranks, so it is computed there rather than copied there (6.3 MB a step saved)
        self.destination: Callable[[torch.nn.Parameter], torch.Tensor | None] | None = None
        self._live: set[int] = set()
        self._vectors: dict[int, tuple[torch.nn.Parameter, torch.Tensor]] = {}
        # the parameter subtracted from the encoder's input (b_dec), credited by _Selected
        self.input_bias: torch.nn.Parameter | None = None

    def add_vector(self, param: torch.nn.Parameter, grad: torch.Tensor) -> None:
        """Add a dense ``grad`` to ``param``'s gradient."""
        held = self._vectors.get(id(param))
        self._vectors[id(param)] = (param, grad if held is None else held[1] + grad)

    def params(self) -> list[torch.nn.Parameter]:
        """The parameters this step's ``settle`` will add to."""
        return [self._sums[k][0] for k in self._live] + [p for p, _ in self._vectors.values()]

    def add(
        self, param: torch.nn.Parameter, sparse: torch.Tensor, dense: torch.Tensor, transposed: bool
    ) -> None:
        """Add ``sparse @ dense`` to ``param``'s gradient (its transpose if ``transposed``)."""
        key = id(param)
        if key not in self._live:
            shape = (sparse.shape[0], dense.shape[1])
            into = None if transposed else self._destination(param, shape, dense.dtype)
            if into is None:
                into = self._kept.get(key)
                if into is None or into.shape != shape or into.dtype != dense.dtype:
                    into = self._kept[key] = dense.new_empty(shape)
            self._sums[key] = (param, into, transposed)
        self._sums[key][1].addmm_(sparse, dense, beta=1 if key in self._live else 0)
        self._live.add(key)

    def _destination(
        self, param: torch.nn.Parameter, shape: tuple[int, ...], dtype: torch.dtype
    ) -> torch.Tensor | None:
        """``param``'s slot for the sum over the ranks, if there is one of this shape and dtype."""
        into = None if self.destination is None else self.destination(param)
        return into if into is not None and into.shape == shape and into.dtype == dtype else None

    def settle(self) -> None:
        """Hand this step's sums to the parameters' ``.grad`` (added, if autograd put one there)."""
        for key in self._live:
            param, total, transposed = self._sums[key]
            if transposed:
                out = self._destination(param, param.shape, total.dtype)
                if out is None:
                    out = self._grads.get(key)
                    if out is None or out.shape != param.shape:
                        out = self._grads[key] = torch.empty_like(param)
                total = out.copy_(total.T)
            _add_grad(param, total)
        for param, total in self._vectors.values():
            _add_grad(param, total)
        self._live.clear()
        self._vectors.clear()


def _add_grad(param: torch.nn.Parameter, grad: torch.Tensor) -> None:
    if param.grad is None:
        param.grad = grad
    else:
        param.grad.add_(grad)


def _by_latent(index: torch.Tensor, weights: torch.Tensor, d_sae: int) -> torch.Tensor:
    """The sparse ``[d_sae, batch]`` matrix with ``weights[b, j]`` at ``(index[b, j], b)``."""
    tokens = torch.arange(len(index), device=index.device).repeat_interleave(index.shape[-1])
    return torch.sparse_coo_tensor(
        torch.stack([index.flatten(), tokens]), weights.flatten(), (d_sae, len(index)), check_invariants=False
    )


class _DecodedRows(torch.autograd.Function):
    """``embedding_bag`` of the selected decoder rows, with a sparse backward: ``W_dec``'s gradient
    is one sparse product and ``values``' the dense product ``grad @ W_decᵀ`` sampled at the
    selected entries only (both O(batch·k·d); torch's own embedding_bag backward was measured
    about 4x slower on CPU). Same values and gradients, to float summation order."""

    @staticmethod
    def forward(
        ctx: Any, index: torch.Tensor, values: torch.Tensor, w_dec: torch.Tensor, sink: _WeightGrads
    ) -> torch.Tensor:
        ctx.save_for_backward(index, values, w_dec)
        ctx.sink = sink
        return torch.nn.functional.embedding_bag(index, w_dec, per_sample_weights=values, mode="sum")

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        index, values, w_dec = ctx.saved_tensors
        grad = grad.contiguous()
        _, need_values, need_w, _ = ctx.needs_input_grad
        grad_values = None
        if need_w:  # Σ_b values[b, j] · grad[b] over the tokens b that selected latent j
            ctx.sink.add(w_dec, _by_latent(index, values, len(w_dec)), grad, transposed=False)
        if need_values:  # grad[b] · W_dec[index[b, j]]
            batch, k = index.shape
            rows = torch.arange(0, batch * k + 1, k, device=index.device)
            with warnings.catch_warnings():  # "sparse CSR support is in beta"
                warnings.simplefilter("ignore", UserWarning)
                pattern = torch.sparse_csr_tensor(
                    rows,
                    index.flatten(),
                    grad.new_zeros(batch * k),
                    (batch, len(w_dec)),
                    check_invariants=False,
                )
            grad_values = torch.sparse.sampled_addmm(pattern, grad, w_dec.T, beta=0.0).values().view(batch, k)
        return None, grad_values, None, None  # W_dec's gradient: in the sink


class _Selected(torch.autograd.Function):
    """``pre.gather(-1, index)`` for ``pre = x_in @ W_enc + b_enc`` computed without autograd: the
    gradient, nonzero only at the ``[batch, k]`` selected entries, goes to ``W_enc``, ``b_enc``
    and ``x_in`` as sparse products, O(batch·k·d_in) instead of the dense backward's
    O(batch·d_sae·d_in). Same values and gradients as autograd through the dense product."""

    @staticmethod
    def forward(
        ctx: Any,
        pre: torch.Tensor,
        index: torch.Tensor,
        x_in: torch.Tensor,
        w_enc: torch.Tensor,
        b_enc: torch.Tensor,
        sink: _WeightGrads,
    ) -> torch.Tensor:
        ctx.save_for_backward(index, x_in, w_enc)
        ctx.sink, ctx.input_bias = sink, sink.input_bias  # as set for this forward
        return pre.gather(-1, index)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        index, x_in, w_enc = ctx.saved_tensors
        _, _, need_x, need_w, need_b, _ = ctx.needs_input_grad
        latents = index.flatten()
        g = grad.flatten()
        grad_x = grad_b = None
        if need_w:  # Σ_b x_in[b] ⊗ grad[b, j] over the tokens b that selected latent j
            ctx.sink.add(w_enc, _by_latent(index, grad, w_enc.shape[1]), x_in, transposed=True)
        bias = ctx.input_bias
        if need_b or bias is not None:
            grad_b = torch.zeros_like(w_enc[0]).index_add_(0, latents, g)
        if bias is not None:  # x_in = x' - bias: Σ_b of its gradient is W_enc @ grad_b
            ctx.sink.add_vector(bias, -(w_enc @ grad_b))
        if need_x:  # Σ_j grad[b, j] · W_enc[:, j] over the selected j
            weight = w_enc.T.contiguous()
            grad_x = torch.nn.functional.embedding_bag(index, weight, per_sample_weights=grad, mode="sum")
        return None, None, grad_x, None, grad_b if need_b else None, None  # W_enc's: in the sink


class _JumpReLU(torch.autograd.Function):
    """``pre * (pre > threshold)``: exact gradient to ``pre``; to ``threshold`` the straight-through
    estimate of Rajamanoharan et al. 2024 (a rectangle kernel of width ``bandwidth``)."""

    @staticmethod
    def forward(ctx: Any, pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        pre, threshold = ctx.saved_tensors
        window = ((pre - threshold).abs() < ctx.bandwidth / 2).to(grad)
        to_threshold = -(threshold / ctx.bandwidth) * window * grad
        return grad * (pre > threshold), to_threshold.reshape(-1, pre.shape[-1]).sum(0), None


class _Step(torch.autograd.Function):
    """``H(pre - threshold)`` (the L0 count): no gradient to ``pre``; straight-through to ``threshold``."""

    @staticmethod
    def forward(ctx: Any, pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, torch.Tensor, None]:
        pre, threshold = ctx.saved_tensors
        window = ((pre - threshold).abs() < ctx.bandwidth / 2).to(grad)
        return None, (-(1.0 / ctx.bandwidth) * window * grad).reshape(-1, pre.shape[-1]).sum(0), None


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
