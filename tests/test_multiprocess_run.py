"""A whole method under ``accelerate launch`` with 2 CPU processes (gloo): ``python -m leaml
run`` there leaves exactly one runs row per run, one set of metrics and one set of pending
pairs, with the same numbers as one plain process with the same seed (within float noise).

The main process runs the method; the other joins each training call (leaml/engine/spread.py),
each process's loss counts by its share of the batch's answer tokens and the running losses
that draw the hard examples fold the whole batch in every process; each process samples
every other chunk of unlabeled images and answers every other test question, the main one
gathers and stores. Packing (a packed row of
one image's questions cannot be split between processes, so a step under N processes takes
at least N rows) changes what a step sees, so this comparison turns it off; with it on the
run still writes once, with nearby numbers."""
from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from servehelp import cli

ROOT = Path(__file__).resolve().parents[1]
KNOBS = ["--set", "generator.min_qa_steps=4", "--set", "generator.max_qa_steps=4",
         "--set", "generator.batch_size=4", "--set", "generator.caption_ratio=0.5",
         "--set", "generator.pack=false", "--set", "generator.hard_fraction=0.25",
         "--set", "pseudo.k=2", "--set", "pseudo.max_new_tokens=16", "--set", "pseudo.chunk=3",
         "--set", "finetune.min_steps=4", "--set", "finetune.max_steps=4",
         "--set", "finetune.batch_size=4", "--set", "finetune.vision_warmup_epochs=0",
         "--set", "finetune.pack=false",  # hard_fraction 0.25 by default
         "--set", "max_new_tokens=4"]
RUN = ["run", "--project", "demo", "--method", "leaml", "--label-fraction", "0.25", "--seed", "1",
       "--base-model", "tiny", "--threads", "1", *KNOBS, "--json"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(home: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_ip", "127.0.0.1", "--main_process_port", str(_free_port()),
           "-m", "leaml", "--home", str(home), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def _stored(home: Path) -> dict:
    db = sqlite3.connect(home / "leaml.db")
    return {
        "runs": db.execute("SELECT method, status, accuracy FROM runs ORDER BY id").fetchall(),
        "metrics": db.execute("SELECT run_id, scope, key, accuracy, n FROM metrics "
                              "ORDER BY run_id, scope, key").fetchall(),
        "pairs": db.execute("SELECT image_id, question, answer, status, gen_run_id, confidence "
                            "FROM qa WHERE origin = 'pseudo' ORDER BY id").fetchall()}


def small_demo(tmp_path_factory, name: str) -> Path:
    """A data home holding the demo projects at 8 train images and 1 test image."""
    home = tmp_path_factory.mktemp(name) / "home"
    r = cli(home, "demo", "--data-only", "--n-train", "8", "--n-test", "1")
    assert r.returncode == 0, r.stderr
    return home


@pytest.fixture(scope="module")
def homes(tmp_path_factory):
    home = small_demo(tmp_path_factory, "mprun")
    shutil.copytree(home, home.parent / "two")
    return home, home.parent / "two"


def test_two_processes_store_one_run_with_the_numbers_of_one(homes):
    one_home, two_home = homes
    r = cli(one_home, *RUN)
    assert r.returncode == 0, r.stderr[-3000:]
    one = json.loads(r.stdout.strip().splitlines()[-1])
    r = _launch(two_home, *RUN)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1, r.stdout  # the result comes from the main process only
    two = json.loads(lines[0])
    assert "leaml-spread-" in r.stderr  # the second process trained beside the main one
    final = f"models/run-{two['run_id']} on cpu"
    assert r.stderr.count(final) == 2, r.stderr[-2000:]  # and answered half the test questions
    gen = sqlite3.connect(two_home / "leaml.db").execute(
        "SELECT id FROM runs WHERE method = 'generator'").fetchone()[0]
    assert r.stderr.count(f"models/run-{gen} on cpu") == 2  # and sampled every other chunk

    a, b = _stored(one_home), _stored(two_home)
    assert [m for m, _, _ in b["runs"]] == ["leaml", "generator"]  # one row each, not two
    assert a["runs"] == b["runs"] and all(s == "succeeded" for _, s, _ in b["runs"])
    assert a["metrics"] == b["metrics"] and b["metrics"]
    assert {k: v for k, v in one.items() if k != "seconds"} == \
        {k: v for k, v in two.items() if k != "seconds"}
    assert len(b["pairs"]) == len(a["pairs"]) > 0  # one set of pending pairs
    for p, q in zip(a["pairs"], b["pairs"]):
        assert p[:5] == q[:5] and p[5] == pytest.approx(q[5], abs=2e-3)  # float noise only
    assert not list((two_home / "work").glob("**/leaml-spread-*"))  # the handed models go
