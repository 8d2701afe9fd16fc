"""The LEAML method: which pairs train the target, and stage-by-stage == one-shot."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from leaml.methods import leaml as leaml_method
from leaml.methods import pipeline
from leaml.data.demo.build import DemoConfig
from leaml.data.ingest import load_demo
from leaml.store import connect
from leaml.store.qa import add_qa_many, edit, get_qa, list_qa, reject
from leaml.store.runs import create_run, finish_run, update_run

# small and fast: a few steps per stage; equality must hold whatever G has learned by then
# (the target's vision warmup: one pass over the images, not the method's 85)
FAST = {"generator": {"min_qa_steps": 4, "max_qa_steps": 4, "batch_size": 4, "caption_ratio": 0.5},
        "pseudo": {"k": 2, "max_new_tokens": 24, "batch_size": 8, "chunk": 3},
        "finetune": {"min_steps": 2, "max_steps": 2, "batch_size": 4, "vision_warmup_epochs": 1.0},
        "max_new_tokens": 4}


@pytest.fixture(scope="module")
def demo_home(tmp_path_factory):
    torch.set_num_threads(2)
    home = tmp_path_factory.mktemp("leaml") / "home"
    db = connect(home)
    load_demo(db, DemoConfig(n_train=8, n_test=1, seed=0))
    db.conn.close()
    return home


@pytest.fixture
def home(demo_home, tmp_path):
    copy = tmp_path / "home"
    shutil.copytree(demo_home, copy)
    return copy


@pytest.fixture(scope="module")
def trained_home(demo_home, tmp_path_factory):
    """The demo home with one generator run (label fraction 0.25, seed 1, FAST) and no pseudo
    pairs yet: trained once, shared by the tests that sample from that generator."""
    home = tmp_path_factory.mktemp("leaml-gen") / "home"
    shutil.copytree(demo_home, home)
    db = connect(home)
    g = leaml_method.generator_command(db, "demo", label_fraction=0.25, seed=1, overrides=FAST)
    db.conn.close()
    return home, g


@pytest.fixture
def gen_home(trained_home, tmp_path):
    """A copy of ``trained_home`` for one test, and its generator's result."""
    copy = tmp_path / "home"
    shutil.copytree(trained_home[0], copy)
    return copy, trained_home[1]


def _pid(db):
    return db.execute("SELECT id FROM projects WHERE name = 'demo'").fetchone()[0]


def _fake_generator_run(db, pid):
    run = create_run(db, pid, method="generator", base_model="tiny", params={"seed": 0})
    update_run(db, run, model_dir="models/none")
    finish_run(db, run, accuracy=None, seconds=0.0)
    return run


def test_rejected_pairs_never_train_and_the_cut_applies_to_pending_only(home):
    db = connect(home)
    pid = _pid(db)
    gen, other = _fake_generator_run(db, pid), _fake_generator_run(db, pid)
    img = db.execute("SELECT id FROM images WHERE split = 'train' ORDER BY id").fetchone()[0]
    confs = [0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]
    ids = add_qa_many(db, [{"project_id": pid, "image_id": img, "question": f"q{i}?", "answer": "a",
                            "origin": "pseudo", "confidence": c, "gen_run_id": gen}
                           for i, c in enumerate(confs)])
    foreign = add_qa_many(db, [{"project_id": pid, "image_id": img, "question": "x?", "answer": "b",
                                "origin": "pseudo", "confidence": 0.99, "gen_run_id": other}])[0]
    reject(db, ids[0], expected_version=1, user="ann")        # most confident, rejected
    edit(db, ids[9], expected_version=1, user="ann", answer="c")  # least confident, edited
    rows, info = leaml_method.target_rows(db, pid, gen, [], keep_top=0.5, min_confidence=None,
                                          cut_per_question=False)  # one cut over all questions
    got = {r["id"] for r in rows}
    assert ids[0] not in got and foreign not in got
    # the cut ranks the 8 pending pairs of this generator run: the top 4 train, + the edited one
    assert got == {ids[1], ids[2], ids[3], ids[4], ids[9]}
    assert info["n_pseudo_pending_kept"] == 4 and info["n_pseudo_reviewed"] == 1
    everything, _ = leaml_method.target_rows(db, pid, gen, [], keep_top=None, min_confidence=0.0)
    assert ids[0] not in {r["id"] for r in everything} and len(everything) == 9
    reviewed_only, _ = leaml_method.target_rows(db, pid, gen, [], keep_top=0.6, min_confidence=None,
                                                use_pending=False)
    assert [r["id"] for r in reviewed_only] == [ids[9]]
    assert get_qa(db, ids[0])["status"] == "rejected"


