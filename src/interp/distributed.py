"""Data-parallel work on ``torch.distributed``: the process group, and ranks that agree or fail together.

interp does not schedule anything itself. A launcher (``torchrun``, SLURM's ``srun`` with torchrun,
a Kubernetes PyTorchJob) starts one process per rank and sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; ``process_group()`` joins that job (gloo on
CPU, nccl on GPUs), or does nothing in a plain single process. Library calls that are collective
(``capture_to_disk``, ``interp.sae.train``) find the group with ``current()``.

Failure: ``Coordinator.phase`` runs one step of a collective job on every rank and exchanges the
outcome through the job's key-value store (not a blocking collective, so a rank may take hours
over its share without tripping a timeout). A rank that raises publishes its message; every other
rank stops at its next batch (``check_abort``) or at the end of the phase and raises
``DistributedError`` naming the failed rank and its message, so the job exits non-zero instead of
hanging. A rank that dies without raising (killed) stops sending heartbeats; the others give up
after ``timeout`` seconds without one and name it.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import json
import os
import platform
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from interp.errors import InputError, InterpError

DEFAULT_TIMEOUT = 600.0  # seconds without a heartbeat (or to reach MASTER_ADDR) before a job gives up
HEARTBEAT_SECONDS = 1.0
FAST_POLL_SECONDS = 3.0  # how long a phase's wait polls the store every 5 ms before every 50 ms
_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_job_timeout = DEFAULT_TIMEOUT  # the timeout the job was joined with (init_from_env)


class DistributedError(InterpError):
    """Another rank of the job failed, died, or could not be reached; the message names it."""


@dataclass(frozen=True)
class Context:
    """Where this process stands in the job: ``rank`` of ``world_size`` (``local_rank`` on its node)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def current() -> Context:
    """This process's place in the initialised process group (rank 0 of 1 when there is none)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return Context()
    return Context(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def env_world_size() -> int:
    """``WORLD_SIZE`` as set by the launcher (1 when unset)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise InputError(
            f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a whole number; check the launcher"
        ) from None


def check_timeout(timeout: float) -> None:
    """A timeout is a positive number of seconds."""
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
        raise InputError(f"timeout must be a positive number of seconds, got {timeout!r}")


def backend() -> str:
    """nccl when this process has a GPU, gloo otherwise (the CPU backend, used by the tests)."""
    import torch

    return "nccl" if torch.cuda.is_available() else "gloo"


@contextlib.contextmanager
def process_group(timeout: float = DEFAULT_TIMEOUT) -> Iterator[Context]:
    """Join the launcher's job for the duration of the block (and leave it after); yields the
    ``Context``. In a plain process (``WORLD_SIZE`` unset or 1), or when a group is already
    initialised, it only reports where this process stands."""
    import torch.distributed as dist

    check_timeout(timeout)
    if dist.is_initialized() or env_world_size() <= 1:
        yield current()
        return
    ctx = init_from_env(timeout)
    finished = False
    try:
        yield ctx
        finished = True
    finally:
        _let_gloo_threads_finish(barrier=finished)
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def _let_gloo_threads_finish(barrier: bool) -> None:
    """Give gloo's worker threads the moment they need before the process leaves the job.

    A gloo thread drops a finished collective's tensors after the caller has its result; a
    tensor made in Python (``all_gather_object``'s) needs the GIL for that. If the interpreter is
    finalizing by then, the thread is made to exit inside C++ and the process aborts ("terminate
    called without an active exception"; a core dump of a 2-rank benchmark job showed exactly
    this, about once in 40 launches). A last barrier (every rank is done with its collectives,
    and the GIL is free while it waits) and a short sleep let such threads finish first. No
    barrier when the block raised: the other ranks may never come."""
    import torch.distributed as dist

    if barrier:
        with contextlib.suppress(Exception):
            dist.barrier()
    time.sleep(0.02)


def core_share(cpus: list[int], local_rank: int, local_world: int) -> list[int]:
    """Local rank ``local_rank`` of ``local_world``'s share of ``cpus``: the ``local_rank``-th of
    ``local_world`` contiguous, equal groups (the remainder, if any, is left unused)."""
    per = len(cpus) // local_world
    return cpus[local_rank * per : (local_rank + 1) * per]


