"""The ``pretrain-tiny`` and ``build-tiny`` subcommands (registered in leaml/cli/main.py's
ADDERS through ``_add_pretrain_tiny``).

``pretrain-tiny`` rebuilds the embedded tiny base from configs and pretrains it on the general
synthetic corpus (leaml/tiny/pretrain.py); ``build-tiny`` saves an untrained tiny model of any
family in leaml/tiny/build.py's TINY_ARCHS as a folder for ``--base-model``. torch is imported
only when a command runs, so ``--help`` stays fast.
"""
from __future__ import annotations

import argparse
import json


def _steps(text: str) -> dict:
    try:
        a, b, c = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--steps {text!r}: give three integers "
                                         "VISION,ALIGN,INSTRUCT, e.g. 1200,300,2000") from None
    return {"vision": a, "align": b, "instruct": c}


def _weights(text: str) -> dict | str:
    if text == "auto":
        return text
    try:
        pairs = [kv.split("=") for kv in text.split(",")]
        return {k.strip(): float(v) for k, v in pairs}
    except ValueError:
        raise argparse.ArgumentTypeError(f"--qa-weights {text!r}: give 'auto' or TYPE=W pairs, "
                                         "e.g. color=4,position=3") from None


def _add_pretrain_tiny(sub, common) -> None:
    text = "rebuild and pretrain the embedded tiny base model"
    p = sub.add_parser("pretrain-tiny", help=text, description=text, parents=[common])
    p.add_argument("--out", default=None,
                   help="output folder (default: leaml/tiny/assets/tiny, the committed base)")
    p.add_argument("--seed", type=int, default=0, help="seed for scenes, init and sampling")
    p.add_argument("--minutes", type=float, default=40.0,
                   help="wall-clock budget of the three stages (evaluation comes on top)")
    p.add_argument("--steps", type=_steps, default=None,
                   help="exact steps VISION,ALIGN,INSTRUCT (as recorded in PRETRAIN.md) "
                        "instead of a time budget: reproduces a run")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a "
                   "shared 2-core machine)")
    p.add_argument("--device", default="cpu", help="torch device to train on, e.g. cuda where "
                   "a GPU is at hand (default cpu)")
    p.add_argument("--init-from", default="",
                   help="continue from a saved base folder (give its skipped stages 0 steps)")
    p.add_argument("--patch-size", type=int, default=0,
                   help="with --init-from: re-cut the image into patches of this many pixels "
                        "(kernel resized, position embeddings interpolated) before training")
    p.add_argument("--qa-weights", type=_weights, default={},
                   help="question-type sampling weights in stages B/C: 'auto' (each type's "
                        "current error rate) or TYPE=W pairs; default uniform")
    p.add_argument("--lr-lm", type=float, default=None,
                   help="peak learning rate of stages B/C (projector + language model); "
                        "default: PretrainConfig's")
    p.add_argument("--batch-size", type=int, default=None,
                   help="samples per step in every stage; default: PretrainConfig's")
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    p.set_defaults(func=cmd_pretrain_tiny)
    _add_build_tiny(sub, common)


_ARCHS = ("llava", "idefics3", "qwen2_vl")  # leaml/tiny/build.py's TINY_ARCHS (not imported: --help stays fast)


def _add_build_tiny(sub, common) -> None:
    text = ("save an untrained tiny model of one architecture family (random weights, a "
            "tokenizer and processor built locally) as a folder for --base-model")
    p = sub.add_parser("build-tiny", help=text, description=text, parents=[common])
    p.add_argument("--arch", choices=_ARCHS, required=True, help="architecture family")
    p.add_argument("--out", required=True, help="folder to save the model and processor in")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.set_defaults(func=cmd_build_tiny)


def cmd_build_tiny(args) -> int:
    from leaml.engine import models  # torch: loaded when the command runs, not for --help
    from leaml.tiny.build import build_tiny_arch  # torch and transformers, as above
    model, processor = build_tiny_arch(args.arch, seed=args.seed)
    out = models.save(model, processor, args.out)
    print(json.dumps({"arch": args.arch, "model_type": model.config.model_type,
                      "parameters": models.count_params(model), "folder": str(out)}))
    return 0


def cmd_pretrain_tiny(args) -> int:
    from leaml.tiny.pretrain import PretrainConfig, pretrain_tiny  # torch: loaded when it runs
    opts = {} if args.lr_lm is None else {"lr_lm": args.lr_lm}
    if args.batch_size is not None:
        opts["batch_size"] = args.batch_size
    cfg = PretrainConfig(seed=args.seed, minutes=args.minutes, steps=args.steps or {},
                         threads=args.threads, device=args.device, init_from=args.init_from,
                         qa_weights=args.qa_weights, patch_size=args.patch_size, **opts)
    metrics = pretrain_tiny(args.out, cfg)
    if args.json:
        print(json.dumps(metrics, default=str))
    else:
        print(json.dumps(metrics["eval"]["qa_accuracy"]))
    return 0
