"""End to end: `streamlit run apps/Home.py` served for real, read by a headless chromium.

AppTest never runs JavaScript, so only a browser shows that the circuitsvis view actually renders
offline inside its iframe and that the iframe is tall enough for it. Skipped when chromium is not
installed, except on CI (CI=true), where a missing browser is a failure.
"""

from __future__ import annotations

import os
import re
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
SHOTS = Path(os.environ.get("INTERP_SCREENSHOTS", "/tmp/interp-explorer-pages"))  # one PNG per page visit
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


@pytest.fixture
def browser(chromium):
    """A fresh headless chromium for one test: Debian's, launched by playwright with CHROMIUM_ARGS
    (never `playwright install`), closed after the test. The one launch of every browser test."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


VIEW = "iframe[data-testid='stCustomComponentV1']"  # the circuitsvis_view component (apps/components/)


def test_attention_view_renders_in_its_iframe(server, minilm, browser):
    """The all-heads view is drawn by the circuitsvis_view component: offline (every request goes
    to the explorer), painted, sized to its content, and another layer is drawn in the same
    iframe, without loading the page and circuitsvis's bundle again."""
    # Tall viewport: Streamlit scrolls inside its own container, so full_page alone would crop.
    page = browser.new_page(viewport={"width": 1400, "height": 1900})
    elsewhere: list[str] = []
    page.on("request", lambda r: None if r.url.startswith(server) else elsewhere.append(r.url))
    page.goto(f"{server}/attention")
    page.wait_for_selector("h1:has-text('Attention')", timeout=PAGE_LOAD_MS)
    view = page.frame_locator(VIEW).first
    view.get_by_text("Head Selector").wait_for(timeout=PAGE_LOAD_MS)
    page.wait_for_timeout(500)  # let the iframe settle at its measured height

    text = page.locator("[data-testid='stSidebar'] textarea").input_value()
    tokens = minilm.prepare(text).str_tokens[0]
    iframe = page.locator(VIEW).first
    frame = iframe.element_handle().content_frame()
    body = frame.inner_text("body")
    assert "L0H0" in body and f"L0H{minilm.cfg.n_heads - 1}" in body
    # The view was handed this text's tokens, and drew the patterns: the zoomed head and one
    # thumbnail per head are canvases with coloured (non-white) pixels.
    drawn = frame.evaluate("window.circuitsvisView")
    assert drawn["name"] == "AttentionHeads" and drawn["props"]["tokens"] == tokens
    painted = frame.evaluate(PAINTED_CANVASES_JS)
    assert painted >= minilm.cfg.n_heads + 1, painted
    assert page.locator("[data-testid='stException']").count() == 0
    assert page.locator("[data-testid='stAlertContentError']").count() == 0

    # Sized to its content: the iframe is as tall as the document inside it, so the
    # zoomed head (below the head selector) is not cropped, and no taller.
    box = iframe.bounding_box()
    content_height = frame.evaluate(CONTENT_HEIGHT_JS)
    assert box is not None and content_height - 2 <= box["height"] <= content_height + SLACK_PX
    assert content_height > 600  # the selector grid plus the zoomed pattern
    page.screenshot(path=str(SCREENSHOT), full_page=True)

    # Another layer: drawn in the same document (the mark survives: nothing reloaded).
    frame.evaluate("window.__sameDocument = true")
    select(page, "Layer", "1")
    wait_idle(page)
    view.get_by_text("L1H0").first.wait_for(timeout=PAGE_LOAD_MS)
    frame = page.locator(VIEW).first.element_handle().content_frame()
    assert frame.evaluate("window.__sameDocument === true")
    drawn = frame.evaluate("window.circuitsvisView")
    assert drawn["draws"] == 2 and drawn["props"]["attentionHeadNames"][0] == "L1H0"
    assert frame.evaluate(PAINTED_CANVASES_JS) >= minilm.cfg.n_heads + 1
    assert not elsewhere, elsewhere  # no CDN, nothing from outside the explorer


