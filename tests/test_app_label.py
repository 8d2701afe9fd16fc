"""pages/label.py: label the next image, edit and delete a label, diverse next image (AppTest)."""
import numpy as np
from apphelp import add_users, button, home_db, make_project, page

from leaml.data import diversity
from leaml.store import projects as projects_store
from leaml.store import qa


def box(at, label):
    return [s for s in at.selectbox if s.label == label][0]


def test_label_save_moves_to_next_image(monkeypatch, home, tmp_path):
    db = home_db(monkeypatch, home)
    users = add_users(db)
    p = make_project(db, tmp_path, "p1", labeled=2)
    at = page("pages/label.py", users["expert"], "p1")
    assert not at.exception
    first = at.session_state["label_image"]
    assert "Seed set" in at.get("progress")[0].proto.text
    q_box = box(at, "Question")
    assert len(q_box.options) > 3  # the project's questions as quick picks
    q_box.set_value(q_box.options[0]).run()
    assert box(at, "Answer").options  # suggestions for that question
    box(at, "Answer").set_value(box(at, "Answer").options[-1])  # (free text: e2e test)
    button(at, "Save & next").click().run()
    assert not at.exception
    seed = [r for r in qa.list_qa(db, p["id"], origin="seed") if r["image_id"] == first]
    assert [r["created_by"] for r in seed] == ["expert1"]
    assert at.session_state["label_image"] != first
    assert projects_store.project_counts(db, p["id"])["seed_images"] == 3


def test_empty_answer_is_a_message(monkeypatch, home, tmp_path):
    db = home_db(monkeypatch, home)
    users = add_users(db)
    make_project(db, tmp_path, "p1")
    at = page("pages/label.py", users["expert"], "p1")
    button(at, "Save & next").click().run()
    assert not at.exception and "both a question and an answer" in at.error[0].value


def test_edit_and_delete_a_label_are_audited(monkeypatch, home, tmp_path):
    db = home_db(monkeypatch, home)
    users = add_users(db)
    p = make_project(db, tmp_path, "p1", labeled=1)
    pair = qa.list_qa(db, p["id"], origin="seed")[0]
    at = page("pages/label.py", users["expert"], "p1")
    picker = [s for s in at.selectbox if s.label == "Edit or delete a label"][0]
    picker.set_value(pair["id"]).run()
    [t for t in at.text_input if t.label == "Answer"][0].set_value("changed")
    button(at, "Save changes").click().run()
    assert not at.exception
    assert qa.get_qa(db, pair["id"])["answer"] == "changed"
    events = list(db.query("SELECT action, user FROM events WHERE entity = 'qa' AND entity_id = ?",
                           [pair["id"]]))
    assert ("qa.edit", "expert1") in [(e["action"], e["user"]) for e in events]


def test_stale_edit_is_a_conflict(monkeypatch, home, tmp_path):
    db = home_db(monkeypatch, home)
    users = add_users(db)
    p = make_project(db, tmp_path, "p1", labeled=1)
    pair = qa.list_qa(db, p["id"], origin="seed")[0]
    at = page("pages/label.py", users["expert"], "p1")
    [s for s in at.selectbox if s.label == "Edit or delete a label"][0].set_value(pair["id"]).run()
    qa.update_qa(db, pair["id"], expected_version=pair["version"], user="other", answer="theirs")
    [t for t in at.text_input if t.label == "Answer"][0].set_value("mine")
    button(at, "Save changes").click().run()
    assert not at.exception and "Conflict" in at.warning[0].value
    assert qa.get_qa(db, pair["id"])["answer"] == "theirs"


def test_annotator_may_not_label(home, tmp_path):
    import pytest

    from leaml.app import service as app_service
    from leaml.store import connect
    db = connect(home)
    users = add_users(db)
    p = make_project(db, tmp_path, "p1")
    with pytest.raises(PermissionError):
        app_service.label_seed(db, users["annotator"], project_id=p["id"], image_id=1,
                               question="q", answer="a")


def test_farthest_first_covers_clusters():
    rng = np.random.default_rng(0)
    a = rng.normal(0, 0.01, (20, 4))
    b = rng.normal(5, 0.01, (3, 4))
    cands = np.concatenate([a, b])
    # with one image of cluster a labeled, the next pick comes from cluster b
    assert diversity.farthest_first(a[:1], cands) >= 20


def test_diverse_pick_differs_from_labeled(home, tmp_path):
    from leaml.app import service as app_service
    from leaml.store import connect
    db = connect(home)
    p = make_project(db, tmp_path, "p1", n_train=10, labeled=1)
    img = app_service.next_image(db, p["id"], strategy="diverse")
    assert img is not None and (home / "cache" / "features").exists()
    assert app_service.next_image(db, p["id"], strategy="random", seed=1) is not None


def test_switching_projects_picks_an_image_of_the_new_project(monkeypatch, home, tmp_path):
    """Regression: the image held for labeling in one project stayed on screen after the
    user picked another project, and saving then failed ("image N belongs to project ...")."""
    db = home_db(monkeypatch, home)
    users = add_users(db)
    make_project(db, tmp_path, "p1")
    p2 = make_project(db, tmp_path, "p2")
    at = page("pages/label.py", users["expert"], "p1")
    held = at.session_state["label_image"]
    at.session_state["project_name"] = "p2"
    at.session_state["project_picker_n"] = 1  # as select_project() does
    at.run()
    assert not at.exception
    now = at.session_state["label_image"]
    assert now != held
    from leaml.store import images as images_store
    assert images_store.get_image(db, now)["project_id"] == p2["id"]
