"""Schema as numbered migrations, applied in order, each once, each in one transaction.

Never edit a migration that has been committed: append a new one. ``schema_version``
records what has been applied, so any old data home upgrades on its next :func:`migrate`.
"""
from __future__ import annotations

from datetime import datetime, timezone

import sqlite_utils

# --- 1: the tables of DESIGN.md -------------------------------------------------------------
M001 = """
CREATE TABLE users (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    role TEXT NOT NULL CHECK (role IN ('admin', 'expert', 'annotator', 'viewer')),
    pw_hash TEXT NOT NULL,            -- 'scrypt$n$r$p$salt_hex$hash_hex'
    created_at TEXT NOT NULL,
    disabled INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE projects (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    base_model TEXT NOT NULL DEFAULT 'tiny',
    settings TEXT NOT NULL DEFAULT '{}',  -- JSON: question list, seed target, caption prompt ...
    created_at TEXT NOT NULL,
    created_by TEXT
);
CREATE TABLE images (
    id INTEGER PRIMARY KEY,
    project_id INTEGER NOT NULL REFERENCES projects(id) ON DELETE CASCADE,
    sha256 TEXT NOT NULL,             -- file lives at <home>/images/<sha[:2]>/<sha><ext>
    ext TEXT NOT NULL,                -- '.png', '.jpg' ...
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    split TEXT NOT NULL DEFAULT 'train' CHECK (split IN ('train', 'test')),
    category TEXT,
    source_name TEXT,                 -- original file name / img_id, for people and exports
    caption TEXT,                     -- teacher caption
    caption_source TEXT,              -- 'import', 'teacher:<model>', 'endpoint:<url>#<model>'
    created_at TEXT NOT NULL,
    UNIQUE (project_id, sha256)
);
CREATE TABLE qa (
    id INTEGER PRIMARY KEY,
    project_id INTEGER NOT NULL REFERENCES projects(id) ON DELETE CASCADE,
    image_id INTEGER NOT NULL REFERENCES images(id) ON DELETE CASCADE,
    question TEXT NOT NULL,
    answer TEXT NOT NULL,
    origin TEXT NOT NULL CHECK (origin IN ('seed', 'pseudo', 'test')),
    status TEXT NOT NULL CHECK (status IN ('labeled', 'pending', 'accepted', 'rejected', 'edited')),
    confidence REAL,                  -- pseudo pairs: geometric mean prob of the answer tokens
    question_type TEXT,
    category TEXT,
    gen_run_id INTEGER REFERENCES runs(id) ON DELETE SET NULL,  -- generator run of a pseudo pair
    source TEXT,                      -- 'import', 'ui', 'generator', 'captions:<model>' ...
    version INTEGER NOT NULL DEFAULT 1,     -- optimistic concurrency: bumped by every update
    locked_by TEXT,                   -- review claim: who ...
    locked_until TEXT,                -- ... until when (ISO UTC)
    reviewed_by TEXT,
    reviewed_at TEXT,
    created_by TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE INDEX qa_image ON qa (image_id);
CREATE INDEX qa_origin_status ON qa (project_id, origin, status);
-- the review queue: next pending pairs by confidence, optionally by category
CREATE INDEX qa_review ON qa (project_id, status, confidence);
CREATE INDEX qa_review_cat ON qa (project_id, status, category, confidence);
CREATE UNIQUE INDEX qa_unique_labeled ON qa (image_id, origin, question, answer)
    WHERE origin IN ('seed', 'test');
CREATE TABLE events (
    id INTEGER PRIMARY KEY,
    ts TEXT NOT NULL,
    user TEXT,
    action TEXT NOT NULL,             -- 'qa.create', 'qa.accept', 'qa.edit', 'import' ...
    entity TEXT NOT NULL,             -- 'qa', 'image', 'project', 'user', 'job', 'run'
    entity_id INTEGER,
    project_id INTEGER,
    before TEXT,                      -- JSON
    after TEXT                        -- JSON
);
CREATE INDEX events_entity ON events (entity, entity_id);
CREATE INDEX events_project ON events (project_id, ts);
CREATE TABLE runs (
    id INTEGER PRIMARY KEY,
    project_id INTEGER NOT NULL REFERENCES projects(id) ON DELETE CASCADE,
    job_id INTEGER,
    method TEXT NOT NULL,             -- 'leaml', 'seed-lora', 'generator', ...
    base_model TEXT NOT NULL,
    params TEXT NOT NULL DEFAULT '{}',     -- JSON: the full config, to reproduce the run
    model_dir TEXT,                   -- relative to the data home
    status TEXT NOT NULL DEFAULT 'running' CHECK (status IN ('running', 'succeeded', 'failed')),
    accuracy REAL,                    -- overall, percent
    seconds REAL,
    created_by TEXT,
    created_at TEXT NOT NULL,
    finished_at TEXT
);
CREATE TABLE metrics (
    id INTEGER PRIMARY KEY,
    run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    scope TEXT NOT NULL CHECK (scope IN ('overall', 'category', 'question_type')),
    key TEXT NOT NULL,                -- '' for overall
    accuracy REAL NOT NULL,           -- percent
    n INTEGER NOT NULL,
    UNIQUE (run_id, scope, key)
);
CREATE TABLE jobs (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,               -- 'run', 'generator', 'pseudo', 'finetune', 'evaluate', 'caption'
    project_id INTEGER REFERENCES projects(id) ON DELETE CASCADE,
    params TEXT NOT NULL DEFAULT '{}',     -- JSON: full config, so the job can be rerun
    status TEXT NOT NULL DEFAULT 'queued' CHECK (status IN
        ('queued', 'running', 'succeeded', 'failed', 'cancelled', 'interrupted')),
    stage TEXT,
    progress REAL NOT NULL DEFAULT 0,
    eta_seconds REAL,
    message TEXT,
    worker_pid INTEGER,
    heartbeat_at TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    created_by TEXT,
    created_at TEXT NOT NULL,
    started_at TEXT,
    finished_at TEXT,
    checkpoint_dir TEXT,              -- relative to the data home
    log_path TEXT,                    -- relative to the data home
    run_id INTEGER REFERENCES runs(id) ON DELETE SET NULL,
    attempts INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX jobs_status ON jobs (status, id);
CREATE TABLE train_log (
    id INTEGER PRIMARY KEY,
    job_id INTEGER REFERENCES jobs(id) ON DELETE CASCADE,
    run_id INTEGER REFERENCES runs(id) ON DELETE CASCADE,
    stage TEXT NOT NULL,
    step INTEGER NOT NULL,
    total INTEGER,
    loss REAL,
    lr REAL,
    ts TEXT NOT NULL
);
CREATE INDEX train_log_job ON train_log (job_id, id);
"""