RE_RENDERS = 4
LIVE_NODES_JS = "() => document.querySelectorAll('*').length"
REACT_TREE_JS = "(e) => [e.isConnected, e.childElementCount]"


def test_replaced_attention_views_are_unmounted(server, minilm, browser):
    """Each new view in the circuitsvis_view component unmounts the React root of the one it
    replaces: after RE_RENDERS layer changes in the same iframe the first view's detached container
    is empty (its React tree, charts and listeners released), and the renderer's live DOM nodes
    after a forced GC stay flat (they grew by ~140 per re-render when old roots were left mounted).
    Screenshot of the last view: /tmp/interp-explorer-attention-rerendered.png."""
    page = browser.new_page(viewport={"width": 1400, "height": 1900})
    page.set_default_timeout(PAGE_LOAD_MS)
    page.goto(f"{server}/attention")
    page.frame_locator(VIEW).first.get_by_text("Head Selector").wait_for()
    wait_idle(page)
    cdp = page.context.new_cdp_session(page)
    cdp.send("Performance.enable")
    cdp.send("HeapProfiler.enable")

    def live_nodes() -> int:  # DOM nodes alive in the renderer, detached ones included
        cdp.send("HeapProfiler.collectGarbage")
        metrics = cdp.send("Performance.getMetrics")["metrics"]
        return int(next(m["value"] for m in metrics if m["name"] == "Nodes"))

    frame = page.locator(VIEW).first.element_handle().content_frame()
    first = frame.evaluate_handle("document.querySelector('#view > div')")
    assert first.evaluate(REACT_TREE_JS) == [True, 1]  # the drawn view's container
    counts, caught = [], []
    for i in range(RE_RENDERS):
        layer = (i + 1) % 2
        select(page, "Layer", str(layer))
        wait_idle(page)
        page.frame_locator(VIEW).first.get_by_text(f"L{layer}H0").first.wait_for()
        frame = page.locator(VIEW).first.element_handle().content_frame()
        drawn = frame.evaluate("window.circuitsvisView")
        assert drawn["draws"] == i + 2, drawn
        caught.append(drawn.get("unmountable"))
        counts.append(live_nodes())
    assert first.evaluate(REACT_TREE_JS) == [False, 0]  # detached and emptied by React
    assert frame.evaluate(PAINTED_CANVASES_JS) >= minilm.cfg.n_heads + 1
    # flat: the later re-renders hold no more nodes than the first ones (leaking: +~140 each)
    assert max(counts[2:]) <= max(counts[:2]) + 40, counts
    assert all(caught), caught  # every view's React root was caught, to be unmounted
    page.screenshot(path="/tmp/interp-explorer-attention-rerendered.png", full_page=True)


# ------------------------------------------------------------------------------------------------
# Every page, with the default model and with a zoo transformer
# ------------------------------------------------------------------------------------------------

# The bottom of the lowest element drawn in a document: its content height, whatever the iframe's.
CONTENT_HEIGHT_JS = """() => {
    let bottom = 0;
    for (const e of document.body.querySelectorAll('*')) {
        const r = e.getBoundingClientRect();
        if (r.height > 0 && r.width > 0) bottom = Math.max(bottom, r.bottom + window.scrollY);
    }
    return Math.ceil(bottom);
}"""
# The toolbar is minimal (no Deploy button), which also hides the 'Running...' status widget.
RUNNING_JS = """() => document.querySelector("[data-testid='stApp']")
    ?.getAttribute("data-test-script-state") === 'running'"""
SLACK_PX = 100  # an iframe may be this much taller than its content, no more
SETTLE_S = 8  # how long an embedded view may take to reach its final height
IDLE_MS = int(
    os.environ.get("INTERP_BROWSER_IDLE_MS", 240_000)
)  # one page visit, model loads and fits included, on a busy 2-core machine


