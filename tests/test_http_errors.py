"""Every status SOAKP answers itself, driven with raw sockets, plus upstream failures.

Each test proves three things: the status and OpenAI's error shape, that a refused request never
reached the upstream, and that a new connection's good request still succeeds afterwards.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import socket
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fake_upstream import CertAuthority, FakeUpstream, RawResponse, build_request, die_mid_body, stall

if TYPE_CHECKING:
    from conftest import Minted, SecretsRegistry, SoakpProcess


# Helpers ####################################################################################################


def assert_openai_error(response: RawResponse, status: int) -> dict[str, Any]:
    """Assert `status` and the body `{"error": {"message", "type", "param": null, "code"}}`; return the error."""
    assert response.status == status, f"expected {status}, got {response.status}: {response.body[:300]!r}"
    assert "application/json" in (response.header("content-type") or ""), response.headers
    error = response.json()["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    assert "param" in error and error["param"] is None
    assert "code" in error
    return error


def assert_recovers(server: SoakpProcess, token: str, upstream: FakeUpstream | None = None) -> None:
    """A new connection's good request succeeds (and reaches the upstream, when one is given)."""
    response = server.request("GET", "/v1/models", token)
    assert response.status == 200, f"good request after the bad one: {response.status} {response.body[:300]!r}"
    if upstream is not None:
        upstream.wait_for_request("/v1/models")


def auth(token: str) -> tuple[str, str]:
    return ("Authorization", f"Bearer {token}")


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def split_token(token: str) -> tuple[dict[str, Any], dict[str, Any], bytes]:
    header, payload, signature = token.split(".")
    return json.loads(b64url_decode(header)), json.loads(b64url_decode(payload)), b64url_decode(signature)


