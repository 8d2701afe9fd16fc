"""The ``import``, ``export`` and ``demo`` subcommands (registered in leaml/cli/main.py's ADDERS).

Thin: arguments in, :mod:`leaml.data.ingest` / :mod:`leaml.data.export` called, one summary line out.
A rejected import prints each bad row as one ``error: FILE:ROW: ...`` line on stderr and
exits 2 with the database unchanged; an import that fails for another reason (disk, database)
prints one ``error:`` line naming the file and the log with the details, and exits 1, the
database again unchanged.
"""
from __future__ import annotations

import argparse
import sys

from leaml.cli.common import CLI_ACTOR
from leaml.data.checks import DEFAULT_MAX_PIXELS
from leaml.data.demo.build import DemoConfig
from leaml.data.demo.projects import load_demo_projects
from leaml.data.export import export_project
from leaml.data.ingest import ImportFailed, ImportRejected, import_path
from leaml.store import connect

EXIT_REJECTED = 2
EXIT_FAILED = 1


def _add_import(sub, common) -> None:
    text = "import a manifest (JSONL/CSV), a Kvasir-VQA parquet file, a folder or a zip"
    p = sub.add_parser("import", help=text, description=text, parents=[common])
    p.add_argument("path", help="manifest .jsonl/.csv (columns image, question, answer, split,"
                   " category, question_type, caption; confidence and source for pseudo pairs"
                   " made elsewhere), .parquet, folder of images, or .zip")
    p.add_argument("--project", required=True, help="project name; created if missing")
    p.add_argument("--skip-invalid", action="store_true",
                   help="import the valid rows and list the rejected ones (default: all or nothing)")
    p.add_argument("--base-model", default=None,
                   help="base model of a new project: 'tiny16' (default), 'tiny', a HF id or "
                        "a local path")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help="refuse images with more pixels than this (decompression bombs)")
    p.set_defaults(func=cmd_import)


def cmd_import(args: argparse.Namespace) -> int:
    db = connect(args.home)
    try:
        report = import_path(db, args.path, args.project, skip_invalid=args.skip_invalid,
                             user=CLI_ACTOR, base_model=args.base_model,
                             max_pixels=args.max_pixels)
    except ImportRejected as exc:
        for err in exc.report.errors:
            print(f"error: {err}", file=sys.stderr)
        print(f"error: {exc.report.rejected} invalid row(s), nothing imported; fix them or"
              " pass --skip-invalid to import the valid rows", file=sys.stderr)
        return EXIT_REJECTED
    except ImportFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    _print_report(report, skipped=True)
    return 0


def _print_report(report, *, skipped: bool) -> None:
    for note in report.notes:
        print(f"note: {note}", file=sys.stderr)
    for err in report.errors if skipped else []:
        print(f"skipped: {err}", file=sys.stderr)
    print(report.summary(), flush=True)


def _add_export(sub, common) -> None:
    text = "export the curated QA of a project as JSONL + images and parquet"
    p = sub.add_parser("export", help=text, description=text, parents=[common])
    p.add_argument("out", help="folder to write manifest.jsonl, images/ and data.parquet into")
    p.add_argument("--project", required=True, help="project name")
    p.add_argument("--with-test", action="store_true", help="also export the test pairs")
    p.add_argument("--with-unlabeled", action="store_true",
                   help="also export images without curated QA (as rows without QA)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier export in OUT (default: OUT must be new or empty)")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    report = export_project(connect(args.home), args.project, args.out,
                            with_test=args.with_test, with_unlabeled=args.with_unlabeled,
                            overwrite=args.overwrite, user=CLI_ACTOR)
    print(report.summary(), flush=True)
    return 0


def _add_demo(sub, common) -> None:
    text = ("build the bundled demo project 'demo'; without --data-only, run every method at 1%% "
            "labels on project 'demo-table' (1500 train / 150 test demo images)")
    p = sub.add_parser("demo", help=text, description=text, parents=[common])
    p.add_argument("--data-only", action="store_true",
                   help="only build the synthetic demo images and import them into projects 'demo' "
                        "(every train image labeled) and 'demo-1pct' (1%% labeled)")
    p.add_argument("--n-train", type=int, default=3000, help="train images of the demo set")
    p.add_argument("--n-test", type=int, default=500, help="test images of the demo set")
    p.add_argument("--seed", type=int, default=0, help="seed of the demo set")
    p.add_argument("--quick", action="store_true",
                   help="every method on a smaller demo project 'demo-quick' (< 3 minutes)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="where results.json and results.html go (default: the data home)")
    p.add_argument("--seeds", default="0", metavar="S,S,...",
                   help="run seeds of every method; the table shows their mean (default 0)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    if not args.data_only:  # every method at 1% labels: leaml/methods/report.py
        return cmd_demo_all(args)
    cfg = DemoConfig(n_train=args.n_train, n_test=args.n_test, seed=args.seed)
    print(f"demo data: {cfg.n_train} train + {cfg.n_test} test images as projects 'demo' (all"
          " labeled) and 'demo-1pct' (1% labeled), built and imported unless they hold them"
          " already ...", file=sys.stderr, flush=True)
    for name, report in load_demo_projects(connect(args.home), cfg, user=CLI_ACTOR).items():
        if report is None:
            print(f"project '{name}' already holds the demo data; nothing to do", flush=True)
        else:
            _print_report(report, skipped=True)
    return 0


def cmd_demo_all(args) -> int:
    """``demo`` without --data-only: every method at 1% labels, the table, results files."""
    import torch  # torch and the methods: loaded when the command runs, not for --help

    from leaml.methods import report  # (as above)
    from leaml.methods.pipeline import ProgressBar  # (as above)
    torch.set_num_threads(max(1, args.threads))
    seeds = tuple(int(s) for s in str(args.seeds).split(",") if s.strip())
    bar = ProgressBar()
    try:
        report.run_demo(args.home, quick=args.quick, out=args.out, seeds=seeds, progress=bar,
                        log=lambda line: print(line, flush=True))  # bars go to stderr
    finally:
        bar.close()
    return 0
