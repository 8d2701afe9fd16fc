"""Every field a Training-page form shows reaches the engine: a job's effective settings
(leaml.jobs.settings, built as the job kinds build them) equal what was entered; the budgets
fill the forms; the generator trains the seed set it was given and the steps it was told."""
import os
import socket
import subprocess
import sys

import pytest
from apphelp import ROOT, add_users, button, home_db, make_project, page

from leaml.app import loop as app_loop
from leaml.jobs import queue as jobs
from leaml.jobs.settings import effective_settings
from leaml.store import jobs as jobs_store

# a value per knob that differs from every default, so a dropped field shows
ENTERED = {"lr": 0.0023, "batch_size": 8, "epochs": 1.5, "max_steps": 2, "min_steps": 1,
           "lora_r": 4, "vision_warmup_epochs": 2.0, "rho": 0.3, "k": 3, "max_images": 7,
           "qa_epochs": 2.0, "min_qa_steps": 1, "max_qa_steps": 2, "max_captions": 5,
           "mode": "full"}


def no_worker_needed(db):
    jobs_store.register_worker(db, os.getpid(), socket.gethostname())


def fill(at, preset: str, kind: str) -> dict:
    """Enter ENTERED into every settings field of ``kind`` shown; returns what was entered."""
    prefix = f"hp_{preset}_{kind}_"
    entered = {}
    for w in [*at.number_input, *at.text_input]:
        if w.key and w.key.startswith(prefix):
            name = w.key[len(prefix):]
            w.set_value(ENTERED[name])
            entered[name] = ENTERED[name]
    at.run()
    assert entered, f"no fields of {kind} shown"
    return entered


def started(db) -> list[dict]:
    return list(reversed(jobs.list_jobs(db)))  # oldest first


@pytest.fixture
def expert_page(monkeypatch, home, tmp_path):
    db = home_db(monkeypatch, home)
    users = add_users(db)
    make_project(db, tmp_path, "p1", labeled=3)
    no_worker_needed(db)
    return db, page("pages/training.py", users["expert"], "p1")


@pytest.mark.parametrize("kind", ["generator", "pseudo", "finetune"])
def test_stage_form_fields_are_the_jobs_settings(expert_page, kind):
    db, at = expert_page
    at.radio(key="job_kind").set_value(kind).run()
    at.radio(key="budget").set_value("full").run()
    entered = fill(at, "full", kind)
    if kind == "generator":
        at.number_input(key="frac_generator").set_value(0.5).run()
        entered["label_fraction"] = 0.5
    at.number_input(key=f"seed_{kind}").set_value(4).run()
    button(at, "Start job").click().run()
    assert not at.exception
    job = started(db)[0]
    settings = effective_settings(job["kind"], job["params"])
    assert {k: settings[k] for k in entered} == entered
    assert settings["seed"] == 4


@pytest.mark.parametrize("method", ["leaml", "seed-full", "caption-then-seed"])
def test_run_form_fields_are_the_jobs_settings(expert_page, method):
    db, at = expert_page
    at.radio(key="job_kind").set_value("run").run()
    at.selectbox(key="run_method").set_value(method).run()
    entered = fill(at, "quick", method)
    at.number_input(key="run_frac").set_value(0.25).run()
    button(at, "Start job").click().run()
    job = started(db)[0]
    settings = effective_settings("run", job["params"])
    assert {k: settings[k] for k in entered} == entered and settings["label_fraction"] == 0.25


def test_quick_loop_queues_generator_then_pseudo_with_the_budget(expert_page):
    db, at = expert_page
    assert at.radio(key="budget").value == "quick"  # the default on a first visit
    assert at.radio(key="job_kind").value == "loop"
    frac = at.number_input(key="frac_loop").value
    assert frac == 1.0  # the project's own seed set: it has unlabeled images
    button(at, "Start job").click().run()
    gen, pseudo = started(db)
    assert (gen["kind"], pseudo["kind"]) == ("generator", "pseudo")
    quick = app_loop.PRESETS["quick"]
    for job, kind in ((gen, "generator"), (pseudo, "pseudo")):
        settings = effective_settings(kind, job["params"])
        assert {k: settings[k] for k in quick[kind]} == quick[kind]
    assert effective_settings("generator", gen["params"])["label_fraction"] == 1.0


def test_finetune_also_queues_the_seed_only_baseline_with_its_settings(expert_page):
    db, at = expert_page
    at.radio(key="job_kind").set_value("finetune").run()
    assert at.checkbox(key="with_baseline").value  # none yet
    button(at, "Start job").click().run()
    finetune, baseline = started(db)
    assert baseline["params"]["method"] == app_loop.BASELINE_METHOD
    ft = effective_settings("finetune", finetune["params"])
    base = effective_settings("run", baseline["params"])
    for name, value in app_loop.PRESETS["quick"]["finetune"].items():
        assert ft[name] == base[name] == value


def test_generator_on_a_fully_labeled_project_keeps_unlabeled_images(monkeypatch, home,
                                                                    tmp_path):
    """Regression: on a benchmark project (every train image labeled) the generator trained
    on all of them and pseudo then found no unlabeled image."""
    db = home_db(monkeypatch, home)
    users = add_users(db)
    make_project(db, tmp_path, "full", labeled=12)
    no_worker_needed(db)
    at = page("pages/training.py", users["expert"], "full")
    assert at.number_input(key="frac_loop").value == 0.01


def test_generator_job_runs_the_steps_entered(monkeypatch, home, tmp_path):
    """Regression: the generator form's max_steps=2 was stored but the job ran 2000 steps."""
    db = home_db(monkeypatch, home)
    users = add_users(db)
    make_project(db, tmp_path, "p1", labeled=3)
    no_worker_needed(db)
    at = page("pages/training.py", users["expert"], "p1")
    at.radio(key="job_kind").set_value("generator").run()
    at.number_input(key="hp_quick_generator_max_qa_steps").set_value(1).run()
    at.number_input(key="hp_quick_generator_min_qa_steps").set_value(1).run()
    at.number_input(key="hp_quick_generator_max_captions").set_value(4).run()
    button(at, "Start job").click().run()
    job = started(db)[0]
    env = dict(os.environ, LEAML_HOME=str(home))
    subprocess.run([sys.executable, "-m", "leaml", "worker", "--once", "--home", str(home)],
                   cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
    done = jobs.get_job(db, job["id"])
    assert done["status"] == "succeeded", done["message"]
    from leaml.store.runs import get_run
    info = get_run(db, done["run_id"])["params"]
    assert info["generator"]["qa_steps"] == 1 and info["n_kept_images"] == 3
    assert info["generator"]["total_steps"] == 6  # 1 QA + 4 answer + 1 caption step
