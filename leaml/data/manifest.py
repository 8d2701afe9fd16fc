"""Reading manifests into rows: the columns, the field rules, JSONL and CSV.

Nothing here touches the database. Every reader streams its input (line by line, batch by
batch) and turns each record into a :class:`Row` or a :class:`RowError` naming the file and
the row; the caller decides whether errors abort the import. Image paths are resolved against
the manifest's folder and must stay inside it (no ``..``, no absolute paths, no symlinks that
lead out).
"""
from __future__ import annotations

import csv
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from leaml.data.checks import human_bytes
from leaml.store.text import BlankText, clean_text, optional_text

COLUMNS = ("image", "question", "answer", "split", "category", "question_type", "caption",
           "confidence", "source")
# Kvasir-VQA's own columns: `source` is the data set an image came from (kvasir, hyperkvasir,
# ...), not its category, so it is only used on rows with a confidence (where it names what
# made the pseudo pair); `img_id` becomes the image's source name.
KVASIR_COLUMNS = ("source", "img_id")
SPLITS = ("train", "test")
MAX_LINE_BYTES = 1 << 20                 # one manifest line / CSV field
MAX_MANIFEST_BYTES = 2 << 30             # a manifest file
DEFAULT_PSEUDO_SOURCE = "import"         # qa.source of a pre-made pseudo pair without `source`


@dataclass(frozen=True)
class RowError:
    """One rejected row: the file (as the user knows it), the row or line (or None), and why."""
    file: str
    row: int | None
    message: str

    def __str__(self) -> str:
        where = self.file if self.row is None else f"{self.file}:{self.row}"
        return f"{where}: {self.message}"


@dataclass
class Row:
    """One valid record: an image file inside the source, and optionally a QA pair about it."""
    file: str
    row: int | None
    image: Path                      # resolved, inside the source folder (or the staging folder)
    image_name: str                  # as written in the source, for messages and source_name
    question: str | None = None
    answer: str | None = None
    split: str = "train"
    category: str | None = None
    question_type: str | None = None
    caption: str | None = None
    source_name: str | None = None
    confidence: float | None = None  # set: a pending pseudo pair made elsewhere
    source: str | None = None        # what made that pseudo pair


@dataclass
class Limits:
    """Size limits of one import (see leaml.data.ingest.import_path)."""
    max_pixels: int
    max_bytes: int
    max_manifest_bytes: int = MAX_MANIFEST_BYTES


@dataclass
class Parsed:
    """What a reader produced: valid rows, rejected rows, and notes (ignored columns ...)."""
    rows: list[Row] = field(default_factory=list)
    errors: list[RowError] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def extend(self, other: "Parsed") -> None:
        self.rows += other.rows
        self.errors += other.errors
        self.notes += other.notes


# --- fields -----------------------------------------------------------------------------------

def resolve_inside(root: Path, ref: str, what: str = "the manifest folder") -> Path:
    """``ref`` (relative, '/' or '\\' separated) resolved under ``root``; ValueError if it leaves."""
    norm = ref.strip().replace("\\", "/")
    if not norm:
        raise ValueError("image path is empty; give the image's path relative to the manifest")
    if norm.startswith("/") or re.match(r"^[A-Za-z]:", norm) or "\0" in norm:
        raise ValueError(f"image '{ref}' is an absolute path; give it relative to the manifest")
    if ".." in PurePosixPath(norm).parts:
        raise ValueError(f"image '{ref}' escapes {what}; keep images in {what} or below it")
    root = root.resolve()
    path = (root / norm).resolve()
    if not path.is_relative_to(root):
        raise ValueError(f"image '{ref}' is a symlink that points outside {what}; copy the"
                         " image into the folder instead")
    if not path.exists():
        raise ValueError(f"image '{ref}' not found (looked for {path}); check the path")
    return path


class Resolver:
    """resolve_inside for one root, remembering each path (a manifest names an image per QA
    pair, so the same path comes many times)."""

    def __init__(self, root: Path, what: str = "the manifest folder"):
        self.root, self.what, self._seen = root.resolve(), what, {}

    def __call__(self, ref: str) -> Path:
        if ref not in self._seen:
            try:
                self._seen[ref] = resolve_inside(self.root, ref, self.what)
            except ValueError as exc:
                self._seen[ref] = exc
        hit = self._seen[ref]
        if isinstance(hit, ValueError):
            raise ValueError(str(hit))
        return hit


def _text(rec: dict, key: str) -> str | None:
    """An optional text field (leaml.store.text's rules), None when absent or blank."""
    return optional_text(rec.get(key), key)


def _given(rec: dict, key: str) -> bool:
    """A field is given unless it is absent, null or empty (a CSV's empty cell)."""
    value = rec.get(key)
    return value is not None and not (isinstance(value, str) and value == "")


def _qa_text(rec: dict, key: str) -> str | None:
    """question or answer: None when not given; a given one must not be blank (I12: a row of
    whitespace is a mistake, not an unlabeled image)."""
    if not _given(rec, key):
        return None
    try:
        return clean_text(rec[key], key)
    except BlankText as exc:
        raise ValueError(f"{exc}, or leave both question and answer out for an unlabeled"
                         " image") from None


