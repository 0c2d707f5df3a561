"""The demo's stand-in for OpenAI: streamed chat completions and a Realtime echo on one TLS host:port.

It is the test suite's fake upstream (tests/fake_upstream.py, tests/fake_realtime.py) with a chat route
that streams its answer word by word, slowly enough to watch, and that, like OpenAI, refuses any key
but the one the demo minted its tokens with. Its certificate comes from a throwaway CA, which SOAKP
is told to trust with --upstream-ca: the demo's upstream TLS is verified like the real one.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT / "tests") not in sys.path:
    sys.path.insert(0, str(ROOT / "tests"))

from fake_realtime import FakeRealtime  # noqa: E402
from fake_upstream import (  # noqa: E402
    CertAuthority,
    FakeUpstream,
    RecordedRequest,
    Responder,
    openai_error,
)

WORD_PAUSE_S = 0.08  # between streamed words: fast, yet visibly a stream


@dataclass
class FakeOpenAI:
    upstream: FakeUpstream
    realtime: FakeRealtime
    ca_path: Path

    @property
    def url(self) -> str:
        return self.upstream.url

    def stop(self) -> None:
        self.upstream.stop()


def reply_text(user_text: str) -> str:
    return f"Hello from the fake OpenAI, streamed through SOAKP word by word. You said: {user_text}"


def chat_route(key: str) -> Any:
    """POST /v1/chat/completions: stream the reply as SSE, one word per event (or whole, without stream)."""

    async def behaviour(request: RecordedRequest, responder: Responder) -> None:
        if request.header("authorization") != f"Bearer {key}":
            await openai_error(401, "Incorrect API key provided.", code="invalid_api_key")(request, responder)
            return
        body = request.json()
        user_text = next((m.get("content") for m in reversed(body.get("messages") or [])
                          if m.get("role") == "user" and isinstance(m.get("content"), str)), "")
        model = body.get("model", "gpt-4o-mini")
        words = reply_text(user_text).split(" ")
        ident = f"chatcmpl-demo{time.monotonic_ns()}"

        def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            return {"id": ident, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

        if not body.get("stream"):
            message = {"role": "assistant", "content": " ".join(words), "refusal": None}
            await responder.reply_json(200, {
                "id": ident, "object": "chat.completion", "created": int(time.time()), "model": model,
                "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 5, "completion_tokens": len(words), "total_tokens": 5 + len(words)},
            })
            return
        await responder.send_head(200, [("Content-Type", "text/event-stream; charset=utf-8"),
                                        ("Cache-Control", "no-cache"), ("Transfer-Encoding", "chunked"),
                                        ("x-request-id", ident)])
        events = [chunk({"role": "assistant", "content": ""})]
        events += [chunk({"content": word if i == 0 else " " + word}) for i, word in enumerate(words)]
        events.append(chunk({}, "stop"))
        for event in events:
            await responder.send(b"data: " + json.dumps(event).encode() + b"\n\n")
            await asyncio.sleep(WORD_PAUSE_S)
        await responder.send(b"data: [DONE]\n\n")
        await responder.end()

    return behaviour


def start_fake_openai(directory: Path, key: str) -> FakeOpenAI:
    """Start the fake on 127.0.0.1, port 0, with a CA and certificate written under `directory`."""
    ca = CertAuthority(directory / "fake-openai-ca")
    cert_path, key_path = ca.issue("fake-openai")
    upstream = FakeUpstream(cert_path, key_path).start()
    upstream.script("/v1/chat/completions", chat_route(key))
    realtime = FakeRealtime(expected_key=key).install(upstream)
    return FakeOpenAI(upstream, realtime, ca.ca_path)
