"""pages/training.py: start jobs with their params, live progress, cancel, resume (AppTest).

A worker row for this very process stands in for a live worker, so ensure_worker starts
none and the queued job stays put for the test to look at (the e2e test runs real jobs).
"""
import os
import socket

import pytest
from apphelp import add_users, button, home_db, make_project, page

from leaml.app import service as app_service
from leaml.jobs import queue as jobs
from leaml.store import jobs as jobs_store


def no_worker_needed(db):
    jobs_store.register_worker(db, os.getpid(), socket.gethostname())


def test_start_run_job_then_cancel_and_resume(monkeypatch, home, tmp_path):
    db = home_db(monkeypatch, home)
    users = add_users(db)
    make_project(db, tmp_path, "p1", labeled=2)
    no_worker_needed(db)
    at = page("pages/training.py", users["expert"], "p1")
    assert not at.exception
    at.radio(key="job_kind").set_value("run").run()
    at.selectbox(key="run_method").set_value("seed-lora").run()
    at.number_input(key="hp_quick_seed-lora_epochs").set_value(1.0).run()
    assert at.number_input(key="hp_quick_seed-lora_lr").value is None  # empty: the default
    button(at, "Start job").click().run()
    assert not at.exception
    job = jobs.list_jobs(db)[0]
    assert job["kind"] == "run" and job["status"] == "queued"
    assert job["params"]["method"] == "seed-lora"
    assert job["params"]["overrides"] == {"train": {"epochs": 1.0}}
    assert "Job #" in at.success[0].value
    assert any("Job #" in m.value and "queued" in m.value for m in at.markdown)  # live view
    button(at, "Cancel job").click().run()
    assert jobs.get_job(db, job["id"])["status"] == "cancelled"
    at.run()
    button(at, "Resume").click().run()
    assert jobs.get_job(db, job["id"])["status"] == "queued"


def test_finetune_job_carries_the_data_mix(monkeypatch, home, tmp_path):
    db = home_db(monkeypatch, home)
    users = add_users(db)
    make_project(db, tmp_path, "p1")
    no_worker_needed(db)
    at = page("pages/training.py", users["expert"], "p1")
    at.radio(key="job_kind").set_value("finetune").run()
    at.checkbox(key="mix_pend_finetune").check().run()
    at.slider(key="mix_thr_finetune").set_value(0.8).run()
    button(at, "Start job").click().run()
    params = jobs.list_jobs(db)[-1]["params"]  # the finetune job (then the baseline's)
    assert params["data_mix"] == {"seed": True, "reviewed": True, "pending_min_conf": 0.8}


def test_caption_qa_run_needs_a_teacher_and_carries_it(monkeypatch, home, tmp_path):
    db = home_db(monkeypatch, home)
    users = add_users(db)
    make_project(db, tmp_path, "p1", labeled=2)
    no_worker_needed(db)
    at = page("pages/training.py", users["expert"], "p1")
    at.radio(key="job_kind").set_value("run").run()
    at.selectbox(key="run_method").set_value("caption-qa").run()
    button(at, "Start job").click().run()  # no endpoint yet: a message, no job
    assert not at.exception and not jobs.list_jobs(db)
    assert any("endpoint" in e.value for e in at.error)
    at.text_input(key="qa_endpoint").input(" http://127.0.0.1:8000/v1 ").run()
    at.text_input(key="qa_model").input("teacher").run()
    button(at, "Start job").click().run()
    params = jobs.list_jobs(db)[0]["params"]
    assert params["method"] == "caption-qa"
    assert params["overrides"]["qa"] == {"endpoint": "http://127.0.0.1:8000/v1", "model": "teacher"}
    from leaml.methods import pipeline  # the engine takes these overrides as they are
    cfg = pipeline.method_config("caption-qa", params["seed"], params.get("overrides"))
    assert cfg.options["qa"]["endpoint"] == "http://127.0.0.1:8000/v1"
    assert cfg.options["qa"]["per_image"] == 3  # the other knobs keep their defaults


def test_annotator_may_not_start_jobs(home, tmp_path):
    from leaml.store import connect
    db = connect(home)
    users = add_users(db)
    make_project(db, tmp_path, "p1")
    with pytest.raises(PermissionError, match="annotator 'annotator1' may not train"):
        app_service.start_job(db, users["annotator"], "finetune", "p1", {})
    assert jobs.list_jobs(db) == []


