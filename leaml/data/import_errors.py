"""What an import does with a failure nobody planned for: one line for the person, the
details (with the traceback) in ``<home>/logs/import-errors.log`` for whoever debugs it.

Bad input is not such a failure: rows that break a rule are :class:`leaml.data.ingest.ImportRejected`
and a wrong file type a ValueError, both already naming the file and row. This is for the
rest: a full disk, a database that refuses a write, a bug. The import's transaction rolls back
first, so the store is as it was.
"""
from __future__ import annotations

import traceback
from datetime import datetime, timezone
from pathlib import Path

from leaml.store import StoreError

LOG_NAME = "import-errors.log"
MAX_LOG_BYTES = 10 << 20   # past this the log starts again (one old copy kept as .1)


class ImportFailed(StoreError, ValueError):
    """An import that failed for a reason other than its input; nothing was written."""

    def __init__(self, message: str, log_path: Path | None):
        self.log_path = log_path
        super().__init__(message)


def failure(home: str | Path, source: str, project: str, user: str | None,
            exc: BaseException) -> ImportFailed:
    """The one-line ImportFailed for ``exc``, after writing its traceback to the log."""
    log = _write_log(Path(home), source, project, user, exc)
    reason = (str(exc).splitlines() or [""])[0][:160]
    reason = f"{type(exc).__name__}: {reason}" if reason else type(exc).__name__
    where = f"details in {log}" if log else "the error log could not be written either"
    return ImportFailed(f"{source}: the import failed unexpectedly ({reason}); nothing was"
                        f" imported; {where}", log)


def _write_log(home: Path, source: str, project: str, user: str | None,
               exc: BaseException) -> Path | None:
    """Append one entry to the log; None when that fails too (a full disk fails both)."""
    path = home / "logs" / LOG_NAME
    ts = datetime.now(timezone.utc).isoformat(timespec="seconds")
    entry = (f"--- {ts} import of {source} into project '{project}' by {user or '-'}\n"
             + "".join(traceback.format_exception(exc)) + "\n")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() and path.stat().st_size > MAX_LOG_BYTES:
            path.replace(path.with_name(LOG_NAME + ".1"))
        with open(path, "a", encoding="utf-8", errors="replace") as f:
            f.write(entry)
    except OSError:
        return None
    return path
