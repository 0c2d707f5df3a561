"""Graceful shutdown (SPEC.md: --shutdown-grace; 503 shutting down): SOAKP as a subprocess, signalled for real.

On SIGTERM or SIGINT SOAKP stops accepting connections, lets in-flight requests and streams finish
within the grace period, answers a new request on an already-open connection with 503 and closes
that connection, then exits 0. A stream still running when the grace period ends is cut off.
"""

from __future__ import annotations

import signal
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest

from fake_upstream import FakeUpstream, Gate, build_request
from slow_stream import StreamWatcher, ticking_sse, wait_until

if TYPE_CHECKING:
    from conftest import SoakpProcess

STREAM_BODY = b'{"model":"gpt-fake-1","stream":true,"messages":[{"role":"user","content":"tick"}]}'


def stream_request(token: str) -> bytes:
    return build_request(
        "POST",
        "/v1/chat/completions",
        [("Authorization", f"Bearer {token}"), ("Content-Type", "application/json"), ("Accept", "text/event-stream")],
        STREAM_BODY,
    )


def refuses_connections(port: int) -> bool:
    """Whether a new TCP connection to the port is refused (the listening socket is closed)."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_lets_a_slow_stream_finish_and_answers_503_on_an_open_idle_connection(
    soakp: Callable[..., SoakpProcess], fake_upstream: FakeUpstream, signum: signal.Signals
) -> None:
    """During the grace period: the stream keeps flowing and ends whole, a new connection is refused,
    a new request on an idle keep-alive connection gets 503 `shutting_down` and that connection
    closes; once the stream is done SOAKP exits 0."""
    proxy = soakp(shutdown_grace="30s")
    token = proxy.mint()
    finish = Gate()
    fake_upstream.script("/v1/chat/completions", ticking_sse(finish))
    idle = proxy.connect()
    try:
        idle.send(build_request("GET", "/healthz"))
        assert idle.read_response().status == 200
        stream = StreamWatcher(proxy.connect()).start(stream_request(token))
        stream.wait_events(3)

        proxy.popen.send_signal(signum)
        assert wait_until(lambda: refuses_connections(proxy.port), 5), "still accepting connections after the signal"
        assert proxy.alive, "exited with a stream in flight"

        idle.send(build_request("GET", "/v1/models", [("Authorization", f"Bearer {token}")]))
        answer = idle.read_response()
        assert answer.status == 503, answer.body
        assert answer.json()["error"]["code"] == "shutting_down"
        assert answer.header("retry-after") == "1"
        assert (answer.header("connection") or "").lower() == "close"
        assert idle.wait_closed(5), "the idle connection stayed open after its 503"

        seen = len(stream.arrivals)
        stream.wait_events(seen + 3)  # still streaming after the signal
        assert proxy.alive
    finally:
        finish.open()
        idle.close()
    response = stream.join()
    assert response.status == 200 and response.complete and response.chunked
    assert response.body.endswith(b"data: [DONE]\n\n")
    assert response.body.count(b'data: {"n"') == len(stream.arrivals)
    assert proxy.popen.wait(10) == 0
    assert "shutting down: no new connections, 1 requests in flight" in proxy.log_text()
    assert fake_upstream.errors == []


def test_a_stream_longer_than_the_grace_period_is_cut_and_soakp_still_exits_0(
    soakp: Callable[..., SoakpProcess], fake_upstream: FakeUpstream
) -> None:
    """--shutdown-grace 1s: a stream that has not ended by then is closed unfinished (the client sees a
    truncated body, never an invented end), and SOAKP exits 0 about a second after SIGTERM."""
    proxy = soakp(shutdown_grace="1s")
    token = proxy.mint()
    finish = Gate()
    fake_upstream.script("/v1/chat/completions", ticking_sse(finish))
    try:
        stream = StreamWatcher(proxy.connect()).start(stream_request(token))
        stream.wait_events(3)
        proxy.popen.send_signal(signal.SIGTERM)
        assert proxy.popen.wait(10) == 0
        response = stream.join()
    finally:
        finish.open()
    assert response.status == 200
    assert not response.complete
    assert b"[DONE]" not in response.body
    assert "shutdown grace over: closing 1 unfinished requests" in proxy.log_text()
