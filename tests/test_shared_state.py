"""Issue 13, "Several instances as one": revocations, rpm, budgets, usage and admin lock-out shared
through Redis, with real processes: private redis-server instances (single and Cluster) on random
loopback ports, three SOAKP instances behind nginx (round robin, no retry on another instance) and
the fake upstream reporting usage. Each failure mode of SPEC.md "Shared state" has its test here."""

from __future__ import annotations

import concurrent.futures
import json
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from conftest import basic_auth
from fake_upstream import RecordedRequest, Responder, build_request, exchange
from redis_servers import Balancer, RedisServer, free_port, redis_cli, start_cluster
from usage_upstream import chat_completion, compact

if TYPE_CHECKING:
    from conftest import SoakpProcess
    from fake_upstream import FakeUpstream, RawResponse

pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None,
    reason="redis-server is installed by `make test` (TEST_PACKAGES)",
)

CHAT = "/v1/chat/completions"
MODEL = "gpt-fake-1"
JSON = [("Content-Type", "application/json")]
STORE_TIMEOUT_S = 0.3  # soakp.STORE_TIMEOUT_S: no request waits longer on Redis


# Helpers ##########################################################################################


def wait_until(predicate: Callable[[], bool], timeout_s: float, pause_s: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(pause_s)
    return predicate()


def admin_call(
    server: SoakpProcess,
    method: str,
    path: str,
    payload: Any = None,
    auth: tuple[str, str] | None = None,
) -> RawResponse:
    headers = [("Authorization", basic_auth(*(auth or server.admin)))]
    body = None
    if payload is not None:
        headers += JSON
        body = json.dumps(payload).encode()
    return server.request(method, path, headers=headers, body=body)


def chains(server: SoakpProcess) -> dict[str, dict[str, Any]]:
    response = admin_call(server, "GET", "/jwt")
    assert response.status == 200, response.body[:300]
    return {row["cid"]: row for row in response.json()["data"]}


def revoke(server: SoakpProcess, **target: str) -> RawResponse:
    return admin_call(server, "POST", "/jwt/revoke", target)


def models(server: SoakpProcess, token: str) -> int:
    return server.request("GET", "/v1/models", token).status


def chat_body(**fields: Any) -> bytes:
    return compact({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **fields})


def via(
    balancer: Balancer,
    method: str,
    target: str,
    token: str,
    body: bytes | None = None,
    timeout_s: float = 15.0,
) -> RawResponse:
    headers = [("Authorization", f"Bearer {token}"), *(JSON if body is not None else [])]
    data = build_request(method, target, headers, body, host=f"127.0.0.1:{balancer.port}")
    return exchange(balancer.port, data, method, timeout_s)


def usage_reply(
    prompt: int, completion_of: Callable[[dict[str, Any]], int], delay_s: float = 0.0
) -> Any:
    async def behaviour(request: RecordedRequest, responder: Responder) -> None:
        import asyncio

        if delay_s:
            await asyncio.sleep(delay_s)
        body = chat_completion(MODEL, prompt, completion_of(request.json()))
        await responder.reply(200, body, [("Content-Type", "application/json")])

    return behaviour


def health(server: SoakpProcess) -> dict[str, Any]:
    return server.request("GET", "/healthz").json()


def timed(call: Callable[[], Any]) -> tuple[Any, float]:
    started = time.monotonic()
    result = call()
    return result, time.monotonic() - started


# Fixtures #########################################################################################


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture
def instances(
    soakp: Callable[..., SoakpProcess], redis_server: RedisServer
) -> Callable[..., list[SoakpProcess]]:
    """instances(n, **options): n SOAKP processes sharing the test's Redis."""

    def start(
        n: int = 3, url: str | None = None, *extra: str, **options: str | None
    ) -> list[SoakpProcess]:
        return [soakp(*extra, redis=url or redis_server.url, **options) for _ in range(n)]

    return start


@pytest.fixture
def balanced(
    instances: Callable[..., list[SoakpProcess]], tmp_path: Path
) -> Iterator[tuple[Balancer, list[SoakpProcess]]]:
    servers = instances(3)
    balancer = Balancer(tmp_path / "nginx", [server.port for server in servers])
    yield balancer, servers
    balancer.stop()


# What is shared ###################################################################################


def test_rpm_across_three_instances_behind_a_balancer_holds_the_limit(
    balanced: tuple[Balancer, list[SoakpProcess]], fake_upstream: FakeUpstream
) -> None:
    """An rpm=6 token gets its burst of 6 in total over three instances, not 6 on each (18)."""
    balancer, servers = balanced
    token = servers[0].mint(rpm=6)
    statuses = [via(balancer, "GET", "/v1/models", token).status for _ in range(18)]
    assert statuses.count(200) == 6 and statuses.count(429) == 12, statuses
    refused = via(balancer, "GET", "/v1/models", token)
    assert refused.status == 429 and int(refused.header("retry-after")) >= 1


def test_a_budget_over_three_instances_stays_within_its_bound(
    balanced: tuple[Balancer, list[SoakpProcess]], fake_upstream: FakeUpstream
) -> None:
    """Budget 1,000 at 100 per answer (+10 prompt), 20 concurrent requests spread over the three: at
    most 1,000 + 20 x 10 is spent (the token-bounds bound), so at most 10 answers get through, and
    GET /jwt on any instance shows the same total."""
    balancer, servers = balanced
    fake_upstream.script(
        CHAT, usage_reply(10, lambda d: min(100, d["max_completion_tokens"]), delay_s=0.3)
    )
    minted = servers[0].mint_data(max_tokens_total=1000)
    def one(_: int) -> int:
        return via(balancer, "POST", CHAT, minted.token, chat_body(max_completion_tokens=100)).status

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        statuses = list(pool.map(one, range(20)))
    assert len(statuses) == 20 and set(statuses) <= {200, 429} and 200 in statuses, statuses

    def spent(server: SoakpProcess) -> int:
        row = chains(server).get(minted.jti, {})
        return row.get("prompt_tokens", 0) + row.get("completion_tokens", 0)

    ok = statuses.count(200)
    assert wait_until(lambda: all(spent(s) == 110 * ok for s in servers), 3), [
        spent(s) for s in servers
    ]
    assert 110 * ok <= 1000 + 20 * 10 and ok <= 10, statuses
    assert (
        via(balancer, "POST", CHAT, minted.token, chat_body(max_completion_tokens=100)).status
        == 429
    )


def test_a_revocation_sent_to_one_instance_is_refused_on_the_others_within_a_second(
    instances: Callable[..., list[SoakpProcess]], fake_upstream: FakeUpstream
) -> None:
    a, b, c = instances(3)
    minted = a.mint_data()
    assert {models(s, minted.token) for s in (a, b, c)} == {200}
    response, took_s = timed(lambda: revoke(a, jti=minted.jti))
    assert response.status == 200 and response.json()["data"]["cid"] == minted.jti
    started = time.monotonic()
    assert wait_until(
        lambda: models(b, minted.token) == 401 and models(c, minted.token) == 401, 1.0
    )
    assert time.monotonic() - started < 1.0
    # An instance that never saw the token finds it by id in Redis, and GET /jwt shows it revoked.
    other = b.mint_data()
    assert revoke(c, cid=other.jti).status == 200
    assert wait_until(lambda: models(a, other.token) == 401, 1.0)
    assert chains(a)[other.jti]["revoked_at"] is not None


def test_a_child_minted_on_one_instance_is_limited_and_revoked_on_another(
    instances: Callable[..., list[SoakpProcess]], fake_upstream: FakeUpstream
) -> None:
    """Issue 18 with several instances: the parent's rpm counts the child's requests on every
    instance, and revoking the parent on one instance revokes the child on the others."""
    a, b = instances(2)
    parent = a.mint(delegate=1, rpm=4)
    response = a.request("POST", "/jwt/delegate", parent, JSON, compact({"sub": "kid"}))
    assert response.status == 201, response.body[:300]
    child = response.json()["data"]["jwt"]
    a.registry.add(child)
    statuses = [
        models(server, tok)
        for server, tok in (
            (b, child),
            (a, child),
            (b, parent),
            (a, child),
            (b, child),
            (a, parent),
        )
    ]
    # Minting the child was the parent's first request; three more fill its rpm of 4, wherever they
    # land.
    assert statuses == [200, 200, 200, 429, 429, 429], statuses
    rows = chains(b)
    kid = next(row for row in rows.values() if row["sub"].endswith("/kid"))
    assert (
        kid["parent"] in rows
        and kid["requests"] >= 3
        or wait_until(lambda: chains(b)[kid["cid"]]["requests"] >= 3, 1.5)
    )
    assert revoke(b, jwt=parent).status == 200
    assert wait_until(lambda: models(a, child) == 401, 1.0)


def test_usage_and_metrics_show_every_instance(
    instances: Callable[..., list[SoakpProcess]],
    fake_upstream: FakeUpstream,
    soakp_cli: Any,
    redis_server: RedisServer,
    secret: str,
) -> None:
    fake_upstream.script(CHAT, usage_reply(7, lambda d: 3))
    a, b = instances(2)
    minted = a.mint_data(sub="shared-usage")
    for server in (a, b, b):
        assert server.request("POST", CHAT, minted.token, JSON, chat_body()).status == 200
    assert wait_until(lambda: chains(a).get(minted.jti, {}).get("requests") == 3, 1.5)
    row = chains(a)[minted.jti]
    assert (row["prompt_tokens"], row["completion_tokens"], row["sub"]) == (21, 9, "shared-usage")
    metrics = admin_call(b, "GET", "/metrics").body.decode()
    assert 'soakp_tokens_used_total{sub="shared-usage",kind="prompt"} 21' in metrics
    assert 'soakp_store_up{store="redis"} 1' in metrics
    listed = soakp_cli("tokens", "--redis", redis_server.url, "--secret", secret)
    assert listed.returncode == 0, listed.stderr
    rows = {json.loads(line)["cid"]: json.loads(line) for line in listed.stdout.splitlines()}
    assert rows[minted.jti]["requests"] == 3
    # `soakp revoke --redis URL` needs no instance and no database: every instance refuses within 1
    # s.
    revoked = soakp_cli("revoke", "--redis", redis_server.url, minted.jti)
    assert (
        revoked.returncode == 0 and json.loads(revoked.stdout)["cid"] == minted.jti
    ), revoked.stderr
    assert wait_until(
        lambda: models(a, minted.token) == 401 and models(b, minted.token) == 401, 1.0
    )
    unknown = soakp_cli("revoke", "--redis", redis_server.url, "A" * 22)
    assert unknown.returncode == 1 and "no token or chain" in unknown.stderr


def test_admin_lockout_counts_failures_on_every_instance(
    instances: Callable[..., list[SoakpProcess]], fake_upstream: FakeUpstream
) -> None:
    servers = instances(3)
    wrong = (servers[0].admin[0], "not-the-password")
    statuses = [admin_call(servers[i % 3], "GET", "/jwt", auth=wrong).status for i in range(5)]
    assert statuses == [401] * 5
    assert {admin_call(server, "GET", "/jwt").status for server in servers} == {429}


# When Redis fails #################################################################################


def test_a_chain_revoked_while_redis_is_paused_is_refused_everywhere_within_a_second_of_resuming(
    instances: Callable[..., list[SoakpProcess]],
    redis_server: RedisServer,
    fake_upstream: FakeUpstream,
) -> None:
    a, b, c = instances(3)
    minted = a.mint_data()
    budgeted = a.mint(max_tokens_total=1000)
    limited = a.mint(rpm=2)
    redis_server.pause()
    try:
        response, took_s = timed(lambda: revoke(a, jti=minted.jti))
        assert response.status == 503 and response.json()["error"]["code"] == "store_unavailable"
        assert took_s < 2 * STORE_TIMEOUT_S + 0.5
        assert models(a, minted.token) == 401  # revoked here at once
        # Each kind of state fails its documented way, and no request waits past the store timeout.
        for server in (b, c):
            status, took_s = timed(
                lambda: server.request("POST", CHAT, budgeted, JSON, chat_body()).status
            )
            assert status == 503 and took_s < STORE_TIMEOUT_S + 0.5
            status, took_s = timed(lambda: models(server, limited))
            assert status == 200 and took_s < STORE_TIMEOUT_S + 0.5  # rpm: per instance
            assert models(server, minted.token) == 200  # the last known set: not yet revoked there
        assert wait_until(lambda: health(b)["store"]["redis"] == "down", 2)
        assert health(b)["status"] == "degraded" and health(b)["store"]["budgets"] == "503"
        assert 'soakp_store_up{store="redis"} 0' in admin_call(b, "GET", "/metrics").body.decode()
    finally:
        redis_server.resume()
    resumed = time.monotonic()
    assert wait_until(
        lambda: models(b, minted.token) == 401 and models(c, minted.token) == 401, 1.5
    )
    assert time.monotonic() - resumed < 1.5  # the probe (0.25 s), the push and the version check
    assert wait_until(lambda: health(c)["store"]["redis"] == "up", 1.0)
    assert c.request("POST", CHAT, budgeted, JSON, chat_body()).status == 200
    assert (
        "Redis is unreachable" in a.log_text() and a.log_text().count("Redis is unreachable") == 1
    )


def test_revocations_older_than_stale_after_are_a_503_until_redis_returns(
    instances: Callable[..., list[SoakpProcess]],
    redis_server: RedisServer,
    fake_upstream: FakeUpstream,
) -> None:
    (a,) = instances(1, redis_stale_after="1s")
    token = a.mint()
    redis_server.pause()
    try:
        assert models(a, token) == 200
        assert wait_until(lambda: models(a, token) == 503, 2.5)
        response = a.request("GET", "/v1/models", token)
        assert response.json()["error"]["code"] == "store_unavailable"
        assert health(a)["store"]["revocations"] == "stale"
    finally:
        redis_server.resume()
    assert wait_until(lambda: models(a, token) == 200, 1.5)


def test_redis_stopped_and_restarted_empty_mid_load(
    instances: Callable[..., list[SoakpProcess]],
    redis_server: RedisServer,
    fake_upstream: FakeUpstream,
    soakp: Callable[..., SoakpProcess],
) -> None:
    """Stopped: budgets 503 at once (or per instance with --budget-fail-open), rpm per instance.
    Restarted empty: SOAKP recovers without a restart and sends back the revocations Redis lost, so
    an instance started afterwards refuses a chain revoked before."""
    a, b = instances(2)
    (opened,) = instances(1, None, "--budget-fail-open")
    revoked = a.mint_data()
    budgeted = a.mint(max_tokens_total=100_000)
    limited = a.mint(rpm=100_000)
    fake_upstream.script(CHAT, usage_reply(5, lambda d: 5))
    assert revoke(a, jti=revoked.jti).status == 200
    # The load: requests on b all along, each answered in its documented way within the store
    # timeout.
    seen: list[tuple[str, int, float]] = []
    stop = threading.Event()
    capped = chat_body(max_completion_tokens=10)  # no request holds the whole budget for itself

    def load() -> None:
        deadline = time.monotonic() + 20
        while not stop.is_set() and time.monotonic() < deadline and len(seen) < 2000:
            for kind, call in (
                ("rpm", lambda: models(b, limited)),
                ("budget", lambda: b.request("POST", CHAT, budgeted, JSON, capped).status),
            ):
                status, took_s = timed(call)
                seen.append((kind, status, took_s))

    loader = threading.Thread(target=load)
    loader.start()
    try:
        check_each_state(
            a,
            b,
            opened,
            late_instance=lambda: instances(1)[0],
            redis_server=redis_server,
            revoked=revoked,
            budgeted=budgeted,
            capped=capped,
        )
    finally:
        stop.set()
        loader.join(30)
    assert {status for kind, status, _ in seen if kind == "rpm"} == {200}  # per instance meanwhile
    assert {status for kind, status, _ in seen if kind == "budget"} == {200, 503}
    assert max(took_s for _, _, took_s in seen) < STORE_TIMEOUT_S + 0.5, max(
        seen, key=lambda x: x[2]
    )
    assert seen[-1][1] == 200  # recovered without a restart


def check_each_state(
    a: SoakpProcess,
    b: SoakpProcess,
    opened: SoakpProcess,
    late_instance: Callable[[], SoakpProcess],
    redis_server: RedisServer,
    revoked: Any,
    budgeted: str,
    capped: bytes,
) -> None:
    """Redis stopped (each state fails its documented way), then restarted empty (recovered)."""
    time.sleep(0.3)
    redis_server.stop()
    for server in (a, b):
        status, took_s = timed(lambda: server.request("POST", CHAT, budgeted, JSON, capped).status)
        assert status == 503 and took_s < STORE_TIMEOUT_S + 0.5
        assert models(server, revoked.token) == 401
    assert opened.request("POST", CHAT, budgeted, JSON, capped).status == 200
    assert health(opened)["store"]["budgets"] == "per-instance"
    redis_server.start()  # empty: no persistence
    assert wait_until(lambda: all(health(s)["store"]["redis"] == "up" for s in (a, b, opened)), 2)
    assert a.request("POST", CHAT, budgeted, JSON, capped).status == 200
    assert wait_until(lambda: redis_cli(redis_server.port, "ZCARD", "soakp:{rev}") == "1", 2)
    late = late_instance()
    assert wait_until(lambda: models(late, revoked.token) == 401, 1.0)


def test_a_reservation_whose_instance_died_is_freed_when_its_lease_ends(
    redis_server: RedisServer,
) -> None:
    """SOAKP's budget script on a real Redis: a reservation not renewed (its instance died) stops
    counting once its lease ends, on Redis's clock; one renewed in time goes on counting."""
    import redis

    import soakp

    client = redis.Redis(port=redis_server.port, decode_responses=True)
    keys = ["soakp:{c}:spent", "soakp:{c}:reserved", "soakp:{c}:leases", "soakp:{c}:rate"]
    far = int(time.time()) + 3600

    def budget(*args: Any) -> list[float]:  # "spent reserved granted seconds-to-wait"
        return [float(n) for n in client.eval(soakp.BUDGET_SCRIPT, len(keys), *keys, *args).split()]

    assert budget("reserve", 1000, 600, "dead", 1, far, 0)[2] == 600
    assert budget("reserve", 1000, 300, "alive", 3, far, 0)[2] == 300
    assert budget("reserve", 1000, 500, "refused", 1, far, 0)[2] == 100  # what is left
    budget("settle", 0, 0, "refused", 0, far)
    assert budget("check", 1000, 0, "", 0, 0)[:2] == [0, 900]
    time.sleep(1.5)
    budget("renew", 0, 0, "alive", 3, 0)
    assert budget("check", 1000, 0, "", 0, 0)[:2] == [0, 300]  # "dead" freed, "alive" kept
    budget("settle", 0, 250, "alive", 0, far)
    assert budget("check", 1000, 0, "", 0, 0)[:2] == [250, 0]
    client.close()


def test_the_stores_own_connections_recover_from_a_kill_a_script_flush_and_a_pause(
    redis_server: RedisServer,
) -> None:
    """Scripts go over SharedStore's own redis-py connections, not the client's pool. Connections
    Redis closed (a restart, CLIENT KILL) are replaced before use, scripts it forgot (SCRIPT FLUSH)
    are sent again, and a pause costs the call within the store timeout; each time the next call
    goes through."""
    import asyncio
    import types

    import soakp

    async def scenario() -> None:
        config = types.SimpleNamespace(redis_url=redis_server.url, redis_stale_after_s=60.0)
        store = await soakp.open_shared_store(config)  # type: ignore[arg-type]
        limits = [("c" * 22, 1000, 100)]  # (cid, budget, rpm)

        async def granted() -> int:
            return (await store.admit(limits, 10, int(time.time()) + 3600, time.time()))[1]

        try:
            assert await granted() == 10
            redis_cli(redis_server.port, "CLIENT", "KILL", "TYPE", "normal")
            await asyncio.sleep(0.1)  # the end of the connection reaches the event loop
            assert await granted() == 10 and store.up
            redis_cli(redis_server.port, "SCRIPT", "FLUSH")
            assert await granted() == 10 and store.up
            redis_server.pause()
            try:
                started = time.monotonic()
                with pytest.raises(soakp.StoreDown):
                    await granted()
                assert time.monotonic() - started < STORE_TIMEOUT_S + 0.2
            finally:
                redis_server.resume()
            store.up = True  # what the background probe does once Redis answers again
            assert await granted() == 10
            spent, reserved, _, _ = redis_cli(
                redis_server.port,
                "EVAL",
                soakp.BUDGET_SCRIPT,
                "4",
                *[*store.budget_keys(limits[0][0]), soakp.chain_key(limits[0][0], "rate")],
                "check",
                "1000",
                "0",
                "",
                "0",
                "0",
            ).split()
            # Four granted, and the paused call's: Redis ran it on resuming, after SOAKP had given
            # up; it holds its reservation until its lease ends.
            assert (spent, reserved) == ("0", "50")
        finally:
            await store.close()

    asyncio.run(scenario())


def test_scripts_are_packed_as_redis_py_packs_them() -> None:
    """SharedStore writes its commands itself (soakp.resp_command): byte for byte what redis-py's
    packer would have sent, for the strings and numbers the scripts take."""
    from redis.asyncio.connection import Connection

    import soakp

    args = ("EVALSHA", "f" * 40, 4, "soakp:{c}:spent", "reserve", 10**12, 0, -1, 1.5, "é", "")
    assert soakp.resp_command(*args) == b"".join(Connection().pack_command(*args))


# Connections: TLS with a verified certificate, a Unix socket, a password ##########################


def test_rediss_verifies_the_redis_servers_certificate(
    soakp: Callable[..., SoakpProcess], tmp_path: Path, test_ca: Any, fake_upstream: FakeUpstream
) -> None:
    """rediss:// with the CA that issued Redis's certificate shares state; with certifi's bundle,
    which does not know that CA, SOAKP does not talk to the server at all (budgets 503, as when it
    is down)."""
    cert, key = test_ca.issue("redis", directory=tmp_path)
    port = free_port()
    tls = RedisServer(
        tmp_path / "tls",
        port=free_port(),
        extra=(
            "--tls-port",
            str(port),
            "--port",
            "0",
            "--tls-cert-file",
            str(cert),
            "--tls-key-file",
            str(key),
            "--tls-ca-cert-file",
            str(test_ca.ca_path),
            "--tls-auth-clients",
            "no",
        ),
        cli=("--tls", "--cacert", str(test_ca.ca_path), "-h", "127.0.0.1", "-p", str(port)),
    ).start()
    try:
        trusted = soakp(redis=f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={test_ca.ca_path}")
        untrusted = soakp(redis=f"rediss://127.0.0.1:{port}/0")
        budgeted = trusted.mint(max_tokens_total=100)
        assert health(trusted)["store"]["redis"] == "up"
        assert trusted.request("GET", "/v1/models", budgeted).status == 200
        assert (
            "CERTIFICATE_VERIFY_FAILED" in untrusted.log_text()
            or "certificate verify failed" in untrusted.log_text().lower()
        )
        assert wait_until(lambda: health(untrusted)["store"]["redis"] == "down", 2)
        assert untrusted.request("GET", "/v1/models", budgeted).status == 503
    finally:
        tls.stop()


def test_a_unix_socket_with_a_password(
    soakp: Callable[..., SoakpProcess],
    tmp_path: Path,
    fake_upstream: FakeUpstream,
    secrets_registry: Any,
) -> None:
    password = secrets_registry.add("redis-pass-" + secrets.token_urlsafe(12))
    sock = tmp_path / "redis.sock"
    server = RedisServer(
        tmp_path / "unix",
        extra=("--unixsocket", str(sock), "--requirepass", password),
        cli=("-s", str(sock), "-a", password, "--no-auth-warning"),
    ).start()
    try:
        a, b = (soakp(redis=f"unix://:{password}@{sock}") for _ in range(2))
        wrong = soakp(redis=f"unix://:not-{password}@{sock}")
        limited = a.mint(rpm=2)
        assert [models(s, limited) for s in (a, b, a)] == [200, 200, 429]
        assert health(b)["store"]["redis"] == "up"
        assert wait_until(lambda: health(wrong)["store"]["redis"] == "down", 2)
        assert password not in a.log_text()
    finally:
        server.stop()


# Redis Cluster ####################################################################################


def test_the_core_holds_on_redis_cluster(
    instances: Callable[..., list[SoakpProcess]], tmp_path: Path, fake_upstream: FakeUpstream
) -> None:
    """Three cluster masters: every script touches one slot (hash tags), so rpm, budgets,
    revocation, delegation across slots and GET /jwt all work."""
    nodes = start_cluster(tmp_path / "cluster")
    try:
        a, b = instances(2, url=nodes[0].url)
        assert "sharing state through Redis Cluster" in a.log_text()
        limited = a.mint(rpm=3)
        assert [models(s, limited) for s in (a, b, a, b)] == [200, 200, 200, 429]
        parent = a.mint(delegate=1, max_tokens_total=300)
        response = a.request(
            "POST", "/jwt/delegate", parent, JSON, compact({"sub": "kid", "rpm": 50})
        )
        assert response.status == 201, response.body[:300]
        child = a.registry.add(response.json()["data"]["jwt"])
        fake_upstream.script(CHAT, usage_reply(10, lambda d: min(100, d["max_completion_tokens"])))
        statuses = [
            s.request("POST", CHAT, child, JSON, chat_body(max_completion_tokens=100)).status
            for s in (a, b, a, b)
        ]
        assert statuses == [
            200,
            200,
            200,
            429,
        ], statuses  # 110 + 110 + 90 (capped at 80) spends 310
        minted = b.mint_data()
        assert revoke(a, jti=minted.jti).status == 200
        assert wait_until(lambda: models(b, minted.token) == 401, 1.0)
        assert minted.jti in chains(b)
    finally:
        for node in nodes:
            node.stop()
