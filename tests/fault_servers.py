"""Misbehaving upstreams and a bounded raw client, for SOAKP's hardening tests.

FakeUpstream (fake_upstream.py) is a well-behaved HTTP/1.1 server that can be scripted to fail after it
has read a request. The faults here happen where FakeUpstream cannot reach: in the TLS handshake (a
certificate that does not verify, a TLS version SOAKP refuses), below TLS (plain HTTP where TLS was
expected, a peer that never answers the ClientHello), or in how the request body is read (never).

 FaultServer     a threaded TCP listener on 127.0.0.1, port 0, that runs one handler per connection and
                 records what each connection carried (ConnRecord): the first raw bytes, whether a TLS
                 handshake completed, and every application byte read after it
 handlers        tls_then(...), plain_http_answer, silent, garbage_after_tls, read_head_then_stall
 collect()       send bytes (then half-close), read everything until EOF, split it into responses

Every wait has a deadline and every thread is a daemon joined at stop().
"""

from __future__ import annotations

import os
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from fake_upstream import RawResponse, parse_response

LOOPBACK = "127.0.0.1"
HANDLER_MAX_S = 30.0  # no fault connection lives longer than this
PEEK_BYTES = 4096


@dataclass
class ConnRecord:
    """What one connection to a FaultServer carried."""

    accepted_at: float = field(default_factory=time.monotonic)
    first_bytes: bytes = b""  # the first bytes the peer sent, before any TLS unwrapping
    handshake: str = "none"  # "none" (no TLS attempted), "ok", or "failed: <reason>"
    app_bytes: bytearray = field(default_factory=bytearray)  # bytes read after a completed handshake, or raw
    closed_at: float | None = None
    stopping: threading.Event = field(default_factory=threading.Event)  # the server is stopping: give up


Handler = Callable[[socket.socket, ConnRecord], None]


class FaultServer:
    """A TCP listener on 127.0.0.1 that hands each connection to `handler` on a thread of its own."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.records: list[ConnRecord] = []
        self._lock = threading.Lock()
        self._listener = socket.create_server((LOOPBACK, 0))
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        self._acceptor = threading.Thread(target=self._accept_loop, name="fault-accept", daemon=True)
        self._acceptor.start()

    @property
    def url(self) -> str:
        return f"https://{LOOPBACK}:{self.port}"

    def __enter__(self) -> FaultServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def connections(self) -> list[ConnRecord]:
        with self._lock:
            return list(self.records)

    def wait_closed(self, count: int, timeout_s: float = 10.0) -> bool:
        """Wait until `count` connections have ended. Returns whether they did in time."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if sum(1 for r in self.connections() if r.closed_at is not None) >= count:
                return True
            time.sleep(0.01)
        return False

    def stop(self) -> None:
        self._stopping.set()
        self._acceptor.join(5)
        self._listener.close()
        with self._lock:
            for sock in self._sockets:
                try:
                    sock.close()
                except OSError:
                    pass
        for thread in self._threads:
            thread.join(5)

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            record = ConnRecord(stopping=self._stopping)
            with self._lock:
                self.records.append(record)
                self._sockets.append(sock)
            thread = threading.Thread(target=self._run, args=(sock, record), name="fault-conn", daemon=True)
            self._threads.append(thread)
            thread.start()

    def _run(self, sock: socket.socket, record: ConnRecord) -> None:
        try:
            sock.settimeout(HANDLER_MAX_S)
            self.handler(sock, record)
        except (OSError, ssl.SSLError, ValueError):
            pass
        finally:
            record.closed_at = time.monotonic()
            try:
                sock.close()
            except OSError:
                pass


# Handlers ###################################################################################################


def _peek_first_bytes(sock: socket.socket, record: ConnRecord, timeout_s: float = 5.0) -> None:
    """Record the first bytes the peer sends without consuming them (so a TLS handshake can follow)."""
    readable, _, _ = select.select([sock], [], [], timeout_s)
    if readable:
        record.first_bytes = sock.recv(PEEK_BYTES, socket.MSG_PEEK)


def _read_for(sock: socket.socket, record: ConnRecord, seconds: float, until: bytes | None = None,
              idle_s: float | None = None) -> None:
    """Read and record bytes for at most `seconds`, until EOF, until `until` has been seen, or until the
    peer has been quiet for `idle_s`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if until is not None and until in record.app_bytes:
            return
        pending = isinstance(sock, ssl.SSLSocket) and sock.pending()
        if not pending:
            wait_s = max(0.0, deadline - time.monotonic())
            readable, _, _ = select.select([sock], [], [], wait_s if idle_s is None else min(wait_s, idle_s))
            if not readable:
                return
        try:
            data = sock.recv(65536)
        except (ssl.SSLWantReadError, BlockingIOError):
            continue
        if not data:
            return
        record.app_bytes += data


def tls_then(context: ssl.SSLContext, after: Callable[[ssl.SSLSocket, ConnRecord], None] | None = None) -> Handler:
    """TLS with `context` (whatever certificate or versions it holds); then `after`, or read what comes.

    A failed handshake is recorded with its reason and ends the connection: nothing is ever decrypted.
    """

    def handler(sock: socket.socket, record: ConnRecord) -> None:
        _peek_first_bytes(sock, record)
        sock.settimeout(10.0)
        try:
            tls = context.wrap_socket(sock, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            record.handshake = f"failed: {getattr(exc, 'reason', None) or exc}"
            return
        record.handshake = "ok"
        tls.setblocking(False)
        if after is not None:
            after(tls, record)
        else:
            _read_for(tls, record, 3.0)
        try:
            tls.close()
        except OSError:
            pass

    return handler


def plain_http_answer(sock: socket.socket, record: ConnRecord) -> None:
    """A plain-HTTP server: records what arrives, answers an HTTP 200 to anything, closes."""
    _peek_first_bytes(sock, record)
    sock.setblocking(False)
    _read_for(sock, record, 2.0, idle_s=0.2)
    try:
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
    except OSError:
        pass


def silent(sock: socket.socket, record: ConnRecord) -> None:
    """Accept the TCP connection, read and record, never answer (at most HANDLER_MAX_S)."""
    sock.setblocking(False)
    deadline = time.monotonic() + HANDLER_MAX_S
    while time.monotonic() < deadline and not record.stopping.is_set():
        _read_for(sock, record, 0.2)
        if tcp_state(sock) in TCP_PEER_GONE:
            return


def garbage_after_tls(garbage: bytes) -> Callable[[ssl.SSLSocket, ConnRecord], None]:
    """After a good handshake: read the request head, answer `garbage`, close."""

    def after(tls: ssl.SSLSocket, record: ConnRecord) -> None:
        _read_for(tls, record, 5.0, until=b"\r\n\r\n")
        tls.setblocking(True)
        tls.sendall(garbage)

    return after


def tcp_state(sock: socket.socket) -> int:
    """The kernel's TCP state of a socket (Linux TCP_INFO): 1 established, 7 closed, 8 close-wait."""
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]


