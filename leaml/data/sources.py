"""Import sources other than manifests: Kvasir-VQA parquet, image folders, zips, and the
dispatch that decides what a path is.

A ``.jsonl``/``.csv`` file is a manifest, a ``.parquet`` file a Kvasir-VQA file, a ``.zip``
is extracted (every entry name checked first) and read as a folder. A folder with one
``.jsonl``/``.csv`` (or ``manifest.*``) at its top is that manifest; one with ``.parquet``
files at its top is those files; any other folder is a folder of unlabeled images.
"""
from __future__ import annotations

import hashlib
import os
import stat
import zipfile
from pathlib import Path, PurePosixPath

from leaml.data.checks import IMAGE_SUFFIXES, human_bytes
from leaml.data.manifest import (COLUMNS, KVASIR_COLUMNS, Limits, Parsed, Resolver, RowError,
                               make_row, note_unknown, read_csv, read_jsonl, resolve_inside)

__all__ = ["read_source", "read_parquet", "read_folder", "extract_zip"]

PARQUET_BATCH = 64             # parquet rows in memory at once
MAX_ZIP_BYTES = 8 << 30        # everything a zip may expand to
MAX_ZIP_ENTRIES = 1_000_000

# --- sources ----------------------------------------------------------------------------------

def read_source(path: Path, tmp: Path, limits: Limits, label: str) -> Parsed:
    """Rows of any supported source; ``tmp`` holds extracted zips and staged parquet images."""
    suffix = path.suffix.lower()
    if path.is_dir():
        return _read_dir(path, tmp, limits, label)
    if suffix in (".jsonl", ".ndjson"):
        return read_jsonl(path, label, limits)
    if suffix == ".csv":
        return read_csv(path, label, limits)
    if suffix == ".parquet":
        return read_parquet(path, label, limits, _staging(tmp))
    if suffix == ".zip":
        dest = tmp / "zip"
        parsed = Parsed(errors=extract_zip(path, dest, label))
        parsed.extend(_read_dir(_unwrap(dest), tmp, limits, label))
        return parsed
    raise ValueError(f"{label}: cannot import a '{suffix or 'extensionless'}' file; give a"
                     " .jsonl or .csv manifest, a .parquet file, a folder or a .zip")


def _staging(tmp: Path) -> Path:
    staging = tmp / "staged"
    staging.mkdir(exist_ok=True)
    return staging


def _read_dir(folder: Path, tmp: Path, limits: Limits, label: str) -> Parsed:
    """A folder: its manifest if it has one at its top, else its parquet files, else images."""
    top = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    manifests = [p for p in top if p.suffix.lower() in (".jsonl", ".ndjson", ".csv")]
    if len(manifests) > 1:
        manifests = [p for p in manifests if p.stem == "manifest"] or manifests
    if len(manifests) > 1:
        names = ", ".join(p.name for p in manifests)
        raise ValueError(f"{label}: holds several manifests ({names}); import them one by one"
                         " or name the one to use manifest.jsonl")
    if manifests:
        return read_source(manifests[0], tmp, limits, f"{label}/{manifests[0].name}")
    parsed = Parsed()
    for pq_file in (p for p in top if p.suffix.lower() == ".parquet"):
        parsed.extend(read_parquet(pq_file, f"{label}/{pq_file.name}", limits, _staging(tmp)))
    return parsed if parsed.rows or parsed.errors else read_folder(folder, label)


def _unwrap(dest: Path) -> Path:
    """A zip of one folder is that folder (what zipping a folder in a file manager gives)."""
    if not dest.exists():
        dest.mkdir(parents=True)
    entries = [p for p in dest.iterdir() if p.name != "__MACOSX"]
    return entries[0] if len(entries) == 1 and entries[0].is_dir() else dest


def _zip_name_problem(info: zipfile.ZipInfo) -> str | None:
    name = info.filename.replace("\\", "/")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":") or "\0" in name:
        return "is an absolute path"
    if ".." in PurePosixPath(name).parts:
        return "escapes the archive folder (holds '..')"
    if stat.S_ISLNK(info.external_attr >> 16):
        return "is a symbolic link"
    return None


def extract_zip(path: Path, dest: Path, label: str) -> list[RowError]:
    """Extract the safe entries of a zip into ``dest``; one RowError per refused entry.

    Entry names are checked before anything is written (no absolute paths, no '..', no
    symlinks); sizes are counted while copying, so a lying header cannot fill the disk.
    """
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        return [RowError(label, None, f"is not a readable zip archive ({exc})")]
    errors, budget = [], MAX_ZIP_BYTES
    with zf:
        infos = zf.infolist()
        if len(infos) > MAX_ZIP_ENTRIES:
            return [RowError(label, None, f"holds {len(infos)} entries, over the limit of"
                             f" {MAX_ZIP_ENTRIES}; split it")]
        safe = []
        for n, info in enumerate(infos, 1):
            problem = _zip_name_problem(info)
            if problem:
                errors.append(RowError(label, n, f"entry '{info.filename}' {problem}; zip the"
                                       " folder itself, with relative paths only"))
            elif not info.is_dir() and not info.filename.startswith("__MACOSX/"):
                safe.append((n, info))
        dest.mkdir(parents=True, exist_ok=True)
        for n, info in safe:
            try:
                budget -= _copy_entry(zf, info, dest, budget)
            except _TooBig:
                errors.append(RowError(label, n, f"entry '{info.filename}': the archive expands"
                                       f" to more than {human_bytes(MAX_ZIP_BYTES)}; split it"))
                break   # nothing after this entry is extracted: the budget is spent
            except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
                errors.append(RowError(label, n, f"entry '{info.filename}' is unreadable ({exc})"))
    return errors


