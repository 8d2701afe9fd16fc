"""Small read-only queries the web app needs for its pickers (facets of the review queue,
image categories, generator runs). Kept apart from the core store modules; SQL stays in
leaml/store as DESIGN.md asks.
"""
from __future__ import annotations

import sqlite_utils


def queue_facets(db: sqlite_utils.Database, project_id: int) -> dict:
    """Filter choices of the review queue: categories of the pending pairs, question types
    of the project's labeled (seed/test) pairs and its generator runs.

    Kept cheap at 100,000 pending pairs: categories walk the covering index qa_review_cat;
    question types come from the (small) labeled set through qa_origin_status, since pseudo
    pairs take their types from the same vocabulary; runs are the project's newest 50 (a
    scan of gen_run_id over 100,000 rows would cost seconds).
    ``gen_runs`` is a list of {id, label}.
    """
    categories = [r["v"] for r in db.query(
        "SELECT DISTINCT category AS v FROM qa WHERE project_id = ? AND status = 'pending'"
        " AND category IS NOT NULL ORDER BY v", [project_id])]
    qtypes = [r["v"] for r in db.query(
        "SELECT DISTINCT question_type AS v FROM qa WHERE project_id = ? AND origin IN"
        " ('seed', 'test') AND question_type IS NOT NULL ORDER BY v", [project_id])]
    runs = [{"id": r["id"], "label": f"run {r['id']} · {r['method']} · {r['created_at'][:16]}"}
            for r in db.query("SELECT id, method, created_at FROM runs WHERE project_id = ?"
                              " ORDER BY id DESC LIMIT 50", [project_id])]
    return {"categories": categories, "question_types": qtypes, "gen_runs": runs}


def image_categories(db: sqlite_utils.Database, project_id: int) -> list[str]:
    """Distinct image categories of a project, sorted."""
    return [r["c"] for r in db.query(
        "SELECT DISTINCT category AS c FROM images WHERE project_id = ? AND category IS NOT NULL"
        " ORDER BY c", [project_id])]
