"""The fake upstream's process mode (tests/fake_upstream.py section 7), as bench/ and tools/ run it.

bench/run.py and tools/reliability.py lean on these behaviours to tell a working proxy from a broken
one (the 401 without the real key, the stamps, the x-rel-id echo, the faults): they are checked here
on their own, over real TLS on 127.0.0.1, against a process started the way those tools start it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deploy_support import stop_processes
from fake_upstream import (
    BENCH_CHAT_COMPLETION,
    CertAuthority,
    RawConnection,
    RawResponse,
    build_request,
    exchange,
)

FAKE_UPSTREAM_PY = Path(__file__).resolve().parent / "fake_upstream.py"
KEY = "sk-process-test-key"


class Process:
    """One `python tests/fake_upstream.py` and its two ports."""

    def __init__(
        self, popen: subprocess.Popen[str], port: int, control_port: int, ca: CertAuthority
    ) -> None:
        self.popen = popen
        self.port = port
        self.control_port = control_port
        self.context = ca.client_context()

    def request(self, method: str, target: str, body: bytes | None = None,
                headers: list[tuple[str, str]] | None = None, key: str | None = KEY) -> RawResponse:
        auth = [("Authorization", f"Bearer {key}")] if key else []
        data = build_request(method, target, [*auth, *(headers or [])], body)
        return exchange(self.port, data, ssl_context=self.context)

    def control(self, path: str, method: str = "GET") -> Any:
        body = b"" if method == "POST" else None
        data = build_request(method, path, [("Connection", "close")], body)
        return exchange(self.control_port, data).json()


def start(ca: CertAuthority, tmp_path: Path, *args: str) -> Iterator[Process]:
    cert, key = ca.issue("process", directory=tmp_path)
    popen = subprocess.Popen(
        [sys.executable, str(FAKE_UPSTREAM_PY), "--cert", str(cert), "--key", str(key), *args],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PROCESS_TEST_KEY": KEY},
    )
    try:
        assert popen.stdout is not None
        line = popen.stdout.readline()  # the process prints READY at once or exits
        assert line.startswith("READY "), f"no READY line: {line!r}"
        _, port, control_port = line.split()
        yield Process(popen, int(port), int(control_port), ca)
    finally:
        stop_processes(popen)
        if popen.stdout:
            popen.stdout.close()


@pytest.fixture
def bench_upstream(test_ca: CertAuthority, tmp_path: Path) -> Iterator[Process]:
    yield from start(test_ca, tmp_path, "--profile", "bench", "--api-key", KEY)


@pytest.fixture
def reliability_upstream(test_ca: CertAuthority, tmp_path: Path) -> Iterator[Process]:
    args = ("--profile", "reliability", "--api-key-env", "PROCESS_TEST_KEY")
    yield from start(test_ca, tmp_path, *args)


CHAT = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello."}]}'


def sse_data(body: bytes) -> list[bytes]:
    return [line[6:] for line in body.split(b"\n") if line.startswith(b"data: ")]


def test_bench_profile_answers_fixed_bytes_and_401_without_the_key(bench_upstream: Process) -> None:
    """The fixed answer nginx also serves; a wrong or missing key is a 401 in OpenAI's shape."""
    answer = bench_upstream.request("POST", "/v1/chat/completions", CHAT)
    assert answer.status == 200 and answer.body == BENCH_CHAT_COMPLETION
    assert answer.header("x-request-id") == "req_bench"
    for key in ("sk-wrong", None):
        refused = bench_upstream.request("POST", "/v1/chat/completions", CHAT, key=key)
        assert refused.status == 401
        assert refused.json()["error"]["code"] == "invalid_api_key"
    assert bench_upstream.request("GET", "/v1/chat/completions").status == 404
    stats = bench_upstream.control("/stats")
    assert stats["requests"] == 4 and stats["unauthorised"] == 2 and stats["accepts"] == 4
    assert stats["by_path"] == {"/v1/chat/completions": 4}


