"""LEAML stage 2 against the store: sample pseudo QA for a generator run's unlabeled images.

The pure parts (parsing, filtering, confidence, cut) are in :mod:`leaml.engine.pseudo`. Here:
which images, chunking (one transaction per chunk of images: the unit of progress, cancel and
resume), question types from the project's known questions, and the precision report
against hidden truth. Every function here takes the generator's data (:class:`RunData`:
which labeled images it learned from, the unlabeled set it writes pairs for), resolved once.
"""
from __future__ import annotations

import json
import math
import time
from collections import Counter
from typing import Callable, Sequence

import torch

from leaml.engine import models, pseudo, spread, vllm_engine
from leaml.engine.evaluate import exact_match
from leaml.engine.generator import known_form, pick
from leaml.engine.pseudo import YES_NO, ParseStats, PseudoConfig, named_choices, question_key
from leaml.engine.train import load_trained
from leaml.methods.stages import RunData, kept_data
from leaml.store.images import image_path
from leaml.store.qa import add_qa_many
from leaml.store.runs import get_run, update_run

Progress = Callable[[str, int, int, float], None]
GENERATOR_METHOD = "generator"


# --- the generator run and its data ------------------------------------------------------------

def check_generator_run(db, run_id: int, project_id: int | None = None) -> dict:
    """The generator run row, or a ValueError saying what is wrong with it."""
    run = get_run(db, run_id)
    if run["method"] != GENERATOR_METHOD:
        raise ValueError(f"run {run_id} is a '{run['method']}' run, not a generator run; "
                         "pass the id printed by `python -m leaml generator`")
    if project_id is not None and run["project_id"] != project_id:
        raise ValueError(f"generator run {run_id} belongs to another project")
    if run["status"] != "succeeded" or not run["model_dir"]:
        raise ValueError(f"generator run {run_id} has status '{run['status']}' and no model; "
                         "train it again with `python -m leaml generator`")
    return run


def generator_data(db, gen_run: dict) -> RunData:
    """The data a stored generator run was trained on (its kept labeled images, as recorded)
    and its unlabeled set; no test pairs."""
    p = gen_run["params"]
    return kept_data(db, gen_run["project_id"], list(p.get("kept_images") or []),
                     labeled_images=p.get("n_labeled_images", 0),
                     label_fraction=p.get("label_fraction", 1.0), seed=p.get("seed", 0),
                     tests=False)


def _most_common_by_key(rows, field: str) -> dict[str, str]:
    """question_key -> the most frequent ``field`` value among rows that ask that question."""
    votes: dict[str, Counter] = {}
    for r in rows:
        votes.setdefault(question_key(r["question"]), Counter())[r[field]] += 1
    return {k: c.most_common(1)[0][0] for k, c in votes.items()}


def known_question_types(db, project_id: int) -> dict[str, str]:
    """question_key -> its most frequent question type among the project's non-pseudo pairs."""
    return _most_common_by_key(db.query(
        "SELECT question, question_type FROM qa WHERE project_id = ? AND origin != 'pseudo'"
        " AND question_type IS NOT NULL", [project_id]), "question_type")


def known_questions(db, project_id: int) -> dict[str, str]:
    """question_key -> its most frequent wording among seed, test, accepted and edited pairs."""
    return _most_common_by_key(db.query(
        "SELECT question FROM qa WHERE project_id = ? AND (origin != 'pseudo'"
        " OR status IN ('accepted', 'edited'))", [project_id]), "question")


def _seed_qa(db, data: RunData) -> list[dict]:
    """(image_id, question, answer) of the seed QA the generator was trained on (its labeled
    images only)."""
    return list(db.query(
        "SELECT image_id, question, answer FROM qa WHERE origin = 'seed' AND image_id IN"
        " (SELECT value FROM json_each(?))", [json.dumps(data.kept_images)]))


