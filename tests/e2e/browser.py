"""A Streamlit server on a free port with its own data home, and a headless Debian Chromium
driven by Playwright (never a downloaded browser). Used by tests/e2e/test_*.py."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Screenshots go to a temp folder, so a test run never rewrites tracked files; to refresh the
# README's pictures: LEAML_SCREENSHOTS=docs/screenshots pytest tests/e2e
SHOTS = Path(os.environ.get("LEAML_SCREENSHOTS") or Path(tempfile.gettempdir()) / "leaml-e2e-shots")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-quic", "--no-first-run", "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def streamlit_server(home: Path, timeout: float = 120):
    """`streamlit run app.py` with LEAML_HOME=home; yields the base URL; stops the server
    and any job worker it started."""
    port = free_port()
    env = dict(os.environ, LEAML_HOME=str(home), PYTHONPATH=str(ROOT))
    log = open(home.parent / "streamlit.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true",
         "--server.port", str(port), "--server.address", "127.0.0.1",
         "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(url + "/_stcore/health", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("streamlit did not start: "
                                       + (home.parent / "streamlit.log").read_text()[-2000:])
                time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
        log.close()
        stop_workers(home)


def stop_workers(home: Path) -> None:
    """Stop the job workers the app started for this data home (by their pid)."""
    from leaml.store import connect
    from leaml.store import jobs as jobs_store
    for w in jobs_store.live_workers(connect(home), 3600):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(w["pid"], signal.SIGTERM)


def wait_idle(page, timeout: float = 60_000) -> None:
    """Wait until Streamlit has finished the current script run."""
    page.wait_for_timeout(250)
    page.wait_for_function(
        "() => !document.querySelector('[data-testid=\"stStatusWidget\"]')"
        " || !document.querySelector('[data-testid=\"stStatusWidget\"]').innerText"
        ".includes('Running')", timeout=timeout)
    page.wait_for_timeout(150)


def shot(page, name: str) -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def nav(page, title: str) -> None:
    page.get_by_test_id("stSidebarNav").get_by_text(title, exact=True).click()
    heading = {"Review": "Review pseudo QA"}.get(title, title)
    page.get_by_role("heading", name=heading, exact=True).wait_for()
    wait_idle(page)


def pick(page, label: str, text: str) -> None:
    """Type into a selectbox (quick picks + free text) and take the typed value."""
    box = page.get_by_label(label, exact=True).first
    box.click()
    box.fill(text)
    page.keyboard.press("Enter")
    wait_idle(page)
