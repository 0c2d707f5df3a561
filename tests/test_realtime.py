"""The Realtime API through SOAKP: a real WebSocket client (`websockets`) -> SOAKP -> fake Realtime upstream.

Covers both ways of passing the token (Authorization header for servers, the subprotocol
`openai-insecure-api-key.<token>` for browsers), the key swap in both places, frames and close codes
both ways, permission and revocation checks before anything reaches the upstream, refusals and
failures of the upstream, and the tunnel's idle limit. Every wait is bounded.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest
from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.sync.client import ClientConnection, connect
from websockets.uri import parse_uri

from conftest import basic_auth
from fake_realtime import KEY_PROTOCOL, FakeRealtime
from fake_upstream import FakeUpstream, RawConnection, build_request, openai_error, stall

if TYPE_CHECKING:
    from conftest import Minted, SoakpProcess

MODEL_QUERY = "/v1/realtime?model=gpt-realtime"
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
WAIT_S = 10.0
BROWSER_ORIGIN = "http://app.example"


# Helpers ####################################################################################################


def ws_url(server: SoakpProcess, path: str = MODEL_QUERY) -> str:
    return "ws" + server.url[len("http"):] + path


def open_ws(
    server: SoakpProcess,
    path: str = MODEL_QUERY,
    token: str | None = None,
    protocols: list[str] | None = None,
    origin: str | None = None,
    headers: list[tuple[str, str]] | None = None,
) -> ClientConnection:
    """A WebSocket through SOAKP: `token` goes in Authorization; `protocols` are offered as given."""
    all_headers = list(headers or [])
    if token is not None:
        all_headers.append(("Authorization", f"Bearer {token}"))
    return connect(
        ws_url(server, path),
        ssl=server.ssl_context(),
        additional_headers=all_headers or None,
        subprotocols=protocols,  # type: ignore[arg-type]
        origin=origin,  # type: ignore[arg-type]
        proxy=None,
        open_timeout=WAIT_S,
        close_timeout=5,
        ping_interval=None,
        max_size=MAX_MESSAGE_BYTES,
    )


def browser_protocols(token: str) -> list[str]:
    """What a browser offers: `new WebSocket(url, ["realtime", "openai-insecure-api-key." + token])`."""
    return ["realtime", KEY_PROTOCOL + token]


def refused(server: SoakpProcess, **kwargs: Any) -> Response:
    """Open a WebSocket that SOAKP must refuse; return the HTTP answer it gave instead of a 101."""
    with pytest.raises(InvalidStatus) as info:
        open_ws(server, **kwargs).close()
    return info.value.response


def error_of(response: Response, status: int) -> dict[str, Any]:
    """Assert an OpenAI-shaped JSON error with `status`; return its `error` object."""
    assert response.status_code == status, (response.status_code, response.body[:300])
    assert "application/json" in response.headers.get("Content-Type", "")
    error = json.loads(response.body)["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert error["param"] in (None, "model")
    return error


def session_created(ws: ClientConnection) -> dict[str, Any]:
    event = json.loads(ws.recv(timeout=WAIT_S))
    assert event["type"] == "session.created", event
    return event


def closed_by_peer(ws: ClientConnection, timeout_s: float = WAIT_S) -> ConnectionClosed:
    """Read until the connection ends (bounded); return how it ended."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"the WebSocket was still open after {timeout_s}s")
        try:
            ws.recv(timeout=left)
        except ConnectionClosed as exc:
            return exc
        except TimeoutError:
            continue


def assert_no_credentials_sent_back(response: Response, *secrets: str) -> None:
    for name, value in response.headers.raw_items():
        for secret in secrets:
            assert secret not in value, f"{name} carries a credential"
    for secret in secrets:
        assert secret not in (response.body or b"").decode("latin-1")


def assert_nothing_reached(upstream: FakeUpstream, realtime: FakeRealtime, connections_before: int) -> None:
    assert upstream.requests == [], [(r.method, r.target) for r in upstream.requests]
    assert realtime.sessions == []
    assert upstream.connections_accepted == connections_before, "SOAKP connected to the upstream"


