"""Reliability of accounts (README: Reliability): rights read from the database on every
action (R4), a sign-in throttle shared through the database (R6), one first admin (R7)."""
from __future__ import annotations

import multiprocessing
import os
import socket
import time

import pytest
from apphelp import PASSWORD, add_pending, add_users, make_project

from leaml.app import service as app_service
from leaml.store import connect
from leaml.store import jobs as jobs_store
from leaml.store import logins as sessions_store
from leaml.store import users as users_store
from leaml.store.logins import SignInThrottled


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


# --- R6: no sign-in throttle ----------------------------------------------------------------

def _wrong(db, name: str, n: int) -> None:
    for _ in range(n):
        assert app_service.sign_in(db, name, "wrong-password") is None


@pytest.mark.trust
def test_sign_in_is_throttled_after_five_failures_then_reset_by_success(db, home):
    """R6: 5 wrong passwords, then every attempt waits 1, 2 ... s; the right one resets it."""
    add_users(db)
    _wrong(db, "expert1", 5)
    with pytest.raises(SignInThrottled, match=r"^too many failed sign-ins for 'expert1'; "
                                              r"try again in 1 s$"):
        app_service.sign_in(db, "expert1", PASSWORD)  # even the right password waits
    # another connection (as another app process would) sees the same lock
    with pytest.raises(SignInThrottled):
        app_service.sign_in(connect(home), "expert1", PASSWORD)
    assert app_service.sign_in(db, "annotator1", PASSWORD)  # other names are not locked
    time.sleep(1.05)
    _wrong(db, "expert1", 1)
    with pytest.raises(SignInThrottled, match="try again in 2 s"):
        app_service.sign_in(db, "expert1", PASSWORD)
    time.sleep(2.05)
    assert app_service.sign_in(db, "expert1", PASSWORD)["name"] == "expert1"
    _wrong(db, "expert1", 4)  # the count started again: four failures lock nothing
    assert app_service.sign_in(db, "expert1", PASSWORD)


@pytest.mark.trust
def test_sign_in_throttle_for_unknown_names_and_its_ceiling(db):
    """R6: unknown names are throttled the same way (so the lock tells nobody which names
    exist) and cost as long as known ones; the wait stops growing at 15 minutes."""
    add_users(db)
    _wrong(db, "nobody", 5)
    with pytest.raises(SignInThrottled, match="for 'nobody'; try again in 1 s"):
        app_service.sign_in(db, "nobody", PASSWORD)
    for _ in range(30):
        sessions_store.record_failure(db, "someone")
    with pytest.raises(SignInThrottled, match=r"try again in 900 s$"):
        app_service.sign_in(db, "someone", PASSWORD)

    def median_seconds(name: str) -> float:
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            app_service.sign_in(db, name, "wrong-password")
            times.append(time.perf_counter() - t0)
        return sorted(times)[1]
    known, unknown = median_seconds("viewer1"), median_seconds("ghost")
    assert 0.5 < unknown / known < 2, (known, unknown)


# --- R7: two first admins -------------------------------------------------------------------

def _first_admin(home: str, name: str, barrier, results) -> None:
    """In a child process: wait for the other one, then both try at the same moment."""
    db = connect(home)
    barrier.wait()
    try:
        app_service.create_first_admin(db, name, PASSWORD)
        results.put((name, "admin"))
    except PermissionError as exc:
        results.put((name, str(exc)))


@pytest.mark.trust
def test_two_processes_racing_for_the_first_admin(tmp_path):
    """R7: of two processes calling create_first_admin at once, exactly one wins (3 tries)."""
    ctx = multiprocessing.get_context("fork")
    for trial in range(3):
        home = tmp_path / f"home{trial}"
        connect(home).conn.close()  # migrated before the race: the race is the insert only
        barrier, results = ctx.Barrier(2), ctx.Queue()
        procs = [ctx.Process(target=_first_admin, args=(str(home), name, barrier, results))
                 for name in ("root1", "root2")]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        got = dict(results.get(timeout=5) for _ in procs)
        assert list(got.values()).count("admin") == 1, got
        loser = next(v for v in got.values() if v != "admin")
        assert "an admin account already exists" in loser
        admins = [u for u in users_store.list_users(connect(home)) if u["role"] == "admin"]
        assert len(admins) == 1, admins
