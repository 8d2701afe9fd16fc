"""Projects as the app handles them: the first-run demo, creating a project, importing an
upload, counts and the seed target, exporting the curated QA.

Part of the service the pages call (``leaml.app.service`` re-exports these names); actions
check the user's permission through :func:`leaml.app.accounts.require`.
"""
from __future__ import annotations

import math
import tempfile
from pathlib import PurePosixPath

import sqlite_utils

from leaml.app.accounts import require as _require
from leaml.config import DEFAULT_BASE
from leaml.data import ingest
from leaml.store import projects as projects_store

MAX_UPLOAD_MB = 200           # also the Streamlit upload limit (.streamlit/config.toml)
UPLOAD_TYPES = ("zip", "jsonl", "csv", "parquet")
DEFAULT_SEED_FRACTION = 0.01  # seed target: 1% of the train images, at least one
DEMO_PROJECT = "demo"
LANDING_PROJECT = "demo-1pct"  # the demo at 1% labels: what a new user sees first
ImportRejected = ingest.ImportRejected  # bad rows: carries the report, row by row


def ensure_demo(db: sqlite_utils.Database, n_train: int = 300, n_test: int = 60) -> dict | None:
    """First-run setup: the bundled ``demo-1pct`` project (and ``demo``), built (small,
    seconds) if the data home lacks them; returns ``demo-1pct``, the project a new user
    lands on.

    The one write the app makes without a user's action, and only once per data home:
    idempotent (with both projects present it only reads them). The full set is
    ``python -m leaml demo --data-only``; this small one makes the first start quick.
    """
    try:
        projects_store.get_project(db, DEMO_PROJECT)
        return projects_store.get_project(db, LANDING_PROJECT)
    except LookupError:
        pass
    from leaml.data.demo import build as demo  # numpy drawing code: only needed on a first start
    from leaml.data.demo import projects as demo_projects  # (same: first start only)
    demo_projects.load_demo_projects(db, demo.DemoConfig(n_train=n_train, n_test=n_test),
                                     user="demo")
    return projects_store.get_project(db, LANDING_PROJECT)


def list_projects(db: sqlite_utils.Database, user: dict) -> list[dict]:
    """Every project by name (needs 'view')."""
    _require(db, user, "view")
    return projects_store.list_projects(db)


def project_counts(db: sqlite_utils.Database, user: dict, project_id: int) -> dict:
    """Image and QA counts of a project (needs 'view'): images, train_images, test_images,
    unlabeled_images, seed_images, seed, pending, accepted, rejected, edited, test."""
    _require(db, user, "view")
    return projects_store.project_counts(db, project_id)


def projects_overview(db: sqlite_utils.Database, user: dict) -> list[dict]:
    """One row per project for the projects table (needs 'view'): name, base model, created,
    and its images, seed, pending, accepted and test counts."""
    _require(db, user, "view")
    keep = ("images", "seed", "pending", "accepted", "test")
    return [dict(name=p["name"], base_model=p["base_model"], created=p["created_at"][:16],
                 **{k: v for k, v in projects_store.project_counts(db, p["id"]).items()
                    if k in keep})
            for p in projects_store.list_projects(db)]


def seed_target(project: dict, counts: dict) -> int:
    """The project's seed target: its setting, else 1% of the train images (at least 1)."""
    target = (project.get("settings") or {}).get("seed_target")
    return int(target) if target else max(1, math.ceil(DEFAULT_SEED_FRACTION *
                                                       counts.get("train_images", 0)))


def create_project(db: sqlite_utils.Database, user: dict, name: str,
                   base_model: str = DEFAULT_BASE, seed_target: int | None = None) -> dict:
    """A new project (needs 'import'); ``seed_target`` is stored in its settings."""
    user = _require(db, user, "import")
    settings = {"seed_target": int(seed_target)} if seed_target else {}
    return projects_store.create_project(db, (name or "").strip(),
                                         base_model=base_model or DEFAULT_BASE,
                                         settings=settings, user=user["name"])


def import_upload(db: sqlite_utils.Database, user: dict, project: str, filename: str,
                  data: bytes, *, skip_invalid: bool = False):
    """Import an uploaded zip, JSONL/CSV manifest or parquet file into ``project``.

    Returns ingest's ImportReport; raises :data:`ImportRejected` (with the report, row by
    row) when rows are bad and ``skip_invalid`` is off, ValueError for a wrong file type
    or a file over :data:`MAX_UPLOAD_MB`, ingest.ImportFailed (one line, details logged)
    for anything unexpected; all three are ValueErrors the Projects page shows.
    """
    user = _require(db, user, "import")
    suffix = PurePosixPath(filename or "").suffix.lower().lstrip(".")
    if suffix not in UPLOAD_TYPES:
        raise ValueError(f"'{filename}': unsupported file type; upload one of "
                         f"{', '.join('.' + t for t in UPLOAD_TYPES)}")
    if len(data) > MAX_UPLOAD_MB * 1024 * 1024:
        raise ValueError(f"'{filename}' is {len(data) / 2**20:.0f} MB; the limit is "
                         f"{MAX_UPLOAD_MB} MB (import larger sets with `python -m leaml import`)")
    return ingest.import_bytes(db, data, suffix, project, skip_invalid=skip_invalid,
                               user=user["name"], label=PurePosixPath(filename).name)


def export_zip(db: sqlite_utils.Database, user: dict, project: str | int, *,
               with_test: bool = False):
    """The curated QA of ``project`` as one zip, what ``leaml export`` writes (manifest.jsonl,
    images/, data.parquet), in a temporary file (deleted when closed), rewound; needs 'export'
    (experts, admins, viewers). Audited as 'export'."""
    from leaml.data import export  # pyarrow: loaded on the first export only
    user = _require(db, user, "export")
    out = tempfile.TemporaryFile(dir=db.home, prefix="leaml-export-", suffix=".zip")
    try:
        export.export_zip(db, project, out, with_test=with_test, user=user["name"])
    except BaseException:
        out.close()
        raise
    out.seek(0)
    return out
