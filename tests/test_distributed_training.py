"""Data-parallel dictionary training (gradients summed by GradientSync, gloo, 2 processes on localhost):
the same seed, global batch and data lanes give the one-process weights; rank 0's checkpoint
resumes on another world size; bad parallel settings are refused before any work."""

from __future__ import annotations

import itertools
import json
import sys

import pytest
import torch
from test_distributed import torchrun

import interp
from interp import distributed
from interp.errors import InputError
from interp.sae import train
from interp.sae.training import TrainConfig, _check_parallel

pytestmark = pytest.mark.usefixtures("one_thread")

# The model, capture and recipes, shared by the workers and the one-process references.
COMMON = """
import torch, interp
from torch import nn

def model():
    torch.manual_seed(0)
    return interp.load(nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)), input_shape=(6,))

BASE = dict(d_sae=32, tokens=64 * 24, batch_size=64, lr=3e-3, buffer_batches=4, progress=False, seed=3)
RECIPES = {
    # dead latents from step 2 on: the AuxK loss (its normaliser is the global batch's) is live
    "topk": dict(arch="topk", k=4, dead_after_tokens=128, **BASE),
    # resampling every 8 steps draws from the global batch on every rank
    "standard": dict(arch="standard", l1_coefficient=5.0, resample_every=8, dead_after_tokens=64,
                     **{**BASE, "lr": 3e-2}),
    # a trained threshold: with the update split over the ranks, each clamps its own share of it
    "jumprelu": dict(arch="jumprelu", l1_coefficient=0.05, jumprelu_bandwidth=0.05, **BASE),
}
"""

