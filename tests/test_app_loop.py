"""Where the loop stands and what to do next, per role (leaml/app/loop.py, pages/_loop.py):
nobody is sent to a page their role cannot open."""
import pytest
from apphelp import add_pending, add_users, home_db, make_project, page

from leaml import auth
from leaml.app import loop as app_loop
from leaml.store.runs import create_run, finish_run

PAGES = {"Seed labeling": "label", "Review": "review", "Training": "train",
         "Dashboard": "view"}


def next_lines(at) -> list[str]:
    return [m.value for m in at.markdown if m.value.startswith("**Next:**")]


def named_pages(text: str) -> set[str]:
    return {name for name in PAGES if f"**{name}**" in text}


def stage(db, project, stage_name: str) -> None:
    """Bring ``project`` to a loop stage: 'empty' (no seed pairs), 'seeded', 'pending'."""
    if stage_name == "pending":
        run = create_run(db, project["id"], method="generator", base_model="tiny16", params={})
        finish_run(db, run, accuracy=None, seconds=1.0)
        add_pending(db, project, 5)


@pytest.mark.parametrize("labeled,stage_name", [(0, "empty"), (2, "seeded"), (2, "pending")])
@pytest.mark.parametrize("role", ["admin", "expert", "annotator", "viewer"])
def test_next_step_names_only_pages_the_role_can_open(monkeypatch, home, tmp_path, role,
                                                       labeled, stage_name):
    db = home_db(monkeypatch, home)
    users = add_users(db)
    project = make_project(db, tmp_path, "p1", labeled=labeled)
    stage(db, project, stage_name)
    at = page("pages/dashboard.py", users[role], "p1")
    assert not at.exception
    lines = next_lines(at)
    assert lines, [m.value for m in at.markdown]
    for line in lines:
        for name in named_pages(line):
            assert auth.can(users[role], PAGES[name]), (role, line)
    if stage_name == "pending" and auth.can(users[role], "review"):
        assert any("5 pending pseudo pairs on **Review**" in line for line in lines)


def test_loop_status_counts(db, tmp_path):
    users = add_users(db)
    project = make_project(db, tmp_path, "p1", labeled=2)
    stage(db, project, "pending")
    status = app_loop.loop_status(db, users["viewer"], project["id"])
    assert status["seed_images"] == 2 and status["pending"] == 5 and status["decided"] == 0
    assert status["generator"]["method"] == "generator" and status["finetune"] is None
    assert status["next"] == ["5 pseudo pairs wait for review by annotators.",
                              "Then an expert finetunes the target model."]


def test_next_step_names_the_running_job_not_the_newest(db, tmp_path):
    """Regression: with the generator running and pseudo queued behind it, the hint named
    the queued pseudo job."""
    from leaml.jobs import queue as jobs
    from leaml.store import jobs as jobs_store
    users = add_users(db)
    project = make_project(db, tmp_path, "p1", labeled=2)
    first = jobs.enqueue(db, "generator", "p1", {}, user=users["expert"])
    jobs.enqueue(db, "pseudo", "p1", {}, user=users["expert"])
    status = app_loop.loop_status(db, users["expert"], project["id"])
    assert status["next"][0].startswith(f"Job #{first} (generator) is queued")
    assert jobs_store.claim_next(db, 12345)["id"] == first
    status = app_loop.loop_status(db, users["expert"], project["id"])
    assert status["next"][0].startswith(f"Job #{first} (generator) is running")
