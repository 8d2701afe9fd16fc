"""Fast sampling with vLLM (optional): LEAML's pseudo QA modes and local-teacher captions as
vLLM offline requests (``vllm.LLM.generate``), their outputs turned back into the pure parts of
:mod:`leaml.engine.pseudo`, so both engines store the same kind of pairs with the same
answer-token confidence.

- 'sample' mode and 'known' + 'generate': each reply becomes a :class:`models.Generation`
  (token ids without the end of turn, the model's log-probability of each, read from vLLM's
  ``logprobs``) and goes through the same parsing and filters as the transformers engine;
- 'known' + 'choose' (teacher forcing of every answer choice): the prompt, the reply's start
  and the choice with its end of turn go in as the *prompt* of a one-token request with
  ``prompt_logprobs``; the choice's log-probabilities are the last entries of the prompt's, so
  vLLM's expansion of the image placeholder earlier in the prompt changes nothing.

Prompts are the token ids of the same chat-template text as the transformers engine
(:func:`models.prompt_text`, tokenized without special tokens: the template holds them), with
one image placeholder that vLLM expands itself; each request carries its image as a PIL image.
vLLM is not a dependency of LEAML Studio: :func:`require` says what to install when it is
missing, and refuses several processes (``accelerate launch``): vLLM places and parallelises
the model itself.
"""
from __future__ import annotations

import gc
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from leaml.engine import models, pseudo, spread
from leaml.engine.models import Generation
from leaml.engine.pseudo import Candidate, ParseStats, PseudoConfig

ENGINES = ("hf", "vllm")
MISSING = ("engine 'vllm' needs the vllm package, which is not installed. It is optional: "
           "install a vLLM build that matches this environment's torch into it (pip install "
           "vllm; docs/GPU.md), or use the default engine 'hf' (--engine hf), which needs "
           "nothing more")
SEVERAL = ("engine 'vllm' runs in one process: vLLM places the model on the GPUs itself (its "
           "tensor parallelism); start the command without accelerate launch, or use --engine hf")


class EngineUnavailable(ValueError):
    """The vLLM engine cannot run here: vLLM is not installed, or several processes run."""


def available() -> bool:
    """True when the ``vllm`` package can be imported (nothing is imported to find out)."""
    return importlib.util.find_spec("vllm") is not None


def require() -> None:
    """Raise :class:`EngineUnavailable` with what to do when the vLLM engine cannot run."""
    if not available():
        raise EngineUnavailable(MISSING)
    if spread.world_size() > 1:
        raise EngineUnavailable(SEVERAL)


def check(engine: str) -> None:
    """:func:`require` when ``engine`` is 'vllm'; a ValueError for an unknown engine."""
    if engine not in ENGINES:
        raise ValueError(f"engine {engine!r}: use one of {', '.join(ENGINES)}")
    if engine == "vllm":
        require()


def _vllm():
    import vllm  # optional, installed apart: imported only when this engine runs
    return vllm


@dataclass
class VllmModel:
    """A model loaded into vLLM, and the token ids that end its turn."""
    llm: object
    ref: str
    stops: list[int] = field(default_factory=list)


def local_folder(ref: str | Path) -> str:
    """The local folder of a model ref: an embedded base's, a folder, or a Hugging Face id's
    snapshot in the local cache (never downloaded, as with ``models.load``)."""
    path = models.resolve_ref(str(ref))
    if Path(path).is_dir():
        return str(path)
    from huggingface_hub import snapshot_download  # only for a Hugging Face id
    return snapshot_download(path, local_files_only=True)


def stop_ids(folder: str, tokenizer) -> list[int]:
    """The tokenizer's eos and the generation config's eos ids of a model folder."""
    from transformers import GenerationConfig  # transformers: only when a model loads
    ids = {tokenizer.eos_token_id}
    try:
        eos = GenerationConfig.from_pretrained(folder, local_files_only=True).eos_token_id
    except OSError:  # no generation_config.json
        eos = None
    ids |= set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    return sorted(i for i in ids if i is not None)


