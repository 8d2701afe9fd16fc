"""Projects and images in the store: real SQLite files in tmp_path."""
from __future__ import annotations

import json

import pytest

from leaml.store import NotFoundError, connect
from leaml.store import images, projects, qa


def _events(db, action):
    return list(db.query("SELECT * FROM events WHERE action = ? ORDER BY id", [action]))


def _image(db, project_id, data: bytes, **kw):
    sha = images.store_image_file(db.home, data, ".png")
    return images.add_image(db, project_id, sha256=sha, ext=".png", width=8, height=6, **kw)


# --- projects -------------------------------------------------------------------------------

def test_create_get_list_project(db):
    p = projects.create_project(db, "kvasir", settings={"seed_target": 5}, user="al")
    assert p["name"] == "kvasir" and p["base_model"] == "tiny16" and p["created_by"] == "al"
    assert p["settings"] == {"seed_target": 5}
    assert projects.get_project(db, "kvasir") == p
    assert projects.get_project(db, p["id"]) == p
    assert projects.get_project(db, str(p["id"])) == p
    projects.create_project(db, "another")
    assert [x["name"] for x in projects.list_projects(db)] == ["another", "kvasir"]
    assert _events(db, "project.create")[0]["user"] == "al"


@pytest.mark.parametrize("name", ["", "   ", "has space", "-dash-first", "a/b", None, "x" * 65])
def test_create_project_rejects_bad_names(db, name):
    with pytest.raises(ValueError, match="project name"):
        projects.create_project(db, name)


def test_create_project_rejects_duplicate_and_empty_base_model(db):
    projects.create_project(db, "kvasir")
    with pytest.raises(ValueError, match="already exists"):
        projects.create_project(db, "kvasir")
    with pytest.raises(ValueError, match="base_model"):
        projects.create_project(db, "other", base_model="  ")


def test_unknown_project_message_lists_known_and_says_how_to_create(db):
    with pytest.raises(NotFoundError) as none_yet:
        projects.get_project(db, "x")
    assert "(known: none)" in str(none_yet.value)
    projects.create_project(db, "b")
    projects.create_project(db, "a")
    with pytest.raises(NotFoundError) as err:
        projects.get_project(db, "x")
    assert str(err.value) == ("unknown project 'x' (known: a, b); create it with "
                              "`python -m leaml import PATH --project x`")


def test_ensure_project_gets_or_creates(db):
    first = projects.ensure_project(db, "demo", base_model="tiny")
    assert projects.ensure_project(db, "demo") == first
    assert len(projects.list_projects(db)) == 1


def test_update_settings_merges_and_audits(db):
    p = projects.create_project(db, "demo", settings={"a": 1, "nested": {"x": 1, "y": 2}})
    out = projects.update_settings(db, p["id"], {"b": 2, "a": None, "nested": {"y": 3}},
                                   user="pi")
    assert out["settings"] == {"b": 2, "nested": {"x": 1, "y": 3}}
    assert projects.get_project(db, "demo")["settings"] == out["settings"]
    ev = _events(db, "project.settings")[-1]
    assert ev["user"] == "pi" and json.loads(ev["before"])["a"] == 1
    with pytest.raises(ValueError, match="must be a dict"):
        projects.update_settings(db, p["id"], ["not", "a", "dict"])


def test_project_counts(db):
    p = projects.create_project(db, "demo")
    seeded, _ = _image(db, p["id"], b"1")
    pseudo_img, _ = _image(db, p["id"], b"2")
    _image(db, p["id"], b"3")
    test_img, _ = _image(db, p["id"], b"4", split="test")
    qa.add_qa(db, project_id=p["id"], image_id=seeded, question="q", answer="a", origin="seed")
    qa.add_qa(db, project_id=p["id"], image_id=test_img, question="q", answer="a", origin="test")
    for status in ("pending", "pending", "accepted", "rejected", "edited"):
        qa.add_qa(db, project_id=p["id"], image_id=pseudo_img, question=f"q {status}",
                  answer="a", origin="pseudo", status=status, confidence=0.5)
    counts = projects.project_counts(db, p["id"])
    assert counts == {"images": 4, "train_images": 3, "test_images": 1, "unlabeled_images": 2,
                      "seed_images": 1, "seed": 1, "pending": 2, "accepted": 1, "rejected": 1,
                      "edited": 1, "test": 1}


