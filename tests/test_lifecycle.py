"""Token lifecycle against a running SOAKP: the registry, revocation (HTTP and CLI), refresh, rotation
and the admin lockout.

Most tests share one SOAKP whose registry is a file in a temporary directory, so that `soakp revoke`
and `soakp tokens` can work on the same database while it runs. Tests that need other flags (another
secret) or that would lock the shared server's admin out start their own.
"""

from __future__ import annotations

import base64
import json
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import soakp

from conftest import admin_call, basic_auth, error_of, token_claims
from fake_upstream import FakeUpstream
from soakp import (
    ApiError,
    RequestHead,
    TokenRegistry,
    build_state,
    check_admin,
    derive_keys,
    load_config,
    parse_request_head,
)

if TYPE_CHECKING:
    from conftest import SecretsRegistry, SoakpLauncher, SoakpProcess

TOKEN_TTL_S = 3600
MAX_TOKEN_TTL_S = 7200
REVOKE_HONOURED_S = 2.0  # SPEC.md: a running server honours a `soakp revoke` within 2 seconds
POLL_PAUSE_S = 0.05
ROW_FIELDS = {"jti", "sub", "created_at", "expires_at", "revoked_at", "last_used_at", "requests"}


# Helpers ####################################################################################################


def b64url_json(part: str) -> dict[str, Any]:
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


def token_header(token: str) -> dict[str, Any]:
    return b64url_json(token.split(".")[0])


def listed_rows(server: SoakpProcess) -> dict[str, dict[str, Any]]:
    """GET /jwt, by jti."""
    response = admin_call(server, "GET", "/jwt")
    assert response.status == 200, response.body[:300]
    return {row["jti"]: row for row in response.json()["data"]}


def cli_token(result: Any, registry: SecretsRegistry) -> str:
    assert result.returncode == 0, result.stderr
    return registry.add(result.stdout.strip().splitlines()[-1])


def wait_for_status(server: SoakpProcess, token: str, status: int, within_s: float) -> float | None:
    """Poll GET /v1/models until it answers `status`; return the seconds it took, or None past within_s."""
    started = time.monotonic()
    for _ in range(int(within_s / POLL_PAUSE_S) + 2):
        if server.request("GET", "/v1/models", token).status == status:
            return time.monotonic() - started
        if time.monotonic() - started > within_s:
            return None
        time.sleep(POLL_PAUSE_S)  # a bounded poll: the server picks revocations up on its own clock
    return None


# The shared server ##########################################################################################


@pytest.fixture(scope="module")
def registry_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("lifecycle") / "soakp.db"


@pytest.fixture(scope="module")
def server(soakp_launcher: SoakpLauncher, registry_db: Path) -> Iterator[SoakpProcess]:
    """One SOAKP for this module: a file registry, 1 h default lifetime, 2 h cap."""
    process = soakp_launcher.start(db=str(registry_db), token_ttl=f"{TOKEN_TTL_S}s",
                                   max_token_ttl=f"{MAX_TOKEN_TTL_S}s")
    yield process
    process.stop()


@pytest.fixture
def live(server: SoakpProcess, fake_upstream: FakeUpstream) -> Iterator[SoakpProcess]:
    """The module's server, checked to be still running after the test."""
    yield server
    assert server.alive, f"soakp exited during the test:\n{server.log_text()[-3000:]}"


@pytest.fixture
def run_cli(soakp_cli: Callable[..., Any], secret: str, registry_db: Path) -> Callable[..., Any]:
    """`soakp COMMAND ...` on the shared server's database, with the session secret."""

    def run(*args: str) -> Any:
        return soakp_cli(*args, "--secret", secret, "--db", str(registry_db))

    return run


# 1. Registry ################################################################################################


