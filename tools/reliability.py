"""SOAKP's reliability run (issue #5): hostile input, upstream faults and load, with a report.

    python tools/reliability.py [--quick] [--out REPORT.md] [--json SUMMARY.json]
    make reliability ARGS='--out bench/RELIABILITY.md'

It starts, on 127.0.0.1 only, its own fake OpenAI upstream (TLS, a throwaway CA;
tests/fake_upstream.py `--profile reliability`, a process of its own: its routes, faults and control
port are listed there) and SOAKP (`soakp.py serve`, plain HTTP, port 0), then runs:

 1 Hostile input    smuggling (CL.TE, TE.CL, obfuscated Transfer-Encoding), bad Content-Length, control
                    bytes, bare CR/LF, obs-fold, over-long lines and heads, bad chunks and trailers,
                    non-canonical paths, absolute-form and Host naming other hosts, CONNECT, slow heads and
                    bodies. Each attack is followed on its connection by an authorised "smuggled" request:
                    it must never reach the upstream, and the client must get one answer, then EOF.
                    Then (issue 11) a header that made a regex backtrack for 19.5 s, with /healthz
                    probed meanwhile, and a multipart differential sample: with a models-limited
                    token, bodies SOAKP forwards are read alike by python-multipart and Werkzeug,
                    the others are 400.
 2 Upstream faults  refused, reset before the answer or mid-stream, clean close, silence before the head
                    and mid-body, garbage, a head over 64 KiB, broken chunks, a certificate that does not
                    verify (self-signed, wrong host), TLS 1.1 only, plain HTTP where TLS was expected, a
                    peer that never finishes the handshake, idle keep-alive connections the upstream closed.
                    A bad TLS peer must see no HTTP byte.
 3 Resources        a client leaving mid-stream frees its upstream connection; the --max-connections cap
                    answers 503; descriptors after all of the above.
 4 Streams          N SSE streams held open at once for S seconds (1,000 for 60 s; --quick 50 for 3 s), from
                    a client process of its own; errors, events, peak RSS (VmHWM) and descriptors.
 5 Soak             R requests over keep-alive connections (100,000; --quick 2,000), bounded in time too;
                    descriptors and RSS at start and end, and requests lost (sent without an answer).

and prints a Markdown report; --json writes the figures. Exit status 0 when every check passed and no
request was lost, 1 otherwise. Every wait has a deadline, every load a count and a time bound, and every
process started here is stopped on the way out.

The upstream and the internal subcommands `streams` and `soak` each run as a process of their own,
so that load never shares a loop or a GIL with SOAKP or with what measures it. The key goes to the
upstream in RELIABILITY_KEY (--api-key-env), the token to the clients in RELIABILITY_TOKEN; neither
is ever on a command line.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime
import hashlib
import json
import os
import platform
import random
import re
import resource
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TOOLS_DIR = Path(__file__).resolve().parent
ROOT = TOOLS_DIR.parent
SOAKP_PY = ROOT / "soakp.py"
TESTS_DIR = ROOT / "tests"
sys.path.insert(0, str(TESTS_DIR))

from proc_helpers import descriptors, memory_kib  # noqa: E402

LOOPBACK = "127.0.0.1"
READ_BYTES = 64 * 1024
START_TIMEOUT_S = 20.0
CLIENT_TIMEOUT_S = 15.0  # the longest any single client read waits
SMUGGLED_PATH = "/v1/rel/smuggled"

CHAT_BODY = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello."}]}'
STREAM_BODY = b'{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"Say hello."}]}'


# 1. Load clients (subcommands `streams` and `soak`) ########################################################


CLIENT_ERRORS = (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError)


def percentile(values: list[float], share: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


class ResponseReader:
    """Reads HTTP/1.1 responses off a StreamReader, every read bounded; chunked bodies are yielded as they
    arrive."""

    def __init__(self, reader: asyncio.StreamReader, timeout_s: float) -> None:
        self.reader = reader
        self.timeout_s = timeout_s

    async def head(self) -> tuple[int, dict[bytes, bytes]]:
        while True:
            raw = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), self.timeout_s)
            lines = raw[:-4].split(b"\r\n")
            parts = lines[0].split(b" ", 2)
            if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
                raise ValueError(f"not a status line: {lines[0][:80]!r}")
            status = int(parts[1])
            if status == 100:
                continue
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip()
            return status, headers

    async def body(self, headers: dict[bytes, bytes]) -> Any:
        """Async iterator of body pieces; raises on truncation."""
        if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            while True:
                size = int((await asyncio.wait_for(self.reader.readuntil(b"\r\n"), self.timeout_s)).split(b";")[0], 16)
                if size == 0:
                    while await asyncio.wait_for(self.reader.readuntil(b"\r\n"), self.timeout_s) != b"\r\n":
                        pass
                    return
                data = await asyncio.wait_for(self.reader.readexactly(size + 2), self.timeout_s)
                yield data[:-2]
        elif b"content-length" in headers:
            yield await asyncio.wait_for(self.reader.readexactly(int(headers[b"content-length"])), self.timeout_s)
        else:
            raise ValueError("response without framing")


def request_bytes(method: str, target: str, token: str, body: bytes | None = None, close: bool = False,
                  rel_id: str | None = None) -> bytes:
    """A request with the token; `rel_id` goes in X-Rel-Id, which the fake upstream echoes as x-request-id."""
    head = f"{method} {target} HTTP/1.1\r\nHost: soakp\r\nAuthorization: Bearer {token}\r\n"
    if close:
        head += "Connection: close\r\n"
    if rel_id is not None:
        head += f"X-Rel-Id: {rel_id}\r\n"
    if body is not None:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + (body or b"")


async def run_streams(port: int, count: int, interval_ms: int, ramp_per_s: int, max_s: float) -> dict[str, Any]:
    """Open `count` held SSE streams; print OPEN once each has its first event (or failed), then wait for
    them to end (the upstream's release) and return the figures."""
    token = os.environ["RELIABILITY_TOKEN"]
    request = request_bytes("POST", f"/v1/rel/hold?interval_ms={interval_ms}", token, b"{}")
    started = time.monotonic()
    first_event_ms: list[float] = []
    opened = asyncio.Event()
    pending_first = [count]
    errors: list[str] = []
    events = [0]
    max_gap_ms = [0.0]
    ok = [0]
    gap_limit_s = interval_ms / 1000 * 5 + 5

    def first_done() -> None:
        pending_first[0] -= 1
        if pending_first[0] == 0:
            opened.set()

    async def one(number: int) -> None:
        await asyncio.sleep(number / ramp_per_s)
        got_first = False
        writer = None
        try:
            t0 = time.monotonic()
            reader, writer = await asyncio.wait_for(asyncio.open_connection(LOOPBACK, port, limit=READ_BYTES), 30)
            writer.write(request)
            responses = ResponseReader(reader, gap_limit_s + 30)
            status, headers = await responses.head()
            if status != 200:
                raise ValueError(f"status {status}")
            last = time.monotonic()
            done = False
            async for piece in responses.body(headers):
                now = time.monotonic()
                if not got_first:
                    got_first = True
                    first_event_ms.append((now - t0) * 1000)
                    first_done()
                else:
                    max_gap_ms[0] = max(max_gap_ms[0], (now - last) * 1000)
                last = now
                events[0] += piece.count(b"data: ")
                done = done or b"[DONE]" in piece
            if not done:
                raise ValueError("stream ended without [DONE]")
            ok[0] += 1
        except CLIENT_ERRORS as exc:
            errors.append(f"stream {number}: {type(exc).__name__}: {exc}"[:200])
            if not got_first:
                first_done()
        finally:
            if writer is not None:
                writer.close()

    tasks = [asyncio.create_task(one(n)) for n in range(count)]
    try:
        await asyncio.wait_for(opened.wait(), count / ramp_per_s + 60)
    except asyncio.TimeoutError:
        pass
    print(f"OPEN ok={len(first_event_ms)} failed={len(errors)} after_s={time.monotonic() - started:.1f}", flush=True)
    done, pending = await asyncio.wait(tasks, timeout=max_s)
    for task in pending:
        task.cancel()
        errors.append("stream still open at the client's deadline")
    return {"streams": count, "ok": ok[0], "errors": len(errors), "events": events[0],
            "max_gap_ms": round(max_gap_ms[0], 1),
            "first_event_p50_ms": round(percentile(first_event_ms, 0.5), 1),
            "first_event_p99_ms": round(percentile(first_event_ms, 0.99), 1),
            "error_samples": errors[:5]}


async def run_soak(port: int, requests: int, connections: int, max_s: float) -> dict[str, Any]:
    """`requests` requests over `connections` keep-alive connections, never retried: each either gets a
    whole response or counts as lost."""
    token = os.environ["RELIABILITY_TOKEN"]
    mix = [("POST", "/v1/chat/completions", CHAT_BODY)] * 18 + [
        ("GET", "/v1/models", None), ("POST", "/v1/chat/completions", STREAM_BODY)]
    counter = iter(range(requests))
    mismatched = [0]
    deadline = time.monotonic() + max_s
    sent = [0]
    statuses: Counter[int] = Counter()
    errors: list[str] = []
    latencies: list[float] = []
    started = time.monotonic()

    async def worker() -> None:
        writer = None
        try:
            for number in counter:
                if time.monotonic() > deadline:
                    return
                if writer is None:
                    reader, writer = await asyncio.wait_for(
                        asyncio.open_connection(LOOPBACK, port, limit=READ_BYTES), 10)
                    responses = ResponseReader(reader, CLIENT_TIMEOUT_S)
                method, target, body = mix[number % len(mix)]
                data = request_bytes(method, target, token, body, rel_id=f"s{number}")
                t0 = time.monotonic()
                sent[0] += 1
                try:
                    writer.write(data)
                    status, headers = await responses.head()
                    async for _ in responses.body(headers):
                        pass
                except CLIENT_ERRORS as exc:
                    errors.append(f"request {number}: {type(exc).__name__}: {exc}"[:200])
                    writer.close()
                    writer = None
                    continue
                latencies.append(time.monotonic() - t0)
                statuses[status] += 1
                if headers.get(b"x-request-id") != b"s%d" % number:  # another request's answer
                    mismatched[0] += 1
                    errors.append(f"request {number} got the answer of {headers.get(b'x-request-id')!r}")
                if headers.get(b"connection", b"").lower() == b"close":
                    writer.close()
                    writer = None
        finally:
            if writer is not None:
                writer.close()

    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(connections))), max_s + 60)
    duration = time.monotonic() - started
    answered = sum(statuses.values())
    return {"requested": requests, "sent": sent[0], "answered": answered, "lost": sent[0] - answered,
            "statuses": {str(k): v for k, v in sorted(statuses.items())}, "errors": len(errors),
            "mismatched": mismatched[0],
            "duration_s": round(duration, 2), "rps": round(answered / duration, 1) if duration else 0.0,
            "latency_p50_ms": round(percentile(latencies, 0.5) * 1000, 2),
            "latency_p99_ms": round(percentile(latencies, 0.99) * 1000, 2),
            "timed_out": sent[0] < requests, "error_samples": errors[:5]}


