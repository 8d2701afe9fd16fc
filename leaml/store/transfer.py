"""Queries of import and export that the per-table store modules do not provide."""
from __future__ import annotations

import json

import sqlite_utils

# What an export holds: seed pairs, pseudo pairs a person accepted or edited, and (on request)
# the test pairs. Pending and rejected pairs never leave the project.
_CURATED = """
SELECT qa.id AS qa_id, qa.question, qa.answer, qa.origin, qa.status, qa.question_type,
       COALESCE(qa.category, i.category) AS category,
       i.id AS image_id, i.sha256, i.ext, i.split, i.source_name, i.caption, i.width, i.height
FROM qa JOIN images i ON i.id = qa.image_id
WHERE qa.project_id = :p AND qa.status NOT IN ('pending', 'rejected')
  AND (qa.origin IN ('seed', 'pseudo') OR (qa.origin = 'test' AND :with_test))
ORDER BY i.id, qa.id
"""

_UNLABELED = """
SELECT NULL AS qa_id, NULL AS question, NULL AS answer, NULL AS origin, NULL AS status,
       NULL AS question_type, i.category, i.id AS image_id, i.sha256, i.ext, i.split,
       i.source_name, i.caption, i.width, i.height
FROM images i
WHERE i.project_id = :p AND (:with_test OR i.split = 'train') AND NOT EXISTS (
    SELECT 1 FROM qa WHERE qa.image_id = i.id AND qa.status NOT IN ('pending', 'rejected')
      AND (qa.origin IN ('seed', 'pseudo') OR (qa.origin = 'test' AND :with_test)))
ORDER BY i.id
"""


def image_splits(db: sqlite_utils.Database, project_id: int | None,
                 shas: list[str]) -> dict[str, str]:
    """sha256 -> split of the images among ``shas`` that the project already holds."""
    if project_id is None or not shas:
        return {}
    return {r["sha256"]: r["split"] for r in db.query(
        "SELECT sha256, split FROM images WHERE project_id = ?"
        " AND sha256 IN (SELECT value FROM json_each(?))", [project_id, json.dumps(shas)])}


def pseudo_keys(db: sqlite_utils.Database, project_id: int,
                image_ids: list[int]) -> set[tuple[int, str, str]]:
    """(image_id, question, answer) of the project's pseudo pairs (any status) on
    ``image_ids``: what a re-import of pre-made pseudo pairs must not add again."""
    if not image_ids:
        return set()
    return {(r["image_id"], r["question"], r["answer"]) for r in db.query(
        "SELECT image_id, question, answer FROM qa WHERE project_id = ? AND origin = 'pseudo'"
        " AND image_id IN (SELECT value FROM json_each(?))", [project_id, json.dumps(image_ids)])}


def qa_count(db: sqlite_utils.Database, project_id: int) -> int:
    """Number of QA rows of a project (of any origin and status)."""
    return db.execute("SELECT COUNT(*) FROM qa WHERE project_id = ?", [project_id]).fetchone()[0]


def curated_rows(db: sqlite_utils.Database, project_id: int, *, with_test: bool = False,
                 with_unlabeled: bool = False) -> list[dict]:
    """The rows an export writes: curated QA joined with their images, by image then QA id.

    ``with_unlabeled`` adds one row without question/answer for each image that has no
    exported pair (so captions and unlabeled images survive a round trip).
    """
    params = {"p": project_id, "with_test": int(bool(with_test))}
    rows = list(db.query(_CURATED, params))
    if with_unlabeled:
        rows += list(db.query(_UNLABELED, params))
        rows.sort(key=lambda r: (r["image_id"], r["qa_id"] or 0))
    return rows
