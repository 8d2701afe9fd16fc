"""Import of good data: every source kind, idempotent re-import, notes, counts and the event."""
from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from leaml.data.ingest import import_path
from leaml.store.images import image_path, list_images
from leaml.store.projects import get_project
from leaml.store.qa import list_qa


def png(path: Path, color, size=(20, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(buf.getvalue())
    return buf.getvalue()


ROWS = [
    {"image": "img/a.png", "question": "Is there a polyp?", "answer": "yes",
     "category": "polyp", "question_type": "yes/no", "caption": "A polyp on the left."},
    {"image": "img/a.png", "question": "How many polyps?", "answer": "1",
     "category": "polyp", "question_type": "count"},
    {"image": "img/b.png", "question": "Is there a polyp?", "answer": "no", "split": "test"},
    {"image": "img/sub/c.png", "caption": "Normal mucosa."},
]


@pytest.fixture
def src(tmp_path: Path) -> Path:
    folder = tmp_path / "src"
    png(folder / "img" / "a.png", (200, 0, 0))
    png(folder / "img" / "b.png", (0, 200, 0), size=(30, 10))
    png(folder / "img" / "sub" / "c.png", (0, 0, 200))
    with open(folder / "m.jsonl", "w") as f:
        for r in ROWS:
            f.write(json.dumps(r) + "\n")
    return folder


def state(db, name="p"):
    pid = get_project(db, name)["id"]
    images = {r["source_name"]: (r["split"], r["category"], r["caption"], r["width"])
              for r in list_images(db, pid)}
    qa = sorted((q["question"], q["answer"], q["origin"], q["status"], q["question_type"] or "")
                for q in list_qa(db, pid))
    return images, qa


def test_jsonl_manifest(db, src):
    report = import_path(db, src / "m.jsonl", "p", user="ann")
    assert (report.images_added, report.images_existing, report.qa_added, report.qa_existing,
            report.rejected) == (3, 0, 3, 0, 0)
    images, qa = state(db)
    assert images == {"img/a.png": ("train", "polyp", "A polyp on the left.", 20),
                      "img/b.png": ("test", None, None, 30),
                      "img/sub/c.png": ("train", None, "Normal mucosa.", 20)}
    assert qa == [("How many polyps?", "1", "seed", "labeled", "count"),
                  ("Is there a polyp?", "no", "test", "labeled", ""),
                  ("Is there a polyp?", "yes", "seed", "labeled", "yes/no")]
    for img in list_images(db, get_project(db, "p")["id"]):
        assert image_path(db, img).is_file()
    ev = db.execute("SELECT user, after FROM events WHERE action = 'import'").fetchall()
    assert len(ev) == 1 and ev[0][0] == "ann" and json.loads(ev[0][1])["qa_added"] == 3
    assert "3 added" in report.summary() and "0 rejected" in report.summary()


def test_reimport_adds_nothing(db, src):
    import_path(db, src / "m.jsonl", "p")
    before = state(db)
    report = import_path(db, src / "m.jsonl", "p")
    assert (report.images_added, report.images_existing, report.qa_added,
            report.qa_existing) == (0, 3, 0, 3)
    assert state(db) == before


def test_csv_manifest_same_as_jsonl(db, src):
    import csv
    with open(src / "m.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["image", "question", "answer", "split", "category",
                                          "question_type", "caption"])
        w.writeheader()
        w.writerows(ROWS)
    import_path(db, src / "m.jsonl", "p")
    import_path(db, src / "m.csv", "q")
    assert state(db, "q") == state(db, "p")


def test_unknown_columns_are_noted(db, src):
    with open(src / "n.jsonl", "w") as f:
        f.write(json.dumps({"image": "img/a.png", "doctor": "x", "score": 3}) + "\n")
    report = import_path(db, src / "n.jsonl", "p")
    assert report.images_added == 1
    assert any("doctor, score" in n for n in report.notes)


def test_folder_of_images(db, src):
    (src / "img" / "README.txt").write_text("not an image")
    report = import_path(db, src / "img", "p")
    assert report.images_added == 3 and report.qa_added == 0
    names = [r["source_name"] for r in list_images(db, get_project(db, "p")["id"])]
    assert names == ["a.png", "b.png", "sub/c.png"]   # recursive, sorted
    assert any("ignored 1 file" in n for n in report.notes)


def test_folder_with_manifest_is_a_manifest(db, src):
    (src / "m.jsonl").rename(src / "manifest.jsonl")
    report = import_path(db, src, "p")
    assert report.qa_added == 3


def test_zip_of_manifest_wrapped_in_a_folder(db, src, tmp_path):
    z = tmp_path / "upload.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for p in sorted(src.rglob("*")):
            if p.is_file():
                zf.write(p, f"data/{p.relative_to(src).as_posix()}")
    report = import_path(db, z, "p")
    assert (report.images_added, report.qa_added) == (3, 3)
    import_path(db, src / "m.jsonl", "q")
    assert state(db, "p") == state(db, "q")


def test_zip_of_images(db, tmp_path):
    z = tmp_path / "imgs.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("x/1.png", png(None, (1, 1, 1)))
        zf.writestr("x/2.png", png(None, (2, 2, 2)))
        zf.writestr("__MACOSX/x/._1.png", b"junk")
    assert import_path(db, z, "p").images_added == 2


def kvasir_parquet(path: Path, extra: dict | None = None) -> Path:
    """A file in Kvasir-VQA's Hugging Face schema: image {bytes, path}, source, question,
    answer, img_id; one image repeated over several rows, as in the real data set."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    a, b = png(None, (10, 20, 30)), png(None, (30, 20, 10), size=(24, 24))
    cols = {"image": [{"bytes": a, "path": "cl8k.jpg"}, {"bytes": a, "path": "cl8k.jpg"},
                      {"bytes": b, "path": "cl9x.jpg"}],
            "source": ["hyperkvasir", "hyperkvasir", "kvasir-instrument"],
            "question": ["Are there any polyps?", "What color is the polyp?", None],
            "answer": ["Yes", "Pink", None],
            "img_id": ["cl8k", "cl8k", "cl9x"]}
    cols.update(extra or {})
    pq.write_table(pa.table(cols), path)
    return path


def test_kvasir_parquet(db, tmp_path):
    report = import_path(db, kvasir_parquet(tmp_path / "kvasir.parquet"), "kv")
    assert (report.images_added, report.qa_added, report.rejected) == (2, 2, 0)
    images, qa = state(db, "kv")
    assert images == {"cl8k": ("train", None, None, 20), "cl9x": ("train", None, None, 24)}
    assert [q[:3] for q in qa] == [("Are there any polyps?", "Yes", "seed"),
                                   ("What color is the polyp?", "Pink", "seed")]
    assert report.notes == []   # source and img_id are known Kvasir columns
    again = import_path(db, tmp_path / "kvasir.parquet", "kv")
    assert (again.images_added, again.qa_added) == (0, 0)


def test_parquet_with_split_and_category(db, tmp_path):
    p = kvasir_parquet(tmp_path / "k.parquet", {"split": ["test", "test", "train"],
                                                "category": ["polyp", "polyp", "instrument"]})
    import_path(db, p, "kv")
    images, qa = state(db, "kv")
    assert images["cl8k"][:2] == ("test", "polyp") and images["cl9x"][:2] == ("train", "instrument")
    assert {q[2] for q in qa} == {"test"}


def test_identical_bytes_under_two_names_are_one_image(db, tmp_path):
    png(tmp_path / "f" / "x.png", (5, 5, 5))
    png(tmp_path / "f" / "y.png", (5, 5, 5))
    report = import_path(db, tmp_path / "f", "p")
    assert (report.images_added, report.images_existing) == (1, 0)
    assert any("1 image file(s) are byte-identical" in n for n in report.notes)


def test_progress_is_reported(db, src):
    calls = []
    import_path(db, src / "m.jsonl", "p", progress=lambda done, total: calls.append((done, total)))
    assert calls[-1] == (3, 3)


def test_base_model_of_new_project(db, src):
    import_path(db, src / "m.jsonl", "p", base_model="HuggingFaceTB/SmolVLM-256M-Instruct")
    assert get_project(db, "p")["base_model"] == "HuggingFaceTB/SmolVLM-256M-Instruct"
