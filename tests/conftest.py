"""Fixtures shared by every test file: a fresh data home and a connection to it.

Keep this small; fixtures used by one file belong in that file.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `pytest` as well as `python -m pytest`

from leaml.store import connect  # noqa: E402


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """An empty data home folder (LEAML_HOME) in the test's tmp_path."""
    path = tmp_path / "home"
    path.mkdir()
    return path


@pytest.fixture
def db(home: Path):
    """A migrated database in ``home``; closed after the test."""
    database = connect(home)
    yield database
    database.conn.close()
