"""The two bundled demo projects, built from one set of demo files.

- ``demo``: every train image labeled, the benchmark the CLI's ``run`` commands use.
- ``demo-1pct``: the same images; only the train images that ``run --label-fraction 0.01
  --seed 0`` keeps on ``demo`` keep their QA (the seed set), the other train images come
  unlabeled, with their teacher captions and without their answers or categories (the
  category names the abnormality); the test split labeled. The project a new user lands on
  in the app: seed pairs to look at, unlabeled images for the generator to write pairs for.

The seed set is computed by :func:`leaml.data.split.keep_fraction` on ``demo``'s labeled
train images, the very function ``run`` uses, so the app's loop and the CLI's 1% runs start
from the same seed pairs.
"""
from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import replace
from pathlib import Path

import sqlite_utils

from leaml.data.demo.build import DemoConfig, build_demo_files
from leaml.data.ingest import import_path
from leaml.data.split import keep_fraction
from leaml.store.images import list_images
from leaml.store.projects import get_project, project_counts

DEMO = "demo"
DEMO_1PCT = "demo-1pct"
ONE_PCT = 0.01   # the label fraction of demo-1pct
SPLIT_SEED = 0   # the run seed whose split demo-1pct keeps
UNLABELED_KEYS = ("image", "split", "caption")  # what an unlabeled train row keeps


def _counts(db: sqlite_utils.Database, project: str) -> dict | None:
    """The project's counts (leaml.store.projects.project_counts), None when it is missing."""
    try:
        return project_counts(db, get_project(db, project)["id"])
    except LookupError:
        return None


def _holds(db: sqlite_utils.Database, project: str, cfg) -> bool:
    """True when ``project`` exists with at least the config's train and test images."""
    counts = _counts(db, project)
    return counts is not None and counts["train_images"] >= cfg.n_train and counts["test_images"] >= cfg.n_test


def seed_split_shas(db: sqlite_utils.Database, project: str = DEMO, fraction: float = ONE_PCT,
                    seed: int = SPLIT_SEED) -> set[str]:
    """The sha256 of the labeled train images a run with ``fraction`` and ``seed`` keeps on
    ``project`` (images are matched across projects by content)."""
    pid = get_project(db, project)["id"]
    labeled = list_images(db, pid, split="train", unlabeled=False)
    sha = {r["id"]: r["sha256"] for r in labeled}
    return {sha[i] for i in keep_fraction(list(sha), fraction, seed)}


def one_pct_manifest(manifest: Path, keep: set[str]) -> Path:
    """A copy of the demo ``manifest`` where only the train images whose sha256 is in ``keep``
    (and every test image) keep their QA rows; every other train image is one row without
    question, answer, question type or category. Written next to it; returns its path."""
    folder = Path(manifest).parent
    rows = [json.loads(line) for line in Path(manifest).read_text("utf-8").splitlines()
            if line.strip()]
    shas: dict[str, str] = {}
    out, seen = [], set()
    for row in rows:
        if row["image"] not in shas:
            shas[row["image"]] = hashlib.sha256((folder / row["image"]).read_bytes()).hexdigest()
        if row.get("split") == "test" or shas[row["image"]] in keep:
            out.append(row)
        elif row["image"] not in seen:  # one row per unlabeled image
            seen.add(row["image"])
            out.append({k: row[k] for k in UNLABELED_KEYS if row.get(k)})
    target = folder / "manifest-1pct.jsonl"
    target.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out), "utf-8")
    return target


def load_demo_projects(db: sqlite_utils.Database, cfg=None, *, user: str | None = None,
                       progress=None) -> dict:
    """Build the demo files once and import what is missing of ``demo`` and ``demo-1pct``.

    Idempotent: a project that already holds the config's image counts is left alone, and
    nothing is drawn when both do. Returns ``{project: ImportReport or None}`` (None: it was
    there already). Where ``demo`` is larger than ``cfg`` (built by the CLI), its own size
    is drawn again, so that demo-1pct holds the images whose seed split it keeps.
    """
    cfg = cfg or DemoConfig()
    demo = _counts(db, DEMO)
    if demo is not None:
        cfg = replace(cfg, n_train=max(cfg.n_train, demo["train_images"]),
                      n_test=max(cfg.n_test, demo["test_images"]))
    done = {name: None for name in (DEMO, DEMO_1PCT)}
    if _holds(db, DEMO, cfg) and _holds(db, DEMO_1PCT, cfg):
        return done
    with tempfile.TemporaryDirectory(prefix="leaml-demo-") as tmp:
        manifest = build_demo_files(Path(tmp), cfg, progress=progress)
        if not _holds(db, DEMO, cfg):
            done[DEMO] = import_path(db, manifest, DEMO, user=user, progress=progress,
                                     label="demo/manifest.jsonl")
        if not _holds(db, DEMO_1PCT, cfg):
            small = one_pct_manifest(manifest, seed_split_shas(db))
            done[DEMO_1PCT] = import_path(db, small, DEMO_1PCT, user=user, progress=progress,
                                          label="demo/manifest-1pct.jsonl")
    return done
