"""Review as the app does it: claim the next pending pseudo pair, decide (accept, reject,
edit), skip, undo, bulk accept, the queue's filters and progress, calibration, reviewers.

Part of the service the pages call (``leaml.app.service`` re-exports these names); every
function checks the user's permission through :func:`leaml.app.accounts.require`.
"""
from __future__ import annotations

import sqlite_utils

from leaml.app import images
from leaml.app.accounts import require as _require
from leaml.store import app_queries, qa


def next_pair(db: sqlite_utils.Database, user: dict, project_id: int, **filters) -> dict | None:
    """Claim the next pending pair for ``user`` (needs 'review'); None when the queue is empty.
    The claim is a lease (the pair on a reviewer's screen is handed to nobody else), so
    showing a pair writes; :func:`skip` gives it back."""
    user = _require(db, user, "review")
    return qa.claim_next(db, project_id, user["name"], **filters)


def pair_image_url(db: sqlite_utils.Database, user: dict, pair: dict, zoom: float = 1.0,
                   cx: float = 0.5, cy: float = 0.5) -> str:
    """The image of ``pair`` as shown on the Review page (zoomed around (cx, cy)), as a JPEG
    data URL (needs 'review')."""
    _require(db, user, "review")
    path = images.image_path(db, pair["image_id"])
    return images.jpeg_data_url(str(path), float(zoom), float(cx), float(cy))


def decide(db: sqlite_utils.Database, user: dict, qa_id: int, decision: str, *,
           expected_version: int, question: str | None = None, answer: str | None = None):
    """accept, reject or edit one pseudo pair (needs 'review'); ConflictError on a stale
    version; ValueError on a seed or test pair (those change only through seed labeling,
    which needs 'label')."""
    user = _require(db, user, "review")
    if decision == "accept":
        return qa.accept(db, qa_id, expected_version=expected_version, user=user["name"])
    if decision == "reject":
        return qa.reject(db, qa_id, expected_version=expected_version, user=user["name"])
    if decision == "edit":
        return qa.edit(db, qa_id, expected_version=expected_version, user=user["name"],
                       question=question, answer=answer)
    raise ValueError(f"unknown decision {decision!r}: use accept, reject or edit")


def review_filter_options(db: sqlite_utils.Database, user: dict, project_id: int) -> dict:
    """Categories, question types, generator runs and sources (what made the pairs: the
    generator, or what an import named) present in the pending queue."""
    _require(db, user, "review")
    return {**app_queries.queue_facets(db, project_id),
            "sources": qa.pending_sources(db, project_id)}


def review_progress(db: sqlite_utils.Database, user: dict, project_id: int,
                    **filters) -> dict:
    """``left``: pending pairs under the queue ``filters``; ``mine``: pairs ``user`` has
    decided in the project (needs 'review'). Cheap enough for every decision."""
    user = _require(db, user, "review")
    filters = {k: v for k, v in filters.items() if k not in ("order", "exclude_ids")}
    return {"left": qa.count_queue(db, project_id, **filters),
            "mine": qa.decisions_by(db, project_id, user["name"])}


def calibration(db: sqlite_utils.Database, user: dict, project_id: int, bins: int = 10):
    """Acceptance rate by confidence bin of the reviewed pseudo pairs (needs 'view')."""
    _require(db, user, "view")
    return qa.calibration(db, project_id, bins)


def reviewer_stats(db: sqlite_utils.Database, user: dict, project_id: int) -> list[dict]:
    """Counters per reviewer; an annotator sees only their own row."""
    user = _require(db, user, "view")
    stats = qa.reviewer_stats(db, project_id)
    if user["role"] == "annotator":
        stats = [s for s in stats if s["reviewer"] == user["name"]]
    return stats


def skip(db: sqlite_utils.Database, user: dict, qa_id: int) -> None:
    """Give a claimed pair back to the queue (needs 'review')."""
    user = _require(db, user, "review")
    qa.release_claim(db, qa_id, user["name"])


def undo(db: sqlite_utils.Database, user: dict, project_id: int):
    """Undo ``user``'s last review decision in the project (needs 'review'): the pair's row,
    or for a bulk accept ``{"id", "bulk": True, "restored": n, "kept": m}``; None if none."""
    user = _require(db, user, "review")
    return qa.undo_last(db, user=user["name"], project_id=project_id)


def count_bulk(db: sqlite_utils.Database, user: dict, project_id: int, min_conf: float,
               **filters) -> int:
    """How many pending pairs a bulk accept at ``min_conf`` would touch."""
    _require(db, user, "review")
    return qa.count_queue(db, project_id, min_conf=min_conf, **filters)


def bulk_accept(db: sqlite_utils.Database, user: dict, project_id: int, min_conf: float,
                **filters) -> int:
    """Accept every pending pair at or above ``min_conf`` (needs 'review'); returns how many."""
    user = _require(db, user, "review")
    return qa.bulk_accept(db, project_id, min_conf=min_conf, user=user["name"], **filters)
