"""The explorer's Adversarial page with every attack, headless with AppTest: it offers each attack,
draws what the library computes for it, and runs the robustness curve."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

pytest.importorskip("streamlit")
import torch  # noqa: E402
from streamlit.testing.v1 import AppTest  # noqa: E402

from interp.methods import adversarial as A  # noqa: E402

APP = Path(__file__).resolve().parents[1] / "apps" / "Home.py"
TIMEOUT = 300
LABELS = [
    "FGSM", "PGD (L∞)", "PGD (L2)", "APGD-CE (L∞)", "APGD-DLR (L∞)", "APGD-T (L∞)", "Square (L∞, no gradients)",
    "FAB (L∞, smallest within eps)", "FAB (L2, smallest within eps)", "FAB-T (L∞)",
    "AutoAttack-style: APGD-CE + APGD-T + FAB-T + Square", "CW (L2, minimal)", "DeepFool (L2, minimal)",
]  # fmt: skip


def open_page() -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT).run()
    at.switch_page("views/adversarial.py").run()
    return at


def assert_clean(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def chart(at: AppTest, i: int) -> dict:
    return json.loads(at.get("plotly_chart")[i].proto.spec)


@pytest.fixture(scope="module")
def model():
    from interp.reproductions.adversarial import load_digits_model

    return load_digits_model("digits-cnn")


def test_the_page_offers_every_attack_and_runs_each(model):
    from interp.models import zoo

    at = open_page()
    assert at.selectbox(key="adv_attack").options == LABELS
    _, _, x_te, y_te = zoo.digits_data(0)
    for label in LABELS:
        at.selectbox(key="adv_attack").set_value(label).run()
        assert_clean(at)
        assert any("|δ|∞" in c.value for c in at.caption), label
        minimal = "minimal" in label
        assert at.slider(key="adv_eps").disabled is minimal, label
        clean = chart(at, 1)["data"][0]["y"]  # the original's probabilities: the model's own
        torch.testing.assert_close(
            torch.tensor(clean, dtype=torch.float64),
            model(x_te[:1])[0].softmax(-1).double(),
            atol=1e-6,
            rtol=0,
        )
        linf = float(
            re.search(r"\|δ\|∞ = ([0-9.]+)", next(c.value for c in at.caption if "|δ|∞" in c.value))[1]
        )
        if not minimal:
            assert linf <= 0.1 + 5e-4, label  # within the budget (the caption rounds to 3 digits)


def test_minimal_attacks_draw_the_library_result(model):
    at = open_page()
    at.selectbox(key="adv_attack").set_value("DeepFool (L2, minimal)").run()
    assert_clean(at)
    from interp.models import zoo

    _, _, x_te, y_te = zoo.digits_data(0)
    ref = A.deepfool(model, x_te[:1], y_te[:1], steps=50)  # the page default for DeepFool
    drawn = chart(at, 1)["data"][1]["y"]  # adversarial probabilities
    torch.testing.assert_close(
        torch.tensor(drawn, dtype=torch.float64), ref.logits_adv[0].softmax(-1).double(), atol=1e-6, rtol=0
    )
    assert any(f"|δ|₂ = {ref.norms()['l2'][0]:.3f}" in c.value for c in at.caption)


def test_targets_least_likely_on_pgd_and_disabled_for_untargeted_attacks(model):
    from interp.models import zoo

    at = open_page()
    at.selectbox(key="adv_attack").set_value("PGD (L∞)").run()
    at.slider(key="adv_eps").set_value(0.3).run()
    at.selectbox(key="adv_target").set_value("least-likely").run()
    assert_clean(at)
    _, _, x_te, y_te = zoo.digits_data(0)
    ref = A.pgd(model, x_te[:1], y_te[:1], 0.3, 0.075, 20, target="least-likely", seed=0)
    drawn = chart(at, 1)["data"][1]["y"]
    torch.testing.assert_close(
        torch.tensor(drawn, dtype=torch.float64), ref.logits_adv[0].softmax(-1).double(), atol=1e-6, rtol=0
    )
    at.selectbox(key="adv_attack").set_value("APGD-T (L∞)").run()
    assert at.selectbox(key="adv_target").disabled


def test_robustness_curve_is_the_library_curve(model):
    from interp.models import zoo

    at = open_page()
    at.toggle(key="adv_curve").set_value(True).run()
    assert_clean(at)
    fig = chart(at, 2)
    _, _, x_te, y_te = zoo.digits_data(0)
    budgets = [round(0.1 * i / 5, 4) for i in range(6)]
    ref = A.robustness_curve(model, x_te[:100], y_te[:100], budgets, "fgsm")
    assert fig["data"][0]["x"] == budgets
    assert fig["data"][0]["y"] == pytest.approx(ref.accuracy, abs=1e-12)
    at.selectbox(key="adv_attack").set_value("CW (L2, minimal)").run()  # one run read at six L2 budgets
    assert_clean(at)
    ys = chart(at, 2)["data"][0]["y"]
    assert ys == sorted(ys, reverse=True) and ys[-1] < ys[0]


@pytest.mark.slow  # the per-layer analysis itself is checked in test_app_adversarial_probing
def test_layer_analysis_with_a_score_based_attack(model):
    at = open_page()
    at.selectbox(key="adv_attack").set_value("Square (L∞, no gradients)").run()
    at.toggle(key="adv_layers").set_value(True).run()
    assert_clean(at)
    table = at.dataframe[0].value
    assert table["hook point"].iloc[-1] == "fc.hook_out"
    assert table["probe acc clean"].iloc[-1] >= table["probe acc adversarial"].iloc[-1]