def revoke(server: SoakpProcess, jti: str) -> None:
    response = server.request(
        "POST", "/jwt/revoke",
        headers=[("Authorization", basic_auth(*server.admin)), ("Content-Type", "application/json")],
        body=json.dumps({"jti": jti}).encode(),
    )
    assert response.status == 200, response.body


def metric(server: SoakpProcess, name: str) -> float:
    response = server.request("GET", "/metrics", headers=[("Authorization", basic_auth(*server.admin))])
    assert response.status == 200
    for line in response.body.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def wait_for(predicate: Callable[[], bool], timeout_s: float = WAIT_S) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.fixture
def realtime(fake_upstream: FakeUpstream) -> Iterator[FakeRealtime]:
    """The fake Realtime route on the session's fake upstream, fresh for each test."""
    yield FakeRealtime().install(fake_upstream)


# Handshake: both ways of passing the token, the key swapped in ##############################################


def test_authorization_header_handshake_swaps_in_the_key(
    proxy: SoakpProcess, minted: Minted, realtime: FakeRealtime, fake_upstream: FakeUpstream
) -> None:
    with open_ws(proxy, token=minted.token) as ws:
        event = session_created(ws)
        assert event["session"]["model"] == "gpt-realtime"
        ws.send("hello")
        assert ws.recv(timeout=WAIT_S) == "hello"
        assert ws.subprotocol is None
        assert_no_credentials_sent_back(ws.response, minted.token, minted.key)
    session = realtime.wait_for_session()
    assert session.request.method == "GET"
    assert session.request.target == MODEL_QUERY
    assert session.header_all("authorization") == [f"Bearer {minted.key}"]
    assert session.header("host") == fake_upstream.url.removeprefix("https://")
    assert session.header("upgrade") == "websocket"
    assert session.header_all("sec-websocket-protocol") == []
    raw_head = session.request.raw_head.decode("latin-1")
    assert minted.token not in raw_head and minted.token.split(".")[2] not in raw_head


def test_browser_subprotocol_handshake_swaps_in_the_key(
    proxy: SoakpProcess, minted: Minted, realtime: FakeRealtime
) -> None:
    """The browser form: no Authorization header, the token in the subprotocol list."""
    with open_ws(proxy, protocols=browser_protocols(minted.token), origin=BROWSER_ORIGIN) as ws:
        session_created(ws)
        ws.send("from the browser")
        assert ws.recv(timeout=WAIT_S) == "from the browser"
        assert ws.subprotocol == "realtime"
        assert ws.response.headers.get_all("Sec-WebSocket-Protocol") == ["realtime"]
        assert_no_credentials_sent_back(ws.response, minted.token, minted.key)
    session = realtime.wait_for_session()
    assert session.offered == ["realtime", KEY_PROTOCOL + minted.key]
    assert session.subprotocol == "realtime"
    assert session.header_all("authorization") == [f"Bearer {minted.key}"]
    assert session.header("origin") == BROWSER_ORIGIN
    raw_head = session.request.raw_head.decode("latin-1")
    assert minted.token not in raw_head and minted.token.split(".")[2] not in raw_head


def test_openai_alias_and_query_are_kept(proxy: SoakpProcess, token: str, realtime: FakeRealtime) -> None:
    with open_ws(proxy, "/openai/realtime?model=gpt-realtime&voice=marin&x=a%20b", token=token) as ws:
        session_created(ws)
    assert realtime.wait_for_session().request.target == "/v1/realtime?model=gpt-realtime&voice=marin&x=a%20b"


def test_wss_listener(soakp: Callable[..., SoakpProcess], test_ca: Any, realtime: FakeRealtime) -> None:
    """Browsers on an https page must use wss://: the same tunnel behind SOAKP's own TLS."""
    cert, key = test_ca.issue("soakp-wss")
    server = soakp(cert=str(cert), key=str(key))
    assert server.scheme == "https"
    token = server.mint()
    with open_ws(server, protocols=browser_protocols(token)) as ws:
        session_created(ws)
        ws.send(b"\x00\x01 over wss")
        assert ws.recv(timeout=WAIT_S) == b"\x00\x01 over wss"
    assert realtime.wait_for_session().subprotocol == "realtime"


