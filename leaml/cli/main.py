"""``python -m leaml``: a thin argparse layer over the library.

Each subcommand is one ``_add_<name>`` function that declares its arguments and one
``cmd_<name>`` function that calls into ``leaml`` and prints. Errors the user can fix
(bad input, unknown project, conflicts) print one line on stderr and exit non-zero;
nothing here holds logic of its own.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from leaml.store import StoreError

EXIT_USAGE = 2


def _common() -> argparse.ArgumentParser:
    """Options every subcommand takes (so ``--home`` works before or after the command)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--home", default=argparse.SUPPRESS,
                        help="data home folder (default: $LEAML_HOME, else ./data)")
    return common


# --- subcommands: one _add_<name>(sub, common) + cmd_<name>(args) pair each, listed in ADDERS -

def build_parser() -> argparse.ArgumentParser:
    common = _common()
    parser = argparse.ArgumentParser(
        prog="python -m leaml", parents=[common],
        description="LEAML Studio: label-efficient adaptation of vision-language models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in ADDERS:
        add(sub, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse, dispatch, and turn expected errors into one line on stderr and a non-zero exit."""
    args = build_parser().parse_args(argv)
    if not hasattr(args, "home"):
        args.home = None
    try:
        return int(args.func(args) or 0)
    except (StoreError, ValueError, FileNotFoundError, PermissionError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


# The subcommands live in one leaml/cli/<area>.py module per area (none imports another; what
# they share is in leaml/cli/common.py); this list is the order --help shows them in.
from leaml.cli.data import _add_demo, _add_export, _add_import  # noqa: E402
from leaml.cli.jobs import _add_jobs, _add_worker  # noqa: E402
from leaml.cli.stages import _add_finetune, _add_generator, _add_pseudo  # noqa: E402
from leaml.cli.pretrain import _add_pretrain_tiny  # noqa: E402
from leaml.cli.runs import _add_evaluate, _add_run  # noqa: E402
from leaml.cli.serve import _add_caption, _add_serve  # noqa: E402
from leaml.cli.simulate import _add_simulate_review  # noqa: E402
from leaml.cli.users import _add_users  # noqa: E402

ADDERS: list[Callable] = [
    _add_demo, _add_import, _add_export,                # data in and out
    _add_run, _add_evaluate,                            # methods end to end, scoring
    _add_generator, _add_pseudo, _add_finetune,         # LEAML's single stages
    _add_simulate_review,                               # what review decisions are worth
    _add_worker, _add_jobs,                             # background jobs
    _add_caption, _add_serve,                           # teacher captions, serving
    _add_users, _add_pretrain_tiny,                     # accounts, the embedded base
]
