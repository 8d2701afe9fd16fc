"""The bounds that keep one ``leaml serve`` process bounded in time and memory, whatever a
client sends: the request body (a stall timeout and a deadline), the JSON (a count of values
before parsing), the prompt (characters against the context before tokenizing) and the API key.

Each check costs little next to what it guards (a count of bytes, a sum of string lengths),
and each refusal is an :class:`ApiError` in OpenAI's error shape with a 4xx status. The image
bounds are in :mod:`leaml.serve.images`.
"""
from __future__ import annotations

import hmac
import ipaddress
import json
import math
import time

API_KEY_ENV = "LEAML_API_KEY"  # the server's --api-key default and the clients' bearer token


class ApiError(Exception):
    """A request the server refuses: HTTP status + OpenAI error fields."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


# --- the body ------------------------------------------------------------------------------

def read_body(connection, rfile, n: int, *, stall_s: float, min_rate: float) -> bytes:
    """Exactly ``n`` bytes of body from ``rfile``, or ApiError.

    Two clocks, so that neither a silent client nor a dribbling one holds a worker thread for
    long: no byte for ``stall_s`` seconds, or the whole body not in ``stall_s + n / min_rate``
    seconds, is a 408; a connection closed early is a 400. The socket's timeout is set per
    read (it is the only way to bound a blocking read) and put back afterwards.
    """
    deadline = time.monotonic() + stall_s + n / min_rate
    chunks, got = [], 0
    old_timeout = connection.gettimeout()
    try:
        while got < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise _short_body(got, n, f"did not arrive within {stall_s + n / min_rate:.0f} s")
            connection.settimeout(min(stall_s, left))
            try:
                chunk = rfile.read1(min(n - got, 1 << 20))
            except TimeoutError:
                raise _short_body(got, n, f"stalled for {min(stall_s, left):.0f} s") from None
            if not chunk:
                raise ApiError(400, f"the connection closed after {got} of the {n} body bytes "
                               "that Content-Length announced; send the whole body",
                               code="incomplete_body")
            chunks.append(chunk)
            got += len(chunk)
    finally:
        connection.settimeout(old_timeout)
    return b"".join(chunks)


def _short_body(got: int, n: int, why: str) -> ApiError:
    return ApiError(408, f"request body {why}: got {got} of the {n} bytes that Content-Length "
                    "announced; send the whole body, or a Content-Length that matches it",
                    code="request_timeout")


# --- the JSON ------------------------------------------------------------------------------

def json_value_bound(body: bytes) -> int:
    """An upper bound on the number of JSON values in ``body``, from three byte counts.

    Every value is the top one or an element of an array/object, and a container with k
    elements holds k - 1 commas, so values <= 1 + commas + containers; brackets and commas
    inside strings only make the bound looser. Parsed values cost ~50-100 bytes each while
    their text costs 2-3, so this is what keeps a 32 MB body of ``[{},{},...]`` (11 million
    dicts, 0.8 GB, 4 s to parse) from being parsed at all.
    """
    return 1 + body.count(b",") + body.count(b"{") + body.count(b"[")


def parse_json(body: bytes, max_values: int):
    """The parsed body, or ApiError(400) for anything that is not reasonable JSON: bad syntax,
    an integer of more than 4300 digits, nesting deeper than Python recurses, more than
    ``max_values`` values."""
    values = json_value_bound(body)
    if values > max_values:
        raise ApiError(400, f"the request body holds up to {values} JSON values (commas and "
                       f"brackets), over the limit of {max_values}; a chat request needs a few "
                       "per message", code="request_too_complex")
    try:
        return json.loads(body)
    except RecursionError:
        raise ApiError(400, "request body is not valid JSON: nested too deeply") from None
    except json.JSONDecodeError as exc:
        raise ApiError(400, f"request body is not valid JSON ({exc})") from None
    except ValueError:  # Python refuses to parse integers of more than 4300 digits
        raise ApiError(400, "request body is not valid JSON for this server: it holds a number of "
                       "more than 4300 digits; no field takes one") from None


# --- the prompt ----------------------------------------------------------------------------

def chars_per_token(tokenizer, cap: int) -> int:
    """How many characters one token can stand for at most, as used by :func:`check_prompt_size`:
    the longest string in the vocabulary (byte-level BPE and SentencePiece vocabularies spell
    each character with at least one symbol, so this is an upper bound), but at most ``cap``,
    for vocabularies with very long tokens or tokenizers that drop characters."""
    try:
        longest = max(map(len, tokenizer.get_vocab()), default=cap)
    except Exception:  # a tokenizer without a readable vocabulary: the cap alone
        longest = cap
    return max(1, min(cap, longest))


def check_prompt_size(messages: list[dict], n_images: int, context: int, per_token: int) -> None:
    """ApiError(400, context_length_exceeded) when the prompt cannot fit the context, judged
    from its size alone, before any template or tokenizer runs (4 MB of text took 12 s to
    tokenize; this takes microseconds).

    Lower bound on the prompt's tokens: its characters / ``per_token``, plus one per message
    (every chat template marks a turn with at least one token) and one per image. One token
    of room must stay for the answer. A prompt that passes is still counted exactly after
    tokenizing.
    """
    chars = sum(len(p.get("text", "")) for m in messages for p in m["content"])
    least = math.ceil(chars / per_token) + len(messages) + n_images
    if least >= context:
        raise ApiError(400, f"the prompt is too long for the model's context of {context} tokens: "
                       f"{chars} characters in {len(messages)} message(s) and {n_images} image(s) "
                       f"take at least {least} tokens (at most {per_token} characters per token); "
                       "shorten it", param="messages", code="context_length_exceeded")


# --- the API key ---------------------------------------------------------------------------

def check_api_key(authorization: str | None, key: str | None) -> None:
    """ApiError(401) unless ``authorization`` is ``Bearer <key>`` (no key set: anything goes).
    Compared in constant time, so the answer's timing says nothing about the key."""
    if not key:
        return
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
        what = "a wrong API key" if given else "no API key"
        raise ApiError(401, f"{what} in the Authorization header; send 'Authorization: Bearer "
                       f"<key>' with the key this server was started with (--api-key or "
                       f"{API_KEY_ENV})", code="invalid_api_key")


def exposure_warning(host: str, key: str | None) -> str | None:
    """The warning to print when the server binds beyond the loopback without an API key."""
    if key:
        return None
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if loopback:
        return None
    return (f"warning: serving on {host} without an API key: anyone who can reach this port can "
            f"use the model; set --api-key KEY or {API_KEY_ENV}, or bind 127.0.0.1")
