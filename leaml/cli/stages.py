"""The single LEAML stages ``generator``, ``pseudo`` (also ``pseudo --from-captions``),
``finetune`` (registered in leaml/cli/main.py).

Thin: the work is in leaml/methods/leaml.py. Between the stages people can review the pending
pairs in the app; ``finetune`` then trains on what they accepted plus the pending pairs at or
above the confidence cut. Each prints a short summary, or with ``--json`` one JSON object as
its last line.
"""
from __future__ import annotations

import argparse
import os
import sys

from leaml.cli.common import (CLI_ACTOR, CountBar, add_device_arguments, place_models,
                              print_json, report, report_failures)
from leaml.config import fold_overrides
from leaml.serve.limits import API_KEY_ENV
from leaml.store import connect


def _overrides(args) -> dict:
    return fold_overrides("leaml", sets=getattr(args, "set", []))


def _shared(p: argparse.ArgumentParser) -> None:
    p.add_argument("--project", required=True, help="project name")
    p.add_argument("--set", action="append", default=[], metavar="GROUP.FIELD=VALUE",
                   help="override a knob, e.g. generator.rho=0.2, pseudo.temperature=0.8, "
                        "finetune.lr=1e-3 (repeatable)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    add_device_arguments(p)
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")


def _run(fn, args, **kw) -> dict:
    import torch  # torch: loaded when the command runs, not for --help
    place_models(args)

    from leaml.methods.pipeline import ProgressBar  # torch, as above
    from leaml.engine import spread  # torch, as above
    from leaml.engine.train import train  # torch, as above
    torch.set_num_threads(max(1, args.threads))
    if not spread.start(train):  # under accelerate launch: a follower trained beside the main
        raise SystemExit(0)
    bar = ProgressBar()
    try:
        result = fn(args.home, args.project, progress=bar, overrides=_overrides(args), **kw)
    finally:
        bar.close()
    spread.release()  # not after a failure: the error exits non-zero, the launcher ends the rest
    return result


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
    from leaml.methods import leaml as leaml_method  # torch: loaded when the command runs
    args.set = args.set + ([f"generator.rho={args.rho}"] if args.rho is not None else [])
    args.set += ["generator.captions=false"] if args.no_captions else []
    result = _run(leaml_method.generator_command, args, label_fraction=args.label_fraction,
                  seed=args.seed, base_model=args.base_model)
    if args.json:
        print_json(result)
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
    p.add_argument("--engine", choices=("hf", "vllm"), default=None,
                   help="what samples: 'hf' (transformers, the default) or 'vllm' (fast, if vLLM "
                        "is installed: optional, one process; docs/GPU.md); = --set pseudo.engine=")
    add_from_captions_args(p)
    p.set_defaults(func=cmd_pseudo)


def cmd_pseudo(args) -> int:
    if args.from_captions:  # QA from teacher captions: leaml/methods/caption_qa.py
        return cmd_pseudo_from_captions(args)
    from leaml.methods import leaml as leaml_method  # torch: loaded when the command runs
    args.set = args.set + ([f"pseudo.engine={args.engine}"] if args.engine else [])
    result = _run(leaml_method.pseudo_command, args, generator_run=args.generator_run,
                  k=args.k, seed=args.seed)
    if args.json:
        print_json(result)
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
    from leaml.methods import leaml as leaml_method  # torch: loaded when the command runs
    result = _run(leaml_method.finetune_command, args, generator_run=args.generator_run,
                  keep_top=args.keep_top, min_confidence=args.min_confidence, mode=args.mode)
    if result.get("stopped"):
        print("stopped; run the same command again to continue", flush=True)
        return 0
    if not args.json:
        report(result, False)
    print_json(result)  # the contract: the result object is the last line
    return 0


# --- pseudo --from-captions: QA from teacher captions (leaml/methods/caption_qa.py) ----------

def add_from_captions_args(p: argparse.ArgumentParser) -> None:
    """The options of ``pseudo --from-captions``, added to the ``pseudo`` parser."""
    g = p.add_argument_group("QA from captions (instead of the LEAML generator)")
    g.add_argument("--from-captions", action="store_true",
                   help="ask a text model at --endpoint to turn each unlabeled image's caption "
                        "into QA pairs (LLaVA-Med self-instruct); stored pending, source "
                        "'captions:<model>', under a 'caption-qa' run")
    g.add_argument("--endpoint", default=None, metavar="URL", help="OpenAI-compatible server")
    g.add_argument("--model", default=None, metavar="NAME", help="model name the endpoint serves")
    g.add_argument("--api-key", default=None, metavar="KEY",
                   help=f"sent as 'Authorization: Bearer KEY' (default ${API_KEY_ENV}, if set)")
    g.add_argument("--per-image", type=int, default=3, help="QA pairs per caption (default 3)")
    g.add_argument("--concurrency", type=int, default=4, help="requests in flight (default 4)")
    g.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    g.add_argument("--retries", type=int, default=3, help="tries after the first")
    g.add_argument("--max-tokens", type=int, default=400, help="longest answer per request")
    g.add_argument("--temperature", type=float, default=0.7, help="sampling temperature")
    g.add_argument("--limit", type=int, default=None, help="at most this many images this pass")


def cmd_pseudo_from_captions(args) -> int:
    from leaml.methods import caption_qa  # torch (with the methods): loaded when the command runs
    if not args.endpoint or not args.model:
        raise ValueError("--from-captions needs --endpoint URL and --model NAME")
    bar = CountBar("qa")
    try:
        info = caption_qa.qa_from_captions(
            connect(args.home), args.project, endpoint=args.endpoint, model=args.model,
            per_image=args.per_image, concurrency=args.concurrency, timeout=args.timeout,
            retries=args.retries, max_tokens=args.max_tokens, temperature=args.temperature,
            seed=args.seed or 0, limit=args.limit, progress=bar, user=CLI_ACTOR,
            api_key=args.api_key or os.environ.get(API_KEY_ENV))
    finally:
        bar.close()
    line = (f"caption-qa run {info['run_id']}: {info['stored']} pending pairs from "
            f"{info['images']} caption(s), {info['failed']} failed (dropped: {info['malformed']} "
            f"malformed, {info['special']} special tokens, {info['duplicate']} duplicates) "
            f"in {info['seconds']} s")
    return report_failures(info, args.json, line)
