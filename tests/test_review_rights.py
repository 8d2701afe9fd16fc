"""Review decisions change pseudo pairs only: an annotator cannot rewrite seed or test pairs
(the test pairs are the evaluation's ground truth), by any review action (app_service)."""
import pytest
from apphelp import add_users, make_project

from leaml.app import service as app_service
from leaml.store import connect, qa


@pytest.fixture
def setup(home, tmp_path):
    db = connect(home)
    users = add_users(db)
    project = make_project(db, tmp_path, "p1", labeled=2)
    return db, users, project


def _snapshot(db, project_id: int, origin: str) -> list[tuple]:
    return [(r["id"], r["question"], r["answer"], r["status"], r["version"])
            for r in qa.list_qa(db, project_id, origin=origin)]


@pytest.mark.trust
def test_annotator_edit_of_a_test_pair_is_refused_and_changes_nothing(setup):
    db, users, project = setup
    test_pair = qa.list_qa(db, project["id"], origin="test")[0]
    before = _snapshot(db, project["id"], "test")
    with pytest.raises(ValueError, match="is a test pair; only pseudo pairs"):
        app_service.decide(db, users["annotator"], test_pair["id"], "edit",
                           expected_version=test_pair["version"], answer="x")
    for decision in ("accept", "reject"):
        with pytest.raises(ValueError, match="only pseudo pairs"):
            app_service.decide(db, users["annotator"], test_pair["id"], decision,
                               expected_version=test_pair["version"])
    assert _snapshot(db, project["id"], "test") == before


@pytest.mark.trust
def test_review_actions_leave_seed_pairs_alone(setup):
    db, users, project = setup
    seed = qa.list_qa(db, project["id"], origin="seed")[0]
    before = _snapshot(db, project["id"], "seed")
    with pytest.raises(ValueError, match="is a seed pair"):
        app_service.decide(db, users["expert"], seed["id"], "edit",
                           expected_version=seed["version"], answer="x")
    # an expert's seed labeling edit is not a review decision: U on Review leaves it alone
    app_service.edit_seed(db, users["expert"], seed["id"], expected_version=seed["version"],
                          answer="corrected")
    assert app_service.undo(db, users["expert"], project["id"]) is None
    assert qa.get_qa(db, seed["id"])["answer"] == "corrected"
    assert app_service.bulk_accept(db, users["annotator"], project["id"], 0.0) == 0
    with pytest.raises(PermissionError):  # seed labeling needs 'label'
        app_service.edit_seed(db, users["annotator"], seed["id"],
                              expected_version=seed["version"] + 1, answer="y")
    assert [r[:3] for r in _snapshot(db, project["id"], "seed")][1:] == \
        [r[:3] for r in before][1:]
