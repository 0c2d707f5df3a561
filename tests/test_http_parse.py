"""HTTP parsing and head building, pure: bytes in, RequestHead/ResponseHead/bytes out. No sockets.

The refusals are the request-smuggling and path-confusion cases a proxy in front of another server
must not read differently from that server (RFC 9112 §2.2, §3, §5, §6.3, §7.1; RFC 9110 §7.6.1).
"""

from __future__ import annotations

import pytest

import soakp

KEY = "sk-real-upstream-key-0123456789"
TOKEN = "eyJhbGciOiJIUzI1NiJ9.client-token.sig"
OPENAI = soakp.parse_upstream("https://api.openai.com")


def request(line: bytes, *headers: bytes, host: bytes | None = b"Host: soakp.test") -> bytes:
    """A request head: the line, a Host (unless None), the headers, and the closing empty line."""
    fields = ([host] if host is not None else []) + list(headers)
    return line + b"\r\n" + b"".join(h + b"\r\n" for h in fields) + b"\r\n"


def parse(line: bytes, *headers: bytes, host: bytes | None = b"Host: soakp.test") -> soakp.RequestHead:
    return soakp.parse_request_head(request(line, *headers, host=host))


def refused_status(data: bytes) -> int:
    with pytest.raises(soakp.ApiError) as info:
        soakp.parse_request_head(data)
    return info.value.status


def header_lines(head: bytes) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """Split a built head into its first line and (lower-case name, value) pairs; it must end in CRLF CRLF."""
    assert head.endswith(b"\r\n\r\n")
    first, *rest = head[:-4].split(b"\r\n")
    pairs = []
    for line in rest:
        name, sep, value = line.partition(b": ")
        assert sep, line
        pairs.append((name.lower(), value))
    return first, pairs


