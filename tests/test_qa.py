"""QA pairs: creation, review with versions and claims, undo, the queue, and what trains.

Real SQLite files in tmp_path; the concurrency tests use one connection per thread.
"""
from __future__ import annotations

import json
import threading
import time

import pytest

from leaml.store import ConflictError, NotFoundError, connect
from leaml.store import images, projects, qa
from leaml.store.qa_queue import claim_sql, queue_sql


@pytest.fixture
def proj(db):
    """A project with three train images (categories polyp, polyp, ulcer) and a test image."""
    p = projects.create_project(db, "demo")
    ids = []
    for data, split, cat in ((b"1", "train", "polyp"), (b"2", "train", "polyp"),
                             (b"3", "train", "ulcer"), (b"4", "test", "polyp")):
        sha = images.store_image_file(db.home, data, ".png")
        ids.append(images.add_image(db, p["id"], sha256=sha, ext=".png", width=4, height=4,
                                    split=split, category=cat)[0])
    return {"id": p["id"], "images": ids}


def _pseudo(db, proj, conf, *, image=0, question=None, **kw):
    return qa.add_qa(db, project_id=proj["id"], image_id=proj["images"][image],
                     question=question or f"what is at {conf}?", answer="a polyp",
                     origin="pseudo", confidence=conf, **kw)


def _events(db, qa_id=None, action=None):
    sql, params = "SELECT * FROM events WHERE entity = 'qa'", []
    if qa_id is not None:
        sql, params = sql + " AND entity_id = ?", [qa_id]
    if action is not None:
        sql, params = sql + " AND action = ?", [*params, action]
    return list(db.query(sql + " ORDER BY id", params))


# --- create ---------------------------------------------------------------------------------

def test_add_qa_defaults_and_event(db, proj):
    seed = qa.add_qa(db, project_id=proj["id"], image_id=proj["images"][0], question=" Is there a polyp? ",
                     answer=" yes ", origin="seed", user="doc")
    pseudo = _pseudo(db, proj, 0.7, question_type="yes/no")
    s, p = qa.get_qa(db, seed), qa.get_qa(db, pseudo)
    assert (s["question"], s["answer"], s["status"], s["version"]) == ("Is there a polyp?", "yes", "labeled", 1)
    assert (p["status"], p["confidence"], p["question_type"]) == ("pending", 0.7, "yes/no")
    assert s["category"] == "polyp"  # inherited from the image
    ev = _events(db, seed, "qa.create")
    assert len(ev) == 1 and ev[0]["user"] == "doc" and json.loads(ev[0]["after"])["answer"] == "yes"


@pytest.mark.parametrize("field,value", [("answer", ""), ("answer", "   \n"), ("question", " "),
                                         ("answer", None)])
def test_add_qa_rejects_blank_text_naming_the_field(db, proj, field, value):
    kw = dict(project_id=proj["id"], image_id=proj["images"][0], question="q", answer="a",
              origin="seed")
    with pytest.raises(ValueError, match=f"^{field} is empty"):
        qa.add_qa(db, **{**kw, field: value})
    assert qa.list_qa(db, proj["id"]) == []


def test_add_qa_rejects_bad_origin_status_confidence_image(db, proj):
    kw = dict(project_id=proj["id"], image_id=proj["images"][0], question="q", answer="a")
    with pytest.raises(ValueError, match="origin"):
        qa.add_qa(db, **kw, origin="gold")
    with pytest.raises(ValueError, match="not valid for a seed pair"):
        qa.add_qa(db, **kw, origin="seed", status="pending")
    with pytest.raises(ValueError, match="confidence"):
        qa.add_qa(db, **kw, origin="pseudo", confidence=1.5)
    with pytest.raises(NotFoundError, match="unknown image 999"):
        qa.add_qa(db, **{**kw, "image_id": 999}, origin="seed")
    other = projects.create_project(db, "other")
    with pytest.raises(ValueError, match="belongs to project"):
        qa.add_qa(db, **{**kw, "project_id": other["id"]}, origin="seed")


def test_seed_duplicate_returns_existing_id(db, proj):
    kw = dict(project_id=proj["id"], image_id=proj["images"][0], question="q", answer="a", origin="seed")
    first = qa.add_qa(db, **kw)
    assert qa.add_qa(db, **{**kw, "answer": " a "}) == first
    assert len(qa.list_qa(db, proj["id"])) == 1
    assert len(_events(db, action="qa.create")) == 1


