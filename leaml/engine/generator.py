"""LEAML stage 1: the QA generator G, with caption distillation and selective neurons.

G starts from the base model and is *fully* finetuned (our choice: closest to the paper, and
a neuron is then simply one row of a weight matrix; with LoRA the rows would be those of the
B matrices and the shared A matrices would have to stay frozen during caption steps, see
``neurons.row_masks``). Two example streams are interleaved step by step (``train.Stream``):

* seed QA: ``QA_INSTRUCTION`` -> ``"Question: {q}\\nAnswer: {a}"``; every parameter trains;
* the same seed QA as question -> answer (``answer_stream``, on by default): the form in which
  known-question pseudo QA answers (``pseudo.known_prompt``); every parameter trains;
* captions of the run's unlabeled images: ``"Describe the image."`` -> the teacher caption;
  only the top ``rho`` neurons per layer train (row masks; every other parameter, the vision
  tower included, keeps its exact value during these steps, with no weight decay).

The neurons are scored once, before training, on the base model: accumulated
``|sum(grad * weight)|`` per output row of each attention-out and MLP-out projection, of the
QA-generation loss over the seed set (``neurons.importance_scores``). ``rho=1.0`` is plain
caption distillation (no masks at all); ``captions=False`` trains on the seed QA alone.

With ``caption_context`` (on by default, and only with ``captions``) every QA prompt of G, in
training and in pseudo QA, starts with the image's teacher caption where it has one, so G
learns to read the caption as well as the image (``pseudo.with_context``). At 1% of the demo
labels that is what lets the captions reach the pseudo answers (bench/RESULTS.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import torch

from leaml.engine import models
from leaml.engine import neurons
from leaml.engine.batches import Example, ImageSource, TextCache
from leaml.config import GeneratorConfig  # noqa: F401  (re-exported)
from leaml.config import generator_train as default_train  # noqa: F401  (re-exported)
from leaml.engine.pseudo import QA_INSTRUCTION, YES_NO, format_qa, with_context
from leaml.engine.train import Stream, TrainResult, train

CAPTION_INSTRUCTION = "Describe the image."


def known_form(config: dict) -> tuple[str, bool]:
    """(form, caption context) in which a stored generator answers known questions, from its
    run's config (generators stored before these options answer in the generation form)."""
    form = "answer" if config.get("answer_stream") else "generate"
    return form, bool(config.get("captions", True) and config.get("caption_context"))


# --- examples -------------------------------------------------------------------------------

def _context(row: dict, context: bool) -> str | None:
    return row.get("image_caption") if context else None


def qa_examples(rows: Sequence[dict], image_file: Callable[[dict], str], *,
                context: bool = False) -> list[Example]:
    """G's seed-QA examples: the generation instruction -> "Question: q\\nAnswer: a" (after the
    image's caption, ``image_caption``, with ``context``)."""
    return [Example(image_file(r), with_context(_context(r, context), QA_INSTRUCTION),
                    format_qa(r["question"], r["answer"]), open=True) for r in rows]


def answer_examples(rows: Sequence[dict], image_file: Callable[[dict], str], *,
                    context: bool = False) -> list[Example]:
    """G's answer-stream examples: the question -> the answer (after the caption with ``context``)."""
    return [Example(image_file(r), with_context(_context(r, context), r["question"].strip()),
                    r["answer"].strip(), open=r["answer"].strip().lower() not in YES_NO)
            for r in rows]


def answer_stream(rows: Sequence[dict], image_file: Callable[[dict], str],
                  cfg: GeneratorConfig) -> list[Example]:
    """G's answer stream as ``cfg`` sets it: none without ``answer_stream``; else the seed
    pairs as question -> answer (after the caption with caption context)."""
    if not cfg.answer_stream:
        return []
    return answer_examples(rows, image_file, context=cfg.context)


def caption_examples(rows: Sequence[dict], image_file: Callable[[dict], str]) -> list[Example]:
    """G's caption-distillation examples: "Describe the image." -> the teacher caption."""
    return [Example(image_file(r), CAPTION_INSTRUCTION, r["caption"].strip(), open=True)
            for r in rows if (r.get("caption") or "").strip()]


def pick(rows: Sequence[dict], n: int, seed: int) -> list[dict]:
    """At most ``n`` rows (all when n is 0), a seeded choice kept in input order."""
    if not n or n >= len(rows):
        return list(rows)
    g = torch.Generator().manual_seed(seed)
    keep = sorted(torch.randperm(len(rows), generator=g)[:n].tolist())
    return [rows[i] for i in keep]


