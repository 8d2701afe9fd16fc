"""The one supervised training routine: VQA, QA generation and captioning alike.

Every task is (image, instruction) -> target with the loss on the target tokens only
(``models.encode_text`` builds the labels). ``train()`` takes one or more example
*streams*; each optimizer step draws all its micro-batches from one stream, chosen by a
deterministic weighted round robin, and a stream may carry gradient masks over parameter rows
(LEAML's selective neuron distillation: caption batches update only the chosen neurons).

Runs under ``accelerate``: a plain CPU process, or ``accelerate launch`` for GPUs / DDP, where
each process takes its slice of every micro-batch. Checkpoints carry the config, the step, the
trainable weights, optimizer, scheduler and RNG state; the batch order and augmentation are
pure functions of (seed, step), so a resumed run ends with the same weights as an
uninterrupted one.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Sequence

import torch

from leaml.engine import checkpoints
from leaml.engine import models
from leaml.engine.batches import (MAX_TARGET_TOKENS, EpochOrder, Example, ImageSource, PackedText,
                           TextCache, augment, image_groups, mentions_position)
from leaml.config import option as _f
from leaml.engine.question_losses import QuestionLosses
from leaml.engine.warmup import AnswerTargets
from leaml.engine.warmup import fit as fit_heads

Progress = Callable[[str, int, int, float], None]  # (stage, step, total, loss)
CHECKPOINT = "checkpoint"


@dataclass
class TrainConfig:
    """Hyperparameters of one training run; stored as JSON with the run and its checkpoints."""
    mode: str = _f("lora", "'lora' (peft adapters on the language model) or 'full'")
    lr: float = _f(1e-3, "peak learning rate of AdamW")
    weight_decay: float = _f(0.0, "AdamW weight decay (matrices only; never on frozen rows)")
    warmup_ratio: float = _f(0.05, "fraction of the steps spent in linear warmup")
    min_lr_ratio: float = _f(0.0, "cosine decays to lr * min_lr_ratio")
    batch_size: int = _f(32, "examples per optimizer step, over all processes and accumulation")
    grad_accum: int = _f(1, "micro-batches per optimizer step (batch_size must divide evenly)")
    epochs: float = _f(3.0, "passes over the data (all streams together), if max_steps is 0")
    max_steps: int = _f(0, "optimizer steps, overriding epochs and min_steps; 0 = from epochs")
    min_steps: int = _f(0, "with epochs: at least this many steps (tiny label fractions still train)")
    max_grad_norm: float = _f(1.0, "gradient clipping; 0 = off")
    seed: int = _f(0, "seeds weights of new adapters, batch order, augmentation, dropout")
    lora_r: int = _f(16, "LoRA rank")
    lora_alpha: float = _f(32.0, "LoRA scaling numerator (scale = alpha / r)")
    lora_dropout: float = _f(0.0, "dropout on the LoRA input")
    lora_targets: list = _f([], "module name suffixes to adapt; [] = arch_spec's language-model targets")
    train_vision: bool = _f(True, "full mode: train the vision tower too (False = frozen)")
    vision_lr_scale: float = _f(1.0, "full mode: the vision tower's lr = lr x this (0 = frozen "
                                "after the vision warmup: no backward through it)")
    image_cache_mb: float = _f(2048.0, "preprocess all images once when they fit; else open per batch")
    augment: str = _f("none", "'none'; 'mirror' (left-right and up-down at random, place "
                      "answers mirrored with the image, other position questions sit mirrored "
                      "images out); or 'flip', 'rot90', 'flip+rot90' (never on position questions)")
    oversample_open: float = _f(1.0, "per-epoch repeat factor of examples marked open")
    checkpoint_every: int = _f(0, "save a resumable checkpoint every N steps (0 = only on stop)")
    mixed_precision: str = _f("no", "accelerate mixed precision: 'no', 'bf16' or 'fp16'")
    gradient_checkpointing: bool = _f(False, "trade compute for memory on large models")
    pack: bool = _f(True, "train all questions of an image in one sequence (same loss, "
                    "vision and prefix once); where the architecture allows")
    vision_warmup_steps: int = _f(0, "full mode: steps of direct answer-word heads on the image "
                                  "features (tower + projector) before the main loop; 0 = off")
    vision_warmup_epochs: float = _f(0.0, "full mode: the vision warmup's length in passes "
                                     "over the images, if vision_warmup_steps is 0")
    vision_warmup_lr: float = _f(0.5, "SGD (momentum 0.9) lr of the vision warmup")
    vision_warmup_flips: bool = _f(True, "vision warmup: mirror images at random, place answers "
                                   "('upper-left') with them")
    vision_warmup_transpose: bool = _f(False, "vision warmup, with flips: transpose images "
                                       "(square ones) at random too, place answers following")
    vision_warmup_where: bool = _f(False, "vision warmup: the heads learn a bias per image "
                                   "token and answer word (place words find their tokens)")
    vision_warmup_shift: int = _f(0, "vision warmup: move each image by up to this many pixels "
                                  "along each axis at random (edges repeated); answers kept")
    hard_fraction: float = _f(0.0, "fraction of every batch drawn by question, each with "
                              "probability ~ its running loss ** question_power (questions "
                              "not learned yet get more samples); 0 = off")
    question_power: float = _f(1.0, "hard_fraction: a question's weight = its running loss ** this")
    max_target_tokens: int = _f(MAX_TARGET_TOKENS, "targets longer than this many tokens are "
                                "cut (an imported caption may run to 10,000 characters); prompts "
                                "are never cut")

    def __post_init__(self):
        checks = [
            (self.mode in ("lora", "full"), "mode must be 'lora' or 'full'"),
            (self.lr > 0, "lr must be > 0"),
            (self.vision_lr_scale >= 0, "vision_lr_scale must be >= 0"),
            (0 <= self.warmup_ratio < 1, "warmup_ratio must be in [0, 1)"),
            (0 <= self.min_lr_ratio <= 1, "min_lr_ratio must be in [0, 1]"),
            (self.batch_size >= 1 and self.grad_accum >= 1, "batch_size and grad_accum must be >= 1"),
            (self.batch_size % self.grad_accum == 0, "batch_size must be a multiple of grad_accum"),
            (self.epochs > 0 or self.max_steps > 0, "set epochs > 0 or max_steps > 0"),
            (self.max_steps >= 0 and self.min_steps >= 0, "max_steps/min_steps must be >= 0"),
            (self.lora_r >= 1, "lora_r must be >= 1"),
            (0 <= self.lora_dropout < 1, "lora_dropout must be in [0, 1)"),
            (self.augment in ("none", "mirror", "flip", "rot90", "flip+rot90"),
             "augment must be 'none', 'mirror', 'flip', 'rot90' or 'flip+rot90'"),
            (self.oversample_open >= 1, "oversample_open must be >= 1"),
            (self.mixed_precision in ("no", "bf16", "fp16"), "mixed_precision: 'no', 'bf16' or 'fp16'"),
            (self.vision_warmup_steps >= 0 and self.vision_warmup_epochs >= 0
             and self.vision_warmup_lr > 0 and self.vision_warmup_shift >= 0,
             "vision_warmup_steps/epochs/shift must be >= 0 and vision_warmup_lr > 0"),
            (0 <= self.hard_fraction < 1, "hard_fraction must be in [0, 1)"),
            (self.vision_warmup_steps == self.vision_warmup_epochs == 0 or self.mode == "full",
             "vision_warmup_steps/epochs need mode 'full' (LoRA keeps the vision tower frozen)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"TrainConfig: {message}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def describe_config(cls=TrainConfig) -> list[tuple[str, object, str]]:
    """(name, default, help) of every field of a config dataclass, for --help and the UI."""
    out = []
    for f in fields(cls):
        default = f.default_factory() if callable(f.default_factory) else f.default
        out.append((f.name, default, f.metadata.get("help", "")))
    return out


@dataclass
class Stream:
    """One source of batches. ``weight`` sets how often a step draws from it (relative).

    ``grad_masks`` maps parameter names (as in ``model.named_parameters()`` of the model
    being trained, i.e. after LoRA wrapping) to boolean row masks (shape: the parameter's
    first dimension; True = row trains). During this stream's steps every other row of a
    masked parameter keeps its value exactly: no gradient, no momentum, no weight decay.
    Parameters absent from the dict train normally.
    """
    examples: Sequence[Example]
    weight: float = 1.0
    name: str = "main"
    grad_masks: dict[str, torch.Tensor] | None = None


@dataclass
class TrainResult:
    model: torch.nn.Module
    step: int
    total_steps: int
    stopped: bool
    losses: list[float]
    seconds: float
    samples_per_s: float
    image_cache: bool


# --- model preparation --------------------------------------------------------------------

def prepare_model(model: torch.nn.Module, config: TrainConfig) -> torch.nn.Module:
    """Wrap with LoRA adapters (language model only) or set up full finetuning.

    LoRA: peft adapters on arch_spec's language-model target modules (or config.lora_targets),
    everything else frozen. Full: every parameter trains, the vision tower too unless
    config.train_vision is False.
    """
    if config.mode == "lora":
        from peft import LoraConfig, get_peft_model
        targets = models.arch_spec(model).lora_targets  # full names, language model only
        if config.lora_targets:
            targets = [n for n in targets if n.rsplit(".", 1)[-1] in config.lora_targets]
        if not targets:
            raise ValueError(f"no LoRA target modules (lora_targets={config.lora_targets}); "
                             "name Linear layers of the language model, e.g. q_proj, v_proj")
        lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha,
                          lora_dropout=config.lora_dropout, bias="none", target_modules=targets)
        torch.manual_seed(config.seed)  # adapter init is random: make it the run's
        return get_peft_model(model, lora)
    frozen = set() if config.train_vision else _vision_params(model)
    for name, p in model.named_parameters():
        p.requires_grad_(name not in frozen)
    return model


def _vision_params(model) -> set[str]:
    """Names of the vision tower's parameters: the outermost submodule built from
    ``config.vision_config`` (no per-model names needed)."""
    vision_cfg = getattr(model.config, "vision_config", None)
    if vision_cfg is None:
        return set()
    for name, module in model.named_modules():
        if name and type(getattr(module, "config", None)) is type(vision_cfg):
            return {f"{name}.{n}" for n, _ in module.named_parameters()}
    return set()


def save_trained(model: torch.nn.Module, processor, out_dir: str | Path) -> Path:
    """Save a trained model: LoRA adapters in peft's own format, full models whole."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if _is_peft(model):
        model.save_pretrained(out)
        processor.save_pretrained(out)
    else:
        models.save(model, processor, out)
    return out


