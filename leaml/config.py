"""Every config of leaml, torch-free: training, the QA generator, pseudo QA and LEAML's target
options as dataclasses, the method names, and the one place where overrides are parsed and
folded.

Each field declares its default, a help text and, where it is a choice, its allowed values
(:func:`option`), so ``describe_config``, the CLI's ``--set`` and the app's forms read them
from the declaration. The engine (leaml/engine/) re-exports these classes where they were.
"""
from __future__ import annotations

import copy
import json
import logging
import math
from dataclasses import asdict, dataclass, field, fields, is_dataclass

log = logging.getLogger(__name__)

# The base model of a new project and of models.load(): an embedded base (leaml/tiny/build.py)
DEFAULT_BASE = "tiny16"
# TrainConfig.max_target_tokens' default; an imported caption may run to 10,000 characters
# (~3,500 tokens)
MAX_TARGET_TOKENS = 512

# The methods (leaml/methods/pipeline.py runs them) and, per method or LEAML job kind, the
# training stages that a form's training knobs (lr, epochs ...) go to. LEAML's G counts its own
# steps, so a whole leaml run's training knobs go to the target.
METHODS = ("leaml", "seed-lora", "seed-full", "caption-then-seed", "caption-qa", "zero-shot")
TRAIN_STAGES = {"seed-lora": ("train",), "seed-full": ("train",),
                "caption-then-seed": ("align", "train"), "caption-qa": ("train",),
                "leaml": ("finetune",), "generator": ("generator",), "finetune": ("finetune",),
                "pseudo": (), "zero-shot": ()}
# LEAML's option groups per method or job kind (MethodConfig.options)
OPTION_GROUPS = {"leaml": ("generator", "pseudo", "finetune"), "generator": ("generator",),
                 "pseudo": ("pseudo",), "finetune": ("finetune",)}

# Options removed because they measured no gain (bench/RESULTS.md keeps the records), with
# the value each had by default: a stored run or job naming one still loads (the key is
# dropped with a warning); asking for another value is refused.
REMOVED = {"train_vision": True, "augment": "none", "vision_warmup_transpose": False,
           "caption_swaps": 0}


def option(default, help: str, choices: tuple | None = None, **kw):
    """A dataclass field with ``help`` (and the allowed ``choices``) in its metadata; mutable
    defaults (lists, dicts, nested config dataclasses) are copied per instance."""
    meta = {"help": help, **({"choices": tuple(choices)} if choices else {})}
    if isinstance(default, (list, dict)) or is_dataclass(default):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


def _check(obj, checks) -> None:
    """Raise ValueError for the first failed check, or a field outside its choices."""
    for f in fields(obj):
        allowed = f.metadata.get("choices")
        if allowed and getattr(obj, f.name) not in allowed:
            raise ValueError(f"{type(obj).__name__}: {f.name} must be one of "
                             f"{', '.join(map(repr, allowed))}, not {getattr(obj, f.name)!r}")
    for ok, message in checks:
        if not ok:
            raise ValueError(f"{type(obj).__name__}: {message}")


def drop_removed(values: dict, where: str = "") -> dict:
    """``values`` without the removed options, each dropped with a warning (stored params of
    earlier runs and jobs still load)."""
    for key in [k for k in values if k in REMOVED]:
        log.warning("ignoring %s%s=%r: a removed option (it measured no gain)",
                    where, key, values[key])
    return {k: v for k, v in values.items() if k not in REMOVED}


def known(cls, data: dict, where: str = "", strict: bool = False) -> dict:
    """The items of ``data`` that are fields of ``cls``. A removed option (``REMOVED``) is
    dropped with a warning, so stored params still load; with ``strict`` asking for another
    value than its old default is refused, and so is any unknown name."""
    names = {f.name for f in fields(cls)}
    for key in [k for k in data if k not in names]:
        if key in REMOVED and strict and data[key] != REMOVED[key]:
            raise ValueError(f"{where}{key} was removed: it measured no gain (bench/RESULTS.md)")
        if key not in REMOVED and strict:
            raise ValueError(f"{where}{key}: no such field of {cls.__name__}")
    return {k: v for k, v in drop_removed(data, where).items() if k in names}


