"""Held-out evaluation of the pretrained tiny base on the general synthetic corpus.

Everything goes through the public leaml.engine.models API (generate() on cached pixel values),
exactly as any later user of the base model would see it: accuracy per question type on
held-out scenes, caption exact match, the format of generated QA pairs, and zero-shot
behaviour on question phrasings never seen in pretraining.
"""
from __future__ import annotations

import random
import re

import torch

from leaml.engine import models
from leaml.tiny import corpus as D

# Paraphrases never used in pretraining: (question type, template over the training question)
PARAPHRASES = [
    ("color", r"^What color is (the .+)\?$", "Which color does {0} have?"),
    ("count", r"^How many objects are there\?$", "Count the objects in the image."),
    ("shape", r"^What shape is (the .+)\?$", "Which shape is {0}?"),
    ("position", r"^Where is (the .+)\?$", "Where in the image is {0}?"),
    ("yes/no", r"^Is there a (.+)\?$", "Does the image contain a {0}?"),
]


def normalize(text: str) -> str:
    """Lowercase, drop punctuation except - and ',' inside lists; lists compare as sets."""
    text = re.sub(r"[^\w\s,\-<>]", "", text.lower()).strip()
    parts = sorted(p.strip() for p in text.split(",") if p.strip())
    return ", ".join(parts)


def _held_questions(scenes, per_type: int, seed: int) -> list[tuple[int, str, str, str]]:
    """(scene index, type, question, answer), per_type of each type, from held-out scenes."""
    rng = random.Random(seed + 777)
    pools: dict[str, list] = {t: [] for t in D.QUESTION_TYPES}
    for i, s in enumerate(scenes):
        for t, q, a in D.questions(s, rng):
            pools[t].append((i, t, q, a))
    return [x for t in D.QUESTION_TYPES for x in rng.sample(pools[t], min(per_type, len(pools[t])))]


def _answer(model, processor, pix, items, max_new_tokens=12) -> list[str]:
    idx = torch.tensor([i for i, *_ in items])
    gens = models.generate(model, processor, pix[idx], [q for _, _, q, _ in items],
                           max_new_tokens=max_new_tokens, batch_size=64)
    return [g[0].text for g in gens]


def _accuracy_by_type(items, answers) -> dict:
    by: dict[str, list[bool]] = {}
    for (_, t, _, a), pred in zip(items, answers):
        by.setdefault(t, []).append(normalize(pred) == normalize(a))
    acc = {t: round(sum(v) / len(v), 4) for t, v in by.items()}
    acc["overall"] = round(sum(sum(v) for v in by.values()) / sum(len(v) for v in by.values()), 4)
    return acc


def _zero_shot(items) -> list[tuple[int, str, str, str]]:
    out = []
    for i, t, q, a in items:
        for pt, pattern, template in PARAPHRASES:
            m = re.match(pattern, q)
            if pt == t and m:
                out.append((i, t, template.format(*m.groups()), a))
    return out


def _gen_qa_check(model, processor, scenes, pix, n: int) -> dict:
    """Share of "Generate a question..." outputs that parse, and whose answer is right when
    the question is one the corpus can answer for that scene."""
    items = [(i, "gen", D.GENERATE_QA, "") for i in range(min(n, len(scenes)))]
    outs = _answer(model, processor, pix, items, max_new_tokens=32)
    parsed = correct = checkable = 0
    for (i, *_), text in zip(items, outs):
        m = re.match(r"^Question: (.+?)\nAnswer: (.+)$", text.strip(), re.S)
        if not m:
            continue
        parsed += 1
        truth = {q: a for _ in range(8) for _, q, a in D.questions(scenes[i], random.Random(_))}
        if m.group(1) in truth:
            checkable += 1
            correct += normalize(m.group(2)) == normalize(truth[m.group(1)])
    return {"n": len(items), "parse_rate": round(parsed / len(items), 4),
            "known_question_rate": round(checkable / len(items), 4),
            "answer_correct_of_known": round(correct / max(1, checkable), 4),
            "example": outs[0] if outs else ""}


def qa_accuracy(model, processor, scenes, pix, per_type: int = 60, seed: int = 0) -> dict:
    """Exact-match accuracy per question type (and overall) on ``per_type`` questions a type."""
    items = _held_questions(scenes, per_type, seed)
    return _accuracy_by_type(items, _answer(model, processor, pix, items))