def test_add_qa_many_is_one_transaction_with_one_event(db, proj):
    rows = [dict(project_id=proj["id"], image_id=proj["images"][i % 3], question=f"q{i}",
                 answer="a", origin="pseudo", confidence=i / 100) for i in range(100)]
    rows += [dict(project_id=proj["id"], image_id=proj["images"][0], question="s", answer="a",
                  origin="seed")] * 2
    ids = qa.add_qa_many(db, rows, user="gen")
    assert ids[:100] == list(range(ids[0], ids[0] + 100)) and ids[100] == ids[101]
    assert [qa.get_qa(db, i)["question"] for i in ids[:3]] == ["q0", "q1", "q2"]
    assert len(qa.list_qa(db, proj["id"])) == 101
    (ev,) = _events(db)
    after = json.loads(ev["after"])
    assert ev["action"] == "qa.bulk_create" and ev["user"] == "gen"
    assert after["count"] == 101 and after["duplicates"] == 1
    assert after["origins"] == {"pseudo": 100, "seed": 2}


def test_add_qa_many_maps_stored_seed_pairs_to_their_ids(db, proj):
    kw = dict(project_id=proj["id"], image_id=proj["images"][0], question="q", answer="a")
    stored = qa.add_qa(db, **kw, origin="seed")
    ids = qa.add_qa_many(db, [{**kw, "origin": "seed"}, {**kw, "origin": "test"},
                              {**kw, "origin": "pseudo"}])
    assert ids[0] == stored and len(set(ids)) == 3
    assert json.loads(_events(db, action="qa.bulk_create")[0]["after"])["count"] == 2


def test_add_qa_many_validates_everything_first(db, proj):
    rows = [dict(project_id=proj["id"], image_id=proj["images"][0], question="q", answer="a",
                 origin="pseudo")] * 3
    rows.append({**rows[0], "answer": "  "})
    with pytest.raises(ValueError, match="^row 3: answer is empty"):
        qa.add_qa_many(db, rows)
    assert qa.list_qa(db, proj["id"]) == [] and _events(db) == []


# --- update, versions, review decisions -----------------------------------------------------

def test_update_qa_bumps_version_and_audits(db, proj):
    qa_id = _pseudo(db, proj, 0.5)
    out = qa.update_qa(db, qa_id, expected_version=1, user="ann", answer="an ulcer", category="ulcer")
    assert (out["version"], out["answer"], out["category"]) == (2, "an ulcer", "ulcer")
    (ev,) = _events(db, qa_id, "qa.edit")
    assert json.loads(ev["before"])["answer"] == "a polyp" and json.loads(ev["after"])["version"] == 2
    with pytest.raises(ValueError, match="cannot change origin"):
        qa.update_qa(db, qa_id, expected_version=2, user="ann", origin="seed")
    with pytest.raises(ValueError, match="answer is empty"):
        qa.update_qa(db, qa_id, expected_version=2, user="ann", answer=" ")


def test_stale_version_raises_conflict_and_changes_nothing(db, proj):
    qa_id = _pseudo(db, proj, 0.5)
    qa.update_qa(db, qa_id, expected_version=1, user="bob", answer="b")
    with pytest.raises(ConflictError) as err:
        qa.update_qa(db, qa_id, expected_version=1, user="ann", answer="c")
    msg = str(err.value)
    assert "QA %d was changed by bob at" % qa_id in msg
    assert "(version 2, you had 1); reload and try again" in msg
    assert qa.get_qa(db, qa_id)["answer"] == "b"
    assert len(_events(db, qa_id, "qa.edit")) == 1
    with pytest.raises(ConflictError):
        qa.accept(db, qa_id, expected_version=1, user="ann")


