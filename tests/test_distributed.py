"""Data-parallel capture under torchrun: two processes on localhost (gloo) give the one-process
capture row for row, resume after a rank is killed (on any number of processes), and fail fast
with the failing rank's message."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_store import assert_same_capture

import interp
from interp.errors import InputError
from interp.store import capture_to_disk, load_capture

SRC = str(Path(interp.__file__).resolve().parents[1])
CNN_HOOKS = ["conv1.hook_out", "fc.hook_out"]

pytestmark = pytest.mark.usefixtures("one_thread")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip


def torchrun(nproc: int, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node nproc ARGS`` on a free port (``-m interp ...`` or a script)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *args]  # fmt: skip
    return subprocess.run(command, env=env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("inputs") / "images.npy"
    np.save(path, np.random.default_rng(0).random((45, 1, 8, 8), dtype=np.float32))
    return path


@pytest.fixture(scope="module")
def cnn_reference(images, tmp_path_factory):
    model = interp.load("zoo:digits-cnn")
    out = tmp_path_factory.mktemp("reference")
    return capture_to_disk(
        model, torch.from_numpy(np.load(images)), CNN_HOOKS, out, batch_size=4, progress=False
    )


# A rank of a 2-process capture that SIGKILLs itself while writing its 3rd batch (one shard per batch).
KILLED = """
import os, signal, sys
import numpy as np, torch
import interp
from interp import store
from interp.distributed import process_group

images, out = sys.argv[1], sys.argv[2]
with process_group(timeout=30) as ctx:
    if ctx.rank == 1:
        real, seen = store._write_batch, []
        def dying(writer, table, stop):
            seen.append(stop)
            if len(seen) == 3:
                os.kill(os.getpid(), signal.SIGKILL)
            real(writer, table, stop)
        store._write_batch = dying
    model = interp.load("zoo:digits-cnn")
    store.capture_to_disk(model, torch.from_numpy(np.load(images)), ["conv1.hook_out", "fc.hook_out"], out,
                          batch_size=4, shard_rows=0, progress=False)
"""


def cli_capture(
    nproc: int, out: Path, inputs: Path, *extra: str, model: str = "zoo:digits-cnn", hooks=CNN_HOOKS
):
    hook_args = [arg for hook in hooks for arg in ("--hooks", hook)]
    args = ["-m", "interp", "capture", "--model", model, *hook_args, "--input", str(inputs),
            "--out", str(out), *extra]  # fmt: skip
    if nproc == 1:
        command = [sys.executable, *args]
        return subprocess.run(command, env=env(), capture_output=True, text=True, timeout=120)
    return torchrun(nproc, *args)


def test_two_process_text_capture_equals_one_process(gpt2_dir, gpt2_model, tmp_path):
    """torchrun -m interp capture on 2 ranks: the one manifest verifies, and the dataset is the
    one-process library capture row for row (ragged text rows, patterns, tokens)."""
    texts = [
        " ".join(["the cat sat on the mat"] * (1 + i % 4)) + f" {'big ' * (i % 3)}dog" for i in range(23)
    ]
    (tmp_path / "texts.txt").write_text("\n".join(texts) + "\n")
    hooks = ["blocks.*.hook_resid_post", "blocks.0.attn.hook_pattern"]
    out = tmp_path / "two"
    result = cli_capture(2, out, tmp_path / "texts.txt", "--batch-size", "4", model=gpt2_dir, hooks=hooks)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("wrote 23 rows") == 1  # rank 0 reports, once
    reference = capture_to_disk(gpt2_model, texts, hooks, tmp_path / "one", batch_size=4, progress=False)
    merged = load_capture(out)  # verify=True: every checksum in the merged manifest is read and checked
    assert_same_capture(merged, reference)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["parts_merged"] == 2
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [s["file"] for s in manifest["shards"]] + ["manifest.json"]
    )
    # Part cuts fall on batch boundaries, so each forward pass held the same examples as in one process.
    assert all(s["start"] % 4 == 0 for s in manifest["shards"])


@pytest.mark.parametrize("rerun", ["torchrun-2", "library-1"])
def test_killed_rank_then_rerun_equals_one_process(images, cnn_reference, tmp_path, rerun, capsys):
    """Rank 1 is SIGKILLed mid-capture (torchrun stops rank 0). Rerunning the same command on 2
    processes, or the same library call in one process (another world size), completes it:
    nothing lost, nothing duplicated, and rank 1's shards from before the kill are kept (the same
    files), not captured again. A rerun with other hooks is refused and touches nothing."""
    script = tmp_path / "killed.py"
    script.write_text(KILLED)
    out = tmp_path / "cap"
    killed = torchrun(2, str(script), str(images), str(out))
    assert killed.returncode != 0
    with pytest.raises(interp.InterpError, match="data-parallel capture that has not finished"):
        load_capture(out)
    part = out / "parts" / "part-00001"
    kept = json.loads((part / "manifest.json").read_text())["shards"]
    assert [s["stop"] - s["start"] for s in kept] == [4, 4]  # two whole batches survived the kill
    inodes = {s["start"]: (part / s["file"]).stat().st_ino for s in kept}
    model, x = interp.load("zoo:digits-cnn"), torch.from_numpy(np.load(images))
    with pytest.raises(InputError, match="holds a capture made with a different hook names.*--no-resume"):
        capture_to_disk(model, x, ["fc.hook_in"], out, batch_size=4)
    assert json.loads((part / "manifest.json").read_text())["shards"] == kept

    if rerun == "torchrun-2":
        result = cli_capture(2, out, images, "--batch-size", "4")
        assert result.returncode == 0, result.stderr[-3000:]
        assert "part p runs on rank" not in result.stdout
    else:
        top = (out / "manifest.json").read_text()
        damaged = json.loads(top)
        damaged["parts"][1][0] += 4  # a gap between the parts: the split cannot be trusted
        (out / "manifest.json").write_text(json.dumps(damaged))
        with pytest.raises(InputError, match="field 'parts' .* not contiguous ranges .*--no-resume"):
            capture_to_disk(model, x, CNN_HOOKS, out, batch_size=4)
        (out / "manifest.json").write_text(top)
        capture_to_disk(model, x, CNN_HOOKS, out, batch_size=4)
        assert "resuming a capture split into 2 parts (by 2 processes) on 1" in capsys.readouterr().out
    merged = load_capture(out)
    assert_same_capture(merged, cnn_reference)
    manifest = json.loads((out / "manifest.json").read_text())
    relinked = {
        s["start"]: (out / s["file"]).stat().st_ino for s in manifest["shards"] if s["start"] in inodes
    }
    assert relinked == inodes
    assert not (out / "parts").exists()


def test_a_failing_rank_stops_the_job_with_its_message(images, tmp_path):
    """NaN in the second half of the inputs: rank 1 raises; rank 0 stops at its next batch; the
    job exits non-zero well within the timeout, and rank 1's message is printed."""
    x = np.load(images)
    x[30] = np.nan
    bad = tmp_path / "bad.npy"
    np.save(bad, x)
    began = time.monotonic()
    result = cli_capture(2, tmp_path / "cap", bad, "--batch-size", "4", "--timeout", "60")
    assert result.returncode != 0
    assert time.monotonic() - began < 60
    # both ranks exit with rank 1's message: rank 0 stopped because rank 1 failed, and says so
    assert result.stderr.count("error: rank 1: the input to zoo:digits-cnn holds 64 NaN") == 2


