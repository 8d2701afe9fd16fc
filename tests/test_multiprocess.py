"""Multi-process training with accelerate (not our own): the one training routine under
``accelerate launch`` with 2 CPU processes (DDP over gloo) gives a model of the same quality
as one plain process on the same small task: same final loss on the whole training set
within a tolerance, same greedy accuracy; only the main process writes the model.

With accelerate 1.15, ``accelerate launch --cpu --num_processes 2`` starts ONE process unless
MPI is set up (``--mpirun_hostfile``); two local CPU processes come from the torchrun
launcher: ``ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2`` (the
variable makes each process pick the CPU and gloo). docs/GPU.md says the same."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r'''
import json, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
from accelerate import PartialState
from PIL import Image
from leaml.engine import models
from leaml.engine.batches import Example
from leaml.engine.train import TrainConfig, save_trained, train

out = Path(sys.argv[1])
colors = {"red": (220, 30, 30), "blue": (30, 30, 220)}
names = ["red", "blue"] * 4
images = [Image.new("RGB", (32, 32), colors[n]) for n in names]
examples = [Example(im, "Color?", n) for im, n in zip(images, names)]
model, processor = models.load("tiny")
config = TrainConfig(mode="full", lr=2e-3, batch_size=8, max_steps=16, warmup_ratio=0.0, seed=0)
result = train(model, processor, examples, config)
state = PartialState()
if state.is_main_process:  # only the main process evaluates and writes
    m = result.model.eval()
    with torch.no_grad():
        loss = float(m(**models.encode(processor, images, ["Color?"] * 8, names)).loss)
    gens = models.generate(m, processor, images, ["Color?"] * 8, max_new_tokens=3)
    accuracy = sum(g[0].text == n for g, n in zip(gens, names)) / len(names)
    save_trained(m, processor, out / "model")
    (out / "result.json").write_text(json.dumps({
        "world": state.num_processes, "loss": loss, "accuracy": accuracy,
        "steps": result.step, "first_loss": result.losses[0]}))
state.wait_for_everyone()
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], out: Path, **extra_env) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **extra_env)
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads((out / "result.json").read_text())


def test_two_processes_train_as_well_as_one(tmp_path):
    script = tmp_path / "train_small.py"
    script.write_text(SCRIPT)
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    single = _run([sys.executable, str(script), str(one)], one)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_ip", "127.0.0.1", "--main_process_port", str(_free_port()),
              str(script), str(two)]
    multi = _run(launch, two, ACCELERATE_USE_CPU="1")
    print("one process:", single, "\ntwo processes:", multi)  # shown with pytest -s
    assert single["world"] == 1 and multi["world"] == 2
    assert single["steps"] == multi["steps"] == 16
    assert multi["loss"] < multi["first_loss"] - 3.0, (single, multi)  # it learned
    assert abs(multi["loss"] - single["loss"]) <= 0.05 + 0.1 * single["loss"], (single, multi)
    assert abs(multi["accuracy"] - single["accuracy"]) <= 0.25, (single, multi)
    assert (two / "model" / "config.json").exists()
    assert not (two / "model.tmp").exists()
