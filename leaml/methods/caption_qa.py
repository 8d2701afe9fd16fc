"""QA pairs from teacher captions (LLaVA-Med's self-instruct), and the ``caption-qa`` method.

A text model behind an OpenAI-compatible endpoint reads each image's caption and writes a few
QA pairs in the project's question style (few-shot examples from its seed QA and question
list). The answer is parsed into ``Question: ...\\nAnswer: ...`` pairs with LEAML's own parser
(:func:`leaml.engine.pseudo.parse_qa`); malformed pairs, pairs that spell special tokens and repeated
questions are dropped. The rest are stored as ``pending`` pseudo QA (source
``captions:<model>``) under a runs row of method ``caption-qa``, so the review page ranks them
and the dashboard compares them with LEAML's. When the endpoint returns log-probabilities, a
pair's confidence is, as for LEAML, the geometric mean probability of its answer tokens.

The method ``caption-qa`` (registered in :mod:`leaml.methods.pipeline`): captions for images that lack
one, QA from the captions, then the target finetuned on seed QA + those pairs, evaluated.
"""
from __future__ import annotations

import json
import math
import random
import re
import time
from typing import Callable

from leaml.config import TrainConfig
from leaml.engine.batches import Example
from leaml.engine.pseudo import format_qa, geometric_mean_prob, parse_qa, question_key
from leaml.methods.pseudo_stage import known_question_types
from leaml.methods.stages import MethodConfig, Stage, evaluate_stage, qa_examples, train_stage
from leaml.serve.teacher import (EndpointClient, bounded_map, caption_missing, image_name,
                                 open_db)
from leaml.store.images import image_path, list_images
from leaml.store.projects import get_project
from leaml.store.qa import add_qa_many, list_qa
from leaml.store.runs import (create_run, finish_run, get_run, list_runs, unlabeled_captions,
                              update_run)

Progress = Callable[[str, int, int, float], None]
METHOD = "caption-qa"

QA_PROMPT = (
    "Below is a description of an endoscopy image. Write {n} different question-answer pairs "
    "about the image that the description answers.{style} Use only facts in the description. "
    "Write each pair as two lines, 'Question: ...' then 'Answer: ...', pairs separated by a "
    "blank line, nothing else.\n{examples}\nDescription: {caption}")

# a pair may come numbered, bulleted or in bold: "1. **Question:** ..." still counts
_PAIR = re.compile(r"^[ \t]*(?:\d+[.)][ \t]*|[-*][ \t]+)?(?:\*\*)?Question:(?:\*\*)?[ \t]*(?P<q>[^\n]*?)"
                   r"[ \t]*\n[ \t]*(?:\*\*)?Answer:(?:\*\*)?[ \t]*(?P<a>[^\n]*?)[ \t]*$", re.M)
_SPECIAL = re.compile(r"<\|?/?[A-Za-z_][\w|]*\|?>|</?s>")


# --- the prompt --------------------------------------------------------------------------------

def style_examples(db, project: dict, n: int = 6, seed: int = 0) -> list[tuple[str, str]]:
    """Up to ``n`` seed QA pairs with different questions (seeded pick): the style to imitate."""
    by_question: dict[str, tuple[str, str]] = {}
    for r in list_qa(db, project["id"], origin="seed"):
        by_question.setdefault(question_key(r["question"]), (r["question"], r["answer"]))
    pairs = sorted(by_question.values())
    random.Random(seed).shuffle(pairs)
    return pairs[:n]


def qa_prompt(caption: str, examples: list[tuple[str, str]], questions: list[str], n: int) -> str:
    """The request text for one caption (see :data:`QA_PROMPT`)."""
    style = ""
    if questions:
        asked = [q.strip() if q.strip().endswith(("?", ".")) else q.strip() + "?" for q in questions[:12]]
        style = " Prefer questions like these: " + " ".join(asked)
    shown = "".join(f"\n{format_qa(q, a)}\n" for q, a in examples)
    return QA_PROMPT.format(n=n, style=style, examples=f"\nExamples:{shown}" if shown else "",
                            caption=caption.strip())