def test_a_cut_per_question_keeps_the_top_of_each_question(home):
    db = connect(home)
    pid = _pid(db)
    gen = _fake_generator_run(db, pid)
    img = db.execute("SELECT id FROM images WHERE split = 'train' ORDER BY id").fetchone()[0]
    # yes/no answers are confident, list answers are not: a global cut drops "which?" entirely
    confs = {"yes?": [0.99, 0.98, 0.97, 0.96], "which?": [0.5, 0.4, 0.3, 0.2]}
    ids = {q: add_qa_many(db, [{"project_id": pid, "image_id": img, "question": q, "answer": f"a{i}",
                                "origin": "pseudo", "confidence": c, "gen_run_id": gen}
                               for i, c in enumerate(cs)]) for q, cs in confs.items()}
    rows, info = leaml_method.target_rows(db, pid, gen, [], keep_top=0.5, min_confidence=None,
                                          cut_per_question=False)
    assert {r["id"] for r in rows} == set(ids["yes?"]) and info["confidence_cut"] == 0.96
    rows, info = leaml_method.target_rows(db, pid, gen, [], keep_top=0.5, min_confidence=None)
    assert {r["id"] for r in rows} == {*ids["yes?"][:2], *ids["which?"][:2]}
    assert info["n_pseudo_pending_kept"] == 4 and info["confidence_cut"] is None
    with pytest.raises(ValueError, match="keep_top"):
        leaml_method.target_rows(db, pid, gen, [], keep_top=2.0, min_confidence=None)


def _pseudo_pairs(db, gen):
    return sorted((r["image_id"], r["question"], r["answer"], round(r["confidence"], 6))
                  for r in list_qa(db, _pid(db), origin="pseudo") if r["gen_run_id"] == gen)


def _predictions(db, run_id):
    model_dir = Path(db.home) / f"models/run-{run_id}"
    return (model_dir / "predictions.jsonl").read_text()


def _weights(db, run_id):
    from safetensors.torch import load_file
    return load_file(str(Path(db.home) / f"models/run-{run_id}/model.safetensors"))


def _params(db, run_id):
    return json.loads(db.execute("SELECT params FROM runs WHERE id = ?", [run_id]).fetchone()[0])


@pytest.mark.slow
def test_stage_by_stage_equals_one_shot_with_the_same_seed(gen_home):
    home, g = gen_home  # stage 1 (generator_command) ran on a copy of the same demo home
    db = connect(home)
    one = pipeline.run_method(db, "demo", "leaml", label_fraction=0.25, seed=1, overrides=FAST)
    gen_one = _params(db, one["run_id"])["generator_run"]
    assert gen_one != g["generator_run"]
    p = leaml_method.pseudo_command(db, "demo", generator_run=g["generator_run"], overrides=FAST)
    staged = leaml_method.finetune_command(db, "demo", generator_run=g["generator_run"], overrides=FAST)
    assert p["images"] == 6 and p["sampled"] == 6 * 2  # 8 train images, 2 labeled -> 6 unlabeled
    w_one, w_staged = _weights(db, gen_one), _weights(db, g["generator_run"])
    assert w_one.keys() == w_staged.keys() and all(torch.equal(w_one[k], w_staged[k]) for k in w_one)
    first, second = _params(db, gen_one)["pseudo"][0], _params(db, g["generator_run"])["pseudo"][0]
    for key in ("sampled", "stored", "malformed", "truncated", "special", "duplicate"):
        assert first[key] == second[key], key
    assert _pseudo_pairs(db, gen_one) == _pseudo_pairs(db, g["generator_run"])
    for key in ("accuracy", "by_category", "by_question_type", "n_test"):
        assert one[key] == staged[key], key
    assert _predictions(db, one["run_id"]) == _predictions(db, staged["run_id"])
    assert _params(db, staged["run_id"])["target_data"] == _params(db, one["run_id"])["target_data"] | {
        "seconds": _params(db, staged["run_id"])["target_data"]["seconds"]}


def test_choose_mode_stores_only_answers_the_seed_gives_to_that_question(gen_home):
    home, g = gen_home
    db = connect(home)
    over = {**FAST, "pseudo": {**FAST["pseudo"], "answer_mode": "choose"}}
    p = leaml_method.pseudo_command(db, "demo", generator_run=g["generator_run"], overrides=over)
    kept = _params(db, g["generator_run"])["kept_images"]
    seed = {}
    for r in db.query("SELECT question, answer FROM qa WHERE origin = 'seed' AND image_id IN"
                      f" ({','.join('?' * len(kept))})", kept):
        seed.setdefault(r["question"], set()).add(r["answer"])
    pairs = _pseudo_pairs(db, g["generator_run"])
    assert p["stored"] == len(pairs) > 0 and p["sampled"] == 6 * 2
    for _, question, answer, confidence in pairs:
        assert answer in seed[question], (question, answer)
        assert 0 < confidence <= 1