# --- 2: background workers (liveness for ensure_worker) -------------------------------------
M002 = """
CREATE TABLE workers (
    id INTEGER PRIMARY KEY,
    pid INTEGER NOT NULL,
    host TEXT NOT NULL,               -- socket.gethostname(): a pid means something only there
    started_at TEXT NOT NULL,
    heartbeat_at TEXT NOT NULL,       -- refreshed every few seconds while the worker lives
    job_id INTEGER,                   -- the job it is running now, if any
    stopped_at TEXT                   -- set on a clean exit
);
CREATE INDEX workers_alive ON workers (stopped_at, heartbeat_at);
"""

# --- 3: review claims: find a reviewer's live claim without scanning the queue -------------
# (claim_next resumes the caller's own claim first; without this it walked every pending pair)
M003 = """
CREATE INDEX qa_claims ON qa (locked_by, locked_until) WHERE locked_by IS NOT NULL;
"""

# --- 4: sign-in sessions that survive a reload, and the sign-in throttle -------------------
M004 = """
CREATE TABLE sessions (
    id INTEGER PRIMARY KEY,
    token_hash TEXT NOT NULL UNIQUE,  -- sha256 hex of the browser's token (never the token)
    user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    created_at TEXT NOT NULL,
    last_seen_at TEXT NOT NULL        -- the session ends after a while without any action
);
CREATE INDEX sessions_user ON sessions (user_id);
CREATE TABLE sign_in_failures (
    name TEXT PRIMARY KEY,            -- the account name as typed, known or not
    failures INTEGER NOT NULL,        -- wrong passwords in a row
    locked_until TEXT                 -- no attempt for this name before then (ISO UTC)
);
"""

MIGRATIONS: list[tuple[int, str, str]] = [
    (1, "initial schema", M001),
    (2, "workers", M002),
    (3, "qa claims index", M003),
    (4, "sessions and sign-in throttle", M004),
]


def migrate(db: sqlite_utils.Database) -> int:
    """Apply every migration not yet applied; returns the schema version reached."""
    db.execute("CREATE TABLE IF NOT EXISTS schema_version"
               " (version INTEGER PRIMARY KEY, name TEXT, applied_at TEXT)")
    done = {r["version"] for r in db.query("SELECT version FROM schema_version")}
    for version, name, sql in MIGRATIONS:
        if version in done:
            continue
        db.conn.execute("BEGIN IMMEDIATE")
        try:
            # re-check under the write lock: another process may have migrated meanwhile
            if db.execute("SELECT 1 FROM schema_version WHERE version = ?", [version]).fetchone():
                db.conn.execute("ROLLBACK")
                continue
            for statement in _statements(sql):
                db.conn.execute(statement)
            db.conn.execute("INSERT INTO schema_version VALUES (?, ?, ?)",
                            [version, name, datetime.now(timezone.utc).isoformat()])
            db.conn.execute("COMMIT")
        except BaseException:
            if db.conn.in_transaction:
                db.conn.execute("ROLLBACK")
            raise
    return max([v for v, _, _ in MIGRATIONS] + [0])


def _statements(sql: str) -> list[str]:
    """Split a migration script on ';' at line ends (no ';' inside our statements' text)."""
    lines = [ln for ln in sql.splitlines() if not ln.strip().startswith("--")]
    return [s.strip() for s in "\n".join(lines).split(";\n") if s.strip().strip(";")]