class _Config:
    """to_dict / from_dict for the config dataclasses (from_dict drops removed options)."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict):
        return cls(**known(cls, data, f"{cls.__name__}."))


@dataclass
class TrainConfig(_Config):
    """Hyperparameters of one training run; stored as JSON with the run and its checkpoints."""
    mode: str = option("lora", "'lora' (peft adapters on the language model) or 'full'",
                       ("lora", "full"))
    lr: float = option(1e-3, "peak learning rate of AdamW")
    weight_decay: float = option(0.0, "AdamW weight decay (matrices only; never on frozen rows)")
    warmup_ratio: float = option(0.05, "fraction of the steps spent in linear warmup")
    min_lr_ratio: float = option(0.0, "cosine decays to lr * min_lr_ratio")
    batch_size: int = option(32, "examples per optimizer step, over all processes and accumulation")
    grad_accum: int = option(1, "micro-batches per optimizer step (batch_size must divide evenly)")
    epochs: float = option(3.0, "passes over the data (all streams together), if max_steps is 0")
    max_steps: int = option(0, "optimizer steps, overriding epochs and min_steps; 0 = from epochs")
    min_steps: int = option(0, "with epochs: at least this many steps (tiny label fractions still train)")
    max_grad_norm: float = option(1.0, "gradient clipping; 0 = off")
    seed: int = option(0, "seeds weights of new adapters, batch order, dropout")
    lora_r: int = option(16, "LoRA rank")
    lora_alpha: float = option(32.0, "LoRA scaling numerator (scale = alpha / r)")
    lora_dropout: float = option(0.0, "dropout on the LoRA input")
    lora_targets: list = option([], "module name suffixes to adapt; [] = arch_spec's language-model targets")
    vision_lr_scale: float = option(1.0, "full mode: the vision tower's lr = lr x this (0 = frozen "
                                    "after the vision warmup: no backward through it)")
    image_cache_mb: float = option(2048.0, "preprocess all images once when they fit; else open per batch")
    oversample_open: float = option(1.0, "per-epoch repeat factor of examples marked open")
    checkpoint_every: int = option(0, "save a resumable checkpoint every N steps (0 = only on stop)")
    mixed_precision: str = option("no", "accelerate mixed precision", ("no", "bf16", "fp16"))
    gradient_checkpointing: bool = option(False, "trade compute for memory on large models")
    pack: bool = option(True, "train all questions of an image in one sequence (same loss, "
                        "vision and prefix once); where the architecture allows")
    vision_warmup_steps: int = option(0, "full mode: steps of direct answer-word heads on the image "
                                      "features (tower + projector) before the main loop; 0 = off")
    vision_warmup_epochs: float = option(0.0, "full mode: the vision warmup's length in passes "
                                         "over the images, if vision_warmup_steps is 0")
    vision_warmup_lr: float = option(0.5, "SGD (momentum 0.9) lr of the vision warmup")
    vision_warmup_flips: bool = option(True, "vision warmup: mirror images at random, place answers "
                                       "('upper-left') with them")
    vision_warmup_where: bool = option(False, "vision warmup: the heads learn a bias per image "
                                       "token and answer word (place words find their tokens)")
    vision_warmup_shift: int = option(0, "vision warmup: move each image by up to this many pixels "
                                      "along each axis at random (edges repeated); answers kept")
    hard_fraction: float = option(0.0, "fraction of every batch drawn by question, each with "
                                  "probability ~ its running loss ** question_power (questions "
                                  "not learned yet get more samples); 0 = off")
    question_power: float = option(1.0, "hard_fraction: a question's weight = its running loss ** this")
    max_target_tokens: int = option(MAX_TARGET_TOKENS, "targets longer than this many tokens are "
                                    "cut (an imported caption may run to 10,000 characters); "
                                    "prompts are never cut")

    def __post_init__(self):
        _check(self, [
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
            (self.oversample_open >= 1, "oversample_open must be >= 1"),
            (self.vision_warmup_steps >= 0 and self.vision_warmup_epochs >= 0
             and self.vision_warmup_lr > 0 and self.vision_warmup_shift >= 0,
             "vision_warmup_steps/epochs/shift must be >= 0 and vision_warmup_lr > 0"),
            (0 <= self.hard_fraction < 1, "hard_fraction must be in [0, 1)"),
            (self.vision_warmup_steps == self.vision_warmup_epochs == 0 or self.mode == "full",
             "vision_warmup_steps/epochs need mode 'full' (LoRA keeps the vision tower frozen)"),
        ])


def describe_config(cls=TrainConfig) -> list[tuple[str, object, str]]:
    """(name, default, help) of every field of a config dataclass, for --help and the UI."""
    out = []
    for f in fields(cls):
        default = f.default_factory() if callable(f.default_factory) else f.default
        out.append((f.name, default, f.metadata.get("help", "")))
    return out


_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def form_fields(cls, names) -> list[tuple[str, type, str]]:
    """(name, type, help) of the named fields of ``cls`` (in that order), for the app's forms;
    the type is the value's (``float | None`` -> float)."""
    by_name = {f.name: f for f in fields(cls)}
    return [(n, _TYPES[str(by_name[n].type).split(" |")[0]], by_name[n].metadata["help"])
            for n in names]


