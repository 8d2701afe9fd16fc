"""The LEAML method as pipeline stages, and each stage as a command of its own.

``python -m leaml run --method leaml`` runs four stages (``leaml.methods.pipeline`` drives them):

1. ``generator``: train the QA generator G (leaml/engine/generator.py) on the run's seed QA with
   caption distillation on the run's unlabeled images, restricted to the top-``rho`` neurons;
   G is stored as a runs row of method ``generator`` (``<home>/models/run-<id>``), whose id the
   pseudo pairs carry.
2. ``pseudo``: G writes K candidates per unlabeled image; parsed, filtered, de-duplicated
   pairs are stored as ``pending`` QA rows with their answer-token confidence (leaml/engine/pseudo.py).
3. ``finetune``: the target, a fresh model from the base trains on the seed QA (oversampled by
   ``seed_weight``) + accepted/edited pseudo pairs + this generator's pending pairs at or
   above the confidence cut (top ``keep_top`` of them, or ``min_confidence``). Rejected pairs
   never train anything.
4. ``evaluate``: the pipeline's own evaluation.

The same code runs stage by stage (``generator`` / ``pseudo`` / ``finetune`` commands and job
kinds): ``finetune`` is the ``leaml`` method told to reuse a stored generator run and its
pairs, so with the same seed both paths give the same model and the same numbers.
"""
from __future__ import annotations

import copy
import json
import math
import shutil
import time
from dataclasses import replace
from pathlib import Path

from leaml.config import (DEFAULT_BASE, FinetuneOptions, GeneratorConfig, PseudoConfig,
                          TrainConfig, generator_train, leaml_options)
from leaml.engine import checkpoints, generator, models, vllm_engine
from leaml.engine.pseudo import confidence_cut
from leaml.engine.train import Stream, save_trained, train
from leaml.methods.pseudo_stage import (GENERATOR_METHOD, check_generator_run,  # noqa: F401
                                        generate_pseudo, generator_data)
from leaml.methods.stages import (MethodConfig, RunContext, RunData, Stage, configure,
                                  evaluate_stage, load_run_data, open_db, qa_examples,
                                  run_stages, seed_full_train)
from leaml.store.images import image_path
from leaml.store.projects import get_project
from leaml.store.qa import list_qa, training_pairs
from leaml.store.runs import create_run, finish_run, get_run, list_runs, update_run


def _target_train() -> TrainConfig:
    """The target's optimiser settings: those of the best seed-only baseline (seed-full: 61.7%
    against seed-lora's 55.3% at 1% labels, seed 0), so that only the data differs, but 8
    passes over its (far larger) data instead of 2: after 2 the target still answers every
    question with its most common pseudo answer (1% demo labels, seed 0: 61.2% vs 67.2%;
    seed-full itself goes from 59.2% at its default 200 steps to 62.1% at 940; bench/RESULTS.md)."""
    return replace(seed_full_train(), epochs=8.0)


def default_config() -> MethodConfig:
    """MethodConfig of the ``leaml`` method (stage TrainConfigs + LEAML options)."""
    return MethodConfig({"generator": generator_train(), "finetune": _target_train()},
                        options=leaml_options())


def leaml_config(seed: int = 0, overrides: dict | None = None) -> MethodConfig:
    """LEAML's config with the run's seed, updated by ``overrides`` (as
    ``pipeline.method_config("leaml", ...)``)."""
    return configure("leaml", default_config(), seed, overrides)


def run_seed(ctx: RunContext) -> int:
    """The run's seed (method_config puts it into every stage's TrainConfig)."""
    return next(iter(ctx.config.stages.values())).seed


def generator_config(config: MethodConfig) -> GeneratorConfig:
    return GeneratorConfig(train=config.stages["generator"], **config.options["generator"])


def pseudo_config(config: MethodConfig, seed: int) -> PseudoConfig:
    return PseudoConfig(seed=seed, **config.options["pseudo"])


def finetune_options(config: MethodConfig) -> FinetuneOptions:
    """Which pairs train the target (``options["finetune"]``, typed)."""
    return FinetuneOptions(**config.options["finetune"])


# --- stage 1: the generator ---------------------------------------------------------------

