"""An OpenAI-compatible HTTP server over any leaml model: a finetuned run or a base model.

``python -m leaml serve --project P --run ID`` (or ``--base``) answers
``POST /v1/chat/completions`` and ``GET /v1/models`` in the OpenAI response shape, so the
same clients that talk to vLLM/SGLang (``leaml caption --endpoint``, ``leaml pseudo
--from-captions``) talk to it. Standard library only (``http.server.ThreadingHTTPServer``):
each connection is handled in its own thread, at most ``max_connections`` at once (the others
wait in a listen queue of ``backlog``); images are decoded and turned into model inputs by a
pool of ``decode_slots`` threads, outside the model lock; model calls run one at a time
under that lock (one model, one CPU/GPU). Images come only as data URLs
(``data:image/png;base64,...``): the server never fetches a URL a client names, so it cannot
be used to reach other hosts. With an API key, every ``/v1`` route needs
``Authorization: Bearer <key>``. The HTTP layer is leaml/serve/http.py; the bounds are in
leaml/serve/limits.py and leaml/serve/images.py.

Every bad request gets a 4xx JSON error in OpenAI's shape
(``{"error": {"message", "type", "param", "code"}}``); an unexpected failure inside the model
call gets a 500 of the same shape. The server itself never dies of a request.
"""
from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path

from leaml.config import option as _f
from leaml.serve.images import check_request_pixels, decode_image, open_data_url
from leaml.serve.limits import ApiError, check_prompt_size, parse_json
from leaml.store.projects import get_project
from leaml.store.runs import get_run


@dataclass
class ServeConfig:
    """Limits of the server; every request beyond them gets a 4xx, never a crash."""
    max_body_bytes: int = _f(32 * 2**20, "largest request body (bytes); larger ones get 413")
    max_pixels: int = _f(40_000_000, "largest image (width * height) a request may hold")
    max_request_pixels: int = _f(80_000_000, "most pixels of all images of one request together")
    max_image_side: int = _f(2048, "longer images are downscaled to this side on decoding (0: never)")
    decode_slots: int = _f(2, "threads that decode images (requests decoded at the same time)")
    max_images: int = _f(8, "images per request")
    max_n: int = _f(8, "largest n (choices per request)")
    default_max_tokens: int = _f(256, "max_tokens when a request gives none (clamped to the context)")
    max_top_logprobs: int = _f(20, "largest top_logprobs")
    read_timeout: float = _f(10.0, "seconds a client may stay silent while sending its request, "
                             "and may take for its request line and headers")
    min_body_rate: float = _f(2**20, "bytes/s a body must at least arrive at (on top of read_timeout)")
    max_json_values: int = _f(100_000, "most JSON values (commas and brackets) in a request body")
    max_chars_per_token: int = _f(16, "characters one token may stand for, when refusing a "
                                  "prompt by its size before tokenizing it")
    max_connections: int = _f(64, "connections handled at once; the others wait in the queue")
    backlog: int = _f(256, "connections waiting to be handled (the listen queue)")
    api_key: str | None = _f(None, "key clients must send as 'Authorization: Bearer <key>'",
                             repr=False)


# --- the served model ----------------------------------------------------------------------

@dataclass
class ServedModel:
    """A loaded model under the name clients ask for, with the lock that serialises calls."""
    name: str
    model: object
    processor: object
    source: str                       # what was loaded: 'run <id>: <folder>' or the base ref
    created: int = field(default_factory=lambda: int(time.time()))
    lock: threading.Lock = field(default_factory=threading.Lock)


