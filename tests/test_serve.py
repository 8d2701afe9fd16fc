"""`leaml serve`: a real server process (a full-model run of tiny) on 127.0.0.1 over real HTTP.

Good requests get OpenAI-shaped answers; every bad request a 4xx JSON error in OpenAI's
shape, and the server keeps serving afterwards.
"""
from __future__ import annotations

import base64
import io
import json
import socket
import urllib.error
import urllib.request

import pytest
from PIL import Image

from servehelp import PROMPT, shared


def png_url(size=(40, 30), color=(200, 40, 40)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def post(path: str, body, *, method: str = "POST", raw: bytes | None = None):
    """(status, JSON answer) of one request to the shared server."""
    s = shared()
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(s["server"].url.removesuffix("/v1") + path, data=data,
                                 method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def chat(**kw) -> dict:
    body = {"model": shared()["model"], "max_tokens": 4, "temperature": 0,
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": png_url()}},
                {"type": "text", "text": PROMPT}]}]}
    body.update(kw)
    return body


def assert_error(status: int, answer: dict, expected: int, words: str = "") -> None:
    assert status == expected, answer
    err = answer["error"]
    assert set(err) >= {"message", "type", "param", "code"}
    assert words.lower() in err["message"].lower(), err["message"]


def test_models_lists_the_run():
    status, answer = post("/v1/models", None, method="GET")
    assert status == 200
    assert answer["object"] == "list"
    assert [m["id"] for m in answer["data"]] == [shared()["model"]]


def test_chat_completion_has_the_openai_shape_with_logprobs():
    status, answer = post("/v1/chat/completions", chat(n=2, temperature=0.9, seed=3,
                                                       logprobs=True, top_logprobs=2))
    assert status == 200, answer
    assert answer["object"] == "chat.completion" and answer["id"].startswith("chatcmpl-")
    assert answer["model"] == shared()["model"] and isinstance(answer["created"], int)
    assert [c["index"] for c in answer["choices"]] == [0, 1]
    for c in answer["choices"]:
        assert c["message"]["role"] == "assistant" and isinstance(c["message"]["content"], str)
        assert c["finish_reason"] in ("stop", "length")
        tokens = c["logprobs"]["content"]
        assert 1 <= len(tokens) <= 4
        for t in tokens:
            assert t["logprob"] <= 0 and t["bytes"] == list(t["token"].encode())
            assert len(t["top_logprobs"]) == 2
            assert t["top_logprobs"][0]["logprob"] >= t["logprob"] - 1e-5  # top-1 is the max
    usage = answer["usage"]
    # the prompt holds the image's tokens plus the text's (the count comes from the processor,
    # so a base with another patch size keeps this honest)
    assert usage["prompt_tokens"] > image_token_count() and usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def image_token_count() -> int:
    """How many tokens the served base's processor expands one image into."""
    from PIL import Image
    from transformers import AutoProcessor
    from leaml.engine.models import TINY_DIR
    processor = AutoProcessor.from_pretrained(TINY_DIR)
    image_token = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    ids = processor(text=[processor.image_token], images=[Image.new("RGB", (64, 64))])["input_ids"][0]
    return sum(1 for i in ids if i == image_token)


def test_greedy_is_deterministic_and_text_only_works():
    a = post("/v1/chat/completions", chat())[1]["choices"][0]["message"]["content"]
    b = post("/v1/chat/completions", chat())[1]["choices"][0]["message"]["content"]
    assert a == b
    status, answer = post("/v1/chat/completions", chat(messages=[
        {"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hello?"}]))
    assert status == 200, answer
    assert answer["choices"][0]["logprobs"] is None