@contextlib.contextmanager
def bound_cores() -> Iterator[list[int] | None]:
    """Bind this rank to its share of the CPUs this process may use (``core_share``) for the
    duration of the block, then restore its affinity; yields the CPUs, or None if it stays free.
    CPU launchers do the same (DeepSpeed's ``--bind_cores_to_rank``, ``torch.backends.xeon.run_cpu``).
    ``interp.sae.train`` binds its ranks: two unbound ranks on two cores were measured 10% slower
    a training step, as the scheduler now and then ran both on one core for a while and the
    other waited for it at every meeting.

    It binds a rank of several on this node (``LOCAL_WORLD_SIZE``, set by torchrun) when the
    rank's torch threads fit its share; ``INTERP_BIND_CORES=0`` leaves every rank free. Threads
    started before (gloo's) keep every CPU."""
    share = _core_share_here()
    if share is None:
        yield None
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, share)
    try:
        yield share
    finally:
        os.sched_setaffinity(0, before)


def _core_share_here() -> list[int] | None:
    """This rank's share of the CPUs, if ``bound_cores`` should bind it (see there)."""
    import torch

    if os.environ.get("INTERP_BIND_CORES", "1") == "0" or not hasattr(os, "sched_setaffinity"):
        return None
    try:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        return None
    cpus = sorted(os.sched_getaffinity(0))
    if local_world < 2 or not 0 <= local_rank < local_world or len(cpus) < local_world:
        return None
    share = core_share(cpus, local_rank, local_world)
    return share if torch.get_num_threads() <= len(share) else None  # else it would oversubscribe


def init_from_env(timeout: float = DEFAULT_TIMEOUT) -> Context:
    """``init_process_group`` from the launcher's environment, with ``timeout`` seconds to reach
    ``MASTER_ADDR``; a rank that cannot reach it raises ``DistributedError`` naming the address."""
    import torch
    import torch.distributed as dist

    missing = [name for name in _ENV if not os.environ.get(name)]
    if missing:
        raise InputError(
            f"WORLD_SIZE is {os.environ.get('WORLD_SIZE')} but {', '.join(missing)} is not set. Launch with "
            "torchrun (it sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT), or set them all."
        )
    rank, world = int(os.environ["RANK"]), env_world_size()
    address = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    local = int(os.environ.get("LOCAL_RANK", 0))
    name = backend()
    if name == "nccl":
        torch.cuda.set_device(local)
    global _job_timeout
    _job_timeout = timeout
    try:
        dist.init_process_group(name, timeout=datetime.timedelta(seconds=timeout))
    except Exception as err:  # DistNetworkError / DistStoreError / RuntimeError, by torch version
        raise DistributedError(
            f"rank {rank} of {world} could not join the job at MASTER_ADDR:MASTER_PORT = {address} within "
            f"{timeout:g} s ({type(err).__name__}: {_first_line(err)}). Check that rank 0 is running, "
            "that the address and port are right and reachable from this node (firewall, hostname)."
        ) from None
    return Context(rank, world, local)


# ------------------------------------------------------------------------------------------------
# Ranks that agree or fail together
# ------------------------------------------------------------------------------------------------


_CALLS = itertools.count()  # every rank makes the same collective calls, so the ids agree