def test_minting_registers_the_token_and_get_jwt_lists_it_without_key_or_token(
    live: SoakpProcess, fake_upstream: FakeUpstream, registry_db: Path
) -> None:
    """/jwt/generate writes a row (jti, sub, times, no use yet); requests count into it; neither GET /jwt
    nor any byte of the database file holds the key, the token or the sealed key."""
    before = int(time.time())
    minted = live.mint_data(sub="registry-test")
    row = listed_rows(live)[minted.jti]
    assert ROW_FIELDS <= set(row)
    assert row["sub"] == "registry-test"
    assert before <= row["created_at"] <= int(time.time())
    assert row["expires_at"] == minted.expires_at == row["created_at"] + TOKEN_TTL_S
    assert (row["revoked_at"], row["last_used_at"], row["requests"]) == (None, None, 0)

    for _ in range(2):
        assert live.request("GET", "/v1/models", minted.token).status == 200
    used = listed_rows(live)[minted.jti]
    assert used["requests"] == 2
    assert before <= used["last_used_at"] <= int(time.time())

    sealed = token_claims(minted.token)["ek"]
    listing = admin_call(live, "GET", "/jwt").body
    stored = b"".join(p.read_bytes() for p in registry_db.parent.glob(registry_db.name + "*"))
    dump = "\n".join(sqlite3.connect(registry_db).iterdump())
    for secret_value in (minted.key, minted.token, sealed):
        assert secret_value.encode() not in listing
        assert secret_value.encode() not in stored
        assert secret_value not in dump


def test_soakp_tokens_lists_the_same_rows_as_get_jwt(live: SoakpProcess, fake_upstream: FakeUpstream,
                                                     run_cli: Callable[..., Any]) -> None:
    """`soakp tokens` on the server's database prints one JSON object per token, the same metadata."""
    minted = live.mint_data(sub="cli-listing")
    result = run_cli("tokens")
    assert result.returncode == 0, result.stderr
    rows = {row["jti"]: row for row in map(json.loads, result.stdout.splitlines())}
    assert ROW_FIELDS <= set(rows[minted.jti])
    assert rows[minted.jti]["sub"] == "cli-listing"
    assert rows[minted.jti]["expires_at"] == minted.expires_at
    assert minted.key not in result.stdout and minted.token not in result.stdout


def test_registry_prunes_expired_rows_and_forgets_their_revocations(tmp_path: Path) -> None:
    """TokenRegistry.prune deletes the rows of expired tokens (revoked or not) and keeps live ones."""
    registry = TokenRegistry(str(tmp_path / "prune.db"))
    try:
        now = 1_800_000_000
        def chain(cid: str, renew_until: int) -> None:
            minted = soakp.MintedToken("", cid, renew_until, cid, renew_until)
            registry.register(minted, "s", "kid", now - 100, "{}")

        chain("expired", now - 1)
        chain("expires-now", now)
        chain("live", now + 100)
        registry.revoke_chain("expired-revoked", now - 10, now - 50)
        registry.revoke_chain("live-revoked", now + 10, now - 50)
        registry.revoke_token("refreshed-expired", "live", now - 5, now - 50)
        registry.revoke_token("refreshed-live", "live", now + 5, now - 50)
        assert registry.prune(now) == 3
        assert sorted(row["cid"] for row in registry.list()) == ["live", "live-revoked"]
        revocations = registry.revocations(now)
        assert revocations.chains == {"live-revoked": now + 10}
        assert revocations.tokens == {"refreshed-live": now + 5}
    finally:
        registry.close()


# 2. Revocation ##############################################################################################


