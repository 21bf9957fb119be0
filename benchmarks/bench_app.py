"""Explorer speed, measured in a real browser (Debian's chromium, driven by playwright).

1. Cold start: the README's explore command (`interp explore`, here as `python -m interp.cli
   explore`) started afresh, until Home has drawn the default model's tokens.    goal <= 10 s
2. Re-render: on the default model (MiniLM), each page's main interaction (a new text, another
   hook, layer, head or unit...), timed from the action to the last change the app makes to the
   page, with the page's heavy results already cached (what a user feels when exploring). goal <= 1 s

Each interaction alternates between two values, `--rounds` times; the table shows the median and
the spread (min-max). Every page is in the table, Dictionary (MiniLM's zoo SAE: open another
latent) and Circuits (grammar-4l: another prompt) included. The machine is shared: the numbers are
provisional; rerun on a quiet one:

    OMP_NUM_THREADS=1 python benchmarks/bench_app.py [--rounds 5] [--starts 3]
    OMP_NUM_THREADS=1 python benchmarks/bench_app.py --starts 0 --pages attention circuits   # a few pages
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from common import machine

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-sync"]
# Records the page time of every change under the main area, and inside each embedded view's
# document (same-origin iframes: st.iframe's srcdoc and the components' pages, observed again each
# time one loads), so a re-render is timed to its last change, the view's drawing included, not
# to when a poll happened to notice it. Changes inside an aria-live region are not drawn: the
# selectbox's screen-reader log ("6 options available.") is cleared a second or two after the
# dropdown opens, and timing to that set a select's re-render at up to 2.9 s.
OBSERVE_JS = """() => {
    window.__last = performance.now();
    const seen = new WeakSet();
    const drawn = (m) => !(m.target.closest ? m.target : m.target.parentElement)?.closest("[aria-live]");
    const changed = (ms) => { if (ms.some(drawn)) window.__last = performance.now(); watchFrames(); };
    const watch = (doc) => {
        if (!doc || !doc.body || seen.has(doc)) return;
        seen.add(doc);
        new MutationObserver(changed)
            .observe(doc.body, {childList: true, subtree: true, attributes: true, characterData: true});
    };
    const watchFrames = () => {
        for (const f of document.querySelectorAll("iframe")) {
            try { watch(f.contentDocument); } catch (e) { /* another origin: not ours */ }
        }
    };
    document.addEventListener("load", (e) => {
        if (e.target.tagName === "IFRAME") { window.__last = performance.now(); watchFrames(); }
    }, true);
    watch(document);
    watchFrames();
}"""
IDLE_JS = """() => document.querySelector("[data-testid='stApp']")?.getAttribute("data-test-script-state")
    !== "running" && !document.querySelector("[data-stale='true']")"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_explorer(port: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-c", "from interp.cli import main; main()", "explore", "--port", str(port)]
    return subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def stop(process: subprocess.Popen) -> None:
    """End the launcher and the streamlit server it started (its own process group), so no server
    of an earlier start keeps running beside the next measurement."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        process.poll()  # reaps the launcher once it exits
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def wait_served(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not serve within {timeout} s")


def settle(page, quiet_ms: int = 600) -> float:
    """Wait until the app is idle and nothing changed for ``quiet_ms``; the page time of the last change."""
    page.wait_for_timeout(150)
    while True:
        page.wait_for_function(IDLE_JS, timeout=300_000, polling=50)
        last = page.evaluate("window.__last")
        page.wait_for_timeout(quiet_ms)
        if page.evaluate("window.__last") == last and page.evaluate(IDLE_JS):
            return last


def cold_start(browser, starts: int) -> list[float]:
    times = []
    for _ in range(starts):
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        page = browser.new_page(viewport={"width": 1400, "height": 1200})
        begin = time.perf_counter()
        process = start_explorer(port)
        try:
            wait_served(url)
            page.goto(url)
            page.wait_for_selector("[data-testid='stCode']", timeout=300_000)  # Home's token list
            times.append(time.perf_counter() - begin)
        finally:
            page.close()
            stop(process)
    return times


def select(page, label: str, option: str) -> None:
    box = page.locator("[data-testid='stMain'] [data-testid='stSelectbox']").filter(has_text=label).first
    box.get_by_role("combobox").click()
    box.get_by_role("combobox").fill(option)
    page.get_by_role("option", name=re.compile("^" + re.escape(option) + "($|:)")).first.click()


def number(page, label: str, value: int) -> None:
    box = page.locator("[data-testid='stMain'] [data-testid='stNumberInput']").filter(has_text=label).first
    box.locator("input").fill(str(value))
    box.locator("input").press("Enter")


def select_nth(page, label: str, n: int) -> None:
    """Pick the ``n``-th option of a main-area selectbox (for options whose text is computed)."""
    box = page.locator("[data-testid='stMain'] [data-testid='stSelectbox']").filter(has_text=label).first
    box.get_by_role("combobox").click()
    page.get_by_role("option").nth(n).click()


def main_text(page, label: str, text: str) -> None:
    box = page.locator("[data-testid='stMain'] [data-testid='stTextInput']").filter(has_text=label).first
    box.locator("input").fill(text)
    box.locator("input").press("Enter")


def new_text(page, text: str) -> None:
    area = page.locator("[data-testid='stSidebar'] textarea").first
    area.fill(text)
    area.press("Control+Enter")


def contexts_unit(page, unit: int) -> None:
    page.get_by_role("tab", name="Neuron & head contexts").click()
    number(page, "Neuron", unit)


# zoo:grammar-4l's own sentences (interp.models.zoo.grammar.SAMPLES), written here so the browser
# process does not import the library
PROMPTS = ("when Mary and John went to the store , John gave a drink to", "the dog that the cats chase")
TEXTS = ("When Mary and John went to the store, John gave a drink to Mary.", "The cat sat on the mat.")
# page path, what is timed, two actions it alternates between (each a function of the page).
INTERACTIONS = [
    ("", "Home: new text", [lambda p: new_text(p, TEXTS[1]), lambda p: new_text(p, TEXTS[0])]),
    (
        "activations",
        "Activations: hook",
        [
            lambda p: select(p, "Hook point", "blocks.1.hook_resid_post"),
            lambda p: select(p, "Hook point", "blocks.0.hook_resid_post"),
        ],
    ),
    ("attention", "Attention: layer", [lambda p: select(p, "Layer", "1"), lambda p: select(p, "Layer", "0")]),
    (
        "causal",
        "Causal: patch site",
        [lambda p: select(p, "Patch site", "resid_pre"), lambda p: select(p, "Patch site", "head")],
    ),
    (
        "adversarial",
        "Adversarial: test image",
        [lambda p: number(p, "test image", 1), lambda p: number(p, "test image", 0)],
    ),
    (
        "features",
        "Features: neuron (contexts tab)",
        [lambda p: contexts_unit(p, 1), lambda p: contexts_unit(p, 0)],
    ),
    (
        "probing",
        "Probing: examples (no fit)",
        [lambda p: number(p, "examples", 200), lambda p: number(p, "examples", 300)],
    ),
    (
        "reproductions",
        "Reproductions: (shipped) finding",
        [lambda p: select(p, "Finding", "induction"), lambda p: select(p, "Finding", "superposition")],
    ),
    (
        "dictionary",
        "Dictionary: latent (zoo SAE)",
        [lambda p: select_nth(p, "Open latent", 1), lambda p: select_nth(p, "Open latent", 0)],
    ),
    (
        "circuits",
        "Circuits: prompt",
        [lambda p: main_text(p, "Prompt", PROMPTS[1]), lambda p: main_text(p, "Prompt", PROMPTS[0])],
    ),
]


def rerenders(browser, url: str, rounds: int, only: list[str]) -> dict[str, list[float]]:
    page = browser.new_page(viewport={"width": 1400, "height": 1200})
    page.goto(url)
    page.wait_for_selector("[data-testid='stCode']", timeout=300_000)
    results: dict[str, list[float]] = {}
    for path, what, actions in INTERACTIONS:
        if only and (path or "home") not in only:
            continue
        page.goto(f"{url}/{path}")  # a fresh session: the model and heavy results stay cached
        page.wait_for_selector("h1", timeout=300_000)
        page.evaluate(OBSERVE_JS)
        settle(page)
        for warm in actions:  # fill caches for both values
            warm(page)
            settle(page)
        times = []
        for _ in range(rounds):
            for act in actions:
                start = page.evaluate("performance.now()")
                act(page)
                times.append((settle(page) - start) / 1000)
        results[what] = times
    page.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--starts", type=int, default=3, help="cold starts (0: skip)")
    parser.add_argument("--pages", nargs="*", default=[], help="only these page paths (home, attention, ...)")
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("chromium is not installed (Debian: apt-get update && apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    print(f"machine: {machine()}")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=ARGS)
        try:
            starts = cold_start(browser, args.starts) if args.starts else []
            port = free_port()
            process = start_explorer(port)
            try:
                wait_served(f"http://127.0.0.1:{port}")
                timed = rerenders(browser, f"http://127.0.0.1:{port}", args.rounds, args.pages)
            finally:
                stop(process)
        finally:
            browser.close()
    print(f"\n{'what':<38} {'median s':>9} {'min-max s':>14} {'goal':>7}")
    if starts:
        print(f"{'cold start: explore -> Home drawn':<38} {statistics.median(starts):>9.2f} "
              f"{min(starts):>6.2f}-{max(starts):<7.2f} {'<= 10':>7}")  # fmt: skip
    for what, times in timed.items():
        print(
            f"{what:<38} {statistics.median(times):>9.2f} {min(times):>6.2f}-{max(times):<7.2f} {'<= 1':>7}"
        )


if __name__ == "__main__":
    main()
