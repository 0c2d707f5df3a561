"""Scripted upstream behaviours that report token usage the way OpenAI does, for test_usage.py,
test_access_log.py and test_metrics.py (plug them into FakeUpstream.script()).

Every behaviour here is deterministic (fixed ids and timestamps), so a test can compute the exact bytes
it sends, and it also records what it sent in a `Sent` log, so a test can compare hashes of what the
upstream sent and what the client received.

OpenAI's shapes, as the API sends them (compact JSON, `data: ...` + blank line per SSE event):
- Chat Completions, `stream: true` with `stream_options.include_usage`: every chunk carries
  `"usage":null`, then a last chunk with `"choices":[]` and the usage, then `data: [DONE]`.
- Responses API, `stream: true`: named events (`event: response.created` ...); only the last,
  `response.completed`, carries `response.usage` with input/output tokens; no `[DONE]`.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import threading
import zlib
from typing import Any

from fake_upstream import Behaviour, Gate, RecordedRequest, Responder

CREATED = 1700000000
CHAT_ID = "chatcmpl-obs0001"
REQUEST_ID = "req_obs_0001"
PIECES = ("Hel", "lo the", "re!")


def compact(document: Any) -> bytes:
    """JSON the way OpenAI writes it: no spaces."""
    return json.dumps(document, separators=(",", ":")).encode()


def spaced(document: Any) -> bytes:
    """JSON the way Python's json.dumps writes it by default (as some OpenAI-compatible servers do)."""
    return json.dumps(document).encode()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Sent:
    """The body bytes each scripted answer sent (framing excluded), in order; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._bodies: list[bytes] = []

    def add(self, body: bytes) -> None:
        with self._lock:
            self._bodies.append(body)

    @property
    def bodies(self) -> list[bytes]:
        with self._lock:
            return list(self._bodies)

    @property
    def last(self) -> bytes:
        bodies = self.bodies
        assert bodies, "the scripted upstream has not answered yet"
        return bodies[-1]


def usage_object(prompt: int, completion: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
    }


# Chat Completions ##########################################################################################


def chat_completion(model: str, prompt: int, completion: int, text: str = "Hello there!") -> bytes:
    """A non-streamed chat completion body."""
    return compact({
        "id": CHAT_ID,
        "object": "chat.completion",
        "created": CREATED,
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                     "logprobs": None, "finish_reason": "stop"}],
        "usage": usage_object(prompt, completion),
        "system_fingerprint": "fp_obs",
    })


def chat_stream_events(model: str, include_usage: bool, prompt: int, completion: int,
                       pieces: tuple[str, ...] = PIECES, dump: Any = compact) -> list[bytes]:
    """The SSE events of a streamed chat completion, `[DONE]` included, as OpenAI sends them (`dump`
    writes each event's JSON)."""

    def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
        document: dict[str, Any] = {
            "id": CHAT_ID, "object": "chat.completion.chunk", "created": CREATED, "model": model,
            "system_fingerprint": "fp_obs",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if include_usage:
            document["usage"] = None
        return document

    documents = [chunk({"role": "assistant", "content": "", "refusal": None}, None)]
    documents += [chunk({"content": piece}, None) for piece in pieces]
    documents.append(chunk({}, "stop"))
    if include_usage:
        documents.append({"id": CHAT_ID, "object": "chat.completion.chunk", "created": CREATED, "model": model,
                          "system_fingerprint": "fp_obs", "choices": [], "usage": usage_object(prompt, completion)})
    return [b"data: " + dump(d) + b"\n\n" for d in documents] + [b"data: [DONE]\n\n"]


def wants_usage(request: RecordedRequest) -> bool:
    options = request.json().get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def chat_stream(sent: Sent, prompt: int, completion: int, *, framing: str = "chunked", piece_bytes: int | None = None,
                gate: Gate | None = None, hold_before: int = 2, usage_anyway: bool = False,
                dump: Any = compact) -> Behaviour:
    """A streamed chat completion that honours `stream_options.include_usage` as OpenAI does.

    framing: "chunked" (as OpenAI) or "length" (one Content-Length body). piece_bytes: send the body in
    pieces of that many bytes instead of one event per piece, so events straddle reads. With a gate,
    event number `hold_before` is withheld until the test opens it. usage_anyway: report usage even
    when it was not asked for (some OpenAI-compatible servers do). dump: how each event's JSON is written.
    """

    async def behaviour(request: RecordedRequest, responder: Responder) -> None:
        include = wants_usage(request) or usage_anyway
        events = chat_stream_events(request.json().get("model", "gpt-fake"), include, prompt, completion, dump=dump)
        body = b"".join(events)
        sent.add(body)
        head = [("Content-Type", "text/event-stream; charset=utf-8"), ("Cache-Control", "no-cache"),
                ("x-request-id", REQUEST_ID), ("openai-processing-ms", "7")]
        head.append(("Transfer-Encoding", "chunked") if framing == "chunked" else ("Content-Length", str(len(body))))
        await responder.send_head(200, head)
        if piece_bytes is not None:
            pieces = [body[i:i + piece_bytes] for i in range(0, len(body), piece_bytes)]
        else:
            pieces = events
        for index, piece in enumerate(pieces):
            if gate is not None and index == hold_before:
                await responder.flush()
                gate.reached.set()
                if not await gate.wait(30.0):
                    await responder.abort()
                    return
            await responder.send(piece)
        await responder.end()

    return behaviour


# Responses API #############################################################################################


def response_object(model: str, status: str, text: str, usage: dict[str, Any] | None) -> dict[str, Any]:
    output = [] if status != "completed" else [{
        "type": "message", "id": "msg_obs", "status": "completed", "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    }]
    return {
        "id": "resp_obs", "object": "response", "created_at": CREATED, "status": status, "model": model,
        "output": output, "parallel_tool_calls": True, "tool_choice": "auto", "tools": [], "temperature": 1.0,
        "top_p": 1.0, "error": None, "incomplete_details": None, "instructions": None, "metadata": {},
        "usage": usage,
    }


def responses_usage(input_tokens: int, output_tokens: int) -> dict[str, Any]:
    return {"input_tokens": input_tokens, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens + output_tokens}


def responses_stream_events(model: str, input_tokens: int, output_tokens: int, text: str = "Hello there!") -> list[bytes]:
    """A streamed Responses API answer: named events, usage only in `response.completed`."""
    documents: list[tuple[str, dict[str, Any]]] = [
        ("response.created", {"response": response_object(model, "in_progress", "", None)}),
        ("response.in_progress", {"response": response_object(model, "in_progress", "", None)}),
    ]
    for piece in (text[:5], text[5:]):
        documents.append(("response.output_text.delta", {"item_id": "msg_obs", "output_index": 0,
                                                         "content_index": 0, "delta": piece}))
    documents.append(("response.output_text.done", {"item_id": "msg_obs", "output_index": 0, "content_index": 0,
                                                    "text": text}))
    documents.append(("response.completed", {"response": response_object(
        model, "completed", text, responses_usage(input_tokens, output_tokens))}))
    return [b"event: " + name.encode() + b"\ndata: " + compact({"type": name, "sequence_number": n, **fields})
            + b"\n\n" for n, (name, fields) in enumerate(documents)]


def responses_stream(sent: Sent, input_tokens: int, output_tokens: int) -> Behaviour:
    async def behaviour(request: RecordedRequest, responder: Responder) -> None:
        events = responses_stream_events(request.json().get("model", "gpt-fake"), input_tokens, output_tokens)
        sent.add(b"".join(events))
        await responder.send_head(200, [("Content-Type", "text/event-stream; charset=utf-8"),
                                        ("Transfer-Encoding", "chunked"), ("x-request-id", REQUEST_ID)])
        for event in events:
            await responder.send(event)
        await responder.end()

    return behaviour


def response_completed(model: str, input_tokens: int, output_tokens: int) -> bytes:
    """A non-streamed Responses API body."""
    return compact(response_object(model, "completed", "Hello there!", responses_usage(input_tokens, output_tokens)))


# Whole bodies ##############################################################################################


def encode(body: bytes, encoding: str | None) -> bytes:
    if encoding == "gzip":
        return gzip.compress(body, mtime=0)
    if encoding == "deflate":  # HTTP's "deflate" is the zlib format (RFC 9110 §8.4.1.2)
        return zlib.compress(body)
    return body


def exact_reply(sent: Sent, body: bytes, *, encoding: str | None = None, status: int = 200,
                content_type: str = "application/json", chunked: bool = False) -> Behaviour:
    """Answer with exactly `body` (compressed with `encoding` when given); records the bytes sent."""
    wire = encode(body, encoding)

    async def behaviour(request: RecordedRequest, responder: Responder) -> None:
        sent.add(wire)
        head = [("Content-Type", content_type), ("x-request-id", REQUEST_ID)]
        if encoding:
            head.append(("Content-Encoding", encoding))
        if chunked:
            await responder.send_head(status, [*head, ("Transfer-Encoding", "chunked")])
            for i in range(0, len(wire), 1000):
                await responder.send(wire[i:i + 1000])
            await responder.end()
        else:
            await responder.reply(status, wire, head)

    return behaviour



def gated_reply(pieces: list[bytes], headers: list[tuple[str, str]], gate: Gate) -> Behaviour:
    """A chunked 200 that sends pieces[0], waits at the gate, then sends the rest."""

    async def behaviour(request: RecordedRequest, responder: Responder) -> None:
        await responder.send_head(200, [*headers, ("Transfer-Encoding", "chunked")])
        await responder.send(pieces[0])
        await responder.flush()
        gate.reached.set()
        if not await gate.wait(30.0):
            await responder.abort()
            return
        for piece in pieces[1:]:
            await responder.send(piece)
        await responder.end()

    return behaviour

# Reading SOAKP's own account: GET /jwt and GET /metrics ####################################################


def admin_get(proxy: Any, path: str) -> Any:
    """GET an admin endpoint of a SoakpProcess with its admin Basic credentials; asserts 200."""
    from conftest import basic_auth

    response = proxy.request("GET", path, headers=[("Authorization", basic_auth(*proxy.admin))])
    assert response.status == 200, f"GET {path}: {response.status} {response.body[:300]!r}"
    return response


def token_row(proxy: Any, jti: str) -> dict[str, Any]:
    """The GET /jwt row of one token."""
    rows = [row for row in admin_get(proxy, "/jwt").json()["data"] if row["jti"] == jti]
    assert len(rows) == 1, f"GET /jwt has {len(rows)} rows for {jti}"
    return rows[0]


def scrape(proxy: Any) -> dict[str, Any]:
    """GET /metrics parsed by prometheus_client's own parser: {family name: Metric}."""
    from prometheus_client.parser import text_string_to_metric_families

    text = admin_get(proxy, "/metrics").body.decode("utf-8")
    return {family.name: family for family in text_string_to_metric_families(text)}


def sample_value(families: dict[str, Any], sample_name: str, **labels: str) -> float:
    """The value of the sample with exactly these labels (0 when there is none yet)."""
    family_name = sample_name
    for suffix in ("_total", "_bucket", "_count", "_sum"):
        if family_name.endswith(suffix) and family_name[: -len(suffix)] in families:
            family_name = family_name[: -len(suffix)]
            break
    family = families.get(family_name)
    if family is None:
        return 0.0
    found = [s.value for s in family.samples if s.name == sample_name and s.labels == labels]
    assert len(found) <= 1, f"{sample_name}{labels} appears {len(found)} times"
    return found[0] if found else 0.0
