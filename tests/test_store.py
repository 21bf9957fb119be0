"""Streaming capture to disk (``interp.store``): equality with in-memory capture, resume after a
crash or a kill, bounded memory, and errors on bad input."""

from __future__ import annotations

import fcntl
import json
import os
import random
import signal

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import WORDS  # noqa: E402
from torch import nn  # noqa: E402

import interp  # noqa: E402
from interp import store  # noqa: E402
from interp.errors import InputError, UnknownHookError  # noqa: E402
from interp.store import capture_to_disk, load_capture, read_inputs  # noqa: E402

VOCAB = WORDS
LM_NAMES = ["blocks.*.hook_resid_post", "blocks.*.attn.hook_pattern", "blocks.0.attn.hook_z", "embed.hook_in"]


# ------------------------------------------------------------------------------------------------
# Fixtures
# ------------------------------------------------------------------------------------------------


pytestmark = pytest.mark.usefixtures("one_thread")  # overhead-bound tiny models: 1 thread is fastest


@pytest.fixture(scope="module")
def lm(gpt2_model):
    """The shared random-init 2-layer GPT-2 (tests/conftest.py), saved and loaded like any HF dir."""
    return gpt2_model


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(4, 8, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.conv2(self.relu(self.conv1(x))))
        return self.fc(x.flatten(1))


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    return interp.load(SmallCNN(), input_shape=(1, 8, 8))


@pytest.fixture(scope="module")
def texts() -> list[str]:
    rng = random.Random(0)
    return [" ".join(rng.choice(VOCAB) for _ in range(rng.randint(1, 20))) for _ in range(22)]


def batches(items, size):
    return [(lo, items[lo : lo + size]) for lo in range(0, len(items), size)]


def count_forwards(model, monkeypatch) -> list[int]:
    """Record the batch size of every run_with_cache call the store makes."""
    calls: list[int] = []
    real = type(model).run_with_cache

    def counting(self, inputs, *args, **kwargs):
        calls.append(len(inputs))
        return real(self, inputs, *args, **kwargs)

    monkeypatch.setattr(type(model), "run_with_cache", counting)
    return calls


def leaf_dtype(feature) -> str:
    while hasattr(feature, "feature"):  # List(List(Value)) -> Value
        feature = feature.feature
    return feature.dtype


def assert_same_capture(a, b) -> None:
    assert a.column_names == b.column_names
    assert len(a) == len(b)
    for i in range(len(a)):
        ra, rb = a[i], b[i]
        for col in a.column_names:
            if isinstance(ra[col], torch.Tensor):
                assert torch.equal(ra[col], rb[col]), (i, col)
            else:
                assert ra[col] == rb[col], (i, col)


# ------------------------------------------------------------------------------------------------
# Streamed == in memory
# ------------------------------------------------------------------------------------------------


