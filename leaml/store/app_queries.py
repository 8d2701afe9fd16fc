"""Small read-only queries the web app needs for its pickers (facets of the review queue,
image categories, generator runs). Kept apart from the core store modules; SQL stays in
leaml/store as DESIGN.md asks.
"""
from __future__ import annotations

import sqlite_utils


def queue_facets(db: sqlite_utils.Database, project_id: int) -> dict:
    """Distinct categories, question types and generator runs of the pending pseudo pairs.

    ``gen_runs`` is a list of {id, label}; the label names the run's method and date.
    """
    def distinct(column: str) -> list:
        return [r["v"] for r in db.query(
            f"SELECT DISTINCT {column} AS v FROM qa WHERE project_id = ? AND status = 'pending'"
            f" AND {column} IS NOT NULL ORDER BY v", [project_id])]
    runs = []
    for run_id in distinct("gen_run_id"):
        r = next(iter(db.query("SELECT method, created_at FROM runs WHERE id = ?", [run_id])), None)
        label = f"run {run_id}" + (f" · {r['method']} · {r['created_at'][:16]}" if r else "")
        runs.append({"id": run_id, "label": label})
    return {"categories": distinct("category"), "question_types": distinct("question_type"),
            "gen_runs": runs}


def image_categories(db: sqlite_utils.Database, project_id: int) -> list[str]:
    """Distinct image categories of a project, sorted."""
    return [r["c"] for r in db.query(
        "SELECT DISTINCT category AS c FROM images WHERE project_id = ? AND category IS NOT NULL"
        " ORDER BY c", [project_id])]