# --- parsing an answer ---------------------------------------------------------------------------

def _token_spans(content: str, logprobs: dict | None) -> list[tuple[int, int, float]] | None:
    """(start, end, logprob) of each generated token in ``content`` coordinates, or None."""
    tokens = (logprobs or {}).get("content") or []
    if not tokens:
        return None
    joined = "".join(t.get("token", "") for t in tokens)
    offset = joined.find(content)
    if offset < 0:
        return None
    spans, pos = [], -offset
    for t in tokens:
        n = len(t.get("token", ""))
        spans.append((pos, pos + n, float(t.get("logprob", 0.0))))
        pos += n
    return spans


def parse_pairs(content: str, logprobs: dict | None = None) -> tuple[list[dict], dict]:
    """Valid pairs in a model's answer (question, answer, confidence) and drop counts.

    Each pair must pass :func:`leaml.engine.pseudo.parse_qa`; a pair that spells a special token
    (``<image>``, ``</s>`` ...) is dropped, as is a repeated question.
    """
    spans = _token_spans(content, logprobs)
    stats = {"malformed": 0, "special": 0, "duplicate": 0}
    out, seen, matched = [], set(), 0
    for m in _PAIR.finditer(content):
        matched += 1
        parsed = parse_qa(format_qa(m.group("q"), m.group("a")))
        if parsed is None:
            stats["malformed"] += 1
            continue
        if _SPECIAL.search(parsed[0] + " " + parsed[1]):
            stats["special"] += 1
            continue
        if question_key(parsed[0]) in seen:
            stats["duplicate"] += 1
            continue
        seen.add(question_key(parsed[0]))
        conf = None
        if spans is not None:
            a0, a1 = m.span("a")
            conf = geometric_mean_prob([lp for s, e, lp in spans if s < a1 and e > a0]) or None
        out.append({"question": parsed[0], "answer": parsed[1], "confidence": conf})
    stats["malformed"] += max(0, content.count("Question:") - matched)  # never completed
    return out, stats


# --- the runs row --------------------------------------------------------------------------------

def _run_for(db, project: dict, endpoint: str, model: str, params: dict, user) -> int:
    """A standalone pass's run: the newest one for the same endpoint and model (a rerun
    continues it: images that have its pairs are skipped), else a new ``caption-qa`` run."""
    for r in list_runs(db, project["id"], method=METHOD):
        p = r["params"]
        if p.get("standalone") and p.get("model") == model and p.get("endpoint") == endpoint:
            update_run(db, r["id"], status="running")
            return r["id"]
    return create_run(db, project["id"], method=METHOD, base_model=project["base_model"],
                      params={**params, "standalone": True}, user=user)


def _done_images(db, project_id: int, run_id: int) -> set[int]:
    return {r["image_id"] for r in list_qa(db, project_id, origin="pseudo") if r["gen_run_id"] == run_id}


# --- a pass over the captions --------------------------------------------------------------------