def load_trained(model_dir: str | Path, base_ref: str, device: str = "cpu",
                 merge: bool = True):
    """Load what :func:`save_trained` wrote: adapters on top of ``base_ref``, or a full model."""
    path = Path(model_dir)
    if (path / "adapter_config.json").exists():
        from peft import PeftModel
        base, processor = models.load(base_ref, device=device)
        model = PeftModel.from_pretrained(base, path)
        return (model.merge_and_unload() if merge else model), processor
    return models.load(str(path), device=device)


def _is_peft(model) -> bool:
    return hasattr(model, "peft_config")


# --- schedule ------------------------------------------------------------------------------

def lr_lambda(total: int, config: TrainConfig) -> Callable[[int], float]:
    """Linear warmup to 1, then cosine down to min_lr_ratio at step ``total``."""
    warm = int(round(config.warmup_ratio * total))

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = min(1.0, (step - warm) / max(1, total - warm))
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    return f


def total_steps(streams: Sequence[Stream], config: TrainConfig) -> int:
    """Optimizer steps of a run: max_steps if set, else epochs over all streams but at least
    min_steps."""
    if config.max_steps:
        return config.max_steps
    n = sum(len(s.examples) for s in streams)
    return max(config.min_steps, math.ceil(config.epochs * n / config.batch_size), 1)


