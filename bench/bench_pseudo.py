"""Pseudo-QA generation: batched sampling vs one image at a time.

Both paths run the same code (``leaml.engine.pseudo.sample``: generate K candidates per image, parse,
filter, score); only ``batch_size`` differs. Reports sampled candidates per second (each one a
candidate QA pair, parsed or not), kept pairs per second and the speed-up. The images are
demo frames (leaml.data.demo.build), so nothing is downloaded.

    .venv/bin/python bench/bench_pseudo.py [--model REF] [--images 64] [-k 4] [--batch-size 32]

``--model`` is any model ref: 'tiny' (default) or a trained generator's folder, e.g.
``<home>/models/run-<generator run id>``.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _images(n: int, folder: Path) -> list[Path]:
    from leaml.data.demo.build import DemoConfig, build_demo_files
    build_demo_files(folder, DemoConfig(n_train=n, n_test=0, seed=0))
    return sorted((folder / "images").glob("train_*.png"))[:n]


def _run(model, processor, pv, cfg, batch_size: int) -> dict:
    from dataclasses import replace

    from leaml.engine import pseudo
    stats = pseudo.ParseStats()
    cfg = replace(cfg, batch_size=batch_size)
    t0 = time.perf_counter()
    kept = 0
    for i in range(0, len(pv), batch_size):  # one call per batch, as the pseudo stage does
        idx = list(range(i, min(i + batch_size, len(pv))))
        kept += len(pseudo.sample(model, processor, pv[idx[0]:idx[-1] + 1], idx, cfg, cfg.seed + i, stats))
    s = time.perf_counter() - t0
    return {"batch_size": batch_size, "seconds": round(s, 2), "sampled": stats.sampled,
            "kept": kept, "candidates_per_s": round(stats.sampled / s, 2),
            "kept_per_s": round(kept / s, 2)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny", help="model ref (default tiny)")
    ap.add_argument("--images", type=int, default=64, help="images to write QA for (default 64)")
    ap.add_argument("-k", type=int, default=4, help="candidates per image (default 4)")
    ap.add_argument("--batch-size", type=int, default=32, help="images per generate() call")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--single", type=int, default=16,
                    help="images for the one-at-a-time path (slow; default 16)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    import torch

    from leaml.engine import models
    from leaml.engine.pseudo import PseudoConfig
    from leaml.engine.train import load_trained
    torch.set_num_threads(args.threads)
    ref = Path(args.model)
    model, processor = (load_trained(ref, "tiny") if ref.is_dir() else models.load(args.model))
    cfg = PseudoConfig(k=args.k, max_new_tokens=args.max_new_tokens, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        pv = models.pixel_values(processor, _images(args.images, Path(tmp)))
    batched = _run(model, processor, pv, cfg, args.batch_size)
    single = _run(model, processor, pv[:args.single], cfg, 1)
    ratio = batched["candidates_per_s"] / max(single["candidates_per_s"], 1e-9)
    out = {"model": args.model, "k": args.k, "max_new_tokens": args.max_new_tokens,
           "threads": args.threads, "batched": batched, "one_at_a_time": single,
           "speedup": round(ratio, 2)}
    print(f"batched ({args.batch_size} images/call): {batched['candidates_per_s']} candidate QA/s, "
          f"{batched['kept_per_s']} kept/s; one image at a time: {single['candidates_per_s']} "
          f"candidate QA/s; speed-up {ratio:.1f}x", file=sys.stderr)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
