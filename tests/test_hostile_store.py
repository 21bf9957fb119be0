"""Hostile and corrupted captures (``interp.store``): every edit of a manifest and every damaged
shard is either refused by ``load_capture`` with an error naming the shard or field, or repaired
by resume, which keeps the shards before the first one that fails and captures the rest again.

Each case is checked against an uninterrupted reference capture: after resume the rows are
identical, and only the examples from the first bad shard on are run through the model again.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import xxhash  # noqa: E402
from test_store import count_forwards  # noqa: E402
from torch import nn  # noqa: E402

import interp  # noqa: E402
from interp import store  # noqa: E402
from interp.errors import InputError  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

N, BATCH = 120, 10  # shard_mb=0: one shard of 10 examples per batch, 12 shards in all
NAMES = ["0.hook_out", "2.hook_out"]  # an Array3D column and a list column
KEPT_ON_INTERRUPT = 5  # the interrupted capture has shards 0-4 (examples 0-49)
RERUN = "Rerun the same capture_to_disk call"


class Interrupt(RuntimeError):
    pass


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return interp.load(
        nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(72, 3)), input_shape=(1, 8, 8)
    )


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.rand(N, 1, 8, 8)


@pytest.fixture(scope="module")
def reference(model, x, tmp_path_factory):
    """The uninterrupted capture every repaired one must equal."""
    return capture(model, x, tmp_path_factory.mktemp("reference") / "cap")


def capture(model, inputs, out: Path, **kwargs):
    return store.capture_to_disk(
        model, inputs, NAMES, out, batch_size=BATCH, shard_mb=0, progress=False, **kwargs
    )


def interrupted(model, x, out: Path) -> Path:
    """A capture stopped by an exception while writing batch KEPT_ON_INTERRUPT + 1."""
    real, seen = store._write_batch, [0]

    def failing(writer, table, stop):
        seen[0] += 1
        if seen[0] > KEPT_ON_INTERRUPT:
            raise Interrupt
        real(writer, table, stop)

    store._write_batch = failing
    try:
        with pytest.raises(Interrupt):
            capture(model, x, out)
    finally:
        store._write_batch = real
    assert [s["stop"] for s in manifest(out)["shards"]] == [10, 20, 30, 40, 50]
    return out


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def edit(out: Path, change: Callable[[dict], object]) -> None:
    """Hand-edit manifest.json, as a user with a text editor would."""
    data = manifest(out)
    change(data)
    (out / "manifest.json").write_text(json.dumps(data, indent=1))


def flip_bytes(path: Path, n: int = 64) -> None:
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid : mid + n] = bytes(b ^ 0xFF for b in data[mid : mid + n])
    path.write_bytes(bytes(data))
    assert len(data) == path.stat().st_size  # same size: a size check cannot see it


def assert_identical(ds, ref) -> None:
    assert ds["example"][:].tolist() == list(range(N))
    assert ds.with_format("arrow")[:].equals(ref.with_format("arrow")[:])


# ------------------------------------------------------------------------------------------------
# The cases: how the directory is damaged, what the error says, how many shards survive
# ------------------------------------------------------------------------------------------------


def raise_last_stop(out: Path) -> None:  # the case: resume skipped 40 rows
    edit(out, lambda m: m["shards"][-1].update(stop=m["shards"][-1]["stop"] + 40))


def complete_on_partial(out: Path) -> None:  # the case: load returned a part silently
    edit(out, lambda m: m.update(complete=True))


def truncate_with_forged_size_and_checksum(out: Path) -> None:
    path = out / "shard-00003.arrow"
    os.truncate(path, path.stat().st_size // 2)

    def forge(m):
        m["shards"][3]["bytes"] = path.stat().st_size
        m["shards"][3]["checksum"] = "xxh3_128:" + xxhash.xxh3_128(path.read_bytes()).hexdigest()

    edit(out, forge)


def swap_in_another_shard(out: Path) -> None:
    """Shard 3's bytes under shard 2's name, with size and checksum forged to match."""
    shutil.copyfile(out / "shard-00003.arrow", out / "shard-00002.arrow")
    edit(
        out,
        lambda m: m["shards"][2].update(bytes=m["shards"][3]["bytes"], checksum=m["shards"][3]["checksum"]),
    )


def retype_feature(out: Path) -> None:
    edit(out, lambda m: m["features"]["2.hook_out"]["feature"].update(dtype="float16"))


CASES = {
    # name: (start from a complete capture?, damage, message, shards kept)
    "stop-raised-by-40": (
        False, raise_last_stop,
        r"shard-00004\.arrow holds 10 rows, but manifest\.json says it holds examples 40 to 90 \(50 rows\)", 4,
    ),
    "complete-on-partial": (
        False, complete_on_partial,
        r"field 'complete' in manifest\.json is true, but its shards cover 50 of the 120 examples", 5,
    ),
    "byte-flip-partial": (
        False, lambda out: flip_bytes(out / "shard-00002.arrow"),
        r"shard-00002\.arrow does not match its checksum in manifest\.json: its bytes changed", 2,
    ),
    "byte-flip-complete": (
        True, lambda out: flip_bytes(out / "shard-00007.arrow"),
        r"shard-00007\.arrow does not match its checksum in manifest\.json", 7,
    ),
    "truncated": (
        True, lambda out: os.truncate(out / "shard-00003.arrow", 1000),
        r"shard-00003\.arrow is 1,000 bytes but manifest\.json records [\d,]+ \(truncated or rewritten\)", 3,
    ),
    "truncated-forged": (
        True, truncate_with_forged_size_and_checksum,
        r"shard-00003\.arrow cannot be read as an Arrow shard \(OSError: 'Expected to be able to read", 3,
    ),
    "missing-shard": (
        True, lambda out: (out / "shard-00001.arrow").unlink(),
        r"shard-00001\.arrow is listed in manifest\.json but missing", 1,
    ),
    "entry-removed": (
        True, lambda out: edit(out, lambda m: m["shards"].pop(2)),
        r"shard entry 2 in manifest\.json \('shard-00003\.arrow'\) starts at example 30, but the shard "
        r"before it ends at 20: shard ranges must be contiguous", 2,
    ),
    "range-shifted": (
        False, lambda out: edit(out, lambda m: m["shards"][3].update(start=25)),
        r"\('shard-00003\.arrow'\) starts at example 25, but the shard before it ends at 30", 3,
    ),
    "first-not-at-0": (
        True, lambda out: edit(out, lambda m: m["shards"][0].update(start=1)),
        r"starts at example 1, but the first shard must start at 0", 0,
    ),
    "stop-past-inputs": (
        True, lambda out: edit(out, lambda m: m["shards"][-1].update(stop=200)),
        r"\('shard-00011\.arrow'\) claims examples 110 to 200, not a range within the 120 inputs", 11,
    ),
    "swapped-shard": (
        True, swap_in_another_shard,
        r"shard-00002\.arrow's 'example' column is not the examples 20 to 30 that manifest\.json lists", 2,
    ),
    "features-mismatch": (
        True, retype_feature,
        r"shard-00000\.arrow's columns do not match field 'features' in manifest\.json \(column "
        r"'2\.hook_out' is List\(Value\('float16'\)\) in the manifest, List\(Value\('float32'\)\) in the shard\)", 0,
    ),
    "features-column-dropped": (
        True, lambda out: edit(out, lambda m: m["features"].pop("2.hook_out")),
        r"field 'features' in manifest\.json has columns \['example', '0\.hook_out'\], but a capture of "
        r"field 'names' has \['example', '0\.hook_out', '2\.hook_out'\]", 0,
    ),
    "checksum-removed": (
        True, lambda out: edit(out, lambda m: m["shards"][1].pop("checksum")),
        r"manifest\.json records no checksum for shard-00001\.arrow", 1,
    ),
    "checksum-of-unknown-kind": (
        True, lambda out: edit(out, lambda m: m["shards"][4].update(checksum="crc0:1234")),
        r"shard-00004\.arrow's checksum in manifest\.json is of unknown kind 'crc0'", 4,
    ),
    "path-outside-the-capture": (
        True, lambda out: edit(out, lambda m: m["shards"][1].update(file="../../elsewhere.arrow")),
        r"shard entry 1 in manifest\.json names file '\.\./\.\./elsewhere\.arrow'; shard 1 must be "
        r"'shard-00001\.arrow'", 1,
    ),
    "start-not-an-integer": (
        True, lambda out: edit(out, lambda m: m["shards"][0].update(start="0")),
        r"shard entry 0 in manifest\.json \(shard-00000\.arrow\) has 'start' = '0', not an integer", 0,
    ),
    "entry-not-an-object": (
        True, lambda out: edit(out, lambda m: m["shards"].__setitem__(6, "shard-00006.arrow")),
        r"shard entry 6 in manifest\.json is 'shard-00006\.arrow', not an object", 6,
    ),
    "shards-not-a-list": (
        True, lambda out: edit(out, lambda m: m.update(shards="all of them")),
        r"field 'shards' in manifest\.json is 'all of them', not a list", 0,
    ),
    "complete-not-a-bool": (
        True, lambda out: edit(out, lambda m: m.update(complete="yes")),
        r"field 'complete' in manifest\.json is 'yes', not true or false", 0,
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_damaged_capture_is_refused_then_repaired(model, x, reference, tmp_path, monkeypatch, case):
    from_complete, damage, message, kept = CASES[case]
    out = tmp_path / "cap"
    if from_complete:
        capture(model, x, out)
    else:
        interrupted(model, x, out)
    damage(out)

    for partial in (False, True):  # a capture that fails a check is never opened, not even in part
        with pytest.raises(InputError, match=message) as err:
            store.load_capture(out, partial=partial)
        assert str(err.value).startswith(f"the capture in {out} cannot be trusted: ")
        assert RERUN in str(err.value) and "\n" not in str(err.value)

    calls = count_forwards(model, monkeypatch)
    with pytest.warns(UserWarning, match=message) as warned:
        repaired = capture(model, x, out)
    said = [str(w.message) for w in warned if "Keeping what verifies" in str(w.message)]
    assert len(said) == 1 and f"Keeping what verifies ({kept} shard" in said[0]
    assert sum(calls) == N - kept * BATCH  # the shards before the bad one were kept, not recomputed
    assert_identical(repaired, reference)
    assert_identical(store.load_capture(out), reference)  # and the repaired directory verifies
    assert sorted(p for p in os.listdir(out) if p.endswith(".arrow")) == [
        f"shard-{i:05d}.arrow" for i in range(12)
    ]
    assert not [p for p in os.listdir(out) if ".tmp" in p]


def test_missing_checksum_names_verify_false_and_it_loads_trusted_files(model, x, reference, tmp_path):
    """A capture without checksums (an older interp, or an edit) is refused, but the error names
    verify=False, which opens it for a user who trusts the files."""
    out = tmp_path / "cap"
    capture(model, x, out)
    edit(out, lambda m: [s.pop("checksum") for s in m["shards"]])
    with pytest.raises(InputError, match="no checksum for shard-00000.arrow") as err:
        store.load_capture(out)
    assert "or pass verify=False if you trust these files" in str(err.value)
    assert_identical(store.load_capture(out, verify=False), reference)


def test_verify_false_still_checks_the_manifest(model, x, tmp_path):
    """verify=False skips only the checksums; the cheap checks (ranges, rows, complete) still run."""
    out = interrupted(model, x, tmp_path / "cap")
    complete_on_partial(out)
    with pytest.raises(InputError, match="field 'complete' in manifest.json is true"):
        store.load_capture(out, verify=False)
    with pytest.raises(InputError, match="field 'complete'"):
        store.shard_files(out, verify=False)


def test_verify_false_on_resume_keeps_shards_without_reading_them(model, x, reference, tmp_path, monkeypatch):
    out = interrupted(model, x, tmp_path / "cap")
    read: list[str] = []
    real = store._file_checksum
    monkeypatch.setattr(store, "_file_checksum", lambda path, alg: read.append(path.name) or real(path, alg))
    assert_identical(capture(model, x, out, verify=False), reference)
    assert read == []  # no shard was read back for its checksum
    assert_identical(capture(model, x, out), reference)  # the default resume verifies each one
    assert read == [f"shard-{i:05d}.arrow" for i in range(12)]


def test_edited_example_count_is_refused(model, x, tmp_path):
    """n_examples edited down: load sees shards past the inputs; resume sees other inputs."""
    out = tmp_path / "cap"
    capture(model, x, out)
    edit(out, lambda m: m.update(n_examples=55))
    with pytest.raises(
        InputError, match=r"\('shard-00005.arrow'\) claims examples 50 to 60, not a range within the 55"
    ):
        store.load_capture(out)
    with pytest.raises(InputError, match="different number of examples"):
        capture(model, x, out)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"format": "interp.capture", "shards": [', "manifest.json is not readable JSON"),
        ('["a", "list"]', "manifest.json is not an interp capture manifest"),
        ('{"format": "something else"}', "manifest.json is not an interp capture manifest"),
    ],
    ids=["torn", "a-list", "foreign-format"],
)
def test_unreadable_manifest_is_refused_and_rewritten(model, x, reference, tmp_path, content, message):
    out = tmp_path / "cap"
    capture(model, x, out)
    (out / "manifest.json").write_text(content)
    with pytest.raises(InputError, match=message) as err:
        store.load_capture(out)
    assert RERUN in str(err.value)
    assert_identical(capture(model, x, out), reference)  # only capture files there: it starts over


def test_text_capture_byte_flip_and_raised_stop(gpt2_model, tmp_path):
    """The same checks on a text capture (ragged list columns), against its uninterrupted reference."""
    from conftest import WORDS

    texts = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(1 + i % 9)) for i in range(30)]
    names = ["blocks.0.hook_resid_post", "blocks.1.attn.hook_pattern"]

    def run(out, **kwargs):
        return store.capture_to_disk(
            gpt2_model, texts, names, out, batch_size=4, shard_mb=0, progress=False, **kwargs
        )

    ref = run(tmp_path / "ref")
    out = tmp_path / "cap"
    run(out)
    flip_bytes(out / "shard-00003.arrow")
    raise_last_stop(out)
    with pytest.raises(InputError, match=r"shard-00003\.arrow does not match its checksum"):
        store.load_capture(out)
    with pytest.warns(UserWarning, match=r"Keeping what verifies \(3 shards, 12 examples\)"):
        repaired = run(out)
    assert repaired["example"][:].tolist() == list(range(len(texts)))
    assert repaired.with_format("arrow")[:].equals(ref.with_format("arrow")[:])


def test_cli_capture_repairs_a_corrupted_capture(gpt2_dir, tmp_path):
    """`interp capture` rerun over a capture with a flipped shard says so and rewrites it; the result
    equals a fresh capture of the same texts."""
    from interp.cli import main

    source = tmp_path / "texts.txt"
    source.write_text(
        "\n".join(["the cat sat", "a dog ran on the mat", "it was big", "red and blue", "the rug"])
    )
    args = ["capture", "--model", gpt2_dir, "--hooks", "blocks.0.hook_resid_post", "--input", str(source)]
    assert main([*args, "--out", str(tmp_path / "ref"), "--batch-size", "2"]) == 0
    assert main([*args, "--out", str(tmp_path / "cap"), "--batch-size", "2"]) == 0
    flip_bytes(tmp_path / "cap" / "shard-00000.arrow")
    with pytest.warns(UserWarning, match=r"shard-00000\.arrow does not match its checksum"):
        assert main([*args, "--out", str(tmp_path / "cap"), "--batch-size", "2"]) == 0
    ref, repaired = store.load_capture(tmp_path / "ref"), store.load_capture(tmp_path / "cap")
    assert repaired.with_format("arrow")[:].equals(ref.with_format("arrow")[:])