def wait_idle(page, timeout_ms: int = IDLE_MS) -> None:
    """Until the script run is over: the app's script state not 'running' for 0.6 s."""
    deadline = time.monotonic() + timeout_ms / 1000
    quiet_since = None
    while time.monotonic() < deadline:
        running = page.evaluate(RUNNING_JS)
        if running:
            quiet_since = None
        elif quiet_since is None:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since > 0.6:
            return
        page.wait_for_timeout(100)
    raise AssertionError(f"the app was still running after {timeout_ms / 1000:.0f} s")


def problems(page) -> list[str]:
    """Exception text, progress bars left after the run, and iframes taller than their content."""
    found = [f"exception: {t[:300]}" for t in page.locator("[data-testid='stException']").all_inner_texts()]
    body = page.locator("[data-testid='stMain']").inner_text()
    found += ["'Traceback' on the page"] if "Traceback" in body else []
    found += [f"progress bar left: {t}" for t in page.locator("[data-testid='stProgress']").all_inner_texts()]
    for iframe in page.locator("[data-testid='stMain'] iframe").all():
        if not iframe.is_visible():
            continue  # an inactive tab's view
        frame = iframe.element_handle().content_frame()
        deadline = time.monotonic() + SETTLE_S  # a 1.3 MB view may still be laying out
        while True:
            box = iframe.bounding_box()
            content = frame.evaluate(CONTENT_HEIGHT_JS) if frame is not None else 0
            if box is None or box["height"] <= content + SLACK_PX or time.monotonic() > deadline:
                break
            page.wait_for_timeout(250)
        if box is not None and box["height"] > content + SLACK_PX:
            found.append(f"iframe '{iframe.get_attribute('title')}' {box['height']:.0f} px for {content} px")
    return found


def select(page, label: str, option: str) -> None:
    """Pick ``option`` in the main area's selectbox labelled ``label``."""
    box = page.locator("[data-testid='stMain'] [data-testid='stSelectbox']").filter(has_text=label).first
    box.get_by_role("combobox").click()
    box.get_by_role("combobox").fill(option)
    page.get_by_role("option", name=re.compile("^" + re.escape(option) + "($|:)")).first.click()


def goto(page, title: str) -> None:
    """Open a page from the sidebar's navigation (same session, so the sidebar's model holds)."""
    page.locator("[data-testid='stSidebarNav'] a").filter(has_text=title).first.click()
    page.wait_for_selector(f"h1:has-text('{title if title != 'Home' else 'interp explorer'}')")
    wait_idle(page)


def set_model(page, spec: str) -> None:
    box = page.locator("[data-testid='stSidebar'] input[type='text']").first
    box.fill(spec)
    box.press("Enter")
    wait_idle(page)


def interact(page, title: str, dictionary: str | None = None) -> list[str]:
    """Each page's main interaction; the problems seen on the way (inactive tabs are checked here).
    ``dictionary``: a dictionary folder that fits the sidebar model, for the Dictionary page."""
    main = page.locator("[data-testid='stMain']")
    found: list[str] = []
    if title == "Activations":
        select(page, "Hook point", "blocks.0.attn.hook_pattern")
    elif title == "Attention":
        select(page, "Layer", "1")
    elif title == "Causal":
        main.get_by_role("button", name="Run patching").click()
    elif title == "Probing":
        main.locator("[data-testid='stNumberInput'] input").first.fill("120")
        main.locator("[data-testid='stNumberInput'] input").first.press("Enter")
        wait_idle(page)
        main.get_by_role("button", name="Fit probes").click()
    elif title == "Adversarial":
        main.get_by_text("Layer-by-layer analysis").first.click()
    elif title == "Features":
        for tab in ("Token attributions", "Neuron & head contexts"):
            page.get_by_role("tab", name=tab).click()
            wait_idle(page)
            found.extend(f"{tab} tab: {p}" for p in problems(page))
    elif title == "Dictionary" and dictionary is not None:
        if main.get_by_text("Directory", exact=True).count():
            main.get_by_text("Directory", exact=True).first.click()
            wait_idle(page)
        box = main.get_by_role("textbox", name="Dictionary folder")
        box.fill(dictionary)
        box.press("Enter")
        wait_idle(page)
        select(page, "Sort latents by", "density")
    elif title == "Circuits":  # intervene on the top feature: scale it instead of ablating it
        main.locator("[data-testid='stRadio']").get_by_text("scale", exact=True).click()
        wait_idle(page)
        if main.locator("[data-testid='stPlotlyChart']").count() == 0:
            found.append("no attribution graph drawn")
    wait_idle(page)
    return found