def test_revoke_by_jti_over_http_refuses_the_next_request_on_the_same_connection(
    live: SoakpProcess, fake_upstream: FakeUpstream
) -> None:
    """POST /jwt/revoke {"jti"}: 200, and the token's next request is 401 even on a keep-alive
    connection it already used; the upstream saw only the request made before."""
    minted = live.mint_data()
    with live.connect() as conn:
        conn.send(f"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {minted.token}\r\n\r\n".encode())
        assert conn.read_response().status == 200
        revoked = admin_call(live, "POST", "/jwt/revoke", {"jti": minted.jti})
        assert revoked.status == 200, revoked.body
        body = revoked.json()
        assert body["data"]["cid"] == minted.jti  # a new token starts its chain: cid == jti
        assert abs(body["data"]["revoked_at"] - time.time()) < 5
        conn.send(f"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {minted.token}\r\n\r\n".encode())
        error = error_of(conn.read_response(), 401)
    assert "revoked" in error["message"]
    assert [r.path for r in fake_upstream.requests] == ["/v1/models"]
    assert listed_rows(live)[minted.jti]["revoked_at"] == body["data"]["revoked_at"]


def test_revoke_by_jwt_over_http(live: SoakpProcess, fake_upstream: FakeUpstream) -> None:
    """POST /jwt/revoke {"jwt"} revokes the token it carries; the answer names its jti, never the token."""
    minted = live.mint_data()
    response = admin_call(live, "POST", "/jwt/revoke", {"jwt": minted.token})
    assert response.status == 200, response.body
    assert response.json()["data"]["cid"] == minted.jti
    assert minted.token.encode() not in response.body
    error_of(live.request("GET", "/v1/models", minted.token), 401)
    error_of(live.request("POST", "/jwt/refresh", minted.token), 401)
    assert fake_upstream.requests == []


@pytest.mark.parametrize(
    "payload",
    [{}, {"jti": "a", "jwt": "b.c.d"}, {"jti": "not a jti!"}, {"jti": 7}, {"jwt": "not.a.token"}, {"jwt": 1},
     {"jti": "abc", "extra": 1}],
    ids=["empty", "both", "bad-jti", "jti-not-string", "bad-jwt", "jwt-not-string", "extra-field"],
)
def test_revoke_refuses_a_body_that_names_no_token(live: SoakpProcess, fake_upstream: FakeUpstream,
                                                   payload: dict[str, Any]) -> None:
    error_of(admin_call(live, "POST", "/jwt/revoke", payload), 400)


def test_cli_revoke_is_honoured_by_the_running_server_within_2s(
    live: SoakpProcess, fake_upstream: FakeUpstream, run_cli: Callable[..., Any]
) -> None:
    """`soakp revoke JTI` on the server's database while it runs: the cached token is 401 within 2 s
    (the server polls the database), and GET /jwt and `soakp tokens` show the revocation."""
    minted = live.mint_data()
    assert live.request("GET", "/v1/models", minted.token).status == 200  # verified and cached
    result = run_cli("revoke", minted.jti)
    assert result.returncode == 0, result.stderr
    revoked_at = json.loads(result.stdout)["revoked_at"]
    took_s = wait_for_status(live, minted.token, 401, REVOKE_HONOURED_S)
    assert took_s is not None, f"still accepted {REVOKE_HONOURED_S}s after `soakp revoke`"
    assert listed_rows(live)[minted.jti]["revoked_at"] == revoked_at
    listed = {row["jti"]: row for row in map(json.loads, run_cli("tokens").stdout.splitlines())}
    assert listed[minted.jti]["revoked_at"] == revoked_at


def test_cli_revoke_of_a_token_minted_elsewhere(live: SoakpProcess, fake_upstream: FakeUpstream,
                                                run_cli: Callable[..., Any], soakp_cli: Callable[..., Any],
                                                secret: str, secrets_registry: SecretsRegistry,
                                                tmp_path: Path) -> None:
    """A token minted by `soakp mint` on another machine (another database) is accepted by signature
    alone, and `soakp revoke` of its jti on the server's database still stops it within 2 s."""
    key = secrets_registry.new_key()
    token = cli_token(soakp_cli("mint", "--secret", secret, "--db", str(tmp_path / "elsewhere.db"), "--key", key),
                      secrets_registry)
    jti = token_claims(token)["jti"]
    assert live.request("GET", "/v1/models", token).status == 200
    assert fake_upstream.wait_for_request("/v1/models").header("authorization") == f"Bearer {key}"
    # This registry learns of the chain when the server records its first use; until then only the whole
    # token (which proves itself) could revoke it.
    deadline = time.monotonic() + REVOKE_HONOURED_S
    while jti not in listed_rows(live) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert run_cli("revoke", jti).returncode == 0
    assert wait_for_status(live, token, 401, REVOKE_HONOURED_S) is not None
    assert listed_rows(live)[jti]["revoked_at"] is not None