def train_generator_run(db, project: dict, data: RunData, base_model: str,
                        cfg: GeneratorConfig, *, work_dir: Path, progress=None,
                        should_stop=None, job_id=None, user=None) -> int | None:
    """Train G on ``data`` (its seed QA, the captions of its unlabeled set; seeded by
    ``data.seed``) and store it as a ``generator`` run; returns its id (None: stopped).

    ``work_dir`` holds the checkpoint and ``generator_run.json``, so a resumed attempt
    continues the same run row.
    """
    seed = data.seed
    work_dir.mkdir(parents=True, exist_ok=True)
    state_file = work_dir / "generator_run.json"
    t0 = time.monotonic()
    if state_file.exists():
        run_id = json.loads(state_file.read_text())["generator_run"]
    else:
        params = {"label_fraction": data.label_fraction, "seed": seed, **data.summary(),
                  "kept_images": data.kept_images, "config": cfg.to_dict()}
        run_id = create_run(db, project["id"], method=GENERATOR_METHOD, base_model=base_model,
                            params=params, job_id=job_id, user=user)
        state_file.write_text(json.dumps({"generator_run": run_id}))
    file_of = lambda r: str(image_path(db, r))  # noqa: E731
    captions = generator.pick(data.caption_rows, cfg.max_captions, seed)
    model, processor = models.load(base_model)
    try:
        qa = generator.qa_examples(data.seed_rows, file_of, context=cfg.context)
        answers = generator.answer_stream(data.seed_rows, file_of, cfg)
        res = generator.train_generator(model, processor, qa, generator.caption_examples(captions, file_of),
                                        cfg, answers=answers, work_dir=work_dir, progress=progress,
                                        should_stop=should_stop)
        if res.train.stopped:
            return None
        out = Path(db.home) / "models" / f"run-{run_id}"
        shutil.rmtree(out, ignore_errors=True)
        save_trained(res.train.model, processor, out)  # a full disk fails the run too
    except BaseException:
        finish_run(db, run_id, accuracy=None, seconds=time.monotonic() - t0, status="failed")
        raise
    checkpoints.remove(work_dir)  # the last and the previous
    _merge_params(db, run_id, {"generator": res.info})
    update_run(db, run_id, model_dir=str(out.relative_to(db.home)))
    finish_run(db, run_id, accuracy=None, seconds=round(res.info["seconds"], 1))
    return run_id


def _merge_params(db, run_id: int, extra: dict) -> None:
    params = get_run(db, run_id)["params"]
    params.update(extra)
    update_run(db, run_id, params=params)


def _generator_stage() -> Stage:
    def run(ctx: RunContext) -> bool:
        # an engine that cannot sample fails the run now, before G trains
        vllm_engine.check(ctx.config.options["pseudo"].get("engine", "hf"))
        reuse = ctx.config.options.get("generator_run")
        if reuse is not None:
            gen_id = int(reuse)
            check_generator_run(ctx.db, gen_id, ctx.project["id"])
        else:
            gen_id = train_generator_run(
                ctx.db, ctx.project, ctx.data, ctx.base_model, generator_config(ctx.config),
                work_dir=ctx.stage_dir("generator"), progress=ctx.progress,
                should_stop=ctx.should_stop, job_id=ctx.job_id, user=None)
            if gen_id is None:
                return False
        _write_done(ctx, "generator", {"generator_run": gen_id})
        _merge_params(ctx.db, ctx.run_id, {"generator_run": gen_id})
        return True
    return Stage("generator", run)


def _write_done(ctx: RunContext, name: str, info: dict) -> None:
    d = ctx.stage_dir(name)
    d.mkdir(parents=True, exist_ok=True)
    (d / "done.json").write_text(json.dumps(info))


def _generator_of(ctx: RunContext) -> int:
    return json.loads((ctx.stage_dir("generator") / "done.json").read_text())["generator_run"]


# --- stage 2: pseudo QA ---------------------------------------------------------------------

def _pseudo_stage() -> Stage:
    def run(ctx: RunContext) -> bool:
        gen_id = _generator_of(ctx)
        info = {"skipped": True}
        if not ctx.config.options.get("reuse_pseudo"):
            info = generate_pseudo(ctx.db, gen_id, pseudo_config(ctx.config, run_seed(ctx)),
                                   ctx.data, progress=ctx.progress, should_stop=ctx.should_stop)
            if info.get("stopped"):
                return False
        _write_done(ctx, "pseudo", info)
        return True
    return Stage("pseudo", run)


# --- stage 3: the target ----------------------------------------------------------------------

