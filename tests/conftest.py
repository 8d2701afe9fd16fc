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


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Groups for pytest-xdist's ``--dist loadgroup`` (the README's test command runs two
    workers): a file's tests stay on one worker, so its module fixtures (a trained model, a
    built project) are made once; the browser journeys of tests/e2e run on one worker, one
    after another (two at a time slow each other more than they gain). Runs before xdist's
    own hook, which reads these marks."""
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            group = "e2e" if "e2e" in item.path.parts else item.path.stem
            item.add_marker(pytest.mark.xdist_group(group))
