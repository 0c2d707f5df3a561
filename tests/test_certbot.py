"""certbot-entrypoint.sh, end to end: a real ACME server (Pebble), real Certbot, real SOAKP, all on loopback.

The entrypoint is the Docker image's whole logic, so it is tested here as the image runs it, with only
its settings pointed at temporary directories, a loopback HTTP-01 port and Pebble instead of Let's
Encrypt (the Pebble setup follows the team's recipe, shared/recipes/acme-pebble.md, gotchas included).
Pebble and certbot are Debian packages that .ci/run installs; without them these tests fail, never skip.

Pebble resolves every name to 127.0.0.1 through pebble-challtestsrv's DNS stub, so the certificate is
for `soakp.test`; clients connect to 127.0.0.1 and verify the certificate as that name against
Pebble's issuing root (a new root on every Pebble start, fetched from its management API).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from cryptography import x509

from conftest import basic_auth, soakp_env
from fake_upstream import CertAuthority, FakeUpstream, Gate, RawConnection, build_request, exchange
from slow_stream import StreamWatcher, peer_serial, ticking_sse, wait_until

if TYPE_CHECKING:
    from conftest import SecretsRegistry

ROOT = Path(__file__).resolve().parent.parent
ENTRYPOINT = ROOT / "certbot-entrypoint.sh"
DOCKERFILE = ROOT / "Dockerfile"
SOAKP_PY = ROOT / "soakp.py"
DOMAIN = "soakp.test"
LISTENING = re.compile(r"listening on https://127\.0\.0\.1:(\d+)")
PEBBLE_START_S = 10.0
CERTONLY_S = 60.0  # certbot certonly takes about 3 s here; generous for a slow CI machine
STOP_S = 20.0


# Pebble ####################################################################################################


def free_port() -> int:
    """A port free now. Pebble's config needs port numbers up front, so the usual bind-to-0 cannot work."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class Pebble:
    directory_url: str  # the ACME directory, for CERTBOT_SERVER
    http01_port: int  # where Pebble fetches HTTP-01 answers: certbot's standalone server must be there
    listener_ca: str  # secures Pebble's own HTTPS API: certbot trusts it through REQUESTS_CA_BUNDLE
    root: str  # the root Pebble issues under: clients of SOAKP trust this one


def start_logged(command: list[str], log_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with open(log_path, "wb") as log:
        return subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env)


