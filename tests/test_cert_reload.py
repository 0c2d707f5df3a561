"""Certificate reload (SPEC.md, TLS): a renewed pair is used without a restart, a broken one is not.

SOAKP serves a Certbot-style live directory whose symlinks point into archive/. The tests swap those
links the way a renewal does, one at a time, and check what a new handshake sees: after SIGHUP at
once, without it within 10 s (SOAKP checks the files every 5 s). A half-swapped pair (the new
certificate with the old key) keeps the old certificate in use and is logged on one line. Connections
opened before a swap keep working.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509

from fake_upstream import CertAuthority, build_request
from slow_stream import peer_serial, wait_until

if TYPE_CHECKING:
    from conftest import SoakpProcess

KEPT_OLD = "keeping the current certificate: the new pair does not load"
RELOADED = "TLS certificate reloaded"
SPEC_RELOAD_S = 10.0  # SPEC.md: new handshakes use a changed pair within 10 seconds


class Lineage:
    """A Certbot lineage: archive/NAME/{fullchain,privkey}N.pem, and live/NAME/*.pem symlinks to them."""

    def __init__(self, root: Path, ca: CertAuthority, name: str = "soakp.test") -> None:
        self.ca = ca
        self.archive = root / "archive" / name
        self.live = root / "live" / name
        self.archive.mkdir(parents=True)
        self.live.mkdir(parents=True)
        self.serials: list[int] = []

    def issue(self) -> int:
        """Put a new pair from the CA into the archive (not yet live). Returns its version number."""
        version = len(self.serials) + 1
        cert_path, key_path = self.ca.issue(f"v{version}", directory=self.archive)
        cert_path.rename(self.archive / f"fullchain{version}.pem")
        key_path.rename(self.archive / f"privkey{version}.pem")
        chain = (self.archive / f"fullchain{version}.pem").read_bytes()
        self.serials.append(x509.load_pem_x509_certificate(chain).serial_number)
        return version

    def point(self, kind: str, version: int) -> None:
        """Make live/KIND.pem point at version `version` (a relative link, swapped atomically)."""
        link = self.live / f"{kind}.pem"
        temporary = self.live / f".{kind}.pem.new"
        temporary.symlink_to(f"../../archive/{self.archive.name}/{kind}{version}.pem")
        os.replace(temporary, link)

    def go_live(self, version: int) -> None:
        self.point("fullchain", version)
        self.point("privkey", version)


def served_serial(proxy: SoakpProcess) -> int:
    """The serial of the certificate a new handshake gets."""
    with proxy.connect() as conn:
        return peer_serial(conn)


def count(proxy: SoakpProcess, text: str) -> int:
    return proxy.log_text().count(text)


def start_on_version_1(
    soakp: Callable[..., SoakpProcess], ca: CertAuthority, root: Path
) -> tuple[SoakpProcess, Lineage]:
    """A lineage with version 1 live and version 2 waiting in the archive, and SOAKP serving version 1."""
    lineage = Lineage(root, ca)
    lineage.go_live(lineage.issue())
    lineage.issue()  # version 2, the renewal, waits in the archive
    proxy = soakp(cert_dir=str(lineage.live))
    assert proxy.scheme == "https"
    assert served_serial(proxy) == lineage.serials[0]
    return proxy, lineage


def test_sighup_keeps_the_old_certificate_for_a_broken_pair_and_takes_a_good_one_at_once(
    soakp: Callable[..., SoakpProcess], test_ca: CertAuthority, tmp_path: Path
) -> None:
    """SIGHUP with the new certificate but the old key: one log line saying why, the old certificate
    still served. SIGHUP once the key is there too: the next handshake gets the new certificate.
    A connection opened before both swaps still answers."""
    proxy, lineage = start_on_version_1(soakp, test_ca, tmp_path)
    old_serial, new_serial = lineage.serials
    with proxy.connect() as early:
        early.send(build_request("GET", "/healthz"))
        assert early.read_response().status == 200

        lineage.point("fullchain", 2)  # Certbot's swap, half done: new certificate, old key
        proxy.popen.send_signal(signal.SIGHUP)
        assert wait_until(lambda: count(proxy, KEPT_OLD) == 1, 5), proxy.log_text()
        assert served_serial(proxy) == old_serial
        line = next(line for line in proxy.log_text().splitlines() if KEPT_OLD in line)
        assert "fullchain.pem" in line and "key does not belong to the certificate" in line, line
        assert "Traceback" not in proxy.log_text()

        lineage.point("privkey", 2)
        proxy.popen.send_signal(signal.SIGHUP)
        assert wait_until(lambda: count(proxy, RELOADED) == 1, 5), proxy.log_text()
        assert served_serial(proxy) == new_serial
        assert f"{RELOADED}: serial {new_serial:x}" in proxy.log_text()

        early.send(build_request("GET", "/healthz"))
        assert early.read_response().status == 200
        assert peer_serial(early) == old_serial
    assert count(proxy, KEPT_OLD) == 1
    assert proxy.alive


def test_without_a_signal_a_changed_pair_is_served_within_10_seconds(
    soakp: Callable[..., SoakpProcess], test_ca: CertAuthority, tmp_path: Path
) -> None:
    """The file check alone: a half-swapped pair is noticed, logged once and not used; the whole new
    pair is in use within 10 s of its last link changing."""
    proxy, lineage = start_on_version_1(soakp, test_ca, tmp_path)
    old_serial, new_serial = lineage.serials

    lineage.point("fullchain", 2)
    assert wait_until(lambda: count(proxy, KEPT_OLD) == 1, SPEC_RELOAD_S + 2), proxy.log_text()
    assert served_serial(proxy) == old_serial

    lineage.point("privkey", 2)
    landed = time.monotonic()
    assert wait_until(lambda: served_serial(proxy) == new_serial, SPEC_RELOAD_S + 2, interval_s=0.2)
    assert time.monotonic() - landed <= SPEC_RELOAD_S
    assert count(proxy, KEPT_OLD) == 1
    assert count(proxy, RELOADED) == 1


def test_a_missing_certificate_file_is_logged_by_the_file_check(
    soakp: Callable[..., SoakpProcess], test_ca: CertAuthority, tmp_path: Path
) -> None:
    """Regression: a live link pointing nowhere was skipped silently by the 5 s check (only SIGHUP said
    so). It is logged once, the old certificate stays in use, and the server keeps serving."""
    proxy, lineage = start_on_version_1(soakp, test_ca, tmp_path)
    (lineage.live / "fullchain.pem").unlink()
    (lineage.live / "fullchain.pem").symlink_to("../../archive/soakp.test/missing.pem")
    assert wait_until(lambda: count(proxy, KEPT_OLD) == 1, SPEC_RELOAD_S + 2), proxy.log_text()
    assert served_serial(proxy) == lineage.serials[0]
    assert proxy.alive


def test_sighup_without_tls_only_logs(soakp: Callable[..., SoakpProcess]) -> None:
    """Regression: without a certificate, SIGHUP (systemd's ExecReload) killed the server."""
    proxy = soakp()
    assert proxy.scheme == "http"
    proxy.popen.send_signal(signal.SIGHUP)
    assert wait_until(lambda: "no certificate to reload" in proxy.log_text(), 5), proxy.log_text()
    with proxy.connect() as conn:
        conn.send(build_request("GET", "/healthz"))
        assert conn.read_response().status == 200
    assert proxy.alive