# Frames both ways ###########################################################################################


def test_text_and_binary_frames_both_ways(proxy: SoakpProcess, token: str, realtime: FakeRealtime) -> None:
    big = os.urandom(3 * 1024 * 1024)  # several reads and TLS records: flow control both ways
    sent: list[str | bytes] = ['{"type":"input_text","text":"héllo ✓"}', b"\x00\xff binary \x80", "", b"", big]
    with open_ws(proxy, token=token) as ws:
        session_created(ws)
        for message in sent:
            ws.send(message)
        for message in sent:
            assert ws.recv(timeout=WAIT_S) == message
        ws.send(["frag", "mented ", "text"])  # one message in three frames
        assert ws.recv(timeout=WAIT_S) == "fragmented text"
        # permessage-deflate was negotiated end to end: SOAKP passed compressed frames through untouched
        assert "permessage-deflate" in (ws.response.headers.get("Sec-WebSocket-Extensions") or "")
    session = realtime.wait_for_session()
    assert session.messages == [*sent, "fragmented text"]
    assert "permessage-deflate" in (session.extensions or "")


def test_frames_sent_with_the_handshake_are_not_lost(proxy: SoakpProcess, token: str, realtime: FakeRealtime) -> None:
    """A client that writes a frame right behind its handshake, before the 101: the bytes SOAKP read
    past the request head go through the tunnel too."""
    protocol = ClientProtocol(parse_uri(ws_url(proxy)))
    request = protocol.connect()
    request.headers["Authorization"] = f"Bearer {token}"
    protocol.send_request(request)
    early = Frame(Opcode.TEXT, b"early bird").serialize(mask=True, extensions=[])
    with RawConnection(proxy.port, timeout_s=WAIT_S) as conn:
        conn.send(b"".join(protocol.data_to_send()) + early)
        conn.read_until(lambda data: data.count(b"early bird") >= 1 and b"session.created" in data)
        protocol.receive_data(bytes(conn.buffer))
    events = protocol.events_received()
    assert isinstance(events[0], Response) and events[0].status_code == 101
    texts = [bytes(e.data) for e in events[1:] if isinstance(e, Frame) and e.opcode is Opcode.TEXT]
    assert json.loads(texts[0])["type"] == "session.created"
    assert texts[1] == b"early bird"
    assert realtime.wait_for_session().messages == ["early bird"]


def test_ping_and_pong_both_ways(proxy: SoakpProcess, token: str, realtime: FakeRealtime) -> None:
    with open_ws(proxy, token=token) as ws:
        session_created(ws)
        assert ws.ping(b"client-ping").wait(WAIT_S), "no pong from the upstream through SOAKP"
        ws.send(json.dumps({"type": "fake.ping", "data": "server-ping"}))
        session = realtime.wait_for_session()
        assert realtime.wait_until(lambda: session.pongs == [b"server-ping"], WAIT_S), session.pongs
    assert session.pings == [b"client-ping"]


# Close codes both ways ######################################################################################


@pytest.mark.parametrize(("code", "reason"), [(1000, "bye"), (4000, "client done")])
def test_client_close_code_reaches_the_upstream(
    proxy: SoakpProcess, token: str, realtime: FakeRealtime, code: int, reason: str
) -> None:
    with open_ws(proxy, token=token) as ws:
        session_created(ws)
        ws.close(code, reason)
        assert (ws.close_code, ws.close_reason) == (code, reason)  # the upstream's echo came back
    session = realtime.wait_for_session()
    assert realtime.wait_ended(session) == "closed"
    assert session.client_close == (code, reason)


