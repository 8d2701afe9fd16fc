"""Training throughput: leaml.engine.train's loop against plain forward+backward on pre-collated tensors.

    python bench/bench_train.py [--model tiny] [--mode full|lora] [--batch 32] [--steps 20]
                                [--rounds 3] [--threads 2]

The limit is the same model, optimizer and batch size with every batch collated once before
timing (no data work at all); ours includes batch assembly from the image tensor cache and the
token cache, the accelerate wrapper, clipping and the schedule. Rounds alternate between the
two so that other load on a shared machine hits both alike; the best round of each is
compared, and CPU seconds per sample (which other processes disturb less) are printed too.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from leaml.engine import models  # noqa: E402
from leaml.engine.batches import Example  # noqa: E402
from leaml.engine.train import TrainConfig, prepare_model, train  # noqa: E402

QUESTIONS = [("Are there any abnormalities in the image?", "polyp, ulcerative colitis"),
             ("How many polyps are in the image?", "2"),
             ("Does this image contain any finding?", "yes"),
             ("What color is the abnormality?", "pink, red")]


def examples(n: int, seed: int = 0) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        arr = (torch.rand(80, 96, 3, generator=g) * 255).to(torch.uint8).numpy()
        q, a = QUESTIONS[i % len(QUESTIONS)]
        out.append(Example(Image.fromarray(arr), q, a))
    return out


def plain(model, processor, data, cfg: TrainConfig, steps: int) -> tuple[float, float]:
    """Seconds and CPU seconds of ``steps`` bare steps on batches collated before timing."""
    model = prepare_model(copy.deepcopy(model), cfg)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    b = cfg.batch_size
    batches = [models.encode(processor, [e.image for e in data[i:i + b]],
                             [e.instruction for e in data[i:i + b]], [e.target for e in data[i:i + b]])
               for i in range(0, len(data) - b + 1, b)]
    t0, c0 = time.perf_counter(), time.process_time()
    for s in range(steps):
        loss = model(**batches[s % len(batches)]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0, time.process_time() - c0


def ours(model, processor, data, cfg: TrainConfig) -> tuple[float, float]:
    """Seconds and CPU seconds of the loop after its first step (caches are built by then)."""
    marks = {}

    def progress(stage, step, total, loss):
        if step == 1:
            marks["t1"], marks["c1"] = time.perf_counter(), time.process_time()
    train(copy.deepcopy(model), processor, data, cfg, progress=progress)
    return time.perf_counter() - marks["t1"], time.process_time() - marks["c1"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny", help="model ref (default: the committed tiny base)")
    ap.add_argument("--mode", default="full", choices=["full", "lora"])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, processor = models.load(args.model)
    data = examples(args.batch * 4)
    cfg = TrainConfig(mode=args.mode, lr=1e-4, batch_size=args.batch, max_steps=args.steps + 1)
    plain(model, processor, data, cfg, 2)  # warm-up
    best_p, best_o = (float("inf"), 0.0), (float("inf"), 0.0)
    for r in range(args.rounds):
        p = plain(model, processor, data, cfg, args.steps)
        o = ours(model, processor, data, cfg)
        best_p, best_o = min(best_p, p), min(best_o, o)
        print(f"round {r}: plain {args.steps * args.batch / p[0]:.1f} samples/s, "
              f"ours {args.steps * args.batch / o[0]:.1f} samples/s", flush=True)
    n = args.steps * args.batch
    sp, so = n / best_p[0], n / best_o[0]
    print(f"model={args.model} params={models.count_params(model)} mode={args.mode} "
          f"batch={args.batch} threads={args.threads}")
    print(f"plain forward+backward (limit): {sp:.1f} samples/s, {1000 * best_p[1] / n:.2f} CPU-ms/sample")
    print(f"leaml.engine.train loop:               {so:.1f} samples/s, {1000 * best_o[1] / n:.2f} CPU-ms/sample")
    print(f"ratio ours/limit: {so / sp:.0%} (wall), {best_p[1] / best_o[1]:.0%} (CPU time)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