def test_pseudo_answers_in_the_generators_form_after_each_images_caption(gen_home):
    """A generator trained with the answer stream and caption context answers known questions
    as question -> answer after the image's teacher caption; the stage stores exactly that."""
    from leaml.engine import generator
    from leaml.engine import models
    from leaml.engine import pseudo
    from leaml.methods.pseudo_stage import (_allowed_questions, _chunk_seed, _draw_questions, conditional_answers,
                                            generator_data, seed_answers, seed_caption_reliability,
                                            seed_question_counts)
    from leaml.store.images import image_path
    from leaml.engine.train import load_trained
    home, g = gen_home
    db = connect(home)
    gen = _params(db, g["generator_run"])
    assert generator.known_form(gen["config"]) == ("answer", True)
    assert gen["generator"]["n_answers"] == gen["generator"]["n_qa"] > 0
    assert gen["generator"]["caption_context"]
    over = {**FAST, "pseudo": {**FAST["pseudo"], "answer_mode": "choose"}}
    leaml_method.pseudo_command(db, "demo", generator_run=g["generator_run"], overrides=over)
    cfg = pseudo.PseudoConfig(**_params(db, g["generator_run"])["pseudo"][0]["config"])
    run = leaml_method.check_generator_run(db, g["generator_run"])
    model, proc = load_trained(Path(db.home) / run["model_dir"], "tiny")
    data = generator_data(db, run)
    images = data.unlabeled
    assert all(r["caption"] for r in images)
    counts, choices = seed_question_counts(db, data), seed_answers(db, data, cfg.max_choices)
    reliability = seed_caption_reliability(db, data, choices)
    direct, blind = [], []
    for index in range(0, len(images), cfg.chunk):
        chunk = images[index:index + cfg.chunk]
        pv = models.pixel_values(proc, [image_path(db, r) for r in chunk])
        allowed = _allowed_questions(counts, conditional_answers(db, data), [r["caption"] for r in chunk])
        qs = _draw_questions(counts, len(chunk), cfg.k, _chunk_seed(cfg.seed, index // cfg.chunk), allowed)
        for out, contexts in ((direct, [r["caption"] for r in chunk]), (blind, None)):
            got = pseudo.choose_known(model, proc, pv, list(range(len(chunk))), qs, choices, cfg,
                                      pseudo.ParseStats(), form="answer", contexts=contexts,
                                      reliability=reliability)
            out += [(chunk[c.image_index]["id"], c.question, c.answer, round(c.confidence, 6))
                    for c in got]
    assert _pseudo_pairs(db, g["generator_run"]) == sorted(direct)
    assert sorted(direct) != sorted(blind)  # the captions were in the prompts


def test_caption_questions_asks_conditional_questions_only_where_the_caption_names_an_answer(home):
    """caption_questions: a question the seed QA asks of only some images (a polyp's size) is
    asked of an unlabeled image only if its caption names one of that question's answers;
    questions asked of every seed image are asked regardless."""
    from leaml.engine.pseudo import YES_NO, named_choices
    from leaml.methods.pseudo_stage import conditional_answers, generator_data
    db = connect(home)
    g = leaml_method.generator_command(db, "demo", label_fraction=0.5, seed=0, overrides=FAST)
    run = leaml_method.check_generator_run(db, g["generator_run"])
    kept = set(run["params"]["kept_images"])
    seed = [r for r in list_qa(db, _pid(db), origin="seed") if r["image_id"] in kept]
    asked = {}
    for r in seed:
        asked.setdefault(r["question"], set()).add(r["image_id"])
    data = generator_data(db, run)
    cond = conditional_answers(db, data)
    assert cond and set(cond) < set(asked)  # the demo asks some questions of some images only
    for q, answers in cond.items():
        assert len(asked[q]) < len(kept)
        assert answers == sorted({r["answer"] for r in seed if r["question"] == q
                                  and r["answer"].lower() not in YES_NO})
    over = {**FAST, "pseudo": {**FAST["pseudo"], "k": 15, "caption_questions": True}}
    leaml_method.pseudo_command(db, "demo", generator_run=g["generator_run"], overrides=over)
    captions = {r["id"]: r["caption"] for r in data.unlabeled}
    pairs = [r for r in list_qa(db, _pid(db), origin="pseudo") if r["gen_run_id"] == g["generator_run"]]
    by_image = {}
    for r in pairs:
        by_image.setdefault(r["image_id"], set()).add(r["question"])
    assert set(by_image) == set(captions)
    for image, questions in by_image.items():  # k covers every question: exactly the allowed ones
        assert questions == {q for q in asked if q not in cond or named_choices(cond[q], captions[image])}
    assert any(q in cond for qs in by_image.values() for q in qs)  # some were named
    assert any(not set(cond) <= qs for qs in by_image.values())    # and some were not
