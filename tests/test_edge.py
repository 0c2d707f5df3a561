"""The aarch64 zipapp on an arm64 Debian 12 root under qemu-user-static: `make edge-test` (in
.ci/run).

What an edge device (a Raspberry Pi 4 or 5 with Raspberry Pi OS / Debian 12, say) does with the
README's edge instructions, minus the hardware: `make zipapp PLATFORM=manylinux2014_aarch64
PYVER=3.11` builds the file, and an arm64 Debian 12 root made with `mmdebstrap --arch=arm64` (its
python3 is 3.11, as on the device) runs it: every arm64 binary there, Python and cryptography's Rust
library included, runs under qemu-aarch64 through binfmt_misc. The root shares the host's network,
so the proxied request goes from a client on the host through SOAKP in the root to the fake upstream
on the host, all on 127.0.0.1.

The root is cached under build/edge/ (about 4 minutes to make, 230 MB); `make clean` removes it.
Times and memory measured here are under emulation, several times slower than the real CPU: they go
to build/edge/timings.txt, labelled so, for the README's edge section."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import SecretsRegistry, soakp_env
from deploy_support import ROOT, free_port, require_tools, stop_processes
from fake_upstream import CertAuthority, FakeUpstream, RawConnection, build_request, exchange
from proc_helpers import memory_kib
from test_certbot import client_verifying_as, mint_over

pytestmark = pytest.mark.edge

EDGE_DIR = ROOT / "build" / "edge"
ROOT_TAR = EDGE_DIR / "arm64-root.tar"
ARM64_ROOT = EDGE_DIR / "arm64-root"
TIMINGS = EDGE_DIR / "timings.txt"
MMDEBSTRAP_TIMEOUT_S = 1800
START_TIMEOUT_S = 120.0  # emulated: a start takes seconds, not the 0.2 s of a native one
LISTENING = re.compile(r"listening on https://127\.0\.0\.1:(\d+)")


def note(text: str) -> None:
    EDGE_DIR.mkdir(parents=True, exist_ok=True)
    with open(TIMINGS, "a") as out:
        out.write(text + "\n")


def in_root(*command: str) -> list[str]:
    """A command run inside the arm64 root (chroot; binfmt_misc hands arm64 binaries to qemu)."""
    return [shutil.which("chroot") or "/usr/sbin/chroot", str(ARM64_ROOT), *command]


@pytest.fixture(scope="session")
def arm64_root() -> Path:
    """build/edge/arm64-root: Debian 12 for arm64 with python3, made once and kept."""
    require_tools(
        "mmdebstrap",
        "qemu-aarch64-static",
        "chroot",
        install_hint="make edge-deps installs mmdebstrap, qemu-user-static and binfmt-support",
    )
    binfmt = Path("/proc/sys/fs/binfmt_misc/qemu-aarch64")
    assert binfmt.exists() and "enabled" in binfmt.read_text(), (
        "qemu-aarch64 is not registered with binfmt_misc (make edge-deps registers it)"
    )
    stamp = ARM64_ROOT / ".complete"
    if not stamp.exists():
        if not ROOT_TAR.exists():
            EDGE_DIR.mkdir(parents=True, exist_ok=True)
            started = time.monotonic()
            made = subprocess.run(
                [
                    "mmdebstrap",
                    "--arch=arm64",
                    "--variant=minbase",
                    "--include=python3",
                    "--dpkgopt=path-exclude=/usr/share/doc/*",
                    "--dpkgopt=path-exclude=/usr/share/man/*",
                    "--format=tar",
                    "bookworm",
                    f"{ROOT_TAR}.tmp",
                ],
                capture_output=True,
                text=True,
                timeout=MMDEBSTRAP_TIMEOUT_S,
                stdin=subprocess.DEVNULL,
            )
            assert made.returncode == 0, made.stdout[-4000:] + made.stderr[-4000:]
            os.replace(f"{ROOT_TAR}.tmp", ROOT_TAR)
            note(
                f"arm64 root made with mmdebstrap (not emulated work alone: downloads too): "
                f"{time.monotonic() - started:.0f} s"
            )
        shutil.rmtree(ARM64_ROOT, ignore_errors=True)
        ARM64_ROOT.mkdir(parents=True)
        subprocess.run(
            ["tar", "-xf", str(ROOT_TAR), "-C", str(ARM64_ROOT)], check=True, timeout=600
        )
        stamp.touch()
    machine = subprocess.run(
        in_root(
            "/usr/bin/python3",
            "-c",
            "import platform, sys; print(platform.machine(), '%d.%d' % sys.version_info[:2])",
        ),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert machine.stdout.split() == ["aarch64", "3.11"], machine.stdout + machine.stderr
    return ARM64_ROOT


@pytest.fixture(scope="session")
def edge_zipapp(arm64_root: Path) -> str:
    """The aarch64 zipapp, built by the Makefile target the README names, copied into the root."""
    output = EDGE_DIR / "soakp-aarch64.pyz"
    command = [
        "make",
        "--no-print-directory",
        "-C",
        str(ROOT),
        "zipapp",
        f"ZIPAPP={output}",
        "PLATFORM=manylinux2014_aarch64",
        "PYVER=3.11",
    ]
    if (Path(sys.prefix) / "bin" / "shiv").exists():
        command.append(f"SHIV_VENV={sys.prefix}")
    built = subprocess.run(
        command, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL
    )
    assert built.returncode == 0, built.stdout + built.stderr
    note(f"aarch64 zipapp: {output.stat().st_size / 1e6:.1f} MB")
    (arm64_root / "opt").mkdir(exist_ok=True)
    shutil.copy(output, arm64_root / "opt" / "soakp.pyz")
    return "/opt/soakp.pyz"


@pytest.fixture
def edge_files(arm64_root: Path, test_ca: CertAuthority) -> Iterator[Path]:
    """A directory inside the root for one test: the upstream CA, the TLS pair, shiv's cache."""
    work = arm64_root / "srv" / f"edge-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    shutil.copy(test_ca.ca_path, work / "upstream-ca.pem")
    yield work
    shutil.rmtree(work, ignore_errors=True)


