"""Upstream faults: each gives the client a clear 502/504 before the response starts, or a cleanly closed,
truncated stream after it; never a hang, never an insecure retry.

Already covered in test_http_errors.py: refused connection, untrusted CA (status only), stall before
headers (504), and close/reset/silence mid-body. Here: every way the TLS layer can fail, each asserting
what the misbehaving server saw (a failed handshake and never a byte of HTTP, so never the key); garbage
and broken framing; resets before the answer (a POST is never sent twice); bytes past a response's framing
(never another request's answer); and an upstream that stops reading the request body.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import socket
import ssl
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

import soakp
from fake_upstream import CertAuthority, FakeUpstream, RecordedRequest, Responder, build_request
from fault_servers import (
    FaultServer,
    collect,
    garbage_after_tls,
    garbage_by_path,
    plain_http_answer,
    read_head_then_stall,
    silent,
    tls_then,
)

if TYPE_CHECKING:
    from conftest import SoakpProcess

CLIENT_TIMEOUT_S = 20.0


def assert_gateway_error(response, status: int, key: str | None = None) -> None:
    assert response.status == status, f"expected {status}, got {response.status}: {response.body[:300]!r}"
    error = response.json()["error"]
    assert error["message"] and error["type"] == "server_error"
    if key is not None:
        assert key.encode() not in response.body


def server_context(cert: Path, key: Path, tls_max: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    if tls_max is not None:
        with warnings.catch_warnings():  # the old versions are the point of this server
            warnings.simplefilter("ignore", DeprecationWarning)
            context.minimum_version = ssl.TLSVersion.TLSv1
            context.maximum_version = tls_max
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
    context.load_cert_chain(str(cert), str(key))
    return context


def assert_no_http_reached(server: FaultServer, key: str) -> None:
    """Every connection to the server failed its TLS handshake, so no HTTP byte (and no key) reached it."""
    records = server.connections()
    assert records, "SOAKP never tried the upstream"
    for record in records:
        assert record.handshake.startswith("failed"), f"a handshake completed: {record.handshake}"
        assert record.app_bytes == b""
        assert record.first_bytes[:1] == b"\x16", f"not a TLS ClientHello: {record.first_bytes[:20]!r}"
        assert key.encode() not in record.first_bytes


# Certificates that must not verify ##########################################################################


def self_signed_pair(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 that signs itself (soakp's own development pair)."""
    soakp.write_selfsigned(str(directory), "127.0.0.1", datetime.datetime.now(datetime.timezone.utc))
    return directory / "fullchain.pem", directory / "privkey.pem"


def expired_pair(ca: CertAuthority, directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 from the trusted test CA that expired yesterday."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=3))
        .not_valid_after(now - datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                       critical=False)
        .sign(ca._key, hashes.SHA256())  # the CA's own key: only the dates are wrong
    )
    cert_path, key_path = directory / "expired.pem", directory / "expired-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


BAD_CERTIFICATES: dict[str, Callable[[CertAuthority, Path], tuple[Path, Path]]] = {
    "self-signed": lambda ca, d: self_signed_pair(d / "self"),
    "wrong hostname": lambda ca, d: ca.issue("wrong-host", hosts=("elsewhere.test",), directory=d),
    "another CA": lambda ca, d: CertAuthority(d / "stranger", "Stranger CA").issue("stranger", directory=d),
    "expired": expired_pair,
}


@pytest.mark.parametrize("name", BAD_CERTIFICATES)
def test_certificate_that_does_not_verify_is_502_and_never_retried_insecurely(
    soakp, fake_upstream: FakeUpstream, test_ca: CertAuthority, tmp_path: Path, name: str
) -> None:
    """Three requests, three 502s naming the certificate; the impostor saw only ClientHellos and failed
    handshakes: no request head, no key, no plain-TCP retry."""
    cert, key = BAD_CERTIFICATES[name](test_ca, tmp_path)
    with FaultServer(tls_then(server_context(cert, key))) as impostor:
        server = soakp(upstream=impostor.url)
        minted = server.mint_data()
        for _ in range(3):
            response = server.request("POST", "/v1/chat/completions", minted.token, body=b'{"model":"m"}',
                                      timeout_s=CLIENT_TIMEOUT_S)
            assert_gateway_error(response, 502, minted.key)
            assert "certificate" in response.json()["error"]["message"].lower()
        assert impostor.wait_closed(len(impostor.connections()))
        assert_no_http_reached(impostor, minted.key)
        assert server.request("GET", "/healthz").status == 200


