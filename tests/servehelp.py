"""Helpers of the tests that run real processes: ``cli`` (``python -m leaml``), ``wait_for``;
for the serving/captioning tests (tests/test_serve.py, test_captions.py, test_caption_qa.py) a real ``python -m leaml serve`` process on 127.0.0.1, started once per
test session and shared, and a scriptable misbehaving teacher (http.server in a thread).
Only 127.0.0.1, never any other address."""
from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
PROMPT = "Describe the image."  # the tiny base answers this with text, not an instant eos


def wait_for(pred, what: str, timeout: float = 600, every: float = 0.05):
    """``pred()``'s first true value, asked every ``every`` s; a hang guard on shared CPUs
    (AssertionError after ``timeout`` s), not a timing."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if value := pred():
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def cli(home, *args, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m leaml --home HOME ARGS`` as a real process."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([PY, "-m", "leaml", "--home", str(home), *map(str, args)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)


def image_folder(folder: Path, n: int = 4) -> Path:
    """``n`` small distinct PNGs in a plain folder (no manifest, no captions)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (64 + 8 * i, 48), (60 * i % 256, 90, 200 - 30 * i)).save(folder / f"frame_{i}.png")
    return folder


def _save_run(home: Path, project: str, method: str, save) -> int:
    from leaml.store import connect
    from leaml.store.projects import get_project
    from leaml.store.runs import create_run, finish_run, update_run
    db = connect(home)
    run_id = create_run(db, get_project(db, project)["id"], method=method, base_model="tiny",
                        params={})
    save(home / "models" / f"run-{run_id}")
    update_run(db, run_id, model_dir=f"models/run-{run_id}")
    finish_run(db, run_id, accuracy=None, seconds=0.0)
    db.conn.close()
    return run_id


def make_lora_run(home: Path, project: str = "endo") -> int:
    """A finished seed-lora run whose folder holds fresh LoRA adapters on 'tiny' (no
    training: adapters start as the identity, which is all loading needs)."""
    from leaml.engine import models
    from leaml.engine.train import TrainConfig, prepare_model, save_trained
    model, processor = models.load("tiny")
    lora = prepare_model(model, TrainConfig(mode="lora", lora_r=4))
    return _save_run(home, project, "seed-lora", lambda out: save_trained(lora, processor, out))


def make_full_run(home: Path, project: str = "endo") -> int:
    """A finished seed-full run: the tiny base saved whole, with a generation config that
    never emits eos, padding or a whitespace-only token, so every answer has visible text
    whatever the tiny's weights are (the embedded base is still being pretrained)."""
    from leaml.engine import models
    model, processor = models.load("tiny")
    tok = processor.tokenizer
    blank = [i for i in range(len(tok)) if not tok.decode([i]).strip()]
    model.generation_config.suppress_tokens = sorted(set(blank) | set(tok.all_special_ids))
    return _save_run(home, project, "seed-full", lambda out: models.save(model, processor, out))


class Server:
    """A ``leaml serve`` process; ``url`` is its /v1 base."""

    def __init__(self, home: Path, *args: str):
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen([PY, "-m", "leaml", "--home", str(home), "serve", "--port", "0",
                                      "--threads", "1", *args], cwd=ROOT, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = self._first_line(240)
        m = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
        assert m, f"serve printed {line!r}"
        self.port = int(m.group(1))
        self.url = f"http://127.0.0.1:{self.port}/v1"

    def _first_line(self, timeout: float) -> str:
        out: list[str] = []
        reader = threading.Thread(target=lambda: out.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        return out[0] if out else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


_SHARED: dict = {}


def shared() -> dict:
    """One data home with project 'endo' (a plain folder of 4 images), a full-model run, and
    a ``leaml serve --run`` process on it, for the whole test session (started on first use)."""
    if not _SHARED:
        root = Path(tempfile.mkdtemp(prefix="leaml-serve-"))
        atexit.register(shutil.rmtree, root, True)  # runs after server.stop (atexit is LIFO)
        home = root / "home"
        r = cli(home, "import", image_folder(root / "frames"), "--project", "endo")
        assert r.returncode == 0, r.stderr
        run_id = make_full_run(home)
        server = Server(home, "--project", "endo", "--run", str(run_id), "--max-body-mb", "1",
                        "--max-pixels", "100000")
        atexit.register(server.stop)
        _SHARED.update(root=root, home=home, run_id=run_id, server=server, model=f"run-{run_id}")
    return _SHARED


# --- a teacher that misbehaves on purpose --------------------------------------------------

def completion(content: str, logprobs: list | None = None) -> dict:
    """A minimal OpenAI chat.completion object with ``content``."""
    return {"id": "x", "object": "chat.completion", "created": 0, "model": "teacher",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "finish_reason": "stop",
                         "logprobs": {"content": logprobs} if logprobs is not None else None}]}


class Teacher:
    """An http.server on 127.0.0.1 whose answers follow a script: each request takes the
    next action ('500', 'stall', 'badjson', 'ok', or a callable(body) -> dict); when the
    script runs out, ``default`` is used. Records every request body and arrival time."""

    def __init__(self, script=(), default="ok", stall_s: float = 2.0, delay_s: float = 0.0):
        self.script, self.default = list(script), default
        self.stall_s, self.delay_s = stall_s, delay_s
        self.requests: list[dict] = []
        self.times: list[float] = []
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        teacher = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                teacher._handle(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def _next(self):
        with self.lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            return self.script.pop(0) if self.script else self.default

    def _handle(self, h) -> None:
        body = json.loads(h.rfile.read(int(h.headers["Content-Length"])))
        action = self._next()
        self.requests.append(body)
        self.times.append(time.monotonic())
        try:
            time.sleep(self.delay_s)
            if action == "stall":
                time.sleep(self.stall_s)
                action = "ok"
            if action == "500":
                return self._send(h, 500, b'{"error": {"message": "teacher overloaded"}}')
            if action == "badjson":
                return self._send(h, 200, b'{"choices": [')
            obj = action(body) if callable(action) else completion(f"caption {len(self.requests)}")
            self._send(h, 200, json.dumps(obj).encode())
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout): fine
        finally:
            with self.lock:
                self.in_flight -= 1

    @staticmethod
    def _send(h, status: int, data: bytes) -> None:
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
