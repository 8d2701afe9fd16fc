"""Import: manifests, Kvasir-VQA parquet, image folders and zips into a project, all or nothing.

:func:`import_path` validates everything first: every row (columns, both-or-neither QA, blank
text, split), every path (it must stay inside the manifest's folder), every image (readable,
complete, within the pixel and byte limits, decoded once). Only then are image files stored
(content-addressed, idempotent) and the rows written in one transaction with one 'import'
event. With errors and without ``skip_invalid`` it raises :class:`ImportRejected` and the
database is exactly as before; any other failure (a full disk, a database error, a bug)
raises :class:`ImportFailed`, one line naming the source, with the traceback written to
``<home>/logs/import-errors.log`` (:mod:`leaml.data.import_errors`), the database again as before.
Re-importing the same data adds nothing: images are unique by sha256 per project, seed/test
pairs by (image, origin, question, answer) and pre-made pseudo pairs (rows with a
``confidence``) by (image, question, answer) among the project's pseudo pairs.

What a path is (manifest, parquet, folder, zip) is decided in :mod:`leaml.data.sources`;
manifests are read in :mod:`leaml.data.manifest`, images checked in :mod:`leaml.data.checks`.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import sqlite_utils

from leaml.data.checks import (DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, BadImage, CheckedImage,
                                check_image, read_limited)
from leaml.data.demo.build import DemoConfig, build_demo_files
from leaml.data.sources import read_source
from leaml.data.import_errors import ImportFailed, failure
from leaml.data.manifest import Limits, Row, RowError
from leaml.store import NotFoundError, StoreError, log_event, transaction
from leaml.store import transfer
from leaml.store.images import add_image, store_image_file
from leaml.store.projects import ensure_project, get_project, project_counts, validate_name
from leaml.store.qa import add_qa_many

__all__ = ["ImportReport", "ImportRejected", "ImportFailed", "RowError", "import_path",
           "import_bytes", "load_demo",
           "DEFAULT_MAX_PIXELS", "DEFAULT_MAX_BYTES"]

KEEP_BYTES = 512 << 20         # validated image bytes held for the write; re-read beyond that
Progress = Callable[[int, int], None]


@dataclass
class ImportReport:
    """What an import did (or would have done): counts, rejected rows and notes."""
    source: str
    project: str
    images_added: int = 0
    images_existing: int = 0
    qa_added: int = 0
    qa_existing: int = 0
    pending_added: int = 0     # of qa_added: pre-made pseudo pairs, now pending review
    errors: list[RowError] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def rejected(self) -> int:
        return len(self.errors)

    def summary(self) -> str:
        """One line for people: images added/existing, QA added/existing, rejected rows."""
        pending = (f" ({self.pending_added} pending pseudo pairs for review)"
                   if self.pending_added else "")
        return (f"imported {self.source} into project '{self.project}': images"
                f" {self.images_added} added, {self.images_existing} existing; QA"
                f" {self.qa_added} added{pending}, {self.qa_existing} existing; {self.rejected}"
                f" rejected ({self.seconds:.1f} s)")


class ImportRejected(StoreError, ValueError):
    """Raised when rows were invalid and ``skip_invalid`` was not set; nothing was written."""

    def __init__(self, report: ImportReport):
        self.report = report
        super().__init__("\n".join(str(e) for e in report.errors))


def import_path(db: sqlite_utils.Database, path: str | Path, project: str, *,
                skip_invalid: bool = False, user: str | None = None,
                base_model: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                max_bytes: int = DEFAULT_MAX_BYTES, progress: Progress | None = None,
                label: str | None = None) -> ImportReport:
    """Import a manifest, parquet file, folder or zip into ``project`` (created if missing).

    ``label`` names the source in messages (default: the file name; the app passes the name
    of the uploaded file). ``progress(done, total)`` is called while images are checked.
    Raises ImportRejected (nothing written) if any row is invalid and not ``skip_invalid``;
    FileNotFoundError if ``path`` does not exist; ValueError for a source that is no
    import; ImportFailed (nothing written, details logged) for anything unexpected.
    """
    t0, path = time.monotonic(), Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; give a manifest, parquet file, folder or zip")
    validate_name(project)
    report = ImportReport(source=label or path.name, project=project)
    try:
        return _import(db, path, project, report, t0, skip_invalid=skip_invalid, user=user,
                       base_model=base_model, limits=Limits(max_pixels, max_bytes),
                       progress=progress)
    except (ValueError, LookupError, StoreError):   # ImportRejected and our own messages
        raise                                         # name the file and row already
    except Exception as exc:   # anything else: one line for people, the traceback in a log
        raise failure(db.home, report.source, project, user, exc) from exc


def _import(db: sqlite_utils.Database, path: Path, project: str, report: ImportReport,
            t0: float, *, skip_invalid: bool, user: str | None, base_model: str | None,
            limits: Limits, progress: Progress | None) -> ImportReport:
    """import_path's work: read, check, then write all or nothing."""
    label, max_bytes = report.source, limits.max_bytes
    with tempfile.TemporaryDirectory(prefix="leaml-import-") as tmp:
        parsed = read_source(path, Path(tmp), limits, label)
        if not parsed.rows and not parsed.errors:
            raise ValueError(f"{report.source}: found nothing to import; a manifest needs rows,"
                             " a folder image files (.png, .jpg, ...)")
        report.errors += parsed.errors
        report.notes += parsed.notes
        existing = _project_id(db, project)
        kept = _Kept()
        checked = _check_images(parsed.rows, limits, report, progress, kept)
        checked = _check_splits(db, existing, checked, report)
        report.errors.sort(key=lambda e: (e.file, e.row or 0))
        if report.errors and not skip_invalid:
            report.seconds = time.monotonic() - t0
            raise ImportRejected(report)
        if checked:   # with skip_invalid and nothing valid, nothing is written at all
            _write(db, project, checked, report, kept, user=user, base_model=base_model,
                   max_bytes=max_bytes)
    report.seconds = time.monotonic() - t0
    return report