def target_rows(db, project_id: int, gen_run_id: int, seed_rows: list[dict], *,
                keep_top: float | None, min_confidence: float | None, use_reviewed: bool = True,
                use_pending: bool = True, cut_per_question: bool = True) -> tuple[list[dict], dict]:
    """The pseudo pairs that train the target, and a summary of the data.

    Accepted and edited pseudo pairs of any generator run (``use_reviewed``), plus
    ``gen_run_id``'s pending pairs at or above the cut (``use_pending``; the cut is computed
    over that run's pending pairs, or, with ``cut_per_question``, over each question's own:
    answer confidences differ by question, and one global cut can drop a question entirely).
    Never a rejected pair (``store.qa.training_pairs`` does not return them).
    """
    pending = [r for r in list_qa(db, project_id, origin="pseudo", status="pending")
               if r["gen_run_id"] == gen_run_id and r["confidence"] is not None]
    def group(r):  # the pairs one cut ranks: all of them, or those of one question
        return r["question"] if cut_per_question else ""
    groups: dict[str, list[float]] = {"": []} if not pending else {}  # "": keep_top still checked
    for r in pending:
        groups.setdefault(group(r), []).append(r["confidence"])
    cuts = {g: confidence_cut(c, keep_top=keep_top, min_confidence=min_confidence)
            for g, c in groups.items()}
    if not use_pending:
        cuts = {}
    lowest = min(cuts.values(), default=math.inf)
    rows = [r for r in training_pairs(db, project_id, include_pending_min_conf=None if math.isinf(lowest) else lowest)
            if r["origin"] == "pseudo" and (r["gen_run_id"] == gen_run_id if r["status"] == "pending"
                                            else use_reviewed)]
    rows = [r for r in rows if r["status"] != "pending" or r["confidence"] >= cuts.get(group(r), math.inf)]
    n_pending = sum(r["status"] == "pending" for r in rows)
    cut = None if cut_per_question or math.isinf(lowest) else lowest
    return rows, {"n_seed_qa": len(seed_rows), "n_pseudo_pending_kept": n_pending,
                  "n_pseudo_reviewed": len(rows) - n_pending, "n_pseudo_pending_total": len(pending),
                  "confidence_cut": cut}


def _target_stage() -> Stage:
    def run(ctx: RunContext) -> bool:
        opts = finetune_options(ctx.config)
        gen_id = _generator_of(ctx)
        seed_rows = ctx.data.seed_rows if opts.use_seed else []
        rows, summary = target_rows(ctx.db, ctx.project["id"], gen_id, seed_rows,
                                    keep_top=opts.keep_top, min_confidence=opts.min_confidence,
                                    use_reviewed=opts.use_reviewed, use_pending=opts.use_pending,
                                    cut_per_question=opts.cut_per_question)
        seed_ex = qa_examples(ctx.db, seed_rows)
        if not seed_ex and not rows:
            raise ValueError(f"project '{ctx.project['name']}': no seed QA and no usable pseudo QA "
                             "to train the target on; label some images or lower the cut")
        streams = [Stream(seed_ex, weight=opts.seed_weight * len(seed_ex), name="seed")] if seed_ex else []
        if rows:
            streams.append(Stream(qa_examples(ctx.db, rows), weight=len(rows), name="pseudo"))
        model, processor = models.load(ctx.base_model)
        result = train(model, processor, streams, ctx.config.stages["finetune"],
                       work_dir=ctx.stage_dir("finetune"), progress=ctx.progress,
                       should_stop=ctx.should_stop, stage="finetune")
        if result.stopped:
            return False
        out = save_trained(result.model, processor, ctx.stage_dir("finetune") / "model")
        checkpoints.remove(ctx.stage_dir("finetune"))  # the last and the previous
        summary.update(steps=result.step, seconds=round(result.seconds, 1))
        _write_done(ctx, "finetune", {"model_dir": str(out), **summary})
        _merge_params(ctx.db, ctx.run_id, {"target_data": summary})
        ctx.model_dir = str(out)
        return True
    return Stage("finetune", run)


def stages() -> list[Stage]:
    """The ``leaml`` method's stages, in order."""
    return [_generator_stage(), _pseudo_stage(), _target_stage(), evaluate_stage()]


# --- the single stages as commands / job kinds ------------------------------------------------

