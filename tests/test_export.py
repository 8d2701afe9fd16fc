"""Export: only curated QA leaves, the files read back, and export -> import round-trips."""
from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from leaml.data.export import export_project
from leaml.data.ingest import import_path
from leaml.store import NotFoundError
from leaml.store.images import list_images
from leaml.store.projects import get_project
from leaml.store.qa import accept, add_qa_many, edit, list_qa, reject


def png(path: Path, color, size=(20, 16)) -> None:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())


@pytest.fixture
def project(db, tmp_path: Path) -> int:
    """Project 'p': 2 seed pairs, 1 test pair, 1 unlabeled image, 4 pseudo pairs reviewed
    to pending / accepted / edited / rejected."""
    src = tmp_path / "src"
    for name, color in (("a", (200, 0, 0)), ("b", (0, 200, 0)), ("c", (0, 0, 200))):
        png(src / f"{name}.png", color)
    rows = [{"image": "a.png", "question": "Polyp?", "answer": "yes", "category": "polyp",
             "question_type": "yes/no", "caption": "A red polyp."},
            {"image": "a.png", "question": "Count?", "answer": "1", "category": "polyp"},
            {"image": "b.png", "question": "Polyp?", "answer": "no", "split": "test"},
            {"image": "c.png", "caption": "Clean mucosa."}]
    (src / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    import_path(db, src / "m.jsonl", "p")
    pid = get_project(db, "p")["id"]
    c = next(i["id"] for i in list_images(db, pid) if i["source_name"] == "c.png")
    ids = add_qa_many(db, [{"project_id": pid, "image_id": c, "question": f"Q{k}?",
                            "answer": f"A{k}", "origin": "pseudo", "confidence": 0.5}
                           for k in range(4)])
    accept(db, ids[1], expected_version=1, user="ann")
    edit(db, ids[2], expected_version=1, user="ann", answer="A2 fixed")
    reject(db, ids[3], expected_version=1, user="ann")
    return pid


def manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def test_only_curated_pairs(db, project, tmp_path):
    report = export_project(db, "p", tmp_path / "out")
    got = sorted((r["question"], r["answer"]) for r in manifest(tmp_path / "out"))
    assert got == [("Count?", "1"), ("Polyp?", "yes"), ("Q1?", "A1"), ("Q2?", "A2 fixed")]
    assert report.rows == 4 and report.images == 2
    for r in manifest(tmp_path / "out"):
        assert (tmp_path / "out" / r["image"]).is_file()


def test_with_test_adds_test_pairs(db, project, tmp_path):
    export_project(db, "p", tmp_path / "out", with_test=True)
    rows = manifest(tmp_path / "out")
    assert ("Polyp?", "no", "test") in [(r["question"], r["answer"], r["split"]) for r in rows]
    assert len(rows) == 5


def test_parquet_has_kvasir_columns(db, project, tmp_path):
    export_project(db, "p", tmp_path / "out", with_test=True)
    table = pq.read_table(tmp_path / "out" / "data.parquet")
    for column in ("image", "source", "question", "answer", "img_id", "split", "category",
                   "question_type"):
        assert column in table.column_names
    assert table.schema.field("image").type.names == ["bytes", "path"]
    rows = table.to_pylist()
    assert {r["source"] for r in rows} == {"seed", "pseudo", "test"}
    Image.open(io.BytesIO(rows[0]["image"]["bytes"])).load()
    meta = json.loads(table.schema.metadata[b"huggingface"])
    assert meta["info"]["features"]["image"] == {"_type": "Image"}


def curated(db, name: str, with_test: bool = True) -> list[tuple]:
    """What should survive a round trip: per pair, the image bytes' hash and the texts."""
    pid = get_project(db, name)["id"]
    images = {i["id"]: i for i in list_images(db, pid)}
    out = []
    for q in list_qa(db, pid):
        if q["status"] in ("pending", "rejected") or (q["origin"] == "test" and not with_test):
            continue
        i = images[q["image_id"]]
        out.append((i["sha256"], i["split"], i["caption"], q["category"], q["question"],
                    q["answer"], q["question_type"], i["width"], i["height"]))
    return sorted(out, key=repr)


@pytest.mark.parametrize("what", ["out", "out/data.parquet"])
def test_round_trip(db, project, tmp_path, what):
    export_project(db, "p", tmp_path / "out", with_test=True)
    report = import_path(db, tmp_path / what, "copy")
    assert report.rejected == 0 and report.qa_added == 5
    assert curated(db, "copy") == curated(db, "p")
    # exporting the copy gives the same manifest again (images named by content)
    export_project(db, "copy", tmp_path / "out2", with_test=True)
    key = lambda r: json.dumps(r, sort_keys=True)
    assert sorted(manifest(tmp_path / "out2"), key=key) == sorted(manifest(tmp_path / "out"),
                                                                  key=key)


def test_with_unlabeled_round_trips_images_and_captions(db, project, tmp_path):
    export_project(db, "p", tmp_path / "out", with_test=True, with_unlabeled=True)
    import_path(db, tmp_path / "out", "copy")
    caps = lambda name: sorted((i["sha256"], i["caption"]) for i in
                               list_images(db, get_project(db, name)["id"]))
    assert caps("copy") == caps("p")


def test_unknown_project(db, tmp_path):
    with pytest.raises(NotFoundError, match="unknown project 'nope'"):
        export_project(db, "nope", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_out_dir_must_be_empty_unless_overwrite(db, project, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        export_project(db, "p", out)
    export_project(db, "p", out, overwrite=True)
    export_project(db, "p", out, overwrite=True)
    assert (out / "keep.txt").read_text() == "mine" and len(manifest(out)) == 4


def test_export_is_audited(db, project, tmp_path):
    export_project(db, "p", tmp_path / "out", user="pi")
    ev = db.execute("SELECT user, after FROM events WHERE action = 'export'").fetchone()
    assert ev[0] == "pi" and json.loads(ev[1])["rows"] == 4


def test_hf_datasets_reads_the_parquet(db, project, tmp_path, monkeypatch):
    """What users do with an export: `datasets.load_dataset("parquet", ...)` reads it back
    (image decodes to a PIL image, the text columns are strings)."""
    import datasets
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    export_project(db, "p", tmp_path / "out", with_test=True)
    ds = datasets.load_dataset("parquet", data_files=str(tmp_path / "out" / "data.parquet"),
                               split="train", cache_dir=str(tmp_path / "hf"))
    assert len(ds) == 5 and ds[0]["image"].size == (20, 16)


def test_app_zip_download_reimports_to_the_same_rows(db, project, tmp_path):
    """The Projects page's download: app_service.export_zip for a viewer, re-imported (as
    the upload form does) into a new project, gives the same rows; annotators get nothing."""
    from leaml.app import service as app_service
    from leaml.store.users import add_user
    viewer = add_user(db, "pi", "correct-horse", "viewer")
    expert = add_user(db, "doc", "correct-horse", "expert")
    annotator = add_user(db, "ann1", "correct-horse", "annotator")
    with app_service.export_zip(db, viewer, "p", with_test=True) as f:
        data = f.read()
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        names = zf.namelist()
    assert "manifest.jsonl" in names and "data.parquet" in names
    assert sum(n.startswith("images/") for n in names) == 3
    report = app_service.import_upload(db, expert, "copy", "p-export.zip", data)
    assert report.rejected == 0 and report.qa_added == 5
    assert curated(db, "copy") == curated(db, "p")
    with pytest.raises(PermissionError):
        app_service.export_zip(db, annotator, "p")
    assert not list(db.home.glob("leaml-export-*"))  # nothing left behind in the data home
