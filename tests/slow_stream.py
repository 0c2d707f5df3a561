"""A slow SSE stream and a client that watches it, for the deployment tests (shutdown, certificate swaps).

`ticking_sse(finish)` is a fake-upstream behaviour that sends an event every 50 ms until the test opens
`finish`; `StreamWatcher` reads that stream through SOAKP in a thread of its own and notes when each
event arrived, so a test can do other things (send SIGTERM, renew the certificate) while it flows.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
import time
from collections.abc import Callable

from cryptography import x509

from fake_upstream import Behaviour, Gate, RawConnection, RawResponse, RecordedRequest, Responder, parse_response

TICK_S = 0.05
MAX_TICKS = 1200  # 60 s of events: a test that never opens `finish` still ends


def ticking_sse(finish: Gate, tick_s: float = TICK_S, max_ticks: int = MAX_TICKS) -> Behaviour:
    """Answer with a chunked SSE stream: `data: {"n": N}` every tick_s until `finish` opens, then [DONE]."""

    async def behaviour(request: RecordedRequest, responder: Responder) -> None:
        await responder.send_head(200, [("Content-Type", "text/event-stream"), ("Transfer-Encoding", "chunked")])
        for n in range(max_ticks):
            await responder.send(b'data: {"n": %d}\n\n' % n)
            if finish.is_open:
                break
            await asyncio.sleep(tick_s)
        await responder.send(b"data: [DONE]\n\n")
        await responder.end()

    return behaviour


class StreamWatcher:
    """Reads one streamed response off `conn` in a background thread, noting when each event arrives.

    The connection belongs to the watcher from start() on: the test must not touch it until join().
    """

    def __init__(self, conn: RawConnection, timeout_s: float = 60.0) -> None:
        self.conn = conn
        self.timeout_s = timeout_s
        self.arrivals: list[float] = []  # time.monotonic() of each `data: {"n"` event
        self.response: RawResponse | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="stream-watcher", daemon=True)

    def start(self, request: bytes) -> StreamWatcher:
        self.conn.send(request)
        self._thread.start()
        return self

    def _note(self, data: bytes) -> bool:
        now = time.monotonic()
        self.arrivals.extend([now] * (data.count(b'data: {"n"') - len(self.arrivals)))
        return parse_response(data, eof=False, method="POST") is not None

    def _run(self) -> None:
        try:
            self.conn.read_until(self._note, timeout_s=self.timeout_s)
            self.response = self.conn.read_response("POST", timeout_s=1)
        except BaseException as exc:  # handed to the test thread by join()
            self.error = exc

    def wait_events(self, count: int, timeout_s: float = 10.0) -> None:
        """Wait until `count` events have arrived in all. Raises AssertionError on timeout or a dead stream."""
        wait_until(lambda: len(self.arrivals) >= count or not self._thread.is_alive(), timeout_s)
        assert len(self.arrivals) >= count, f"only {len(self.arrivals)} events; error: {self.error!r}"

    def join(self, timeout_s: float = 15.0) -> RawResponse:
        """Wait for the end of the response and return it. Raises AssertionError if the read failed."""
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), f"the stream did not end within {timeout_s}s"
        assert self.error is None and self.response is not None, f"the stream failed: {self.error!r}"
        return self.response


def wait_until(predicate: Callable[[], bool], timeout_s: float, interval_s: float = 0.05) -> bool:
    """Poll predicate() until it holds or timeout_s passes. Returns its last value."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval_s)
    return True


def peer_serial(conn: RawConnection) -> int:
    """The serial number of the certificate the server presented on a TLS connection."""
    assert isinstance(conn.sock, ssl.SSLSocket)
    der = conn.sock.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number
