"""SQLite storage: the only place that holds SQL. Knows nothing of torch or Streamlit.

Modules: ``db`` (connections, transactions, errors, audit events), ``migrations`` (schema),
and one module per concern: projects and images, QA and the review queue (``qa_queue``),
users and sign-in tokens (``logins``), jobs, runs. Imports leaml.config and leaml.auth only.
"""
from leaml.store.db import (ConflictError, NotFoundError, StoreError, connect, home_dir,
                            log_event, now, transaction)

__all__ = ["ConflictError", "NotFoundError", "StoreError", "connect", "home_dir",
           "log_event", "now", "transaction"]