def test_tls_below_1_2_is_refused(soakp, fake_upstream: FakeUpstream, test_ca: CertAuthority, tmp_path: Path) -> None:
    """An upstream offering only TLS 1.0/1.1 (with a valid certificate) is a 502: SOAKP never downgrades."""
    cert, key = test_ca.issue("old-tls", directory=tmp_path)
    try:
        context = server_context(cert, key, tls_max=ssl.TLSVersion.TLSv1_1)
    except (ssl.SSLError, ValueError) as exc:  # an OpenSSL built without TLS 1.1
        pytest.skip(f"this OpenSSL cannot serve TLS 1.1: {exc}")
    with FaultServer(tls_then(context)) as old:
        server = soakp(upstream=old.url)
        minted = server.mint_data()
        assert_gateway_error(server.request("GET", "/v1/models", minted.token, timeout_s=CLIENT_TIMEOUT_S), 502,
                             minted.key)
        assert old.wait_closed(len(old.connections()))
        assert_no_http_reached(old, minted.key)


def test_plain_http_where_tls_was_expected_is_502_and_gets_no_plaintext(soakp, fake_upstream: FakeUpstream) -> None:
    """A plain-HTTP server at the https:// upstream address answers 200 to anything; SOAKP only ever sent
    it a ClientHello, read its answer as a TLS failure, and told the client 502."""
    with FaultServer(plain_http_answer) as plain:
        server = soakp(upstream=plain.url)
        minted = server.mint_data()
        for _ in range(2):
            assert_gateway_error(server.request("GET", "/v1/models", minted.token, timeout_s=CLIENT_TIMEOUT_S),
                                 502, minted.key)
        assert plain.wait_closed(len(plain.connections()))
        for record in plain.connections():
            assert record.app_bytes[:1] == b"\x16", f"plaintext reached a plain server: {record.app_bytes[:40]!r}"
            assert b"HTTP/1" not in record.app_bytes and minted.key.encode() not in record.app_bytes


def test_upstream_that_never_finishes_the_handshake_is_502_within_connect_timeout(
    soakp, fake_upstream: FakeUpstream
) -> None:
    """A peer that accepts TCP and never answers the ClientHello: 502 once --connect-timeout (1 s) passes."""
    with FaultServer(silent) as mute:
        server = soakp(upstream=mute.url, connect_timeout="1s")
        token = server.mint()
        started = time.monotonic()
        response = server.request("GET", "/v1/models", token, timeout_s=CLIENT_TIMEOUT_S)
        elapsed = time.monotonic() - started
        assert_gateway_error(response, 502)
        assert 0.8 <= elapsed < 6, f"502 after {elapsed:.1f}s with --connect-timeout 1s"


# Broken answers after a good handshake ######################################################################

GARBAGE = {
    "binary": b"\x00\xff\xfe\x13\x37" * 40 + b"\r\n\r\n",
    "ssh banner": b"SSH-2.0-OpenSSH_9.2\r\n\r\n",
    "http/0.9 body": b"<html>hello</html>\r\n\r\n",
    "status without code": b"HTTP/1.1 OK\r\n\r\n",
    "status 2 digits": b"HTTP/1.1 20 OK\r\nContent-Length: 0\r\n\r\n",
    "HTTP/2 status": b"HTTP/2 200\r\ncontent-length: 0\r\n\r\n",
    "bad header line": b"HTTP/1.1 200 OK\r\nNo colon here\r\nContent-Length: 0\r\n\r\n",
    "obs-fold header": b"HTTP/1.1 200 OK\r\nX-A: a\r\n b\r\nContent-Length: 0\r\n\r\n",
    "conflicting lengths": b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
    "negative length": b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
    "head never ends": b"HTTP/1.1 200 OK\r\nX-A: a\r\n",
    "head over 64 KiB": b"HTTP/1.1 200 OK\r\nX-Big: " + b"b" * 70_000 + b"\r\n\r\n",
    "nothing at all": b"",
}