def generator_command(store, project, *, label_fraction: float = 1.0, seed: int = 0,
                      base_model: str | None = None, progress=None, should_stop=None,
                      work_dir=None, resume: bool = True, overrides: dict | None = None,
                      job_id=None, user=None, **_ignored) -> dict:
    """Stage 1 alone: train G on the project's seed QA (of a label fraction) + captions and
    store it as a ``generator`` run. Returns ``{"generator_run", "seconds", ...}`` or
    ``{"stopped": True}`` (call again with the same work_dir to resume)."""
    db = open_db(store)
    proj = get_project(db, project)
    base = base_model or proj.get("base_model") or DEFAULT_BASE
    cfg = generator_config(leaml_config(seed, overrides))
    data = load_run_data(db, proj["id"], label_fraction, seed, tests=False)
    wd = Path(work_dir) if work_dir else Path(db.home) / "work" / f"generator-{time.time_ns()}"
    if not resume:
        shutil.rmtree(wd, ignore_errors=True)
    gen_id = train_generator_run(db, proj, data, base, cfg, work_dir=wd, progress=progress, should_stop=should_stop,
                                 job_id=job_id, user=user)
    if gen_id is None:
        return {"stopped": True, "stage": "generator", "method": GENERATOR_METHOD}
    if work_dir is None:
        shutil.rmtree(wd, ignore_errors=True)
    run = get_run(db, gen_id)
    return {"method": GENERATOR_METHOD, "generator_run": gen_id, "run_id": gen_id,
            "seconds": run["seconds"], **data.summary(), **run["params"].get("generator", {})}


def pseudo_command(store, project, *, generator_run: int | None = None, k: int | None = None,
                   seed: int | None = None, overrides: dict | None = None, progress=None,
                   should_stop=None, user=None, **_ignored) -> dict:
    """Stage 2 alone: pending pseudo QA for the generator run's unlabeled images (default:
    the project's newest generator run). The sampling seed defaults to the generator run's
    seed (as in the one-shot run)."""
    db = open_db(store)
    pid = get_project(db, project)["id"]
    generator_run = latest_generator_run(db, pid) if generator_run is None else int(generator_run)
    run = check_generator_run(db, generator_run, pid)
    data = generator_data(db, run)
    seed = data.seed if seed is None else seed
    cfg = pseudo_config(leaml_config(seed, overrides), seed)
    if k is not None:
        cfg = replace(cfg, k=k)
    return generate_pseudo(db, int(generator_run), cfg, data, progress=progress,
                           should_stop=should_stop, user=user)


def latest_generator_run(db, project_id: int) -> int:
    """The newest succeeded generator run of a project (ValueError when there is none)."""
    for r in list_runs(db, project_id, method=GENERATOR_METHOD):
        if r["status"] == "succeeded":
            return r["id"]
    raise ValueError("this project has no trained QA generator yet; run "
                     "`python -m leaml generator --project NAME` first")


def finetune_command(store, project, *, generator_run: int | None = None,
                     keep_top: float | None = None, min_confidence: float | None = None,
                     mode: str | None = None, overrides: dict | None = None, progress=None,
                     should_stop=None, work_dir=None, resume: bool = True, job_id=None,
                     user=None, **_ignored) -> dict:
    """Stage 3 (+ evaluation) alone: the ``leaml`` method reusing a generator run and the
    pairs stored for it (after people reviewed them). Label fraction, seed and base model
    come from the generator run, so the result equals the one-shot run's."""
    db = open_db(store)
    pid = get_project(db, project)["id"]
    gen_id = int(generator_run) if generator_run is not None else latest_generator_run(db, pid)
    gen = check_generator_run(db, gen_id, pid)
    target: dict = {}
    if min_confidence is not None:
        target.update(min_confidence=min_confidence, keep_top=None)
    elif keep_top is not None:
        target["keep_top"] = keep_top
    if mode is not None:
        target["mode"] = mode
    ov = copy.deepcopy(overrides or {})
    ov.update(generator_run=gen_id, reuse_pseudo=True)
    ov["finetune"] = {**ov.get("finetune", {}), **target}
    data = generator_data(db, gen)
    return run_stages(db, pid, "leaml", leaml_config(data.seed, ov), stages(),
                      label_fraction=data.label_fraction, seed=data.seed,
                      base_model=gen["base_model"], progress=progress, should_stop=should_stop,
                      work_dir=work_dir, resume=resume, job_id=job_id, user=user)


STAGE_COMMANDS = {"generator": generator_command, "pseudo": pseudo_command,
                  "finetune": finetune_command}
