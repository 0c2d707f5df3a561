"""A fake OpenAI Realtime API (WebSocket), served by FakeUpstream, for SOAKP's tests and the browser demo.

FakeRealtime is a FakeUpstream behaviour for `GET /v1/realtime`: FakeUpstream records the handshake
request like any other (method, target, every header in arrival order), then FakeRealtime completes
the opening handshake with the `websockets` package's sans-I/O `ServerProtocol`, which validates it as a
real server does, answers pings and runs the closing handshake. After the 101 it sends `session.created`
(unless told not to) and echoes every text and binary message back unchanged.

A client steers it with text messages whose JSON `type` starts with `fake.` (recorded, not echoed):
  {"type": "fake.close", "code": 4001, "reason": "..."}   close with that code and reason
  {"type": "fake.abort"}                                   drop the TCP connection with a reset
  {"type": "fake.eof"}                                     close TCP without a close frame
  {"type": "fake.ping", "data": "..."}                     send a ping (the client's pong is recorded)

Because it is one more route of FakeUpstream, chat completions (SSE) and the Realtime API share one
host:port, as they do at OpenAI: SOAKP takes one --upstream. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from websockets.extensions.permessage_deflate import ServerPerMessageDeflateFactory
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.server import ServerProtocol

from fake_upstream import FakeUpstream, RecordedRequest, Responder

REALTIME_PATH = "/v1/realtime"
KEY_PROTOCOL = "openai-insecure-api-key."  # how browsers, which cannot set headers, pass a key
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
READ_PIECE_BYTES = 64 * 1024
SESSION_LIMIT_S = 120.0  # a fake session never outlives this, whatever the client does
CLOSE_WAIT_S = 5.0  # after sending a close frame, how long to wait for the client's

# Which subprotocol the fake picks from the client's offer:
#   "realtime"  "realtime" when offered, else none (what OpenAI does)
#   "none"      never one
#   "key"       the offer that carries the key: an upstream that echoes the credential back
SubprotocolChoice = Literal["realtime", "none", "key"]


@dataclass(eq=False)
class RealtimeSession:
    """One WebSocket session as the fake saw it.

    `messages` holds every data message received, in order (str for text, bytes for binary), fake.*
    commands included. `client_close` is the (code, reason) of the close frame the client sent, if any;
    `end` says how the session ended: "closed" (closing handshake done), "eof" (TCP closed without a
    close frame), "reset", "aborted" (by fake.abort), "eof_sent" (by fake.eof), "refused", "timeout".
    """

    request: RecordedRequest
    offered: list[str]
    started_at: float = field(default_factory=time.monotonic)
    subprotocol: str | None = None
    extensions: str | None = None
    accepted: bool = False
    messages: list[str | bytes] = field(default_factory=list)
    pings: list[bytes] = field(default_factory=list)
    pongs: list[bytes] = field(default_factory=list)
    client_close: tuple[int | None, str] | None = None
    end: str | None = None

    @property
    def ended(self) -> bool:
        return self.end is not None

    def header(self, name: str) -> str | None:
        return self.request.header(name)

    def header_all(self, name: str) -> list[str]:
        return self.request.header_all(name)


def offered_subprotocols(request: RecordedRequest) -> list[str]:
    return [p.strip() for value in request.header_all("sec-websocket-protocol") for p in value.split(",") if p.strip()]


def session_created(model: str) -> dict[str, Any]:
    """The first server event of a Realtime session (a subset of OpenAI's)."""
    return {
        "type": "session.created",
        "event_id": f"event_fake{int(time.time() * 1000)}",
        "session": {"id": "sess_fake", "object": "realtime.session", "model": model, "modalities": ["text"]},
    }


class FakeRealtime:
    """The Realtime route of a FakeUpstream, and what it saw (thread-safe to read from tests).

    Use: `install(upstream)` (again after every `upstream.reset()`), connect through SOAKP, then
    `wait_for_session()` / `wait_until()` and assert on `sessions`.
    """

    def __init__(
        self,
        choose: SubprotocolChoice = "realtime",
        first_event: bool = True,
        expected_key: str | None = None,
        compression: bool = True,
    ) -> None:
        self.choose = choose
        self.first_event = first_event
        self.expected_key = expected_key  # when set, a handshake without this key gets a 401, as OpenAI's would
        self.compression = compression
        self._sessions: list[RealtimeSession] = []
        self._changed = threading.Condition()

    # What tests use

    def install(self, upstream: FakeUpstream, path: str = REALTIME_PATH) -> FakeRealtime:
        upstream.script(path, self)
        return self

    @property
    def sessions(self) -> list[RealtimeSession]:
        with self._changed:
            return list(self._sessions)

    def reset(self) -> None:
        with self._changed:
            self._sessions.clear()

    def wait_until(self, predicate: Callable[[], bool], timeout_s: float = 10.0) -> bool:
        """Wait until predicate() holds (re-checked on every change). Returns its last value."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(min(left, 0.1))
            return True

    def wait_for_session(self, index: int = 0, timeout_s: float = 10.0) -> RealtimeSession:
        if not self.wait_until(lambda: len(self._sessions) > index, timeout_s):
            raise AssertionError(f"the fake Realtime upstream got no session #{index} in {timeout_s}s")
        return self.sessions[index]

    def wait_ended(self, session: RealtimeSession, timeout_s: float = 10.0) -> str:
        if not self.wait_until(lambda: session.ended, timeout_s):
            raise AssertionError(f"the fake Realtime session did not end in {timeout_s}s")
        assert session.end is not None
        return session.end

    # The behaviour, run on FakeUpstream's loop

    def _changed_now(self) -> None:
        with self._changed:
            self._changed.notify_all()

    def _key_ok(self, session: RealtimeSession) -> bool:
        if self.expected_key is None:
            return True
        authorization = session.header("authorization")
        by_header = authorization == f"Bearer {self.expected_key}"
        by_protocol = KEY_PROTOCOL + self.expected_key in session.offered
        return by_header or by_protocol

    def _choose_subprotocol(self, offered: list[str]) -> str | None:
        if self.choose == "realtime":
            return "realtime" if "realtime" in offered else None
        if self.choose == "key":
            return next((p for p in offered if p.startswith(KEY_PROTOCOL)), None)
        return None

    async def __call__(self, request: RecordedRequest, responder: Responder) -> None:
        responder.keep_alive = False
        session = RealtimeSession(request, offered_subprotocols(request))
        with self._changed:
            self._sessions.append(session)
            self._changed.notify_all()
        try:
            await self._run(session, responder)
        except (ConnectionError, ssl.SSLError):
            session.end = session.end or "reset"
        finally:
            session.end = session.end or "eof"
            self._changed_now()

    async def _run(self, session: RealtimeSession, responder: Responder) -> None:
        if not self._key_ok(session):
            session.end = "refused"
            body = {"error": {"message": "Incorrect API key provided.", "type": "invalid_request_error",
                              "param": None, "code": "invalid_api_key"}}
            await responder.reply_json(401, body)
            await responder.close()
            return
        def select(protocol: ServerProtocol, offered: Any) -> str | None:
            return self._choose_subprotocol(list(offered))

        protocol = ServerProtocol(
            select_subprotocol=select,
            extensions=[ServerPerMessageDeflateFactory()] if self.compression else None,
            max_size=MAX_MESSAGE_BYTES,
        )
        protocol.receive_data(session.request.raw_head)
        events = protocol.events_received()
        if not events or not isinstance(events[0], Request):
            session.end = "refused"
            await self._flush(protocol, responder)
            return
        response: Response = protocol.accept(events[0])
        protocol.send_response(response)
        if response.status_code != 101:
            session.end = "refused"
            await self._flush(protocol, responder)
            return
        session.accepted = True
        session.subprotocol = protocol.subprotocol
        session.extensions = response.headers.get("Sec-WebSocket-Extensions")
        model = session.request.query.partition("model=")[2].split("&")[0] or "gpt-realtime"
        if self.first_event:
            protocol.send_text(json.dumps(session_created(model)).encode())
        self._changed_now()
        if await self._flush(protocol, responder):
            return
        await self._serve_frames(session, protocol, responder)

    async def _serve_frames(self, session: RealtimeSession, protocol: ServerProtocol, responder: Responder) -> None:
        deadline = time.monotonic() + SESSION_LIMIT_S
        close_deadline: float | None = None
        fragments: list[bytes] = []
        fragment_opcode: Opcode | None = None
        while True:
            limit = min(deadline, close_deadline) if close_deadline is not None else deadline
            left = limit - time.monotonic()
            try:
                if left <= 0:
                    raise asyncio.TimeoutError
                data = await asyncio.wait_for(responder.reader.read(READ_PIECE_BYTES), left)
            except asyncio.TimeoutError:
                session.end = "timeout"
                responder.writer.transport.abort()
                return
            if data:
                protocol.receive_data(data)
            else:
                protocol.receive_eof()
                session.end = session.end or ("closed" if session.client_close else "eof")
            for event in protocol.events_received():
                if not isinstance(event, Frame):
                    continue
                command = self._on_frame(session, protocol, event, fragments, fragment_opcode)
                fragment_opcode = command[1]
                if command[0] is not None:
                    if await self._command(session, protocol, responder, command[0]):
                        return
                    if protocol.state is State.CLOSING and close_deadline is None:
                        close_deadline = time.monotonic() + CLOSE_WAIT_S
            self._changed_now()
            if await self._flush(protocol, responder):
                session.end = session.end or "closed"
                return
            if not data or protocol.state is State.CLOSED:
                return

    def _on_frame(
        self,
        session: RealtimeSession,
        protocol: ServerProtocol,
        frame: Frame,
        fragments: list[bytes],
        fragment_opcode: Opcode | None,
    ) -> tuple[dict[str, Any] | None, Opcode | None]:
        """Record one frame and echo a complete data message. Returns (fake.* command or None, opcode of an
        unfinished fragmented message)."""
        opcode = frame.opcode
        if opcode is Opcode.PING:
            session.pings.append(bytes(frame.data))
            return None, fragment_opcode
        if opcode is Opcode.PONG:
            session.pongs.append(bytes(frame.data))
            return None, fragment_opcode
        if opcode is Opcode.CLOSE:
            close = protocol.close_rcvd
            session.client_close = (close.code, close.reason) if close is not None else (None, "")
            return None, fragment_opcode
        if opcode in (Opcode.TEXT, Opcode.BINARY):
            fragment_opcode = opcode
            fragments.clear()
        fragments.append(bytes(frame.data))
        if not frame.fin:
            return None, fragment_opcode
        payload = b"".join(fragments)
        fragments.clear()
        if fragment_opcode is Opcode.TEXT:
            text = payload.decode("utf-8")
            session.messages.append(text)
            command = _fake_command(text)
            if command is not None:
                return command, None
            if protocol.state is State.OPEN:
                protocol.send_text(payload)
        else:
            session.messages.append(payload)
            if protocol.state is State.OPEN:
                protocol.send_binary(payload)
        return None, None

    async def _command(
        self, session: RealtimeSession, protocol: ServerProtocol, responder: Responder, command: dict[str, Any]
    ) -> bool:
        """Carry out a fake.* command. Returns True when the connection is gone."""
        kind = command["type"]
        if kind == "fake.close" and protocol.state is State.OPEN:
            protocol.send_close(int(command.get("code", 1000)), str(command.get("reason", "")))
        elif kind == "fake.ping" and protocol.state is State.OPEN:
            protocol.send_ping(str(command.get("data", "")).encode())
        elif kind == "fake.abort":
            session.end = "aborted"
            await responder.abort()
            return True
        elif kind == "fake.eof":
            session.end = "eof_sent"
            await responder.close()
            return True
        return False

    async def _flush(self, protocol: ServerProtocol, responder: Responder) -> bool:
        """Write what the protocol has to send. Returns True when it asked to close the connection."""
        for data in protocol.data_to_send():
            if data:
                responder.writer.write(data)
            else:  # SEND_EOF: the server closes TCP first (RFC 6455 §7.1.1); TLS cannot half-close
                await responder.close()
                return True
        await responder.writer.drain()
        return False


def _fake_command(text: str) -> dict[str, Any] | None:
    if not text.startswith("{") or '"fake.' not in text:
        return None
    try:
        message = json.loads(text)
    except ValueError:
        return None
    if isinstance(message, dict) and str(message.get("type", "")).startswith("fake."):
        return message
    return None
