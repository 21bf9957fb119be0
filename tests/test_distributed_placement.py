"""Models placed across devices: ``interp.load(..., device_map=...)`` passes placement to Hugging
Face (accelerate), here as CPU + disk offload; hooks, capture and patching on the placed model give
what the unplaced model gives, and placement that cannot work is refused before loading."""

from __future__ import annotations

import pytest
import torch

import interp
from interp.errors import InputError
from interp.methods import patching as P
from interp.store import capture_to_disk

pytestmark = pytest.mark.usefixtures("one_thread")

# Block 0 on disk (its weights are read from offload_folder at each forward), the rest on the CPU.
OFFLOAD = {"transformer.wte": "cpu", "transformer.wpe": "cpu", "transformer.drop": "cpu", "transformer.h.0": "disk",
           "transformer.h.1": "cpu", "transformer.ln_f": "cpu", "lm_head": "cpu"}  # fmt: skip
TEXTS = ["the cat sat on the mat", "a dog ran", "then it was big and red and blue"]


@pytest.fixture(scope="module")
def placed(gpt2_dir, tmp_path_factory):
    return interp.load(gpt2_dir, device_map=OFFLOAD, offload_folder=tmp_path_factory.mktemp("offload"))


def test_offloaded_model_is_placed_and_hooks_match(placed, gpt2_model):
    hf = placed.module
    assert hf.hf_device_map["transformer.h.0"] == "disk"
    assert hf.transformer.h[0].attn.c_attn.weight.device.type == "meta"  # not in memory: on disk
    assert placed.hook_names == gpt2_model.hook_names
    out, cache = placed.run_with_cache(TEXTS, device="cpu")
    ref_out, ref = gpt2_model.run_with_cache(TEXTS)
    assert torch.equal(out, ref_out)
    for name in ref:
        assert cache[name].device.type == "cpu"
        assert torch.equal(cache[name], ref[name]), name


def test_capture_and_patching_on_the_placed_model(placed, gpt2_model, tmp_path):
    names = ["blocks.*.hook_resid_post", "blocks.0.attn.hook_pattern"]
    ours = capture_to_disk(placed, TEXTS, names, tmp_path / "placed", batch_size=2, progress=False)
    ref = capture_to_disk(gpt2_model, TEXTS, names, tmp_path / "ref", batch_size=2, progress=False)
    for i in range(len(ref)):
        for col in ref.column_names:
            a, b = ours[i][col], ref[i][col]
            assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
    clean, corrupted = torch.tensor([[2, 4, 6, 10, 2, 10]]), torch.tensor([[2, 5, 6, 10, 2, 11]])
    metric = P.kl()
    result = P.patch(placed, clean, corrupted, "resid_pre", metric)
    expected = P.patch(gpt2_model, clean, corrupted, "resid_pre", metric)
    assert torch.allclose(result.values, expected.values, atol=1e-6)


def test_device_map_auto_on_cpu(gpt2_dir, gpt2_model):
    model = interp.load(gpt2_dir, device_map="auto")
    assert {p.device.type for p in model.module.parameters()} == {"cpu"}  # all of it fits: one device
    ids = torch.tensor([[2, 3, 4, 5]])
    assert torch.equal(model(ids), gpt2_model(ids))


@pytest.mark.parametrize(
    ("spec", "options", "message"),
    [
        ("zoo:digits-cnn", {"device_map": "auto"}, "zoo model 'zoo:digits-cnn' cannot be placed"),
        (torch.nn.Linear(2, 2), {"n_devices": 2}, "a Linear cannot be placed"),
        ("GPT2", {"device_map": {"transformer.h.0": "disk"}}, "pass offload_folder=DIR"),
        ("GPT2", {"device_map": "auto", "device": "cuda"}, "exclusive: pass one of them"),
        ("GPT2", {"n_devices": 0}, "n_devices must be a whole number >= 1"),
        ("GPT2", {"offload_folder": "/tmp/x"}, "only apply with device_map= or n_devices="),
    ],
)
def test_placement_that_cannot_work_is_refused(gpt2_dir, spec, options, message):
    with pytest.raises(InputError, match=message):
        interp.load(gpt2_dir if spec == "GPT2" else spec, **options)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_n_devices_without_cuda_names_it(gpt2_dir):
    with pytest.raises(InputError, match="n_devices=2 requires CUDA"):
        interp.load(gpt2_dir, n_devices=2)
