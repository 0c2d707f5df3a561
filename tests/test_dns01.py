"""certbot-entrypoint.sh's DNS-01 mode, end to end: a wildcard certificate through a real DNS
server.

BIND (Debian's bind9) runs on a loopback port as the authoritative server of `example.test` and
accepts RFC 2136 dynamic updates signed with one TSIG key only. The entrypoint runs on the host, as
tests/test_certbot.py runs it (the image runs the same script): Certbot's dns-rfc2136 plugin
(Debian's python3-certbot-dns-rfc2136, which the image installs by default) adds the
`_acme-challenge` TXT records through BIND, and Pebble validates DNS-01 by asking BIND for them. The
certificate names `*.example.test` and `example.test`; SOAKP serves it to clients asking for two
names under the wildcard, and a forced renewal reaches new handshakes while a stream opened before
it ends whole."""

from __future__ import annotations

import base64
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509

from conftest import SecretsRegistry
from deploy_support import (
    Pebble,
    free_port,
    require_tools,
    running_pebble,
    start_logged,
    stop_processes,
)
from fake_upstream import FakeUpstream, Gate, RawConnection
from slow_stream import StreamWatcher, peer_serial, ticking_sse, wait_until
from test_certbot import (  # noqa: F401 - base_env and entrypoints are fixtures used here
    CERTONLY_S,
    StartEntrypoint,
    base_env,
    client_verifying_as,
    entrypoints,
    mint_over,
    stream_request,
)

ZONE = "example.test"
TSIG_KEY = "soakp-acme"
NAMED_START_S = 20.0


@dataclass(frozen=True)
class Bind:
    port: int
    key: str  # the TSIG key's secret, base64
    log: Path


@pytest.fixture(scope="module")
def bind(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bind]:
    """BIND on a free loopback port, primary for example.test, updated with the TSIG key only."""
    require_tools(
        "named", "nsupdate", install_hint="apt-get install bind9 bind9-dnsutils (make test does)"
    )
    work = tmp_path_factory.mktemp("bind")
    port = free_port()
    key = base64.b64encode(secrets.token_bytes(32)).decode()
    (work / f"{ZONE}.zone").write_text(
        "$TTL 60\n"
        f"@ IN SOA ns.{ZONE}. hostmaster.{ZONE}. 1 60 60 600 1\n"
        f"@ IN NS ns.{ZONE}.\n"
        "ns IN A 127.0.0.1\n"
    )
    (work / "named.conf").write_text(f"""
options {{
    directory "{work}";
    pid-file "{work}/named.pid";
    session-keyfile "{work}/session.key";
    listen-on port {port} {{ 127.0.0.1; }};
    listen-on-v6 {{ none; }};
    recursion no;
    dnssec-validation no;
    allow-transfer {{ none; }};
}};
controls {{ }};
key "{TSIG_KEY}" {{ algorithm hmac-sha256; secret "{key}"; }};
zone "{ZONE}" {{
    type primary;
    file "{work}/{ZONE}.zone";
    update-policy {{ grant {TSIG_KEY} name _acme-challenge.{ZONE}. TXT; }};
}};
logging {{ category default {{ default_stderr; }}; category update {{ default_stderr; }}; }};
""")
    server = start_logged(
        ["named", "-g", "-n", "1", "-c", str(work / "named.conf")], work / "named.log"
    )
    try:
        deadline = time.monotonic() + NAMED_START_S
        while "running" not in (work / "named.log").read_text(errors="replace"):
            assert server.poll() is None, (work / "named.log").read_text(errors="replace")
            assert time.monotonic() < deadline, (work / "named.log").read_text(errors="replace")
            time.sleep(0.05)
        yield Bind(port, key, work / "named.log")
    finally:
        stop_processes(server)


@pytest.fixture(scope="module")
def pebble_on_bind(bind: Bind, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pebble]:
    """Pebble asking BIND (not its DNS stub) for the `_acme-challenge` records."""
    with running_pebble(
        tmp_path_factory.mktemp("pebble-dns01"), dns_server=f"127.0.0.1:{bind.port}", authz_reuse=0
    ) as pebble:
        yield pebble


def test_bind_refuses_an_unsigned_update(bind: Bind) -> None:
    """Only the TSIG key may change the zone: the same update without it is refused."""
    script = (
        f"server 127.0.0.1 {bind.port}\nzone {ZONE}\n"
        f"update add _acme-challenge.{ZONE} 60 TXT x\nsend\n"
    )
    result = subprocess.run(["nsupdate"], input=script, capture_output=True, text=True, timeout=30)
    assert result.returncode != 0 and "REFUSED" in result.stdout + result.stderr, result


