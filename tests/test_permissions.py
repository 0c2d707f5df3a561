"""Permission claims (paths, models, rpm, origins) enforced by a running SOAKP before anything goes upstream.

Each refusal is checked three ways: the status and OpenAI's error shape (so the SDK raises its usual
exception), the error code, and that the fake upstream recorded nothing. Tokens come from
POST /jwt/generate on the session's shared SOAKP, and from `soakp mint` with the same flags.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import openai
import pytest

from conftest import basic_auth
from fake_upstream import FakeUpstream, RawResponse, build_request
from soakp import RateLimiter

if TYPE_CHECKING:
    from conftest import SecretsRegistry, SoakpProcess

APP_ORIGIN = "https://app.example.com"
CHAT = "/v1/chat/completions"
TRANSCRIPTIONS = "/v1/audio/transcriptions"


# Helpers ####################################################################################################


def token_claims(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


def error_of(response: RawResponse, status: int) -> dict[str, Any]:
    """Assert `status` with OpenAI's error shape; return the error object."""
    assert response.status == status, f"expected {status}, got {response.status}: {response.body[:300]!r}"
    assert "application/json" in (response.header("content-type") or "")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def chat_body(model: str, stream: bool = False) -> bytes:
    return json.dumps({"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]}).encode()


def post_json(server: SoakpProcess, path: str, token: str, body: bytes,
              headers: list[tuple[str, str]] | None = None) -> RawResponse:
    return server.request("POST", path, token, [("Content-Type", "application/json"), *(headers or [])], body)


def messages(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def multipart(boundary: str, fields: list[tuple[str, bytes, str | None]]) -> bytes:
    """A multipart/form-data body: (name, data, filename or None) per part, in order."""
    out = b""
    for name, data, filename in fields:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n".encode()
        out += b"Content-Type: audio/wav\r\n" if filename else b""
        out += b"\r\n" + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def cli_mint(soakp_cli: Callable[..., Any], secret: str, registry: SecretsRegistry, db: Path, *flags: str) -> str:
    result = soakp_cli("mint", "--secret", secret, "--db", str(db), "--key", registry.new_key(), *flags)
    assert result.returncode == 0, result.stderr
    return registry.add(result.stdout.strip().splitlines()[-1])


# paths ######################################################################################################

PATHS = ["/v1/chat/completions", "/v1/fake/echo/allowed/*", "/openai/embeddings"]


def test_paths_allow_exact_paths_prefixes_and_the_openai_alias(proxy: SoakpProcess,
                                                                fake_upstream: FakeUpstream) -> None:
    """A token limited to PATHS reaches each of them, by /v1/ or /openai/, and under a `*` prefix."""
    token = proxy.mint(paths=PATHS)
    assert token_claims(token)["paths"] == ["/v1/chat/completions", "/v1/fake/echo/allowed/*", "/v1/embeddings"]
    client = proxy.openai(token)
    assert client.chat.completions.create(model="gpt-fake-1", messages=messages("p")).choices[0].message.content
    assert client.embeddings.create(model="text-embedding-fake", input="x").data
    assert post_json(proxy, "/openai/chat/completions", token, chat_body("gpt-fake-1")).status == 200
    assert proxy.request("GET", "/v1/fake/echo/allowed/a/b?q=1", token).status == 200
    assert proxy.request("DELETE", "/openai/fake/echo/allowed/x", token).status == 200
    assert [r.target for r in fake_upstream.requests] == [
        CHAT, "/v1/embeddings", CHAT, "/v1/fake/echo/allowed/a/b?q=1", "/v1/fake/echo/allowed/x"]


@pytest.mark.parametrize("method, target", [
    ("GET", "/v1/models"),
    ("GET", "/openai/models"),
    ("POST", "/v1/chat/completions/extra"),
    ("POST", "/v1/chat"),
    ("GET", "/v1/fake/echo/allowed"),
    ("GET", "/v1/fake/echo/allowedX/y"),
    ("POST", "/v1/embeddings/x"),
    ("GET", "/v1/realtime?model=gpt-4o-realtime-preview"),
])
def test_paths_refuse_every_other_path_with_403(proxy: SoakpProcess, fake_upstream: FakeUpstream,
                                               method: str, target: str) -> None:
    token = proxy.mint(paths=PATHS)
    body = b"{}" if method == "POST" else None
    headers = [("Content-Type", "application/json")] if body else []
    error = error_of(proxy.request(method, target, token, headers, body), 403)
    assert (error["type"], error["code"]) == ("permission_error", "path_not_allowed")
    assert fake_upstream.requests == []


def test_paths_refusal_is_the_sdks_permission_denied_error(proxy: SoakpProcess, fake_upstream: FakeUpstream) -> None:
    client = proxy.openai(proxy.mint(paths=["/v1/chat/completions"]))
    with pytest.raises(openai.PermissionDeniedError) as caught:
        client.models.list()
    assert caught.value.status_code == 403 and caught.value.code == "path_not_allowed"
    assert fake_upstream.requests == []


# models #####################################################################################################


def test_models_chat_with_the_sdk(proxy: SoakpProcess, fake_upstream: FakeUpstream) -> None:
    """A token for gpt-4o-mini: chat (plain and streamed) with it works; with gpt-4o the SDK raises
    PermissionDeniedError (param "model") and nothing goes upstream; a request without a model
    (models.list) is not limited."""
    client = proxy.openai(proxy.mint(models=["gpt-4o-mini"]))
    reply = client.chat.completions.create(model="gpt-4o-mini", messages=messages("allowed"))
    assert reply.choices[0].message.content == "echo: allowed"
    stream = client.chat.completions.create(model="gpt-4o-mini", messages=messages("s"), stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "echo: s"
    assert client.models.list().data
    allowed = fake_upstream.requests
    for stream_it in (False, True):
        with pytest.raises(openai.PermissionDeniedError) as caught:
            client.chat.completions.create(model="gpt-4o", messages=messages("refused"), stream=stream_it)
        assert (caught.value.status_code, caught.value.code, caught.value.param) == (403, "model_not_allowed", "model")
    assert [r.json()["model"] for r in allowed if r.path == CHAT] == ["gpt-4o-mini", "gpt-4o-mini"]
    assert fake_upstream.requests == allowed


@pytest.mark.parametrize("audio_bytes", [8, 300_000], ids=["small", "streamed"])
def test_models_audio_transcription_upload_with_the_sdk(proxy: SoakpProcess, fake_upstream: FakeUpstream,
                                                        audio_bytes: int) -> None:
    """audio.transcriptions.create sends `model` as a multipart field: whisper-1 is allowed, another
    model is refused before any byte goes upstream, whether the body is read whole or streamed."""
    client = proxy.openai(proxy.mint(models=["whisper-1"]))
    audio = b"RIFF" + os.urandom(audio_bytes - 4)
    result = client.audio.transcriptions.create(model="whisper-1", file=("a.wav", audio, "audio/wav"))
    assert result.text == f"fake transcript of a.wav ({audio_bytes} bytes)"
    record = fake_upstream.wait_for_request(TRANSCRIPTIONS)
    assert record.multipart()["file"].data == audio
    with pytest.raises(openai.PermissionDeniedError) as caught:
        client.audio.transcriptions.create(model="gpt-4o-transcribe", file=("b.wav", audio, "audio/wav"))
    assert caught.value.code == "model_not_allowed"
    assert fake_upstream.requests == [record]


def test_models_do_not_limit_a_request_without_a_model(proxy: SoakpProcess, fake_upstream: FakeUpstream) -> None:
    """files.create is multipart without a `model` field: a models-limited token may upload."""
    token = proxy.mint(models=["gpt-4o-mini"])
    data = os.urandom(200_000)
    uploaded = proxy.openai(token).files.create(file=("t.jsonl", data, "application/jsonl"), purpose="batch")
    assert uploaded.bytes == len(data)
    assert proxy.request("POST", "/v1/fake/echo/x", token, [], b"").status == 200


@pytest.mark.parametrize("body", [
    b'{"model": "gpt-4o-mini", "model": "gpt-4o", "messages": []}',
    b'{"model": "gpt-4o", "model": "gpt-4o-mini", "messages": []}',
    b'{"mod\\u0065l": "gpt-4o", "model": "gpt-4o-mini", "messages": []}',
], ids=["allowed-first", "allowed-last", "escaped-key"])
def test_models_json_with_a_repeated_model_key_is_400(proxy: SoakpProcess, fake_upstream: FakeUpstream,
                                                     body: bytes) -> None:
    """Parsers disagree on which repeated key wins, so a body that names `model` twice is refused."""
    token = proxy.mint(models=["gpt-4o-mini"])
    error_of(post_json(proxy, CHAT, token, body), 400)
    assert fake_upstream.requests == []


def test_models_large_json_body_is_checked_whole(proxy: SoakpProcess, fake_upstream: FakeUpstream) -> None:
    """A 1 MB JSON body whose `model` comes last (after the point where bodies start to stream)."""
    token = proxy.mint(models=["gpt-4o-mini"])
    filler = "x" * 1_000_000

    def body(model: str) -> bytes:
        return json.dumps({"messages": [{"role": "user", "content": filler}], "model": model}).encode()

    error_of(post_json(proxy, CHAT, token, body("gpt-4o")), 403)
    assert fake_upstream.requests == []
    assert post_json(proxy, CHAT, token, body("gpt-4o-mini")).status == 200
    assert fake_upstream.wait_for_request(CHAT).body_length == len(body("gpt-4o-mini"))


def test_models_small_multipart_with_a_second_model_field_is_refused_whole(
    proxy: SoakpProcess, fake_upstream: FakeUpstream
) -> None:
    token = proxy.mint(models=["whisper-1"])
    boundary = "b0undary"
    body = multipart(boundary, [("model", b"whisper-1", None), ("file", b"RIFF1234", "a.wav"),
                                ("model", b"gpt-4o-transcribe", None)])
    headers = [("Content-Type", f"multipart/form-data; boundary={boundary}")]
    assert error_of(proxy.request("POST", TRANSCRIPTIONS, token, headers, body), 403)["code"] == "model_not_allowed"
    assert fake_upstream.requests == []


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_models_late_second_model_field_aborts_the_upstream_request_mid_body(
    proxy: SoakpProcess, fake_upstream: FakeUpstream, framing: str
) -> None:
    """An allowed `model`, a 2 MB file, then a second, refused `model`: the head and file have already
    streamed upstream, so SOAKP cuts that request short (the upstream never gets a complete request)
    and answers the client 403."""
    token = proxy.mint(models=["whisper-1"])
    boundary = "late-model-boundary"
    body = multipart(boundary, [("model", b"whisper-1", None), ("file", os.urandom(2 * 1024 * 1024), "a.wav"),
                                ("model", b"gpt-4o-transcribe", None)])
    headers = [("Authorization", f"Bearer {token}"), ("Content-Type", f"multipart/form-data; boundary={boundary}")]
    if framing == "chunked":
        headers.append(("Transfer-Encoding", "chunked"))
        pieces = [b"%x\r\n" % len(body[i:i + 65536]) + body[i:i + 65536] + b"\r\n" for i in range(0, len(body), 65536)]
        wire = build_request("POST", TRANSCRIPTIONS, headers) + b"".join(pieces) + b"0\r\n\r\n"
    else:
        wire = build_request("POST", TRANSCRIPTIONS, headers, body)
    error = error_of(proxy.raw(wire, "POST"), 403)
    assert error["code"] == "model_not_allowed"
    record = fake_upstream.wait_for_request(TRANSCRIPTIONS, complete=True)
    assert not record.complete and record.body_error is not None
    # SOAKP resets the upstream connection, and a reset discards what the upstream had not read yet, so
    # how much of the streamed part it saw depends on timing; that it never saw the whole body does not.
    assert record.body_length < len(body)


# rpm ########################################################################################################


def test_rpm_allows_n_requests_then_429_with_retry_after(proxy: SoakpProcess, fake_upstream: FakeUpstream) -> None:
    """rpm 3: three requests at once pass (a burst of one minute's allowance), the fourth is 429 with
    Retry-After (the SDK's RateLimitError) and never reaches the upstream. Limits are per token."""
    token, other = proxy.mint(rpm=3), proxy.mint(rpm=3)
    client = proxy.openai(token)
    for _ in range(3):
        assert client.models.list().data
    with pytest.raises(openai.RateLimitError) as caught:
        client.models.list()
    assert caught.value.code == "rate_limit_exceeded"
    assert 1 <= int(caught.value.response.headers["retry-after"]) <= 20  # one request frees up every 20 s
    response = proxy.request("GET", "/v1/models", token)
    assert error_of(response, 429)["type"] == "requests"  # as OpenAI types its own RPM errors
    assert response.header("retry-after") is not None
    assert len(fake_upstream.requests) == 3
    assert proxy.request("GET", "/v1/models", other).status == 200
    assert len(fake_upstream.requests) == 4


def test_rate_limiter_refills_one_request_per_interval() -> None:
    """RateLimiter with the clock passed in: rpm 6 is a burst of 6, then one more every 10 s; the wait it
    returns is what Retry-After rounds up; keys (jtis) do not share an allowance."""
    limiter = RateLimiter()
    t0 = 1_000.0
    assert [limiter.acquire("a", 6, t0) for _ in range(6)] == [0.0] * 6
    assert limiter.acquire("a", 6, t0) == pytest.approx(10.0)
    assert limiter.acquire("a", 6, t0 + 9.5) == pytest.approx(0.5)
    assert limiter.acquire("a", 6, t0 + 10.0) == 0.0
    assert limiter.acquire("a", 6, t0 + 10.0) > 0
    assert limiter.acquire("b", 6, t0 + 10.0) == 0.0
    assert [limiter.acquire("a", 6, t0 + 80.0) for _ in range(7)] == [0.0] * 6 + [pytest.approx(10.0)]


# origins ####################################################################################################


@pytest.mark.parametrize("origin, status", [
    (APP_ORIGIN, 200),
    (None, 200),
    ("https://evil.example.com", 403),
    ("http://app.example.com", 403),
    ("https://app.example.com.evil.test", 403),
    ("null", 403),
])
def test_origins(proxy: SoakpProcess, fake_upstream: FakeUpstream, origin: str | None, status: int) -> None:
    """A token for APP_ORIGIN: that Origin or none passes; any other Origin is 403 and goes nowhere."""
    token = proxy.mint(origins=[APP_ORIGIN])
    headers = [] if origin is None else [("Origin", origin)]
    response = proxy.request("GET", "/v1/models", token, headers)
    if status == 200:
        assert response.status == 200
        assert fake_upstream.wait_for_request("/v1/models").header("origin") == origin
    else:
        assert error_of(response, 403)["code"] == "origin_not_allowed"
        assert fake_upstream.requests == []


# Every claim at once, from /jwt/generate and from `soakp mint` ##############################################

BROWSER_CLAIMS = {"paths": ["/v1/chat/completions"], "models": ["gpt-4o-mini"], "rpm": 2, "origins": [APP_ORIGIN]}
MINT_FLAGS = ("--paths", "/v1/chat/completions", "--models", "gpt-4o-mini", "--rpm", "2", "--origins", APP_ORIGIN)


@pytest.mark.parametrize("source", ["generate", "cli"])
def test_a_token_with_every_claim(proxy: SoakpProcess, fake_upstream: FakeUpstream, soakp_cli: Callable[..., Any],
                                  secret: str, secrets_registry: SecretsRegistry, tmp_path: Path,
                                  source: str) -> None:
    """The browser token of the README: chat completions only, gpt-4o-mini only, 2 a minute, only
    from APP_ORIGIN; minted over HTTP or by `soakp mint --paths --models --rpm --origins`, it carries
    the same claims and is enforced the same way."""

    def mint() -> str:
        if source == "generate":
            return proxy.mint(**BROWSER_CLAIMS)
        return cli_mint(soakp_cli, secret, secrets_registry, tmp_path / "mint.db", *MINT_FLAGS)

    token = mint()
    assert {k: token_claims(token).get(k) for k in BROWSER_CLAIMS} == BROWSER_CLAIMS
    app = [("Origin", APP_ORIGIN)]
    assert error_of(proxy.request("GET", "/v1/models", token, app), 403)["code"] == "path_not_allowed"
    evil = [("Origin", "https://evil.example.com")]
    assert error_of(post_json(proxy, CHAT, token, chat_body("gpt-4o-mini"), evil), 403)["code"] == "origin_not_allowed"
    assert post_json(proxy, CHAT, token, chat_body("gpt-4o-mini"), app).status == 200
    assert post_json(proxy, CHAT, token, chat_body("gpt-4o-mini", stream=True)).status == 200
    limited = post_json(proxy, CHAT, token, chat_body("gpt-4o-mini"), app)
    assert error_of(limited, 429)["code"] == "rate_limit_exceeded" and limited.header("retry-after")
    assert len(fake_upstream.requests) == 2

    fresh = mint()  # the model check comes after the rpm one, so it gets a token of its own
    assert error_of(post_json(proxy, CHAT, fresh, chat_body("gpt-4o"), app), 403)["code"] == "model_not_allowed"
    assert len(fake_upstream.requests) == 2


@pytest.mark.parametrize("claim, value", [
    ("paths", ["v1/models"]), ("paths", "/v1/models"), ("paths", ["/v1/../jwt"]), ("models", []),
    ("rpm", 0), ("rpm", "20"), ("origins", ["app.example.com"]), ("origins", ["https://app.example.com/"]),
])
def test_generate_refuses_a_malformed_claim(proxy: SoakpProcess, fake_upstream: FakeUpstream,
                                            secrets_registry: SecretsRegistry, claim: str, value: Any) -> None:
    body = json.dumps({"key": secrets_registry.new_key(), claim: value}).encode()
    headers = [("Authorization", basic_auth(*proxy.admin)), ("Content-Type", "application/json")]
    error_of(proxy.request("POST", "/jwt/generate", headers=headers, body=body), 400)


@pytest.mark.parametrize("flags", [("--rpm", "many"), ("--paths", "models"), ("--origins", "app.example.com")])
def test_mint_refuses_a_malformed_claim_flag(soakp_cli: Callable[..., Any], secret: str,
                                             secrets_registry: SecretsRegistry, tmp_path: Path,
                                             flags: tuple[str, str]) -> None:
    key = secrets_registry.new_key()
    result = soakp_cli("mint", "--secret", secret, "--db", str(tmp_path / "x.db"), "--key", key, *flags)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