def seed_question_counts(db, data: RunData) -> Counter:
    """How often each question occurs in the generator's seed QA: the weights 'known' mode
    draws questions by."""
    counts = Counter(r["question"] for r in _seed_qa(db, data))
    if not counts:
        raise ValueError("question_mode 'known' needs seed QA to draw questions from")
    return counts


def seed_answers(db, data: RunData, limit: int) -> dict[str, list[str]]:
    """Per question of the generator's seed QA, its answers, most frequent first (at most
    ``limit``): the choices of answer_mode 'choose'."""
    votes: dict[str, Counter] = {}
    for r in _seed_qa(db, data):
        if r["answer"].strip():
            votes.setdefault(r["question"], Counter())[r["answer"].strip()] += 1
    return {q: [a for a, _ in c.most_common(limit)] for q, c in votes.items()}


def _draw_questions(counts: Counter, n: int, k: int, seed: int,
                    allowed: Sequence[set[str]] | None = None) -> list[list[str]]:
    """Per image, ``k`` distinct questions drawn by their ``counts``; only those in
    ``allowed[i]`` for image i when given (fewer than ``k`` if fewer are allowed)."""
    qs, w = list(counts), torch.tensor([float(c) for c in counts.values()])
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        wi = w if allowed is None else w * torch.tensor([float(q in allowed[i]) for q in qs])
        ki = min(k, int((wi > 0).sum()))
        out.append([qs[j] for j in torch.multinomial(wi, ki, replacement=False, generator=g).tolist()]
                   if ki else [])
    return out


def seed_caption_reliability(db, data: RunData, choices: dict[str, list[str]]) -> dict[str, float]:
    """:func:`leaml.engine.pseudo.caption_reliability` on the generator's seed QA and the captions of
    its images."""
    rows = _seed_qa(db, data)
    captions = {r["id"]: r["caption"] for r in db.query(
        "SELECT id, caption FROM images WHERE id IN (SELECT value FROM json_each(?))",
        [json.dumps(sorted({r["image_id"] for r in rows}))])}
    return pseudo.caption_reliability(rows, captions, choices)


def conditional_answers(db, data: RunData) -> dict[str, list[str]]:
    """The questions the generator's seed QA asks of only some of its images, each with its
    answers other than yes/no (questions with none left out): caption_questions asks these only
    of images whose caption names one of those answers."""
    rows = _seed_qa(db, data)
    n_images = len({r["image_id"] for r in rows})
    asked: dict[str, set[int]] = {}
    answers: dict[str, set[str]] = {}
    for r in rows:
        asked.setdefault(r["question"], set()).add(r["image_id"])
        if r["answer"].strip().lower() not in YES_NO and r["answer"].strip():
            answers.setdefault(r["question"], set()).add(r["answer"].strip())
    return {q: sorted(answers[q]) for q, ims in asked.items() if len(ims) < n_images and q in answers}


def _allowed_questions(counts: Counter, conditional: dict[str, list[str]],
                       captions: Sequence[str | None]) -> list[set[str]]:
    """Per image, the questions it may be asked: all but the conditional ones whose answers its
    caption does not name."""
    return [{q for q in counts if q not in conditional or named_choices(conditional[q], c)}
            for c in captions]


def _done_images(db, gen_run_id: int) -> set[int]:
    return {r["image_id"] for r in db.query(
        "SELECT DISTINCT image_id FROM qa WHERE gen_run_id = ? AND origin = 'pseudo'", [gen_run_id])}


def _chunk_seed(seed: int, index: int) -> int:
    return (seed * 1_000_003 + index * 7919) & 0x7FFFFFFF