WORKER = """
import os, sys, torch
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ddp_common import model, RECIPES
from interp.distributed import process_group
from interp.sae import train
from interp.sae import training

capture, out, mode = sys.argv[1:4]
with process_group(timeout=60) as ctx:
    if mode == "stop":  # rank 0 dies right after writing its first checkpoint
        real = training._Trainer.save_checkpoint
        def save_then_die(self):
            real(self)
            os._exit(3)
        training._Trainer.save_checkpoint = save_then_die
        train(model(), "1.hook_out", capture, out=f"{out}/run", checkpoint_every=10, **RECIPES["topk"])
    elif mode == "resume":  # a one-process run's checkpoint, finished on 2 processes
        sae = train(model(), "1.hook_out", capture, out=f"{out}/run", checkpoint_every=6, **RECIPES["topk"])
        torch.save(sae.state_dict(), f"{out}/run/rank{ctx.rank}.pt")
    else:
        for name, recipe in RECIPES.items():
            sae = train(model(), "1.hook_out", capture, out=f"{out}/{name}", **recipe)
            # what train returns is this process's own: no view of the ranks' shared memory
            assert all(p.untyped_storage().nbytes() == p.numel() * p.element_size() for p in sae.parameters())
            assert all(p.grad is None for p in sae.parameters())  # (the sparse path's were views of slots)
            torch.save(sae.state_dict(), f"{out}/{name}/rank{ctx.rank}.pt")
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    (root / "ddp_common.py").write_text(COMMON)  # not "common": benchmarks/common.py may be imported
    (root / "worker.py").write_text(WORKER)
    sys.path.insert(0, str(root))
    import ddp_common as common

    model = common.model()
    x = torch.randn(300, 6, generator=torch.Generator().manual_seed(1))
    interp.capture_to_disk(model, x, "1.hook_out", root / "capture", batch_size=50, progress=False)
    yield root, common
    sys.path.remove(str(root))


def assert_close(a: dict, b: dict, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=atol, rtol=0), (key, (a[key] - b[key]).abs().max())


def stop_after_first_checkpoint(monkeypatch, model, capture, **options) -> None:
    """Train in this process until its first checkpoint is written, then stop (as if killed)."""
    from interp.sae import training

    real = training._Trainer.save_checkpoint

    def save_then_stop(self):
        real(self)
        raise KeyboardInterrupt

    monkeypatch.setattr(training._Trainer, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train(model, "1.hook_out", capture, **options)
    monkeypatch.setattr(training._Trainer, "save_checkpoint", real)


def test_two_process_ddp_training_equals_one_process(setup, tmp_path, monkeypatch):
    root, common = setup
    result = torchrun(2, str(root / "worker.py"), str(root / "capture"), str(tmp_path), "full")
    assert result.returncode == 0, result.stderr[-3000:]
    from interp.sae import training

    dead_at_resample = []
    real = training._Trainer.resample

    def counting(self, x, y):
        dead_at_resample.append(int((self.since_fired >= self.cfg.dead_after_tokens).sum()))
        return real(self, x, y)

    monkeypatch.setattr(training._Trainer, "resample", counting)
    for name, recipe in common.RECIPES.items():
        one = train(common.model(), "1.hook_out", root / "capture", data_lanes=2, **recipe)
        ranks = [torch.load(tmp_path / name / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
        assert_close(ranks[0], one.state_dict())
        assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])  # the ranks stay equal
        history = json.loads((tmp_path / name / "history.json").read_text())  # rank 0 wrote the run
        assert [h["step"] for h in history] == list(range(len(one.history)))
        for ours, ref in zip(history, one.history, strict=True):
            assert ours.keys() == ref.keys()
            assert all(abs(ours[k] - ref[k]) <= 1e-5 * max(1.0, abs(ref[k])) for k in ref), (ours, ref)
        if name == "topk":
            assert max(h["aux"] for h in history) > 0  # the AuxK path ran
        else:
            assert dead_at_resample and min(dead_at_resample) > 0  # resampling replaced latents
        saved = interp.sae.load(tmp_path / name / "final")
        assert saved.cfg.metadata["training"]["world_size"] == 2
        assert saved.cfg.metadata["training"]["data_lanes"] == 2  # the default: the world size
        # one host: gradients summed in shared memory, Adam split over the ranks (_SharedUpdate)
        assert saved.cfg.metadata["training"]["parallel"] == {
            "gradients": "shared-memory",
            "adam": "split over the ranks",
        }


def test_rank0_checkpoint_resumes_on_one_process(setup, tmp_path):
    """A 2-process run dies after its first checkpoint (rank 0 wrote it); the same call on one
    process resumes it and ends with the uninterrupted one-process weights."""
    root, common = setup
    recipe = common.RECIPES["topk"]
    result = torchrun(2, str(root / "worker.py"), str(root / "capture"), str(tmp_path), "stop")
    assert result.returncode != 0
    meta = json.loads((tmp_path / "run" / "checkpoint" / "trainer.json").read_text())
    assert meta["step"] == 10 and not (tmp_path / "run" / "final").exists()
    resumed = train(
        common.model(), "1.hook_out", root / "capture", out=tmp_path / "run", checkpoint_every=10, **recipe
    )
    assert resumed.cfg.metadata["training"]["data_lanes"] == 2  # kept from the checkpoint
    reference = train(
        common.model(), "1.hook_out", root / "capture", data_lanes=2, checkpoint_every=10, **recipe
    )
    assert_close(resumed.state_dict(), reference.state_dict())


def test_one_process_checkpoint_resumes_on_two(setup, tmp_path, monkeypatch):
    """A one-process run stops after its first checkpoint; the same call on 2 processes (which
    share its weights and Adam state out between them) ends with the uninterrupted weights."""
    root, common = setup
    recipe = common.RECIPES["topk"]
    stop_after_first_checkpoint(monkeypatch, common.model(), root / "capture", out=tmp_path / "run",
                                checkpoint_every=6, data_lanes=2, **recipe)  # fmt: skip
    result = torchrun(2, str(root / "worker.py"), str(root / "capture"), str(tmp_path), "resume")
    assert result.returncode == 0, result.stderr[-3000:]
    reference = train(common.model(), "1.hook_out", root / "capture", data_lanes=2, **recipe)
    for rank in (0, 1):
        assert_close(
            torch.load(tmp_path / "run" / f"rank{rank}.pt", weights_only=True), reference.state_dict()
        )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"data_lanes": 1},
            "Resume on at most 1 processes, or start a new run (another out=) with data_lanes=2",
        ),
        ({"data_lanes": 2, "batch_size": 63}, "batch_size 63 is not a multiple of data_lanes 2"),
        ({"data_lanes": 2, "arch": "batchtopk"}, "Train it on one process, or use arch='topk'"),
    ],
)
def test_bad_parallel_settings_are_refused(options, message):
    cfg = TrainConfig(hook="h", **{"batch_size": 64, **options})
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _check_parallel(cfg, distributed.Context(rank=0, world_size=2))


def test_two_data_lanes_read_disjoint_halves_of_the_capture(setup):
    """Lane p of 2 streams only rows of its half of the capture (half the batch each)."""
    root, common = setup
    from interp.sae.training import stream

    cfg = TrainConfig(hook="1.hook_out", batch_size=64, buffer_batches=4, seed=3)
    ds = interp.load_capture(root / "capture")
    rows = torch.stack([ds[i]["1.hook_out"] for i in range(len(ds))])
    halves = [set(map(tuple, rows[:150].tolist())), set(map(tuple, rows[150:].tolist()))]
    for lane in (0, 1):
        lane_stream = stream(common.model(), root / "capture", ["1.hook_out"], cfg, lane=(lane, 2))
        seen = torch.cat([next(lane_stream)[0] for _ in range(10)])  # > one pass over the half
        assert seen.shape == (320, 16)
        assert set(map(tuple, seen.tolist())) == halves[lane]


def test_checkpoint_from_before_data_lanes_still_resumes(setup, tmp_path, monkeypatch):
    """A checkpoint whose config has no data_lanes (written before lanes existed) is one lane."""
    root, common = setup
    recipe = {**common.RECIPES["topk"], "tokens": 64 * 12}
    stop_after_first_checkpoint(
        monkeypatch, common.model(), root / "capture", out=tmp_path, checkpoint_every=6, **recipe
    )
    meta_path = tmp_path / "checkpoint" / "trainer.json"
    meta = json.loads(meta_path.read_text())
    del meta["config"]["data_lanes"]
    meta_path.write_text(json.dumps(meta))
    resumed = train(
        common.model(), "1.hook_out", root / "capture", out=tmp_path, checkpoint_every=6, **recipe
    )
    reference = train(common.model(), "1.hook_out", root / "capture", checkpoint_every=6, **recipe)
    assert resumed.cfg.metadata["training"]["data_lanes"] == 1
    assert_close(resumed.state_dict(), reference.state_dict(), atol=0)


# GradientSync on its own: rank r's gradients come from x = r + 1; one parameter gets no gradient.
SYNC = """
import glob, os, sys, torch
from interp.distributed import GradientSync, process_group

