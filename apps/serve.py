"""`interp explore`'s server: `streamlit run apps/Home.py`, with the default model loading meanwhile.

Home draws the default model's tokens, so the first page view waits for MiniLM: importing torch,
transformers and TransformerLens and reading the weights is most of the explorer's cold start.
Started here in a thread, that load runs while streamlit starts and the browser fetches and
starts the frontend; the first session's ``common.load_model`` call then finds the value in
``st.cache_resource`` (or waits on the cache's lock for the load under way) instead of starting
the load itself. A failed load is left for the page to report, as without this.

    python apps/serve.py [streamlit run options...]    (what `interp explore` runs)
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from pathlib import Path

APP_DIR = Path(__file__).resolve().parent


def prewarm() -> None:
    """Load the default model into the explorer's process-wide model cache."""
    # common's st.cache_data decorators check their options against a runtime that does not exist
    # yet and log a warning for it; their caches are made at the first call, in a session
    log = logging.getLogger("streamlit.runtime.caching.cache_data_api")
    quiet = logging.Filter("no such logger")  # passes no record of this logger
    log.addFilter(quiet)
    try:
        import common
    except Exception:  # Home.py imports it again and shows what is wrong
        return
    finally:
        log.removeFilter(quiet)
    with contextlib.suppress(Exception):  # the page shows the load's error when a session asks
        common.load_model(common.DEFAULT_MODEL)


def main(options: list[str]) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # as Home.py: before transformers is imported
    if str(APP_DIR) not in sys.path:
        sys.path.insert(0, str(APP_DIR))
    threading.Thread(target=prewarm, name="interp-prewarm", daemon=True).start()
    from streamlit.web.cli import main as streamlit_main

    return streamlit_main(["run", str(APP_DIR / "Home.py"), *options], prog_name="streamlit")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
