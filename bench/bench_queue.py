"""Benchmark: the review queue at 100,000 pending pseudo QA pairs.

    python bench/bench_queue.py [--rows 100000] [--repeat 200]

Fills a temporary data home (5 categories, random confidences, via add_qa_many), then times
review_queue(limit=50, category=...) (median of many calls) against the naive way (load every
pending pair of the project into Python, filter, sort, take 50), and claim_next. Target: the
queue query under 20 ms at 100k rows.
"""
from __future__ import annotations

import argparse
import hashlib
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from leaml.store import connect, transaction  # noqa: E402
from leaml.store import images, projects, qa  # noqa: E402
from leaml.store.qa_queue import queue_sql  # noqa: E402

CATEGORIES = ("polyp", "ulcer", "esophagitis", "normal", "instrument")
TARGET_MS = 20.0


def fill(db, rows: int, n_images: int, seed: int = 0) -> int:
    """A project with ``n_images`` images and ``rows`` pending pseudo pairs; returns its id."""
    rng = random.Random(seed)
    project = projects.create_project(db, "bench")
    with transaction(db):
        image_ids = [images.add_image(db, project["id"], sha256=hashlib.sha256(str(i).encode()).hexdigest(),
                                      ext=".png", width=64, height=64,
                                      category=CATEGORIES[i % len(CATEGORIES)])[0]
                     for i in range(n_images)]
    pairs = [dict(project_id=project["id"], image_id=image_ids[i % n_images], origin="pseudo",
                  question=f"question {i % 37}?", answer=f"answer {i % 11}",
                  confidence=rng.random(), question_type=("yes/no", "color", "count")[i % 3])
             for i in range(rows)]
    t0 = time.perf_counter()
    qa.add_qa_many(db, pairs, user="bench")
    print(f"add_qa_many: {rows:,} rows in {time.perf_counter() - t0:.2f} s")
    return project["id"]


def naive_queue(db, project_id: int, category: str, limit: int = 50) -> list[dict]:
    """What the index saves us from: every pending row into Python, then filter and sort."""
    pending = list(db.query("SELECT * FROM qa WHERE project_id = ? AND status = 'pending'",
                            [project_id]))
    mine = [r for r in pending if r["category"] == category]
    return sorted(mine, key=lambda r: (r["confidence"], r["id"]), reverse=True)[:limit]


def median_ms(fn, repeat: int) -> float:
    times = []
    for i in range(repeat):
        t0 = time.perf_counter()
        fn(i)
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--images", type=int, default=2_000)
    ap.add_argument("--repeat", type=int, default=200, help="calls per timing (the naive way: 3 to 7)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="leaml-bench-") as home:
        db = connect(home)
        pid = fill(db, args.rows, args.images)
        cat = lambda i: CATEGORIES[i % len(CATEGORIES)]  # noqa: E731
        sql, params = queue_sql(pid, category="polyp")
        plan = " | ".join(r[3] for r in db.execute("EXPLAIN QUERY PLAN " + sql, params))
        print(f"plan: {plan}")
        got = qa.review_queue(db, pid, category="polyp")
        assert [r["id"] for r in got] == [r["id"] for r in naive_queue(db, pid, "polyp")]
        naive_repeat = max(3, min(7, args.repeat // 10))  # each call loads every pending row
        fast = median_ms(lambda i: qa.review_queue(db, pid, limit=50, category=cat(i)), args.repeat)
        naive = median_ms(lambda i: naive_queue(db, pid, cat(i)), naive_repeat)
        any_cat = median_ms(lambda i: qa.review_queue(db, pid, limit=50), args.repeat)
        deep = median_ms(lambda i: qa.review_queue(db, pid, limit=50, category=cat(i),
                                                   offset=5_000), args.repeat)
        count = median_ms(lambda i: qa.count_queue(db, pid, category=cat(i)), args.repeat)
        claim = median_ms(lambda i: qa.claim_next(db, pid, f"reviewer{i}", category=cat(i)),
                          args.repeat)
        near = median_ms(lambda i: qa.claim_next(db, pid, f"near{i}", order="near-cut"),
                         max(3, args.repeat // 10))  # the Review default: ranks every match
        print(f"review_queue(limit=50, category=...): {fast:8.2f} ms (median of {args.repeat})")
        print(f"naive (load, filter, sort in Python): {naive:8.2f} ms "
              f"(median of {naive_repeat})")
        print(f"ratio naive / queue:                  {naive / fast:8.1f}x")
        print(f"review_queue(limit=50), no category:  {any_cat:8.2f} ms")
        print(f"review_queue(..., offset=5000):       {deep:8.2f} ms")
        print(f"count_queue(category=...):            {count:8.2f} ms")
        print(f"claim_next(category=...):             {claim:8.2f} ms (write transaction each)")
        print(f"claim_next(order='near-cut'):          {near:8.2f} ms "
              f"({near / claim:.1f}x the confidence-ordered claim)")
        verdict = "OK" if fast < TARGET_MS else "SLOW"
        print(f"{verdict}: queue {fast:.2f} ms vs target {TARGET_MS:.0f} ms at {args.rows:,} rows")
        db.conn.close()
    return 0 if fast < TARGET_MS else 1


if __name__ == "__main__":
    sys.exit(main())
