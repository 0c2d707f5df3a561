"""Resources under hostile load: a client that leaves mid-stream frees the upstream promptly, the
connection cap answers 503, slow heads and bodies time out, and a burst of good and bad traffic leaves no
socket or file descriptor behind.

Socket ownership is read from the kernel: /proc/PID/fd gives SOAKP's socket inodes, /proc/net/tcp says
which of them face clients (local port = SOAKP's) and which face the upstream (remote port = the
upstream's). After every client has gone, SOAKP may keep only its listener and idle keep-alive
connections to the upstream, at most as many as were ever in flight at once.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from fake_upstream import FakeUpstream, RecordedRequest, Responder, build_request, die_mid_body, stall
from fault_servers import collect, open_fds

if TYPE_CHECKING:
    from conftest import SoakpProcess

CLOSE_NOTICED_S = 2.0  # SOAKP looks every 0.5 s while the upstream is silent; on the next write otherwise


# Helpers ####################################################################################################


def hold_stream(closed_at: list[float], tick_s: float | None, max_s: float = 15.0):
    """An SSE answer that sends one event, then either stays silent (tick_s None) or sends an event every
    tick_s, until SOAKP closes the connection; the time it noticed goes into closed_at."""

    async def behaviour(request: RecordedRequest, responder: Responder) -> None:
        responder.keep_alive = False
        await responder.send_head(200, [("Content-Type", "text/event-stream"), ("Transfer-Encoding", "chunked")])
        await responder.send(b"data: first\n\n")
        deadline = time.monotonic() + max_s
        while time.monotonic() < deadline:
            try:
                if tick_s is not None:
                    await responder.send(b"data: tick\n\n")
                data = await asyncio.wait_for(responder.reader.read(65536), tick_s or 0.05)
            except asyncio.TimeoutError:
                continue
            except (ConnectionError, ssl.SSLError):
                data = b""
            if not data:
                closed_at.append(time.monotonic())
                return

    return behaviour


def silent_before_head(closed_at: list[float], max_s: float = 15.0):
    """Never answer; note when SOAKP closes the connection."""

    async def behaviour(request: RecordedRequest, responder: Responder) -> None:
        responder.keep_alive = False
        deadline = time.monotonic() + max_s
        while time.monotonic() < deadline:
            try:
                data = await asyncio.wait_for(responder.reader.read(65536), 0.05)
            except asyncio.TimeoutError:
                continue
            except (ConnectionError, ssl.SSLError):
                data = b""
            if not data:
                closed_at.append(time.monotonic())
                return

    return behaviour


def auth(token: str) -> tuple[str, str]:
    return ("Authorization", f"Bearer {token}")


def read_until(sock: socket.socket, marker: bytes, timeout_s: float = 10.0) -> bytes:
    sock.settimeout(timeout_s)
    data = b""
    deadline = time.monotonic() + timeout_s
    while marker not in data and time.monotonic() < deadline:
        piece = sock.recv(65536)
        if not piece:
            break
        data += piece
    return data


def wait_for_eof(sock: socket.socket, timeout_s: float) -> tuple[bytes, float | None]:
    """Read until EOF or timeout_s. Returns (bytes read, when EOF came or None)."""
    sock.settimeout(0.1)
    data = b""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            piece = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return data, time.monotonic()
        if not piece:
            return data, time.monotonic()
        data += piece
    return data, None


@dataclass
class SocketCensus:
    """SOAKP's sockets by what they face."""

    clients: int  # accepted connections still open
    upstream: int  # connections to the upstream (in use or idle in the pool)
    other_fds: int  # everything that is not a TCP socket: files, pipes, the event loop's own

    @property
    def total(self) -> int:
        return self.clients + self.upstream + self.other_fds


def tcp_table() -> dict[int, tuple[int, int, int]]:
    """inode -> (local port, remote port, state) for every IPv4/IPv6 TCP socket on the machine."""
    table = {}
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, remote, state, inode = fields[1], fields[2], int(fields[3], 16), int(fields[9])
            table[inode] = (int(local.rsplit(":", 1)[1], 16), int(remote.rsplit(":", 1)[1], 16), state)
    return table


TCP_LISTEN = 0x0A