def test_wildcard_certificate_over_dns01_served_for_two_names_and_renewed_under_a_stream(
    bind: Bind,
    pebble_on_bind: Pebble,
    entrypoints: StartEntrypoint,
    base_env: dict[str, str],
    fake_upstream: FakeUpstream,
    admin: tuple[str, str],
    secrets_registry: SecretsRegistry,
    tmp_path: Path,
) -> None:
    require_tools(
        "certbot",
        install_hint="apt-get install certbot python3-certbot-dns-rfc2136 (make test does)",
    )
    credentials = tmp_path / "rfc2136.ini"
    credentials.write_text(
        f"dns_rfc2136_server = 127.0.0.1\ndns_rfc2136_port = {bind.port}\n"
        f"dns_rfc2136_name = {TSIG_KEY}\n"
        f"dns_rfc2136_secret = {bind.key}\ndns_rfc2136_algorithm = HMAC-SHA256\n"
    )
    credentials.chmod(0o600)
    env = {
        **base_env,
        "SOAKP_DOMAIN": ZONE,
        "CERTBOT_DOMAINS": f"*.{ZONE},{ZONE}",
        "CERTBOT_DNS_PLUGIN": "rfc2136",
        "CERTBOT_DNS_CREDENTIALS": str(credentials),
        "CERTBOT_DNS_PROPAGATION_SECONDS": "1",  # BIND is the only server: nothing to wait for
        "CERTBOT_EMAIL": "test@example.com",
        "CERTBOT_SERVER": pebble_on_bind.directory_url(),
        "REQUESTS_CA_BUNDLE": pebble_on_bind.listener_ca,
        "RENEW_INTERVAL": "2",
        "CERTBOT_RENEW_ARGS": "--force-renewal --no-random-sleep-on-renew",
    }
    started = time.monotonic()
    entrypoint = entrypoints(env)
    port = entrypoint.wait_listening(CERTONLY_S)
    issued_s = time.monotonic() - started
    assert (
        f"certbot-entrypoint: getting a certificate for *.{ZONE},{ZONE} from "
        f"{pebble_on_bind.directory_url()}"
        " (DNS-01 with certbot's dns-rfc2136 plugin)" in entrypoint.own_lines()
    )
    live = tmp_path / "le" / "live" / ZONE
    certificate = x509.load_pem_x509_certificate((live / "cert.pem").read_bytes())
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sorted(names.get_values_for_type(x509.DNSName)) == [f"*.{ZONE}", ZONE]
    # certbot's TXT records went in through BIND as signed updates, one for each name on the
    # certificate.
    updates = [
        line
        for line in bind.log.read_text(errors="replace").splitlines()
        if f"/key {TSIG_KEY}: updating zone '{ZONE}/IN': "
        f"adding an RR at '_acme-challenge.{ZONE}' TXT" in line
    ]
    assert len(updates) >= 2, bind.log.read_text(errors="replace")

    contexts = {
        name: client_verifying_as(pebble_on_bind.root, name) for name in (f"a.{ZONE}", f"b.{ZONE}")
    }
    serials = set()
    for context in contexts.values():
        with RawConnection(
            port, ssl_context=context
        ) as conn:  # verified as that name, against Pebble's root
            serials.add(peer_serial(conn))
    assert serials == {certificate.serial_number}

    context = contexts[f"a.{ZONE}"]
    token = mint_over(port, context, admin, secrets_registry)
    finish = Gate()
    fake_upstream.script("/v1/chat/completions", ticking_sse(finish))
    stream_conn = RawConnection(port, ssl_context=context)
    stream = StreamWatcher(stream_conn).start(stream_request(token))
    seen: list[int] = []
    try:
        stream.wait_events(3)

        def renewed() -> bool:
            with RawConnection(port, ssl_context=contexts[f"b.{ZONE}"]) as conn:
                seen.append(peer_serial(conn))
            return seen[-1] != certificate.serial_number

        assert wait_until(renewed, 60, interval_s=0.2), entrypoint.log_text()
        stream.wait_events(len(stream.arrivals) + 5)
    finally:
        finish.open()
    response = stream.join()
    assert (
        response.status == 200 and response.complete and response.body.endswith(b"data: [DONE]\n\n")
    )
    assert peer_serial(stream_conn) == certificate.serial_number
    stream_conn.close()
    assert f"INFO TLS certificate reloaded: serial {seen[-1]:x}" in entrypoint.log_text()
    assert wait_until(
        lambda: entrypoint.own_lines()[-1] == "certbot-entrypoint: certbot renew done", 30
    )
    assert entrypoint.stop(signal.SIGTERM) == 0, entrypoint.log_text()
    assert fake_upstream.errors == []
    print(f"DNS-01: wildcard certificate issued and SOAKP listening in {issued_s:.1f} s")


def test_names_and_dns_settings_are_checked_before_anything_runs(
    entrypoints: StartEntrypoint,
    base_env: dict[str, str],
    tmp_path: Path,
) -> None:
    """A wildcard needs DNS-01, SOAKP_DOMAIN names the lineage so it is never a wildcard, and a
    credentials file that cannot be read stops the start with one line; certbot never runs."""
    cases = {
        "a wildcard name in CERTBOT_DOMAINS needs DNS-01: set CERTBOT_DNS_PLUGIN": {
            "SOAKP_DOMAIN": ZONE,
            "CERTBOT_DOMAINS": f"*.{ZONE}",
        },
        f"SOAKP_DOMAIN must be a plain name (it names the certificate), not '*.{ZONE}';"
        " put wildcards in CERTBOT_DOMAINS": {"SOAKP_DOMAIN": f"*.{ZONE}"},
        f"CERTBOT_DNS_CREDENTIALS names '{tmp_path}/missing.ini', "
        f"which this user ({os.getuid()}) cannot read": {
            "SOAKP_DOMAIN": ZONE,
            "CERTBOT_DNS_PLUGIN": "rfc2136",
            "CERTBOT_DNS_CREDENTIALS": str(tmp_path / "missing.ini"),
        },
        f"CERTBOT_DOMAINS must be names separated by commas, not '{ZONE} www.{ZONE}'": {
            "SOAKP_DOMAIN": ZONE,
            "CERTBOT_DOMAINS": f"{ZONE} www.{ZONE}",
        },
    }
    for line, settings in cases.items():
        entrypoint = entrypoints(
            {**base_env, "CERTBOT_EMAIL": "test@example.com", "CERTBOT": "false", **settings}
        )
        assert entrypoint.popen.wait(30) == 2
        assert entrypoint.own_lines() == [f"certbot-entrypoint: {line}"], entrypoint.log_text()