# 3. Refresh #################################################################################################


def test_refresh_returns_a_new_token_with_the_same_claims_and_revokes_the_old(
    live: SoakpProcess, fake_upstream: FakeUpstream, secret: str, secrets_registry: SecretsRegistry
) -> None:
    """POST /jwt/refresh with a valid token: 201 in /jwt/generate's shape, a token with every claim
    equal but jti, iat, exp and ek, signed with the current secret; the old token is then 401."""
    claims = {"sub": "refresh-me", "org": "org-r", "project": "proj-r", "ttl": "30m", "renew_ttl": "1h",
              "paths": ["/v1/models", "/v1/chat/*"], "models": ["gpt-4o-mini"], "rpm": 50,
              "origins": ["https://app.example.com"], "max_tokens_total": 100000}
    old = live.mint_data(**claims)
    assert live.request("GET", "/v1/models", old.token).status == 200
    before = int(time.time())
    response = live.request("POST", "/jwt/refresh", old.token)
    assert response.status == 201, response.body
    body = response.json()
    assert set(body) == {"status", "message", "data"} and (body["status"], body["message"]) == (201, "JWT added")
    assert set(body["data"]) == {"jwt", "jti", "expires_at"}
    new = secrets_registry.add(body["data"]["jwt"])

    old_claims, new_claims = token_claims(old.token), token_claims(new)
    assert new_claims["jti"] == body["data"]["jti"] != old.jti
    assert new_claims["exp"] == body["data"]["expires_at"]
    assert new_claims["exp"] - new_claims["iat"] == 1800 and new_claims["iat"] >= before
    unchanged = {k: v for k, v in old_claims.items() if k not in ("jti", "iat", "exp", "ek")}
    assert {k: v for k, v in new_claims.items() if k not in ("jti", "iat", "exp", "ek")} == unchanged
    assert token_header(new)["kid"] == derive_keys(secret).kid

    error_of(live.request("GET", "/v1/models", old.token), 401)
    error_of(live.request("POST", "/jwt/refresh", old.token), 401)
    assert live.request("GET", "/v1/models", new).status == 200
    first, second = fake_upstream.requests
    assert first.header("authorization") == second.header("authorization") == f"Bearer {old.key}"
    assert second.header("openai-organization") == "org-r"
    rows = listed_rows(live)  # one row per chain, naming its newest token
    assert old.jti not in rows
    chain = rows[new_claims["jti"]]
    assert chain["cid"] == old.jti == new_claims["cid"]
    assert chain["revoked_at"] is None and chain["sub"] == "refresh-me"


def test_refresh_lifetime_is_capped_by_max_token_ttl(live: SoakpProcess, fake_upstream: FakeUpstream,
                                                     soakp_cli: Callable[..., Any], secret: str,
                                                     secrets_registry: SecretsRegistry, tmp_path: Path) -> None:
    """A 1-day token minted elsewhere, refreshed by a server with --max-token-ttl 2h, lives 2 h."""
    token = cli_token(soakp_cli("mint", "--secret", secret, "--db", str(tmp_path / "long.db"),
                                "--key", secrets_registry.new_key(), "--ttl", "1d"), secrets_registry)
    response = live.request("POST", "/jwt/refresh", token)
    assert response.status == 201, response.body
    refreshed = token_claims(secrets_registry.add(response.json()["data"]["jwt"]))
    assert refreshed["exp"] - refreshed["iat"] == MAX_TOKEN_TTL_S


