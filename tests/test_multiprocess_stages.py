"""The stage commands under ``accelerate launch`` with 2 CPU processes (gloo), and a method
that fails there: ``generator``, ``pseudo`` and ``finetune`` one after the other store one
runs row per stage, one set of pending pairs and one set of metrics, with the numbers of the
same chain in one plain process; a run whose main process fails after the other process
joined its training ends every process (the launcher stops the follower), non-zero, with no
run left 'running'. Same small project and knobs as tests/test_multiprocess_run.py."""
from __future__ import annotations

import json
import shutil
import sqlite3

import pytest

from servehelp import cli
from test_multiprocess_run import KNOBS, RUN, _launch, _stored, small_demo

GENERATOR = ["generator", "--project", "demo", "--label-fraction", "0.25", "--seed", "1",
             "--base-model", "tiny", "--threads", "1", *KNOBS, "--json"]
PSEUDO = ["pseudo", "--project", "demo", "--threads", "1", *KNOBS, "--json"]
FINETUNE = ["finetune", "--project", "demo", "--threads", "1", *KNOBS, "--json"]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return small_demo(tmp_path_factory, "mpstages")


def _last_json(r) -> dict:
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1, r.stdout  # the result comes from the main process only
    return json.loads(lines[0])


def _same(one: dict, two: dict) -> bool:
    """The results agree: floats (losses) within float noise, times left out."""
    keys = set(one) - {"seconds", "images_per_second", "samples_per_second"}
    return keys == set(two) - {"seconds", "images_per_second", "samples_per_second"} and all(
        one[k] == pytest.approx(two[k], rel=1e-4) if isinstance(one[k], float) else one[k] == two[k]
        for k in keys)


def test_stage_commands_under_launch_store_once_with_the_numbers_of_one(home, tmp_path):
    one_home, two_home = tmp_path / "one", tmp_path / "two"
    shutil.copytree(home, one_home)
    shutil.copytree(home, two_home)
    r = cli(one_home, *RUN)  # stage by stage equals the one-shot run (test_leaml.py)
    assert r.returncode == 0, r.stderr[-3000:]
    one = json.loads(r.stdout.strip().splitlines()[-1])
    results = {}
    for name, args in (("generator", GENERATOR), ("pseudo", PSEUDO), ("finetune", FINETUNE)):
        r = _launch(two_home, *args)
        assert r.returncode == 0, r.stderr[-3000:]
        results[name] = (_last_json(r), r.stderr)
    two = results["finetune"][0]
    assert _same(one, dict(two, run_id=one["run_id"])), (one, two)
    results = {name: err for name, (_, err) in results.items()}
    assert "leaml-spread-" in results["generator"]  # the second process trained beside the main
    assert "leaml-spread-" in results["finetune"]
    gen = sqlite3.connect(two_home / "leaml.db").execute(
        "SELECT id FROM runs WHERE method = 'generator'").fetchone()[0]
    assert results["pseudo"].count(f"models/run-{gen} on cpu") == 2  # both sampled

    a, b = _stored(one_home), _stored(two_home)
    assert [m for m, _, _ in b["runs"]] == ["generator", "leaml"]  # one row per stage
    assert sorted(a["runs"]) == sorted(b["runs"]) and all(s == "succeeded" for _, s, _ in b["runs"])
    run = {"one": one["run_id"], "two": two["run_id"]}  # the leaml run: created first by `run`
    assert [m[1:] for m in a["metrics"] if m[0] == run["one"]] == \
        [m[1:] for m in b["metrics"] if m[0] == run["two"]] and b["metrics"]
    assert len(b["pairs"]) == len(a["pairs"]) > 0  # one set of pending pairs
    for p, q in zip(a["pairs"], b["pairs"]):  # (their generator runs: ids 2 and 1)
        assert p[:4] == q[:4] and (p[4], q[4]) == (run["one"] + 1, gen)
        assert p[5] == pytest.approx(q[5], abs=2e-3)  # float noise only
    assert not list((two_home / "work").glob("**/leaml-spread-*"))  # the handed models go


def test_a_failing_main_process_ends_every_process_of_the_launch(home, tmp_path):
    """The generator trains on both processes, then the main one cannot save it (a file
    stands where the models folder goes, as a full or broken disk would fail it): the error
    exits non-zero, the launcher stops the follower waiting for the next call, and the
    generator's and the method's runs rows say 'failed'."""
    two_home = tmp_path / "fail"
    shutil.copytree(home, two_home)
    (two_home / "models").write_text("not a folder")
    r = _launch(two_home, *RUN)  # _launch's timeout (900 s) fails the test if a process hangs
    assert r.returncode != 0
    assert "leaml-spread-" in r.stderr  # the follower had joined the training
    runs = sqlite3.connect(two_home / "leaml.db").execute(
        "SELECT method, status FROM runs ORDER BY id").fetchall()
    assert runs and all(s == "failed" for _, s in runs), runs
