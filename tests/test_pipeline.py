"""pipeline.py: methods end to end on a very small imported project, runs + metrics rows."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from leaml.methods import pipeline
from leaml.data.demo.build import DemoConfig
from leaml.data.ingest import load_demo
from leaml.store.runs import get_metrics, get_run

FAST = {"max_steps": 2, "min_steps": 0, "batch_size": 8}
KEYS = {"method", "accuracy", "by_category", "by_question_type", "n_test", "seconds"}


@pytest.fixture
def project(db):
    torch.set_num_threads(2)
    load_demo(db, DemoConfig(n_train=8, n_test=2, seed=0))
    return db


def _fast(method: str) -> dict:
    return {stage: FAST for stage in pipeline.method_config(method).stages}


@pytest.mark.parametrize("method", ["seed-lora", "caption-then-seed"])
def test_method_end_to_end_stores_json_run_and_metrics(project, method):
    db = project
    out = pipeline.run_method(db, "demo", method, label_fraction=0.5, seed=1,
                              overrides=_fast(method))
    assert KEYS <= set(out) and out["method"] == method and out["n_test"] > 0
    run = get_run(db, out["run_id"])
    assert run["status"] == "succeeded" and run["accuracy"] == out["accuracy"]
    assert run["params"]["n_kept_images"] == 4 and run["params"]["label_fraction"] == 0.5
    assert (Path(db.home) / run["model_dir"] / "predictions.jsonl").exists()
    metrics = get_metrics(db, out["run_id"])
    assert metrics[0] == {"scope": "overall", "key": "", "accuracy": out["accuracy"],
                          "n": out["n_test"]}
    assert {m["key"] for m in metrics if m["scope"] == "category"} == set(out["by_category"])
    assert {m["key"] for m in metrics if m["scope"] == "question_type"} == set(out["by_question_type"])
    again = pipeline.evaluate_run(db, out["run_id"])
    assert again["accuracy"] == out["accuracy"]
    if method == "seed-lora":
        assert (Path(db.home) / run["model_dir"] / "adapter_config.json").exists()
    assert not (Path(db.home) / "work" / f"run-{out['run_id']}").exists()


def test_zero_shot_stores_the_untrained_base_as_a_run(project):
    """zero-shot: no training; the run's model is the project's base, weight for weight, and
    its accuracy is the base's own on the test split."""
    from leaml.engine import models
    db = project
    out = pipeline.run_method(db, "demo", "zero-shot")
    run = get_run(db, out["run_id"])
    assert run["status"] == "succeeded" and run["base_model"] == models.DEFAULT_BASE
    assert run["params"]["stages"] == ["base", "evaluate"]
    base, _ = models.load(models.DEFAULT_BASE)
    stored, _ = models.load(str(Path(db.home) / run["model_dir"]))
    for (name, a), b in zip(base.state_dict().items(), stored.state_dict().values()):
        assert torch.equal(a, b), name
    assert pipeline.evaluate_run(db, out["run_id"])["accuracy"] == out["accuracy"]
    with pytest.raises(ValueError, match="not a stage"):
        pipeline.method_config("zero-shot", overrides={"train": {"lr": 1}})


def test_stopped_run_resumes_in_the_same_run_row(project, tmp_path):
    db = project
    calls = {"n": 0}

    def stop_once():
        calls["n"] += 1
        return calls["n"] == 2  # let one step through, then stop
    overrides = {"train": {**FAST, "max_steps": 3, "vision_warmup_epochs": 1.0}}  # not 85 passes
    first = pipeline.run_method(db, "demo", "seed-full", overrides=overrides,
                                work_dir=tmp_path / "w", should_stop=stop_once)
    assert first["stopped"] and first["stage"] == "train"
    assert (tmp_path / "w" / "train" / "checkpoint" / "state.pt").exists()
    seen = []
    done = pipeline.run_method(db, "demo", "seed-full", overrides=overrides,
                               work_dir=tmp_path / "w",
                               progress=lambda stage, step, total, loss: seen.append((stage, step)))
    assert ("train", 2) in seen and ("train", 1) not in seen  # went on from step 1
    runs = list(db.query("SELECT id, status FROM runs"))
    assert runs == [{"id": done["run_id"], "status": "succeeded"}]


def test_label_fraction_keeps_a_seeded_subset_of_images():
    ids = list(range(100, 300))
    a = pipeline.keep_fraction(ids, 0.01, seed=0)
    assert len(a) == 2 and a == pipeline.keep_fraction(ids, 0.01, seed=0)
    assert a != pipeline.keep_fraction(ids, 0.01, seed=1)
    assert pipeline.keep_fraction(ids[:10], 0.01, 0) != []  # never empty
    with pytest.raises(ValueError, match="label fraction"):
        pipeline.keep_fraction(ids, 0.0, 0)


def test_unknown_method_and_bad_override_say_what_to_use():
    with pytest.raises(ValueError, match="seed-lora"):
        pipeline.method_config("seed-magic")
    with pytest.raises(ValueError, match="not a stage"):
        pipeline.method_config("seed-full", overrides={"align": {"lr": 1}})


def test_full_finetuning_warms_the_vision_up_by_default_but_the_demo_table_budgets_do_not():
    full = pipeline.method_config("seed-full").stages["train"]
    assert full.vision_warmup_epochs > 0 and full.vision_warmup_flips and full.hard_fraction > 0
    assert full.vision_lr_scale == 0  # warmed, then frozen
    target = pipeline.method_config("leaml").stages["finetune"]
    assert target.vision_warmup_epochs > 0 and target.vision_lr_scale == 0
    assert pipeline.method_config("seed-lora").stages["train"].vision_warmup_epochs == 0
    from leaml.methods.report import full_plan, quick_plan
    for plan in (full_plan(), quick_plan()):
        for method, overrides in plan.overrides.items():
            for stage in pipeline.method_config(method, overrides=overrides).stages.values():
                assert stage.vision_warmup_epochs == stage.vision_warmup_steps == 0
                # no warmup: a full stage trains the tower rather than freeze it untrained
                assert stage.mode == "lora" or stage.vision_lr_scale > 0


def test_cli_run_prints_the_json_result_last(project, home):
    cmd = [sys.executable, "-m", "leaml", "run", "--home", str(home), "--project", "demo",
           "--method", "seed-full", "--label-fraction", "0.5", "--json",
           "--set", "train.max_steps=1", "--set", "train.min_steps=0", "--set", "train.batch_size=4",
           "--set", "train.vision_warmup_epochs=1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert KEYS <= set(out) and out["method"] == "seed-full"
    assert "train" in proc.stderr  # the progress bar
    ev = subprocess.run([sys.executable, "-m", "leaml", "evaluate", "--home", str(home),
                         "--run", str(out["run_id"]), "--json"], capture_output=True, text=True,
                        timeout=600, cwd=Path(__file__).resolve().parents[1])
    assert ev.returncode == 0 and json.loads(ev.stdout.strip().splitlines()[-1])["run_id"] == out["run_id"]
