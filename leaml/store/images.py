"""Images: content-addressed files under ``<home>/images`` plus one row per (project, sha256).

The same file imported into two projects is stored once on disk and has one row in each.
"""
from __future__ import annotations

import hashlib
import os
import re
import uuid
from pathlib import Path

import sqlite_utils

from leaml.store.db import NotFoundError, log_event, now, row, transaction

SPLITS = ("train", "test")
_SHA = re.compile(r"^[0-9a-f]{64}$")
_EXT = re.compile(r"^\.[a-z0-9]{1,8}$")


def normalize_ext(ext: str) -> str:
    """'.PNG' / 'png' -> '.png'; ValueError on something that is not a file extension."""
    ext = "." + str(ext or "").strip().lower().lstrip(".")
    if not _EXT.match(ext):
        raise ValueError(f"image extension {ext!r} is not valid: use e.g. '.png' or '.jpg'")
    return ext


def image_file(home: str | os.PathLike, sha256: str, ext: str) -> Path:
    """The content-addressed place of an image under a data home (no database needed)."""
    return Path(home) / "images" / sha256[:2] / f"{sha256}{ext}"


def image_path(db: sqlite_utils.Database, image: dict | int) -> Path:
    """Where the file of ``image`` (a row dict with sha256 and ext, or an image id) lives."""
    if not isinstance(image, dict):
        image = get_image(db, int(image))
    return image_file(db.home, image["sha256"], image["ext"])


def store_image_file(home: str | os.PathLike, data: bytes, ext: str) -> str:
    """Write ``data`` to ``<home>/images/<sha[:2]>/<sha><ext>`` if not there; return the sha256.

    Atomic (temporary file + os.replace), so a crash never leaves half an image behind and
    two processes storing the same bytes both succeed.
    """
    ext = normalize_ext(ext)
    sha = hashlib.sha256(data).hexdigest()
    path = image_file(home, sha, ext)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{sha}.{uuid.uuid4().hex}.tmp")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return sha


def _validate(sha256: str, width: int, height: int, split: str) -> None:
    if not isinstance(sha256, str) or not _SHA.match(sha256):
        raise ValueError(f"sha256 {sha256!r} is not 64 lowercase hex digits; "
                         "use the value store_image_file returned")
    if not (isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0):
        raise ValueError(f"image size {width}x{height} is not valid: width and height must be "
                         "positive integers")
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not valid: use 'train' or 'test'")


def add_image(db: sqlite_utils.Database, project_id: int, *, sha256: str, ext: str,
              width: int, height: int, split: str = "train", category: str | None = None,
              source_name: str | None = None, caption: str | None = None,
              caption_source: str | None = None, user: str | None = None) -> tuple[int, bool]:
    """Add an image row to a project; returns (image id, created?).

    An image already in the project (same sha256) keeps its row and split; a caption or
    category it lacks is filled from the arguments (audited as 'image.update').
    """
    ext = normalize_ext(ext)
    _validate(sha256, width, height, split)
    caption = (caption or "").strip() or None
    with transaction(db):
        found = row(db, "SELECT * FROM images WHERE project_id = ? AND sha256 = ?",
                    [project_id, sha256])
        if found:
            _fill_missing(db, found, category=category, caption=caption,
                          caption_source=caption_source or "import", user=user)
            return found["id"], False
        cur = db.execute(
            "INSERT INTO images (project_id, sha256, ext, width, height, split, category,"
            " source_name, caption, caption_source, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [project_id, sha256, ext, width, height, split, category, source_name, caption,
             (caption_source or "import") if caption else None, now()])
        log_event(db, user=user, action="image.create", entity="image", entity_id=cur.lastrowid,
                  project_id=project_id, after={"sha256": sha256, "split": split,
                                                "category": category, "source_name": source_name})
        return cur.lastrowid, True


def _fill_missing(db, found: dict, *, category, caption, caption_source, user) -> None:
    changes = {}
    if category and not found["category"]:
        changes["category"] = category
    if caption and not found["caption"]:
        changes.update(caption=caption, caption_source=caption_source)
    if not changes:
        return
    sets = ", ".join(f"{k} = ?" for k in changes)
    db.execute(f"UPDATE images SET {sets} WHERE id = ?", [*changes.values(), found["id"]])
    log_event(db, user=user, action="image.update", entity="image", entity_id=found["id"],
              project_id=found["project_id"], before={k: found[k] for k in changes}, after=changes)


def get_image(db: sqlite_utils.Database, image_id: int) -> dict:
    """The image row; NotFoundError if there is none."""
    found = row(db, "SELECT * FROM images WHERE id = ?", [image_id])
    if found is None:
        raise NotFoundError(f"unknown image {image_id}; list images with list_images(db, project_id)")
    return found


def list_images(db: sqlite_utils.Database, project_id: int, *, split: str | None = None,
                unlabeled: bool | None = None, category: str | None = None,
                limit: int | None = None, offset: int = 0) -> list[dict]:
    """Images of a project by id. ``unlabeled=True``: train images without seed QA;
    ``unlabeled=False``: images that have seed QA."""
    where, params = ["i.project_id = ?"], [project_id]
    if split is not None:
        where.append("i.split = ?")
        params.append(split)
    if category is not None:
        where.append("i.category = ?")
        params.append(category)
    if unlabeled is not None:
        seeded = "EXISTS (SELECT 1 FROM qa WHERE qa.image_id = i.id AND qa.origin = 'seed')"
        where.append(f"i.split = 'train' AND NOT {seeded}" if unlabeled else seeded)
    sql = f"SELECT i.* FROM images i WHERE {' AND '.join(where)} ORDER BY i.id LIMIT ? OFFSET ?"
    return list(db.query(sql, [*params, -1 if limit is None else limit, offset]))


def set_caption(db: sqlite_utils.Database, image_id: int, caption: str, *, source: str,
                user: str | None = None) -> dict:
    """Set (or replace) the teacher caption of an image; audited with the old caption."""
    caption = (caption or "").strip()
    if not caption:
        raise ValueError(f"caption of image {image_id} is empty; give the teacher's text")
    if not source or not str(source).strip():
        raise ValueError("caption source is empty: name it, e.g. 'teacher:<model>' or 'import'")
    with transaction(db):
        before = get_image(db, image_id)
        db.execute("UPDATE images SET caption = ?, caption_source = ? WHERE id = ?",
                   [caption, source, image_id])
        log_event(db, user=user, action="image.caption", entity="image", entity_id=image_id,
                  project_id=before["project_id"],
                  before={"caption": before["caption"], "caption_source": before["caption_source"]},
                  after={"caption": caption, "caption_source": source})
    return get_image(db, image_id)


def images_without_caption(db: sqlite_utils.Database, project_id: int, *,
                           split: str | None = None) -> list[dict]:
    """Images of a project (optionally of one split) that have no caption yet, by id."""
    sql = "SELECT * FROM images WHERE project_id = ? AND (caption IS NULL OR caption = '')"
    params: list = [project_id]
    if split is not None:
        sql += " AND split = ?"
        params.append(split)
    return list(db.query(sql + " ORDER BY id", params))
