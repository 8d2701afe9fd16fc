"""Teacher captions: `leaml caption --endpoint` against a real `leaml serve`, a teacher that
misbehaves on purpose (500s, stalls, bad JSON) for retries/backoff/final errors, resumability,
concurrency, the local-model teacher, the caption prompt setting and the `caption` job kind."""
from __future__ import annotations

import pytest

from leaml.serve import teacher as captions
from leaml.jobs import queue as jobs
from leaml.serve.teacher import EndpointClient, EndpointError, caption_missing
from leaml.store import connect
from leaml.store.images import images_without_caption, list_images
from leaml.store.projects import get_project
from servehelp import PROMPT, Teacher, cli, image_folder, shared


@pytest.fixture
def project(home, tmp_path):
    """A project imported from a plain folder of 4 images (no captions)."""
    r = cli(home, "import", image_folder(tmp_path / "frames"), "--project", "p")
    assert r.returncode == 0, r.stderr
    return home


@pytest.fixture
def teacher():
    made = []

    def make(*a, **kw) -> Teacher:
        made.append(Teacher(*a, **kw))
        return made[-1]
    yield make
    for t in made:
        t.close()


def captions_of(home) -> dict:
    db = connect(home)
    return {r["source_name"]: (r["caption"], r["caption_source"])
            for r in list_images(db, get_project(db, "p")["id"])}


def test_caption_cli_against_leaml_serve_then_rerun_does_nothing():
    s = shared()
    home, url = s["home"], s["server"].url
    r = cli(home, "caption", "--project", "endo", "--endpoint", url, "--model", s["model"],
            "--prompt", PROMPT, "--max-tokens", "6", "--concurrency", "2")
    assert r.returncode == 0, r.stderr
    assert "captioned 4 of 4" in r.stdout
    db = connect(home)
    rows = list_images(db, get_project(db, "endo")["id"])
    assert all(row["caption"] and row["caption_source"] == f"endpoint:{url}#{s['model']}" for row in rows)
    again = cli(home, "caption", "--project", "endo", "--endpoint", url, "--model", s["model"])
    assert again.returncode == 0 and "captioned 0 of 0" in again.stdout


def test_retries_with_exponential_backoff_and_jitter_then_success(teacher):
    t = teacher(["500", "stall", "badjson"], stall_s=3.0)
    delays = []
    client = EndpointClient(t.url, "teacher", timeout=1.0, retries=3, backoff=0.5,
                            sleep=delays.append)
    answer = client.chat([{"role": "user", "content": "hi"}])
    assert answer["choices"][0]["message"]["content"] == "caption 4"
    assert len(t.requests) == 4 and len(delays) == 3
    for i, d in enumerate(delays):  # base * 2**i, scaled by a jitter factor in [0.5, 1.5)
        assert 0.5 * 0.5 * 2 ** i <= d < 1.5 * 0.5 * 2 ** i
    assert len({round(d / 2 ** i, 6) for i, d in enumerate(delays)}) > 1  # jittered, not fixed


def test_4xx_is_not_retried_and_names_the_server_error(teacher):
    t = teacher(default=lambda body: {"no": "choices"})
    client = EndpointClient(t.url, "teacher", retries=2, backoff=0.0)
    with pytest.raises(EndpointError, match="failed 3 time"):  # malformed JSON: retried
        client.chat([{"role": "user", "content": "x"}])
    with pytest.raises(EndpointError, match="model 'nope' does not exist"):
        EndpointClient(shared()["server"].url, "nope", retries=5).chat(
            [{"role": "user", "content": "x"}])


def test_last_failure_names_the_image_others_go_on_exit_nonzero(project, teacher):
    t = teacher(["ok", "500", "500", "500"], default="ok")  # the 2nd image fails 3 times
    r = cli(project, "caption", "--project", "p", "--endpoint", t.url, "--model", "teacher",
            "--concurrency", "1", "--retries", "2", "--backoff", "0.01")
    assert r.returncode == 1
    assert "error: image 2 (frame_1.png):" in r.stderr and "failed 3 time(s)" in r.stderr
    assert "HTTP 500: teacher overloaded" in r.stderr
    got = captions_of(project)
    assert got["frame_1.png"][0] is None
    assert sum(c is not None for c, _ in got.values()) == 3
    n = len(t.requests)
    r = cli(project, "caption", "--project", "p", "--endpoint", t.url, "--model", "teacher")
    assert r.returncode == 0 and "captioned 1 of 1" in r.stdout
    assert len(t.requests) == n + 1  # only the missing one was asked again


def test_stop_half_way_then_resume_does_only_the_rest(project, teacher):
    t = teacher()
    db = connect(project)
    finished = []
    report = caption_missing(db, "p", endpoint=t.url, model="teacher", concurrency=1,
                             progress=lambda *a: finished.append(a[1]),
                             should_stop=lambda: len(finished) >= 2)
    assert report.stopped and report.done == 2
    assert len(images_without_caption(db, get_project(db, "p")["id"])) == 2
    report = caption_missing(db, "p", endpoint=t.url, model="teacher")
    assert not report.stopped and report.done == 2 and len(t.requests) == 4
    assert not images_without_caption(db, get_project(db, "p")["id"])


def test_requests_run_concurrently(project, teacher):
    t = teacher(delay_s=0.3)
    report = caption_missing(connect(project), "p", endpoint=t.url, model="teacher", concurrency=3)
    assert report.done == 4 and t.max_in_flight >= 2
    assert t.requests[0]["messages"][0]["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")