def test_accept_reject_edit(db, proj):
    a, r, e = (_pseudo(db, proj, c) for c in (0.9, 0.8, 0.7))
    out = qa.accept(db, a, expected_version=1, user="ann")
    assert (out["status"], out["reviewed_by"], out["version"]) == ("accepted", "ann", 2)
    assert out["reviewed_at"]
    assert qa.reject(db, r, expected_version=1, user="ann")["status"] == "rejected"
    out = qa.edit(db, e, expected_version=1, user="ann", answer="an ulcer")
    assert (out["status"], out["answer"], out["question"]) == ("edited", "an ulcer", "what is at 0.7?")
    with pytest.raises(ValueError, match="nothing to edit"):
        qa.edit(db, e, expected_version=2, user="ann")
    assert [x["action"] for x in _events(db)][-3:] == ["qa.accept", "qa.reject", "qa.edit"]


def test_review_decisions_on_seed_rows_are_refused(db, proj):
    seed = qa.add_qa(db, project_id=proj["id"], image_id=proj["images"][0], question="q",
                     answer="a", origin="seed")
    with pytest.raises(ValueError, match="is a seed pair; only pseudo pairs"):
        qa.accept(db, seed, expected_version=1, user="doc")
    with pytest.raises(ValueError, match="only pseudo pairs"):
        qa.reject(db, seed, expected_version=1, user="doc")
    with pytest.raises(ValueError, match="Seed labeling page"):
        qa.edit(db, seed, expected_version=1, user="doc", answer="b")
    assert (qa.get_qa(db, seed)["answer"], qa.get_qa(db, seed)["version"]) == ("a", 1)
    # seed labeling changes it (update_qa), and review's undo never reverts that change
    qa.update_qa(db, seed, expected_version=1, user="doc", answer="b")
    assert qa.undo_last(db, user="doc", project_id=proj["id"]) is None
    assert qa.get_qa(db, seed)["answer"] == "b"


def test_decision_releases_claim_and_others_claim_blocks(db, proj):
    qa_id = _pseudo(db, proj, 0.9)
    assert qa.claim_next(db, proj["id"], "bob")["id"] == qa_id
    with pytest.raises(ConflictError, match="being reviewed by bob"):
        qa.accept(db, qa_id, expected_version=1, user="ann")
    out = qa.accept(db, qa_id, expected_version=1, user="bob")
    assert out["locked_by"] is None and out["locked_until"] is None


def test_delete_qa(db, proj):
    qa_id = _pseudo(db, proj, 0.5)
    with pytest.raises(ConflictError):
        qa.delete_qa(db, qa_id, expected_version=7, user="doc")
    qa.delete_qa(db, qa_id, expected_version=1, user="doc")
    with pytest.raises(NotFoundError, match="unknown QA pair"):
        qa.get_qa(db, qa_id)
    (ev,) = _events(db, qa_id, "qa.delete")
    assert json.loads(ev["before"])["answer"] == "a polyp"


def test_list_qa_filters(db, proj):
    seed = qa.add_qa(db, project_id=proj["id"], image_id=proj["images"][1], question="q",
                     answer="a", origin="seed")
    p1, p2 = _pseudo(db, proj, 0.1), _pseudo(db, proj, 0.2)
    qa.reject(db, p2, expected_version=1, user="ann")
    ids = lambda **kw: [r["id"] for r in qa.list_qa(db, proj["id"], **kw)]  # noqa: E731
    assert ids() == [seed, p1, p2]
    assert ids(origin="pseudo") == [p1, p2]
    assert ids(status="rejected") == [p2]
    assert ids(image_id=proj["images"][1]) == [seed]
    assert ids(limit=1) == [seed]


# --- undo -----------------------------------------------------------------------------------

def test_undo_last_reverts_decisions_in_reverse_order(db, proj):
    a, b = _pseudo(db, proj, 0.9), _pseudo(db, proj, 0.8)
    assert qa.undo_last(db, user="ann", project_id=proj["id"]) is None
    qa.accept(db, a, expected_version=1, user="ann")
    qa.edit(db, b, expected_version=1, user="ann", answer="fixed")
    qa.reject(db, b, expected_version=2, user="ann")
    out = qa.undo_last(db, user="ann", project_id=proj["id"])
    assert (out["id"], out["status"], out["answer"]) == (b, "edited", "fixed")
    out = qa.undo_last(db, user="ann", project_id=proj["id"])
    assert (out["id"], out["status"], out["answer"]) == (b, "pending", "a polyp")
    assert out["reviewed_by"] is None and out["locked_by"] == "ann"  # comes up next for ann
    out = qa.undo_last(db, user="ann", project_id=proj["id"])
    assert (out["id"], out["status"]) == (a, "pending")
    assert qa.undo_last(db, user="ann", project_id=proj["id"]) is None
    undos = _events(db, action="qa.undo")
    assert len(undos) == 3 and all("undo_of" in json.loads(e["after"]) for e in undos)


