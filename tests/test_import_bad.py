"""Bad input to import: each case names the file and row, raises, and changes nothing stored.

Every test starts from a database that already holds a project with data (so "unchanged"
means something), runs one bad import, and compares a dump of every table plus the event
count before and after.
"""
from __future__ import annotations

import io
import json
import os
import struct
import zipfile
import zlib
from pathlib import Path

import pytest
from PIL import Image

from leaml.data.ingest import ImportRejected, import_path
from leaml.store import StoreError


def png_bytes(color=(200, 30, 30), size=(16, 12)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(color=(10, 120, 200), size=(64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def dump(db) -> dict:
    """Every row of every table (sorted), plus the events count: the whole stored state."""
    tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'"
                                       " AND name NOT LIKE 'sqlite_%' ORDER BY name")]
    out = {t: sorted(map(repr, db.execute(f"SELECT * FROM [{t}]").fetchall())) for t in tables}
    out["#events"] = db.execute("SELECT COUNT(*) FROM events").fetchone()[0]
    return out


def write_jsonl(path: Path, rows: list) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def src(tmp_path: Path) -> Path:
    """A manifest folder with two good images."""
    folder = tmp_path / "src"
    (folder / "images").mkdir(parents=True)
    (folder / "images" / "a.png").write_bytes(png_bytes((200, 30, 30)))
    (folder / "images" / "b.jpg").write_bytes(jpeg_bytes())
    return folder


@pytest.fixture
def seeded(db, tmp_path: Path):
    """The database with a project 'p' holding one image and one QA pair already."""
    folder = tmp_path / "seed"
    folder.mkdir()
    (folder / "s.png").write_bytes(png_bytes((1, 2, 3)))
    write_jsonl(folder / "m.jsonl", [{"image": "s.png", "question": "q?", "answer": "a"}])
    import_path(db, folder / "m.jsonl", "p")
    return db


GOOD = {"image": "images/a.png", "question": "What is shown?", "answer": "a polyp"}


def assert_rejected(db, path, file: str, row, *words, **kw):
    """Import must raise ImportRejected naming file:row and the words, and store nothing."""
    before = dump(db)
    with pytest.raises(ImportRejected) as info:
        import_path(db, path, kw.pop("project", "p"), **kw)
    errors = info.value.report.errors
    assert any(e.file == file and e.row == row for e in errors), errors
    line = next(str(e) for e in errors if e.file == file and e.row == row)
    where = file if row is None else f"{file}:{row}"
    assert line.startswith(where + ": ")
    for word in words:
        assert word in line, line
    assert isinstance(info.value, StoreError) and isinstance(info.value, ValueError)
    assert str(info.value).splitlines() == [str(e) for e in errors]
    assert dump(db) == before
    return errors


def test_corrupt_png_bytes(seeded, src):
    data = bytearray(png_bytes())
    data[40:60] = b"\x00" * 20  # inside IHDR/IDAT: CRC and zlib both break
    (src / "images" / "bad.png").write_bytes(bytes(data))
    m = write_jsonl(src / "m.jsonl", [GOOD, {"image": "images/bad.png"}])
    assert_rejected(seeded, m, "m.jsonl", 2, "images/bad.png", "not a readable image")


def test_corrupt_png_pixel_data(seeded, src):
    noise = Image.frombytes("RGB", (64, 64), os.urandom(64 * 64 * 3))
    buf = io.BytesIO()
    noise.save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    mid = len(data) // 2
    data[mid:mid + 64] = bytes(64)   # inside IDAT: header still identifies, pixels do not decode
    (src / "images" / "bad.png").write_bytes(bytes(data))
    m = write_jsonl(src / "m.jsonl", [GOOD, {"image": "images/bad.png"}])
    assert_rejected(seeded, m, "m.jsonl", 2, "images/bad.png", "not a readable image")


def test_truncated_jpeg(seeded, src):
    (src / "images" / "cut.jpg").write_bytes(jpeg_bytes(size=(256, 256))[:600])
    m = write_jsonl(src / "m.jsonl", [GOOD, {"image": "images/cut.jpg"}])
    assert_rejected(seeded, m, "m.jsonl", 2, "images/cut.jpg", "not a readable image")


def test_text_file_named_png(seeded, src):
    (src / "images" / "notes.png").write_text("just some text, not an image\n")
    m = write_jsonl(src / "m.jsonl", [{"image": "images/notes.png"}, GOOD])
    assert_rejected(seeded, m, "m.jsonl", 1, "images/notes.png", "not a readable image")


def test_empty_file(seeded, src):
    (src / "images" / "empty.png").write_bytes(b"")
    m = write_jsonl(src / "m.jsonl", [GOOD, {"image": "images/empty.png"}])
    assert_rejected(seeded, m, "m.jsonl", 2, "empty")


def bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height (IHDR patched, CRC recomputed)."""
    data = bytearray(png_bytes(size=(8, 8)))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    return bytes(data)


def test_decompression_bomb_header(seeded, src):
    (src / "images" / "bomb.png").write_bytes(bomb_png(50_000, 50_000))
    m = write_jsonl(src / "m.jsonl", [GOOD, {"image": "images/bomb.png"}])
    assert_rejected(seeded, m, "m.jsonl", 2, "images/bomb.png", "pixels")


def test_pixel_limit_parameter(seeded, src):
    (src / "images" / "big.png").write_bytes(png_bytes(size=(300, 200)))   # 60,000 pixels
    m = write_jsonl(src / "m.jsonl", [GOOD, {"image": "images/big.png"}])
    assert_rejected(seeded, m, "m.jsonl", 2, "300x200", "limit", max_pixels=50_000)


def test_byte_limit_parameter(seeded, src):
    m = write_jsonl(src / "m.jsonl", [{"image": "images/b.jpg"}])
    assert_rejected(seeded, m, "m.jsonl", 1, "images/b.jpg", "over the limit of 100 bytes",
                    max_bytes=100)


def test_dotdot_path(seeded, src):
    m = write_jsonl(src / "m.jsonl", [GOOD, {"image": "../../etc/passwd"}])
    assert_rejected(seeded, m, "m.jsonl", 2, "'../../etc/passwd' escapes the manifest folder")


def test_absolute_path(seeded, src):
    m = write_jsonl(src / "m.jsonl", [GOOD, {"image": str(src / "images" / "a.png")}])
    assert_rejected(seeded, m, "m.jsonl", 2, "absolute path")


def test_symlink_pointing_out(seeded, src, tmp_path):
    outside = tmp_path / "outside.png"
    outside.write_bytes(png_bytes((9, 9, 9)))
    os.symlink(outside, src / "images" / "link.png")
    m = write_jsonl(src / "m.jsonl", [GOOD, {"image": "images/link.png"}])
    assert_rejected(seeded, m, "m.jsonl", 2, "symlink", "outside")


def test_symlink_in_folder_import(seeded, src, tmp_path):
    outside = tmp_path / "outside.png"
    outside.write_bytes(png_bytes((9, 9, 9)))
    os.symlink(outside, src / "images" / "link.png")
    assert_rejected(seeded, src / "images", "images/link.png", None, "symlink",
                    "outside the imported folder")


def test_missing_image_file(seeded, src):
    m = write_jsonl(src / "m.jsonl", [GOOD, {"image": "images/nope.png"}])
    assert_rejected(seeded, m, "m.jsonl", 2, "not found")


def make_zip(path: Path, entries: dict) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return path


def test_zip_entry_escaping(seeded, tmp_path):
    z = make_zip(tmp_path / "up.zip", {"ok.png": png_bytes(), "../evil.png": png_bytes((5, 5, 5))})
    errors = assert_rejected(seeded, z, "up.zip", 2, "'../evil.png'", "escapes")
    assert not (tmp_path / "evil.png").exists()


def test_zip_entry_absolute(seeded, tmp_path):
    z = make_zip(tmp_path / "abs.zip", {"/tmp/abs-evil.png": png_bytes((6, 6, 6))})
    assert_rejected(seeded, z, "abs.zip", 1, "absolute")


def test_zip_symlink_entry(seeded, tmp_path):
    z = tmp_path / "link.zip"
    with zipfile.ZipFile(z, "w") as zf:
        info = zipfile.ZipInfo("link.png")
        info.external_attr = (0o120777 << 16)
        zf.writestr(info, "/etc/passwd")
        zf.writestr("ok.png", png_bytes())
    assert_rejected(seeded, z, "link.zip", 1, "symbolic link")


def test_zip_with_bad_manifest_row(seeded, tmp_path):
    rows = [{"image": "a.png", "question": "q", "answer": "a"}, {"image": "../x.png"}]
    z = make_zip(tmp_path / "m.zip", {"a.png": png_bytes(),
                                      "manifest.jsonl": "\n".join(map(json.dumps, rows))})
    assert_rejected(seeded, z, "m.zip/manifest.jsonl", 2, "escapes")


def test_not_a_zip(seeded, tmp_path):
    z = tmp_path / "fake.zip"
    z.write_text("hello")
    assert_rejected(seeded, z, "fake.zip", None, "not a readable zip")


def test_missing_image_column_jsonl(seeded, src):
    m = write_jsonl(src / "m.jsonl", [GOOD, {"picture": "images/a.png", "question": "q",
                                             "answer": "a"}])
    assert_rejected(seeded, m, "m.jsonl", 2, "no 'image'")


def test_question_without_answer(seeded, src):
    m = write_jsonl(src / "m.jsonl", [GOOD, {"image": "images/b.jpg", "question": "Size?"}])
    assert_rejected(seeded, m, "m.jsonl", 2, "answer is missing")


def test_answer_without_question(seeded, src):
    m = write_jsonl(src / "m.jsonl", [{"image": "images/b.jpg", "answer": "yes"}, GOOD])
    assert_rejected(seeded, m, "m.jsonl", 1, "question is missing")


def test_whitespace_only_answer(seeded, src):
    m = write_jsonl(src / "m.jsonl", [GOOD, {"image": "images/b.jpg", "question": "Size?",
                                             "answer": "  \t "}])
    assert_rejected(seeded, m, "m.jsonl", 2, "whitespace-only")


def test_non_text_answer(seeded, src):
    m = write_jsonl(src / "m.jsonl", [{"image": "images/b.jpg", "question": "Q?",
                                       "answer": ["a", "b"]}])
    assert_rejected(seeded, m, "m.jsonl", 1, "answer must be text")


def test_bad_split(seeded, src):
    m = write_jsonl(src / "m.jsonl", [GOOD, dict(GOOD, image="images/b.jpg", split="val")])
    assert_rejected(seeded, m, "m.jsonl", 2, "split 'val'", "'train' or 'test'")


def test_conflicting_split_in_file(seeded, src):
    m = write_jsonl(src / "m.jsonl", [GOOD, dict(GOOD, question="Other?", split="test")])
    assert_rejected(seeded, m, "m.jsonl", 2, "one split")


def test_conflicting_split_with_project(seeded, src, tmp_path):
    (src / "images" / "s.png").write_bytes(png_bytes((1, 2, 3)))  # in 'p' as train already
    m = write_jsonl(src / "m.jsonl", [{"image": "images/s.png", "split": "test"}])
    assert_rejected(seeded, m, "m.jsonl", 1, "already in project 'p'")


def test_malformed_json_line(seeded, src):
    m = write_jsonl(src / "m.jsonl", [GOOD, '{"image": "images/b.jpg", "question": "q"', GOOD])
    assert_rejected(seeded, m, "m.jsonl", 2, "malformed JSON")


def test_json_line_not_an_object(seeded, src):
    m = write_jsonl(src / "m.jsonl", [GOOD, '["images/b.jpg"]'])
    assert_rejected(seeded, m, "m.jsonl", 2, "not an object")


def test_overlong_line(seeded, src):
    m = write_jsonl(src / "m.jsonl", [GOOD, json.dumps({"image": "x" * (2 << 20)}), GOOD])
    assert_rejected(seeded, m, "m.jsonl", 2, "longer than")


def test_csv_wrong_header(seeded, src):
    m = src / "m.csv"
    m.write_text("file,question,answer\nimages/a.png,q,a\n")
    assert_rejected(seeded, m, "m.csv", 1, "no 'image' column", "file,question,answer")


def test_csv_duplicate_header(seeded, src):
    m = src / "m.csv"
    m.write_text("image,question,question\nimages/a.png,q,a\n")
    assert_rejected(seeded, m, "m.csv", 1, "repeats")


def test_csv_too_many_fields(seeded, src):
    m = src / "m.csv"
    m.write_text("image,question,answer\nimages/a.png,q,a\nimages/b.jpg,What, size?,big\n")
    assert_rejected(seeded, m, "m.csv", 3, "quote fields")


def test_csv_bad_row(seeded, src):
    m = src / "m.csv"
    m.write_text("image,question,answer\nimages/a.png,q,a\nimages/b.jpg,q,\n")
    assert_rejected(seeded, m, "m.csv", 3, "answer is empty")


def test_parquet_missing_image_column(seeded, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    p = tmp_path / "kv.parquet"
    pq.write_table(pa.table({"question": ["q"], "answer": ["a"]}), p)
    assert_rejected(seeded, p, "kv.parquet", None, "no 'image' column")


def test_parquet_bad_image_bytes(seeded, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    p = tmp_path / "kv.parquet"
    image = [{"bytes": png_bytes(), "path": "a.png"}, {"bytes": b"not an image", "path": "b.png"}]
    pq.write_table(pa.table({"image": image, "question": ["q", "q"], "answer": ["a", "a"]}), p)
    assert_rejected(seeded, p, "kv.parquet", 2, "image 'b.png'", "not a readable image")


def test_not_a_parquet_file(seeded, tmp_path):
    p = tmp_path / "kv.parquet"
    p.write_bytes(b"PAR1 garbage")
    assert_rejected(seeded, p, "kv.parquet", None, "not a readable parquet")


def test_all_errors_reported_at_once(seeded, src):
    m = write_jsonl(src / "m.jsonl", [{"image": "../a.png"}, GOOD, {"image": "images/b.jpg",
                                      "split": "dev"}, "{oops"])
    errors = assert_rejected(seeded, m, "m.jsonl", 1, "escapes")
    assert [e.row for e in errors] == [1, 3, 4]


def test_unknown_suffix_and_missing_path(db, tmp_path):
    (tmp_path / "x.txt").write_text("hi")
    before = dump(db)
    with pytest.raises(ValueError, match="x.txt"):
        import_path(db, tmp_path / "x.txt", "p")
    with pytest.raises(FileNotFoundError):
        import_path(db, tmp_path / "missing.jsonl", "p")
    assert dump(db) == before


def test_bad_project_name_changes_nothing(seeded, src):
    m = write_jsonl(src / "m.jsonl", [GOOD])
    before = dump(seeded)
    with pytest.raises(ValueError, match="project name"):
        import_path(seeded, m, "../bad name")
    assert dump(seeded) == before


def test_skip_invalid_imports_the_rest(seeded, src):
    m = write_jsonl(src / "m.jsonl", [GOOD, {"image": "../../etc/passwd"},
                                      {"image": "images/b.jpg", "question": "q"}])
    report = import_path(seeded, m, "p", skip_invalid=True)
    assert (report.images_added, report.qa_added) == (1, 1)
    assert [str(e).split(": ")[0] for e in report.errors] == ["m.jsonl:2", "m.jsonl:3"]
    ev = seeded.execute("SELECT after FROM events WHERE action = 'import' ORDER BY id DESC"
                        " LIMIT 1").fetchone()[0]
    assert json.loads(ev)["rejected"] == 2


def test_zip_bomb_entry(seeded, tmp_path, monkeypatch):
    import leaml.data.sources
    monkeypatch.setattr(leaml.data.sources, "MAX_ZIP_BYTES", 1 << 20)
    z = tmp_path / "bomb.zip"
    with zipfile.ZipFile(z, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a.png", png_bytes())
        zf.writestr("zeros.png", bytes(4 << 20))   # 4 MB of zeros: a few kB compressed
    assert_rejected(seeded, z, "bomb.zip", 2, "'zeros.png'", "expands to more than")


def test_parquet_image_path_escaping(seeded, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    (tmp_path / "kv").mkdir()
    (tmp_path / "kv" / "a.png").write_bytes(png_bytes())
    p = tmp_path / "kv" / "kv.parquet"
    image = [{"bytes": None, "path": "a.png"}, {"bytes": None, "path": "../../etc/passwd"}]
    pq.write_table(pa.table({"image": image, "question": ["q", "q"], "answer": ["a", "b"]}), p)
    assert_rejected(seeded, p, "kv.parquet", 2, "escapes the parquet file's folder")


def test_parquet_question_without_answer(seeded, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    p = tmp_path / "kv.parquet"
    pq.write_table(pa.table({"image": [{"bytes": png_bytes(), "path": "a.png"}],
                             "question": ["Polyp?"], "answer": [" "]}), p)
    assert_rejected(seeded, p, "kv.parquet", 1, "answer is empty")


def test_csv_not_utf8(seeded, src):
    m = src / "m.csv"
    m.write_bytes(b"image,question,answer\nimages/a.png,q,a\nimages/b.jpg,caf\xe9?,a\n")
    assert_rejected(seeded, m, "m.csv", 3, "not UTF-8")


def test_folder_with_several_manifests(seeded, src):
    write_jsonl(src / "one.jsonl", [GOOD])
    write_jsonl(src / "two.jsonl", [GOOD])
    before = dump(seeded)
    with pytest.raises(ValueError, match="several manifests"):
        import_path(seeded, src, "p")
    assert dump(seeded) == before


def test_empty_sources(seeded, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty.jsonl").write_text("\n\n")
    before = dump(seeded)
    for path in (tmp_path / "empty", tmp_path / "empty.jsonl"):
        with pytest.raises(ValueError, match="found nothing to import"):
            import_path(seeded, path, "p")
    assert dump(seeded) == before


def test_skip_invalid_with_nothing_valid_writes_nothing(seeded, src):
    m = write_jsonl(src / "m.jsonl", [{"image": "../x.png"}])
    before = dump(seeded)
    report = import_path(seeded, m, "new", skip_invalid=True)
    assert report.rejected == 1 and report.images_added == 0
    assert dump(seeded) == before