def test_project_prompt_setting_and_default(project, teacher):
    t = teacher()
    db = connect(project)
    assert captions.caption_prompt(get_project(db, "p")) == captions.DEFAULT_CAPTION_PROMPT
    captions.set_caption_prompt(db, "p", "Name the landmark.")
    caption_missing(db, "p", endpoint=t.url, model="teacher", limit=1)
    assert t.requests[0]["messages"][0]["content"][1]["text"] == "Name the landmark."
    assert t.requests[0]["temperature"] == 0.0


def test_local_teacher_model(project):
    s = shared()  # its run folder holds a tiny that always writes visible text
    ref = str(s["home"] / "models" / f"run-{s['run_id']}")
    db = connect(project)
    report = caption_missing(db, "p", teacher=ref, prompt=PROMPT, max_tokens=4, limit=2)
    assert report.done == 2 and not report.failed
    rows = list_images(db, get_project(db, "p")["id"])
    assert [r["caption_source"] for r in rows if r["caption"]] == [f"teacher:{ref}"] * 2


def test_bad_arguments_are_one_line_errors(project):
    r = cli(project, "caption", "--project", "p", "--endpoint", "http://127.0.0.1:9/v1")
    assert r.returncode == 2 and "--model" in r.stderr
    r = cli(project, "caption", "--project", "p")
    assert r.returncode == 2 and "--teacher" in r.stderr
    r = cli(project, "caption", "--project", "p", "--endpoint", "ftp://x", "--model", "m")
    assert r.returncode == 2 and "not an http(s) URL" in r.stderr


def test_caption_job_kind_runs_in_the_worker(project, teacher):
    t = teacher()
    db = connect(project)
    assert "caption" in jobs.KINDS
    params = captions.caption_job_params(endpoint=t.url, model="teacher", concurrency=2)
    job_id = jobs.enqueue(db, "caption", "p", params, user="cli")
    r = cli(project, "worker", "--once", timeout=300)
    assert r.returncode == 0, r.stderr
    job = jobs.get_job(db, job_id)
    assert job["status"] == "succeeded", job
    assert not images_without_caption(db, get_project(db, "p")["id"])
    with pytest.raises(ValueError, match="model name"):
        captions.caption_job_params(endpoint=t.url)


def test_training_page_button_queues_a_caption_job(monkeypatch, home, tmp_path):
    import os
    import socket

    from apphelp import add_users, button, home_db, page

    from leaml.data import ingest
    from leaml.store import jobs as jobs_store
    db = home_db(monkeypatch, home)
    users = add_users(db)
    ingest.import_path(db, image_folder(tmp_path / "frames"), "p", user="test")
    jobs_store.register_worker(db, os.getpid(), socket.gethostname())  # no real worker started
    at = page("pages/training.py", users["expert"], "p")
    assert not at.exception
    assert any("4 image(s) without a caption" in e.label for e in at.expander)
    button(at, "Caption images without captions").click().run()
    assert at.error and "endpoint URL and model name" in at.error[0].value  # nothing given
    at.text_input(key="cap_endpoint").set_value("http://127.0.0.1:8000/v1")
    at.text_input(key="cap_model").set_value("qwen-vl")
    button(at, "Caption images without captions").click().run()
    assert not at.exception
    job = jobs.list_jobs(db)[0]
    assert job["kind"] == "caption" and job["status"] == "queued"
    assert job["params"] == {"endpoint": "http://127.0.0.1:8000/v1", "model": "qwen-vl",
                             "concurrency": 4}


def test_folder_project_gets_captions_from_leaml_serve_then_leaml_runs(home, tmp_path):
    """The issue's acceptance path: a plain folder of images (no captions) next to a few
    labeled ones, captioned by `caption --endpoint` against `leaml serve`, then the whole
    LEAML method (tiny sizes) trains its generator on those captions."""
    import json

    from PIL import Image

    from leaml.store.runs import get_run
    s = shared()
    assert cli(home, "import", image_folder(tmp_path / "frames"), "--project", "p").returncode == 0
    lab = tmp_path / "labeled"
    lab.mkdir()
    rows = []
    for i in range(4):
        Image.new("RGB", (56, 44), (200, 40 + 40 * i, 60)).save(lab / f"l{i}.png")
        rows.append({"image": f"l{i}.png", "question": "Is there a polyp?",
                     "answer": "yes" if i % 2 else "no", "split": "test" if i >= 2 else "train"})
    (lab / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli(home, "import", lab / "m.jsonl", "--project", "p").returncode == 0
    r = cli(home, "caption", "--project", "p", "--endpoint", s["server"].url, "--model", s["model"],
            "--prompt", PROMPT, "--max-tokens", "8")
    assert r.returncode == 0 and "captioned 8 of 8" in r.stdout, r.stderr
    # the generator's step count comes from its seed-QA steps (x (1 + answer_ratio +
    # caption_ratio)), not from max_steps: 2 QA steps train it on the captions for 2 steps too
    small = [f"{stage}.{k}={v}" for stage in ("generator", "finetune")
             for k, v in (("max_steps", 3), ("min_steps", 0), ("batch_size", 4))]
    small += ["generator.min_qa_steps=2", "generator.max_qa_steps=2",
              "finetune.vision_warmup_epochs=0",
              "pseudo.k=2", "pseudo.max_new_tokens=16", "max_new_tokens=4"]
    r = cli(home, "run", "--project", "p", "--method", "leaml", "--json",
            *[a for kv in small for a in ("--set", kv)], timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["method"] == "leaml" and result["n_test"] == 2
    assert get_run(connect(home), result["run_id"])["params"]["n_captions"] == 4
