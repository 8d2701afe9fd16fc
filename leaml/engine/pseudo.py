"""LEAML pseudo QA: sample QA pairs from the generator G, parse, filter, score, cut.

G writes ``"Question: {q}\\nAnswer: {a}"`` (the target format it was trained on). For every
unlabeled image it samples K candidates; a candidate survives when it parses, was not cut off
by ``max_new_tokens``, holds no special token (a generated ``<image>`` inside a stored question
would expand into image tokens in every later batch that holds it), and its question is new
for that image (the most confident duplicate wins). Its confidence is the geometric mean
probability of the generated *answer* tokens only: averaging over the question tokens too
hides correctness, the answer tokens alone rank it well.

Storage and the stage function live in :mod:`leaml.methods.pseudo_stage`; this module is the pure part.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from leaml.config import PseudoConfig  # noqa: F401  (re-exported)
from leaml.engine import models
from leaml.store.text import text_problem

QA_INSTRUCTION = "Generate a question about this image and answer it."
YES_NO = ("yes", "no")
_QA = re.compile(r"\A\s*Question:[ \t]*(?P<q>[^\n]*?)[ \t]*\n[ \t]*Answer:[ \t]*(?P<a>[^\n]*?)\s*\Z")


def format_qa(question: str, answer: str) -> str:
    """The generator's training target for one QA pair."""
    return f"Question: {question.strip()}\nAnswer: {answer.strip()}"


CONTEXT_CHARS = 500  # a longer caption is cut at a word (the demo's run to 300 characters)


def with_context(context: str | None, text: str, limit: int = CONTEXT_CHARS) -> str:
    """``text`` after the image's teacher caption (G's caption context), the caption cut to
    ``limit`` characters at a word boundary; ``text`` alone when the image has no caption."""
    context = " ".join((context or "").split())
    if len(context) > limit:
        context = context[:limit + 1].rsplit(" ", 1)[0] if " " in context[:limit + 1] \
            else context[:limit]
    return f"{context}\n{text}" if context else text


def named_at(text: str, answer: str) -> tuple[int, int] | None:
    """Where ``text`` names ``answer`` as a whole phrase (case ignored; "center" is not named
    by "upper-center"), as (start, end); None if it does not."""
    if not answer:
        return None
    m = re.search(r"(?<![\w-])" + re.escape(answer) + r"(?![\w-])", text, re.I)
    return m.span() if m else None


def _items(answer: str) -> frozenset[str]:
    """The items of an answer that lists several ("red, white"), lowercased."""
    return frozenset(x.strip().lower() for x in answer.split(",") if x.strip())


def named_choices(choices: Sequence[str], caption: str | None) -> list[str]:
    """The ``choices`` that ``caption`` names. An answer is named when each of its items is
    named as a whole phrase (yes/no never count); one whose items another named answer holds
    too gives way to it ("red" to "red, white" after "red and white mucosa")."""
    named = [a for a in choices if a.strip().lower() not in YES_NO and _items(a)
             and all(named_at(caption or "", x) for x in _items(a))]
    return [a for a in named if not any(_items(a) < _items(b) for b in named)]


def caption_choices(choices: Sequence[str], caption: str | None) -> list[str]:
    """The ``choices`` that ``caption`` names (:func:`named_choices`), or all of them when it
    names none: a teacher caption that names an answer outweighs G's guess."""
    return named_choices(choices, caption) or list(choices)


def caption_reliability(rows: Iterable[dict], captions: dict[int, str | None],
                        choices: dict[str, Sequence[str]]) -> dict[str, float]:
    """Per question, how often the answers a teacher caption names hold the true one, on the
    labelled ``rows`` (image_id, question, answer) whose caption (``captions[image_id]``) names
    some of the question's ``choices``: (right + 1) / (named + 2), 0.5 where none was named. A
    caption-decided pair's confidence scales by it, so the caption's word ranks as high as it
    proved right on the seed images, not above G's surest answers."""
    seen: dict[str, list[int]] = {}
    for r in rows:
        q = r["question"]
        named = named_choices(choices.get(q, ()), captions.get(r["image_id"]))
        if named:
            tally = seen.setdefault(q, [0, 0])
            tally[0] += any(_items(a) == _items(r["answer"]) for a in named)
            tally[1] += 1
    return {q: (seen.get(q, [0, 0])[0] + 1) / (seen.get(q, [0, 0])[1] + 2) for q in choices}


