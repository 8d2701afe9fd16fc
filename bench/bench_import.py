"""Import throughput: leaml.data.ingest.import_path against a naive row-by-row importer.

    python bench/bench_import.py [--n-train 3000 --n-test 500] [--seed 0]

Builds the demo set (leaml.data.demo.build) in a temporary folder, then imports it into two fresh data
homes: once with :func:`leaml.data.ingest.import_path` (validate everything, decode each image
once, one transaction), once with a naive baseline that does what a first version would do
(per manifest row: decode the image to validate it, decode it again for its size, store it,
insert the image and the QA pair each in its own committed transaction). Prints images/s
for both, the ratio, and one JSON line.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from leaml.data.demo.build import DemoConfig, build_demo_files  # noqa: E402
from leaml.data.ingest import import_path  # noqa: E402
from leaml.store import connect  # noqa: E402
from leaml.store.images import add_image, store_image_file  # noqa: E402
from leaml.store.projects import ensure_project  # noqa: E402
from leaml.store.qa import add_qa  # noqa: E402


def naive_import(db, manifest: Path, project: str) -> int:
    """Row by row, a commit per insert, each image decoded twice; returns distinct images."""
    pid = ensure_project(db, project)["id"]
    seen = set()
    for line in manifest.read_text().splitlines():
        rec = json.loads(line)
        path = manifest.parent / rec["image"]
        data = path.read_bytes()
        with Image.open(path) as im:      # decode 1: "is it an image?"
            im.load()
        with Image.open(path) as im:      # decode 2: "how big is it?"
            im.load()
            width, height = im.size
        sha = store_image_file(db.home, data, path.suffix)
        image_id, _ = add_image(db, pid, sha256=sha, ext=path.suffix, width=width,
                                height=height, split=rec.get("split", "train"),
                                category=rec.get("category"), caption=rec.get("caption"),
                                source_name=rec["image"])
        seen.add(hashlib.sha256(data).hexdigest())
        if rec.get("question"):
            add_qa(db, project_id=pid, image_id=image_id, question=rec["question"],
                   answer=rec["answer"], origin="test" if rec.get("split") == "test" else "seed",
                   question_type=rec.get("question_type"), category=rec.get("category"),
                   source="import")
    return len(seen)


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-train", type=int, default=3000, help="train images of the demo set")
    ap.add_argument("--n-test", type=int, default=500, help="test images of the demo set")
    ap.add_argument("--seed", type=int, default=0, help="seed of the demo set")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="leaml-bench-") as tmp:
        tmp = Path(tmp)
        cfg = DemoConfig(n_train=args.n_train, n_test=args.n_test, seed=args.seed)
        build_s, manifest = timed(lambda: build_demo_files(tmp / "src", cfg))
        rows = sum(1 for _ in open(manifest))
        print(f"demo set: {args.n_train + args.n_test} images, {rows} manifest rows"
              f" (built in {build_s:.1f} s)")
        ours_s, report = timed(lambda: import_path(connect(tmp / "a"), manifest, "bench"))
        naive_s, n_naive = timed(lambda: naive_import(connect(tmp / "b"), manifest, "bench"))
    n = report.images_added
    assert n == n_naive, (n, n_naive)
    ours, naive = n / ours_s, n / naive_s
    print(f"import_path : {ours_s:7.2f} s  {ours:8.1f} images/s  ({report.qa_added} QA)")
    print(f"naive       : {naive_s:7.2f} s  {naive:8.1f} images/s")
    print(f"speed-up    : {ours / naive:.1f}x")
    print(json.dumps({"images": n, "rows": rows, "import_s": round(ours_s, 3),
                      "naive_s": round(naive_s, 3), "images_per_s": round(ours, 1),
                      "naive_images_per_s": round(naive, 1), "ratio": round(ours / naive, 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
