"""The CLI as users run it: every subcommand documented, import/export through subprocesses."""
from __future__ import annotations

import io
import json
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def leaml(*args: str, home: Path | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "leaml", *args] + (["--home", str(home)] if home else [])
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)


def subcommands() -> list[str]:
    out = leaml("--help").stdout
    block = out.split("positional arguments:")[1].split("options:")[0]
    return re.findall(r"^    ([a-z][a-z0-9-]*)", block, flags=re.MULTILINE)


def test_help_lists_the_design_commands():
    names = subcommands()
    for name in ("demo", "import", "export", "run", "evaluate", "worker", "jobs", "users",
                 "pretrain-tiny", "generator", "pseudo", "finetune"):
        assert name in names


@pytest.mark.parametrize("name", subcommands())
def test_every_subcommand_has_help(name):
    result = leaml(name, "--help")
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout


def dump(home: Path) -> dict:
    """Every table's rows and the events count, read straight from the SQLite file."""
    conn = sqlite3.connect(home / "leaml.db")
    try:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type ="
                                             " 'table' AND name NOT LIKE 'sqlite_%'")]
        out = {t: sorted(map(repr, conn.execute(f"SELECT * FROM [{t}]"))) for t in tables}
        out["#events"] = conn.execute("SELECT COUNT(*) FROM events").fetchone()[0]
        return out
    finally:
        conn.close()


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    folder = tmp_path / "src"
    folder.mkdir()
    for i, color in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        buf = io.BytesIO()
        Image.new("RGB", (24, 24), color).save(buf, format="PNG")
        (folder / f"{i}.png").write_bytes(buf.getvalue())
    rows = [{"image": "0.png", "question": "Colour?", "answer": "red"},
            {"image": "1.png", "question": "Colour?", "answer": "green", "split": "test"},
            {"image": "../../etc/passwd", "question": "Colour?", "answer": "none"},
            {"image": "2.png"}]
    path = folder / "manifest.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_import_bad_row_then_good_then_again(tmp_path, manifest):
    home = tmp_path / "home"
    first = leaml("import", str(manifest), "--project", "other", home=home)
    assert first.returncode == 2
    assert "manifest.jsonl:3: image '../../etc/passwd' escapes the manifest folder" in first.stderr
    leaml("users", "list", home=home)  # any command: the database exists and is migrated
    before = dump(home)

    bad = leaml("import", str(manifest), "--project", "p", home=home)
    assert bad.returncode != 0
    assert "manifest.jsonl:3:" in bad.stderr and "../../etc/passwd" in bad.stderr
    assert dump(home) == before

    lines = manifest.read_text().splitlines()
    manifest.write_text("\n".join(lines[:2] + lines[3:]) + "\n")
    good = leaml("import", str(manifest), "--project", "p", home=home)
    assert good.returncode == 0, good.stderr
    assert "images 3 added, 0 existing; QA 2 added, 0 existing; 0 rejected" in good.stdout
    after = dump(home)
    assert after != before

    again = leaml("import", str(manifest), "--project", "p", home=home)
    assert again.returncode == 0, again.stderr
    assert "images 0 added, 3 existing; QA 0 added, 2 existing" in again.stdout
    again_dump = dump(home)
    assert {k: v for k, v in again_dump.items() if k not in ("events", "#events")} == \
        {k: v for k, v in after.items() if k not in ("events", "#events")}


def test_skip_invalid_lists_the_rejected_rows(tmp_path, manifest):
    result = leaml("import", str(manifest), "--project", "p", "--skip-invalid",
                   home=tmp_path / "home")
    assert result.returncode == 0, result.stderr
    assert "skipped: manifest.jsonl:3:" in result.stderr
    assert "1 rejected" in result.stdout


def test_export_unknown_project_is_one_line(tmp_path):
    result = leaml("export", "--project", "nope", str(tmp_path / "out"), home=tmp_path / "home")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown project 'nope'")
    assert not (tmp_path / "out").exists()


def test_import_then_export(tmp_path, manifest):
    home = tmp_path / "home"
    assert leaml("import", str(manifest.parent / "0.png"), "--project", "p",
                 home=home).returncode == 2   # a bare .png is not an import source
    lines = manifest.read_text().splitlines()
    manifest.write_text("\n".join(lines[:2]) + "\n")
    assert leaml("import", str(manifest), "--project", "p", home=home).returncode == 0
    out = leaml("export", "--project", "p", str(tmp_path / "out"), "--with-test", home=home)
    assert out.returncode == 0, out.stderr
    assert "exported 2 rows" in out.stdout
    assert (tmp_path / "out" / "data.parquet").is_file()


def test_demo_data_only_is_idempotent(tmp_path):
    home = tmp_path / "home"
    first = leaml("demo", "--data-only", "--n-train", "6", "--n-test", "2", home=home)
    assert first.returncode == 0, first.stderr
    assert "images 8 added" in first.stdout
    second = leaml("demo", "--data-only", "--n-train", "6", "--n-test", "2", home=home)
    assert second.returncode == 0 and "nothing to do" in second.stdout