@pytest.mark.parametrize("authorization", [None, "Bearer not-a-token", "Basic YWRtaW46YWRtaW4="])
def test_refresh_needs_a_valid_token(live: SoakpProcess, fake_upstream: FakeUpstream,
                                     authorization: str | None) -> None:
    headers = [] if authorization is None else [("Authorization", authorization)]
    error_of(live.request("POST", "/jwt/refresh", headers=headers), 401)


# Refresh must not reset a token's limits. Known gaps in soakp.py, marked strict: once fixed, each of these
# passes, pytest reports it as a failure, and the mark comes off.


def test_refresh_does_not_reset_the_rpm_allowance(live: SoakpProcess, fake_upstream: FakeUpstream,
                                                  secrets_registry: SecretsRegistry) -> None:
    """rpm 2: two requests, then a refresh must not buy two more within the same minute."""
    old = live.mint(rpm=2)
    assert [live.request("GET", "/v1/models", old).status for _ in range(2)] == [200, 200]
    response = live.request("POST", "/jwt/refresh", old)
    if response.status == 201:
        new = secrets_registry.add(response.json()["data"]["jwt"])
        assert live.request("GET", "/v1/models", new).status == 429
    else:
        assert response.status == 429
    assert len(fake_upstream.requests) == 2


def test_refresh_does_not_reset_the_token_budget(live: SoakpProcess, fake_upstream: FakeUpstream,
                                                 secrets_registry: SecretsRegistry) -> None:
    """max_tokens_total 10: one chat (12 tokens of usage) spends it; the refreshed token has nothing left."""
    old = live.mint(max_tokens_total=10)
    body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]}).encode()
    headers = [("Content-Type", "application/json")]
    assert live.request("POST", "/v1/chat/completions", old, headers, body).status == 200
    assert error_of(live.request("POST", "/v1/chat/completions", old, headers, body), 429)
    response = live.request("POST", "/jwt/refresh", old)
    if response.status == 201:
        new = secrets_registry.add(response.json()["data"]["jwt"])
        assert live.request("POST", "/v1/chat/completions", new, headers, body).status == 429
    assert len(fake_upstream.requests) == 1


def test_refresh_from_an_origin_the_token_does_not_list_is_403(live: SoakpProcess, fake_upstream: FakeUpstream,
                                                               secrets_registry: SecretsRegistry) -> None:
    """SPEC.md: a request whose Origin is not in the token's `origins` gets 403; /jwt/refresh too."""
    token = live.mint(origins=["https://app.example.com"])
    response = live.request("POST", "/jwt/refresh", token, [("Origin", "https://evil.example.com")])
    if response.status == 201:
        secrets_registry.add(response.json()["data"]["jwt"])
    assert error_of(response, 403)["code"] == "origin_not_allowed"


# 4. Rotation ################################################################################################