def test_text_capture_equals_in_memory_capture(lm, texts, tmp_path):
    ds = capture_to_disk(lm, texts, LM_NAMES, tmp_path / "cap", batch_size=4, shard_mb=0, progress=False)
    names = lm.resolve(LM_NAMES)
    assert ds.format["type"] == "torch"
    assert ds.column_names == ["example", "input_ids", "str_tokens", *names]
    assert ds["example"][:].tolist() == list(range(len(texts)))
    manifest = json.loads((tmp_path / "cap" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["names"] == names and manifest["n_examples"] == len(texts)
    assert len(manifest["shards"]) == len(batches(texts, 4))  # shard_mb=0: one shard per batch

    padded = 0
    for lo, chunk in batches(texts, 4):
        _, cache = lm.run_with_cache(chunk, names=names)
        mask = cache.meta["attention_mask"].bool()
        padded += int(not mask.all())
        for j in range(len(chunk)):
            row, real = ds[lo + j], mask[j]
            n = int(real.sum())
            assert torch.equal(row["input_ids"], cache.meta["input_ids"][j][real])
            assert row["str_tokens"] == chunk[j].split()
            for name in names:
                act = cache[name][j]
                shape = lm.hook_shapes[name][1:]
                for axis, dim in enumerate(shape):  # trim every pos axis to the real tokens
                    if dim == "pos":
                        act = act.narrow(axis, 0, n)
                assert row[name].dtype == act.dtype
                assert torch.equal(row[name], act), (lo + j, name)
    assert padded >= 3  # most batches really were padded, so trimming was exercised

    # Trimming is right: each row also matches the example run alone, unpadded (up to float noise).
    for i in (0, 5, len(texts) - 1):
        _, alone = lm.run_with_cache(texts[i], names=names)
        for name in names:
            torch.testing.assert_close(
                ds[i][name], alone[name][0].to(ds[i][name].dtype), rtol=1e-5, atol=1e-6
            )

    assert_same_capture(load_capture(tmp_path / "cap"), ds)


def test_dataset_and_token_inputs(lm, texts, tmp_path):
    import datasets

    names = ["blocks.1.hook_resid_post", "blocks.0.attn.hook_pattern"]
    from_list = capture_to_disk(lm, texts, names, tmp_path / "list", batch_size=8, progress=False)
    from_ds = capture_to_disk(
        lm, datasets.Dataset.from_dict({"text": texts, "other": list(range(len(texts)))}), names,
        tmp_path / "ds", batch_size=8, progress=False,
    )  # fmt: skip
    assert_same_capture(from_ds, from_list)

    ids = torch.randint(0, len(VOCAB) + 2, (10, 12))
    ds = capture_to_disk(lm, ids, names, tmp_path / "ids", batch_size=4, progress=False)
    assert ds.features["blocks.0.attn.hook_pattern"].shape == (4, 12, 12)  # fixed shape: ArrayND
    for lo, chunk in batches(ids, 4):
        _, cache = lm.run_with_cache(chunk, names=names)
        got = ds[lo : lo + len(chunk)]
        assert torch.equal(got["input_ids"], chunk)
        for name in names:
            assert torch.equal(got[name], cache[name])
    assert len(ds[0]["str_tokens"]) == 12


def test_module_capture_and_dtype(cnn, tmp_path):
    x = torch.rand(19, 1, 8, 8)
    names = ["conv*.hook_out", "fc.hook_out"]
    ds = capture_to_disk(cnn, x, names, tmp_path / "cnn", batch_size=5, progress=False)
    assert ds.column_names == ["example", *cnn.resolve(names)]
    half = capture_to_disk(
        cnn, x.numpy(), names, tmp_path / "half", batch_size=5, dtype="float16", progress=False
    )
    for lo, chunk in batches(x, 5):
        _, cache = cnn.run_with_cache(chunk, names=names)
        for name in cache:
            assert torch.equal(ds[lo : lo + len(chunk)][name], cache[name])
            # stored as float16 on disk; datasets' torch format hands floats back as float32
            assert torch.equal(half[lo : lo + len(chunk)][name], cache[name].half().float())
    assert {leaf_dtype(half.features[n]) for n in cnn.resolve(names)} == {"float16"}
    assert sum(os.path.getsize(p) for p in store.shard_files(tmp_path / "half")) < 0.6 * sum(
        os.path.getsize(p) for p in store.shard_files(tmp_path / "cnn")
    )


# ------------------------------------------------------------------------------------------------
# Resume
# ------------------------------------------------------------------------------------------------


class Crash(RuntimeError):
    pass


def crash_after(monkeypatch, k: int) -> None:
    """Make the store raise while writing batch number k + 1."""
    seen = [0]
    real = store._write_batch

    def failing(writer, table, stop):
        seen[0] += 1
        if seen[0] > k:
            raise Crash(f"simulated crash at batch {seen[0]}")
        real(writer, table, stop)

    monkeypatch.setattr(store, "_write_batch", failing)


@pytest.mark.parametrize("shard_mb", [0, 1e6], ids=["shard-per-batch", "one-big-shard"])
def test_resume_after_exception(lm, texts, tmp_path, monkeypatch, shard_mb):
    names = ["blocks.*.hook_resid_post", "blocks.1.attn.hook_pattern"]
    ref = capture_to_disk(lm, texts, names, tmp_path / "ref", batch_size=4, progress=False)
    out = tmp_path / "cap"

    with monkeypatch.context() as patch:
        crash_after(patch, 3)
        with pytest.raises(Crash):
            capture_to_disk(lm, texts, names, out, batch_size=4, shard_mb=shard_mb, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert not manifest["complete"]
    assert manifest["shards"][-1]["stop"] == 12  # the three whole batches were kept, even mid-shard
    assert not [p for p in os.listdir(out) if ".tmp" in p]
    with pytest.raises(InputError, match="unfinished"):
        load_capture(out)
    assert load_capture(out, partial=True)["example"][:].tolist() == list(range(12))

    calls = count_forwards(lm, monkeypatch)
    resumed = capture_to_disk(lm, texts, names, out, batch_size=4, shard_mb=shard_mb, progress=False)
    assert calls == [4, 4, 2]  # only the examples not yet on disk were run again
    assert resumed["example"][:].tolist() == list(range(len(texts)))  # same order, no duplicates
    assert_same_capture(resumed, ref)

    calls.clear()  # a finished capture reopens without running the model
    assert_same_capture(capture_to_disk(lm, texts, names, out, batch_size=4, progress=False), ref)
    assert calls == []


@pytest.mark.parametrize("when", ["mid-write", "after-rename"])
def test_resume_after_sigkill(lm, texts, tmp_path, when):
    """A real SIGKILL (no cleanup runs) in the middle of writing a shard, or between renaming a
    shard into place and listing it in the manifest; the rerun gives the uninterrupted result."""
    names = ["blocks.0.hook_resid_post", "blocks.0.attn.hook_pattern"]
    ref = capture_to_disk(lm, texts, names, tmp_path / "ref", batch_size=4, progress=False)
    out = tmp_path / "cap"

    pid = os.fork()
    if pid == 0:  # child: must never return into pytest
        try:
            if when == "mid-write":
                real = store._ShardWriter.write

                def write(self, table, stop):
                    if stop > 12:  # the fourth batch: write half its bytes, then die
                        sink = pa.BufferOutputStream()
                        with pa.ipc.new_stream(sink, table.schema) as w:
                            w.write_table(table)
                        data = sink.getvalue().to_pybytes()
                        self.file.write(data[: len(data) // 2])
                        self.file.flush()
                        os.kill(os.getpid(), signal.SIGKILL)
                    real(self, table, stop)

                store._ShardWriter.write = write
            else:
                real_manifest = store._write_manifest

                def write_manifest(out_dir, manifest):
                    if manifest["shards"] and manifest["shards"][-1]["stop"] > 12:
                        os.kill(os.getpid(), signal.SIGKILL)
                    real_manifest(out_dir, manifest)

                store._write_manifest = write_manifest
            capture_to_disk(lm, texts, names, out, batch_size=4, shard_mb=0, progress=False)
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL

    left = sorted(os.listdir(out))
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["stop"] for s in manifest["shards"]] == [4, 8, 12]
    if when == "mid-write":
        assert any(".tmp" in p for p in left)  # the half-written shard
    else:
        assert "shard-00003.arrow" in left  # renamed, never listed
    (out / "manifest.json.tmp").write_text('{"half a manif')  # a torn manifest write, too

    resumed = capture_to_disk(lm, texts, names, out, batch_size=4, progress=False)
    assert resumed["example"][:].tolist() == list(range(len(texts)))
    assert_same_capture(resumed, ref)
    assert not [p for p in os.listdir(out) if ".tmp" in p]


def fake_clock(patch, seconds_per_batch: float) -> None:
    """Make every batch written take ``seconds_per_batch`` on the store's clock."""
    now = [0.0]
    real = store._write_batch

    def timed(writer, table, stop):
        real(writer, table, stop)
        now[0] += seconds_per_batch

    patch.setattr(store, "_clock", lambda: now[0])
    patch.setattr(store, "_write_batch", timed)


def test_kill_with_default_shard_size_loses_at_most_a_minute(lm, texts, tmp_path):
    """With the defaults (256 MB shards, which these tiny batches never fill) a kill used to lose
    every batch; shards now also close after 60 s, so a kill loses only the open shard."""
    names = ["blocks.0.hook_resid_post"]
    ref = capture_to_disk(lm, texts, names, tmp_path / "ref", batch_size=2, progress=False)
    out = tmp_path / "cap"
    pid = os.fork()
    if pid == 0:  # child: must never return into pytest
        try:
            with pytest.MonkeyPatch.context() as patch:
                fake_clock(patch, 25.0)  # 25 s a batch: a shard closes after 3 batches (75 s >= 60 s)
                real = store._ShardWriter.write

                def write(self, table, stop):
                    if stop > 16:
                        os.kill(os.getpid(), signal.SIGKILL)
                    real(self, table, stop)

                patch.setattr(store._ShardWriter, "write", write)
                capture_to_disk(lm, texts, names, out, batch_size=2, progress=False)
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert [s["stop"] for s in json.loads((out / "manifest.json").read_text())["shards"]] == [6, 12]
    resumed = capture_to_disk(lm, texts, names, out, batch_size=2, progress=False)
    assert_same_capture(resumed, ref)


@pytest.mark.parametrize(
    ("seconds_per_batch", "limits", "stops"),
    [
        (0.0, {"shard_rows": 5}, [6, 12, 18, 22]),  # 3 batches of 2 reach 5 rows
        (35.0, {}, [4, 8, 12, 16, 20, 22]),  # default shard_seconds=60: 2 batches of 35 s
        (35.0, {"shard_seconds": 100}, [6, 12, 18, 22]),
        (0.0, {"shard_seconds": 0}, [2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22]),
        (0.0, {}, [22]),  # nothing reached but the end
    ],
)
def test_shard_boundaries(cnn, tmp_path, monkeypatch, seconds_per_batch, limits, stops):
    x = torch.rand(22, 1, 8, 8)
    fake_clock(monkeypatch, seconds_per_batch)
    ds = capture_to_disk(cnn, x, "fc.hook_out", tmp_path / "cap", batch_size=2, progress=False, **limits)
    assert [
        s["stop"] for s in json.loads((tmp_path / "cap" / "manifest.json").read_text())["shards"]
    ] == stops
    assert torch.equal(ds["fc.hook_out"][:], cnn.run_with_cache(x, names="fc.hook_out")[1]["fc.hook_out"])


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        ({"shard_mb": -1}, "shard_mb must be a number >= 0, got -1"),
        ({"shard_mb": float("nan")}, "shard_mb must be a number >= 0, got nan"),
        ({"shard_seconds": "60"}, "shard_seconds must be a number >= 0, got '60'"),
        ({"shard_rows": 2.5}, r"shard_rows must be an integer >= 0 or None \(no row limit\), got 2.5"),
        ({"shard_rows": -3}, "shard_rows must be an integer >= 0 or None"),
    ],
)
def test_bad_shard_limits_are_refused(cnn, tmp_path, limits, message):
    with pytest.raises(InputError, match=message):
        capture_to_disk(
            cnn, torch.rand(2, 1, 8, 8), "fc.hook_out", tmp_path / "cap", progress=False, **limits
        )
    assert not (tmp_path / "cap").exists()  # refused before anything was written


# ------------------------------------------------------------------------------------------------
# Checksums
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["xxh3_128", "sha256"])
def test_shard_checksums_are_recorded_and_verified(cnn, tmp_path, monkeypatch, algorithm):
    """Each manifest entry holds the checksum of its file's bytes, hashed independently here;
    the default (xxh3_128) and sha256 both verify, and a flipped byte is caught by either."""
    import hashlib

    import xxhash

    reference = {
        "xxh3_128": lambda b: xxhash.xxh3_128(b).hexdigest(),
        "sha256": lambda b: hashlib.sha256(b).hexdigest(),
    }
    monkeypatch.setattr(store, "CHECKSUM", algorithm)
    out = tmp_path / "cap"
    x = torch.rand(9, 1, 8, 8)
    ds = capture_to_disk(
        cnn, x, ["conv1.hook_out", "fc.hook_out"], out, batch_size=4, shard_mb=0, progress=False
    )
    shards = json.loads((out / "manifest.json").read_text())["shards"]
    assert len(shards) == 3
    for entry in shards:
        data = (out / entry["file"]).read_bytes()
        assert entry["checksum"] == f"{algorithm}:{reference[algorithm](data)}"
        assert entry["bytes"] == len(data)
    assert store.shard_files(out) == [str(out / s["file"]) for s in shards]
    monkeypatch.setattr(store, "CHECKSUM", "xxh3_128")  # reading follows the recorded kind, not the default
    assert_same_capture(load_capture(out), ds)

    path = out / "shard-00001.arrow"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match="shard-00001.arrow does not match its checksum"):
        load_capture(out)
    with pytest.raises(InputError, match="shard-00001.arrow does not match its checksum"):
        store.shard_files(out)


