"""Hostile or broken input to import and to text typed in the app (README: Reliability, I12,
I15, I16 and unexpected failures): one line naming the file and row, a non-zero exit, no
traceback, and the store exactly as it was.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from leaml.app import service as app_service
from leaml.data.ingest import ImportFailed, ImportRejected, import_path
from leaml.store import qa as qa_store
from leaml.store import users as users_store
from test_import_bad import png_bytes, seeded, write_jsonl  # noqa: F401 (seeded: a fixture)

ROOT = Path(__file__).resolve().parents[1]


def dump(db) -> dict:
    """Every row of every table (sorted): the whole stored state."""
    tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'"
                                       " AND name NOT LIKE 'sqlite_%' ORDER BY name")]
    return {t: sorted(map(repr, db.execute(f"SELECT * FROM [{t}]").fetchall())) for t in tables}


def counts(db) -> dict:
    return {t: db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
            for t in ("projects", "images", "qa", "events")}


def leaml(home: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "leaml", *args, "--home", str(home)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.fixture
def src(tmp_path: Path) -> Path:
    folder = tmp_path / "src"
    folder.mkdir()
    (folder / "a.png").write_bytes(png_bytes((200, 30, 30)))
    (folder / "b.png").write_bytes(png_bytes((30, 200, 30)))
    return folder


GOOD = {"image": "a.png", "question": "What is shown?", "answer": "a polyp"}


def rejected(db, path, row: int, *words, file: str = "m.jsonl") -> str:
    """The import raises ImportRejected naming file:row and the words; nothing changes."""
    before, n = dump(db), counts(db)
    with pytest.raises(ImportRejected) as info:
        import_path(db, path, "p")
    lines = [str(e) for e in info.value.report.errors]
    hit = [line for line in lines if line.startswith(f"{file}:{row}: ")]
    assert hit, lines
    for word in words:
        assert word in hit[0], hit[0]
    assert counts(db) == n and dump(db) == before
    return hit[0]


# --- I12: blank, invisible and control characters; the length limit -------------------------

@pytest.mark.trust
@pytest.mark.parametrize("field,value,words", [
    ("answer", "\u200b", ["answer is empty or whitespace-only"]),
    ("answer", "\u200b\ufeff", ["answer is empty or whitespace-only"]),
    ("question", "\u2028 \u3000", ["question is empty or whitespace-only"]),
    ("answer", "a\x00b", ["control character (U+0000)"]),
    ("question", "why\x1b[31m?", ["control character (U+001B)"]),
    ("answer", "x" * 10_001, ["10,001 characters", "10,000"]),
])
def test_invisible_or_control_text_is_refused(seeded, src, field, value, words):
    m = write_jsonl(src / "m.jsonl", [GOOD, dict(GOOD, image="b.png", **{field: value})])
    rejected(seeded, m, 2, *words)


@pytest.mark.trust
def test_whitespace_question_and_answer_is_not_an_unlabeled_image(seeded, src):
    m = write_jsonl(src / "m.jsonl", [GOOD, {"image": "b.png", "question": " ", "answer": "\t"}])
    rejected(seeded, m, 2, "question is empty or whitespace-only", "unlabeled image")


@pytest.mark.trust
def test_nul_in_a_csv_field_is_refused(seeded, src):
    m = src / "m.csv"
    m.write_bytes(b"image,question,answer,caption\na.png,Polyp?,yes,\nb.png,Polyp?,n\x00o,\n")
    rejected(seeded, m, 3, "answer holds a control character (U+0000)", file="m.csv")


@pytest.mark.trust
def test_control_character_in_a_caption_is_refused(seeded, src):
    m = write_jsonl(src / "m.jsonl", [GOOD, {"image": "b.png", "caption": "red\x07 polyp"}])
    rejected(seeded, m, 2, "caption holds a control character (U+0007)")


def test_text_rules_keep_tabs_newlines_and_strip_invisible_ends(db, src):
    m = src / "m.csv"
    m.write_bytes(b'image,question,answer\na.png,"\xe2\x80\x8bWhat is\r\nshown?",\ta polyp\t\n'
                  b'b.png,,\n')
    report = import_path(db, m, "p")
    assert (report.images_added, report.qa_added) == (2, 1)
    pair = qa_store.list_qa(db, 1)[0]
    assert (pair["question"], pair["answer"]) == ("What is\nshown?", "a polyp")


# --- I12 in the app: seed labeling and review edits follow the same rules --------------------

@pytest.fixture
def app_project(seeded):
    """Project 'p' with an expert and one pending pseudo pair on its image."""
    expert = users_store.add_user(seeded, "doc", "correct-horse", "expert")
    image_id = seeded.execute("SELECT id FROM images").fetchone()[0]
    pid = seeded.execute("SELECT id FROM projects").fetchone()[0]
    pending = qa_store.add_qa(seeded, project_id=pid, image_id=image_id, question="Size?",
                              answer="big", origin="pseudo", confidence=0.7, user="generator")
    return {"db": seeded, "user": expert, "pid": pid, "image": image_id, "pending": pending}


@pytest.mark.trust
@pytest.mark.parametrize("answer,words", [("\u200b\ufeff", "empty or whitespace-only"),
                                          ("n\x00o", "control character"),
                                          ("x" * (1 << 20), "over the limit of 10,000")])
def test_seed_labeling_refuses_what_import_refuses(app_project, answer, words):
    db, before = app_project["db"], dump(app_project["db"])
    with pytest.raises(ValueError, match=words):
        app_service.label_seed(db, app_project["user"], project_id=app_project["pid"],
                               image_id=app_project["image"], question="Polyp?", answer=answer)
    assert dump(db) == before


@pytest.mark.trust
@pytest.mark.parametrize("answer,words", [("\u200b", "empty or whitespace-only"),
                                          ("a\x7fb", "control character"),
                                          ("x" * (1 << 20), "over the limit of 10,000")])
def test_review_edit_refuses_what_import_refuses(app_project, answer, words):
    db, qa_id = app_project["db"], app_project["pending"]
    before = dump(db)
    version = qa_store.get_qa(db, qa_id)["version"]
    with pytest.raises(ValueError, match=words):
        app_service.decide(db, app_project["user"], qa_id, "edit", expected_version=version,
                           answer=answer)
    seed = qa_store.list_qa(db, app_project["pid"], origin="seed")[0]
    with pytest.raises(ValueError, match=words):
        app_service.edit_seed(db, app_project["user"], seed["id"],
                              expected_version=seed["version"], answer=answer)
    assert dump(db) == before


# --- I15: JSON nested too deeply -------------------------------------------------------------

def nested_manifest(src: Path) -> Path:
    return write_jsonl(src / "m.jsonl", [GOOD, "[" * 200_000 + "]" * 200_000])


@pytest.mark.trust
def test_deeply_nested_json_line_is_one_row_error(seeded, src):
    rejected(seeded, nested_manifest(src), 2, "nested too deeply")


@pytest.mark.trust
def test_deeply_nested_json_exits_2_without_traceback(tmp_path, src):
    home = tmp_path / "home"
    result = leaml(home, "import", str(nested_manifest(src)), "--project", "p")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines()[0].startswith("error: m.jsonl:2: JSON nested too deeply")


@pytest.mark.trust
def test_deeply_nested_json_upload_is_a_message_for_the_projects_page(app_project, src):
    db, before = app_project["db"], dump(app_project["db"])
    data = nested_manifest(src).read_bytes()
    with pytest.raises(ImportRejected) as info:
        app_service.import_upload(db, app_project["user"], "p", "m.jsonl", data)
    assert isinstance(info.value, ValueError)
    assert any(line.startswith("m.jsonl:2: JSON nested too deeply")
               for line in str(info.value).splitlines())
    assert dump(db) == before


def test_huge_integer_in_json_is_one_row_error(seeded, src):
    m = write_jsonl(src / "m.jsonl", [GOOD, '{"image": "b.png", "category": ' + "7" * 5000 + "}"])
    rejected(seeded, m, 2, "unreadable JSON")


# --- I16: parquet image.bytes of the wrong type ----------------------------------------------

def parquet_with_image_bytes(path: Path, value, arrow_type) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq
    image_type = pa.struct([("bytes", arrow_type), ("path", pa.string())])
    images = pa.array([{"bytes": value, "path": "a.png"}], type=image_type)
    pq.write_table(pa.table({"image": images, "question": ["Polyp?"], "answer": ["yes"]}), path)
    return path


@pytest.mark.trust
@pytest.mark.parametrize("value,kind", [("iVBORw0KGgo=", "string"), (12345, "int64")])
def test_parquet_image_bytes_of_the_wrong_type(seeded, tmp_path, value, kind):
    import pyarrow as pa
    p = parquet_with_image_bytes(tmp_path / "kv.parquet", value, getattr(pa, kind)())
    rejected(seeded, p, 1, "image.bytes is a", "not binary data", file="kv.parquet")
    result = leaml(tmp_path / "home2", "import", str(p), "--project", "p")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.splitlines()[0].startswith("error: kv.parquet:1: image.bytes is a")


# --- anything unexpected: one line naming the file, the details in a log -----------------------

@pytest.mark.trust
def test_unexpected_failure_while_storing_images_is_one_line_and_a_log(seeded, src):
    import hashlib
    sha = hashlib.sha256((src / "b.png").read_bytes()).hexdigest()
    (seeded.home / "images" / sha[:2]).write_text("a file where a folder of images belongs")
    m = write_jsonl(src / "m.jsonl", [GOOD, dict(GOOD, image="b.png")])
    before = dump(seeded)
    with pytest.raises(ImportFailed) as info:
        import_path(seeded, m, "p")
    message = str(info.value)
    assert "\n" not in message and message.startswith("m.jsonl: the import failed unexpectedly")
    assert "nothing was imported" in message and str(info.value.log_path) in message
    log = info.value.log_path.read_text()
    assert info.value.log_path == seeded.home / "logs" / "import-errors.log"
    assert "Traceback" in log and "m.jsonl" in log
    assert dump(seeded) == before


@pytest.mark.trust
def test_database_refusing_a_write_rolls_back_and_exits_1(tmp_path, src):
    from leaml.store import connect
    home = tmp_path / "home"
    db = connect(home)
    db.execute("CREATE TRIGGER no_qa BEFORE INSERT ON qa BEGIN"
               " SELECT RAISE(ABORT, 'qa is read-only here'); END")
    db.conn.commit()
    before = dump(db)
    m = write_jsonl(src / "m.jsonl", [GOOD])
    with pytest.raises(ImportFailed, match="IntegrityError: qa is read-only here"):
        import_path(db, m, "new")
    assert dump(db) == before and counts(db)["projects"] == 0
    result = leaml(home, "import", str(m), "--project", "new")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: m.jsonl: the import failed")
    assert dump(db) == before
    assert (home / "logs" / "import-errors.log").read_text().count("Traceback") == 2


@pytest.mark.trust
def test_upload_that_cannot_be_staged_is_one_line_for_the_projects_page(app_project, src,
                                                                        tmp_path):
    db = app_project["db"]
    before = dump(db)
    home = Path(db.home)
    home.rename(tmp_path / "moved")        # the data home moved away while the app runs,
    home.write_text("not a folder")         # and a file took its name
    data = write_jsonl(src / "m.jsonl", [GOOD]).read_bytes()
    with pytest.raises(ImportFailed) as info:
        app_service.import_upload(db, app_project["user"], "p", "m.jsonl", data)
    message = str(info.value)
    assert isinstance(info.value, ValueError) and "\n" not in message
    assert message.startswith("m.jsonl: the import failed unexpectedly (NotADirectoryError")
    assert "the error log could not be written either" in message
    assert dump(db) == before