@pytest.mark.parametrize(("code", "reason"), [(1000, "done"), (4001, "session expired")])
def test_upstream_close_code_reaches_the_client(
    proxy: SoakpProcess, token: str, realtime: FakeRealtime, code: int, reason: str
) -> None:
    with open_ws(proxy, token=token) as ws:
        session_created(ws)
        ws.send(json.dumps({"type": "fake.close", "code": code, "reason": reason}))
        closed = closed_by_peer(ws)
    assert closed.rcvd is not None and (closed.rcvd.code, closed.rcvd.reason) == (code, reason)
    session = realtime.wait_for_session()
    assert realtime.wait_ended(session) == "closed"
    assert session.client_close == (code, reason)  # the client's echo of the close frame got back


@pytest.mark.parametrize("how", ["fake.abort", "fake.eof"])
def test_upstream_dropping_the_connection_ends_the_client(
    proxy: SoakpProcess, token: str, realtime: FakeRealtime, how: str
) -> None:
    with open_ws(proxy, token=token) as ws:
        session_created(ws)
        started = time.monotonic()
        ws.send(json.dumps({"type": how}))
        closed = closed_by_peer(ws, timeout_s=5.0)
    assert closed.rcvd is None  # no close frame: the client sees 1006, abnormal closure
    assert ws.close_code == 1006
    assert time.monotonic() - started < 5.0


def test_client_dropping_the_connection_ends_the_upstream(
    proxy: SoakpProcess, token: str, realtime: FakeRealtime
) -> None:
    with open_ws(proxy, token=token) as ws:
        session_created(ws)
        session = realtime.wait_for_session()
        ws.socket.close()  # no close frame, just gone
        assert realtime.wait_ended(session, timeout_s=5.0) in ("eof", "reset")
    assert session.client_close is None


# Refused before anything reaches the upstream ###############################################################


@pytest.mark.parametrize(
    "offer",
    [
        pytest.param({}, id="nothing"),
        pytest.param({"protocols": ["realtime"]}, id="subprotocol-without-token"),
        pytest.param({"headers": [("Authorization", "Basic YWRtaW46eA==")]}, id="basic-auth"),
    ],
)
def test_missing_token_is_refused_before_the_upstream(
    proxy: SoakpProcess, realtime: FakeRealtime, fake_upstream: FakeUpstream, offer: dict[str, Any]
) -> None:
    before = fake_upstream.connections_accepted
    error = error_of(refused(proxy, **offer), 401)
    assert error["code"] == "invalid_api_key"
    assert_nothing_reached(fake_upstream, realtime, before)


def tampered(token: str) -> str:
    head, payload, signature = token.split(".")
    return f"{head}.{payload}.{'A' if signature[0] != 'A' else 'B'}{signature[1:]}"


@pytest.mark.parametrize("where", ["header", "subprotocol"])
@pytest.mark.parametrize("kind", ["garbage", "tampered"])
def test_bad_token_is_refused_before_the_upstream(
    proxy: SoakpProcess, token: str, realtime: FakeRealtime, fake_upstream: FakeUpstream, where: str, kind: str
) -> None:
    bad = "not-a-soakp-token" if kind == "garbage" else tampered(token)
    offer: dict[str, Any] = {"token": bad} if where == "header" else {"protocols": browser_protocols(bad)}
    before = fake_upstream.connections_accepted
    response = refused(proxy, **offer)
    assert error_of(response, 401)["code"] == "invalid_api_key"
    assert_no_credentials_sent_back(response, bad)
    assert_nothing_reached(fake_upstream, realtime, before)


def test_revoked_token_is_refused(
    proxy: SoakpProcess, minted: Minted, realtime: FakeRealtime, fake_upstream: FakeUpstream
) -> None:
    with open_ws(proxy, protocols=browser_protocols(minted.token)) as ws:
        session_created(ws)
    realtime.reset()
    revoke(proxy, minted.jti)
    before = fake_upstream.connections_accepted
    for offer in ({"token": minted.token}, {"protocols": browser_protocols(minted.token)}):
        assert "revoked" in error_of(refused(proxy, **offer), 401)["message"]
    assert realtime.sessions == [] and fake_upstream.connections_accepted == before


