"""GET /metrics, end to end: admin-only, Prometheus text format that the official `prometheus_client` parser
reads, and figures that move as requests go through: requests by route and status class, latency and
time-to-first-byte histograms, upstream errors by kind, open connections and streams, tokens used by sub.
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest
from conftest import basic_auth
from fake_upstream import FakeUpstream, Gate, build_request, die_mid_body, openai_error
from prometheus_client.parser import text_string_to_metric_families
from usage_upstream import Sent, admin_get, chat_stream, sample_value, scrape

if TYPE_CHECKING:
    from conftest import SoakpLauncher, SoakpProcess

CHAT = "/v1/chat/completions"
CHAT_BODY = b'{"model":"gpt-fake-1","messages":[{"role":"user","content":"hi"}]}'
FAMILIES = {
    "soakp_requests": "counter",
    "soakp_request_duration_seconds": "histogram",
    "soakp_time_to_first_byte_seconds": "histogram",
    "soakp_upstream_errors": "counter",
    "soakp_client_disconnects": "counter",
    "soakp_open_connections": "gauge",
    "soakp_open_streams": "gauge",
    "soakp_tokens_used": "counter",
}


@pytest.fixture(scope="module")
def metrics_server(soakp_launcher: SoakpLauncher) -> Iterator[SoakpProcess]:
    """A SOAKP of this module's own, so that gauges and counters see only this module's traffic."""
    process = soakp_launcher.start()
    yield process
    process.stop()


@pytest.fixture
def server(metrics_server: SoakpProcess, fake_upstream: FakeUpstream) -> SoakpProcess:
    assert metrics_server.alive, metrics_server.log_text()[-3000:]
    return metrics_server


def chat(proxy: SoakpProcess, token: str | None) -> Any:
    return proxy.request("POST", CHAT, token, [("Content-Type", "application/json")], CHAT_BODY)


def histogram_count(families: dict[str, Any], name: str, route: str) -> float:
    return sample_value(families, f"{name}_count", route=route)


def check_histogram(family: Any) -> None:
    """Buckets per route: `le` ascending and ending in +Inf, counts cumulative, +Inf equal to _count."""
    by_route: dict[str, list[tuple[float, float]]] = {}
    counts, sums = {}, {}
    for sample in family.samples:
        route = sample.labels["route"]
        if sample.name.endswith("_bucket"):
            by_route.setdefault(route, []).append((float(sample.labels["le"]), sample.value))
        elif sample.name.endswith("_count"):
            counts[route] = sample.value
        elif sample.name.endswith("_sum"):
            sums[route] = sample.value
    assert by_route, f"{family.name} has no buckets"
    for route, buckets in by_route.items():
        bounds = [le for le, _ in buckets]
        assert bounds == sorted(bounds) and bounds[-1] == math.inf, (route, bounds)
        values = [v for _, v in buckets]
        assert values == sorted(values), (route, values)
        assert values[-1] == counts[route] and sums[route] >= 0


def test_metrics_need_the_admin_credentials(server: SoakpProcess) -> None:
    """Without Basic credentials, or with wrong ones, /metrics is a 401 asking for Basic; with them, 200 in
    the Prometheus text format's content type."""
    assert server.request("GET", "/metrics").status == 401
    wrong = server.request("GET", "/metrics", headers=[("Authorization", basic_auth("admin", "not-the-pass"))])
    assert wrong.status == 401 and wrong.header("www-authenticate") == 'Basic realm="soakp"'
    response = admin_get(server, "/metrics")
    assert response.header("content-type") == "text/plain; version=0.0.4"


def test_metrics_parse_with_prometheus_client(server: SoakpProcess, fake_upstream: FakeUpstream) -> None:
    """After some traffic every documented family is there with its type and help text, samples are
    unique, and the histograms are well formed."""
    minted = server.mint_data(sub=f"parse-{secrets.token_hex(3)}")
    assert chat(server, minted.token).status == 200
    fake_upstream.script(CHAT, die_mid_body(how="reset", declared_length=100), times=1)
    assert chat(server, minted.token).status == 502
    text = admin_get(server, "/metrics").body.decode()
    assert text.endswith("\n")
    families = {family.name: family for family in text_string_to_metric_families(text)}
    assert {name: families[name].type for name in FAMILIES} == FAMILIES
    assert all(families[name].documentation for name in FAMILIES)
    seen = [(s.name, tuple(sorted(s.labels.items()))) for f in families.values() for s in f.samples]
    assert len(seen) == len(set(seen)), "a sample appears twice"
    check_histogram(families["soakp_request_duration_seconds"])
    check_histogram(families["soakp_time_to_first_byte_seconds"])
    assert {s.labels["kind"] for s in families["soakp_tokens_used"].samples} == {"prompt", "completion"}