def stream_schedule(weights: Sequence[float], steps: int) -> list[int]:
    """Which stream each step draws from: smooth weighted round robin (no randomness)."""
    credit = [0.0] * len(weights)
    total = float(sum(weights))
    out = []
    for _ in range(steps):
        credit = [c + w for c, w in zip(credit, weights)]
        pick = max(range(len(weights)), key=lambda i: credit[i])
        credit[pick] -= total
        out.append(pick)
    return out


# --- the loop ------------------------------------------------------------------------------

class _Data:
    """Streams with their caches and orders, serving the micro-batches of a step.

    With ``pack`` the unit of a stream's order is a packed row (the examples of one image,
    see :class:`leaml.engine.batches.PackedText`) and a micro-batch of ``size`` examples takes as
    many rows as hold that many examples on average, so ``batch_size`` and ``epochs`` keep
    their meaning.
    """

    def __init__(self, processor, streams: Sequence[Stream], config: TrainConfig,
                 pack: bool = False):
        everything = [e for s in streams for e in s.examples]
        self.images = ImageSource(processor, [e.image for e in everything], config.image_cache_mb)
        self.mirror = config.augment == "mirror"
        self.text = TextCache(processor, everything, max_target_tokens=config.max_target_tokens,
                              mirror=self.mirror)
        self.image_index = [self.images.index(e.image) for e in everything]
        # mirroring rewrites or drops the position examples itself (TextCache.mirrored)
        self.augmentable = [e.augment and (self.mirror or not mentions_position(
            e.instruction, e.target)) for e in everything]
        image_token = getattr(processor, "image_token_id", None)
        self.packed = PackedText(self.text, image_token) if pack and image_token is not None \
            else None
        self.units, self.orders, self.per_unit, start = [], [], [], 0
        for sid, s in enumerate(streams):
            idx = list(range(start, start + len(s.examples)))
            if self.packed:
                # without augmentation, position questions may share their image's row
                aug = [self.augmentable[i] or config.augment == "none" for i in idx]
                units = self.packed.rows(image_groups([self.image_index[i] for i in idx], aug))
                units = [[idx[i] for i in u] for u in units]
            else:
                units = [[i] for i in idx]
            self.units.append(units)
            self.per_unit.append(len(idx) / len(units))
            self.orders.append(EpochOrder([any(everything[i].open for i in u) for u in units],
                                          config.seed, sid, config.oversample_open))
            start += len(s.examples)
        # per-question running losses, to draw hard examples by
        self.losses: QuestionLosses | None = None
        self.by_question: list[dict[int, list[int]]] = []  # per stream: question -> examples
        if config.hard_fraction > 0:
            self.losses = QuestionLosses([e.instruction for e in everything], config.question_power)
            start = 0
            for s in streams:
                groups: dict[int, list[int]] = {}
                for i in range(start, start + len(s.examples)):
                    groups.setdefault(int(self.losses.group[i]), []).append(i)
                self.by_question.append(groups)
                start += len(s.examples)

    def micro_batch(self, stream: int, position: int, size: int, rank: int, world: int,
                    config: TrainConfig, aug_key: int) -> list[tuple[dict[str, torch.Tensor], float]]:
        """The (batch, share) parts of one micro-batch: the stream's next ``size`` examples or,
        with ``hard_fraction``, fewer of them and the hard examples as a second part (its own
        rows, so short single questions are not padded to the length of packed rows); a
        part's loss counts by its share of the examples."""
        hard = round(size * config.hard_fraction)
        if hard:  # the stream's order advances by the rest of the batch only
            keep = 1.0 - config.hard_fraction
            position, size = round(position * keep), round((position + size) * keep) - round(position * keep)
        if self.packed is None:
            local = self.orders[stream].take(position, size)[rank::world]
        else:
            per = self.per_unit[stream]
            start, stop = round(position / per), round((position + size) / per)
            local = self.orders[stream].take(start, max(stop - start, world))[rank::world]
        units = [self.units[stream][i] for i in local]
        parts = [(self._batch(units, config, aug_key), size / (size + hard))]
        extra = [[i] for i in self._hard_examples(stream, hard, config.seed, aug_key)][rank::world]
        if extra:
            parts.append((self._batch(extra, config, aug_key), hard / (size + hard)))
        return parts

    def _batch(self, units: list[list[int]], config: TrainConfig, aug_key: int) -> dict[str, torch.Tensor]:
        tag = self.losses is not None
        pixels = self.images.batch([self.image_index[u[0]] for u in units])
        if self.mirror:
            units, pixels = self._mirrored(units, pixels, config.seed, aug_key)
        else:
            pixels = augment(pixels, [self.augmentable[u[0]] for u in units],
                             config.augment, config.seed, aug_key)
        if self.packed is None:
            batch = self.text.batch([u[0] for u in units], with_example=tag)
        else:
            batch = self.packed.batch(units, with_example=tag)
        batch["pixel_values"] = pixels
        return batch

    def _mirrored(self, units: list[list[int]], pixels: torch.Tensor, seed: int,
                  key: int) -> tuple[list[list[int]], torch.Tensor]:
        """``augment='mirror'``: each unit's image mirrored left-right and up-down with
        probability 1/2 each (from (seed, key)), its examples replaced by their sequences for
        that mirror (place answers mirrored; examples the mirror leaves unknown left out). The
        units come back as sequence indices of :class:`leaml.engine.batches.TextCache`."""
        g = torch.Generator().manual_seed((seed * 1_000_003 + key) & 0x7FFFFFFF)
        draws = (torch.rand(len(units), 2, generator=g) < 0.5).tolist()
        out, pixels = [], pixels.clone()
        for row, (unit, (h, v)) in enumerate(zip(units, draws)):
            axes = "h" * h + "v" * v
            seqs = [self.text.mirrored[axes][i] for i in unit] \
                if axes and self.augmentable[unit[0]] else []
            seqs = [s for s in seqs if s >= 0]
            if not seqs:  # not mirrored (drawn so, or nothing of it survives a mirror)
                out.append(unit)
                continue
            out.append(seqs)
            dims = [d for d, on in ((-1, h), (-2, v)) if on]
            pixels[row] = pixels[row].flip(dims)
        return out, pixels

    def _hard_examples(self, stream: int, count: int, seed: int, key: int) -> list[int]:
        """``count`` examples of the stream: a question drawn by its running-loss weight, then
        one of its examples uniformly; a pure function of (seed, key, running losses)."""
        if not count:
            return []
        groups = self.by_question[stream]
        ids = list(groups)
        g = torch.Generator().manual_seed((seed * 1_000_003 + key * 7_919 + stream) & 0x7FFFFFFF)
        p = self.losses.weights()[ids]
        picks = torch.multinomial(p / p.sum(), count, replacement=True, generator=g).tolist()
        return [groups[ids[q]][int(torch.randint(len(groups[ids[q]]), (1,), generator=g))]
                for q in picks]