def _qa_fields(rec: dict) -> tuple[str | None, str | None]:
    """question and answer: both or neither, neither blank when given."""
    q, a = _qa_text(rec, "question"), _qa_text(rec, "answer")
    if q and not a:
        what = "missing" if rec.get("answer") is None else "empty"
        raise ValueError(f"question given but the answer is {what}; give both, or neither"
                         " for an unlabeled image")
    if a and not q:
        what = "missing" if rec.get("question") is None else "empty"
        raise ValueError(f"answer given but the question is {what}; give both, or neither"
                         " for an unlabeled image")
    return q, a


def _confidence(rec: dict) -> float | None:
    """The confidence of a pre-made pseudo pair, None when not given; a number in [0, 1]."""
    if not _given(rec, "confidence") or (isinstance(rec["confidence"], str)
                                         and not rec["confidence"].strip()):
        return None
    value = rec["confidence"]
    shown = repr(value)[:40]
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"confidence must be a number in [0, 1], not {type(value).__name__}")
    try:
        conf = float(value)
    except ValueError:
        raise ValueError(f"confidence {shown} is not a number; give the pair's probability as"
                         " a number from 0 to 1, or leave it empty for a labeled pair") from None
    if math.isnan(conf) or not 0.0 <= conf <= 1.0:
        raise ValueError(f"confidence {shown} is not in [0, 1]; give the pair's probability as"
                         " a number from 0 to 1")
    return conf


def _pseudo_fields(rec: dict, question: str | None,
                   split: str) -> tuple[float | None, str | None]:
    """confidence and source of a pre-made pseudo pair (both None on other rows)."""
    conf = _confidence(rec)
    if conf is None:
        return None, None
    if not question:
        raise ValueError("confidence given without a question and an answer; a pre-made pseudo"
                         " pair needs all three (or leave confidence empty)")
    if split == "test":
        raise ValueError("confidence given on a test row; test pairs are the evaluation's ground"
                         " truth, not pseudo pairs: remove the confidence or use split 'train'")
    return conf, _text(rec, "source") or DEFAULT_PSEUDO_SOURCE


def _split(rec: dict) -> str:
    value = _text(rec, "split")
    if value is None:
        return "train"
    if value.lower() not in SPLITS:
        raise ValueError(f"split '{value}' is invalid; use 'train' or 'test' (or leave it empty)")
    return value.lower()


def make_row(rec: dict, file: str, rowno: int | None, resolve: Resolver | None,
             image: Path | None = None, image_name: str | None = None) -> Row:
    """Validate one record (a dict of the manifest columns); ValueError says what is wrong."""
    if image is None:
        ref = rec.get("image")
        if ref is None:
            raise ValueError("no 'image' value; every row needs the image's relative path")
        if not isinstance(ref, str):
            raise ValueError(f"image must be a path, not {type(ref).__name__}")
        image, image_name = resolve(ref), ref
    question, answer = _qa_fields(rec)
    split = _split(rec)
    confidence, source = _pseudo_fields(rec, question, split)
    return Row(file, rowno, image, image_name or image.name, question, answer, split,
               _text(rec, "category"), _text(rec, "question_type"), _text(rec, "caption"),
               _text(rec, "img_id") or image_name, confidence, source)


def _add(parsed: Parsed, rec: dict, file: str, rowno: int, resolve: Resolver) -> None:
    try:
        parsed.rows.append(make_row(rec, file, rowno, resolve))
    except ValueError as exc:
        parsed.errors.append(RowError(file, rowno, str(exc)))


def note_unknown(parsed: Parsed, file: str, columns: set[str]) -> None:
    unknown = sorted(columns - set(COLUMNS) - set(KVASIR_COLUMNS))
    if unknown:
        parsed.notes.append(f"{file}: ignored unknown column(s) {', '.join(unknown)}"
                            f" (known: {', '.join(COLUMNS)})")


def _check_size(path: Path, label: str, limit: int) -> RowError | None:
    size = path.stat().st_size
    if size > limit:
        return RowError(label, None, f"is {human_bytes(size)}, over the limit of"
                        f" {human_bytes(limit)} for one file; split it into several imports")
    return None


# --- JSONL ------------------------------------------------------------------------------------

def _lines(f: io.BufferedReader, max_len: int):
    """(line number, bytes or None when longer than max_len), never holding a long line."""
    lineno = 0
    while True:
        line = f.readline(max_len + 1)
        if not line:
            return
        lineno += 1
        if len(line) > max_len and not line.endswith(b"\n"):
            while line and not line.endswith(b"\n"):   # skip the rest of the long line
                line = f.readline(max_len + 1)
            yield lineno, None
        else:
            yield lineno, line


