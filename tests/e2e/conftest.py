"""Browser tests: the `e2e` marker, and a skip with the reason when Chromium is missing."""
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")


def pytest_configure(config):
    config.addinivalue_line("markers", "e2e: end-to-end test in a real browser (Debian chromium)")


def pytest_collection_modifyitems(config, items):
    if CHROMIUM.exists():
        return
    skip = pytest.mark.skip(reason=f"{CHROMIUM} is missing: install Debian's chromium package "
                                   "(apt-get install -y chromium); .ci/run does")
    for item in items:
        if "e2e" in item.keywords:
            item.add_marker(skip)
