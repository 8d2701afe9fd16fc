"""simulate-review: the simulated reviewer, the review orders, the curve in the app and the CLI."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from apphelp import add_users, home_db, page

from leaml.data.demo.build import DemoConfig
from leaml.data.ingest import load_demo
from leaml.engine.evaluate import exact_match
from leaml.engine.pseudo import confidence_cut
from leaml.methods import leaml as leaml_method
from leaml.methods import review_curve, review_sim
from leaml.store import connect
from leaml.store.qa import add_qa_many, claim_next, get_qa, list_qa
from leaml.store.runs import create_run, finish_run, update_run

ROOT = Path(__file__).resolve().parents[1]
# small and fast (as tests/test_leaml.py): a few steps per stage, one vision warmup pass
FAST = {"generator": {"min_qa_steps": 4, "max_qa_steps": 4, "batch_size": 4, "caption_ratio": 0.5},
        "pseudo": {"k": 4, "max_new_tokens": 24, "batch_size": 8, "chunk": 3},
        "finetune": {"min_steps": 2, "max_steps": 2, "batch_size": 4, "vision_warmup_epochs": 1.0},
        "max_new_tokens": 4}


@pytest.fixture(scope="module")
def demo_home(tmp_path_factory):
    """The demo project (every train image labeled) with a generator run and its pairs at a
    label fraction of 0.25: the other train images are unlabeled to the run, not to the test."""
    torch.set_num_threads(2)
    home = tmp_path_factory.mktemp("sim") / "home"
    db = connect(home)
    load_demo(db, DemoConfig(n_train=8, n_test=1, seed=0))
    g = leaml_method.generator_command(db, "demo", label_fraction=0.25, seed=1, overrides=FAST)
    leaml_method.pseudo_command(db, "demo", generator_run=g["generator_run"], overrides=FAST)
    db.conn.close()
    return home, g["generator_run"]


@pytest.fixture
def home(demo_home, tmp_path):
    copy = tmp_path / "home"
    shutil.copytree(demo_home[0], copy, symlinks=True)
    return copy


def _pid(db):
    return db.execute("SELECT id FROM projects WHERE name = 'demo'").fetchone()[0]


def _pending(db, gen):
    return [r for r in list_qa(db, _pid(db), origin="pseudo", status="pending") if r["gen_run_id"] == gen]


def _state(db):
    """The project's review state and runs: what a simulation must leave alone."""
    return (list(db.query("SELECT id, status, answer, version FROM qa ORDER BY id")),
            list(db.query("SELECT id, method, status FROM runs ORDER BY id")),
            db.execute("SELECT COUNT(*) FROM events").fetchone()[0])


def test_the_simulated_reviewer_decides_by_the_hidden_truth(home, demo_home):
    db = connect(home)
    pid, gen = _pid(db), demo_home[1]
    img = _pending(db, gen)[0]["image_id"]
    truth = {r["question"]: r["answer"] for r in db.query(
        "SELECT question, answer FROM qa WHERE image_id = ? AND origin = 'seed'", [img])}
    (q1, a1), (q2, a2) = list(truth.items())[:2]
    ids = add_qa_many(db, [
        {"project_id": pid, "image_id": img, "question": q1, "answer": a1.upper() + ".",
         "origin": "pseudo", "confidence": 0.9, "gen_run_id": gen},       # right (normalised)
        {"project_id": pid, "image_id": img, "question": q2, "answer": "surely wrong",
         "origin": "pseudo", "confidence": 0.8, "gen_run_id": gen},       # wrong
        {"project_id": pid, "image_id": img, "question": "Is this asked of no image?",
         "answer": "yes", "origin": "pseudo", "confidence": 0.7, "gen_run_id": gen}])  # no truth
    pairs = [get_qa(db, i) for i in ids]
    known = review_sim.truth_answers(db, pid, pairs)
    assert known == {ids[0]: a1, ids[1]: a2, ids[2]: None}
    decisions = [review_sim.truthful_decision(p, known[p["id"]]) for p in pairs]
    assert [d["action"] for d in decisions] == ["accept", "edit", "reject"]
    review_sim.apply_decisions(db, decisions)
    after = [get_qa(db, i) for i in ids]
    assert [r["status"] for r in after] == ["accepted", "edited", "rejected"]
    assert after[1]["answer"] == a2 and after[0]["answer"] == a1.upper() + "."
    # every pair of the generator, decided: whatever trains now equals the hidden truth
    pending = _pending(db, gen)
    known = review_sim.truth_answers(db, pid, pending)
    review_sim.apply_decisions(db, [review_sim.truthful_decision(p, known[p["id"]]) for p in pending])
    decided = [r for r in list_qa(db, pid, origin="pseudo") if r["gen_run_id"] == gen]
    truth_now = review_sim.truth_answers(db, pid, decided)
    assert not _pending(db, gen) and any(r["status"] == "edited" for r in decided)
    for r in decided:
        if r["status"] in ("accepted", "edited"):
            assert exact_match(r["answer"], truth_now[r["id"]]) == 1.0
        else:
            assert r["status"] == "rejected" and truth_now[r["id"]] is None
    # rejecting instead of editing: a wrong pair is rejected
    assert review_sim.truthful_decision(pairs[1], a2, reject_wrong=True)["action"] == "reject"


