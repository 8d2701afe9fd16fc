"""The Dashboard's numbers, computed by the app service (leaml/app/dashboard.py): progress,
the runs to compare, the paper-style table, the overall accuracy over time."""
import pytest
from apphelp import add_users, make_project

from leaml.app import service as app_service
from leaml.store import qa, runs


def add_run(db, pid, method, acc, cats, fraction=0.01):
    run_id = runs.create_run(db, pid, method=method, base_model="tiny",
                             params={"label_fraction": fraction}, user="expert1")
    runs.save_metrics(db, run_id, {"accuracy": acc, "n_test": 40, "by_category": cats,
                                   "by_question_type": {"count": acc - 5}})
    runs.finish_run(db, run_id, accuracy=acc, seconds=12.0)
    return run_id


@pytest.fixture
def setup(db, tmp_path):
    users = add_users(db)
    project = make_project(db, tmp_path, "p1")
    return db, users, project


def test_results_table_like_the_paper(setup):
    db, users, p = setup
    first = add_run(db, p["id"], "seed-lora", 60.0, {"polyp": 50.0, "normal": 70.0})
    second = add_run(db, p["id"], "leaml", 75.0, {"polyp": 70.0, "normal": 81.0})
    newest = add_run(db, p["id"], "leaml", 77.0, {"polyp": 72.0})
    rows = app_service.results(db, users["viewer"], p["id"])
    labels, default = app_service.run_choices(rows)
    assert list(labels) == [newest, second, first]  # newest first
    assert labels[first] == f"#{first} seed-lora (0.01)"
    assert default == [newest, first]  # the newest run of each method
    table = app_service.results_table(rows, [first, second, newest])
    assert [t["run"] for t in table] == sorted(f"#{i} {m}" for i, m in
                                               ((first, "seed-lora"), (second, "leaml"),
                                                (newest, "leaml")))
    by_run = {t["run"]: t for t in table}
    assert by_run[f"#{second} leaml"] == {"run": f"#{second} leaml", "normal": 81.0,
                                          "polyp": 70.0, "Average": 75.5, "Overall": 75.0}
    assert by_run[f"#{newest} leaml"]["normal"] is None  # a category the run lacks
    assert by_run[f"#{newest} leaml"]["Average"] == 72.0  # over the categories it has
    assert [t["run"] for t in app_service.results_table(rows, [first])] == [f"#{first} seed-lora"]
    over_time = app_service.overall_over_time(rows)
    assert [r["run_id"] for r in over_time] == [first, second, newest]
    assert {r["scope"] for r in over_time} == {"overall"}


def test_results_leave_out_unfinished_runs_and_need_view(setup):
    db, users, p = setup
    runs.create_run(db, p["id"], method="leaml", base_model="tiny", params={}, user="expert1")
    assert app_service.results(db, users["viewer"], p["id"]) == []
    with pytest.raises(PermissionError):
        app_service.results(db, None, p["id"])


def test_progress_counts_seed_and_review(setup):
    db, users, p = setup
    image = db.execute("SELECT id FROM images WHERE project_id = ? AND split = 'train' LIMIT 1",
                       [p["id"]]).fetchone()[0]
    for i in range(4):
        qa.add_qa(db, project_id=p["id"], image_id=image, question=f"q{i}", answer="a",
                  origin="pseudo", status="pending", confidence=0.9, user="g")
    pending = qa.list_qa(db, p["id"], origin="pseudo")
    qa.accept(db, pending[0]["id"], expected_version=pending[0]["version"], user="annotator1")
    progress = app_service.dashboard_progress(db, users["viewer"], p)
    assert progress["seed_target"] == app_service.seed_target(p, progress)
    assert (progress["reviewed"], progress["pseudo"]) == (1, 4)
    assert progress["review_share"] == 0.25
    assert progress["seed_share"] == min(1.0, progress["seed_images"] / progress["seed_target"])
