"""interp.load for every spec kind, and clear errors for every bad input."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import interp
from interp.errors import InputError, ModelLoadError, UnknownHookError


def test_embedded_default_minilm(minilm):
    assert minilm.kind == "transformer" and minilm.n_layers == 6 and minilm.cfg.n_heads == 12
    assert minilm.hook_shapes["blocks.5.hook_resid_post"] == ("batch", "pos", 384)
    assert interp.load("all-MiniLM-L6-v2").n_layers == 6


@pytest.fixture
def hub_cache(tmp_path, gpt2_dir) -> Path:
    """An HF hub cache (``HF_HUB_CACHE`` layout) holding the tiny GPT-2 as ``someorg/tiny-gpt2``: one
    snapshot directory and a ``refs/main`` naming it, as a download leaves them."""
    repo = tmp_path / "models--someorg--tiny-gpt2"
    commit = "0" * 40
    shutil.copytree(gpt2_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return tmp_path


def test_hub_name_uses_the_same_path_via_local_cache(hub_cache):
    """A hub id resolves through HF's cache exactly as it would online (here: a hub-layout cache)."""
    script = textwrap.dedent(
        f"""
        import os
        os.environ["HF_HUB_CACHE"] = {str(hub_cache)!r}
        os.environ["HF_HUB_OFFLINE"] = "1"
        import interp
        model = interp.load("someorg/tiny-gpt2")
        print("OK", model.name, tuple(model("the cat sat").shape))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert "OK someorg/tiny-gpt2 (1, 3, 20)" in result.stdout, result.stderr[-2000:]


def test_hub_name_offline_without_copy_says_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as err:
        interp.load("gpt2")
    message = str(err.value)
    assert "offline" in message and "save_pretrained" in message and "interp.load('DIR')" in message


def test_unreachable_hub_fails_at_once_and_bad_ids_never_touch_the_network(hub_cache):
    """With HF_HUB_OFFLINE unset and no network, a hub id costs one connect attempt (our probe), not
    huggingface_hub's five retries with back-off; a cached id still loads; an invalid id makes no call."""
    script = textwrap.dedent(
        f"""
        import os, socket
        os.environ["HF_HUB_CACHE"] = {str(hub_cache)!r}
        calls = []
        def unreachable(*args, **kwargs):
            calls.append(args[0])
            raise socket.gaierror(-2, "Name or service not known")
        socket.getaddrinfo = unreachable
        # huggingface_hub is first imported after the pop, so it starts online; its own once-per-process
        # fetch (the agent registry, huggingface_hub 2.x) must not add a second attempt
        os.environ.pop("HF_HUB_OFFLINE", None)  # conftest sets it
        import interp
        from interp.errors import ModelLoadError
        for name in ["someorg/absent", "bad name!!"]:
            before = len(calls)
            try:
                interp.load(name)
            except ModelLoadError as err:
                print("REFUSED", name, len(calls) - before, "offline" in str(err) or "hub model id" in str(err))
        before = len(calls)
        model = interp.load("someorg/tiny-gpt2")
        print("CACHED", len(calls) - before, tuple(model("the cat sat").shape))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert "REFUSED someorg/absent 1 True" in result.stdout, result.stdout + result.stderr[-2000:]
    assert "REFUSED bad name!! 0 True" in result.stdout, result.stdout + result.stderr[-2000:]
    assert "CACHED 1 (1, 3, 20)" in result.stdout, result.stdout + result.stderr[-2000:]


def test_zoo_name_without_prefix_suggests_it(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match=r"Did you mean 'zoo:grammar-4l'\?"):
        interp.load("grammar-4l")


def test_missing_and_non_model_directories(tmp_path):
    with pytest.raises(ModelLoadError, match="no model directory at"):
        interp.load(str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match="has no config.json"):
        interp.load(str(tmp_path))


def test_corrupt_weights_are_reported(tmp_path, gpt2_dir):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(gpt2_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match="could not load"):
        interp.load(str(broken))


def test_prompt_longer_than_context(gpt2_model):
    with pytest.raises(InputError, match=r"has 40 tokens but .* at most 32"):
        gpt2_model.run_with_cache(torch.zeros(1, 40, dtype=torch.long))


def test_token_ids_out_of_vocab_and_wrong_dtype(gpt2_model):
    with pytest.raises(InputError, match=r"must lie in \[0, 20\)"):
        gpt2_model(torch.tensor([[1, 2, 99]]))
    with pytest.raises(InputError, match="integer tensor of shape"):
        gpt2_model(torch.rand(1, 3))


def test_module_input_shape_and_range(tiny_cnn):
    model = interp.load(tiny_cnn, input_shape=(1, 8, 8), input_range=(0.0, 1.0))
    assert model(torch.rand(1, 8, 8)).shape == (1, 10)  # one unbatched example is accepted
    with pytest.raises(InputError, match=r"expects one input of shape \(1, 8, 8\).*got \(2, 3, 8, 8\)"):
        model(torch.rand(2, 3, 8, 8))
    with pytest.raises(InputError, match=r"expects inputs in \[0.0, 1.0\].*Rescale"):
        model(torch.rand(2, 1, 8, 8) * 16)


def test_native_config_dict_and_bad_fields():
    model = interp.load(
        dict(n_layers=1, d_model=16, n_heads=2, d_head=8, n_ctx=8, d_vocab=10, act_fn="relu", d_mlp=32)
    )
    assert model.kind == "transformer" and "blocks.0.attn.hook_pattern" in model.hook_names
    with pytest.raises(InputError, match="no tokenizer"):
        model("some text")
    with pytest.raises(InputError, match="not a valid TransformerBridgeConfig"):
        interp.load(dict(n_layers=1, not_a_field=3))


def test_unloadable_spec_type():
    with pytest.raises(InputError, match="cannot load a int"):
        interp.load(3)


def test_trust_remote_code_is_never_a_default():
    import inspect

    assert inspect.signature(interp.load).parameters["trust_remote_code"].default is False
    assert os.environ.get("HF_HUB_OFFLINE") == "1"


def test_zoo_modules_load_with_their_input_checks():
    model = interp.load("zoo:digits-cnn")
    assert model.hook_shapes["conv2.hook_out"] == ("batch", 32, 8, 8)
    with pytest.raises(InputError, match=r"expects inputs in \[0.0, 1.0\]"):
        model(torch.rand(2, 1, 8, 8) * 16)
    with pytest.raises(InputError, match=r"shape \(1, 8, 8\)"):
        model(torch.rand(2, 64))
    assert interp.load("zoo:tms-5-2").input_shape == (10, 5)


def _tiny_granite(directory: str) -> str:
    from transformers import GraniteConfig, GraniteForCausalLM

    torch.manual_seed(0)
    config = GraniteConfig(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=32, residual_multiplier=0.5, eos_token_id=0,
        bos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    GraniteForCausalLM(config).save_pretrained(directory)
    return directory


def test_attn_and_mlp_out_are_what_the_block_adds(gpt2_model, tmp_path):
    """hook_attn_out and hook_mlp_out must be the residual stream's additive parts. They are on GPT-2;
    Granite scales each sublayer's output before the add (residual_multiplier), so there the aliases
    would lie: they are withheld, with an error that says why and names the module's own output."""
    tokens = torch.randint(2, 20, (2, 7))
    names = [
        f"blocks.1.{n}"
        for n in ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post")
    ]
    _, c = gpt2_model.run_with_cache(tokens, names=names)
    assert torch.allclose(c[names[0]] + c[names[1]], c[names[2]], atol=1e-5)
    assert torch.allclose(c[names[2]] + c[names[3]], c[names[4]], atol=1e-5)
    assert gpt2_model.withheld == {}

    granite = interp.load(_tiny_granite(str(tmp_path)))
    assert (
        "blocks.1.hook_attn_out" not in granite.hook_names and "blocks.1.attn.hook_out" in granite.hook_names
    )
    with pytest.raises(UnknownHookError, match="not what the block adds.*blocks.1.attn.hook_out"):
        granite.run_with_cache(tokens, names=["blocks.1.hook_attn_out"])
    _, c = granite.run_with_cache(
        tokens, names=["blocks.1.hook_resid_pre", "blocks.1.attn.hook_out", "blocks.1.hook_resid_mid"]
    )
    scaled = c["blocks.1.hook_resid_pre"] + 0.5 * c["blocks.1.attn.hook_out"]
    assert torch.allclose(
        scaled, c["blocks.1.hook_resid_mid"], atol=1e-5
    )  # the multiplier, not a bug of ours