def _fake_gen(db, pid):
    run = create_run(db, pid, method="generator", base_model="tiny", params={"seed": 0})
    update_run(db, run, model_dir="models/none")
    finish_run(db, run, accuracy=None, seconds=0.0)
    return run


def test_each_order_puts_pairs_in_the_promised_order(home):
    db = connect(home)
    pid = _pid(db)
    gen = _fake_gen(db, pid)
    imgs = [r["id"] for r in db.query("SELECT id FROM images WHERE split = 'train' ORDER BY id")]
    confs = {"q-a?": [0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4], "q-b?": [0.99, 0.3, 0.2, 0.1, 0.05]}
    add_qa_many(db, [{"project_id": pid, "image_id": imgs[i], "question": q, "answer": "x",
                      "origin": "pseudo", "confidence": c, "gen_run_id": gen}
                     for q, cs in confs.items() for i, c in enumerate(cs)])
    order = lambda name: review_sim.ordered_pending(db, pid, gen, name, seed=3)  # noqa: E731
    conf = lambda rows: [r["confidence"] for r in rows]  # noqa: E731
    assert conf(order("high-first")) == sorted(conf(order("high-first")), reverse=True)
    assert conf(order("low-first")) == sorted(conf(order("low-first")))
    rnd = [r["id"] for r in order("random")]
    assert sorted(rnd) == sorted(r["id"] for r in order("high-first")) and rnd == [r["id"] for r in order("random")]
    assert rnd != sorted(rnd) and rnd != [r["id"] for r in review_sim.ordered_pending(db, pid, gen, "random", seed=4)]
    # near-cut: the pairs that train (at or above their question's cut, as the finetune cuts)
    # come first, nearest the cut first; then those below it, nearest first
    cut = {q: confidence_cut(cs, keep_top=0.6) for q, cs in confs.items()}
    near = order("near-cut")
    above = [r for r in near if r["confidence"] >= cut[r["question"]]]
    assert near[:len(above)] == above and len(above) == 5 + 3
    for q in confs:
        mine = [r["confidence"] for r in near if r["question"] == q]
        n_above = sum(c >= cut[q] for c in mine)
        assert mine[:n_above] == sorted(mine[:n_above]) and mine[n_above:] == sorted(mine[n_above:], reverse=True)
    assert [r["confidence"] for r in near[:2]] == [0.6, 0.2]  # each question's lowest kept pair
    # balanced: one pair of each question in turn, each question in its near-cut order
    bal = order("balanced")
    assert [r["question"] for r in bal[:4]] in (["q-a?", "q-b?"] * 2, ["q-b?", "q-a?"] * 2)
    for q in confs:
        assert [r["id"] for r in bal if r["question"] == q] == [r["id"] for r in near if r["question"] == q]
    # the Review page hands out pairs in the same order
    assert claim_next(db, pid, "ann", order="near-cut", gen_run_id=gen)["id"] == near[0]["id"]
    assert claim_next(db, pid, "bob", order="balanced", gen_run_id=gen)["id"] == bal[1]["id"]


@pytest.fixture(scope="module")
def simulated(demo_home, tmp_path_factory):
    """One small simulation on a copy of the demo home, and the state before it."""
    home = tmp_path_factory.mktemp("simrun") / "home"
    shutil.copytree(demo_home[0], home, symlinks=True)
    db = connect(home)
    before = _state(db)
    plan = review_sim.SimPlan(budgets=(0, "all"), orders=("near-cut",), overrides=FAST,
                              label_more="largest")
    result = review_sim.simulate_review(db, "demo", plan=plan, reject_wrong=True,
                                        generator_run=demo_home[1], log=lambda line: None)
    return home, db, before, _state(db), result


def test_a_simulation_leaves_the_projects_review_state_alone(simulated):
    home, db, before, after, result = simulated
    assert after == before
    assert Path(result["saved"]).is_file() and review_curve.latest(home, _pid(db))["curve"] == result["curve"]
    assert not list((home / "work").glob("simulate-*"))  # the scratch copies are gone


def test_budget_zero_is_the_apps_finetune_without_review(simulated, demo_home):
    home, db, _, _, result = simulated
    zero = next(r for r in result["curve"] if r["decisions"] == 0)
    app = leaml_method.finetune_command(db, "demo", generator_run=demo_home[1], overrides=FAST)
    assert zero["accuracy"] == app["accuracy"]
    assert zero["by_category"] == app["by_category"] and zero["by_question_type"] == app["by_question_type"]
    trained = db.execute("SELECT params FROM runs WHERE id = ?", [app["run_id"]]).fetchone()[0]
    trained = {k: v for k, v in json.loads(trained)["target_data"].items() if k != "seconds"}
    assert {k: v for k, v in zero["target_data"].items() if k != "seconds"} == trained