def signing_key(secret: str) -> bytes:
    """The JWT signing key SPEC.md derives from the master secret (HKDF-SHA256, no salt, 32 bytes)."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"soakp/jwt-hs256").derive(secret.encode())


def sign(header: dict[str, Any], payload: dict[str, Any], key: bytes | None, digest: str = "sha256") -> str:
    """Build a JWT by hand: HMAC with `digest` under `key`, or an empty signature when key is None."""
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(payload).encode())}"
    signature = b"" if key is None else hmac.new(key, signing_input.encode(), digest).digest()
    return f"{signing_input}.{b64url(signature)}"


# Health #####################################################################################################


def test_healthz(proxy: SoakpProcess, fake_upstream: FakeUpstream) -> None:
    """GET /healthz needs no token, answers 200 {"status": "ok"} and does not touch the upstream."""
    response = proxy.request("GET", "/healthz")
    assert response.status == 200
    assert response.json() == {"status": "ok"}
    assert fake_upstream.requests == []


# 401: tokens ################################################################################################


def forge_tampered_signature(token: str, secret: str) -> str:
    head, payload, signature = token.split(".")
    raw = bytearray(b64url_decode(signature))
    raw[len(raw) // 2] ^= 0x01
    return f"{head}.{payload}.{b64url(bytes(raw))}"


def forge_tampered_claims(token: str, secret: str) -> str:
    header, payload, signature = split_token(token)
    payload["sub"] = "admin"
    return f"{token.split('.')[0]}.{b64url(json.dumps(payload).encode())}.{b64url(signature)}"


def forge_alg_none(token: str, secret: str) -> str:
    header, payload, _ = split_token(token)
    return sign({**header, "alg": "none"}, payload, None)


def forge_alg_none_uppercase(token: str, secret: str) -> str:
    header, payload, _ = split_token(token)
    return sign({**header, "alg": "None"}, payload, None)


def forge_hs512_with_the_right_key(token: str, secret: str) -> str:
    header, payload, _ = split_token(token)
    return sign({**header, "alg": "HS512"}, payload, signing_key(secret), "sha512")


def forge_signed_with_the_secret_itself(token: str, secret: str) -> str:
    header, payload, _ = split_token(token)
    return sign(header, payload, secret.encode())


def forge_far_future_exp(token: str, secret: str) -> str:
    header, payload, signature = split_token(token)
    payload["exp"] = payload["exp"] + 10 * 365 * 86400
    return f"{token.split('.')[0]}.{b64url(json.dumps(payload).encode())}.{b64url(signature)}"


FORGERIES: dict[str, Callable[[str, str], str]] = {
    "tampered-signature": forge_tampered_signature,
    "tampered-claims": forge_tampered_claims,
    "alg-none": forge_alg_none,
    "alg-None": forge_alg_none_uppercase,
    "hs512-right-key": forge_hs512_with_the_right_key,
    "signed-with-raw-secret": forge_signed_with_the_secret_itself,
    "extended-exp": forge_far_future_exp,
}


@pytest.mark.parametrize("forgery", FORGERIES)
def test_forged_token_is_401(
    proxy: SoakpProcess, fake_upstream: FakeUpstream, minted: Minted, secret: str, secrets_registry: SecretsRegistry, forgery: str
) -> None:
    """A token altered or re-signed by hand (alg none, HS512, tampered signature or claims) is refused
    with 401; the upstream sees nothing, and the answer does not echo the token."""
    forged = secrets_registry.add(FORGERIES[forgery](minted.token, secret))
    assert forged != minted.token
    response = proxy.request("GET", "/v1/models", forged)
    assert_openai_error(response, 401)
    assert forged.encode() not in response.body
    assert fake_upstream.requests == []
    assert_recovers(proxy, minted.token, fake_upstream)


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer", "Bearer ", "Bearer not-a-jwt", "Bearer a.b.c", "Basic YWRtaW46YWRtaW4=", "Token x.y.z", "bearer"],
)
def test_missing_or_malformed_authorization_is_401(
    proxy: SoakpProcess, fake_upstream: FakeUpstream, token: str, authorization: str | None
) -> None:
    """No Authorization, or one that does not carry a JWT, gets 401 and reaches nothing."""
    headers = [] if authorization is None else [("Authorization", authorization)]
    assert_openai_error(proxy.request("GET", "/v1/models", headers=headers), 401)
    assert fake_upstream.requests == []
    assert_recovers(proxy, token, fake_upstream)


def test_token_signed_per_spec_key_derivation(minted: Minted, secret: str) -> None:
    """A minted token is HS256 under SPEC.md's HKDF signing key, with kid = SHA-256(signing key)[:16 hex].

    This is the positive control that makes the hs512-right-key forgery meaningful."""
    header, payload, signature = split_token(minted.token)
    key = signing_key(secret)
    assert header["alg"] == "HS256"
    assert header["kid"] == hashlib.sha256(key).hexdigest()[:16]
    signing_input = minted.token.rsplit(".", 1)[0].encode()
    assert hmac.compare_digest(signature, hmac.new(key, signing_input, "sha256").digest())
    assert (payload["iss"], payload["aud"]) == ("soakp", "openai")
    assert minted.key not in json.dumps(payload)


def test_token_minted_with_another_secret_is_401(
    proxy: SoakpProcess, fake_upstream: FakeUpstream, token: str, soakp_cli, secrets_registry: SecretsRegistry, tmp_path
) -> None:
    """A token that `soakp mint` made with a different master secret is refused with 401."""
    other_secret = secrets_registry.add("another-secret-entirely-" + "x" * 30)
    key = secrets_registry.new_key()
    result = soakp_cli("mint", "--secret", other_secret, "--db", str(tmp_path / "other.db"), "--key", key)
    assert result.returncode == 0, result.stderr
    foreign = secrets_registry.add(result.stdout.strip().splitlines()[-1])
    assert_openai_error(proxy.request("GET", "/v1/models", foreign), 401)
    assert fake_upstream.requests == []
    assert_recovers(proxy, token, fake_upstream)


def test_expired_token_is_401(proxy: SoakpProcess, fake_upstream: FakeUpstream, token: str) -> None:
    """A token minted with ttl 1 is refused once its exp has passed (no leeway)."""
    expiring = proxy.mint_data(ttl=1)
    assert expiring.expires_at <= time.time() + 2
    deadline = time.monotonic() + 5
    while time.time() < expiring.expires_at + 1 and time.monotonic() < deadline:
        time.sleep(0.05)  # waiting for the clock, not for another process
    assert time.time() >= expiring.expires_at + 1
    response = proxy.request("GET", "/v1/models", expiring.token)
    assert_openai_error(response, 401)
    assert fake_upstream.requests == []
    assert_recovers(proxy, token, fake_upstream)


# 400: malformed requests ####################################################################################

MALFORMED = {
    "garbage": b"GARBAGE\r\n\r\n",
    "four-part-request-line": b"GET /v1/models HTTP/1.1 extra\r\nHost: x\r\n{auth}\r\n\r\n",
    "no-version": b"GET /v1/models\r\nHost: x\r\n{auth}\r\n\r\n",
    "space-before-colon": b"GET /v1/models HTTP/1.1\r\nHost: x\r\n{auth}\r\nX-Bad : 1\r\n\r\n",
    "header-without-colon": b"GET /v1/models HTTP/1.1\r\nHost: x\r\n{auth}\r\nNoColonHere\r\n\r\n",
    "nul-in-target": b"GET /v1/mo\x00dels HTTP/1.1\r\nHost: x\r\n{auth}\r\n\r\n",
    "obs-fold": b"GET /v1/models HTTP/1.1\r\nHost: x\r\n{auth}\r\nX-Folded: a\r\n b\r\n\r\n",
}


@pytest.mark.parametrize("name", MALFORMED)
def test_malformed_request_is_400(proxy: SoakpProcess, fake_upstream: FakeUpstream, token: str, name: str) -> None:
    """A malformed request line or header gets 400 and is not forwarded."""
    data = MALFORMED[name].replace(b"{auth}", f"Authorization: Bearer {token}".encode())
    assert_openai_error(proxy.raw(data, "GET"), 400)
    assert fake_upstream.requests == []
    assert_recovers(proxy, token, fake_upstream)


SMUGGLING = {
    "cl-and-te": [("Content-Length", "4"), ("Transfer-Encoding", "chunked")],
    "te-and-cl": [("Transfer-Encoding", "chunked"), ("Content-Length", "4")],
    "two-content-lengths": [("Content-Length", "5"), ("Content-Length", "6")],
    "signed-content-length": [("Content-Length", "+5")],
    "te-not-chunked-last": [("Transfer-Encoding", "chunked, identity")],
}


@pytest.mark.parametrize("name", SMUGGLING)
def test_ambiguous_body_framing_is_400(proxy: SoakpProcess, fake_upstream: FakeUpstream, token: str, name: str) -> None:
    """Framing two parsers could read differently (CL with TE, conflicting CLs: RFC 9112 6.3) gets 400
    and nothing is forwarded: the request-smuggling guard."""
    data = build_request("POST", "/v1/fake/echo/smuggle", [auth(token), *SMUGGLING[name]]) + b"0\r\n\r\nGET /v1/fake/echo/smuggled HTTP/1.1\r\n\r\n"
    response = proxy.raw(data)
    allowed = (400, 501) if name == "te-not-chunked-last" else (400,)  # RFC 9112 6.1: 501 for an unknown coding
    assert response.status in allowed, f"{response.status}: {response.body[:300]!r}"
    assert_openai_error(response, response.status)
    assert fake_upstream.requests == []
    assert_recovers(proxy, token, fake_upstream)


@pytest.mark.parametrize(
    "target",
    [
        "/v1/../jwt/generate",
        "/v1//models",
        "/v1/%2e%2e/jwt/generate",
        "/v1/%2E%2E/jwt/generate",
        "/v1/./models",
        "/v1/%2e/models",
        "/v1/models/.",
        "/v1/models/..",
        "/v1/a%2Fb",
        "/v1/a%2fb",
        "/v1/a\\b",
        "/v1/a%5Cb",
        "/openai/../jwt/generate",
        "/openai//models",
    ],
)
def test_non_canonical_path_is_400(proxy: SoakpProcess, fake_upstream: FakeUpstream, token: str, target: str) -> None:
    """A path with dot segments, empty segments, backslashes or encoded / \\ . gets 400 and is not forwarded."""
    assert_openai_error(proxy.request("GET", target, token), 400)
    assert fake_upstream.requests == []
    assert_recovers(proxy, token, fake_upstream)


# 405, 404, absolute form ####################################################################################


def test_connect_is_405(proxy: SoakpProcess, fake_upstream: FakeUpstream, token: str) -> None:
    """CONNECT (a tunnel request) gets 405; SOAKP is not a forward proxy."""
    data = f"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\nAuthorization: Bearer {token}\r\n\r\n"
    assert_openai_error(proxy.raw(data.encode()), 405)
    assert fake_upstream.requests == []
    assert_recovers(proxy, token, fake_upstream)


@pytest.mark.parametrize("target", ["/", "/nope", "/v2/models", "/favicon.ico", "/jwt/nothing-here"])
def test_unknown_path_is_404(proxy: SoakpProcess, fake_upstream: FakeUpstream, token: str, target: str) -> None:
    """A path outside /v1/, /openai/ and SOAKP's own endpoints gets 404 and is not forwarded."""
    assert_openai_error(proxy.request("GET", target, token), 404)
    assert fake_upstream.requests == []
    assert_recovers(proxy, token, fake_upstream)


