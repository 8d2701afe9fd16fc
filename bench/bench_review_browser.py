"""Review at the speed of a key, in a real browser: decision -> next pair on screen.

Builds a data home with N pending pseudo pairs, starts `streamlit run app.py` on it, signs
in as an annotator in headless Debian Chromium (Playwright) and presses the review keys
(A accept, R reject) for --decisions pairs, timing from the key press (a capture-phase
listener in the page) to the moment the next pair's "Pair #ID" and its image are on
screen. The same decisions are then timed through a whole page rerun per decision (the
page at `?rerun=page`, as the Review page worked before its pair became a fragment): the
baseline, measured in the same run on the same machine. Prints median and p95 of both and
their ratio, the load average, and any deprecation warning the server logged.

    .venv/bin/python bench/bench_review_browser.py [--pending 400] [--decisions 40]
    .venv/bin/python bench/bench_review_browser.py --pending 100000
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "e2e"))
sys.path.insert(0, str(ROOT / "bench"))

PASSWORD = "correct-horse"
CHROMIUM = "/usr/bin/chromium"
KEYS = "aaar"  # three accepts, then a reject, repeated

# in-page: the key press time, and a check that the pair on screen changed and its image
# has loaded (textContent: no forced layout while polling)
_INSTALL = """() => {
  if (window.__leamlTimer) return;
  window.__leamlTimer = true;
  // on window, capture phase: before any listener on document (the R key's stops the event)
  window.addEventListener("keydown", () => { window.__t0 = performance.now(); }, true);
}"""
_PAIR = """() => {
  const m = Array.from(document.querySelectorAll('[data-testid="stCaptionContainer"]'))
      .map(e => e.textContent).join(" ").match(/Pair #(\\d+)/);
  return m ? m[1] : null;
}"""
_NEXT_SHOWN = """(prev) => {
  const m = Array.from(document.querySelectorAll('[data-testid="stCaptionContainer"]'))
      .map(e => e.textContent).join(" ").match(/Pair #(\\d+)/);
  if (!m || m[1] === prev) return false;
  const imgs = Array.from(document.querySelectorAll('[data-testid="stImage"] img'));
  if (!imgs.length || !imgs.every(i => i.complete && i.naturalWidth > 0)) return false;
  return performance.now() - window.__t0;
}"""


def build(home: Path, tmp: Path, pending: int) -> None:
    """N pending pairs on a 50-image project 'bench' (bench_review_page's data)."""
    from bench_review_page import build as build_pairs
    t0 = time.perf_counter()
    build_pairs(home, tmp, pending)
    print(f"built {pending} pending pairs in {time.perf_counter() - t0:.1f} s")


def sign_in(page, url: str) -> None:
    page.goto(url)
    page.get_by_label("User name").fill("annotator1")
    page.get_by_role("textbox", name="Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    page.get_by_test_id("stSidebarNav").wait_for()
    for _ in range(120):  # the session cookie (set by the page) lets open_review reload
        if any(c["name"] == "leaml_session" for c in page.context.cookies()):
            return
        page.wait_for_timeout(250)
    raise RuntimeError("no session cookie 30 s after signing in")


def open_review(page, url: str, query: str = "") -> None:
    """The Review page on project 'bench' (the session cookie keeps the annotator signed
    in; ``query`` stays in the URL the page reads)."""
    from browser import wait_idle
    page.goto(f"{url}/{query}")  # an annotator lands on Review
    page.get_by_role("heading", name="Review pseudo QA", exact=True).wait_for()
    wait_idle(page)
    box = page.get_by_label("Project", exact=True).first  # the app also made its demo
    box.click()
    box.fill("bench")
    page.keyboard.press("Enter")
    page.wait_for_function(_PAIR, timeout=60_000)
    wait_idle(page)
    page.get_by_role("heading", name="Review pseudo QA", exact=True).click()  # keys to the page
    page.evaluate(_INSTALL)


def decide(page, n: int, think_ms: int) -> list[float]:
    """Press the keys for ``n`` decisions; ms from each key press to the next pair shown."""
    times = []
    for i in range(n):
        prev = page.evaluate(_PAIR)
        page.keyboard.press(KEYS[i % len(KEYS)])
        handle = page.wait_for_function(_NEXT_SHOWN, arg=prev, polling="raf", timeout=60_000)
        times.append(float(handle.json_value()))
        page.wait_for_timeout(think_ms)  # the reviewer reads the pair
    return times


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20, method="inclusive")[18]


def report(name: str, times: list[float]) -> tuple[float, float]:
    med, high = statistics.median(times), p95(times)
    print(f"{name:34s} n={len(times):3d}  median {med:7.1f} ms  p95 {high:7.1f} ms"
          f"  max {max(times):7.1f} ms")
    return med, high


def run(args) -> None:
    from playwright.sync_api import sync_playwright

    from browser import CHROMIUM_ARGS, streamlit_server
    tmp = Path(tempfile.mkdtemp(prefix="bench-review-browser-"))
    home = tmp / "home"
    home.mkdir()
    os.environ["LEAML_HOME"] = str(home)
    build(home, tmp, args.pending)
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
          f" ({os.cpu_count()} cores)")
    with streamlit_server(home) as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
        sign_in(page, url)
        results = {}
        for name, query in (("fragment (the Review page)", ""),
                            ("baseline: whole page rerun", "?rerun=page")):
            open_review(page, url, query)
            decide(page, args.warmup, args.think_ms)  # caches, first images
            results[name] = report(name, decide(page, args.decisions, args.think_ms))
        browser.close()
        log = (home.parent / "streamlit.log").read_text(errors="replace")
    print(f"load average after:  {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    (fmed, fp95), (bmed, bp95) = results.values()
    print(f"baseline / fragment: median x{bmed / fmed:.1f}, p95 x{bp95 / fp95:.1f}")
    deprecations = [line for line in log.splitlines()
                    if "deprecat" in line.lower() or "will be removed" in line]
    print(f"deprecation warnings in the server log: {len(deprecations)}")
    for line in deprecations[:5]:
        print("   ", line[:160])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pending", type=int, default=400, help="pending pairs in the project")
    ap.add_argument("--decisions", type=int, default=40, help="timed decisions per way")
    ap.add_argument("--warmup", type=int, default=3, help="untimed decisions first")
    ap.add_argument("--think-ms", type=int, default=300,
                    help="pause after each pair is shown (a reviewer reading it)")
    args = ap.parse_args()
    if args.decisions < 20:
        ap.error("--decisions: give at least 20 (p95 needs them)")
    run(args)


if __name__ == "__main__":
    main()