def train(model: torch.nn.Module, processor, data: Sequence[Example] | Sequence[Stream],
          config: TrainConfig, *, work_dir: str | Path | None = None, resume: bool = True,
          progress: Progress | None = None, should_stop: Callable[[], bool] | None = None,
          stage: str = "train") -> TrainResult:
    """Train ``model`` on examples (or streams of examples) and return the trained model.

    ``model`` is the base; LoRA mode wraps it (the result's ``model`` is the PeftModel).
    ``work_dir`` holds the checkpoint (``<work_dir>/checkpoint``): written every
    ``config.checkpoint_every`` steps and whenever ``should_stop()`` turns true (checked before
    every step); with ``resume`` an existing checkpoint there is loaded and training goes on
    from its step. ``progress(stage, step, total, loss)`` is called after every step.
    """
    from accelerate import Accelerator, DistributedDataParallelKwargs
    streams = _as_streams(data)
    # Full finetuning has parameters no loss reaches (e.g. the vision tower's last layer when
    # features come from an earlier one); under DDP (accelerate launch, >1 process) the
    # gradient reduction fails unless told. No effect in a single process.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=config.mode == "full")
    acc = Accelerator(mixed_precision=config.mixed_precision, kwargs_handlers=[ddp])
    model = prepare_model(model, config)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    masks = _resolve_masks(model, streams)
    optimizer = _optimizer(model, config)
    total = total_steps(streams, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total, config))
    batches = _Data(processor, streams, config,
                    pack=config.pack and models.packable(model))
    model, optimizer = acc.prepare(model, optimizer)
    ckpt = Path(work_dir) / CHECKPOINT if work_dir else None
    loaded = None
    if resume and ckpt and checkpoints.exists(ckpt.parent):
        loaded = _load_checkpoint(ckpt, acc.unwrap_model(model), optimizer, scheduler, config,
                                  stage, batches.losses)
    step = loaded or 0
    if loaded is None:
        torch.manual_seed(config.seed)  # dropout; a resumed run restored its RNG state above
        # (a resumed run skips the warmup: its checkpoint, even one of step 0, holds the
        # warmed weights)
        if config.vision_warmup_steps or config.vision_warmup_epochs:
            vision_warmup(acc.unwrap_model(model), batches, streams, config, progress, stage)
    if config.mode == "full" and config.vision_lr_scale == 0:  # warmed (or as loaded): frozen
        inner = acc.unwrap_model(model)
        vision = _vision_params(inner)
        for name, p in inner.named_parameters():
            if name in vision:
                p.requires_grad_(False)
    schedule = stream_schedule([s.weight for s in streams], total)
    return _loop(acc, model, optimizer, scheduler, batches, schedule, masks, config, step, total,
                 ckpt, progress, should_stop, stage)


