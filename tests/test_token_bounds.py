"""Issue 11, "Airtight token bounds": a leaked token dies at its expiry or when revoked, and until then
does only what its limits allow, whatever the client tries.

Each test names the attack it stops (items of the issue). They run against real SOAKP processes, the
fake upstream and, where it matters, raw sockets.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import socket
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jwt
import pytest
from conftest import admin_call, basic_auth, error_of
from conftest import token_claims as claims_of
from fake_upstream import Gate, RecordedRequest, Responder, build_request
from usage_upstream import Sent, chat_completion, chat_stream, compact

import soakp

if TYPE_CHECKING:
    from conftest import SecretsRegistry, SoakpProcess
    from fake_upstream import FakeUpstream

CHAT = "/v1/chat/completions"
MODEL = "gpt-fake-1"
JSON = [("Content-Type", "application/json")]


# Helpers ####################################################################################################


def chains(server: SoakpProcess) -> dict[str, dict[str, Any]]:
    """GET /jwt by chain id."""
    response = admin_call(server, "GET", "/jwt")
    assert response.status == 200, response.body[:300]
    return {row["cid"]: row for row in response.json()["data"]}


def refresh(server: SoakpProcess, token: str, registry: SecretsRegistry) -> tuple[int, str | None]:
    response = server.request("POST", "/jwt/refresh", token)
    if response.status != 201:
        return response.status, None
    return 201, registry.add(response.json()["data"]["jwt"])


def chat_body(**fields: Any) -> bytes:
    return compact({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **fields})


def wait_until(predicate: Callable[[], bool], timeout_s: float, pause_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(pause_s)
    return predicate()


def spent(server: SoakpProcess, cid: str) -> int:
    row = chains(server).get(cid)
    return 0 if row is None else row["prompt_tokens"] + row["completion_tokens"]


def usage_reply(prompt: int, completion_of: Callable[[dict[str, Any]], int], delay_s: float = 0.0,
                gate: Gate | None = None) -> Any:
    """A chat completion whose usage is `prompt` + completion_of(request JSON), after an optional pause."""

    async def behaviour(request: RecordedRequest, responder: Responder) -> None:
        import asyncio

        if delay_s:
            await asyncio.sleep(delay_s)
        if gate is not None:
            while not gate.is_open:
                await asyncio.sleep(0.01)
        document = request.json()
        body = chat_completion(MODEL, prompt, completion_of(document))
        await responder.reply(200, body, [("Content-Type", "application/json")])

    return behaviour


# Refresh chains (item 4) ####################################################################################


def test_refresh_never_reaches_past_the_chains_renew_until(
    soakp: Callable[..., SoakpProcess], fake_upstream: FakeUpstream, secrets_registry: SecretsRegistry
) -> None:
    """A 2 s token refreshed every 0.4 s used to live for ever. Now its chain ends at renew-until (3 s
    after minting): every refreshed token expires by then, and a refresh at or after it is a 401."""
    server = soakp()
    minted = server.mint_data(ttl="2s", renew_ttl="3s")
    first = claims_of(minted.token)
    assert first["cid"] == first["jti"] and first["rexp"] == first["iat"] + 3
    token, refused = minted.token, None
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline:
        time.sleep(0.4)
        status, new = refresh(server, token, secrets_registry)
        if status != 201:
            refused = status
            break
        claims = claims_of(new)
        assert claims["cid"] == first["cid"] and claims["rexp"] == first["rexp"]
        assert claims["exp"] <= first["rexp"]
        token = new
    assert refused == 401
    assert time.time() >= first["rexp"] - 1
    time.sleep(max(0.0, first["rexp"] + 0.2 - time.time()))
    error_of(server.request("GET", "/v1/models", token), 401)


def test_without_renew_ttl_a_chain_never_outlives_its_first_token(
    proxy: SoakpProcess, fake_upstream: FakeUpstream, secrets_registry: SecretsRegistry
) -> None:
    minted = proxy.mint_data(ttl="1h")
    status, new = refresh(proxy, minted.token, secrets_registry)
    assert status == 201
    assert claims_of(new)["exp"] <= claims_of(minted.token)["exp"] == claims_of(new)["rexp"]


@pytest.mark.parametrize("renew_ttl, status", [("30m", 400), ("400d", 400), ("x", 400), ("2h", 201)])
def test_renew_ttl_is_at_least_the_ttl_and_at_most_the_max(proxy: SoakpProcess, fake_upstream: FakeUpstream,
                                                           secrets_registry: SecretsRegistry, renew_ttl: str,
                                                           status: int) -> None:
    response = admin_call(proxy, "POST", "/jwt/generate",
                          {"key": secrets_registry.new_key(), "ttl": "1h", "renew_ttl": renew_ttl})
    assert response.status == status, response.body
    if status == 201:
        token = secrets_registry.add(response.json()["data"]["jwt"])
        claims = claims_of(token)
        assert claims["rexp"] - claims["iat"] == 7200 and claims["exp"] - claims["iat"] == 3600
    else:
        assert error_of(response, 400)["param"] == "renew_ttl"


@pytest.mark.parametrize("by", ["first-jti", "later-jti", "cid", "jwt"])
def test_revoking_any_token_of_a_chain_revokes_the_whole_chain(
    proxy: SoakpProcess, fake_upstream: FakeUpstream, secrets_registry: SecretsRegistry, by: str
) -> None:
    """Revoking the original jti used to leave the refreshed token working. Now any jti of the chain, its
    cid or any of its tokens revokes every token of it, past and future."""
    minted = proxy.mint_data(ttl="1h", renew_ttl="2h")
    _, second = refresh(proxy, minted.token, secrets_registry)
    _, third = refresh(proxy, second, secrets_registry)
    cid = claims_of(minted.token)["cid"]
    payload = {"first-jti": {"jti": minted.jti}, "later-jti": {"jti": claims_of(second)["jti"]},
               "cid": {"cid": cid}, "jwt": {"jwt": second}}[by]
    response = admin_call(proxy, "POST", "/jwt/revoke", payload)
    assert response.status == 200, response.body
    assert response.json()["data"]["cid"] == cid
    assert "revoked" in error_of(proxy.request("GET", "/v1/models", third), 401)["message"]
    error_of(proxy.request("POST", "/jwt/refresh", third), 401)
    assert chains(proxy)[cid]["revoked_at"] is not None
    assert fake_upstream.requests == []


@pytest.mark.parametrize("field", ["jti", "cid"])
def test_revoking_an_unknown_id_is_a_404(proxy: SoakpProcess, fake_upstream: FakeUpstream, field: str) -> None:
    error = error_of(admin_call(proxy, "POST", "/jwt/revoke", {field: "NoSuchTokenId0123456789"}), 404)
    assert error["param"] == field and "nothing was revoked" in error["message"]


def test_rpm_counts_refreshes(proxy: SoakpProcess, fake_upstream: FakeUpstream,
                              secrets_registry: SecretsRegistry) -> None:
    """3,000 refreshes of an rpm=1 token used to go through in 4 s. Now a refresh is a request: the first
    takes the minute's allowance, the next is a 429, and the refreshed token is limited too."""
    minted = proxy.mint_data(rpm=1, renew_ttl="2h", ttl="1h")
    status, new = refresh(proxy, minted.token, secrets_registry)
    assert status == 201
    error_of(proxy.request("POST", "/jwt/refresh", new), 429)
    error_of(proxy.request("GET", "/v1/models", new), 429)
    assert fake_upstream.requests == []


