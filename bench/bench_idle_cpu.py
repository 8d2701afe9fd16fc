"""CPU of an idle app: `streamlit run app.py` with the repository's .streamlit/config.toml
and one Chromium tab open on the Review page, measured from /proc/<pid>/stat (user + system
time of the server process) over --seconds. Optionally the same with a file watcher turned
on (--watcher auto), for comparison.

    .venv/bin/python bench/bench_idle_cpu.py [--seconds 60] [--watcher auto]
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "e2e"))
sys.path.insert(0, str(ROOT / "bench"))


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def serve(home: Path, port: int, watcher: str | None) -> subprocess.Popen:
    """The app as a user starts it (the repository's config), plus an optional watcher."""
    cmd = [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true",
           "--server.port", str(port), "--server.address", "127.0.0.1"]
    if watcher:
        cmd += ["--server.fileWatcherType", watcher]
    env = dict(os.environ, LEAML_HOME=str(home), PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT, start_new_session=True)
    for _ in range(240):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2)
            return proc
        except OSError:
            time.sleep(0.5)
    raise RuntimeError("streamlit did not start")


def measure(home: Path, seconds: float, watcher: str | None) -> float:
    """Percent of one core the idle server used over ``seconds`` with one tab open."""
    from bench_review_browser import CHROMIUM, open_review, sign_in
    from browser import CHROMIUM_ARGS, free_port, stop_workers
    from playwright.sync_api import sync_playwright
    port = free_port()
    proc = serve(home, port, watcher)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            url = f"http://127.0.0.1:{port}"
            sign_in(page, url)
            open_review(page, url)
            page.wait_for_timeout(5000)  # let the first runs settle
            c0, t0 = cpu_seconds(proc.pid), time.monotonic()
            page.wait_for_timeout(seconds * 1000)
            used = (cpu_seconds(proc.pid) - c0) / (time.monotonic() - t0) * 100
            browser.close()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
        stop_workers(home)
    return used


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--watcher", default=None, help="also measure with this fileWatcherType")
    args = ap.parse_args()
    from bench_review_browser import build
    tmp = Path(tempfile.mkdtemp(prefix="bench-idle-"))
    home = tmp / "home"
    home.mkdir()
    os.environ["LEAML_HOME"] = str(home)
    build(home, tmp, 400)
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for watcher in (None, args.watcher) if args.watcher else (None,):
        used = measure(home, args.seconds, watcher)
        name = "the repository's config" if watcher is None else f"fileWatcherType={watcher}"
        print(f"idle server, one tab, {args.seconds:.0f} s, {name}: {used:.2f}% of a core")
    print(f"load average after:  {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
