"""Fuzzing the parsers and token verification with hypothesis, then the running server with random bytes.

Pure properties (no sockets): on any input each function either returns a value that honours its
contract or raises its one documented error, never anything else:
  parse_request_head   RequestHead (and then the head SOAKP builds from it parses back the same) or ApiError 4xx
  parse_chunk_size     0 <= size < 16**15, or ValueError
  ChunkedDecoder       the payload however the encoding is cut, bytes past the end kept apart; or ValueError
  parse_response_head  ResponseHead or UpstreamProtocolError
  MultipartModelScanner.feed  model strings (the same however the body is cut) or ApiError 400
  json_model           None / str, or ApiError 400
  verify_token         TokenClaims or ApiError 401 whose message never holds the token
Then: 300 random and mutated requests against a live SOAKP, each answered with well-formed HTTP or a clean
close within its bound; SOAKP still answers /healthz, and never sent the upstream a malformed head.

Budgets: `max_examples` is bounded per test and `deadline=None` (a shared, noisy 2-core machine);
SOAKP_FUZZ_EXAMPLES scales them all (e.g. 10 for a longer local run).
"""

from __future__ import annotations

import json
import os
import random
import re
from typing import TYPE_CHECKING

import jwt
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

import soakp
from fake_upstream import FakeUpstream, build_request
from fault_servers import collect

if TYPE_CHECKING:
    from conftest import SoakpProcess

SCALE = max(1, int(os.environ.get("SOAKP_FUZZ_EXAMPLES", "1")))


def budget(examples: int) -> settings:
    return settings(max_examples=examples * SCALE, deadline=None, suppress_health_check=[HealthCheck.too_slow])


UPSTREAM = soakp.parse_upstream("https://api.example.test")
KEY = "sk-fuzz-upstream-key-0123456789"
CLAIMS = soakp.TokenClaims(jti="jti-fuzz", kid="0123456789abcdef", sub="fuzz", iat=1, exp=2, key=KEY)

# Pieces that matter to an HTTP/1.1 parser, for building and mutating requests.
INTERESTING = [
    b"\r\n", b"\n", b"\r", b"\x00", b" ", b"\t", b":", b";", b",", b"\x0b", b"\x7f", b"\xff", b"\xc0\xae",
    b"%", b"%2e", b"%2E", b"%2f", b"%5c", b"%25", b"%00", b"..", b".", b"/", b"//", b"\\", b"?", b"#",
    b"Transfer-Encoding: chunked\r\n", b"Transfer-Encoding: xchunked\r\n", b"Content-Length: 5\r\n",
    b"Content-Length: -1\r\n", b"Host: other\r\n", b" folded\r\n", b"Connection: close\r\n",
    b"Expect: 100-continue\r\n", b"0\r\n\r\n", b"HTTP/1.1", b"HTTP/1.0", b"GET ", b"CONNECT ", b"http://x",
]
SEED_REQUESTS = [
    b"GET /v1/models HTTP/1.1\r\nHost: soakp.test\r\nAuthorization: Bearer TOKEN\r\n\r\n",
    b"POST /v1/chat/completions?x=1 HTTP/1.1\r\nHost: soakp.test\r\nContent-Type: application/json\r\n"
    b"Content-Length: 2\r\n\r\n",
    b"POST /openai/files HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive, X-A\r\n\r\n",
    b"GET http://evil.test/v1/a%20b/..x?q=../%2f HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    b"OPTIONS /v1/x HTTP/1.1\r\nHost: [::1]:8080\r\nOrigin: https://app.test\r\nAccess-Control-Request-Method: POST\r\n\r\n",
]


