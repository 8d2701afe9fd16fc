"""QA from captions (LLaVA-Med self-instruct): parsing, storage as pending pseudo QA under a
caption-qa run, resume, `pseudo --from-captions` against a real `leaml serve`, and the
`run --method caption-qa` recipe against a scripted teacher on 127.0.0.1."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from leaml.methods import caption_qa
from leaml.store import connect
from leaml.store.images import list_images, set_caption
from leaml.store.projects import get_project, update_settings
from leaml.store.qa import list_qa
from leaml.store.runs import get_run, list_runs
from servehelp import Teacher, cli, completion, image_folder, shared

QA_TEXT = ("1. Question: Is there a polyp?\nAnswer: yes\n\n"
           "**Question:** What colour is the polyp?\n**Answer:** pink\n\n"
           "Question: Is there a polyp?\nAnswer: no\n\n"      # repeated question: dropped
           "Question: Where is the <image>?\nAnswer: left\n\n"  # special token: dropped
           "Question: How big is it?\n")                       # cut off: malformed


def qa_answer(body) -> dict:
    """A teacher that writes QA_TEXT for text prompts, with per-character log-probs."""
    if isinstance(body["messages"][0]["content"], list):  # an image: a caption request
        return completion("A pink polyp on the left wall.")
    lp = [{"token": ch, "logprob": -0.1 if i % 2 else -0.3} for i, ch in enumerate(QA_TEXT)]
    return completion(QA_TEXT, lp if body.get("logprobs") else None)


@pytest.fixture
def teacher():
    t = Teacher(default=qa_answer)
    yield t
    t.close()


def test_parse_pairs_keeps_valid_pairs_and_counts_the_rest():
    pairs, stats = caption_qa.parse_pairs(QA_TEXT)
    assert [(p["question"], p["answer"]) for p in pairs] == [
        ("Is there a polyp?", "yes"), ("What colour is the polyp?", "pink")]
    assert stats == {"malformed": 1, "special": 1, "duplicate": 1}
    assert all(p["confidence"] is None for p in pairs)


def test_confidence_is_the_geometric_mean_of_the_answer_tokens():
    text = "Question: Is it red?\nAnswer: yes"
    lp = [{"token": ch, "logprob": -2.0 if i >= text.index("yes") else -0.01}
          for i, ch in enumerate(text)]
    pairs, _ = caption_qa.parse_pairs(text, {"content": lp})
    assert pairs[0]["confidence"] == pytest.approx(2.718281828 ** -2.0, rel=1e-6)


def test_prompt_carries_style_examples_and_question_list(home, tmp_path):
    prompt = caption_qa.qa_prompt("A polyp.", [("Is there a polyp?", "yes")], ["How many polyps"], 2)
    assert "Write 2 different" in prompt and "Question: Is there a polyp?\nAnswer: yes" in prompt
    assert "How many polyps?" in prompt and prompt.endswith("Description: A polyp.")


def captioned_project(home, tmp_path, n: int = 4) -> int:
    r = cli(home, "import", image_folder(tmp_path / "frames", n), "--project", "p")
    assert r.returncode == 0, r.stderr
    db = connect(home)
    pid = get_project(db, "p")["id"]
    for row in list_images(db, pid):
        set_caption(db, row["id"], f"A pink polyp, frame {row['id']}.", source="import")
    update_settings(db, pid, {"questions": ["How many polyps are there?"]})
    return pid


def test_pairs_stored_pending_under_a_caption_qa_run_and_rerun_skips(home, tmp_path, teacher):
    pid = captioned_project(home, tmp_path)
    db = connect(home)
    info = caption_qa.qa_from_captions(db, "p", endpoint=teacher.url, model="teacher", per_image=3)
    assert info["images"] == 4 and info["stored"] == 8 and info["failed"] == 0
    assert info["duplicate"] == 4 and info["special"] == 4 and info["malformed"] == 4
    run = get_run(db, info["run_id"])
    assert run["method"] == "caption-qa" and run["status"] == "succeeded"
    rows = list_qa(db, pid, origin="pseudo")
    assert len(rows) == 8
    assert {(r["status"], r["source"], r["gen_run_id"]) for r in rows} == {
        ("pending", "captions:teacher", info["run_id"])}
    assert all(0 < r["confidence"] < 1 for r in rows)
    assert "How many polyps are there?" in teacher.requests[0]["messages"][0]["content"]
    again = caption_qa.qa_from_captions(db, "p", endpoint=teacher.url, model="teacher")
    assert again["run_id"] == info["run_id"] and again["images"] == 0 and again["skipped_done"] == 4
    assert len(teacher.requests) == 4


def test_failures_name_the_image_and_the_run_goes_on(home, tmp_path):
    captioned_project(home, tmp_path, n=3)
    t = Teacher(["500", "500"], default=qa_answer)
    try:
        info = caption_qa.qa_from_captions(connect(home), "p", endpoint=t.url, model="teacher",
                                           concurrency=1, retries=1, backoff=0.0)
    finally:
        t.close()
    assert info["failed"] == 1 and info["stored"] == 4
    assert info["failures"][0]["name"].startswith("image 1 (frame_0.png)")
    assert get_run(connect(home), info["run_id"])["status"] == "failed"


def test_pseudo_from_captions_cli_against_leaml_serve(tmp_path):
    s = shared()
    # a project of its own in the shared home: the shared 'endo' images must stay uncaptioned
    # for the caption tests, whatever order the tests run in
    r = cli(s["home"], "import", image_folder(tmp_path / "frames"), "--project", "capqa")
    assert r.returncode == 0, r.stderr
    db = connect(s["home"])
    pid = get_project(db, "capqa")["id"]
    for row in list_images(db, pid)[:2]:
        set_caption(db, row["id"], "A small pink polyp.", source="import")
    r = cli(s["home"], "pseudo", "--project", "capqa", "--from-captions", "--endpoint",
            s["server"].url, "--model", s["model"], "--per-image", "2", "--max-tokens", "24",
            "--limit", "2", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert info["images"] == 2 and info["failed"] == 0
    # the tiny writes no "Question:/Answer:" pairs: all it says is dropped, nothing stored wrongly
    run = get_run(db, info["run_id"])
    assert run["method"] == "caption-qa" and run["params"]["model"] == s["model"]
    stored = [q for q in list_qa(db, pid, origin="pseudo") if q["gen_run_id"] == info["run_id"]]
    assert len(stored) == info["stored"]


def manifest_project(home, tmp_path) -> None:
    """6 train images (2 with seed QA, 4 unlabeled, no captions) and 2 test images."""
    folder = tmp_path / "m"
    folder.mkdir()
    rows = []
    for i in range(8):
        Image.new("RGB", (48, 40), (30 * i, 120, 90)).save(folder / f"im{i}.png")
        row = {"image": f"im{i}.png", "split": "test" if i >= 6 else "train"}
        if i < 2 or i >= 6:
            row.update(question="Is there a polyp?", answer="yes" if i % 2 else "no")
        rows.append(row)
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = cli(home, "import", folder / "data.jsonl", "--project", "p")
    assert r.returncode == 0, r.stderr


def test_run_method_caption_qa_end_to_end(home, tmp_path, teacher):
    manifest_project(home, tmp_path)
    r = cli(home, "run", "--project", "p", "--method", "caption-qa", "--json",
            "--set", f"qa.endpoint={teacher.url}", "--set", "qa.model=teacher",
            "--set", "train.max_steps=2", "--set", "train.min_steps=0",
            "--set", "train.batch_size=4", "--set", "max_new_tokens=4", timeout=600)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["method"] == "caption-qa" and result["n_test"] == 2
    db = connect(home)
    pid = get_project(db, "p")["id"]
    assert all(row["caption"] for row in list_images(db, pid))  # captions stage filled them
    pairs = [q for q in list_qa(db, pid, origin="pseudo") if q["gen_run_id"] == result["run_id"]]
    assert len(pairs) == 4 * 2  # the 4 unlabeled train images, 2 valid pairs each
    assert [r["method"] for r in list_runs(db, pid)] == ["caption-qa"]


def test_run_method_caption_qa_without_endpoint_says_how(home, tmp_path):
    from leaml.methods.pipeline import run_method
    manifest_project(home, tmp_path)
    with pytest.raises(ValueError, match="--set qa.endpoint=URL"):
        run_method(home, "p", "caption-qa")
