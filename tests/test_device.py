"""One device rule for every stage: models load where ``models.resolve_device`` says
(accelerate's device unless --device / a job's 'device' says another), training in float32,
evaluation, pseudo sampling, captioning and serving in ``models.inference_dtype``. Every load
says where it went; the CPU commands here are told ``--device cpu --dtype bfloat16`` so a
stage that loads on its own terms (float32) fails them."""
from __future__ import annotations

import json
import re

import pytest
import torch

from servehelp import cli, image_folder

FAST = ["--set", "generator.min_qa_steps=4", "--set", "generator.max_qa_steps=4",
        "--set", "generator.batch_size=4", "--set", "generator.caption_ratio=0.5",
        "--set", "pseudo.k=2", "--set", "pseudo.max_new_tokens=16", "--set", "pseudo.chunk=3",
        "--set", "finetune.min_steps=2", "--set", "finetune.max_steps=2",
        "--set", "finetune.batch_size=4", "--set", "finetune.vision_warmup_epochs=0",
        "--set", "max_new_tokens=4"]
TOLD = ["--device", "cpu", "--dtype", "bfloat16"]
LOADED = re.compile(r"model (\S+) on (\S+), torch\.(\w+)")


def test_the_rule_is_accelerates_device_unless_told(monkeypatch):
    from accelerate import PartialState

    from leaml.engine import models
    for var in (models.DEVICE_ENV, models.DTYPE_ENV, "ACCELERATE_USE_CPU"):
        monkeypatch.delenv(var, raising=False)
    here = models.resolve_device()
    assert here.type == PartialState().device.type  # the GPU where accelerate trains, else cpu
    assert here.type == ("cuda" if torch.cuda.is_available() else here.type)
    expected = torch.bfloat16 if here.type == "cuda" and torch.cuda.is_bf16_supported() \
        else torch.float32
    assert models.inference_dtype() == expected
    assert models.resolve_device("meta") == torch.device("meta")  # told: whatever it is
    monkeypatch.setenv(models.DEVICE_ENV, "meta")
    assert models.resolve_device() == torch.device("meta")
    assert models.resolve_device("cpu") == torch.device("cpu")  # an argument beats the env
    monkeypatch.setenv(models.DEVICE_ENV, "auto")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    assert models.resolve_device() == torch.device("cpu")
    monkeypatch.setenv(models.DTYPE_ENV, "bfloat16")
    assert models.inference_dtype() == torch.bfloat16
    monkeypatch.setenv(models.DTYPE_ENV, "float8")
    with pytest.raises(ValueError, match="LEAML_DTYPE"):
        models.inference_dtype()


def _loads(stderr: str) -> list[tuple[str, str, str]]:
    return LOADED.findall(stderr)


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    home = tmp_path_factory.mktemp("device") / "home"
    r = cli(home, "demo", "--data-only", "--n-train", "8", "--n-test", "1")
    assert r.returncode == 0, r.stderr
    # the smallest base there is (a tiny random Idefics3, ~0.3M parameters): fast stages
    r = cli(home, "build-tiny", "--arch", "idefics3", "--out", home.parent / "base")
    assert r.returncode == 0, r.stderr
    return home


def test_every_stage_loads_where_it_is_told(home):
    r = cli(home, "generator", "--project", "demo", "--label-fraction", "0.25", "--seed", "1",
            "--base-model", home.parent / "base", *FAST, *TOLD, "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    gen = json.loads(r.stdout.strip().splitlines()[-1])["generator_run"]
    # training keeps float32 weights whatever the inference dtype (accelerate's mixed
    # precision decides its compute dtype)
    assert _loads(r.stderr) and all(d == "cpu" and t == "float32" for _, d, t in _loads(r.stderr))

    r = cli(home, "pseudo", "--project", "demo", "--generator-run", gen, *FAST, *TOLD, "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    assert [(d, t) for _, d, t in _loads(r.stderr)] == [("cpu", "bfloat16")]
    assert _loads(r.stderr)[0][0].endswith(f"run-{gen}")  # the generator samples

    r = cli(home, "finetune", "--project", "demo", "--generator-run", gen, "--mode", "lora",
            *FAST, *TOLD, "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    target = json.loads(r.stdout.strip().splitlines()[-1])["run_id"]
    loads = [(d, t) for _, d, t in _loads(r.stderr)]
    assert loads == [("cpu", "float32"), ("cpu", "bfloat16")], r.stderr[-2000:]  # train, evaluate

    r = cli(home, "evaluate", "--run", target, *TOLD, "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    assert [(d, t) for _, d, t in _loads(r.stderr)] == [("cpu", "bfloat16")]

    r = cli(home, "import", image_folder(home.parent / "frames", 2), "--project", "frames")
    assert r.returncode == 0, r.stderr
    r = cli(home, "caption", "--project", "frames", "--teacher", "tiny", "--max-tokens", "4",
            *TOLD, "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    assert _loads(r.stderr) == [("tiny", "cpu", "bfloat16")]

    # without --dtype: the rule's dtype for the rule's device (float32 on a CPU)
    r = cli(home, "evaluate", "--run", target, "--device", "cpu", "--json")
    assert [(d, t) for _, d, t in _loads(r.stderr)] == [("cpu", "float32")]


def test_serving_and_a_queued_job_follow_the_rule_too(home, monkeypatch):
    from leaml.engine import models
    from leaml.jobs import queue as jobs
    from leaml.jobs.worker import work
    from leaml.serve.server import load_served
    from leaml.store import connect
    db = connect(home)
    run = db.execute("SELECT id FROM runs WHERE model_dir IS NOT NULL AND method != 'generator' "
                     "ORDER BY id DESC").fetchone()
    if run is None:  # this test alone: a zero-shot run saves the base as a run's model
        r = cli(home, "run", "--project", "demo", "--method", "zero-shot", "--device", "cpu",
                "--base-model", home.parent / "base", "--set", "max_new_tokens=2", "--json")
        assert r.returncode == 0, r.stderr[-3000:]
        run = [json.loads(r.stdout.strip().splitlines()[-1])["run_id"]]
    monkeypatch.setenv(models.DTYPE_ENV, "bfloat16")
    served = load_served(db, run_id=run[0], device="cpu")
    assert {(p.device.type, p.dtype) for p in served.model.parameters()} == {("cpu", torch.bfloat16)}
    monkeypatch.delenv(models.DTYPE_ENV)

    job = jobs.enqueue(db, "evaluate", "demo", {"run_id": run[0], "device": "cpu",
                                                "dtype": "bfloat16"})
    work(home, once=True)
    row = dict(db["jobs"].get(job))
    assert row["status"] == "succeeded", row
    log = jobs.log_path(home, row).read_text()
    assert re.search(r"model \S+ on cpu, torch\.bfloat16", log), log[-2000:]
