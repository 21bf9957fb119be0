"""Shared fixtures: small models made here, so no test touches a hub."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = [
    "the",
    "a",
    "cat",
    "dog",
    "sat",
    "ran",
    "on",
    "under",
    "mat",
    "rug",
    "and",
    "then",
    "it",
    "was",
    "big",
    "small",
    "red",
    "blue",
]


def without_loading_bars(err: str) -> str:
    """stderr less transformers' "Loading weights" bars (a checkpoint load, not a command's output)."""
    return "".join(line for line in err.splitlines(keepends=True) if "Loading weights" not in line)


def save_tiny_gpt2(directory: str, seed: int = 0) -> str:
    """A random-init GPT-2-architecture model plus a word-level tokenizer, saved with save_pretrained."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", unk_token="<unk>", pad_token="<|endoftext|>"
    )
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(vocab), n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0
    )
    GPT2LMHeadModel(config).save_pretrained(directory)
    fast.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory) -> str:
    return save_tiny_gpt2(str(tmp_path_factory.mktemp("tiny-gpt2")))


@pytest.fixture(scope="session")
def gpt2_model(gpt2_dir):
    import interp

    return interp.load(gpt2_dir)


@pytest.fixture(scope="session")
def minilm():
    import interp

    return interp.load("minilm")


class TinyCNN(nn.Module):
    """Conv-ReLU-Conv-ReLU-Pool-Flatten-Linear for 1x8x8 images (in-place ReLU on purpose)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(4, 8, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.conv1(x))
        x = self.pool(self.relu2(self.conv2(x)))
        return self.fc(self.flatten(x))


@pytest.fixture
def tiny_cnn() -> TinyCNN:
    torch.manual_seed(0)
    return TinyCNN().eval()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread (much faster on a busy 2-core machine); restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def cnn():
    """The shipped zoo:digits-cnn: [batch, 1, 8, 8] images in [0, 1] -> 10 logits."""
    import interp

    return interp.load("zoo:digits-cnn")


@pytest.fixture(scope="module")
def softmax():
    """The shipped zoo:digits-softmax (softmax regression on the same images)."""
    import interp

    return interp.load("zoo:digits-softmax")


@pytest.fixture(scope="module")
def pair():
    """A clean/corrupted pair of token ids for the patching toys (vocabulary 40): two positions differ."""
    torch.manual_seed(0)
    clean = torch.randint(0, 39, (2, 6))
    corrupted = clean.clone()
    corrupted[:, 1] = (clean[:, 1] + 5) % 39
    corrupted[:, 3] = (clean[:, 3] + 7) % 39
    return clean, corrupted


MINILM_SAE_HOOK = "blocks.2.hook_resid_post"


@pytest.fixture(scope="session")
def minilm_sae_dir(minilm, tmp_path_factory) -> str:
    """A small TopK SAE (256 latents, k=8) on MiniLM's middle residual stream, trained in ~2 s on
    the built-in sample texts and saved in SAELens's format: a dictionary that fits the default
    model, for tests that must not depend on the shipped zoo dictionaries."""
    from interp import sae as S
    from interp.methods.examples import SAMPLE_TEXTS

    sae = S.train(
        minilm,
        MINILM_SAE_HOOK,
        list(SAMPLE_TEXTS),
        arch="topk",
        d_sae=256,
        k=8,
        tokens=2000,
        batch_size=100,
        lr=3e-3,
        seed=0,
        progress=False,
    )
    return str(S.save(sae, tmp_path_factory.mktemp("minilm-sae")))