@pytest.mark.parametrize("body,expected,words", [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    ({"model": "run-1"}, 400, "messages"),
    ({"model": "run-1", "messages": []}, 400, "messages"),
    ({"model": "run-1", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "role"),
    ({"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}, 404, "does not exist"),
    ({"model": "run-1", "messages": [{"role": "user", "content": "hi"}], "n": 99}, 400, "'n'"),
    ({"model": "run-1", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "temperature"),
    ({"model": "run-1", "messages": [{"role": "user", "content": "hi"}], "stream": True}, 400, "stream"),
])
def test_bad_bodies_get_4xx(body, expected, words):
    if isinstance(body, dict) and body.get("model") == "run-1":
        body["model"] = shared()["model"]
    raw = body if isinstance(body, bytes) else None
    status, answer = post("/v1/chat/completions", None if raw else body, raw=raw)
    assert_error(status, answer, expected, words)


def image_body(url: str) -> dict:
    return chat(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": PROMPT}]}])


def test_remote_image_urls_are_refused_never_fetched():
    for url in ("http://127.0.0.1:9/secret.png", "https://example.org/a.png", "file:///etc/passwd"):
        status, answer = post("/v1/chat/completions", image_body(url))
        assert_error(status, answer, 400, "never fetches remote URLs")


def test_corrupt_and_oversized_images_are_refused():
    status, answer = post("/v1/chat/completions", image_body("data:image/png;base64,iVBORw0KGgoAAAAN"))
    assert_error(status, answer, 400, "cannot be read")
    status, answer = post("/v1/chat/completions", image_body("data:image/png;base64,@@@"))
    assert_error(status, answer, 400, "base64")
    # this server runs with --max-pixels 100000: 400 x 300 = 120000 pixels is over
    status, answer = post("/v1/chat/completions", image_body(png_url((400, 300))))
    assert_error(status, answer, 400, "over the limit")


def test_body_over_the_limit_gets_413_without_being_read():
    s = shared()["server"]
    with socket.create_connection(("127.0.0.1", s.port), timeout=30) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 5000000\r\n\r\n")
        # the server may send head and body in separate writes: read until it closes
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).decode().partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 413"), head
    assert "over the limit" in json.loads(body)["error"]["message"]


def test_unknown_route_404_and_wrong_method_405():
    assert_error(*post("/v1/completions", chat()), 404, "no route")
    assert_error(*post("/v1/chat/completions", None, method="GET"), 405, "not allowed")
    assert_error(*post("/v1/models", None, method="DELETE"), 405, "not allowed")


def test_parallel_requests_are_all_answered():
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: post("/v1/chat/completions", chat()), range(4)))
    assert [status for status, _ in results] == [200] * 4
    texts = {a["choices"][0]["message"]["content"] for _, a in results}
    assert len(texts) == 1  # greedy, same input: the lock keeps calls from interfering


def test_the_server_survives_all_of_it():
    assert post("/health", None, method="GET")[0] == 200
    assert shared()["server"].proc.poll() is None
    assert post("/v1/chat/completions", chat())[0] == 200


def test_load_served_lora_run_full_run_and_missing_folder(tmp_path):
    from leaml.engine import models
    from leaml.serve.server import ChatRequest, ServeConfig, complete, load_served
    from leaml.store import connect
    from leaml.store.projects import create_project
    from leaml.store.runs import create_run
    from servehelp import make_lora_run
    db = connect(tmp_path / "h")
    create_project(db, "endo")
    lora_run = make_lora_run(tmp_path / "h")
    served = load_served(db, project="endo", run_id=lora_run)  # adapters merged into the base
    assert served.name == f"run-{lora_run}" and "lora" not in str(dict(served.model.named_parameters()))
    req = ChatRequest([{"role": "user", "content": [{"type": "text", "text": "Hi"}]}], [], 3,
                      0.0, 1.0, 1, True, 1, None, [])
    answer = complete(served, req, ServeConfig())
    assert len(answer["choices"][0]["logprobs"]["content"]) <= 3
    empty = create_run(db, 1, method="seed-full", base_model="tiny", params={})
    with pytest.raises(ValueError, match="no saved model"):
        load_served(db, project="endo", run_id=empty)
    other = create_project(db, "q")
    with pytest.raises(ValueError, match="another project"):
        load_served(db, project=other["name"], run_id=lora_run)
    assert load_served(db, base_model="tiny").name == "tiny"
    del models