def test_resume_with_same_sized_other_weights_is_refused(cnn, tmp_path):
    """A retrained model keeps its name and parameter count; its weights fingerprint tells them apart."""
    import copy

    x = torch.rand(12, *cnn.input_shape)
    out = tmp_path / "cap"
    capture_to_disk(cnn, x, "conv1.hook_out", out, batch_size=4, progress=False)
    capture_to_disk(cnn, x, "conv1.hook_out", out, batch_size=4, progress=False)  # same weights: resumes
    retrained = copy.deepcopy(cnn)
    with torch.no_grad():
        next(retrained.module.parameters()).add_(1e-3)
    with pytest.raises(InputError, match="different model weights"):
        capture_to_disk(retrained, x, "conv1.hook_out", out, batch_size=4, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())  # written before fingerprints existed
    del manifest["weights_fingerprint"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert len(capture_to_disk(cnn, x, "conv1.hook_out", out, batch_size=4, progress=False)) == 12


def test_mismatched_resume_is_refused(lm, texts, tmp_path):
    out = tmp_path / "cap"
    capture_to_disk(lm, texts, "blocks.0.hook_resid_post", out, batch_size=8, shard_mb=0, progress=False)
    assert len([p for p in os.listdir(out) if p.endswith(".arrow")]) == 3
    with pytest.raises(InputError, match="hook names") as err:
        capture_to_disk(lm, texts, "blocks.1.hook_resid_post", out, progress=False)
    assert "new out_dir" in str(err.value) and "resume=False" in str(err.value)
    with pytest.raises(InputError, match="inputs"):
        capture_to_disk(
            lm, [*texts[:-1], "a different text"], "blocks.0.hook_resid_post", out, progress=False
        )
    with pytest.raises(InputError, match="dtype"):
        capture_to_disk(lm, texts, "blocks.0.hook_resid_post", out, dtype="float16", progress=False)

    fresh = capture_to_disk(lm, texts[:5], "blocks.1.hook_resid_post", out, resume=False, progress=False)
    assert fresh.column_names[-1] == "blocks.1.hook_resid_post" and len(fresh) == 5
    assert sorted(p for p in os.listdir(out) if p.endswith(".arrow")) == ["shard-00000.arrow"]


def test_refuses_foreign_or_busy_directory(lm, texts, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not an interp capture"):
        capture_to_disk(lm, texts, "blocks.0.hook_resid_post", foreign, progress=False)
    assert sorted(os.listdir(foreign)) == ["notes.txt"]  # nothing written there, nothing removed

    busy = tmp_path / "busy"
    busy.mkdir()
    with open(busy / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        with pytest.raises(InputError, match="another capture"):
            capture_to_disk(lm, texts, "blocks.0.hook_resid_post", busy, progress=False)
    assert (busy / ".lock").exists()  # another process's lock is never removed


def test_a_finished_capture_leaves_no_lock_file(lm, texts, tmp_path):
    out = tmp_path / "acts"
    capture_to_disk(lm, texts, "blocks.0.hook_resid_post", out, progress=False)
    assert ".lock" not in os.listdir(out)
    capture_to_disk(lm, texts, "blocks.0.hook_resid_post", out, progress=False)  # resumes, relocks
    assert ".lock" not in os.listdir(out)


# ------------------------------------------------------------------------------------------------
# Memory
# ------------------------------------------------------------------------------------------------


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc")
def test_memory_stays_bounded(tmp_path, monkeypatch):
    """24 batches of 8 MB each are written; resident memory must not grow by more than a couple of
    batches over the run (holding every batch would add ~190 MB)."""
    torch.manual_seed(0)
    wide = interp.load(nn.Sequential(nn.Linear(64, 32768)), input_shape=(64,))
    x = torch.randn(24 * 64, 64)
    batch_bytes = 64 * 32768 * 4
    rss: list[int] = []
    arrow: list[int] = []
    real = store._write_batch

    def sampling(writer, table, stop):
        real(writer, table, stop)
        rss.append(_rss())
        arrow.append(pa.total_allocated_bytes())

    monkeypatch.setattr(store, "_write_batch", sampling)
    ds = capture_to_disk(wide, x, "0.hook_out", tmp_path / "wide", batch_size=64, shard_mb=64, progress=False)
    assert len(ds) == len(x) and len(rss) == 24
    written = sum(os.path.getsize(tmp_path / "wide" / p) for p in os.listdir(tmp_path / "wide"))
    assert written > 20 * batch_bytes
    growth = max(rss[2:]) - rss[2]  # after warm-up
    assert growth < 3 * batch_bytes, f"RSS grew {growth / 2**20:.0f} MiB over the run"
    assert max(arrow) < 3 * batch_bytes  # Arrow buffers are released after each batch
    torch.testing.assert_close(ds[100]["0.hook_out"], wide(x[100:101])[0], rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------


def test_unknown_hook_names_propagate_with_suggestions(lm, texts, tmp_path):
    with pytest.raises(UnknownHookError, match="Did you mean") as err:
        capture_to_disk(lm, texts, "blocks.0.hook_resid_pots", tmp_path / "cap", progress=False)
    assert "blocks.0.hook_resid_post" in str(err.value)
    assert not (tmp_path / "cap").exists()  # refused before anything was written


def test_bad_inputs_are_refused(lm, cnn, texts, tmp_path):
    out = tmp_path / "cap"
    with pytest.raises(InputError, match="single string"):
        capture_to_disk(lm, "the cat sat", "blocks.0.hook_resid_post", out, progress=False)
    with pytest.raises(InputError, match="empty"):
        capture_to_disk(lm, [], "blocks.0.hook_resid_post", out, progress=False)
    with pytest.raises(InputError, match="integer tensor"):
        capture_to_disk(lm, torch.rand(3, 5), "blocks.0.hook_resid_post", out, progress=False)
    with pytest.raises(InputError, match="takes tensors"):
        capture_to_disk(cnn, texts, "fc.hook_out", out, progress=False)
    with pytest.raises(InputError, match="bfloat16"):
        capture_to_disk(cnn, torch.rand(2, 1, 8, 8), "fc.hook_out", out, dtype=torch.bfloat16, progress=False)
    with pytest.raises(InputError, match="batch_size"):
        capture_to_disk(cnn, torch.rand(2, 1, 8, 8), "fc.hook_out", out, batch_size=0, progress=False)
    with pytest.raises(InputError, match="no capture"):
        load_capture(tmp_path / "nothing-here")


def test_read_inputs_files(tmp_path):
    (tmp_path / "a.txt").write_text("the cat sat\n\nthe dog ran\n")
    assert read_inputs(tmp_path / "a.txt") == ["the cat sat", "the dog ran"]
    (tmp_path / "a.jsonl").write_text('{"text": "the cat"}\n\n{"text": "a dog", "id": 2}\n')
    assert read_inputs(tmp_path / "a.jsonl") == ["the cat", "a dog"]
    ids = np.arange(12, dtype=np.int64).reshape(3, 4)
    np.save(tmp_path / "ids.npy", ids)
    assert torch.equal(read_inputs(tmp_path / "ids.npy"), torch.from_numpy(ids))
    from safetensors.torch import save_file

    save_file({"input_ids": torch.from_numpy(ids), "labels": torch.zeros(3)}, str(tmp_path / "t.safetensors"))
    assert torch.equal(read_inputs(tmp_path / "t.safetensors"), torch.from_numpy(ids))


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.txt", "\n  \n", "holds no texts"),
        ("empty.jsonl", "", "holds no texts"),
        ("bad.jsonl", '{"text": "ok"}\n{"text": \n', "line 2 is not valid JSON"),
        ("notext.jsonl", '{"body": "x"}\n', "line 1 needs a 'text'"),
        ("binary.txt", b"\xff\xfe\x00garbage", "cannot read"),
        ("garbage.npy", b"not numpy at all", "cannot read"),
        ("garbage.safetensors", b"\x00\x01", "cannot read"),
        ("inputs.csv", "text\nhello\n", "unknown file type"),
        ("missing.txt", None, "does not exist"),
    ],
)
def test_read_inputs_errors(tmp_path, name, content, message):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(InputError, match=message):
        read_inputs(path)


def test_read_inputs_empty_tensor_and_ambiguous_safetensors(tmp_path):
    np.save(tmp_path / "empty.npy", np.zeros((0, 4), dtype=np.int64))
    with pytest.raises(InputError, match="holds no examples"):
        read_inputs(tmp_path / "empty.npy")
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(2), "b": torch.zeros(2)}, str(tmp_path / "two.safetensors"))
    with pytest.raises(InputError, match="input_ids"):
        read_inputs(tmp_path / "two.safetensors")


def test_progress_bar(cnn, tmp_path, capsys):
    capture_to_disk(cnn, torch.rand(6, 1, 8, 8), "fc.hook_out", tmp_path / "p", batch_size=2)
    err = capsys.readouterr().err
    assert "6/6" in err and "MB/s" in err