def test_undo_only_own_decisions_and_refuses_after_someone_else_changed(db, proj):
    a = _pseudo(db, proj, 0.9)
    qa.accept(db, a, expected_version=1, user="ann")
    assert qa.undo_last(db, user="bob", project_id=proj["id"]) is None
    qa.edit(db, a, expected_version=2, user="bob", answer="bob's")
    with pytest.raises(ConflictError, match="changed by bob"):
        qa.undo_last(db, user="ann", project_id=proj["id"])
    assert qa.get_qa(db, a)["answer"] == "bob's"


def test_undo_reverts_a_bulk_accept_as_one_step(db, proj):
    single = _pseudo(db, proj, 0.2)
    qa.accept(db, single, expected_version=1, user="ann")
    bulk = [_pseudo(db, proj, c) for c in (0.91, 0.92, 0.93, 0.94)]
    assert qa.bulk_accept(db, proj["id"], min_conf=0.9, user="ann") == 4
    qa.edit(db, bulk[0], expected_version=2, user="bob", answer="bob's")  # changed since
    out = qa.undo_last(db, user="ann", project_id=proj["id"])
    assert (out["bulk"], out["restored"], out["kept"]) == (True, 3, 1)
    assert [qa.get_qa(db, i)["status"] for i in bulk] == ["edited", "pending", "pending",
                                                          "pending"]
    assert qa.get_qa(db, bulk[1])["reviewed_by"] is None
    assert qa.get_qa(db, single)["status"] == "accepted"  # the older decision is untouched
    out = qa.undo_last(db, user="ann", project_id=proj["id"])  # the next step: the single one
    assert (out["id"], out["status"]) == (single, "pending")
    assert qa.undo_last(db, user="ann", project_id=proj["id"]) is None
    assert qa.decisions_by(db, proj["id"], "ann") == 0


# --- queue and claims -----------------------------------------------------------------------

def test_review_queue_order_and_filters(db, proj):
    ids = {c: _pseudo(db, proj, c, image=2 if c in (0.3, 0.6) else 0,
                      question_type="color" if c == 0.5 else None) for c in (0.1, 0.3, 0.5, 0.6, 0.9)}
    qa.accept(db, ids[0.9], expected_version=1, user="ann")
    conf = lambda **kw: [r["confidence"] for r in qa.review_queue(db, proj["id"], **kw)]  # noqa: E731
    assert conf() == [0.6, 0.5, 0.3, 0.1]
    assert conf(order="asc") == [0.1, 0.3, 0.5, 0.6]
    assert conf(category="ulcer") == [0.6, 0.3]
    assert conf(min_conf=0.3, max_conf=0.5) == [0.5, 0.3]
    assert conf(question_type="color") == [0.5]
    assert conf(limit=2, offset=1) == [0.5, 0.3]
    assert conf(gen_run_id=12345) == []
    assert qa.count_queue(db, proj["id"]) == 4
    assert qa.count_queue(db, proj["id"], category="polyp", min_conf=0.2) == 1
    with pytest.raises(ValueError, match="order"):
        qa.review_queue(db, proj["id"], order="random")


@pytest.mark.parametrize("filters,index", [({}, "qa_review"), ({"category": "polyp"}, "qa_review_cat"),
                                           ({"category": "polyp", "min_conf": 0.5, "order": "asc"},
                                            "qa_review_cat"), ({"reviewer": "ann"}, "qa_review")])
def test_review_queue_walks_the_index_without_sorting(db, proj, filters, index):
    sql, params = queue_sql(proj["id"], **filters)
    plan = " | ".join(r[3] for r in db.execute("EXPLAIN QUERY PLAN " + sql, params))
    assert f"USING INDEX {index} " in plan and "TEMP B-TREE" not in plan, plan


def test_claim_lookups_use_indexes(db, proj):
    own, free, params = claim_sql(proj["id"], "ann", category="polyp")
    plan = lambda sql: " | ".join(r[3] for r in db.execute("EXPLAIN QUERY PLAN " + sql, params))  # noqa: E731
    assert "USING INDEX qa_claims " in plan(own)  # not a walk over every pending pair
    assert "USING INDEX qa_review_cat " in plan(free) and "TEMP B-TREE" not in plan(free)