def test_refreshed_token_works_and_the_old_one_does_not(
    proxy: SoakpProcess, minted: Minted, realtime: FakeRealtime
) -> None:
    """The browser story: the page refreshes its token with POST /jwt/refresh before it expires."""
    response = proxy.request("POST", "/jwt/refresh", minted.token)
    assert response.status == 201, response.body
    fresh = proxy.registry.add(response.json()["data"]["jwt"])
    assert error_of(refused(proxy, protocols=browser_protocols(minted.token)), 401)
    with open_ws(proxy, protocols=browser_protocols(fresh)) as ws:
        session_created(ws)
    assert realtime.wait_for_session().offered == ["realtime", KEY_PROTOCOL + minted.key]


def test_token_without_the_realtime_path_is_refused(
    proxy: SoakpProcess, realtime: FakeRealtime, fake_upstream: FakeUpstream
) -> None:
    chat_only = proxy.mint(paths=["/v1/chat/completions"])
    before = fake_upstream.connections_accepted
    for offer in ({"token": chat_only}, {"protocols": browser_protocols(chat_only)}):
        assert error_of(refused(proxy, **offer), 403)["code"] == "path_not_allowed"
        assert error_of(refused(proxy, path="/openai/realtime?model=gpt-realtime", **offer), 403)
    assert_nothing_reached(fake_upstream, realtime, before)
    with open_ws(proxy, token=proxy.mint(paths=["/v1/chat/completions", "/v1/realtime"])) as ws:
        session_created(ws)


def test_models_token_is_held_to_the_model_query(
    proxy: SoakpProcess, realtime: FakeRealtime, fake_upstream: FakeUpstream
) -> None:
    token = proxy.mint(models=["gpt-realtime"])
    before = fake_upstream.connections_accepted
    for query in ("?model=gpt-4o-realtime-preview", "?model=GPT-REALTIME", "?voice=x&model=gpt-realtime-mini"):
        error = error_of(refused(proxy, path="/v1/realtime" + query, token=token), 403)
        assert error["code"] == "model_not_allowed" and error["param"] == "model"
    error_of(refused(proxy, path="/v1/realtime?model=gpt-realtime&model=other", token=token), 400)
    assert_nothing_reached(fake_upstream, realtime, before)
    with open_ws(proxy, token=token) as ws:
        session_created(ws)


@pytest.mark.parametrize("query", ["?model=", "", "?model=gpt-realtime&model=", "?call_id=rtc_123"])
def test_models_token_must_name_an_allowed_model(
    proxy: SoakpProcess, realtime: FakeRealtime, fake_upstream: FakeUpstream, query: str
) -> None:
    """Regression: a blank, missing or doubled `model`, or joining a call by id, slipped past a
    models-limited token, since a tunnel never sees what the session asks for later."""
    token = proxy.mint(models=["gpt-realtime"])
    before = fake_upstream.connections_accepted
    response = refused(proxy, path="/v1/realtime" + query, token=token)
    assert response.status_code in (400, 403)
    error_of(response, response.status_code)
    assert_nothing_reached(fake_upstream, realtime, before)


def test_models_token_cannot_open_other_websockets(
    proxy: SoakpProcess, realtime: FakeRealtime, fake_upstream: FakeUpstream
) -> None:
    """A Responses WebSocket names its model inside the session, out of a tunnel's sight: refused."""
    token = proxy.mint(models=["gpt-realtime"])
    before = fake_upstream.connections_accepted
    error = error_of(refused(proxy, path="/v1/responses?model=gpt-realtime", token=token), 403)
    assert error["code"] == "model_not_allowed"
    assert_nothing_reached(fake_upstream, realtime, before)


