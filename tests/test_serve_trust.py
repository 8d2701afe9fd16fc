"""`leaml serve` stays bounded whatever a client sends (the server classes of the reliability
section): numbers and JSON it cannot take are 400s, a short body times out in 10 s, an
oversized prompt is refused by its size before it is tokenized, hostile images are refused by
their headers and decoded a few at a time, 50 simultaneous clients are all answered, and an
API key is asked for when one is set. Real server processes on 127.0.0.1 over real HTTP.
"""
from __future__ import annotations

import base64
import io
import json
import os
import re
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

from servehelp import PROMPT, Server, cli, image_folder, make_full_run, shared

pytestmark = pytest.mark.trust
KEY = "test-key-5f2c"


def png_url(size, mode="RGB") -> str:
    """A PNG data URL: one colour compresses a 40-megapixel image to ~100 KB."""
    buf = io.BytesIO()
    Image.new(mode, size, (30, 60, 90, 255)[:len(mode)]).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def body(model: str, text: str = PROMPT, images=(), **kw) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in images]
    return {"model": model, "max_tokens": 4, "temperature": 0,
            "messages": [{"role": "user", "content": parts + [{"type": "text", "text": text}]}],
            **kw}


def post(server: Server, path: str, obj=None, *, raw: bytes | None = None, key: str | None = None,
         method: str = "POST") -> tuple[int, dict, float]:
    """(status, JSON answer, seconds) of one request."""
    data = raw if raw is not None else (json.dumps(obj).encode() if obj is not None else None)
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(f"http://127.0.0.1:{server.port}{path}", data=data,
                                 method=method, headers=headers)
    start = time.monotonic()
    try:
        with urllib.request.urlopen(req, timeout=300) as resp:
            return resp.status, json.loads(resp.read()), time.monotonic() - start
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), time.monotonic() - start