def values(pairs: list[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    return [v for n, v in pairs if n == name]


# Good requests ########################################################################################


def test_get_with_query() -> None:
    head = parse(b"GET /v1/models?limit=10&after=m-1 HTTP/1.1")
    assert (head.method, head.path, head.query, head.http_minor) == ("GET", "/v1/models", "?limit=10&after=m-1", 1)
    assert (head.body_kind, head.content_length, head.keep_alive, head.expect_continue) == ("none", 0, True, False)


def test_the_query_is_kept_exactly_as_received_and_not_path_checked() -> None:
    head = parse(b"GET /v1/files?q=/../%2F%2e%2e&x=a%20b&empty= HTTP/1.1")
    assert (head.path, head.query) == ("/v1/files", "?q=/../%2F%2e%2e&x=a%20b&empty=")
    assert parse(b"GET /v1/models? HTTP/1.1").query == "?"


def test_post_with_content_length() -> None:
    head = parse(b"POST /v1/chat/completions HTTP/1.1", b"Content-Type: application/json", b"Content-Length: 17")
    assert (head.method, head.body_kind, head.content_length) == ("POST", "length", 17)


def test_content_length_zero_means_no_body() -> None:
    head = parse(b"POST /v1/x HTTP/1.1", b"Content-Length: 0")
    assert (head.body_kind, head.content_length) == ("none", 0)


def test_post_chunked() -> None:
    head = parse(b"POST /v1/files HTTP/1.1", b"Transfer-Encoding: chunked")
    assert (head.body_kind, head.content_length) == ("chunked", 0)


def test_transfer_coding_name_is_case_insensitive() -> None:
    """RFC 9112 §7: transfer-coding names are case-insensitive."""
    assert parse(b"POST /v1/files HTTP/1.1", b"Transfer-Encoding: Chunked").body_kind == "chunked"


def test_expect_100_continue_is_noted() -> None:
    head = parse(b"POST /v1/files HTTP/1.1", b"Content-Length: 3", b"Expect: 100-continue")
    assert head.expect_continue


@pytest.mark.parametrize("line, headers, keep_alive", [
    (b"GET /v1/models HTTP/1.1", (), True),
    (b"GET /v1/models HTTP/1.1", (b"Connection: close",), False),
    (b"GET /v1/models HTTP/1.1", (b"Connection: Upgrade, Close",), False),
    (b"GET /v1/models HTTP/1.0", (), False),
    (b"GET /v1/models HTTP/1.0", (b"Connection: keep-alive",), True),
    (b"GET /v1/models HTTP/1.0", (b"Connection: Keep-Alive",), True),
    (b"GET /v1/models HTTP/1.0", (b"Connection: close",), False),
])
def test_keep_alive_semantics_of_http_1_0_and_1_1(line: bytes, headers: tuple[bytes, ...], keep_alive: bool) -> None:
    head = parse(line, *headers)
    assert head.keep_alive is keep_alive
    assert head.http_minor == (0 if line.endswith(b"1.0") else 1)


def test_http_1_0_needs_no_host() -> None:
    assert parse(b"GET /v1/models HTTP/1.0", host=None).path == "/v1/models"


def test_header_value_ows_is_stripped_and_inner_whitespace_kept() -> None:
    head = parse(b"GET /v1/models HTTP/1.1", b"X-A: \t value with  inner\tspace \t ", b"X-Empty:", b"X-Tight:v")
    assert (b"X-A", b"value with  inner\tspace") in head.headers
    assert (b"X-Empty", b"") in head.headers
    assert (b"X-Tight", b"v") in head.headers


def test_header_names_keep_their_original_case_and_order() -> None:
    head = parse(b"GET /v1/models HTTP/1.1", b"X-CuStOm-Name: 1", b"x-lower: 2", b"X-CUSTOM-NAME: 3")
    assert head.headers == ((b"Host", b"soakp.test"), (b"X-CuStOm-Name", b"1"), (b"x-lower", b"2"),
                            (b"X-CUSTOM-NAME", b"3"))
    assert head.header(b"x-custom-name") == b"1"
    assert head.header(b"x-missing") is None


def test_obs_text_is_allowed_in_a_header_value() -> None:
    assert (b"X-Name", b"caf\xc3\xa9") in parse(b"GET /v1/models HTTP/1.1", b"X-Name: caf\xc3\xa9").headers


@pytest.mark.parametrize("target, path, query", [
    (b"http://other.example/v1/models?x=1", "/v1/models", "?x=1"),
    (b"https://other.example:8443/v1/models", "/v1/models", ""),
    (b"HTTP://other.example/v1/chat/completions", "/v1/chat/completions", ""),
    (b"http://user@evil.example/v1/models", "/v1/models", ""),
    (b"http://other.example", "/", ""),
    (b"http://other.example?x=1", "/", "?x=1"),
])
def test_absolute_form_is_served_by_its_path_alone(target: bytes, path: str, query: str) -> None:
    """SPEC.md, Forwarding: an absolute-form target's authority never changes where SOAKP connects."""
    head = parse(b"GET " + target + b" HTTP/1.1")
    assert (head.path, head.query) == (path, query)
    assert "other.example" not in head.path and "evil" not in head.path


def test_leading_empty_lines_are_ignored() -> None:
    """RFC 9112 §2.2: a server SHOULD ignore at least one empty line before the request line."""
    head = soakp.parse_request_head(b"\r\n" + request(b"GET /v1/models HTTP/1.1"))
    assert head.path == "/v1/models"


def test_two_hundred_header_lines_are_accepted() -> None:
    extra = [b"X-H%d: v" % i for i in range(199)]
    assert len(parse(b"GET /v1/models HTTP/1.1", *extra).headers) == 200


def test_a_request_line_of_exactly_16_kib_is_accepted() -> None:
    prefix, suffix = b"GET /v1/", b" HTTP/1.1"
    line = prefix + b"a" * (16 * 1024 - len(prefix) - len(suffix)) + suffix
    assert len(line) == 16 * 1024
    assert parse(line).path.startswith("/v1/aaa")


def test_an_empty_host_is_allowed() -> None:
    """RFC 9112 §3.2: a client without an authority sends an empty Host."""
    assert parse(b"GET /v1/models HTTP/1.1", host=b"Host:").header(b"host") == b""


@pytest.mark.parametrize("method", [b"GET", b"POST", b"DELETE", b"PATCH", b"PUT", b"OPTIONS", b"HEAD"])
def test_methods_pass_through(method: bytes) -> None:
    assert parse(method + b" /v1/models HTTP/1.1").method == method.decode()


# Bad requests #########################################################################################

BAD_REQUEST_LINES = {
    "two spaces after method": b"GET  /v1/models HTTP/1.1",
    "two spaces before version": b"GET /v1/models  HTTP/1.1",
    "leading space": b" GET /v1/models HTTP/1.1",
    "trailing space": b"GET /v1/models HTTP/1.1 ",
    "lowercase version": b"GET /v1/models http/1.1",
    "HTTP/2.0": b"GET /v1/models HTTP/2.0",
    "HTTP/1.2": b"GET /v1/models HTTP/1.2",
    "HTTP/1": b"GET /v1/models HTTP/1",
    "HTTP/01.1": b"GET /v1/models HTTP/01.1",
    "missing version": b"GET /v1/models",
    "method only": b"GET",
    "tab separators": b"GET\t/v1/models\tHTTP/1.1",
    "NUL in target": b"GET /v1/mo\x00dels HTTP/1.1",
    "space in target": b"GET /v1/mo dels HTTP/1.1",
    "non-ASCII target": b"GET /v1/mod\xc3\xa9ls HTTP/1.1",
    "non-ASCII method": b"G\xc3\x89T /v1/models HTTP/1.1",
    "non-token method": b"GE(T /v1/models HTTP/1.1",
    "DEL in target": b"GET /v1/models\x7f HTTP/1.1",
}


@pytest.mark.parametrize("line", BAD_REQUEST_LINES.values(), ids=BAD_REQUEST_LINES.keys())
def test_a_malformed_request_line_is_400(line: bytes) -> None:
    assert refused_status(request(line)) == 400


def test_a_bare_lf_ending_the_request_line_is_400() -> None:
    assert refused_status(b"GET /v1/models HTTP/1.1\nHost: soakp.test\r\n\r\n") == 400


def test_bare_lf_line_endings_throughout_are_400() -> None:
    assert refused_status(b"GET /v1/models HTTP/1.1\nHost: soakp.test\n\n") == 400


def test_an_empty_request_is_400() -> None:
    assert refused_status(b"\r\n\r\n") == 400


def test_connect_is_405() -> None:
    assert refused_status(request(b"CONNECT api.openai.com:443 HTTP/1.1")) == 405


def test_a_request_line_over_16_kib_is_414() -> None:
    assert refused_status(request(b"GET /v1/" + b"a" * (16 * 1024) + b" HTTP/1.1")) == 414


def test_a_request_line_over_16_kib_is_414_even_when_otherwise_malformed() -> None:
    assert refused_status(request(b"GET /" + b"a" * (16 * 1024))) == 414


BAD_HEADERS = {
    "CL and TE": (b"Content-Length: 5", b"Transfer-Encoding: chunked"),
    "TE and CL": (b"Transfer-Encoding: chunked", b"Content-Length: 0"),
    "TE chunked, identity": (b"Transfer-Encoding: chunked, identity",),
    "TE identity, chunked": (b"Transfer-Encoding: identity, chunked",),
    "TE gzip, chunked": (b"Transfer-Encoding: gzip, chunked",),
    "TE chunked, chunked": (b"Transfer-Encoding: chunked, chunked",),
    "TE xchunked": (b"Transfer-Encoding: xchunked",),
    "TE chunkedx": (b"Transfer-Encoding: chunkedx",),
    "TE identity": (b"Transfer-Encoding: identity",),
    "TE empty": (b"Transfer-Encoding:",),
    "TE in two headers": (b"Transfer-Encoding: chunked", b"Transfer-Encoding:  chunked"),
    "TE with vertical tab": (b"Transfer-Encoding: chunked\x0b",),
    "TE with a comma": (b"Transfer-Encoding: chunked,",),
    "duplicate identical CL": (b"Content-Length: 5", b"Content-Length: 5"),
    "duplicate different CL": (b"Content-Length: 5", b"Content-Length: 6"),
    "non-numeric CL": (b"Content-Length: abc",),
    "CL +5": (b"Content-Length: +5",),
    "CL -1": (b"Content-Length: -1",),
    "CL 1,1": (b"Content-Length: 1,1",),
    "CL 1, 1": (b"Content-Length: 1, 1",),
    "CL hex": (b"Content-Length: 0x10",),
    "CL empty": (b"Content-Length:",),
    "CL inner space": (b"Content-Length: 1 2",),
    "CL 19 digits": (b"Content-Length: 1234567890123456789",),
    "CL unicode digit": ("Content-Length: \u0665".encode(),),
    "obs-fold with space": (b"X-A: a", b" folded"),
    "obs-fold with tab": (b"X-A: a", b"\tfolded"),
    "obs-fold of CL": (b"Content-Length:", b" 5"),
    "space before colon": (b"Content-Length : 5",),
    "tab before colon": (b"X-A\t: 1",),
    "space before colon in TE": (b"Transfer-Encoding : chunked",),
    "bare LF in a header line": (b"X-A: a\nTransfer-Encoding: chunked",),
    "bare CR in a header line": (b"X-A: a\rTransfer-Encoding: chunked",),
    "bare LF ending a value": (b"X-A: a\n",),
    "NUL in a value": (b"X-A: a\x00b",),
    "SOH in a value": (b"X-A: \x01",),
    "ESC in a value": (b"X-A: a\x1b[31mb",),
    "DEL in a value": (b"X-A: a\x7fb",),
    "NUL in a name": (b"X-\x00A: 1",),
    "empty name": (b": 1",),
    "non-token name": (b"X(A): 1",),
    "no colon": (b"NoColon",),
    "empty line in the middle": (b"X-A: 1", b"", b"X-B: 2"),
    "two Hosts": (b"Host: other.test",),
    "Host with a space": None,
    "Host with a path": None,
}


@pytest.mark.parametrize("name", BAD_HEADERS)
def test_a_bad_header_section_is_400(name: str) -> None:
    if name == "Host with a space":
        data = request(b"GET /v1/models HTTP/1.1", host=b"Host: a b")
    elif name == "Host with a path":
        data = request(b"GET /v1/models HTTP/1.1", host=b"Host: a.test/x")
    else:
        data = request(b"POST /v1/files HTTP/1.1", *BAD_HEADERS[name])
    assert refused_status(data) == 400


def test_chunked_in_http_1_0_is_400() -> None:
    """RFC 9112 §6.1: Transfer-Encoding in a 1.0 message means the framing is faulty."""
    assert refused_status(request(b"POST /v1/files HTTP/1.0", b"Transfer-Encoding: chunked")) == 400


def test_missing_host_in_http_1_1_is_400() -> None:
    assert refused_status(request(b"GET /v1/models HTTP/1.1", host=None)) == 400


def test_more_than_200_header_lines_is_431() -> None:
    extra = [b"X-H%d: v" % i for i in range(200)]
    assert refused_status(request(b"GET /v1/models HTTP/1.1", *extra)) == 431


NON_CANONICAL_PATHS = [
    b"/v1/../jwt", b"/v1/./models", b"/v1//models", b"/v1/models/", b"/v1/%2e%2e/jwt", b"/v1/%2E/x",
    b"/v1/%2E%2E/jwt", b"/v1/.%2e/jwt", b"/v1/a%2fb", b"/v1/a%2Fb", b"/v1/a%5cb", b"/v1/a%5Cb", b"/v1\\models",
    b"/v1/%zz", b"/v1/%00", b"/v1/%", b"/v1/%2", b"/v1/models#frag", b"/v1/models?x=1#frag", b"/v1/models#",
    b"/v1/x/..", b"/v1/x/.", b"//v1/models", b"/..", b"/.", b"v1/models", b"*", b"ftp://h/v1/models",
    b"http://h/v1/../jwt", b"http://h/v1//models", b"http://h/v1/%2e%2e/jwt", b"http:/v1/models",
]


@pytest.mark.parametrize("target", NON_CANONICAL_PATHS, ids=[t.decode("latin-1") for t in NON_CANONICAL_PATHS])
def test_a_non_canonical_path_is_400(target: bytes) -> None:
    """SPEC.md, Forwarding: no `.`/`..`/empty segments, no backslash, no %-encoded `/`, `\\` or `.`."""
    assert refused_status(request(b"GET " + target + b" HTTP/1.1")) == 400


@pytest.mark.parametrize("target, path", [
    (b"/", "/"), (b"/v1/models", "/v1/models"), (b"/v1/files/file-abc.jsonl", "/v1/files/file-abc.jsonl"),
    (b"/v1/a%20b", "/v1/a%20b"), (b"/v1/..x", "/v1/..x"), (b"/v1/.well-known", "/v1/.well-known"),
    (b"/openai/chat/completions", "/openai/chat/completions"), (b"/v1/a%41b", "/v1/a%41b"),
])
def test_canonical_paths_are_kept_exactly(target: bytes, path: str) -> None:
    assert parse(b"GET " + target + b" HTTP/1.1").path == path


@pytest.mark.parametrize("path, upstream", [
    ("/v1/models", "/v1/models"), ("/openai/chat/completions", "/v1/chat/completions"), ("/openai/x/y", "/v1/x/y"),
    ("/jwt/generate", None), ("/healthz", None), ("/v1", None), ("/openai", None), ("/v10/models", None),
    ("/openaix/models", None),
])
def test_upstream_path_for_maps_the_openai_alias(path: str, upstream: str | None) -> None:
    assert soakp.upstream_path_for(path) == upstream


# Chunk size lines #####################################################################################


@pytest.mark.parametrize("line, size", [
    (b"0", 0), (b"1a", 26), (b"FF", 255), (b"ff", 255), (b"00000a", 10), (b"f" * 15, 16**15 - 1),
    (b"5;foo", 5), (b"5;foo=bar", 5), (b'5;foo="quoted value"', 5), (b'5;a=1;b="x\\"y"', 5),
    (b"5 ; foo = bar", 5), (b"5;a;b;c", 5), (b'5;name=""', 5),
])
def test_parse_chunk_size_valid(line: bytes, size: int) -> None:
    assert soakp.parse_chunk_size(line) == size


@pytest.mark.parametrize("line", [
    b"", b";", b"5;", b"5; ", b"5;;a", b"1 a", b" 5", b"5 ", b"0x5", b"-1", b"+1", b"1" * 16, b"g", b"5;=x",
    b'5;a="unterminated', b"5;a=b c", b"5\x00", b"5;a=\x01", b"\xef\xbc\x95", b"5\r", b"5\n",
])
def test_parse_chunk_size_invalid(line: bytes) -> None:
    with pytest.raises(ValueError):
        soakp.parse_chunk_size(line)


# Response heads ######################################################################################


def response(status_line: bytes, *headers: bytes) -> bytes:
    return status_line + b"\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n"


def test_response_with_content_length() -> None:
    resp = soakp.parse_response_head(response(b"HTTP/1.1 200 OK", b"Content-Length: 5"), "GET")
    assert (resp.status, resp.reason, resp.body_kind, resp.content_length, resp.keep_alive) == (
        200, b"OK", "length", 5, True)


def test_response_chunked() -> None:
    resp = soakp.parse_response_head(response(b"HTTP/1.1 200 OK", b"Transfer-Encoding: chunked"), "POST")
    assert (resp.body_kind, resp.keep_alive) == ("chunked", True)


def test_response_without_framing_is_close_delimited() -> None:
    resp = soakp.parse_response_head(response(b"HTTP/1.1 200 OK", b"Content-Type: text/event-stream"), "POST")
    assert (resp.body_kind, resp.keep_alive) == ("close", False)


def test_response_with_a_non_chunked_final_coding_is_close_delimited() -> None:
    """RFC 9112 §6.3 (3): chunked not last → read until close."""
    resp = soakp.parse_response_head(response(b"HTTP/1.1 200 OK", b"Transfer-Encoding: gzip"), "GET")
    assert (resp.body_kind, resp.keep_alive) == ("close", False)


def test_response_to_head_has_no_body_even_with_content_length() -> None:
    resp = soakp.parse_response_head(response(b"HTTP/1.1 200 OK", b"Content-Length: 1234"), "HEAD")
    assert resp.body_kind == "none"
    assert (b"Content-Length", b"1234") in resp.headers


@pytest.mark.parametrize("status", [204, 304, 100, 103])
def test_204_304_and_1xx_have_no_body(status: int) -> None:
    resp = soakp.parse_response_head(response(b"HTTP/1.1 %d X" % status, b"Content-Length: 10"), "GET")
    assert (resp.status, resp.body_kind) == (status, "none")


def test_response_with_te_and_cl_is_chunked_and_not_reused() -> None:
    """RFC 9112 §6.3: Transfer-Encoding overrides Content-Length, and the connection must close after."""
    resp = soakp.parse_response_head(
        response(b"HTTP/1.1 200 OK", b"Content-Length: 10", b"Transfer-Encoding: chunked"), "GET")
    assert (resp.body_kind, resp.keep_alive) == ("chunked", False)


@pytest.mark.parametrize("head, keep_alive", [
    (response(b"HTTP/1.1 200 OK", b"Content-Length: 0", b"Connection: close"), False),
    (response(b"HTTP/1.0 200 OK", b"Content-Length: 0"), False),
    (response(b"HTTP/1.1 200 OK", b"Content-Length: 0", b"Connection: keep-alive"), True),
])
def test_response_keep_alive(head: bytes, keep_alive: bool) -> None:
    assert soakp.parse_response_head(head, "GET").keep_alive is keep_alive


@pytest.mark.parametrize("line, reason", [
    (b"HTTP/1.1 429 Too Many Requests", b"Too Many Requests"), (b"HTTP/1.1 200 ", b""), (b"HTTP/1.1 200", b""),
])
def test_response_reason_phrase_is_kept(line: bytes, reason: bytes) -> None:
    assert soakp.parse_response_head(response(line, b"Content-Length: 0"), "GET").reason == reason


def test_response_duplicate_identical_content_length_is_one_length() -> None:
    resp = soakp.parse_response_head(response(b"HTTP/1.1 200 OK", b"Content-Length: 5", b"Content-Length: 5"), "GET")
    assert (resp.body_kind, resp.content_length) == ("length", 5)


@pytest.mark.parametrize("data", [
    response(b"HTTP/1.1 20 OK"), response(b"HTTP/2 200 OK"), response(b"HTTP/1.1 2000 OK"), response(b"ICY 200 OK"),
    response(b"http/1.1 200 OK"), response(b"HTTP/1.1 200OK"), response(b"HTTP/1.1  200 OK"),
    response(b"HTTP/1.1 099 Low"), response(b"HTTP/1.1 200 OK\x00"), b"", b"\r\n\r\n",
    response(b"HTTP/1.1 200 OK", b"Content-Length: abc"), response(b"HTTP/1.1 200 OK", b"Content-Length: 5, 6"),
    response(b"HTTP/1.1 200 OK", b"Content-Length: 5", b"Content-Length: 6"),
    response(b"HTTP/1.1 200 OK", b"Content-Length: +5"),
    response(b"HTTP/1.1 200 OK", b"X-A: 1", b" folded"), response(b"HTTP/1.1 200 OK", b"X-A: a\x00b"),
    response(b"HTTP/1.1 200 OK", b"Bad Name: 1"),
    response(b"HTTP/1.1 200 OK", *[b"X-%d: v" % i for i in range(201)]),
], ids=lambda d: d[:40].decode("latin-1"))
def test_a_malformed_response_head_is_an_upstream_protocol_error(data: bytes) -> None:
    with pytest.raises(soakp.UpstreamProtocolError):
        soakp.parse_response_head(data, "GET")


# forwarded_headers ###################################################################################


@pytest.mark.parametrize("name", [
    b"Connection", b"Keep-Alive", b"Proxy-Connection", b"Proxy-Authenticate", b"Proxy-Authorization",
    b"TE", b"Trailer", b"Transfer-Encoding", b"Upgrade", b"connection", b"KEEP-ALIVE",
])
def test_forwarded_headers_drops_each_hop_by_hop_header(name: bytes) -> None:
    out = soakp.forwarded_headers([(name, b"x"), (b"X-Keep", b"1")], frozenset())
    assert out == [b"X-Keep: 1\r\n"]


def test_forwarded_headers_drops_every_proxy_star_header() -> None:
    """SPEC.md, Forwarding: `Proxy-*` is in the hop-by-hop list, not only the three RFC names."""
    out = soakp.forwarded_headers([(b"Proxy-Foo", b"x"), (b"Proxy-Status", b"y"), (b"X-Keep", b"1")], frozenset())
    assert out == [b"X-Keep: 1\r\n"]


def test_forwarded_headers_drops_what_connection_names() -> None:
    headers = [(b"Connection", b"close, X-Hop ,x-other"), (b"X-Hop", b"1"), (b"X-OTHER", b"2"), (b"X-Keep", b"3")]
    assert soakp.forwarded_headers(headers, frozenset()) == [b"X-Keep: 3\r\n"]


def test_forwarded_headers_keeps_order_case_and_values_and_applies_also_drop() -> None:
    headers = [(b"X-B", b"2"), (b"x-a", b"1"), (b"Content-Length", b"5"), (b"X-B", b"3")]
    assert soakp.forwarded_headers(headers, frozenset({b"content-length"})) == [
        b"X-B: 2\r\n", b"x-a: 1\r\n", b"X-B: 3\r\n"]


# build_upstream_head #################################################################################


def claims(org: str | None = None, project: str | None = None) -> soakp.TokenClaims:
    return soakp.TokenClaims(jti="jti-1", kid="0123456789abcdef", sub="default", iat=1, exp=2, key=KEY,
                             org=org, project=project)


CLIENT_HEADERS = (
    b"Authorization: Bearer " + TOKEN.encode(), b"User-Agent: OpenAI/Python 1.0", b"Content-Type: application/json",
    b"Content-Length: 17", b"Expect: 100-continue", b"Connection: keep-alive, X-Hop", b"X-Hop: 1",
    b"Keep-Alive: timeout=5", b"Proxy-Authorization: Basic Zm9vOmJhcg==", b"TE: trailers",
    b"X-Custom-Case: Value  Kept", b"OpenAI-Beta: assistants=v2",
)


def build(head: soakp.RequestHead, c: soakp.TokenClaims | None = None,
          target: soakp.UpstreamTarget = OPENAI) -> tuple[bytes, list[tuple[bytes, bytes]], bytes]:
    path = soakp.upstream_path_for(head.path)
    assert path is not None
    out = soakp.build_upstream_head(head, path, c or claims(), target)
    first, pairs = header_lines(out)
    return first, pairs, out


def test_upstream_head_line_host_and_authorization() -> None:
    head = parse(b"POST /v1/chat/completions?stream=true&x=%2F HTTP/1.1", *CLIENT_HEADERS)
    first, pairs, out = build(head)
    assert first == b"POST /v1/chat/completions?stream=true&x=%2F HTTP/1.1"
    assert values(pairs, b"host") == [b"api.openai.com"]
    assert values(pairs, b"authorization") == [b"Bearer " + KEY.encode()]
    assert TOKEN.encode() not in out
    assert b"soakp.test" not in out


def test_upstream_head_drops_hop_by_hop_expect_and_what_connection_names() -> None:
    head = parse(b"POST /v1/chat/completions HTTP/1.1", *CLIENT_HEADERS)
    _, pairs, _ = build(head)
    names = [n for n, _ in pairs]
    for dropped in (b"expect", b"connection", b"x-hop", b"keep-alive", b"proxy-authorization", b"te"):
        assert dropped not in names
    assert (b"x-custom-case", b"Value  Kept") in pairs
    assert (b"openai-beta", b"assistants=v2") in pairs
    assert (b"user-agent", b"OpenAI/Python 1.0") in pairs


def test_upstream_head_keeps_header_name_case() -> None:
    head = parse(b"POST /v1/chat/completions HTTP/1.1", *CLIENT_HEADERS)
    _, _, out = build(head)
    assert b"\r\nX-Custom-Case: Value  Kept\r\n" in out


def test_upstream_head_restates_content_length() -> None:
    head = parse(b"POST /v1/chat/completions HTTP/1.1", *CLIENT_HEADERS)
    _, pairs, _ = build(head)
    assert values(pairs, b"content-length") == [b"17"]
    assert values(pairs, b"transfer-encoding") == []


def test_upstream_head_restates_chunked() -> None:
    head = parse(b"POST /v1/files HTTP/1.1", b"Transfer-Encoding: chunked", b"Authorization: Bearer t")
    _, pairs, _ = build(head)
    assert values(pairs, b"transfer-encoding") == [b"chunked"]
    assert values(pairs, b"content-length") == []


def test_upstream_head_of_a_bodyless_get_has_no_framing_headers() -> None:
    _, pairs, _ = build(parse(b"GET /v1/models HTTP/1.1"))
    assert values(pairs, b"content-length") == [] and values(pairs, b"transfer-encoding") == []


def test_upstream_head_keeps_an_explicit_content_length_zero() -> None:
    """A POST whose client said `Content-Length: 0` must reach the upstream with it: without any framing
    header some servers answer 411 Length Required (RFC 9110 §8.6: a user agent SHOULD send it for POST)."""
    _, pairs, _ = build(parse(b"POST /v1/files/file-1/cancel HTTP/1.1", b"Content-Length: 0"))
    assert values(pairs, b"content-length") == [b"0"]


def test_client_host_and_authorization_in_any_case_are_never_forwarded() -> None:
    head = parse(b"GET /v1/models HTTP/1.1", b"authorization: Bearer " + TOKEN.encode(), host=b"HOST: evil.example")
    _, pairs, out = build(head)
    assert values(pairs, b"host") == [b"api.openai.com"]
    assert values(pairs, b"authorization") == [b"Bearer " + KEY.encode()]
    assert b"evil.example" not in out and TOKEN.encode() not in out


def test_absolute_form_authority_does_not_reach_the_upstream() -> None:
    _, pairs, out = build(parse(b"GET http://evil.example/v1/models?x=1 HTTP/1.1"))
    assert out.startswith(b"GET /v1/models?x=1 HTTP/1.1\r\n")
    assert b"evil.example" not in out


def test_upstream_head_uses_the_base_path_and_host_with_port() -> None:
    target = soakp.parse_upstream("https://gw.example:8443/prefix/")
    first, pairs, _ = build(parse(b"GET /v1/models?x=1 HTTP/1.1"), target=target)
    assert first == b"GET /prefix/v1/models?x=1 HTTP/1.1"
    assert values(pairs, b"host") == [b"gw.example:8443"]


def test_openai_alias_is_forwarded_as_v1() -> None:
    first, _, _ = build(parse(b"POST /openai/chat/completions?a=1 HTTP/1.1", b"Content-Length: 2"))
    assert first == b"POST /v1/chat/completions?a=1 HTTP/1.1"


def test_http_1_0_client_is_forwarded_as_http_1_1() -> None:
    first, _, _ = build(parse(b"GET /v1/models HTTP/1.0", host=None))
    assert first == b"GET /v1/models HTTP/1.1"


ORG_CLIENT = (b"OpenAI-Organization: org-client", b"openai-project: proj-client")


def test_org_and_project_from_the_token_replace_the_clients() -> None:
    _, pairs, _ = build(parse(b"GET /v1/models HTTP/1.1", *ORG_CLIENT), claims(org="org-token", project="proj-token"))
    assert values(pairs, b"openai-organization") == [b"org-token"]
    assert values(pairs, b"openai-project") == [b"proj-token"]


def test_clients_org_and_project_pass_when_the_token_has_none() -> None:
    _, pairs, _ = build(parse(b"GET /v1/models HTTP/1.1", *ORG_CLIENT), claims())
    assert values(pairs, b"openai-organization") == [b"org-client"]
    assert values(pairs, b"openai-project") == [b"proj-client"]


def test_a_token_with_only_an_org_replaces_the_org_and_lets_the_clients_project_pass() -> None:
    _, pairs, _ = build(parse(b"GET /v1/models HTTP/1.1", *ORG_CLIENT), claims(org="org-token"))
    assert values(pairs, b"openai-organization") == [b"org-token"]
    assert values(pairs, b"openai-project") == [b"proj-client"]


def test_a_token_with_only_a_project_replaces_the_project_and_lets_the_clients_org_pass() -> None:
    _, pairs, _ = build(parse(b"GET /v1/models HTTP/1.1", *ORG_CLIENT), claims(project="proj-token"))
    assert values(pairs, b"openai-organization") == [b"org-client"]
    assert values(pairs, b"openai-project") == [b"proj-token"]


def test_token_org_is_sent_even_when_the_client_sends_none() -> None:
    _, pairs, _ = build(parse(b"GET /v1/models HTTP/1.1"), claims(org="org-token", project="proj-token"))
    assert values(pairs, b"openai-organization") == [b"org-token"]
    assert values(pairs, b"openai-project") == [b"proj-token"]


# build_client_head ###################################################################################


UPSTREAM_HEADERS = (
    b"Content-Type: application/json", b"Connection: keep-alive, X-Hop", b"X-Hop: 1", b"Keep-Alive: timeout=5",
    b"Proxy-Authenticate: Basic", b"Upgrade: h2c", b"Trailer: X-T", b"x-request-id: req_123",
    b"openai-processing-ms: 42",
)


def client_head(raw: bytes, method: str = "GET", keep_alive: bool = True,
                chunked: bool = False) -> tuple[bytes, list[tuple[bytes, bytes]], bytes]:
    resp = soakp.parse_response_head(raw, method)
    plan = soakp.plan_answer(resp, 1, keep_alive, strip_usage_event=False)
    assert (plan.framing == "chunked") == chunked  # the plan frames the answer as the caller expects
    out = soakp.build_client_head(resp, plan)
    first, pairs = header_lines(out)
    return first, pairs, out


def test_client_head_passes_status_and_end_to_end_headers_and_drops_hop_by_hop() -> None:
    first, pairs, out = client_head(response(b"HTTP/1.1 201 Created", b"Content-Length: 2", *UPSTREAM_HEADERS))
    assert first == b"HTTP/1.1 201 Created"
    names = [n for n, _ in pairs]
    for dropped in (b"connection", b"x-hop", b"keep-alive", b"proxy-authenticate", b"upgrade", b"trailer"):
        assert dropped not in names
    assert (b"x-request-id", b"req_123") in pairs and (b"openai-processing-ms", b"42") in pairs
    assert b"\r\nx-request-id: req_123\r\n" in out  # name case kept
    assert values(pairs, b"content-length") == [b"2"]


def test_client_head_says_connection_close_when_not_keeping_alive() -> None:
    _, pairs, _ = client_head(response(b"HTTP/1.1 200 OK", b"Content-Length: 0"), keep_alive=False)
    assert values(pairs, b"connection") == [b"close"]
    _, pairs, _ = client_head(response(b"HTTP/1.1 200 OK", b"Content-Length: 0", b"Connection: close"))
    assert values(pairs, b"connection") == []


@pytest.mark.parametrize("raw, method", [
    (response(b"HTTP/1.1 200 OK", b"Content-Length: 1234"), "HEAD"),
    (response(b"HTTP/1.1 304 Not Modified", b"Content-Length: 1234"), "GET"),
    (response(b"HTTP/1.1 204 No Content", b"Content-Length: 1234"), "DELETE"),
])
def test_client_head_keeps_content_length_for_a_bodyless_answer(raw: bytes, method: str) -> None:
    _, pairs, _ = client_head(raw, method)
    assert values(pairs, b"content-length") == [b"1234"]
    assert values(pairs, b"transfer-encoding") == []


def test_client_head_restates_chunked_once() -> None:
    _, pairs, _ = client_head(response(b"HTTP/1.1 200 OK", b"Transfer-Encoding: chunked",
                                       b"Content-Type: text/event-stream"), chunked=True)
    assert values(pairs, b"transfer-encoding") == [b"chunked"]
    assert values(pairs, b"content-length") == []


def test_client_head_drops_content_length_when_te_overrides_it() -> None:
    _, pairs, _ = client_head(response(b"HTTP/1.1 200 OK", b"Content-Length: 10", b"Transfer-Encoding: chunked"),
                              chunked=True)
    assert values(pairs, b"content-length") == []
    assert values(pairs, b"transfer-encoding") == [b"chunked"]


def test_client_head_restates_a_length_once_from_duplicates() -> None:
    _, pairs, _ = client_head(response(b"HTTP/1.1 200 OK", b"Content-Length: 5", b"Content-Length: 5"))
    assert values(pairs, b"content-length") == [b"5"]


def test_client_head_close_delimited_relayed_as_chunked() -> None:
    _, pairs, _ = client_head(response(b"HTTP/1.1 200 OK", b"Content-Type: text/event-stream"), chunked=True)
    assert values(pairs, b"transfer-encoding") == [b"chunked"]
    assert values(pairs, b"content-length") == []
