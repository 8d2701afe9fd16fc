"""End to end in a real browser: admin, import, seed labels, jobs, keyboard review, dashboard,
and an annotator who cannot reach the training page. Saves a screenshot of every page into
a temp folder, or into $LEAML_SCREENSHOTS (`LEAML_SCREENSHOTS=docs/screenshots` refreshes the
README's pictures).

The LEAML stage jobs run for real, started on the Training page with quick settings: a
generator of a few steps, pseudo QA for a few images, then a finetune on seed + reviewed pairs;
the pairs reviewed are those the pseudo job produced.
"""
from __future__ import annotations

import re
import sys
import time
import zipfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/apphelp.py
from browser import CHROMIUM_ARGS, nav, pick, shot, streamlit_server, wait_idle  # noqa: E402

pytestmark = pytest.mark.e2e
PW = "correct-horse"
QUICK = {"max_steps": "2", "min_steps": "0", "batch_size": "4"}  # a few small steps
QUICK_G = {"max_qa_steps": "1", "min_qa_steps": "1", "max_captions": "4", "batch_size": "4"}
QUICK_PSEUDO = {"max_images": "6", "k": "3"}  # 6 unlabeled images x 3 known questions


def upload_zip(tmp: Path) -> Path:
    """A zip of 16 unlabeled train images and 4 labeled test images (demo style)."""
    from apphelp import small_manifest
    src = small_manifest(tmp / "src", n_train=16, n_test=4, labeled=0)
    out = tmp / "endo.zip"
    with zipfile.ZipFile(out, "w") as zf:
        for p in sorted(src.parent.rglob("*")):
            if p.is_file():
                zf.write(p, p.relative_to(src.parent).as_posix())
    return out


def sign_in(page, url: str, name: str) -> None:
    page.goto(url)
    page.get_by_label("User name").fill(name)
    page.get_by_role("textbox", name="Password").fill(PW)
    page.get_by_role("button", name="Sign in").click()
    page.get_by_test_id("stSidebarNav").wait_for()
    wait_idle(page)


def wait_job_done(page, db, kind: str, timeout: float = 120) -> dict:
    """Wait in the Training page's live job view (refreshed every 2 s) until the newest
    ``kind`` job has ended; it must have succeeded."""
    from leaml.jobs import queue as jobs
    ended = page.get_by_text(re.compile(
        rf"Job #\d+ · {kind} · (succeeded|failed|cancelled|interrupted)")).first
    t0 = time.monotonic()
    ended.wait_for(timeout=timeout * 1000)
    job = jobs.list_jobs(db)[0]
    assert job["kind"] == kind and job["status"] == "succeeded", (job["status"], job["message"])
    assert "succeeded" in ended.inner_text()
    print(f"{kind} job #{job['id']}: {time.monotonic() - t0:.0f} s after queued")
    return job


def start_job(page, kind_label: str, hyperparameters: dict, untick: str | None = None) -> None:
    """Start a job on the Training page with the given hyperparameter fields filled in
    (and the checkbox whose label starts with ``untick`` cleared)."""
    from playwright.sync_api import expect
    nav(page, "Training")
    page.get_by_text(kind_label).click()
    wait_idle(page)
    # the previous kind's settings can linger below the new ones while the live view
    # reruns; the form of the kind just picked comes first
    expander = page.get_by_text("Settings (empty").first
    expect(expander).to_be_visible(timeout=30_000)
    expander.click()
    for name, value in hyperparameters.items():
        box = page.get_by_role("spinbutton", name=name, exact=True)
        box.fill(value)
        box.press("Enter")
        wait_idle(page)
    if untick:
        box = page.get_by_role("checkbox", name=re.compile("^" + re.escape(untick)))
        page.get_by_text(untick).click()  # Streamlit's label takes the click, not the input
        wait_idle(page)
        assert not box.is_checked()
    page.get_by_role("button", name="Start job").click()
    page.get_by_text("queued").first.wait_for()


def test_whole_product_in_a_browser(tmp_path):
    from playwright.sync_api import sync_playwright

    from leaml.store import connect, projects, qa
    home = tmp_path / "home"
    home.mkdir()
    with streamlit_server(home) as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 950})
        try:
            walk_through(page, url, home, tmp_path)
        except Exception:
            page.screenshot(path=str(tmp_path / "failure.png"), full_page=True)
            print(f"screenshot of the failure: {tmp_path / 'failure.png'}")
            raise
        finally:
            browser.close()