def known_prompt(question: str, form: str = "generate", context: str | None = None) -> tuple[str, str]:
    """How G answers a known question: (instruction, the start of G's reply before the answer).

    ``form`` 'generate': the generation instruction, then "Question: q\nAnswer:"; 'answer':
    the question itself is the instruction (G's answer stream, see ``GeneratorConfig``)."""
    if form == "answer":
        return with_context(context, question.strip()), ""
    if form != "generate":
        raise ValueError(f"form must be 'generate' or 'answer', not {form!r}")
    return with_context(context, QA_INSTRUCTION), f"Question: {question.strip()}\nAnswer:"


def known_target(prefix: str, answer: str) -> str:
    """G's whole reply for a known question: ``prefix`` (may be empty) then the answer."""
    return f"{prefix} {answer.strip()}" if prefix else answer.strip()


@dataclass
class Candidate:
    """One parsed pseudo QA pair for one image."""
    image_index: int
    question: str
    answer: str
    confidence: float           # geometric mean probability of the answer tokens
    n_answer_tokens: int
    question_confidence: float  # same over the question tokens, for diagnostics only


@dataclass
class ParseStats:
    """Why candidates were dropped (counts), for logs and the CLI."""
    sampled: int = 0
    kept: int = 0
    malformed: int = 0
    truncated: int = 0
    special: int = 0
    unknown_question: int = 0
    duplicate: int = 0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def special_ids(tokenizer) -> set[int]:
    """Every special or added token id (``<image>``, bos/eos/pad, chat markers ...)."""
    ids = set(tokenizer.all_special_ids or [])
    ids |= set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    return ids


def special_strings(tokenizer) -> list[str]:
    """The text of every special/added token: plain tokens can spell them (``<``, ``image``, ``>``)."""
    toks = set(tokenizer.all_special_tokens or [])
    toks |= {str(t) for t in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).values()}
    return sorted(t for t in toks if t)


def holds_special(tokenizer, token_ids: Sequence[int], texts: Iterable[str]) -> bool:
    """True when generated ids hold a special token, or the text spells one, or re-encoding
    the text yields one (what a later training batch would see)."""
    bad = special_ids(tokenizer)
    if any(t in bad for t in token_ids):
        return True
    for text in texts:
        if any(s in text for s in special_strings(tokenizer)):
            return True
        if any(t in bad for t in tokenizer(text, add_special_tokens=False)["input_ids"]):
            return True
    return False


def parse_qa(text: str) -> tuple[str, str] | None:
    """``(question, answer)`` from ``"Question: q\\nAnswer: a"``, or None when malformed.

    Both parts must be non-empty single lines, and the answer may not start another pair.
    """
    m = _QA.match(text)
    if not m:
        return None
    q, a = m.group("q").strip(), m.group("a").strip()
    if not q or not a or "Question:" in a or "Answer:" in q:
        return None
    if text_problem(q) or text_problem(a):   # control characters, overlong: never storable
        return None
    return q, a


def answer_start_token(tokenizer, token_ids: Sequence[int], char_start: int) -> int:
    """Index of the first token whose text reaches past character ``char_start`` of
    ``decode(token_ids)``: the first token that carries answer text (binary search over
    decoded prefixes, so byte-level BPE merges across the boundary are handled)."""
    lo, hi = 0, len(token_ids)  # find smallest k with len(decode(ids[:k+1])) > char_start
    while lo < hi:
        mid = (lo + hi) // 2
        if len(tokenizer.decode(token_ids[:mid + 1])) > char_start:
            hi = mid
        else:
            lo = mid + 1
    return lo