def load_served(db, *, project: str | int | None = None, run_id: int | None = None,
                base: bool = False, base_model: str | None = None,
                name: str | None = None, device: str | None = None) -> ServedModel:
    """Load what to serve: a run's model (LoRA adapters on its base via peft, or a full model
    from its folder) or a base model (``base_model``, else the project's).

    The model folder is the runs row's ``model_dir`` (relative to the data home). The served
    name defaults to ``run-<id>`` or the base model's ref. ``device``: where the model
    runs ('cpu', 'cuda', 'cuda:1' ...; 'auto' or None: ``models.resolve_device``'s rule, a GPU
    when there is one), in ``models.inference_dtype`` (bfloat16 where the GPU supports it).
    """
    from leaml.engine import models  # torch: loaded with a model, so `serve --help` stays fast
    from leaml.engine.train import load_trained  # (as above)
    proj = get_project(db, project) if project is not None else None
    if run_id is not None and not base:
        run = get_run(db, int(run_id))
        if proj is not None and run["project_id"] != proj["id"]:
            raise ValueError(f"run {run_id} belongs to another project, not '{proj['name']}'; "
                             "check --project/--run")
        folder = Path(db.home) / (run["model_dir"] or "")
        if not run["model_dir"] or not folder.exists():
            raise ValueError(f"run {run_id} ({run['method']}, {run['status']}) has no saved model"
                             f" folder{' at ' + str(folder) if run['model_dir'] else ''}; "
                             "serve a finished run or the base model with --base")
        model, processor = load_trained(folder, run["base_model"], device=device, merge=True,
                                        inference=True)
        return ServedModel(name or f"run-{run_id}", model.eval(), processor, f"run {run_id}: {folder}")
    ref = base_model or (proj["base_model"] if proj else None)
    if not ref:
        raise ValueError("nothing to serve: give --run ID, or --base with --project P "
                         "or --base-model REF")
    model, processor = models.load(ref, device=device, inference=True)
    return ServedModel(name or ref, model, processor, ref)


# --- parsing a request ---------------------------------------------------------------------

@dataclass
class ChatRequest:
    """A validated chat completion request."""
    messages: list[dict]              # chat-template messages ({"type": "image"} parts)
    images: list                      # ImageRefs (headers read) or PIL images, in part order
    max_tokens: int | None
    temperature: float
    top_p: float
    n: int
    logprobs: bool
    top_logprobs: int
    seed: int | None
    stop: list[str]


def _number(body: dict, key: str, default, lo: float, hi: float, *, integer: bool = False):
    value = body.get(key, default)
    if value is None:
        return default
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or not lo <= value <= hi:
        kind = "an integer" if integer else "a number"
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:40] + "..."
        raise ApiError(400, f"'{key}' must be {kind} in [{lo:g}, {hi:g}], got {shown}", param=key)
    return value


SEED_RANGE = (-2**63, 2**64 - 1)  # what torch.manual_seed takes


def _seed(req: dict) -> int | None:
    seed = req.get("seed")
    lo, hi = SEED_RANGE
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)
                             or not lo <= seed <= hi):
        raise ApiError(400, "'seed' must be an integer in [-2**63, 2**64 - 1]", param="seed")
    return seed


def _content(content, where: str, cfg: ServeConfig, images: list) -> list[dict]:
    """One message's content as template parts; images (headers read, not decoded) go to
    ``images``."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise ApiError(400, f"{where}.content must be a string or a list of parts", param="messages")
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            ref = part.get("image_url")
            url = ref.get("url") if isinstance(ref, dict) else ref
            if len(images) >= cfg.max_images:
                raise ApiError(400, f"more than {cfg.max_images} images in one request",
                               param="messages")
            images.append(open_data_url(url, cfg.max_pixels, f"{where}.content[{j}]"))
            parts.append({"type": "image"})
        else:
            raise ApiError(400, f"{where}.content[{j}]: expected {{'type': 'text', 'text': ...}} or "
                           "{'type': 'image_url', 'image_url': {'url': 'data:...'}}", param="messages")
    return parts


def _messages(raw, cfg: ServeConfig) -> tuple[list[dict], list]:
    if not isinstance(raw, list) or not raw:
        raise ApiError(400, "'messages' is required: a non-empty list of {role, content}",
                       param="messages")
    out, images = [], []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise ApiError(400, f"{where}: needs a role of 'system', 'user' or 'assistant'",
                           param="messages")
        out.append({"role": m["role"], "content": _content(m.get("content"), where, cfg, images)})
    return out, images


def context_length(served: ServedModel) -> int:
    """The model's context in tokens (10**9 when its config does not say)."""
    text_cfg = served.model.config.get_text_config()
    return getattr(text_cfg, "max_position_embeddings", None) or 10**9