def test_rejected_pairs_never_train(simulated):
    _, _, _, _, result = simulated
    every = next(r for r in result["curve"] if r["decisions"] > 0)
    assert every["decisions"] == result["n_with_truth"] and every["rejected"] > 0 and every["edited"] == 0
    data = every["target_data"]
    # every pair was decided: no pending pair trains, and of the decided only the accepted do
    assert data["n_pseudo_pending_kept"] == 0 and data["n_pseudo_reviewed"] == every["accepted"]
    assert every["reviewer_seconds"] == every["accepted"] * 1.0 + every["rejected"] * 1.0
    more = result["label_more"][0]
    assert more["seed_pairs"] == int(every["reviewer_seconds"] // 10)
    assert more["target_data"]["n_seed_qa"] >= result["curve"][0]["target_data"]["n_seed_qa"]


def test_the_dashboard_and_the_review_page_show_a_stored_curve(monkeypatch, tmp_path, simulated):
    home, _, _, _, result = simulated
    db = home_db(monkeypatch, home)
    users = add_users(db)
    at = page("pages/dashboard.py", users["viewer"], "demo", timeout=60)
    assert not at.exception
    assert any("What review decisions are worth" in s.value for s in at.subheader)
    assert any("Simulated reviewer" in c.value for c in at.caption)
    assert len(at.get("plotly_chart")) >= 2
    at = page("pages/review.py", users["annotator"], "demo", timeout=60)
    assert not at.exception
    assert any("next 100 decisions" in c.value for c in at.caption)


def test_the_cli_prints_the_curve_as_its_last_line(demo_home, tmp_path):
    home = tmp_path / "home"
    shutil.copytree(demo_home[0], home, symlinks=True)
    sets = [a for k, g in FAST.items() if isinstance(g, dict) for f, v in g.items()
            for a in ("--set", f"{k}.{f}={v}")]
    out = subprocess.run(
        [sys.executable, "-m", "leaml", "simulate-review", "--home", str(home), "--project", "demo",
         "--generator-run", str(demo_home[1]), "--budgets", "0,2", "--orders", "high-first",
         "--label-more", "none", "--threads", "1", "--json", *sets], cwd=ROOT,
        capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    last = json.loads(out.stdout.strip().splitlines()[-1])
    assert [(r["order"], r["decisions"]) for r in last["curve"]] == [("high-first", 0), ("high-first", 2)]
    assert {"accuracy", "by_category", "reviewer_seconds"} <= set(last["curve"][1])
    assert last["seconds"] > 0 and Path(last["chart"]).is_file()


def test_reviewer_seconds_come_from_real_reviews_where_there_are_enough(db):
    from datetime import datetime, timedelta, timezone

    from leaml.store.projects import create_project
    pid = create_project(db, "p")["id"]
    assert review_curve.decision_seconds(db, pid)["edit"] == 5.0  # no reviews yet: the default
    t = datetime(2026, 1, 1, tzinfo=timezone.utc)
    rows = []
    for i in range(30):  # ann accepts every 2 s, then edits every 7 s; a lunch break between
        t += timedelta(seconds=2 if i < 25 else (3600 if i == 25 else 7))
        rows.append((t.isoformat(), "ann", "qa.accept" if i < 25 else "qa.edit", pid))
    db.conn.executemany("INSERT INTO events (ts, user, action, entity, entity_id, project_id)"
                        " VALUES (?, ?, ?, 'qa', 1, ?)", rows)
    costs = review_curve.decision_seconds(db, pid)
    assert costs["accept"] == 2.0 and costs["source"]["accept"].startswith("events")
    assert costs["edit"] == 5.0 and costs["source"]["edit"] == "default"  # 4 edits: too few
    assert review_curve.decision_seconds(db, pid, {"accept": 1.5})["accept"] == 1.5


def test_the_next_decisions_are_read_off_the_curve():
    row = lambda o, n, acc: {"order": o, "decisions": n, "accuracy": acc}  # noqa: E731
    sim = {"curve": [row("random", 0, 50.0), row("random", 300, 53.0),
                     row("near-cut", 0, 50.0), row("near-cut", 300, 56.0)]}
    assert review_curve.best_order(sim) == "near-cut"
    gain = review_curve.next_gain(sim, 0, 100)
    assert gain["order"] == "near-cut" and gain["points"] == 2.0 and not gain["beyond"]
    assert review_curve.next_gain(sim, 150, 100, "random")["points"] == 1.0
    late = review_curve.next_gain(sim, 250, 100, "random")
    assert late["beyond"] and late["points"] == 0.5  # flat past the largest budget
