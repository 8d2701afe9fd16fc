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
followers go. When it fails instead (an exception, a job's cancel raised in an inference pass)
it enters no further collective: it leaves non-zero and the launcher (torch elastic) ends the
followers, wherever they wait. A stop asked of a training loop (a job's cancel, or SIGTERM to
a job's launch) is agreed by every process at each step (:func:`stop_together`), so all of
them stop at the same step and keep the checkpoint. Followers ignore SIGTERM and SIGINT (the
launcher passes its own on to every process): the leader stops them at its next step or
releases them; a follower whose leader is gone (on this machine) leaves at once
(:func:`_watch`). In one plain process none of this happens.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Callable

import torch

from leaml.engine import models

WAIT = timedelta(hours=12)  # followers wait while the leader evaluates and samples alone
WATCH_S = 0.5  # how often a follower looks whether its leader still runs


_LEADING = {"on": False, "following": False}  # :func:`start` / :func:`follow` set them
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
    _send((socket.gethostname(), os.getpid()))  # whom the followers watch (:func:`_watch`)
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


def done_training(folder: Path | None, *, failed: bool = False) -> None:
    """The leader after a ``train()`` call: every process is through, the folder goes.
    After a failed call no barrier: the followers may be inside a collective of the step."""
    if folder is not None:
        if not failed:
            _state().wait_for_everyone()
        shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def handed(folder: Path | None):
    """Around the leader's own ``train()`` after :func:`lead`: :func:`done_training`, with
    ``failed`` when the call raised."""
    try:
        yield
    except BaseException:
        done_training(folder, failed=True)
        raise
    done_training(folder)


def batch_loss(loss: float, device) -> float:
    """In a training loop of a spread method: the step's loss over the whole batch, as one
    process reports it (each process's own counts its share of the answer tokens times N, so
    the mean of theirs). Elsewhere: ``loss``."""
    if not (_LEADING["on"] or _LEADING["following"]):
        return loss
    total = torch.tensor([loss], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(total)
    return float(total.item()) / world_size()


def stop_together(stop: bool, device) -> bool:
    """In a training loop of a spread method: True when any process (the leader, whose
    ``should_stop`` a job's cancel sets) stops, so that all stop at the same step (the
    checkpoint's barrier then meets everyone). Elsewhere: ``stop``."""
    if not (_LEADING["on"] or _LEADING["following"]):
        return stop
    flag = torch.tensor([1.0 if stop else 0.0], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


def follow(train) -> int:
    """A follower's whole life: join each training call the leader sends (``train`` is
    ``leaml.engine.train.train``, passed in: it imports this module), until it says stop.
    Returns the number of calls joined."""
    state = _state()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):  # the leader stops or releases us
            signal.signal(sig, signal.SIG_IGN)
    joined, _LEADING["following"] = 0, True
    _watch(*_send(None))
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
    _LEADING["following"] = False
    return joined


def _watch(host: str, pid: int) -> None:
    """In a follower: a thread that ends this process (exit 1) as soon as the leader (``pid``
    on ``host``) is gone while it still follows: after a failure the leader leaves without
    a word (:func:`abandon`) and this process, which ignores the launcher's SIGTERM, may wait
    inside a collective. A leader on another machine is not watched (the launcher there
    stops it, and its SIGKILL after a timeout ends this one)."""
    if host != socket.gethostname():
        return

    def run() -> None:
        while _alive(pid):
            time.sleep(WATCH_S)
        if _LEADING["following"]:
            print(f"leaml: the main process {pid} is gone; leaving", file=sys.stderr,
                  flush=True)
            os._exit(1)
    threading.Thread(target=run, daemon=True, name="leader-watch").start()


def _alive(pid: int) -> bool:
    """The process ``pid`` runs (not a zombie the launcher has yet to reap)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except (OSError, IndexError):  # no /proc here
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True


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
    """The leader, when its method ended (a result, or stopped at a step): let the followers
    go. Never after a failure: the followers may wait in another collective; leave non-zero
    (:func:`abandon`) and the launcher ends them."""
    if leading():
        _LEADING["on"] = False
        _send(None)


def abandon(code: int = 1) -> None:
    """The leader after its method failed: leave at once with ``code`` (not 0), entering no
    collective and no interpreter shutdown that could wait on the process group; torch
    elastic then stops the followers. A plain process returns (nothing to do)."""
    if leading():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code or 1)
