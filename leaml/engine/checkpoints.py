"""Training checkpoints on disk: written atomically with a checksum, the last two kept.

A stage's ``work_dir`` holds ``checkpoint/`` (the latest) and ``checkpoint.prev/`` (the one
before). Each holds ``state.pt`` (``torch.save`` of the training state) and ``config.json``
(stage, step, config, and the sha256 and size of ``state.pt``). A save writes
``checkpoint.tmp/`` first, fsyncs the files and the folder, then renames: the old latest
becomes ``checkpoint.prev``, the new one ``checkpoint``. A crash at any moment leaves at least
one complete checkpoint; a leftover ``checkpoint.tmp`` is never read and goes at the next save.

A load checks the checksum before ``torch.load`` and falls back to the previous checkpoint,
or to none (the stage restarts from its first step); each fallback is logged as a warning on
the ``leaml.engine.checkpoints`` logger naming the file, which a job shows in its message.

Before a save the free space is checked (:func:`check_free_space`): an estimate of the new
file twice over plus a margin (``LEAML_MIN_FREE_MB``, default 200 MB). Too little raises
:class:`DiskFull`, whose message says how much is free where.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import shutil
from pathlib import Path

import torch

log = logging.getLogger("leaml.engine.checkpoints")
LATEST, PREVIOUS, TMP = "checkpoint", "checkpoint.prev", "checkpoint.tmp"
STATE, META = "state.pt", "config.json"
DEFAULT_MIN_FREE_MB = 200.0
MB = 1024 * 1024


class DiskFull(OSError):
    """Not enough free space to write a checkpoint (or a write failed with ENOSPC)."""

    def __init__(self, message: str):
        super().__init__(errno.ENOSPC, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


# --- free space -----------------------------------------------------------------------------

def min_free_mb() -> float:
    """The margin in MB kept free besides the checkpoint itself (``LEAML_MIN_FREE_MB``)."""
    raw = os.environ.get("LEAML_MIN_FREE_MB")
    try:
        value = float(raw) if raw else DEFAULT_MIN_FREE_MB
    except ValueError:
        raise ValueError(f"LEAML_MIN_FREE_MB={raw!r} is not a number of megabytes; "
                         f"unset it or use e.g. {DEFAULT_MIN_FREE_MB:g}") from None
    if value < 0:
        raise ValueError(f"LEAML_MIN_FREE_MB={raw!r} must be >= 0")
    return value


def state_bytes(state: dict) -> int:
    """Bytes of the tensors in a (nested) state dict: about the size of its file."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(v) for v in state)
    return 0


def check_free_space(folder: Path, need_bytes: int, home: Path | None = None) -> None:
    """Raise DiskFull unless ``folder``'s disk has ``2 * need_bytes`` plus the margin free
    (twice: the new file is written before the oldest one is removed)."""
    free = shutil.disk_usage(folder).free
    want = 2 * need_bytes + min_free_mb() * MB
    if free < want:
        raise DiskFull(f"disk full: free {free / MB:.0f} MB in {home or folder}, a checkpoint "
                       f"needs {want / MB:.0f} MB (2 x {need_bytes / MB:.0f} MB + "
                       f"LEAML_MIN_FREE_MB={min_free_mb():g}); free some space and resume the job")


# --- save -------------------------------------------------------------------------------------

def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save(work_dir: str | Path, state: dict, meta: dict, *, home: Path | None = None) -> Path:
    """Write ``state`` (and ``meta``: stage, step, config) as the latest checkpoint of
    ``work_dir``; the one it replaces becomes the previous. Returns the checkpoint folder.
    Raises DiskFull (nothing half-written left behind) when space runs short."""
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    tmp = work_dir / TMP
    shutil.rmtree(tmp, ignore_errors=True)
    check_free_space(work_dir, state_bytes(state), home)
    try:
        tmp.mkdir()
        torch.save(state, tmp / STATE)
        _fsync(tmp / STATE)
        info = dict(meta, sha256=_sha256(tmp / STATE), bytes=(tmp / STATE).stat().st_size)
        (tmp / META).write_text(json.dumps(info, indent=1))
        _fsync(tmp / META)
        _fsync(tmp)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)  # no partial checkpoint.tmp stays
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            free = shutil.disk_usage(work_dir).free / MB
            raise DiskFull(f"disk full: free {free:.0f} MB in {home or work_dir} while writing "
                           f"a checkpoint; free some space and resume the job") from exc
        raise
    _rotate(work_dir, tmp)
    return work_dir / LATEST


def _rotate(work_dir: Path, tmp: Path) -> None:
    """checkpoint -> checkpoint.prev, checkpoint.tmp -> checkpoint (renames: atomic)."""
    latest, previous = work_dir / LATEST, work_dir / PREVIOUS
    if latest.exists():
        shutil.rmtree(previous, ignore_errors=True)
        latest.rename(previous)
    tmp.rename(latest)
    _fsync(work_dir)  # the renames themselves survive a power cut