def load(ref: str | Path, *, seed: int = 0):
    """``(VllmModel, processor)`` for a full model folder or ref, in
    :func:`models.inference_dtype` (bfloat16 on a GPU that supports it). vLLM chooses the GPUs
    (``CUDA_VISIBLE_DEVICES``); LoRA adapter folders are refused (G is always a full model)."""
    require()
    from transformers import AutoProcessor  # transformers: only when a model loads
    folder = local_folder(ref)
    if (Path(folder) / "adapter_config.json").exists():
        raise ValueError(f"{ref}: holds LoRA adapters; engine 'vllm' needs a full model folder")
    processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
    dtype = str(models.inference_dtype()).removeprefix("torch.")
    llm = _vllm().LLM(model=folder, dtype=dtype, seed=seed, limit_mm_per_prompt={"image": 1})
    models.log.info("model %s in vLLM, %s", ref, dtype)  # the line every load says (docs/GPU.md)
    return VllmModel(llm, str(ref), stop_ids(folder, processor.tokenizer)), processor


def close(model) -> None:
    """Let a :class:`VllmModel`'s engine go, and with it the GPU memory vLLM reserved (most of
    the GPU), before a next stage trains there; anything else is left alone."""
    if isinstance(model, VllmModel) and model.llm is not None:
        model.llm = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# --- requests ----------------------------------------------------------------------------------

def _image(item) -> Image.Image:
    if isinstance(item, Image.Image):
        return item.convert("RGB")
    with Image.open(item) as im:
        return im.convert("RGB")


def _pictures(processor, images) -> list[Image.Image]:
    """The images as the ``hf`` engine sees them: each one's fixed square view where the
    registry says the family needs one (Qwen-VL), else as they are (:func:`models.views`)."""
    return models.views(processor, [_image(im) for im in images])


class _Prompts:
    """Prompt token ids per instruction (tokenized once), with one image placeholder."""

    def __init__(self, processor):
        self.processor, self.tok, self.ids = processor, processor.tokenizer, {}

    def __call__(self, instruction: str, reply_start: str = "") -> list[int]:
        if instruction not in self.ids:
            text = models.prompt_text(self.processor, instruction)
            self.ids[instruction] = self.tok(text, add_special_tokens=False)["input_ids"]
        return self.ids[instruction] + self.text_ids(reply_start)

    def text_ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"] if text else []


def _request(ids: list[int], image: Image.Image) -> dict:
    return {"prompt_token_ids": ids, "multi_modal_data": {"image": image}}


def _run(model: VllmModel, prompts: list[dict], params) -> list:
    return model.llm.generate(prompts, params, use_tqdm=False) if prompts else []


def _logprobs(out) -> list[float]:
    """The log-probability of each generated token (vLLM's ``logprobs``: per token, a dict of
    token id -> Logprob that always holds the generated token)."""
    return [step[t].logprob for step, t in zip(out.logprobs, out.token_ids)]


def _end(model: VllmModel, out) -> int | None:
    """Where the reply's end of turn is (None: cut off by max_tokens)."""
    ids = list(out.token_ids)
    return next((j for j, t in enumerate(ids) if t in model.stops),
                len(ids) if out.finish_reason == "stop" else None)


def _generation(model: VllmModel, tok, out) -> Generation:
    """A vLLM completion as the transformers engine's Generation (end of turn left out)."""
    ids, lps = list(out.token_ids), _logprobs(out)
    end = _end(model, out)
    ids, lps = (ids[:end], lps[:end]) if end is not None else (ids, lps)
    return Generation(tok.decode(ids, skip_special_tokens=True).strip(), ids, lps)


def generate(model: VllmModel, processor, images, instructions: Sequence[str], *,
             max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0,
             top_p: float = 1.0, num_return_sequences: int = 1,
             seed: int | None = None) -> list[list[Generation]]:
    """:func:`models.generate` through vLLM: per image (a path or PIL image) and instruction,
    ``num_return_sequences`` generations; request j is seeded ``seed + j``."""
    vllm, tok, prompt = _vllm(), processor.tokenizer, _Prompts(processor)
    if len(images) != len(instructions):
        raise ValueError(f"{len(images)} images but {len(instructions)} instructions")
    params = [vllm.SamplingParams(
        n=num_return_sequences, temperature=temperature if do_sample else 0.0,
        top_p=top_p if do_sample else 1.0, max_tokens=max_new_tokens, logprobs=0,
        seed=None if seed is None else seed + j, stop_token_ids=model.stops)
        for j in range(len(instructions))]
    outs = _run(model, [_request(prompt(i), im)
                        for im, i in zip(_pictures(processor, images), instructions)], params)
    return [[_generation(model, tok, o) for o in r.outputs] for r in outs]