def vision_warmup(model, batches: "_Data", streams: Sequence[Stream], config: TrainConfig,
                  progress: Progress | None = None, stage: str = "train") -> list[float]:
    """Train the image path (vision tower + projector) for ``config.vision_warmup_steps``
    (or ``vision_warmup_epochs`` passes over the images) on the examples' closed answers
    through throw-away max-pooled heads, images mirrored at random with
    ``vision_warmup_flips`` (:mod:`leaml.engine.warmup`); the language model gets no gradient.
    SGD with momentum: with AdamW the many questions' mixed gradients kept small details
    (text, instruments) unlearned on the demo, with SGD they were learned (bench/RESULTS.md).
    Returns the losses."""
    everything = [e for s in streams for e in s.examples]
    targets = AnswerTargets([e.instruction for e in everything],
                            [e.target for e in everything], batches.image_index)
    if not targets.questions:
        return []  # only open questions: nothing to warm up on
    size = min(config.batch_size, len(targets))
    steps = config.vision_warmup_steps or max(
        1, math.ceil(config.vision_warmup_epochs * len(targets) / size))
    report = (lambda i, n, loss: progress(f"{stage}: vision warmup", i, n, loss)) if progress \
        else None
    _, losses = fit_heads(model, targets, batches.images.batch, steps=steps, batch_size=size,
                          lr=config.vision_warmup_lr, flips=config.vision_warmup_flips,
                          transpose=config.vision_warmup_transpose,
                          shift=config.vision_warmup_shift, where=config.vision_warmup_where,
                          seed=config.seed, max_grad_norm=config.max_grad_norm, progress=report)
    return losses


