"""The one supervised training routine: VQA, QA generation and captioning alike.

Every task is (image, instruction) -> target with the loss on the target tokens only
(``models.encode_text`` builds the labels). ``train()`` takes one or more example
*streams*; each optimizer step draws all its micro-batches from one stream, chosen by a
deterministic weighted round robin, and a stream may carry gradient masks over parameter rows
(LEAML's selective neuron distillation: caption batches update only the chosen neurons).

Runs under ``accelerate``: a plain CPU process, or ``accelerate launch`` for GPUs / DDP, where
each process takes its slice of every micro-batch. Checkpoints carry the config, the step, the
trainable weights, optimizer, scheduler and RNG state; the batch order and the hard draws
are pure functions of (seed, step), so a resumed run ends with the same weights as an
uninterrupted one.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from leaml.engine import checkpoints
from leaml.engine import models
from leaml.engine import spread
from leaml.config import TrainConfig, describe_config  # noqa: F401  (re-exported)
from leaml.engine.batches import EpochOrder, Example, ImageSource, PackedText, TextCache, image_groups
from leaml.engine.question_losses import QuestionLosses
from leaml.engine.warmup import AnswerTargets
from leaml.engine.warmup import fit as fit_heads

Progress = Callable[[str, int, int, float], None]  # (stage, step, total, loss)
CHECKPOINT = "checkpoint"


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
    everything else frozen. Full: every parameter trains (``vision_lr_scale`` sets the vision
    tower's lr; 0 freezes it after the vision warmup, see :func:`train`).
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
    for p in model.parameters():
        p.requires_grad_(True)
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


def load_trained(model_dir: str | Path, base_ref: str, device: str | None = None,
                 merge: bool = True, inference: bool = False):
    """Load what :func:`save_trained` wrote: adapters on top of ``base_ref``, or a full model;
    on ``device`` (default: ``models.resolve_device``'s rule), float32 or, with
    ``inference``, ``models.inference_dtype``."""
    path = Path(model_dir)
    if (path / "adapter_config.json").exists():
        from peft import PeftModel
        base, processor = models.load(base_ref, device=device, inference=inference)
        model = PeftModel.from_pretrained(base, path)
        return (model.merge_and_unload() if merge else model), processor
    return models.load(str(path), device=device, inference=inference)


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
        self.text = TextCache(processor, everything, max_target_tokens=config.max_target_tokens)
        self.image_index = [self.images.index(e.image) for e in everything]
        image_token = getattr(processor, "image_token_id", None)
        self.packed = PackedText(self.text, image_token) if pack and image_token is not None \
            else None
        self.units, self.orders, self.per_unit, start = [], [], [], 0
        for sid, s in enumerate(streams):
            idx = list(range(start, start + len(s.examples)))
            if self.packed:
                units = self.packed.rows(image_groups([self.image_index[i] for i in idx]))
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
                    config: TrainConfig, key: int) -> list[tuple[dict[str, torch.Tensor], float]]:
        """The (batch, share) parts of one micro-batch: the stream's next ``size`` examples or,
        with ``hard_fraction``, fewer of them and the hard examples as a second part (its own
        rows, so short single questions are not padded to the length of packed rows); a
        part's loss counts by its share of the examples."""
        hard = round(size * config.hard_fraction)
        if hard:  # the stream's order advances by the rest of the batch only
            keep = 1.0 - config.hard_fraction
            position, size = round(position * keep), round((position + size) * keep) - round(position * keep)
        if self.packed is None:
            every = self.orders[stream].take(position, size)
        else:
            per = self.per_unit[stream]
            start, stop = round(position / per), round((position + size) / per)
            every = self.orders[stream].take(start, max(stop - start, world))
        units = [self.units[stream][i] for i in every]
        parts = [(self._batch(units[rank::world]),
                  size / (size + hard) * self._token_share(units, rank, world))]
        hardest = [[i] for i in self._hard_examples(stream, hard, config.seed, key)]
        if hardest[rank::world]:
            parts.append((self._batch(hardest[rank::world]),
                          hard / (size + hard) * self._token_share(hardest, rank, world)))
        return parts

    def _token_share(self, units: list[list[int]], rank: int, world: int) -> float:
        """Under N processes (each takes every N-th unit) the factor that makes this rank's
        mean token loss count by its share of the whole batch's supervised tokens: DDP's
        average of the N scaled losses is then the whole batch's mean, as in one process."""
        if world == 1:
            return 1.0
        count = lambda us: sum(int((self.text.labels[i] != -100).sum()) for u in us for i in u)  # noqa: E731
        return world * count(units[rank::world]) / max(1, count(units))

    def _batch(self, units: list[list[int]]) -> dict[str, torch.Tensor]:
        tag = self.losses is not None
        pixels = self.images.batch([self.image_index[u[0]] for u in units])
        if self.packed is None:
            batch = self.text.batch([u[0] for u in units], with_example=tag)
        else:
            batch = self.packed.batch(units, with_example=tag)
        batch.update(models.image_inputs(self.images.processor, pixels, batch["input_ids"]))
        return batch

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
    Under ``accelerate launch`` the main process hands the call to the others first
    (:mod:`leaml.engine.spread`), so a whole method trains data-parallel.
    """
    handed = spread.lead(model, processor, data, config, work_dir=work_dir, resume=resume,
                         stage=stage) if spread.leading() else None
    with spread.handed(handed):
        return _train(model, processor, data, config, work_dir=work_dir, resume=resume,
                      progress=progress, should_stop=should_stop, stage=stage)


def _train(model, processor, data, config: TrainConfig, *, work_dir, resume: bool,
           progress: Progress | None, should_stop: Callable[[], bool] | None,
           stage: str) -> TrainResult:
    """:func:`train` in this process (one of N under accelerate launch)."""
    from accelerate import Accelerator, DistributedDataParallelKwargs
    streams = _as_streams(data)
    # Full finetuning has parameters no loss reaches (e.g. the vision tower's last layer when
    # features come from an earlier one); under DDP (accelerate launch, >1 process) the
    # gradient reduction fails unless told. No effect in a single process.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=config.mode == "full")
    where = models.training_device()  # --device cuda:1 in a plain process: the current GPU
    acc = Accelerator(mixed_precision=config.mixed_precision, kwargs_handlers=[ddp],
                      cpu=where.type == "cpu")  # --device cpu on a GPU machine
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
        loaded = checkpoints.load_training(ckpt, acc.unwrap_model(model), optimizer, scheduler,
                                           config, stage, batches.losses)
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
    _, losses = fit_heads(model, targets, batches.images.grids, steps=steps, batch_size=size,
                          lr=config.vision_warmup_lr, flips=config.vision_warmup_flips,
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
        if spread.stop_together(bool(should_stop and should_stop()), acc.device):
            stopped = True
            break
        sid = schedule[step]
        loss = spread.batch_loss(_step(acc, model, batches, sid, seen[sid], micro, config,
                                       step, dtype), acc.device)  # the whole batch's, N > 1
        _apply_masks(masks[sid], optimizer, scheduler, acc, model, config)
        seen[sid] += 1
        step += 1
        samples += config.batch_size
        losses.append(loss)
        if progress:
            progress(stage, step, total, loss)
        if ckpt and config.checkpoint_every and step % config.checkpoint_every == 0 and step < total:
            checkpoints.save_training(acc, ckpt, model, optimizer, scheduler, config, step,
                                      stage, batches.losses)
    if stopped and ckpt:
        checkpoints.save_training(acc, ckpt, model, optimizer, scheduler, config, step, stage,
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
        if batches.losses is not None:
            batches.losses.flush(acc.num_processes)
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


def has_checkpoint(work_dir: str | Path) -> bool:
    """True when ``work_dir`` holds a resumable checkpoint."""
    return checkpoints.exists(work_dir)