def parse_request(body: bytes, served: ServedModel, cfg: ServeConfig,
                  per_token: int | None = None) -> ChatRequest:
    """Validate a chat completion body; ApiError (400/404) names the field at fault.

    Everything here costs little whatever the body holds: the JSON is bounded before it is
    parsed, the prompt is judged by its size before it is tokenized (``per_token``: most
    characters per token, see serve_limits.chars_per_token; default the config's cap), and
    images by their headers before they are decoded.
    """
    req = parse_json(body, cfg.max_json_values)
    if not isinstance(req, dict):
        raise ApiError(400, "request body must be a JSON object")
    if req.get("model") != served.name:
        raise ApiError(404, f"model {req.get('model')!r} does not exist; this server serves "
                       f"{served.name!r} (GET /v1/models)", param="model", code="model_not_found")
    if req.get("stream"):
        raise ApiError(400, "stream=true is not supported; ask without streaming", param="stream")
    messages, images = _messages(req.get("messages"), cfg)
    check_prompt_size(messages, len(images), context_length(served),
                      per_token or cfg.max_chars_per_token)
    check_request_pixels(images, cfg.max_request_pixels)
    max_tokens = req.get("max_completion_tokens", req.get("max_tokens"))
    if max_tokens is not None:
        max_tokens = _number({"max_tokens": max_tokens}, "max_tokens", None, 1, 32768, integer=True)
    want_lp = req.get("logprobs", False)
    if not isinstance(want_lp, bool):
        raise ApiError(400, "'logprobs' must be true or false", param="logprobs")
    top = _number(req, "top_logprobs", 0, 0, cfg.max_top_logprobs, integer=True)
    stop = req.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "'stop' must be a string or a list of up to 4 strings", param="stop")
    seed = _seed(req)
    return ChatRequest(messages, images, max_tokens,
                       float(_number(req, "temperature", 1.0, 0, 2)),
                       float(_number(req, "top_p", 1.0, 1e-9, 1)),
                       _number(req, "n", 1, 1, cfg.max_n, integer=True), want_lp, top, seed, stop)


# --- answering -----------------------------------------------------------------------------

def _template_messages(processor, messages: list[dict]) -> list[dict]:
    """System text folded into the first user turn when the chat template has no system role
    (a capability check on the template, not a branch on model names)."""
    template = getattr(processor, "chat_template", None) or ""
    if "system" in template or not any(m["role"] == "system" for m in messages):
        return messages
    system = [p for m in messages if m["role"] == "system" for p in m["content"]]
    rest = [dict(m) for m in messages if m["role"] != "system"]
    first_user = next((m for m in rest if m["role"] == "user"), None)
    if first_user is None:
        return [{"role": "user", "content": system}] + rest
    first_user["content"] = system + [{"type": "text", "text": "\n"}] + first_user["content"]
    return rest


def _inputs(served: ServedModel, req: ChatRequest, cfg: ServeConfig) -> dict:
    """The model's inputs: images decoded (downscaled past ``max_image_side``), the chat
    template applied, all through the processor."""
    from leaml.engine import models  # torch, as in load_served
    proc = served.processor
    # decoded, then as training saw them (a fixed square view where the family needs one)
    images = models.views(proc, [decode_image(ref, cfg.max_image_side) for ref in req.images])
    try:
        prompt = proc.apply_chat_template(_template_messages(proc, req.messages),
                                          add_generation_prompt=True, tokenize=False)
        return dict(proc(images=images or None, text=[prompt], add_special_tokens=False,
                         return_tensors="pt"))
    except Exception as exc:  # the template or processor refused this conversation
        raise ApiError(400, f"the model cannot take these messages ({type(exc).__name__}: {exc})",
                       param="messages") from None


