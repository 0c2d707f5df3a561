"""CORS against a running SOAKP started with --cors-origins: preflights SOAKP answers itself (no token),
and the CORS headers on forwarded responses and on SOAKP's own errors, so that a page from an allowed
origin can read both. tests/test_browser.py checks the same with a real browser.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import pytest

from fake_upstream import FakeUpstream, RawResponse, json_reply

if TYPE_CHECKING:
    from conftest import SoakpLauncher, SoakpProcess

APP_ORIGIN = "https://app.example.com"
DEV_ORIGIN = "http://localhost:8080"
CHAT = "/v1/chat/completions"
# What a browser page must be able to read from OpenAI's answers (SPEC.md: x-request-id,
# openai-processing-ms, x-ratelimit-*), plus Retry-After for SOAKP's own 429s.
EXPOSED = {
    "x-request-id", "openai-processing-ms", "x-ratelimit-limit-requests", "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-requests", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-requests",
    "x-ratelimit-reset-tokens", "retry-after",
}
# What the official JavaScript SDK sends from a browser, so what its preflight asks for.
SDK_REQUEST_HEADERS = "authorization,content-type,x-stainless-arch,x-stainless-lang,x-stainless-retry-count"


@pytest.fixture(scope="module")
def cors_server(soakp_launcher: SoakpLauncher) -> Iterator[SoakpProcess]:
    process = soakp_launcher.start(cors_origins=f"{APP_ORIGIN}, {DEV_ORIGIN}")
    yield process
    process.stop()


@pytest.fixture
def server(cors_server: SoakpProcess, fake_upstream: FakeUpstream) -> Iterator[SoakpProcess]:
    yield cors_server
    assert cors_server.alive, cors_server.log_text()[-3000:]


def preflight(server: SoakpProcess, path: str, origin: str | None, request_headers: str | None = None) -> RawResponse:
    headers = [("Access-Control-Request-Method", "POST")]
    if origin is not None:
        headers.insert(0, ("Origin", origin))
    if request_headers is not None:
        headers.append(("Access-Control-Request-Headers", request_headers))
    return server.request("OPTIONS", path, headers=headers)


def listed(value: str | None) -> set[str]:
    return {item.strip().lower() for item in (value or "").split(",") if item.strip()}


def assert_cors(response: RawResponse, origin: str) -> None:
    """The answer lets `origin` read it, and the headers a page needs."""
    assert response.header_all("access-control-allow-origin") == [origin], response.headers
    assert EXPOSED <= listed(response.header("access-control-expose-headers"))
    assert "origin" in listed(", ".join(response.header_all("vary")))


# Preflight ##################################################################################################


@pytest.mark.parametrize("path", [CHAT, "/openai/audio/transcriptions", "/v1/files/file-1", "/jwt/refresh"])
@pytest.mark.parametrize("origin", [APP_ORIGIN, DEV_ORIGIN])
def test_preflight_from_an_allowed_origin_is_204_without_a_token(server: SoakpProcess, fake_upstream: FakeUpstream,
                                                                 path: str, origin: str) -> None:
    response = preflight(server, path, origin, SDK_REQUEST_HEADERS)
    assert response.status == 204 and response.body == b""
    assert response.header_all("access-control-allow-origin") == [origin]
    assert {"get", "post", "delete"} <= listed(response.header("access-control-allow-methods"))
    assert listed(SDK_REQUEST_HEADERS) <= listed(response.header("access-control-allow-headers"))
    assert int(response.header("access-control-max-age")) > 0
    assert fake_upstream.requests == []


@pytest.mark.parametrize("origin", [
    "https://evil.example.com", "http://app.example.com", "https://app.example.com:8443",
    "http://127.0.0.1:8080", "null", None,
])
def test_preflight_from_another_origin_is_403_without_cors_headers(server: SoakpProcess, fake_upstream: FakeUpstream,
                                                                   origin: str | None) -> None:
    """Scheme, host and port all count: http://localhost:8080 is allowed, http://127.0.0.1:8080 is not."""
    response = preflight(server, CHAT, origin, "authorization")
    assert response.status == 403
    assert json.loads(response.body)["error"]["code"] == "origin_not_allowed"
    assert response.header("access-control-allow-origin") is None
    assert fake_upstream.requests == []


def test_preflight_without_cors_origins_is_403(proxy: SoakpProcess, fake_upstream: FakeUpstream) -> None:
    """A server started without --cors-origins lets no page call it."""
    response = preflight(proxy, CHAT, APP_ORIGIN, "authorization")
    assert response.status == 403 and response.header("access-control-allow-origin") is None
    assert fake_upstream.requests == []


def test_wildcard_cors_origins_allow_any_origin(soakp: Callable[..., SoakpProcess],
                                                fake_upstream: FakeUpstream) -> None:
    server = soakp(cors_origins="*")
    origin = "https://anything.example.org"
    assert preflight(server, CHAT, origin, "authorization").header("access-control-allow-origin") in (origin, "*")
    response = server.request("GET", "/v1/models", server.mint(), [("Origin", origin)])
    assert response.status == 200
    assert response.header("access-control-allow-origin") in (origin, "*")


