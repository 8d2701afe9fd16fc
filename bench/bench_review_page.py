"""How fast the review page shows the next pair with 100,000 pending pairs.

Times (a) the functions the page calls for one pair (claim_next through app_service, the
image path, the queue facets, the bulk count, calibration, reviewer stats) and (b) a whole
AppTest run of pages/review.py after an accept (the script, as a browser rerun would do,
minus the network). Target: the next pair in < 300 ms.

    .venv/bin/python bench/bench_review_page.py [--pending 100000] [--repeats 20]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def build(home: Path, tmp: Path, pending: int):
    from apphelp import add_users, make_project

    from leaml.store import connect, images, qa
    db = connect(home)
    users = add_users(db)
    p = make_project(db, tmp, "bench", n_train=50, n_test=4, labeled=2)
    imgs = [i["id"] for i in images.list_images(db, p["id"], split="train")]
    cats = ["polyp", "normal", "instrument", "esophagitis", "ulcerative colitis"]
    for start in range(0, pending, 10_000):
        rows = [dict(project_id=p["id"], image_id=imgs[i % len(imgs)],
                     question=f"How many polyps are in the image? {i}", answer=str(i % 4),
                     origin="pseudo", confidence=(i * 7919 % 10_000) / 10_000,
                     question_type="count", category=cats[i % 5])
                for i in range(start, min(pending, start + 10_000))]
        qa.add_qa_many(db, rows, user="generator")
    return db, users, p


def ms(f, repeats: int) -> tuple[float, float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times), max(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pending", type=int, default=100_000)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-review-"))
    home = tmp / "home"
    home.mkdir()
    os.environ["LEAML_HOME"] = str(home)
    t0 = time.perf_counter()
    db, users, p = build(home, tmp, args.pending)
    print(f"built {args.pending} pending pairs in {time.perf_counter() - t0:.1f} s")

    from leaml.app import service as app_service
    from leaml.store import images, qa
    ann = users["annotator"]

    def next_pair():  # what the page does for the pair itself: claim, decide, claim again
        pair = app_service.next_pair(db, ann, p["id"], order="desc")
        images.image_path(db, pair["image_id"])
        return pair

    def decide_and_next():
        pair = next_pair()
        app_service.decide(db, ann, pair["id"], "accept", expected_version=pair["version"])
        next_pair()

    def side_panels():
        app_service.review_filter_options(db, ann, p["id"])
        app_service.count_bulk(db, ann, p["id"], 0.95)
        app_service.calibration(db, ann, p["id"])
        app_service.reviewer_stats(db, ann, p["id"])

    rows = [("claim next pair (+ image path)", ms(next_pair, args.repeats)),
            ("accept + claim next", ms(decide_and_next, args.repeats)),
            ("side panels (facets, bulk count, calibration, stats)",
             ms(side_panels, max(3, args.repeats // 4)))]

    from streamlit.testing.v1 import AppTest
    at = AppTest.from_file(str(ROOT / "pages" / "review.py"), default_timeout=60)
    at.session_state["user"] = ann
    at.session_state["project_name"] = "bench"
    at.run()

    def page_after_accept():
        [b for b in at.button if b.label == "Accept"][0].click()
        at.run()
        assert not at.exception, at.exception

    rows.append(("whole page rerun after an accept (AppTest)", ms(page_after_accept,
                                                                   max(3, args.repeats // 4))))
    print(f"{'what':55s} {'median ms':>10s} {'max ms':>8s}")
    for name, (med, worst) in rows:
        print(f"{name:55s} {med:10.1f} {worst:8.1f}")
    print(f"pending left: {qa.count_queue(db, p['id'])}")


if __name__ == "__main__":
    main()