def _project_id(db: sqlite_utils.Database, name: str) -> int | None:
    try:
        return get_project(db, name)["id"]
    except NotFoundError:
        return None


# --- checks -----------------------------------------------------------------------------------

class _Kept(dict):
    """Validated bytes by path, up to KEEP_BYTES in all, so most images are read once."""

    def __init__(self):
        super().__init__()
        self.size = 0

    def offer(self, path: Path, data: bytes) -> None:
        if self.size + len(data) <= KEEP_BYTES:
            self[path] = data
            self.size += len(data)


def _check_images(rows: list[Row], limits: Limits, report: ImportReport,
                  progress: Progress | None, kept: _Kept) -> list[tuple[Row, CheckedImage]]:
    """Open every distinct image file once; rows whose image fails become errors."""
    seen: dict[Path, CheckedImage | str] = {}
    out = []
    distinct = len({r.image for r in rows})
    for row in rows:
        if row.image not in seen:
            seen[row.image] = _check_one(row, limits, kept)
            if progress is not None:
                progress(len(seen), distinct)
            result = seen[row.image]
            if isinstance(result, str):
                report.errors.append(RowError(row.file, row.row, result))
                seen[row.image] = f"{result.split(' (')[0]} (see {row.file}:{row.row})"
                continue
        result = seen[row.image]
        if isinstance(result, str):
            report.errors.append(RowError(row.file, row.row, result))
        else:
            out.append((row, result))
    return out


def _check_one(row: Row, limits: Limits, kept: _Kept) -> CheckedImage | str:
    try:
        data = read_limited(row.image, limits.max_bytes)
        checked = check_image(data, limits.max_pixels)
        kept.offer(row.image, data)
        return checked
    except BadImage as exc:
        return f"image '{row.image_name}' {exc}"


def _check_splits(db: sqlite_utils.Database, project_id: int | None,
                  checked: list[tuple[Row, CheckedImage]],
                  report: ImportReport) -> list[tuple[Row, CheckedImage]]:
    """One image belongs to one split: in this import and against what the project holds."""
    stored = transfer.image_splits(db, project_id, sorted({c.sha256 for _, c in checked}))
    first: dict[str, Row] = {}
    out = []
    for row, img in checked:
        where = None
        if img.sha256 in stored and stored[img.sha256] != row.split:
            where = f"is already in project '{report.project}' as split '{stored[img.sha256]}'"
        elif img.sha256 in first and first[img.sha256].split != row.split:
            other = first[img.sha256]
            where = f"is listed as split '{other.split}' at {other.file}:{other.row}"
        if where:
            report.errors.append(RowError(row.file, row.row, f"image '{row.image_name}' {where},"
                                          f" here as '{row.split}'; an image belongs to one split"))
            continue
        first.setdefault(img.sha256, row)
        out.append((row, img))
    return out


# --- write ------------------------------------------------------------------------------------

def _write(db: sqlite_utils.Database, project: str, checked: list[tuple[Row, CheckedImage]],
           report: ImportReport, kept: _Kept, *, user: str | None, base_model: str | None,
           max_bytes: int) -> None:
    """Store the image files, then every row in one transaction with one 'import' event."""
    images: dict[str, tuple[Row, CheckedImage]] = {}
    for row, img in checked:
        if img.sha256 not in images:
            data = kept.get(row.image) or read_limited(row.image, max_bytes)
            if store_image_file(db.home, data, img.ext) != img.sha256:
                raise StoreError(f"{row.file}: image '{row.image_name}' changed during the"
                                 " import; nothing was written, import again")
            images[img.sha256] = (row, img)
    copies = len({row.image for row, _ in checked}) - len(images)
    if copies:
        report.notes.append(f"{report.source}: {copies} image file(s) are byte-identical copies"
                            " of another one and were stored once")
    with transaction(db):
        kw = {"base_model": base_model} if base_model else {}
        pid = ensure_project(db, project, user=user, **kw)["id"]
        ids = _add_images(db, pid, images, checked, report, user)
        qa = [_qa_dict(pid, ids[img.sha256], row) for row, img in checked if row.question]
        new = _new_pseudo_only_once(db, pid, qa)
        before = transfer.qa_count(db, pid)
        if new:
            add_qa_many(db, new, user=user, action="qa.import")
        report.qa_added = transfer.qa_count(db, pid) - before
        report.qa_existing = len(qa) - report.qa_added
        report.pending_added = sum(q["origin"] == "pseudo" for q in new)
        log_event(db, user=user, action="import", entity="project", entity_id=pid,
                  project_id=pid, after=_event(report))