def remove(work_dir: str | Path) -> None:
    """Delete every checkpoint of ``work_dir`` (after its stage finished)."""
    for name in (LATEST, PREVIOUS, TMP, LATEST + ".corrupt", PREVIOUS + ".corrupt"):
        shutil.rmtree(Path(work_dir) / name, ignore_errors=True)


def exists(work_dir: str | Path) -> bool:
    """True when ``work_dir`` holds a checkpoint (latest or previous) to try resuming from."""
    return any((Path(work_dir) / name / STATE).exists() for name in (LATEST, PREVIOUS))


# --- load -------------------------------------------------------------------------------------

def _problem(folder: Path) -> str | None:
    """Why ``folder``'s state.pt cannot be trusted, or None when its checksum matches."""
    path = folder / STATE
    try:
        meta = json.loads((folder / META).read_text())
    except (OSError, ValueError) as exc:
        return f"{folder / META} is unreadable ({type(exc).__name__})"
    if "sha256" not in meta:
        return None  # written before checksums existed: torch.load decides
    size = path.stat().st_size
    if size != meta.get("bytes", size):
        return f"{path} is corrupt ({size} of {meta['bytes']} bytes: truncated)"
    if _sha256(path) != meta["sha256"]:
        return f"{path} is corrupt (sha256 differs from {META})"
    return None


def load(work_dir: str | Path) -> tuple[dict | None, Path | None]:
    """The newest intact checkpoint of ``work_dir``: (state, folder), or (None, None) when
    there is none. A corrupt latest falls back to the previous; each skipped file is logged
    as a warning that names it and says what happens instead."""
    work_dir = Path(work_dir)
    folders = [work_dir / n for n in (LATEST, PREVIOUS) if (work_dir / n / STATE).exists()]
    for i, folder in enumerate(folders):
        problem = _problem(folder)
        if problem is None:
            try:
                return torch.load(folder / STATE, map_location="cpu", weights_only=False), folder
            except Exception as exc:  # torch's zip reader, unpickling: any damage
                problem = f"{folder / STATE} is corrupt ({type(exc).__name__}: {str(exc)[:160]})"
        fallback = ("resuming from the previous checkpoint" if i + 1 < len(folders)
                    else "the stage restarts from its first step")
        log.warning("checkpoint %s; %s", problem, fallback)
        _set_aside(folder)
    return None, None


def _set_aside(folder: Path) -> None:
    """Move a corrupt checkpoint to ``<name>.corrupt`` (kept to look at, never loaded), so
    that the next save does not rotate it over the intact previous one."""
    aside = folder.with_name(folder.name + ".corrupt")
    shutil.rmtree(aside, ignore_errors=True)
    folder.rename(aside)


# --- a training run's state (leaml.engine.train) -------------------------------------------

# config fields a resumed stage must share with its checkpoint
RESUME_KEYS = ("mode", "lr", "batch_size", "grad_accum", "seed", "lora_r", "epochs",
               "max_steps", "min_steps", "oversample_open", "hard_fraction")


def save_training(acc, ckpt: Path, model, optimizer, scheduler, config, step, stage,
                  losses=None) -> None:
    """Write the checkpoint atomically with its checksum, keeping the previous one
    (:func:`save`; ``ckpt`` is ``<work_dir>/checkpoint``)."""
    acc.wait_for_everyone()
    if not acc.is_main_process:
        return
    inner = acc.unwrap_model(model)
    state = {
        "step": step, "stage": stage, "config": config.to_dict(),
        # full mode: every weight (a tower frozen after its warmup was trained too); LoRA: adapters
        "weights": {n: p.detach().cpu() for n, p in inner.named_parameters()
                    if p.requires_grad or config.mode == "full"},
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "question_losses": losses.state_dict() if losses else None,
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
    }
    save(ckpt.parent, state, {"stage": stage, "step": step, "config": config.to_dict()})


def load_training(ckpt: Path, model, optimizer, scheduler, config, stage,
                  losses=None) -> int | None:
    """Load the newest intact checkpoint into the model, optimizer and scheduler; returns its
    step, or None when none is usable (the stage starts over; the reason is logged)."""
    state, folder = load(ckpt.parent)
    if state is None:
        return None
    saved = state["config"]
    diff = [k for k in RESUME_KEYS if saved.get(k) != getattr(config, k)]
    if diff or state["stage"] != stage:
        raise ValueError(f"checkpoint {folder} was written by another config ({', '.join(diff) or 'stage'}"
                         f" differ); delete the folder or train with resume=False")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state["weights"].items():
            params[name].copy_(value.to(params[name].device))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if losses is not None and state.get("question_losses"):
        losses.load_state_dict(state["question_losses"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    if state["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return int(state["step"])