def test_a_token_issued_in_the_future_is_refused(proxy: SoakpProcess, fake_upstream: FakeUpstream,
                                                 secret: str, secrets_registry: SecretsRegistry) -> None:
    keys = soakp.derive_keys(secret)
    grant = soakp.Grant(key=secrets_registry.new_key(), ttl_s=3600)
    ahead = soakp.new_token(keys, grant, int(time.time()) + 120)
    secrets_registry.add(ahead.token)
    assert "future" in error_of(proxy.request("GET", "/v1/models", ahead.token), 401)["message"]
    near = soakp.new_token(keys, grant, int(time.time()) + 30)  # clocks a little apart still work
    assert proxy.request("GET", "/v1/models", secrets_registry.add(near.token)).status == 200


def test_a_token_minted_before_chains_is_its_own_chain(proxy: SoakpProcess, fake_upstream: FakeUpstream,
                                                       secret: str, secrets_registry: SecretsRegistry) -> None:
    """Tokens without cid/rexp (minted by the previous version) still work: cid = jti, rexp = exp."""
    keys = soakp.derive_keys(secret)
    now = int(time.time())
    key = secrets_registry.new_key()
    claims = {"iss": "soakp", "aud": "openai", "sub": "old", "iat": now, "exp": now + 600, "jti": "OldTokenJti0001",
              "ek": soakp.seal_key(key, "OldTokenJti0001", keys.sealing_key, os.urandom(12))}
    token = secrets_registry.add(jwt.encode(claims, keys.signing_key, algorithm="HS256", headers={"kid": keys.kid}))
    assert proxy.request("GET", "/v1/models", token).status == 200
    status, new = refresh(proxy, token, secrets_registry)
    assert status == 201
    assert claims_of(new)["cid"] == "OldTokenJti0001" and claims_of(new)["rexp"] == now + 600


