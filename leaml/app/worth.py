"""What review decisions are worth, for the pages: the stored ``simulate-review`` curve of a
project, its real LEAML finetunes against the reviewed pairs they trained on, and "the next
100 decisions: ~+x points" (re-exported by leaml.app.service, which the pages import)."""
from __future__ import annotations

import sqlite_utils

from leaml.app.accounts import require
from leaml.methods import review_curve
from leaml.store import runs


def simulation(db: sqlite_utils.Database, user: dict, project_id: int) -> dict | None:
    """The newest stored ``simulate-review`` result of a project, with its two plotly figures
    (``fig_decisions``: accuracy against decisions, one line per review order;
    ``fig_minutes``: against reviewer minutes, beside labeling more seed instead) and its
    ``best`` order; None when none was run. Needs 'view'."""
    require(db, user, "view")
    sim = review_curve.latest(db.home, project_id)
    if sim is None:
        return None
    return {**sim, "best": review_curve.best_order(sim),
            "fig_decisions": review_curve.figure(sim, "decisions"),
            "fig_minutes": review_curve.figure(sim, "minutes")}


def decision_runs(db: sqlite_utils.Database, user: dict, project_id: int) -> list[dict]:
    """Evaluated LEAML runs (finetunes) of a project, oldest first, with the reviewed pseudo
    pairs (accepted or edited) their target trained on: run_id, accuracy, decisions,
    finished_at. Needs 'view'."""
    require(db, user, "view")
    out = []
    for r in reversed(runs.list_runs(db, project_id, method="leaml")):
        data = r["params"].get("target_data")
        if r["status"] == "succeeded" and data and r.get("accuracy") is not None:
            out.append({"run_id": r["id"], "accuracy": r["accuracy"],
                        "decisions": data.get("n_pseudo_reviewed", 0),
                        "finished_at": r["finished_at"]})
    return out


def next_decisions_gain(db: sqlite_utils.Database, user: dict, project_id: int, n: int = 100,
                        order: str | None = None) -> dict | None:
    """What the next ``n`` decisions are worth, read off the stored simulation's curve of
    ``order`` (a Review page order; else the simulation's best) at the project's decisions so
    far (pseudo pairs accepted, edited or rejected): ``{"points", "order", "done", "n",
    "beyond", "largest"}``, or None without a simulation. Needs 'view'."""
    require(db, user, "view")
    sim = review_curve.latest(db.home, project_id)
    if sim is None:
        return None
    done = db.execute("SELECT COUNT(*) FROM qa WHERE project_id = ? AND origin = 'pseudo' AND"
                      " status IN ('accepted', 'edited', 'rejected')", [project_id]).fetchone()[0]
    orders = {r["order"] for r in sim["curve"]}
    gain = review_curve.next_gain(sim, done, n, order if order in orders else None)
    return gain and {**gain, "done": done, "n": n}