def walk_through(page, url: str, home: Path, tmp_path: Path) -> None:
    from leaml.store import connect, projects, qa
    if True:

        # 1. first start: create the admin account (the demo project is built meanwhile)
        page.goto(url)
        page.get_by_text("Welcome to LEAML Studio").wait_for(timeout=180_000)
        shot(page, "01-create-admin")
        page.get_by_label("Admin user name").fill("admin")
        page.get_by_label("Password (at least 8 characters)").fill(PW)
        page.get_by_label("Repeat password").fill(PW)
        page.get_by_role("button", name="Create admin account").click()
        page.get_by_test_id("stSidebarNav").wait_for()
        db = connect(home)
        assert projects.get_project(db, "demo")

        # 2. a project from an uploaded zip
        nav(page, "Projects")
        page.get_by_label("Name").fill("endo")
        page.get_by_role("button", name="Create project").click()
        page.get_by_text("Import into endo").wait_for()
        page.locator("input[type=file]").set_input_files(str(upload_zip(tmp_path)))
        wait_idle(page)
        page.get_by_role("button", name="Import").click()
        page.get_by_text("Import done.").wait_for(timeout=60_000)
        wait_idle(page)
        shot(page, "02-projects")
        pid = projects.get_project(db, "endo")["id"]
        assert projects.project_counts(db, pid)["unlabeled_images"] == 16

        # 3. three seed pairs, saved with Ctrl+Enter
        nav(page, "Seed labeling")
        for i, (q, a) in enumerate([("How many polyps are in the image?", "1"),
                                    ("Is there text?", "no"),
                                    ("What type of procedure is the image taken from?",
                                     "colonoscopy")]):
            pick(page, "Question", q)
            pick(page, "Answer", a)
            if i == 0:
                shot(page, "03-seed-labeling")
            page.keyboard.press("Control+Enter")
            page.get_by_text(f"Saved: {q}").wait_for()
            wait_idle(page)
        assert len(qa.list_qa(db, pid, origin="seed")) == 3

        # 4. a quick generator job, then pseudo QA from it (the newest generator run)
        start_job(page, "1 · Train the QA generator", QUICK_G)
        gen = wait_job_done(page, db, "generator")
        page.locator(".js-plotly-plot").first.wait_for(timeout=30_000)  # G's loss curve
        shot(page, "04-training")
        start_job(page, "2 · Generate pseudo QA", QUICK_PSEUDO)
        pseudo = wait_job_done(page, db, "pseudo")
        assert pseudo["params"]["requested_overrides"]["pseudo"] == {"max_images": 6, "k": 3}
        pending = qa.list_qa(db, pid, origin="pseudo")
        assert {r["gen_run_id"] for r in pending} == {gen["run_id"]}, pending[:1]
        assert len({r["image_id"] for r in pending}) <= 6, pseudo["message"]
        assert len(pending) >= 3, (pseudo["message"], pending)

        # 5. review with the keyboard: a accept, r reject, e edit + Ctrl+Enter
        nav(page, "Review")
        shot(page, "05-review")
        before = {r["id"]: r["status"] for r in qa.list_qa(db, pid, origin="pseudo")}
        page.keyboard.press("a")
        page.get_by_text("Accepted pair").wait_for()
        wait_idle(page)
        page.keyboard.press("r")
        page.get_by_text("Rejected pair").wait_for()
        wait_idle(page)
        page.keyboard.press("e")
        answer = page.get_by_label("Answer")
        answer.wait_for()
        answer.fill("two polyps")
        page.keyboard.press("Control+Enter")
        page.get_by_text("Edited and accepted pair").wait_for()
        wait_idle(page)
        after = {r["id"]: r["status"] for r in qa.list_qa(db, pid, origin="pseudo")}
        changed = sorted(after[i] for i in after if after[i] != before.get(i))
        assert changed == ["accepted", "edited", "rejected"]
        page.get_by_text("Reviewers").first.scroll_into_view_if_needed()
        page.locator(".js-plotly-plot").first.wait_for()  # the calibration chart
        shot(page, "05b-review-after-decisions")

        # 6. a quick finetune of the target on seed + accepted/edited pairs
        # the target alone (tests/e2e/test_e2e_loop.py trains the seed-only baseline beside it)
        start_job(page, "3 · Finetune the target model", QUICK, untick="Also train the seed-only")
        wait_job_done(page, db, "finetune")

        # 7. the dashboard's charts
        nav(page, "Dashboard")
        page.locator(".js-plotly-plot").first.wait_for(timeout=30_000)
        shot(page, "06-dashboard")

        # 8. users: add an annotator, who then cannot reach the training page
        nav(page, "Users")
        page.get_by_label("User name").fill("ann")
        page.get_by_label("Initial password (at least 8 characters)").fill(PW)
        pick(page, "Role", "annotator")
        page.get_by_role("button", name="Add user").click()
        page.get_by_text("User 'ann' added as annotator").wait_for()
        shot(page, "07-users")
        page.get_by_role("button", name="Sign out").click()
        page.get_by_role("button", name="Sign in").wait_for()
        shot(page, "08-sign-in")
        sign_in(page, url, "ann")
        sidebar = page.get_by_test_id("stSidebarNav")
        assert sidebar.get_by_text("Review", exact=True).is_visible()
        assert sidebar.get_by_text("Training", exact=True).count() == 0
        shot(page, "09-annotator")
        # typing the address of a page the role lacks: still signed in (the session cookie),
        # never the training page
        page.wait_for_function("() => document.cookie.includes('leaml_session=')")
        page.goto(url + "/training")
        page.get_by_text("Page not found").wait_for()
        page.get_by_text("Signed in as ann").wait_for()
        assert page.get_by_role("heading", name="Training", exact=True).count() == 0
