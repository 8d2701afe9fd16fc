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
import random
from collections import defaultdict
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import torch

from leaml.engine import models
from leaml.engine import neurons
from leaml.engine.batches import Example, ImageSource, TextCache
from leaml.engine.pseudo import QA_INSTRUCTION, YES_NO, format_qa, named_at, with_context
from leaml.engine.train import Stream, TrainConfig, TrainResult, train
from leaml.config import option as _f

CAPTION_INSTRUCTION = "Describe the image."


def default_train() -> TrainConfig:
    """G's optimiser settings (full finetuning; the step count comes from GeneratorConfig)."""
    return TrainConfig(mode="full", lr=1e-3, batch_size=32, warmup_ratio=0.05,
                       weight_decay=0.0)


@dataclass
class GeneratorConfig:
    """Every knob of LEAML's QA-generator stage, with its default."""
    train: TrainConfig = _f(default_train(), "optimiser settings of G (mode must be 'full')")
    rho: float = _f(0.1, "fraction of neurons per layer that caption steps may update (1.0 = all, no masks)")
    captions: bool = _f(True, "interleave caption distillation (False = the no-captions ablation)")
    caption_ratio: float = _f(1.0, "caption steps per seed-QA step")
    qa_epochs: float = _f(12.0, "passes over the seed QA stream")
    min_qa_steps: int = _f(60, "at least this many seed-QA steps (tiny seed sets still train)")
    max_qa_steps: int = _f(400, "at most this many seed-QA steps (0 = no cap)")
    importance_batch_size: int = _f(16, "examples per backward pass when scoring neurons")
    max_captions: int = _f(0, "use at most this many captioned images (0 = all), seeded choice")
    answer_stream: bool = _f(True, "also train the seed QA as question -> answer, the form in "
                                   "which known-question pseudo QA answers")
    answer_ratio: float = _f(4.0, "answer-stream steps per seed-QA step")
    caption_context: bool = _f(True, "start G's QA prompts with the image's teacher caption, in "
                                     "training and pseudo QA (needs captions)")
    caption_swaps: int = _f(0, "answer stream, with caption context: per seed pair whose answer "
                               "its caption names, this many copies with that name swapped for "
                               "another seed answer of the question, in caption and answer")

    def __post_init__(self):
        if isinstance(self.train, dict):
            self.train = TrainConfig.from_dict(self.train)
        checks = [(self.train.mode == "full", "train.mode must be 'full' (G is fully finetuned)"),
                  (0 < self.rho <= 1, "rho must be in (0, 1]"),
                  (self.caption_ratio > 0, "caption_ratio must be > 0"),
                  (self.answer_ratio > 0, "answer_ratio must be > 0"),
                  (self.qa_epochs > 0, "qa_epochs must be > 0"),
                  (self.min_qa_steps >= 1 and self.max_qa_steps >= 0, "min_qa_steps >= 1, max_qa_steps >= 0"),
                  (self.importance_batch_size >= 1, "importance_batch_size must be >= 1"),
                  (self.max_captions >= 0, "max_captions must be >= 0"),
                  (self.caption_swaps >= 0, "caption_swaps must be >= 0")]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"GeneratorConfig: {msg}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["train"] = self.train.to_dict()
        return d

    @classmethod
    def from_dict(cls, data: dict) -> "GeneratorConfig":
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in names})

    def qa_steps(self, n_seed: int) -> int:
        steps = max(self.min_qa_steps, math.ceil(self.qa_epochs * n_seed / self.train.batch_size))
        return min(steps, self.max_qa_steps) if self.max_qa_steps else steps

    @property
    def context(self) -> bool:
        """Whether G's QA prompts carry the caption (caption_context, unless no captions)."""
        return self.captions and self.caption_context


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
                  cfg: GeneratorConfig, seed: int = 0) -> list[Example]:
    """G's answer stream as ``cfg`` sets it: none without ``answer_stream``; else the seed
    pairs as question -> answer and, with caption context, ``caption_swaps`` counterfactual
    copies of those whose caption names the answer (``swapped_examples``)."""
    if not cfg.answer_stream:
        return []
    out = answer_examples(rows, image_file, context=cfg.context)
    if cfg.context:
        out += swapped_examples(rows, image_file, cfg.caption_swaps, seed)
    return out


def swapped_examples(rows: Sequence[dict], image_file: Callable[[dict], str], swaps: int,
                     seed: int = 0) -> list[Example]:
    """Counterfactual answer-stream examples that teach G to read the caption: for each seed
    pair whose image caption (``image_caption``) names its answer, up to ``swaps`` copies in
    which that name (its first mention) is replaced, in the caption and in the answer alike,
    by another answer the seed set gives to the same question (one the caption does not
    name). Yes/no answers are left alone. The image stays as it is, so only the caption tells
    the answer: on 30 labelled images G otherwise answers places and colours from the image
    and its priors, although the captions name them (bench/RESULTS.md)."""
    if not swaps:
        return []
    answers: dict[str, set[str]] = defaultdict(set)
    for r in rows:
        answers[r["question"].strip()].add(r["answer"].strip())
    rng = random.Random(seed)
    out = []
    for r in rows:
        q, a, caption = r["question"].strip(), r["answer"].strip(), r.get("image_caption") or ""
        span = None if a.lower() in YES_NO else named_at(caption, a)
        if not span:
            continue
        others = sorted(x for x in answers[q] if x.lower() not in (a.lower(), *YES_NO)
                        and not named_at(caption, x))
        for alt in rng.sample(others, min(swaps, len(others))):
            swapped = caption[:span[0]] + alt + caption[span[1]:]
            out.append(Example(image_file(r), with_context(swapped, q), alt, open=True))
    return out


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
        batch["pixel_values"] = images.batch([images.index(examples[r].image) for r in rows])
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