@pytest.mark.parametrize("authority", ["http://evil.example", "https://evil.example:8443", "http://127.0.0.1:1"])
def test_absolute_form_target_is_served_from_the_configured_upstream(
    proxy: SoakpProcess, fake_upstream: FakeUpstream, token: str, authority: str
) -> None:
    """`GET http://other-host/v1/... HTTP/1.1` is served by its path alone: the configured upstream gets
    the request, with its own Host; the named host is never contacted."""
    data = f"GET {authority}/v1/fake/echo/abs?x=1 HTTP/1.1\r\nHost: evil.example\r\nAuthorization: Bearer {token}\r\n\r\n"
    response = proxy.raw(data.encode())
    assert response.status == 200, response.body
    record = fake_upstream.wait_for_request("/v1/fake/echo/abs")
    assert record.target == "/v1/fake/echo/abs?x=1"
    assert record.header_all("host") == [f"127.0.0.1:{fake_upstream.port}"]
    assert_recovers(proxy, token, fake_upstream)


# 431, 413: limits ###########################################################################################


def test_headers_over_64k_are_431(proxy: SoakpProcess, fake_upstream: FakeUpstream, token: str) -> None:
    """100 KB of request headers get 431 and are not forwarded."""
    padding = [(f"X-Pad-{index}", "p" * 1000) for index in range(100)]
    response = proxy.raw(build_request("GET", "/v1/models", [auth(token), *padding]))
    assert_openai_error(response, 431)
    assert fake_upstream.requests == []
    assert_recovers(proxy, token, fake_upstream)