def generate_pseudo(db, gen_run_id: int, cfg: PseudoConfig, data: RunData, *,
                    progress: Progress | None = None,
                    should_stop: Callable[[], bool] | None = None, user: str | None = None) -> dict:
    """Sample, filter and store pending pseudo QA for every image of the unlabeled set of
    ``data`` (the generator run's data) with the generator run's model.

    Images go in chunks of ``cfg.chunk``; each chunk is sampled with its own seed (derived from
    ``cfg.seed`` and the chunk's index) and stored in one transaction, so a stopped run resumes
    by skipping the chunks already stored and ends with exactly the pairs of an uninterrupted
    one. Returns counts (images, sampled, kept, dropped by reason, seconds) or
    ``{"stopped": True, ...}``.
    """
    run = check_generator_run(db, gen_run_id)
    vllm_engine.check(cfg.engine)  # before anything loads: vLLM missing, or several processes
    images = pick(data.unlabeled, cfg.max_images, cfg.seed)
    if not images:
        raise ValueError(f"generator run {gen_run_id}: no unlabeled train images to write QA for; "
                         "import images without labels or use a label fraction below 1")
    model, processor = (vllm_engine.load(db.home / run["model_dir"], seed=cfg.seed)
                        if cfg.engine == "vllm" else
                        load_trained(db.home / run["model_dir"], run["base_model"], inference=True))
    form, use_context = known_form(run["params"].get("config") or {})
    qtypes, done = known_question_types(db, run["project_id"]), _done_images(db, gen_run_id)
    # 'sample' mode filters by known wordings, 'known' draws them
    known, counts, choices, conditional, reliability = None, None, None, None, None
    if cfg.question_mode == "known":
        counts = seed_question_counts(db, data)
        choices = seed_answers(db, data, cfg.max_choices) if cfg.answer_mode == "choose" else None
        conditional = conditional_answers(db, data) if cfg.caption_questions and use_context else None
        reliability = (seed_caption_reliability(db, data, choices)
                       if choices and cfg.caption_choices and use_context else None)
    elif cfg.known_questions:
        known = known_questions(db, run["project_id"])
    stats, t0, stored = ParseStats(), time.monotonic(), 0
    how = {"cfg": cfg, "form": form, "use_context": use_context, "counts": counts,
           "choices": choices, "conditional": conditional, "reliability": reliability,
           "known": known}
    chunks = [images[i:i + cfg.chunk] for i in range(0, len(images), cfg.chunk)]
    todo = [(index, [dict(r, path=str(image_path(db, r))) for r in chunk])
            for index, chunk in enumerate(chunks) if not any(r["id"] in done for r in chunk)]
    # under a method led across processes every process samples one chunk of each round
    step = spread.world_size() if spread.leading() else 1
    call = {"model_dir": str(db.home / run["model_dir"]), "base_model": run["base_model"],
            "how": how}
    try:
        for start in range(0, len(todo), step):
            if should_stop and should_stop():
                return {"stopped": True, "generator_run": gen_run_id, **stats.to_dict()}
            round_ = todo[start:start + step]
            results = spread.share("pseudo", call, round_, lambda part: [
                _chunk_candidates(model, processor, how, index, chunk) for index, chunk in part])
            for (index, chunk), (cands, counted) in zip(round_, results):
                for key, value in counted.items():
                    setattr(stats, key, getattr(stats, key) + value)
                rows = [{"project_id": run["project_id"], "image_id": chunk[c.image_index]["id"],
                         "question": c.question, "answer": c.answer, "origin": "pseudo",
                         "status": "pending", "confidence": c.confidence,
                         "question_type": qtypes.get(question_key(c.question)),
                         "gen_run_id": gen_run_id, "source": "generator"} for c in cands]
                if rows:
                    add_qa_many(db, rows, user=user, action="qa.pseudo")
                stored += len(rows)
                if progress:
                    progress("pseudo", min((index + 1) * cfg.chunk, len(images)), len(images),
                             math.nan)
    finally:  # however it ends: vLLM's GPU memory back before a next stage trains
        vllm_engine.close(model)
    info = {"generator_run": gen_run_id, "images": len(images), "stored": stored, "k": cfg.k,
            **stats.to_dict(), "seconds": round(time.monotonic() - t0, 1)}
    _record(db, gen_run_id, info, cfg)
    return info