def choices_of(cls, names) -> dict[str, tuple]:
    """The allowed values of the named fields of ``cls`` that have a fixed set (a form shows
    them as a pick list)."""
    return {f.name: f.metadata["choices"] for f in fields(cls)
            if f.name in names and "choices" in f.metadata}


def generator_train() -> TrainConfig:
    """G's optimiser settings (full finetuning; the step count comes from GeneratorConfig)."""
    return TrainConfig(mode="full", lr=1e-3, batch_size=32, warmup_ratio=0.05,
                       weight_decay=0.0)


# TrainConfig fields the generator sets itself from its QA-step knobs (generator.train_generator)
GENERATOR_OWN_STEPS = ("max_steps", "min_steps", "epochs")


@dataclass
class GeneratorConfig(_Config):
    """Every knob of LEAML's QA-generator stage, with its default."""
    train: TrainConfig = option(generator_train(), "optimiser settings of G (mode must be 'full')")
    rho: float = option(0.1, "fraction of neurons per layer that caption steps may update (1.0 = all, no masks)")
    captions: bool = option(True, "interleave caption distillation (False = the no-captions ablation)")
    caption_ratio: float = option(1.0, "caption steps per seed-QA step")
    qa_epochs: float = option(12.0, "passes over the seed QA stream")
    min_qa_steps: int = option(60, "at least this many seed-QA steps (tiny seed sets still train)")
    max_qa_steps: int = option(400, "at most this many seed-QA steps (0 = no cap)")
    importance_batch_size: int = option(16, "examples per backward pass when scoring neurons")
    max_captions: int = option(0, "use at most this many captioned images (0 = all), seeded choice")
    answer_stream: bool = option(True, "also train the seed QA as question -> answer, the form in "
                                       "which known-question pseudo QA answers")
    answer_ratio: float = option(4.0, "answer-stream steps per seed-QA step")
    caption_context: bool = option(True, "start G's QA prompts with the image's teacher caption, in "
                                         "training and pseudo QA (needs captions)")

    def __post_init__(self):
        if isinstance(self.train, dict):
            self.train = TrainConfig.from_dict(self.train)
        _check(self, [
            (self.train.mode == "full", "train.mode must be 'full' (G is fully finetuned)"),
            (0 < self.rho <= 1, "rho must be in (0, 1]"),
            (self.caption_ratio > 0, "caption_ratio must be > 0"),
            (self.answer_ratio > 0, "answer_ratio must be > 0"),
            (self.qa_epochs > 0, "qa_epochs must be > 0"),
            (self.min_qa_steps >= 1 and self.max_qa_steps >= 0, "min_qa_steps >= 1, max_qa_steps >= 0"),
            (self.importance_batch_size >= 1, "importance_batch_size must be >= 1"),
            (self.max_captions >= 0, "max_captions must be >= 0")])

    def qa_steps(self, n_seed: int) -> int:
        steps = max(self.min_qa_steps, math.ceil(self.qa_epochs * n_seed / self.train.batch_size))
        return min(steps, self.max_qa_steps) if self.max_qa_steps else steps

    @property
    def context(self) -> bool:
        """Whether G's QA prompts carry the caption (caption_context, unless no captions)."""
        return self.captions and self.caption_context


