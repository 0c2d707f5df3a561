"""The access log, end to end: one bare JSON object per request on stderr (at --log-level info and debug),
with who, what, how long and how much, and never a key, a token, a query string or a body.
"""

from __future__ import annotations

import datetime
import itertools
import json
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import soakp
from conftest import SOAKP_PY, basic_auth, soakp_env
from fake_upstream import FakeUpstream, build_request, die_mid_body, exchange, sse_reply
from proc_helpers import listening_port

if TYPE_CHECKING:
    from conftest import SoakpLauncher, SoakpProcess

CHAT = "/v1/chat/completions"
CHAT_BODY = b'{"model":"gpt-fake-1","messages":[{"role":"user","content":"a body that must not be logged"}]}'
FIELDS = {"time", "request_id", "client", "method", "path", "status", "bytes_in", "bytes_out", "duration_ms",
          "upstream_ms", "ttfb_ms", "sub", "jti", "model"}
LOG_WAIT_S = 5.0  # the line is written just after the response: wait for it, boundedly


def access_lines(proxy: SoakpProcess) -> list[dict[str, Any]]:
    """Every access log line so far, parsed (other log lines are plain text and never start with `{`)."""
    return [json.loads(line) for line in proxy.log_text().splitlines() if line.startswith("{")]


def wait_line(proxy: SoakpProcess, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """The one access log line that matches, waiting up to LOG_WAIT_S for it to be written."""
    deadline = time.monotonic() + LOG_WAIT_S
    for _ in range(500):
        found = [line for line in access_lines(proxy) if predicate(line)]
        if found or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    assert len(found) == 1, f"{len(found)} matching access log lines"
    return found[0]


def tagged(tag: str) -> Callable[[dict[str, Any]], bool]:
    return lambda line: line["path"] == f"/v1/fake/echo/{tag}"


def check_common(line: dict[str, Any]) -> None:
    """Fields every line has, with sane types."""
    assert FIELDS <= set(line), FIELDS - set(line)
    logged_at = datetime.datetime.fromisoformat(line["time"])
    assert logged_at.utcoffset() == datetime.timedelta(0)
    assert abs((datetime.datetime.now(datetime.timezone.utc) - logged_at).total_seconds()) < 60
    assert line["client"] == "127.0.0.1"
    assert isinstance(line["request_id"], str) and line["request_id"]
    assert isinstance(line["duration_ms"], (int, float)) and line["duration_ms"] >= 0
    assert isinstance(line["bytes_out"], int) and line["bytes_out"] > 0


@pytest.fixture(scope="module")
def log_server(soakp_launcher: SoakpLauncher) -> Iterator[SoakpProcess]:
    process = soakp_launcher.start(log_level="info")
    yield process
    process.stop()


@pytest.fixture
def server(log_server: SoakpProcess, fake_upstream: FakeUpstream) -> SoakpProcess:
    assert log_server.alive, log_server.log_text()[-3000:]
    return log_server


def test_success_line(server: SoakpProcess) -> None:
    """A chat completion: the upstream's request id, sizes that match the wire, upstream time and time to
    first byte within the total, the token's sub and jti, the model and the usage."""
    minted = server.mint_data(sub="log-ok")
    response = server.request("POST", CHAT, minted.token, [("Content-Type", "application/json")], CHAT_BODY)
    assert response.status == 200
    request_id = response.header("x-request-id")
    line = wait_line(server, lambda line: line["request_id"] == request_id)
    check_common(line)
    assert {k: line[k] for k in ("method", "path", "status", "sub", "jti", "model")} == {
        "method": "POST", "path": CHAT, "status": 200, "sub": "log-ok", "jti": minted.jti, "model": "gpt-fake-1"}
    assert line["bytes_in"] == len(CHAT_BODY)
    assert line["bytes_out"] == len(response.raw_head) + len(response.body)
    assert 0 <= line["ttfb_ms"] <= line["duration_ms"]
    assert 0 <= line["upstream_ms"] <= line["duration_ms"]
    assert line["usage"] == {"prompt_tokens": 9, "completion_tokens": 3}
    assert "error" not in line


def test_stream_line(server: SoakpProcess, fake_upstream: FakeUpstream) -> None:
    """A stream: time to first byte is well before the end, usage comes from the last event."""
    usage = {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}
    fake_upstream.script("/v1/fake/echo/stream", sse_reply([{"choices": [{"delta": {"content": "x"}}]},
                                                             {"choices": [], "usage": usage}]))
    minted = server.mint_data()
    response = server.request("POST", "/v1/fake/echo/stream", minted.token, body=b'{"stream":true,"model":"m"}')
    assert response.status == 200 and response.complete
    line = wait_line(server, tagged("stream"))
    check_common(line)
    assert line["request_id"].startswith("req_fake_")
    assert line["usage"] == {"prompt_tokens": 4, "completion_tokens": 2}
    assert line["bytes_out"] > len(response.raw_head) + len(response.body)  # chunk framing counts too
    assert line["model"] == "m"


@pytest.mark.parametrize("credential", ["none", "garbage", "tampered"])
def test_401_line(server: SoakpProcess, credential: str) -> None:
    """No token, a malformed one, a tampered one: 401, SOAKP's own request id, no sub/jti, no upstream time,
    and the presented token is nowhere in the log."""
    tag = f"u401-{credential}"
    token = {"none": None, "garbage": "not-a-token-" + secrets.token_hex(8),
             "tampered": server.mint()[:-6] + "AAAAAA"}[credential]
    if token is not None:
        server.registry.add(token)
    response = server.request("GET", f"/v1/fake/echo/{tag}", token)
    assert response.status == 401
    line = wait_line(server, tagged(tag))
    check_common(line)
    assert line["request_id"].startswith("soakp-")
    assert (line["status"], line["method"], line["sub"], line["jti"]) == (401, "GET", None, None)
    assert line["upstream_ms"] is None and line["ttfb_ms"] is None
    assert line["bytes_out"] == len(response.raw_head) + len(response.body)
    if token is not None:
        assert token not in server.log_text()


def test_403_line(server: SoakpProcess, fake_upstream: FakeUpstream) -> None:
    """A path outside the token's `paths`: 403, with the token's sub and jti, nothing sent upstream."""
    minted = server.mint_data(sub="log-403", paths=["/v1/embeddings"])
    response = server.request("GET", "/v1/fake/echo/u403", minted.token)
    assert response.status == 403
    line = wait_line(server, tagged("u403"))
    check_common(line)
    assert (line["status"], line["sub"], line["jti"], line["upstream_ms"]) == (403, "log-403", minted.jti, None)
    assert fake_upstream.requests == []


def test_query_string_and_body_are_not_logged(server: SoakpProcess) -> None:
    """The path is logged without its query string, and no part of a request or response body appears (the
    echo's answer repeats the query, so the marker is in the response body too)."""
    minted = server.mint_data()
    marker = secrets.token_hex(8)
    body = json.dumps({"model": "m", "input": f"body-{marker}"}).encode()
    response = server.request("POST", f"/v1/fake/echo/query?api_key=q-{marker}", minted.token, body=body)
    assert response.status == 200 and marker.encode() in response.body
    line = wait_line(server, tagged("query"))
    assert line["bytes_in"] == len(body)
    assert marker not in server.log_text()


def test_keep_alive_requests_get_a_line_each(server: SoakpProcess) -> None:
    """Three requests on one connection: three lines, in order, each with a distinct request id."""
    minted = server.mint_data()
    with server.connect() as conn:
        for n in range(3):
            conn.send(build_request("GET", f"/v1/fake/echo/ka{n}", [("Authorization", f"Bearer {minted.token}")]))
            assert conn.read_response().status == 200
    lines = [wait_line(server, tagged(f"ka{n}")) for n in range(3)]
    assert len({line["request_id"] for line in lines}) == 3


def test_admin_requests_are_logged_without_secrets(server: SoakpProcess) -> None:
    """Minting is logged (201, route and sizes) without the key, the token or the admin password."""

    def mint_lines() -> list[dict[str, Any]]:
        return [line for line in access_lines(server) if line["path"] == "/jwt/generate"]

    before = len(mint_lines())
    key = server.registry.new_key()
    minted = server.mint_data(key, sub="log-admin")
    deadline = time.monotonic() + LOG_WAIT_S
    while len(mint_lines()) == before and time.monotonic() < deadline:
        time.sleep(0.01)
    line = mint_lines()[-1]
    check_common(line)
    assert (line["method"], line["status"], line["sub"], line["jti"]) == ("POST", 201, None, None)
    assert line["bytes_out"] > len(minted.token)
    text = server.log_text()
    for value in (key, minted.token, server.admin[1], basic_auth(*server.admin)):
        assert value not in text


def test_admin_request_bytes_in_is_counted(server: SoakpProcess) -> None:
    """POST /jwt/revoke with a JSON body: bytes_in is the body's size, as for forwarded requests."""
    body = json.dumps({"jti": server.mint_data().jti}).encode()
    response = server.request("POST", "/jwt/revoke", headers=[("Authorization", basic_auth(*server.admin)),
                                                              ("Content-Type", "application/json")], body=body)
    assert response.status == 200
    line = wait_line(server, lambda line: line["path"] == "/jwt/revoke" and line["status"] == 200)
    assert line["bytes_in"] == len(body)


def test_mid_body_failure_line(server: SoakpProcess, fake_upstream: FakeUpstream) -> None:
    """An upstream that dies after the response started: the line keeps the status that was sent and
    names the failure."""
    fake_upstream.script("/v1/fake/echo/midbody", die_mid_body(how="reset"))
    minted = server.mint_data()
    with server.connect() as conn:
        conn.send(build_request("GET", "/v1/fake/echo/midbody", [("Authorization", f"Bearer {minted.token}")]))
        assert not conn.read_response().complete
    line = wait_line(server, tagged("midbody"))
    assert (line["status"], line["error"]) == (200, "reset_mid_body")


def test_502_line_for_an_unreachable_upstream(soakp: Callable[..., SoakpProcess], fake_upstream: FakeUpstream) -> None:
    """Upstream refusing connections: 502, the kind of failure, SOAKP's own request id, the token's sub."""
    with socket.socket() as holder:  # bound, never listening: connecting to it is refused
        holder.bind(("127.0.0.1", 0))
        lonely = soakp(upstream=f"https://127.0.0.1:{holder.getsockname()[1]}", log_level="info")
        minted = lonely.mint_data(sub="log-502")
        response = lonely.request("POST", CHAT, minted.token, [("Content-Type", "application/json")], CHAT_BODY)
    assert response.status == 502
    line = wait_line(lonely, lambda line: line["path"] == CHAT)
    check_common(line)
    assert (line["status"], line["error"], line["sub"], line["jti"]) == (502, "connect_failed", "log-502", minted.jti)
    assert line["request_id"].startswith("soakp-")
    assert line["ttfb_ms"] is None and "usage" not in line
    text = lonely.log_text()
    assert minted.key not in text and minted.token not in text


def test_no_access_log_at_warning(soakp_launcher: SoakpLauncher, fake_upstream: FakeUpstream, tmp_path: Path,
                                  secrets_registry: Any) -> None:
    """`--log-level warning` turns the access log off: requests, refusals and admin calls leave no line."""
    args = [f"--{name.replace('_', '-')}={value}" for name, value in soakp_launcher.default_options().items()]
    log_path = tmp_path / "quiet.log"
    secrets_registry.logs.append(log_path)
    with open(log_path, "wb") as log:
        quiet = subprocess.Popen([sys.executable, str(SOAKP_PY), "serve", *args, "--log-level=warning"],
                                 stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=soakp_env())
    try:
        port = None
        deadline = time.monotonic() + 15
        while port is None and quiet.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
            port = listening_port(quiet.pid)
        assert port is not None, log_path.read_text()
        admin = [("Authorization", basic_auth(*soakp_launcher.admin)), ("Content-Type", "application/json")]
        key = secrets_registry.new_key()
        minted = exchange(port, build_request("POST", "/jwt/generate", admin, json.dumps({"key": key}).encode()))
        assert minted.status == 201
        token = secrets_registry.add(minted.json()["data"]["jwt"])
        auth = [("Authorization", f"Bearer {token}")]
        assert exchange(port, build_request("GET", "/v1/models", auth)).status == 200
        assert exchange(port, build_request("GET", "/v1/models")).status == 401
    finally:
        quiet.send_signal(signal.SIGTERM)
        quiet.wait(10)
    assert quiet.returncode == 0
    text = log_path.read_text()
    assert not [line for line in text.splitlines() if line.startswith("{")], text


@settings(max_examples=200, deadline=None)
@given(path=st.text(max_size=60), model=st.one_of(st.none(), st.text(max_size=40)),
       request_id=st.one_of(st.none(), st.text(min_size=1, max_size=30)), status=st.integers(0, 599),
       elapsed=st.floats(0, 1e4), usage=st.one_of(st.none(), st.tuples(st.integers(0, 10**9), st.integers(0, 10**9))))
def test_hand_written_log_line_is_always_valid_json(path: str, model: str | None, request_id: str | None, status: int,
                                                    elapsed: float, usage: tuple[int, int] | None) -> None:
    """access_log_line() writes JSON by hand for speed: whatever a client puts in its path or model, the
    line parses, and to the values it was given."""
    class State:
        request_counter = itertools.count()

    head = soakp.RequestHead(method="POST", path=path, query="", http_minor=1, headers=(), body_kind="none",
                             content_length=0, keep_alive=True, expect_continue=False)
    exchange = soakp.Exchange(started=0.0, watchdog=None)  # type: ignore[arg-type]
    exchange.status, exchange.model, exchange.request_id, exchange.usage = status, model, request_id, usage
    record = json.loads(soakp.access_log_line(State(), exchange, "127.0.0.1", head, elapsed, 1795768362.25))
    assert record["path"] == soakp.safe_for_log(path)
    assert record["model"] == model and record["status"] == status
    assert record["request_id"] == (request_id or "soakp-0")
    assert record["duration_ms"] == round(elapsed * 1000, 2)
    assert record["time"] == "2026-11-27T08:32:42.250+00:00"
    assert record.get("usage") == (None if usage is None else {"prompt_tokens": usage[0], "completion_tokens": usage[1]})
