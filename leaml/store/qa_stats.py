"""Read-only views of the QA pairs: what trains, what tests, who reviewed what, calibration.

Import these from ``leaml.store.qa``.
"""
from __future__ import annotations

import json

import sqlite_utils

# pair columns plus what a trainer / evaluator needs of the image; category falls back to
# the image's
_PAIR_COLS = ("qa.*, COALESCE(qa.category, i.category) AS category, i.sha256, i.ext,"
              " i.split AS image_split, i.category AS image_category, i.width, i.height,"
              " i.caption AS image_caption")


def training_pairs(db: sqlite_utils.Database, project_id: int, *, image_ids=None,
                   include_pending_min_conf: float | None = None) -> list[dict]:
    """What a finetune may train on, by id: seed pairs, accepted and edited pseudo pairs, and
    (only if ``include_pending_min_conf`` is given) pending pseudo pairs with confidence >= it.

    Rejected pairs never, test pairs never, and nothing on a test-split image. ``image_ids``
    restricts to those images (e.g. a label-fraction subset).
    """
    keep = ["(qa.origin = 'seed' AND qa.status = 'labeled')",
            "(qa.origin = 'pseudo' AND qa.status IN ('accepted', 'edited'))"]
    params: dict = {"p": project_id}
    if include_pending_min_conf is not None:
        keep.append("(qa.origin = 'pseudo' AND qa.status = 'pending' AND qa.confidence >= :cut)")
        params["cut"] = float(include_pending_min_conf)
    sql = (f"SELECT {_PAIR_COLS} FROM qa JOIN images i ON i.id = qa.image_id"
           f" WHERE qa.project_id = :p AND i.split = 'train' AND ({' OR '.join(keep)})")
    if image_ids is not None:
        sql += " AND qa.image_id IN (SELECT value FROM json_each(:images))"
        params["images"] = json.dumps([int(i) for i in image_ids])
    return list(db.query(sql + " ORDER BY qa.id", params))


def test_pairs(db: sqlite_utils.Database, project_id: int) -> list[dict]:
    """The evaluation pairs (origin 'test') with their image's split, category and file, by id."""
    return list(db.query(f"SELECT {_PAIR_COLS} FROM qa JOIN images i ON i.id = qa.image_id"
                         " WHERE qa.project_id = ? AND qa.origin = 'test' ORDER BY qa.id",
                         [project_id]))


def reviewer_stats(db: sqlite_utils.Database, project_id: int) -> list[dict]:
    """Per reviewer (current state of the pseudo pairs they last decided): accepted, rejected,
    edited, total and last_review_at; most active first. Bulk accepts count as accepted."""
    return list(db.query(
        "SELECT reviewed_by AS reviewer, SUM(status = 'accepted') AS accepted,"
        " SUM(status = 'rejected') AS rejected, SUM(status = 'edited') AS edited,"
        " COUNT(*) AS total, MAX(reviewed_at) AS last_review_at FROM qa"
        " WHERE project_id = ? AND origin = 'pseudo' AND reviewed_by IS NOT NULL"
        " AND status IN ('accepted', 'rejected', 'edited')"
        " GROUP BY reviewed_by ORDER BY total DESC, reviewer", [project_id]))


def calibration(db: sqlite_utils.Database, project_id: int, bins: int = 10, *,
                exclude_bulk: bool = True) -> list[dict]:
    """Per confidence bin [lo, hi): reviewed pseudo pairs n, accepted, edited, rejected,
    mean_confidence, ``acceptance_rate`` = accepted / n (an edited pair counts as NOT accepted:
    the generator got it wrong) and ``usable_rate`` = (accepted + edited) / n.

    Pairs accepted by bulk_accept are left out by default (a threshold, not a judgement).
    """
    if not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins {bins!r} is not valid: give a positive integer")
    bulk = ("AND NOT (status = 'accepted' AND EXISTS (SELECT 1 FROM events e WHERE"
            " e.entity = 'qa' AND e.entity_id = qa.id AND e.action = 'qa.bulk_accept'))"
            if exclude_bulk else "")
    got = {r["bin"]: r for r in db.query(
        "SELECT MIN(CAST(confidence * :bins AS INTEGER), :bins - 1) AS bin, COUNT(*) AS n,"
        " SUM(status = 'accepted') AS accepted, SUM(status = 'edited') AS edited,"
        " SUM(status = 'rejected') AS rejected, AVG(confidence) AS mean_confidence FROM qa"
        " WHERE project_id = :p AND origin = 'pseudo' AND confidence IS NOT NULL"
        f" AND status IN ('accepted', 'edited', 'rejected') {bulk} GROUP BY bin",
        {"p": project_id, "bins": bins})}
    out = []
    for b in range(bins):
        r = got.get(b, {"n": 0, "accepted": 0, "edited": 0, "rejected": 0, "mean_confidence": None})
        n = r["n"]
        out.append({"bin": b, "lo": b / bins, "hi": (b + 1) / bins, "n": n,
                    "accepted": r["accepted"], "edited": r["edited"], "rejected": r["rejected"],
                    "mean_confidence": r["mean_confidence"],
                    "acceptance_rate": r["accepted"] / n if n else None,
                    "usable_rate": (r["accepted"] + r["edited"]) / n if n else None})
    return out


def image_vocabulary(db: sqlite_utils.Database, project_id: int, *,
                     max_answers: int = 20) -> dict:
    """Quick picks for labeling: ``questions`` (most frequent first), ``answers`` {question:
    [answers, most frequent first]} and ``counts`` {question: n}, from seed pairs and
    accepted/edited pseudo pairs (never test pairs, never pending or rejected ones)."""
    where = ("project_id = ? AND ((origin = 'seed' AND status = 'labeled')"
             " OR (origin = 'pseudo' AND status IN ('accepted', 'edited')))")
    counts = {r["question"]: r["n"] for r in db.query(
        f"SELECT question, COUNT(*) AS n FROM qa WHERE {where}"
        " GROUP BY question ORDER BY n DESC, question", [project_id])}
    answers: dict[str, list[str]] = {q: [] for q in counts}
    for r in db.query(f"SELECT question, answer, COUNT(*) AS n FROM qa WHERE {where}"
                      " GROUP BY question, answer ORDER BY n DESC, answer", [project_id]):
        if len(answers[r["question"]]) < max_answers:
            answers[r["question"]].append(r["answer"])
    return {"questions": list(counts), "answers": answers, "counts": counts}