@st.composite
def mutated(draw: st.DrawFn, seeds: list[bytes], interesting: list[bytes] = INTERESTING) -> bytes:
    """A seed with a few random edits: insert (random or interesting bytes), delete, replace, duplicate."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 4))):
        position = draw(st.integers(0, len(data)))
        action = draw(st.sampled_from(["insert", "interesting", "delete", "replace", "duplicate", "case"]))
        if action == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=8))
        elif action == "interesting":
            data[position:position] = draw(st.sampled_from(interesting))
        elif action == "delete":
            del data[position:position + draw(st.integers(1, 8))]
        elif action == "replace" and position < len(data):
            data[position] = draw(st.integers(0, 255))
        elif action == "duplicate":
            end = min(len(data), position + draw(st.integers(1, 40)))
            data[position:position] = data[position:end]
        elif action == "case" and position < len(data):
            data[position:position + 1] = bytes(data[position:position + 1]).swapcase()
    return bytes(data)


# parse_request_head #########################################################################################


def check_head(data: bytes) -> soakp.RequestHead | None:
    """parse_request_head, asserting it raises nothing but a 4xx ApiError."""
    try:
        return soakp.parse_request_head(data)
    except soakp.ApiError as exc:
        assert 400 <= exc.status < 500, exc.status
        assert exc.message
        return None


def check_accepted(head: soakp.RequestHead) -> None:
    """What the parser accepts is safe to route and to forward."""
    soakp.check_canonical_path(head.path)  # the path is canonical by SPEC.md's rules
    assert re.fullmatch(r"[\x21-\x7e]*", head.path + head.query)
    assert head.query == "" or head.query.startswith("?")
    assert "#" not in head.path + head.query
    assert head.method != "CONNECT" and re.fullmatch(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+", head.method)
    assert head.body_kind in ("none", "length", "chunked")
    if head.body_kind == "length":
        assert head.content_length > 0
    names = [name.lower() for name, _ in head.headers]
    if head.body_kind == "chunked":
        assert b"content-length" not in names and head.http_minor == 1
    for name, value in head.headers:
        assert not re.search(rb"[\x00-\x08\x0a-\x1f\x7f]", name + value), (name, value)
    upstream_path = soakp.upstream_path_for(head.path)
    if upstream_path is None:
        return
    # The head SOAKP sends upstream is itself well-formed and reads back the same: one Host (the
    # upstream's), the same target, the same framing. No header injection, no second request.
    built = soakp.build_upstream_head(head, upstream_path, CLAIMS, UPSTREAM)
    assert built.endswith(b"\r\n\r\n") and built.count(b"\r\n\r\n") == 1
    again = soakp.parse_request_head(built)
    assert (again.method, again.path, again.query) == (head.method, upstream_path, head.query)
    assert (again.body_kind, again.content_length) == (head.body_kind, head.content_length)
    assert [v for n, v in again.headers if n.lower() == b"host"] == [b"api.example.test"]
    assert [v for n, v in again.headers if n.lower() == b"authorization"] == [f"Bearer {KEY}".encode()]


@budget(400)
@given(st.binary(max_size=600))
@example(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
@example(b"\r\n" * 50)
@example(b"GET http://a HTTP/1.1\r\nHost: a\r\n\r\n")
def test_request_parser_on_arbitrary_bytes(data: bytes) -> None:
    head = check_head(data)
    if head is not None:
        check_accepted(head)


@budget(600)
@given(mutated(SEED_REQUESTS))
def test_request_parser_on_mutated_requests(data: bytes) -> None:
    head = check_head(data)
    if head is not None:
        check_accepted(head)


HEADER_NAMES = st.sampled_from([b"Host", b"Content-Length", b"Transfer-Encoding", b"Connection", b"Expect",
                                b"X-A", b"transfer-encoding", b"CONTENT-LENGTH", b"Proxy-Authorization", b"TE"])
HEADER_VALUES = st.one_of(st.sampled_from([b"chunked", b"5", b"0", b"close", b"keep-alive", b"100-continue",
                                           b" chunked", b"chunked ", b"a.test", b"", b"1, 1"]),
                          st.binary(max_size=12))


@budget(400)
@given(
    method=st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"PATCH", b"HEAD", b"X-Custom"]),
    target=st.one_of(st.sampled_from([b"/v1/models", b"/openai/chat/completions", b"/healthz", b"/v1/a%25b"]),
                     st.binary(min_size=1, max_size=30).map(lambda b: b"/v1/" + b)),
    version=st.sampled_from([b"HTTP/1.1", b"HTTP/1.0"]),
    fields=st.lists(st.tuples(HEADER_NAMES, st.sampled_from([b": ", b":", b":\t", b" : "]), HEADER_VALUES),
                    max_size=6),
)
def test_request_parser_on_generated_heads(method: bytes, target: bytes, version: bytes,
                                           fields: list[tuple[bytes, bytes, bytes]]) -> None:
    """Heads built from header names and values that decide framing, in every combination."""
    lines = [method + b" " + target + b" " + version] + [n + s + v for n, s, v in fields]
    head = check_head(b"\r\n".join(lines) + b"\r\n\r\n")
    if head is not None:
        check_accepted(head)


# parse_chunk_size, parse_response_head ########################################################################


@budget(500)
@given(st.binary(max_size=80))
@example(b"f" * 15)
@example(b"f" * 16)
@example(b"0;a=\"\\\"\"")
def test_chunk_size_parser_on_arbitrary_bytes(line: bytes) -> None:
    try:
        size = soakp.parse_chunk_size(line)
    except ValueError:
        return
    assert 0 <= size < 16**15
    assert int(re.match(rb"[0-9A-Fa-f]+", line)[0], 16) == size


@budget(200)
@given(size=st.integers(0, 16**15 - 1), extensions=st.lists(
    st.tuples(st.sampled_from([b"", b" ", b"\t"]), st.from_regex(rb"\A[a-z0-9!#$%&'*+.^_`|~-]{1,8}\Z"),
              st.one_of(st.just(b""), st.from_regex(rb"\A=[a-z0-9]{1,8}\Z"), st.just(b'="q \\" x"'))),
    max_size=3))
def test_valid_chunk_size_lines_parse_to_their_size(size: int, extensions: list[tuple[bytes, bytes, bytes]]) -> None:
    line = b"%x" % size + b"".join(space + b";" + space + name + value for space, name, value in extensions)
    assert soakp.parse_chunk_size(line) == size


@st.composite
def chunked_encoding(draw: st.DrawFn) -> tuple[bytes, bytes, bytes]:
    """(payload, its chunked encoding with extensions and trailers, bytes that follow the message)."""
    chunks = draw(st.lists(st.binary(min_size=1, max_size=40), max_size=6))
    encoded = b""
    for chunk in chunks:
        extension = draw(st.sampled_from([b"", b";a", b"; a=b", b';q="x y"', b"\t;n=1"]))
        encoded += draw(st.sampled_from([b"%x", b"%X", b"%04x"])) % len(chunk) + extension + b"\r\n" + chunk + b"\r\n"
    trailers = draw(st.sampled_from([b"", b"X-T: 1\r\n", b"A: b\r\nC: d\r\n"]))
    encoded += b"0" + draw(st.sampled_from([b"", b";end"])) + b"\r\n" + trailers + b"\r\n"
    return b"".join(chunks), encoded, draw(st.sampled_from([b"", b"HTTP/1.1 200 OK\r\n", b"x"]))


@budget(300)
@given(message=chunked_encoding(), cuts=st.lists(st.integers(0, 10**6), max_size=10))
def test_chunked_decoder_decodes_any_valid_encoding_however_it_is_cut(message: tuple[bytes, bytes, bytes],
                                                                     cuts: list[int]) -> None:
    """soakp.ChunkedDecoder (the upstream's chunked answers): the payload comes out whole and in order
    whatever the network reads look like, the end is seen, and bytes past it are kept apart (they must
    never be taken for the next answer)."""
    payload, encoded, after = message
    decoder = soakp.ChunkedDecoder()
    out = b""
    pieces = cut(encoded + after, cuts)
    while pieces and not decoder.done:
        out += decoder.feed(pieces.pop(0))
    assert decoder.done and out == payload
    assert decoder.leftover + b"".join(pieces) == after  # exactly what followed the end, nothing of the message


@budget(400)
@given(st.lists(st.one_of(st.binary(max_size=60),
                          mutated([b"5\r\nhello\r\n0\r\n\r\n", b"3;x=y\r\nabc\r\n0\r\nT: 1\r\n\r\n"])),
                max_size=6))
def test_chunked_decoder_on_arbitrary_pieces(pieces: list[bytes]) -> None:
    """Arbitrary bytes: payload or ValueError, nothing else; never more payload than bytes fed."""
    decoder = soakp.ChunkedDecoder()
    fed = out = 0
    try:
        for piece in pieces:
            if decoder.done:
                break
            fed += len(piece)
            out += len(decoder.feed(piece))
    except ValueError:
        return
    assert out <= fed


SEED_RESPONSES = [
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 12\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n",
    b"HTTP/1.0 404 Not Found\r\nX-Request-Id: req_1\r\n\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    b"HTTP/1.1 204 No Content\r\nContent-Length: 0, 0\r\n\r\n",
]


@budget(400)
@given(data=st.one_of(st.binary(max_size=400), mutated(SEED_RESPONSES)),
       method=st.sampled_from(["GET", "HEAD", "POST"]))
@example(data=b"HTTP/1.1 200 OK\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n", method="GET")
def test_response_parser_on_arbitrary_and_mutated_heads(data: bytes, method: str) -> None:
    try:
        resp = soakp.parse_response_head(data, method)
    except soakp.UpstreamProtocolError:
        return
    assert 100 <= resp.status <= 999
    assert resp.body_kind in ("none", "length", "chunked", "close")
    assert resp.content_length >= 0
    if resp.body_kind != "length":
        assert resp.content_length == 0


# MultipartModelScanner, json_model ###########################################################################

BOUNDARY = b"fuzzBoundary7MA4YWxk"


def multipart(parts: list[tuple[bytes, bytes]]) -> bytes:
    out = b""
    for name, value in parts:
        out += (b"--" + BOUNDARY + b"\r\nContent-Disposition: form-data; name=\"" + name + b"\"\r\n\r\n" + value
                + b"\r\n")
    return out + b"--" + BOUNDARY + b"--\r\n"


def feed_all(pieces: list[bytes]) -> list[str] | None:
    """Every model the scanner reports over the pieces, or None when it refused the body (ApiError 400)."""
    scanner = soakp.MultipartModelScanner(BOUNDARY)
    found: list[str] = []
    try:
        for piece in pieces:
            out = scanner.feed(piece)
            assert isinstance(out, list) and all(isinstance(m, str) for m in out)
            found += out
    except soakp.ApiError as exc:
        assert exc.status == 400
        return None
    return found


def cut(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


@budget(300)
@given(st.lists(st.binary(max_size=200), max_size=8))
def test_multipart_scanner_on_arbitrary_pieces(pieces: list[bytes]) -> None:
    feed_all(pieces)


PART_NAMES = st.sampled_from([b"model", b"file", b"purpose", b"modelx", b"Model"])
PART_VALUES = st.one_of(st.binary(max_size=40).filter(lambda v: BOUNDARY not in v), st.sampled_from(
    [b"gpt-4o", b"whisper-1", b"", b"x" * 2000, b"--" + BOUNDARY[:5], b"\r\n--"]))


@budget(300)
@given(parts=st.lists(st.tuples(PART_NAMES, PART_VALUES), max_size=5), cuts=st.lists(st.integers(0, 10**6), max_size=12))
def test_multipart_scanner_finds_the_same_models_however_the_body_is_cut(
    parts: list[tuple[bytes, bytes]], cuts: list[int]
) -> None:
    """The scanner's answer depends on the body, never on where the network split it (regression: a value
    over MAX_MODEL_VALUE_BYTES came back whole when one piece also held the next delimiter, else as "")."""
    body = multipart(parts)
    whole = feed_all([body])
    assert feed_all(cut(body, cuts)) == whole
    if whole is not None:
        expected = [v.decode("utf-8", "replace") if len(v) <= soakp.MAX_MODEL_VALUE_BYTES else ""
                    for n, v in parts if n == b"model"]
        assert whole == expected


@budget(300)
@given(st.binary(max_size=300))
@example(b"[" * 100_000)
@example(b'{"model":"a","model":"b"}')
@example('{"model": "\u00e9"}'.encode("utf-16"))
def test_json_model_on_arbitrary_bytes(body: bytes) -> None:
    try:
        model = soakp.json_model(body)
    except soakp.ApiError as exc:
        assert exc.status == 400
        return
    assert model is None or isinstance(model, str)


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
                    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children,
                                                                                       max_size=3),
                    max_leaves=10)


@budget(200)
@given(st.dictionaries(st.sampled_from(["model", "stream", "input", "messages"]), JSON, max_size=4))
def test_json_model_reads_the_top_level_model(document: dict) -> None:
    model = soakp.json_model(json.dumps(document).encode())
    if "model" not in document:
        assert model is None
    else:
        assert model == (document["model"] if isinstance(document["model"], str) else "")


# verify_token ###############################################################################################

SECRET = "fuzz-secret-" + "s" * 40
KEYS = soakp.derive_keys(SECRET)
KEYRING = soakp.build_keyring(SECRET)
NOW = 1_800_000_000
REAL = soakp.mint_token(KEYS, soakp.Grant(key=KEY, ttl_s=3600, sub="fuzz"), NOW, "jti-fuzz-real", b"\x01" * 12)
REAL_CLAIMS = soakp.verify_token(REAL.token, KEYRING, NOW)


def check_refused_or_same(token: str) -> None:
    """verify_token either accepts (and then only with the real token's own claims) or raises ApiError(401)
    whose message does not repeat the token."""
    try:
        claims = soakp.verify_token(token, KEYRING, NOW)
    except soakp.ApiError as exc:
        assert exc.status == 401
        if len(token) >= 16:
            assert token not in exc.message
        return
    assert claims == REAL_CLAIMS, "a different token verified with other claims"


@budget(300)
@given(st.text(max_size=200))
@example("")
@example("a.b.c")
@example("." * 3)
@example("x" * 9000)
def test_verify_token_on_arbitrary_strings(token: str) -> None:
    check_refused_or_same(token)


@st.composite
def mutated_token(draw: st.DrawFn) -> str:
    token = list(REAL.token)
    for _ in range(draw(st.integers(1, 3))):
        if not token:
            break
        position = draw(st.integers(0, len(token) - 1))
        action = draw(st.sampled_from(["replace", "delete", "insert", "truncate", "swap"]))
        if action == "replace":
            token[position] = draw(st.sampled_from(list("AZaz09-_.=+/ \n\x00é")))
        elif action == "delete":
            del token[position]
        elif action == "insert":
            token.insert(position, draw(st.sampled_from(list("A0-_.= "))))
        elif action == "truncate":
            token = token[:position]
        else:
            other = draw(st.integers(0, len(token) - 1))
            token[position], token[other] = token[other], token[position]
    return "".join(token)


@budget(400)
@given(mutated_token())
def test_verify_token_on_mutated_real_tokens(token: str) -> None:
    check_refused_or_same(token)


CLAIM_VALUES = st.one_of(JSON, st.integers(-2**70, 2**70), st.just(NOW + 100), st.just(True),
                         st.sampled_from(["soakp", "openai", "jti", "a" * 300, "/v1/*", "\n", "é"]))
CLAIM_NAMES = st.sampled_from(["iss", "aud", "sub", "iat", "exp", "jti", "ek", "org", "project", "paths", "models",
                               "rpm", "origins", "max_tokens_total", "nbf", "x"])


@budget(300)
@given(overrides=st.dictionaries(CLAIM_NAMES, CLAIM_VALUES, max_size=4),
       removed=st.lists(CLAIM_NAMES, max_size=2),
       header=st.dictionaries(st.sampled_from(["kid", "alg", "typ", "crit", "jku"]), JSON, max_size=2))
def test_verify_token_on_claims_signed_with_the_right_key(overrides: dict, removed: list, header: dict) -> None:
    """Claims of any shape, signed with the real signing key: only TokenClaims or ApiError(401), never a
    crash, and a token whose limits cannot be read is refused (fail closed)."""
    payload = {**jwt.decode(REAL.token, options={"verify_signature": False}), **overrides}
    for name in removed:
        payload.pop(name, None)
    headers = {"kid": KEYS.kid, **{k: v for k, v in header.items() if k != "alg"}}
    try:
        token = jwt.encode(payload, KEYS.signing_key, algorithm="HS256", headers=headers)
    except (TypeError, ValueError, jwt.InvalidTokenError):
        assume(False)  # pyjwt itself cannot encode it: no token to verify
    try:
        claims = soakp.verify_token(token, KEYRING, NOW)
    except soakp.ApiError as exc:
        assert exc.status == 401
        return
    assert claims.key == KEY and claims.exp > NOW
    assert isinstance(claims.jti, str) and claims.jti.isascii()


# The live server ############################################################################################

SOCKET_EXAMPLES = 300 * SCALE
SOCKET_TIMEOUT_S = 8.0


def live_seeds() -> list[bytes]:
    """Requests worth mutating; TOKEN stands for the real token (put in after mutation, so that edits land on
    the framing and the target rather than mostly inside a 400-byte token)."""
    auth = [("Authorization", "Bearer TOKEN")]
    return [
        build_request("GET", "/v1/fake/echo/fuzz?q=1", auth),
        build_request("POST", "/v1/fake/echo/fuzz", auth + [("Content-Type", "application/json")], b'{"model":"m"}'),
        build_request("POST", "/v1/fake/echo/fuzz", auth + [("Transfer-Encoding", "chunked")]) + b"5\r\nhello\r\n0\r\n\r\n",
        build_request("GET", "/v1/models", auth) + build_request("GET", "/v1/fake/echo/second", auth),
        build_request("GET", "/healthz"),
        build_request("OPTIONS", "/v1/x", [("Origin", "https://a.test"), ("Access-Control-Request-Method", "POST")]),
        build_request("POST", "/jwt/generate", [("Authorization", "Basic YTpi")], b"{}"),
        build_request("GET", "http://evil.test/openai/fake/echo/abs", auth),
    ]


def mutate(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        position = rng.randint(0, len(out))
        roll = rng.random()
        if roll < 0.3:
            out[position:position] = rng.choice(INTERESTING)
        elif roll < 0.5:
            out[position:position] = rng.randbytes(rng.randint(1, 6))
        elif roll < 0.7:
            del out[position:position + rng.randint(1, 10)]
        elif roll < 0.85 and position < len(out):
            out[position] = rng.randint(0, 255)
        else:
            out[position:position] = out[position:position + rng.randint(1, 60)]
    return bytes(out)


def test_live_server_survives_random_and_mutated_requests(soakp: Callable[..., SoakpProcess],
                                                          fake_upstream: FakeUpstream) -> None:
    """300 connections carrying random bytes or mutated requests (then the client's EOF): each gets zero or
    more well-formed responses and a close within 8 s, never a hang or half a response; afterwards SOAKP
    answers /healthz, and the fake upstream recorded no malformed head from SOAKP (checked at teardown).
    A SOAKP of its own: the fuzz's failed admin logins lock 127.0.0.1 out of that server's admin API."""
    proxy = soakp()
    token = proxy.mint()
    seed = int(os.environ.get("SOAKP_FUZZ_SEED", "20261127"))
    rng = random.Random(seed)
    seeds = live_seeds()
    failures = []
    forwarded = 0
    for number in range(SOCKET_EXAMPLES):
        if number % 10 == 0:
            data = rng.randbytes(rng.randint(1, 300))
        else:
            data = mutate(rng, rng.choice(seeds)).replace(b"TOKEN", token.encode())
        outcome = collect(proxy.port, data, timeout_s=SOCKET_TIMEOUT_S)
        problem = None
        if not outcome.eof:
            problem = f"no close within {SOCKET_TIMEOUT_S}s"
        elif outcome.malformed or outcome.leftover:
            problem = f"malformed answer: {outcome.malformed or outcome.leftover[:100]!r}"
        elif any(not r.complete for r in outcome.responses):
            problem = "a response cut short"
        # 501 is SOAKP's answer to a method it does not forward (SPEC.md, Methods), not a failure.
        elif any(r.status >= 500 and r.status != 501 for r in outcome.responses):
            problem = f"server error {outcome.statuses}"
        if problem:
            failures.append(f"#{number} (seed {seed}): {problem}; sent {data[:160]!r}")
        forwarded += sum(1 for r in outcome.responses if r.status == 200)
    assert not failures, "\n".join(failures[:10])
    assert forwarded >= SOCKET_EXAMPLES // 10, f"only {forwarded} answers came from the upstream: mutate less"
    assert proxy.request("GET", "/healthz").status == 200