# --- images ---------------------------------------------------------------------------------

def test_store_image_file_is_content_addressed_and_idempotent(home):
    sha = images.store_image_file(home, b"pixels", "PNG")
    path = home / "images" / sha[:2] / f"{sha}.png"
    assert path.read_bytes() == b"pixels"
    assert images.store_image_file(home, b"pixels", ".png") == sha
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp files left
    with pytest.raises(ValueError, match="extension"):
        images.store_image_file(home, b"x", "../evil")


def test_add_image_dedupes_and_fills_missing_fields(db):
    p = projects.create_project(db, "demo")
    image_id, created = _image(db, p["id"], b"img", source_name="a.png")
    assert created
    row = images.get_image(db, image_id)
    assert row["split"] == "train" and row["caption"] is None and row["category"] is None
    assert images.image_path(db, row) == images.image_path(db, image_id)
    assert images.image_path(db, row).read_bytes() == b"img"
    again, created = _image(db, p["id"], b"img", caption="a polyp", category="polyps")
    assert (again, created) == (image_id, False)
    row = images.get_image(db, image_id)
    assert (row["caption"], row["caption_source"], row["category"]) == ("a polyp", "import", "polyps")
    _image(db, p["id"], b"img", caption="other", category="other")  # never overwrites
    assert images.get_image(db, image_id)["caption"] == "a polyp"
    other = projects.create_project(db, "other")
    assert _image(db, other["id"], b"img")[1] is True  # same file, second project: own row
    assert [e["action"] for e in db.query("SELECT action FROM events WHERE entity = 'image'")] \
        == ["image.create", "image.update", "image.create"]


def test_add_image_rejects_bad_input(db):
    p = projects.create_project(db, "demo")
    good = dict(sha256="a" * 64, ext=".png", width=2, height=2)
    with pytest.raises(ValueError, match="sha256"):
        images.add_image(db, p["id"], **{**good, "sha256": "xyz"})
    with pytest.raises(ValueError, match="split"):
        images.add_image(db, p["id"], **good, split="val")
    with pytest.raises(ValueError, match="size"):
        images.add_image(db, p["id"], **{**good, "width": 0})
    with pytest.raises(NotFoundError, match="unknown image 999"):
        images.get_image(db, 999)


def test_list_images_filters(db):
    p = projects.create_project(db, "demo")
    a, _ = _image(db, p["id"], b"a", category="polyp")
    b, _ = _image(db, p["id"], b"b")
    c, _ = _image(db, p["id"], b"c", split="test")
    qa.add_qa(db, project_id=p["id"], image_id=a, question="q", answer="x", origin="seed")
    ids = lambda **kw: [r["id"] for r in images.list_images(db, p["id"], **kw)]  # noqa: E731
    assert ids() == [a, b, c]
    assert ids(split="test") == [c]
    assert ids(unlabeled=True) == [b]
    assert ids(unlabeled=False) == [a]
    assert ids(category="polyp") == [a]
    assert ids(limit=1, offset=1) == [b]


def test_set_caption_and_images_without_caption(db):
    p = projects.create_project(db, "demo")
    a, _ = _image(db, p["id"], b"a")
    b, _ = _image(db, p["id"], b"b", split="test")
    assert [r["id"] for r in images.images_without_caption(db, p["id"])] == [a, b]
    assert [r["id"] for r in images.images_without_caption(db, p["id"], split="train")] == [a]
    out = images.set_caption(db, a, "  a red polyp ", source="teacher:qwen", user="bot")
    assert (out["caption"], out["caption_source"]) == ("a red polyp", "teacher:qwen")
    assert [r["id"] for r in images.images_without_caption(db, p["id"])] == [b]
    ev = _events(db, "image.caption")[-1]
    assert ev["user"] == "bot" and json.loads(ev["after"])["caption"] == "a red polyp"
    with pytest.raises(ValueError, match="empty"):
        images.set_caption(db, b, "   ", source="x")


def test_data_home_reopens_with_data(home):
    first = connect(home)
    projects.create_project(first, "demo")
    first.conn.close()
    assert projects.get_project(connect(home), "demo")["name"] == "demo"
