"""pages/review.py: claim, accept/reject/edit/skip/undo, conflicts, bulk accept (AppTest)."""
from apphelp import add_pending, add_users, button, home_db, make_project, page

from leaml import app_service
from leaml.store import qa


def setup(monkeypatch, home, tmp_path, n=5):
    db = home_db(monkeypatch, home)
    users = add_users(db)
    p = make_project(db, tmp_path, "p1", labeled=1)
    return db, users, p, add_pending(db, p, n)


def test_empty_queue_says_what_to_do(monkeypatch, home, tmp_path):
    db = home_db(monkeypatch, home)
    users = add_users(db)
    make_project(db, tmp_path, "p1")
    at = page("pages/review.py", users["annotator"], "p1")
    assert not at.exception
    assert "No pending pairs" in at.info[0].value and "Training" in at.info[0].value


def test_accept_reject_edit_undo(monkeypatch, home, tmp_path):
    db, users, p, ids = setup(monkeypatch, home, tmp_path)
    at = page("pages/review.py", users["annotator"], "p1")
    assert not at.exception
    first = at.session_state["rv_pair"]
    assert first == ids[-1]  # high-first: the most confident pair
    button(at, "Accept").click().run()
    assert qa.get_qa(db, first)["status"] == "accepted"
    second = at.session_state["rv_pair"]
    assert second != first
    button(at, "Reject").click().run()
    assert qa.get_qa(db, second)["status"] == "rejected"
    third = at.session_state["rv_pair"]
    button(at, "Edit").click().run()
    [t for t in at.text_area if t.label == "Answer"][0].set_value("7")
    button(at, "Save edit").click().run()
    assert not at.exception
    assert (qa.get_qa(db, third)["status"], qa.get_qa(db, third)["answer"]) == ("edited", "7")
    button(at, "Undo").click().run()
    assert qa.get_qa(db, third)["status"] == "pending"
    assert at.session_state["rv_pair"] == third  # the undone pair comes up again
    stats = app_service.reviewer_stats(db, users["expert"], p["id"])
    assert stats[0]["reviewer"] == "annotator1" and stats[0]["total"] == 2


def test_skip_and_low_first(monkeypatch, home, tmp_path):
    db, users, p, ids = setup(monkeypatch, home, tmp_path)
    at = page("pages/review.py", users["annotator"], "p1")
    at.sidebar.radio[0].set_value("low-first").run()
    first = at.session_state["rv_pair"]
    button(at, "Skip").click().run()
    assert at.session_state["rv_pair"] not in (first, None)
    assert qa.get_qa(db, first)["status"] == "pending"


def test_two_reviewers_never_share_a_pair(monkeypatch, home, tmp_path):
    db, users, p, ids = setup(monkeypatch, home, tmp_path)
    a = page("pages/review.py", users["annotator"], "p1")
    b = page("pages/review.py", users["expert"], "p1")
    assert a.session_state["rv_pair"] != b.session_state["rv_pair"]


def test_stale_edit_shows_conflict_and_overwrites_nothing(monkeypatch, home, tmp_path):
    db, users, p, ids = setup(monkeypatch, home, tmp_path)
    at = page("pages/review.py", users["annotator"], "p1")
    held = at.session_state["rv_pair"]
    button(at, "Edit").click().run()
    pair = qa.get_qa(db, held)
    # somebody changes the pair meanwhile (e.g. an admin correcting it from the CLI)
    qa.update_qa(db, held, expected_version=pair["version"], user="annotator1", answer="theirs")
    [t for t in at.text_area if t.label == "Answer"][0].set_value("mine")
    button(at, "Save edit").click().run()
    assert not at.exception
    assert "Conflict" in at.warning[0].value
    assert qa.get_qa(db, held)["answer"] == "theirs"


def test_bulk_accept_after_confirmation(monkeypatch, home, tmp_path):
    db, users, p, ids = setup(monkeypatch, home, tmp_path, n=10)
    at = page("pages/review.py", users["annotator"], "p1")
    at.slider(key="rv_bulk_thr").set_value(0.9).run()
    assert "would accept **2**" in "".join(m.value for m in at.markdown)
    assert button(at, "Bulk accept").disabled  # not before confirming
    at.checkbox(key="rv_bulk_sure").check().run()
    button(at, "Bulk accept").click().run()
    assert not at.exception
    assert len(qa.list_qa(db, p["id"], status="accepted")) >= 1
    assert "Accepted" in at.success[0].value
