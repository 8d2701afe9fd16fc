"""What the CLI's command modules share (the only module of leaml/cli/ they import): the JSON
result line, ``--set`` overrides, torch's threads, the reports of a run and of a pass over
images, a per-image progress bar, queueing a command as a background job, and ``--device`` /
``--dtype`` of the commands that load models. Torch-free: ``python -m leaml --help`` stays fast.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from tqdm import tqdm

from leaml.config import fold_overrides
from leaml.jobs import queue as jobs
from leaml.store import connect

CLI_ACTOR = "cli"  # the user name the audit log gives to changes made from the command line


def print_json(obj) -> None:
    """The machine-readable result: one JSON object on the last line of stdout."""
    print(json.dumps(obj, default=str), flush=True)


def parse_overrides(pairs: list[str] | None) -> dict:
    """``--set`` strings as the nested overrides (``leaml.config.fold_overrides`` parses them)."""
    return fold_overrides("", sets=pairs)


def threads(n: int) -> None:
    """CPU threads for torch, and our own progress bars only (no per-file loading bars)."""
    import torch  # torch and transformers: loaded when a command runs, never for --help
    from transformers.utils import logging as hf_logging  # (as above)
    torch.set_num_threads(max(1, n))
    hf_logging.disable_progress_bar()


def report(result: dict, as_json: bool) -> None:
    """A method's result: the accuracy and its breakdowns, or the JSON line."""
    if as_json:
        print_json(result)
        return
    print(f"{result['method']}: accuracy {result['accuracy']:.1f}% on {result['n_test']} test "
          f"questions in {result['seconds']:.0f} s (run {result['run_id']})")
    for group in ("by_category", "by_question_type"):
        cells = ", ".join(f"{k} {v:.1f}" for k, v in result[group].items())
        print(f"  {group[3:]}: {cells}")
    sys.stdout.flush()


def report_failures(info: dict, as_json: bool, line: str) -> int:
    """A pass over images (captions, QA from captions): each failure on stderr, then the JSON
    line or ``line``; exit status 1 when some image failed."""
    for f in info["failures"]:
        print(f"error: {f['name']}: {f['error']}", file=sys.stderr)
    if as_json:
        print_json(info)
    else:
        print(line, flush=True)
    if info["failed"]:
        print(f"error: {info['failed']} image(s) failed; run the same command again to retry "
              "only those", file=sys.stderr)
        return 1
    return 0


class CountBar:
    """A progress callback drawing one tqdm bar of images on stderr."""

    def __init__(self, desc: str):
        self.desc, self.bar = desc, None

    def __call__(self, stage, done, total, loss) -> None:
        if self.bar is None:
            self.bar = tqdm(total=total, desc=self.desc, unit="image", file=sys.stderr)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def queue_background(home, kind: str, project: str, params: dict, *,
                     start_worker: bool = False) -> int:
    """What ``--background`` does: queue the job, say how it will run, print its id as the
    last line of stdout."""
    db = connect(home)
    job_id = jobs.enqueue(db, kind, project, params, user=None)
    if start_worker:
        jobs.ensure_worker(db.home)
        print(f"queued job {job_id}; a background worker runs it", file=sys.stderr)
    else:
        print(f"queued job {job_id}; run it with `python -m leaml worker` (or --once), "
              f"watch it with `python -m leaml jobs show {job_id}`", file=sys.stderr)
    print(job_id, flush=True)
    return job_id


# --- where models run: --device and --dtype ------------------------------------------------------
# Of the commands that load models (run, evaluate, generator, pseudo, finetune, caption, serve):
# where every model of the command runs, training and inference alike. They set the environment
# that leaml/engine/models.py reads (LEAML_DEVICE, LEAML_DTYPE), so the stages, and a job queued
# with them, follow one rule.

DTYPES = ("auto", "float32", "bfloat16", "float16")


def add_device_arguments(p: argparse.ArgumentParser, *, device: bool = True) -> None:
    """Add --device (unless the command has its own) and --dtype to ``p``."""
    if device:
        p.add_argument("--device", default="auto",
                       help="where the models run: 'auto' (default: accelerate's device, a GPU "
                            "when there is one), 'cpu', 'cuda', 'cuda:1' ...")
    p.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="dtype of evaluation, sampling, captioning and serving: 'auto' "
                        "(default: bfloat16 on a GPU that supports it, else float32); "
                        "training keeps float32 weights")


def place_models(args) -> dict:
    """Put the command's --device/--dtype in the environment for every model it loads, and
    have each load say on stderr where it went ("model REF on cuda:0, torch.bfloat16"); return
    the ones asked for (not 'auto'), as a queued job's params."""
    asked = {k: getattr(args, k, "auto") for k in ("device", "dtype")}
    asked = {k: v for k, v in asked.items() if v and v != "auto"}
    for key, value in asked.items():
        os.environ[f"LEAML_{key.upper()}"] = value
    said = logging.getLogger("leaml.engine.models")
    said.setLevel(logging.INFO)
    if not said.handlers and not logging.getLogger().handlers:  # else the root's handler says it
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        said.addHandler(handler)
    return asked