def _add_images(db, pid: int, images: dict, checked: list, report: ImportReport,
                user: str | None) -> dict[str, int]:
    """Add each distinct image once; its category/caption: the first row that has one."""
    extra: dict[str, dict] = {}
    for row, img in checked:
        e = extra.setdefault(img.sha256, {"category": None, "caption": None})
        e["category"] = e["category"] or row.category
        e["caption"] = e["caption"] or row.caption
    ids = {}
    for sha, (row, img) in images.items():
        ids[sha], created = add_image(
            db, pid, sha256=sha, ext=img.ext, width=img.width, height=img.height,
            split=row.split, category=extra[sha]["category"], source_name=row.source_name,
            caption=extra[sha]["caption"], caption_source="import", user=user)
        report.images_added += created
        report.images_existing += not created
    return ids


def _qa_dict(pid: int, image_id: int, row: Row) -> dict:
    """The pair of a row: seed/test, or a pending pseudo pair when it has a confidence."""
    pseudo = row.confidence is not None
    origin = "pseudo" if pseudo else "test" if row.split == "test" else "seed"
    return {"project_id": pid, "image_id": image_id, "question": row.question,
            "answer": row.answer, "origin": origin, "status": "pending" if pseudo else "labeled",
            "confidence": row.confidence, "question_type": row.question_type,
            "category": row.category, "source": row.source if pseudo else "import"}


def _new_pseudo_only_once(db: sqlite_utils.Database, pid: int, qa: list[dict]) -> list[dict]:
    """``qa`` without the pseudo pairs the project already has (any status: a rejected pair
    stays rejected) or that came earlier in this import; seed/test pairs the store dedupes."""
    images = sorted({q["image_id"] for q in qa if q["origin"] == "pseudo"})
    seen = transfer.pseudo_keys(db, pid, images)
    out = []
    for q in qa:
        if q["origin"] == "pseudo":
            key = (q["image_id"], q["question"], q["answer"])
            if key in seen:
                continue
            seen.add(key)
        out.append(q)
    return out


def _event(report: ImportReport) -> dict:
    return {"source": report.source, "images_added": report.images_added,
            "images_existing": report.images_existing, "qa_added": report.qa_added,
            "qa_existing": report.qa_existing, "rejected": report.rejected,
            "errors": [str(e) for e in report.errors[:50]]}


# --- uploads ----------------------------------------------------------------------------------

def import_bytes(db: sqlite_utils.Database, data: bytes, suffix: str, project: str, *,
                 label: str, skip_invalid: bool = False, user: str | None = None) -> ImportReport:
    """Import an uploaded file's bytes (a ``suffix`` file: zip, jsonl, csv, parquet) into
    ``project``: staged in a temporary folder under the data home, then :func:`import_path`.

    A failure to stage the file (a full disk, an unwritable data home) is an ImportFailed
    like any other unexpected one: one line naming ``label``, the details in the log.
    """
    try:
        tmp = Path(tempfile.mkdtemp(prefix="leaml-upload-", dir=db.home))
    except OSError as exc:
        raise failure(db.home, label, project, user, exc) from exc
    try:  # ingest checks zip members itself (paths outside the archive, sizes, bombs)
        target = tmp / f"upload.{suffix}"
        try:
            target.write_bytes(data)
        except OSError as exc:
            raise failure(db.home, label, project, user, exc) from exc
        return import_path(db, target, project, skip_invalid=skip_invalid, user=user,
                           label=label)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --- the demo set -----------------------------------------------------------------------------

def load_demo(db: sqlite_utils.Database, cfg=None, *, project: str = "demo",
              user: str | None = None, progress: Progress | None = None) -> ImportReport | None:
    """Build the synthetic demo set (leaml.data.demo.build) in a temporary folder and import it.

    Idempotent: returns None without building anything when ``project`` already holds at
    least ``cfg.n_train`` train and ``cfg.n_test`` test images.
    """
    cfg = cfg or DemoConfig()
    pid = _project_id(db, project)
    if pid is not None:
        counts = project_counts(db, pid)
        if counts["train_images"] >= cfg.n_train and counts["test_images"] >= cfg.n_test:
            return None
    with tempfile.TemporaryDirectory(prefix="leaml-demo-") as tmp:
        manifest = build_demo_files(Path(tmp), cfg, progress=progress)
        return import_path(db, manifest, project, user=user, progress=progress,
                           label="demo/manifest.jsonl")