@pytest.fixture(scope="module")
def pebble(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pebble]:
    """Pebble and its DNS stub on free loopback ports, for this module (Pebble keeps accounts while it runs)."""
    for tool in ("pebble", "pebble-challtestsrv", "certbot", "openssl"):
        if not shutil.which(tool):
            pytest.fail(f"{tool} is not installed: apt-get install pebble certbot (.ci/run does)")
    work = tmp_path_factory.mktemp("pebble")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2",
         "-subj", "/CN=pebble", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
         "-addext", "keyUsage=critical,digitalSignature,keyCertSign",
         "-keyout", str(work / "listener-key.pem"), "-out", str(work / "listener.pem")],
        check=True, capture_output=True, timeout=30,
    )
    acme, management, http01, dns, dns_management, tls_alpn = (free_port() for _ in range(6))
    (work / "pebble.json").write_text(json.dumps({"pebble": {
        "listenAddress": f"127.0.0.1:{acme}", "managementListenAddress": f"127.0.0.1:{management}",
        "certificate": str(work / "listener.pem"), "privateKey": str(work / "listener-key.pem"),
        "httpPort": http01, "tlsPort": tls_alpn,
    }}))
    # Every name resolves to 127.0.0.1 and has no AAAA record (with one, Pebble dials ::1 and fails).
    dns_stub = start_logged(
        ["pebble-challtestsrv", "-dns01", f"127.0.0.1:{dns}", "-http01", "", "-https01", "", "-tlsalpn01", "",
         "-management", f"127.0.0.1:{dns_management}", "-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""],
        work / "dns.log",
    )
    # No random validation sleep, no rejected nonces (certbot retries a badNonce only once), and reuse of
    # valid authorizations, as Let's Encrypt does: the first order validates over HTTP-01 for real,
    # renewals by the same account are quicker.
    env = {**os.environ, "PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0", "PEBBLE_AUTHZREUSE": "100"}
    server = start_logged(["pebble", "-config", str(work / "pebble.json"), "-dnsserver", f"127.0.0.1:{dns}"],
                          work / "pebble.log", env)
    try:
        context = ssl.create_default_context(cafile=str(work / "listener.pem"))
        deadline = time.monotonic() + PEBBLE_START_S
        while True:
            assert server.poll() is None, (work / "pebble.log").read_text()
            try:
                urllib.request.urlopen(f"https://127.0.0.1:{acme}/dir", context=context, timeout=1).read()
                break
            except OSError:
                assert time.monotonic() < deadline, f"pebble did not answer in {PEBBLE_START_S}s"
                time.sleep(0.05)
        root = urllib.request.urlopen(f"https://127.0.0.1:{management}/roots/0", context=context, timeout=5).read()
        (work / "root.pem").write_bytes(root)
        yield Pebble(f"https://127.0.0.1:{acme}/dir", http01, str(work / "listener.pem"), str(work / "root.pem"))
    finally:
        for process in (server, dns_stub):
            process.terminate()
        for process in (server, dns_stub):
            process.wait(10)


# The entrypoint ############################################################################################


def client_verifying_as(cafile: str, name: str) -> ssl.SSLContext:
    """A client context that trusts only `cafile` and checks that the server's certificate names `name`,
    whatever address it connects to (RawConnection passes the address as the server name)."""

    class VerifyingAs(ssl.SSLContext):
        def wrap_socket(self, sock: socket.socket, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
            kwargs["server_hostname"] = name
            return super().wrap_socket(sock, *args, **kwargs)

    context = VerifyingAs(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname
    context.load_verify_locations(cafile)
    return context


class Entrypoint:
    """certbot-entrypoint.sh as a subprocess in a session of its own; stdout and stderr in one log."""

    def __init__(self, env: dict[str, str], log_path: Path, registry: SecretsRegistry) -> None:
        self.log_path = log_path
        registry.logs.append(log_path)  # it holds SOAKP's log too
        with open(log_path, "wb") as log:
            self.popen = subprocess.Popen([str(ENTRYPOINT)], stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def own_lines(self) -> list[str]:
        """The entrypoint's own messages, without certbot's and SOAKP's."""
        return [line for line in self.log_text().splitlines() if line.startswith("certbot-entrypoint: ")]

    def wait_listening(self, timeout_s: float) -> int:
        """The port SOAKP listens on, once it says so. Fails with the log if the entrypoint exits first."""
        deadline = time.monotonic() + timeout_s
        while not (found := LISTENING.search(self.log_text())):
            if self.popen.poll() is not None:
                pytest.fail(f"the entrypoint exited with {self.popen.returncode}:\n{self.log_text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"soakp was not listening after {timeout_s}s:\n{self.log_text()}")
            time.sleep(0.05)
        return int(found[1])

    def wait_line(self, line: str, timeout_s: float) -> None:
        assert wait_until(lambda: line in self.own_lines() or self.popen.poll() is not None, timeout_s)
        assert line in self.own_lines(), self.log_text()

    def stop(self, signum: int, timeout_s: float = STOP_S) -> int:
        """Send `signum` and return the exit status."""
        self.popen.send_signal(signum)
        return self.popen.wait(timeout_s)

    def kill_leftovers(self) -> None:
        """After a failed test: end the entrypoint and everything it started (its own process group)."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(STOP_S)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(STOP_S)


StartEntrypoint = Callable[[dict[str, str]], Entrypoint]


@pytest.fixture
def entrypoints(secrets_registry: SecretsRegistry, tmp_path: Path) -> Iterator[StartEntrypoint]:
    """A factory: entrypoints(env) starts certbot-entrypoint.sh; all are stopped at teardown."""
    started: list[Entrypoint] = []

    def start(env: dict[str, str]) -> Entrypoint:
        entrypoint = Entrypoint(env, tmp_path / f"entrypoint-{len(started) + 1}.log", secrets_registry)
        started.append(entrypoint)
        return entrypoint

    yield start
    for entrypoint in started:
        entrypoint.kill_leftovers()


@pytest.fixture
def base_env(secret: str, admin: tuple[str, str], test_ca: CertAuthority, fake_upstream: FakeUpstream,
             tmp_path: Path) -> dict[str, str]:
    """What every entrypoint run here gets: SOAKP's settings as SOAKP_* variables, state in tmp_path."""
    return {
        **soakp_env(),
        "SOAKP_CMD": f"{sys.executable} {SOAKP_PY}",
        "SOAKP_PIDFILE": str(tmp_path / "run" / "soakp.pid"),
        "SOAKP_SELFSIGNED_DIR": str(tmp_path / "selfsigned"),
        "SOAKP_LETSENCRYPT_DIR": str(tmp_path / "le"),
        "CERTBOT_WORK_DIR": str(tmp_path / "le-work"),
        "CERTBOT_LOGS_DIR": str(tmp_path / "le-logs"),
        "SOAKP_LISTEN": "127.0.0.1:0",
        "SOAKP_SECRET": secret,
        "SOAKP_ADMIN_USER": admin[0],
        "SOAKP_ADMIN_PASS": admin[1],
        "SOAKP_UPSTREAM": fake_upstream.url,
        "SOAKP_UPSTREAM_CA": str(test_ca.ca_path),
        "SOAKP_DB": ":memory:",
        "SOAKP_LOG_LEVEL": "debug",
    }


def acme_env(base_env: dict[str, str], pebble: Pebble, **more: str) -> dict[str, str]:
    return {
        **base_env,
        "SOAKP_DOMAIN": DOMAIN,
        "CERTBOT_EMAIL": "test@example.com",
        "CERTBOT_SERVER": pebble.directory_url,
        "CERTBOT_HTTP01_PORT": str(pebble.http01_port),
        "CERTBOT_HTTP01_ADDRESS": "127.0.0.1",
        "REQUESTS_CA_BUNDLE": pebble.listener_ca,
        **more,
    }


def mint_over(port: int, context: ssl.SSLContext, admin: tuple[str, str], registry: SecretsRegistry) -> str:
    body = json.dumps({"key": registry.new_key()}).encode()
    answer = exchange(port, build_request("POST", "/jwt/generate", [("Authorization", basic_auth(*admin)),
                                                                    ("Content-Type", "application/json")], body),
                      ssl_context=context)
    assert answer.status == 201, answer.body
    return registry.add(answer.json()["data"]["jwt"])


def stream_request(token: str) -> bytes:
    body = b'{"model":"gpt-fake-1","stream":true,"messages":[{"role":"user","content":"tick"}]}'
    return build_request("POST", "/v1/chat/completions", [("Authorization", f"Bearer {token}"),
                                                          ("Content-Type", "application/json")], body)


def pem_serial(path: Path) -> int:
    return x509.load_pem_x509_certificate(path.read_bytes()).serial_number


def log_time(stamp: str) -> float:
    """Seconds since the epoch of a `2026-01-31 12:00:00,123` stamp (SOAKP's and certbot's, local time)."""
    return datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def certbot_logs(tmp_path: Path) -> str:
    """Every certbot run's log (letsencrypt.log, .1, .2, ... as certbot rotates them)."""
    return "".join(p.read_text(errors="replace") for p in sorted((tmp_path / "le-logs").glob("letsencrypt.log*")))


# Tests #####################################################################################################


def test_certificate_is_issued_served_and_renewed_under_a_live_stream(
    pebble: Pebble, entrypoints: StartEntrypoint, base_env: dict[str, str], fake_upstream: FakeUpstream,
    admin: tuple[str, str], secrets_registry: SecretsRegistry, tmp_path: Path,
) -> None:
    """certonly against Pebble, SOAKP on the issued pair, verified by a client that trusts only Pebble's
    root; the renew loop (forced renewals every 2 s here) runs the deploy hook, the next handshake
    shows the new serial, and a stream that was open on one TLS connection all along ends whole.
    SIGTERM then stops SOAKP and the entrypoint with status 0."""
    env = acme_env(base_env, pebble, RENEW_INTERVAL="2",
                   CERTBOT_RENEW_ARGS="--force-renewal --no-random-sleep-on-renew")
    entrypoint = entrypoints(env)
    port = entrypoint.wait_listening(CERTONLY_S)
    live = tmp_path / "le" / "live" / DOMAIN
    assert f"certbot-entrypoint: getting a certificate for {DOMAIN} from {pebble.directory_url}" \
           f" (HTTP-01 on port {pebble.http01_port})" in entrypoint.own_lines()
    assert (live / "fullchain.pem").is_symlink() and (live / "privkey.pem").is_symlink()
    soakp_pid = int((tmp_path / "run" / "soakp.pid").read_text())
    assert f"certbot-entrypoint: started soakp (pid {soakp_pid}): {env['SOAKP_CMD']} serve" in entrypoint.own_lines()
    assert b"serve\0--domain\0soakp.test" in Path(f"/proc/{soakp_pid}/cmdline").read_bytes()
    renewal_conf = (tmp_path / "le" / "renewal" / f"{DOMAIN}.conf").read_text()
    pidfile = tmp_path / "run" / "soakp.pid"
    hook = f"""test ! -f '{pidfile}' || kill -HUP "$(cat '{pidfile}')\""""
    assert f"renew_hook = '''{hook}'''\n" in renewal_conf  # kept for later renewals; configobj's quotes

    context = client_verifying_as(pebble.root, DOMAIN)
    token = mint_over(port, context, admin, secrets_registry)  # the handshake verified the chain and name
    finish = Gate()
    fake_upstream.script("/v1/chat/completions", ticking_sse(finish))
    stream_conn = RawConnection(port, ssl_context=context)
    first_serial = peer_serial(stream_conn)
    stream = StreamWatcher(stream_conn).start(stream_request(token))
    try:
        stream.wait_events(3)
        seen: list[int] = []

        def renewed() -> bool:
            with RawConnection(port, ssl_context=context) as conn:
                seen.append(peer_serial(conn))
            return seen[-1] != first_serial

        assert wait_until(renewed, 45, interval_s=0.2), entrypoint.log_text()
        events_at_swap = len(stream.arrivals)
        stream.wait_events(events_at_swap + 5)  # still flowing on the old connection after the swap
    finally:
        finish.open()
    response = stream.join()
    assert response.status == 200 and response.complete and response.body.endswith(b"data: [DONE]\n\n")
    assert peer_serial(stream_conn) == first_serial
    stream_conn.close()

    archive = tmp_path / "le" / "archive" / DOMAIN
    assert seen[-1] in {pem_serial(p) for p in archive.glob("cert*.pem")}
    assert "certbot-entrypoint: certbot renew done" in entrypoint.own_lines()
    # The deploy hook ran without error and SOAKP reloaded right after it: its SIGHUP, since SOAKP's own
    # file check comes only every 5 s.
    reload_line = rf"^(\S+ \S+) INFO TLS certificate reloaded: serial {seen[-1]:x}$"
    reloaded = re.search(reload_line, entrypoint.log_text(), re.M)
    assert reloaded, entrypoint.log_text()
    certbot_log = certbot_logs(tmp_path)
    assert "Error output from deploy-hook" not in certbot_log and "returned error code" not in certbot_log
    hook_line = r"^(\S+ \S+):INFO:\S+:Running deploy-hook command"
    hook_runs = [log_time(m[1]) for m in re.finditer(hook_line, certbot_log, re.M)]
    reload_at = log_time(reloaded[1])
    assert any(0 <= reload_at - hook_at < 1.0 for hook_at in hook_runs), (reloaded[0], hook_runs)

    # Stop while the loop sleeps between renewals (right after one is done), not in the middle of one.
    assert wait_until(lambda: entrypoint.own_lines()[-1] == "certbot-entrypoint: certbot renew done", 30)
    assert entrypoint.stop(signal.SIGTERM) == 0, entrypoint.log_text()
    assert f"certbot-entrypoint: SIGTERM: passing it on to soakp (pid {soakp_pid})" in entrypoint.own_lines()
    assert entrypoint.own_lines()[-1] == "certbot-entrypoint: soakp exited with status 0"
    assert not (tmp_path / "run" / "soakp.pid").exists()
    assert fake_upstream.errors == []

    # A restart finds the certificate: no new one, a renewal check at once, the same pair served.
    again = entrypoints(acme_env(base_env, pebble, CERTBOT_EMAIL="", RENEW_INTERVAL="3600",
                                 CERTBOT_RENEW_ARGS="--no-random-sleep-on-renew"))
    port = again.wait_listening(30)
    assert f"certbot-entrypoint: using the certificate in {live}; checking it for renewal now" in again.own_lines()
    with RawConnection(port, ssl_context=context) as conn:
        assert peer_serial(conn) == pem_serial(live / "cert.pem")
    again.wait_line("certbot-entrypoint: certbot renew done", 60)
    assert not any("getting a certificate" in line for line in again.own_lines())
    assert again.stop(signal.SIGINT) == 0, again.log_text()
    assert "certbot-entrypoint: SIGINT: passing it on to soakp" in again.log_text()


def test_without_a_domain_it_serves_self_signed_says_so_and_answers_the_healthcheck(
    entrypoints: StartEntrypoint, base_env: dict[str, str], tmp_path: Path,
) -> None:
    """No SOAKP_DOMAIN: `soakp selfsigned` writes a pair, SOAKP serves it, stderr says it is self-signed.
    The Dockerfile's HEALTHCHECK command passes against it, and fails once SOAKP is gone."""
    entrypoint = entrypoints(base_env)
    port = entrypoint.wait_listening(30)
    assert any("SELF-SIGNED certificate for localhost" in line for line in entrypoint.own_lines())
    selfsigned = tmp_path / "selfsigned"
    with RawConnection(port, host="127.0.0.1", ssl_context=client_verifying_as(str(selfsigned / "fullchain.pem"),
                                                                               "localhost")) as conn:
        assert peer_serial(conn) == pem_serial(selfsigned / "fullchain.pem")

    healthcheck = dockerfile_healthcheck()
    env = {**soakp_env(), "SOAKP_LISTEN": f"127.0.0.1:{port}"}
    assert subprocess.run(healthcheck, env=env, capture_output=True, timeout=30).returncode == 0
    assert entrypoint.stop(signal.SIGTERM) == 0, entrypoint.log_text()
    assert subprocess.run(healthcheck, env=env, capture_output=True, timeout=30).returncode != 0


def dockerfile_healthcheck() -> list[str]:
    """The exec-form command of the Dockerfile's HEALTHCHECK, with `python3` as found on PATH here."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    found = re.search(r"^HEALTHCHECK\b.*?\bCMD\s+(\[.*\])\s*$", text, re.M)
    assert found, "no exec-form HEALTHCHECK in the Dockerfile"
    command = json.loads(found[1])
    assert command[0] == "python3"
    return command


def test_the_entrypoint_exits_with_soakps_status(entrypoints: StartEntrypoint, base_env: dict[str, str]) -> None:
    """SOAKP refusing a bad setting (exit 2, one line) makes the entrypoint exit 2 as well."""
    entrypoint = entrypoints({**base_env, "SOAKP_SECRET": "too short"})
    assert entrypoint.popen.wait(30) == 2
    expected = "soakp: SOAKP_SECRET: the master secret must be at least 32 characters"
    assert expected in entrypoint.log_text()
    assert entrypoint.own_lines()[-1] == "certbot-entrypoint: soakp exited with status 2"


def test_a_new_certificate_needs_an_email_and_a_failed_certonly_stops_the_start(
    entrypoints: StartEntrypoint, base_env: dict[str, str], tmp_path: Path,
) -> None:
    """Settings are checked before anything runs; certbot's failure is passed on and SOAKP never starts."""
    no_email = entrypoints({**base_env, "SOAKP_DOMAIN": DOMAIN, "CERTBOT": "false"})
    assert no_email.popen.wait(30) == 2
    assert no_email.own_lines() == [f"certbot-entrypoint: CERTBOT_EMAIL is needed to get a certificate for {DOMAIN}"]

    failing = entrypoints({**base_env, "SOAKP_DOMAIN": DOMAIN, "CERTBOT_EMAIL": "test@example.com",
                           "CERTBOT": "false"})
    assert failing.popen.wait(30) == 1
    assert failing.own_lines()[-1] == \
        f"certbot-entrypoint: certbot certonly failed (exit 1); see {tmp_path}/le-logs/letsencrypt.log"
    assert not any("started soakp" in line for line in failing.own_lines())

    bad_interval = entrypoints({**base_env, "RENEW_INTERVAL": "12h"})
    assert bad_interval.popen.wait(30) == 2
    assert bad_interval.own_lines() == \
        ["certbot-entrypoint: RENEW_INTERVAL must be a whole number of seconds, not '12h'"]