# 2. The orchestrator: processes ###############################################################################


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 65536, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM in KiB, and the descriptor count."""
    return {"fds": descriptors(pid), **memory_kib(pid)}


class Sampler:
    """Samples a process's RSS and descriptors every interval on a thread; keeps the peaks."""

    def __init__(self, pid: int, interval_s: float = 0.5) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.peak_fds = 0
        self.peak_rss_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sample()

    def _sample(self) -> None:
        with contextlib.suppress(OSError):
            figures = proc_status(self.pid)
            self.peak_fds = max(self.peak_fds, figures["fds"])
            self.peak_rss_kib = max(self.peak_rss_kib, figures["VmRSS"])

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()


@dataclass
class Process:
    popen: subprocess.Popen
    name: str

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)


@dataclass
class Soakp:
    process: Process
    port: int
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.popen.pid

    @property
    def alive(self) -> bool:
        return self.process.popen.poll() is None


class Harness:
    """Starts and stops every process of the run; knows the secret, key, token and CA."""

    def __init__(self, workdir: Path, python: str, soakp_py: Path = SOAKP_PY) -> None:
        from fake_upstream import CertAuthority  # the test suite's throwaway CA

        self.workdir = workdir
        self.python = python
        self.soakp_py = soakp_py
        self.processes: list[Process] = []
        self.secret = "reliability-" + secrets.token_urlsafe(32)
        self.admin_pass = secrets.token_urlsafe(16)
        self.key = "sk-reliability-" + secrets.token_urlsafe(24)
        self.token = ""
        self.ca = CertAuthority(workdir / "ca", "SOAKP Reliability CA")
        self.cert, self.cert_key = self.ca.issue("upstream", directory=workdir / "ca")
        self.upstream_port = self.control_port = 0
        self.counter = 0

    def start(self, args: list[str], name: str, env: dict[str, str] | None = None, stdout: Any = subprocess.PIPE,
              stderr: Any = None) -> Process:
        popen = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, text=True,
                                 env={**os.environ, **(env or {})}, cwd=self.workdir)
        process = Process(popen, name)
        self.processes.append(process)
        return process

    def stop_all(self) -> None:
        for process in reversed(self.processes):
            process.stop()

    def start_upstream(self) -> None:
        argv = [self.python, str(TESTS_DIR / "fake_upstream.py"), "--profile", "reliability",
                "--cert", str(self.cert), "--key", str(self.cert_key),
                "--api-key-env", "RELIABILITY_KEY"]
        process = self.start(argv, "upstream", env={"RELIABILITY_KEY": self.key})
        line = read_line(process, "READY", START_TIMEOUT_S)
        _, tls_port, control_port = line.split()
        self.upstream_port, self.control_port = int(tls_port), int(control_port)

    def start_soakp(self, upstream: str | None = None, **flags: str) -> Soakp:
        self.counter += 1
        log_path = self.workdir / f"soakp-{self.counter}.log"
        options = {"listen": "127.0.0.1:0", "upstream": upstream or f"https://127.0.0.1:{self.upstream_port}",
                   "upstream-ca": str(self.ca.ca_path), "db": ":memory:", "admin-user": "admin",
                   "read-timeout": "2s", "header-timeout": "2s", "connect-timeout": "3s", "shutdown-grace": "2s",
                   "log-level": "info", **{k.replace("_", "-"): v for k, v in flags.items()}}
        args = [self.python, str(self.soakp_py), "serve"]
        for name, value in options.items():
            args += [f"--{name}", value]
        log = open(log_path, "w")  # noqa: SIM115 - the child writes it; closed when the run ends
        process = self.start(args, "soakp", env={"SOAKP_SECRET": self.secret, "SOAKP_ADMIN_PASS": self.admin_pass},
                             stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            found = re.search(r"listening on http://127\.0\.0\.1:(\d+)", log_path.read_text(errors="replace"))
            if found:
                return Soakp(process, int(found[1]), log_path)
            if process.popen.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"soakp did not start:\n{log_path.read_text(errors='replace')[-2000:]}")

    def mint(self, server: Soakp, **claims: Any) -> str:
        """A token for the key through POST /jwt/generate (admin Basic), with any extra claims."""
        body = json.dumps({"key": self.key, "ttl": "1d", "sub": "reliability", **claims}).encode()
        basic = base64.b64encode(f"admin:{self.admin_pass}".encode()).decode()
        data = (f"POST /jwt/generate HTTP/1.1\r\nHost: x\r\nAuthorization: Basic {basic}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        outcome = collect(server.port, data + body, timeout_s=CLIENT_TIMEOUT_S)
        if outcome.statuses != [201]:
            raise RuntimeError(f"minting failed: {outcome.statuses}")
        return outcome.responses[0].json()["data"]["jwt"]

    def control(self, path: str, method: str = "GET") -> dict[str, Any]:
        outcome = collect(self.control_port, f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
                          timeout_s=CLIENT_TIMEOUT_S)
        return outcome.responses[0].json()

    def run_client(self, args: list[str], timeout_s: float, on_line: Callable[[str], None] | None = None) -> dict:
        """Run a load client subcommand; lines before its JSON result go to on_line. Returns the result."""
        process = self.start([self.python, str(Path(__file__).resolve()), *args], args[0],
                             env={"RELIABILITY_TOKEN": self.token})
        result: dict[str, Any] = {}
        deadline = time.monotonic() + timeout_s
        assert process.popen.stdout is not None
        while time.monotonic() < deadline:
            line = process.popen.stdout.readline()
            if not line:
                break
            if line.startswith("{"):
                result = json.loads(line)
            elif on_line is not None:
                on_line(line.strip())
        process.stop()
        if not result:
            raise RuntimeError(f"the {args[0]} client gave no result within {timeout_s:.0f}s")
        return result


def read_line(process: Process, prefix: str, timeout_s: float) -> str:
    """The first line of a child's stdout that starts with `prefix` (bounded by a watchdog timer)."""
    assert process.popen.stdout is not None
    timer = threading.Timer(timeout_s, process.stop)
    timer.start()
    try:
        for line in process.popen.stdout:
            if line.startswith(prefix):
                return line.strip()
    finally:
        timer.cancel()
    raise RuntimeError(f"{process.name} did not print {prefix} within {timeout_s:.0f}s")


def recv_until(sock: socket.socket, marker: bytes) -> bytes:
    """What the peer sent until `marker` arrived or it closed."""
    received = b""
    while marker not in received:
        piece = sock.recv(READ_BYTES)
        if not piece:
            break
        received += piece
    return received


def collect(port: int, data: bytes, timeout_s: float = CLIENT_TIMEOUT_S, half_close: bool = True,
            enough: int | None = None) -> Any:
    from fault_servers import collect as raw_collect  # the test suite's bounded raw client

    return raw_collect(port, data, timeout_s=timeout_s, half_close=half_close, enough=enough)


# 3. Scenarios ###############################################################################################


@dataclass
class Row:
    """One line of a report table."""

    scenario: str
    expected: str
    got: str
    ok: bool
    note: str = ""


@dataclass
class Report:
    mode: str
    machine: dict[str, str] = field(default_factory=dict)
    hostile: list[Row] = field(default_factory=list)
    faults: list[Row] = field(default_factory=list)
    resources: list[Row] = field(default_factory=list)
    streams: dict[str, Any] = field(default_factory=dict)
    soak: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    event_loop: str = "asyncio"

    def failures(self) -> list[str]:
        failed = [f"{section}: {row.scenario} (got {row.got})" for section, rows in
                  (("hostile input", self.hostile), ("upstream faults", self.faults), ("resources", self.resources))
                  for row in rows if not row.ok]
        if self.streams.get("errors") or self.streams.get("ok") != self.streams.get("streams"):
            failed.append(f"streams: {self.streams.get('errors')} errors, {self.streams.get('ok')} of "
                          f"{self.streams.get('streams')} complete")
        if self.soak.get("errors") or self.soak.get("lost") or self.soak.get("timed_out") \
                or set(self.soak.get("statuses", {})) - {"200"}:
            failed.append(f"soak: {self.soak.get('errors')} errors, {self.soak.get('lost')} lost, "
                          f"statuses {self.soak.get('statuses')}")
        return failed


def smuggle_after(token: str) -> bytes:
    return (f"GET {SMUGGLED_PATH} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Length: 0\r\n\r\n").encode()


def attack(token: str, lines: list[bytes], body: bytes = b"",
           line: bytes = b"POST /v1/rel/echo/attack HTTP/1.1") -> bytes:
    head = [line, b"Host: soakp.test", b"Authorization: Bearer " + token.encode(), *lines]
    return b"\r\n".join(head) + b"\r\n\r\n" + body + smuggle_after(token)


CHUNK = b"5\r\nhello\r\n0\r\n\r\n"
HOSTILE: list[tuple[str, Callable[[str], bytes], tuple[int, ...]]] = [
    ("CL.TE", lambda t: attack(t, [b"Content-Length: 5", b"Transfer-Encoding: chunked"], b"0\r\n\r\n"), (400,)),
    ("TE.CL", lambda t: attack(t, [b"Transfer-Encoding: chunked", b"Content-Length: 5"], b"0\r\n\r\n"), (400,)),
    ("CL.TE, lower-case names", lambda t: attack(t, [b"content-length: 5", b"transfer-encoding: chunked"],
                                                 b"0\r\n\r\n"), (400,)),
    ("CL + TE with tab", lambda t: attack(t, [b"Content-Length: 5", b"Transfer-Encoding:\tchunked"], b"0\r\n\r\n"),
     (400,)),
    ("TE xchunked", lambda t: attack(t, [b"Transfer-Encoding: xchunked"], CHUNK), (400, 501)),
    ("TE chunked, chunked", lambda t: attack(t, [b"Transfer-Encoding: chunked, chunked"], CHUNK), (400, 501)),
    ("TE identity, chunked", lambda t: attack(t, [b"Transfer-Encoding: identity, chunked"], CHUNK), (400, 501)),
    ("TE twice", lambda t: attack(t, [b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked"], CHUNK),
     (400, 501)),
    ("TE with VT", lambda t: attack(t, [b"Transfer-Encoding: chunked\x0b"], CHUNK), (400, 501)),
    ("TE space before colon", lambda t: attack(t, [b"Transfer-Encoding : chunked"], CHUNK), (400,)),
    ("TE obs-fold", lambda t: attack(t, [b"Transfer-Encoding:", b" chunked"], CHUNK), (400,)),
    ("TE behind bare LF", lambda t: attack(t, [b"X-A: 1\nTransfer-Encoding: chunked"], CHUNK), (400,)),
    ("TE behind bare CR", lambda t: attack(t, [b"X-A: 1\rTransfer-Encoding: chunked"], CHUNK), (400,)),
    ("chunked over HTTP/1.0", lambda t: attack(t, [b"Transfer-Encoding: chunked"], CHUNK,
                                               b"POST /v1/rel/echo/attack HTTP/1.0"), (400,)),
    ("two Content-Lengths", lambda t: attack(t, [b"Content-Length: 5", b"Content-Length: 0"], b"hello"), (400,)),
    ("Content-Length 5, 5", lambda t: attack(t, [b"Content-Length: 5, 5"], b"hello"), (400,)),
    ("Content-Length +5", lambda t: attack(t, [b"Content-Length: +5"], b"hello"), (400,)),
    ("Content-Length 0x5", lambda t: attack(t, [b"Content-Length: 0x5"], b"hello"), (400,)),
    ("Content-Length 19 digits", lambda t: attack(t, [b"Content-Length: 0000000000000000005"], b"hello"), (400,)),
    ("NUL in a header", lambda t: attack(t, [b"X-A: a\x00b", b"Content-Length: 5"], b"hello"), (400,)),
    ("ESC in a header", lambda t: attack(t, [b"X-A: \x1b[2J", b"Content-Length: 5"], b"hello"), (400,)),
    ("obs-fold", lambda t: attack(t, [b"X-A: a", b"\tb", b"Content-Length: 5"], b"hello"), (400,)),
    ("two Hosts", lambda t: attack(t, [b"Host: other.test", b"Content-Length: 5"], b"hello"), (400,)),
    ("NUL in the target", lambda t: attack(t, [b"Content-Length: 5"], b"hello", b"POST /v1/rel/a\x00 HTTP/1.1"),
     (400,)),
    ("bare CR in the request line", lambda t: attack(t, [b"Content-Length: 5"], b"hello",
                                                     b"POST /v1/rel/a HTTP/1.1\rX: y"), (400,)),
    ("request line over 16 KiB", lambda t: attack(t, [b"Content-Length: 5"], b"hello",
                                                  b"POST /v1/rel/" + b"a" * 17_000 + b" HTTP/1.1"), (414,)),
    ("head over 64 KiB", lambda t: attack(t, [b"X-Pad: " + b"p" * 70_000, b"Content-Length: 5"], b"hello"), (431,)),
    ("201 header lines", lambda t: attack(t, [b"X-H%d: v" % i for i in range(201)] + [b"Content-Length: 5"],
                                          b"hello"), (431,)),
    ("chunk size 0x5", lambda t: attack(t, [b"Transfer-Encoding: chunked"], b"0x5\r\nhello\r\n0\r\n\r\n"), (400,)),
    ("chunk size over 15 digits", lambda t: attack(t, [b"Transfer-Encoding: chunked"],
                                                   b"10000000000000005\r\nhello\r\n0\r\n\r\n"), (400,)),
    ("chunk extension with NUL", lambda t: attack(t, [b"Transfer-Encoding: chunked"], b"5;a\x00\r\nhello\r\n0\r\n\r\n"),
     (400,)),
    ("chunk data longer than its size", lambda t: attack(t, [b"Transfer-Encoding: chunked"],
                                                         b"3\r\nhello\r\n0\r\n\r\n"), (400,)),
    ("trailer with obs-fold", lambda t: attack(t, [b"Transfer-Encoding: chunked"],
                                               b"5\r\nhello\r\n0\r\nX-T: a\r\n b\r\n\r\n"), (400,)),
    ("path ..", lambda t: attack(t, [], line=b"GET /v1/rel/echo/../../jwt/generate HTTP/1.1"), (400,)),
    ("path %2e%2e", lambda t: attack(t, [], line=b"GET /v1/rel/echo/%2e%2e/jwt HTTP/1.1"), (400,)),
    ("path %2E%2e", lambda t: attack(t, [], line=b"GET /v1/rel/echo/%2E%2e/jwt HTTP/1.1"), (400,)),
    ("path //", lambda t: attack(t, [], line=b"GET /v1/rel//echo HTTP/1.1"), (400,)),
    ("path backslash", lambda t: attack(t, [], line=b"GET /v1/rel/echo\\..\\jwt HTTP/1.1"), (400,)),
    ("path %5c", lambda t: attack(t, [], line=b"GET /v1/rel/echo%5c..%5cjwt HTTP/1.1"), (400,)),
    ("path %2F", lambda t: attack(t, [], line=b"GET /v1/rel/echo%2F..%2Fjwt HTTP/1.1"), (400,)),
    ("CONNECT", lambda t: attack(t, [], line=b"CONNECT 127.0.0.1:1 HTTP/1.1"), (405,)),
]


def hostile_input(harness: Harness, server: Soakp, report: Report) -> None:
    token = harness.token
    for name, build, statuses in HOSTILE:
        before = harness.control("/stats")["by_path"].get(SMUGGLED_PATH, 0)
        outcome = collect(server.port, build(token))
        smuggled = harness.control("/stats")["by_path"].get(SMUGGLED_PATH, 0) - before
        got = ", ".join(map(str, outcome.statuses)) or "no answer"
        got += " + close" if outcome.eof else " (left open)"
        ok = (outcome.statuses[:1] and outcome.statuses[0] in statuses and len(outcome.responses) == 1
              and outcome.eof and not outcome.leftover and not smuggled)
        report.hostile.append(Row(name, "/".join(map(str, statuses)) + " + close", got, bool(ok),
                                  "SMUGGLED REQUEST FORWARDED" if smuggled else ""))

    # Spellings a client may use to name another host: SOAKP must still connect only to its upstream.
    with contextlib.ExitStack() as stack:
        from fault_servers import FaultServer, silent

        elsewhere = stack.enter_context(FaultServer(silent))
        other = f"127.0.0.1:{elsewhere.port}"
        for name, line, extra in (
            ("absolute-form naming another host", f"GET http://{other}/v1/rel/echo/abs HTTP/1.1", ""),
            ("absolute-form with userinfo", f"GET http://x@{other}/v1/rel/echo/abs HTTP/1.1", ""),
            ("Host naming another host", "GET /v1/rel/echo/abs HTTP/1.1", f"Host: {other}\r\n"),
        ):
            host = "" if extra else "Host: evil.test\r\n"
            data = f"{line}\r\n{host}{extra}Authorization: Bearer {token}\r\nConnection: close\r\n\r\n".encode()
            outcome = collect(server.port, data)
            answer = outcome.responses[0].json() if outcome.statuses == [200] else {}
            ok = (answer.get("host") == f"127.0.0.1:{harness.upstream_port}"
                  and answer.get("target") == "/v1/rel/echo/abs" and not elsewhere.connections())
            got = (f"{outcome.statuses} upstream Host {answer.get('host')}, other host connections "
                   f"{len(elsewhere.connections())}")
            report.hostile.append(Row(name, "200 from the upstream, other host untouched", got, ok))

    # Slow clients, side by side: each must be cut off near --header-timeout (2 s).
    def slow(kind: str) -> Row:
        sock = socket.create_connection((LOOPBACK, server.port), timeout=10)
        started = time.monotonic()
        try:
            if kind == "slow head":
                head = request_bytes("GET", "/v1/rel/echo/slow", token)[:-2]
                sock.settimeout(0.25)
                closed = None
                for byte in head:
                    try:
                        sock.sendall(bytes([byte]))
                        if sock.recv(READ_BYTES) == b"":
                            closed = time.monotonic()
                            break
                    except TimeoutError:
                        pass
                    except OSError:
                        closed = time.monotonic()
                        break
                    if time.monotonic() - started > 8:
                        break
                answer = b""
            else:
                if kind == "idle keep-alive":
                    sock.sendall(request_bytes("GET", "/healthz", token))
                    first = sock.recv(READ_BYTES)
                    started = time.monotonic()
                    if b" 200 " not in first:
                        return Row(kind, "closed", f"no first answer: {first[:40]!r}", False)
                else:  # stalled body
                    sock.sendall(request_bytes("POST", "/v1/rel/echo/slow", token, b"x" * 1000)[:-900])
                answer, closed = b"", None
                sock.settimeout(0.2)
                while time.monotonic() - started < 8:
                    try:
                        piece = sock.recv(READ_BYTES)
                    except TimeoutError:
                        continue
                    except OSError:
                        closed = time.monotonic()
                        break
                    if not piece:
                        closed = time.monotonic()
                        break
                    answer += piece
        finally:
            sock.close()
        status = answer.split(b" ", 2)[1].decode() if answer.startswith(b"HTTP/") else "no answer"
        if closed is None:
            return Row(kind, "closed within 4 s", f"{status}, still open after 8 s", False)
        took = closed - started
        return Row(kind, "closed within 4 s" + (" (408 allowed)" if kind == "stalled body" else ""),
                   f"{status} + close after {took:.1f} s", took < 4 and status in ("no answer", "408"))

    results: list[Row] = []
    threads = [threading.Thread(target=lambda k=k: results.append(slow(k))) for k in
               ("slow head", "idle keep-alive", "stalled body")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    report.hostile.extend(sorted(results, key=lambda r: r.scenario))
    report.hostile.append(redos_probe(server))
    report.hostile.append(multipart_differential(harness, server))


REDOS_REQUEST = b"GET / HTTP/1.1\r\nHost: x\r\nX:" + b" " * 60000 + b"\x01\r\n\r\n"


def redos_probe(server: Soakp) -> Row:
    """Issue 11: a header value of spaces then a control byte made a regex backtrack quadratically
    on the event loop (19.5 s). While SOAKP reads it, /healthz on another connection must be
    answered."""
    expected = "400; /healthz on another connection within 1 s"
    with socket.create_connection((LOOPBACK, server.port), timeout=CLIENT_TIMEOUT_S) as sock:
        sock.sendall(REDOS_REQUEST)
        started = time.monotonic()
        probe = collect(server.port,
                        b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        took = time.monotonic() - started
        answer = recv_until(sock, b"\r\n")
    status = answer.split(b" ", 2)[1].decode() if answer.startswith(b"HTTP/") else "no answer"
    got = f"{status}; /healthz {probe.statuses} after {took * 1000:.0f} ms"
    return Row("ReDoS: 60,000 spaces then a control byte in a header", expected, got,
               status == "400" and probe.statuses == [200] and took < 1.0)


def multipart_bodies(count: int) -> list[tuple[bytes, bytes]]:
    """(Content-Type, body) pairs from a fixed seed: well-formed forms with a model part, and as
    many with one of issue 11's tricks (bare LF, a stray or padded delimiter, no close delimiter, a
    long boundary, a second model part)."""
    rng = random.Random(11)
    chars = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz'+_-."
    out = []
    for number in range(count):
        boundary = "".join(rng.choice(chars) for _ in range(rng.randint(1, 70))).encode()
        parts = [(b"file", os.urandom(rng.randint(0, 2000)), b'; filename="a.wav"'),
                 (b"model", b"whisper-1", b"")]
        rng.shuffle(parts)
        body = b"".join(b"--" + boundary + b'\r\nContent-Disposition: form-data; name="' + name
                        + b'"' + extra + b"\r\n\r\n" + value + b"\r\n"
                        for name, value, extra in parts)
        body += b"--" + boundary + b"--\r\n"
        if number % 2:
            body = rng.choice([
                body.replace(b"\r\n", b"\n"), body[:-4], body + b"--" + boundary + b"\r\n",
                body.replace(b"\r\n\r\n", b"\r\n--" + boundary + b" \r\n\r\n", 1),
                body.replace(boundary, boundary + b"x"),
                body[:-len(boundary) - 6] + b'--' + boundary
                + b'\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper-1\r\n--'
                + boundary + b"--\r\n"])
        out.append((b"multipart/form-data; boundary=" + boundary, body))
    return out


def multipart_differential(harness: Harness, server: Soakp, count: int = 40) -> Row:
    """Issue 11: for a models-limited token SOAKP forwards only multipart bodies it reads with
    certainty. Each body SOAKP forwards must reach the upstream byte for byte, and python-multipart
    and Werkzeug must read from it the model SOAKP allowed; each other body must be a 400 that never
    reaches the upstream."""
    name = f"multipart differential sample ({count} bodies, models-limited token)"
    expected = ("forwarded ones read alike by python-multipart and Werkzeug; others 400, never "
                "forwarded")
    try:
        import io

        import python_multipart
        from werkzeug.formparser import parse_form_data
    except ImportError as exc:
        return Row(name, expected, f"cannot run: {exc} (pip install -e '.[test]')", False)

    def parsers_read(ctype: bytes, body: bytes) -> tuple[list[bytes], list[str]]:
        fields: list[bytes] = []
        python_multipart.parse_form(
            {"Content-Type": ctype, "Content-Length": str(len(body)).encode()}, io.BytesIO(body),
            lambda f: fields.append(f.value) if f.field_name == b"model" else None, lambda f: None)
        environ = {"REQUEST_METHOD": "POST", "CONTENT_TYPE": ctype.decode(),
                   "CONTENT_LENGTH": str(len(body)), "wsgi.input": io.BytesIO(body)}
        return fields, parse_form_data(environ, silent=False)[1].getlist("model")

    token = harness.mint(server, models=["whisper-1"])
    path = "/v1/rel/echo/multipart"
    forwarded = refused = 0
    wrong: list[str] = []
    for number, (ctype, body) in enumerate(multipart_bodies(count)):
        before = harness.control("/stats")["by_path"].get(path, 0)
        data = (b"POST %s HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\nContent-Type: %s\r\n"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n"
                % (path.encode(), token.encode(), ctype, len(body)))
        outcome = collect(server.port, data + body)
        reached = harness.control("/stats")["by_path"].get(path, 0) - before
        if outcome.statuses == [200] and reached == 1:
            answer = outcome.responses[0].json()
            try:
                read = parsers_read(ctype, body)
            except Exception as exc:  # a parser failing on a body SOAKP forwarded is a finding too
                read = ([], [f"error {type(exc).__name__}"])
            if answer.get("body_sha256") != hashlib.sha256(body).hexdigest() or \
                    read != ([b"whisper-1"], ["whisper-1"]):
                wrong.append(f"#{number} forwarded, parsers read {read}")
            forwarded += 1
        elif outcome.statuses == [400] and not reached:
            refused += 1
        else:
            wrong.append(f"#{number}: {outcome.statuses}, reached the upstream {reached} times")
    got = f"{forwarded} forwarded and read alike, {refused} refused with 400"
    if wrong:
        got = "; ".join(wrong[:3])
    return Row(name, expected, got, not wrong and forwarded >= count // 4 and refused >= count // 4)


def upstream_faults(harness: Harness, server: Soakp, report: Report, connect_timeout_s: int) -> None:
    from fault_servers import FaultServer, plain_http_answer, silent, tls_then

    token = harness.token

    def through(target_server: Soakp, path: str) -> tuple[str, float, bool]:
        # No half-close here: a client that shuts its sending side is taken as gone while the upstream is
        # silent (as nginx does by default), which would hide the 504.
        started = time.monotonic()
        outcome = collect(target_server.port, request_bytes("GET", path, token, close=True), timeout_s=CLIENT_TIMEOUT_S,
                          half_close=False, enough=1)
        took = time.monotonic() - started
        if not outcome.responses:
            return ("no answer" + (" + close" if outcome.eof else ", no close")), took, outcome.eof
        response = outcome.responses[0]
        # A whole answer says it closes the connection; a truncated one is over only at EOF.
        closed = outcome.eof or (response.complete and response.header("connection") == "close")
        shown = str(response.status) + ("" if response.complete else " truncated") + (" + close" if closed else "")
        return shown, took, closed

    cases = [
        ("reset before the answer", "/v1/rel/reset-before", ("502",)),
        ("clean close before the answer", "/v1/rel/close-before", ("502",)),
        ("silence before the head (read-timeout 2 s)", "/v1/rel/stall-head", ("504",)),
        ("garbage instead of HTTP", "/v1/rel/garbage", ("502",)),
        ("response head over 64 KiB", "/v1/rel/huge-head", ("502",)),
        ("reset mid-stream", "/v1/rel/reset-mid", ("200 truncated",)),
        ("silence mid-stream (read-timeout 2 s)", "/v1/rel/stall-body", ("200 truncated",)),
        ("broken chunk framing mid-stream", "/v1/rel/bad-chunk", ("502", "200 truncated")),
    ]
    rows: dict[str, Row] = {}

    def run(name: str, path: str, wanted: tuple[str, ...]) -> None:
        got, took, closed = through(server, path)
        ok = any(got.startswith(w) for w in wanted) and closed and took < 8
        rows[name] = Row(name, " or ".join(wanted) + " + close", f"{got} in {took:.1f} s", ok)

    threads = [threading.Thread(target=run, args=case) for case in cases]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    report.faults.extend(rows[name] for name, _, _ in cases if name in rows)

    # The upstream closes every idle keep-alive connection (a load balancer's idle timeout): SOAKP's pool
    # must notice or retry, and the next requests succeed.
    for _ in range(4):
        collect(server.port, request_bytes("GET", "/v1/models", token))
    closed = harness.control("/close-idle", "POST")["closed"]
    time.sleep(0.2)
    statuses = [collect(server.port, request_bytes("GET", "/v1/models", token)).statuses for _ in range(10)]
    good = sum(1 for s in statuses if s == [200])
    report.faults.append(Row("upstream closed its idle keep-alive connections", "next 10 requests 200",
                             f"{good}/10 answered 200 ({closed} idle connections closed)", good == 10))

    # A reused connection; the upstream reads the whole POST, then resets: it may have acted on it, so
    # SOAKP must not send it again (answer 502).
    collect(server.port, request_bytes("GET", "/v1/models", token))
    before = harness.control("/stats")["by_path"].get("/v1/rel/reset-before", 0)
    outcome = collect(server.port, request_bytes("POST", "/v1/rel/reset-before", token, CHAT_BODY, close=True),
                      half_close=False, enough=1)
    received = harness.control("/stats")["by_path"].get("/v1/rel/reset-before", 0) - before
    report.faults.append(Row("reset after reading a POST (reused connection)", "502, the upstream got it once",
                             f"{outcome.statuses}, the upstream got it {received} times",
                             outcome.statuses == [502] and received == 1))

    # Bytes past a response's framing must never answer the next request on that connection. (A SOAKP of
    # its own: a poisoned pool must not spill into the later sections.)
    poisoned = harness.start_soakp()
    shifted = []
    try:
        collect(poisoned.port, request_bytes("GET", "/v1/rel/overflow", token))
        for number in range(6):
            outcome = collect(poisoned.port, request_bytes("GET", f"/v1/rel/echo/next{number}", token))
            target = outcome.responses[0].json().get("target") if outcome.statuses == [200] else outcome.statuses
            if target != f"/v1/rel/echo/next{number}":
                shifted.append(f"next{number} got {str(target)[:30]}")
    finally:
        poisoned.process.stop()
    report.faults.append(Row("bytes past the response's framing (a second response)",
                             "each later request gets its own answer", "; ".join(shifted[:3]) or "all their own",
                             not shifted))

    # Faults below TLS or in it: a SOAKP of their own each. A bad peer must see no HTTP byte.
    tmp = harness.workdir / "faults"
    tmp.mkdir(exist_ok=True)
    refused = socket.socket()
    refused.bind((LOOPBACK, 0))  # bound, never listening: connections are refused
    with contextlib.ExitStack() as stack:
        stack.callback(refused.close)
        servers: list[tuple[str, Any, str]] = []

        def context_for(cert: Path, key: Path, old: bool = False) -> ssl.SSLContext:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            if old:
                import warnings

                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)
                    context.minimum_version = ssl.TLSVersion.TLSv1
                    context.maximum_version = ssl.TLSVersion.TLSv1_1
                context.set_ciphers("DEFAULT:@SECLEVEL=0")
            context.load_cert_chain(str(cert), str(key))
            return context

        from fake_upstream import CertAuthority

        stranger = CertAuthority(tmp / "stranger", "Stranger CA")
        servers.append(("certificate from an unknown CA", stack.enter_context(FaultServer(tls_then(
            context_for(*stranger.issue("stranger", directory=tmp))))), "502"))
        servers.append(("certificate for another host name", stack.enter_context(FaultServer(tls_then(
            context_for(*harness.ca.issue("wrong-host", hosts=("elsewhere.test",), directory=tmp))))), "502"))
        with contextlib.suppress(ssl.SSLError, ValueError):
            servers.append(("TLS 1.0/1.1 only", stack.enter_context(FaultServer(tls_then(
                context_for(*harness.ca.issue("old-tls", directory=tmp), old=True)))), "502"))
        servers.append(("plain HTTP where TLS was expected", stack.enter_context(FaultServer(plain_http_answer)),
                        "502"))
        servers.append((f"handshake never answered (connect-timeout {connect_timeout_s} s)",
                        stack.enter_context(FaultServer(silent)), "502"))
        targets = [(name, f"https://127.0.0.1:{fault_server.port}", wanted, fault_server)
                   for name, fault_server, wanted in servers]
        targets.insert(0, ("connection refused", f"https://127.0.0.1:{refused.getsockname()[1]}", "502", None))
        tls_rows: dict[str, Row] = {}

        def check(name: str, url: str, wanted: str, fault_server: Any) -> None:
            instance = harness.start_soakp(upstream=url, connect_timeout=f"{connect_timeout_s}s")
            try:
                answers = [through(instance, "/v1/models") for _ in range(2)]
                health = collect(instance.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").statuses
            finally:
                instance.process.stop()
            ok = all(got.startswith(wanted) and took < connect_timeout_s + 5 for got, took, _ in answers) \
                and health == [200]
            note = ""
            if fault_server is not None:
                fault_server.wait_closed(len(fault_server.connections()), timeout_s=5)
                records = fault_server.connections()
                leaked = [r for r in records if r.handshake == "ok"
                          or (r.handshake == "none" and r.app_bytes[:1] not in (b"\x16", b""))]
                plaintext = any(b"HTTP/1" in bytes(r.app_bytes)
                                or harness.key.encode() in bytes(r.app_bytes) + r.first_bytes for r in records)
                note = f"{len(records)} connections, " + ("HTTP BYTES REACHED IT" if leaked or plaintext
                                                           else "only failed handshakes, no HTTP byte")
                ok = ok and not leaked and not plaintext and bool(records)
            got = "; ".join(f"{g} in {t:.1f} s" for g, t, _ in answers)
            tls_rows[name] = Row(name, f"{wanted} (twice), /healthz 200", got + f"; /healthz {health}", ok, note)

        threads = [threading.Thread(target=check, args=target) for target in targets]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        report.faults.extend(tls_rows[name] for name, *_ in targets if name in tls_rows)


def leave_after_first_event(server: Soakp, request: bytes) -> None:
    """Send a streamed request, read until its first SSE event, and hang up."""
    with socket.create_connection((LOOPBACK, server.port), timeout=10) as sock:
        sock.sendall(request)
        sock.settimeout(10)
        recv_until(sock, b"data: ")


def resources(harness: Harness, server: Soakp, report: Report) -> None:
    token = harness.token
    # A client that leaves mid-stream: the upstream must see its connection closed within 2 s.
    before = len(harness.control("/stats")["hold_closed"])
    leave_after_first_event(server, request_bytes("POST", "/v1/rel/hold?interval_ms=5000", token, b"{}"))
    left = time.monotonic()
    noticed = None
    while time.monotonic() - left < 10:
        closes = harness.control("/stats")["hold_closed"]
        if len(closes) > before:
            noticed = closes[-1] - left
            break
        time.sleep(0.05)
    report.resources.append(Row("client leaves a silent stream", "upstream connection closed within 2 s",
                                "never closed" if noticed is None else f"closed after {noticed:.2f} s",
                                noticed is not None and noticed < 2))

    # The connection cap: --max-connections 20, 20 held, the 21st gets 503, and the cap frees up.
    capped = harness.start_soakp(max_connections="20")
    held = []
    try:
        for _ in range(20):
            conn = socket.create_connection((LOOPBACK, capped.port), timeout=10)
            conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            conn.settimeout(10)
            conn.recv(READ_BYTES)
            held.append(conn)
        over = [collect(capped.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").statuses for _ in range(5)]
        held.pop().close()
        freed = None
        for _ in range(50):
            if collect(capped.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").statuses == [200]:
                freed = True
                break
            time.sleep(0.05)
        ok = all(s == [503] for s in over) and bool(freed)
        got = f"{[s[0] if s else None for s in over]}, then {'200' if freed else 'never 200'}"
        report.resources.append(Row("--max-connections 20, 20 held, 5 more", "503 each, then 200 once one left", got,
                                    ok))
    finally:
        for conn in held:
            conn.close()
        capped.process.stop()


def admin_request(harness: Harness, server: Soakp, path: str, fields: dict[str, Any]) -> Any:
    body = json.dumps(fields).encode()
    basic = base64.b64encode(f"admin:{harness.admin_pass}".encode()).decode()
    data = (f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Basic {basic}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    return collect(server.port, data + body, timeout_s=CLIENT_TIMEOUT_S).responses[0]


def chain_spent(harness: Harness, server: Soakp, cid: str) -> int:
    basic = base64.b64encode(f"admin:{harness.admin_pass}".encode()).decode()
    outcome = collect(server.port, f"GET /jwt HTTP/1.1\r\nHost: x\r\nAuthorization: Basic {basic}\r\n"
                      "Connection: close\r\n\r\n".encode(), timeout_s=CLIENT_TIMEOUT_S)
    rows = [row for row in outcome.responses[0].json()["data"] if row["cid"] == cid]
    return rows[0]["prompt_tokens"] + rows[0]["completion_tokens"] if rows else 0


def token_bounds(harness: Harness, server: Soakp, report: Report) -> None:
    """Issue 11: a refresh chain ends at its renew-until time; a budget holds against a client that leaves
    and against concurrent requests."""
    minted = admin_request(harness, server, "/jwt/generate", {"key": harness.key, "ttl": "2s", "renew_ttl": "3s"})
    token = minted.json()["data"]["jwt"]
    started, refused, last_ok = time.time(), None, None
    while time.time() - started < 8:
        time.sleep(0.4)
        outcome = collect(server.port, request_bytes("POST", "/jwt/refresh", token, b"", close=True))
        if outcome.statuses != [201]:
            refused = outcome.statuses
            break
        token, last_ok = outcome.responses[0].json()["data"]["jwt"], time.time() - started
    time.sleep(max(0.0, started + 3.5 - time.time()))
    dead = collect(server.port, request_bytes("GET", "/v1/models", token, close=True)).statuses
    report.resources.append(Row("refresh every 0.4 s, ttl 2 s, renew_ttl 3 s", "refused from 3 s on, last token dead",
                                f"refreshed until {last_ok or 0:.1f} s, then {refused}; last token {dead}",
                                refused == [401] and dead == [401] and (last_ok or 0) < 3.2))

    # A client that reads the first event of a budgeted stream and leaves: the answer is still charged.
    minted = admin_request(harness, server, "/jwt/generate", {"key": harness.key, "max_tokens_total": 1000})
    data = minted.json()["data"]
    leave_after_first_event(server, request_bytes("POST", "/v1/chat/completions", data["jwt"], STREAM_BODY))
    charged, deadline = 0, time.monotonic() + 5
    while charged == 0 and time.monotonic() < deadline:
        time.sleep(0.2)
        charged = chain_spent(harness, server, data["jti"])
    report.resources.append(Row("budgeted stream, client leaves after the first event", "charged 1,010 tokens",
                                f"charged {charged}", charged == 1010))

    # 20 concurrent requests on a 1,000-token budget, each asking for up to 150 tokens and answered with its
    # whole cap: the overshoot is at most the prompts (10 each).
    minted = admin_request(harness, server, "/jwt/generate", {"key": harness.key, "max_tokens_total": 1000})
    data = minted.json()["data"]
    statuses: list[int] = []
    capped = CHAT_BODY[:-1] + b',"max_completion_tokens":150}'
    threads = [threading.Thread(target=lambda: statuses.extend(collect(
        server.port, request_bytes("POST", "/v1/chat/completions", data["jwt"], capped, close=True)).statuses))
        for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    time.sleep(0.7)
    spent = chain_spent(harness, server, data["jti"])
    answered = statuses.count(200)
    report.resources.append(Row("20 concurrent requests of up to 150 tokens, budget 1,000, each using its cap",
                                "spent at most 1,000 + 10 per answer", f"spent {spent} over {answered} answers "
                                f"({statuses.count(429)} refused 429)", 0 < spent <= 1000 + 10 * answered))


def descriptors_row(harness: Harness, server: Soakp, at_start: dict[str, int], report: Report, what: str) -> None:
    """Descriptors once everything has drained: the start's, plus at most the idle keep-alive pool."""
    deadline = time.monotonic() + 10
    now = proc_status(server.pid)
    while time.monotonic() < deadline:
        time.sleep(0.5)
        later = proc_status(server.pid)
        if later["fds"] == now["fds"]:
            break
        now = later
    pool_max = 128  # soakp.POOL_MAX_IDLE: idle upstream connections it may keep
    grown = now["fds"] - at_start["fds"]
    report.resources.append(Row(f"descriptors after {what}", f"start ({at_start['fds']}) + idle pool only",
                                f"{now['fds']} ({grown:+d})", grown <= pool_max))


def streams(harness: Harness, server: Soakp, report: Report, count: int, hold_s: float, interval_ms: int) -> None:
    start = proc_status(server.pid)
    opened_at: list[float] = []
    open_line: list[str] = []

    def on_line(line: str) -> None:
        if line.startswith("OPEN"):
            open_line.append(line)
            opened_at.append(time.monotonic())
            # Hold every stream open for hold_s, then release them all.
            threading.Timer(hold_s, lambda: harness.control("/release", "POST")).start()

    with Sampler(server.pid) as sampler:
        result = harness.run_client(["streams", "--port", str(server.port), "--count", str(count), "--interval-ms",
                                     str(interval_ms), "--ramp-per-s", "200", "--max-s", str(hold_s + 120)],
                                    timeout_s=hold_s + count / 200 + 240, on_line=on_line)
    end = proc_status(server.pid)
    report.streams = {**result, "hold_s": hold_s, "interval_ms": interval_ms, "open": open_line[:1],
                      "rss_start_kib": start["VmRSS"], "rss_peak_kib": max(start["VmRSS"], sampler.peak_rss_kib),
                      "vmhwm_kib": end["VmHWM"], "fds_start": start["fds"],
                      "fds_peak": max(start["fds"], sampler.peak_fds),
                      "fds_end": end["fds"]}


def soak(harness: Harness, server: Soakp, report: Report, requests: int, connections: int, max_s: float) -> None:
    upstream_before = harness.control("/stats")["requests"]
    start = proc_status(server.pid)
    with Sampler(server.pid) as sampler:
        result = harness.run_client(["soak", "--port", str(server.port), "--requests", str(requests),
                                     "--connections", str(connections), "--max-s", str(max_s)], timeout_s=max_s + 120)
    time.sleep(0.5)
    end = proc_status(server.pid)
    upstream_seen = harness.control("/stats")["requests"] - upstream_before
    report.soak = {**result, "connections": connections, "max_s": max_s, "upstream_received": upstream_seen,
                   "fds_start": start["fds"], "fds_peak": max(start["fds"], sampler.peak_fds), "fds_end": end["fds"],
                   "rss_start_kib": start["VmRSS"], "rss_end_kib": end["VmRSS"],
                   "rss_peak_kib": max(start["VmRSS"], sampler.peak_rss_kib)}


# 4. The report ###############################################################################################


def machine() -> dict[str, str]:
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory = "?"
    with contextlib.suppress(OSError, ValueError, IndexError):
        memory = f"{int(Path('/proc/meminfo').read_text().split()[1]) // 1024} MiB"
    os_name = platform.platform()
    with contextlib.suppress(OSError):
        found = re.search(r'PRETTY_NAME="([^"]+)"', Path("/etc/os-release").read_text())
        os_name = f"{found[1]}, Linux {platform.release()}" if found else os_name
    return {"cpu": f"{os.cpu_count()} x {model}", "memory": memory, "os": os_name,
            "load average at start": " ".join(f"{n:.2f}" for n in os.getloadavg()),
            "python": f"{platform.python_implementation()} {platform.python_version()}",
            "openssl": ssl.OPENSSL_VERSION, "descriptor limit": str(resource.getrlimit(resource.RLIMIT_NOFILE)[0]),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def table(rows: list[Row], extra: bool = True) -> list[str]:
    lines = ["| scenario | expected | got | ok |" + (" note |" if extra else ""),
             "|---|---|---|---|" + ("---|" if extra else "")]
    for row in rows:
        cells = [row.scenario, row.expected, row.got.replace("|", "/"), "yes" if row.ok else "**NO**"]
        if extra:
            cells.append(row.note)
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def mib(kib: int) -> str:
    return f"{kib / 1024:.1f} MiB"


def render(report: Report, command: str, soakp_version: str) -> str:
    s, k = report.streams, report.soak
    failures = report.failures()
    lines = [
        "# SOAKP reliability report",
        "",
        f"`{command}` ({report.mode} run, {time.monotonic() - report.started:.0f} s), SOAKP {soakp_version} on "
        f"{report.event_loop}, access log at info to a file.",
        "",
        "Machine: " + "; ".join(f"{key} {value}" for key, value in report.machine.items()) + ".",
        "SOAKP, the fake upstream and each load client run as separate processes on it, on 127.0.0.1.",
        "",
        f"**Result: {'PASS' if not failures else 'FAIL'}**: {len(report.hostile)} hostile inputs, "
        f"{len(report.faults)} upstream faults, {len(report.resources)} resource checks, "
        f"{s.get('ok', 0)}/{s.get('streams', 0)} streams held, {k.get('answered', 0)}/{k.get('sent', 0)} soak "
        f"requests answered, {k.get('lost', '?')} lost.",
    ]
    if failures:
        lines += ["", "Failures:"] + [f"- {failure}" for failure in failures]
    lines += ["", "## 1. Hostile input", "",
              "Each attack is followed on its connection by an authorised request for "
              f"`{SMUGGLED_PATH}`; it must never reach the upstream (a desync), and the client must get exactly "
              "one answer, then EOF. --header-timeout is 2 s.", ""]
    lines += table(report.hostile)
    lines += ["", "## 2. Upstream faults", "",
              "Each answer must come before the client's 15 s bound; a peer that fails TLS must never see an "
              "HTTP byte (no insecure retry, no downgrade). --read-timeout 2 s.", ""]
    lines += table(report.faults)
    lines += ["", "## 3. Resources", ""] + table(report.resources, extra=False)
    lines += ["", "## 4. Concurrent streams", "",
              f"{s.get('streams')} SSE streams (`/v1/rel/hold`, one event every {s.get('interval_ms')} ms) opened "
              f"from one client process, all held open together for {s.get('hold_s')} s, then ended by the "
              "upstream with `[DONE]`.", "",
              "| figure | value |", "|---|---|",
              f"| streams complete (head, events, [DONE], last chunk) | {s.get('ok')} of {s.get('streams')} |",
              f"| errors | {s.get('errors')} |",
              f"| all open | {s.get('open', ['?'])[0] if s.get('open') else '?'} |",
              f"| events received | {s.get('events')} |",
              f"| time to first event p50 / p99 | {s.get('first_event_p50_ms')} / {s.get('first_event_p99_ms')} ms |",
              f"| longest gap between events | {s.get('max_gap_ms')} ms |",
              f"| SOAKP RSS before / peak (sampled) | {mib(s.get('rss_start_kib', 0))} / "
              f"{mib(s.get('rss_peak_kib', 0))} |",
              f"| SOAKP VmHWM (peak RSS since start) | {mib(s.get('vmhwm_kib', 0))} |",
              f"| SOAKP descriptors before / peak / after | {s.get('fds_start')} / {s.get('fds_peak')} / "
              f"{s.get('fds_end')} |"]
    if s.get("error_samples"):
        lines += ["", "First errors: " + "; ".join(s["error_samples"])]
    lines += ["", "## 5. Soak", "",
              f"{k.get('requested')} requests over {k.get('connections')} keep-alive connections (18 in 20 a chat "
              "completion POST, then a model list and a 3-event streamed chat), never retried, bounded by "
              f"{k.get('max_s')} s. Each carries its own id, which the upstream echoes in `x-request-id`: an "
              "answer meant for another request counts as an error.", "",
              "| figure | value |", "|---|---|",
              f"| sent / answered / lost | {k.get('sent')} / {k.get('answered')} / {k.get('lost')} |",
              f"| statuses | {k.get('statuses')} |",
              f"| errors (connection, framing, or another request's answer) | {k.get('errors')} "
              f"({k.get('mismatched')} answers of another request) |",
              f"| upstream received | {k.get('upstream_received')} |",
              f"| duration, rate | {k.get('duration_s')} s, {k.get('rps')} requests/s |",
              f"| latency p50 / p99 | {k.get('latency_p50_ms')} / {k.get('latency_p99_ms')} ms |",
              f"| SOAKP descriptors start / peak / end | {k.get('fds_start')} / {k.get('fds_peak')} / "
              f"{k.get('fds_end')} |",
              f"| SOAKP RSS start / peak / end | {mib(k.get('rss_start_kib', 0))} / {mib(k.get('rss_peak_kib', 0))} / "
              f"{mib(k.get('rss_end_kib', 0))} |"]
    if k.get("error_samples"):
        lines += ["", "First errors: " + "; ".join(k["error_samples"])]
    return "\n".join(lines) + "\n"


def orchestrate(args: argparse.Namespace) -> int:
    fd_limit = raise_fd_limit()
    quick = args.quick
    count = args.streams or (50 if quick else 1000)
    hold_s = args.hold_s or (3.0 if quick else 60.0)
    requests = args.soak_requests or (2000 if quick else 100_000)
    max_s = args.soak_max_s or (60.0 if quick else 600.0)
    if count * 2 + 200 > fd_limit:
        print(f"warning: RLIMIT_NOFILE is {fd_limit}; {count} streams need about {count * 2 + 200}", file=sys.stderr)
    report = Report("quick" if quick else "full")
    report.machine = machine()
    has_uvloop = subprocess.run([args.python, "-c", "import uvloop"], capture_output=True, check=False).returncode == 0
    report.event_loop = "uvloop" if has_uvloop else "plain asyncio (uvloop is not installed)"
    command = "python tools/reliability.py" + (" " + " ".join(args.argv) if args.argv else "")
    with tempfile.TemporaryDirectory(prefix="soakp-reliability-") as tmp:
        harness = Harness(Path(tmp), args.python, Path(args.soakp).resolve())
        try:
            harness.start_upstream()
            server = harness.start_soakp(max_connections=str(max(10000, count * 2)), connect_timeout="10s")
            harness.token = harness.mint(server)
            at_start = proc_status(server.pid)

            def progress(text: str) -> None:
                print(f"[{time.monotonic() - report.started:6.1f}s] {text}", file=sys.stderr, flush=True)

            progress("hostile input")
            hostile_input(harness, server, report)
            progress("upstream faults")
            upstream_faults(harness, server, report, 1 if quick else 3)
            progress("resources")
            resources(harness, server, report)
            progress("token bounds")
            token_bounds(harness, server, report)
            descriptors_row(harness, server, at_start, report, "hostile input, faults and resources")
            progress(f"{count} streams for {hold_s:.0f} s")
            streams(harness, server, report, count, hold_s, args.interval_ms or (500 if quick else 1000))
            progress(f"soak of {requests} requests")
            soak(harness, server, report, requests, args.soak_connections, max_s)
            descriptors_row(harness, server, at_start, report, "streams and soak")
            alive = server.alive and collect(server.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").statuses == [200]
            report.resources.append(Row("SOAKP still serving at the end", "/healthz 200", "200" if alive else "down",
                                        alive))
        finally:
            harness.stop_all()
        version = re.search(r"soakp (\S+) listening", server.log_path.read_text(errors="replace"))
        logs = "".join(path.read_text(errors="replace") for path in harness.workdir.glob("soakp-*.log"))
        leaked = [name for name, value in (("key", harness.key), ("token", harness.token),
                                           ("admin password", harness.admin_pass), ("secret", harness.secret))
                  if value in logs]
        report.resources.append(Row("no key, token, password or secret in any SOAKP log (stopped)", "none",
                                    ", ".join(leaked) or "none", not leaked))
        report.machine["load average at end"] = " ".join(f"{n:.2f}" for n in os.getloadavg())
        text = render(report, command, version[1] if version else "?")
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    summary = {"mode": report.mode, "machine": report.machine, "failures": report.failures(),
               "hostile": [row.__dict__ for row in report.hostile], "faults": [row.__dict__ for row in report.faults],
               "resources": [row.__dict__ for row in report.resources], "streams": report.streams, "soak": report.soak,
               "lost": report.soak.get("lost"), "errors": len(report.failures())}
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    return 0 if not summary["failures"] else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="reliability.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    stream_client = sub.add_parser("streams")
    stream_client.add_argument("--port", type=int, required=True)
    stream_client.add_argument("--count", type=int, required=True)
    stream_client.add_argument("--interval-ms", type=int, default=1000)
    stream_client.add_argument("--ramp-per-s", type=int, default=200)
    stream_client.add_argument("--max-s", type=float, default=300)
    soak_client = sub.add_parser("soak")
    soak_client.add_argument("--port", type=int, required=True)
    soak_client.add_argument("--requests", type=int, required=True)
    soak_client.add_argument("--connections", type=int, default=32)
    soak_client.add_argument("--max-s", type=float, default=600)
    for target in (parser,):
        target.add_argument("--quick", action="store_true", help="the fast subset: 50 streams for 3 s, 2,000 requests")
        target.add_argument("--streams", type=int, help="SSE streams held at once (1,000; --quick 50)")
        target.add_argument("--hold-s", type=float, help="how long they are held (60; --quick 3)")
        target.add_argument("--interval-ms", type=int, help="between a held stream's events (1000; --quick 500)")
        target.add_argument("--soak-requests", type=int, help="requests in the soak (100,000; --quick 2,000)")
        target.add_argument("--soak-connections", type=int, default=32, help="keep-alive connections in the soak")
        target.add_argument("--soak-max-s", type=float, help="time bound of the soak (600; --quick 60)")
        target.add_argument("--python", default=sys.executable, help="interpreter for SOAKP and the helpers")
        target.add_argument("--soakp", default=str(SOAKP_PY), help="the soakp.py to run (default: this checkout's)")
        target.add_argument("--out", help="also write the Markdown report here")
        target.add_argument("--json", help="write the figures as JSON here")
    args = parser.parse_args(argv)
    if args.command == "streams":
        raise_fd_limit()
        print(json.dumps(asyncio.run(run_streams(args.port, args.count, args.interval_ms, args.ramp_per_s,
                                                 args.max_s))), flush=True)
        return 0
    if args.command == "soak":
        print(json.dumps(asyncio.run(run_soak(args.port, args.requests, args.connections, args.max_s))), flush=True)
        return 0
    args.argv = argv
    return orchestrate(args)


if __name__ == "__main__":
    raise SystemExit(main())