def test_claim_next_gives_each_reviewer_their_own_pair(db, proj):
    hi, mid, lo = _pseudo(db, proj, 0.9), _pseudo(db, proj, 0.5), _pseudo(db, proj, 0.1)
    first = qa.claim_next(db, proj["id"], "ann")
    assert (first["id"], first["locked_by"]) == (hi, "ann")
    assert qa.claim_next(db, proj["id"], "ann")["id"] == hi  # own claim resumes
    assert qa.claim_next(db, proj["id"], "bob")["id"] == mid
    assert [r["id"] for r in qa.review_queue(db, proj["id"], reviewer="bob")] == [mid, lo]
    assert qa.claim_next(db, proj["id"], "ann", exclude_ids=[hi])["id"] == lo  # skip
    assert qa.release_claim(db, hi, "bob") is False
    assert qa.release_claim(db, hi, "ann") is True
    assert qa.claim_next(db, proj["id"], "cyd")["id"] == hi
    assert qa.claim_next(db, proj["id"], "dan") is None
    assert qa.get_qa(db, hi)["version"] == 1  # a claim is not an edit


def test_expired_claim_can_be_taken(db, proj):
    qa_id = _pseudo(db, proj, 0.9)
    assert qa.claim_next(db, proj["id"], "ann", ttl_seconds=0)["id"] == qa_id
    time.sleep(0.002)
    assert qa.claim_next(db, proj["id"], "bob")["id"] == qa_id
    db.execute("UPDATE qa SET locked_until = '2000-01-01T00:00:00+00:00' WHERE id = ?", [qa_id])
    assert qa.claim_next(db, proj["id"], "ann")["locked_by"] == "ann"
    qa.accept(db, qa_id, expected_version=1, user="ann")


def test_bulk_accept_skips_others_claims_and_audits_each_row(db, proj):
    ids = [_pseudo(db, proj, c) for c in (0.95, 0.9, 0.85, 0.5)]
    qa.claim_next(db, proj["id"], "bob")  # holds 0.95
    with pytest.raises(ValueError, match="probability"):
        qa.bulk_accept(db, proj["id"], min_conf=2, user="doc")
    assert qa.bulk_accept(db, proj["id"], min_conf=0.8, user="doc") == 2
    assert [qa.get_qa(db, i)["status"] for i in ids] == ["pending", "accepted", "accepted", "pending"]
    evs = _events(db, action="qa.bulk_accept")
    assert sorted(e["entity_id"] for e in evs) == ids[1:3]
    assert json.loads(evs[0]["after"])["status"] == "accepted"
    assert qa.get_qa(db, ids[1])["version"] == 2


# --- concurrency: one connection per thread -------------------------------------------------

def test_concurrent_edits_same_version_exactly_one_wins(db, proj, home):
    qa_id = _pseudo(db, proj, 0.5)
    barrier, results = threading.Barrier(2), {}

    def work(name):
        conn = connect(home)
        barrier.wait()
        try:
            qa.edit(conn, qa_id, expected_version=1, user=name, answer=f"by {name}")
            results[name] = "won"
        except ConflictError:
            results[name] = "conflict"
        finally:
            conn.conn.close()
    threads = [threading.Thread(target=work, args=(n,)) for n in ("ann", "bob")]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert sorted(results.values()) == ["conflict", "won"]
    winner = next(n for n, r in results.items() if r == "won")
    assert qa.get_qa(db, qa_id)["answer"] == f"by {winner}"
    assert [e["user"] for e in _events(db, qa_id, "qa.edit")] == [winner]


