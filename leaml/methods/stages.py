"""What every method is built from, and running one: its config (:class:`MethodConfig`),
the run's data resolved once (:class:`RunData`: the seed set, the unlabeled set, the test
set), stages (:class:`Stage` taking a :class:`RunContext`; the generic train, base and
evaluate stages), and :func:`run_stages`, which runs a method's stages with a runs row.

Stages talk through model folders, not objects in memory: a training stage starts from the
previous stage's folder (or the base model) and saves its result in
``<work_dir>/<stage>/model``, then writes ``done.json``. A run resumed with the same
``work_dir`` (a job's checkpoint folder) skips finished stages and continues the unfinished
one from its checkpoint. The last stage evaluates on the test split and stores the metrics.
Which methods exist, and their defaults, is :mod:`leaml.methods.pipeline`'s business.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import sqlite_utils
from tqdm import tqdm

from leaml.config import DEFAULT_BASE, TrainConfig, drop_removed
from leaml.data.split import keep_fraction
from leaml.engine import checkpoints, evaluate, models
from leaml.engine.batches import Example
from leaml.engine.train import load_trained, save_trained, train
from leaml.store import connect
from leaml.store.images import image_path, list_images
from leaml.store.projects import get_project
from leaml.store.qa import test_pairs, training_pairs
from leaml.store.runs import (create_run, finish_run, get_run, save_metrics, unlabeled_captions,
                              update_run)

Progress = Callable[[str, int, int, float], None]
ALIGN_INSTRUCTION = "Describe the image."


# --- configs -----------------------------------------------------------------------------------

# Budget (demo, 2 CPU cores): the full-label oracle must train and evaluate in < 15 min, so
# epochs count over ~36k QA pairs; min_steps keeps 1% runs (~360 pairs) training long enough.
# Batch 64 uses two cores better than 32 on the tiny base.

def seed_full_train() -> TrainConfig:
    """Full finetuning after a vision warmup of 85 passes over the images (mirrored at random
    and moved by up to 4 px, a bias per image token and answer word in the heads), the warmed
    tower then frozen (as LLaVA keeps its tower frozen), a quarter of each batch drawn from the
    questions not learned yet. Demo oracle on ``tiny``, seed 0: 72.32% without any of these,
    83.04% with the warmup and the hard draws, 86.61% with the frozen tower too (11:06 on two
    cores), 87.06% with the per-token bias; on ``tiny16`` 90.25% with the bias, 92.12% with
    the 4 px moves too (a quarter of its 16 px patch; one thread). At 1% labels the frozen
    tower costs 0.2-0.5 points (bench/RESULTS.md)."""
    return TrainConfig(mode="full", lr=1e-3, batch_size=64, epochs=2.0, min_steps=200,
                       warmup_ratio=0.05, weight_decay=0.0, vision_warmup_epochs=85.0,
                       vision_warmup_where=True, vision_warmup_shift=4, vision_lr_scale=0.0,
                       hard_fraction=0.25)


@dataclass
class MethodConfig:
    """Hyperparameters of a method run: one TrainConfig per training stage, plus evaluation."""
    stages: dict = field(default_factory=dict)  # stage name -> TrainConfig
    eval_batch_size: int = field(default=64, metadata={"help": "questions per generate() batch"})
    max_new_tokens: int = field(default=24, metadata={"help": "longest answer generated"})
    options: dict = field(default_factory=dict, metadata={
        "help": "method-specific knobs beyond TrainConfig (LEAML: rho, k, keep_top ...)"})

    def to_dict(self) -> dict:
        return {"stages": {k: v.to_dict() for k, v in self.stages.items()},
                "eval_batch_size": self.eval_batch_size, "max_new_tokens": self.max_new_tokens,
                "options": self.options}


def configure(method: str, cfg: MethodConfig, seed: int = 0,
              overrides: dict | None = None) -> MethodConfig:
    """``cfg`` (a method's defaults) with the run's seed in every stage, updated by
    ``overrides`` (``{"train": {"lr": 1e-3}, "eval_batch_size": 32}``: every other form of
    override is folded into this one by ``leaml.config.fold_overrides``). Removed options
    that stored params still name are dropped with a warning."""
    cfg.stages = {k: replace(v, seed=seed) for k, v in cfg.stages.items()}
    for key, value in (overrides or {}).items():
        if key in cfg.stages or key in cfg.options:
            _override(cfg, key, value, method)
        elif key in ("eval_batch_size", "max_new_tokens"):
            setattr(cfg, key, value)
        else:
            raise ValueError(f"override '{key}': not a stage of {method} "
                             f"({', '.join(cfg.stages)}) nor eval_batch_size/max_new_tokens")
    return cfg


def _override(cfg: MethodConfig, key: str, value, method: str) -> None:
    """Stage fields go to the stage's TrainConfig, the rest to ``cfg.options[key]``."""
    if not isinstance(value, dict):
        if key in cfg.stages:
            raise ValueError(f"override '{key}' of {method}: give fields, e.g. {key}.lr=1e-3")
        cfg.options[key] = value
        return
    value = drop_removed(value, f"{key}.")
    names = set(TrainConfig.__dataclass_fields__) if key in cfg.stages else set()
    mine = {k: v for k, v in value.items() if k in names}
    rest = {k: v for k, v in value.items() if k not in names}
    if mine:
        cfg.stages[key] = replace(cfg.stages[key], **mine)
    bad = [k for k in rest if not isinstance(cfg.options.get(key), dict) or k not in cfg.options[key]]
    if bad:
        raise ValueError(f"override '{key}.{bad[0]}' of {method}: no such field; see "
                         f"`python -m leaml run --help`")
    if rest:
        cfg.options[key] = {**cfg.options[key], **rest}


# --- the run context -------------------------------------------------------------------------

@dataclass
class RunContext:
    """Everything a stage needs: store, project, run row, data, configs and callbacks."""
    db: sqlite_utils.Database
    project: dict
    method: str
    run_id: int
    base_model: str
    work_dir: Path
    config: MethodConfig
    data: "RunData"
    progress: Progress | None = None
    should_stop: Callable[[], bool] | None = None
    model_dir: str | None = None  # the newest model folder (None: the base model)
    job_id: int | None = None  # the job running the method: its other runs rows carry it too

    def stage_dir(self, name: str) -> Path:
        return self.work_dir / name


@dataclass
class Stage:
    """One named step of a method: ``run(ctx)`` returns False when it was stopped."""
    name: str
    run: Callable[[RunContext], bool]


# --- data of a run ---------------------------------------------------------------------------

@dataclass
class RunData:
    """A run's data, resolved once and handed to every stage: the seed QA of the kept labeled
    images, the unlabeled set (the other train images, and their captions), the test pairs."""
    seed_rows: list[dict]
    caption_rows: list[dict]
    test_rows: list[dict]
    labeled_images: int
    kept_images: list[int]
    label_fraction: float = 1.0
    seed: int = 0
    unlabeled: list[dict] = field(default_factory=list)  # image rows of the unlabeled set

    def summary(self) -> dict:
        return {"n_seed_qa": len(self.seed_rows), "n_labeled_images": self.labeled_images,
                "n_kept_images": len(self.kept_images), "n_captions": len(self.caption_rows),
                "n_test": len(self.test_rows)}


def load_run_data(db, project_id: int, label_fraction: float, seed: int, *,
                  tests: bool = True) -> RunData:
    """Which labels a run may use: the seed QA of a seeded fraction of the labeled images;
    the other train images are its unlabeled set. ``tests=False``: no test pairs (the QA
    generator needs none)."""
    labeled = [r["id"] for r in list_images(db, project_id, split="train", unlabeled=False)]
    return kept_data(db, project_id, keep_fraction(labeled, label_fraction, seed),
                     labeled_images=len(labeled), label_fraction=label_fraction, seed=seed,
                     tests=tests)


def kept_data(db, project_id: int, kept: list[int], *, labeled_images: int,
              label_fraction: float, seed: int, tests: bool = True) -> RunData:
    """The run's data when its kept labeled images are known (``kept``)."""
    seed_rows = [r for r in training_pairs(db, project_id, image_ids=kept) if r["origin"] == "seed"]
    captions = unlabeled_captions(db, project_id, exclude_image_ids=kept)
    test_rows = test_pairs(db, project_id) if tests else []
    if tests and not test_rows:
        raise ValueError(f"project '{project_id}' has no test QA pairs; import rows with "
                         "split=test to evaluate")
    kept_set = set(kept)
    unlabeled = [r for r in list_images(db, project_id, split="train") if r["id"] not in kept_set]
    return RunData(seed_rows, captions, test_rows, labeled_images, kept, label_fraction, seed,
                   unlabeled)


def _image_file(db, row: dict) -> str:
    return str(image_path(db, row))


def qa_examples(db, rows: list[dict]):
    """Training examples from QA rows: the instruction is the question."""
    return [Example(_image_file(db, r), r["question"], r["answer"],
                    open=r["answer"].strip().lower() not in ("yes", "no")) for r in rows]


def caption_examples(db, rows: list[dict]):
    """Alignment examples: "Describe the image." -> the teacher caption."""
    return [Example(_image_file(db, r), ALIGN_INSTRUCTION, r["caption"], open=True) for r in rows]


# --- stages ----------------------------------------------------------------------------------

def _done_file(ctx: RunContext, name: str) -> Path:
    return ctx.stage_dir(name) / "done.json"


def train_stage(name: str, examples_of: Callable[[RunContext], list]) -> Stage:
    """A stage that trains the current model on ``examples_of(ctx)`` with the stage's config."""
    def run(ctx: RunContext) -> bool:
        config = ctx.config.stages[name]
        examples = examples_of(ctx)
        if not examples:
            raise ValueError(f"stage '{name}' of {ctx.method} has nothing to train on "
                             f"(project '{ctx.project['name']}'); see the data summary {ctx.data.summary()}")
        model, processor = (load_trained(ctx.model_dir, ctx.base_model, merge=True)
                            if ctx.model_dir else models.load(ctx.base_model))
        result = train(model, processor, examples, config, work_dir=ctx.stage_dir(name),
                       progress=ctx.progress, should_stop=ctx.should_stop, stage=name)
        if result.stopped:
            return False
        out = save_trained(result.model, processor, ctx.stage_dir(name) / "model")
        checkpoints.remove(ctx.stage_dir(name))  # the last and the previous
        _done_file(ctx, name).write_text(json.dumps({
            "model_dir": str(out), "steps": result.step, "seconds": result.seconds,
            "samples_per_s": result.samples_per_s, "final_loss": result.losses[-1] if result.losses else None,
            "image_cache": result.image_cache}))
        ctx.model_dir = str(out)
        return True
    return Stage(name, run)


def base_stage() -> Stage:
    """The base as it is, saved as the stage's model so that the run is evaluated, served
    and exported like a trained one (``zero-shot``: what the base answers before any
    finetuning; a copy of the base's weights)."""
    def run(ctx: RunContext) -> bool:
        model, processor = models.load(ctx.base_model)
        out = save_trained(model, processor, ctx.stage_dir("base") / "model")
        _done_file(ctx, "base").write_text(json.dumps({"model_dir": str(out)}))
        ctx.model_dir = str(out)
        return True
    return Stage("base", run)


def evaluate_stage() -> Stage:
    """Move the final model to ``<home>/models/run-<id>``, evaluate it, store the metrics."""
    def run(ctx: RunContext) -> bool:
        final = Path(ctx.db.home) / "models" / f"run-{ctx.run_id}"
        if ctx.model_dir and Path(ctx.model_dir) != final:
            shutil.rmtree(final, ignore_errors=True)
            final.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(ctx.model_dir, final)
            ctx.model_dir = str(final)
        update_run(ctx.db, ctx.run_id, model_dir=str(final.relative_to(ctx.db.home)))
        summary = evaluate_dir(ctx.db, ctx.run_id, final, ctx.base_model, ctx.data.test_rows,
                               ctx.config, ctx.progress)
        _done_file(ctx, "evaluate").parent.mkdir(parents=True, exist_ok=True)
        _done_file(ctx, "evaluate").write_text(json.dumps(summary))
        return True
    return Stage("evaluate", run)


def evaluate_dir(db, run_id: int, model_dir: Path, base_model: str, test_rows: list[dict],
                 config: MethodConfig, progress: Progress | None = None) -> dict:
    """Evaluate a saved model on test rows; store metrics and predictions; return the summary."""
    items = evaluate.items_from_rows(test_rows, lambda r: image_path(db, r))
    preds = evaluate.predict_saved(model_dir, base_model, items, progress=progress,
                                   batch_size=config.eval_batch_size,
                                   max_new_tokens=config.max_new_tokens)
    summary = evaluate.summarize(items, preds)
    save_metrics(db, run_id, summary)
    with open(Path(model_dir) / "predictions.jsonl", "w", encoding="utf-8") as fh:
        for it, p in zip(items, preds):
            fh.write(json.dumps({"qa_id": it.qa_id, "question": it.question, "answer": it.answer,
                                 "prediction": p, "category": it.category,
                                 "question_type": it.question_type}) + "\n")
    return summary


def open_db(store):
    """An open database as it is; a data home opened."""
    return store if isinstance(store, sqlite_utils.Database) else connect(store)


def _start_run(db, project: dict, method: str, base_model: str, work_dir: Path | None,
               params: dict, job_id, user) -> tuple[int, Path, dict]:
    """The run row and work folder; a work folder from an earlier attempt keeps its run."""
    state_file = work_dir / "run.json" if work_dir else None
    if state_file and state_file.exists():
        state = json.loads(state_file.read_text())
        if state.get("method") == method and state.get("project_id") == project["id"]:
            get_run(db, state["run_id"])
            update_run(db, state["run_id"], status="running")
            return state["run_id"], work_dir, state
    run_id = create_run(db, project["id"], method=method, base_model=base_model, params=params,
                        job_id=job_id, user=user)
    work_dir = work_dir or Path(db.home) / "work" / f"run-{run_id}"
    work_dir.mkdir(parents=True, exist_ok=True)
    state = {"run_id": run_id, "method": method, "project_id": project["id"], "seconds": 0.0}
    (work_dir / "run.json").write_text(json.dumps(state))
    return run_id, work_dir, state


def run_stages(store, project: str | int, method: str, config: MethodConfig,
               stages: list[Stage], *, label_fraction: float = 1.0, seed: int = 0,
               base_model: str | None = None, progress: Progress | None = None,
               should_stop: Callable[[], bool] | None = None,
               work_dir: str | Path | None = None, resume: bool = True,
               job_id: int | None = None, user: str | None = None) -> dict:
    """Run ``stages`` of ``method`` with ``config`` on ``project``: resolve the run's data
    once (:func:`load_run_data`), keep a runs row, store the metrics of the last stage's
    evaluation. Returns the result JSON, or ``{"stopped": True, "stage": ...}`` when
    ``should_stop`` ended it early (:func:`leaml.methods.pipeline.run_method` says more)."""
    t0 = time.monotonic()
    db = open_db(store)
    proj = get_project(db, project)
    base = base_model or proj.get("base_model") or DEFAULT_BASE
    data = load_run_data(db, proj["id"], label_fraction, seed)
    params = {"label_fraction": label_fraction, "seed": seed, **data.summary(),
              "config": config.to_dict(), "stages": [s.name for s in stages]}
    wd = Path(work_dir) if work_dir else None
    if wd and not resume:
        shutil.rmtree(wd, ignore_errors=True)
    run_id, wd, state = _start_run(db, proj, method, base, wd, params, job_id, user)
    ctx = RunContext(db, proj, method, run_id, base, wd, config, data, progress, should_stop,
                     job_id=job_id)
    try:
        for stage in stages:
            if _resume_stage(ctx, stage.name):
                continue
            if not stage.run(ctx):
                _save_seconds(wd, state, time.monotonic() - t0)
                return {"stopped": True, "stage": stage.name, "method": method}
    except BaseException:
        finish_run(db, run_id, accuracy=None, seconds=state["seconds"] + time.monotonic() - t0,
                   status="failed")
        raise
    summary = json.loads(_done_file(ctx, "evaluate").read_text())
    seconds = round(state["seconds"] + time.monotonic() - t0, 1)
    finish_run(db, run_id, accuracy=summary["accuracy"], seconds=seconds)
    if work_dir is None:
        shutil.rmtree(wd, ignore_errors=True)
    return result_json(method, summary, seconds, run_id)

def _resume_stage(ctx: RunContext, name: str) -> bool:
    """True when stage ``name`` finished in an earlier attempt (its model becomes current)."""
    done = _done_file(ctx, name)
    if not done.exists():
        return False
    info = json.loads(done.read_text())
    if info.get("model_dir"):
        ctx.model_dir = info["model_dir"]
    return True


def _save_seconds(wd: Path, state: dict, seconds: float) -> None:
    state["seconds"] = state["seconds"] + seconds
    (wd / "run.json").write_text(json.dumps(state))


def result_json(method: str, summary: dict, seconds: float, run_id: int) -> dict:
    """The DESIGN.md result object (accuracies in percent)."""
    return {"method": method, "accuracy": summary["accuracy"],
            "by_category": summary["by_category"],
            "by_question_type": summary["by_question_type"],
            "n_test": summary["n_test"], "seconds": seconds, "run_id": run_id}


def evaluate_run(store, run_id: int, *, progress: Progress | None = None) -> dict:
    """Re-evaluate a stored run's model on its project's current test split; store metrics."""
    db = open_db(store)
    run = get_run(db, run_id)
    if not run["model_dir"] or not (Path(db.home) / run["model_dir"]).exists():
        raise ValueError(f"run {run_id} has no saved model (status {run['status']}); "
                         "re-run the method to produce one")
    t0 = time.monotonic()
    config = MethodConfig(**{k: v for k, v in run["params"].get("config", {}).items()
                             if k in ("eval_batch_size", "max_new_tokens")})
    summary = evaluate_dir(db, run_id, Path(db.home) / run["model_dir"], run["base_model"],
                           test_pairs(db, run["project_id"]), config, progress)
    return result_json(run["method"], summary, round(time.monotonic() - t0, 1), run_id)


class ProgressBar:
    """A progress callback drawing one tqdm bar per stage on stderr (for the CLI)."""

    def __init__(self):
        self.bar, self.stage = None, None

    def __call__(self, stage: str, step: int, total: int, loss: float) -> None:
        if stage != self.stage:
            self.close()
            self.bar, self.stage = tqdm(total=total, desc=stage, unit="step", leave=True), stage
        if loss == loss:  # not NaN
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        self.bar.update(step - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