class _TooBig(Exception):
    """A zip entry went past what the whole archive may expand to."""


def _copy_entry(zf: zipfile.ZipFile, info: zipfile.ZipInfo, dest: Path, budget: int) -> int:
    target = dest / info.filename.replace("\\", "/")
    target.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with zf.open(info) as src, open(target, "wb") as out:
        while chunk := src.read(1 << 20):
            written += len(chunk)
            if written > budget:
                raise _TooBig()
            out.write(chunk)
    return written


# --- parquet (Kvasir-VQA's Hugging Face schema) ------------------------------------------------

def read_parquet(path: Path, label: str, limits: Limits, staging: Path) -> Parsed:
    """Rows of a parquet file with Kvasir-VQA's columns; inline images go to ``staging``.

    ``image`` is a struct {bytes, path} (or binary, or a relative path string). Kvasir-VQA
    has no split or category: every row is ``train`` with no category unless the file has
    ``split``/``category`` columns (our exports do). ``source`` is ignored; ``img_id`` names
    the image.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    parsed = Parsed()
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        parsed.errors.append(RowError(label, None, f"is not a readable parquet file ({exc})"))
        return parsed
    names = pf.schema_arrow.names
    if "image" not in names:
        parsed.errors.append(RowError(label, None, f"has no 'image' column (found: "
                                      f"{', '.join(names)}); Kvasir-VQA files have image,"
                                      " source, question, answer, img_id"))
        return parsed
    note_unknown(parsed, label, set(names))
    columns = [c for c in names if c in COLUMNS or c in KVASIR_COLUMNS]
    rowno, resolve = 0, Resolver(path.parent, "the parquet file's folder")
    try:
        for batch in pf.iter_batches(batch_size=PARQUET_BATCH, columns=columns):
            for rec in batch.to_pylist():
                rowno += 1
                _parquet_row(rec, rowno, resolve, label, limits, staging, parsed)
    except (pa.ArrowException, OSError) as exc:
        parsed.errors.append(RowError(label, rowno + 1, f"unreadable parquet data ({exc})"))
    return parsed


def _parquet_row(rec: dict, rowno: int, resolve: Resolver, label: str, limits: Limits,
                 staging: Path, parsed: Parsed) -> None:
    try:
        image, name = _parquet_image(rec.get("image"), resolve, limits, staging)
        parsed.rows.append(make_row(rec, label, rowno, resolve, image, name))
    except ValueError as exc:
        parsed.errors.append(RowError(label, rowno, str(exc)))


def _parquet_image(value, resolve: Resolver, limits: Limits,
                   staging: Path) -> tuple[Path, str]:
    """The image of one parquet row as a file: staged bytes, or a path next to the file."""
    data, ref = None, None
    if isinstance(value, dict):
        data, ref = value.get("bytes"), value.get("path")
    elif isinstance(value, (bytes, bytearray)):
        data = value
    elif isinstance(value, str):
        ref = value
    elif value is not None:
        raise ValueError(f"image is a {type(value).__name__}; it must be a struct {{bytes, path}},"
                         " binary image data or a path relative to the parquet file")
    _check_parquet_image_types(data, ref)
    if data:
        if len(data) > limits.max_bytes:
            raise ValueError(f"image is {human_bytes(len(data))}, over the limit of"
                             f" {human_bytes(limits.max_bytes)} per image")
        sha = hashlib.sha256(data).hexdigest()
        staged = staging / sha
        if not staged.exists():
            staged.write_bytes(data)
        return staged, PurePosixPath(ref).name if ref else sha[:16]
    if ref:
        return resolve(ref), ref
    raise ValueError("image has neither bytes nor a path; every row needs an image")


def _check_parquet_image_types(data, ref) -> None:
    """image.bytes must be binary and image.path text (a string or an int there is a file
    written by a tool that mislabelled its columns)."""
    if data is not None and not isinstance(data, (bytes, bytearray)):
        raise ValueError(f"image.bytes is a {type(data).__name__}, not binary data; write the"
                         " encoded image file (PNG, JPEG ...) into image.bytes")
    if ref is not None and not isinstance(ref, str):
        raise ValueError(f"image.path is a {type(ref).__name__}, not text; give the image's file"
                         " name or its path relative to the parquet file")


# --- folders ----------------------------------------------------------------------------------

def read_folder(root: Path, label: str) -> Parsed:
    """Every image file under ``root`` (recursive, sorted, hidden files skipped), unlabeled."""
    parsed, skipped = Parsed(), 0
    root = root.resolve()
    for rel in _walk(root):
        if PurePosixPath(rel).suffix.lower() not in IMAGE_SUFFIXES:
            skipped += 1
            continue
        name = f"{label}/{rel}" if label else rel
        try:
            image = resolve_inside(root, rel, "the imported folder")
            parsed.rows.append(make_row({}, name, None, None, image, rel))
        except ValueError as exc:
            parsed.errors.append(RowError(name, None, str(exc)))
    if skipped:
        parsed.notes.append(f"{label or root.name}: ignored {skipped} file(s) that are not"
                            f" images by name ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return parsed


def _walk(root: Path) -> list[str]:
    """Relative posix paths of the files under root; symlinked folders are not followed."""
    out = []
    for folder, dirs, files in os.walk(root, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel = Path(folder).relative_to(root)
        out += [(rel / f).as_posix() for f in files if not f.startswith(".")]
    return sorted(out)