# Forwarded responses ########################################################################################


def test_forwarded_json_and_stream_carry_cors_headers(server: SoakpProcess, fake_upstream: FakeUpstream) -> None:
    token = server.mint()
    models = server.request("GET", "/v1/models", token, [("Origin", APP_ORIGIN)])
    assert models.status == 200
    assert_cors(models, APP_ORIGIN)
    body = json.dumps({"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "c"}]})
    stream = server.request("POST", CHAT, token, [("Origin", DEV_ORIGIN), ("Content-Type", "application/json")],
                            body.encode())
    assert stream.status == 200 and b"data: [DONE]" in stream.body
    assert_cors(stream, DEV_ORIGIN)
    assert fake_upstream.requests[0].header("origin") == APP_ORIGIN  # forwarded unchanged


def test_upstream_cors_headers_are_replaced_by_soakps(server: SoakpProcess, fake_upstream: FakeUpstream) -> None:
    fake_upstream.script("/v1/fake/echo/cors", json_reply({"ok": True}, headers=[
        ("Access-Control-Allow-Origin", "*"), ("Access-Control-Expose-Headers", "x-other"),
        ("Access-Control-Allow-Credentials", "true"), ("x-request-id", "req_cors")]))
    response = server.request("GET", "/v1/fake/echo/cors", server.mint(), [("Origin", APP_ORIGIN)])
    assert response.status == 200
    assert_cors(response, APP_ORIGIN)
    assert response.header("access-control-allow-credentials") is None
    assert response.header("x-request-id") == "req_cors"


def test_a_disallowed_origin_gets_no_cors_headers(server: SoakpProcess, fake_upstream: FakeUpstream) -> None:
    """Without a preflight (which SOAKP refuses) a browser would not send this; if it arrives anyway, the
    answer lets no page read it."""
    response = server.request("GET", "/v1/models", server.mint(), [("Origin", "https://evil.example.com")])
    assert response.status == 200
    assert response.header("access-control-allow-origin") is None
    assert response.header("access-control-expose-headers") is None


def test_upstream_cors_headers_never_reach_a_disallowed_origin(server: SoakpProcess,
                                                               fake_upstream: FakeUpstream) -> None:
    """--cors-origins alone decides which pages may read answers: an upstream's own
    `Access-Control-Allow-Origin: *` must not open them to every origin."""
    fake_upstream.script("/v1/fake/echo/cors", json_reply({"ok": True}, headers=[
        ("Access-Control-Allow-Origin", "*"), ("Access-Control-Allow-Credentials", "true")]))
    token = server.mint()
    for headers in ([("Origin", "https://evil.example.com")], []):
        response = server.request("GET", "/v1/fake/echo/cors", token, headers)
        assert response.status == 200
        assert response.header("access-control-allow-origin") is None, headers


# SOAKP's own errors #########################################################################################


def refusal(kind: str, server: SoakpProcess) -> RawResponse:
    """One request SOAKP refuses itself, sent from APP_ORIGIN."""
    origin = [("Origin", APP_ORIGIN)]
    json_type = [("Content-Type", "application/json")]
    chat = json.dumps({"model": "gpt-4o", "messages": []}).encode()
    if kind == "no-token":
        return server.request("GET", "/v1/models", None, origin)
    if kind == "bad-token":
        return server.request("GET", "/v1/models", "not.a.token", origin)
    if kind == "path":
        return server.request("GET", "/v1/models", server.mint(paths=[CHAT]), origin)
    if kind == "token-origins":
        return server.request("GET", "/v1/models", server.mint(origins=[DEV_ORIGIN]), origin)
    if kind == "model":
        return server.request("POST", CHAT, server.mint(models=["gpt-4o-mini"]), origin + json_type, chat)
    if kind == "rpm":
        token = server.mint(rpm=1)
        assert server.request("GET", "/v1/models", token, origin).status == 200
        return server.request("GET", "/v1/models", token, origin)
    if kind == "refresh-no-token":
        return server.request("POST", "/jwt/refresh", None, origin)
    if kind == "unknown-path":
        return server.request("GET", "/v2/models", None, origin)
    raise AssertionError(kind)


@pytest.mark.parametrize("kind, status", [
    ("no-token", 401), ("bad-token", 401), ("path", 403), ("token-origins", 403), ("model", 403), ("rpm", 429),
    ("refresh-no-token", 401), ("unknown-path", 404),
])
def test_soakps_own_errors_carry_cors_headers(server: SoakpProcess, fake_upstream: FakeUpstream, kind: str,
                                             status: int) -> None:
    """A page can read why SOAKP refused it (and, for 429, the Retry-After)."""
    response = refusal(kind, server)
    assert response.status == status, response.body[:300]
    assert json.loads(response.body)["error"]["message"]
    assert_cors(response, APP_ORIGIN)
    if status == 429:
        assert response.header("retry-after") is not None
    assert len(fake_upstream.requests) == (1 if kind == "rpm" else 0)  # rpm: only the allowed first request
