"""Teacher captions: for every image without a caption, ask a teacher and store its answer.

Two teachers, one entry point (:func:`caption_missing`):

- an OpenAI-compatible endpoint (vLLM/SGLang serving Qwen2.5-VL-72B in the paper; here also
  ``python -m leaml serve``): several requests in flight (a thread pool), each with a timeout,
  retried with exponential backoff and jitter on 5xx/408/429 answers, timeouts, connection
  errors and malformed JSON; stored as ``endpoint:<url>#<model>``;
- a local transformers model (``models.load`` + ``generate``), stored as ``teacher:<ref>``.

Captions are committed one by one as they arrive, from the calling thread (the only one that
touches the database), so a stopped run loses nothing and a rerun only asks for what is still
missing. An image that fails after the last try is reported by name; the others go on.

The HTTP client (:class:`EndpointClient`) is shared with ``caption_qa`` (QA from captions).
This module imports no torch at import time: the app's training page uses its helpers.
"""
from __future__ import annotations

import http.client
import ipaddress
import json
import math
import mimetypes
import os
import random
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Callable

import sqlite_utils

from leaml.serve.limits import API_KEY_ENV
from leaml.store import connect
from leaml.store.images import image_file, image_path, images_without_caption, set_caption
from leaml.store.projects import get_project, update_settings

Progress = Callable[[str, int, int, float], None]

DEFAULT_CAPTION_PROMPT = (
    "Describe this endoscopy image in two or three sentences for a clinician: the anatomical "
    "region or landmark, every visible finding (polyp, ulcer, bleeding, inflammation, "
    "instrument, text or box overlay) with its number, size, colour and position in the "
    "image. Describe only what is visible; do not guess a diagnosis.")


# --- the project's caption prompt ------------------------------------------------------------

def caption_prompt(project: dict) -> str:
    """The project's caption prompt (``settings['caption_prompt']``) or the endoscopy default."""
    return (project.get("settings") or {}).get("caption_prompt") or DEFAULT_CAPTION_PROMPT


def set_caption_prompt(db, project: str | int, prompt: str | None, *, user: str | None = None) -> dict:
    """Store the project's caption prompt (None or blank: back to the default)."""
    prompt = (prompt or "").strip() or None
    return update_settings(db, get_project(db, project)["id"], {"caption_prompt": prompt}, user=user)


def missing_count(db, project_id: int) -> int:
    """How many images of the project have no caption yet."""
    return len(images_without_caption(db, project_id))


# --- the HTTP client -------------------------------------------------------------------------

class EndpointError(Exception):
    """A request that failed for good (after the last try, or a 4xx that retrying cannot fix)."""


class _Retryable(Exception):
    """A failure worth another try: 5xx/408/429, timeout, connection error, malformed JSON."""


def chat_url(url: str) -> str:
    """``http://h:p``, ``http://h:p/v1`` or the full URL -> ``.../v1/chat/completions``."""
    url = url.strip().rstrip("/")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"endpoint {url!r} is not an http(s) URL; give e.g. http://127.0.0.1:8000/v1")
    if url.endswith("/chat/completions"):
        return url
    return url + ("/chat/completions" if url.endswith("/v1") else "/v1/chat/completions")


def _is_loopback(url: str) -> bool:
    host = urllib.parse.urlsplit(url).hostname or ""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@dataclass
