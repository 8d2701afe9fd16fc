"""The ``serve`` and ``caption`` subcommands (registered in leaml/cli/main.py's ADDERS).

Thin: the work is in leaml.serve.server and leaml.serve.teacher.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from leaml.cli.common import (CLI_ACTOR, CountBar, add_device_arguments, place_models,
                              report_failures, threads)
from leaml.serve import http as serve_http
from leaml.serve import server as serve
from leaml.serve import teacher as captions
from leaml.serve.limits import API_KEY_ENV  # the server's key; sent as bearer token by clients
from leaml.serve.limits import exposure_warning
from leaml.store import connect


# --- serve -----------------------------------------------------------------------------------

def _add_serve(sub, common) -> None:
    text = "serve a run's model (or the base model) over an OpenAI-compatible HTTP API"
    p = sub.add_parser("serve", help=text, description=text + ": POST /v1/chat/completions, "
                       "GET /v1/models. Images only as data URLs; remote URLs are refused.",
                       parents=[common])
    p.add_argument("--project", default=None, help="project name (needed with --base)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--run", type=int, default=None, metavar="ID",
                      help="serve this run's finetuned model (LoRA adapters on its base, or a full model)")
    what.add_argument("--base", action="store_true", help="serve the project's base model")
    what.add_argument("--base-model", default=None, metavar="REF",
                      help="serve this base model ('tiny', a Hugging Face id or a folder)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1; anything else exposes the model "
                        "to the network: give it an --api-key)")
    p.add_argument("--api-key", default=os.environ.get(API_KEY_ENV) or None, metavar="KEY",
                   help="clients must send 'Authorization: Bearer KEY' on every /v1 route, "
                        f"else 401 (default ${API_KEY_ENV}; none: no key asked)")
    p.add_argument("--port", type=int, default=8000, help="port (0: a free one, printed)")
    p.add_argument("--name", default=None,
                   help="model name clients ask for (default run-<ID> or the base model ref)")
    p.add_argument("--max-body-mb", type=float, default=32.0, help="largest request body (MB)")
    p.add_argument("--max-pixels", type=int, default=40_000_000,
                   help="largest image (width * height) a request may hold")
    p.add_argument("--max-request-pixels", type=int, default=80_000_000,
                   help="most pixels of all images of one request together")
    p.add_argument("--max-connections", type=int, default=64,
                   help="requests handled at once; more wait in a queue (default 64)")
    add_device_arguments(p)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    place_models(args)
    db = connect(args.home)
    served = serve.load_served(db, project=args.project, run_id=args.run, base=args.base,
                               base_model=args.base_model, name=args.name, device=args.device)
    db.conn.close()
    config = serve.ServeConfig(max_body_bytes=int(args.max_body_mb * 2**20),
                               max_pixels=args.max_pixels, max_request_pixels=args.max_request_pixels,
                               max_connections=args.max_connections, api_key=args.api_key)
    server = serve_http.make_server(served, args.host, args.port, config)
    host, port = server.server_address[:2]
    warning = exposure_warning(host, args.api_key)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    print(f"serving {served.name!r} ({served.source}) on http://{host}:{port}/v1", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


# --- caption ---------------------------------------------------------------------------------

def _endpoint_args(p: argparse.ArgumentParser, *, required_model: bool) -> None:
    p.add_argument("--endpoint", default=None, metavar="URL",
                   help="OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1 (vLLM, SGLang, "
                        "`leaml serve`)")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help=f"sent as 'Authorization: Bearer KEY' (default ${API_KEY_ENV}, if set)")
    p.add_argument("--model", default=None, metavar="NAME",
                   help="model name the endpoint serves" + (" (required)" if required_model else ""))
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight (default 4)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per request (default 60)")
    p.add_argument("--retries", type=int, default=3,
                   help="tries after the first on 5xx, timeouts, connection errors, bad JSON")
    p.add_argument("--backoff", type=float, default=1.0,
                   help="first retry delay in seconds, doubled per try, with jitter (default 1)")
    p.add_argument("--limit", type=int, default=None, help="at most this many images this pass")


def _add_caption(sub, common) -> None:
    text = "write a teacher caption for every image that has none"
    p = sub.add_parser("caption", help=text, description=text + " (resumable: a rerun only "
                       "does what is missing; exits 1 if any image failed)", parents=[common])
    p.add_argument("--project", required=True, help="project name")
    p.add_argument("--teacher", default=None, metavar="MODEL_REF",
                   help="a local model: 'tiny', a Hugging Face id or a folder (instead of --endpoint)")
    _endpoint_args(p, required_model=False)
    p.add_argument("--prompt", default=None,
                   help="caption prompt (default: the project's caption_prompt setting, else an "
                        "endoscopy default); --save-prompt stores it in the project")
    p.add_argument("--save-prompt", action="store_true", help="store --prompt as the project's")
    p.add_argument("--max-tokens", type=int, default=256, help="longest caption (tokens)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads for --teacher")
    p.add_argument("--engine", choices=("hf", "vllm"), default="hf",
                   help="what runs --teacher: 'hf' (transformers, the default) or 'vllm' (fast, "
                        "if vLLM is installed: optional; docs/GPU.md)")
    add_device_arguments(p)
    p.add_argument("--json", action="store_true", help="print the report as one JSON line")
    p.set_defaults(func=cmd_caption)


def cmd_caption(args) -> int:
    if bool(args.teacher) == bool(args.endpoint):
        raise ValueError("give either --teacher MODEL_REF or --endpoint URL --model NAME")
    if args.endpoint and not args.model:
        raise ValueError("--endpoint needs --model NAME (the name the server lists at /v1/models)")
    db = connect(args.home)
    if args.save_prompt:
        captions.set_caption_prompt(db, args.project, args.prompt, user=CLI_ACTOR)
    if args.teacher:
        place_models(args)
        threads(args.threads)
    bar = CountBar("caption")
    try:
        report = captions.caption_missing(
            db, args.project, endpoint=args.endpoint, model=args.model, teacher=args.teacher,
            prompt=args.prompt, concurrency=args.concurrency, timeout=args.timeout,
            retries=args.retries, backoff=args.backoff, max_tokens=args.max_tokens,
            limit=args.limit, progress=bar, user=CLI_ACTOR,
            api_key=args.api_key or os.environ.get(API_KEY_ENV), engine=args.engine)
    finally:
        bar.close()
    info = report.to_dict()
    line = (f"captioned {info['captioned']} of {info['images']} image(s) ({info['source']}), "
            f"{info['failed']} failed in {info['seconds']} s")
    return report_failures(info, args.json, line)
