"""Jobs on several processes: a job's ``processes`` param (``run --background --processes N``).

With ``processes`` above 1 the worker starts the job process through accelerate's launcher
(``python -m accelerate.commands.launch``, the torchrun launcher: ``--multi_gpu
--num_processes N --num_machines 1`` on a free local port; on the CPU, a job's device 'cpu'
or ``ACCELERATE_USE_CPU``, with ``ACCELERATE_USE_CPU=1`` and ``--mixed_precision no``) instead
of one plain ``python -m leaml worker --job-process ID``. In the job processes only the main
one (rank 0) takes the job over, beats, reports and records its end; the others follow it
(leaml/engine/spread.py) and train, sample and evaluate beside it. When the job fails or is
cancelled outside a training step the main process records that end, then leaves non-zero
and the launcher stops the others; the worker never overwrites a recorded end. A worker's
shutdown (SIGTERM to the launcher, which passes it on to every process) stops the job as in
one process: the main process stops training at the next step, where every process stops
with it (the others ignore the signal while they follow), keeps the checkpoint and ends the
job 'interrupted'. The launcher waits :data:`SHUTDOWN_S` for its processes before it kills
them (``TORCH_ELASTIC_SHUTDOWN_TIMEOUT`` in the worker's environment overrides it).
Torch-free: the worker and the app import it.
"""
from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

TRUE = ("1", "true", "yes")
PLACEMENT = ("device", "dtype")  # job params that say where models run, not what they do
SHUTDOWN_S = 120  # the launcher's wait for its processes to stop at a step, then SIGKILL


def limit() -> int:
    """The most processes a job may ask for: one per CPU of this machine (a GPU job is
    checked against its GPUs when it starts, :func:`check_devices`)."""
    return os.cpu_count() or 1


def processes(params: dict) -> int:
    """A job's ``processes`` param (default 1), checked: a whole number from 1 to
    :func:`limit`; more than one needs a device without an index ('cpu', 'cuda' or none:
    every process takes its own GPU). ValueError otherwise."""
    n = params.get("processes", 1)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= limit():
        raise ValueError(f"job param processes={n!r}: use a whole number from 1 to {limit()} "
                         f"(the CPUs of this machine)")
    device = str(params.get("device") or "auto")
    if n > 1 and ":" in device:
        raise ValueError(f"processes={n} with device {device!r}: several processes take one "
                         f"GPU each; use device 'cuda' (or 'cpu') with several processes")
    return n


def wanted(params: dict) -> int:
    """The processes the worker starts for a job: :func:`processes`, or 1 when the param is
    not valid (the job process then fails the job with the reason)."""
    try:
        return processes(params)
    except ValueError:
        return 1


def on_cpu(params: dict) -> bool:
    """The job runs on the CPU: its device 'cpu', or ACCELERATE_USE_CPU in the environment."""
    return str(params.get("device")) == "cpu" or \
        os.environ.get("ACCELERATE_USE_CPU", "").lower() in TRUE


def placement_env(params: dict) -> dict:
    """A job's ``device``/``dtype`` params as the environment (``LEAML_DEVICE``, ``LEAML_DTYPE``)
    that leaml.engine.models reads, as the CLI's --device/--dtype set it."""
    return {f"LEAML_{key.upper()}": str(params[key]) for key in PLACEMENT if params.get(key)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(home: Path, job: dict, claimed_by: int, env: dict) -> tuple[list[str], dict]:
    """The launcher's command line and environment for a job of ``processes`` > 1 (``env``:
    the plain job process's environment). The job's device and dtype go in the environment,
    so that every process (followers too) loads its models the same way."""
    params = job["params"]
    env = dict(env, **placement_env(params))
    env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(SHUTDOWN_S))  # torch's default: 30 s
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
           "--num_processes", str(processes(params)), "--num_machines", "1",
           "--dynamo_backend", "no", "--main_process_ip", "127.0.0.1",
           "--main_process_port", str(free_port())]
    if on_cpu(params):
        env["ACCELERATE_USE_CPU"] = "1"
        cmd += ["--mixed_precision", "no"]
    cmd += ["-m", "leaml", "worker", "--home", str(home), "--job-process", str(job["id"]),
            "--claimed-by", str(claimed_by)]
    return cmd, env


def world_size() -> int:
    """Processes of this job process's launch (1 in a plain job process)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def join() -> bool:
    """Where a launched job process begins: a follower joins the main process's training
    and inference calls until released and gets False (it then exits 0); the main process
    gets True and runs the job. Every process joins first, so the main one can release them
    (or leave non-zero) on every path."""
    import leaml.methods.pipeline  # noqa: F401  (torch; registers what followers run: sampling, answers)
    from leaml.engine import spread  # torch: only in a launched job process
    from leaml.engine.train import train  # (as above)
    return spread.start(train)


def check_devices(params: dict) -> None:
    """In the main process of a launched job: one GPU per process (ValueError otherwise)."""
    import torch  # only in a launched job process
    n = world_size()
    if n > 1 and not on_cpu(params) and torch.cuda.is_available() \
            and torch.cuda.device_count() < n:
        raise ValueError(f"processes={n} needs {n} GPUs; this machine has "
                         f"{torch.cuda.device_count()} (ask fewer, or run on device 'cpu')")


def release() -> None:
    """The main process after the job ended at a step (succeeded, or stopped with its
    checkpoint): let the followers go. A plain job process returns."""
    if world_size() > 1:
        from leaml.engine import spread  # torch: loaded by then
        spread.release()


def abandon(code: int) -> None:
    """The main process after the job failed or was stopped outside a training step (its end
    recorded): leave now with ``code`` (non-zero); the launcher stops the followers, wherever
    they wait. A plain job process returns."""
    if world_size() > 1:
        from leaml.engine import spread  # torch: loaded by then
        spread.abandon(code or 1)