class EndpointClient:
    """POSTs chat completions to one OpenAI-compatible endpoint, with retries.

    Delays before try ``i+1``: ``min(backoff_max, backoff * 2**i)`` scaled by a random
    factor in [0.5, 1.5) (jitter, so many clients do not retry in lockstep). ``api_key``
    (default ``$LEAML_API_KEY``, which also reaches caption jobs run by the worker without
    storing the key in the database) is sent as ``Authorization: Bearer <key>``.
    """
    url: str
    model: str
    timeout: float = 60.0
    retries: int = 3              # tries after the first
    backoff: float = 1.0
    backoff_max: float = 30.0
    api_key: str | None = field(default=None, repr=False)
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False)

    def __post_init__(self):
        self.endpoint = chat_url(self.url)
        self.api_key = self.api_key or os.environ.get(API_KEY_ENV) or None
        if not self.model:
            raise ValueError("--model is required with --endpoint: the name the server serves "
                             "(see GET /v1/models)")
        if self.timeout <= 0 or self.retries < 0:
            raise ValueError("timeout must be > 0 and retries >= 0")
        # a loopback endpoint never goes through an HTTP proxy from the environment
        handlers = [urllib.request.ProxyHandler({})] if _is_loopback(self.endpoint) else []
        self._opener = urllib.request.build_opener(*handlers)

    def delay(self, attempt: int) -> float:
        return min(self.backoff_max, self.backoff * 2 ** attempt) * random.uniform(0.5, 1.5)

    def chat(self, messages: list[dict], **params) -> dict:
        """The completion object for ``messages`` (extra ``params`` go into the body as is)."""
        body = json.dumps({"model": self.model, "messages": messages, **params}).encode("utf-8")
        last = None
        for attempt in range(self.retries + 1):
            try:
                return self._post(body)
            except _Retryable as exc:
                last = exc
                if attempt < self.retries:
                    self.sleep(self.delay(attempt))
        raise EndpointError(f"{self.endpoint} failed {self.retries + 1} time(s); last: {last}")

    def _post(self, body: bytes) -> dict:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.endpoint, data=body, headers=headers, method="POST")
        try:
            with self._opener.open(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            detail = _error_text(exc)
            if exc.code == 401:
                detail += (f" (give the server's key with --api-key KEY or {API_KEY_ENV})"
                           if not self.api_key else " (check the key: --api-key or "
                           f"{API_KEY_ENV})")
            if exc.code >= 500 or exc.code in (408, 429):
                raise _Retryable(f"HTTP {exc.code}: {detail}") from None
            raise EndpointError(f"{self.endpoint} answered HTTP {exc.code}: {detail}") from None
        except (TimeoutError, socket.timeout):
            raise _Retryable(f"no answer within {self.timeout:g} s (timeout)") from None
        except (urllib.error.URLError, ConnectionError, http.client.HTTPException, OSError) as exc:
            raise _Retryable(f"connection failed: {getattr(exc, 'reason', exc)}") from None
        return _parse_completion(raw)


def _error_text(exc: urllib.error.HTTPError) -> str:
    try:
        raw = exc.read()
        return str(json.loads(raw)["error"]["message"])[:500]
    except Exception:
        return str(exc.reason)


def _parse_completion(raw: bytes) -> dict:
    try:
        obj = json.loads(raw)
        content = obj["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise _Retryable(f"malformed JSON answer: {raw[:200]!r}") from None
    if not isinstance(content, str):
        raise _Retryable(f"malformed answer: message.content is {type(content).__name__}")
    return obj


def image_data_url(path) -> str:
    """The file as ``data:<mime>;base64,...`` (what ``leaml serve`` and vLLM accept)."""
    import base64
    mime = mimetypes.guess_type(str(path))[0] or "image/png"
    with open(path, "rb") as fh:
        return f"data:{mime};base64,{base64.b64encode(fh.read()).decode('ascii')}"


def caption_messages(prompt: str, data_url: str) -> list[dict]:
    """One user turn: the image, then the caption prompt."""
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url}},
                                         {"type": "text", "text": prompt}]}]


def open_db(store):
    """An open database as is, or a connection to the data home ``store`` (this thread's)."""
    return store if isinstance(store, sqlite_utils.Database) else connect(store)


# --- captioning a project --------------------------------------------------------------------

@dataclass
class CaptionReport:
    """What a captioning pass did; ``failed`` holds {image_id, name, error} per lost image."""
    source: str
    total: int = 0
    done: int = 0
    failed: list = field(default_factory=list)
    stopped: bool = False
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"source": self.source, "images": self.total, "captioned": self.done,
                "failed": len(self.failed), "failures": self.failed, "stopped": self.stopped,
                "seconds": round(self.seconds, 1)}


