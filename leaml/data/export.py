"""Export: a project's curated QA as a manifest + images, and as Kvasir-VQA-style parquet.

What leaves the project: seed pairs, pseudo pairs a person accepted or edited, and with
``with_test`` the test pairs; pending and rejected pairs never. The output folder gets
``manifest.jsonl`` + ``images/`` (importable again with ``python -m leaml import``) and
``data.parquet`` with Kvasir-VQA's columns (``image`` as {bytes, path}, ``source``,
``question``, ``answer``, ``img_id``) plus ``split``, ``category``, ``question_type`` and
``caption``. ``source`` holds the pair's origin (seed, pseudo, test): our images do not know
which data set they came from. The parquet file carries Hugging Face ``datasets`` feature
metadata, so ``load_dataset("parquet", data_files=...)`` decodes ``image`` as an image.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import sqlite_utils

from leaml.store import log_event
from leaml.store.images import image_path
from leaml.store.projects import get_project
from leaml.store.transfer import curated_rows

__all__ = ["ExportReport", "export_project", "export_zip"]

OUTPUTS = ("manifest.jsonl", "data.parquet", "images")
PARQUET_BATCH = 256
_TEXT = ("source", "question", "answer", "img_id", "split", "category", "question_type",
         "caption")


@dataclass
class ExportReport:
    """What an export wrote."""
    out_dir: Path
    project: str
    rows: int
    images: int

    def summary(self) -> str:
        return (f"exported {self.rows} rows ({self.images} images) of project"
                f" '{self.project}' to {self.out_dir}")


def export_project(db: sqlite_utils.Database, project: str | int, out_dir: str | Path, *,
                   with_test: bool = False, with_unlabeled: bool = False,
                   overwrite: bool = False, user: str | None = None) -> ExportReport:
    """Write the curated QA of ``project`` to ``out_dir`` (see the module docstring).

    ``out_dir`` must be missing or empty unless ``overwrite`` (which replaces only the files
    an export writes). NotFoundError for an unknown project. Audited as 'export'.
    """
    proj = get_project(db, project)
    out = Path(out_dir)
    _prepare_out(out, overwrite)
    rows = curated_rows(db, proj["id"], with_test=with_test, with_unlabeled=with_unlabeled)
    names = _copy_images(db, rows, out / "images")
    _write_manifest(out / "manifest.jsonl", rows, names)
    _write_parquet(out / "data.parquet", rows, names, out)
    report = ExportReport(out.resolve(), proj["name"], len(rows), len(set(names.values())))
    log_event(db, user=user, action="export", entity="project", entity_id=proj["id"],
              project_id=proj["id"], after={"out_dir": str(report.out_dir), "rows": report.rows,
                                            "with_test": with_test,
                                            "with_unlabeled": with_unlabeled})
    return report


def export_zip(db: sqlite_utils.Database, project: str | int, dest, *,
               with_test: bool = False, user: str | None = None) -> ExportReport:
    """:func:`export_project` into a temporary folder, then zipped into ``dest`` (a path or
    a binary file object): ``manifest.jsonl``, ``images/``, ``data.parquet`` at the top, so
    the zip imports again as it is (``leaml import``, or the Projects page's upload).

    Images and parquet are stored as they are (PNG and JPEG are compressed already, and
    deflating them again would cost most of the time for nothing); the manifest is deflated.
    """
    with tempfile.TemporaryDirectory(prefix="leaml-export-", dir=db.home) as tmp:
        report = export_project(db, project, Path(tmp) / "out", with_test=with_test, user=user)
        with zipfile.ZipFile(dest, "w", zipfile.ZIP_STORED) as zf:
            for path in sorted(report.out_dir.rglob("*")):
                if path.is_file():
                    kind = zipfile.ZIP_DEFLATED if path.suffix == ".jsonl" else zipfile.ZIP_STORED
                    zf.write(path, path.relative_to(report.out_dir).as_posix(),
                             compress_type=kind)
    return report


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file; give a folder to export into")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ValueError(f"{out} is not empty; give a new folder or pass --overwrite")
        for name in OUTPUTS:
            target = out / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
    (out / "images").mkdir(parents=True, exist_ok=True)


def _copy_images(db: sqlite_utils.Database, rows: list[dict], folder: Path) -> dict[int, str]:
    """image id -> path relative to the export folder; each file copied once (by sha256)."""
    names: dict[int, str] = {}
    for r in rows:
        if r["image_id"] in names:
            continue
        name = f"{r['sha256']}{r['ext']}"
        target = folder / name
        if not target.exists():
            src = image_path(db, r)
            if not src.exists():
                raise FileNotFoundError(f"image file {src} of image {r['image_id']} is missing"
                                        " from the data home; re-import the image")
            shutil.copyfile(src, target)
        names[r["image_id"]] = f"images/{name}"
    return names


def _record(r: dict, image: str) -> dict:
    """One manifest line: the import columns, None where a value is absent."""
    return {"image": image, "question": r["question"], "answer": r["answer"],
            "split": r["split"], "category": r["category"],
            "question_type": r["question_type"], "caption": r["caption"],
            "img_id": r["source_name"] or r["sha256"]}


def _write_manifest(path: Path, rows: list[dict], names: dict[int, str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        for r in rows:
            rec = {k: v for k, v in _record(r, names[r["image_id"]]).items() if v is not None}
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _schema():
    import pyarrow as pa
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    features = {"image": {"_type": "Image"}}
    features.update({c: {"dtype": "string", "_type": "Value"} for c in _TEXT})
    meta = {"huggingface": json.dumps({"info": {"features": features}})}
    return pa.schema([("image", image)] + [(c, pa.string()) for c in _TEXT], metadata=meta)


def _write_parquet(path: Path, rows: list[dict], names: dict[int, str], out: Path) -> None:
    """Kvasir-VQA columns + ours, written in batches so images never pile up in memory."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    schema, tmp = _schema(), path.with_name(path.name + ".tmp")
    with pq.ParquetWriter(tmp, schema) as writer:
        for start in range(0, len(rows), PARQUET_BATCH):
            batch = [_parquet_row(r, names[r["image_id"]], out)
                     for r in rows[start:start + PARQUET_BATCH]]
            writer.write_table(pa.Table.from_pylist(batch, schema=schema))
    os.replace(tmp, path)


def _parquet_row(r: dict, image: str, out: Path) -> dict:
    rec = _record(r, image)
    rec.update(image={"bytes": (out / image).read_bytes(), "path": Path(image).name},
               source=r["origin"])
    return rec