def test_one_huge_header_line_is_431(proxy: SoakpProcess, fake_upstream: FakeUpstream, token: str) -> None:
    """A single 100 KB header line gets 431 too."""
    response = proxy.raw(build_request("GET", "/v1/models", [auth(token), ("X-Huge", "h" * 100_000)]))
    assert_openai_error(response, 431)
    assert fake_upstream.requests == []
    assert_recovers(proxy, token, fake_upstream)


@pytest.fixture
def small_body_soakp(soakp) -> Iterator[tuple[SoakpProcess, str]]:
    """A SOAKP started with --max-body 1MiB, and a token for it."""
    server = soakp(max_body="1MiB")
    yield server, server.mint()


def test_declared_body_over_max_body_is_413(small_body_soakp, fake_upstream: FakeUpstream) -> None:
    """A Content-Length over --max-body gets 413 before anything is forwarded."""
    server, token = small_body_soakp
    body = b"x" * (2 * 1024 * 1024)
    response = server.raw(build_request("POST", "/v1/fake/echo/big", [auth(token)], body))
    assert_openai_error(response, 413)
    assert fake_upstream.requests == []
    assert_recovers(server, token, fake_upstream)


def test_chunked_body_over_max_body_is_413(small_body_soakp, fake_upstream: FakeUpstream) -> None:
    """A chunked body that grows past --max-body gets 413, and the upstream never sees it as a complete
    request (SOAKP must not invent the end of a body it cut)."""
    server, token = small_body_soakp
    head = build_request("POST", "/v1/fake/echo/bigchunked", [auth(token), ("Transfer-Encoding", "chunked")])
    piece = b"y" * 65536
    body = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for _ in range(32)) + b"0\r\n\r\n"
    response = server.raw(head + body)
    assert_openai_error(response, 413)
    assert all(not record.complete for record in fake_upstream.requests), "the cut body reached the upstream as complete"
    assert_recovers(server, token)


