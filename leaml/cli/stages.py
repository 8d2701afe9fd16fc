"""The single LEAML stages ``generator``, ``pseudo``, ``finetune`` (registered in leaml/cli/main.py).

Thin: the work is in leaml/methods/leaml.py. Between the stages people can review the pending
pairs in the app; ``finetune`` then trains on what they accepted plus the pending pairs at or
above the confidence cut. Each prints a short summary, or with ``--json`` one JSON object as
its last line.
"""
from __future__ import annotations

import argparse
import json
import sys

from leaml.config import fold_overrides


def _print_json(obj) -> None:
    print(json.dumps(obj, default=str), flush=True)


def _overrides(args) -> dict:
    return fold_overrides("leaml", sets=getattr(args, "set", []))


def _shared(p: argparse.ArgumentParser) -> None:
    p.add_argument("--project", required=True, help="project name")
    p.add_argument("--set", action="append", default=[], metavar="GROUP.FIELD=VALUE",
                   help="override a knob, e.g. generator.rho=0.2, pseudo.temperature=0.8, "
                        "finetune.lr=1e-3 (repeatable)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")


def _run(fn, args, **kw) -> dict:
    import torch

    from leaml.methods.pipeline import ProgressBar
    torch.set_num_threads(max(1, args.threads))
    bar = ProgressBar()
    try:
        return fn(args.home, args.project, progress=bar, overrides=_overrides(args), **kw)
    finally:
        bar.close()


def _add_generator(sub, common) -> None:
    text = "LEAML stage: train the QA generator (seed QA + selective caption distillation)"
    p = sub.add_parser("generator", help=text, description=text, parents=[common])
    _shared(p)
    p.add_argument("--label-fraction", type=float, default=1.0, metavar="F",
                   help="use the seed QA of a seeded fraction F of the labeled train images")
    p.add_argument("--seed", type=int, default=0, help="seed of the label subset and training")
    p.add_argument("--base-model", default=None, metavar="REF", help="default: the project's")
    p.add_argument("--rho", type=float, default=None,
                   help="share of neurons per layer that caption steps update (default 0.1)")
    p.add_argument("--no-captions", action="store_true", help="skip caption distillation")
    p.set_defaults(func=cmd_generator)


def cmd_generator(args) -> int:
    from leaml.methods import leaml as leaml_method
    args.set = args.set + ([f"generator.rho={args.rho}"] if args.rho is not None else [])
    args.set += ["generator.captions=false"] if args.no_captions else []
    result = _run(leaml_method.generator_command, args, label_fraction=args.label_fraction,
                  seed=args.seed, base_model=args.base_model)
    if args.json:
        _print_json(result)
    elif result.get("stopped"):
        print("stopped; run the same command again to start over", flush=True)
    else:
        print(f"generator run {result['generator_run']}: {result.get('n_seed_qa')} seed QA, "
              f"{result.get('n_captions')} captions, {result.get('steps')} steps in "
              f"{result.get('seconds')} s", file=sys.stderr, flush=True)
        print(result["generator_run"], flush=True)
    return 0


def _add_pseudo(sub, common) -> None:
    text = "LEAML stage: generate pending pseudo QA for the unlabeled images"
    p = sub.add_parser("pseudo", help=text, description=text, parents=[common])
    _shared(p)
    p.add_argument("--generator-run", type=int, default=None, metavar="ID",
                   help="generator run id (printed by `generator`; default: the newest)")
    p.add_argument("-k", type=int, default=None,
                   help="known questions asked (or QA candidates sampled) per image (default 12)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: the generator's)")
    from leaml.cli.serve import add_from_captions_args  # --from-captions (serve engineer)
    add_from_captions_args(p)
    p.set_defaults(func=cmd_pseudo)


def cmd_pseudo(args) -> int:
    from leaml.methods import leaml as leaml_method
    if args.from_captions:  # QA from teacher captions: leaml/methods/caption_qa.py
        from leaml.cli.serve import cmd_pseudo_from_captions
        return cmd_pseudo_from_captions(args)
    result = _run(leaml_method.pseudo_command, args, generator_run=args.generator_run,
                  k=args.k, seed=args.seed)
    if args.json:
        _print_json(result)
    elif result.get("stopped"):
        print("stopped; run the same command again to continue", flush=True)
    else:
        print(f"generator run {result['generator_run']}: {result['images']} images, "
              f"{result['sampled']} sampled, {result['stored']} pending pairs stored "
              f"(dropped: {result['malformed']} malformed, {result['truncated']} cut off, "
              f"{result['special']} special tokens, {result['duplicate']} duplicates) "
              f"in {result['seconds']} s", flush=True)
    return 0


def _add_finetune(sub, common) -> None:
    text = ("LEAML stage: finetune the target on seed + accepted/edited pseudo QA + pending "
            "pseudo QA above the confidence cut, then evaluate")
    p = sub.add_parser("finetune", help=text, description=text, parents=[common])
    _shared(p)
    p.add_argument("--generator-run", type=int, default=None, metavar="ID",
                   help="whose pending pairs may train (default: the newest generator run)")
    cut = p.add_mutually_exclusive_group()
    cut.add_argument("--min-confidence", type=float, default=None, metavar="C",
                     help="pending pairs with confidence >= C train")
    cut.add_argument("--keep-top", type=float, default=None, metavar="F",
                     help="the most confident fraction F of the pending pairs train (default 0.6)")
    p.add_argument("--mode", choices=("lora", "full"), default=None, help="default lora")
    p.set_defaults(func=cmd_finetune)


def cmd_finetune(args) -> int:
    from leaml.methods import leaml as leaml_method
    from leaml.cli.runs import _report
    result = _run(leaml_method.finetune_command, args, generator_run=args.generator_run,
                  keep_top=args.keep_top, min_confidence=args.min_confidence, mode=args.mode)
    if result.get("stopped"):
        print("stopped; run the same command again to continue", flush=True)
        return 0
    if not args.json:
        _report(result, False)
    _print_json(result)  # the contract: the result object is the last line
    return 0


def cmd_demo_all(args) -> int:
    """``demo`` without --data-only: every method at 1% labels, the table, results files."""
    import torch

    from leaml.methods import report
    from leaml.methods.pipeline import ProgressBar
    torch.set_num_threads(max(1, args.threads))
    seeds = tuple(int(s) for s in str(args.seeds).split(",") if s.strip())
    bar = ProgressBar()
    try:
        report.run_demo(args.home, quick=args.quick, out=args.out, seeds=seeds, progress=bar,
                        log=lambda line: print(line, flush=True))  # bars go to stderr
    finally:
        bar.close()
    return 0
