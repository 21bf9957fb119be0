"""End to end: `streamlit run apps/Home.py` served for real, read by a headless chromium.

AppTest never runs JavaScript, so only a browser shows that the circuitsvis view actually renders
offline inside its iframe and that the iframe is tall enough for it. Skipped when chromium is not
installed, except on CI (CI=true), where a missing browser is a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOT = Path("/tmp/interp-explorer-attention.png")
SERVER_START_S = 90
PAINTED_CANVASES_JS = """() => [...document.querySelectorAll('canvas')].filter((c) => {
    if (!c.width || !c.height) return false;
    const data = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
    for (let i = 0; i < data.length; i += 4) {
        if (data[i + 3] > 0 && (data[i] < 240 || data[i + 1] < 240 || data[i + 2] < 240)) return true;
    }
    return false;
}).length"""
PAGE_LOAD_MS = 150_000  # the first page view loads MiniLM in the server


@pytest.fixture(scope="session")  # session: decided before the session-scoped model loads
def chromium() -> str:
    """Path of Debian's chromium (never `playwright install`); skip or fail when it is missing."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(
                "chromium is not installed, and CI must run the browser test (apt-get install chromium)"
            )
        pytest.skip("chromium is not installed (Debian: apt-get install chromium); the browser test needs it")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail("the playwright package is not installed (pip install -e '.[test]')")
        pytest.skip("the playwright Python package is not installed (pip install playwright)")
    return path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(chromium, tmp_path_factory):
    """The explorer served on a free local port; always terminated afterwards."""
    port = _free_port()
    log_path = tmp_path_factory.mktemp("streamlit") / "server.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable, "-m", "streamlit", "run", str(ROOT / "apps" / "Home.py"),
        "--server.headless", "true",
        "--server.address", "127.0.0.1",
        "--server.port", str(port),
        "--server.fileWatcherType", "none",
        "--browser.gatherUsageStats", "false",
    ]  # fmt: skip
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"streamlit exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"streamlit did not serve within {SERVER_START_S} s:\n{log_path.read_text()[-3000:]}"
                )
            time.sleep(0.3)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)


def test_attention_view_renders_in_its_iframe(chromium, server, minilm):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            # Tall viewport: Streamlit scrolls inside its own container, so full_page alone would crop.
            page = browser.new_page(viewport={"width": 1400, "height": 1900})
            page.goto(f"{server}/attention")
            page.wait_for_selector("h1:has-text('Attention')", timeout=PAGE_LOAD_MS)
            view = page.frame_locator("iframe[title*='attention']").first
            view.get_by_text("Head Selector").wait_for(timeout=PAGE_LOAD_MS)
            page.wait_for_timeout(500)  # let the iframe settle at its measured height

            text = page.locator("[data-testid='stSidebar'] textarea").input_value()
            tokens = minilm.prepare(text).str_tokens[0]
            iframe = page.locator("iframe[title*='attention']").first
            frame = iframe.element_handle().content_frame()
            body = frame.inner_text("body")
            assert "L0H0" in body and f"L0H{minilm.cfg.n_heads - 1}" in body
            # The view was handed this text's tokens, and drew the patterns: the zoomed head and one
            # thumbnail per head are canvases with coloured (non-white) pixels.
            assert json.dumps(tokens) in (iframe.get_attribute("srcdoc") or "")
            painted = frame.evaluate(PAINTED_CANVASES_JS)
            assert painted >= minilm.cfg.n_heads + 1, painted
            assert page.locator("[data-testid='stException']").count() == 0
            assert page.locator("[data-testid='stAlertContentError']").count() == 0

            # Sized to its content: the iframe is as tall as the document inside it, so the
            # zoomed head (below the head selector) is not cropped.
            box = iframe.bounding_box()
            content_height = frame.evaluate("document.documentElement.scrollHeight")
            assert box is not None and box["height"] >= content_height - 2, (box, content_height)
            assert content_height > 600  # the selector grid plus the zoomed pattern

            page.screenshot(path=str(SCREENSHOT), full_page=True)
        finally:
            browser.close()