def geometric_mean_prob(logprobs: Sequence[float]) -> float:
    """exp(mean log p): the per-token geometric mean probability (0.0 for no tokens)."""
    return math.exp(sum(logprobs) / len(logprobs)) if logprobs else 0.0


def score_generation(tokenizer, gen, image_index: int, max_new_tokens: int,
                     stats: ParseStats) -> Candidate | None:
    """Parse one ``models.Generation`` into a Candidate (or count why it was dropped)."""
    stats.sampled += 1
    if len(gen.token_ids) >= max_new_tokens:
        stats.truncated += 1
        return None
    text = tokenizer.decode(gen.token_ids)
    parsed = parse_qa(text)
    if parsed is None:
        stats.malformed += 1
        return None
    if holds_special(tokenizer, gen.token_ids, parsed):
        stats.special += 1
        return None
    m = _QA.match(text)
    first = answer_start_token(tokenizer, gen.token_ids, m.start("a"))
    q_first = answer_start_token(tokenizer, gen.token_ids, m.start("q"))
    ans_lp = gen.token_logprobs[first:]
    return Candidate(image_index, parsed[0], parsed[1], geometric_mean_prob(ans_lp), len(ans_lp),
                     geometric_mean_prob(gen.token_logprobs[q_first:first]))


def question_key(question: str) -> str:
    """Normalised question text for de-duplication and question-type lookup."""
    q = re.sub(r"\s+", " ", question.strip().lower())
    return q.rstrip(" ?.!")


def dedup(cands: Iterable[Candidate], stats: ParseStats | None = None) -> list[Candidate]:
    """One candidate per (image, question): the most confident; order by image, then confidence."""
    best: dict[tuple[int, str], Candidate] = {}
    n = 0
    for c in cands:
        n += 1
        key = (c.image_index, question_key(c.question))
        if key not in best or c.confidence > best[key].confidence:
            best[key] = c
    out = sorted(best.values(), key=lambda c: (c.image_index, -c.confidence))
    if stats is not None:
        stats.duplicate += n - len(out)
        stats.kept += len(out)
    return out


def candidates_from_generations(tokenizer, generations: Sequence[Sequence], image_indices: Sequence[int],
                                max_new_tokens: int, stats: ParseStats,
                                known: dict[str, str] | None = None) -> list[Candidate]:
    """Parse, filter and de-duplicate the K generations of each image. With ``known``
    (question_key -> wording), other questions are dropped and known ones take that wording."""
    parsed = []
    for idx, gens in zip(image_indices, generations):
        for g in gens:
            c = score_generation(tokenizer, g, idx, max_new_tokens, stats)
            if c is not None and known is not None:
                wording = known.get(question_key(c.question))
                if wording is None:
                    stats.unknown_question += 1
                    continue
                c.question = wording
            if c is not None:
                parsed.append(c)
    return dedup(parsed, stats)


def sample(model, processor, pixel_values, image_indices: Sequence[int], cfg: PseudoConfig,
           seed: int, stats: ParseStats, known: dict[str, str] | None = None,
           contexts: Sequence[str | None] | None = None) -> list[Candidate]:
    """K sampled candidates per image (batched generate()), parsed, filtered, de-duplicated.

    ``pixel_values`` (N, C, H, W) holds the images of ``image_indices`` in order; ``known``
    restricts the questions (see :func:`candidates_from_generations`); ``contexts`` holds each
    image's caption for a generator trained with caption context.
    """
    contexts = contexts or [None] * len(image_indices)
    gens = models.generate(model, processor, pixel_values,
                           [with_context(c, QA_INSTRUCTION) for c in contexts],
                           max_new_tokens=cfg.max_new_tokens, do_sample=True,
                           temperature=cfg.temperature, top_p=cfg.top_p,
                           num_return_sequences=cfg.k, seed=seed, batch_size=cfg.batch_size)
    return candidates_from_generations(processor.tokenizer, gens, image_indices,
                                       cfg.max_new_tokens, stats, known)