# --- neurons --------------------------------------------------------------------------------

def _batches(processor, examples: Sequence[Example], size: int):
    """Loss batches over all examples (tokenised and preprocessed once, like training)."""
    images = ImageSource(processor, [e.image for e in examples], budget_mb=512)
    text = TextCache(processor, examples)
    for i in range(0, len(examples), size):
        rows = list(range(i, min(i + size, len(examples))))
        batch = text.batch(rows)
        pixels = images.batch([images.index(examples[r].image) for r in rows])
        batch.update(models.image_inputs(processor, pixels, batch["input_ids"]))
        yield batch


def select_neurons(model, processor, qa: Sequence[Example], rho: float,
                   batch_size: int = 16, progress=None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(scores, selected): importance of every neuron for the QA-generation loss over ``qa``
    and the top-``rho`` row mask per layer. ``progress(stage, batch, batches, nan)`` after
    each batch."""
    names = models.arch_spec(model).neuron_modules
    total = math.ceil(len(qa) / batch_size)
    report = (lambda n: progress("generator: scoring neurons", n, total, math.nan)) \
        if progress else None
    scores = neurons.importance_scores(model, names, _batches(processor, qa, batch_size),
                                       progress=report)
    return scores, neurons.select_top(scores, rho)


# --- training -------------------------------------------------------------------------------

@dataclass
class GeneratorResult:
    """The trained generator and what was done to it (stored with the generator run)."""
    train: TrainResult
    info: dict


def streams(model, processor, qa: Sequence[Example], captions: Sequence[Example],
            cfg: GeneratorConfig, answers: Sequence[Example] = (),
            progress=None) -> tuple[list[Stream], dict]:
    """The seed-QA stream, the answer stream (if any answer examples) and (unless disabled or
    empty) the masked caption stream."""
    st = [Stream(list(qa), weight=1.0, name="qa")]
    if answers:
        st.append(Stream(list(answers), weight=cfg.answer_ratio, name="answer"))
    info: dict = {"n_qa": len(qa), "n_answers": len(answers),
                  "n_captions": len(captions) if cfg.captions else 0,
                  "rho": cfg.rho, "captions": cfg.captions, "caption_context": cfg.context}
    if not cfg.captions or not captions:
        return st, info
    masks = None
    if cfg.rho < 1.0:
        _, selected = select_neurons(model, processor, qa, cfg.rho, cfg.importance_batch_size,
                                     progress)
        # every parameter: train_generator froze them all for scoring, train() unfreezes them
        masks = neurons.row_masks(model, selected, trainable_only=False)
        info["neurons"] = {k: v for k, v in neurons.summary(selected).items() if k != "per_layer"}
    st.append(Stream(list(captions), weight=cfg.caption_ratio, name="caption", grad_masks=masks))
    return st, info


def train_generator(model, processor, qa: Sequence[Example], captions: Sequence[Example],
                    cfg: GeneratorConfig, *, answers: Sequence[Example] = (),
                    work_dir: str | Path | None = None, progress=None,
                    should_stop=None) -> GeneratorResult:
    """Train G (in place, full finetuning) on seed QA (and its answer form, ``answers``)
    interleaved with masked caption steps.

    The step count is ``cfg.qa_steps(len(qa))`` seed-QA steps plus, per seed-QA step,
    ``answer_ratio`` answer steps (when ``answers`` are given) and ``caption_ratio`` caption steps. ``work_dir``
    holds train()'s resumable checkpoint.
    """
    if not qa:
        raise ValueError("the QA generator needs seed QA pairs; label some images first "
                         "(or raise --label-fraction)")
    for p in model.parameters():  # scoring needs no grads elsewhere; train() sets them again
        p.requires_grad_(False)
    st, info = streams(model, processor, qa, captions, cfg, answers, progress)
    qa_steps = cfg.qa_steps(len(qa))
    total = math.ceil(qa_steps * sum(s.weight for s in st))
    tcfg = replace(cfg.train, max_steps=total, min_steps=0)
    result = train(model, processor, st, tcfg, work_dir=work_dir, progress=progress,
                   should_stop=should_stop, stage="generator")
    info.update(steps=result.step, total_steps=total, qa_steps=qa_steps,
                seconds=round(result.seconds, 1),
                final_loss=result.losses[-1] if result.losses else None)
    return GeneratorResult(result, info)