def root_path(arm64_root: Path, path: Path) -> str:
    return "/" + str(path.relative_to(arm64_root))


def test_aarch64_zipapp_prints_its_version_and_proxies_a_request_under_emulation(
    arm64_root: Path,
    edge_zipapp: str,
    edge_files: Path,
    fake_upstream: FakeUpstream,
    secret: str,
    admin: tuple[str, str],
    secrets_registry: SecretsRegistry,
    tmp_path: Path,
) -> None:
    """`--version`, `selfsigned` and `serve` on the arm64 root; a client on the host mints a token
    and sends a chat request through SOAKP there to the fake upstream on the host, which sees the
    key."""
    inside = root_path(arm64_root, edge_files)
    env = {**soakp_env(), "SHIV_ROOT": f"{inside}/shiv", "PATH": "/usr/bin:/bin"}

    started = time.monotonic()
    version = subprocess.run(
        in_root("/usr/bin/python3", edge_zipapp, "--version"),
        capture_output=True,
        text=True,
        env=env,
        timeout=START_TIMEOUT_S,
    )
    first_s = time.monotonic() - started
    assert version.returncode == 0, version.stderr
    assert version.stdout.startswith("soakp ")
    started = time.monotonic()
    again = subprocess.run(
        in_root("/usr/bin/python3", edge_zipapp, "--version"),
        capture_output=True,
        text=True,
        env=env,
        timeout=START_TIMEOUT_S,
    )
    assert again.returncode == 0, again.stderr
    note(
        f"emulated: `--version` {first_s:.1f} s the first time (shiv unpacks), "
        f"{time.monotonic() - started:.1f} s after"
    )

    selfsigned = subprocess.run(
        in_root(
            "/usr/bin/python3",
            edge_zipapp,
            "selfsigned",
            "--dir",
            f"{inside}/tls",
            "--host",
            "localhost",
        ),
        capture_output=True,
        text=True,
        env=env,
        timeout=START_TIMEOUT_S,
    )
    assert selfsigned.returncode == 0, selfsigned.stderr

    port = free_port()
    log_path = tmp_path / "edge-soakp.log"
    secrets_registry.logs.append(log_path)
    serve_env = {
        **env,
        "SOAKP_SECRET": secret,
        "SOAKP_ADMIN_USER": admin[0],
        "SOAKP_ADMIN_PASS": admin[1],
        "SOAKP_UPSTREAM": fake_upstream.url,
        "SOAKP_UPSTREAM_CA": f"{inside}/upstream-ca.pem",
        "SOAKP_DB": f"{inside}/soakp.db",
        "SOAKP_LISTEN": f"127.0.0.1:{port}",
    }
    started = time.monotonic()
    with open(log_path, "wb") as log:
        server = subprocess.Popen(
            in_root("/usr/bin/python3", edge_zipapp, "serve", "--cert-dir", f"{inside}/tls"),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=serve_env,
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not LISTENING.search(log_path.read_text(errors="replace")):
            assert server.poll() is None, log_path.read_text(errors="replace")
            assert time.monotonic() < deadline, log_path.read_text(errors="replace")
            time.sleep(0.05)
        start_s = time.monotonic() - started
        context = client_verifying_as(str(edge_files / "tls" / "fullchain.pem"), "localhost")
        with RawConnection(port, ssl_context=context) as conn:
            conn.send(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
            assert conn.read_response().status == 200
        token = mint_over(port, context, admin, secrets_registry)
        body = b'{"model":"gpt-fake-1","messages":[{"role":"user","content":"from an arm64 root"}]}'
        started = time.monotonic()
        answer = exchange(
            port,
            build_request(
                "POST",
                "/v1/chat/completions",
                [("Authorization", f"Bearer {token}"), ("Content-Type", "application/json")],
                body,
            ),
            ssl_context=context,
        )
        request_s = time.monotonic() - started
        assert answer.status == 200, answer.body
        assert answer.json()["choices"][0]["message"]["content"] == "echo: from an arm64 root"
        record = fake_upstream.wait_for_request("/v1/chat/completions")
        assert record.header_all("authorization")[0].startswith("Bearer sk-test-")
        memory = memory_kib(
            server.pid
        )  # the qemu-aarch64 process that runs Python: emulator included
        note(
            f"emulated: `serve` start to listening {start_s:.1f} s; one proxied chat request "
            f"(new TLS connection) {request_s * 1000:.0f} ms; "
            f"memory VmRSS {memory['VmRSS'] / 1024:.0f} MiB, "
            f"VmHWM {memory['VmHWM'] / 1024:.0f} MiB (qemu-aarch64 included)"
        )
    finally:
        stop_processes(server)
    assert server.returncode == 0, log_path.read_text(errors="replace")
    assert fake_upstream.errors == []
