"""pages/dashboard.py: runs vs seed-only baselines, paper-style table, CSV export (AppTest)."""
from apphelp import add_users, home_db, make_project, page

from leaml.store import runs


def add_run(db, pid, method, acc, cats):
    run_id = runs.create_run(db, pid, method=method, base_model="tiny",
                             params={"label_fraction": 0.01}, user="expert1")
    runs.save_metrics(db, run_id, {"accuracy": acc, "n_test": 40,
                                   "by_category": cats, "by_question_type": {"count": acc - 5,
                                                                             "yes/no": acc + 5}})
    runs.finish_run(db, run_id, accuracy=acc, seconds=12.0)
    return run_id


def test_empty_state(monkeypatch, home, tmp_path):
    db = home_db(monkeypatch, home)
    users = add_users(db)
    make_project(db, tmp_path, "p1")
    at = page("pages/dashboard.py", users["viewer"], "p1")
    assert not at.exception and "No evaluated runs yet" in at.info[0].value


def test_runs_side_by_side_and_export(monkeypatch, home, tmp_path):
    db = home_db(monkeypatch, home)
    users = add_users(db)
    p = make_project(db, tmp_path, "p1")
    add_run(db, p["id"], "seed-lora", 60.0, {"polyp": 50.0, "normal": 70.0})
    add_run(db, p["id"], "leaml", 75.0, {"polyp": 70.0, "normal": 80.0})
    at = page("pages/dashboard.py", users["viewer"], "p1")
    assert not at.exception
    table = at.dataframe[0].value
    assert set(table.index) == {"#1 seed-lora", "#2 leaml"}
    assert table.loc["#2 leaml", "Average"] == 75.0 and table.loc["#1 seed-lora", "Overall"] == 60.0
    assert len(at.get("plotly_chart")) == 3  # by category, by question type, over time
    assert at.get("download_button")