def _budget(served: ServedModel, req: ChatRequest, cfg: ServeConfig, prompt_len: int) -> int:
    """max_tokens, clamped to what is left of the model's context (finish_reason 'length'
    then says so); 400 only when the prompt alone does not fit."""
    context = context_length(served)
    room = context - prompt_len
    if room < 1:
        raise ApiError(400, f"the prompt takes {prompt_len} tokens, the model's context is "
                       f"{context}", param="messages", code="context_length_exceeded")
    if req.max_tokens is None:
        return min(cfg.default_max_tokens, room)
    return min(req.max_tokens, room)


def _token_entry(tok, token_id: int, logprob: float) -> dict:
    text = tok.decode([token_id])
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def _choice(tok, index: int, ids: list[int], logp, stops: set[int], req: ChatRequest) -> dict:
    """One choice from generated ids (padded after a stop) and per-step log-probs (T, V)."""
    end = next((j for j, t in enumerate(ids) if t in stops), None)
    finish = "stop" if end is not None else "length"
    ids = ids[:end] if end is not None else ids
    text = tok.decode(ids, skip_special_tokens=True)
    for s in req.stop:
        if s in text:
            text, finish = text[:text.index(s)], "stop"
    choice = {"index": index, "message": {"role": "assistant", "content": text.strip()},
              "finish_reason": finish, "logprobs": None}
    if req.logprobs:
        content = []
        for j, t in enumerate(ids):
            entry = _token_entry(tok, t, float(logp[j, t]))
            top_v, top_i = logp[j].topk(req.top_logprobs) if req.top_logprobs else ([], [])
            entry["top_logprobs"] = [_token_entry(tok, int(i), float(v))
                                     for v, i in zip(top_v, top_i)]
            content.append(entry)
        choice["logprobs"] = {"content": content}
    return choice


def complete(served: ServedModel, req: ChatRequest, cfg: ServeConfig,
             decoder: Executor | None = None) -> dict:
    """Run the model on a validated request; the OpenAI chat.completion object.

    ``decoder`` (the server's pool of ``decode_slots`` threads; None: the calling thread)
    decodes the images and builds the inputs: that is where a request's memory peaks, so only
    a few requests do it at once, outside the model lock so that it overlaps with other
    requests' model calls. Always the same few threads, because the C allocator keeps what a
    thread freed for that thread's next use: 64 handler threads decoding in turn would each
    keep a decoded image's worth of memory (peak RSS grew with every round).
    """
    import torch

    from leaml.engine.models import _stop_ids  # torch, as in load_served
    model, tok = served.model, served.processor.tokenizer
    if decoder is None:
        inputs = _inputs(served, req, cfg)
    else:
        inputs = decoder.submit(_inputs, served, req, cfg).result()
    prompt_len = int(inputs["input_ids"].shape[1])
    max_new = _budget(served, req, cfg, prompt_len)
    kw = dict(max_new_tokens=max_new, do_sample=req.temperature > 0, num_return_sequences=req.n,
              output_logits=True, return_dict_in_generate=True,
              pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    if kw["do_sample"]:
        kw.update(temperature=req.temperature, top_p=req.top_p)
    with served.lock:  # one model call at a time
        batch = {k: v.to(model.device) for k, v in inputs.items()}
        if "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
        if req.seed is not None:
            torch.manual_seed(req.seed)
        with torch.no_grad():
            out = model.generate(**batch, **kw)
    new = out.sequences[:, prompt_len:].tolist()                     # (n, T)
    logp = torch.stack(out.logits, dim=1).float().log_softmax(-1)    # (n, T, V)
    stops = _stop_ids(model, tok)
    choices = [_choice(tok, i, ids, logp[i], stops, req) for i, ids in enumerate(new)]
    completion = sum(len(c["logprobs"]["content"]) if c["logprobs"] else
                     len(tok(c["message"]["content"], add_special_tokens=False)["input_ids"])
                     for c in choices)
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
            "created": int(time.time()), "model": served.name, "choices": choices,
            "usage": {"prompt_tokens": prompt_len, "completion_tokens": completion,
                      "total_tokens": prompt_len + completion}}


def models_list(served: ServedModel) -> dict:
    """``GET /v1/models``."""
    return {"object": "list", "data": [{"id": served.name, "object": "model",
                                        "created": served.created, "owned_by": "leaml"}]}