def test_a_dead_workers_job_shows_interrupted_and_loading_the_page_writes_nothing(
        monkeypatch, home, tmp_path):
    db = home_db(monkeypatch, home)
    users = add_users(db)
    make_project(db, tmp_path, "p1")
    no_worker_needed(db)
    job_id = jobs.enqueue(db, "finetune", "p1", {}, user="expert1")
    assert jobs_store.claim_next(db, 2**22 + 7)["id"] == job_id  # a worker took it, then died:
    db.execute("UPDATE jobs SET heartbeat_at = '2000-01-01T00:00:00+00:00' WHERE id = ?",
               [job_id])                                       # its last heartbeat is old
    at = page("pages/training.py", users["expert"], "p1")
    assert not at.exception
    assert jobs_store.get_job(db, job_id)["status"] == "running"  # the page wrote nothing
    assert any(f"Job #{job_id}" in m.value and "interrupted" in m.value for m in at.markdown)
    assert not [b for b in at.button if b.label.startswith("Cancel job")]  # not active
    assert at.selectbox(key="resume_pick").value == job_id
    button(at, "Resume").click().run()  # an action: recovery records it, then it is queued
    job = jobs_store.get_job(db, job_id)
    assert job["status"] == "queued" and "was interrupted" in job["message"]


def test_a_live_job_is_not_shown_interrupted(monkeypatch, home, tmp_path):
    db = home_db(monkeypatch, home)
    users = add_users(db)
    make_project(db, tmp_path, "p1")
    job_id = jobs.enqueue(db, "finetune", "p1", {}, user="expert1")
    jobs_store.claim_next(db, os.getpid())  # heartbeat now: alive
    shown = app_service.project_jobs(db, users["viewer"], jobs.get_job(db, job_id)["project_id"])
    assert [j["status"] for j in shown] == ["running"]
    assert app_service.job_progress(db, users["viewer"], job_id)["status"] == "running"


def test_where_it_runs_goes_into_the_jobs_params(monkeypatch, home, tmp_path):
    """The form's "Where it runs": device and processes reach every job it queues (the
    loop's two, a finetune's baseline too); vLLM is not installed here, so the engine pick
    is disabled and saying so."""
    db = home_db(monkeypatch, home)
    users = add_users(db)
    make_project(db, tmp_path, "p1", labeled=2)
    no_worker_needed(db)
    at = page("pages/training.py", users["expert"], "p1")
    at.radio(key="job_kind").set_value("loop").run()
    assert at.selectbox(key="engine_loop").disabled
    assert "not installed" in at.selectbox(key="engine_loop").help
    at.selectbox(key="device_loop").set_value("cpu").run()
    at.number_input(key="procs_loop").set_value(2).run()
    button(at, "Start job").click().run()
    assert not at.exception and not at.error
    queued = sorted(jobs.list_jobs(db), key=lambda j: j["id"])
    assert [j["kind"] for j in queued] == ["generator", "pseudo"]
    for job in queued:
        assert job["params"]["device"] == "cpu" and job["params"]["processes"] == 2
        assert "engine" not in (job["params"].get("overrides") or {}).get("pseudo", {})
    at.radio(key="job_kind").set_value("finetune").run()
    at.number_input(key="procs_finetune").set_value(2).run()
    button(at, "Start job").click().run()
    finetune, baseline = sorted(jobs.list_jobs(db), key=lambda j: j["id"])[2:]
    assert finetune["params"]["processes"] == baseline["params"]["processes"] == 2
    assert "device" not in finetune["params"]  # auto: where the worker is


def test_job_params_place_and_engine_checks():
    params = app_service.job_params("pseudo", base_model="tiny", seed=0, hyperparameters={},
                                    engine="vllm")
    assert params["overrides"] == {"pseudo": {"engine": "vllm"}} and "processes" not in params
    with pytest.raises(ValueError, match="one process"):
        app_service.job_params("pseudo", base_model="tiny", seed=0, hyperparameters={},
                               engine="vllm", processes=2)
    with pytest.raises(ValueError, match="only the pseudo kind"):
        app_service.job_params("finetune", base_model="tiny", seed=0, hyperparameters={},
                               engine="vllm")
    where = app_service.places()
    assert where["max_processes"] >= 1 and where["gpus"] >= 0 and where["vllm"] is False