GARBAGE_NAMES = {name: str(index) for index, name in enumerate(GARBAGE)}


@pytest.fixture(scope="module")
def liar(soakp_launcher, test_ca: CertAuthority, tmp_path_factory: pytest.TempPathFactory):
    """One upstream that answers each /v1/garbage/N with GARBAGE's Nth answer, and one SOAKP in front of it."""
    cert, key = test_ca.issue("garbage", directory=tmp_path_factory.mktemp("garbage"))
    answers = {GARBAGE_NAMES[name]: garbage for name, garbage in GARBAGE.items()}
    with FaultServer(tls_then(server_context(cert, key), garbage_by_path(answers))) as server:
        proxy = soakp_launcher.start(upstream=server.url)
        try:
            yield server, proxy, proxy.mint_data()
        finally:
            proxy.stop()


@pytest.mark.parametrize("name", GARBAGE)
def test_garbage_instead_of_http_is_502(liar, fake_upstream: FakeUpstream, name: str) -> None:
    """Bytes that are not an HTTP/1.1 response head (then the connection closes): 502, and SOAKP goes on."""
    _, server, minted = liar
    response = server.request("GET", f"/v1/garbage/{GARBAGE_NAMES[name]}", minted.token, timeout_s=CLIENT_TIMEOUT_S)
    assert_gateway_error(response, 502, minted.key)
    assert server.request("GET", "/healthz").status == 200


def test_content_length_too_long_for_int_is_502(soakp, fake_upstream: FakeUpstream, test_ca: CertAuthority,
                                                tmp_path: Path) -> None:
    """Regression: a Content-Length of 5000 digits made int() raise ValueError (Python's 4300-digit limit),
    which surfaced as a 500."""
    cert, key = test_ca.issue("huge-length", directory=tmp_path)
    garbage = b"HTTP/1.1 200 OK\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n"
    with FaultServer(tls_then(server_context(cert, key), garbage_after_tls(garbage))) as liar:
        server = soakp(upstream=liar.url)
        token = server.mint()
        assert_gateway_error(server.request("GET", "/v1/models", token, timeout_s=CLIENT_TIMEOUT_S), 502)


def close_without_answering(how: str) -> Callable[[RecordedRequest, Responder], object]:
    async def behaviour(request: RecordedRequest, responder: Responder) -> None:
        await (responder.abort() if how == "reset" else responder.close())

    return behaviour


@pytest.mark.parametrize("how", ["reset", "close"])
def test_upstream_closing_before_the_answer_is_502(proxy: SoakpProcess, fake_upstream: FakeUpstream, token: str,
                                                   how: str) -> None:
    """The upstream reads the request, then resets (or cleanly closes) without a byte of answer: 502."""
    fake_upstream.script("/v1/fake/hangup", close_without_answering(how))
    response = proxy.request("GET", "/v1/fake/hangup", token, timeout_s=CLIENT_TIMEOUT_S)
    assert_gateway_error(response, 502)
    assert proxy.request("GET", "/v1/fake/echo/after", token).status == 200


