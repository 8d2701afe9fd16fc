"""A first-time user's whole loop in a real browser, by clicking only, on a fresh data home:
the README's data step, sign up (first admin), on `demo-1pct`: one seed pair, the quick loop
(generator, then pseudo pairs), review with the keys (accept, reject, edit, bulk accept then
U), finetune beside the seed-only baseline, the new run on the dashboard, export the
curated pairs and import the zip again, a reload that keeps the user signed in.

Screenshots (`loop-*.png`) go where tests/e2e/browser.py says; they illustrate the README's
"first five minutes". The demo set is smaller than the README's (LEAML_E2E_DEMO="3000,500"
runs the full one) so that CI stays fast; the budgets are the quick preset's, the finetune's
cut to a few steps.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from browser import (CHROMIUM_ARGS, ROOT, nav, pick, shot, streamlit_server,  # noqa: E402
                     wait_idle)

pytestmark = pytest.mark.e2e
PW = "correct-horse"
DEMO = os.environ.get("LEAML_E2E_DEMO", "600,40")  # train,test images of the data step
FINETUNE = {"max_steps": "8", "vision_warmup_epochs": "1"}  # the target: a few steps


def data_step(home: Path) -> None:
    """The README's data step (`python -m leaml demo --data-only`), on ``home``."""
    n_train, n_test = DEMO.split(",")
    subprocess.run([sys.executable, "-m", "leaml", "demo", "--data-only", "--home", str(home),
                    "--n-train", n_train, "--n-test", n_test], cwd=ROOT, check=True,
                   capture_output=True, timeout=300)