def read_jsonl(path: Path, label: str, limits: Limits) -> Parsed:
    """Rows of a JSONL manifest: one JSON object per line, blank lines skipped."""
    parsed, columns = Parsed(), set()
    if err := _check_size(path, label, limits.max_manifest_bytes):
        parsed.errors.append(err)
        return parsed
    resolve = Resolver(path.parent)
    with open(path, "rb") as f:
        for lineno, raw in _lines(f, MAX_LINE_BYTES):
            if raw is None:
                parsed.errors.append(RowError(label, lineno, f"line is longer than"
                                              f" {MAX_LINE_BYTES} bytes; is this a manifest?"))
                continue
            rec = _json_record(raw, lineno, label, parsed)
            if rec is not None:
                columns |= rec.keys()
                _add(parsed, rec, label, lineno, resolve)
    note_unknown(parsed, label, columns)
    return parsed


def _json_record(raw: bytes, lineno: int, label: str, parsed: Parsed) -> dict | None:
    try:
        text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8").strip()
    except UnicodeDecodeError:
        parsed.errors.append(RowError(label, lineno, "line is not UTF-8 text"))
        return None
    if not text:
        return None
    try:
        rec = json.loads(text)
    except json.JSONDecodeError as exc:
        parsed.errors.append(RowError(label, lineno, f"malformed JSON ({exc.msg} at column"
                                      f" {exc.colno}); each line must be one JSON object"))
        return None
    except RecursionError:   # e.g. 200,000 nested brackets: the decoder recurses per level
        parsed.errors.append(RowError(label, lineno, "JSON nested too deeply; each line must be"
                                      " one flat object like {\"image\": \"a.png\"}"))
        return None
    except ValueError as exc:   # e.g. an integer of over 4,300 digits
        reason = str(exc).splitlines()[0][:120]
        parsed.errors.append(RowError(label, lineno, f"unreadable JSON ({reason}); each line"
                                      " must be one JSON object"))
        return None
    if not isinstance(rec, dict):
        parsed.errors.append(RowError(label, lineno, f"line is a JSON {type(rec).__name__},"
                                      " not an object like {\"image\": \"a.png\"}"))
        return None
    return rec


# --- CSV --------------------------------------------------------------------------------------

def read_csv(path: Path, label: str, limits: Limits) -> Parsed:
    """Rows of a CSV manifest whose first line names the columns (``image`` required)."""
    parsed = Parsed()
    if err := _check_size(path, label, limits.max_manifest_bytes):
        parsed.errors.append(err)
        return parsed
    csv.field_size_limit(MAX_LINE_BYTES)
    with open(path, "rb") as f:
        reader = csv.reader(_text_lines(f, label, parsed))
        header = _csv_header(reader, label, parsed)
        if header is None:
            return parsed
        note_unknown(parsed, label, set(header))
        _csv_rows(reader, header, Resolver(path.parent), label, parsed)
    parsed.errors.sort(key=lambda e: e.row or 0)
    return parsed


def _text_lines(f: io.BufferedReader, label: str, parsed: Parsed):
    """Decoded lines for csv.reader; a line that is too long or not UTF-8 becomes an error
    naming its line number and an empty line (which the reader skips)."""
    for lineno, raw in _lines(f, MAX_LINE_BYTES):
        try:
            if raw is None:
                raise ValueError(f"line is longer than {MAX_LINE_BYTES} bytes")
            yield raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except ValueError as exc:   # UnicodeDecodeError is a ValueError
            reason = "line is not UTF-8 text; save the CSV as UTF-8" \
                if isinstance(exc, UnicodeDecodeError) else str(exc)
            parsed.errors.append(RowError(label, lineno, reason))
            yield "\n"


def _csv_header(reader, label: str, parsed: Parsed) -> list[str] | None:
    try:
        header = [h.strip() for h in next(reader, [])]
    except csv.Error as exc:
        parsed.errors.append(RowError(label, 1, f"unreadable CSV header ({exc})"))
        return None
    expected = ",".join(COLUMNS)
    if "image" not in header:
        found = ",".join(header) if header else "nothing"
        parsed.errors.append(RowError(label, 1, f"CSV header has no 'image' column (found:"
                                      f" {found[:200]}); the first line must name the columns,"
                                      f" e.g. {expected}"))
        return None
    dupes = sorted({h for h in header if header.count(h) > 1})
    if dupes:
        parsed.errors.append(RowError(label, 1, f"CSV header repeats column(s) {', '.join(dupes)}"
                                      "; name each column once"))
        return None
    return header


def _csv_rows(reader, header: list[str], resolve: Resolver, label: str, parsed: Parsed) -> None:
    lineno = reader.line_num
    while True:
        start = lineno + 1
        try:
            values = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            lineno = reader.line_num
            parsed.errors.append(RowError(label, start, f"unreadable CSV row ({exc})"))
            continue
        lineno = reader.line_num
        if not any(v.strip() for v in values):
            continue
        if len(values) > len(header):
            parsed.errors.append(RowError(label, start, f"row has {len(values)} fields but the"
                                          f" header names {len(header)}; quote fields that"
                                          " contain commas"))
            continue
        _add(parsed, dict(zip(header, values)), label, start, resolve)