class Coordinator:
    """Exchanges phase outcomes, progress and heartbeats between the ranks of one collective call,
    through the process group's key-value store. Use as a context manager (it runs the heartbeat)."""

    def __init__(self, ctx: Context, name: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        import torch.distributed as dist

        self.ctx, self.timeout = ctx, timeout
        # The default group's store (private accessor, stable since torch 1.x): the one the job
        # already rendezvoused through, so nothing else needs a port.
        self.store = dist.distributed_c10d._get_default_store()
        self.prefix = f"interp/{name}/{next(_CALLS)}"
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        self._seen: dict[int, tuple[int, float]] = {}

    def __enter__(self) -> Coordinator:
        self._beat = threading.Thread(target=self._heartbeat, daemon=True)
        self._beat.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()

    def _key(self, *parts: object) -> str:
        return "/".join([self.prefix, *map(str, parts)])

    def _heartbeat(self) -> None:
        key = self._key("beat", self.ctx.rank)
        while not self._stop.is_set():
            with contextlib.suppress(Exception):  # a lost store is reported by the waiting loop
                self.store.add(key, 1)
            self._stop.wait(HEARTBEAT_SECONDS)

    # --- progress ---

    def add_progress(self, n: int) -> int:
        """Add ``n`` examples done here; returns the job's total so far."""
        return int(self.store.add(self._key("progress"), n))

    # --- failure ---

    def check_abort(self) -> None:
        """Raise ``DistributedError`` if another rank has failed (call between units of work)."""
        if self.store.check([self._key("abort")]):
            message = self.store.get(self._key("abort")).decode()
            raise DistributedError(f"stopped: {message}")

    def phase(
        self, label: str, fn: Callable[[], Any], on_wait: Callable[[], None] | None = None
    ) -> list[Any]:
        """Run ``fn`` here and wait for every rank to finish the same phase; returns every rank's
        result (JSON-able), in rank order. If any rank raised, every rank raises: an ``InputError``
        when all failures were bad input (the first one's message), else ``DistributedError``."""
        local: Exception | None = None
        try:
            status: dict[str, Any] = {"ok": True, "value": fn()}
        except Exception as err:
            local = err
            status = {
                "ok": False,
                "type": type(err).__name__,
                "message": str(err),
                "input": isinstance(err, InputError),
            }
            with contextlib.suppress(Exception):
                if not self.store.check([self._key("abort")]):
                    self.store.set(
                        self._key("abort"), f"rank {self.ctx.rank} failed: {type(err).__name__}: {err}"
                    )
        self.store.set(self._key(label, self.ctx.rank), json.dumps(status))
        statuses = self._wait(label, on_wait)
        failed = [(rank, s) for rank, s in enumerate(statuses) if not s["ok"]]
        if failed:
            raise self._failure(failed) from local  # this rank's own traceback, where it failed
        return [s["value"] for s in statuses]

    def _failure(self, failed: list[tuple[int, dict[str, Any]]]) -> InterpError:
        real = [(r, s) for r, s in failed if s["type"] != "DistributedError"] or failed
        rank, first = real[0]
        if all(s["input"] for _, s in real) and len({s["message"] for _, s in real}) == 1:
            return InputError(
                first["message"] if len(real) == self.ctx.world_size else f"rank {rank}: {first['message']}"
            )
        ranks = ", ".join(str(r) for r, _ in real)
        return DistributedError(
            f"rank {ranks} of {self.ctx.world_size} failed: {first['type']}: {first['message']}"
        )

    def _wait(self, label: str, on_wait: Callable[[], None] | None) -> list[dict[str, Any]]:
        keys = [self._key(label, rank) for rank in range(self.ctx.world_size)]
        # Polls the store: every 1, 2, 4, 5, 5... ms for the first seconds (ranks that finish a
        # phase close together, as a capture's do, meet within ~5 ms: with 50 ms steps from the
        # start, the ranks of a 1 s capture met 25-40 ms late), then every 50 ms.
        began, pause = time.monotonic(), 0.001
        while True:
            try:
                if self.store.check(keys):
                    return [json.loads(self.store.get(k)) for k in keys]
                self._check_alive(keys)
            except DistributedError:
                raise
            except Exception as err:
                raise DistributedError(
                    f"rank {self.ctx.rank} lost contact with the job's store at {_master()} "
                    f"({type(err).__name__}: {_first_line(err)}); rank 0 or the launcher has probably died"
                ) from None
            if on_wait is not None:
                on_wait()
            time.sleep(pause)
            pause = min(0.005 if time.monotonic() - began < FAST_POLL_SECONDS else 0.05, pause * 2)

    def _check_alive(self, keys: list[str]) -> None:
        now = time.monotonic()
        for rank, key in enumerate(keys):
            if rank == self.ctx.rank or self.store.check([key]):
                continue
            beats = int(self.store.add(self._key("beat", rank), 0))
            last = self._seen.get(rank)
            if last is None or beats != last[0]:
                self._seen[rank] = (beats, now)
            elif now - last[1] > self.timeout:
                raise DistributedError(
                    f"rank {rank} of {self.ctx.world_size} sent no heartbeat for {self.timeout:g} s (killed, "
                    "out of memory, or its node is down). Rerun the same command to resume."
                )


def _master() -> str:
    return f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


class LocalCoordinator:
    """The same interface for one process (no group): phases just run, progress just counts."""

    def __init__(self) -> None:
        self.ctx, self._done = Context(), 0

    def __enter__(self) -> LocalCoordinator:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def add_progress(self, n: int) -> int:
        self._done += n
        return self._done

    def check_abort(self) -> None:
        pass

    def phase(
        self, label: str, fn: Callable[[], Any], on_wait: Callable[[], None] | None = None
    ) -> list[Any]:
        return [fn()]


def coordinator(ctx: Context, name: str, timeout: float = DEFAULT_TIMEOUT) -> Coordinator | LocalCoordinator:
    """A ``Coordinator`` for a job of several ranks, a ``LocalCoordinator`` for one process."""
    check_timeout(timeout)
    return Coordinator(ctx, name, timeout) if ctx.distributed else LocalCoordinator()


# ------------------------------------------------------------------------------------------------
# Gradients summed over the ranks, overlapped with the rest of the step
# ------------------------------------------------------------------------------------------------


TRANSPORTS = ("shared-memory", "exchange", "all-reduce")
SHM_DIR = "/dev/shm"  # where same-host ranks map their shared gradient slots (Linux tmpfs)
# A rank waiting at a shared-memory meeting spins (yielding) for SPIN_SECONDS, then sleeps in
# pauses of at most MAX_PAUSE_SECONDS: it sees the others arrive that much late at worst. With
# 1 ms pauses a rank saw a meeting it had waited >1 ms for up to ~1 ms late, and the other rank
# then waited that long at the next one (~1 ms a training step on MiniLM's dictionary).
SPIN_SECONDS = 2e-3
MAX_PAUSE_SECONDS = 2e-4


class GradientSync:
    """Sums the gradients of ``params`` over the ranks as the backward pass finishes each one, so
    the sums overlap the rest of the backward and whatever the caller does before ``wait``.

    What ``DistributedDataParallel`` does, except when the caller waits: DDP's backward returns
    only once every bucket has landed, and the last parameter's gradient (a dictionary's encoder,
    computed last) is then reduced with nothing to overlap it. Here the caller waits parameter by
    parameter (``wait``), so it can update the others, or read its next batch, while the last
    one is in flight.

    ``params`` are given in the order their gradients become ready; every rank hands them over
    in exactly that order (a parameter ready early waits for those before it), so the ranks'
    collectives always match. After ``loss.backward()`` call ``finish_backward``: a parameter
    the step did not reach gets a zero gradient and is summed too. The hooks act only between
    ``start`` and ``finish_backward``; ``close`` removes them.

    ``transport`` (default: the first that applies, in this order):

    - ``"shared-memory"``: every rank of the job is on this host (gloo, CPU tensors, x86-64).
      Each rank copies its gradients into its slot of one shared-memory block (or computes
      them there: ``slot``), the ranks meet
      once (a counter per rank in the block, see ``_SharedSlots``), and each adds the slots in
      rank order, so every rank holds the same sums bit for bit. No gradient bytes go through
      sockets: over gloo's localhost TCP, 6.3 MB took ~6 ms a step and the CPU time of the
      cores doing the training. Small sums can ride the same meeting (``defer_sum``).
    - ``"exchange"`` (2 ranks, gloo): each rank sends its gradient to the other and adds the one
      it receives (point-to-point), instead of gloo's ring all-reduce: the same bytes in one
      round trip instead of two dependent phases, about 2x faster for 3 MB on localhost.
      ``a + b == b + a`` in floating point, so both ranks still hold the same sums.
    - ``"all-reduce"``: one asynchronous ``all_reduce`` per parameter (nccl, or several hosts).

    ``timeout``: how long the shared-memory meeting waits for a late rank before it raises
    ``DistributedError`` naming it (default: the job's, as given to ``process_group``).
    ``small``: how many values ``defer_sum`` can carry to one meeting (more fall back to gloo).

    ``shared_state`` (shared-memory transport only; ``shares_state`` says whether it applies,
    which it does not where the shared-memory directory has room for the gradients alone):
    the block also holds the parameters' values and two optimizer-state buffers, so the ranks
    can split the update instead of each repeating all of it. Each rank owns about 1/world of
    every parameter's rows (``owned``), sums only those gradients (``sum_owned``) and updates
    only those values; ``barrier`` then waits until every rank's update has landed.
    """

    def __init__(
        self,
        params: list[Any],
        transport: str | None = None,
        timeout: float | None = None,
        small: int = 1024,
        shared_state: bool = False,
    ) -> None:
        import torch.distributed as dist

        timeout = _job_timeout if timeout is None else timeout  # the job's, as its collectives have
        self.params = [p for p in params if p.requires_grad]
        self._index = {id(p): i for i, p in enumerate(self.params)}
        world = dist.get_world_size()
        if transport is not None and transport not in TRANSPORTS:
            raise InputError(f"transport must be one of {', '.join(TRANSPORTS)}, got {transport!r}")
        if transport == "exchange" and world != 2:
            raise InputError(f"a gradient exchange needs exactly 2 ranks, this job has {world}")
        self._shared: _SharedSlots | None = None
        if transport in (None, "shared-memory"):
            self._shared = _SharedSlots.open(
                self.params, transport == "shared-memory", timeout, small, shared_state
            )
        if self._shared is not None:
            transport = "shared-memory"
        elif transport is None:
            transport = "exchange" if world == 2 and dist.get_backend() == "gloo" else "all-reduce"
        self.transport = transport
        self._peer = 1 - dist.get_rank() if transport == "exchange" else None
        self._received: dict[int, Any] = {}  # the peer's gradient, per parameter (exchange)
        self._work: list[Any] = []
        self._ready: list[bool] = []
        self._active = False
        self._handles = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self.params]

    def start(self) -> None:
        """Arm the hooks for one backward pass."""
        self._ready = [False] * len(self.params)
        self._work = []
        self._active = True

    def _on_grad(self, param: Any) -> None:
        # a parameter whose backward handed autograd no gradient (one set on ``.grad`` after the
        # backward pass instead, as the trainer's sparse path does) is launched by finish_backward
        if self._active and param.grad is not None:
            self._ready[self._index[id(param)]] = True
            self._launch_ready()

    def _launch_ready(self) -> None:
        import torch.distributed as dist

        while len(self._work) < len(self.params) and self._ready[len(self._work)]:
            i = len(self._work)
            param = self.params[i]
            if not param.grad.is_contiguous():
                param.grad = param.grad.contiguous()
            if self._shared is not None:
                self._shared.put(i, param.grad)
                self._work.append(self._shared)
                if len(self._work) == len(self.params):
                    self._shared.meet()
            elif self._peer is None:
                self._work.append(dist.all_reduce(param.grad, async_op=True))
            else:
                into = self._received.get(id(param))
                if into is None or into.shape != param.grad.shape:
                    into = self._received[id(param)] = param.grad.new_empty(param.grad.shape)
                self._work.append((dist.isend(param.grad, self._peer), dist.irecv(into, self._peer)))

    def launched(self, param: Any) -> bool:
        """Whether ``param``'s sum over the ranks has started in this backward pass."""
        return self._index[id(param)] < len(self._work)

    def finish_backward(self) -> None:
        """Start the sums not started yet (zero gradients for parameters the step missed)."""
        import torch

        for i, param in enumerate(self.params):
            if not self._ready[i]:
                if param.grad is None:
                    param.grad = torch.zeros_like(param)
                self._ready[i] = True
        self._launch_ready()
        self._active = False

    def wait(self, params: list[Any]) -> None:
        """Block until the gradients of ``params`` hold their sums over the ranks."""
        for param in params:
            i = self._index[id(param)]
            work = self._work[i]
            if work is None:
                continue
            if self._shared is not None:
                param.grad = self._shared.sum_into(i, param.grad)
            elif self._peer is None:
                work.wait()
            else:
                for part in work:
                    part.wait()
                param.grad.add_(self._received[id(param)])
            self._work[i] = None

    def slot(self, param: Any) -> Any | None:
        """Where this rank's gradient of ``param`` goes for the coming sum, shaped like ``param``
        (shared-memory transport; None otherwise). A gradient computed straight into it is not
        copied again; ``wait`` then hands ``param`` a gradient of its own for the sum."""
        i = self._index.get(id(param))
        if self._shared is None or i is None:
            return None
        return self._shared.slot(i).view_as(param)

    @property
    def shares_state(self) -> bool:
        """Whether the block holds the parameters and optimizer state (``shared_state``)."""
        return self._shared is not None and self._shared.state is not None

    def shared_state(self) -> tuple[Any, Any, Any]:
        """The shared values, and the two optimizer-state buffers, of every parameter laid end
        to end in ``params`` order (flat views, each ``sum(p.numel())`` long; ``shares_state``)."""
        assert self._shared is not None and self._shared.state is not None
        return self._shared.state[0], self._shared.state[1], self._shared.state[2]

    def offset(self, param: Any) -> int:
        """Where ``param`` starts in the flat layout of ``shared_state`` (and of the gradients)."""
        assert self._shared is not None
        return self._shared.offsets[self._index[id(param)]][0]

    def owned(self, param: Any, rank: int | None = None) -> tuple[int, int]:
        """The rows ``(first, end)`` of ``param`` that ``rank`` (default: this one) updates."""
        assert self._shared is not None and self._shared.owned is not None
        return self._shared.owned[self._shared.rank if rank is None else rank][self._index[id(param)]]

    def owned_span(self, param: Any) -> slice:
        """This rank's rows of ``param`` as a flat range of ``shared_state`` (and of the gradients)."""
        first, end = self.owned(param)
        at, row = self.offset(param), param.numel() // param.shape[0] if param.dim() else 1
        return slice(at + first * row, at + end * row)

    def sum_owned(self, param: Any, out: Any) -> Any:
        """``out`` (flat, ``owned_span``'s length) = the ranks' gradients of this rank's rows of
        ``param``, added in rank order; waits for the step's meeting. Call it for every
        parameter: the others' rows are not summed here."""
        assert self._shared is not None
        span = self.owned_span(param)
        self._shared.sum_range(span.start, span.stop, out)
        self._work[self._index[id(param)]] = None
        return out

    def barrier(self) -> None:
        """Wait until every rank has called ``barrier`` as often as this one (shared memory: a
        counter per rank, no collective; DistributedError after the timeout)."""
        assert self._shared is not None
        self._shared.barrier()

    def defer_sum(self, value: Any) -> DeferredSum | None:
        """``value`` (a small tensor) summed over the ranks at the next meeting of the
        shared-memory transport, without a collective of its own; None on other transports (or
        if it does not fit), where the caller all-reduces it. Read it after ``finish_backward``."""
        return None if self._shared is None else self._shared.defer(value)

    def close(self) -> None:
        """Remove the hooks (the parameters outlive the training run) and drop this object's views
        of the shared memory (the block is unmapped once no tensor views it any more)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._active = False
        self._shared = None


class _SharedSlots:
    """The gradients of every rank on one host in one shared-memory block, and the step's meeting.

    Layout (one file, typed views): gradients ``[2, world, numel of all params]`` in the
    parameters' dtype; small sums ``[3, world, small]`` float64; one float64 meeting counter
    and one barrier counter per rank; with ``state``, the parameters' values and two optimizer
    state buffers ``[3, numel]`` (left out, gradients only, where the directory has no room). Meeting ``k`` is rank ``r`` writing its slots of that meeting and then ``k`` into its
    counter; it is over for a rank that sees every counter at ``k`` or more. No socket and no
    gloo thread is involved: over localhost TCP, each small collective's launch cost ~0.3 ms of
    the core doing the training. The ordering relies on x86-64 keeping stores in program order
    (``_shared_memory_unusable`` refuses other machines).

    Meeting ``k``'s gradients use parity ``k % 2``: a rank writes them after meeting ``k - 1``,
    when every other rank is past reading those of ``k - 2``. Small sums are written right
    after a rank's own signal, before it waits for anyone, so they rotate over 3.

    Rank 0 creates the file (space reserved up front, so a full ``/dev/shm`` is an error now
    rather than a SIGBUS mid-run), every rank maps it, and rank 0 unlinks it once all have: the
    memory lives as long as the mappings, and nothing is left behind if the job is killed."""

    def __init__(
        self, raw: Any, params: list[Any], small: int, rank: int, world: int, timeout: float, state: bool
    ) -> None:
        import torch

        self.rank, self.world, self.timeout = rank, world, timeout
        self.offsets, at = [], 0
        for p in params:
            self.offsets.append((at, p.numel()))
            at += p.numel()
        grads, smalls, counters, barriers, values = _layout(params, small, world, state)
        self.grads = raw[slice(*grads)].view(params[0].dtype).view(2, world, at)
        self.small = raw[slice(*smalls)].view(torch.float64).view(3, world, small)
        self.counters = raw[slice(*counters)].view(torch.float64)
        self.barriers = raw[slice(*barriers)].view(torch.float64)
        # with ``state``: [values, optimizer state a, optimizer state b], each flat like the gradients
        self.state = raw[slice(*values)].view(params[0].dtype).view(3, at) if state else None
        self.owned = owned_rows([p.shape for p in params], world) if state else None
        self.signals = 0  # meetings this rank has signalled
        self.met = 0  # meetings this rank has seen completed
        self.crossed = 0  # barriers this rank has passed
        self._deferred = 0  # small values written for the next meeting
        self._sums: dict[int, Any] = {}  # sum_into's buffers, for gradients computed in a slot

    @classmethod
    def open(
        cls, params: list[Any], required: bool, timeout: float, small: int, state: bool = False
    ) -> _SharedSlots | None:
        """The slots for ``params``, or None where shared memory does not apply (``required``:
        InputError saying why instead)."""
        import torch
        import torch.distributed as dist

        rank, world = dist.get_rank(), dist.get_world_size()
        every: list[Any] = [None] * world
        dist.all_gather_object(every, (_shared_memory_unusable(params), _host_id()))
        why = next((f"rank {r}: {w}" for r, (w, _) in enumerate(every) if w), None)
        if why is None and len({host for _, host in every}) != 1:
            why = "the ranks are on different hosts"
        made: list[Any] = [None, why, False]  # rank 0's (path, why, with state): one decision for the job
        if why is None and rank == 0:
            made = [*_create_block(_layout(params, small, world, state)[-1][1]), state]
            if made[0] is None and state:  # no room for the values and Adam's state too: gradients only
                made = [*_create_block(_layout(params, small, world)[-1][1]), False]
        dist.broadcast_object_list(made, src=0)
        path, why, state = made
        nbytes = _layout(params, small, world, state)[-1][1] if why is None else 0
        raw = None
        if why is None:
            try:
                raw = torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)
            except (OSError, RuntimeError) as err:
                why = f"rank {rank} could not map {path} ({err})"
        failures: list[Any] = [None] * world
        dist.all_gather_object(failures, why)
        if rank == 0 and path is not None:
            with contextlib.suppress(OSError):
                os.unlink(path)  # every rank has mapped it (or given up): nothing to leak
        why = next((f for f in failures if f), None)
        if why is not None:
            if required:
                raise InputError(
                    f"transport='shared-memory' cannot be used: {why}; use 'exchange' or 'all-reduce'"
                )
            return None
        return cls(raw, params, small, rank, world, timeout, state)

    def _slot(self, meeting: int, rank: int, i: int) -> Any:
        at, n = self.offsets[i]
        return self.grads[meeting % 2, rank, at : at + n]

    def slot(self, i: int) -> Any:
        """This rank's slot of parameter ``i`` for the next meeting (flat)."""
        return self._slot(self.signals + 1, self.rank, i)

    def put(self, i: int, grad: Any) -> None:
        """This rank's gradient of parameter ``i`` into its slot of the next meeting (unless it
        was computed there)."""
        slot = self.slot(i)
        if slot.data_ptr() != grad.data_ptr():
            slot.view_as(grad).copy_(grad)

    def meet(self) -> None:
        """Every slot of the next meeting is written here: signal it (the others may be later)."""
        self.signals += 1
        self.counters[self.rank] = self.signals
        self._deferred = 0

    def wait(self, meeting: int) -> None:
        """Block until every rank has signalled ``meeting`` (DistributedError after the timeout)."""
        if self.met >= meeting:
            return
        self._wait_for(self.counters, meeting, f"step meeting {meeting}")
        self.met = meeting

    def barrier(self) -> None:
        """Signal the next barrier and wait until every rank has (its own counters, so the
        meetings' numbering, which picks their slots, is untouched)."""
        self.crossed += 1
        self.barriers[self.rank] = self.crossed
        self._wait_for(self.barriers, self.crossed, f"update barrier {self.crossed}")

    def _wait_for(self, counters: Any, count: int, what: str) -> None:
        began = time.monotonic()
        pause = 0.0
        while float(counters.min()) < count:
            waited = time.monotonic() - began
            if waited > self.timeout:
                late = [r for r, c in enumerate(counters.tolist()) if c < count]
                raise DistributedError(
                    f"rank {', '.join(map(str, late))} of {self.world} did not reach {what} "
                    f"within {self.timeout:g} s (killed, out of memory, or stuck)"
                )
            if waited > SPIN_SECONDS:  # spin at first, then let other threads run
                pause = min(MAX_PAUSE_SECONDS, max(pause * 2, 2e-5))
            time.sleep(pause)

    def sum_into(self, i: int, out: Any) -> Any:
        """``out`` = parameter ``i``'s gradients of ranks 0, 1, ... added in that order; returns
        ``out``, or a buffer of this rank's if ``out`` is its own slot (which the others may
        still be reading)."""
        import torch

        self.wait(self.signals)  # every rank has written its slots of this step
        slots = [self._slot(self.signals, r, i).view_as(out) for r in range(self.world)]
        if out.data_ptr() == slots[self.rank].data_ptr():
            kept = self._sums.get(i)
            if kept is None:
                kept = self._sums[i] = torch.empty_like(out)
            out = kept
        torch.add(slots[0], slots[1], out=out)
        for slot in slots[2:]:
            out.add_(slot)
        return out

    def sum_range(self, lo: int, hi: int, out: Any) -> None:
        """``out`` = the ranks' gradients over the flat range ``[lo, hi)``, added in rank order."""
        import torch

        self.wait(self.signals)
        rows = self.grads[self.signals % 2, :, lo:hi]
        torch.add(rows[0], rows[1], out=out)
        for row in rows[2:]:
            out.add_(row)

    def defer(self, value: Any) -> DeferredSum | None:
        """``value`` summed over the ranks at the next meeting (None if it does not fit)."""
        n = value.numel()
        if self._deferred + n > self.small.shape[-1]:
            return None
        meeting, at = self.signals + 1, self._deferred
        self.small[meeting % 3, self.rank, at : at + n].copy_(value.detach().reshape(-1))
        self._deferred += n
        return DeferredSum(self, meeting, at, value)