def _loop(acc, model, optimizer, scheduler, batches, schedule, masks, config, step, total,
          ckpt, progress, should_stop, stage) -> TrainResult:
    micro = config.batch_size // config.grad_accum
    seen = [schedule[:step].count(s) for s in range(len(batches.orders))]
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    losses, stopped, samples, t0 = [], False, 0, time.perf_counter()
    model.train()
    while step < total:
        if should_stop and should_stop():
            stopped = True
            break
        sid = schedule[step]
        loss = _step(acc, model, batches, sid, seen[sid], micro, config, step, dtype)
        _apply_masks(masks[sid], optimizer, scheduler, acc, model, config)
        seen[sid] += 1
        step += 1
        samples += config.batch_size
        losses.append(loss)
        if progress:
            progress(stage, step, total, loss)
        if ckpt and config.checkpoint_every and step % config.checkpoint_every == 0 and step < total:
            _save_checkpoint(acc, ckpt, model, optimizer, scheduler, config, step, stage,
                             batches.losses)
    if stopped and ckpt:
        _save_checkpoint(acc, ckpt, model, optimizer, scheduler, config, step, stage,
                         batches.losses)
    seconds = time.perf_counter() - t0
    return TrainResult(acc.unwrap_model(model), step, total, stopped, losses, seconds,
                       samples / seconds if seconds else 0.0, batches.images.cached)


def _step(acc, model, batches, sid, seen, micro, config, step, dtype) -> float:
    """Forward + backward of the grad_accum micro-batches of one step; returns the mean loss."""
    total = 0.0
    for m in range(config.grad_accum):
        position = (seen * config.grad_accum + m) * micro
        parts = batches.micro_batch(sid, position, micro, acc.process_index,
                                    acc.num_processes, config, step * config.grad_accum + m)
        for p, (batch, share) in enumerate(parts):
            batch = {k: v.to(acc.device) for k, v in batch.items()}
            batch["pixel_values"] = batch["pixel_values"].to(dtype)
            last = m == config.grad_accum - 1 and p == len(parts) - 1
            with acc.no_sync(model) if not last else _nullcontext():
                with acc.autocast():
                    if batches.losses is None:
                        loss = model(**batch).loss
                    else:  # the same loss, and each question's running loss
                        labels, example = batch.pop("labels"), batch.pop("example")
                        loss = batches.losses.loss(model(**batch).logits, labels, example)
                acc.backward(loss * share / config.grad_accum)
            total += float(loss.detach()) * share
    return total / config.grad_accum


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _apply_masks(mask, optimizer, scheduler, acc, model, config) -> None:
    """Clip, step and zero; rows frozen by this stream's masks keep their exact values."""
    frozen = []
    for p, rows in (mask or {}).items():
        if p.grad is not None:
            p.grad[~rows] = 0
        frozen.append((p, ~rows, p.data[~rows].clone()))
    if config.max_grad_norm:
        acc.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                            config.max_grad_norm)
    optimizer.step()
    for p, rows, saved in frozen:  # undo momentum and weight decay on frozen rows
        p.data[rows] = saved
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def _as_streams(data) -> list[Stream]:
    data = list(data)
    if not data:
        raise ValueError("train(): no examples to train on; label some QA pairs first")
    streams = data if isinstance(data[0], Stream) else [Stream(examples=data)]
    for s in streams:
        if not s.examples:
            raise ValueError(f"train(): stream '{s.name}' has no examples")
        if s.weight <= 0:
            raise ValueError(f"train(): stream '{s.name}' needs weight > 0, got {s.weight}")
    return streams