def assert_error(answer: dict, words: str, code: str | None = None) -> None:
    err = answer["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert words.lower() in err["message"].lower(), err["message"]
    if code:
        assert err["code"] == code, err


def peak_rss_mb(server: Server) -> float:
    """The server process's peak resident memory (VmHWM) in MB."""
    status = Path(f"/proc/{server.proc.pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    """A server with default limits and ``--api-key KEY`` on its own home (project 'endo',
    4 images without captions, a full-model run)."""
    root = tmp_path_factory.mktemp("keyed")
    home = root / "home"
    r = cli(home, "import", image_folder(root / "frames"), "--project", "endo")
    assert r.returncode == 0, r.stderr
    run_id = make_full_run(home)
    server = Server(home, "--project", "endo", "--run", str(run_id), "--api-key", KEY)
    yield {"server": server, "home": home, "model": f"run-{run_id}"}
    server.stop()


# --- S2: numbers and JSON the server cannot take, a body shorter than announced ----------------

def test_huge_numbers_and_deep_json_are_client_errors():
    s = shared()
    server, model = s["server"], s["model"]
    raw = json.dumps(body(model)).replace('"max_tokens": 4', '"max_tokens": ' + "9" * 5000)
    status, answer, _ = post(server, "/v1/chat/completions", raw=raw.encode())
    assert status == 400, answer
    assert_error(answer, "more than 4300 digits")
    status, answer, _ = post(server, "/v1/chat/completions", body(model, seed=2**70))
    assert status == 400, answer
    assert_error(answer, "'seed' must be an integer")
    deep = b"[" * 50_000 + b"]" * 50_000          # under the value bound: Python's recursion
    status, answer, _ = post(server, "/v1/chat/completions", raw=deep)
    assert status == 400, answer
    assert_error(answer, "nested too deeply")
    many = b"[" + b"{}," * 300_000 + b"{}]"       # 0.9 MB that would parse into 300,000 dicts
    status, answer, seconds = post(server, "/v1/chat/completions", raw=many)
    assert status == 400 and seconds < 5, (answer, seconds)
    assert_error(answer, "JSON values", "request_too_complex")
    assert post(server, "/v1/chat/completions", body(model, seed=2**64 - 1))[0] == 200


def test_a_body_shorter_than_its_content_length_times_out_in_10_s():
    server = shared()["server"]
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"model\"")
        chunks = []
        while chunk := sock.recv(65536):  # the server answers, then closes
            chunks.append(chunk)
    seconds = time.monotonic() - start
    head, _, rest = b"".join(chunks).decode().partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 408"), head
    assert 9 <= seconds < 15, seconds
    assert_error(json.loads(rest), "got 8 of the 1000 bytes", "request_timeout")


# --- S6: a prompt too long for the context, refused by its size ------------------------------

def test_an_oversized_prompt_is_refused_by_size_in_under_a_second(keyed):
    text = "word " * (4 * 2**20 // 5)  # 4 MB: 12 s to tokenize before
    status, answer, seconds = post(keyed["server"], "/v1/chat/completions",
                                   body(keyed["model"], text), key=KEY)
    assert status == 400, answer
    assert_error(answer, "characters", "context_length_exceeded")
    assert seconds < 1.0, seconds


# --- S7: hostile images ----------------------------------------------------------------------

def test_hostile_images_are_refused_by_headers_and_decoded_a_few_at_a_time(keyed):
    server, model = keyed["server"], keyed["model"]
    big = png_url((6300, 6300))                   # 39.7 megapixels in ~130 KB
    status, answer, seconds = post(server, "/v1/chat/completions",
                                   body(model, images=[big] * 8), key=KEY)
    assert status == 400 and seconds < 5, (answer, seconds)  # 16 s and 2.9 GB before
    assert_error(answer, "per request", "image_too_large")
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda _: post(server, "/v1/chat/completions",
                                               body(model, images=[big] * 8), key=KEY), range(3)))
    assert [r[0] for r in results] == [400] * 3
    # at the per-request limit (2 x 39.7 MP, one with alpha), 3 at once: all answered,
    # decoded two at a time and downscaled, so the process stays far under 2 GB
    pair = [big, png_url((6300, 6300), "RGBA")]
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda _: post(server, "/v1/chat/completions",
                                               body(model, images=pair), key=KEY), range(3)))
    assert [r[0] for r in results] == [200] * 3, [r[1] for r in results]
    assert peak_rss_mb(server) < 2048, peak_rss_mb(server)


# --- S8: many clients at once ----------------------------------------------------------------

def test_fifty_simultaneous_requests_are_all_answered():
    s = shared()
    with ThreadPoolExecutor(50) as pool:
        results = list(pool.map(lambda _: post(s["server"], "/v1/chat/completions",
                                                body(s["model"])), range(50)))
    assert [r[0] for r in results] == [200] * 50  # the listen queue of 5 reset 16 of 50
    assert max(r[2] for r in results) < 240


# --- the API key -----------------------------------------------------------------------------

def test_without_the_api_key_every_v1_route_is_401(keyed):
    server, model = keyed["server"], keyed["model"]
    for key in (None, "wrong-key"):
        status, answer, _ = post(server, "/v1/chat/completions", body(model), key=key)
        assert status == 401, answer
        assert_error(answer, "Authorization: Bearer", "invalid_api_key")
        assert post(server, "/v1/models", method="GET", key=key)[0] == 401
    assert post(server, "/v1/models", method="GET", key=KEY)[0] == 200
    assert post(server, "/v1/chat/completions", body(model), key=KEY)[0] == 200
    assert post(server, "/health", method="GET")[0] == 200  # liveness needs no key


def test_the_caption_client_sends_the_key(keyed):
    url, model, home = keyed["server"].url, keyed["model"], keyed["home"]
    env_before = os.environ.pop("LEAML_API_KEY", None)
    try:
        r = cli(home, "caption", "--project", "endo", "--endpoint", url, "--model", model,
                "--limit", "1", "--retries", "0")
        assert r.returncode == 1 and "HTTP 401" in r.stderr and "--api-key" in r.stderr, r.stderr
        r = cli(home, "caption", "--project", "endo", "--endpoint", url, "--model", model,
                "--limit", "1", "--api-key", KEY)
        assert r.returncode == 0 and "captioned 1 of" in r.stdout, r.stderr
        os.environ["LEAML_API_KEY"] = KEY            # the environment reaches the client too
        r = cli(home, "caption", "--project", "endo", "--endpoint", url, "--model", model,
                "--limit", "1")
        assert r.returncode == 0 and "captioned 1 of" in r.stdout, r.stderr
    finally:
        os.environ.pop("LEAML_API_KEY", None)
        if env_before is not None:
            os.environ["LEAML_API_KEY"] = env_before


def test_binding_beyond_the_loopback_without_a_key_warns():
    from leaml.serve.limits import exposure_warning
    assert "--api-key" in exposure_warning("0.0.0.0", None)
    assert "--api-key" in exposure_warning("192.168.1.20", None)
    assert exposure_warning("0.0.0.0", KEY) is None
    assert exposure_warning("127.0.0.1", None) is None and exposure_warning("localhost", None) is None


def test_clients_that_dribble_their_headers_cannot_hold_the_server():
    s = shared()
    port = s["server"].port
    socks = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(70)]
    try:  # more slow clients than handler threads (64), each a header byte every 2 s
        for sock in socks:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(post, s["server"], "/v1/chat/completions", body(s["model"]))
            for _ in range(15):  # 30 s at most
                for sock in socks:
                    try:
                        sock.sendall(b"X")
                    except OSError:
                        pass  # the server gave up on this one: what this test wants
                if answer.done():
                    break
                time.sleep(2)
            status, _, seconds = answer.result()
        assert status == 200 and seconds < 25, (status, seconds)
        sock = socks[0]
        sock.settimeout(5)
        assert sock.recv(4096).startswith(b"HTTP/1.1 408"), "no 408 to a client that dribbled"
    finally:
        for sock in socks:
            sock.close()