def evaluate_general(model, processor, scenes, pix, per_type: int = 60, seed: int = 0) -> dict:
    """Held-out general-domain metrics of a (pre)trained model; see the module docstring."""
    items = _held_questions(scenes, per_type, seed)
    acc = _accuracy_by_type(items, _answer(model, processor, pix, items))
    zs = _zero_shot(items)
    zs_acc = _accuracy_by_type(zs, _answer(model, processor, pix, zs)) if zs else {}
    caps = [(i, "caption", D.DESCRIBE, D.caption(scenes[i])) for i in range(min(100, len(scenes)))]
    cap_out = _answer(model, processor, pix, caps, max_new_tokens=96)
    cap_em = sum(o.strip() == c for (*_, c), o in zip(caps, cap_out)) / max(1, len(caps))
    return {"n_questions": len(items), "qa_accuracy": acc,
            "zero_shot_paraphrase_accuracy": zs_acc,
            "caption_exact_match": round(cap_em, 4),
            "caption_example": {"reference": caps[0][3], "generated": cap_out[0]} if caps else {},
            "generate_qa": _gen_qa_check(model, processor, scenes, pix, 100)}


def report_markdown(metrics: dict) -> str:
    """PRETRAIN.md: how the committed base was made and how good it is."""
    ev, cfg = metrics["eval"], metrics["config"]
    steps = ",".join(str(metrics["exact_steps"].get(k, 0)) for k in ("vision", "align", "instruct"))
    init = f" --init-from {cfg['init_from']}" if cfg.get("init_from") else ""
    if cfg.get("patch_size"):
        init += f" --patch-size {cfg['patch_size']}"
    if cfg.get("qa_weights"):
        w = cfg["qa_weights"]
        init += " --qa-weights " + (w if isinstance(w, str) else
                                    ",".join(f"{k}={v:g}" for k, v in w.items()))
    init += f" --batch-size {cfg['batch_size']}"  # always: defaults move, records do not
    if cfg.get("device", "cpu") != "cpu":
        init += f" --device {cfg['device']}"
    if cfg.get("lr_lm") is not None:  # always: the rerun must not depend on today's default
        init += f" --lr-lm {cfg['lr_lm']:g}"
    lines = ["# Tiny base: pretraining record", "",
             f"Command: `python -m leaml pretrain-tiny --seed {cfg['seed']} "
             f"--minutes {cfg['minutes']}{init}`", "",
             f"Exact rerun: `python -m leaml pretrain-tiny --seed {cfg['seed']} --steps {steps}"
             f"{init}` (vision,align,instruct; threads={cfg['threads']})", "",
             f"Wall clock: {metrics['train_seconds']} s data + training, "
             f"{metrics.get('eval_seconds')} s evaluation; parameters: {metrics['params']}", "",
             "## Stages", "", "| stage | steps | seconds | samples/s | final loss |",
             "|---|---|---|---|---|"]
    lines += [f"| {k} | {v['steps']} | {v['seconds']} | {v['samples_per_s']} | {v['final_loss']} |"
              for k, v in metrics["stages"].items()]
    if metrics.get("qa_weights"):
        lines += ["", f"Question-type weights in stages B/C: {metrics['qa_weights']}"]
    lines += ["", "Vision tower, held-out per-patch cell accuracy: "
              f"{metrics.get('vision_cell_accuracy_heldout', 'n/a (no vision stage)')}", "",
              f"## Held-out general QA (exact match, {ev['n_questions']} questions)", "",
              "| question type | accuracy |", "|---|---|"]
    lines += [f"| {k} | {v:.1%} |" for k, v in ev["qa_accuracy"].items()]
    lines += ["", "## Zero-shot: unseen question phrasings", "", "| question type | accuracy |",
              "|---|---|"]
    lines += [f"| {k} | {v:.1%} |" for k, v in ev["zero_shot_paraphrase_accuracy"].items()]
    lines += ["", f"Caption exact match: {ev['caption_exact_match']:.1%}. Example:", "",
              f"- reference: {ev['caption_example'].get('reference')}",
              f"- generated: {ev['caption_example'].get('generated')}", "",
              f"Generate-QA format: {ev['generate_qa']}", ""]
    return "\n".join(lines)
