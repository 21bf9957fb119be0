"""Every attack against torchattacks on the same digits-cnn weights, batch and seed.

torchattacks runs in its own venv (``$TA_VENV``, default /tmp/ta-venv; ``benchmarks/bench_attacks.py``
creates it on first run, see its docstring), as a worker subprocess. These tests SKIP when that
venv is absent: create it with ``python benchmarks/bench_attacks.py`` once.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from interp.methods import adversarial as A
from interp.models import zoo

# bench_attacks imports benchmarks/common.py as `common`, which would shadow the explorer's
# apps/common.py for the AppTest tests of the same session: import it with its own path, then put
# sys.path and sys.modules back as they were
_BENCH = str(Path(__file__).resolve().parents[1] / "benchmarks")
_before = sys.modules.pop("common", None)
sys.path.insert(0, _BENCH)
try:
    import bench_attacks as B  # noqa: E402
finally:
    sys.path.remove(_BENCH)
    sys.modules.pop("common", None)
    if _before is not None:
        sys.modules["common"] = _before

PYTHON = B.VENV / "bin" / "python"


def _venv_ready() -> bool:
    return (
        PYTHON.exists()
        and subprocess.run([PYTHON, "-c", "import torchattacks"], capture_output=True).returncode == 0
    )


pytestmark = pytest.mark.skipif(
    not _venv_ready(), reason=f"no torchattacks venv at {B.VENV} (run benchmarks/bench_attacks.py)"
)

N = 40  # images: DeepFool in torchattacks runs one backward per class per image
MEAN, STD = [0.3], [0.4]
SPECS = [s for s in B.SPECS if s["key"] != "autoattack"] + [
    {"key": "autoattack", "attack": "autoattack", "eps": 0.1, "args": {"steps": 5, "n_queries": 100}},
    {"key": "pgd-least-likely", "attack": "pgd", "eps": 0.2, "args": {"alpha": 0.05, "steps": 5},
     "mode": "least-likely"},
    {"key": "pgd-label", "attack": "pgd", "eps": 0.2, "args": {"alpha": 0.05, "steps": 5}, "mode": "label",
     "target": 3},
    {"key": "cw-label", "attack": "cw", "args": {"c": 10.0, "steps": 30, "lr": 0.05}, "mode": "label",
     "target": 7, "shift": 100.0},
    {"key": "pgd-normalized", "attack": "pgd", "eps": 0.1, "args": {"alpha": 0.025, "steps": 5},
     "normalize": [MEAN, STD]},
    {"key": "apgd-l2", "attack": "apgd-ce", "eps": 1.0, "args": {"steps": 5, "norm": "L2"}},
    {"key": "apgd-dlr-l2", "attack": "apgd-dlr", "eps": 1.0, "args": {"steps": 5, "norm": "L2"}},
    {"key": "apgd-normalized", "attack": "apgd-ce", "eps": 0.1, "args": {"steps": 5}, "normalize": [MEAN, STD]},
    # FAB's restarts start at random points drawn from the seeded CPU generator; at one step per run
    # they break images the first run missed (test_adversarial_fab checks that), so the draws matter
    {"key": "fab-l2", "attack": "fab", "eps": 1.0, "args": {"steps": 5, "norm": "L2"}},
    {"key": "fab-restarts", "attack": "fab", "eps": 0.3, "args": {"steps": 1, "n_restarts": 3}},
    {"key": "fab-l2-restarts", "attack": "fab", "eps": 1.0, "args": {"steps": 1, "norm": "L2", "n_restarts": 3}},
    {"key": "fab-t-restarts", "attack": "fab-t", "eps": 0.2, "args": {"steps": 1, "n_restarts": 2}},
    {"key": "fab-normalized", "attack": "fab", "eps": 0.1, "args": {"steps": 5}, "normalize": [MEAN, STD]},
]  # fmt: skip


SLOW = ("cw", "cw-label", "deepfool", "square", "autoattack")  # torchattacks' side takes seconds each
FAST_SPECS = [s for s in SPECS if s["key"] not in SLOW]
SLOW_SPECS = [s for s in SPECS if s["key"] in SLOW]


def _setup(specs):
    model = B.trained_cnn().eval()
    _, _, x, y = zoo.digits_data(0)
    x, y = x[:N], y[:N]
    return model, x, y, B.torchattacks_results(model, x, y, specs, PYTHON)


@pytest.fixture(scope="module")
def fast():
    return _setup(FAST_SPECS)


@pytest.fixture(scope="module")
def slow():
    return _setup(SLOW_SPECS)


def _ours(spec, model, x, y) -> torch.Tensor:
    """Our attack for a spec, as the benchmark's worker runs it (the same translation)."""
    kw = {k: v.lower() if k == "norm" else v for k, v in spec.get("args", {}).items()}  # "L2" -> "l2"
    kw = {"restarts" if k == "n_restarts" else k: v for k, v in kw.items()}  # torchattacks' name -> ours
    if spec.get("shift"):
        model = torch.nn.Sequential(model, _Shift(spec["shift"]))
    extra = {}
    if spec.get("mode") == "least-likely":
        extra["target"] = "least-likely"
    elif spec.get("mode") == "label":
        extra["target"] = spec["target"]
    if spec.get("normalize"):
        extra["normalize"] = tuple(spec["normalize"])
    if spec["attack"] == "pgd":
        return A.pgd(model, x, y, spec["eps"], random_start=False, **kw, **extra).x_adv
    return A.run_attack(spec["attack"], model, x, y, spec.get("eps"), **kw, **extra).x_adv


class _Shift(torch.nn.Module):
    def __init__(self, shift: float) -> None:
        super().__init__()
        self.shift = shift

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z + self.shift


@pytest.mark.parametrize("spec", FAST_SPECS, ids=[s["key"] for s in FAST_SPECS])
def test_attack_equals_torchattacks(fast, spec):
    """FGSM, PGD (targeted by label and least-likely, normalised inputs), the APGDs, FAB and FAB-T."""
    _check(spec, *fast)


@pytest.mark.slow
@pytest.mark.parametrize("spec", SLOW_SPECS, ids=[s["key"] for s in SLOW_SPECS])
def test_slow_attack_equals_torchattacks(slow, spec):
    """CW (untargeted and by label), DeepFool, Square and the APGD-CE + APGD-T + FAB-T + Square ensemble."""
    _check(spec, *slow)


def _check(spec, model, x, y, theirs) -> None:
    """Identical bit for bit where the arithmetic is the same; DeepFool (batched here, per image
    there) and normalised inputs (torchattacks un-normalises its normalised copy) to float rounding."""
    ours = _ours(spec, model, x, y)
    tol = 1e-5 if spec["attack"] == "deepfool" or spec.get("normalize") else 0.0
    diff = (ours - theirs[spec["key"]]).abs().max().item()
    assert diff <= tol, f"{spec['key']}: max |ours - torchattacks| = {diff:.3g}"
    assert not torch.equal(ours, x)  # the attack moved something: the comparison is not vacuous
