"""What the image path alone can answer: the vision warmup's heads, without and with mirrors.

The vision warmup (``TrainConfig.vision_warmup_*``, leaml/engine/warmup.py) trains the tower
and projector through throw-away max-pooled heads, one score per closed answer word. Read on
the test split, those heads say how much of the demo the 9 image tokens can carry at all: an
upper bound for what the language model can learn to read from them. This runs the warmup's
own ``fit`` twice on the same demo scenes (the baseline and the change, same seed, same
steps) and prints per-question test accuracy and the difference. The change is the mirrors
(``--change flips``: flips off, then on) or small shifts on top of them (``--change shift``:
the four mirrors, then each image also moved by up to ``--shift`` pixels).

    .venv/bin/python bench/bench_vision_heads.py [--change flips|shift] [--shift 4]
        [--steps 4000] [--batch-size 64] [--threads 2]

Scenes come from the demo generator in memory (the default 3000 train / 500 test of
``leaml demo``), so nothing is read from a data home or downloaded.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _split(cfg, split: str, n: int):
    """Images and (image index, question, answer) of ``n`` demo scenes of ``split``."""
    from leaml.data.demo.build import qa_pairs, scene_image
    images, qa = [], []
    for i in range(n):
        scene, image = scene_image(cfg, split, i)
        images.append(image)
        qa += [(i, q, a) for q, a, _ in qa_pairs(scene)]
    return images, qa


def _pixels(processor, images):
    import torch

    from leaml.engine import models
    return torch.cat([models.pixel_values(processor, images[k:k + 256])
                      for k in range(0, len(images), 256)])


def _accuracy(heads, model, pixels, qa, targets) -> dict[str, float]:
    """Per question (and overall): the heads' answer set (words scored > 0, else the best
    word) equals the reference's."""
    import torch

    from leaml.engine.warmup import answer_words, image_features
    model.eval()
    with torch.no_grad():
        logits = torch.cat([heads(image_features(model, pixels[k:k + 256]))
                            for k in range(0, len(pixels), 256)])
    labels = defaultdict(list)
    for j, (q, w) in enumerate(targets.labels):
        labels[q].append((j, w))
    hits = defaultdict(list)
    for img, q, a in qa:
        if q not in labels:
            continue
        score = {w: float(logits[img, j]) for j, w in labels[q]}
        said = {w for w, s in score.items() if s > 0} or {max(score, key=score.get)}
        hits[q].append(said == set(answer_words(a)))
    out = {q: 100 * sum(h) / len(h) for q, h in hits.items()}
    out["overall"] = 100 * sum(sum(h) for h in hits.values()) / sum(len(h) for h in hits.values())
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train", type=int, default=3000, help="demo train scenes (default 3000)")
    ap.add_argument("--test", type=int, default=500, help="demo test scenes (default 500)")
    ap.add_argument("--steps", type=int, default=4000, help="warmup steps per variant")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default="tiny", help="base model ref (default tiny)")
    ap.add_argument("--change", choices=("flips", "shift"), default="flips",
                    help="flips: no mirrors vs mirrors; shift: mirrors vs mirrors + shifts")
    ap.add_argument("--shift", type=int, default=4, help="--change shift: up to this many pixels")
    args = ap.parse_args(argv)
    import torch

    from leaml.engine import models
    from leaml.data.demo.build import DemoConfig
    from leaml.engine.warmup import AnswerTargets, fit
    torch.set_num_threads(args.threads)
    cfg = DemoConfig()
    t0 = time.perf_counter()
    _, processor = models.load(args.model)
    train_images, train_qa = _split(cfg, "train", args.train)
    test_images, test_qa = _split(cfg, "test", args.test)
    train_px, test_px = _pixels(processor, train_images), _pixels(processor, test_images)
    targets = AnswerTargets([q for _, q, _ in train_qa], [a for _, _, a in train_qa],
                            [i for i, _, _ in train_qa])
    print(f"{args.train} train / {args.test} test scenes, {len(targets.questions)} closed "
          f"questions, {len(targets.labels)} answer words ({time.perf_counter() - t0:.0f} s)",
          file=sys.stderr)
    results = {}
    variants = {"flips": [("no flips", False, 0), ("flips", True, 0)],
                "shift": [("flips", True, 0), ("flips+shift", True, args.shift)]}
    for name, flips, shift in variants[args.change]:
        model, _ = models.load(args.model)
        for pname, p in model.named_parameters():  # the image path only, as the warmup does
            p.requires_grad_(models.arch_spec(model).language_model_prefix not in pname
                             and "lm_head" not in pname)
        t = time.perf_counter()
        heads, losses = fit(model, targets, lambda ids: train_px[ids], steps=args.steps,
                            batch_size=args.batch_size, lr=args.lr, flips=flips,
                            shift=shift, seed=args.seed)
        acc = _accuracy(heads, model, test_px, test_qa, targets)
        results[name] = {
            "seconds": round(time.perf_counter() - t, 1), "final_loss": round(losses[-1], 4),
            "accuracy": {k: round(v, 1) for k, v in acc.items()}}
        print(f"{name}: {acc['overall']:.1f}% in {time.perf_counter() - t:.0f} s",
              file=sys.stderr)
    (a, *_), (b, *_) = variants[args.change]
    base, new = results[a]["accuracy"], results[b]["accuracy"]
    print(f"{'question':52s} {a:>9s} {b:>15s} {'diff':>6s}")
    for q in base:
        print(f"{q[:52]:52s} {base[q]:9.1f} {new[q]:15.1f} {new[q] - base[q]:+6.1f}")
    print(f"ratio {b} / {a} (overall): {new['overall'] / base['overall']:.3f}")
    print(json.dumps({"change": args.change, "shift": args.shift, "steps": args.steps,
                      "batch_size": args.batch_size, "seed": args.seed, **results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