def test_post_the_upstream_already_received_is_not_sent_twice(proxy: SoakpProcess, fake_upstream: FakeUpstream,
                                                              token: str) -> None:
    """A reused keep-alive connection; the upstream reads the whole POST, then resets without answering. It
    may have acted on it (a chat completion billed, a batch created), so SOAKP must answer 502 rather than
    send the same POST again (Go's net/http and nginx only replay idempotent requests)."""
    assert proxy.request("GET", "/v1/fake/echo/warm", token).status == 200  # an idle connection in the pool
    fake_upstream.script("/v1/fake/echo/once", close_without_answering("reset"), times=1)
    response = proxy.request("POST", "/v1/fake/echo/once", token, body=b'{"model":"m","n":1}',
                             timeout_s=CLIENT_TIMEOUT_S)
    received = [r for r in fake_upstream.requests if r.path == "/v1/fake/echo/once" and r.complete]
    assert len(received) == 1, f"the upstream received the POST {len(received)} times (client got {response.status})"
    assert_gateway_error(response, 502)


OVERFLOWS = {
    # A second response in the same write: the next request on the pooled connection would read it.
    "a second response after the body": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"
                                        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 17"
                                        b"\r\n\r\n{\"injected\":true}",
    # The classic server bug: Content-Length counted in characters, the body sent as UTF-8.
    "Content-Length in characters": b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 14"
                                    b"\r\n\r\n" + '{"text":"h\u00e9\u00e9"}'.encode(),  # 14 characters, 16 bytes
    "bytes after the last chunk": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n"
                                  b"HTTP/1.1 200 OK\r\nContent-Length: 17\r\n\r\n{\"injected\":true}",
}


@pytest.mark.parametrize("name", OVERFLOWS)
def test_upstream_bytes_past_the_framing_never_answer_another_request(soakp, fake_upstream: FakeUpstream,
                                                                      name: str) -> None:
    """An upstream sends more than its framing announced. Whatever the first client gets, the bytes past
    the framing must never become another request's answer: the connection is not reused (RFC 9112 §9.3:
    a response desynchronises a connection). Otherwise one client reads another's responses, shifted by one
    (another token, another OpenAI key)."""
    server = soakp()
    alice, bob = server.mint(), server.mint()

    async def overflow(request: RecordedRequest, responder: Responder) -> None:
        responder.writer.write(OVERFLOWS[name])
        await responder.writer.drain()

    fake_upstream.script("/v1/fake/overflow", overflow)
    server.request("GET", "/v1/fake/overflow", alice, timeout_s=CLIENT_TIMEOUT_S)
    for number in range(3):
        response = server.request("GET", f"/v1/fake/echo/bob{number}", bob, timeout_s=CLIENT_TIMEOUT_S)
        assert response.status == 200, response.body[:200]
        assert response.json().get("target") == f"/v1/fake/echo/bob{number}", \
            f"request bob{number} got another answer: {response.body[:120]!r}"


SSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
GOOD_CHUNK = b'f\r\ndata: {"n":1}\n\n\r\n'
BROKEN_CHUNKS = {
    "bad size line with the head": [SSE_HEAD + GOOD_CHUNK + b"zz\r\nnot a chunk\r\n"],
    "bad size line after the head": [SSE_HEAD, GOOD_CHUNK + b"zz\r\nnot a chunk\r\n"],
    "data not ended by CRLF, with the head": [SSE_HEAD + GOOD_CHUNK[:-2] + b"XX" + GOOD_CHUNK],
    "size line over 4 KiB after the head": [SSE_HEAD + GOOD_CHUNK, b"1" * 5000],
}


@pytest.mark.parametrize("name", BROKEN_CHUNKS)
def test_broken_chunked_framing_is_a_502_or_a_truncated_stream(proxy: SoakpProcess, fake_upstream: FakeUpstream,
                                                               token: str, name: str) -> None:
    """The upstream breaks its chunked framing after a good chunk (in the same network read as the head,
    or later). If nothing reached the client yet it gets a 502; otherwise the head and the good bytes,
    then the end of the connection. Never a connection closed without a byte of answer."""
    pieces = BROKEN_CHUNKS[name]

    async def broken(request: RecordedRequest, responder: Responder) -> None:
        for piece in pieces:
            responder.writer.write(piece)
            await responder.flush()
            await asyncio.sleep(0.1)
        await responder.close()

    fake_upstream.script("/v1/fake/broken-chunks", broken)
    outcome = collect(proxy.port, build_request("GET", "/v1/fake/broken-chunks", [("Authorization", f"Bearer {token}")]),
                      timeout_s=CLIENT_TIMEOUT_S, half_close=False)
    assert outcome.eof, "SOAKP kept the connection open after the upstream broke its framing"
    assert outcome.responses, "the connection closed without any answer"
    response = outcome.responses[0]
    if response.status == 502:
        assert_gateway_error(response, 502)
    else:
        assert response.status == 200 and not response.complete
        assert response.body in (b"", b'data: {"n":1}\n\n')