def test_unreachable_master_times_out_naming_the_address(images, tmp_path):
    port = free_port()  # nothing listens there
    environment = {**env(), "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1",
                   "MASTER_PORT": str(port)}  # fmt: skip
    command = [sys.executable, "-m", "interp", "capture", "--model", "zoo:digits-cnn", "--hooks", "fc.hook_out",
               "--input", str(images), "--out", str(tmp_path / "cap"), "--timeout", "1"]  # fmt: skip
    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert f"127.0.0.1:{port}" in result.stderr and "within 1 s" in result.stderr


BIND = """
import json, os, sys
import torch
from interp.distributed import bound_cores, process_group
torch.set_num_threads(1)
with process_group(timeout=60) as ctx:
    with bound_cores() as share:
        inside = sorted(os.sched_getaffinity(0))
    after = sorted(os.sched_getaffinity(0))
    open(f"{sys.argv[1]}/rank{ctx.rank}.json", "w").write(json.dumps([share, inside, after]))
"""


def test_core_share_splits_the_cpus_into_equal_contiguous_groups():
    from interp.distributed import core_share

    cpus = [0, 1, 2, 3, 4, 5, 6, 7]
    assert [core_share(cpus, r, 3) for r in range(3)] == [[0, 1], [2, 3], [4, 5]]
    assert [core_share([4, 9], r, 2) for r in range(2)] == [[4], [9]]


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs")
@pytest.mark.parametrize("bind", ["1", "0"])
def test_gloo_ranks_are_bound_to_disjoint_shares_of_the_cores(tmp_path, monkeypatch, bind):
    """Inside ``bound_cores`` each rank of a 2-process job runs on its own half of the CPUs, and
    on all of them again after it (INTERP_BIND_CORES=0: on all of them throughout)."""
    monkeypatch.setenv("INTERP_BIND_CORES", bind)
    (tmp_path / "bind.py").write_text(BIND)
    result = torchrun(2, str(tmp_path / "bind.py"), str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    cpus = sorted(os.sched_getaffinity(0))
    half = len(cpus) // 2
    for rank, mine in enumerate((cpus[:half], cpus[half : 2 * half])):
        share, inside, after = json.loads((tmp_path / f"rank{rank}.json").read_text())
        if bind == "1":
            assert share == inside == mine
        else:
            assert share is None and inside == cpus
        assert after == cpus