# --- the confidence cut ---------------------------------------------------------------------

def confidence_cut(confidences: Sequence[float], *, keep_top: float | None = 0.6,
                   min_confidence: float | None = None) -> float:
    """The lowest confidence that still trains: ``min_confidence`` if given, else the value
    that keeps the top ``keep_top`` fraction of ``confidences`` (ties at the cut are kept).
    With nothing to rank, the cut is +inf (no pending pair trains)."""
    if min_confidence is not None:
        return float(min_confidence)
    if keep_top is None or not 0 <= keep_top <= 1:
        raise ValueError(f"keep_top={keep_top}: give a fraction in [0, 1] or a min_confidence")
    vals = sorted(confidences, reverse=True)
    n_keep = math.ceil(keep_top * len(vals))
    if not vals or n_keep == 0:
        return math.inf
    return float(vals[n_keep - 1])


# --- precision against hidden truth ---------------------------------------------------------

def rank_in_question(pairs: Sequence[dict]) -> list[float]:
    """Each pair's confidence rank among the pairs of its question, as a fraction in (0, 1):
    the order the per-question confidence cut keeps pairs in."""
    by_q: dict[str, list[int]] = {}
    for i, p in enumerate(pairs):
        by_q.setdefault(question_key(p["question"]), []).append(i)
    rank = [0.0] * len(pairs)
    for idx in by_q.values():
        for pos, i in enumerate(sorted(idx, key=lambda i: pairs[i]["confidence"])):
            rank[i] = (pos + 0.5) / len(idx)
    return rank


def precision_by_bin(pairs: Sequence[dict], truth: dict[tuple[int, str], str], *,
                     bins: int = 5, match=None, per_question: bool = False) -> list[dict]:
    """Fraction of pseudo pairs that are correct, per confidence bin (equal-count bins).

    ``pairs``: dicts with image_id, question, answer, confidence. ``truth``: (image_id,
    question_key) -> true answer. A pair whose question has no true answer for that image
    (a hallucinated question) counts as wrong in ``precision`` and is left out of
    ``precision_known``. ``match(pred, gold)`` compares answers (default: normalised equality).
    ``per_question``: bin by each pair's confidence rank within its question
    (:func:`rank_in_question`; ``lo``/``hi`` are then those ranks), as the per-question cut
    ranks them, instead of by the confidence itself.
    """
    match = match or (lambda p, g: _norm(p) == _norm(g))
    key = rank_in_question(pairs) if per_question else [p["confidence"] for p in pairs]
    order = sorted(range(len(pairs)), key=lambda i: key[i])
    ranked = [pairs[i] for i in order]
    keys = [key[i] for i in order]
    out = []
    for b in range(bins):
        lo, hi = b * len(ranked) // bins, (b + 1) * len(ranked) // bins
        part = ranked[lo:hi]
        if not part:
            continue
        gold = [truth.get((p["image_id"], question_key(p["question"]))) for p in part]
        right = sum(1 for p, g in zip(part, gold) if g is not None and match(p["answer"], g))
        known = sum(1 for g in gold if g is not None)
        out.append({"bin": b, "lo": keys[lo], "hi": keys[hi - 1],
                    "n": len(part), "n_known": known, "precision": right / len(part),
                    "precision_known": right / known if known else None})
    return out


def _norm(text: str) -> str:
    t = re.sub(r"[^\w\s<>,-]", " ", text.lower())
    t = re.sub(r"\b(a|an|the)\b", " ", t)
    return ", ".join(sorted({w.strip() for w in re.sub(r"\s+", " ", t).split(",") if w.strip()}))


# --- 'known' mode: G answers known questions -------------------------------------------------