# Budgets (item 5) ###########################################################################################


def test_budget_lowers_the_output_cap_to_what_is_left(proxy: SoakpProcess, fake_upstream: FakeUpstream) -> None:
    """SPEC.md, Limits: chat gets max_completion_tokens (never a second cap), Responses max_output_tokens,
    a cap above what is left is lowered, `n` choices share it."""
    fake_upstream.script(CHAT, usage_reply(10, lambda d: 5))
    token = proxy.mint(max_tokens_total=1000)
    assert proxy.request("POST", CHAT, token, JSON, chat_body()).status == 200
    assert fake_upstream.requests[-1].json()["max_completion_tokens"] == 1000
    assert proxy.request("POST", CHAT, token, JSON, chat_body(max_tokens=5000)).status == 200
    sent = fake_upstream.requests[-1].json()
    assert sent["max_tokens"] == 1000 - 15 and "max_completion_tokens" not in sent
    assert proxy.request("POST", CHAT, token, JSON, chat_body(max_completion_tokens=7, n=2)).status == 200
    assert fake_upstream.requests[-1].json()["max_completion_tokens"] == 7
    assert proxy.request("POST", CHAT, token, JSON, chat_body(n=4)).status == 200
    assert fake_upstream.requests[-1].json()["max_completion_tokens"] == (1000 - 45) // 4
    fake_upstream.script("/v1/responses", usage_reply(1, lambda d: 1))
    assert proxy.request("POST", "/v1/responses", token, JSON, compact({"model": MODEL, "input": "x"})).status == 200
    assert fake_upstream.requests[-1].json()["max_output_tokens"] == 1000 - 60


@pytest.mark.parametrize("path, body", [
    ("/v1/batches", {"input_file_id": "f", "endpoint": CHAT, "completion_window": "24h"}),
    ("/v1/fine_tuning/jobs", {"model": MODEL, "training_file": "f"}),
    ("/v1/responses", {"model": MODEL, "input": "x", "background": True}),
])
def test_budgeted_tokens_cannot_use_endpoints_whose_usage_is_not_reported(
    proxy: SoakpProcess, fake_upstream: FakeUpstream, path: str, body: dict[str, Any]
) -> None:
    token = proxy.mint(max_tokens_total=1000)
    assert error_of(proxy.request("POST", path, token, JSON, compact(body)), 403)["code"] == \
        "budget_unmetered_endpoint"
    assert fake_upstream.requests == []


def test_a_stream_the_client_leaves_before_its_usage_is_still_charged(
    proxy: SoakpProcess, fake_upstream: FakeUpstream
) -> None:
    """The client reads the first words and hangs up; SOAKP reads the rest of the answer from the
    upstream, charges its usage, and the next request is a 429."""
    sent, gate = Sent(), Gate()
    fake_upstream.script(CHAT, chat_stream(sent, 9, 4, gate=gate, hold_before=2))
    minted = proxy.mint_data(max_tokens_total=13)
    request = build_request("POST", CHAT, [("Authorization", f"Bearer {minted.token}"), *JSON],
                            chat_body(stream=True))
    with proxy.connect() as conn:
        conn.send(request)
        conn.read_until(lambda data: b'"content"' in data, timeout_s=10)
    gate.open()
    assert wait_until(lambda: spent(proxy, minted.jti) == 13, 5), chains(proxy).get(minted.jti)
    assert error_of(proxy.request("POST", CHAT, minted.token, JSON, chat_body()), 429)["code"] == \
        "insufficient_quota"