def _chunk_candidates(model, processor, how: dict, index: int, chunk: list[dict]):
    """The candidates of one chunk of images (rows with their file ``path``) and the counts
    of why others were dropped; the same in whichever process samples it (its seed comes from
    the chunk's index)."""
    cfg, stats = how["cfg"], ParseStats()
    paths = [r["path"] for r in chunk]
    # vLLM takes the images themselves; the transformers engine their pixels, computed once
    fast = isinstance(model, vllm_engine.VllmModel)
    engine, pv = (vllm_engine, paths) if fast else (pseudo, models.pixel_values(processor, paths))
    contexts = [r.get("caption") for r in chunk] if how["use_context"] else None
    where = list(range(len(chunk)))
    if cfg.question_mode == "known":
        counts, conditional = how["counts"], how["conditional"]
        allowed = _allowed_questions(counts, conditional, contexts) if conditional else None
        qs = _draw_questions(counts, len(chunk), cfg.k, _chunk_seed(cfg.seed, index), allowed)
        if how["choices"] is not None:
            cands = engine.choose_known(model, processor, pv, where, qs, how["choices"], cfg,
                                        stats, form=how["form"], contexts=contexts,
                                        reliability=how["reliability"])
        else:
            cands = engine.answer_known(model, processor, pv, where, qs, cfg, stats,
                                        form=how["form"], contexts=contexts)
    else:
        cands = engine.sample(model, processor, pv, where, cfg, _chunk_seed(cfg.seed, index),
                              stats, how["known"], contexts)
    return cands, stats.to_dict()


_FOLLOWER_MODEL: dict = {}  # a follower loads the generator once for all rounds of a run


def _follow_chunks(call: dict, part: list) -> list:
    """A follower's chunks of a round of :func:`generate_pseudo`."""
    key = (call["model_dir"], call["base_model"])
    if _FOLLOWER_MODEL.get("key") != key:
        _FOLLOWER_MODEL.update(key=key, loaded=load_trained(call["model_dir"], call["base_model"],
                                                            inference=True))
    model, processor = _FOLLOWER_MODEL["loaded"]
    return [_chunk_candidates(model, processor, call["how"], index, chunk) for index, chunk in part]


spread.HANDLERS["pseudo"] = _follow_chunks


def _record(db, gen_run_id: int, info: dict, cfg: PseudoConfig) -> None:
    params = get_run(db, gen_run_id)["params"]
    params.setdefault("pseudo", []).append({"config": dict(cfg.__dict__), **info})
    update_run(db, gen_run_id, params=params)


def pseudo_precision_by_bin(db, gen_run_id: int, *, bins: int = 5,
                            per_question: bool = False) -> list[dict]:
    """Precision of a generator run's pseudo pairs per confidence bin (equal-count bins),
    against the project's own labels of the same images: in the demo project, images a run
    treated as unlabeled still hold their true seed QA, so every pseudo pair can be checked
    (normalised exact match, answer sets as sets). Pairs whose question has no true answer
    for that image count as wrong (``precision``) and are left out of ``precision_known``.
    ``per_question``: bins by confidence rank within each question (as the cut ranks)."""
    pairs = list(db.query("SELECT image_id, question, answer, confidence FROM qa WHERE gen_run_id = ?"
                          " AND origin = 'pseudo' AND confidence IS NOT NULL", [gen_run_id]))
    images = sorted({p["image_id"] for p in pairs})
    truth = {(r["image_id"], question_key(r["question"])): r["answer"] for r in db.query(
        "SELECT image_id, question, answer FROM qa WHERE origin = 'seed' AND image_id IN"
        " (SELECT value FROM json_each(?))", [str(images)])}
    return pseudo.precision_by_bin(pairs, truth, bins=bins, per_question=per_question,
                                   match=lambda p, g: exact_match(p, g) == 1.0)