def test_rotation_old_secrets_keep_old_tokens_working_and_new_tokens_use_the_new_secret(
    soakp: Callable[..., SoakpProcess], fake_upstream: FakeUpstream, secret: str, secrets_registry: SecretsRegistry
) -> None:
    """Mint under secret A; restart with secret B and --old-secrets A: the A token works (and refreshes
    into a B token), new tokens carry B's kid. Restart with B alone: the A token is 401, B's work."""
    secret_b = secrets_registry.add("rotated-master-secret-" + "b" * 24)
    kid_a, kid_b = derive_keys(secret).kid, derive_keys(secret_b).kid
    assert kid_a != kid_b

    server_a = soakp()
    old = server_a.mint_data()
    assert token_header(old.token)["kid"] == kid_a
    server_a.stop()

    server_b = soakp(secret=secret_b, old_secrets=secret)
    assert server_b.request("GET", "/v1/models", old.token).status == 200
    assert fake_upstream.wait_for_request("/v1/models").header("authorization") == f"Bearer {old.key}"
    new = server_b.mint_data()
    assert token_header(new.token)["kid"] == kid_b
    assert server_b.request("GET", "/v1/models", new.token).status == 200
    refreshed = server_b.request("POST", "/jwt/refresh", old.token)
    assert refreshed.status == 201, refreshed.body
    assert token_header(secrets_registry.add(refreshed.json()["data"]["jwt"]))["kid"] == kid_b
    server_b.stop()

    fake_upstream.reset()
    server_b_only = soakp(secret=secret_b)
    error = error_of(server_b_only.request("GET", "/v1/models", old.token), 401)
    assert "secret" in error["message"] and old.token not in error["message"]
    assert fake_upstream.requests == []
    assert server_b_only.request("GET", "/v1/models", new.token).status == 200


# 7. Admin lockout ###########################################################################################


def test_five_failed_admin_logins_lock_the_address_out_even_with_the_right_password(
    soakp: Callable[..., SoakpProcess], fake_upstream: FakeUpstream, admin: tuple[str, str]
) -> None:
    """Five wrong passwords from 127.0.0.1: each 401; then every admin endpoint answers 429 with
    Retry-After, even to the right password. Tokens keep working: the lockout is for admin only."""
    server = soakp()
    minted = server.mint_data()
    wrong = (admin[0], admin[1] + "-wrong")
    for attempt in range(5):
        response = admin_call(server, "GET", "/jwt", credentials=wrong)
        assert error_of(response, 401)["code"], f"attempt {attempt + 1}"
        assert response.header("www-authenticate") is not None
    for method, path, payload in (("GET", "/jwt", None), ("POST", "/jwt/generate", {"key": "sk-x"}),
                                  ("POST", "/jwt/revoke", {"jti": minted.jti}), ("GET", "/metrics", None)):
        response = admin_call(server, method, path, payload)
        assert error_of(response, 429)["code"] == "rate_limit_exceeded", path
        assert 0 < int(response.header("retry-after")) <= 60
    assert server.request("GET", "/v1/models", minted.token).status == 200
    assert server.request("POST", "/jwt/refresh", minted.token).status == 201


def test_admin_lockout_lasts_one_minute(secret: str, admin: tuple[str, str], tmp_path: Path) -> None:
    """check_admin with the clock passed in: locked for 60 s after the fifth failure, then open again;
    failures spread over more than a minute never lock."""
    config, _ = load_config(["serve", "--secret", secret, "--admin-user", admin[0], "--admin-pass", admin[1],
                                   "--db", str(tmp_path / "lockout.db")], {})
    state = build_state(config)

    def head(password: str) -> RequestHead:
        return parse_request_head(
            f"GET /jwt HTTP/1.1\r\nHost: x\r\nAuthorization: {basic_auth(admin[0], password)}\r\n\r\n".encode())

    def status(password: str, peer: str, now: float) -> int:
        try:
            check_admin(state, head(password), peer, now)
        except ApiError as exc:
            return exc.status
        return 200

    try:
        t0 = 1000.0
        assert [status("wrong-password", "10.0.0.1", t0 + i) for i in range(5)] == [401] * 5
        assert status(admin[1], "10.0.0.1", t0 + 5) == 429
        assert status(admin[1], "10.0.0.2", t0 + 5) == 200  # another address is not locked
        assert status(admin[1], "10.0.0.1", t0 + 4 + 59.5) == 429
        assert status(admin[1], "10.0.0.1", t0 + 4 + 60) == 200
        assert [status("wrong-password", "10.0.0.3", t0 + 20 * i) for i in range(8)] == [401] * 8
        assert status(admin[1], "10.0.0.3", t0 + 200) == 200
    finally:
        state.registry.close()