def test_metrics_move_as_requests_go_through(server: SoakpProcess, fake_upstream: FakeUpstream) -> None:
    """Three good chat calls, a 401, an upstream 400 and an upstream that breaks (502): each counter and
    histogram moves by exactly what happened."""
    sub = f"move-{secrets.token_hex(3)}"
    minted = server.mint_data(sub=sub)
    before = scrape(server)
    for _ in range(3):
        assert chat(server, minted.token).status == 200
    assert chat(server, None).status == 401
    fake_upstream.script(CHAT, openai_error(400, "nope"), times=1)
    assert chat(server, minted.token).status == 400
    fake_upstream.script(CHAT, die_mid_body(how="reset", declared_length=100), times=1)
    assert chat(server, minted.token).status == 502
    after = scrape(server)

    def delta(name: str, **labels: str) -> float:
        return sample_value(after, name, **labels) - sample_value(before, name, **labels)

    assert delta("soakp_requests_total", route="/v1/chat", status="2xx") == 3
    assert delta("soakp_requests_total", route="/v1/chat", status="4xx") == 2
    assert delta("soakp_requests_total", route="/v1/chat", status="5xx") == 1
    assert delta("soakp_request_duration_seconds_count", route="/v1/chat") == 6
    assert delta("soakp_request_duration_seconds_sum", route="/v1/chat") > 0
    assert delta("soakp_request_duration_seconds_bucket", route="/v1/chat", le="+Inf") == 6
    # Time to first byte is of forwarded answers: the 401 and the 502 are SOAKP's own.
    assert delta("soakp_time_to_first_byte_seconds_count", route="/v1/chat") == 4
    assert delta("soakp_upstream_errors_total", kind="reset_mid_body") == 1
    assert delta("soakp_tokens_used_total", sub=sub, kind="prompt") == 3 * 9
    assert delta("soakp_tokens_used_total", sub=sub, kind="completion") == 3 * 3
    # The first scrape itself is counted under its own route.
    assert delta("soakp_requests_total", route="/metrics", status="2xx") == 1


def test_unreachable_upstream_counts_as_connect_failed(soakp: Any, fake_upstream: FakeUpstream) -> None:
    """A SOAKP whose upstream refuses connections: 502, counted as kind connect_failed."""
    import socket

    with socket.socket() as holder:  # bound, never listening: connecting to it is refused
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]
        lonely = soakp(upstream=f"https://127.0.0.1:{port}")
        minted = lonely.mint_data()
        assert chat(lonely, minted.token).status == 502
    families = scrape(lonely)
    assert sample_value(families, "soakp_upstream_errors_total", kind="connect_failed") == 1
    assert sample_value(families, "soakp_requests_total", route="/v1/chat", status="5xx") == 1


def test_routes_are_a_bounded_set(server: SoakpProcess) -> None:
    """Paths outside OpenAI's top-level resources share one label, so clients cannot grow the metric."""
    minted = server.mint_data()
    for tail in ("a", "b", "c"):
        server.request("GET", f"/v1/no-such-resource-{tail}/x", minted.token)
    families = scrape(server)
    routes = {s.labels["route"] for s in families["soakp_requests"].samples}
    assert not any("no-such-resource" in route for route in routes)
    assert "/v1/other" in routes


def test_open_streams_and_connections_gauges(server: SoakpProcess, fake_upstream: FakeUpstream) -> None:
    """While a stream is held open by the upstream it shows in soakp_open_streams, and its connection in
    soakp_open_connections; once it ends, the stream gauge is back."""
    baseline = sample_value(scrape(server), "soakp_open_streams")
    sent, gate = Sent(), Gate()
    fake_upstream.script(CHAT, chat_stream(sent, 1, 1, gate=gate, hold_before=2))
    minted = server.mint_data()
    body = b'{"model":"gpt-fake-1","stream":true,"messages":[]}'
    with server.connect() as conn:
        conn.send(build_request("POST", CHAT, [("Authorization", f"Bearer {minted.token}")], body))
        try:
            assert gate.reached.wait(10)
            conn.read_until(lambda data: b'"role":"assistant"' in data, timeout_s=10)
            during = scrape(server)
        finally:
            gate.open()
        assert conn.read_response("POST").complete
    assert sample_value(during, "soakp_open_streams") == baseline + 1
    assert sample_value(during, "soakp_open_connections") >= 2  # the stream's and the scrape's own
    after = sample_value(scrape(server), "soakp_open_streams")
    assert after == baseline


def test_sub_label_is_escaped(server: SoakpProcess) -> None:
    """A sub with a quote, a backslash and spaces comes back intact through the label escaping."""
    sub = f'team "a\\b" {secrets.token_hex(2)}'
    minted = server.mint_data(sub=sub)
    assert chat(server, minted.token).status == 200
    families = scrape(server)
    assert sample_value(families, "soakp_tokens_used_total", sub=sub, kind="prompt") == 9


def test_a_client_leaving_is_not_an_upstream_error(server: SoakpProcess, fake_upstream: FakeUpstream) -> None:
    """A client that closes its connection mid-stream is a client disconnect, not an upstream failure
    (regression: it was counted as soakp_upstream_errors_total{kind="client_gone"})."""
    sent, gate = Sent(), Gate()
    fake_upstream.script(CHAT, chat_stream(sent, 1, 1, gate=gate, hold_before=2))
    minted = server.mint_data()
    before = scrape(server)
    body = b'{"model":"gpt-fake-1","stream":true,"messages":[]}'
    try:
        with server.connect() as conn:
            conn.send(build_request("POST", CHAT, [("Authorization", f"Bearer {minted.token}")], body))
            assert gate.reached.wait(10)
            conn.read_until(lambda data: b'"role":"assistant"' in data, timeout_s=10)
        deadline = time.monotonic() + 10
        after = before
        for _ in range(200):  # until SOAKP has noticed and finished the exchange
            after = scrape(server)
            finished = sample_value(after, "soakp_requests_total", route="/v1/chat", status="2xx")
            if finished > sample_value(before, "soakp_requests_total", route="/v1/chat", status="2xx"):
                break
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
    finally:
        gate.open()
    assert sample_value(after, "soakp_open_streams") == 0
    assert sample_value(after, "soakp_upstream_errors_total", kind="client_gone") == 0
    assert (sample_value(after, "soakp_client_disconnects_total")
            - sample_value(before, "soakp_client_disconnects_total")) == 1