def census(pid: int, soakp_port: int, upstream_port: int) -> SocketCensus:
    targets = open_fds(pid)
    table = tcp_table()
    clients = upstream = other = 0
    for target in targets:
        if target.startswith("socket:["):
            entry = table.get(int(target[8:-1]))
            if entry is not None:
                local_port, remote_port, state = entry
                if local_port == soakp_port and state != TCP_LISTEN:
                    clients += 1
                    continue
                if remote_port == upstream_port:
                    upstream += 1
                    continue
                if state == TCP_LISTEN:
                    continue  # the listener is part of the fixed set
        other += 1
    return SocketCensus(clients, upstream, other)


def settled_census(server: SoakpProcess, upstream: FakeUpstream, timeout_s: float = 10.0) -> SocketCensus:
    """The census once client sockets have drained and it has been stable for half a second."""
    deadline = time.monotonic() + timeout_s
    last = census(server.pid, server.port, upstream.port)
    stable_since = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = census(server.pid, server.port, upstream.port)
        if now != last:
            last, stable_since = now, time.monotonic()
        elif now.clients == 0 and time.monotonic() - stable_since >= 0.5:
            return now
    return last


# 1. A client that leaves mid-stream frees the upstream ######################################################


@pytest.mark.parametrize("phase", ["silent mid-stream", "chatty mid-stream", "before the response head"])
def test_client_leaving_closes_the_upstream_connection_promptly(
    proxy: SoakpProcess, fake_upstream: FakeUpstream, token: str, phase: str
) -> None:
    """The client closes its connection while SOAKP relays (or waits for) an upstream answer: the upstream
    sees its connection closed within 2 s, so nobody keeps generating (and billing) tokens for no one."""
    closed_at: list[float] = []
    if phase == "before the response head":
        fake_upstream.script("/v1/fake/hold", silent_before_head(closed_at))
    else:
        fake_upstream.script("/v1/fake/hold", hold_stream(closed_at, None if phase.startswith("silent") else 0.05))
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    try:
        sock.sendall(build_request("POST", "/v1/fake/hold", [auth(token)], b'{"stream":true}'))
        if phase == "before the response head":
            fake_upstream.wait_for_request("/v1/fake/hold")
        else:
            assert b"data: first" in read_until(sock, b"data: first")
    finally:
        sock.close()
        left_at = time.monotonic()
    assert fake_upstream.wait_until(lambda: bool(closed_at), timeout_s=10), "the upstream connection was never closed"
    assert closed_at[0] - left_at < CLOSE_NOTICED_S, f"upstream closed {closed_at[0] - left_at:.2f}s after the client left"
    assert proxy.request("GET", "/v1/fake/echo/after", token).status == 200


# 2. The connection cap ######################################################################################


def test_connections_over_the_cap_get_503_and_the_cap_frees_up(soakp, fake_upstream: FakeUpstream) -> None:
    """With --max-connections 3, three open keep-alive connections fill the cap: a fourth gets 503 with
    Retry-After and is closed; the three keep working; once one leaves, a new connection is served."""
    server = soakp(max_connections="3")
    held = [server.connect(timeout_s=10) for _ in range(3)]
    try:
        for conn in held:
            conn.send(build_request("GET", "/healthz"))
            assert conn.read_response().status == 200
        outcome = collect(server.port, build_request("GET", "/healthz"), timeout_s=10)
        assert outcome.statuses == [503] and outcome.eof, outcome.statuses
        over = outcome.responses[0]
        assert over.header("retry-after") and over.json()["error"]["message"]
        for conn in held:  # still served
            conn.send(build_request("GET", "/healthz"))
            assert conn.read_response().status == 200
        held.pop().close()
        deadline = time.monotonic() + 5
        while True:
            if collect(server.port, build_request("GET", "/healthz", [("Connection", "close")])).statuses == [200]:
                break
            assert time.monotonic() < deadline, "the cap never freed up after a connection closed"
            time.sleep(0.05)
    finally:
        for conn in held:
            conn.close()


# 3. Slow clients ############################################################################################


@pytest.fixture
def impatient(soakp, fake_upstream: FakeUpstream) -> tuple[SoakpProcess, str]:
    """A SOAKP with --header-timeout 1s, and a token for it."""
    server = soakp(header_timeout="1s", shutdown_grace="1s")
    return server, server.mint()