def image_name(row: dict) -> str:
    """How errors name an image: its id and original file name."""
    return f"image {row['id']} ({row.get('source_name') or row['sha256'][:12]})"


def caption_missing(store, project: str | int, *, endpoint: str | None = None,
                    model: str | None = None, teacher: str | None = None,
                    prompt: str | None = None, concurrency: int = 4, timeout: float = 60.0,
                    retries: int = 3, backoff: float = 1.0, max_tokens: int = 256,
                    limit: int | None = None, progress: Progress | None = None,
                    should_stop: Callable[[], bool] | None = None,
                    user: str | None = None, api_key: str | None = None,
                    engine: str = "hf") -> CaptionReport:
    """Caption every image of ``project`` that has none, from ``endpoint`` + ``model`` or a
    local ``teacher`` model ref (run by ``engine``: 'hf', transformers, or 'vllm', vLLM if
    installed); returns a :class:`CaptionReport`.

    The prompt is ``prompt``, else the project's (``settings['caption_prompt']``), else
    :data:`DEFAULT_CAPTION_PROMPT`. ``limit`` caps how many images this pass takes.
    ``progress("caption", n_finished, n_total, nan)`` is called after each image;
    ``should_stop()`` ends the pass early (captions already stored stay).
    """
    if bool(endpoint) == bool(teacher):
        raise ValueError("give either --teacher MODEL_REF or --endpoint URL with --model NAME")
    if concurrency < 1:
        raise ValueError(f"concurrency {concurrency} must be >= 1")
    if engine != "hf":
        if endpoint:
            raise ValueError("--engine applies to a local --teacher, not to an --endpoint")
        from leaml.engine import vllm_engine  # torch: only for a local teacher
        vllm_engine.check(engine)  # before anything loads
    db = open_db(store)
    proj = get_project(db, project)
    rows = images_without_caption(db, proj["id"])[:limit]
    prompt = (prompt or "").strip() or caption_prompt(proj)
    t0 = time.monotonic()
    if endpoint:
        client = EndpointClient(endpoint, model or "", timeout=timeout, retries=retries,
                                backoff=backoff, api_key=api_key)
        report = CaptionReport(f"endpoint:{endpoint}#{model}", total=len(rows))
        _from_endpoint(db, client, rows, prompt, max_tokens, concurrency, report, progress,
                       should_stop, user)
    else:
        report = CaptionReport(f"teacher:{teacher}", total=len(rows))
        _from_model(db, teacher, rows, prompt, max_tokens, report, progress, should_stop, user,
                    engine=engine)
    report.seconds = time.monotonic() - t0
    return report


def _store(db, report: CaptionReport, row: dict, text: str | None, error: str | None,
           user: str | None) -> None:
    text = (text or "").strip()
    if error is None and not text:
        error = "the teacher answered with an empty caption"
    if error is None:
        set_caption(db, row["id"], text, source=report.source, user=user)
        report.done += 1
    else:
        report.failed.append({"image_id": row["id"], "name": image_name(row), "error": error})


def _ask(db_home, client: EndpointClient, row: dict, prompt: str, max_tokens: int) -> str:
    url = image_data_url(image_file(db_home, row["sha256"], row["ext"]))
    answer = client.chat(caption_messages(prompt, url), max_tokens=max_tokens, temperature=0.0)
    return answer["choices"][0]["message"]["content"]


