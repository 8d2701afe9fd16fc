"""Seed labeling as the app does it: the next image to label (random or diverse), quick
picks for questions, answers and categories, and adding, editing, deleting seed pairs.

Part of the service the pages call (``leaml.app.service`` re-exports these names); actions
check the user's permission through :func:`leaml.app.accounts.require`.
"""
from __future__ import annotations

from pathlib import Path

import sqlite_utils

from leaml.app.accounts import require as _require
from leaml.data import diversity
from leaml.store import app_queries, qa
from leaml.store import images as images_store


def next_image(db: sqlite_utils.Database, project_id: int, *, strategy: str = "diverse",
               seed: int | None = None, exclude: tuple[int, ...] = ()) -> dict | None:
    """The next train image without seed QA (random or diverse), or None when all are done."""
    cands = [r["id"] for r in images_store.list_images(db, project_id, unlabeled=True)
             if r["id"] not in set(exclude)]
    labeled = [r["id"] for r in images_store.list_images(db, project_id, unlabeled=False)]
    cache = Path(db.home) / "cache" / "features" / f"project-{project_id}.npz"
    picked = diversity.pick_next(cands, labeled, lambda i: images_store.image_path(db, i),
                                 strategy=strategy, cache_path=cache, seed=seed)
    return None if picked is None else images_store.get_image(db, picked)


def project_image(db: sqlite_utils.Database, user: dict, project_id: int,
                  image_id: int | None) -> dict | None:
    """The image ``image_id`` if it still exists and belongs to the project, else None
    (needs 'view'): the labeling page keeps its image across reruns only then."""
    _require(db, user, "view")
    if image_id is None:
        return None
    try:
        image = images_store.get_image(db, image_id)
    except LookupError:
        return None
    return image if image["project_id"] == project_id else None


def label_choices(db: sqlite_utils.Database, project: dict) -> dict:
    """Quick picks for seed labeling: the project's questions, answers per question and
    categories (settings 'questions'/'categories' first, then what the data already holds)."""
    settings = project.get("settings") or {}
    vocab = qa.image_vocabulary(db, project["id"])
    questions = list(dict.fromkeys([*settings.get("questions", []), *vocab["questions"]]))
    cats = app_queries.image_categories(db, project["id"])
    categories = list(dict.fromkeys([*settings.get("categories", []), *cats]))
    return {"questions": questions, "answers": vocab["answers"], "categories": categories}


def label_seed(db: sqlite_utils.Database, user: dict, *, project_id: int, image_id: int,
               question: str, answer: str, category: str | None = None,
               question_type: str | None = None) -> int:
    """Add one seed QA pair (needs 'label'); returns its id. Audited by the store."""
    user = _require(db, user, "label")
    question, answer = (question or "").strip(), (answer or "").strip()
    if not question or not answer:
        raise ValueError("both a question and an answer are needed; fill in the empty one")
    return qa.add_qa(db, project_id=project_id, image_id=image_id, question=question,
                     answer=answer, origin="seed", status="labeled",
                     question_type=question_type or None, category=category or None,
                     user=user["name"])


def edit_seed(db: sqlite_utils.Database, user: dict, qa_id: int, *, expected_version: int,
              **changes) -> dict:
    """Change a seed pair's question/answer/category (needs 'label'); ConflictError if stale."""
    user = _require(db, user, "label")
    return qa.update_qa(db, qa_id, expected_version=expected_version, user=user["name"],
                        **changes)


def delete_seed(db: sqlite_utils.Database, user: dict, qa_id: int, *, expected_version: int):
    """Delete a seed pair (needs 'label'); the audit log keeps what it was."""
    user = _require(db, user, "label")
    return qa.delete_qa(db, qa_id, expected_version=expected_version, user=user["name"])


def seed_pairs(db: sqlite_utils.Database, user: dict, project_id: int, limit: int = 200):
    """The project's seed pairs, newest first (needs 'view')."""
    _require(db, user, "view")
    return list(reversed(qa.list_qa(db, project_id, origin="seed")))[:limit]
