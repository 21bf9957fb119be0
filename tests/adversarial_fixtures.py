"""Module-scoped fixtures of the digits attack and probe tests, loaded as a pytest plugin by the
modules that use them (``pytest_plugins = ["adversarial_fixtures"]`` in test_adversarial.py,
test_adversarial_attacks.py, test_adversarial_fab.py and test_probing.py), so the names need no
import: the digits data split, a 48-image batch of its test images, and a digits-cnn and a softmax
regression trained briefly here. Module scope gives each module its own instances; the CNN itself is
trained once per session (``trained_cnn`` is cached). The names say what they are because
tests/conftest.py's ``cnn`` and ``softmax`` are the shipped zoo models, a different thing."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

import interp
from interp.models import zoo


def quick_fit(module: torch.nn.Module, x, y, epochs: int, lr: float) -> torch.nn.Module:
    """``module`` trained with Adam on cross-entropy, batches of 64 in a seeded order; in eval mode."""
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(module.parameters(), lr=lr)
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=gen).split(64):
            loss = F.cross_entropy(module(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return module.eval()


@functools.cache
def trained_cnn() -> interp.HookedModel:
    """digits-cnn trained briefly here (3 epochs, test accuracy ~0.95), loaded with shape and range
    checks; trained once per session and shared by every module that asks for ``quick_cnn``."""
    torch.manual_seed(0)
    x, y, _, _ = zoo.digits_data(0)
    module = quick_fit(zoo.build("digits-cnn"), x, y, epochs=3, lr=3e-3)
    return interp.load(module, input_shape=(1, 8, 8), input_range=(0.0, 1.0), name="cnn")


@pytest.fixture(scope="module")
def digits_split():
    """``zoo.digits_data(0)``: (x_train, y_train, x_test, y_test)."""
    return zoo.digits_data(0)


@pytest.fixture(scope="module")
def quick_cnn():
    """The briefly trained digits-cnn of ``trained_cnn`` (not the shipped one: conftest's ``cnn``)."""
    return trained_cnn()


@pytest.fixture(scope="module")
def digits_batch(digits_split):
    """The first 48 test images and their labels."""
    _, _, x, y = digits_split
    return x[:48], y[:48]


@pytest.fixture(scope="module")
def quick_softmax(digits_split):
    """digits-softmax trained briefly here (10 epochs; not the shipped one: conftest's ``softmax``)."""
    torch.manual_seed(0)
    x, y, _, _ = digits_split
    return quick_fit(zoo.build("digits-softmax"), x, y, epochs=10, lr=1e-2)