PAGE_TITLES = [
    "Home",
    "Activations",
    "Attention",
    "Causal",
    "Probing",
    "Adversarial",
    "Features",
    "Dictionary",
    "Reproductions",
    "Circuits",
]
# the others use their own models
SIDEBAR_PAGES = {"Home", "Activations", "Attention", "Causal", "Features", "Dictionary"}


def open_home(browser, server: str):
    """A tall page on the explorer's Home, idle (Streamlit scrolls inside its own container)."""
    page = browser.new_page(viewport={"width": 1400, "height": 1900})
    page.set_default_timeout(IDLE_MS)
    page.goto(server)
    page.wait_for_selector("h1:has-text('interp explorer')")
    wait_idle(page)
    return page


def test_every_page_with_the_default_and_a_zoo_model(server, minilm_sae_dir, browser):
    """Served once: each page visited with MiniLM, then the sidebar pages with zoo:induction-2l;
    the main interaction run on each; no exception text, no leftover progress bar, no iframe more
    than SLACK_PX taller than its content. Screenshots go to SHOTS for a person to look at. The
    Dictionary page gets a small MiniLM SAE trained by a fixture (none for the zoo model)."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    failures: dict[str, list[str]] = {}
    page = open_home(browser, server)
    for spec in ("minilm", "zoo:induction-2l"):
        if spec != "minilm":
            set_model(page, spec)
        for title in PAGE_TITLES:
            if spec != "minilm" and title not in SIDEBAR_PAGES:
                continue
            goto(page, title)
            found = interact(page, title, minilm_sae_dir if spec == "minilm" else None)
            name = f"{spec.replace(':', '_')}-{title.lower()}"
            page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)
            if found := found + problems(page):
                failures[name] = found
        if spec == "minilm":  # the model's full context: the page answers, with its one-head view
            area = page.locator("[data-testid='stSidebar'] textarea").first
            area.fill(" ".join(["the cat sat on the mat"] * 80))
            area.press("Control+Enter")
            goto(page, "Attention")
            select(page, "Head", "3")
            wait_idle(page)
            page.screenshot(path=str(SHOTS / "minilm-attention-full-context.png"), full_page=True)
            assert page.locator("[data-testid='stMain'] iframe").count() == 0
            if found := problems(page):
                failures["minilm-attention-full-context"] = found
    assert not failures, failures


def test_adversarial_page_with_the_ensemble_and_a_minimal_attack(server, browser):
    """The Adversarial page served for real: the AutoAttack-style ensemble with its robustness curve,
    then CW (no budget: the eps slider is disabled); no exception, no progress bar left standing.
    Screenshots: SHOTS/adversarial-autoattack.png and SHOTS/adversarial-cw.png."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    failures: dict[str, list[str]] = {}
    page = open_home(browser, server)
    goto(page, "Adversarial")
    main = page.locator("[data-testid='stMain']")
    select(page, "Attack", "AutoAttack-style: APGD-CE + APGD-T + FAB-T + Square")
    wait_idle(page)
    main.get_by_text("Robustness curve (first").first.click()
    wait_idle(page)
    assert main.get_by_text("Accuracy under AutoAttack-style").count() >= 1
    page.screenshot(path=str(SHOTS / "adversarial-autoattack.png"), full_page=True)
    if found := problems(page):
        failures["autoattack"] = found
    select(page, "Attack", "CW (L2, minimal)")
    wait_idle(page)
    assert main.get_by_text("Minimal-perturbation attack: the eps slider does not apply").count() == 1
    page.screenshot(path=str(SHOTS / "adversarial-cw.png"), full_page=True)
    if found := problems(page):
        failures["cw"] = found
    assert not failures, failures
