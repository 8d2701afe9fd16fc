"""Helpers of the app tests (tests/test_app_*.py): a data home with users and a small
project, and AppTest runners for one page. Plain functions, imported by those files."""
from __future__ import annotations

import json
from pathlib import Path

from streamlit.testing.v1 import AppTest

from leaml.data import ingest
from leaml.data.demo.build import DemoConfig, build_demo_files
from leaml.store import connect
from leaml.store import users as users_store

ROOT = Path(__file__).resolve().parents[1]
PASSWORD = "correct-horse"


def add_users(db) -> dict[str, dict]:
    """One user per role, all with PASSWORD; returns {role: user row}."""
    return {role: users_store.add_user(db, f"{role}1", PASSWORD, role)
            for role in ("admin", "expert", "annotator", "viewer")}


def small_manifest(out: Path, *, n_train: int = 12, n_test: int = 4, labeled: int = 0) -> Path:
    """A demo-like manifest: ``n_train`` train images of which only the first ``labeled``
    keep their QA (the rest are unlabeled), and ``n_test`` test images with QA."""
    manifest = build_demo_files(out, DemoConfig(n_train=n_train, n_test=n_test))
    rows = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    train_images = list(dict.fromkeys(r["image"] for r in rows if r.get("split") != "test"))
    keep_qa = set(train_images[:labeled])
    keep = [r if r.get("split") == "test" or r["image"] in keep_qa else
            {k: v for k, v in r.items() if k not in ("question", "answer", "question_type")}
            for r in rows]
    keep = list({json.dumps(r, sort_keys=True): r for r in keep}.values())  # one row per image
    manifest.write_text("".join(json.dumps(r) + "\n" for r in keep))
    return manifest


def make_project(db, tmp: Path, name: str = "p1", **kw) -> dict:
    """Import a small manifest as project ``name``; returns the project row."""
    from leaml.store.projects import get_project
    ingest.import_path(db, small_manifest(tmp / f"src-{name}", **kw), name, user="test")
    return get_project(db, name)


def page(path: str, user: dict | None, project: str | None = None, timeout: float = 30) -> AppTest:
    """An AppTest of one page file with ``user`` signed in (and ``project`` picked), run once."""
    at = AppTest.from_file(str(ROOT / path), default_timeout=timeout)
    if user is not None:
        at.session_state["user"] = user
    if project is not None:
        at.session_state["project_name"] = project
    return at.run()


def home_db(monkeypatch, home: Path):
    """Point LEAML_HOME at ``home`` (the app connects there) and return a connection."""
    monkeypatch.setenv("LEAML_HOME", str(home))
    return connect(home)


def button(at: AppTest, label: str):
    """The (first) button whose label starts with ``label``."""
    found = [b for b in at.button if b.label.startswith(label)]
    assert found, f"no button {label!r}; buttons: {[b.label for b in at.button]}"
    return found[0]


def add_pending(db, project: dict, n: int = 5, *, category: str = "polyp") -> list[int]:
    """``n`` pending pseudo pairs on the project's train images, confidence 0.5 .. 0.99."""
    from leaml.store import images, qa
    imgs = images.list_images(db, project["id"], split="train")
    rows = [dict(project_id=project["id"], image_id=imgs[i % len(imgs)]["id"],
                 question=f"How many polyps are in the image? ({i})", answer=str(i % 3),
                 origin="pseudo", confidence=0.5 + 0.49 * i / max(1, n - 1),
                 question_type="count", category=category) for i in range(n)]
    return qa.add_qa_many(db, rows, user="generator")