# --- the pseudo modes (the signatures of leaml.engine.pseudo's, images instead of pixels) ------

def sample(model: VllmModel, processor, images, image_indices: Sequence[int], cfg: PseudoConfig,
           seed: int, stats: ParseStats, known: dict[str, str] | None = None,
           contexts: Sequence[str | None] | None = None) -> list[Candidate]:
    """:func:`pseudo.sample`: K sampled QA candidates per image, parsed and filtered alike."""
    contexts = contexts or [None] * len(image_indices)
    gens = generate(model, processor, images,
                    [pseudo.with_context(c, pseudo.QA_INSTRUCTION) for c in contexts],
                    max_new_tokens=cfg.max_new_tokens, do_sample=True,
                    temperature=cfg.temperature, top_p=cfg.top_p, num_return_sequences=cfg.k,
                    seed=seed)
    return pseudo.candidates_from_generations(processor.tokenizer, gens, image_indices,
                                              cfg.max_new_tokens, stats, known)


def answer_known(model: VllmModel, processor, images, image_indices: Sequence[int],
                 questions: Sequence[Sequence[str]], cfg: PseudoConfig, stats: ParseStats, *,
                 form: str = "generate",
                 contexts: Sequence[str | None] | None = None) -> list[Candidate]:
    """:func:`pseudo.answer_known`: G's greedy answer to each given question per image."""
    tok, prompt = processor.tokenizer, _Prompts(processor)
    contexts = contexts or [None] * len(image_indices)
    pics = _pictures(processor, images)
    flat = [(i, q) for i, qs in enumerate(questions) for q in qs]
    requests = [_request(prompt(*pseudo.known_prompt(q, form, contexts[i])), pics[i]) for i, q in flat]
    params = _vllm().SamplingParams(temperature=0.0, max_tokens=cfg.max_new_tokens, logprobs=0,
                                    stop_token_ids=model.stops)
    out = []
    for (i, q), r in zip(flat, _run(model, requests, params)):
        o = r.outputs[0]
        out += filter(None, [pseudo.known_answer(tok, image_indices[i], q, list(o.token_ids),
                                                 _logprobs(o), _end(model, o), stats)])
    return pseudo.dedup(out, stats)


def choose_known(model: VllmModel, processor, images, image_indices: Sequence[int],
                 questions: Sequence[Sequence[str]], choices: dict[str, Sequence[str]],
                 cfg: PseudoConfig, stats: ParseStats, *, form: str = "generate",
                 contexts: Sequence[str | None] | None = None,
                 reliability: dict[str, float] | None = None) -> list[Candidate]:
    """:func:`pseudo.choose_known`: each choice scored by teacher forcing, as vLLM's prompt
    log-probabilities of its tokens (end of turn included) at the end of the prompt."""
    tok, prompt = processor.tokenizer, _Prompts(processor)
    contexts = contexts or [None] * len(questions)
    pics = _pictures(processor, images)
    rows = pseudo.choice_rows(questions, choices, cfg, contexts)
    stats.sampled += sum(len(qs) for qs in questions)
    prefix = {q: pseudo.known_prompt(q, form)[1] for qs in questions for q in qs}
    targets = [prompt.text_ids(pseudo.known_target(prefix[q], a)) + [tok.eos_token_id]
               for _, q, a in rows]
    requests = [_request(prompt(pseudo.known_prompt(q, form, contexts[i])[0]) + t, pics[i])
                for (i, q, _), t in zip(rows, targets)]
    params = _vllm().SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    scores: dict[tuple[int, str], list[tuple[float, float, int, str]]] = {}
    for (i, q, a), target, r in zip(rows, targets, _run(model, requests, params)):
        tail = r.prompt_logprobs[-len(target):]  # the choice's tokens end the (expanded) prompt
        lps = [entry[t].logprob for entry, t in zip(tail, target)]
        ans = lps[pseudo.answer_start(tok, target, prefix[q], a):]
        scores.setdefault((i, q), []).append((sum(ans), pseudo.geometric_mean_prob(ans), len(ans), a))
    return pseudo.pick_choices(scores, choices, image_indices, reliability, stats)
