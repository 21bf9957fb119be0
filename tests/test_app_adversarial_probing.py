"""The Adversarial and Probing explorer pages, headless with AppTest: they draw what the library
computes, and bad input (a file that is not an image) is a message, never a traceback."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

APP = Path(__file__).resolve().parents[1] / "apps" / "Home.py"
TIMEOUT = 300  # the first run may train digits-cnn when no checkpoint ships; the machine is shared


def open_page(page: str) -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT).run()
    at.switch_page(page).run()
    return at


def assert_clean(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def test_adversarial_page_attacks_a_test_image():
    at = open_page("views/adversarial.py")
    assert_clean(at)
    assert at.title[0].value == "Adversarial"
    assert len(at.get("plotly_chart")) == 2  # images with the perturbation, probabilities
    assert any("|δ|∞" in c.value for c in at.caption)
    at.toggle(key="adv_layers").set_value(True).run()
    assert_clean(at)
    assert len(at.get("plotly_chart")) == 3  # + divergence, probes, restoration
    table = at.dataframe[0].value
    assert table["hook point"].iloc[-1] == "fc.hook_out"
    assert table["probe acc clean"].iloc[-1] > table["probe acc adversarial"].iloc[-1]


def test_adversarial_page_rejects_a_file_that_is_not_an_image():
    at = open_page("views/adversarial.py")
    at.radio(key="adv_source").set_value("upload").run()
    assert_clean(at)
    assert any("Upload an image" in i.value for i in at.info)
    at.file_uploader[0].set_value(("notes.txt", b"hello, not a picture", "text/plain")).run()
    assert not at.exception
    assert any("not an image" in e.value for e in at.error)


def test_adversarial_page_accepts_an_uploaded_png():
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (32, 32), color=255).save(buffer, format="PNG")
    at = open_page("views/adversarial.py")
    at.radio(key="adv_source").set_value("upload").run()
    at.file_uploader[0].set_value(("digit.png", buffer.getvalue(), "image/png")).run()
    assert_clean(at)
    assert len(at.get("plotly_chart")) >= 2


def test_probing_page_shows_accuracy_and_control():
    at = open_page("views/probing.py")
    assert_clean(at)
    assert not at.dataframe  # nothing is fitted before the button
    at.multiselect(key="probe_names::digits").set_value(["pool.hook_out", "fc.hook_out"])
    at.number_input(key="probe_n").set_value(200)
    at.button(key="probe_run").click().run()
    assert_clean(at)
    assert at.title[0].value == "Probing"
    table = at.dataframe[0].value
    assert list(table["hook point"]) == ["pool.hook_out", "fc.hook_out"]
    assert (table["accuracy"] > table["control"]).all()


def test_adversarial_layer_toggle_keeps_its_state_across_image_sources():
    at = open_page("views/adversarial.py")
    at.toggle(key="adv_layers").set_value(True).run()
    at.radio(key="adv_source").set_value("upload").run()
    assert_clean(at)
    assert at.toggle(key="adv_layers").value is True
    assert at.dataframe and "probe acc clean" in at.dataframe[0].value  # the analysis it says is on
    at.toggle(key="adv_layers").set_value(False).run()
    assert not at.dataframe


def test_probing_fits_only_on_the_button():
    at = open_page("views/probing.py")
    at.multiselect(key="probe_names::digits").set_value(["fc.hook_out"])
    at.number_input(key="probe_n").set_value(120)
    at.button(key="probe_run").click().run()
    assert_clean(at)
    assert at.dataframe
    at.selectbox(key="probe_task").set_value(at.selectbox(key="probe_task").options[1]).run()
    assert_clean(at)
    assert not at.dataframe  # no re-fit until asked
    assert any("press **Fit probes**" in i.value for i in at.info)