def test_a_client_that_leaves_before_a_whole_answer_is_still_charged(
    proxy: SoakpProcess, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.script(CHAT, usage_reply(30, lambda d: 20, delay_s=1.5))
    minted = proxy.mint_data(max_tokens_total=40)
    request = build_request("POST", CHAT, [("Authorization", f"Bearer {minted.token}"), *JSON], chat_body())
    with proxy.connect() as conn:
        conn.send(request)
        assert fake_upstream.wait_for_request(CHAT)
    assert wait_until(lambda: spent(proxy, minted.jti) == 50, 6)
    error_of(proxy.request("POST", CHAT, minted.token, JSON, chat_body()), 429)


def test_an_answer_in_flight_during_a_refresh_is_charged_to_the_chain(
    proxy: SoakpProcess, fake_upstream: FakeUpstream, secrets_registry: SecretsRegistry
) -> None:
    """It used to be charged to the old, revoked jti, so the refreshed token started afresh (4,000
    tokens spent on a 1,500 budget)."""
    gate = Gate()
    fake_upstream.script(CHAT, usage_reply(100, lambda d: 20, gate=gate), times=1)
    minted = proxy.mint_data(max_tokens_total=150, ttl="1h", renew_ttl="2h")
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(
        proxy.request("POST", CHAT, minted.token, JSON, chat_body()).status))
    thread.start()
    assert fake_upstream.wait_for_request(CHAT)
    status, new = refresh(proxy, minted.token, secrets_registry)
    assert status == 201
    gate.open()
    thread.join(10)
    assert result == [200]
    fake_upstream.script(CHAT, usage_reply(10, lambda d: d["max_completion_tokens"]))
    assert proxy.request("POST", CHAT, new, JSON, chat_body()).status == 200
    assert fake_upstream.requests[-1].json()["max_completion_tokens"] == 30
    error_of(proxy.request("POST", CHAT, new, JSON, chat_body()), 429)
    assert spent(proxy, minted.jti) == 120 + 40


def test_an_answer_without_usage_is_charged_a_conservative_estimate(
    proxy: SoakpProcess, fake_upstream: FakeUpstream
) -> None:
    """An upstream that reports no usage: the request is charged its body size as prompt tokens plus the
    output cap SOAKP set (README, Budgets)."""
    async def no_usage(request: RecordedRequest, responder: Responder) -> None:
        await responder.reply(200, b'{"id":"x","choices":[]}', JSON)

    fake_upstream.script(CHAT, no_usage)
    minted = proxy.mint_data(max_tokens_total=10_000)
    body = chat_body(max_tokens=50)
    assert proxy.request("POST", CHAT, minted.token, JSON, body).status == 200
    sent = len(fake_upstream.requests[-1].body)
    assert wait_until(lambda: spent(proxy, minted.jti) == sent + 50, 3), (spent(proxy, minted.jti), sent)


def test_concurrent_requests_overshoot_a_budget_by_at_most_their_prompts(
    proxy: SoakpProcess, fake_upstream: FakeUpstream
) -> None:
    """20 concurrent requests on a 1,000-token budget, each answered with as many completion tokens as
    its cap allows (the worst case) and 10 prompt tokens: what is spent stays within 1,000 + 20 x 10."""
    fake_upstream.script(CHAT, usage_reply(10, lambda d: d["max_completion_tokens"], delay_s=0.3))
    minted = proxy.mint_data(max_tokens_total=1000)
    def one(_: int) -> int:
        return proxy.request("POST", CHAT, minted.token, JSON, chat_body()).status

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        statuses = list(pool.map(one, range(20)))
    assert len(statuses) == 20 and set(statuses) <= {200, 429} and 200 in statuses
    assert wait_until(lambda: spent(proxy, minted.jti) > 0, 3)
    time.sleep(0.6)  # the last usage batch
    total = spent(proxy, minted.jti)
    assert total <= 1000 + 10 * statuses.count(200), (total, statuses)