def qa_from_captions(store, project: str | int, *, endpoint: str, model: str, per_image: int = 3,
                     image_ids=None, run_id: int | None = None, concurrency: int = 4,
                     timeout: float = 60.0, retries: int = 3, backoff: float = 1.0,
                     temperature: float = 0.7, max_tokens: int = 400, n_examples: int = 6,
                     logprobs: bool = True, seed: int = 0, limit: int | None = None,
                     progress: Progress | None = None, should_stop: Callable[[], bool] | None = None,
                     user: str | None = None, api_key: str | None = None) -> dict:
    """Pending pseudo QA from the captions of the project's unlabeled train images (or of
    ``image_ids``); returns counts, failures by image and the run id.

    Without ``run_id`` the pairs go under a ``caption-qa`` runs row of their own (a rerun
    with the same endpoint and model continues it: images that already have pairs from it
    are skipped). Requests run ``concurrency`` at a time; each image's pairs are stored in
    one transaction, from the calling thread, as its answer arrives.
    """
    if per_image < 1:
        raise ValueError(f"--per-image {per_image} must be >= 1")
    db = open_db(store)
    proj = get_project(db, project)
    client = EndpointClient(endpoint, model, timeout=timeout, retries=retries, backoff=backoff,
                            api_key=api_key)
    params = {"endpoint": endpoint, "model": model, "per_image": per_image,
              "temperature": temperature, "max_tokens": max_tokens, "seed": seed}
    standalone = run_id is None
    run_id = run_id or _run_for(db, proj, endpoint, model, params, user)
    pool = list_images(db, proj["id"], unlabeled=True) if image_ids is None else \
        [r for r in list_images(db, proj["id"], split="train") if r["id"] in set(image_ids)]
    done = _done_images(db, proj["id"], run_id)
    rows = [r for r in pool if (r["caption"] or "").strip() and r["id"] not in done][:limit]
    ctx = _Pass(db, proj, client, run_id, per_image, user, known_question_types(db, proj["id"]),
                style_examples(db, proj, n_examples, seed),
                list((proj.get("settings") or {}).get("questions") or []),
                {"temperature": temperature, "max_tokens": max_tokens, "seed": seed,
                 **({"logprobs": True} if logprobs else {})})
    t0 = time.monotonic()
    stopped = ctx.run(rows, concurrency, progress, should_stop)
    info = {"run_id": run_id, "images": len(rows), "skipped_done": len(done), **ctx.counts,
            "failed": len(ctx.failed), "failures": ctx.failed, "stopped": stopped,
            "seconds": round(time.monotonic() - t0, 1)}
    run_params = get_run(db, run_id)["params"]
    run_params.setdefault("caption_qa", []).append({k: v for k, v in info.items() if k != "failures"})
    update_run(db, run_id, params=run_params)
    if standalone and not stopped:
        finish_run(db, run_id, accuracy=None, seconds=info["seconds"],
                   status="failed" if ctx.failed else "succeeded")
    return info


class _Pass:
    """One pass: requests in a thread pool, parsing and storing in the calling thread."""

    def __init__(self, db, project, client, run_id, per_image, user, qtypes, examples, questions,
                 request):
        self.db, self.project, self.client, self.run_id = db, project, client, run_id
        self.per_image, self.user, self.qtypes = per_image, user, qtypes
        self.examples, self.questions, self.request = examples, questions, request
        self.counts = {"stored": 0, "malformed": 0, "special": 0, "duplicate": 0, "extra": 0,
                       "empty_images": 0}
        self.failed: list[dict] = []

    def ask(self, row: dict) -> dict:
        text = qa_prompt(row["caption"], self.examples, self.questions, self.per_image)
        return self.client.chat([{"role": "user", "content": text}], **self.request)

    def store(self, row: dict, answer: dict) -> None:
        choice = answer["choices"][0]
        pairs, stats = parse_pairs(choice["message"]["content"], choice.get("logprobs"))
        for k, v in stats.items():
            self.counts[k] += v
        self.counts["extra"] += max(0, len(pairs) - self.per_image)
        pairs = pairs[:self.per_image]
        if not pairs:
            self.counts["empty_images"] += 1
            return
        add_qa_many(self.db, [{
            "project_id": self.project["id"], "image_id": row["id"], "question": p["question"],
            "answer": p["answer"], "origin": "pseudo", "status": "pending",
            "confidence": p["confidence"], "question_type": self.qtypes.get(question_key(p["question"])),
            "gen_run_id": self.run_id, "source": f"captions:{self.client.model}"} for p in pairs],
            user=self.user, action="qa.pseudo")
        self.counts["stored"] += len(pairs)

    def run(self, rows, concurrency, progress, should_stop) -> bool:
        finished = 0

        def done(row, answer, error):
            nonlocal finished
            if error is None:
                self.store(row, answer)
            else:
                self.failed.append({"image_id": row["id"], "name": image_name(row), "error": error})
            finished += 1
            if progress:
                progress("qa", finished, len(rows), math.nan)

        return bounded_map(rows, self.ask, done, concurrency=concurrency, should_stop=should_stop)


