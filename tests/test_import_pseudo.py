"""Pseudo pairs made elsewhere: manifest rows with a `confidence` (and optional `source`)
import as pending pseudo pairs, ready for review, filterable by source; bad values are
refused naming the row; reviewed pairs export like any other curated pair.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from leaml.data.export import export_project
from leaml.data.ingest import ImportRejected, import_path
from leaml.store import qa as qa_store
from leaml.store.projects import get_project


def png_bytes(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    return buf.getvalue()


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def counts(db) -> dict:
    return {t: db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
            for t in ("projects", "images", "qa", "events")}


@pytest.fixture
def src(tmp_path: Path) -> Path:
    """100 distinct images i000.png .. i099.png."""
    folder = tmp_path / "src"
    folder.mkdir()
    for i in range(100):
        (folder / f"i{i:03d}.png").write_bytes(png_bytes((i, 255 - i, (7 * i) % 256)))
    return folder


def pseudo_rows(n: int = 400) -> list[dict]:
    """``n`` pre-made pairs, 4 per image, two sources, confidence spread over [0, 1]."""
    return [{"image": f"i{i // 4:03d}.png", "question": f"Question {i % 4}?",
             "answer": f"answer {i}", "confidence": round(i / (n - 1), 6),
             "source": "vllm-72b" if i % 2 else "gpu-box", "category": "polyp"}
            for i in range(n)]


def test_400_rows_with_confidence_are_400_pending_pseudo_pairs(db, src):
    report = import_path(db, write_jsonl(src / "m.jsonl", pseudo_rows()), "p")
    assert (report.images_added, report.qa_added, report.pending_added) == (100, 400, 400)
    assert "400 pending pseudo pairs for review" in report.summary()
    pid = get_project(db, "p")["id"]
    pairs = qa_store.list_qa(db, pid)
    assert len(pairs) == 400
    assert {(p["origin"], p["status"]) for p in pairs} == {("pseudo", "pending")}
    by_answer = {p["answer"]: p for p in pairs}
    assert by_answer["answer 399"]["confidence"] == 1.0
    assert by_answer["answer 0"]["confidence"] == 0.0
    assert by_answer["answer 3"]["source"] == "vllm-72b"
    assert qa_store.count_queue(db, pid) == 400
    first = qa_store.review_queue(db, pid, limit=1)[0]
    assert first["answer"] == "answer 399"   # most confident first, as generated pairs

    again = import_path(db, src / "m.jsonl", "p")
    assert (again.qa_added, again.qa_existing) == (0, 400)
    assert qa_store.count_queue(db, pid) == 400


def test_review_queue_filters_by_source(db, src):
    import_path(db, write_jsonl(src / "m.jsonl", pseudo_rows(40)), "p")
    pid = get_project(db, "p")["id"]
    assert qa_store.pending_sources(db, pid) == ["gpu-box", "vllm-72b"]
    mine = qa_store.review_queue(db, pid, source="vllm-72b", limit=100)
    assert len(mine) == 20 and {p["source"] for p in mine} == {"vllm-72b"}
    assert qa_store.count_queue(db, pid, source="gpu-box") == 20
    claimed = qa_store.claim_next(db, pid, "ann", source="gpu-box")
    assert claimed["source"] == "gpu-box"
    assert qa_store.bulk_accept(db, pid, min_conf=0.0, user="ann", source="vllm-72b") == 20
    assert qa_store.pending_sources(db, pid) == ["gpu-box"]


def test_csv_confidence_column_mixes_seed_unlabeled_and_pseudo_rows(db, src):
    m = src / "m.csv"
    m.write_text("image,question,answer,confidence,source\n"
                 "i000.png,Polyp?,yes,,\n"
                 "i001.png,,,,\n"
                 "i002.png,Polyp?,no, 0.25 ,\n"
                 "i003.png,Size?,big,1,other-tool\n", encoding="utf-8")
    report = import_path(db, m, "p")
    assert (report.images_added, report.qa_added, report.pending_added) == (4, 3, 2)
    pairs = {p["answer"]: p for p in qa_store.list_qa(db, get_project(db, "p")["id"])}
    assert (pairs["yes"]["origin"], pairs["yes"]["status"]) == ("seed", "labeled")
    assert (pairs["no"]["origin"], pairs["no"]["confidence"], pairs["no"]["source"]) == \
        ("pseudo", 0.25, "import")
    assert (pairs["big"]["confidence"], pairs["big"]["source"]) == (1.0, "other-tool")


GOOD = {"image": "i000.png", "question": "Polyp?", "answer": "yes", "confidence": 0.5}


@pytest.mark.parametrize("change,words", [
    ({"confidence": 1.5}, "confidence 1.5 is not in [0, 1]"),
    ({"confidence": -0.1}, "confidence -0.1 is not in [0, 1]"),
    ({"confidence": "high"}, "confidence 'high' is not a number"),
    ({"confidence": "nan"}, "confidence 'nan' is not in [0, 1]"),
    ({"confidence": True}, "confidence must be a number in [0, 1], not bool"),
    ({"confidence": [0.5]}, "confidence must be a number in [0, 1], not list"),
    ({"question": None, "answer": None}, "confidence given without a question and an answer"),
    ({"split": "test"}, "confidence given on a test row"),
    ({"source": "vllm\x00"}, "source holds a control character"),
])
def test_bad_pseudo_rows_are_refused_naming_the_row(seeded_pseudo, src, change, words):
    db = seeded_pseudo
    bad = {k: v for k, v in {**GOOD, "image": "i001.png", **change}.items() if v is not None}
    m = write_jsonl(src / "m.jsonl", [GOOD, bad])
    before = counts(db)
    with pytest.raises(ImportRejected) as info:
        import_path(db, m, "p")
    lines = [str(e) for e in info.value.report.errors]
    assert len(lines) == 1 and lines[0].startswith("m.jsonl:2: ") and words in lines[0], lines
    assert counts(db) == before


def test_nan_literal_in_json_is_refused(seeded_pseudo, src):
    m = src / "m.jsonl"
    m.write_text(json.dumps(GOOD) + '\n{"image": "i001.png", "question": "Q?", "answer": "a",'
                 ' "confidence": NaN}\n', encoding="utf-8")
    before = counts(seeded_pseudo)
    with pytest.raises(ImportRejected, match=r"m.jsonl:2: confidence nan is not in \[0, 1\]"):
        import_path(seeded_pseudo, m, "p")
    assert counts(seeded_pseudo) == before


@pytest.fixture
def seeded_pseudo(db, src):
    """Project 'p' holding one pending pseudo pair already."""
    import_path(db, write_jsonl(src / "seed.jsonl", [dict(GOOD, image="i099.png")]), "p")
    return db


def test_reviewed_pseudo_pairs_export_as_curated_pairs(db, src, tmp_path):
    import_path(db, write_jsonl(src / "m.jsonl", pseudo_rows(8)), "p")
    pid = get_project(db, "p")["id"]
    pairs = {p["answer"]: p for p in qa_store.list_qa(db, pid)}
    qa_store.accept(db, pairs["answer 1"]["id"], expected_version=1, user="ann")
    qa_store.edit(db, pairs["answer 2"]["id"], expected_version=1, user="ann",
                  answer="answer 2, corrected")
    qa_store.reject(db, pairs["answer 3"]["id"], expected_version=1, user="ann")
    export_project(db, "p", tmp_path / "out")
    lines = [json.loads(x) for x in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    assert sorted(r["answer"] for r in lines) == ["answer 1", "answer 2, corrected"]
    assert all("confidence" not in r for r in lines)   # reviewed: not re-queued on re-import
    again = import_path(db, tmp_path / "out" / "manifest.jsonl", "q")
    assert (again.qa_added, again.pending_added) == (2, 0)