def test_concurrent_claims_never_hand_out_the_same_pair(db, proj, home):
    qa.add_qa_many(db, [dict(project_id=proj["id"], image_id=proj["images"][0], question=f"q{i}",
                             answer="a", origin="pseudo", confidence=0.5) for i in range(40)])
    barrier, got = threading.Barrier(4), {}

    def work(name):
        conn, mine = connect(home), []
        barrier.wait()
        while (pair := qa.claim_next(conn, proj["id"], name, exclude_ids=mine)) is not None:
            mine.append(pair["id"])
        got[name] = mine
        conn.conn.close()
    threads = [threading.Thread(target=work, args=(f"r{i}",)) for i in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    claimed = [i for ids in got.values() for i in ids]
    assert len(claimed) == 40 and len(set(claimed)) == 40


# --- what trains, what tests, summaries -----------------------------------------------------

def test_training_and_test_pairs(db, proj):
    img = proj["images"]
    seed = qa.add_qa(db, project_id=proj["id"], image_id=img[0], question="q", answer="a", origin="seed")
    test = qa.add_qa(db, project_id=proj["id"], image_id=img[3], question="q", answer="a", origin="test")
    acc, rej, edi, hi, lo = (_pseudo(db, proj, c, image=1) for c in (0.5, 0.99, 0.4, 0.8, 0.2))
    qa.accept(db, acc, expected_version=1, user="a")
    qa.reject(db, rej, expected_version=1, user="a")
    qa.edit(db, edi, expected_version=1, user="a", answer="x")
    ids = lambda **kw: [r["id"] for r in qa.training_pairs(db, proj["id"], **kw)]  # noqa: E731
    assert ids() == [seed, acc, edi]
    assert ids(include_pending_min_conf=0.5) == [seed, acc, edi, hi]
    assert ids(include_pending_min_conf=0.0) == [seed, acc, edi, hi, lo]  # never rejected
    assert ids(image_ids=[img[0]]) == [seed]
    row = qa.training_pairs(db, proj["id"])[0]
    assert (row["image_split"], row["category"], len(row["sha256"])) == ("train", "polyp", 64)
    tests = qa.test_pairs(db, proj["id"])
    assert [(t["id"], t["image_split"], t["image_category"]) for t in tests] == [(test, "test", "polyp")]


def test_reviewer_stats_and_calibration(db, proj):
    pairs = [_pseudo(db, proj, c) for c in (0.05, 0.15, 0.95, 0.96, 0.97, 1.0)]
    qa.reject(db, pairs[0], expected_version=1, user="ann")
    qa.edit(db, pairs[1], expected_version=1, user="ann", answer="x")
    qa.accept(db, pairs[2], expected_version=1, user="bob")
    qa.reject(db, pairs[3], expected_version=1, user="bob")
    qa.bulk_accept(db, proj["id"], min_conf=0.97, user="cyd")
    stats = {s["reviewer"]: s for s in qa.reviewer_stats(db, proj["id"])}
    assert {k: stats["ann"][k] for k in ("accepted", "rejected", "edited", "total")} == \
        {"accepted": 0, "rejected": 1, "edited": 1, "total": 2}
    assert stats["cyd"]["accepted"] == 2
    cal = qa.calibration(db, proj["id"], bins=10)
    assert len(cal) == 10 and cal[0]["n"] == 1 and cal[0]["acceptance_rate"] == 0.0
    assert cal[1]["edited"] == 1 and cal[1]["acceptance_rate"] == 0.0 and cal[1]["usable_rate"] == 1.0
    assert (cal[9]["n"], cal[9]["accepted"], cal[9]["acceptance_rate"]) == (2, 1, 0.5)  # bulk left out
    assert cal[9]["lo"] == 0.9 and cal[5]["n"] == 0 and cal[5]["acceptance_rate"] is None
    assert qa.calibration(db, proj["id"], bins=10, exclude_bulk=False)[9]["n"] == 4


def test_image_vocabulary(db, proj):
    img = proj["images"]
    for i, answer in ((0, "yes"), (1, "yes"), (2, "no")):
        qa.add_qa(db, project_id=proj["id"], image_id=img[i], question="polyp?", answer=answer,
                  origin="seed")
    qa.add_qa(db, project_id=proj["id"], image_id=img[0], question="color?", answer="red", origin="seed")
    qa.add_qa(db, project_id=proj["id"], image_id=img[3], question="secret?", answer="t", origin="test")
    _pseudo(db, proj, 0.9, question="pending?")
    vocab = qa.image_vocabulary(db, proj["id"])
    assert vocab["questions"] == ["polyp?", "color?"]
    assert vocab["answers"] == {"polyp?": ["yes", "no"], "color?": ["red"]}
    assert vocab["counts"]["polyp?"] == 3
