"""The HTTP side of ``leaml serve``: routes, the API key, body limits, error mapping, and a
threading server with a deep listen queue, a bounded number of handler threads and a deadline
for every request's line and headers.

Every bad request gets a 4xx JSON error in OpenAI's shape; an unexpected failure inside the
model call a 500 of the same shape. The server itself never dies of a request.
"""
from __future__ import annotations

import json
import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from leaml.serve.server import ServeConfig, ServedModel, complete, models_list
from leaml.serve.server import parse_request as parse_chat_request
from leaml.serve.limits import ApiError, check_api_key, chars_per_token, read_body

log = logging.getLogger("leaml.serve.server")

ROUTES = {"/v1/chat/completions": ("POST",), "/v1/models": ("GET",), "/health": ("GET",)}


class HeaderWatch:
    """Ends the reading side of connections whose request line and headers take longer than
    ``seconds`` (the handler then answers 408). The socket timeout alone cannot: a client that
    sends a header byte every few seconds never lets it fire, and with a bounded number of
    handler threads, a few dozen such clients would keep everyone else waiting."""

    def __init__(self, seconds: float):
        self.seconds, self.lock, self.closed = seconds, threading.Lock(), threading.Event()
        self.deadlines: dict = {}  # handler -> monotonic deadline
        threading.Thread(target=self._run, name="header-watch", daemon=True).start()

    def start(self, handler) -> None:
        with self.lock:
            self.deadlines[handler] = time.monotonic() + self.seconds

    def stop(self, handler) -> None:
        with self.lock:
            self.deadlines.pop(handler, None)

    def _run(self) -> None:
        while not self.closed.wait(0.5):
            now = time.monotonic()
            with self.lock:
                late = [h for h, t in self.deadlines.items() if t < now]
                for h in late:
                    del self.deadlines[h]
            for h in late:
                h.headers_timed_out = True
                try:  # the handler's blocked read returns; it can still write its 408
                    h.connection.shutdown(socket.SHUT_RD)
                except OSError:
                    pass