@dataclass
class PseudoConfig(_Config):
    """How pseudo QA is sampled from the generator and which pairs may train the target."""
    k: int = option(12, "per unlabeled image: known questions asked ('known' mode), or QA "
                    "candidates sampled ('sample' mode)")
    temperature: float = option(0.7, "sampling temperature")
    top_p: float = option(0.95, "nucleus sampling mass")
    max_new_tokens: int = option(48, "generation budget; a candidate that hits it is dropped as cut off")
    batch_size: int = option(32, "images per generate() call (each yields k sequences)")
    seed: int = option(0, "sampling seed (each chunk of images reseeds from it, so resumes match)")
    chunk: int = option(128, "images per stored chunk (the unit of progress, cancel and resume)")
    max_images: int = option(0, "sample at most this many unlabeled images (0 = all), seeded choice")
    question_mode: str = option("known", "'known': G answers k known questions per image (drawn "
                                "by seed frequency; fixed-template sets); 'sample': G writes both",
                                ("known", "sample"))
    answer_mode: str = option("choose", "'known' questions: 'generate' (G's greedy answer) or "
                              "'choose' (the answer, among those the seed QA gives to that "
                              "question, that G finds most likely: no misspelt or unseen answers)",
                              ("choose", "generate"))
    max_choices: int = option(64, "answer_mode 'choose': at most this many answers per question "
                              "(the most frequent in the seed QA)")
    known_questions: bool = option(True, "keep only questions the project already asks (seed/test/"
                                   "accepted; fixed-template sets such as Kvasir-VQA), in their "
                                   "known wording")
    caption_choices: bool = option(True, "answer_mode 'choose', generator reading captions: choose "
                                   "only among the answers the image's caption names, where it "
                                   "names any")
    caption_questions: bool = option(True, "'known' questions, generator reading captions: ask a "
                                     "question that the seed QA asks of only some images (where is "
                                     "the abnormality?) only of images whose caption names one of "
                                     "its answers")
    engine: str = option("hf", "what samples: 'hf' (transformers, the default) or 'vllm' (vLLM, "
                         "optional, installed apart; one process only; docs/GPU.md)", ("hf", "vllm"))

    def __post_init__(self):
        _check(self, [(self.k >= 1, "k must be >= 1"), (self.temperature > 0, "temperature must be > 0"),
                      (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
                      (self.max_new_tokens >= 4, "max_new_tokens must be >= 4"),
                      (self.batch_size >= 1 and self.chunk >= 1, "batch_size and chunk must be >= 1"),
                      (self.max_images >= 0, "max_images must be >= 0"),
                      (self.answer_mode == "generate" or self.question_mode == "known",
                       "answer_mode 'choose' needs question_mode 'known' (set answer_mode 'generate')"),
                      (self.max_choices >= 1, "max_choices must be >= 1")])


@dataclass
class FinetuneOptions(_Config):
    """Which QA pairs train LEAML's target (the finetune stage; its TrainConfig is apart)."""
    keep_top: float | None = option(0.6, "train on this share of the generator's pending pairs, "
                                    "the most confident (per question with cut_per_question)")
    min_confidence: float | None = option(None, "instead of keep_top: the pending pairs at or "
                                          "above this confidence")
    seed_weight: float = option(2.0, "how often a seed pair is drawn relative to a pseudo pair")
    use_seed: bool = option(True, "train on the seed QA")
    use_reviewed: bool = option(True, "train on accepted and edited pseudo pairs (any generator)")
    use_pending: bool = option(True, "train on this generator's pending pairs at or above the cut")
    cut_per_question: bool = option(True, "compute the confidence cut over each question's pairs "
                                    "(one global cut can drop a question entirely)")

    def __post_init__(self):
        _check(self, [(self.keep_top is None or 0 < self.keep_top <= 1, "keep_top must be in (0, 1]"),
                      (self.seed_weight > 0, "seed_weight must be > 0")])


def leaml_options() -> dict:
    """LEAML's own knobs (MethodConfig.options), as plain values stored with the run: one group
    per config above (G's TrainConfig is the ``generator`` stage config, the pseudo seed the
    run's), the generator run to reuse and whether to reuse its stored pairs."""
    gen = GeneratorConfig().to_dict()
    gen.pop("train")
    return {"generator": gen,
            "pseudo": {k: v for k, v in PseudoConfig().to_dict().items() if k != "seed"},
            "finetune": FinetuneOptions().to_dict(),
            "generator_run": None,   # reuse this stored generator run (skip training G)
            "reuse_pseudo": False}   # use the pairs already stored for it (skip sampling)


GROUP_CLASSES = {"generator": GeneratorConfig, "pseudo": PseudoConfig, "finetune": FinetuneOptions}


# --- overrides: parsed and folded here ---------------------------------------------------------

def parse_set(pairs) -> dict:
    """``["train.lr=1e-3", "eval_batch_size=32"]`` (the CLI's ``--set``) ->
    ``{"train": {"lr": 0.001}, "eval_batch_size": 32}``; values are JSON where they parse as
    JSON, else text."""
    out: dict = {}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {pair!r}: write STAGE.FIELD=VALUE, e.g. train.lr=1e-3")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        stage, dot, name = key.partition(".")
        if dot:
            out.setdefault(stage, {})[name] = value
        else:
            out[key] = value
    return out


def _merge(into: dict, extra: dict) -> dict:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            into[key] = {**into[key], **value}
        else:
            into[key] = copy.deepcopy(value)
    return into


def fold_overrides(method: str, overrides: dict | None = None, *, sets=None,
                   options: dict | None = None, data_mix: dict | None = None) -> dict:
    """Every form of override as the one nested dict ``pipeline.method_config`` takes
    (``{"train": {"lr": 1e-3}, "pseudo": {"k": 4}, "eval_batch_size": 32}``).

    ``method`` is a method or a LEAML job kind (generator, pseudo, finetune). In order:
    ``overrides`` (nested already), ``sets`` (the CLI's ``--set`` strings), flat ``options``
    (a form's knobs: a TrainConfig field goes to the kind's training stages, ``TRAIN_STAGES``,
    a LEAML knob to its group) and ``data_mix`` (``{"seed", "reviewed", "pending_min_conf"}``,
    which pairs train LEAML's target). A removed option in ``sets`` or ``options`` is refused
    unless at its old default (stored ``overrides`` may still name one: method_config drops it).
    """
    asked = parse_set(sets)
    for group, values in asked.items():
        if isinstance(values, dict):  # a removed name asked for a value: say so now
            known(GROUP_CLASSES.get(group, TrainConfig),
                  {k: v for k, v in values.items() if k in REMOVED}, f"{group}.", strict=True)
    out = _merge(copy.deepcopy(overrides or {}), asked)
    groups = OPTION_GROUPS.get(method, ())
    train_names = {f.name for f in fields(TrainConfig)}
    for key, value in (options or {}).items():
        known(TrainConfig, {key: value} if key in REMOVED else {}, strict=True)
        if key in train_names and TRAIN_STAGES.get(method):
            for stage in TRAIN_STAGES[method]:
                out.setdefault(stage, {})[key] = value
            continue
        group = next((g for g in groups if key in {f.name for f in fields(GROUP_CLASSES[g])}
                      and key != "train"), None)
        if group is None:
            knobs = sorted({*(train_names if TRAIN_STAGES.get(method) else ()),
                            *(f.name for g in groups for f in fields(GROUP_CLASSES[g]))})
            raise ValueError(f"option '{key}' is not a knob of {method}; use one of "
                             f"{', '.join(knobs) or 'none'}")
        out.setdefault(group, {})[key] = value
    if data_mix is not None:
        ft = out.setdefault("finetune", {})
        ft.update(use_seed=bool(data_mix.get("seed", True)),
                  use_reviewed=bool(data_mix.get("reviewed", True)))
        if data_mix.get("pending_min_conf") is None:
            ft["use_pending"] = False
        else:
            ft.update(use_pending=True, min_confidence=float(data_mix["pending_min_conf"]))
    return out
