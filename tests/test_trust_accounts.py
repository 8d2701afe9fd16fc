"""Reliability of accounts (README: Reliability): rights read from the database on every
action (R4), a sign-in throttle shared through the database (R6), one first admin (R7)."""
from __future__ import annotations

import os
import socket

import pytest
from apphelp import PASSWORD, add_pending, add_users, make_project

from leaml import app_service
from leaml.store import jobs as jobs_store
from leaml.store import users as users_store


# --- R4: rights outlive their revocation ----------------------------------------------------

@pytest.mark.trust
def test_demoted_and_disabled_user_is_refused_on_the_next_action(db, tmp_path):
    """R4: the user dict cached at sign-in still says 'expert'; the database says otherwise."""
    users = add_users(db)
    make_project(db, tmp_path, "p1")
    jobs_store.register_worker(db, os.getpid(), socket.gethostname())  # no real worker
    expert = app_service.sign_in(db, "expert1", PASSWORD)
    assert app_service.start_job(db, expert, "run", "p1", {"method": "seed-lora"})
    app_service.set_role(db, users["admin"], "expert1", "viewer")
    with pytest.raises(PermissionError, match="viewer 'expert1' may not train"):
        app_service.start_job(db, expert, "run", "p1", {"method": "seed-lora"})
    users_store.set_disabled(db, "expert1", True)
    with pytest.raises(PermissionError, match="disabled"):
        app_service.results(db, expert, 1)


@pytest.mark.trust
def test_made_up_user_dict_gains_no_rights(db):
    """R4: a dict claiming to be an admin adds no admin, whatever role it names."""
    users = add_users(db)
    forged = [{"name": "mallory", "role": "admin", "disabled": 0},
              {"id": users["annotator"]["id"], "name": "annotator1", "role": "admin"},
              {"id": users["admin"]["id"], "name": "mallory", "role": "admin"},
              {"id": str(users["admin"]["id"]), "name": "admin1", "role": "admin"}]
    for user in forged:
        with pytest.raises(PermissionError):
            app_service.add_user(db, user, "mallory2", PASSWORD, "admin")
    assert "mallory2" not in [u["name"] for u in users_store.list_users(db)]


@pytest.mark.trust
def test_reviewer_stats_use_the_role_in_the_database(db, tmp_path):
    """R4: an annotator claiming 'admin' in its dict still sees only its own counters."""
    users = add_users(db)
    p = make_project(db, tmp_path, "p1")
    add_pending(db, p, 3)
    pair = app_service.next_pair(db, users["expert"], p["id"])
    app_service.decide(db, users["expert"], pair["id"], "accept", expected_version=pair["version"])
    assert [s["reviewer"] for s in app_service.reviewer_stats(db, users["admin"], p["id"])] == [
        "expert1"]
    claim = dict(users["annotator"], role="admin")
    assert app_service.reviewer_stats(db, claim, p["id"]) == []