out, transport = sys.argv[1], sys.argv[2]
with process_group(timeout=60) as ctx:
    x = torch.arange(1.0, 5.0) * (ctx.rank + 1)
    a, b, unused, c = (torch.nn.Parameter(torch.ones(4)) for _ in range(4))
    sync = GradientSync([b, unused, a, c], transport=transport)  # not the order autograd finishes them: launches wait for it
    assert sync.transport == transport
    # rank 0 unlinks the shared block once every rank has mapped it: nothing is left in /dev/shm
    assert not glob.glob(f"/dev/shm/interp-gradients-{os.getpid()}-*")
    grads = []
    for step in range(3):  # the hooks re-arm every step (and shared memory's slots alternate)
        a.grad = b.grad = unused.grad = c.grad = None
        assert sync.defer_sum(torch.zeros(2000)) is None  # more than it carries (1024): the caller's gloo
        small = sync.defer_sum(torch.tensor([ctx.rank + 1, 10 * step]))  # rides the step's meeting
        assert (small is None) == (transport != "shared-memory")
        sync.start()
        ((a * x).sum() + (b * x**2).sum() * (step + 1)).backward()
        # c's gradient is set after the backward, as the sparse path's are: computed in its slot
        slot = sync.slot(c)
        assert (slot is None) == (transport != "shared-memory")
        c.grad = x * (step + 1) if slot is None else torch.mul(x, step + 1, out=slot)
        sync.finish_backward()
        if small is not None:
            assert torch.equal(small.result(), torch.tensor([3, 20 * step])), small.result()
        sync.wait([a])
        sync.wait([b, unused, c])
        assert slot is None or c.grad.data_ptr() != slot.data_ptr()  # the sum is not in the slot
        grads.append(torch.stack([a.grad, b.grad, unused.grad, c.grad]))
    sync.close()
    a.grad = None
    (a * x).sum().backward()  # after close: a plain local backward, no reduction
    grads.append(a.grad.clone())
    torch.save(grads, f"{out}/rank{ctx.rank}.pt")