class DeferredSum:
    """A small tensor summed over the ranks at the step's meeting (``GradientSync.defer_sum``);
    ``result()`` waits for that meeting and sums the ranks' values (float64, then the value's
    dtype): the same op on the same values on every rank, so every rank reads the same sum."""

    def __init__(self, slots: _SharedSlots, meeting: int, at: int, value: Any) -> None:
        self.slots, self.meeting, self.at = slots, meeting, at
        self.n, self.dtype, self.shape, self.device = value.numel(), value.dtype, value.shape, value.device
        self._total: Any = None

    def result(self) -> Any:
        if self._total is None:
            self.slots.wait(self.meeting)
            rows = self.slots.small[self.meeting % 3, :, self.at : self.at + self.n]
            self._total = rows.sum(0).to(self.dtype).view(self.shape).to(self.device)
        return self._total


def owned_rows(shapes: list[Any], world: int) -> list[list[tuple[int, int]]]:
    """Each rank's rows (along dim 0; a 1-D parameter's elements) of each parameter of these
    shapes: ``[rank][param] -> (first, end)``, contiguous, in rank order, as even as whole rows
    allow. Every parameter is split, so each rank does its share of every per-parameter step
    (a decoder row's renormalisation included), not all of some and none of others."""
    owned: list[list[tuple[int, int]]] = [[] for _ in range(world)]
    for shape in shapes:
        rows = shape[0] if len(shape) else 1
        for r in range(world):
            owned[r].append((rows * r // world, rows * (r + 1) // world))
    return owned


def _layout(params: list[Any], small: int, world: int, state: bool = False) -> list[tuple[int, int]]:
    """Byte ranges of the block's gradients, small sums, meeting counters, barrier counters and
    (``state``) shared values and optimizer state (each 64-byte aligned)."""
    numel = sum(p.numel() for p in params)
    width = params[0].element_size()
    sizes = [
        2 * world * numel * width,
        3 * world * small * 8,
        8 * world,
        8 * world,
        3 * numel * width * state,
    ]
    ranges, at = [], 0
    for size in sizes:
        ranges.append((at, at + size))
        at = (at + size + 63) // 64 * 64
    return ranges


def _host_id() -> str:
    """This host, as the ranks compare it: hostname and boot id (containers may share a hostname)."""
    import socket

    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def _shared_memory_unusable(params: list[Any]) -> str | None:
    """Why this rank cannot sum ``params`` through shared memory (None: it can)."""
    import torch.distributed as dist

    if dist.get_backend() != "gloo":
        return f"the backend is {dist.get_backend()}, not gloo"
    if not params:
        return "there are no parameters"
    if any(p.device.type != "cpu" for p in params):
        return "the parameters are not on the CPU"
    if len({p.dtype for p in params}) != 1:
        return "the parameters have different dtypes"
    if not os.path.isdir(SHM_DIR):
        return f"{SHM_DIR} does not exist"
    if platform.machine().lower() not in ("x86_64", "amd64"):  # see _SharedSlots on store order
        return f"the meeting relies on x86-64's store order, this is {platform.machine()}"
    return None


def _create_block(nbytes: int) -> tuple[str | None, str | None]:
    """A new file of ``nbytes`` in ``SHM_DIR`` with its space reserved: (path, None), or (None, why)."""
    import uuid

    path = os.path.join(SHM_DIR, f"interp-gradients-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as err:
        return None, f"could not create a file in {SHM_DIR} ({err})"
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as err:
        os.close(fd)
        os.unlink(path)
        return None, f"{SHM_DIR} has no room for the {nbytes / 2**20:.0f} MiB shared block ({err.strerror})"
    os.close(fd)
    return path, None