def wait_until(check, timeout: float, what: str, step: float = 1.0):
    """Poll ``check()`` until it returns something true; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def jobs_done(db, ids: list[int]) -> bool:
    from leaml.jobs import queue as jobs
    states = [jobs.get_job(db, i) for i in ids]
    failed = [j for j in states if j["status"] in ("failed", "cancelled", "interrupted")]
    assert not failed, [(j["id"], j["kind"], j["status"], j["message"]) for j in failed]
    return all(j["status"] == "succeeded" for j in states)


def test_first_time_user_closes_the_loop(tmp_path):
    from playwright.sync_api import sync_playwright
    home = tmp_path / "home"
    home.mkdir()
    data_step(home)
    with streamlit_server(home) as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 950})
        try:
            loop(page, url, home)
        except Exception:
            page.screenshot(path=str(tmp_path / "failure.png"), full_page=True)
            print(f"screenshot of the failure: {tmp_path / 'failure.png'}")
            raise
        finally:
            browser.close()


def loop(page, url: str, home: Path) -> None:
    from leaml.jobs import queue as jobs
    from leaml.store import connect, projects, qa
    db = connect(home)
    pid = projects.get_project(db, "demo-1pct")["id"]

    # 1. sign up: the first account is the admin; the app lands on demo-1pct
    page.goto(url)
    page.get_by_text("Welcome to LEAML Studio").wait_for(timeout=120_000)
    page.get_by_label("Admin user name").fill("admin")
    page.get_by_label("Password (at least 8 characters)").fill(PW)
    page.get_by_label("Repeat password").fill(PW)
    page.get_by_role("button", name="Create admin account").click()
    page.get_by_test_id("stSidebarNav").wait_for()
    wait_idle(page)
    picker = page.get_by_test_id("stSidebar").get_by_test_id("stSelectbox").first
    assert "demo-1pct" in picker.inner_html(), picker.inner_html()  # the landing project

    # 2. one more seed pair, saved with Ctrl+Enter
    nav(page, "Seed labeling")
    seed_before = len(qa.list_qa(db, pid, origin="seed"))
    pick(page, "Question", "Is there text?")
    pick(page, "Answer", "no")
    shot(page, "loop-1-seed-labeling")
    page.keyboard.press("Control+Enter")
    page.get_by_text("Saved: Is there text?").wait_for()
    wait_idle(page)
    assert len(qa.list_qa(db, pid, origin="seed")) == seed_before + 1

    # 3. the quick loop (the default job and budget): generator, then pseudo pairs
    nav(page, "Training")
    page.get_by_text("Next:").first.wait_for()
    t0 = time.monotonic()
    page.get_by_role("button", name="Start job").click()
    page.get_by_text("queued").first.wait_for()
    started = [j["id"] for j in reversed(jobs.list_jobs(db, pid))]
    assert [jobs.get_job(db, i)["kind"] for i in started] == ["generator", "pseudo"]
    page.get_by_text(re.compile(r"about \d+ s left")).first.wait_for(timeout=240_000)  # ETA
    shot(page, "loop-2-training")
    wait_until(lambda: jobs_done(db, started), 600, "the generator and pseudo jobs")
    pending = qa.list_qa(db, pid, origin="pseudo", status="pending")
    print(f"click to {len(pending)} pending pairs: {time.monotonic() - t0:.0f} s, "
          f"load average {os.getloadavg()[0]:.1f}")
    assert len(pending) >= 10

    # 4. review with the keys: A accept, R reject, E edit + Ctrl+Enter, bulk accept, U
    nav(page, "Review")
    shot(page, "loop-3-review")
    for key, said in (("a", "Accepted pair"), ("r", "Rejected pair")):
        page.keyboard.press(key)
        page.get_by_text(said).wait_for()
        wait_idle(page)
    page.keyboard.press("e")
    answer = page.get_by_label("Answer")
    answer.wait_for()
    answer.fill("two polyps")
    page.keyboard.press("Control+Enter")
    page.get_by_text("Edited and accepted pair").wait_for()
    wait_idle(page)
    decided = [r["status"] for r in qa.list_qa(db, pid, origin="pseudo") if r["status"] != "pending"]
    assert sorted(decided) == ["accepted", "edited", "rejected"]
    slider = page.get_by_test_id("stSlider").filter(has_text="Accept every pending pair")
    slider.get_by_role("slider").focus()
    page.keyboard.press("Home")  # the lowest threshold: some pairs to bulk accept
    wait_idle(page)
    page.get_by_text("Yes, accept these").click()
    wait_idle(page)
    page.get_by_role("button", name="Bulk accept").click()
    page.get_by_text(re.compile(r"Accepted \d+ pairs")).wait_for()
    wait_idle(page)
    page.keyboard.press("u")
    page.get_by_text(re.compile(r"Undid your bulk accept: \d+ pairs are pending again")).wait_for()
    wait_idle(page)
    assert sorted(r["status"] for r in qa.list_qa(db, pid, origin="pseudo")
                  if r["status"] != "pending") == ["accepted", "edited", "rejected"]

    # 5. finetune on seed + reviewed pairs, with the seed-only baseline beside it
    nav(page, "Training")
    page.get_by_text("3 · Finetune the target model").click()
    wait_idle(page)
    page.get_by_text("Settings (empty").click()
    for name, value in FINETUNE.items():
        box = page.get_by_role("spinbutton", name=name, exact=True)
        box.fill(value)
        box.press("Enter")
        wait_idle(page)
    before = {j["id"] for j in jobs.list_jobs(db, pid)}
    page.get_by_role("button", name="Start job").click()
    page.get_by_text("queued").first.wait_for()
    started = sorted(j["id"] for j in jobs.list_jobs(db, pid) if j["id"] not in before)
    assert [jobs.get_job(db, i)["kind"] for i in started] == ["finetune", "run"]
    wait_until(lambda: jobs_done(db, started), 600, "the finetune and baseline jobs")
    target, baseline = (jobs.get_job(db, i)["run_id"] for i in started)

    # 6. the dashboard: the new run next to the seed-only baseline, per category
    nav(page, "Dashboard")
    page.get_by_text(f"#{target} leaml").first.wait_for(timeout=30_000)
    page.get_by_text(f"#{baseline} seed-full").first.wait_for()
    page.locator(".js-plotly-plot").first.wait_for(timeout=30_000)
    shot(page, "loop-4-dashboard")

    # 7. export the curated pairs as a zip and import it again as a new project
    curated = [r for r in qa.list_qa(db, pid) if r["origin"] == "seed"
               or r["status"] in ("accepted", "edited")]
    nav(page, "Projects")
    with page.expect_download(timeout=120_000) as download:
        page.get_by_role("button", name="Download curated QA").click()
    zip_path = home.parent / "demo-1pct-qa.zip"
    download.value.save_as(zip_path)
    page.get_by_label("Name").fill("again")
    page.get_by_role("button", name="Create project").click()
    page.get_by_text("Import into again").wait_for()
    page.locator("input[type=file]").set_input_files(str(zip_path))
    wait_idle(page)
    page.get_by_role("button", name="Import", exact=True).click()
    page.get_by_text("Import done.").wait_for(timeout=120_000)
    again = projects.get_project(db, "again")["id"]
    pairs = lambda rows: sorted((r["question"], r["answer"]) for r in rows)  # noqa: E731
    assert pairs(qa.list_qa(db, again)) == pairs(curated)

    # 8. a reload keeps the user signed in
    page.reload()
    page.get_by_text("Signed in as").wait_for(timeout=30_000)