def test_bench_profile_stamps_events_with_the_monotonic_clock(bench_upstream: Process) -> None:
    """Each event carries time.monotonic_ns() read as it was written: between our readings."""
    before = time.monotonic_ns()
    body = b'{"model":"m","stream":true,"bench":{"chunks":5,"interval_ms":20}}'
    answer = bench_upstream.request("POST", "/v1/chat/completions", body)
    after = time.monotonic_ns()
    assert answer.status == 200 and answer.chunked and answer.complete
    events = sse_data(answer.body)
    assert events[-1] == b"[DONE]" and len(events) == 6
    stamps = [json.loads(event)["bench_ns"] for event in events[:-1]]
    assert before <= stamps[0] and stamps[-1] <= after
    gaps_ms = [(b - a) / 1e6 for a, b in zip(stamps, stamps[1:])]
    assert min(gaps_ms) >= 15, gaps_ms  # 20 ms apart, paced by the loop's clock


def test_bench_profile_holds_streams_until_release(bench_upstream: Process) -> None:
    body = b'{"model":"m","stream":true,"bench":{"hold":true,"interval_ms":50}}'
    data = build_request("POST", "/v1/chat/completions", [("Authorization", f"Bearer {KEY}")], body)
    with RawConnection(bench_upstream.port, ssl_context=bench_upstream.context) as conn:
        conn.send(data)
        conn.read_until(lambda got: got.count(b"data: ") >= 3)
        assert b"[DONE]" not in bytes(conn.buffer)
        assert bench_upstream.control("/release", "POST") == {"released": True}
        answer = conn.read_response("POST")
    assert answer.complete and sse_data(answer.body)[-1] == b"[DONE]"


def test_bench_profile_without_usage_pads_to_the_same_length(
    test_ca: CertAuthority, tmp_path: Path
) -> None:
    """observability_cost.py's upstream: no key check, the same number of bytes without usage."""
    for process in start(test_ca, tmp_path, "--profile", "bench", "--no-usage"):
        answer = process.request("POST", "/v1/chat/completions", CHAT, key=None)
        assert answer.status == 200 and b'"usage"' not in answer.body
        assert len(answer.body) == len(BENCH_CHAT_COMPLETION)


def test_reliability_profile_echoes_rel_id_and_counts_paths(reliability_upstream: Process) -> None:
    rel_id = [("X-Rel-Id", "r-42")]
    answer = reliability_upstream.request("POST", "/v1/rel/echo/x?y=1", b"abc", rel_id)
    assert answer.status == 200 and answer.header("x-request-id") == "r-42"
    assert answer.json()["target"] == "/v1/rel/echo/x?y=1"
    assert reliability_upstream.request("GET", "/v1/models").header("x-request-id") == "req_rel"
    assert reliability_upstream.request("GET", "/v1/models", key="sk-wrong").status == 401
    missing = reliability_upstream.request("GET", "/nowhere")
    assert missing.status == 404 and missing.json()["error"]["message"] == "no such path"
    by_path = reliability_upstream.control("/stats")["by_path"]
    assert by_path == {"/v1/rel/echo/x": 1, "/v1/models": 2, "/nowhere": 1}


def test_reliability_profile_budgeted_stream_reports_its_cap(reliability_upstream: Process) -> None:
    body = b'{"model":"m","stream":true,"max_completion_tokens":77}'
    answer = reliability_upstream.request("POST", "/v1/chat/completions", body)
    events = sse_data(answer.body)
    assert len(events) == 7 and events[-1] == b"[DONE]"
    assert json.loads(events[-2])["usage"] == {"prompt_tokens": 10, "completion_tokens": 77}


@pytest.mark.parametrize("fault", ["reset-mid", "bad-chunk", "huge-head", "garbage"])
def test_reliability_profile_faults_end_the_connection(
    reliability_upstream: Process, fault: str
) -> None:
    data = build_request("GET", f"/v1/rel/{fault}", [("Authorization", f"Bearer {KEY}")])
    with RawConnection(reliability_upstream.port, ssl_context=reliability_upstream.context) as conn:
        conn.send(data)
        assert conn.wait_closed(10)
        got = bytes(conn.buffer)
    if fault == "garbage":
        assert got.startswith(b"\x00\xff\xfeSSH-2.0")
    elif fault == "huge-head":
        assert re.match(rb"HTTP/1.1 200 OK\r\nX-Big: b{70000}\r\n\r\n$", got)
    else:
        assert got.startswith(b"HTTP/1.1 200 OK") and b"[DONE]" not in got
    if fault == "bad-chunk":
        assert got.endswith(b"zz\r\nnot a chunk\r\n")
    if fault == "reset-mid":
        assert got.endswith(b'data: {"n":1}\n\n\r\n')  # two events, then no last chunk
