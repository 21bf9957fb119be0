"""Module-scoped fixtures shared by the attack test modules (test_adversarial_attacks.py and
test_adversarial_fab.py): the digits data, the briefly trained digits-cnn, a 48-image batch and a
quick-fit softmax regression. Imported by name into each module, so each module gets its own
instances, as when each defined them. (tests/conftest.py's ``cnn`` and ``softmax`` are the shipped
zoo models, a different thing under the same names.)"""

from __future__ import annotations

import pytest
import torch
from test_adversarial import _quick_fit, trained_cnn

from interp.models import zoo

__all__ = ["batch", "cnn", "digits", "softmax"]


@pytest.fixture(scope="module")
def digits():
    return zoo.digits_data(0)


@pytest.fixture(scope="module")
def cnn():
    return trained_cnn()


@pytest.fixture(scope="module")
def batch(digits):
    _, _, x, y = digits
    return x[:48], y[:48]


@pytest.fixture(scope="module")
def softmax(digits):
    torch.manual_seed(0)
    x, y, _, _ = digits
    return _quick_fit(zoo.build("digits-softmax"), x, y, epochs=10, lr=1e-2)