def test_websocket_on_another_path_is_tunnelled(
    proxy: SoakpProcess, minted: Minted, fake_upstream: FakeUpstream
) -> None:
    """Any endpoint works: a WebSocket upgrade on /v1/responses reaches the upstream as an upgrade."""
    responses_ws = FakeRealtime().install(fake_upstream, path="/v1/responses")
    with open_ws(proxy, path="/v1/responses", token=minted.token) as ws:
        session_created(ws)
        ws.send("response.create")
        assert ws.recv(timeout=WAIT_S) == "response.create"
    session = responses_ws.wait_for_session()
    assert session.header_all("authorization") == [f"Bearer {minted.key}"]


def test_revoking_a_token_ends_its_open_session(
    proxy: SoakpProcess, minted: Minted, realtime: FakeRealtime
) -> None:
    """Regression: an open session outlived the revocation of its token."""
    with open_ws(proxy, protocols=browser_protocols(minted.token)) as ws:
        session_created(ws)
        ws.send("before")
        assert ws.recv(timeout=WAIT_S) == "before"
        revoke(proxy, minted.jti)
        closed_by_peer(ws, timeout_s=5)


def test_an_expiring_token_ends_its_open_session(proxy: SoakpProcess, realtime: FakeRealtime) -> None:
    token = proxy.mint(ttl=2)
    with open_ws(proxy, token=token) as ws:
        session_created(ws)
        closed_by_peer(ws, timeout_s=6)


def test_origin_bound_token(proxy: SoakpProcess, realtime: FakeRealtime, fake_upstream: FakeUpstream) -> None:
    token = proxy.mint(origins=[BROWSER_ORIGIN])
    before = fake_upstream.connections_accepted
    error = error_of(refused(proxy, protocols=browser_protocols(token), origin="http://evil.example"), 403)
    assert error["code"] == "origin_not_allowed"
    assert_nothing_reached(fake_upstream, realtime, before)
    with open_ws(proxy, protocols=browser_protocols(token), origin=BROWSER_ORIGIN) as ws:
        session_created(ws)


def test_rpm_counts_handshakes(proxy: SoakpProcess, realtime: FakeRealtime) -> None:
    token = proxy.mint(rpm=1)
    with open_ws(proxy, token=token) as ws:
        session_created(ws)
    response = refused(proxy, token=token)
    error_of(response, 429)
    assert int(response.headers["Retry-After"]) >= 1
    assert len(realtime.sessions) == 1


# The 101 never names a credential ###########################################################################