def _prefixed_batch(processor, instructions: Sequence[str], prefixes: Sequence[str]) -> dict:
    """Each prompt + its ``prefix`` (the start of G's own reply), left padded."""
    enc = models.encode_text(processor, list(instructions))
    tok = processor.tokenizer
    rows = [ids[m.bool()].tolist() + tok(p, add_special_tokens=False)["input_ids"]
            for ids, m, p in zip(enc["input_ids"], enc["attention_mask"], prefixes)]
    width = max(len(r) for r in rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return {"input_ids": ids, "attention_mask": mask}


def answer_known(model, processor, pixel_values, image_indices: Sequence[int],
                 questions: Sequence[Sequence[str]], cfg: PseudoConfig, stats: ParseStats, *,
                 form: str = "generate", contexts: Sequence[str | None] | None = None) -> list[Candidate]:
    """G's greedy answer to each given question per image, after :func:`known_prompt` (in
    ``form``, after the image's caption in ``contexts`` if given); confidence = geometric mean
    probability of the answer tokens (as in 'sample' mode)."""
    tok = processor.tokenizer
    contexts = contexts or [None] * len(image_indices)
    flat = [(i, q) for i, qs in zip(range(len(image_indices)), questions) for q in qs]
    out = []
    for start in range(0, len(flat), cfg.batch_size * cfg.k):
        part = flat[start:start + cfg.batch_size * cfg.k]
        prompts = [known_prompt(q, form, contexts[i]) for i, q in part]
        batch = _prefixed_batch(processor, [p[0] for p in prompts], [p[1] for p in prompts])
        pv = pixel_values[torch.tensor([i for i, _ in part])]
        with torch.no_grad():
            gen = model.generate(**batch,
                                 **models.image_inputs(processor, pv, batch["input_ids"], model),
                                 max_new_tokens=cfg.max_new_tokens, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True,
                                 pad_token_id=tok.pad_token_id)
        new = gen.sequences[:, batch["input_ids"].shape[1]:]
        logp = torch.stack(gen.logits, 1).float().log_softmax(-1).gather(-1, new.unsqueeze(-1))[..., 0]
        for (i, q), ids, lps in zip(part, new.tolist(), logp.tolist()):
            end = next((j for j, t in enumerate(ids) if t == tok.eos_token_id), None)
            out += filter(None, [known_answer(tok, image_indices[i], q, ids, lps, end, stats)])
    return dedup(out, stats)


def known_answer(tok, image_index: int, question: str, ids: Sequence[int], logprobs: Sequence[float],
                 end: int | None, stats: ParseStats) -> Candidate | None:
    """G's reply ``ids`` (with their ``logprobs``) to a known question as a Candidate, ``end``
    the index of its end of turn (None: cut off); or None, counted by why."""
    stats.sampled += 1
    if end is None:
        stats.truncated += 1
        return None
    answer = tok.decode(ids[:end]).strip()
    if not answer or "\n" in answer or "Question:" in answer or text_problem(answer):
        stats.malformed += 1
    elif holds_special(tok, ids[:end], [answer]):
        stats.special += 1
    else:
        return Candidate(image_index, question, answer, geometric_mean_prob(logprobs[:end]), end, 1.0)
    return None


def choose_known(model, processor, pixel_values, image_indices: Sequence[int],
                 questions: Sequence[Sequence[str]], choices: dict[str, Sequence[str]],
                 cfg: PseudoConfig, stats: ParseStats, *, form: str = "generate",
                 contexts: Sequence[str | None] | None = None,
                 reliability: dict[str, float] | None = None) -> list[Candidate]:
    """For each given question per image, the answer among ``choices[question]`` with the
    highest log-probability of its answer tokens (end of turn included) after
    :func:`known_prompt` (in ``form``, after the image's caption in ``contexts`` if given)
    under G, among those the caption names if it names any and ``cfg.caption_choices``
    (:func:`caption_choices`); confidence = the geometric mean probability of the chosen
    answer's tokens, as in the other modes, or, where the caption named some of the choices,
    G's share of probability among them times the question's ``reliability`` (how often such
    captions held the truth on the seed images, :func:`caption_reliability`; 1 if not given):
    the teacher's word, not G's, decided it. One forward pass per (image, question, choice),
    batched; nothing is decoded, so no answer is misspelt or outside the seed's answers."""
    tok = processor.tokenizer
    contexts = contexts or [None] * len(questions)
    rows = choice_rows(questions, choices, cfg, contexts)
    stats.sampled += sum(len(qs) for qs in questions)
    starts: dict[tuple[str, str], int] = {}  # (q, a) -> index of the first answer token
    prefix = {q: known_prompt(q, form)[1] for qs in questions for q in qs}
    scores: dict[tuple[int, str], list[tuple[float, float, int, str]]] = {}
    size = cfg.batch_size * cfg.k
    for lo in range(0, len(rows), size):
        part = rows[lo:lo + size]
        # left padding puts every target at the end, so only its logits are computed
        enc = models.encode_text(processor, [known_prompt(q, form, contexts[i])[0] for i, q, _ in part],
                                 [known_target(prefix[q], a) for _, q, a in part], padding_side="left")
        labels = enc.pop("labels")
        width = int((labels != -100).sum(1).max()) + 1
        pv = pixel_values[torch.tensor([i for i, _, _ in part])]
        with torch.no_grad():
            logits = model(**{k: v.to(model.device) for k, v in enc.items()},
                           **models.image_inputs(processor, pv, enc["input_ids"], model),
                           logits_to_keep=width).logits[:, :-1]
        target = labels[:, -(width - 1):]
        keep = target != -100
        logp = logits[keep.to(logits.device)].float().log_softmax(-1).gather(
            -1, target[keep].unsqueeze(-1).to(logits.device))[:, 0].cpu()
        for row, (i, q, a), lps in zip(range(len(part)), part, logp.split(keep.sum(1).tolist())):
            if (q, a) not in starts:
                starts[q, a] = answer_start(tok, target[row][keep[row]].tolist(), prefix[q], a)
            ans = lps[starts[q, a]:].tolist()
            scores.setdefault((i, q), []).append((sum(ans), geometric_mean_prob(ans), len(ans), a))
    return pick_choices(scores, choices, image_indices, reliability, stats)


def choice_rows(questions: Sequence[Sequence[str]], choices: dict[str, Sequence[str]],
                cfg: PseudoConfig, contexts: Sequence[str | None]) -> list[tuple[int, str, str]]:
    """(image position, question, answer) of every choice :func:`choose_known` scores."""
    return [(i, q, a) for i, qs in enumerate(questions) for q in qs
            for a in (caption_choices(choices.get(q, ()), contexts[i]) if cfg.caption_choices
                      else list(choices.get(q, ())))]


def answer_start(tok, target_ids: Sequence[int], prefix: str, answer: str) -> int:
    """Index of the first answer token in the ids of :func:`known_target` (prefix, answer)."""
    return answer_start_token(tok, target_ids, len(known_target(prefix, answer)) - len(answer.strip()))


def pick_choices(scores: dict, choices: dict[str, Sequence[str]], image_indices: Sequence[int],
                 reliability: dict[str, float] | None, stats: ParseStats) -> list[Candidate]:
    """The chosen answer per (image position, question) from its choices' (sum of log-probs,
    geometric mean, tokens, answer) in ``scores``, as :func:`choose_known` describes."""
    out = []
    for (i, q), scored in scores.items():
        best, conf, n, answer = max(scored, key=lambda o: o[0])
        if len(scored) < len(choices[q]):  # the caption named these: G's share among them
            conf = (reliability or {}).get(q, 1.0) / sum(math.exp(o[0] - best) for o in scored)
        out.append(Candidate(image_indices[i], q, answer.strip(), conf, n, 1.0))
    return dedup(out, stats)
