"""Fast sampling with vLLM (``pseudo --engine vllm``, ``caption --teacher --engine vllm``).

vLLM itself does not run here. Without it, the engine is refused with one clear line before
anything loads. With tests/vllm_standin on PYTHONPATH (an imitation of vLLM's offline API on
transformers, not vLLM), ``leaml.engine.vllm_engine`` runs end to end through the real CLI and
must store the same pending pairs as the transformers engine where both are deterministic.
"""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from leaml.data.demo.build import DemoConfig
from leaml.data.ingest import load_demo
from leaml.methods import leaml as leaml_method
from leaml.store import connect
from leaml.store.runs import get_run, update_run

ROOT = Path(__file__).resolve().parents[1]
STANDIN = ROOT / "tests" / "vllm_standin"
FAST = {"generator": {"min_qa_steps": 4, "max_qa_steps": 4, "batch_size": 4, "caption_ratio": 0.5}}
PSEUDO = ["--set", "pseudo.k=2", "--set", "pseudo.max_new_tokens=24", "--set",
          "pseudo.batch_size=8", "--set", "pseudo.chunk=3"]
no_real_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is not None,
                                  reason="vLLM is installed here")


def cli(home, *args, standin: bool = False) -> subprocess.CompletedProcess:
    """``python -m leaml --home HOME ARGS`` as a real process; the stand-in on PYTHONPATH only
    when asked."""
    path = [str(ROOT)] + ([str(STANDIN)] if standin else [])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "leaml", "--home", str(home), *map(str, args)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A demo project of 8 train images (2 labeled) and a generator run trained in a few steps."""
    torch.set_num_threads(2)
    home = tmp_path_factory.mktemp("vllm") / "home"
    db = connect(home)
    load_demo(db, DemoConfig(n_train=8, n_test=1, seed=0))
    g = leaml_method.generator_command(db, "demo", label_fraction=0.25, seed=1, overrides=FAST)
    db.conn.close()
    return home, g["generator_run"]


@pytest.fixture
def copy_home(trained, tmp_path):
    def make(name: str) -> Path:
        return Path(shutil.copytree(trained[0], tmp_path / name))
    return make


def pairs(home: Path, gen_run: int) -> list[tuple]:
    db = connect(home)
    rows = [(r["image_id"], r["question"], r["answer"], r["confidence"]) for r in db.query(
        "SELECT * FROM qa WHERE origin = 'pseudo' AND gen_run_id = ? ORDER BY image_id, question",
        [gen_run])]
    db.conn.close()
    return rows


def error_lines(r: subprocess.CompletedProcess) -> list[str]:
    return [line for line in r.stderr.splitlines() if line.startswith("error:")]


@no_real_vllm
def test_without_vllm_the_engine_is_refused_with_one_clear_line(trained, copy_home):
    home = copy_home("missing")
    r = cli(home, "pseudo", "--project", "demo", "--engine", "vllm", *PSEUDO)
    assert r.returncode == 2, r.stderr
    assert len(error_lines(r)) == 1, r.stderr
    line = error_lines(r)[0]
    assert "needs the vllm package, which is not installed" in line
    assert "optional" in line and "pip install vllm" in line and "--engine hf" in line
    assert "model " not in r.stderr and "Traceback" not in r.stderr  # nothing was loaded
    assert pairs(home, trained[1]) == []
    # a whole run set to it fails the same way before G trains
    db = connect(home)
    runs_before = db.execute("SELECT count(*) FROM runs").fetchone()[0]
    db.conn.close()
    r = cli(home, "run", "--project", "demo", "--method", "leaml", "--label-fraction", "0.25",
            "--set", "pseudo.engine=vllm")
    assert r.returncode == 2 and error_lines(r) == [line], r.stderr
    db = connect(home)
    methods = [x["method"] for x in db.query("SELECT method FROM runs ORDER BY id")]
    db.conn.close()
    assert "generator" not in methods[runs_before:]  # no second generator was trained
    # and a local teacher's captions
    r = cli(home, "caption", "--project", "demo", "--teacher", "tiny", "--engine", "vllm")
    assert r.returncode == 2 and error_lines(r) == [line], r.stderr


@pytest.mark.parametrize("answer_mode", ["choose", "generate"])
def test_the_vllm_engine_stores_the_pairs_of_the_default_engine(trained, copy_home, answer_mode):
    """'known' questions are deterministic (teacher forcing of every choice, or greedy): the
    vLLM engine (here on the stand-in) stores the same pairs, confidences within 1e-3."""
    gen_run = trained[1]
    mode = ["--set", f"pseudo.answer_mode={answer_mode}"]
    hf_home, fast_home = copy_home("hf"), copy_home("fast")
    hf = cli(hf_home, "pseudo", "--project", "demo", *PSEUDO, *mode, "--json")
    fast = cli(fast_home, "pseudo", "--project", "demo", "--engine", "vllm", *PSEUDO, *mode,
               "--json", standin=True)
    assert hf.returncode == 0, hf.stderr
    assert fast.returncode == 0, fast.stderr
    assert "in vLLM" in fast.stderr and "in vLLM" not in hf.stderr  # which engine loaded G
    want, got = pairs(hf_home, gen_run), pairs(fast_home, gen_run)
    assert len(want) > 0
    assert [p[:3] for p in got] == [p[:3] for p in want]
    for (*_, a), (*_, b) in zip(got, want):
        assert a == pytest.approx(b, abs=1e-3)
    db = connect(fast_home)
    record = get_run(db, gen_run)["params"]["pseudo"][-1]
    db.conn.close()
    assert record["config"]["engine"] == "vllm" and record["stored"] == len(got)


def test_sample_mode_runs_through_the_vllm_engine_and_stores_pairs(trained, copy_home):
    """Sampling differs between engines (their random streams); the stored pairs must parse.
    G of 4 steps writes no parsable pair yet, so the run's model is the embedded base, which
    was pretrained on demo-style QA and writes some (not all in the project's wording)."""
    from leaml.engine import models
    home = copy_home("sample")
    shutil.rmtree(home / "models" / f"run-{trained[1]}")
    models.save(*models.load("tiny16"), home / "models" / f"run-{trained[1]}")
    db = connect(home)
    params = get_run(db, trained[1])["params"]
    update_run(db, trained[1], params={**params, "config": {}})  # no caption context
    db.conn.close()
    r = cli(home, "pseudo", "--project", "demo", "--engine", "vllm", *PSEUDO, "--set",
            "pseudo.question_mode=sample", "--set", "pseudo.answer_mode=generate", "--set",
            "pseudo.k=4", "--set", "pseudo.known_questions=false", "--json", standin=True)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout.strip().splitlines()[-1])
    stored = pairs(home, trained[1])
    assert info["images"] == 6 and info["sampled"] == 6 * 4
    assert info["stored"] == len(stored) > 0, json.dumps(info)
    assert all(0 < c <= 1 for *_, c in stored)


def test_a_local_teachers_captions_are_the_same_through_the_vllm_engine(tmp_path):
    """Greedy captions of ``caption --teacher tiny``: the same text from both engines."""
    from servehelp import PROMPT, image_folder
    captions = []
    for name, engine in (("hf", []), ("fast", ["--engine", "vllm"])):
        home = tmp_path / name
        assert cli(home, "import", image_folder(tmp_path / "frames", 3), "--project", "endo").returncode == 0
        r = cli(home, "caption", "--project", "endo", "--teacher", "tiny", "--prompt", PROMPT,
                "--max-tokens", "12", *engine, "--json", standin=bool(engine))
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout.strip().splitlines()[-1])["captioned"] == 3
        db = connect(home)
        captions.append([(x["source_name"], x["caption"]) for x in db.query(
            "SELECT source_name, caption FROM images ORDER BY source_name")])
        db.conn.close()
    assert captions[0] == captions[1] and all(c for _, c in captions[0])