# --- the caption-qa method -------------------------------------------------------------------------

def default_options() -> dict:
    """Knobs of the method (``--set qa.endpoint=URL --set qa.model=NAME``)."""
    return {"qa": {"endpoint": None, "model": None, "per_image": 3, "concurrency": 4,
                   "timeout": 60.0, "retries": 3, "temperature": 0.7, "max_tokens": 400,
                   "caption_missing": True, "caption_max_tokens": 256}}


def default_config():
    target = TrainConfig(mode="lora", lr=3e-3, batch_size=32, epochs=4.0, min_steps=300,
                         warmup_ratio=0.05, lora_r=16, lora_alpha=32.0)
    return MethodConfig({"train": target}, options=default_options())


def _opts(ctx) -> dict:
    o = ctx.config.options["qa"]
    if not o.get("endpoint") or not o.get("model"):
        raise ValueError("method caption-qa needs a teacher endpoint: --set qa.endpoint=URL "
                         "--set qa.model=NAME (an OpenAI-compatible server, e.g. `leaml serve`)")
    return o


def _captions_stage():
    def run(ctx) -> bool:
        o = _opts(ctx)
        info = {"captioned": 0}
        if o.get("caption_missing", True):
            rep = caption_missing(ctx.db, ctx.project["id"], endpoint=o["endpoint"], model=o["model"],
                                  concurrency=o["concurrency"], timeout=o["timeout"],
                                  retries=o["retries"], max_tokens=o["caption_max_tokens"],
                                  progress=ctx.progress, should_stop=ctx.should_stop)
            if rep.stopped:
                return False
            info = rep.to_dict()
        ctx.data.caption_rows = unlabeled_captions(ctx.db, ctx.project["id"],
                                                   exclude_image_ids=ctx.data.kept_images)
        ctx.stage_dir("captions").mkdir(parents=True, exist_ok=True)
        (ctx.stage_dir("captions") / "done.json").write_text(json.dumps(info))
        return True
    return Stage("captions", run)


def _qa_stage():
    def run(ctx) -> bool:
        o = _opts(ctx)
        rows = ctx.data.caption_rows  # with the captions the captions stage just wrote
        info = qa_from_captions(ctx.db, ctx.project["id"], endpoint=o["endpoint"], model=o["model"],
                                per_image=o["per_image"], image_ids=[r["id"] for r in rows],
                                run_id=ctx.run_id, concurrency=o["concurrency"],
                                timeout=o["timeout"], retries=o["retries"],
                                temperature=o["temperature"], max_tokens=o["max_tokens"],
                                seed=ctx.config.stages["train"].seed, progress=ctx.progress,
                                should_stop=ctx.should_stop)
        if info["stopped"]:
            return False
        if rows and info["failed"] == len(rows):
            raise ValueError(f"caption-qa: every request failed; first: {info['failures'][0]['name']}:"
                             f" {info['failures'][0]['error']}")
        ctx.stage_dir("qa").mkdir(parents=True, exist_ok=True)
        (ctx.stage_dir("qa") / "done.json").write_text(json.dumps(info))
        return True
    return Stage("qa", run)


def run_pairs(db, project_id: int, run_id: int) -> list[dict]:
    """The run's pseudo pairs that may train: every one not rejected."""
    return [r for r in list_qa(db, project_id, origin="pseudo")
            if r["gen_run_id"] == run_id and r["status"] != "rejected"]


def _train_examples(ctx) -> list:
    pairs = [Example(str(image_path(ctx.db, r["image_id"])), r["question"], r["answer"],
                     open=r["answer"].strip().lower() not in ("yes", "no"))
             for r in run_pairs(ctx.db, ctx.project["id"], ctx.run_id)]
    return qa_examples(ctx.db, ctx.data.seed_rows) + pairs


def stages() -> list:
    """captions -> qa -> train (seed + caption QA) -> evaluate."""
    return [_captions_stage(), _qa_stage(), train_stage("train", _train_examples),
            evaluate_stage()]
