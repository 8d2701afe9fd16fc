"""Every method by name: its default config, its stages, and :func:`run_method`, which runs
one end to end with a runs row and metrics (the building blocks are in
:mod:`leaml.methods.stages`).

The methods: ``seed-lora``, ``seed-full``, ``caption-then-seed``, ``zero-shot`` (here),
``leaml`` (:mod:`leaml.methods.leaml`, whose single stages ``generator``, ``pseudo``,
``finetune`` run_method also dispatches) and ``caption-qa`` (:mod:`leaml.methods.caption_qa`).

Result (also what ``python -m leaml run --json`` prints):
``{"method", "accuracy", "by_category", "by_question_type", "n_test", "seconds", "run_id"}``
with accuracies in percent.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from leaml.config import TrainConfig, fold_overrides
from leaml.methods import caption_qa
from leaml.methods import leaml as leaml_method
from leaml.methods.stages import (MethodConfig, Progress, Stage, base_stage, caption_examples,
                                  configure, evaluate_stage, qa_examples, run_stages,
                                  seed_full_train, train_stage)
from leaml.methods.stages import (ProgressBar, RunData, evaluate_run,  # noqa: F401  (re-exported)
                                  keep_fraction, load_run_data)


# --- hyperparameters per method -------------------------------------------------------------

# Budget (demo, 2 CPU cores): the full-label oracle must train and evaluate in < 15 min, so
# epochs count over ~36k QA pairs; min_steps keeps 1% runs (~360 pairs) training long enough.
# Batch 64 uses two cores better than 32 on the tiny base. LoRA needs a far higher lr than full
# (1% demo, seed 0: lr 4e-3 -> 24.1%, 1.5e-2 -> 55.3%; bench/RESULTS.md).

def _seed_lora() -> TrainConfig:
    return TrainConfig(mode="lora", lr=1.5e-2, batch_size=64, epochs=2.0, min_steps=200,
                       warmup_ratio=0.05, lora_r=16, lora_alpha=32.0)


def _align() -> TrainConfig:
    """LLaVA-Med stage 1 on the teacher captions of the unlabeled images (one pass)."""
    return TrainConfig(mode="full", lr=1e-3, batch_size=64, epochs=1.0, min_steps=100,
                       warmup_ratio=0.05)


DEFAULTS: dict[str, Callable[[], MethodConfig]] = {
    "seed-lora": lambda: MethodConfig({"train": _seed_lora()}),
    "seed-full": lambda: MethodConfig({"train": seed_full_train()}),
    "caption-then-seed": lambda: MethodConfig({"align": _align(), "train": seed_full_train()}),
    "leaml": leaml_method.default_config,
    "caption-qa": caption_qa.default_config,
    "zero-shot": lambda: MethodConfig(),  # the base untrained: the floor every method starts at
}


def method_config(method: str, seed: int = 0, overrides: dict | None = None) -> MethodConfig:
    """The default config of ``method`` with the run's seed, updated by ``overrides``
    (``{"train": {"lr": 1e-3}, "eval_batch_size": 32}``: every other form of override is
    folded into this one by ``leaml.config.fold_overrides``). Removed options that stored
    params still name are dropped with a warning."""
    if method not in DEFAULTS:
        raise ValueError(f"unknown method '{method}'; use one of {', '.join(sorted(METHODS))}")
    return configure(method, DEFAULTS[method](), seed, overrides)


METHODS: dict[str, Callable[[], list[Stage]]] = {
    "seed-lora": lambda: [train_stage("train", lambda c: qa_examples(c.db, c.data.seed_rows)),
                          evaluate_stage()],
    "seed-full": lambda: [train_stage("train", lambda c: qa_examples(c.db, c.data.seed_rows)),
                          evaluate_stage()],
    "caption-then-seed": lambda: [
        train_stage("align", lambda c: caption_examples(c.db, c.data.caption_rows)),
        train_stage("train", lambda c: qa_examples(c.db, c.data.seed_rows)),
        evaluate_stage()],
    "leaml": leaml_method.stages,
    "caption-qa": caption_qa.stages,
    "zero-shot": lambda: [base_stage(), evaluate_stage()],
}


def stage_names(method: str) -> list[str]:
    """The stage names of a method, in order (jobs announce them as the job's plan)."""
    if method not in METHODS:
        raise ValueError(f"unknown method '{method}'; use one of {', '.join(sorted(METHODS))}")
    return [s.name for s in METHODS[method]()]


# --- running a method ------------------------------------------------------------------------

def run_method(store, project: str | int, method: str, *, label_fraction: float = 1.0,
               seed: int = 0, base_model: str | None = None, progress: Progress | None = None,
               should_stop: Callable[[], bool] | None = None, work_dir: str | Path | None = None,
               resume: bool = True, overrides: dict | None = None, job_id: int | None = None,
               user: str | None = None, options: dict | None = None,
               data_mix: dict | None = None, **stage_params) -> dict:
    """Run ``method`` on ``project`` end to end: train, evaluate, store a run and metrics.

    ``store`` is an open database or a data home. Only the seed QA of a seeded random
    ``label_fraction`` of the labeled train images is used; the other train images count as
    unlabeled (their captions feed caption-then-seed). ``base_model`` defaults to the
    project's. ``work_dir`` (default ``<home>/work/run-<id>``, removed on success) holds stage
    outputs and checkpoints; with ``resume`` a folder from an interrupted attempt continues
    where it stopped. Returns the result JSON, or ``{"stopped": True, "stage": ...}`` when
    ``should_stop`` ended it early (run again with the same work_dir to resume).

    LEAML (leaml/methods/leaml.py): ``options`` (flat knobs: k, rho, keep_top ...) and
    ``data_mix`` (which pairs train the target) become overrides; ``method`` may also be one
    of its single stages ``generator``, ``pseudo``, ``finetune`` (the job kinds), which take
    ``stage_params`` such as ``generator_run``, ``k``, ``keep_top``, ``min_confidence``.
    """
    if options or data_mix is not None:
        overrides = fold_overrides(method, overrides, options=options, data_mix=data_mix)
    if method in leaml_method.STAGE_COMMANDS:
        return leaml_method.STAGE_COMMANDS[method](
            store, project, label_fraction=label_fraction, seed=seed, base_model=base_model,
            progress=progress, should_stop=should_stop, work_dir=work_dir, resume=resume,
            overrides=overrides, job_id=job_id, user=user, **stage_params)
    if stage_params:
        raise TypeError(f"run_method({method!r}): unexpected {', '.join(sorted(stage_params))}")
    config = method_config(method, seed, overrides)
    return run_stages(store, project, method, config, METHODS[method](),
                      label_fraction=label_fraction, seed=seed, base_model=base_model,
                      progress=progress, should_stop=should_stop, work_dir=work_dir,
                      resume=resume, job_id=job_id, user=user)