def test_body_at_max_body_passes(small_body_soakp, fake_upstream: FakeUpstream) -> None:
    """A body of exactly --max-body bytes is accepted and forwarded whole."""
    server, token = small_body_soakp
    body = b"z" * (1024 * 1024)
    response = server.raw(build_request("POST", "/v1/fake/echo/limit", [auth(token)], body))
    assert response.status == 200, response.body[:300]
    assert fake_upstream.wait_for_request("/v1/fake/echo/limit").body_length == len(body)


# 502, 504 and failures after the head #######################################################################


def test_unreachable_upstream_is_502(soakp, fake_upstream: FakeUpstream) -> None:
    """An upstream port that refuses connections gets 502 quickly; SOAKP itself stays up."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # bound, never listening: connections to it are refused
        port = closed.getsockname()[1]
        server = soakp(upstream=f"https://127.0.0.1:{port}", connect_timeout="2s")
        token = server.mint()
        started = time.monotonic()
        assert_openai_error(server.request("GET", "/v1/models", token), 502)
        assert time.monotonic() - started < 10
        assert server.request("GET", "/healthz").status == 200


def test_untrusted_upstream_certificate_is_502(soakp, fake_upstream: FakeUpstream, tmp_path) -> None:
    """An upstream whose certificate the --upstream-ca does not vouch for gets 502: TLS is verified."""
    stranger = CertAuthority(tmp_path / "stranger-ca", "Stranger CA")
    server = soakp(upstream_ca=str(stranger.ca_path))
    token = server.mint()
    assert_openai_error(server.request("GET", "/v1/models", token), 502)
    assert fake_upstream.requests == []
    assert server.request("GET", "/healthz").status == 200


def test_stalled_upstream_is_504(soakp, fake_upstream: FakeUpstream) -> None:
    """An upstream that sends no response head within --read-timeout (1 s) gets 504."""
    server = soakp(read_timeout="1s")
    token = server.mint()
    fake_upstream.script("/v1/fake/stall", stall(max_s=30))
    started = time.monotonic()
    response = server.request("GET", "/v1/fake/stall", token, timeout_s=20)
    elapsed = time.monotonic() - started
    assert_openai_error(response, 504)
    assert 0.8 <= elapsed < 10, f"504 after {elapsed:.1f}s with --read-timeout 1s"
    assert_recovers(server, token, fake_upstream)


TRUNCATIONS = {
    "chunked-close": dict(declared_length=None, how="close"),
    "chunked-reset": dict(declared_length=None, how="reset"),
    "content-length-close": dict(declared_length=100_000, how="close"),
    "content-length-reset": dict(declared_length=100_000, how="reset"),
    "chunked-silence": dict(declared_length=None, how="stall"),
    "content-length-silence": dict(declared_length=100_000, how="stall"),
}


@pytest.mark.parametrize("name", TRUNCATIONS)
def test_upstream_failing_mid_body_truncates_the_response(soakp, fake_upstream: FakeUpstream, name: str) -> None:
    """When the upstream closes, resets or goes silent (past --read-timeout) after the head, the client
    gets the head and the bytes sent so far, then the connection ends with the body unfinished: no
    terminating chunk, fewer bytes than Content-Length, never an invented clean ending."""
    server = soakp(read_timeout="1s")
    token = server.mint()
    sent = b'{"partial": "' + b"p" * 5000
    fake_upstream.script("/v1/fake/die", die_mid_body(sent, **TRUNCATIONS[name]))
    with server.connect(timeout_s=20) as conn:
        conn.send(build_request("GET", "/v1/fake/die", [auth(token)]))
        response = conn.read_response(timeout_s=20)
        assert conn.wait_closed(timeout_s=10), "SOAKP kept the client connection open after the upstream failed"
    assert response.status == 200
    assert not response.complete, f"the client saw a clean ending: {response.headers}"
    if TRUNCATIONS[name]["how"] == "reset":
        assert sent.startswith(response.body)  # a reset may discard bytes still queued at SOAKP
    else:
        assert response.body == sent
    assert_recovers(server, token, fake_upstream)
