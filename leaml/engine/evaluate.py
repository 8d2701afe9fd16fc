"""Scoring: greedy answers on the test split, normalised exact match or token recall.

Closed vs open questions are decided by ``question_type`` alone:

* **closed** (every type not listed below, e.g. the demo's ``yes/no``, ``choice``, ``count``,
  ``colour``, ``location``, ``size``, and Kvasir-VQA's types): normalised exact match,
  score 1 or 0. Normalisation: lowercase, punctuation to spaces, drop the articles a/an/the,
  collapse whitespace. An answer holding commas or semicolons is a set ("polyp, metal clip"
  equals "metal clip, polyp").
* **open** (free text: ``OPEN_TYPES``, e.g. ``open``, ``free_text``, ``description``):
  recall of the reference's normalised tokens in the prediction, as LLaVA-Med reports
  for open questions (score in [0, 1]).

Accuracy is the mean score in percent, overall, per category and per question type.
"""
from __future__ import annotations

import re
import string
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from leaml.engine import models, spread
from leaml.engine.batches import ImageSource
from leaml.engine.train import load_trained

OPEN_TYPES = frozenset({"open", "open-ended", "open_ended", "free_text", "free-text",
                        "freeform", "description", "describe", "explanation", "why", "caption"})
_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_SETS = re.compile(r"[,;]")


def normalize(text: str) -> str:
    """Lowercase, punctuation -> space, no articles, single spaces: 'The Polyp.' -> 'polyp'."""
    text = _PUNCT.sub(" ", (text or "").lower())
    return " ".join(_ARTICLES.sub(" ", text).split())


def answer_set(text: str) -> frozenset[str]:
    """A (possibly multi-) answer as a set of normalised parts; empty parts dropped."""
    return frozenset(p for p in (normalize(x) for x in _SETS.split(text or "")) if p)


def is_open(question_type: str | None) -> bool:
    """True for free-text question types (scored by token recall), False for closed ones."""
    return (question_type or "").strip().lower() in OPEN_TYPES


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the normalised answers (as sets, for comma lists) are equal, else 0.0."""
    return float(answer_set(prediction) == answer_set(reference))


def token_recall(prediction: str, reference: str) -> float:
    """Fraction of the reference's normalised tokens that occur in the prediction."""
    ref = normalize(reference).split()
    if not ref:
        return float(not normalize(prediction))
    pred = set(normalize(prediction).split())
    return sum(t in pred for t in ref) / len(ref)


def score(prediction: str, reference: str, question_type: str | None) -> float:
    """The score of one answer in [0, 1]: recall for open types, exact match otherwise."""
    if is_open(question_type):
        return token_recall(prediction, reference)
    return exact_match(prediction, reference)


@dataclass
class EvalItem:
    """One test question: image (path or PIL), question, reference answer and its groups."""
    image: object
    question: str
    answer: str
    category: str | None = None
    question_type: str | None = None
    qa_id: int | None = None


def summarize(items: Sequence[EvalItem], predictions: Sequence[str]) -> dict:
    """Accuracy in percent overall, by category and by question type, plus n_test.

    Returns ``{"accuracy", "by_category", "by_question_type", "n_test"}`` with the group
    dicts keyed by name (a missing category/type is reported as "unknown").
    """
    if len(items) != len(predictions):
        raise ValueError(f"{len(items)} test items but {len(predictions)} predictions")
    groups = {"by_category": defaultdict(list), "by_question_type": defaultdict(list)}
    scores = []
    for item, pred in zip(items, predictions):
        s = score(pred, item.answer, item.question_type)
        scores.append(s)
        groups["by_category"][item.category or "unknown"].append(s)
        groups["by_question_type"][item.question_type or "unknown"].append(s)
    pct = lambda xs: round(100.0 * sum(xs) / len(xs), 2) if xs else 0.0  # noqa: E731
    out = {"accuracy": pct(scores), "n_test": len(items)}
    for key, g in groups.items():
        out[key] = {name: pct(v) for name, v in sorted(g.items())}
        out[key + "_n"] = {name: len(v) for name, v in sorted(g.items())}
    return out


def predict(model, processor, items: Sequence[EvalItem], *, batch_size: int = 64,
            max_new_tokens: int = 24, image_cache_mb: float = 2048.0,
            progress: Callable[[str, int, int, float], None] | None = None,
            stage: str = "evaluate") -> list[str]:
    """Greedy answers to every item's question (the instruction is just the question).

    Images are preprocessed once (tensor cache within ``image_cache_mb``) and questions are
    answered in batches; ``progress(stage, done, total, nan)`` after each batch.
    """
    if not items:
        return []
    images = ImageSource(processor, [it.image for it in items], image_cache_mb)
    index = [images.index(it.image) for it in items]
    out: list[str] = []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(items), batch_size):
            chunk = list(range(start, min(start + batch_size, len(items))))
            pv = images.batch([index[i] for i in chunk])
            gens = models.generate(model, processor, pv, [items[i].question for i in chunk],
                                   max_new_tokens=max_new_tokens, batch_size=len(chunk))
            out.extend(g[0].text for g in gens)
            if progress:
                progress(stage, len(out), len(items), float("nan"))
    return out


def predict_saved(model_dir: str | Path, base_model: str, items: Sequence[EvalItem],
                  **kw) -> list[str]:
    """:func:`predict` with a saved model (``train.load_trained``: adapters on ``base_model``
    or a whole model), loaded where the device rule says in the inference dtype. Under a
    method led across processes (leaml/engine/spread.py) every process answers every N-th
    item; the answers come back in order."""
    call = {"model_dir": str(model_dir), "base_model": base_model,
            "kw": {k: v for k, v in kw.items() if k != "progress"}}  # callbacks stay here
    return spread.share("predict", call, list(items),
                        lambda part: _predict_share({**call, "kw": kw}, part))


def _predict_share(call: dict, items: list) -> list[str]:
    """A follower's share of :func:`predict_saved`."""
    model, processor = load_trained(call["model_dir"], call["base_model"], merge=True,
                                    inference=True)
    return predict(model, processor, items, **call["kw"])


spread.HANDLERS["predict"] = _predict_share


def evaluate_model(model, processor, items: Sequence[EvalItem], **kw) -> tuple[dict, list[str]]:
    """:func:`predict` then :func:`summarize`; returns (summary, predictions)."""
    preds = predict(model, processor, items, **kw)
    return summarize(items, preds), preds


def items_from_rows(rows: Sequence[dict], image_path: Callable[[dict], Path]) -> list[EvalItem]:
    """EvalItems from store QA rows (``leaml.store.qa.test_pairs``) and an image-path function."""
    return [EvalItem(image=str(image_path(r)), question=r["question"], answer=r["answer"],
                     category=r.get("category"), question_type=r.get("question_type"),
                     qa_id=r.get("id")) for r in rows]
