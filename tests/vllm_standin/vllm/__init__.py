"""A stand-in for vLLM's offline API, for LEAML Studio's tests only: it is NOT vLLM.

It imitates the part of ``vllm`` that ``leaml/engine/vllm_engine.py`` uses (``LLM(model=...,
dtype=..., seed=..., limit_mm_per_prompt=...)``, ``LLM.generate(prompts, sampling_params)``
with ``{"prompt_token_ids": [...], "multi_modal_data": {"image": PIL.Image}}`` prompts,
``SamplingParams``, ``RequestOutput``/``CompletionOutput``/``Logprob``), with transformers on
the given model folder, one request at a time, so that the tests on a CPU run the vLLM
engine's code end to end. Like vLLM it expands the image placeholder itself; here the model's
own processor does it (the processor's ids for the placeholder alone replace it), and the
returned ``prompt_token_ids`` and ``prompt_logprobs`` are those of the expanded prompt. It is
put on ``PYTHONPATH`` only by tests/test_vllm_engine.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

STANDIN = True  # what tells this apart from the real package


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int | None = 16
    seed: int | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    stop_token_ids: list[int] | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[dict[int, Logprob] | None] | None
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = True


class LLM:
    def __init__(self, model: str, dtype: str = "auto", seed: int = 0,
                 limit_mm_per_prompt: dict | None = None, **kwargs):
        self.processor = AutoProcessor.from_pretrained(model, local_files_only=True)
        torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
        self.model = AutoModelForImageTextToText.from_pretrained(
            model, dtype=torch_dtype, local_files_only=True).eval()
        self.tok = self.processor.tokenizer
        self.image_id = self.tok.convert_tokens_to_ids(self.processor.image_token)
        self.seed = seed

    def generate(self, prompts, sampling_params=None, use_tqdm: bool = True, **kwargs):
        prompts = [prompts] if isinstance(prompts, dict) else list(prompts)
        params = sampling_params or SamplingParams()
        params = params if isinstance(params, list) else [params] * len(prompts)
        return [self._one(str(j), p, sp) for j, (p, sp) in enumerate(zip(prompts, params))]

    def _expand(self, ids: list[int], image) -> tuple[list[int], dict]:
        """The placeholder replaced by the processor's ids for it, and the image tensors."""
        one = self.processor(text=[self.processor.image_token], images=[image],
                             add_special_tokens=False, return_tensors="pt")
        at = ids.index(self.image_id)
        extra = {k: v for k, v in one.items() if k not in ("input_ids", "attention_mask")}
        return ids[:at] + one["input_ids"][0].tolist() + ids[at + 1:], extra

    def _one(self, request_id: str, prompt: dict, sp: SamplingParams) -> RequestOutput:
        ids = list(prompt["prompt_token_ids"])
        ids, extra = self._expand(ids, prompt["multi_modal_data"]["image"])
        extra = {k: v.to(self.model.dtype) if v.is_floating_point() else v for k, v in extra.items()}
        input_ids = torch.tensor([ids])
        prompt_lps = None
        if sp.prompt_logprobs is not None:
            with torch.no_grad():
                logits = self.model(input_ids=input_ids, **extra).logits[0].float().log_softmax(-1)
            lps = logits[:-1].gather(-1, input_ids[0, 1:, None])[:, 0].tolist()
            prompt_lps = [None] + [{t: Logprob(lp)} for t, lp in zip(ids[1:], lps)]
            if sp.max_tokens == 1 and sp.n == 1 and sp.temperature == 0:  # scoring: no generate()
                t = int(logits[-1].argmax())
                out = CompletionOutput(0, self.tok.decode([t]), [t], float(logits[-1, t]),
                                       None, "length")
                return RequestOutput(request_id, None, ids, prompt_lps, [out])
        stops = set(sp.stop_token_ids or []) | {self.tok.eos_token_id}
        if sp.seed is not None:
            torch.manual_seed(sp.seed)
        sampling = dict(do_sample=True, temperature=sp.temperature, top_p=sp.top_p) \
            if sp.temperature > 0 else dict(do_sample=False)
        with torch.no_grad():
            gen = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                      **extra, max_new_tokens=sp.max_tokens,
                                      num_return_sequences=sp.n, eos_token_id=sorted(stops),
                                      pad_token_id=self.tok.eos_token_id, output_logits=True,
                                      return_dict_in_generate=True, **sampling)
        new = gen.sequences[:, len(ids):]
        logp = torch.stack(gen.logits, 1).float().log_softmax(-1)  # the raw model's, as vLLM's
        outputs = []
        for i, row in enumerate(new.tolist()):
            end = next((j for j, t in enumerate(row) if t in stops), None)
            kept = row if end is None else row[:end + 1]  # the stop token stays, as in vLLM
            lps = [{t: Logprob(float(logp[i, j, t]))} for j, t in enumerate(kept)]
            outputs.append(CompletionOutput(
                i, self.tok.decode(kept, skip_special_tokens=True), kept,
                sum(d[t].logprob for d, t in zip(lps, kept)),
                lps if sp.logprobs is not None else None,
                "length" if end is None else "stop"))
        return RequestOutput(request_id, None, ids, prompt_lps, outputs)
