"""pages/review.py: claim, accept/reject/edit/skip/undo, conflicts, bulk accept (AppTest)."""
from apphelp import add_pending, add_users, button, home_db, make_project, page

from leaml.app import service as app_service
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


def captions(at) -> str:
    return " ".join(c.value for c in at.caption)


def test_shows_pair_id_left_count_my_count_and_source(monkeypatch, home, tmp_path):
    db, users, p, ids = setup(monkeypatch, home, tmp_path)
    img = qa.get_qa(db, ids[0])["image_id"]
    imported = qa.add_qa_many(db, [dict(project_id=p["id"], image_id=img, question=f"Q{i}?",
                                        answer="yes", origin="pseudo", confidence=0.2,
                                        source="vllm-72b") for i in range(3)])
    at = page("pages/review.py", users["annotator"], "p1")
    assert not at.exception
    assert f"Pair #{ids[-1]}" in captions(at) and "from the generator" in captions(at)
    assert "**8** pending pairs left" in captions(at) and "decided **0**" in captions(at)
    button(at, "Accept").click().run()
    assert "**7** pending pairs left" in captions(at) and "decided **1**" in captions(at)
    at.sidebar.selectbox(key="rv_source").set_value("vllm-72b").run()
    assert not at.exception
    assert at.session_state["rv_pair"] in imported
    assert "from vllm-72b" in captions(at) and "**3** pending pairs left" in captions(at)


def test_a_new_order_shows_its_first_pair_at_once(monkeypatch, home, tmp_path):
    db, users, p, ids = setup(monkeypatch, home, tmp_path)
    at = page("pages/review.py", users["annotator"], "p1")
    assert at.session_state["rv_pair"] == ids[-1]  # high-first
    at.sidebar.radio[0].set_value("low-first").run()
    assert at.session_state["rv_pair"] == ids[0]  # not the pair held under the old order
    assert qa.get_qa(db, ids[-1])["locked_by"] is None  # given back to the queue
    at.sidebar.radio[0].set_value("high-first").run()
    assert at.session_state["rv_pair"] == ids[-1]


def test_u_undoes_a_bulk_accept_as_one_step(monkeypatch, home, tmp_path):
    db, users, p, ids = setup(monkeypatch, home, tmp_path, n=10)
    at = page("pages/review.py", users["annotator"], "p1")
    button(at, "Reject").click().run()  # an older single decision, which U must not undo
    rejected = [q["id"] for q in qa.list_qa(db, p["id"], status="rejected")]
    at.slider(key="rv_bulk_thr").set_value(0.8).run()
    at.checkbox(key="rv_bulk_sure").check().run()
    button(at, "Bulk accept").click().run()
    accepted = [q["id"] for q in qa.list_qa(db, p["id"], status="accepted")]
    assert len(accepted) >= 2
    button(at, "Undo").click().run()
    assert not at.exception
    assert f"{len(accepted)} pairs are pending again" in at.info[0].value
    assert all(qa.get_qa(db, i)["status"] == "pending" for i in accepted)
    assert [q["id"] for q in qa.list_qa(db, p["id"], status="rejected")] == rejected