def test_sse_reset_mid_stream_truncates_the_stream(proxy: SoakpProcess, fake_upstream: FakeUpstream, token: str) -> None:
    """An SSE stream whose upstream resets after two events: the client gets those two events, no
    terminating chunk, and the end of the connection (never an invented [DONE])."""

    async def two_events_then_reset(request: RecordedRequest, responder: Responder) -> None:
        await responder.send_head(200, [("Content-Type", "text/event-stream"), ("Transfer-Encoding", "chunked")])
        await responder.send(b'data: {"n":1}\n\n')
        await responder.send(b'data: {"n":2}\n\n')
        await responder.abort()

    fake_upstream.script("/v1/fake/sse-reset", two_events_then_reset)
    outcome = collect(proxy.port, build_request("GET", "/v1/fake/sse-reset", [("Authorization", f"Bearer {token}")]),
                      timeout_s=CLIENT_TIMEOUT_S, half_close=False)
    assert outcome.eof, "SOAKP kept the stream open after the upstream reset"
    assert [r.status for r in outcome.responses] == [200]
    stream = outcome.responses[0]
    assert not stream.complete
    assert stream.body.startswith(b'data: {"n":1}\n\n') and b"[DONE]" not in stream.body


# The upstream stops reading ##################################################################################


def test_upstream_that_stops_reading_the_body_does_not_hang_the_request(
    soakp, fake_upstream: FakeUpstream, test_ca: CertAuthority, tmp_path: Path
) -> None:
    """An upstream that reads the request head and then neither reads the body nor answers: within
    --read-timeout (2 s) plus slack the client gets a 502/504 (or the connection closes) and the upstream
    connection is closed, instead of both waiting forever."""
    cert, key = test_ca.issue("no-read", directory=tmp_path)
    with FaultServer(tls_then(server_context(cert, key), read_head_then_stall(stall_s=20))) as stuck:
        server = soakp(upstream=stuck.url, read_timeout="2s", header_timeout="5s", shutdown_grace="1s")
        token = server.mint()
        body_bytes = 64 * 1024 * 1024  # far more than the socket buffers on both sides can hold
        head = build_request("POST", "/v1/files", [("Authorization", f"Bearer {token}"),
                                                   ("Content-Length", str(body_bytes))])
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=CLIENT_TIMEOUT_S)
        stop = threading.Event()

        def upload() -> None:
            block = b"u" * 65536
            try:
                sock.sendall(head)
                for _ in range(body_bytes // len(block)):
                    if stop.is_set():
                        return
                    sock.sendall(block)
            except OSError:
                pass

        sender = threading.Thread(target=upload, daemon=True)
        sock.settimeout(1.0)
        sender.start()
        answer = b""
        deadline = time.monotonic() + 8
        try:
            while time.monotonic() < deadline:
                try:
                    piece = sock.recv(65536)
                except TimeoutError:
                    continue
                except ConnectionResetError:
                    break
                if not piece:
                    break
                answer += piece
                if b"\r\n\r\n" in answer:
                    break
            else:
                pytest.fail("no answer and no close 8 s after the upstream stopped reading the body")
        finally:
            stop.set()
            sock.close()
            sender.join(10)
        assert answer == b"" or answer.split(b" ", 2)[1] in (b"502", b"504"), (answer[:200], server.log_text()[-3000:])
        assert stuck.wait_closed(1, timeout_s=5), "SOAKP kept the stuck upstream connection open"