"""


@pytest.mark.parametrize("mode", ["shared-memory", "exchange", "all-reduce"])
def test_gradient_sync_sums_every_parameter_over_the_ranks(tmp_path, mode):
    """Each gradient is summed over the 2 ranks (a parameter the step missed as zeros), in the
    given launch order whatever order the backward finishes them, on every step (one of them
    computed after the backward, in its shared-memory slot where there is one); ``close`` stops it.
    Every transport: shared memory (the default with every rank on one host; small sums deferred
    to its meeting come back summed, in the value's dtype), the point-to-point exchange (gloo's
    default for 2 ranks on several hosts) and the all-reduce (nccl's)."""
    (tmp_path / "sync.py").write_text(SYNC)
    result = torchrun(2, str(tmp_path / "sync.py"), str(tmp_path), mode)
    assert result.returncode == 0, result.stderr[-3000:]
    xs = [torch.arange(1.0, 5.0) * (r + 1) for r in (0, 1)]
    for rank in (0, 1):
        grads = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for step in (0, 1, 2):
            expected = torch.stack(
                [sum(xs), sum(x**2 for x in xs) * (step + 1), torch.zeros(4), sum(xs) * (step + 1)]
            )
            assert torch.equal(grads[step], expected), (rank, step, grads[step])
        assert torch.equal(grads[3], xs[rank])


FALLBACK = """
import sys, torch
from interp import distributed
from interp.distributed import GradientSync, process_group
from interp.errors import InputError

out = sys.argv[1]
with process_group(timeout=60) as ctx:
    distributed.SHM_DIR = "/nonexistent-shm"  # no shared memory here
    params = [torch.nn.Parameter(torch.ones(3))]
    default = GradientSync(params).transport
    try:
        GradientSync(params, transport="shared-memory")
        refused = ""
    except InputError as err:
        refused = str(err)
    distributed.SHM_DIR = "/dev/shm"
    mixed = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3, dtype=torch.float64))]
    mixed_default = GradientSync(mixed).transport
    open(f"{out}/rank{ctx.rank}.txt", "w").write("\\n".join([default, refused, mixed_default]))
"""


def test_gradient_sync_falls_back_from_shared_memory_with_the_reason(tmp_path):
    """Without a usable shared-memory directory (or with parameters of mixed dtypes) the default
    transport falls back to the exchange on every rank alike; asked for by name, it is refused
    with the reason and the alternatives."""
    (tmp_path / "fallback.py").write_text(FALLBACK)
    result = torchrun(2, str(tmp_path / "fallback.py"), str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):
        default, refused, mixed_default = (tmp_path / f"rank{rank}.txt").read_text().split("\n")
        assert default == "exchange" and mixed_default == "exchange"
        assert "/nonexistent-shm does not exist" in refused and "'exchange' or 'all-reduce'" in refused


LATE = """
import sys, time, torch
from interp.distributed import DistributedError, GradientSync, process_group

out = sys.argv[1]
with process_group(timeout=60) as ctx:
    a = torch.nn.Parameter(torch.ones(3))
    sync = GradientSync([a], transport="shared-memory", timeout=1.5)
    if ctx.rank == 1:
        time.sleep(4)  # never reaches the step's meeting
    else:
        sync.start()
        a.sum().backward()
        sync.finish_backward()
        try:
            sync.wait([a])
            message = "no error"
        except DistributedError as err:
            message = str(err)
        open(f"{out}/rank0.txt", "w").write(message)
"""


def test_shared_memory_meeting_times_out_naming_the_rank_that_did_not_come(tmp_path):
    (tmp_path / "late.py").write_text(LATE)
    result = torchrun(2, str(tmp_path / "late.py"), str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    message = (tmp_path / "rank0.txt").read_text()
    assert message.startswith("rank 1 of 2 did not reach step meeting 1 within 1.5 s"), message


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
def test_owned_rows_split_every_parameter_evenly(world):
    """Each rank's rows of each parameter (the split Adam's share): contiguous, in rank order,
    covering every row once, and as even as whole rows allow."""
    from interp.distributed import owned_rows

    shapes = [(2048, 384), (384,), (3,), (384, 2048), (5, 3), ()]
    owned = owned_rows(shapes, world)
    assert len(owned) == world and all(len(mine) == len(shapes) for mine in owned)
    for i, shape in enumerate(shapes):
        rows = shape[0] if shape else 1
        spans = [owned[r][i] for r in range(world)]
        assert spans[0][0] == 0 and spans[-1][1] == rows
        assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))
        assert max(e - f for f, e in spans) - min(e - f for f, e in spans) <= 1


ROOMLESS = """
import sys, torch
from interp import distributed
from interp.distributed import GradientSync, _layout, process_group

out = sys.argv[1]
with process_group(timeout=60) as ctx:
    params = [torch.nn.Parameter(torch.ones(4, 3)), torch.nn.Parameter(torch.ones(3))]
    roomy = GradientSync(params, shared_state=True)
    made = distributed._create_block
    room = _layout(params, 16, ctx.world_size)[-1][1]  # the gradients alone fit, not the state too
    distributed._create_block = lambda n: made(n) if n <= room else (None, "no room")
    tight = GradientSync(params, small=16, shared_state=True)
    open(f"{out}/rank{ctx.rank}.txt", "w").write(
        " ".join([roomy.transport, str(roomy.shares_state), tight.transport, str(tight.shares_state)])
    )
"""


def test_shared_state_is_left_out_where_shared_memory_has_room_for_the_gradients_only(tmp_path):
    """The split update's values and Adam state are an extra 3 copies of the parameters in the
    block: where they do not fit, the ranks still sum through shared memory, every rank running
    Adam, rather than falling back to sockets."""
    (tmp_path / "roomless.py").write_text(ROOMLESS)
    result = torchrun(2, str(tmp_path / "roomless.py"), str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):
        assert (tmp_path / f"rank{rank}.txt").read_text() == "shared-memory True shared-memory False"
