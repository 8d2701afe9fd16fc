"""Projects: a named set of images and QA pairs with a base model and JSON settings.

Rows come back as plain dicts with ``settings`` already decoded to a dict.
"""
from __future__ import annotations

import json
import re

import sqlite_utils

from leaml.config import DEFAULT_BASE
from leaml.store.db import NotFoundError, log_event, now, row, transaction

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def _decode(project: dict | None) -> dict | None:
    if project is not None:
        project = dict(project, settings=json.loads(project["settings"] or "{}"))
    return project


def validate_name(name: str) -> str:
    """Return ``name`` if usable as a project name, else ValueError saying what is allowed."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"project name {name!r} is not valid: use 1-64 letters, digits, '-', "
                         "'_' or '.', starting with a letter or digit (e.g. kvasir-vqa)")
    return name


def create_project(db: sqlite_utils.Database, name: str, *,
                   base_model: str = DEFAULT_BASE,
                   settings: dict | None = None, user: str | None = None) -> dict:
    """Create a project; ValueError on a bad name, an empty base model or a taken name."""
    validate_name(name)
    if not isinstance(base_model, str) or not base_model.strip():
        raise ValueError("base_model is empty: give 'tiny16', 'tiny', a Hugging Face id or a "
                         "local path")
    if settings is not None and not isinstance(settings, dict):
        raise ValueError(f"settings must be a dict (JSON object), got {type(settings).__name__}")
    with transaction(db):
        if row(db, "SELECT 1 FROM projects WHERE name = ?", [name]):
            raise ValueError(f"project '{name}' already exists; pick another name "
                             f"or add to it with --project {name}")
        cur = db.execute(
            "INSERT INTO projects (name, base_model, settings, created_at, created_by)"
            " VALUES (?, ?, ?, ?, ?)",
            [name, base_model.strip(), json.dumps(settings or {}, sort_keys=True), now(), user])
        project = get_project(db, cur.lastrowid)
        log_event(db, user=user, action="project.create", entity="project",
                  entity_id=project["id"], project_id=project["id"], after=project)
    return project


def get_project(db: sqlite_utils.Database, name_or_id: str | int) -> dict:
    """The project with this name (or id); NotFoundError listing the known ones otherwise."""
    found = None
    if isinstance(name_or_id, str):
        found = row(db, "SELECT * FROM projects WHERE name = ?", [name_or_id])
    if found is None and (isinstance(name_or_id, int) or str(name_or_id).isdigit()):
        found = row(db, "SELECT * FROM projects WHERE id = ?", [int(name_or_id)])
    if found is None:
        known = ", ".join(p["name"] for p in db.query("SELECT name FROM projects ORDER BY name"))
        raise NotFoundError(f"unknown project '{name_or_id}' (known: {known or 'none'}); "
                            f"create it with `python -m leaml import PATH --project {name_or_id}`")
    return _decode(found)


def ensure_project(db: sqlite_utils.Database, name: str, **kw) -> dict:
    """The project ``name``, created (with ``kw`` as for :func:`create_project`) if missing."""
    with transaction(db):
        found = row(db, "SELECT * FROM projects WHERE name = ?", [name])
        return _decode(found) if found else create_project(db, name, **kw)


def list_projects(db: sqlite_utils.Database) -> list[dict]:
    """All projects by name."""
    return [_decode(p) for p in db.query("SELECT * FROM projects ORDER BY name")]


def merge_patch(target: dict, patch: dict) -> dict:
    """RFC 7386 JSON merge: nested dicts merge, a None value deletes the key."""
    out = dict(target)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_patch(out[key], value)
        else:
            out[key] = value
    return out


def update_settings(db: sqlite_utils.Database, project_id: int, changes: dict, *,
                    user: str | None = None) -> dict:
    """JSON-merge ``changes`` into the project's settings (None deletes a key); audited."""
    if not isinstance(changes, dict):
        raise ValueError(f"settings changes must be a dict, got {type(changes).__name__}")
    with transaction(db):
        project = get_project(db, int(project_id))
        settings = merge_patch(project["settings"], changes)
        db.execute("UPDATE projects SET settings = ? WHERE id = ?",
                   [json.dumps(settings, sort_keys=True), project["id"]])
        log_event(db, user=user, action="project.settings", entity="project",
                  entity_id=project["id"], project_id=project["id"],
                  before=project["settings"], after=settings)
    return dict(project, settings=settings)


_COUNTS = """
SELECT
  (SELECT COUNT(*) FROM images WHERE project_id = :p) AS images,
  (SELECT COUNT(*) FROM images WHERE project_id = :p AND split = 'train') AS train_images,
  (SELECT COUNT(*) FROM images WHERE project_id = :p AND split = 'test') AS test_images,
  (SELECT COUNT(*) FROM images i WHERE i.project_id = :p AND i.split = 'train'
     AND NOT EXISTS (SELECT 1 FROM qa WHERE qa.image_id = i.id AND qa.origin = 'seed'))
     AS unlabeled_images,
  (SELECT COUNT(DISTINCT image_id) FROM qa WHERE project_id = :p AND origin = 'seed')
     AS seed_images
"""


def project_counts(db: sqlite_utils.Database, project_id: int) -> dict:
    """Image and QA counts: images, train_images, test_images, unlabeled_images (train images
    without seed QA), seed_images, seed, pending, accepted, rejected, edited, test."""
    counts = dict(row(db, _COUNTS, {"p": project_id}))
    counts.update({k: 0 for k in ("seed", "pending", "accepted", "rejected", "edited", "test")})
    for r in db.query("SELECT origin, status, COUNT(*) AS n FROM qa WHERE project_id = ?"
                      " GROUP BY origin, status", [project_id]):
        key = r["status"] if r["origin"] == "pseudo" else r["origin"]
        counts[key] += r["n"]
    return counts
