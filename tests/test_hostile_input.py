"""Hostile client input at the socket: smuggling never desyncs, SOAKP is no open proxy, paths are checked
and forwarded byte for byte.

The desync proof: every attack is followed on the same connection by a well-formed, authorised
"smuggled" request. If SOAKP read the attack's framing differently from how it was meant (or from how
the next hop would), the smuggled request would become a request of its own and reach the fake
upstream. So each test asserts that the client got exactly one response and then the end of the
connection, and that the upstream never saw the smuggled request.

The pure parser cases live in test_http_parse.py and the single-request statuses in test_http_errors.py;
this file drives the running server.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

import soakp

from fake_upstream import FakeUpstream, build_request
from fault_servers import FaultServer, Outcome, collect, silent

if TYPE_CHECKING:
    from conftest import SoakpProcess

SMUGGLED_PATH = "/v1/fake/echo/smuggled"
ATTACK_PATH = "/v1/fake/echo/attack"


def smuggled_request(token: str) -> bytes:
    return (f"GET {SMUGGLED_PATH} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Length: 0\r\n\r\n").encode()


def attack(token: str, lines: list[bytes], body: bytes = b"", request_line: bytes | None = None) -> bytes:
    """A request with the token, the given header lines, the body, then the smuggled request."""
    line = request_line or f"POST {ATTACK_PATH} HTTP/1.1".encode()
    head = [line, b"Host: soakp.test", b"Authorization: Bearer " + token.encode(), *lines]
    return b"\r\n".join(head) + b"\r\n\r\n" + body + smuggled_request(token)


def assert_refused_and_closed(outcome: Outcome, upstream: FakeUpstream, statuses: tuple[int, ...] = (400,),
                              head_may_reach_upstream: bool = False) -> None:
    """Exactly one error response, then EOF; the smuggled request never reached the upstream."""
    assert outcome.malformed is None, f"not HTTP: {outcome.malformed}"
    assert outcome.statuses and outcome.statuses[0] in statuses, f"statuses {outcome.statuses}, want {statuses}"
    assert len(outcome.responses) == 1, f"{len(outcome.responses)} responses: {outcome.statuses} (desync)"
    assert outcome.leftover == b"", f"bytes after the response: {outcome.leftover[:200]!r}"
    assert outcome.eof, "the connection stayed open after a refused request"
    response = outcome.responses[0]
    assert response.header("connection") == "close", response.headers
    assert response.json()["error"]["message"]
    seen = [r.target for r in upstream.requests]
    assert not any(t.startswith(SMUGGLED_PATH) for t in seen), f"the smuggled request reached the upstream: {seen}"
    if head_may_reach_upstream:
        # A chunked body is streamed: its head may be upstream already, but never as a complete request.
        assert all(not r.complete for r in upstream.requests), "a refused body reached the upstream as complete"
    else:
        assert seen == [], f"a refused request reached the upstream: {seen}"


def assert_still_serves(server: SoakpProcess, token: str) -> None:
    response = server.request("GET", "/v1/fake/echo/after", token)
    assert response.status == 200, response.body[:300]


# 1. Smuggling: refused at the head ##########################################################################

CHUNKED_SMUGGLE = b"0\r\n\r\n"  # what a TE reader sees as the end of the body; a CL reader as body bytes

HEAD_ATTACKS: dict[str, tuple[list[bytes], bytes]] = {
    # CL.TE and TE.CL (RFC 9112 §6.1: a request with both must be treated as an error or the CL ignored)
    "CL.TE": ([b"Content-Length: 5", b"Transfer-Encoding: chunked"], CHUNKED_SMUGGLE),
    "TE.CL": ([b"Transfer-Encoding: chunked", b"Content-Length: 5"], CHUNKED_SMUGGLE),
    "CL.TE lower-case names": ([b"content-length: 5", b"transfer-encoding: chunked"], CHUNKED_SMUGGLE),
    "TE.CL upper-case names": ([b"TRANSFER-ENCODING: chunked", b"CONTENT-LENGTH: 5"], CHUNKED_SMUGGLE),
    "CL + TE xchunked": ([b"Content-Length: 5", b"Transfer-Encoding: xchunked"], CHUNKED_SMUGGLE),
    "CL + TE tab-chunked": ([b"Content-Length: 5", b"Transfer-Encoding:\tchunked"], CHUNKED_SMUGGLE),
    "CL + TE identity": ([b"Content-Length: 5", b"Transfer-Encoding: identity"], CHUNKED_SMUGGLE),
    "CL 0 + TE chunked": ([b"Content-Length: 0", b"Transfer-Encoding: chunked"], b"5\r\nhello\r\n0\r\n\r\n"),
    # Obfuscated Transfer-Encoding
    "TE xchunked": ([b"Transfer-Encoding: xchunked"], b"5\r\nhello\r\n0\r\n\r\n"),
    "TE chunkedx": ([b"Transfer-Encoding: chunkedx"], b"5\r\nhello\r\n0\r\n\r\n"),
    "TE chunked, chunked": ([b"Transfer-Encoding: chunked, chunked"], b"5\r\nhello\r\n0\r\n\r\n"),
    "TE chunked,": ([b"Transfer-Encoding: chunked,"], b"5\r\nhello\r\n0\r\n\r\n"),
    "TE ,chunked": ([b"Transfer-Encoding: ,chunked"], b"5\r\nhello\r\n0\r\n\r\n"),
    "TE identity, chunked": ([b"Transfer-Encoding: identity, chunked"], b"5\r\nhello\r\n0\r\n\r\n"),
    "TE chunked, identity": ([b"Transfer-Encoding: chunked, identity"], b"5\r\nhello\r\n0\r\n\r\n"),
    "TE two headers": ([b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked"], b"5\r\nhello\r\n0\r\n\r\n"),
    "TE two headers, other case": ([b"Transfer-Encoding: chunked", b"transfer-encoding: identity"],
                                   b"5\r\nhello\r\n0\r\n\r\n"),
    "TE quoted": ([b'Transfer-Encoding: "chunked"'], b"5\r\nhello\r\n0\r\n\r\n"),
    "TE chunked;q=1": ([b"Transfer-Encoding: chunked;q=1"], b"5\r\nhello\r\n0\r\n\r\n"),
    "TE with VT": ([b"Transfer-Encoding: chunked\x0b"], b"5\r\nhello\r\n0\r\n\r\n"),
    "TE with FF": ([b"Transfer-Encoding: \x0cchunked"], b"5\r\nhello\r\n0\r\n\r\n"),
    "TE with NUL": ([b"Transfer-Encoding: chunked\x00"], b"5\r\nhello\r\n0\r\n\r\n"),
    "TE with NBSP": ([b"Transfer-Encoding: chunked\xa0"], b"5\r\nhello\r\n0\r\n\r\n"),
    "TE space before colon": ([b"Transfer-Encoding : chunked"], b"5\r\nhello\r\n0\r\n\r\n"),
    "TE tab before colon": ([b"Transfer-Encoding\t: chunked"], b"5\r\nhello\r\n0\r\n\r\n"),
    "TE obs-fold": ([b"Transfer-Encoding:", b" chunked"], b"5\r\nhello\r\n0\r\n\r\n"),
    "TE after obs-fold": ([b"X-A: a", b" Transfer-Encoding: chunked"], b"5\r\nhello\r\n0\r\n\r\n"),
    "TE behind bare LF": ([b"X-A: a\nTransfer-Encoding: chunked"], b"5\r\nhello\r\n0\r\n\r\n"),
    "TE behind bare CR": ([b"X-A: a\rTransfer-Encoding: chunked"], b"5\r\nhello\r\n0\r\n\r\n"),
    "TE name with LF": ([b"Transfer-Encoding\n: chunked"], b"5\r\nhello\r\n0\r\n\r\n"),
    # Content-Length games
    "CL twice, same": ([b"Content-Length: 5", b"Content-Length: 5"], b"hello"),
    "CL twice, differ": ([b"Content-Length: 5", b"Content-Length: 0"], b"hello"),
    "CL list": ([b"Content-Length: 5, 5"], b"hello"),
    "CL +5": ([b"Content-Length: +5"], b"hello"),
    "CL -5": ([b"Content-Length: -5"], b"hello"),
    "CL 0x5": ([b"Content-Length: 0x5"], b"hello"),
    "CL 5.0": ([b"Content-Length: 5.0"], b"hello"),
    "CL 5e0": ([b"Content-Length: 5e0"], b"hello"),
    "CL inner space": ([b"Content-Length: 5 0"], b"hello"),
    "CL empty": ([b"Content-Length:"], b"hello"),
    "CL 19 digits": ([b"Content-Length: 0000000000000000005"], b"hello"),
    "CL Arabic-Indic digit": (["Content-Length: \u0665".encode()], b"hello"),
    "CL obs-fold": ([b"Content-Length:", b" 5"], b"hello"),
    "CL space before colon": ([b"Content-Length : 5"], b"hello"),
    # Line endings, control bytes
    "bare LF ending a header": ([b"X-A: 1\nContent-Length: 5"], b"hello"),
    "bare CR in a value": ([b"X-A: 1\r2", b"Content-Length: 5"], b"hello"),
    "NUL in a value": ([b"X-A: 1\x002", b"Content-Length: 5"], b"hello"),
    "NUL in a name": ([b"X-\x00A: 1", b"Content-Length: 5"], b"hello"),
    "ESC in a value": ([b"X-A: \x1b[2J", b"Content-Length: 5"], b"hello"),
    "DEL in a value": ([b"X-A: \x7f", b"Content-Length: 5"], b"hello"),
    "obs-fold of any header": ([b"X-A: a", b"\tfolded", b"Content-Length: 5"], b"hello"),
    "empty header name": ([b": x", b"Content-Length: 5"], b"hello"),
    "header without colon": ([b"Content-Length 5"], b"hello"),
    "Host twice": ([b"Host: other.test", b"Content-Length: 5"], b"hello"),
    "chunked over HTTP/1.0": None,  # built below
}


def build_head_attack(name: str, token: str) -> bytes:
    if name == "chunked over HTTP/1.0":
        return attack(token, [b"Transfer-Encoding: chunked"], b"5\r\nhello\r\n0\r\n\r\n",
                      request_line=f"POST {ATTACK_PATH} HTTP/1.0".encode())
    lines, body = HEAD_ATTACKS[name]  # type: ignore[misc]
    return attack(token, lines, body)


@pytest.mark.parametrize("name", HEAD_ATTACKS)
def test_smuggling_attempt_is_refused_without_desync(
    proxy: SoakpProcess, fake_upstream: FakeUpstream, token: str, name: str
) -> None:
    """An ambiguous or malformed head gets 400 and the connection closes: the request that follows it
    on the same connection is never read as a request, and nothing reaches the upstream."""
    outcome = collect(proxy.port, build_head_attack(name, token))
    statuses = (400, 501) if name.startswith("TE") else (400,)
    assert_refused_and_closed(outcome, fake_upstream, statuses)
    assert_still_serves(proxy, token)


REQUEST_LINE_ATTACKS: dict[str, tuple[bytes, tuple[int, ...]]] = {
    "NUL in the target": (b"POST /v1/fake/echo/a\x00b HTTP/1.1", (400,)),
    "SOH in the target": (b"POST /v1/fake/echo/a\x01b HTTP/1.1", (400,)),
    "ESC in the method": (b"PO\x1bST /v1/fake/echo/a HTTP/1.1", (400,)),
    "tab in the target": (b"POST /v1/fake/echo/a\tb HTTP/1.1", (400,)),
    "bare CR in the request line": (b"POST /v1/fake/echo/a HTTP/1.1\rX: y", (400,)),
    "bare LF after the request line": (b"POST /v1/fake/echo/a HTTP/1.1\nX: y", (400,)),
    "high bytes in the target": (b"POST /v1/fake/echo/\xc0\xae HTTP/1.1", (400,)),
    "HTTP/1.1 twice": (b"POST /v1/fake/echo/a HTTP/1.1 HTTP/1.1", (400,)),
    "request line over 16 KiB": (b"POST /v1/fake/echo/" + b"a" * (17 * 1024) + b" HTTP/1.1", (414,)),
    "asterisk form": (b"OPTIONS * HTTP/1.1", (400,)),
    "authority form": (b"POST 127.0.0.1:443 HTTP/1.1", (400,)),
    "CONNECT": (b"CONNECT 127.0.0.1:443 HTTP/1.1", (405,)),
}


@pytest.mark.parametrize("name", REQUEST_LINE_ATTACKS)
def test_bad_request_line_is_refused_without_desync(
    proxy: SoakpProcess, fake_upstream: FakeUpstream, token: str, name: str
) -> None:
    """Control bytes, bare CR/LF, non-ASCII and over-long request lines: 400/414 (405 for CONNECT), one
    response, then the connection closes; the smuggled request behind it is never read."""
    line, statuses = REQUEST_LINE_ATTACKS[name]
    outcome = collect(proxy.port, attack(token, [b"Content-Length: 5"], b"hello", request_line=line))
    assert_refused_and_closed(outcome, fake_upstream, statuses)
    assert_still_serves(proxy, token)


def test_oversized_head_is_431_without_desync(proxy: SoakpProcess, fake_upstream: FakeUpstream, token: str) -> None:
    """A head over 64 KiB is 431; the smuggled request after it is discarded with the rest."""
    outcome = collect(proxy.port, attack(token, [b"X-Pad: " + b"p" * 70_000, b"Content-Length: 5"], b"hello"))
    assert_refused_and_closed(outcome, fake_upstream, (431,))
    assert_still_serves(proxy, token)


def test_too_many_header_lines_is_431_without_desync(proxy: SoakpProcess, fake_upstream: FakeUpstream, token: str) -> None:
    outcome = collect(proxy.port, attack(token, [b"X-H%d: v" % i for i in range(201)] + [b"Content-Length: 5"],
                                         b"hello"))
    assert_refused_and_closed(outcome, fake_upstream, (431,))


def test_head_with_bare_lf_line_endings_never_becomes_a_request(
    proxy: SoakpProcess, fake_upstream: FakeUpstream, token: str
) -> None:
    """A head whose lines end in bare LF only has no CRLF CRLF, so SOAKP never sees its end: the connection
    ends (at the client's EOF here; at --header-timeout otherwise) and nothing is forwarded."""
    data = (f"GET /v1/fake/echo/lf HTTP/1.1\nHost: x\nAuthorization: Bearer {token}\n\n").encode()
    outcome = collect(proxy.port, data + smuggled_request(token))
    assert outcome.eof
    assert outcome.statuses in ([], [400]), outcome.statuses
    assert fake_upstream.requests == []


# 1b. Smuggling inside a chunked body: the head is fine, the framing is not #################################

CHUNK_ATTACKS: dict[str, bytes] = {
    "size with 0x": b"0x5\r\nhello\r\n0\r\n\r\n",
    "size with sign": b"+5\r\nhello\r\n0\r\n\r\n",
    "negative size": b"-5\r\nhello\r\n0\r\n\r\n",
    "size with leading space": b" 5\r\nhello\r\n0\r\n\r\n",
    "size with trailing space": b"5 \r\nhello\r\n0\r\n\r\n",
    "empty size": b"\r\nhello\r\n0\r\n\r\n",
    "size over 15 hex digits": b"0000000000000005\r\nhello\r\n0\r\n\r\n",
    "size overflowing 64 bits": b"10000000000000005\r\nhello\r\n0\r\n\r\n",
    "size ending in bare LF": b"5\nhello\r\n0\r\n\r\n",
    "size line with bare CR": b"5\rX\r\nhello\r\n0\r\n\r\n",
    "extension without a name": b"5;\r\nhello\r\n0\r\n\r\n",
    "extension with only a value": b"5;=x\r\nhello\r\n0\r\n\r\n",
    "extension with NUL": b"5;a\x00\r\nhello\r\n0\r\n\r\n",
    "extension with unterminated quote": b'5;a="x\r\nhello\r\n0\r\n\r\n',
    "extension with bare LF in a quote": b'5;a="x\ny"\r\nhello\r\n0\r\n\r\n',
    "extension value with a space": b"5;a=b c\r\nhello\r\n0\r\n\r\n",
    "data longer than its size": b"3\r\nhello\r\n0\r\n\r\n",
    "data shorter than its size": b"7\r\nhello\r\n0\r\n\r\n",
    "data not followed by CRLF": b"5\r\nhelloXX0\r\n\r\n",
    "data followed by bare LF": b"5\r\nhello\n0\r\n\r\n",
    "last chunk with bare LF": b"5\r\nhello\r\n0\n\r\n",
    "trailer with obs-fold": b"5\r\nhello\r\n0\r\nX-T: a\r\n b\r\n\r\n",
    "trailer without colon": b"5\r\nhello\r\n0\r\nNoColon\r\n\r\n",
    "trailer with NUL": b"5\r\nhello\r\n0\r\nX-T: a\x00\r\n\r\n",
    "trailer with bare CR": b"5\r\nhello\r\n0\r\nX-T: a\rb\r\n\r\n",
    "trailer with space before colon": b"5\r\nhello\r\n0\r\nX-T : a\r\n\r\n",
    "trailer section over 64 KiB": b"5\r\nhello\r\n0\r\n" + b"".join(b"X-T%d: %s\r\n" % (i, b"t" * 1000)
                                                                      for i in range(70)) + b"\r\n",
}


@pytest.mark.parametrize("name", CHUNK_ATTACKS)
def test_bad_chunked_framing_is_refused_without_desync(
    proxy: SoakpProcess, fake_upstream: FakeUpstream, token: str, name: str
) -> None:
    """Malformed chunk sizes, extensions, data framing and trailers: a 400 (431 for huge trailers) and a
    close. The head may already be upstream (bodies stream), but never a complete request, and the
    smuggled request behind the body is never read."""
    outcome = collect(proxy.port, attack(token, [b"Transfer-Encoding: chunked"], CHUNK_ATTACKS[name]))
    assert_refused_and_closed(outcome, fake_upstream, (400, 431), head_may_reach_upstream=True)
    assert_still_serves(proxy, token)


# 1c. Spellings RFC 9112 defines as plain `chunked`: read as chunked, consistently ###########################

EQUIVALENT_CHUNKED = {
    "tab before": b"Transfer-Encoding:\tchunked",
    "no space": b"Transfer-Encoding:chunked",
    "spaces and tab after": b"Transfer-Encoding: chunked \t ",
    "upper-case value": b"Transfer-Encoding: CHUNKED",
    "mixed-case name": b"Transfer-encoding: Chunked",
}


@pytest.mark.parametrize("name", EQUIVALENT_CHUNKED)
def test_whitespace_and_case_variants_of_chunked_never_desync(
    proxy: SoakpProcess, fake_upstream: FakeUpstream, token: str, name: str
) -> None:
    """OWS around a field value and the case of names and codings carry no meaning (RFC 9110 §5.5,
    RFC 9112 §7), so these ARE `chunked`. Either SOAKP refuses them (400 and close), or it reads the body
    as chunked: the smuggled request hidden in the chunk data reaches the upstream as body bytes of the
    one request, never as a request of its own."""
    hidden = smuggled_request(token)
    body = b"%x\r\n" % len(hidden) + hidden + b"\r\n0\r\n\r\n"
    data = attack(token, [EQUIVALENT_CHUNKED[name]], body).removesuffix(hidden)
    outcome = collect(proxy.port, data)
    assert outcome.malformed is None
    if outcome.statuses == [400]:
        assert_refused_and_closed(outcome, fake_upstream)
        return
    assert outcome.statuses == [200], outcome.statuses
    record = fake_upstream.wait_for_request(ATTACK_PATH)
    assert record.body == hidden
    assert [r.path for r in fake_upstream.requests] == [ATTACK_PATH]


def test_framing_header_look_alikes_are_refused(proxy: SoakpProcess, fake_upstream: FakeUpstream, token: str) -> None:
    """`Transfer_Encoding` and `Content_Length` would be framing to a server that folds "_" into "-" (as
    CGI-style servers do): SOAKP refuses them with 400 and the upstream receives nothing."""
    hidden = smuggled_request(token)
    data = attack(token, [b"Transfer_Encoding: chunked", b"Content_Length: 0", b"Content-Length: %d" % len(hidden)],
                  hidden).removesuffix(hidden)
    outcome = collect(proxy.port, data)
    assert outcome.statuses == [400], outcome.statuses
    assert_refused_and_closed(outcome, fake_upstream)


def test_pipelined_requests_are_each_forwarded_once(proxy: SoakpProcess, fake_upstream: FakeUpstream, token: str) -> None:
    """The control for the desync tests: two well-formed pipelined requests are two requests, in order."""
    first = build_request("POST", "/v1/fake/echo/one", [("Authorization", f"Bearer {token}")], b"hello")
    second = build_request("GET", "/v1/fake/echo/two", [("Authorization", f"Bearer {token}"),
                                                        ("Connection", "close")])
    outcome = collect(proxy.port, first + second)
    assert outcome.statuses == [200, 200]
    assert [r.path for r in fake_upstream.requests] == ["/v1/fake/echo/one", "/v1/fake/echo/two"]
    assert fake_upstream.requests[0].body == b"hello"


# 2. No open proxy ###########################################################################################


@pytest.fixture
def elsewhere() -> FaultServer:
    """A listener on 127.0.0.1 that a client names as the host to reach; SOAKP must never connect to it."""
    with FaultServer(silent) as server:
        yield server


def open_proxy_attempts(port: int) -> dict[str, tuple[str, list[str], str]]:
    """name -> (request target, extra header lines, the path the upstream must receive)."""
    other = f"127.0.0.1:{port}"
    return {
        "absolute-form http": (f"http://{other}/v1/fake/echo/op?x=1", [], "/v1/fake/echo/op?x=1"),
        "absolute-form https": (f"https://{other}/v1/fake/echo/op", [], "/v1/fake/echo/op"),
        "absolute-form upper-case scheme": (f"HTTP://{other}/v1/fake/echo/op", [], "/v1/fake/echo/op"),
        "absolute-form with userinfo": (f"http://user:pw@{other}/v1/fake/echo/op", [], "/v1/fake/echo/op"),
        "absolute-form, authority in userinfo": (f"http://{other}@evil.test/v1/fake/echo/op", [],
                                                 "/v1/fake/echo/op"),
        "absolute-form with empty authority": ("http:///v1/fake/echo/op", [], "/v1/fake/echo/op"),
        "Host names the other host": ("/v1/fake/echo/op", [f"Host: {other}"], "/v1/fake/echo/op"),
        "X-Forwarded-Host and Forwarded": ("/v1/fake/echo/op", [f"X-Forwarded-Host: {other}",
                                                                f"Forwarded: host={other}"], "/v1/fake/echo/op"),
        "absolute-form and Host disagree": (f"http://{other}/v1/fake/echo/op", ["Host: evil.test"],
                                            "/v1/fake/echo/op"),
        "openai alias in absolute-form": (f"http://{other}/openai/fake/echo/op", [], "/v1/fake/echo/op"),
    }


OPEN_PROXY_NAMES = list(open_proxy_attempts(1))


@pytest.mark.parametrize("name", OPEN_PROXY_NAMES)
def test_client_cannot_choose_where_soakp_connects(
    proxy: SoakpProcess, fake_upstream: FakeUpstream, token: str, elsewhere: FaultServer, name: str
) -> None:
    """Whatever host a request names (absolute-form, Host, forwarding headers), SOAKP connects only to the
    configured upstream, which receives the request with its own Host; the named host sees no connection."""
    target, headers, expected = open_proxy_attempts(elsewhere.port)[name]
    lines = [f"GET {target} HTTP/1.1"]
    if not any(h.lower().startswith("host:") for h in headers):
        lines.append("Host: evil.test")
    lines += headers + [f"Authorization: Bearer {token}", "Connection: close"]
    outcome = collect(proxy.port, ("\r\n".join(lines) + "\r\n\r\n").encode())
    assert outcome.statuses == [200], (outcome.statuses, outcome.responses[:1])
    record = fake_upstream.wait_for_request(expected.split("?")[0])
    assert record.target == expected
    assert record.header_all("host") == [f"127.0.0.1:{fake_upstream.port}"]
    assert elsewhere.connections() == [], "SOAKP connected to the host the client named"


def test_connect_to_another_host_is_405_and_nothing_connects(
    proxy: SoakpProcess, fake_upstream: FakeUpstream, token: str, elsewhere: FaultServer
) -> None:
    data = (f"CONNECT 127.0.0.1:{elsewhere.port} HTTP/1.1\r\nHost: 127.0.0.1:{elsewhere.port}\r\n"
            f"Authorization: Bearer {token}\r\n\r\nGET {SMUGGLED_PATH} HTTP/1.1\r\nHost: x\r\n\r\n").encode()
    outcome = collect(proxy.port, data)
    assert_refused_and_closed(outcome, fake_upstream, (405,))
    assert elsewhere.connections() == []


def test_absolute_form_without_a_path_goes_nowhere(
    proxy: SoakpProcess, fake_upstream: FakeUpstream, token: str, elsewhere: FaultServer
) -> None:
    """`GET http://other:port HTTP/1.1` is `/` on SOAKP itself: 404, nothing forwarded, nothing connected."""
    data = (f"GET http://127.0.0.1:{elsewhere.port} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
            f"Connection: close\r\n\r\n").encode()
    outcome = collect(proxy.port, data)
    assert outcome.statuses == [404]
    assert fake_upstream.requests == []
    assert elsewhere.connections() == []


# 2b. Paths: refused in every spelling, or forwarded byte for byte ###########################################

REFUSED_PATHS = [
    "/v1/fake/echo/%2E%2e/%2e%2E/jwt/generate",
    "/v1/fake/echo/.%2E/jwt",
    "/v1/fake/echo/%2E./jwt",
    "/v1/fake/echo/a/%2E",
    "/v1/fake/echo/file%2Ejson",
    "/v1/fake/echo/a%2Fb",
    "/v1/fake/echo/a%2fb",
    "/v1/fake/echo/a%5Cb",
    "/v1/fake/echo/a%5cb",
    "/v1/fake/echo/a\\b",
    "/v1/fake/echo/..\\jwt",
    "/v1/fake/echo//x",
    "/v1/fake/echo/x/",
    "/v1/fake/echo/./x",
    "/v1/fake/echo/x/..",
    "/v1/fake/echo/%00",
    "/v1/fake/echo/%",
    "/v1/fake/echo/%4",
    "/v1/fake/echo/%g1",
    "/v1/fake/echo/%u002e%u002e",
    "/openai/fake/echo/%2e%2e/jwt",
    "/openai//fake/echo",
    "/v1/fake/echo/%2e%2e?x=1",
    "http://h/v1/fake/echo/%2E%2E/jwt",
    "http://h/v1/fake/echo/a%2Fb?x",
    "//v1/fake/echo",
]


@pytest.mark.parametrize("target", REFUSED_PATHS)
def test_non_canonical_path_spellings_are_refused(
    proxy: SoakpProcess, fake_upstream: FakeUpstream, token: str, target: str
) -> None:
    """SPEC.md, Forwarding: `.`/`..`/empty segments, backslashes and %-encoded `/`, `\\` or `.` (any case,
    origin- or absolute-form, /v1 or /openai) are 400, and nothing reaches the upstream."""
    data = attack(token, [b"Content-Length: 0"], request_line=f"GET {target} HTTP/1.1".encode())
    assert_refused_and_closed(collect(proxy.port, data), fake_upstream)


FORWARDED_EXACTLY = {
    # %25 decodes to a literal `%`, never to a separator or a dot: SPEC.md allows it, and the upstream
    # must receive the escape untouched (a proxy that decoded it once would turn %252e into %2e).
    "/v1/fake/echo/%252e%252e/jwt": "/v1/fake/echo/%252e%252e/jwt",
    "/v1/fake/echo/%252F%255C": "/v1/fake/echo/%252F%255C",
    "/v1/fake/echo/100%25": "/v1/fake/echo/100%25",
    "/v1/fake/echo/%41%7e%7E": "/v1/fake/echo/%41%7e%7E",
    "/v1/fake/echo/..;/x": "/v1/fake/echo/..;/x",
    "/v1/fake/echo/...": "/v1/fake/echo/...",
    "/v1/fake/echo/.x/x.": "/v1/fake/echo/.x/x.",
    "/v1/fake/echo/%c0%ae%c0%ae": "/v1/fake/echo/%c0%ae%c0%ae",
    "/v1/fake/echo/a:@!$&'()*+,;=-._~": "/v1/fake/echo/a:@!$&'()*+,;=-._~",
    "/v1/fake/echo/q?path=../../jwt&e=%2f%5c%2E%2e&d=//&b=\\": "/v1/fake/echo/q?path=../../jwt&e=%2f%5c%2E%2e&d=//&b=\\",
    "/v1/fake/echo/q?": "/v1/fake/echo/q?",
    "/v1/fake/echo/q??x=?": "/v1/fake/echo/q??x=?",
    "/openai/fake/echo/%252e": "/v1/fake/echo/%252e",
    "http://evil.test/v1/fake/echo/%252e?q=..": "/v1/fake/echo/%252e?q=..",
}


@pytest.mark.parametrize("target", FORWARDED_EXACTLY)
def test_accepted_path_is_forwarded_byte_for_byte(
    proxy: SoakpProcess, fake_upstream: FakeUpstream, token: str, target: str
) -> None:
    """What SOAKP checked is what the upstream receives: the same escapes, the same case, the query as sent."""
    data = (f"GET {target} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
            f"Connection: close\r\n\r\n").encode()
    outcome = collect(proxy.port, data)
    assert outcome.statuses == [200], outcome.statuses
    expected = FORWARDED_EXACTLY[target]
    record = fake_upstream.wait_for_request(expected.split("?")[0])
    assert record.raw_head.split(b"\r\n", 1)[0] == f"GET {expected} HTTP/1.1".encode()


@pytest.mark.parametrize("name", ["Content_Length", "Transfer_Encoding", "content_length", "TRANSFER_ENCODING"])
def test_underscore_look_alikes_of_framing_headers_are_refused(name: str) -> None:
    """A server that folds "_" into "-" (CGI-style) would read a second framing header: refused, not forwarded."""
    value = "5" if "length" in name.lower() else "chunked"
    with pytest.raises(soakp.ApiError) as info:
        soakp.parse_request_head(f"POST /v1/x HTTP/1.1\r\nHost: h\r\n{name}: {value}\r\n\r\n".encode())
    assert info.value.status == 400
