"""Helpers for the deployment tests: Pebble on chosen addresses and DNS servers, and Podman.

tests/test_certbot.py runs Pebble for the entrypoint on the host. The container test needs Pebble's
own HTTPS listener to be trusted under the address a container reaches the host by, and the DNS-01
test needs Pebble to ask a real authoritative server (BIND) instead of its DNS stub, so Pebble is
started here from those parts (the same settings and gotchas: shared/recipes/acme-pebble.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PEBBLE_START_S = 10.0


def free_port() -> int:
    """A port free now (Pebble's config needs port numbers up front)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def require_tools(*tools: str, install_hint: str) -> None:
    """Fail (never skip) when a tool the test needs is missing."""
    missing = [tool for tool in tools if not shutil.which(tool)]
    if missing:
        pytest.fail(f"not installed: {', '.join(missing)} ({install_hint})")


def start_logged(
    command: Sequence[str], log_path: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            list(command), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env
        )


def stop_processes(*processes: subprocess.Popen[bytes]) -> None:
    """Terminate processes this test started (by their Popen), then wait for each."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


@dataclass(frozen=True)
class Pebble:
    acme_port: int
    http01_port: int  # where Pebble fetches HTTP-01 answers
    listener_ca: str  # secures Pebble's own HTTPS API: certbot trusts it through REQUESTS_CA_BUNDLE
    root: str  # the root Pebble issues under: clients of SOAKP trust this one
    log: Path

    def directory_url(self, host: str = "127.0.0.1") -> str:
        return f"https://{host}:{self.acme_port}/dir"


@contextlib.contextmanager
def running_pebble(
    work: Path,
    dns_server: str | None = None,
    listener_ips: Sequence[str] = (),
    authz_reuse: int = 100,
) -> Iterator[Pebble]:
    """Pebble on free loopback ports. `dns_server` ("127.0.0.1:PORT") is the server Pebble asks;
    without it Pebble's own DNS stub runs and answers 127.0.0.1 for every name (no AAAA).
    `listener_ips` are extra addresses Pebble's HTTPS listener certificate names (how a container
    reaches the host)."""
    require_tools("pebble", "pebble-challtestsrv", "openssl", install_hint="apt-get install pebble")
    work.mkdir(parents=True, exist_ok=True)
    sans = ",".join(["IP:127.0.0.1", "DNS:localhost", *(f"IP:{ip}" for ip in listener_ips)])
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=pebble",
            "-addext",
            f"subjectAltName={sans}",
            "-addext",
            "keyUsage=critical,digitalSignature,keyCertSign",
            "-keyout",
            str(work / "listener-key.pem"),
            "-out",
            str(work / "listener.pem"),
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    # Loopback only: a container reaches it as 10.0.2.2, slirp4netns's address for the host's
    # loopback.
    acme, management, http01, tls_alpn = (free_port() for _ in range(4))
    (work / "pebble.json").write_text(
        json.dumps(
            {
                "pebble": {
                    "listenAddress": f"127.0.0.1:{acme}",
                    "managementListenAddress": f"127.0.0.1:{management}",
                    "certificate": str(work / "listener.pem"),
                    "privateKey": str(work / "listener-key.pem"),
                    "httpPort": http01,
                    "tlsPort": tls_alpn,
                }
            }
        )
    )
    started: list[subprocess.Popen[bytes]] = []
    try:
        if dns_server is None:
            dns, dns_management = free_port(), free_port()
            dns_server = f"127.0.0.1:{dns}"
            started.append(
                start_logged(
                    [
                        "pebble-challtestsrv",
                        "-dns01",
                        dns_server,
                        "-http01",
                        "",
                        "-https01",
                        "",
                        "-tlsalpn01",
                        "",
                        "-management",
                        f"127.0.0.1:{dns_management}",
                        "-defaultIPv4",
                        "127.0.0.1",
                        "-defaultIPv6",
                        "",
                    ],
                    work / "dns.log",
                )
            )
        env = {
            **os.environ,
            "PEBBLE_VA_NOSLEEP": "1",
            "PEBBLE_WFE_NONCEREJECT": "0",
            "PEBBLE_AUTHZREUSE": str(authz_reuse),
        }
        server = start_logged(
            ["pebble", "-config", str(work / "pebble.json"), "-dnsserver", dns_server],
            work / "pebble.log",
            env,
        )
        started.append(server)
        context = ssl.create_default_context(cafile=str(work / "listener.pem"))
        deadline = time.monotonic() + PEBBLE_START_S
        while True:
            assert server.poll() is None, (work / "pebble.log").read_text()
            try:
                urllib.request.urlopen(
                    f"https://127.0.0.1:{acme}/dir", context=context, timeout=1
                ).read()
                break
            except OSError:
                assert time.monotonic() < deadline, f"pebble did not answer in {PEBBLE_START_S}s"
                time.sleep(0.05)
        root = urllib.request.urlopen(
            f"https://127.0.0.1:{management}/roots/0", context=context, timeout=5
        ).read()
        (work / "root.pem").write_bytes(root)
        yield Pebble(
            acme, http01, str(work / "listener.pem"), str(work / "root.pem"), work / "pebble.log"
        )
    finally:
        stop_processes(*started)