def test_websocket_sessions_are_refused_to_budgeted_tokens(proxy: SoakpProcess, fake_upstream: FakeUpstream) -> None:
    token = proxy.mint(max_tokens_total=100)
    request = build_request("GET", "/v1/realtime?model=gpt-realtime", [
        ("Authorization", f"Bearer {token}"), ("Upgrade", "websocket"), ("Connection", "Upgrade"),
        ("Sec-WebSocket-Version", "13"), ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")])
    assert error_of(proxy.raw(request), 403)["code"] == "budget_unmetered_endpoint"


# The key never travels back (item 6) ########################################################################


def echo_headers(status: int) -> Any:
    """An upstream that sends back every request header it got, on any status."""

    async def behaviour(request: RecordedRequest, responder: Responder) -> None:
        echoed = [(f"x-echo-{name}", value) for name, value in request.headers]
        echoed += [(name, value) for name, value in request.headers if name.lower() == "sec-websocket-protocol"]
        await responder.reply(status, b'{"error":{"message":"no"}}', [*JSON, *echoed])

    return behaviour


@pytest.mark.parametrize("status", [200, 401, 403, 500])
def test_no_answer_header_carries_the_real_key(proxy: SoakpProcess, fake_upstream: FakeUpstream,
                                               status: int) -> None:
    fake_upstream.script("/v1/fake/echo-headers", echo_headers(status))
    minted = proxy.mint_data()
    response = proxy.request("GET", "/v1/fake/echo-headers", minted.token)
    assert response.status == status
    assert minted.key.encode() not in response.raw_head
    assert any(name.startswith("x-echo-") for name, _ in response.headers)  # the echo did reach SOAKP
    assert fake_upstream.requests[-1].header("authorization") == f"Bearer {minted.key}"


@pytest.mark.parametrize("auth", ["header", "subprotocol"])
def test_the_key_goes_into_the_upstream_subprotocol_only_when_the_client_sent_it_that_way(
    proxy: SoakpProcess, fake_upstream: FakeUpstream, auth: str
) -> None:
    """A client that authenticated with Authorization offered a key-shaped subprotocol too: SOAKP used to
    put the real key there, and an upstream echoing it on a 403 handed the key to the client."""
    fake_upstream.script("/v1/realtime", echo_headers(403))
    minted = proxy.mint_data()
    protocols = f"realtime, openai-insecure-api-key.{minted.token}"
    headers = [("Upgrade", "websocket"), ("Connection", "Upgrade"), ("Sec-WebSocket-Version", "13"),
               ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="), ("Sec-WebSocket-Protocol", protocols)]
    if auth == "header":
        headers.append(("Authorization", f"Bearer {minted.token}"))
    response = proxy.raw(build_request("GET", "/v1/realtime?model=gpt-realtime", headers))
    assert response.status == 403
    assert all(minted.key not in value and minted.token not in value for _, value in response.headers)
    upstream = fake_upstream.wait_for_request("/v1/realtime")
    offered = upstream.header("sec-websocket-protocol") or ""
    if auth == "header":
        assert minted.key not in offered and offered == "realtime"
    else:
        assert f"openai-insecure-api-key.{minted.key}" in offered


# Admin from a browser (item 7) ##############################################################################


def test_admin_endpoints_refuse_cross_site_requests(soakp: Callable[..., SoakpProcess],
                                                    fake_upstream: FakeUpstream,
                                                    secrets_registry: SecretsRegistry) -> None:
    """With Basic credentials a browser holds, `Origin: https://evil.example` + `text/plain` used to get
    201 from /jwt/generate. Now: another Origin is a 403, a non-JSON POST a 415, and admin answers never
    carry CORS headers, even for an origin --cors-origins lists."""
    server = soakp(cors_origins="https://evil.example")
    key = secrets_registry.new_key()
    evil = admin_call(server, "POST", "/jwt/generate", {"key": key}, headers=[("Origin", "https://evil.example")])
    assert error_of(evil, 403)["code"] == "origin_not_allowed"
    assert evil.header("access-control-allow-origin") is None
    plain = admin_call(server, "POST", "/jwt/generate", {"key": key}, headers=[("Content-Type", "text/plain")])
    assert error_of(plain, 415)["code"] == "unsupported_media_type"
    revoke = admin_call(server, "POST", "/jwt/revoke", {"cid": "x"}, headers=[("Content-Type", "text/plain;charset=UTF-8")])
    error_of(revoke, 415)
    listed = admin_call(server, "GET", "/jwt", headers=[("Origin", "https://evil.example")])
    assert listed.status == 403 and listed.header("access-control-allow-origin") is None
    own = admin_call(server, "GET", "/jwt", headers=[("Origin", f"http://127.0.0.1:{server.port}")])
    assert own.status == 200 and own.header("access-control-allow-origin") is None
    ok = admin_call(server, "POST", "/jwt/generate", {"key": key})
    assert ok.status == 201 and ok.header("access-control-allow-origin") is None
    secrets_registry.add(ok.json()["data"]["jwt"])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_admin_listen_serves_the_admin_endpoints_alone(soakp: Callable[..., SoakpProcess],
                                                       fake_upstream: FakeUpstream,
                                                       secrets_registry: SecretsRegistry) -> None:
    admin_port = free_port()
    server = soakp(admin_listen=f"127.0.0.1:{admin_port}")
    auth = [("Authorization", basic_auth(*server.admin)), *JSON]
    body = compact({"key": secrets_registry.new_key()})
    error_of(server.request("POST", "/jwt/generate", headers=auth, body=body), 404)
    error_of(server.request("GET", "/metrics", headers=auth), 404)
    with socket.create_connection(("127.0.0.1", admin_port), timeout=10) as sock:
        sock.sendall(build_request("POST", "/jwt/generate", [*auth, ("Host", f"127.0.0.1:{admin_port}")], body))
        data = b""
        while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
            piece = sock.recv(65536)
            if not piece:
                break
            data += piece
    assert data.startswith(b"HTTP/1.1 201"), data[:200]
    token = secrets_registry.add(json.loads(data.split(b"\r\n\r\n", 1)[1])["data"]["jwt"])
    assert server.request("GET", "/v1/models", token).status == 200
    assert server.request("GET", "/healthz").status == 200
    with socket.create_connection(("127.0.0.1", admin_port), timeout=10) as sock:
        sock.sendall(build_request("POST", "/jwt/refresh", [("Authorization", f"Bearer {token}")], b""))
        assert sock.recv(65536).startswith(b"HTTP/1.1 404")
    with socket.create_connection(("127.0.0.1", admin_port), timeout=10) as sock:
        sock.sendall(build_request("GET", "/v1/models", [("Authorization", f"Bearer {token}")]))
        assert sock.recv(65536).startswith(b"HTTP/1.1 404")
    assert [r.path for r in fake_upstream.requests] == ["/v1/models"]


# Limits: credential endpoints and path wildcards (items 3 and 8) ############################################


@pytest.mark.parametrize("path", ["/v1/realtime/client_secrets", "/v1/realtime/sessions",
                                  "/v1/realtime/transcription_sessions", "/v1/organization/admin_api_keys",
                                  "/openai/organization/projects"])
@pytest.mark.parametrize("paths", [None, ["/v1/*"], ["/v1/realtime*"], ["/v1/organization-x/*"]])
def test_credential_endpoints_are_closed_unless_named(proxy: SoakpProcess, fake_upstream: FakeUpstream,
                                                      path: str, paths: list[str] | None) -> None:
    token = proxy.mint(**({"paths": paths} if paths else {}))
    response = proxy.request("POST", path, token, JSON, compact({"session": {"model": MODEL}}))
    assert error_of(response, 403)["code"] in ("credential_endpoint", "path_not_allowed")
    assert fake_upstream.requests == []


@pytest.mark.parametrize("path, opener", [
    ("/v1/realtime/client_secrets", "/v1/realtime/client_secrets"),
    ("/v1/realtime/sessions", "/v1/realtime/sessions*"),
    ("/v1/organization/admin_api_keys", "/v1/organization/*"),
])
def test_credential_endpoints_open_to_tokens_whose_paths_name_them(
    proxy: SoakpProcess, fake_upstream: FakeUpstream, path: str, opener: str
) -> None:
    token = proxy.mint(paths=[opener, "/v1/models"])
    response = proxy.request("POST", path, token, JSON, compact({"session": {"model": MODEL}}))
    assert response.status != 403, response.body
    assert fake_upstream.requests[-1].path == path


@pytest.mark.parametrize("pattern, path, allowed", [
    ("/v1/models*", "/v1/models", True), ("/v1/models*", "/v1/models/gpt-4o", True),
    ("/v1/models*", "/v1/modelsX", False), ("/v1/models*", "/v1/models-evil/x", False),
    ("/v1/chat/*", "/v1/chat/completions", True), ("/v1/chat/*", "/v1/chat", False),
    ("/v1/*", "/v1/anything/at/all", True), ("/v1/files", "/v1/files/x", False),
])
def test_path_wildcards_match_at_a_segment_boundary(pattern: str, path: str, allowed: bool) -> None:
    assert soakp.path_allowed([pattern], path) is allowed


def test_path_wildcard_boundary_through_the_proxy(proxy: SoakpProcess, fake_upstream: FakeUpstream) -> None:
    token = proxy.mint(paths=["/v1/models*"])
    assert proxy.request("GET", "/v1/models", token).status == 200
    error_of(proxy.request("GET", "/v1/modelsX", token), 403)


# Methods (item 8) ###########################################################################################


@pytest.mark.parametrize("method", ["post", "Get", "PROPFIND", "TRACE", "LINK"])
def test_only_the_standard_methods_in_upper_case_are_forwarded(proxy: SoakpProcess, fake_upstream: FakeUpstream,
                                                               token: str, method: str) -> None:
    """A lowercase `post` used to be forwarded (and not metered). Now anything but GET, HEAD, POST, PUT,
    PATCH, DELETE and OPTIONS is a 501, before the token is even looked at."""
    response = proxy.raw(build_request(method, "/v1/chat/completions", [("Authorization", f"Bearer {token}"),
                                                                          *JSON], chat_body()))
    assert error_of(response, 501)["code"] == "method_not_supported"
    assert fake_upstream.requests == []


# Streams of a revoked chain end (item 8) ####################################################################


def test_an_open_stream_ends_when_its_chain_is_revoked(proxy: SoakpProcess, fake_upstream: FakeUpstream) -> None:
    sent, gate = Sent(), Gate()
    fake_upstream.script(CHAT, chat_stream(sent, 9, 4, gate=gate, hold_before=2))
    minted = proxy.mint_data()
    request = build_request("POST", CHAT, [("Authorization", f"Bearer {minted.token}"), *JSON],
                            chat_body(stream=True))
    try:
        with proxy.connect() as conn:
            conn.send(request)
            conn.read_until(lambda data: b'"content"' in data, timeout_s=10)
            started = time.monotonic()
            assert admin_call(proxy, "POST", "/jwt/revoke", {"cid": minted.jti}).status == 200
            assert conn.wait_closed(5)
            assert time.monotonic() - started < 2
    finally:
        gate.open()


# The database is private (item 8) ###########################################################################


def test_database_files_are_readable_by_their_owner_only(soakp: Callable[..., SoakpProcess],
                                                         fake_upstream: FakeUpstream, tmp_path: Path) -> None:
    db = tmp_path / "private.db"
    server = soakp(db=str(db))
    server.mint()
    wal_files = [db, Path(f"{db}-wal"), Path(f"{db}-shm")]
    assert wait_until(lambda: all(p.exists() for p in wal_files), 5)
    for path in wal_files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    server.stop()
    legacy = tmp_path / "legacy.db"
    legacy.touch(mode=0o644)
    os.chmod(legacy, 0o644)
    soakp(db=str(legacy)).mint()
    assert stat.S_IMODE(legacy.stat().st_mode) == 0o600


def test_a_version_1_database_is_migrated_to_chains(tmp_path: Path) -> None:
    """A database written by the previous version (one row per token) opens as chains, usage kept."""
    import sqlite3

    path = tmp_path / "v1.db"
    db = sqlite3.connect(path)
    db.executescript("""CREATE TABLE tokens (jti TEXT PRIMARY KEY, sub TEXT, kid TEXT, created_at INTEGER,
        expires_at INTEGER NOT NULL, revoked_at INTEGER, last_used_at INTEGER, requests INTEGER NOT NULL DEFAULT 0,
        prompt_tokens INTEGER NOT NULL DEFAULT 0, completion_tokens INTEGER NOT NULL DEFAULT 0,
        errors INTEGER NOT NULL DEFAULT 0)""")
    now = int(time.time())
    db.execute("INSERT INTO tokens VALUES ('JtiOne', 'laptop', 'k', ?, ?, NULL, ?, 3, 10, 5, 0)",
               (now, now + 60, now))
    db.execute("INSERT INTO tokens VALUES ('JtiTwo', 'phone', 'k', ?, ?, ?, NULL, 0, 0, 0, 0)", (now, now + 60, now))
    db.commit()
    db.close()
    registry = soakp.TokenRegistry(str(path))
    try:
        rows = {row["cid"]: row for row in registry.list()}
        assert rows["JtiOne"]["prompt_tokens"] == 10 and rows["JtiOne"]["requests"] == 3
        assert rows["JtiOne"]["renew_until"] == now + 60
        assert registry.revocations(now).chains == {"JtiTwo": now + 60}
        assert registry.spent(now) == {"JtiOne": 15}
        assert registry.chain_of("JtiOne") == ("JtiOne", now + 60)
    finally:
        registry.close()
    registry = soakp.TokenRegistry(str(path))  # a second open migrates nothing again
    registry.close()


def test_get_jwt_lists_one_row_per_chain_with_its_limits(proxy: SoakpProcess, fake_upstream: FakeUpstream,
                                                         secrets_registry: SecretsRegistry) -> None:
    minted = proxy.mint_data(sub="limited", ttl="1h", renew_ttl="2h", paths=["/v1/models"], models=["m"],
                             rpm=60, origins=["https://app.example.com"], max_tokens_total=500, org="org-1")
    _, new = refresh(proxy, minted.token, secrets_registry)
    row = chains(proxy)[minted.jti]
    assert row["jti"] == claims_of(new)["jti"] and row["expires_at"] == claims_of(new)["exp"]
    assert row["renew_until"] == claims_of(minted.token)["rexp"]
    assert (row["paths"], row["models"], row["rpm"], row["origins"], row["max_tokens_total"], row["org"],
            row["project"]) == (["/v1/models"], ["m"], 60, ["https://app.example.com"], 500, "org-1", None)
    assert {"cid", "jti", "sub", "created_at", "expires_at", "renew_until", "revoked_at", "last_used_at",
            "requests", "prompt_tokens", "completion_tokens", "errors"} <= set(row)
    text = json.dumps(chains(proxy))
    assert minted.key not in text and minted.token not in text and new not in text


def test_cli_revoke_of_an_unknown_id_exits_1(soakp_cli: Callable[..., Any], tmp_path: Path,
                                             secret: str) -> None:
    db = tmp_path / "cli.db"
    soakp.TokenRegistry(str(db)).close()
    result = soakp_cli("revoke", "NoSuchJti0123", "--db", str(db), "--secret", secret)
    assert result.returncode == 1 and "NoSuchJti0123" in result.stderr and "nothing was revoked" in result.stderr


def test_model_refused_requests_do_not_use_the_rpm_allowance(proxy: SoakpProcess, fake_upstream: FakeUpstream) -> None:
    """Issue 15 item 7: a request refused for its model, path or origin used to consume rpm (model) or
    not (path, origin); now only requests that pass every check count."""
    token = proxy.mint(rpm=1, models=[MODEL])
    for _ in range(3):
        error_of(proxy.request("POST", CHAT, token, JSON, compact({"model": "other", "messages": []})), 403)
    fake_upstream.script(CHAT, usage_reply(1, lambda d: 1))
    assert proxy.request("POST", CHAT, token, JSON, chat_body()).status == 200
    error_of(proxy.request("POST", CHAT, token, JSON, chat_body()), 429)



def test_the_console_answers_at_admin_slash_as_spec_names_it(proxy: SoakpProcess, fake_upstream: FakeUpstream) -> None:
    """SPEC.md lists `/admin/`; the console's page is served there and at `/admin`, behind the login."""
    for path in ("/admin/", "/admin"):
        page = admin_call(proxy, "GET", path)
        assert page.status == 200 and page.header("content-type").startswith("text/html"), path
        assert "script-src 'self'" in page.header("content-security-policy")
        assert proxy.request("GET", path).status == 401
    assert proxy.request("GET", "/v1/models/").status == 400  # no other path may end in a slash


def test_requests_without_credentials_do_not_lock_the_admin_out(soakp: Callable[..., SoakpProcess],
                                                                 fake_upstream: FakeUpstream) -> None:
    """A browser asks without credentials first, once per endpoint: that is no failed login."""
    server = soakp()
    for _ in range(8):
        response = server.request("GET", "/jwt")
        assert response.status == 401 and response.header("www-authenticate") is not None
    assert admin_call(server, "GET", "/jwt").status == 200


@pytest.mark.parametrize("body, expected", [
    (b'{"model":"m","max_tokens":5000,"messages":[]}', b'{"model":"m","max_tokens":1000,"messages":[]}'),
    (b'{ "model" : "m" ,\n "messages": [] }', b'{"max_completion_tokens":1000, "model" : "m" ,\n "messages": [] }'),
    (b'{}', b'{"max_completion_tokens":1000}'),
    (b'{"max_tokens":10,"stream":true}',
     b'{"stream_options":{"include_usage":true},"max_tokens":10,"stream":true}'),
])
def test_a_budgeted_body_keeps_every_byte_it_does_not_change(body: bytes, expected: bytes) -> None:
    fields = soakp.json_fields(body, soakp.BUDGET_FIELDS)
    plan = soakp.plan_budget(fields.values, CHAT, 1000)
    assert fields.splice(plan.changes) == expected


@pytest.mark.parametrize("body", [b'{"max_tokens":1,"max_tokens":900000}', b'[]', b'{"max_tokens":1}x',
                                  b'{"max_tokens":' + b'9' * 20000 + b'}', b'{"n":0}', b'{"max_tokens":"5"}'])
def test_a_budgeted_body_soakp_cannot_read_with_certainty_is_a_400(body: bytes) -> None:
    with pytest.raises(soakp.ApiError) as info:
        fields = soakp.json_fields(body, soakp.BUDGET_FIELDS)
        soakp.plan_budget(fields.values, CHAT, 1000)
    assert info.value.status == 400


def test_cli_revoke_takes_an_id_that_starts_with_a_dash(soakp_cli: Callable[..., Any], tmp_path: Path,
                                                         secret: str, secrets_registry: SecretsRegistry) -> None:
    """A jti is base64url: one in 32 starts with "-", which argparse read as an unknown option (exit 2;
    tests/test_lifecycle.py failed that way now and then)."""
    db = tmp_path / "dash.db"
    registry = soakp.TokenRegistry(str(db))
    minted = soakp.MintedToken("", "-DashFirstJti0123456789", 2_000_000_000, "-DashFirstJti0123456789",
                               2_000_000_000)
    registry.register(minted, "s", "kid", 1_800_000_000, "{}")
    registry.close()
    result = soakp_cli("revoke", "-DashFirstJti0123456789", "--db", str(db))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["cid"] == "-DashFirstJti0123456789"
