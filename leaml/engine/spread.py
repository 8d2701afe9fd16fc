"""A whole method under ``accelerate launch`` (N processes): one leader, N-1 followers.

The main process (the leader) runs the method as one process would: it alone reads and
writes the database (one runs row, one set of metrics, one set of pending pairs), evaluates,
samples and saves. Every training call is data-parallel: when the leader enters
``train.train()`` it saves the model as it stands, then sends the call (that folder, the
examples or streams with their neuron masks, the config, the checkpoint folder) to the
followers, which load the same model and run the same ``train()`` beside it; accelerate's
DDP splits each batch and averages the gradients. Evaluation works the same way: the leader
hands the saved model and the test items over, every process answers every N-th item and the
leader gathers the answers in order (:func:`share`). When the method ends the leader lets the
followers go. In one plain process none of this happens.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Callable

import torch

from leaml.engine import models

WAIT = timedelta(hours=12)  # followers wait while the leader evaluates and samples alone


_LEADING = {"on": False}  # set by :func:`start` in the leader of a spread method
# call kind -> what a follower does with its share of the items: f(call, items) -> results;
# filled by the modules that hand such calls over (leaml/engine/evaluate.py: "predict")
HANDLERS: dict[str, Callable[[dict, list], list]] = {}


def world_size() -> int:
    """Processes of this launch (1 in a plain process); read from the launcher's environment,
    so a plain process never initialises torch.distributed."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _state():
    from accelerate import PartialState
    # as train()'s Accelerator: the CPU (gloo) when the rule says so (ACCELERATE_USE_CPU, which
    # PartialState alone does not read, or --device cpu)
    return PartialState(cpu=models.resolve_device().type == "cpu", timeout=WAIT)


def is_leader() -> bool:
    """True in a plain process and in the main process of a launch."""
    return world_size() == 1 or _state().is_main_process


def leading() -> bool:
    """True in the leader of a method started with :func:`start` (a script that calls
    ``train()`` in every process itself, as tests/test_multiprocess.py's does, never is)."""
    return _LEADING["on"]


def start(train) -> bool:
    """Where a command that runs a whole method under ``accelerate launch`` begins: a
    follower joins the leader's training calls until released (:func:`follow`) and gets
    False (it has nothing else to do); the leader, and a plain process, get True and run
    the method; call :func:`release` when it ends."""
    if world_size() == 1:
        return True
    if not is_leader():
        follow(train)
        return False
    _LEADING["on"] = True
    return True


def _send(message) -> object:
    box = [message]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def lead(model, processor, data, config, *, work_dir, resume: bool, stage: str) -> Path | None:
    """In the leader, before it trains: hand this ``train()`` call to the followers. Returns
    the folder of the model as it entered (removed by :func:`done_training`)."""
    if world_size() == 1:
        return None
    if work_dir:
        Path(work_dir).mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="leaml-spread-", dir=work_dir or None))
    models.save(model, processor, folder)
    _send({"folder": str(folder), "data": data, "config": config,
           "work_dir": str(work_dir) if work_dir else None, "resume": resume, "stage": stage})
    return folder


def done_training(folder: Path | None) -> None:
    """The leader after a ``train()`` call: every process is through, the folder goes."""
    if folder is not None:
        _state().wait_for_everyone()
        shutil.rmtree(folder, ignore_errors=True)


def follow(train) -> int:
    """A follower's whole life: join each training call the leader sends (``train`` is
    ``leaml.engine.train.train``, passed in: it imports this module), until it says stop.
    Returns the number of calls joined."""
    state = _state()
    joined = 0
    while (call := _send(None)) is not None:
        if call.get("kind", "train") == "train":
            model, processor = models.load(call["folder"])
            train(model, processor, call["data"], call["config"], work_dir=call["work_dir"],
                  resume=call["resume"], stage=call["stage"])
            state.wait_for_everyone()
        else:
            mine = HANDLERS[call["kind"]](call, call["items"][state.process_index::world_size()])
            torch.distributed.gather_object(mine, None, dst=0)
        joined += 1
    return joined


def share(kind: str, call: dict, items: list, local: Callable[[list], list]) -> list:
    """In the leader: every process (followers through ``HANDLERS[kind](call, items)``, the
    leader through ``local(items)``) takes every N-th item; the results come back in the
    items' order. In a plain process (or not leading): ``local(items)``."""
    if not leading():
        return local(items)
    world = world_size()
    _send({**call, "kind": kind, "items": items})
    parts = [None] * world
    torch.distributed.gather_object(local(items[0::world]), parts, dst=0)
    out = [None] * len(items)
    for rank, part in enumerate(parts):
        out[rank::world] = part
    return out


def release() -> None:
    """The leader, when its method ends (or fails): let the followers go."""
    if leading():
        _LEADING["on"] = False
        _send(None)