def drip(port: int, prefix: bytes, data: bytes, interval_s: float, give_up_s: float) -> float | None:
    """Send `prefix`, then `data` one byte every interval_s (a period that divides the header timeout, so
    bytes keep arriving just as the timer is due). Returns seconds until the server closed, or None at
    give_up_s. A response before the close is allowed (a 408)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    started = time.monotonic()
    try:
        sock.sendall(prefix)
        if b"100-continue" in prefix:  # SOAKP starts its body timer as it says 100 Continue: start with it
            assert read_until(sock, b"\r\n\r\n").startswith(b"HTTP/1.1 100 ")
            started = time.monotonic()
        sock.settimeout(interval_s)
        for byte in data:
            if time.monotonic() - started > give_up_s:
                return None
            try:
                sock.sendall(bytes([byte]))
                answer = sock.recv(65536)
                if answer == b"":
                    return time.monotonic() - started
                assert answer.startswith(b"HTTP/1.1 408 "), answer[:100]
            except TimeoutError:
                pass
            except (BrokenPipeError, ConnectionResetError):
                return time.monotonic() - started
        return None
    finally:
        sock.close()


def slow_parts(token: str, what: str) -> tuple[bytes, bytes]:
    """(sent at once, then dripped) for each slow-client shape."""
    if what == "request head":
        return b"", build_request("GET", "/v1/fake/echo/slow", [auth(token), ("X-Pad", "p" * 4000)])[:-2]
    expect = ("Expect", "100-continue")
    if what == "small body":
        return (build_request("POST", "/v1/fake/echo/slow", [auth(token), expect, ("Content-Length", "4000")]),
                b"b" * 4000)
    return (build_request("POST", "/v1/fake/echo/slow", [auth(token), expect, ("Transfer-Encoding", "chunked")]),
            b"0" * 4000)


@pytest.mark.parametrize("what", ["request head", "small body", "chunk size line"])
def test_slow_clients_are_cut_off_at_the_header_timeout(impatient, fake_upstream: FakeUpstream, what: str) -> None:
    """Slowloris: 20 connections each dripping one byte every 200 ms of a head that never ends, a small
    body read whole, or a chunk-size line. Every one is answered 408 or closed once --header-timeout (1 s)
    has passed, however the drip lines up with the timer; no complete request reaches the upstream."""
    server, token = impatient
    prefix, data = slow_parts(token, what)
    with ThreadPoolExecutor(max_workers=20) as pool:
        closed = list(pool.map(lambda _: drip(server.port, prefix, data, interval_s=0.2, give_up_s=5.0), range(20)))
    still_open = sum(1 for c in closed if c is None)
    assert still_open == 0, f"{still_open} of 20 slow clients were still connected after 5 s with --header-timeout 1s"
    assert max(c for c in closed if c is not None) < 3.0, closed
    assert all(not r.complete for r in fake_upstream.requests)


def test_idle_keep_alive_connection_is_closed_at_the_header_timeout(impatient, fake_upstream: FakeUpstream) -> None:
    server, token = impatient
    with server.connect(timeout_s=10) as conn:
        conn.send(build_request("GET", "/healthz"))
        assert conn.read_response().status == 200
        started = time.monotonic()
        assert conn.wait_closed(timeout_s=5), "an idle keep-alive connection outlived --header-timeout"
        assert time.monotonic() - started < 3.0


SLOW_BODIES = {
    # name: (framing header, bytes sent before the stall)
    "small Content-Length body": (("Content-Length", "1000"), b"x" * 100),
    "large Content-Length body (streamed)": (("Content-Length", str(4 * 1024 * 1024)), b"x" * 300_000),
    "chunked body, mid-chunk": (("Transfer-Encoding", "chunked"), b"1000\r\n" + b"x" * 100),
    "chunked body, between chunks": (("Transfer-Encoding", "chunked"), b"5\r\nhello\r\n"),
}


@pytest.mark.parametrize("name", SLOW_BODIES)
def test_stalled_request_body_gets_408_or_a_close(impatient, fake_upstream: FakeUpstream, name: str) -> None:
    """A body that stops arriving: once a piece is --header-timeout (1 s) late, SOAKP answers 408 (or closes),
    and the upstream, which may already have the head of a streamed body, never gets a complete request
    and sees its connection closed."""
    server, token = impatient
    framing, sent = SLOW_BODIES[name]
    data = build_request("POST", "/v1/fake/echo/stalled", [auth(token), framing]) + sent
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    try:
        sock.sendall(data)
        started = time.monotonic()
        answer, eof_at = wait_for_eof(sock, timeout_s=6)
    finally:
        sock.close()
    assert eof_at is not None, f"a stalled body kept its connection for 6 s: {answer[:200]!r}"
    assert eof_at - started < 4.0
    assert answer == b"" or answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert all(not r.complete for r in fake_upstream.requests)
    if fake_upstream.requests:  # a streamed body's head went ahead: its upstream connection must be gone
        record = fake_upstream.requests[0]
        assert fake_upstream.wait_until(lambda: record.body_error is not None, timeout_s=5), \
            "the upstream connection of a stalled body was left open"


def endless_download(closed_at: list[float], max_bytes: int = 256 * 1024 * 1024):
    """Stream 64 KiB blocks until SOAKP stops taking them and closes; note when the send failed."""

    async def behaviour(request: RecordedRequest, responder: Responder) -> None:
        responder.keep_alive = False
        await responder.send_head(200, [("Content-Type", "application/octet-stream"), ("Transfer-Encoding", "chunked")])
        block = b"d" * 65536
        try:
            for _ in range(max_bytes // len(block)):
                await responder.send(block)
        except (ConnectionError, ssl.SSLError):
            closed_at.append(time.monotonic())

    return behaviour


def test_client_that_stops_reading_is_disconnected_and_frees_the_upstream(impatient, fake_upstream: FakeUpstream) -> None:
    """A client that takes the response head of a large download and then reads nothing: once SOAKP has
    waited --header-timeout (1 s) for it to take more, it drops the client and closes the upstream
    connection, instead of holding both (and a socket buffer's worth of memory) for as long as the client
    stays connected."""
    server, token = impatient
    closed_at: list[float] = []
    fake_upstream.script("/v1/fake/endless", endless_download(closed_at))
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.sendall(build_request("GET", "/v1/fake/endless", [auth(token)]))
        assert b" 200 " in read_until(sock, b"\r\n\r\n")
        stalled_at = time.monotonic()
        assert fake_upstream.wait_until(lambda: bool(closed_at), timeout_s=15), \
            "the upstream kept streaming to a client that reads nothing"
    finally:
        sock.close()
    # The client stops reading at once, but SOAKP only notices once every buffer between them is full.
    assert closed_at[0] - stalled_at < 8.0


# 4. Nothing leaks ###########################################################################################

BAD_INPUTS = [
    b"GARBAGE\r\n\r\n",
    b"POST /v1/fake/echo/x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"GET /v1/../jwt/generate HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /v1/fake/echo/x HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"p" * 70_000 + b"\r\n\r\n",
    b"CONNECT 127.0.0.1:1 HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /v1/fake/echo/x HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer a.b.c\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64,  # a TLS ClientHello at a plain listener
    b"GET /v1/fake/echo/x HTTP/1.1\r\nHost: x\r\nX: a\r\n b\r\n\r\n",
]


def burst(server: SoakpProcess, upstream: FakeUpstream, token: str, in_flight: int) -> None:
    """Good, bad and broken traffic at once; returns when every client connection has been closed."""
    upstream.script("/v1/fake/die-reset", die_mid_body(how="reset"))
    upstream.script("/v1/fake/die-close", die_mid_body(how="close"))
    upstream.script("/v1/fake/stall", stall(max_s=10))
    closed_at: list[float] = []
    upstream.script("/v1/fake/hold", hold_stream(closed_at, None))

    def good(index: int) -> None:
        with server.connect(timeout_s=15) as conn:
            for round_ in range(5):
                conn.send(build_request("POST", f"/v1/fake/echo/{index}-{round_}", [auth(token)], b"{}"))
                assert conn.read_response().status == 200

    def bad(index: int) -> None:
        outcome = collect(server.port, BAD_INPUTS[index % len(BAD_INPUTS)], timeout_s=10)
        assert outcome.eof and len(outcome.responses) <= 1 and outcome.malformed is None

    def fault(path: str) -> None:
        response = server.request("GET", path, token, timeout_s=15)
        assert response.status in (200, 502, 504)

    def leave_mid_stream() -> None:
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        try:
            sock.sendall(build_request("POST", "/v1/fake/hold", [auth(token)], b"{}"))
            read_until(sock, b"data: first")
        finally:
            sock.close()

    def abandon(data: bytes) -> None:
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        sock.sendall(data)
        sock.close()

    abandoned = [build_request("POST", "/v1/fake/echo/half", [auth(token), ("Content-Length", "100")]) + b"x" * 10,
                 b"GET /v1/fake/echo/half HTTP/1.1\r\nHost: x\r\n", b"\x00" * 10]
    jobs: list[Callable[[], None]] = [lambda i=i: good(i) for i in range(in_flight * 2)]
    jobs += [lambda i=i: bad(i) for i in range(len(BAD_INPUTS) * 2)]
    jobs += [lambda p=p: fault(p) for p in ("/v1/fake/die-reset", "/v1/fake/die-close", "/v1/fake/stall")]
    jobs += [leave_mid_stream, leave_mid_stream] + [lambda d=d: abandon(d) for d in abandoned]
    with ThreadPoolExecutor(max_workers=in_flight) as pool:
        for future in [pool.submit(job) for job in jobs]:
            future.result(timeout=30)
    assert upstream.wait_until(lambda: len(closed_at) == 2, timeout_s=10)


def test_burst_of_good_and_bad_traffic_leaks_no_socket_or_descriptor(soakp, fake_upstream: FakeUpstream) -> None:
    """Two identical bursts (good keep-alive requests, smuggling and garbage, upstream resets and stalls,
    clients leaving mid-stream or mid-request) with at most 6 requests in flight: afterwards SOAKP holds no
    client socket, at most 6 upstream keep-alive connections, and the same descriptors as before."""
    in_flight = 6
    server = soakp(read_timeout="1s", header_timeout="2s")
    token = server.mint()
    assert server.request("GET", "/v1/fake/echo/warm", token).status == 200
    before = settled_census(server, fake_upstream)

    burst(server, fake_upstream, token, in_flight)
    first = settled_census(server, fake_upstream)
    burst(server, fake_upstream, token, in_flight)
    second = settled_census(server, fake_upstream)

    fds = len(os.listdir(f"/proc/{server.pid}/fd"))
    for name, after in (("first", first), ("second", second)):
        assert after.clients == 0, f"client sockets left open after the {name} burst: {after}"
        assert after.upstream <= in_flight, f"more upstream connections than ever in flight after the {name} burst: {after}"
        assert after.other_fds == before.other_fds, f"non-socket descriptors changed: {before} -> {after}"
    assert second.total <= first.total, f"descriptors grew between two identical bursts: {first} -> {second}"
    assert fds == second.total + 1  # + the listener
    assert server.request("GET", "/healthz").status == 200


def test_a_flood_beyond_the_cap_gets_503s_and_leaves_no_socket(soakp, fake_upstream: FakeUpstream) -> None:
    """50 connections fill --max-connections 50 and stay open; 150 more, 10 at a time, each get a 503; once
    every connection has closed SOAKP holds no client socket."""
    server = soakp(max_connections="50")
    socks: list[socket.socket] = []
    statuses: list[int] = []
    lock = threading.Lock()
    try:
        for _ in range(50):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            sock.sendall(build_request("GET", "/healthz"))
            assert b" 200 " in read_until(sock, b"\r\n\r\n")
            socks.append(sock)

        def over() -> None:
            outcome = collect(server.port, build_request("GET", "/healthz"), timeout_s=10)
            with lock:
                statuses.extend(outcome.statuses or [0])

        with ThreadPoolExecutor(max_workers=10) as pool:
            for future in [pool.submit(over) for _ in range(150)]:
                future.result(timeout=30)
        assert statuses == [503] * 150, sorted(set(statuses))
    finally:
        for sock in socks:
            sock.close()
    after = settled_census(server, fake_upstream)
    assert after.clients == 0, after