def _resolve_masks(model, streams) -> list[dict]:
    """Stream masks keyed by parameter object (names do not survive DDP wrapping)."""
    params = dict(model.named_parameters())
    out = []
    for s in streams:
        resolved = {}
        for name, rows in (s.grad_masks or {}).items():
            if name not in params:
                raise ValueError(f"stream '{s.name}': grad mask names unknown parameter '{name}'")
            p = params[name]
            rows = torch.as_tensor(rows, dtype=torch.bool, device=p.device)
            if rows.shape != p.shape[:1]:
                raise ValueError(f"stream '{s.name}': mask for '{name}' has shape "
                                 f"{tuple(rows.shape)}, expected ({p.shape[0]},)")
            resolved[p] = rows
        out.append(resolved)
    return out


def _optimizer(model, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (biases, norms and embeddings' 1-D params: none);
    the vision tower's parameters at ``lr * vision_lr_scale``."""
    vision = _vision_params(model)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("no trainable parameters: check TrainConfig.mode / lora_targets")
    groups = []
    for in_vision, scale in ((False, 1.0), (True, config.vision_lr_scale)):
        params = [p for n, p in named if (n in vision) == in_vision]
        groups += [{"params": [p for p in params if p.dim() >= 2],
                    "weight_decay": config.weight_decay, "lr": config.lr * scale},
                   {"params": [p for p in params if p.dim() < 2],
                    "weight_decay": 0.0, "lr": config.lr * scale}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr)


# --- checkpoints ---------------------------------------------------------------------------

_RESUME_KEYS = ("mode", "lr", "batch_size", "grad_accum", "seed", "lora_r", "epochs",
                "max_steps", "min_steps", "oversample_open", "augment", "hard_fraction")


def _save_checkpoint(acc, ckpt: Path, model, optimizer, scheduler, config, step, stage,
                     losses: QuestionLosses | None = None) -> None:
    """Write the checkpoint atomically with its checksum, keeping the previous one
    (:func:`leaml.engine.checkpoints.save`; ``ckpt`` is ``<work_dir>/checkpoint``)."""
    acc.wait_for_everyone()
    if not acc.is_main_process:
        return
    inner = acc.unwrap_model(model)
    state = {
        "step": step, "stage": stage, "config": config.to_dict(),
        # full mode: every weight (a tower frozen after its warmup was trained too); LoRA: adapters
        "weights": {n: p.detach().cpu() for n, p in inner.named_parameters()
                    if p.requires_grad or config.mode == "full"},
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "question_losses": losses.state_dict() if losses else None,
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
    }
    checkpoints.save(ckpt.parent, state, {"stage": stage, "step": step,
                                          "config": config.to_dict()})


def _load_checkpoint(ckpt: Path, model, optimizer, scheduler, config, stage,
                     losses: QuestionLosses | None = None) -> int | None:
    """Load the newest intact checkpoint into the model, optimizer and scheduler; returns its
    step, or None when none is usable (the stage starts over; the reason is logged)."""
    state, folder = checkpoints.load(ckpt.parent)
    if state is None:
        return None
    saved = state["config"]
    diff = [k for k in _RESUME_KEYS if saved.get(k) != getattr(config, k)]
    if diff or state["stage"] != stage:
        raise ValueError(f"checkpoint {folder} was written by another config ({', '.join(diff) or 'stage'}"
                         f" differ); delete the folder or train with resume=False")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state["weights"].items():
            params[name].copy_(value.to(params[name].device))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if losses is not None and state.get("question_losses"):
        losses.load_state_dict(state["question_losses"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    if state["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return int(state["step"])


def has_checkpoint(work_dir: str | Path) -> bool:
    """True when ``work_dir`` holds a resumable checkpoint."""
    return checkpoints.exists(work_dir)
