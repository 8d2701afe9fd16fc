"""``--device`` and ``--dtype`` of the commands that load models (run, evaluate, generator,
pseudo, finetune, caption, serve): where every model of the command runs, training and
inference alike. Torch-free: they set the environment that leaml/engine/models.py reads
(LEAML_DEVICE, LEAML_DTYPE), so the stages, and a job queued with them, follow one rule."""
from __future__ import annotations

import argparse
import logging
import os
import sys

DTYPES = ("auto", "float32", "bfloat16", "float16")


def add_arguments(p: argparse.ArgumentParser, *, device: bool = True) -> None:
    """Add --device (unless the command has its own) and --dtype to ``p``."""
    if device:
        p.add_argument("--device", default="auto",
                       help="where the models run: 'auto' (default: accelerate's device, a GPU "
                            "when there is one), 'cpu', 'cuda', 'cuda:1' ...")
    p.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="dtype of evaluation, sampling, captioning and serving: 'auto' "
                        "(default: bfloat16 on a GPU that supports it, else float32); "
                        "training keeps float32 weights")


def apply(args) -> dict:
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
