"""The ``run`` and ``evaluate`` subcommands (registered in leaml/cli/main.py's ADDERS).

Thin: the work is in leaml.methods.pipeline. A progress bar per stage goes to stderr; with
``--json`` the result object is the last line of stdout.
"""
from __future__ import annotations

from leaml.cli.common import (add_device_arguments, place_models, queue_background, report,
                              threads)
from leaml.config import fold_overrides
from leaml.store import connect
from leaml.store.projects import get_project
from leaml.store.runs import get_run

METHODS_HELP = "leaml, seed-lora, seed-full, caption-then-seed, caption-qa, zero-shot"


def _add_run(sub, common) -> None:
    text = f"run a method ({METHODS_HELP}) end to end: train, evaluate, store run + metrics"
    p = sub.add_parser("run", help=text, description=text, parents=[common])
    p.add_argument("--project", required=True, help="project name")
    p.add_argument("--method", required=True, help=METHODS_HELP)
    p.add_argument("--label-fraction", type=float, default=1.0, metavar="F",
                   help="use the labels of a seeded random fraction F of the labeled train "
                        "images (e.g. 0.01); the rest count as unlabeled (default 1.0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the label subset and training")
    p.add_argument("--base-model", default=None, metavar="REF",
                   help="'tiny16', 'tiny', a Hugging Face id or a local folder (default: the "
                        "project's)")
    p.add_argument("--set", action="append", default=[], metavar="STAGE.FIELD=VALUE",
                   help="override a hyperparameter, e.g. --set train.lr=1e-3 (repeatable)")
    p.add_argument("--rho", type=float, default=None,
                   help="leaml: share of neurons per layer that caption distillation may update "
                        "(default 0.1; 1.0 = plain caption distillation, an ablation)")
    p.add_argument("--no-captions", action="store_true",
                   help="leaml: train the QA generator without caption distillation (ablation)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    add_device_arguments(p)
    p.add_argument("--background", action="store_true",
                   help="queue as a background job and print its id instead of waiting")
    p.add_argument("--processes", type=int, default=1, metavar="N",
                   help="with --background: the job runs data-parallel on N processes through "
                        "accelerate's launcher, one GPU each (on the CPU with --device cpu); "
                        "in the foreground use `accelerate launch -m leaml run` (default 1)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    p.set_defaults(func=cmd_run)


def cmd_run(args) -> int:
    from leaml.methods import pipeline  # torch: loaded when the command runs, not for --help
    if (args.rho is not None or args.no_captions) and args.method != "leaml":
        raise ValueError("--rho and --no-captions apply to --method leaml only")
    flags = {"rho": args.rho} if args.rho is not None else {}
    flags.update({"captions": False} if args.no_captions else {})
    overrides = fold_overrides(args.method, sets=args.set, options=flags)
    where = place_models(args)
    if args.processes != 1 and not args.background:
        raise ValueError("--processes needs --background; in the foreground run "
                         "`accelerate launch --num_processes N -m leaml run ...`")
    if args.background:
        params = {"method": args.method, "label_fraction": args.label_fraction,
                  "seed": args.seed, "base_model": args.base_model,
                  "stages": pipeline.stage_names(args.method)}
        if overrides:
            params["overrides"] = overrides
        params.update(where)  # the job's process places its models the same way
        if args.processes != 1:
            params["processes"] = args.processes  # checked when queued
        queue_background(args.home, "run", args.project, params, start_worker=True)
        return 0
    threads(args.threads)
    from leaml.engine import spread  # torch, as above
    from leaml.engine.train import train  # torch, as above
    if not spread.start(train):  # under accelerate launch: a follower trained beside the main
        return 0
    bar = pipeline.ProgressBar()
    try:
        result = pipeline.run_method(args.home, args.project, args.method,
                                     label_fraction=args.label_fraction, seed=args.seed,
                                     base_model=args.base_model, progress=bar,
                                     overrides=overrides)
    finally:
        bar.close()
    spread.release()  # not after a failure: the error exits non-zero, the launcher ends the rest
    report(result, args.json)
    return 0


def _add_evaluate(sub, common) -> None:
    text = "re-evaluate a stored run on its project's test split (replaces its metrics)"
    p = sub.add_parser("evaluate", help=text, description=text, parents=[common])
    p.add_argument("--project", default=None, help="project name (checked against the run)")
    p.add_argument("--run", type=int, required=True, help="run id (printed by `run`)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    add_device_arguments(p)
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    p.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args) -> int:
    from leaml.methods import pipeline  # torch: loaded when the command runs, not for --help
    db = connect(args.home)
    run = get_run(db, args.run)
    if args.project is not None and get_project(db, args.project)["id"] != run["project_id"]:
        raise ValueError(f"run {args.run} does not belong to project '{args.project}'")
    place_models(args)
    threads(args.threads)
    bar = pipeline.ProgressBar()
    try:
        result = pipeline.evaluate_run(db, args.run, progress=bar)
    finally:
        bar.close()
    report(result, args.json)
    return 0