def raw_handshake(server: SoakpProcess, protocols: list[str]) -> tuple[int, list[str], str]:
    """Send a handshake by hand; return (status, Sec-WebSocket-Protocol values, the whole raw head)."""
    headers = [("Upgrade", "websocket"), ("Connection", "Upgrade"), ("Sec-WebSocket-Version", "13"),
               ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="), ("Sec-WebSocket-Protocol", ", ".join(protocols))]
    with RawConnection(server.port, timeout_s=WAIT_S) as conn:
        conn.send(build_request("GET", MODEL_QUERY, headers, host=f"127.0.0.1:{server.port}"))
        response = conn.read_response()
    return response.status, response.header_all("sec-websocket-protocol"), response.raw_head.decode("latin-1")


@pytest.mark.parametrize("choose", ["realtime", "none", "key"])
def test_101_names_only_a_subprotocol_without_credentials(
    proxy: SoakpProcess, minted: Minted, fake_upstream: FakeUpstream, choose: str
) -> None:
    """Whatever the upstream picks (even the protocol carrying the key), the client is told `realtime`,
    the first credential-free protocol it offered: browsers fail a handshake that names none."""
    realtime = FakeRealtime(choose=choose).install(fake_upstream)  # type: ignore[arg-type]
    offer = ["realtime", KEY_PROTOCOL + minted.token, "openai-beta.realtime-v1"]
    status, chosen, raw_head = raw_handshake(proxy, offer)
    assert status == 101
    assert chosen == ["realtime"]
    assert minted.token not in raw_head and minted.key not in raw_head
    assert realtime.wait_for_session().offered == ["realtime", KEY_PROTOCOL + minted.key, "openai-beta.realtime-v1"]


def test_101_without_a_safe_offer_names_no_subprotocol(
    proxy: SoakpProcess, minted: Minted, fake_upstream: FakeUpstream
) -> None:
    FakeRealtime(choose="key").install(fake_upstream)
    status, chosen, raw_head = raw_handshake(proxy, [KEY_PROTOCOL + minted.token])
    assert status == 101
    assert chosen == []
    assert minted.token not in raw_head and minted.key not in raw_head


# The upstream refuses or fails ##############################################################################


def test_upstream_refusing_the_upgrade_is_relayed(
    proxy: SoakpProcess, token: str, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.script("/v1/realtime", openai_error(403, "Realtime is not enabled for this project.",
                                                      type="invalid_request_error", code="realtime_disabled",
                                                      headers=[("x-request-id", "req_refused")]))
    response = refused(proxy, protocols=browser_protocols(token))
    error = error_of(response, 403)
    assert (error["code"], error["message"]) == ("realtime_disabled", "Realtime is not enabled for this project.")
    assert response.headers["x-request-id"] == "req_refused"
    assert "Sec-WebSocket-Accept" not in response.headers


def test_upstream_refusing_the_key_is_relayed(proxy: SoakpProcess, minted: Minted, fake_upstream: FakeUpstream) -> None:
    realtime = FakeRealtime(expected_key="sk-some-other-key").install(fake_upstream)
    response = refused(proxy, token=minted.token)
    assert error_of(response, 401)["code"] == "invalid_api_key"
    assert realtime.wait_for_session().end == "refused"


def test_upstream_silent_during_the_handshake_is_a_504(
    soakp: Callable[..., SoakpProcess], fake_upstream: FakeUpstream
) -> None:
    fake_upstream.script("/v1/realtime", stall(max_s=10))
    server = soakp(read_timeout="1s")
    started = time.monotonic()
    error_of(refused(server, token=server.mint()), 504)
    assert time.monotonic() - started < 5


def test_upstream_certificate_that_does_not_verify_gets_no_key(
    soakp: Callable[..., SoakpProcess], fake_upstream: FakeUpstream, realtime: FakeRealtime
) -> None:
    server = soakp(upstream_ca=None)  # certifi's bundle does not know the test CA
    error_of(refused(server, token=server.mint()), 502)
    assert fake_upstream.requests == [] and realtime.sessions == []


# Limits of the tunnel #######################################################################################


def test_idle_tunnel_is_closed_and_accounted(soakp: Callable[..., SoakpProcess], realtime: FakeRealtime) -> None:
    server = soakp(read_timeout="1s")
    minted = server.mint_data()
    with open_ws(server, protocols=browser_protocols(minted.token)) as ws:
        session_created(ws)
        assert metric(server, "soakp_open_streams") == 1
        started = time.monotonic()
        closed = closed_by_peer(ws, timeout_s=6.0)
        idle_s = time.monotonic() - started
    assert 0.9 < idle_s < 4.0, idle_s
    assert closed.rcvd is None  # a byte tunnel can only drop the connection, not send a close frame
    assert realtime.wait_ended(realtime.wait_for_session(), timeout_s=5.0) in ("eof", "reset")
    assert wait_for(lambda: metric(server, "soakp_open_streams") == 0)
    assert wait_for(lambda: '"path":"/v1/realtime"' in server.log_text())
    line = next(json.loads(line) for line in server.log_text().splitlines() if '"path":"/v1/realtime"' in line)
    assert (line["status"], line["jti"], line["model"]) == (101, minted.jti, "gpt-realtime")


def test_shutdown_ends_open_tunnels(soakp: Callable[..., SoakpProcess], realtime: FakeRealtime) -> None:
    server = soakp(shutdown_grace="1s")
    with open_ws(server, token=server.mint()) as ws:
        session_created(ws)
        server.popen.send_signal(signal.SIGTERM)
        closed_by_peer(ws, timeout_s=8.0)
    assert server.popen.wait(8.0) == 0
    assert realtime.wait_ended(realtime.wait_for_session(), timeout_s=5.0) in ("eof", "reset")
