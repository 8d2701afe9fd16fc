"""The review keys in a real browser: A accepts, R rejects (through components v2, not the
deprecated components.v1), each decision brings the next pair, and the server logs no
deprecation warning for them. The latency figures come from bench/bench_review_browser.py."""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from browser import CHROMIUM_ARGS, streamlit_server  # noqa: E402

pytestmark = pytest.mark.e2e


def test_keys_decide_and_log_no_deprecation(tmp_path, monkeypatch):
    from playwright.sync_api import sync_playwright

    import bench_review_browser as bench
    from leaml.store import connect, projects, qa
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("LEAML_HOME", str(home))
    bench.build(home, tmp_path, 60)
    with streamlit_server(home) as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=bench.CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        bench.sign_in(page, url)
        bench.open_review(page, url)
        times = bench.decide(page, 8, 200)  # keys a, a, a, r, a, a, a, r
        browser.close()
    db = connect(home)
    bench_id = next(p["id"] for p in projects.list_projects(db) if p["name"] == "bench")
    decided = [r["status"] for r in qa.list_qa(db, bench_id, origin="pseudo")
               if r["status"] != "pending"]
    assert sorted(decided) == ["accepted"] * 6 + ["rejected"] * 2, decided
    log = (home.parent / "streamlit.log").read_text(errors="replace")
    assert "will be removed" not in log and "deprecat" not in log.lower()
    assert statistics.median(times) < 2000, times  # loose: CI machines are shared
