"""Packed training: all questions of one image in one sequence, against one sequence per QA.

    python bench/bench_pack.py [--images 300] [--steps 20] [--batch 64] [--threads 2]

Demo images (leaml.data.demo.build, built in memory) with every question the demo asks of each, trained
with ``leaml.engine.train.train`` on the committed tiny base, ``pack=False`` (baseline) then
``pack=True``, same model, data, batch size and steps; both losses are the same function (a
test checks it), so examples per second is the whole story. Prints both and the ratio.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from leaml.engine import models  # noqa: E402
from leaml.engine.batches import Example  # noqa: E402
from leaml.data.demo.build import DemoConfig, qa_pairs, sample_scene, scene_rng  # noqa: E402
from leaml.data.demo.draw import render  # noqa: E402
from leaml.engine.train import TrainConfig, train  # noqa: E402


def demo_examples(n_images: int) -> list[Example]:
    cfg = DemoConfig()
    out = []
    for i in range(n_images):
        scene = sample_scene(cfg, "train", i)
        image = render(scene, scene_rng(cfg.seed, "train", i, 1)).convert("RGB")
        out += [Example(image, q, a, open=t != "yes/no") for q, a, t in qa_pairs(scene)]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    examples = demo_examples(args.images)
    print(f"{len(examples)} QA pairs on {args.images} images "
          f"({len(examples) / args.images:.1f} per image), batch {args.batch}, {args.steps} steps")
    rate = {}
    for pack in (False, True):
        model, processor = models.load("tiny")
        config = TrainConfig(mode="full", lr=1e-3, batch_size=args.batch,
                             max_steps=args.steps, pack=pack)
        t0 = time.perf_counter()
        result = train(model, processor, examples, config)
        rate[pack] = args.batch * args.steps / result.seconds
        print(f"pack={pack!s:<5}: {rate[pack]:7.1f} examples/s "
              f"(loop {result.seconds:.1f} s, with setup {time.perf_counter() - t0:.1f} s)")
    print(f"packed / one sequence per QA: {rate[True] / rate[False]:.2f}x")


if __name__ == "__main__":
    main()