class Handler(BaseHTTPRequestHandler):
    """Routes, size limits and error mapping; the server object carries model and config."""
    protocol_version = "HTTP/1.1"
    server_version = "leaml-serve"
    headers_timed_out = False

    def setup(self) -> None:
        self.timeout = self.server.config.read_timeout  # a silent client cannot hold a thread
        super().setup()

    def handle_one_request(self) -> None:
        self.server.header_watch.start(self)  # request line and headers: a deadline
        try:
            super().handle_one_request()
        except OSError:  # the client went away mid-request
            self.close_connection = True
        finally:
            self.server.header_watch.stop(self)

    def parse_request(self) -> bool:
        ok = super().parse_request()
        self.server.header_watch.stop(self)
        if ok and self.headers_timed_out:
            self.close_connection = True
            seconds = self.server.header_watch.seconds
            self._error(ApiError(408, f"the request line and headers took more than {seconds:g} s; "
                                 "send them at once", code="request_timeout"))
            return False
        return ok

    def log_message(self, fmt, *args) -> None:
        log.info("%s %s", self.address_string(), fmt % args)

    def _send(self, status: int, obj: dict, headers: dict | None = None) -> None:
        data = json.dumps(obj).encode("utf-8")
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)
        except OSError:  # the client left before its answer: nothing to tell it
            self.close_connection = True

    def _error(self, err: ApiError, headers: dict | None = None) -> None:
        self._send(err.status, err.body(), headers)

    def _route(self, method: str) -> str | None:
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        allowed = ROUTES.get(path)
        if allowed is None or method not in allowed:
            self.close_connection = True  # an unread body must not be taken for a request
        if allowed is None:
            self._error(ApiError(404, f"no route {method} {path}; this server answers "
                                 "POST /v1/chat/completions and GET /v1/models",
                                 code="not_found"))
            return None
        if method not in allowed:
            self._error(ApiError(405, f"{method} is not allowed on {path}; use {', '.join(allowed)}",
                                 code="method_not_allowed"), {"Allow": ", ".join(allowed)})
            return None
        return path

    def _authorized(self, path: str) -> bool:
        """False (401 sent) when the server has an API key and the request lacks it; every
        /v1 route needs it, /health does not (a liveness probe learns nothing from it)."""
        if not path.startswith("/v1/"):
            return True
        try:
            check_api_key(self.headers.get("Authorization"), self.server.config.api_key)
            return True
        except ApiError as err:
            self.close_connection = True  # an unread body must not be taken for a request
            self._error(err, {"WWW-Authenticate": "Bearer"})
            return False

    def do_GET(self) -> None:
        path = self._route("GET")
        if path is None or not self._authorized(path):
            return
        if path == "/v1/models":
            self._send(200, models_list(self.server.served))
        elif path == "/health":
            self._send(200, {"status": "ok", "model": self.server.served.name})

    def do_POST(self) -> None:
        path = self._route("POST")
        if path is None or not self._authorized(path):
            return
        server = self.server
        try:
            body = self._read_body()
            req = parse_chat_request(body, server.served, server.config, server.chars_per_token)
            self._send(200, complete(server.served, req, server.config, server.decoder))
        except ApiError as err:
            self._error(err)
        except Exception as exc:  # the model failed: tell the client, keep serving
            log.exception("chat completion failed")
            self._error(ApiError(500, f"internal error: {type(exc).__name__}: {exc}",
                                 type="server_error"))

    def _read_body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None:
            self.close_connection = True
            raise ApiError(411, "Content-Length is required (chunked bodies are not accepted)")
        try:
            n = int(length)
        except ValueError:
            self.close_connection = True
            raise ApiError(400, f"Content-Length {length!r} is not a number") from None
        cfg = self.server.config
        if n < 0 or n > cfg.max_body_bytes:
            self.close_connection = True  # the unread body must not be parsed as a request
            raise ApiError(413, f"request body of {n} bytes is over the limit of "
                           f"{cfg.max_body_bytes} bytes; send smaller images", code="request_too_large")
        try:
            return read_body(self.connection, self.rfile, n, stall_s=cfg.read_timeout,
                             min_rate=cfg.min_body_rate)
        except ApiError:
            self.close_connection = True  # what is left of the body must not be read as a request
            raise

    def _other(self) -> None:
        self._route(self.command)

    do_PUT = do_DELETE = do_PATCH = do_HEAD = _other


class Server(ThreadingHTTPServer):
    """ThreadingHTTPServer holding the served model and the limits: a listen queue of
    ``config.backlog`` (the standard library's 5 reset the 6th of 20 simultaneous clients),
    at most ``config.max_connections`` handler threads (the accept loop waits for a free one,
    the kernel queues the rest), and the pool of threads that decode images."""
    daemon_threads = True

    def __init__(self, address, served: ServedModel, config: ServeConfig):
        self.served, self.config = served, config
        self.request_queue_size = config.backlog  # read by listen() in super().__init__
        self.workers = threading.BoundedSemaphore(config.max_connections)
        self.decoder = ThreadPoolExecutor(config.decode_slots, thread_name_prefix="decode")
        self.header_watch = HeaderWatch(config.read_timeout)
        self.chars_per_token = chars_per_token(served.processor.tokenizer,
                                               config.max_chars_per_token)
        super().__init__(address, Handler)

    def process_request(self, request, client_address) -> None:
        self.workers.acquire()  # a free handler thread first; meanwhile the kernel queues
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.workers.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.workers.release()

    def server_close(self) -> None:
        super().server_close()
        self.decoder.shutdown(wait=False, cancel_futures=True)
        self.header_watch.closed.set()


def make_server(served: ServedModel, host: str = "127.0.0.1", port: int = 0,
                config: ServeConfig | None = None) -> Server:
    """Bind the server (port 0: a free port, see ``server.server_address``); not started."""
    return Server((host, port), served, config or ServeConfig())