TCP_PEER_GONE = (7, 8)  # TCP_CLOSE (after a reset) and TCP_CLOSE_WAIT (after the peer's FIN)


def garbage_by_path(answers: dict[str, bytes]) -> Callable[[ssl.SSLSocket, ConnRecord], None]:
    """After a good handshake: read the request head and answer `answers[last path segment]`, then close."""

    def after(tls: ssl.SSLSocket, record: ConnRecord) -> None:
        _read_for(tls, record, 5.0, until=b"\r\n\r\n")
        target = bytes(record.app_bytes).split(b" ", 2)[1].decode("latin-1") if b" " in record.app_bytes else ""
        tls.setblocking(True)
        tls.sendall(answers.get(target.rsplit("/", 1)[-1], b"no such garbage\r\n\r\n"))

    return after


def read_head_then_stall(stall_s: float) -> Callable[[ssl.SSLSocket, ConnRecord], None]:
    """After a good handshake: read the request head, then neither read the body nor answer, for at most
    stall_s or until the peer closes (seen in the TCP state, without reading)."""

    def after(tls: ssl.SSLSocket, record: ConnRecord) -> None:
        _read_for(tls, record, 5.0, until=b"\r\n\r\n")
        deadline = time.monotonic() + stall_s
        while time.monotonic() < deadline and not record.stopping.is_set() and tcp_state(tls) not in TCP_PEER_GONE:
            time.sleep(0.02)

    return after


# A bounded raw client ###########################################################################################


@dataclass
class Outcome:
    """Everything one connection returned: the responses it carried, and how it ended."""

    responses: list[RawResponse]
    leftover: bytes  # bytes after the last whole response that do not form one
    eof: bool  # the server closed (FIN or reset)
    reset: bool
    elapsed_s: float
    malformed: str | None = None  # why the bytes did not parse as HTTP responses

    @property
    def statuses(self) -> list[int]:
        return [r.status for r in self.responses]


def collect(
    port: int,
    data: bytes,
    timeout_s: float = 10.0,
    half_close: bool = True,
    method: str = "GET",
    pause_after_s: float = 0.0,
    enough: int | None = None,
) -> Outcome:
    """Send `data` on a new connection (then half-close unless told not to) and read until the server
    closes, `timeout_s` passes, or (with `enough`) that many whole responses have arrived; split what came
    back into responses.

    The send runs on its own thread so an early answer and close never deadlock it.
    """
    started = time.monotonic()
    sock = socket.create_connection((LOOPBACK, port), timeout=timeout_s)
    errors: list[BaseException] = []

    def send() -> None:
        try:
            sock.sendall(data)
            if pause_after_s:
                time.sleep(pause_after_s)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            errors.append(exc)

    sender = threading.Thread(target=send, name="collect-send", daemon=True)
    sender.start()
    buffer = bytearray()
    eof = reset = False
    deadline = started + timeout_s
    try:
        while time.monotonic() < deadline:
            readable, _, _ = select.select([sock], [], [], max(0.0, deadline - time.monotonic()))
            if not readable:
                break
            try:
                piece = sock.recv(65536)
            except ConnectionResetError:
                eof = reset = True
                break
            if not piece:
                eof = True
                break
            buffer += piece
            if enough is not None:
                whole = [r for r in split_responses(bytes(buffer), False, False, 0, method).responses if r.complete]
                if len(whole) >= enough:
                    break
    finally:
        sock.close()
        sender.join(5)
    return split_responses(bytes(buffer), eof, reset, time.monotonic() - started, method)


def split_responses(buffer: bytes, eof: bool, reset: bool, elapsed_s: float, method: str = "GET") -> Outcome:
    responses: list[RawResponse] = []
    rest = buffer
    malformed = None
    for _ in range(100):
        if not rest:
            break
        try:
            parsed = parse_response(rest, True, method)
        except (ValueError, IndexError) as exc:
            malformed = f"{type(exc).__name__}: {exc}"
            break
        if parsed is None:
            break
        response, used = parsed
        responses.append(response)
        rest = rest[used:]
    return Outcome(responses, rest, eof, reset, elapsed_s, malformed)


def open_fds(pid: int) -> list[str]:
    """What each of a process's file descriptors points at (`socket:[...]`, a path, `pipe:[...]`)."""
    targets = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            targets.append(os.readlink(f"/proc/{pid}/fd/{name}"))
        except OSError:
            pass  # closed between listdir and readlink
    return targets