def bounded_map(rows: list, ask: Callable, on_done: Callable, *, concurrency: int,
                should_stop: Callable | None = None) -> bool:
    """Call ``ask(row)`` for every row in a thread pool, at most ``concurrency`` in flight,
    and ``on_done(row, result, error)`` in the calling thread as each finishes (``error`` is
    an EndpointError's text, else None), so database writes stay on one connection. Stops
    submitting once ``should_stop()`` is true; returns whether rows were left undone."""
    todo, running, stopped = list(reversed(rows)), {}, False
    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        while todo or running:
            if should_stop and todo and should_stop():
                stopped, todo = True, []
            while todo and len(running) < concurrency:
                row = todo.pop()
                running[pool.submit(ask, row)] = row
            if not running:
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                row = running.pop(fut)
                try:
                    on_done(row, fut.result(), None)
                except EndpointError as exc:
                    on_done(row, None, str(exc))
    return stopped


def _from_endpoint(db, client, rows, prompt, max_tokens, concurrency, report, progress,
                   should_stop, user) -> None:
    """Requests in a thread pool (at most ``concurrency`` in flight); results stored here,
    in the calling thread, as they arrive."""
    def done(row, text, error):
        _store(db, report, row, text, error, user)
        if progress:
            progress("caption", report.done + len(report.failed), report.total, math.nan)

    report.stopped |= bounded_map(
        rows, lambda row: _ask(db.home, client, row, prompt, max_tokens), done,
        concurrency=concurrency, should_stop=should_stop)


def _from_model(db, teacher, rows, prompt, max_tokens, report, progress, should_stop, user,
                batch_size: int = 8, engine: str = "hf") -> None:
    """Greedy captions from a local model, a batch at a time, stored after each batch."""
    # torch: only for a local teacher (the app imports this module)
    from leaml.engine import models, vllm_engine  # (as above)
    if not rows:
        return
    if engine == "vllm":  # vLLM batches itself: larger batches, the same greedy captions
        model, processor = vllm_engine.load(teacher)
        run, batch_size = vllm_engine.generate, 8 * batch_size
    else:
        model, processor = models.load(teacher, inference=True)  # the device rule, bf16 on GPUs
        run = models.generate
    for i in range(0, len(rows), batch_size):
        if should_stop and should_stop():
            report.stopped = True
            return
        chunk = rows[i:i + batch_size]
        gens = run(model, processor, [image_path(db, r) for r in chunk], [prompt] * len(chunk),
                   max_new_tokens=max_tokens)
        for r, g in zip(chunk, gens):
            _store(db, report, r, g[0].text, None, user)
        if progress:
            progress("caption", report.done + len(report.failed), report.total, math.nan)


# --- the job kind and the app ----------------------------------------------------------------

def caption_job_params(*, endpoint: str = "", model: str = "", teacher: str = "",
                       prompt: str = "", concurrency: int = 4) -> dict:
    """The params of a ``caption`` job from the app's form, checked before queueing."""
    endpoint, model, teacher = endpoint.strip(), model.strip(), teacher.strip()
    if endpoint:
        chat_url(endpoint)
        if not model:
            raise ValueError("give the model name the endpoint serves (see its /v1/models)")
        params = {"endpoint": endpoint, "model": model}
    elif teacher or model:
        params = {"teacher": teacher or model}
    else:
        raise ValueError("give an endpoint URL and model name, or a local teacher model")
    if prompt.strip():
        params["prompt"] = prompt.strip()
    return {**params, "concurrency": int(concurrency)}


def caption_job(ctx, params: dict) -> dict:
    """Job kind ``caption``: :func:`caption_missing` with the job's params; raises at the end
    (job failed, resumable: a resume asks only for what is still missing) if any image failed."""
    ctx.plan = ["caption"]
    keys = ("endpoint", "model", "teacher", "prompt", "concurrency", "timeout", "retries",
            "max_tokens", "limit", "engine")
    report = caption_missing(ctx.db, ctx.job["project_id"],
                             **{k: params[k] for k in keys if params.get(k) is not None},
                             progress=ctx.progress, should_stop=ctx.should_stop, user=ctx.user)
    if report.failed:
        first = report.failed[0]
        raise RuntimeError(f"{len(report.failed)} of {report.total} images got no caption; "
                           f"first: {first['name']}: {first['error']}. Resume the job to retry them")
    return report.to_dict()
